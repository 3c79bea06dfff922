//! Prometheus metrics (prometheus-client) and the small HTTP servers for
//! `/metrics` (metrics port) and `/ready` + `/healthz` (readiness port).
//!
//! Labels are bounded: per service (`namespace/name`), per reason from a fixed
//! set, per eBPF program and event; never per connection or per client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Errors of the metrics module.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    /// `upstream` (client to endpoint) or `downstream` (endpoint to client).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// One of a fixed set; see `proxy::Failure::reason`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EbpfLabels {
    pub program: &'static str,
    pub event: &'static str,
}

/// Every metric the proxy updates.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    pub opened: Family<ServiceLabels, Counter>,
    pub closed: Family<ServiceLabels, Counter>,
    pub active: Family<ServiceLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub failures: Family<ErrorLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `outbound` (this node's client side) or `inbound` (this node's server side).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenyLabels {
    /// One of a fixed set; see `hbone::Denial::reason`.
    pub reason: &'static str,
}

/// Metrics of the HBONE tunnel, certificates and authorization.
#[derive(Debug, Default)]
pub struct HboneMetrics {
    /// TLS connections established, per direction.
    pub connections: Family<DirectionLabels, Counter>,
    /// TLS connections open now, per direction.
    pub connections_active: Family<DirectionLabels, Gauge>,
    /// Tunnel streams (one per relayed connection) opened, per direction.
    pub streams: Family<DirectionLabels, Counter>,
    /// TLS handshakes that failed (untrusted or expired peer, wrong identity…).
    pub handshake_failures: Family<DirectionLabels, Counter>,
    /// Inbound streams refused by authorization, per reason.
    pub denied: Family<DenyLabels, Counter>,
    /// Workload certificates issued (first issue and every rotation).
    pub certificates_issued: Counter,
}

/// Reads counters that live elsewhere (the eBPF per-CPU map) at scrape time.
pub trait EbpfCounterSource: Send + Sync + std::fmt::Debug + 'static {
    fn read(&self) -> Vec<(&'static str, &'static str, u64)>;
}

#[derive(Debug)]
struct EbpfCollector(Arc<dyn EbpfCounterSource>);

impl Collector for EbpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let family = Family::<EbpfLabels, Counter>::default();
        for (program, event, value) in self.0.read() {
            family
                .get_or_create(&EbpfLabels { program, event })
                .inc_by(value);
        }
        let metric = encoder.encode_descriptor(
            "ferry_ebpf_events",
            "Events counted by the eBPF capture programs (per-CPU map, summed)",
            None,
            family.metric_type(),
        )?;
        family.encode(metric)
    }
}

/// A counter read at scrape time from somewhere else.
struct ReadCounter {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for ReadCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCounter")
            .field("name", &self.name)
            .finish()
    }
}

impl Collector for ReadCounter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = Counter::<u64>::default();
        c.inc_by((self.read)());
        let metric = encoder.encode_descriptor(self.name, self.help, None, c.metric_type())?;
        c.encode(metric)
    }
}

/// A gauge read at scrape time from somewhere else.
struct ReadGauge {
    name: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for ReadGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGauge")
            .field("name", &self.name)
            .finish()
    }
}

impl Collector for ReadGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let g = Gauge::<i64>::default();
        g.set((self.read)());
        let metric = encoder.encode_descriptor(self.name, self.help, None, g.metric_type())?;
        g.encode(metric)
    }
}

/// The registry plus handles to the metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: std::sync::RwLock<Registry>,
    pub proxy: Arc<ProxyMetrics>,
    pub hbone: Arc<HboneMetrics>,
}

impl Metrics {
    pub fn new(node: &str) -> Metrics {
        let mut registry = Registry::default();
        let proxy = Arc::new(ProxyMetrics::default());
        registry.register(
            "ferry_build",
            "Ferry's version and node",
            Info::new(vec![
                ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
                ("node".to_owned(), node.to_owned()),
            ]),
        );
        registry.register(
            "ferry_connections_opened",
            "Captured connections accepted, per service",
            proxy.opened.clone(),
        );
        registry.register(
            "ferry_connections_closed",
            "Captured connections finished (any outcome), per service",
            proxy.closed.clone(),
        );
        registry.register(
            "ferry_connections_active",
            "Captured connections open now, per service",
            proxy.active.clone(),
        );
        registry.register_with_unit(
            "ferry_tcp",
            "Payload bytes relayed, per service and direction (upstream: client to endpoint)",
            prometheus_client::registry::Unit::Bytes,
            proxy.bytes.clone(),
        );
        registry.register(
            "ferry_connection_failures",
            "Connections Ferry could not serve, by reason",
            proxy.failures.clone(),
        );
        let hbone = Arc::new(HboneMetrics::default());
        registry.register(
            "ferry_hbone_connections",
            "HBONE mutual-TLS connections established, per direction",
            hbone.connections.clone(),
        );
        registry.register(
            "ferry_hbone_connections_active",
            "HBONE mutual-TLS connections open now, per direction",
            hbone.connections_active.clone(),
        );
        registry.register(
            "ferry_hbone_streams",
            "HBONE streams (tunnelled connections) opened, per direction",
            hbone.streams.clone(),
        );
        registry.register(
            "ferry_tls_handshake_failures",
            "Mutual-TLS handshakes that failed, per direction",
            hbone.handshake_failures.clone(),
        );
        registry.register(
            "ferry_authorization_denied",
            "Inbound tunnelled connections refused by authorization, by reason",
            hbone.denied.clone(),
        );
        registry.register(
            "ferry_certificates_issued",
            "Workload certificates issued (first issue and rotations)",
            hbone.certificates_issued.clone(),
        );
        Metrics {
            registry: std::sync::RwLock::new(registry),
            proxy,
            hbone,
        }
    }

