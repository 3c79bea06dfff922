//! Small helpers shared by the tasks: locating the workspace, running
//! commands with errors that show the command line, and giving inner cargo
//! invocations a clean environment.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

/// How many trailing stderr lines a failed command's error shows: fewer for
/// commands whose stderr was already shown as it ran.
const STDERR_TAIL_LINES: usize = 25;
const STREAMED_TAIL_LINES: usize = 12;

/// The workspace root: the parent of xtask's own manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The workspace's target directory: `$CARGO_TARGET_DIR` when set (relative
/// to the workspace root when relative, as `agent/build.rs` reads it), else
/// `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root.join(dir)
            }
        }
        None => root.join("target"),
    }
}

/// The cargo that runs this xtask (`$CARGO`), or `cargo` from `PATH`.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Prints a step header.
pub fn header(title: &str) {
    println!("\n==> {title}");
}

/// Whether `CI` says this is a CI run (`true` or `1`).
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Whether the effective user is root, from `/proc/self/status` (falling
/// back to `id -u`).
pub fn is_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(euid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
    {
        return euid == "0";
    }
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.trim_ascii() == b"0")
}

/// Finds an executable by name in `PATH` (plus `/usr/sbin` and `/sbin`,
/// where Debian puts administrator tools that a non-root `PATH` may lack).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `PATH` with `dirs` put in front.
pub fn path_with_prepended(dirs: &[&Path]) -> Result<OsString> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let joined = dirs
        .iter()
        .map(|d| d.to_path_buf())
        .chain(std::env::split_paths(&current));
    std::env::join_paths(joined).context("building PATH")
}

/// Renders a command as a shell-like line, with the environment variables
/// it sets (not the ones it removes) in front.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            let key = key.to_string_lossy();
            let value = value.to_string_lossy();
            // PATH is long and mostly inherited; show only what was put in
            // front.
            let value = match value.split_once(':') {
                Some((first, _)) if key == "PATH" => format!("{}:$PATH", quote(first)),
                _ => quote(&value),
            };
            parts.push(format!("{key}={value}"));
        }
    }
    parts.push(quote(&cmd.get_program().to_string_lossy()));
    parts.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    let line = parts.join(" ");
    match cmd.get_current_dir() {
        Some(dir) => format!("(cd {} && {line})", quote(&dir.to_string_lossy())),
        None => line,
    }
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn spawn_error(cmd: &Command, err: std::io::Error) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if err.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "could not run `{}`: `{program}` was not found on PATH",
            display(cmd)
        )
    } else {
        anyhow::anyhow!("could not run `{}`: {err}", display(cmd))
    }
}

/// Runs a command to completion, showing its output as it goes. The line is
/// echoed first. On failure the error names the command line and ends with
/// the last lines it wrote to stderr.
pub fn run(cmd: &mut Command) -> Result<()> {
    run_inner(cmd, None)
}

/// Like [`run`], feeding `input` to the command's standard input.
pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    run_inner(cmd, Some(input))
}

fn run_inner(cmd: &mut Command, input: Option<&str>) -> Result<()> {
    println!("$ {}", display(cmd));
    // Keep our own lines ahead of the child's in a pipe.
    std::io::stdout().flush().ok();
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::inherit()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_error(cmd, e))?;

    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("writing to the standard input of `{}`", display(cmd)))?;
    }

    // Pass stderr through while keeping its tail for the error message.
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STREAMED_TAIL_LINES)));
    let reader = child.stderr.take().map(|stderr| {
        let tail = Arc::clone(&tail);
        std::thread::spawn(move || {
            let mut out = std::io::stderr();
            for line in BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { break };
                out.write_all(&line).ok();
                out.write_all(b"\n").ok();
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == STREAMED_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(String::from_utf8_lossy(&line).into_owned());
            }
        })
    });

    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", display(cmd)))?;
    if let Some(reader) = reader {
        reader.join().ok();
    }
    if status.success() {
        return Ok(());
    }
    let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
    let tail: Vec<&str> = tail.iter().map(String::as_str).collect();
    bail!("`{}` failed ({status}){}", display(cmd), format_tail(&tail))
}

/// Runs a command quietly and returns its output, failing (with the command
/// line and the tail of its stderr) unless it exits successfully.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, e))?;
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = &lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..];
    bail!(
        "`{}` failed ({}){}",
        display(cmd),
        out.status,
        format_tail(tail)
    )
}

/// Standard output of a successful command, as text, trimmed.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn format_tail(lines: &[&str]) -> String {
    if lines.iter().all(|l| l.trim().is_empty()) {
        return String::from("; it wrote nothing to stderr");
    }
    let mut s = String::from("; last lines of its stderr:");
    for line in lines {
        s.push_str("\n    ");
        s.push_str(line);
    }
    s
}

