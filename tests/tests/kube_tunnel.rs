//! Two nodes in Kubernetes mode: both nodes' Ferry take everything from the
//! fake API server (`ferry_tests::fake_api`, on node A's end of the node
//! link so both reach it; no kube-apiserver can run on these machines),
//! including the tunnel's settings: this node's workloads and their
//! identities (Pods), the endpoints' nodes and identities (EndpointSlices →
//! Pods) and the nodes' tunnel addresses (Nodes' InternalIP). Real eBPF
//! capture on node A, STRICT mode on node B allowing only
//! `ns/shop/sa/productpage`. Needs root and nft; fails (does not skip) when
//! CI=true and it cannot run.
//!
//! * productpage's connections to shop/reviews (pods on node B) go through
//!   the tunnel: node B's Ferry is the pods' peer, both sides count the
//!   streams, and B's policy, which admits only productpage's identity,
//!   lets them through;
//! * another pod of node A (service account `intruder`) is tunnelled under
//!   its own identity and refused by B;
//! * a pod of a namespace outside the mesh on node B is reached directly;
//! * productpage's service account changes in the API: its connections now
//!   carry the new identity, which B refuses.

use std::time::Duration;

use anyhow::{Result, bail};
use ferry_tests::fake_api::FakeApi;
use ferry_tests::{
    CgroupDir, Group, LINK_A, LINK_B, Topology, count_ids, ferry_programs_on, metric_value,
    root_test_can_run, wait_for, which,
};
use serde_json::{Value, json};

const PRODUCTPAGE_UID: &str = "7a1d2c3b-4a59-4e68-9b7a-0c1d2e3f4a01";
const INTRUDER_UID: &str = "7a1d2c3b-4a59-4e68-9b7a-0c1d2e3f4a02";

fn pod(name: &str, ns: &str, sa: &str, node: &str, uid: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": uid},
           "spec": {"nodeName": node, "serviceAccountName": sa,
                    "containers": [{"name": "c", "image": "app"}]},
           "status": {"phase": "Running", "qosClass": "Guaranteed",
                      "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn service(name: &str, ns: &str, vip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns,
                        "annotations": {"ferry.io/balancing": "round_robin"}},
           "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

/// A slice of `(address, pod name, pod uid)` endpoints on node-b.
fn slice(name: &str, ns: &str, eps: &[(&str, &str, &str)]) -> Value {
    let eps: Vec<Value> = eps
        .iter()
        .map(|(ip, pod, uid)| {
            json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-b",
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": ns, "uid": uid}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": format!("{name}-x1"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": name}},
           "endpoints": eps,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn cluster(node_a: &str) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": {"ferry.io/mesh": "enabled"}}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy"}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_a},
               "status": {"addresses": [{"type": "InternalIP", "address": LINK_A.to_string()}]}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"},
               "status": {"addresses": [{"type": "Hostname", "address": "node-b"},
                                        {"type": "InternalIP", "address": LINK_B.to_string()}]}}),
        pod(
            "productpage-1",
            "shop",
            "productpage",
            node_a,
            PRODUCTPAGE_UID,
            "10.77.1.10",
        ),
        pod(
            "intruder-1",
            "shop",
            "intruder",
            node_a,
            INTRUDER_UID,
            "10.77.1.20",
        ),
        pod(
            "reviews-1",
            "shop",
            "reviews",
            "node-b",
            "7a1d2c3b-4a59-4e68-9b7a-0c1d2e3f4b11",
            "10.77.2.11",
        ),
        pod(
            "reviews-2",
            "shop",
            "reviews",
            "node-b",
            "7a1d2c3b-4a59-4e68-9b7a-0c1d2e3f4b12",
            "10.77.2.12",
        ),
        pod(
            "old-1",
            "legacy",
            "default",
            "node-b",
            "7a1d2c3b-4a59-4e68-9b7a-0c1d2e3f4b13",
            "10.77.2.13",
        ),
        service("reviews", "shop", "10.96.0.30"),
        service("old", "legacy", "10.96.0.31"),
        slice(
            "reviews",
            "shop",
            &[
                (
                    "10.77.2.11",
                    "reviews-1",
                    "7a1d2c3b-4a59-4e68-9b7a-0c1d2e3f4b11",
                ),
                (
                    "10.77.2.12",
                    "reviews-2",
                    "7a1d2c3b-4a59-4e68-9b7a-0c1d2e3f4b12",
                ),
            ],
        ),
        slice(
            "old",
            "legacy",
            &[(
                "10.77.2.13",
                "old-1",
                "7a1d2c3b-4a59-4e68-9b7a-0c1d2e3f4b13",
            )],
        ),
    ]
}

