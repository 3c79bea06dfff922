//! Ferry refuses to start, with a clear message, when the process lacks a
//! capability capture needs: here CAP_SYS_ADMIN (cgroup attach) is dropped
//! from the bounding set with `setpriv` before `ferry run`. The check comes
//! before any listener is bound or program loaded, so nothing is touched.
//! Needs root; fails (does not skip) when CI=true and it cannot run.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferry_tests::{ferry_binary, root_test_can_run, which};

#[test]
fn refuses_to_start_without_cap_sys_admin() -> Result<()> {
    if !root_test_can_run("refuses_to_start_without_cap_sys_admin") {
        return Ok(());
    }
    let Some(setpriv) = which("setpriv") else {
        bail!("setpriv (util-linux) is missing");
    };
    let dir = std::env::temp_dir().join(format!("ferry-preflight-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("ferry.yaml");
    std::fs::write(
        &cfg,
        "capture:\n  cgroups: [\"ferry-preflight-never-attached\"]\n  redirect_ipv4: 192.0.2.1\n",
    )?;
    let mut child = Command::new(setpriv)
        .args([
            "--bounding-set",
            "-sys_admin",
            "--inh-caps",
            "-sys_admin",
            "--",
        ])
        .arg(ferry_binary()?)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ferry kept running without CAP_SYS_ADMIN");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("missing capabilities CAP_SYS_ADMIN"),
        "the message names what is missing: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
