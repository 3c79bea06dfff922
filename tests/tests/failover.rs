//! Balancing and failover through real eBPF capture, real clients (curl),
//! real servers in pod network namespaces. Needs root; fails (does not skip)
//! when CI=true and it cannot run.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_tests::{
    Ferry, Group, Pod, Topology, count_ids, root_test_can_run, run, wait_for, which,
};

const WAIT: Duration = Duration::from_secs(30);

fn curl() -> std::path::PathBuf {
    which("curl").expect("curl checked by root_test_can_run")
}

/// `n` sequential connections to `url_base` (`http://VIP`), one per request.
fn batch(t: &Topology, client: &Pod, url_base: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    let url = format!("{url_base}/[1-{n}]");
    let out = t.exec_bounded(
        &client.netns,
        Group::Enrolled,
        &curl(),
        &["-sS", "--connect-timeout", "5", "--max-time", "10", &url],
        Duration::from_secs(120),
        None,
    )?;
    let ids = count_ids(&out);
    let got: usize = ids.values().sum();
    if got != n {
        bail!("{got} of {n} connections answered: {ids:?}\n{out}");
    }
    Ok(ids)
}

fn share(ids: &BTreeMap<String, usize>, prefix: &str) -> usize {
    ids.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| *v)
        .sum()
}

fn endpoint_metric(ferry: &Ferry, name: &str, service: &str, endpoint: &str) -> Result<f64> {
    ferry.metric(&format!(
        r#"{name}{{service="{service}",endpoint="{endpoint}"}}"#
    ))
}

/// Seconds since midnight of a log line's leading RFC 3339 timestamp.
fn line_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let time = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let i = line.find(&format!("{key}="))?;
    line[i + key.len() + 1..].split_whitespace().next()
}

