//! `cargo xtask bench-tunnel`: the cross-node benchmark (root).
//!
//! Builds the eBPF object and release binaries, then runs
//! `ferry-bench-tunnel` (tests/src/bin), which sets up two nodes in network
//! namespaces and measures, between the same two pods, throughput and
//! round-trip latency direct (plaintext) vs through the HBONE tunnel, and
//! new connections per second with pooling on and off. The report goes to
//! tests/bench/TUNNEL.md.

use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{self, CleanEnv};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchTunnelArgs {
    /// Seconds per throughput and connection-rate run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

pub fn run(args: &BenchTunnelArgs) -> Result<()> {
    let root = util::workspace_root();
    let toolchain = crate::setup::run(&crate::setup::SetupArgs::default())?;
    let linker = toolchain
        .bpf_linker
        .context("setup did not provide a bpf-linker")?;
    util::header("build-ebpf");
    crate::ebpf::build(&linker, false)?;
    util::header("cargo build --release -p ferry-agent -p ferry-tests");
    let mut build = Command::new(util::cargo());
    build.current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "ferry-agent",
        "-p",
        "ferry-tests",
    ]);
    util::clean_cargo_env(&mut build, CleanEnv::Host);
    util::run(&mut build)?;
    let bin = util::target_dir(&root).join("release");
    cross_node(
        &bin.join("ferry-bench-tunnel"),
        &bin.join("ferry"),
        &root.join("tests/bench/TUNNEL.md"),
        args.seconds,
    )
}

/// Runs the cross-node benchmark program with release binaries that are
/// already built (`cargo xtask bench` calls this after its own rows).
pub fn cross_node(
    bench_bin: &std::path::Path,
    ferry_bin: &std::path::Path,
    out: &std::path::Path,
    seconds: u64,
) -> Result<()> {
    util::header("ferry-bench-tunnel (cross node: direct vs mutual TLS tunnel)");
    let mut bench = Command::new(bench_bin);
    bench
        .current_dir(util::workspace_root())
        .env("FERRY_BIN", ferry_bin)
        .arg("--out")
        .arg(out)
        .arg("--seconds")
        .arg(seconds.to_string());
    util::run(&mut bench)
}
