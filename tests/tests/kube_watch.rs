//! The Kubernetes watch loop against a fake API server over real HTTP on
//! 127.0.0.1 (`ferry_tests::fake_api`): no kube-apiserver, kind or k3s can
//! run on these machines, so the server in this test speaks the list/watch
//! protocol itself. Covered: nothing published before every cache has
//! listed; updates; relist after `410 Gone`; the API unreachable and back
//! (the last good configuration stays meanwhile); a cluster without the
//! TCPRoute CRD; the cluster-wide Pod watch, whose events move endpoint
//! identities and local workloads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry::k8s::{KubeMetrics, Options, Translated};
use ferry_tests::fake_api::FakeApi;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/kube")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn load_cluster(api: &FakeApi) {
    for f in [
        "namespaces.yaml",
        "nodes.yaml",
        "services.yaml",
        "endpointslices.yaml",
        "pods.yaml",
        "checkout.yaml",
        "tcproutes.yaml",
    ] {
        api.apply(fixture(f));
    }
}

fn client(api: &FakeApi) -> kube::Client {
    // Two rustls providers are linked (the tunnel's aws-lc-rs, kube's ring):
    // choose one before the client builds its TLS configuration.
    ferry::tls::install_process_default();
    let cfg = kube::Config::new(api.url().parse().expect("url"));
    kube::Client::try_from(cfg).expect("client")
}

fn start(
    api: &FakeApi,
) -> (
    watch::Receiver<Option<Arc<Translated>>>,
    Arc<KubeMetrics>,
    CancellationToken,
) {
    let settings = ferry::config::parse_raw("source: kubernetes\n", "test").unwrap();
    let kubernetes = ferry::config::Kubernetes {
        cgroup_driver: ferry::config::CgroupDriver::Systemd,
        cgroup_root: "kubepods.slice".into(),
    };
    let mut opts = Options::new("node-a", settings, kubernetes);
    // Short backoff so that recovery is quick; still bounded by the waits.
    opts.backoff_min = Duration::from_millis(50);
    opts.backoff_max = Duration::from_millis(400);
    let metrics = Arc::new(KubeMetrics::default());
    let stop = CancellationToken::new();
    let rx = ferry::k8s::spawn(client(api), opts, metrics.clone(), stop.clone());
    (rx, metrics, stop)
}

/// Waits (at most 20 s) for a published configuration satisfying `pred`.
async fn wait_for(
    rx: &mut watch::Receiver<Option<Arc<Translated>>>,
    what: &str,
    pred: impl Fn(&Translated) -> bool,
) -> Arc<Translated> {
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(t) = rx.borrow_and_update().clone()
                && pred(&t)
            {
                return t;
            }
            rx.changed().await.expect("source alive");
        }
    })
    .await;
    r.unwrap_or_else(|_| {
        panic!(
            "timed out waiting for {what}; last: {:?}",
            rx.borrow().as_ref().map(|t| summary(t))
        )
    })
}

/// Waits (at most 20 s, polling every 10 ms) for a condition on the server
/// or the metrics.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn summary(t: &Translated) -> Vec<String> {
    t.services
        .iter()
        .map(|s| {
            let eps: Vec<String> = s
                .endpoints()
                .filter_map(|e| e.ip().map(|i| i.to_string()))
                .collect();
            format!("{} {:?}", s.key(), eps)
        })
        .collect()
}