#[test]
fn dead_then_unreachable_endpoint_is_ejected_and_returns() -> Result<()> {
    if !root_test_can_run("dead_then_unreachable_endpoint_is_ejected_and_returns") {
        return Ok(());
    }
    let mut t = Topology::new("fo")?;
    let client = t.add_pod("cli", 10)?;
    let b1 = t.add_pod("b1", 11)?;
    let b2 = t.add_pod("b2", 12)?;
    let b3 = t.add_pod("b3", 13)?;
    t.start_server(&b1, 8080, "b1", &[])?;
    // b2's process dies abruptly after its 100th connection, mid-run. (It
    // dies between connections: a connection already relaying bytes to a
    // process when it dies can only be reset, by any L4 proxy; connect
    // failover is about every connection after.)
    t.start_server(&b2, 8080, "b2", &["--exit-after", "100"])?;
    t.start_server(&b3, 8080, "b3", &[])?;
    let cfg = t.ferry_config(
        r#"  - name: web
    addresses: [10.96.0.60]
    ports: [{ port: 80, target_port: 8080 }]
    failover: { max_connect_attempts: 3, connect_timeout: 300ms, budget: 2s }
    outlier_detection: { consecutive_failures: 3, base_ejection_time: 2s, max_ejection_time: 10s }
    endpoints:
      - { address: 10.77.1.11 }
      - { address: 10.77.1.12 }
      - { address: 10.77.1.13 }
"#,
    );
    let ferry = t.start_ferry("ferry", &cfg)?;
    let svc = "default/web";
    let dead = "10.77.1.12:8080";

    // 2000 connections at a bounded rate (about 5 s), in the background.
    t.spawn(
        "load",
        &client.netns.clone(),
        Group::Enrolled,
        &curl(),
        &[
            "-sS",
            "--rate",
            "400/s",
            "--connect-timeout",
            "5",
            "--max-time",
            "10",
            "http://10.96.0.60/[1-2000]",
        ],
    )?;
    wait_for("b2 ejected", WAIT, || {
        Ok(
            (endpoint_metric(&ferry, "ferry_endpoint_ejections_total", svc, dead)? >= 1.0)
                .then_some(()),
        )
    })?;
    assert!(t.log_text("server-b2").contains("exiting after 100"));
    let opened_at_death = ferry.metric(&format!(
        r#"ferry_connections_opened_total{{service="{svc}"}}"#
    ))?;
    assert!(
        opened_at_death < 1000.0,
        "b2 died in the first half: {opened_at_death}"
    );
    // ...then make its address unreachable (no answer at all): its trial
    // connect when the backoff ends times out instead of being refused.
    run("ip", &["-n", &b2.netns, "link", "set", "eth0", "down"])?;
    let code = t.wait_exit("load", Duration::from_secs(60))?;
    let out = t.log_text("load");
    let ids = count_ids(&out);
    assert_eq!(code, Some(0), "curl failed:\n{out}");
    assert_eq!(
        ids.values().sum::<usize>(),
        2000,
        "every connection answered: {ids:?}"
    );
    assert!(!out.contains("curl:"), "no client-visible failure:\n{out}");
    // b2 served until it was killed, and only then.
    assert_eq!(ids.get("b2"), Some(&100), "{ids:?}");

    // Ejected after the configured failures, and never tried during a backoff.
    let log = ferry.log_text();
    let mut ejections = Vec::new();
    let mut attempts = Vec::new();
    for line in log.lines() {
        if field(line, "endpoint") != Some(dead) {
            continue;
        }
        let Some(at) = line_time(line) else { continue };
        if line.contains("endpoint ejected") {
            let d = field(line, "ejection_time").context("ejection_time")?;
            let secs: f64 = d.trim_end_matches('s').parse().context("ejection_time")?;
            ejections.push((at, secs));
        } else if line.contains("connect failed") {
            attempts.push(at);
        }
    }
    assert!(
        ejections.len() >= 2,
        "ejected when killed and again when its trial hit the unreachable address: {ejections:?}\n{log}"
    );
    assert_eq!(ejections[0].1, 2.0, "first ejection = base time");
    assert_eq!(ejections[1].1, 4.0, "second ejection = 2 x base time");
    let failures_before_first = attempts.iter().filter(|a| **a <= ejections[0].0).count();
    assert_eq!(failures_before_first, 3, "consecutive_failures: 3\n{log}");
    for (at, secs) in &ejections {
        let during: Vec<_> = attempts
            .iter()
            .filter(|a| **a > *at + 0.001 && **a < *at + secs - 0.001)
            .collect();
        assert!(
            during.is_empty(),
            "attempts during the backoff starting at {at}: {during:?}\n{log}"
        );
    }
    assert!(
        log.contains("reason=\"timeout\"") || log.contains("reason=\"unreachable\""),
        "the unreachable phase was exercised:\n{log}"
    );
    assert_eq!(
        ferry.metric(&format!(
            r#"ferry_connect_exhausted_total{{service="{svc}"}}"#
        ))?,
        0.0
    );
    assert!(
        ferry.metric(&format!(
            r#"ferry_connect_retries_total{{service="{svc}"}}"#
        ))? >= 4.0
    );

    // Restarted and reachable, it returns once its backoff ends.
    run("ip", &["-n", &b2.netns, "link", "set", "eth0", "up"])?;
    t.start_server(&b2, 8080, "b2again", &[])?;
    wait_for("b2 back after its backoff", WAIT, || {
        Ok((endpoint_metric(&ferry, "ferry_endpoint_healthy", svc, dead)? == 1.0).then_some(()))
    })?;
    let ids = batch(&t, &client, "http://10.96.0.60", 300)?;
    assert!(
        *ids.get("b2again").unwrap_or(&0) >= 30,
        "the restored endpoint takes traffic again: {ids:?}"
    );
    Ok(())
}

