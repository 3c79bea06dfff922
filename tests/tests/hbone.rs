//! Two nodes, real eBPF capture on node A, the HBONE tunnel between the
//! nodes' Ferry, STRICT mode on node B. Needs root; fails (does not skip)
//! when CI=true and it cannot run.
//!
//! * a client pod on node A reaches a service whose endpoints are pods on
//!   node B, through capture → Ferry A → mutual TLS → Ferry B → pod;
//! * tshark, on node A's end of the node-to-node link, shows only TLS 1.3
//!   on port 15008, and the client's random marker (and the pods' answers)
//!   never appear in clear;
//! * STRICT: the same pods refuse plaintext from outside the mesh (a
//!   non-enrolled process on node A, a process on node B itself), while the
//!   mesh path keeps working.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_tests::{
    Group, LINK_A_V6, LINK_B, LINK_B_V6, LinkCapture, Topology, count_ids, marker, metric_value,
    root_test_can_run, which,
};

fn curl(t: &Topology, netns: &str, group: Group, args: &[&str]) -> Result<String> {
    let curl = which("curl").expect("curl checked by root_test_can_run");
    let mut all = vec!["-sS", "--max-time", "20", "--connect-timeout", "5"];
    all.extend_from_slice(args);
    t.exec(netns, group, &curl, &all)
}

