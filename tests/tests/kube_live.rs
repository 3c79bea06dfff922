//! The agent in Kubernetes mode, end to end: Ferry in a node network
//! namespace with real eBPF capture, fed by the fake API server
//! (`ferry_tests::fake_api`; no kube-apiserver can run on these machines),
//! which listens on the node namespace's own loopback. A pod of an enrolled
//! namespace gets its cgroup attached when it appears and detached when it
//! is deleted; Service and EndpointSlice changes reach the data path.
//! Needs root; fails (does not skip) when CI=true and it cannot run.

use std::time::Duration;

use anyhow::Result;
use ferry_tests::fake_api::FakeApi;
use ferry_tests::{
    CgroupDir, Group, Topology, count_ids, ferry_programs_on, root_test_can_run, wait_for, which,
};
use serde_json::{Value, json};

const POD_UID: &str = "6f1d2c3b-4a59-4e68-9b7a-0c1d2e3f4a5b";

fn cluster(node: &str) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "shop", "labels": {"ferry.io/mesh": "enabled"}}}),
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": "z1"}}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "shop",
                            "annotations": {"ferry.io/balancing": "round_robin"}},
               "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20",
                        "clusterIPs": ["10.96.0.20", "fd96::20"],
                        "ipFamilies": ["IPv4", "IPv6"],
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}}),
        slice(&["10.77.1.11", "10.77.1.12"]),
        pod(node),
    ]
}

fn slice(ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": "web-abcde", "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": "web"}},
           "endpoints": eps,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn pod(node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "client-1", "namespace": "shop", "uid": POD_UID},
           "spec": {"nodeName": node, "serviceAccountName": "client",
                    "containers": [{"name": "c", "image": "curl"}]},
           "status": {"phase": "Running", "qosClass": "Guaranteed",
                      "podIP": "10.77.1.10", "podIPs": [{"ip": "10.77.1.10"}]}})
}

#[test]
fn kubernetes_mode_syncs_attaches_and_serves() -> Result<()> {
    if !root_test_can_run("kubernetes_mode_syncs_attaches_and_serves") {
        return Ok(());
    }
    let mut t = Topology::new("kub")?;
    let client = t.add_pod("cli", 10)?;
    for (name, host) in [("b1", 11), ("b2", 12), ("b3", 13)] {
        let pod = t.add_pod(name, host)?;
        t.start_server(&pod, 8080, name, &[])?;
    }
    // A decoy on the VIP in the node namespace: whoever is not captured
    // reaches it instead of the service.
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

    // The kubelet's cgroup for the pod (cgroupfs driver, Guaranteed QoS),
    // under the topology's own cgroup tree.
    let root = t.enrolled_cgroup.clone();
    let pod_cg = CgroupDir::create(t.cgroup_path(Group::Enrolled).join(format!("pod{POD_UID}")))?;

    // The fake API server on the node namespace's loopback.
    let (rt, api) = FakeApi::serve_in_netns(&node, "127.0.0.1:0")?;
    for o in cluster(&t.name) {
        api.apply(o);
    }
    let kubeconfig = api.write_kubeconfig(&t.dir)?;
    let cfg = format!(
        "source: kubernetes\nnode:\n  name: {}\nlisteners:\n  outbound: \"[::]:15001\"\n  metrics: \"0.0.0.0:15020\"\n  readiness: \"0.0.0.0:15021\"\n\
         capture:\n  redirect_ipv4: 10.77.1.1\n  redirect_ipv6: \"fd77:1::1\"\nproxy:\n  drain_deadline: 2s\n\
         kubernetes:\n  cgroup_driver: cgroupfs\n  cgroup_root: {root}\n",
        t.name
    );
    let ferry = t.start_ferry_env(
        "ferry",
        &cfg,
        &[("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))],
    )?;
    // Ready means synced: the pod's cgroup is attached, the service known.
    wait_for("capture on the pod cgroup", Duration::from_secs(10), || {
        Ok((ferry_programs_on(&pod_cg.0)?.len() == 3).then_some(()))
    })?;
    assert!(
        ferry_programs_on(&t.cgroup_path(Group::Enrolled))?.is_empty(),
        "only the pod's cgroup is attached"
    );
    assert_eq!(ferry.metric("ferry_kube_synced")?, 1.0);

    let curl = which("curl").expect("curl");
    let get = |url: &str| -> Result<String> {
        t.exec_in(
            &client.netns,
            &pod_cg.0,
            &curl,
            &["-sS", "--max-time", "60", "--connect-timeout", "5", url],
        )
    };
    let out = get("http://10.96.0.20/[1-100]")?;
    let ids = count_ids(&out);
    assert_eq!(
        (ids.get("b1"), ids.get("b2")),
        (Some(&50), Some(&50)),
        "round robin over the slice's endpoints: {ids:?}"
    );
    assert_eq!(
        ferry.metric(r#"ferry_connections_opened_total{service="shop/web"}"#)?,
        100.0
    );
    // The IPv6 cluster IP is captured as well.
    let out6 = get("http://[fd96::20]/[1-10]")?;
    assert_eq!(count_ids(&out6).values().sum::<usize>(), 10, "{out6}");

    // A third endpoint through the API reaches the data path.
    let updates = ferry.metric("ferry_kube_updates_total")?;
    api.apply(slice(&["10.77.1.11", "10.77.1.12", "10.77.1.13"]));
    ferry.wait_metric(
        "ferry_kube_updates_total",
        updates + 1.0,
        Duration::from_secs(10),
    )?;
    let ids = count_ids(&get("http://10.96.0.20/[1-30]")?);
    assert_eq!(
        (ids.get("b1"), ids.get("b2"), ids.get("b3")),
        (Some(&10), Some(&10), Some(&10)),
        "{ids:?}"
    );

    // The pod is deleted: capture leaves its cgroup; a process there now
    // reaches the decoy on the VIP directly.
    api.delete(pod(&t.name));
    wait_for("capture detached", Duration::from_secs(10), || {
        Ok(ferry_programs_on(&pod_cg.0)?.is_empty().then_some(()))
    })?;
    let direct = get("http://10.96.0.20/")?;
    assert!(direct.contains("id=decoy"), "{direct}");
    // It comes back: attached again.
    api.apply(pod(&t.name));
    wait_for("capture re-attached", Duration::from_secs(10), || {
        Ok((ferry_programs_on(&pod_cg.0)?.len() == 3).then_some(()))
    })?;
    let ids = count_ids(&get("http://10.96.0.20/[1-3]")?);
    assert_eq!(ids.values().sum::<usize>(), 3);
    assert!(!ids.contains_key("decoy"), "{ids:?}");

    // The Service is deleted: its addresses leave the capture map.
    api.delete(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}}));
    ferry.wait_metric(
        "ferry_kube_updates_total",
        updates + 4.0,
        Duration::from_secs(10),
    )?;
    let direct = get("http://10.96.0.20/")?;
    assert!(direct.contains("id=decoy"), "{direct}");
    drop(rt);
    Ok(())
}
