//! The Kubernetes config source: watches the API and publishes what the
//! cluster says this node should run.
//!
//! One kube-runtime watcher per resource (Services, EndpointSlices, Pods,
//! Nodes, Namespaces, TCPRoutes) keeps a cache. A watcher
//! restarts with exponential backoff after any error and lists again after
//! `410 Gone` (kube-runtime resets to a fresh list on that status); a
//! relist replaces the cache only when it is complete (`InitDone`), so an
//! outage or a relist in progress never empties it. Nothing is published
//! until every cache has finished its first list; after that, every change
//! is translated ([`translate`]) and published when the result differs.
//! During an API outage nothing changes, so the last good snapshot stays in
//! force. A cluster without the Gateway API CRDs (TCPRoute list answers 404)
//! counts as having no routes.
//!
//! **One cluster-wide Pod watch.** Endpoints on other nodes need the
//! service account of the pod behind them (their tunnel identity), so the
//! Pod watch covers the whole cluster; this node's pods (enrollment,
//! cgroups, local identities) are the subset whose `spec.nodeName` is this
//! node. One watch rather than a node-scoped one beside a cluster-wide one:
//! the node's pods would be received and cached twice. Its memory stays
//! small because neither the stream nor the cache holds whole Pods: the
//! watch decodes [`pod::PodObject`] (metadata and the handful of spec and
//! status fields read; serde skips the rest) and the cache keeps only its
//! [`pod::PodInfo`] (namespace, uid, node, service account, addresses, QoS
//! class and three flags). Nodes likewise: [`node::NodeObject`] is decoded
//! and [`node::NodeInfo`] (tunnel address, zone, region) is kept.

/// `kube::Resource` for a partial object type (one that decodes only the
/// fields Ferry reads), with a `metadata: ObjectMeta` field:
/// `resource!(Type, Scope, group, version, kind, plural)`.
macro_rules! resource {
    ($ty:ty, $scope:ty, $group:literal, $version:literal, $kind:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                $group.into()
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                $version.into()
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &kube::api::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

pub mod node;
pub mod pod;
pub mod tcproute;
pub mod translate;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::utils::StreamBackoff;
use kube::runtime::watcher::{self, Event};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use tcproute::TcpRoute;
pub use translate::{Context, Objects, Translated, pod_cgroup, translate};

use crate::config::{Kubernetes, RawConfig};

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG): {0}"
    )]
    Client(#[source] kube::Error),
    #[error("cannot configure the Kubernetes client: {0}")]
    Config(String),
}

/// The watched resources, the `resource` label of the source's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Pods,
    Nodes,
    Namespaces,
    TcpRoutes,
}

impl Resource {
    pub const ALL: [Resource; 6] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Pods,
        Resource::Nodes,
        Resource::Namespaces,
        Resource::TcpRoutes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::Pods => "pods",
            Resource::Nodes => "nodes",
            Resource::Namespaces => "namespaces",
            Resource::TcpRoutes => "tcproutes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: &'static str,
}

/// The source's metrics.
#[derive(Debug, Default)]
pub struct KubeMetrics {
    /// `ferry_kube_watch_errors_total{resource}`.
    pub watch_errors: Family<ResourceLabels, Counter>,
    /// `ferry_kube_synced`: 1 when every watch has listed and its latest
    /// outcome was not an error.
    pub synced: Gauge,
    /// `ferry_kube_updates_total`: snapshots published.
    pub updates: Counter,
    /// `ferry_kube_nodes_without_address`: other nodes with mesh endpoints
    /// that cannot be tunnelled to (no address known); those go direct.
    pub nodes_without_address: Gauge,
}

impl KubeMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "ferry_kube_watch_errors",
            "Errors of the Kubernetes watches (each is retried with backoff), per resource",
            self.watch_errors.clone(),
        );
        r.register(
            "ferry_kube_synced",
            "1 when every Kubernetes watch has listed its objects and is healthy",
            self.synced.clone(),
        );
        r.register(
            "ferry_kube_updates",
            "Configurations published from the Kubernetes API",
            self.updates.clone(),
        );
        r.register(
            "ferry_kube_nodes_without_address",
            "Other nodes with mesh endpoints but no InternalIP or ExternalIP: their endpoints are reached directly, not through the tunnel",
            self.nodes_without_address.clone(),
        );
        for res in Resource::ALL {
            let _ = self.watch_errors.get_or_create(&ResourceLabels {
                resource: res.name(),
            });
        }
    }
}