/// Runs curl expecting it to fail; returns its exit code.
fn curl_fails(t: &Topology, netns: &str, group: Group, url: &str) -> Result<i32> {
    let curl = which("curl").expect("curl");
    let out = t
        .command(
            netns,
            group,
            &curl,
            &["-sS", "--max-time", "5", "--connect-timeout", "3", url],
        )
        .output()?;
    if out.status.success() {
        bail!(
            "{url} from {netns} should have been refused, got: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out.status.code().unwrap_or(-1))
}

#[test]
fn cross_node_tunnel_carries_only_tls_and_strict_refuses_plaintext() -> Result<()> {
    if !root_test_can_run("cross_node_tunnel_carries_only_tls_and_strict_refuses_plaintext") {
        return Ok(());
    }
    for tool in ["tshark", "nft"] {
        if which(tool).is_none() {
            if ferry_tests::root_tests_required() {
                bail!("`{tool}` is required (run `cargo xtask setup`)");
            }
            eprintln!("SKIPPED: `{tool}` is not installed (run `cargo xtask setup`)");
            return Ok(());
        }
    }
    let mut t = Topology::new("hb")?;
    let node_b = t.add_second_node()?;
    let client = t.add_pod("cli", 10)?;
    let intruder = t.add_pod("cl2", 20)?;
    let b1 = t.add_pod_b("rv1", 11)?;
    let b2 = t.add_pod_b("rv2", 12)?;
    t.start_server(&b1, 8080, "rv1", &[])?;
    t.start_server(&b2, 8080, "rv2", &[])?;

    // One CA for the cluster, as files.
    let tls = t.cluster_ca("1h")?;

    let services = "  - name: reviews
    namespace: shop
    addresses: [10.96.0.30]
    ports: [{ port: 80, target_port: 8080 }]
    balancing: { algorithm: round_robin }
    endpoints:
      - { address: 10.77.2.11, node: node-b, service_account: reviews }
      - { address: 10.77.2.12, node: node-b, service_account: reviews }
";
    let cfg_a = format!(
        "{}workloads:\n  - {{ address: 10.77.1.10, namespace: shop, service_account: productpage }}\n\
         \x20 - {{ address: 10.77.1.20, namespace: other, service_account: intruder }}\n\
         nodes:\n  node-b: \"{LINK_B}:15008\"\n{tls}",
        t.ferry_config(services)
    );
    let cfg_b = format!(
        "node: {{ name: node-b }}
capture: {{ enabled: false }}
proxy: {{ drain_deadline: 5s }}
workloads:
  - {{ address: 10.77.2.11, namespace: shop, service_account: reviews }}
  - {{ address: 10.77.2.12, namespace: shop, service_account: reviews }}
authorization:
  mode: STRICT
  rules:
    - {{ action: allow, identity_prefixes: [\"spiffe://cluster.local/ns/shop/\"], ports: [8080] }}
{tls}"
    );
    let ferry_b = t.start_ferry_in(&node_b.netns, "ferry-b", &cfg_b)?;
    let ferry_a = t.start_ferry("ferry-a", &cfg_a)?;

    // Capture the node-to-node link while the client talks to the service.
    let capture = LinkCapture::start(&mut t, "tshark")?;

    let mark = marker();
    let header = format!("X-Ferry-Marker: {mark}");
    let body_file = t.dir.join("body.txt");
    std::fs::write(&body_file, format!("{mark}\n").repeat(100))?;
    let data = format!("@{}", body_file.display());
    let urls = vec!["http://10.96.0.30/"; 40];
    let mut args = vec!["-H", header.as_str(), "--data-binary", data.as_str()];
    args.extend(urls.iter().copied());
    let out = curl(&t, &client.netns, Group::Enrolled, &args)?;
    let ids = count_ids(&out);
    assert_eq!(
        ids.values().sum::<usize>(),
        40,
        "every request answered: {out}"
    );
    assert_eq!(
        (ids.get("rv1"), ids.get("rv2")),
        (Some(&20), Some(&20)),
        "round robin over equal weights splits evenly across node B's pods"
    );
    // Node B's pods see Ferry B (their node's bridge address), not the client.
    assert!(
        out.lines()
            .all(|l| l.contains(&format!("peer={}:", node_b.bridge_v4))),
        "{out}"
    );
    let link = capture.finish(&mut t)?;

    // The capture: the marker never in clear, every payload byte TLS.
    assert!(link.raw.len() > 1000, "the capture saw the traffic");
    assert!(
        !link.contains(mark.as_bytes()),
        "the client's marker crossed the link in clear"
    );
    assert!(
        !link.contains(b"id=rv1") && !link.contains(b"id=rv2"),
        "a pod's answer crossed in clear"
    );
    assert!(!link.contains(b"HTTP/1.1"), "HTTP crossed in clear");
    assert!(
        link.payload_packets > 10,
        "payload packets on the link: {}",
        link.payload_packets
    );
    link.check_tls_only()?;
    assert!(
        link.app_data_records > 5,
        "TLS application data on the link"
    );

    // Metrics on both sides.
    let ma = ferry_a.metrics()?;
    assert_eq!(
        metric_value(&ma, r#"ferry_hbone_streams_total{direction="outbound"}"#),
        40.0,
        "{ma}"
    );
    assert_eq!(
        metric_value(
            &ma,
            r#"ferry_connections_opened_total{service="shop/reviews"}"#
        ),
        40.0
    );
    // Pooled: one TLS connection (one source identity, one node, one
    // destination identity) carried all 40 streams.
    assert_eq!(
        metric_value(
            &ma,
            r#"ferry_hbone_connections_total{direction="outbound"}"#
        ),
        1.0,
        "{ma}"
    );
    let mb = ferry_b.metrics()?;
    assert_eq!(
        metric_value(&mb, r#"ferry_hbone_streams_total{direction="inbound"}"#),
        40.0,
        "{mb}"
    );
    assert_eq!(metric_value(&mb, "ferry_certificates_issued_total"), 1.0);

    // STRICT: plaintext from outside the mesh is refused...
    // ... from a process on node A that Ferry does not capture (routed to B),
    let code = curl_fails(&t, &client.netns, Group::Other, "http://10.77.2.11:8080/")?;
    assert_eq!(code, 7, "refused (curl: couldn't connect), not timed out");
    // ... and from a process on node B itself.
    let curl_bin = which("curl").expect("curl");
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node_b.netns))
        .arg(&curl_bin)
        .args(["-sS", "--max-time", "5", "http://10.77.2.12:8080/"])
        .output()?;
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let refused = ferry_b.metric("ferry_strict_refused_total")?;
    assert!(refused >= 2.0, "STRICT refusals counted: {refused}");
    // A non-mesh address on node B is not protected.
    let b_node = node_b.netns.clone();
    let kit = ferry_tests::testkit_binary()?;
    t.spawn(
        "nodeb-plain",
        &b_node,
        Group::Other,
        &kit,
        &["serve", "--id", "plain", "--listen", "10.77.2.1:9090"],
    )?;
    t.wait_log("nodeb-plain", "listening", Duration::from_secs(10))?;
    let plain = curl(&t, &client.netns, Group::Other, &["http://10.77.2.1:9090/"])?;
    assert!(plain.contains("id=plain"), "{plain}");

    // ...while the mesh path keeps working.
    let again = curl(&t, &client.netns, Group::Enrolled, &["http://10.96.0.30/"])?;
    assert!(again.contains("id=rv"), "{again}");

    // A pod whose identity node B's policy does not allow (only ns/shop):
    // tunnelled under its own identity, refused by B, counted.
    let curl_bin = which("curl").expect("curl");
    let out = t
        .command(
            &intruder.netns,
            Group::Enrolled,
            &curl_bin,
            &["-sS", "--max-time", "5", "http://10.96.0.30/"],
        )
        .output()?;
    assert!(
        !out.status.success(),
        "the intruder must be refused: {out:?}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("id=rv"));
    let mb = ferry_b.metrics()?;
    assert_eq!(
        metric_value(
            &mb,
            r#"ferry_authorization_denied_total{reason="no_allow_rule"}"#
        ),
        1.0,
        "{mb}"
    );
    // Node A resets the client at once: a denial is about the client, so
    // no other endpoint is tried and none is held responsible.
    assert_eq!(
        ferry_a.metric(r#"ferry_connection_failures_total{reason="denied_by_peer"}"#)?,
        1.0
    );
    assert!(
        ferry_b
            .log_text()
            .contains("src=spiffe://cluster.local/ns/other/sa/intruder reason=\"no_allow_rule\""),
        "the denial is logged with the source identity"
    );
    Ok(())
}

/// IPv6 end to end: an IPv6 service whose endpoints are IPv6 pods on node B,
/// node B reached at its IPv6 link address, STRICT on node B for its pods'
/// IPv6 addresses.
#[test]
fn ipv6_pods_reach_pods_on_another_node_through_an_ipv6_tunnel() -> Result<()> {
    if !root_test_can_run("ipv6_pods_reach_pods_on_another_node_through_an_ipv6_tunnel") {
        return Ok(());
    }
    let mut t = Topology::new("hb6")?;
    let node_b = t.add_second_node()?;
    let client = t.add_pod("cli", 10)?;
    let b1 = t.add_pod_b("rv1", 11)?;
    let b2 = t.add_pod_b("rv2", 12)?;
    t.start_server(&b1, 8080, "rv1", &[])?;
    t.start_server(&b2, 8080, "rv2", &[])?;
    let tls = t.cluster_ca("1h")?;
    let services = format!(
        "  - name: reviews
    namespace: shop
    addresses: [\"fd96::60\"]
    ports: [{{ port: 80, target_port: 8080 }}]
    balancing: {{ algorithm: round_robin }}
    endpoints:
      - {{ address: \"{}\", node: node-b, service_account: reviews }}
      - {{ address: \"{}\", node: node-b, service_account: reviews }}
",
        b1.v6, b2.v6
    );
    let cfg_a = format!(
        "{}workloads: [{{ address: \"{}\", namespace: shop, service_account: productpage }}]\n\
         nodes: {{ node-b: \"[{LINK_B_V6}]:15008\" }}\n{tls}",
        t.ferry_config(&services),
        client.v6
    );
    let cfg_b = format!(
        "node: {{ name: node-b }}
capture: {{ enabled: false }}
workloads:
  - {{ address: \"{}\", namespace: shop, service_account: reviews }}
  - {{ address: \"{}\", namespace: shop, service_account: reviews }}
authorization:
  mode: STRICT
  rules:
    - {{ action: allow, identity_prefixes: [\"spiffe://cluster.local/ns/shop/\"], ports: [8080] }}
{tls}",
        b1.v6, b2.v6
    );
    let ferry_b = t.start_ferry_in(&node_b.netns, "ferry-b", &cfg_b)?;
    let ferry_a = t.start_ferry("ferry-a", &cfg_a)?;

    let out = curl(
        &t,
        &client.netns,
        Group::Enrolled,
        &["http://[fd96::60]/[1-20]"],
    )?;
    let ids = count_ids(&out);
    assert_eq!(
        (ids.get("rv1"), ids.get("rv2")),
        (Some(&10), Some(&10)),
        "every request answered, split evenly: {out}"
    );
    // Node B's pods see Ferry B at node B's IPv6 bridge address.
    assert!(
        out.lines().all(|l| l.contains("peer=[fd77:2::1]:")),
        "{out}"
    );
    assert_eq!(
        ferry_a.metric(r#"ferry_hbone_streams_total{direction="outbound"}"#)?,
        20.0
    );
    assert_eq!(
        ferry_b.metric(r#"ferry_hbone_streams_total{direction="inbound"}"#)?,
        20.0
    );
    // The pooled tunnel connection is IPv6 between the link addresses.
    let ss = ferry_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &node_b.netns,
            "ss",
            "-Htn",
            "state",
            "established",
            "sport",
            "= :15008",
        ],
    )?;
    assert!(
        ss.contains(&format!("[{LINK_B_V6}]:15008")) && ss.contains(&format!("[{LINK_A_V6}]:")),
        "tunnel connection over IPv6: {ss}"
    );
    // STRICT covers the pods' IPv6 addresses: plaintext from a process on
    // node A that Ferry does not capture is refused.
    let code = curl_fails(
        &t,
        &client.netns,
        Group::Other,
        &format!("http://[{}]:8080/", b1.v6),
    )?;
    assert_eq!(code, 7, "refused (curl: couldn't connect), not timed out");
    assert!(ferry_b.metric("ferry_strict_refused_total")? >= 1.0);
    Ok(())
}

/// The values of `key=VALUE` in the lines of `log` that contain `marker`.
fn log_values(log: &str, marker: &str, key: &str) -> Vec<String> {
    let needle = format!("{key}=");
    log.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&needle))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .filter(|v| !v.is_empty())
        .collect()
}

/// Certificates rotate every 2 s (4 s lifetime, renewed at half life) on
/// both nodes for a minute, under continuous traffic: new connections one
/// after another (pooling off, so each is its own TLS handshake) and one
/// long-lived connection. No connection fails, the long-lived one survives
/// every rotation (and the expiry of the certificates it started with),
/// and new handshakes keep presenting the new certificates.
#[test]
fn rotation_every_two_seconds_for_a_minute_drops_nothing() -> Result<()> {
    if !root_test_can_run("rotation_every_two_seconds_for_a_minute_drops_nothing") {
        return Ok(());
    }
    let mut t = Topology::new("rot")?;
    let node_b = t.add_second_node()?;
    let client = t.add_pod("cli", 10)?;
    let server = t.add_pod_b("srv", 11)?;
    t.start_server(&server, 8080, "echo", &["--mode", "echo"])?;
    let tls = t.cluster_ca("4s")?;
    let services = "  - name: echo
    addresses: [10.96.0.50]
    ports: [{ port: 80, target_port: 8080 }]
    failover: { connect_timeout: 5s, budget: 10s }
    endpoints: [{ address: 10.77.2.11, node: node-b, service_account: echo }]
";
    let cfg_a = format!(
        "{}workloads: [{{ address: 10.77.1.10, service_account: client }}]\n\
         nodes: {{ node-b: \"{LINK_B}\" }}\nhbone: {{ pooling: false }}\n{tls}",
        t.ferry_config(services)
    );
    let cfg_b = format!(
        "node: {{ name: node-b }}\ncapture: {{ enabled: false }}\n\
         workloads: [{{ address: 10.77.2.11, service_account: echo }}]\n{tls}"
    );
    let ferry_b = t.start_ferry_in(&node_b.netns, "ferry-b", &cfg_b)?;
    let ferry_a = t.start_ferry("ferry-a", &cfg_a)?;
    let kit = ferry_tests::testkit_binary()?;

    // One long-lived connection, round trips for 60 s.
    let cli = client.netns.clone();
    t.spawn(
        "long",
        &cli,
        Group::Enrolled,
        &kit,
        &[
            "rr-client",
            "--connect",
            "10.96.0.50:80",
            "--count",
            "100000000",
            "--max-seconds",
            "60",
        ],
    )?;
    // New connections back to back for 60 s; any failure ends it non-zero.
    let out = t.exec(
        &cli,
        Group::Enrolled,
        &kit,
        &[
            "rr-client",
            "--connect",
            "10.96.0.50:80",
            "--count",
            "100000000",
            "--new-connection",
            "--max-seconds",
            "60",
        ],
    )?;
    let count: u64 = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("count="))
        .and_then(|v| v.parse().ok())
        .context("rr-client count")?;
    assert!(count > 100, "new connections made: {out}");
    assert_eq!(
        t.wait_exit("long", Duration::from_secs(30))?,
        Some(0),
        "the long-lived connection failed:\n{}",
        std::fs::read_to_string(t.dir.join("long.log")).unwrap_or_default()
    );
    let long = std::fs::read_to_string(t.dir.join("long.log"))?;
    assert!(long.contains("mode=persistent"), "{long}");

    let ma = ferry_a.metrics()?;
    let issued_a = metric_value(&ma, "ferry_certificates_issued_total");
    let issued_b = ferry_b.metric("ferry_certificates_issued_total")?;
    assert!(
        issued_a >= 20.0 && issued_b >= 20.0,
        "rotated every ~2 s for a minute: A {issued_a}, B {issued_b}"
    );
    for reason in ["connect_failed", "tunnel_failed", "denied_by_peer"] {
        assert_eq!(
            metric_value(
                &ma,
                &format!("ferry_connection_failures_total{{reason=\"{reason}\"}}")
            ),
            0.0,
            "{reason}"
        );
    }
    assert_eq!(
        metric_value(
            &ma,
            r#"ferry_tls_handshake_failures_total{direction="outbound"}"#
        ),
        0.0
    );

    // Which certificates the handshakes presented, as each side logged them.
    let log_a = ferry_a.log_text();
    let log_b = ferry_b.log_text();
    let issued_by_a: std::collections::HashSet<String> =
        log_values(&log_a, "workload certificate", "serial")
            .into_iter()
            .collect();
    let issued_by_b: std::collections::HashSet<String> =
        log_values(&log_b, "workload certificate", "serial")
            .into_iter()
            .collect();
    let seen_by_b = log_values(&log_b, "tunnel connection accepted", "peer_serial");
    let seen_by_a = log_values(&log_a, "tunnel connection open", "peer_serial");
    assert!(
        seen_by_a.len() as u64 >= count,
        "one handshake per connection"
    );
    for (seen, issued, who) in [
        (&seen_by_b, &issued_by_a, "B saw from A"),
        (&seen_by_a, &issued_by_b, "A saw from B"),
    ] {
        assert!(
            seen.iter().all(|s| issued.contains(s)),
            "{who}: a certificate that was never issued"
        );
        let distinct: std::collections::HashSet<&String> = seen.iter().collect();
        assert!(
            distinct.len() >= 15,
            "{who}: new handshakes present new certificates ({} distinct of {} issued)",
            distinct.len(),
            issued.len()
        );
        // Certificates are presented in issue order: once a newer one is
        // seen, an older one never comes back.
        let order: Vec<&String> = {
            let mut v: Vec<&String> = Vec::new();
            for s in seen.iter() {
                if v.last() != Some(&s) {
                    v.push(s);
                }
            }
            v
        };
        let unique: std::collections::HashSet<&&String> = order.iter().collect();
        assert_eq!(
            unique.len(),
            order.len(),
            "{who}: an old certificate came back"
        );
    }
    Ok(())
}
