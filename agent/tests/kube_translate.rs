//! Translation of Kubernetes objects, as `kubectl get -o yaml` prints them
//! (tests/fixtures/kube), into Ferry's configuration: additions, updates and
//! deletions; enrollment and local identities; which endpoints are reached
//! through the tunnel, with which identity and node address.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ferry::config::{self, Algorithm, CgroupDriver, Endpoint, EndpointTarget, Kubernetes, Service};
use ferry::k8s::{Context, Objects, Translated, pod_cgroup, translate};
use ferry::state::Snapshot;

fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/kube")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn settings() -> config::RawConfig {
    config::parse_raw("source: kubernetes\ncapture: { enabled: false }\n", "test").unwrap()
}

fn kube(driver: CgroupDriver) -> Kubernetes {
    Kubernetes {
        cgroup_driver: driver,
        cgroup_root: match driver {
            CgroupDriver::Systemd => "kubepods.slice".into(),
            CgroupDriver::Cgroupfs => "kubepods".into(),
        },
    }
}

fn run(objects: &Objects) -> Translated {
    run_with(objects, &settings())
}

fn run_with(objects: &Objects, raw: &config::RawConfig) -> Translated {
    let k = kube(CgroupDriver::Systemd);
    translate(
        objects,
        &Context {
            node_name: "node-a",
            settings: raw,
            kubernetes: &k,
        },
    )
}

