//! End-to-end capture: real eBPF on a real cgroup, pods in network
//! namespaces, Ferry in the node namespace, curl as the client.
//! Needs root; fails (does not skip) when CI=true and it cannot run.

use std::time::Duration;

use anyhow::Result;
use ferry_tests::{Group, Topology, count_ids, metric_value, root_test_can_run, which};

// Weighted round robin: exact over every cycle of 100 connections, so the
// split can be asserted tightly (the default, P2C, is load-aware and only
// statistically weighted).
const SERVICE: &str = r#"  - name: web
    addresses: [10.96.0.20, "fd96::20"]
    ports: [{ port: 80, target_port: 8080 }]
    balancing: { algorithm: round_robin }
    endpoints:
      - { address: 10.77.1.11, weight: 60 }
      - { address: 10.77.1.12, weight: 30 }
      - { address: 10.77.1.13, weight: 10 }
"#;

fn curl_many(t: &Topology, netns: &str, group: Group, url: &str) -> Result<String> {
    let curl = which("curl").expect("curl checked by root_test_can_run");
    // One curl process, one new connection per URL (the server closes each).
    t.exec(
        netns,
        group,
        &curl,
        &["-sS", "--max-time", "120", "--connect-timeout", "5", url],
    )
}

#[test]
fn weighted_split_direct_bypass_and_enrollment() -> Result<()> {
    if !root_test_can_run("weighted_split_direct_bypass_and_enrollment") {
        return Ok(());
    }
    let mut t = Topology::new("cap")?;
    let client = t.add_pod("cli", 10)?;
    let b1 = t.add_pod("b1", 11)?;
    let b2 = t.add_pod("b2", 12)?;
    let b3 = t.add_pod("b3", 13)?;
    t.start_server(&b1, 8080, "b1", &[])?;
    t.start_server(&b2, 8080, "b2", &[])?;
    t.start_server(&b3, 8080, "b3", &[])?;
    // A decoy on the VIP itself, in the node namespace: whoever is *not*
    // captured reaches it instead of the service.
    t.add_node_address("10.96.0.20/32")?;
    let node = t.node_netns.clone();
    let kit = ferry_tests::testkit_binary()?;
    t.spawn(
        "decoy",
        &node,
        Group::Other,
        &kit,
        &["serve", "--id", "decoy", "--listen", "10.96.0.20:80"],
    )?;
    t.wait_log("decoy", "listening", Duration::from_secs(10))?;

    let cfg = t.ferry_config(SERVICE);
    let ferry = t.start_ferry("ferry", &cfg)?;

    // 1000 connections from the enrolled client pod to the IPv4 VIP.
    let out = curl_many(
        &t,
        &client.netns,
        Group::Enrolled,
        "http://10.96.0.20/[1-1000]",
    )?;
    let ids = count_ids(&out);
    let total: usize = ids.values().sum();
    assert_eq!(total, 1000, "every connection answered: {ids:?}");
    for (id, weight) in [("b1", 60.0), ("b2", 30.0), ("b3", 10.0)] {
        let share = *ids.get(id).unwrap_or(&0) as f64 / 10.0;
        assert!(
            (share - weight).abs() <= 2.0,
            "{id}: {share}% vs weight {weight}% ({ids:?})"
        );
    }
    // Through Ferry, backends see the node's address, not the client's.
    assert!(out.lines().all(|l| l.contains("peer=10.77.1.1:")), "{out}");

    let m = ferry.metrics()?;
    assert_eq!(
        metric_value(
            &m,
            r#"ferry_connections_opened_total{service="default/web"}"#
        ),
        1000.0
    );
    let redirected4 = metric_value(
        &m,
        r#"ferry_ebpf_events_total{program="connect4",event="redirected"}"#,
    );
    assert_eq!(redirected4, 1000.0, "{m}");

    // A non-service address goes direct: the backend sees the client's own
    // address, and Ferry sees nothing.
    let direct = curl_many(
        &t,
        &client.netns,
        Group::Enrolled,
        "http://10.77.1.12:8080/",
    )?;
    assert!(direct.contains("id=b2 peer=10.77.1.10:"), "{direct}");
    let m2 = ferry.metrics()?;
    assert_eq!(
        metric_value(
            &m2,
            r#"ferry_connections_opened_total{service="default/web"}"#
        ),
        1000.0,
        "Ferry must not see the direct connection"
    );
    assert!(
        metric_value(
            &m2,
            r#"ferry_ebpf_events_total{program="connect4",event="passed"}"#
        ) >= 1.0
    );

    // A process in a cgroup Ferry does not enroll reaches the decoy on the
    // VIP: it was not redirected.
    let other = curl_many(&t, &client.netns, Group::Other, "http://10.96.0.20/")?;
    assert!(other.contains("id=decoy"), "{other}");
    assert_eq!(
        ferry.metric(r#"ferry_connections_opened_total{service="default/web"}"#)?,
        1000.0
    );

    // The IPv6 VIP works like the IPv4 one.
    let out6 = curl_many(
        &t,
        &client.netns,
        Group::Enrolled,
        "http://[fd96::20]/[1-100]",
    )?;
    let ids6 = count_ids(&out6);
    assert_eq!(ids6.values().sum::<usize>(), 100, "{ids6:?}");
    assert_eq!(
        (ids6.get("b1"), ids6.get("b2"), ids6.get("b3")),
        (Some(&60), Some(&30), Some(&10)),
        "weighted round robin is exact over a whole cycle"
    );
    assert!(
        out6.lines().all(|l| l.contains("peer=10.77.1.1:")),
        "{out6}"
    );
    assert_eq!(
        ferry.metric(r#"ferry_ebpf_events_total{program="connect6",event="redirected"}"#)?,
        100.0
    );
    Ok(())
}