/// How much of the caller's environment an inner cargo invocation keeps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CleanEnv {
    /// A host build: drop only what cargo itself set for this process
    /// (package metadata, build-script variables); keep the user's settings
    /// such as `RUSTFLAGS`, `RUSTC_WRAPPER` and `CARGO_TARGET_DIR`.
    Host,
    /// The eBPF build: additionally drop compiler and cargo build settings
    /// (`RUSTC*`, `RUSTFLAGS`, `CARGO_BUILD_*`, `CARGO_PROFILE_*`, ...), which
    /// are meant for the host and would leak into a `bpfel-unknown-none`
    /// build. Registry, network and terminal settings are kept.
    Ebpf,
}

/// Variables cargo sets for the processes it runs (`cargo run`, build
/// scripts, tests); an inner cargo sets its own.
fn is_cargo_set(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "CARGO",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_SBOM_PATH",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
        "RUSTC_LINKER",
    ];
    const PREFIXES: &[&str] = &[
        "CARGO_PKG_",
        "CARGO_CFG_",
        "CARGO_FEATURE_",
        "CARGO_BIN_EXE_",
        "DEP_",
        "__CARGO",
    ];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Compiler and build settings that must not reach the eBPF build.
fn is_build_setting(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_BOOTSTRAP",
    ];
    const KEEP_PREFIXES: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
        "CARGO_LOG",
        "CARGO_INSTALL_ROOT",
        "CARGO_BUILD_JOBS",
    ];
    EXACT.contains(&key)
        || (key.starts_with("CARGO_") && !KEEP_PREFIXES.iter().any(|p| key.starts_with(p)))
}

/// Removes the inherited variables that `mode` says an inner cargo must not
/// see. Returns the names of user settings dropped (for [`CleanEnv::Ebpf`]),
/// so the caller can mention them.
pub fn clean_cargo_env(cmd: &mut Command, mode: CleanEnv) -> Vec<String> {
    let mut dropped_settings = Vec::new();
    for (key, _) in std::env::vars_os() {
        let Some(name) = key.to_str() else { continue };
        if is_cargo_set(name) {
            cmd.env_remove(&key);
        } else if mode == CleanEnv::Ebpf && is_build_setting(name) {
            cmd.env_remove(&key);
            dropped_settings.push(name.to_string());
        }
    }
    dropped_settings
}

/// Human-readable size: bytes and KiB.
pub fn size_text(bytes: u64) -> String {
    // Sizes here are far below 2^52, so the conversion is exact.
    format!("{bytes} bytes, {:.1} KiB", bytes as f64 / 1024.0)
}

/// `a b c` from a list of names.
pub fn words<S: AsRef<OsStr>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| s.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(quote("build-std=core"), "build-std=core");
        assert_eq!(quote("^0.13"), "^0.13");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn display_shows_env_and_dir() {
        let mut cmd = Command::new("cargo");
        cmd.args(["build", "--release"])
            .env("RUSTC_BOOTSTRAP", "1")
            .env("PATH", "/x/bin:/usr/bin")
            .env_remove("RUSTFLAGS")
            .current_dir("/w");
        let line = display(&cmd);
        assert!(line.starts_with("(cd /w && "), "{line}");
        assert!(line.contains("RUSTC_BOOTSTRAP=1"), "{line}");
        assert!(line.contains("PATH=/x/bin:$PATH"), "{line}");
        assert!(!line.contains("RUSTFLAGS"), "{line}");
        assert!(line.ends_with("cargo build --release)"), "{line}");
    }

    #[test]
    fn classifies_env() {
        assert!(is_cargo_set("CARGO_PKG_NAME"));
        assert!(is_cargo_set("CARGO_MANIFEST_DIR"));
        assert!(is_cargo_set("CARGO_ENCODED_RUSTFLAGS"));
        assert!(is_cargo_set("OUT_DIR"));
        assert!(!is_cargo_set("CARGO_HOME"));
        assert!(!is_cargo_set("CARGO_TARGET_DIR"));
        assert!(!is_cargo_set("RUSTFLAGS"));

        assert!(is_build_setting("RUSTFLAGS"));
        assert!(is_build_setting("RUSTC_WORKSPACE_WRAPPER"));
        assert!(is_build_setting("CARGO_BUILD_TARGET"));
        assert!(is_build_setting("CARGO_PROFILE_RELEASE_LTO"));
        assert!(is_build_setting("CARGO_TARGET_DIR"));
        assert!(!is_build_setting("CARGO_HOME"));
        assert!(!is_build_setting("CARGO_NET_OFFLINE"));
        assert!(!is_build_setting("CARGO_BUILD_JOBS"));
        assert!(!is_build_setting("CARGO_REGISTRIES_CRATES_IO_PROTOCOL"));
        assert!(!is_build_setting("PATH"));
    }

    #[test]
    fn failure_shows_command_and_stderr_tail() {
        let err = output(Command::new("sh").args(["-c", "echo first >&2; echo boom >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`sh -c 'echo first"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.ends_with("    first\n    boom"), "{err}");

        let err = run(Command::new("sh").args(["-c", "echo streamed >&2; exit 2"]))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("    streamed"), "{err}");
    }

    #[test]
    fn missing_program_is_named() {
        let err = output(&mut Command::new("ferry-no-such-program"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`ferry-no-such-program` was not found on PATH"),
            "{err}"
        );
    }
}