fn cluster() -> Objects {
    let mut o = Objects::default();
    for f in [
        "namespaces.yaml",
        "nodes.yaml",
        "services.yaml",
        "endpointslices.yaml",
        "pods.yaml",
        "checkout.yaml",
        "tcproutes.yaml",
    ] {
        o.apply_value(fixture(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    o
}

fn service<'a>(t: &'a Translated, key: &str) -> &'a Service {
    t.services
        .iter()
        .find(|s| s.key() == key)
        .unwrap_or_else(|| panic!("{key} missing; have {:?}", keys(t)))
}

fn keys(t: &Translated) -> Vec<String> {
    t.services.iter().map(|s| s.key()).collect()
}

fn ips(s: &Service, set: usize) -> Vec<String> {
    s.sets[set]
        .endpoints
        .iter()
        .map(|e| match &e.target {
            EndpointTarget::Ip(ip) => ip.to_string(),
            EndpointTarget::Hostname(h) => h.clone(),
        })
        .collect()
}

#[test]
fn services_ports_families_and_endpoint_conditions() {
    let t = run(&cluster());
    // Headless (db) and ExternalName (ext) services have no address to capture.
    assert_eq!(
        keys(&t),
        [
            "shop/api",
            "shop/checkout",
            "shop/checkout-v1",
            "shop/checkout-v2",
            "shop/web"
        ]
    );
    let web = service(&t, "shop/web");
    let addrs: Vec<IpAddr> = vec![
        "10.96.0.20".parse().unwrap(),
        "fd00:96::20".parse().unwrap(),
    ];
    assert_eq!(web.addresses, addrs, "both IP families");
    // UDP dropped; the named target port resolved through the slices.
    let ports: Vec<(u16, u16)> = web.ports.iter().map(|p| (p.port, p.target_port)).collect();
    assert_eq!(ports, [(80, 8080), (9000, 9090)]);
    assert_eq!(
        web.policy.algorithm,
        Algorithm::RoundRobin,
        "ferry.io/balancing annotation"
    );
    // Ready endpoints of both slices; the terminating (10.1.0.7) and the
    // not-ready (10.1.0.8) ones are left out.
    assert_eq!(ips(web, 0), ["10.1.0.5", "10.1.1.6", "fd00:1::5"]);
    let b = &web.sets[0].endpoints[1];
    assert_eq!(b.locality.node.as_deref(), Some("node-b"));
    assert_eq!(
        b.locality.zone.as_deref(),
        Some("eu-west-1b"),
        "zone from the Node's label when the slice has none"
    );
    assert_eq!(b.locality.region.as_deref(), Some("eu-west"));
    // This node's locality from its labels.
    assert_eq!(t.zone.as_deref(), Some("eu-west-1a"));
    assert_eq!(t.region.as_deref(), Some("eu-west"));

    // Zone hints: every endpoint is hinted and one is for this node's zone.
    let api = service(&t, "shop/api");
    assert_eq!(ips(api, 0), ["10.1.0.40"]);
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
}

#[test]
fn terminating_endpoints_only_when_nothing_is_ready() {
    let mut o = cluster();
    // Every endpoint of web turns terminating: the serving ones carry on.
    let mut slices = fixture("endpointslices.yaml");
    for item in slices["items"].as_array_mut().unwrap() {
        for ep in item["endpoints"].as_array_mut().unwrap() {
            ep["conditions"] = serde_json::json!({"ready": false, "serving": ep["addresses"][0] != "10.1.0.8", "terminating": true});
        }
    }
    o.apply_value(slices).unwrap();
    let t = run(&o);
    assert_eq!(
        ips(service(&t, "shop/web"), 0),
        ["10.1.0.5", "10.1.0.7", "10.1.1.6", "fd00:1::5"]
    );
    // No hint for this zone any more: hints are ignored, both endpoints used.
    let mut api = fixture("endpointslices.yaml")["items"][2].clone();
    api["endpoints"][0]["hints"]["forZones"][0]["name"] = "eu-west-1c".into();
    api["endpoints"][1]["hints"]["forZones"][0]["name"] = "eu-west-1c".into();
    o.apply_value(api).unwrap();
    let t = run(&o);
    assert_eq!(ips(service(&t, "shop/api"), 0), ["10.1.0.40", "10.1.1.41"]);
}

#[test]
fn tcproute_weights_become_backend_sets() {
    let t = run(&cluster());
    let c = service(&t, "shop/checkout");
    let sets: Vec<(&str, u32)> = c.sets.iter().map(|s| (s.name.as_str(), s.weight)).collect();
    assert_eq!(sets, [("checkout-v1", 90), ("checkout-v2", 10)]);
    assert_eq!(ips(c, 0), ["10.1.0.50"]);
    assert_eq!(ips(c, 1), ["10.1.1.51"]);
    // Each backend's own target port (v1's named port resolved to 8080).
    assert_eq!(c.sets[0].endpoints[0].port, Some(8080));
    assert_eq!(c.sets[1].endpoints[0].port, Some(8081));

    // Update: shift to 50/50.
    let mut o = cluster();
    let mut route = fixture("tcproutes.yaml")["items"][0].clone();
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = 50.into();
    route["spec"]["rules"][0]["backendRefs"][1]["weight"] = 50.into();
    o.apply_value(route.clone()).unwrap();
    let t = run(&o);
    let sets: Vec<u32> = service(&t, "shop/checkout")
        .sets
        .iter()
        .map(|s| s.weight)
        .collect();
    assert_eq!(sets, [50, 50]);

    // Delete the route: checkout has no selector, so no endpoints of its own.
    o.delete_value(route).unwrap();
    let t = run(&o);
    let c = service(&t, "shop/checkout");
    assert_eq!(c.sets.len(), 1);
    assert!(c.sets[0].endpoints.is_empty());
}

#[test]
fn additions_updates_and_deletions() {
    let mut o = cluster();
    let before = run(&o);
    // Addition: a new ready endpoint in web's IPv4 slice.
    let mut slice = fixture("endpointslices.yaml")["items"][0].clone();
    slice["endpoints"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"addresses": ["10.1.0.20"], "conditions": {"ready": true}, "nodeName": "node-a"}));
    o.apply_value(slice.clone()).unwrap();
    let t = run(&o);
    assert_ne!(t, before);
    assert_eq!(
        ips(service(&t, "shop/web"), 0),
        ["10.1.0.5", "10.1.0.20", "10.1.1.6", "fd00:1::5"]
    );
    // Update: the Service loses its IPv6 address and its admin port.
    let mut svc = fixture("services.yaml")["items"][0].clone();
    svc["spec"]["clusterIPs"] = serde_json::json!(["10.96.0.20"]);
    svc["spec"]["ports"].as_array_mut().unwrap().remove(1);
    o.apply_value(svc.clone()).unwrap();
    let t = run(&o);
    let web = service(&t, "shop/web");
    assert_eq!(web.addresses, vec!["10.96.0.20".parse::<IpAddr>().unwrap()]);
    assert_eq!(web.ports.len(), 1);
    // Deletion: the IPv4 slice goes; only the IPv6 endpoint is left.
    o.delete_value(slice).unwrap();
    let t = run(&o);
    assert_eq!(ips(service(&t, "shop/web"), 0), ["fd00:1::5"]);
    // Deletion of the Service itself.
    o.delete_value(svc).unwrap();
    let t = run(&o);
    assert!(!keys(&t).contains(&"shop/web".to_owned()));
    // A Service that does not validate is left out, the rest go on: an
    // endpoint that is the service's own address would loop.
    let mut bad = fixture("endpointslices.yaml")["items"][2].clone();
    bad["endpoints"][0]["addresses"][0] = "10.96.0.30".into();
    o.apply_value(bad).unwrap();
    let t = run(&o);
    assert!(!keys(&t).contains(&"shop/api".to_owned()));
    assert_eq!(t.rejected.len(), 1, "{:?}", t.rejected);
    assert!(
        t.rejected[0].1.contains("own addresses"),
        "{:?}",
        t.rejected
    );
    assert!(keys(&t).contains(&"shop/checkout".to_owned()));
}

