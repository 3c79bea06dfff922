//! `cargo xtask build-ebpf`: builds the eBPF programs (`ebpf/programs`, a
//! stand-alone crate) for `bpfel-unknown-none` on stable Rust.
//!
//! The objects land at `<target>/ebpf/bpfel-unknown-none/release/ferry-ebpf`
//! (capture) and `.../ferry-join` (socket joining), the paths
//! `agent/build.rs` embeds; `<target>` is `$CARGO_TARGET_DIR` when
//! set, else `<workspace>/target`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::setup::{self, SetupArgs};
use crate::util::{self, CleanEnv};

const BPF_TARGET: &str = "bpfel-unknown-none";
const OBJECT_NAME: &str = "ferry-ebpf";

#[derive(clap::Args, Debug, Default, Clone)]
pub struct BuildEbpfArgs {
    /// Build the dev profile into `.../bpfel-unknown-none/debug/ferry-ebpf`
    /// instead of release. The agent embeds the release object unless
    /// FERRY_EBPF_OBJECT names another.
    #[arg(long)]
    pub debug: bool,
}

pub fn run(args: &BuildEbpfArgs) -> Result<PathBuf> {
    let toolchain = setup::run(&SetupArgs {
        ebpf_only: true,
        dry_run: false,
    })?;
    let linker = toolchain
        .bpf_linker
        .context("setup did not provide a bpf-linker")?;
    build(&linker, args.debug)
}

/// Builds the eBPF object with `bpf_linker` and returns its path.
pub fn build(bpf_linker: &Path, debug: bool) -> Result<PathBuf> {
    let root = util::workspace_root();
    let crate_dir = root.join("ebpf/programs");
    let target_dir = util::target_dir(&root).join("ebpf");
    let profile = if debug { "debug" } else { "release" };

    let mut cmd = Command::new(util::cargo());
    cmd.current_dir(&crate_dir)
        .args(["build", "-Z", "build-std=core", "--target", BPF_TARGET]);
    if !debug {
        cmd.arg("--release");
    }
    // Behave like a fresh invocation, whatever the outer cargo set.
    let dropped = util::clean_cargo_env(&mut cmd, CleanEnv::Ebpf);
    let mut dropped: Vec<&str> = dropped
        .iter()
        .map(String::as_str)
        .filter(|k| !matches!(*k, "CARGO_TARGET_DIR" | "RUSTC_BOOTSTRAP"))
        .collect();
    dropped.sort_unstable();
    if !dropped.is_empty() {
        println!(
            "note: not passing {} to the eBPF build (host settings)",
            dropped.join(", ")
        );
    }
    // rustup may run cargo with a PATH lacking ~/.cargo/bin; rustc looks up
    // the linker by name.
    let linker_dir = bpf_linker.parent().unwrap_or(Path::new("/"));
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("PATH", util::path_with_prepended(&[linker_dir])?);
    util::run(&mut cmd).context("building the eBPF programs")?;

    let object = target_dir.join(BPF_TARGET).join(profile).join(OBJECT_NAME);
    let size = std::fs::metadata(&object)
        .with_context(|| format!("the build succeeded but {} is missing", object.display()))?
        .len();
    println!(
        "eBPF object: {} ({})",
        object.display(),
        util::size_text(size)
    );
    let join = object.with_file_name("ferry-join");
    let join_size = std::fs::metadata(&join)
        .with_context(|| format!("the build succeeded but {} is missing", join.display()))?
        .len();
    println!(
        "eBPF object: {} ({})",
        join.display(),
        util::size_text(join_size)
    );
    if debug {
        println!(
            "note: the agent embeds the release object; to embed this one, build it with \
             FERRY_EBPF_OBJECT={}",
            object.display()
        );
    }
    Ok(object)
}
