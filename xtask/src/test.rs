//! `cargo xtask test`: the whole test suite, as CI runs it.
//!
//! Setup (eBPF toolchain and runtime tools), the eBPF build, a workspace
//! build (so the agent embeds the fresh object), `cargo test --workspace`,
//! then `cargo xtask bench --quick` (its own release build, then about half
//! a minute) and `cargo xtask soak --quick` (20 s). `CI` passes through to the tests; with `CI=true`,
//! `FERRY_REQUIRE_ROOT_TESTS=1` makes tests that need root fail instead of
//! skipping. With `CI=true` it then fuzzes the inbound tunnel for 20 s
//! (`cargo xtask fuzz`).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::bench::BenchArgs;
use crate::setup::{self, SetupArgs};
use crate::util::{self, CleanEnv};

#[derive(clap::Args, Debug, Default, Clone)]
pub struct TestArgs {
    /// Extra arguments for `cargo test --workspace`, after `--`; e.g.
    /// `cargo xtask test -- -p ferry-agent -- --nocapture`.
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    pub cargo_test_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    let started = Instant::now();
    let root = util::workspace_root();

    util::header("setup");
    let toolchain = setup::run(&SetupArgs::default())?;
    let linker = toolchain
        .bpf_linker
        .context("setup did not provide a bpf-linker")?;

    util::header("build-ebpf");
    crate::ebpf::build(&linker, false)?;

    let ci = util::is_ci();
    let cargo = |args: &[&str]| {
        let mut cmd = Command::new(util::cargo());
        cmd.current_dir(&root).args(args);
        util::clean_cargo_env(&mut cmd, CleanEnv::Host);
        if ci {
            cmd.env("FERRY_REQUIRE_ROOT_TESTS", "1");
        }
        cmd
    };

    util::header("cargo build --workspace --all-targets");
    util::run(&mut cargo(&["build", "--workspace", "--all-targets"]))?;

    util::header("cargo test --workspace");
    if ci {
        println!("CI=true: FERRY_REQUIRE_ROOT_TESTS=1 (tests needing root fail rather than skip)");
    }
    let mut test = cargo(&["test", "--workspace"]);
    test.args(&args.cargo_test_args);
    util::run(&mut test)?;

    if ci {
        util::header("fuzz (CI: 20 s over all targets)");
        crate::fuzz::run(&crate::fuzz::FuzzArgs {
            seconds: 20,
            target: None,
        })?;
    }

    // The benchmark in its short mode, so it cannot rot: it builds what it
    // needs, runs every way end to end (seconds each) and writes its results
    // to a temporary file.
    util::header("cargo xtask bench --quick");
    if util::is_root() {
        crate::bench::run(&BenchArgs {
            quick: true,
            write: false,
        })?;
    } else if ci {
        anyhow::bail!("CI=true: the quick benchmark needs root (network namespaces, eBPF)");
    } else {
        println!("skipped: the quick benchmark needs root");
    }

    // The memory soak in its short mode (20 s), for the same reason.
    util::header("cargo xtask soak --quick");
    if util::is_root() {
        crate::soak::run(&crate::soak::SoakArgs {
            quick: true,
            ..crate::soak::SoakArgs::default()
        })?;
    } else if ci {
        anyhow::bail!("CI=true: the quick soak needs root (network namespaces, eBPF)");
    } else {
        println!("skipped: the quick soak needs root");
    }

    println!(
        "\nxtask test: all steps passed in {:.0?}",
        started.elapsed()
    );
    Ok(())
}
