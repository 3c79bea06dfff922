//! In-kernel socket joining (`proxy.socket_join`) through real capture: a
//! client in an enrolled pod connects to a service address, Ferry relays to
//! a plaintext backend pod, and once the kernel has switched the client's
//! socket over, its bytes go straight into Ferry's upstream socket.
//! Payloads are pseudo-random and checked by digest at both ends.
//! Needs root; fails (does not skip) when CI=true and it cannot run.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_tests::{Ferry, Group, Pod, Topology, metric_value, root_test_can_run, testkit_binary};

const SERVICE: &str = r#"  - name: blob
    addresses: [10.96.0.40, "fd96::40"]
    ports: [{ port: 80, target_port: 9100 }]
    endpoints:
      - { address: 10.77.1.11 }
"#;
const VIP4: &str = "10.96.0.40:80";
const VIP6: &str = "[fd96::40]:80";
const UP_BYTES: &str = r#"ferry_tcp_bytes_total{service="default/blob",direction="upstream"}"#;
const DOWN_BYTES: &str = r#"ferry_tcp_bytes_total{service="default/blob",direction="downstream"}"#;
const CLOSED: &str = r#"ferry_connections_closed_total{service="default/blob"}"#;
const ENABLED: &str = "ferry_socket_join_enabled";
const JOINED: &str = "ferry_socket_join_connections_total";
const SWITCHED: &str = r#"ferry_ebpf_events_total{program="join_sk_msg",event="switched"}"#;
const REDIRECTED_BYTES: &str =
    r#"ferry_ebpf_events_total{program="join_sk_msg",event="redirected_bytes"}"#;
const ENROLLED: &str = r#"ferry_ebpf_events_total{program="join_sock_ops",event="enrolled"}"#;
const WAIT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

fn setup(name: &str, join: bool) -> Result<(Topology, Pod, Ferry)> {
    let mut t = Topology::new(name)?;
    let client = t.add_pod("cli", 10)?;
    let backend = t.add_pod("be", 11)?;
    t.start_server(&backend, 9100, "be", &["--mode", "hash"])?;
    let cfg = t
        .ferry_config(SERVICE)
        .replace("proxy:\n", &format!("proxy:\n  socket_join: {join}\n"));
    let ferry = t.start_ferry("ferry", &cfg)?;
    Ok((t, client, ferry))
}

fn client(t: &Topology, pod: &Pod, args: &[&str]) -> Result<String> {
    let kit = testkit_binary()?;
    t.exec(&pod.netns, Group::Enrolled, &kit, args)
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or("")
}