fn endpoints(t: &Translated, key: &str) -> Vec<String> {
    t.services
        .iter()
        .find(|s| s.key() == key)
        .map(|s| {
            s.endpoints()
                .filter_map(|e| e.ip().map(|i| i.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn web_slice() -> Value {
    fixture("endpointslices.yaml")["items"][0].clone()
}

fn with_endpoint(mut slice: Value, ip: &str) -> Value {
    slice["endpoints"].as_array_mut().unwrap().push(
        serde_json::json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-b"}),
    );
    slice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_relist_outage_and_recovery() {
    let api = FakeApi::start().await.unwrap();
    load_cluster(&api);
    // Nodes answer only when released: nothing may be published before.
    api.hold("Node");
    let (mut rx, metrics, stop) = start(&api);
    wait_until("the five other lists", || {
        ["Service", "EndpointSlice", "Pod", "Namespace", "TCPRoute"]
            .iter()
            .all(|k| api.requests(k, "list") >= 1)
            && api.requests("Node", "list") >= 1
    })
    .await;
    // The other watches are running by now; still nothing published.
    wait_until("the watch of services", || {
        api.requests("Service", "watch") >= 1
    })
    .await;
    assert!(rx.borrow().is_none(), "published before every cache synced");
    assert_eq!(metrics.synced.get(), 0);
    api.release();

    let t = wait_for(&mut rx, "the first configuration", |_| true).await;
    assert_eq!(
        endpoints(&t, "shop/web"),
        ["10.1.0.5", "10.1.1.6", "fd00:1::5"]
    );
    assert_eq!(t.zone.as_deref(), Some("eu-west-1a"));
    assert_eq!(t.cgroups.len(), 2);
    wait_until("synced gauge", || metrics.synced.get() == 1).await;
    // The Pod watch is cluster-wide: endpoints on other nodes need their
    // pods' service accounts.
    assert!(
        api.queries("Pod")
            .iter()
            .all(|q| !q.contains("fieldSelector")),
        "{:?}",
        api.queries("Pod")
    );

    // An update through the watch.
    api.apply(with_endpoint(web_slice(), "10.1.1.60"));
    wait_for(&mut rx, "the new endpoint", |t| {
        endpoints(t, "shop/web").contains(&"10.1.1.60".to_owned())
    })
    .await;
    // A deletion through the watch.
    api.delete(fixture("services.yaml")["items"][1].clone());
    wait_for(&mut rx, "shop/api deleted", |t| {
        !t.services.iter().any(|s| s.key() == "shop/api")
    })
    .await;

    // 410 Gone: every watch ends with Expired and the history is gone; a
    // change made meanwhile reaches Ferry only through a fresh list.
    let lists_before = api.requests("EndpointSlice", "list");
    api.expire_watches();
    api.apply(with_endpoint(web_slice(), "10.1.1.61"));
    let t = wait_for(&mut rx, "the endpoint seen by the relist", |t| {
        endpoints(t, "shop/web").contains(&"10.1.1.61".to_owned())
    })
    .await;
    assert!(
        api.requests("EndpointSlice", "list") > lists_before,
        "relisted"
    );
    assert!(
        !endpoints(&t, "shop/web").contains(&"10.1.1.60".to_owned()),
        "the relist replaced the cache"
    );
    let errors = |r: &str| {
        metrics
            .watch_errors
            .get_or_create(&ferry::k8s::ResourceLabels {
                resource: match r {
                    "services" => "services",
                    _ => "endpointslices",
                },
            })
            .get()
    };
    assert!(errors("endpointslices") >= 1);

    // The API goes away: watches fail, the last configuration stays.
    let last = rx.borrow().clone().expect("published");
    let errors_before = errors("services");
    api.down();
    wait_until("watch errors while down", || {
        errors("services") > errors_before
    })
    .await;
    wait_until("synced gauge down", || metrics.synced.get() == 0).await;
    assert!(
        Arc::ptr_eq(&last, rx.borrow().as_ref().expect("still published")),
        "nothing published during the outage"
    );
    // A change while Ferry cannot see it.
    api.apply(with_endpoint(web_slice(), "10.1.1.62"));
    api.up();
    wait_for(&mut rx, "the change made during the outage", |t| {
        endpoints(t, "shop/web").contains(&"10.1.1.62".to_owned())
    })
    .await;
    // Any event after recovery marks the watches healthy again.
    for kind_file in [
        "services.yaml",
        "namespaces.yaml",
        "nodes.yaml",
        "pods.yaml",
        "tcproutes.yaml",
    ] {
        api.apply(fixture(kind_file)["items"][0].clone());
    }
    api.apply(with_endpoint(web_slice(), "10.1.1.63"));
    wait_until("synced gauge back", || metrics.synced.get() == 1).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_without_gateway_api_still_syncs() {
    let api = FakeApi::start().await.unwrap();
    load_cluster(&api);
    api.set_missing("TCPRoute", true);
    let (mut rx, _metrics, stop) = start(&api);
    let t = wait_for(&mut rx, "the first configuration", |_| true).await;
    // No routes: checkout falls back to its own (empty) endpoints.
    let c = t
        .services
        .iter()
        .find(|s| s.key() == "shop/checkout")
        .unwrap();
    assert_eq!(c.sets.len(), 1);
    // The CRD is installed later: the route takes effect.
    api.set_missing("TCPRoute", false);
    wait_for(&mut rx, "the route", |t| {
        t.services
            .iter()
            .any(|s| s.key() == "shop/checkout" && s.sets.len() == 2)
    })
    .await;
    stop.cancel();
}

/// `namespace/service account` of a mesh endpoint of shop/reviews, `-` for
/// one outside the mesh.
fn reviews_identity(t: &Translated, ip: &str) -> Option<String> {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let s = t.services.iter().find(|s| s.key() == "shop/reviews")?;
    let e = s.endpoints().find(|e| e.ip() == Some(ip))?;
    Some(if e.mesh {
        format!("{}/{}", e.namespace, e.service_account)
    } else {
        "-".into()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wide_pod_watch_moves_identities_and_workloads() {
    let api = FakeApi::start().await.unwrap();
    load_cluster(&api);
    api.apply(fixture("tunnel.yaml"));
    let (mut rx, metrics, stop) = start(&api);

    // From the initial list: node-b's pod (another node) and node-a's.
    let t = wait_for(&mut rx, "the first configuration", |_| true).await;
    assert_eq!(
        reviews_identity(&t, "10.1.1.61").as_deref(),
        Some("shop/reviews")
    );
    assert_eq!(
        t.nodes.get("node-b"),
        Some(&"192.168.10.12:15008".parse().unwrap())
    );
    let local = |t: &Translated, ip: &str| t.workloads.iter().any(|w| w.address.to_string() == ip);
    assert!(local(&t, "10.1.0.60") && !local(&t, "10.1.1.61"));
    assert_eq!(t.unaddressed_nodes.iter().collect::<Vec<_>>(), ["node-c"]);
    assert_eq!(metrics.nodes_without_address.get(), 1);

    // A watch event: node-b's pod gets another service account.
    let mut b = fixture("tunnel.yaml")["items"][8].clone();
    assert_eq!(b["metadata"]["name"], "reviews-b");
    b["spec"]["serviceAccountName"] = "reviews-v2".into();
    api.apply(b.clone());
    wait_for(&mut rx, "the new service account", |t| {
        reviews_identity(t, "10.1.1.61").as_deref() == Some("shop/reviews-v2")
    })
    .await;

    // The pod is recreated on this node (same name and address, as a
    // StatefulSet's would be; the slice still says node-b for a while): it
    // becomes a local workload with its identity.
    b["spec"]["nodeName"] = "node-a".into();
    api.apply(b.clone());
    let t = wait_for(&mut rx, "the pod as a local workload", |t| {
        local(t, "10.1.1.61")
    })
    .await;
    let w = t
        .workloads
        .iter()
        .find(|w| w.address.to_string() == "10.1.1.61")
        .unwrap();
    assert_eq!(
        (w.namespace.as_str(), w.service_account.as_str()),
        ("shop", "reviews-v2")
    );

    // Deleted: neither local nor a mesh endpoint any more.
    api.delete(b);
    wait_for(&mut rx, "the pod gone", |t| {
        !local(t, "10.1.1.61") && reviews_identity(t, "10.1.1.61").as_deref() == Some("-")
    })
    .await;

    // A relist (410 Gone) with a change made meanwhile: node-c gets an address.
    api.expire_watches();
    let mut node_c = fixture("tunnel.yaml")["items"][0].clone();
    node_c["status"]["addresses"] =
        serde_json::json!([{"address": "192.168.10.13", "type": "InternalIP"}]);
    api.apply(node_c);
    let t = wait_for(&mut rx, "node-c addressed", |t| {
        t.nodes.contains_key("node-c")
    })
    .await;
    assert!(t.unaddressed_nodes.is_empty());
    assert_eq!(metrics.nodes_without_address.get(), 0);
    assert_eq!(
        reviews_identity(&t, "10.1.3.65").as_deref(),
        Some("shop/reviews")
    );
    stop.cancel();
}
