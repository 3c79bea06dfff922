//! `cargo xtask demo`, end to end, as a subprocess: the binaries this test
//! suite built (no setup, no release build), 200 connections. Needs root
//! and tshark; fails (does not skip) when CI=true and it cannot run.
//!
//! Checks that it succeeds, that every scene printed its result, that the
//! two-node service was split between node A and node B, and that the
//! capture on the node link found only TLS and never the marker.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::{root_test_can_run, root_tests_required, which};

/// The count in the split table's row that starts with `label` (e.g.
/// `node B`): the first integer after the weight column's percentage.
fn row_count(out: &str, label: &str) -> Option<usize> {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(label) && l.contains('%'))?;
    let after = line.split_once('%')?.1;
    after.split_whitespace().next()?.parse().ok()
}

#[test]
fn demo_runs_end_to_end_with_two_nodes_and_proves_tls_only() -> Result<()> {
    if !root_test_can_run("demo_runs_end_to_end_with_two_nodes_and_proves_tls_only") {
        return Ok(());
    }
    let xtask = match ferry_tests::xtask_binary() {
        Ok(x) => x,
        Err(e) if root_tests_required() => return Err(e),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return Ok(());
        }
    };
    if which("tshark").is_none() {
        if root_tests_required() {
            bail!("`tshark` is required (run `cargo xtask setup`)");
        }
        eprintln!("SKIPPED: `tshark` is not installed (run `cargo xtask setup`)");
        return Ok(());
    }
    let ferry = ferry_tests::ferry_binary()?;
    let testkit = ferry_tests::testkit_binary()?;
    let log_path = std::env::temp_dir().join(format!("ferry-demo-test-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(&xtask)
        .arg("demo")
        .args(["--connections", "200", "--ferry-bin"])
        .arg(&ferry)
        .arg("--testkit-bin")
        .arg(&testkit)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} demo", xtask.display()))?;
    // Bounded: the demo takes ~15 s; SIGTERM (the demo cleans up) after
    // 120 s, SIGKILL 20 s later.
    let start = Instant::now();
    let mut terminated = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if !terminated && start.elapsed() > Duration::from_secs(120) {
            // SAFETY: kill(2) on the pid of our own child, a valid signal.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            terminated = true;
        }
        if start.elapsed() > Duration::from_secs(140) {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        status.success() && !terminated,
        "the demo failed ({status}, after {:?}):\n{out}",
        start.elapsed()
    );

    for line in [
        "Using ",
        "Create the topology: two nodes",
        "Start Ferry on both nodes",
        "200 connections from the client pod to http://10.96.0.20/",
        "IPv6: 100 connections",
        "web-2 saw the client's own address",
        "The client saw no failure",
        "web-2 is back in rotation at its weight.",
        "Two nodes: 200 connections to http://10.96.0.30/",
        "web-4 and web-5 saw Ferry B (10.77.2.1)",
        "What crossed the node-to-node link: only TLS on port 15008",
        "every payload packet was TLS to or from port 15008",
        "all TLS 1.3",
        "the marker (sent 4200 times): 0 times",
        "`HTTP/1.1`: 0 times",
        "identities: node A opened 1 mutual-TLS connection(s) to node-b as \
         spiffe://cluster.local/ns/default/sa/client",
        "node B relayed 100 streams from spiffe://cluster.local/ns/default/sa/client\n",
        "removed 8 network namespaces",
        "Demo finished in",
    ] {
        assert!(
            out.contains(line),
            "the demo did not print {line:?}:\n{out}"
        );
    }
    // The two-node split: both nodes got their share (round robin, weights
    // 50 on node A and 25 + 25 on node B).
    assert_eq!(row_count(&out, "node A "), Some(100), "{out}");
    assert_eq!(row_count(&out, "node B "), Some(100), "{out}");
    assert!(!out.contains("warning: left behind"), "{out}");
    Ok(())
}