/// The server's `hash-ended` line for the `n`th connection (1-based).
fn server_line(t: &mut Topology, n: usize) -> Result<String> {
    for _ in 0..200 {
        let log = t.log_text("server-be");
        if let Some(l) = log
            .lines()
            .filter(|l| l.starts_with("hash-ended"))
            .nth(n - 1)
        {
            return Ok(l.to_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("no hash-ended line #{n}:\n{}", t.log_text("server-be"))
}

/// One transfer: the client sends `up` bytes, the server `down`, checked
/// by digest at both ends. Returns (client line, server line).
fn transfer(
    t: &mut Topology,
    cli: &Pod,
    ferry: &Ferry,
    n: usize,
    vip: &str,
    (up, down): (u64, u64),
    extra: &[&str],
) -> Result<(String, String)> {
    let (up_s, down_s, seed) = (up.to_string(), down.to_string(), (n * 7919).to_string());
    let mut args = vec![
        "hash-client",
        "--connect",
        vip,
        "--send",
        &up_s,
        "--reply",
        &down_s,
        "--seed",
        &seed,
    ];
    args.extend_from_slice(extra);
    let out = client(t, cli, &args).with_context(|| format!("Ferry log:\n{}", ferry.log_text()))?;
    let c = out.trim().to_owned();
    let s = server_line(t, n)?;
    let ctx = format!("client: {c}\nserver: {s}\nFerry log tail:\n{}", tail(ferry));
    assert_eq!(field(&c, "sent"), up_s, "{ctx}");
    assert_eq!(field(&s, "got"), up_s, "{ctx}");
    assert_eq!(field(&c, "sent_hash"), field(&s, "hash"), "{ctx}");
    assert_eq!(field(&s, "sent"), down_s, "{ctx}");
    assert_eq!(field(&c, "received"), down_s, "{ctx}");
    assert_eq!(field(&c, "recv_hash"), field(&s, "sent_hash"), "{ctx}");
    assert_eq!(field(&c, "end"), "eof", "{ctx}");
    assert_eq!(field(&c, "send_end"), "ok", "{ctx}");
    assert_eq!(field(&s, "end"), "eof", "{ctx}");
    assert_eq!(field(&s, "send_end"), "ok", "{ctx}");
    Ok((c, s))
}

/// Ferry's per-connection log lines and warnings.
fn tail(ferry: &Ferry) -> String {
    let log = ferry.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("conn{") || l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let m = ferry.metrics().unwrap_or_default();
    let join: Vec<&str> = m.lines().filter(|l| l.contains("join")).collect();
    format!(
        "{}\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n"),
        join.join("\n")
    )
}

#[test]
fn joined_large_payloads_half_close_and_back_pressure() -> Result<()> {
    if !root_test_can_run("joined_large_payloads_half_close_and_back_pressure") {
        return Ok(());
    }
    let (mut t, cli, ferry) = setup("sj", true)?;
    assert_eq!(
        ferry.metric(ENABLED)?,
        1.0,
        "joining must be available on this kernel:\n{}",
        ferry.log_text()
    );

    // 1. 64 MiB each way at once, IPv4.
    transfer(&mut t, &cli, &ferry, 1, VIP4, (64 * MIB, 64 * MIB), &[])?;
    ferry.wait_metric(CLOSED, 1.0, WAIT)?;
    let m = ferry.metrics()?;
    assert_eq!(metric_value(&m, JOINED), 1.0, "{m}");
    assert_eq!(metric_value(&m, ENROLLED), 1.0, "{m}");
    assert_eq!(metric_value(&m, SWITCHED), 1.0, "{m}");
    let redirected = metric_value(&m, REDIRECTED_BYTES);
    let relayed_up = metric_value(&m, UP_BYTES);
    // The header line went through Ferry; the payload did not.
    assert!(
        redirected >= (64 * MIB) as f64 && relayed_up < MIB as f64,
        "redirected={redirected} relayed_up={relayed_up}\n{m}"
    );
    assert!(relayed_up + redirected >= (64 * MIB) as f64);
    // The other direction is Ferry's relay.
    assert!(metric_value(&m, DOWN_BYTES) >= (64 * MIB) as f64, "{m}");

    // 2. Half-close: the server answers only after the client's FIN, which
    //    must arrive after every redirected byte.
    let (c, _) = transfer(
        &mut t,
        &cli,
        &ferry,
        2,
        VIP4,
        (16 * MIB, 8 * MIB),
        &["--after-eof"],
    )?;
    assert!(c.contains("end=eof"), "{c}");

    // 3. A server that stops reading for 3 s after the first MiB: the
    //    client is held back (its sends block), nothing is lost.
    let started = std::time::Instant::now();
    transfer(
        &mut t,
        &cli,
        &ferry,
        3,
        VIP4,
        (48 * MIB, MIB),
        &["--pause-ms", "3000"],
    )?;
    assert!(started.elapsed() >= Duration::from_secs(3));

    // 4. IPv6, both ways.
    transfer(&mut t, &cli, &ferry, 4, VIP6, (32 * MIB, 32 * MIB), &[])?;

    // 5. An event-driven (tokio, edge-triggered epoll) client, both ways.
    transfer(
        &mut t,
        &cli,
        &ferry,
        5,
        VIP4,
        (32 * MIB, 32 * MIB),
        &["--tokio"],
    )?;

    ferry.wait_metric(CLOSED, 5.0, WAIT)?;
    let m = ferry.metrics()?;
    assert_eq!(metric_value(&m, SWITCHED), 5.0, "{m}");
    assert!(metric_value(&m, UP_BYTES) < MIB as f64, "{m}");
    assert_eq!(
        metric_value(
            &m,
            r#"ferry_ebpf_events_total{program="join_sk_msg",event="error"}"#
        ),
        0.0,
        "{m}"
    );
    Ok(())
}

#[test]
fn joined_resets_propagate() -> Result<()> {
    if !root_test_can_run("joined_resets_propagate") {
        return Ok(());
    }
    let (mut t, cli, ferry) = setup("sjr", true)?;

    // The backend reads 4 MiB of a joined stream, then aborts with RST: the
    // client must see a reset (on its sends or its reads), never a clean end.
    let out = client(
        &t,
        &cli,
        &[
            "hash-client",
            "--connect",
            VIP4,
            "--send",
            "67108864",
            "--reply",
            "0",
            "--reset-after",
            "4194304",
        ],
    )?;
    let s = server_line(&mut t, 1)?;
    assert!(s.contains("end=reset-sent"), "{s}");
    assert!(
        field(&out, "end") == "reset" || field(&out, "send_end") == "reset",
        "client: {out}\nFerry log:\n{}",
        tail(&ferry)
    );
    // (Whichever of its threads sees the reset first consumes the error;
    // the other may then see a plain end of stream, as without joining.)
    ferry.wait_metric(CLOSED, 1.0, WAIT)?;
    let log = ferry.log_text();
    assert!(log.contains("ending=EndpointReset"), "{log}");

    // The client sends 8 MiB over a joined socket, then aborts with RST:
    // the backend gets all 8 MiB, then a reset (not a FIN).
    let out = client(
        &t,
        &cli,
        &[
            "hash-client",
            "--connect",
            VIP4,
            "--send",
            "0",
            "--reply",
            "0",
            "--abort-after",
            "8388608",
        ],
    )?;
    assert!(out.contains("aborted sent=8388608"), "{out}");
    let s = server_line(&mut t, 2)?;
    assert_eq!(field(&s, "end"), "reset", "{s}\n{}", tail(&ferry));
    assert_eq!(field(&s, "got"), "8388608", "{s}");
    assert_eq!(field(&s, "hash"), field(&out, "sent_hash"), "{s}\n{out}");
    ferry.wait_metric(CLOSED, 2.0, WAIT)?;
    assert!(ferry.log_text().contains("ending=ClientReset"));
    let m = ferry.metrics()?;
    assert_eq!(metric_value(&m, SWITCHED), 2.0, "{m}");
    Ok(())
}

#[test]
fn socket_join_off_relays_everything() -> Result<()> {
    if !root_test_can_run("socket_join_off_relays_everything") {
        return Ok(());
    }
    let (mut t, cli, ferry) = setup("sjoff", false)?;
    assert_eq!(ferry.metric(ENABLED)?, 0.0);
    transfer(&mut t, &cli, &ferry, 1, VIP4, (16 * MIB, 16 * MIB), &[])?;
    transfer(
        &mut t,
        &cli,
        &ferry,
        2,
        VIP4,
        (4 * MIB, MIB),
        &["--after-eof"],
    )?;
    ferry.wait_metric(CLOSED, 2.0, WAIT)?;
    let m = ferry.metrics()?;
    for sample in [JOINED, ENROLLED, SWITCHED, REDIRECTED_BYTES] {
        assert_eq!(metric_value(&m, sample), 0.0, "{sample}\n{m}");
    }
    // Everything went through Ferry's relay.
    assert!(metric_value(&m, UP_BYTES) >= (20 * MIB) as f64, "{m}");
    Ok(())
}

/// KNOWN LIMITATION (why `proxy.socket_join` is off by default): a
/// non-blocking client whose joined socket meets a full upstream socket
/// gets EAGAIN (or a short write) from send(), but its own socket stays
/// writable and nothing wakes its edge-triggered poller when the upstream
/// socket drains, so it stalls for good. Seen on Linux 6.18: the tokio
/// client below stops after a few MiB and the server times out.
#[test]
#[ignore = "kernel limitation: a non-blocking client under back-pressure is never woken (see doc)"]
fn joined_nonblocking_client_under_back_pressure() -> Result<()> {
    if !root_test_can_run("joined_nonblocking_client_under_back_pressure") {
        return Ok(());
    }
    let (mut t, cli, ferry) = setup("sjnb", true)?;
    transfer(
        &mut t,
        &cli,
        &ferry,
        1,
        VIP4,
        (48 * MIB, MIB),
        &["--tokio", "--pause-ms", "3000"],
    )?;
    Ok(())
}

/// KNOWN LIMITATION: a blocking read on a client socket enrolled for
/// joining (in a SockHash with an sk_msg program) that has to wait returns
/// EAGAIN when the data arrives (the kernel's tcp_bpf_recvmsg), so a
/// client using plain blocking reads sees a spurious error. Seen on Linux
/// 6.18 with this half-close exchange (client: `end=error:WouldBlock`).
#[test]
#[ignore = "kernel limitation: blocking reads on enrolled sockets can fail with EAGAIN (see doc)"]
fn joined_blocking_reader() -> Result<()> {
    if !root_test_can_run("joined_blocking_reader") {
        return Ok(());
    }
    let (mut t, cli, ferry) = setup("sjbr", true)?;
    transfer(
        &mut t,
        &cli,
        &ferry,
        1,
        VIP4,
        (16 * MIB, 8 * MIB),
        &["--after-eof", "--strict-reads"],
    )?;
    Ok(())
}