/// What the source needs to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: String,
    /// The agent's settings, which translated services are validated with.
    pub settings: RawConfig,
    pub kubernetes: Kubernetes,
    /// First and longest wait between retries of a failed watch.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Options {
    pub fn new(node_name: &str, settings: RawConfig, kubernetes: Kubernetes) -> Options {
        Options {
            node_name: node_name.to_owned(),
            settings,
            kubernetes,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

#[derive(Default)]
struct Shared {
    objects: Objects,
    listed: [bool; 6],
    healthy: [bool; 6],
}

/// A client from the in-cluster service account, or KUBECONFIG/~/.kube/config.
pub async fn client() -> Result<kube::Client, KubeError> {
    crate::tls::install_process_default();
    kube::Client::try_default().await.map_err(KubeError::Client)
}

/// Starts the watches; the receiver sees `None` until every cache has
/// synced, then each new translation. Everything stops on `stop`.
pub fn spawn(
    client: kube::Client,
    opts: Options,
    metrics: Arc<KubeMetrics>,
    stop: CancellationToken,
) -> watch::Receiver<Option<Arc<Translated>>> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let notify = Arc::new(Notify::new());
    let (tx, rx) = watch::channel(None);
    let w = Watch {
        shared: shared.clone(),
        notify: notify.clone(),
        metrics: metrics.clone(),
        stop: stop.clone(),
        opts: opts.clone(),
    };
    w.start(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        Resource::Services,
        |o| &mut o.services,
    );
    w.start(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        Resource::EndpointSlices,
        |o| &mut o.slices,
    );
    w.start(
        Api::<pod::PodObject>::all(client.clone()),
        watcher::Config::default(),
        Resource::Pods,
        |o| &mut o.pods,
    );
    w.start(
        Api::<node::NodeObject>::all(client.clone()),
        watcher::Config::default(),
        Resource::Nodes,
        |o| &mut o.nodes,
    );
    w.start(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        Resource::Namespaces,
        |o| &mut o.namespaces,
    );
    w.start(
        Api::<TcpRoute>::all(client),
        watcher::Config::default(),
        Resource::TcpRoutes,
        |o| &mut o.routes,
    );
    tokio::spawn(publish(shared, notify, metrics, opts, tx, stop));
    rx
}

#[derive(Clone)]
struct Watch {
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    metrics: Arc<KubeMetrics>,
    stop: CancellationToken,
    opts: Options,
}

impl Watch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // The cache is rebuilt from the API by any relist; a panic while
        // holding it cannot leave it worse than stale.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `K` objects and caches each as a `V` (the object itself, or
    /// what is kept of it).
    fn start<K, V>(
        &self,
        api: Api<K>,
        cfg: watcher::Config,
        res: Resource,
        cache: fn(&mut Objects) -> &mut BTreeMap<String, V>,
    ) where
        K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        V: From<K> + Send + 'static,
    {
        let w = self.clone();
        tokio::spawn(async move { w.run(api, cfg, res, cache).await });
    }

    async fn run<K, V>(
        self,
        api: Api<K>,
        cfg: watcher::Config,
        res: Resource,
        cache: fn(&mut Objects) -> &mut BTreeMap<String, V>,
    ) where
        K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        V: From<K> + Send + 'static,
    {
        let backoff = Backoff::new(self.opts.backoff_min, self.opts.backoff_max);
        let stream = StreamBackoff::new(watcher::watcher(api, cfg), backoff);
        let mut stream = std::pin::pin!(stream);
        let mut buffer: Option<BTreeMap<String, V>> = None;
        let i = res.index();
        loop {
            let ev = tokio::select! {
                _ = self.stop.cancelled() => return,
                ev = stream.next() => ev,
            };
            let Some(ev) = ev else {
                warn!(resource = res.name(), "watch stream ended");
                return;
            };
            match ev {
                Ok(Event::Init) => {
                    debug!(resource = res.name(), "listing");
                    buffer = Some(BTreeMap::new());
                }
                Ok(Event::InitApply(o)) => {
                    buffer
                        .get_or_insert_with(BTreeMap::new)
                        .insert(translate::key(&o), V::from(o));
                }
                Ok(Event::InitDone) => {
                    let fresh = buffer.take().unwrap_or_default();
                    let n = fresh.len();
                    let mut s = self.lock();
                    *cache(&mut s.objects) = fresh;
                    s.listed[i] = true;
                    s.healthy[i] = true;
                    drop(s);
                    info!(resource = res.name(), objects = n, "listed");
                    self.notify.notify_one();
                }
                Ok(Event::Apply(o)) => {
                    let mut s = self.lock();
                    cache(&mut s.objects).insert(translate::key(&o), V::from(o));
                    s.healthy[i] = true;
                    drop(s);
                    self.notify.notify_one();
                }
                Ok(Event::Delete(o)) => {
                    let mut s = self.lock();
                    cache(&mut s.objects).remove(&translate::key(&o));
                    s.healthy[i] = true;
                    drop(s);
                    self.notify.notify_one();
                }
                Err(e) => {
                    self.metrics
                        .watch_errors
                        .get_or_create(&ResourceLabels {
                            resource: res.name(),
                        })
                        .inc();
                    let missing_crd = res == Resource::TcpRoutes && is_not_found(&e);
                    let mut s = self.lock();
                    if missing_crd {
                        // No Gateway API in this cluster: no routes. The
                        // watch keeps retrying, so routes appear once the CRD does.
                        if !s.listed[i] {
                            debug!("TCPRoute API not found; treating as no routes");
                        }
                        cache(&mut s.objects).clear();
                        s.listed[i] = true;
                        s.healthy[i] = true;
                    } else {
                        s.healthy[i] = false;
                        warn!(resource = res.name(), error = %e, "watch failed; retrying with backoff");
                    }
                    drop(s);
                    self.notify.notify_one();
                }
            }
        }
    }
}