#[test]
fn enrollment_cgroups_and_identities() {
    let mut o = cluster();
    let t = run(&o);
    // client (Burstable) and batch (Guaranteed) in the enrolled namespace;
    // not: the opted-out pod, the legacy namespace's pod, the finished one.
    let want: BTreeSet<String> = [
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_4718_9a2b_3c4d5e6f7081.slice",
        "kubepods.slice/kubepods-pod2c3d4e5f_6071_4829_ab3c_4d5e6f708192.slice",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(t.cgroups, want);
    let id = |ip: &str| {
        let ip: IpAddr = ip.parse().unwrap();
        t.workloads
            .iter()
            .find(|w| w.address == ip)
            .map(|w| format!("{}/{}", w.namespace, w.service_account))
    };
    assert_eq!(id("10.1.0.9").as_deref(), Some("shop/storefront"));
    assert_eq!(id("fd00:1::9").as_deref(), Some("shop/storefront"));
    assert_eq!(
        id("10.1.0.10").as_deref(),
        Some("shop/default"),
        "no serviceAccountName: default"
    );
    // Not enrolled: the legacy namespace's pod, the opted-out one.
    assert_eq!(id("10.1.0.12"), None);
    assert_eq!(id("10.1.0.11"), None);
    assert_eq!(t.workloads.len(), 3, "{:?}", t.workloads);

    // The legacy namespace joins the mesh: its pod is enrolled too.
    let mut ns = fixture("namespaces.yaml")["items"][1].clone();
    ns["metadata"]["labels"]["ferry.io/mesh"] = "enabled".into();
    o.apply_value(ns.clone()).unwrap();
    let t = run(&o);
    assert_eq!(t.cgroups.len(), 3);
    // The client pod is deleted: its cgroup leaves the set.
    o.delete_value(fixture("pods.yaml")["items"][0].clone())
        .unwrap();
    let t = run(&o);
    assert_eq!(t.cgroups.len(), 2);
    assert!(!t.cgroups.iter().any(|c| c.contains("1b2c3d4e")));
    // The namespace label is removed: nothing of it stays enrolled.
    ns["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("ferry.io/mesh");
    o.apply_value(ns).unwrap();
    assert_eq!(run(&o).cgroups.len(), 1);
}

#[test]
fn pod_cgroup_paths_for_both_drivers() {
    let uid = "1b2c3d4e-5f60-4718-9a2b-3c4d5e6f7081";
    let s = kube(CgroupDriver::Systemd);
    let c = kube(CgroupDriver::Cgroupfs);
    assert_eq!(
        pod_cgroup(&s, uid, "BestEffort").unwrap(),
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c3d4e_5f60_4718_9a2b_3c4d5e6f7081.slice"
    );
    assert_eq!(
        pod_cgroup(&c, uid, "Burstable").unwrap(),
        format!("kubepods/burstable/pod{uid}")
    );
    assert_eq!(
        pod_cgroup(&c, uid, "Guaranteed").unwrap(),
        format!("kubepods/pod{uid}")
    );
    let custom = Kubernetes {
        cgroup_driver: CgroupDriver::Cgroupfs,
        cgroup_root: String::new(),
    };
    assert_eq!(
        pod_cgroup(&custom, uid, "Guaranteed").unwrap(),
        format!("pod{uid}")
    );
    // Nothing from the API escapes the hierarchy.
    assert_eq!(pod_cgroup(&s, "../../etc", "Burstable"), None);
    assert_eq!(pod_cgroup(&s, uid, "Platinum"), None);
    assert_eq!(pod_cgroup(&s, "", "Burstable"), None);
}

/// The cluster with tests/fixtures/kube/tunnel.yaml: pods and nodes behind
/// the endpoints of shop/reviews and legacy/old.
fn mesh_cluster() -> Objects {
    let mut o = cluster();
    o.apply_value(fixture("tunnel.yaml")).unwrap();
    o
}

/// A Pod of tests/fixtures/kube/tunnel.yaml, by name.
fn pod(name: &str) -> serde_json::Value {
    fixture("tunnel.yaml")["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "Pod" && i["metadata"]["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no pod {name} in tunnel.yaml"))
}

fn endpoint<'a>(s: &'a Service, ip: &str) -> &'a Endpoint {
    let ip: IpAddr = ip.parse().unwrap();
    s.endpoints()
        .find(|e| e.ip() == Some(ip))
        .unwrap_or_else(|| panic!("{ip} is not an endpoint of {}", s.key()))
}

/// What the agent builds from a translation (as app.rs does: services,
/// workloads and nodes from the API).
fn snapshot(t: &Translated) -> Snapshot {
    let mut c = config::parse(
        "node: { name: node-a }\ncapture: { enabled: false }\n",
        "test",
    )
    .expect("valid settings");
    c.services = t.services.clone();
    c.workloads = t.workloads.clone();
    c.nodes = t.nodes.clone();
    Snapshot::new(&c)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn remote_mesh_endpoints_carry_node_and_identity_and_are_tunnelled() {
    let t = run(&mesh_cluster());
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    let reviews = service(&t, "shop/reviews");

    // On node-b, in the mesh: node, identity, tunnelled to node-b's InternalIP.
    let b = endpoint(reviews, "10.1.1.61");
    assert_eq!(b.locality.node.as_deref(), Some("node-b"));
    assert_eq!(
        (b.namespace.as_str(), b.service_account.as_str(), b.mesh),
        ("shop", "reviews", true)
    );
    // On this node: in the mesh, but local.
    let a = endpoint(reviews, "10.1.0.60");
    assert_eq!(a.locality.node.as_deref(), Some("node-a"));
    assert!(a.mesh);

    let snap = snapshot(&t);
    let route = snap
        .route("10.1.1.61".parse().unwrap())
        .expect("node-b's mesh pod is tunnelled");
    assert_eq!(route.node, "node-b");
    assert_eq!(route.node_addr, addr("192.168.10.12:15008"));
    assert_eq!(
        route.identity.uri(),
        "spiffe://cluster.local/ns/shop/sa/reviews"
    );
    assert!(
        snap.route("10.1.0.60".parse().unwrap()).is_none(),
        "this node's pod is reached locally"
    );
    // This node's pod is a local workload: the inbound side accepts it and
    // the outbound side presents its identity.
    let local = snap
        .workload("10.1.0.60".parse().unwrap())
        .expect("local workload");
    assert_eq!(local.uri(), "spiffe://cluster.local/ns/shop/sa/reviews");
    assert!(snap.workload("10.1.1.61".parse().unwrap()).is_none());
}

#[test]
fn endpoints_outside_the_mesh_stay_direct() {
    let t = run(&mesh_cluster());
    let snap = snapshot(&t);
    let reviews = service(&t, "shop/reviews");
    // Opted out, no targetRef, a targetRef whose uid is not the cached
    // pod's: on node-b (which has an address) but not mesh pods.
    for ip in ["10.1.1.62", "10.1.1.63", "10.1.1.64"] {
        let e = endpoint(reviews, ip);
        assert_eq!(e.locality.node.as_deref(), Some("node-b"), "{ip}");
        assert!(!e.mesh, "{ip}");
        assert!(snap.route(ip.parse().unwrap()).is_none(), "{ip}");
    }
    // A pod of a namespace outside the mesh, on node-b.
    let old = endpoint(service(&t, "legacy/old"), "10.1.1.70");
    assert_eq!(old.locality.node.as_deref(), Some("node-b"));
    assert!(!old.mesh);
    assert!(snap.route("10.1.1.70".parse().unwrap()).is_none());

    // The namespace joins the mesh: the same pod is tunnelled, under its
    // own identity.
    let mut o = mesh_cluster();
    let mut ns = fixture("namespaces.yaml")["items"][1].clone();
    ns["metadata"]["labels"]["ferry.io/mesh"] = "enabled".into();
    o.apply_value(ns).unwrap();
    let t = run(&o);
    let route = snapshot(&t)
        .route("10.1.1.70".parse().unwrap())
        .cloned()
        .expect("tunnelled once in the mesh");
    assert_eq!(
        route.identity.uri(),
        "spiffe://cluster.local/ns/legacy/sa/old"
    );
}

#[test]
fn node_addresses_internal_first_ipv4_first_and_unaddressed_nodes() {
    let t = run(&mesh_cluster());
    // node-c lists only its host name: its mesh pod goes direct, and the
    // node is reported.
    assert!(!t.nodes.contains_key("node-c"));
    assert_eq!(t.unaddressed_nodes, BTreeSet::from(["node-c".to_owned()]));
    let c = endpoint(service(&t, "shop/reviews"), "10.1.3.65");
    assert_eq!(c.locality.node.as_deref(), Some("node-c"));
    assert!(!c.mesh, "no address for node-c: not tunnelled");
    let snap = snapshot(&t);
    assert!(snap.route("10.1.3.65".parse().unwrap()).is_none());

    // Dual-stack node-d lists an IPv6 InternalIP first, an ExternalIP, then
    // an IPv4 InternalIP: the IPv4 InternalIP wins.
    assert_eq!(t.nodes["node-d"], addr("192.168.10.14:15008"));
    // node-e has only ExternalIPs: the IPv4 one.
    assert_eq!(t.nodes["node-e"], addr("203.0.113.15:15008"));
    assert_eq!(t.nodes["node-a"], addr("192.168.10.11:15008"));
    let d = snap
        .route("10.1.4.66".parse().unwrap())
        .expect("node-d's pod is tunnelled");
    assert_eq!(d.node_addr, addr("192.168.10.14:15008"));
    // reviews-d has no serviceAccountName: `default`.
    assert_eq!(
        d.identity.uri(),
        "spiffe://cluster.local/ns/shop/sa/default"
    );
    assert_eq!(
        snap.route("10.1.5.67".parse().unwrap())
            .map(|r| r.node_addr),
        Some(addr("203.0.113.15:15008"))
    );

    // An IPv6-only node: its IPv6 InternalIP.
    let mut o = mesh_cluster();
    let mut node_c = fixture("tunnel.yaml")["items"][0].clone();
    node_c["status"]["addresses"] = serde_json::json!([
        {"address": "fd00:10::13", "type": "InternalIP"},
        {"address": "node-c", "type": "Hostname"}
    ]);
    o.apply_value(node_c).unwrap();
    let t = run(&o);
    assert_eq!(t.nodes["node-c"], addr("[fd00:10::13]:15008"));
    assert!(t.unaddressed_nodes.is_empty());
    assert!(endpoint(service(&t, "shop/reviews"), "10.1.3.65").mesh);
}

#[test]
fn hbone_port_comes_from_the_agents_inbound_listener() {
    let raw = config::parse_raw(
        "source: kubernetes\ncapture: { enabled: false }\nlisteners: { inbound: \"[::]:15108\" }\n",
        "test",
    )
    .unwrap();
    let t = run_with(&mesh_cluster(), &raw);
    assert_eq!(t.nodes["node-b"], addr("192.168.10.12:15108"));
}

#[test]
fn pod_changes_move_identity_and_node() {
    let mut o = mesh_cluster();
    // A new service account.
    let mut b = pod("reviews-b");
    b["spec"]["serviceAccountName"] = "reviews-v2".into();
    o.apply_value(b.clone()).unwrap();
    let t = run(&o);
    assert_eq!(
        snapshot(&t)
            .route("10.1.1.61".parse().unwrap())
            .map(|r| r.identity.uri()),
        Some("spiffe://cluster.local/ns/shop/sa/reviews-v2".to_owned())
    );
    // A service account that cannot be an identity: out of the mesh.
    b["spec"]["serviceAccountName"] = "reviews.v2".into();
    o.apply_value(b.clone()).unwrap();
    let t = run(&o);
    assert!(t.rejected.is_empty(), "{:?}", t.rejected);
    assert!(!endpoint(service(&t, "shop/reviews"), "10.1.1.61").mesh);
    // The pod opts out.
    b["spec"]["serviceAccountName"] = "reviews".into();
    b["metadata"]["annotations"] = serde_json::json!({"ferry.io/capture": "disabled"});
    o.apply_value(b.clone()).unwrap();
    assert!(
        snapshot(&run(&o))
            .route("10.1.1.61".parse().unwrap())
            .is_none()
    );
    // The pod is gone from the cache (the slice not updated yet): direct.
    o.delete_value(b).unwrap();
    assert!(
        snapshot(&run(&o))
            .route("10.1.1.61".parse().unwrap())
            .is_none()
    );
    // Back; then node-b loses its only address: its endpoints go direct.
    o.apply_value(pod("reviews-b")).unwrap();
    assert!(
        snapshot(&run(&o))
            .route("10.1.1.61".parse().unwrap())
            .is_some()
    );
    let mut node_b = fixture("nodes.yaml")["items"][1].clone();
    node_b["status"]["addresses"] = serde_json::json!([]);
    o.apply_value(node_b).unwrap();
    let t = run(&o);
    assert!(!t.nodes.contains_key("node-b"));
    assert!(
        t.unaddressed_nodes.contains("node-b"),
        "{:?}",
        t.unaddressed_nodes
    );
    assert!(snapshot(&t).route("10.1.1.61".parse().unwrap()).is_none());
}

#[test]
fn local_pod_without_identity_label_is_not_enrolled() {
    let mut o = mesh_cluster();
    let mut a = pod("reviews-a");
    let before = run(&o).cgroups.len();
    a["spec"]["serviceAccountName"] = "Reviews".into();
    o.apply_value(a).unwrap();
    let t = run(&o);
    assert_eq!(t.cgroups.len(), before - 1);
    assert!(
        !t.workloads
            .iter()
            .any(|w| w.address.to_string() == "10.1.0.60")
    );
    assert!(!endpoint(service(&t, "shop/reviews"), "10.1.0.60").mesh);
}