    /// Exports the balancing metrics.
    pub fn register_balance(&self, m: &Arc<crate::balance::BalanceMetrics>) {
        let mut r = self.registry.write().unwrap_or_else(|e| e.into_inner());
        m.register(&mut r);
    }

    /// Exports the DNS (hostname endpoint) metrics.
    pub fn register_dns(&self, m: &crate::balance::dns::DnsMetrics) {
        let mut r = self.registry.write().unwrap_or_else(|e| e.into_inner());
        m.register(&mut r);
    }

    /// `ferry_kube_*`: the Kubernetes source's metrics.
    pub fn register_kube(&self, m: &crate::k8s::KubeMetrics) {
        let mut r = self.registry.write().unwrap_or_else(|e| e.into_inner());
        m.register(&mut r);
    }

    /// `ferry_config_snapshot_timestamp_seconds`: when the configuration in
    /// force was built (Unix time).
    pub fn register_snapshot_time(&self, g: &Gauge<f64, std::sync::atomic::AtomicU64>) {
        let mut r = self.registry.write().unwrap_or_else(|e| e.into_inner());
        r.register(
            "ferry_config_snapshot_timestamp_seconds",
            "When the configuration snapshot in force was built (Unix seconds)",
            g.clone(),
        );
    }

    /// Exports the eBPF programs' counters.
    pub fn register_ebpf(&self, source: Arc<dyn EbpfCounterSource>) {
        let mut r = self.registry.write().unwrap_or_else(|e| e.into_inner());
        r.register_collector(Box::new(EbpfCollector(source)));
    }

    /// Exports a counter kept elsewhere (e.g. by the kernel), read at scrape.
    pub fn register_read_counter(
        &self,
        name: &'static str,
        help: &'static str,
        read: Box<dyn Fn() -> u64 + Send + Sync>,
    ) {
        let mut r = self.registry.write().unwrap_or_else(|e| e.into_inner());
        r.register_collector(Box::new(ReadCounter { name, help, read }));
    }

    /// Exports a gauge kept elsewhere, read at scrape.
    pub fn register_read_gauge(
        &self,
        name: &'static str,
        help: &'static str,
        read: Box<dyn Fn() -> i64 + Send + Sync>,
    ) {
        let mut r = self.registry.write().unwrap_or_else(|e| e.into_inner());
        r.register_collector(Box::new(ReadGauge { name, help, read }));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.read().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
            warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Whether the agent is serving (readiness).
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Binds a listener for one of the admin servers.
pub async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { what, addr, source })
}

fn text(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

/// Serves `/metrics` until `stop` fires.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    serve(listener, stop, move |req: Request<Incoming>| {
        let metrics = metrics.clone();
        async move {
            Ok::<_, Infallible>(match (req.method(), req.uri().path()) {
                (&Method::GET, "/metrics") => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.encode(),
                ),
                _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            })
        }
    })
    .await
}

/// Serves `/ready` and `/healthz` until `stop` fires.
pub async fn serve_readiness(
    listener: TcpListener,
    ready: Arc<Readiness>,
    stop: CancellationToken,
) {
    serve(listener, stop, move |req: Request<Incoming>| {
        let ready = ready.clone();
        async move {
            Ok::<_, Infallible>(match (req.method(), req.uri().path()) {
                (&Method::GET, "/ready") if ready.get() => {
                    text(StatusCode::OK, "text/plain", "ready\n")
                }
                (&Method::GET, "/ready") => {
                    text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
                }
                (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
                _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            })
        }
    })
    .await
}

async fn serve<F, Fut>(listener: TcpListener, stop: CancellationToken, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service_fn(handler));
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(%peer, error = %e, "admin connection ended with an error");
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}
