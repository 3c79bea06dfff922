//! `cargo xtask fuzz`: runs the cargo-fuzz targets in agent/fuzz briefly.
//!
//! cargo-fuzz needs nightly flags (`-Zsanitizer`); on stable it runs with
//! `RUSTC_BOOTSTRAP=1`, as the eBPF build does. cargo-fuzz is installed
//! with `cargo install cargo-fuzz --locked` when missing. Each target starts
//! from its committed seeds (agent/fuzz/seeds/<target>) plus the corpus of
//! earlier runs (agent/fuzz/corpus/<target>, not committed); a crash fails
//! the task and leaves the input in agent/fuzz/artifacts/<target>.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{self, CleanEnv};

/// The fuzz targets, in the order they run.
pub const TARGETS: &[&str] = &["inbound_request", "inbound_h2"];

#[derive(clap::Args, Debug, Clone)]
pub struct FuzzArgs {
    /// Total time to fuzz, shared between the targets.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Fuzz only this target.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
}

fn cargo_fuzz_installed() -> bool {
    Command::new(util::cargo())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    if !cargo_fuzz_installed() {
        util::header("cargo install cargo-fuzz --locked");
        let mut c = Command::new(util::cargo());
        c.args(["install", "cargo-fuzz", "--locked"]);
        util::clean_cargo_env(&mut c, CleanEnv::Ebpf);
        util::run(&mut c)?;
    }
    let dir = util::workspace_root().join("agent/fuzz");
    let targets: Vec<&str> = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    let each = (args.seconds / targets.len() as u64).max(1);
    for t in targets {
        util::header(&format!("fuzz {t} for {each}s"));
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = dir.join("seeds").join(t);
        let mut c = Command::new(util::cargo());
        c.current_dir(&dir)
            .args(["fuzz", "run", "-O", t])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={each}"))
            .arg("-rss_limit_mb=4096")
            .arg("-print_final_stats=1");
        util::clean_cargo_env(&mut c, CleanEnv::Ebpf);
        c.env("RUSTC_BOOTSTRAP", "1");
        util::run(&mut c).with_context(|| {
            format!(
                "fuzz target {t} failed; the input is in {}",
                dir.join("artifacts").join(t).display()
            )
        })?;
    }
    Ok(())
}