#[test]
fn locality_fails_over_node_zone_region_and_back() -> Result<()> {
    if !root_test_can_run("locality_fails_over_node_zone_region_and_back") {
        return Ok(());
    }
    let mut t = Topology::new("loc")?;
    let client = t.add_pod("cli", 10)?;
    let mut pods = Vec::new();
    for i in 1..=6u8 {
        let p = t.add_pod(&format!("b{i}"), 10 + i)?;
        t.start_server(&p, 8080, &format!("b{i}"), &[])?;
        pods.push(p);
    }
    let node = t.name.clone();
    let services = format!(
        r#"  - name: web
    addresses: [10.96.0.61]
    ports: [{{ port: 80, target_port: 8080 }}]
    failover: {{ max_connect_attempts: 4, connect_timeout: 300ms }}
    outlier_detection: {{ consecutive_failures: 1, base_ejection_time: 2s, max_ejection_percent: 100 }}
    endpoints:
      - {{ address: 10.77.1.11, node: {node}, zone: z1, region: r1 }}
      - {{ address: 10.77.1.12, node: {node}, zone: z1, region: r1 }}
      - {{ address: 10.77.1.13, node: other-a, zone: z1, region: r1 }}
      - {{ address: 10.77.1.14, node: other-a, zone: z1, region: r1 }}
      - {{ address: 10.77.1.15, node: other-b, zone: z2, region: r1 }}
      - {{ address: 10.77.1.16, node: other-b, zone: z2, region: r1 }}
"#
    );
    let cfg = t.ferry_config(&services).replacen(
        &format!("  name: {node}\n"),
        &format!("  name: {node}\n  zone: z1\n  region: r1\n"),
        1,
    );
    let ferry = t.start_ferry("ferry", &cfg)?;
    let vip = "http://10.96.0.61";

    // All healthy: the node's own endpoints only.
    let ids = batch(&t, &client, vip, 60)?;
    assert_eq!(
        share(&ids, "b1") + share(&ids, "b2"),
        60,
        "node first: {ids:?}"
    );

    // Node-local endpoints down: the zone, with no client failure.
    t.kill("server-b1");
    t.kill("server-b2");
    let ids = batch(&t, &client, vip, 60)?;
    assert_eq!(
        share(&ids, "b3") + share(&ids, "b4"),
        60,
        "then the zone: {ids:?}"
    );

    // Zone down too: the region.
    t.kill("server-b3");
    t.kill("server-b4");
    let ids = batch(&t, &client, vip, 60)?;
    assert_eq!(
        share(&ids, "b5") + share(&ids, "b6"),
        60,
        "then the region: {ids:?}"
    );

    // Recovery: traffic comes back to the node once the backoffs end.
    for (i, p) in pods.iter().enumerate().take(4) {
        t.start_server(p, 8080, &format!("b{}r", i + 1), &[])?;
    }
    for ep in ["10.77.1.11:8080", "10.77.1.12:8080"] {
        wait_for(&format!("{ep} back"), WAIT, || {
            Ok(
                (endpoint_metric(&ferry, "ferry_endpoint_healthy", "default/web", ep)? == 1.0)
                    .then_some(()),
            )
        })?;
    }
    let ids = batch(&t, &client, vip, 60)?;
    assert_eq!(
        share(&ids, "b1r") + share(&ids, "b2r"),
        60,
        "back on the node: {ids:?}"
    );
    Ok(())
}

