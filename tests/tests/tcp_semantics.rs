//! TCP semantics carried through real capture: a client in an enrolled pod
//! connects to a service address, the eBPF programs send it to Ferry, and
//! Ferry relays to a backend pod. A FIN stays a FIN (half-close works both
//! ways), and a reset stays a reset, in both directions.
//! Needs root; fails (does not skip) when CI=true and it cannot run.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_tests::{Ferry, Group, Pod, Topology, root_test_can_run, testkit_binary};

const VIP4: &str = "10.96.0.30";
const VIP6: &str = "fd96::30";
const SERVICE: &str = r#"  - name: echo
    addresses: [10.96.0.30, "fd96::30"]
    ports: [{ port: 80, target_port: 9000 }]
    endpoints:
      - { address: 10.77.1.11 }
"#;
const OPENED: &str = r#"ferry_connections_opened_total{service="default/echo"}"#;
const CLOSED: &str = r#"ferry_connections_closed_total{service="default/echo"}"#;
const UP_BYTES: &str = r#"ferry_tcp_bytes_total{service="default/echo",direction="upstream"}"#;
const DOWN_BYTES: &str = r#"ferry_tcp_bytes_total{service="default/echo",direction="downstream"}"#;
const WAIT: Duration = Duration::from_secs(10);

/// A topology with a client pod, one backend pod running
/// `ferry-testkit serve` with `server_args`, and Ferry capturing the client.
fn setup(name: &str, server_args: &[&str]) -> Result<(Topology, Pod, Ferry)> {
    let mut t = Topology::new(name)?;
    let client = t.add_pod("cli", 10)?;
    let backend = t.add_pod("be", 11)?;
    t.start_server(&backend, 9000, "be", server_args)?;
    let cfg = t.ferry_config(SERVICE);
    let ferry = t.start_ferry("ferry", &cfg)?;
    Ok((t, client, ferry))
}

/// Runs a testkit client in the enrolled cgroup of `pod`; returns its stdout.
fn client(t: &Topology, pod: &Pod, args: &[&str]) -> Result<String> {
    let kit = testkit_binary()?;
    t.exec(&pod.netns, Group::Enrolled, &kit, args)
}

/// Waits for Ferry's one `connection closed` line and returns it.
fn closed_line(ferry: &Ferry) -> Result<String> {
    ferry.wait_log_count("connection closed", 1, WAIT)?;
    ferry
        .log_text()
        .lines()
        .find(|l| l.contains("connection closed"))
        .map(str::to_owned)
        .context("connection closed line")
}