#[test]
fn kubernetes_mode_tunnels_to_mesh_pods_on_other_nodes_with_api_identities() -> Result<()> {
    if !root_test_can_run("kubernetes_mode_tunnels_to_mesh_pods_on_other_nodes_with_api_identities")
    {
        return Ok(());
    }
    if which("nft").is_none() {
        if ferry_tests::root_tests_required() {
            bail!("`nft` is required (run `cargo xtask setup`)");
        }
        eprintln!("SKIPPED: `nft` is not installed (run `cargo xtask setup`)");
        return Ok(());
    }
    let mut t = Topology::new("kt")?;
    let node_b = t.add_second_node()?;
    let productpage = t.add_pod("cli", 10)?;
    let intruder = t.add_pod("cl2", 20)?;
    for (name, host) in [("rv1", 11), ("rv2", 12), ("old", 13)] {
        let p = t.add_pod_b(name, host)?;
        t.start_server(&p, 8080, name, &[])?;
    }
    // The kubelet's cgroups of node A's two pods (cgroupfs, Guaranteed).
    let enrolled = t.cgroup_path(Group::Enrolled);
    let pp_cg = CgroupDir::create(enrolled.join(format!("pod{PRODUCTPAGE_UID}")))?;
    let in_cg = CgroupDir::create(enrolled.join(format!("pod{INTRUDER_UID}")))?;

    let (rt, api) = FakeApi::serve_in_netns(&t.node_netns, &format!("{LINK_A}:0"))?;
    for o in cluster(&t.name) {
        api.apply(o);
    }
    let kubeconfig = api.write_kubeconfig(&t.dir)?;
    let env = [("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))];
    let tls = t.cluster_ca("1h")?;
    let cfg_b = format!(
        "source: kubernetes
node: {{ name: node-b }}
capture: {{ enabled: false }}
proxy: {{ drain_deadline: 5s }}
kubernetes: {{ cgroup_driver: cgroupfs }}
authorization:
  mode: STRICT
  rules:
    - {{ action: allow, identities: [\"spiffe://cluster.local/ns/shop/sa/productpage\"], ports: [8080] }}
{tls}"
    );
    let cfg_a = format!(
        "source: kubernetes\nnode:\n  name: {}\nlisteners:\n  outbound: \"[::]:15001\"\n  metrics: \"0.0.0.0:15020\"\n  readiness: \"0.0.0.0:15021\"\n\
         capture:\n  redirect_ipv4: 10.77.1.1\n  redirect_ipv6: \"fd77:1::1\"\nproxy:\n  drain_deadline: 5s\n\
         kubernetes:\n  cgroup_driver: cgroupfs\n  cgroup_root: {}\n{tls}",
        t.name, t.enrolled_cgroup
    );
    let ferry_b = t.start_ferry_in_env(&node_b.netns, "ferry-b", &cfg_b, &env)?;
    let ferry_a = t.start_ferry_env("ferry-a", &cfg_a, &env)?;
    wait_for(
        "capture on both pod cgroups",
        Duration::from_secs(10),
        || {
            Ok(
                (ferry_programs_on(&pp_cg.0)?.len() == 3
                    && ferry_programs_on(&in_cg.0)?.len() == 3)
                    .then_some(()),
            )
        },
    )?;

    let curl = which("curl").expect("curl");
    let get = |netns: &str, cg: &CgroupDir, url: &str| -> Result<String> {
        t.exec_in(
            netns,
            &cg.0,
            &curl,
            &["-sS", "--max-time", "20", "--connect-timeout", "5", url],
        )
    };

    // productpage → shop/reviews on node B: through the tunnel.
    let out = get(&productpage.netns, &pp_cg, "http://10.96.0.30/[1-20]")?;
    let ids = count_ids(&out);
    assert_eq!(
        (ids.get("rv1"), ids.get("rv2")),
        (Some(&10), Some(&10)),
        "{out}"
    );
    assert!(
        out.lines()
            .all(|l| l.contains(&format!("peer={}:", node_b.bridge_v4))),
        "node B's pods see node B's Ferry, not node A: {out}"
    );
    let ma = ferry_a.metrics()?;
    assert_eq!(
        metric_value(&ma, r#"ferry_hbone_streams_total{direction="outbound"}"#),
        20.0,
        "{ma}"
    );
    assert_eq!(metric_value(&ma, "ferry_kube_nodes_without_address"), 0.0);
    let mb = ferry_b.metrics()?;
    assert_eq!(
        metric_value(&mb, r#"ferry_hbone_streams_total{direction="inbound"}"#),
        20.0,
        "{mb}"
    );
    // Node B issued certificates for its two pods' one identity (from the
    // API); node A for its two pods' identities.
    assert_eq!(metric_value(&mb, "ferry_certificates_issued_total"), 1.0);
    assert_eq!(metric_value(&ma, "ferry_certificates_issued_total"), 2.0);

    // Fails to reach shop/reviews from `netns` and `cg`, and B's log says
    // it refused `identity`.
    let refused = |netns: &str, cg: &CgroupDir, identity: &str| -> Result<()> {
        let out = t
            .command_in(
                netns,
                &cg.0,
                &curl,
                &["-sS", "--max-time", "5", "http://10.96.0.30/"],
            )
            .output()?;
        assert!(!out.status.success(), "{out:?}");
        let log = ferry_b.log_text();
        assert!(
            log.contains(&format!(
                "src=spiffe://cluster.local/{identity} reason=\"no_allow_rule\""
            )),
            "B refused {identity}:\n{log}"
        );
        Ok(())
    };

    // The intruder pod: tunnelled under its own identity, refused by B.
    refused(&intruder.netns, &in_cg, "ns/shop/sa/intruder")?;
    assert_eq!(
        ferry_a.metric(r#"ferry_connection_failures_total{reason="denied_by_peer"}"#)?,
        1.0
    );

    // A pod outside the mesh on node B: reached directly (Ferry A is the
    // peer, over the node link), not through the tunnel.
    let streams = r#"ferry_hbone_streams_total{direction="outbound"}"#;
    let before = ferry_a.metric(streams)?;
    let old = get(&productpage.netns, &pp_cg, "http://10.96.0.31/")?;
    assert!(
        old.contains("id=old") && old.contains(&format!("peer={LINK_A}:")),
        "{old}"
    );
    assert_eq!(ferry_a.metric(streams)?, before, "not tunnelled");

    // productpage's service account changes in the API: the identity it
    // tunnels under follows, and B's policy no longer admits it.
    let updates = ferry_a.metric("ferry_kube_updates_total")?;
    api.apply(pod(
        "productpage-1",
        "shop",
        "productpage-v2",
        &t.name,
        PRODUCTPAGE_UID,
        "10.77.1.10",
    ));
    ferry_a.wait_metric(
        "ferry_kube_updates_total",
        updates + 1.0,
        Duration::from_secs(10),
    )?;
    refused(&productpage.netns, &pp_cg, "ns/shop/sa/productpage-v2")?;
    drop(rt);
    Ok(())
}