#[test]
fn slow_backend_gets_less_under_p2c_than_random() -> Result<()> {
    if !root_test_can_run("slow_backend_gets_less_under_p2c_than_random") {
        return Ok(());
    }
    let mut t = Topology::new("slow")?;
    let client = t.add_pod("cli", 10)?;
    let b1 = t.add_pod("b1", 11)?;
    let b2 = t.add_pod("b2", 12)?;
    let b3 = t.add_pod("b3", 13)?;
    t.start_server(&b1, 8080, "b1", &[])?;
    t.start_server(&b2, 8080, "b2", &[])?;
    // The slow one answers each request 100 ms late.
    t.start_server(&b3, 8080, "b3", &["--delay-ms", "100"])?;
    let eps = "    endpoints: [{ address: 10.77.1.11 }, { address: 10.77.1.12 }, { address: 10.77.1.13 }]\n";
    let cfg = t.ferry_config(&format!(
        "  - name: p2c\n    addresses: [10.96.0.62]\n    ports: [{{ port: 80, target_port: 8080 }}]\n{eps}\
         \x20 - name: rnd\n    addresses: [10.96.0.63]\n    ports: [{{ port: 80, target_port: 8080 }}]\n    balancing: {{ algorithm: random }}\n{eps}"
    ));
    t.start_ferry("ferry", &cfg)?;
    let run_parallel = |vip: &str| -> Result<BTreeMap<String, usize>> {
        let url = format!("http://{vip}/[1-600]");
        let out = t.exec_bounded(
            &client.netns,
            Group::Enrolled,
            &curl(),
            &[
                "-sS",
                "--parallel",
                "--parallel-immediate",
                "--parallel-max",
                "8",
                "--max-time",
                "10",
                &url,
            ],
            Duration::from_secs(120),
            None,
        )?;
        let ids = count_ids(&out);
        if ids.values().sum::<usize>() != 600 {
            bail!("not every connection answered: {ids:?}");
        }
        Ok(ids)
    };
    let p2c = run_parallel("10.96.0.62")?;
    let rnd = run_parallel("10.96.0.63")?;
    let p2c_share = share(&p2c, "b3") as f64 / 6.0;
    let rnd_share = share(&rnd, "b3") as f64 / 6.0;
    println!("slow endpoint share: p2c_peak_ewma {p2c_share:.1}% random {rnd_share:.1}%");
    assert!(
        (rnd_share - 33.3).abs() < 8.0,
        "random ignores load: {rnd_share:.1}% ({rnd:?})"
    );
    assert!(
        p2c_share < rnd_share / 2.0,
        "P2C steers away from the slow endpoint: p2c {p2c_share:.1}% vs random {rnd_share:.1}% ({p2c:?})"
    );
    Ok(())
}

#[test]
fn active_health_check_takes_a_bad_endpoint_out_and_back() -> Result<()> {
    if !root_test_can_run("active_health_check_takes_a_bad_endpoint_out_and_back") {
        return Ok(());
    }
    let mut t = Topology::new("hc")?;
    let client = t.add_pod("cli", 10)?;
    let b1 = t.add_pod("b1", 11)?;
    let b2 = t.add_pod("b2", 12)?;
    t.start_server(&b1, 8080, "b1", &[])?;
    // b2 accepts connections but does not speak the expected protocol.
    t.start_server(&b2, 8080, "b2echo", &["--mode", "echo"])?;
    let cfg = t.ferry_config(
        r#"  - name: web
    addresses: [10.96.0.64]
    ports: [{ port: 80, target_port: 8080 }]
    balancing: { algorithm: round_robin }
    health_check:
      interval: 200ms
      timeout: 150ms
      healthy_threshold: 1
      unhealthy_threshold: 2
      send: "GET /health HTTP/1.0\r\n\r\n"
      expect: "200 OK"
    endpoints: [{ address: 10.77.1.11 }, { address: 10.77.1.12 }]
"#,
    );
    let ferry = t.start_ferry("ferry", &cfg)?;
    let svc = "default/web";
    wait_for("b2 unhealthy", WAIT, || {
        Ok(
            (endpoint_metric(&ferry, "ferry_endpoint_healthy", svc, "10.77.1.12:8080")? == 0.0)
                .then_some(()),
        )
    })?;
    let ids = batch(&t, &client, "http://10.96.0.64", 100)?;
    assert_eq!(ids.get("b1"), Some(&100), "{ids:?}");

    // Replace it with a server that answers properly: it comes back.
    t.kill("server-b2echo");
    t.start_server(&b2, 8080, "b2", &[])?;
    wait_for("b2 healthy", WAIT, || {
        Ok(
            (endpoint_metric(&ferry, "ferry_endpoint_healthy", svc, "10.77.1.12:8080")? == 1.0)
                .then_some(()),
        )
    })?;
    let ids = batch(&t, &client, "http://10.96.0.64", 200)?;
    assert_eq!(
        ids.get("b2"),
        Some(&100),
        "round robin, both healthy: {ids:?}"
    );
    Ok(())
}