fn half_close(name: &str, vip: &str) -> Result<()> {
    let (t, cli, ferry) = setup(
        name,
        &["--mode", "drain-then-reply", "--reply-bytes", "4194304"],
    )?;
    let target = if vip.contains(':') {
        format!("[{vip}]:80")
    } else {
        format!("{vip}:80")
    };
    // The client sends 1 MiB and half-closes; the backend reads to that FIN
    // and only then answers with 4 MiB: the client's FIN must reach the
    // backend while the other direction stays open.
    let out = client(
        &t,
        &cli,
        &[
            "halfclose-client",
            "--connect",
            &target,
            "--send",
            "1048576",
        ],
    )?;
    assert_eq!(
        out.trim(),
        "header=got=1048576 received=4194304 pattern_ok=true end=eof",
        "Ferry log:\n{}",
        ferry.log_text()
    );
    // It went through Ferry, and Ferry saw exactly those bytes.
    let line = closed_line(&ferry)?;
    assert!(line.contains("ending=Clean"), "{line}");
    assert!(line.contains("upstream_bytes=1048576"), "{line}");
    assert!(line.contains("downstream_bytes=4194316"), "{line}"); // + "got=1048576\n"
    ferry.wait_metric(CLOSED, 1.0, WAIT)?;
    let m = ferry.metrics()?;
    assert_eq!(ferry_tests::metric_value(&m, OPENED), 1.0, "{m}");
    assert_eq!(ferry_tests::metric_value(&m, UP_BYTES), 1048576.0, "{m}");
    assert_eq!(ferry_tests::metric_value(&m, DOWN_BYTES), 4194316.0, "{m}");
    let program = if vip.contains(':') {
        "connect6"
    } else {
        "connect4"
    };
    assert_eq!(
        ferry_tests::metric_value(
            &m,
            &format!(r#"ferry_ebpf_events_total{{program="{program}",event="redirected"}}"#)
        ),
        1.0,
        "{m}"
    );
    Ok(())
}

#[test]
fn half_close_ipv4() -> Result<()> {
    if !root_test_can_run("half_close_ipv4") {
        return Ok(());
    }
    half_close("hc4", VIP4)
}

#[test]
fn half_close_ipv6() -> Result<()> {
    if !root_test_can_run("half_close_ipv6") {
        return Ok(());
    }
    half_close("hc6", VIP6)
}

#[test]
fn backend_reset_reaches_client_as_reset() -> Result<()> {
    if !root_test_can_run("backend_reset_reaches_client_as_reset") {
        return Ok(());
    }
    let (t, cli, ferry) = setup("brst", &["--mode", "reset"])?;
    // The backend reads one chunk and aborts with RST. Through Ferry the
    // client must see a reset, never a clean end of stream.
    let out = client(
        &t,
        &cli,
        &[
            "halfclose-client",
            "--connect",
            "10.96.0.30:80",
            "--send",
            "1000",
        ],
    )?;
    assert!(
        out.contains("end=reset"),
        "client: {out}\nFerry log:\n{}",
        ferry.log_text()
    );
    assert!(out.contains("received=0"), "{out}");
    // Ferry served the connection and says how it ended.
    let line = closed_line(&ferry)?;
    assert!(line.contains(r#"service="default/echo""#), "{line}");
    assert!(line.contains("ending=EndpointReset"), "{line}");
    ferry.wait_metric(CLOSED, 1.0, WAIT)?;
    assert_eq!(ferry.metric(OPENED)?, 1.0);
    Ok(())
}

#[test]
fn client_reset_reaches_backend_as_reset() -> Result<()> {
    if !root_test_can_run("client_reset_reaches_backend_as_reset") {
        return Ok(());
    }
    let (mut t, cli, ferry) = setup("crst", &["--mode", "report"])?;
    // Control: a client that half-closes normally ends as EOF at the backend.
    let out = client(
        &t,
        &cli,
        &[
            "halfclose-client",
            "--connect",
            "10.96.0.30:80",
            "--send",
            "5000",
        ],
    )?;
    assert!(
        out.contains("header=ack") && out.contains("end=eof"),
        "{out}"
    );
    t.wait_log("server-be", "bytes=5000 end=eof", WAIT)?;

    // The client waits for the backend's `ack` (the whole path is up), then
    // aborts with RST: the backend must see a reset, not a FIN.
    let out = client(
        &t,
        &cli,
        &[
            "reset-client",
            "--connect",
            "10.96.0.30:80",
            "--send",
            "3000",
        ],
    )?;
    assert!(out.contains("reset sent"), "{out}");
    t.wait_log("server-be", "bytes=3000 end=reset", WAIT)
        .with_context(|| format!("Ferry log:\n{}", ferry.log_text()))?;
    let server_log = t.log_text("server-be");
    assert_eq!(
        server_log.matches("ended ").count(),
        2,
        "exactly the two connections reached the backend:\n{server_log}"
    );
    // Both went through Ferry (the backend sees the node's address).
    assert!(
        server_log
            .lines()
            .filter(|l| l.starts_with("ended "))
            .all(|l| l.contains("peer=[::ffff:10.77.1.1]:") || l.contains("peer=10.77.1.1:")),
        "{server_log}"
    );
    ferry.wait_log_count("connection closed", 2, WAIT)?;
    let log = ferry.log_text();
    assert!(log.contains("ending=ClientReset"), "{log}");
    ferry.wait_metric(CLOSED, 2.0, WAIT)?;
    Ok(())
}