/// Exponential backoff with jitter (half to full of the current delay),
/// doubling from `min` up to `max`; reset after a success.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter: f64 = rand::random_range(0.5..=1.0);
        Some(d.mul_f64(jitter))
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

async fn publish(
    shared: Arc<Mutex<Shared>>,
    notify: Arc<Notify>,
    metrics: Arc<KubeMetrics>,
    opts: Options,
    tx: watch::Sender<Option<Arc<Translated>>>,
    stop: CancellationToken,
) {
    let mut last: Option<Arc<Translated>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = notify.notified() => {}
        }
        let translated = {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            let all_listed = s.listed.iter().all(|x| *x);
            metrics
                .synced
                .set(i64::from(all_listed && s.healthy.iter().all(|x| *x)));
            if !all_listed {
                continue;
            }
            let cx = Context {
                node_name: &opts.node_name,
                settings: &opts.settings,
                kubernetes: &opts.kubernetes,
            };
            translate(&s.objects, &cx)
        };
        if last.as_deref() == Some(&translated) {
            continue;
        }
        // Said once per node, when it starts lacking an address.
        let before = last.as_ref().map(|t| &t.unaddressed_nodes);
        for node in &translated.unaddressed_nodes {
            if !before.is_some_and(|b| b.contains(node)) {
                warn!(node = %node, "node has mesh endpoints but no InternalIP or ExternalIP; its endpoints are reached directly, not through the tunnel");
            }
        }
        metrics
            .nodes_without_address
            .set(i64::try_from(translated.unaddressed_nodes.len()).unwrap_or(i64::MAX));
        info!(
            services = translated.services.len(),
            cgroups = translated.cgroups.len(),
            workloads = translated.workloads.len(),
            nodes = translated.nodes.len(),
            rejected = translated.rejected.len(),
            "configuration from the Kubernetes API"
        );
        let t = Arc::new(translated);
        last = Some(t.clone());
        metrics.updates.inc();
        if tx.send(Some(t)).is_err() {
            return;
        }
    }
}
