//! The HBONE tunnel end to end on loopback, in process, without root:
//! node A's outbound proxy → mutual TLS + HTTP/2 CONNECT → node B's inbound
//! → a pod server, with real certificates, pooling, authorization and
//! rotation. "Pods" are loopback addresses: the client binds 127.0.0.3,
//! node B's pod listens on 127.0.0.2, the service address is 127.0.0.10.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ferry::config;
use ferry::hbone::inbound::Inbound;
use ferry::hbone::pool::{Pool, PoolSettings};
use ferry::metrics::Metrics;
use ferry::proxy::{Destinations, Proxy};
use ferry::state::{Snapshot, State};
use ferry::tls::signer::{LocalCa, SignFuture, SignRequest, Signer};
use ferry::tls::{Identity, TlsContext};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const TD: &str = "cluster.local";
const CLIENT_IP: &str = "127.0.0.3";
const POD_IP: &str = "127.0.0.2";
const VIP: &str = "127.0.0.10";

fn id(sa: &str) -> Identity {
    Identity::new(TD, "default", sa).unwrap()
}

/// A pod server on node B.
#[derive(Clone)]
enum Pod {
    /// Echoes every byte; FIN after the client's FIN.
    Echo,
    /// Reads to the client's FIN, then answers `got=N\n` and a 64 KiB
    /// pattern, then FIN.
    DrainThenReply,
    /// Reads one chunk, then resets.
    Reset,
    /// Reports how reading ended (`eof` or `reset`) on the channel.
    Observe(tokio::sync::mpsc::UnboundedSender<&'static str>),
}

async fn serve_pod(mut s: TcpStream, kind: Pod) {
    match kind {
        Pod::Echo => {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
        Pod::DrainThenReply => {
            let mut n = 0u64;
            let mut buf = vec![0u8; 65536];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(k) => n += k as u64,
                    Err(_) => return,
                }
            }
            let mut reply = format!("got={n}\n").into_bytes();
            reply.extend((0..65536u32).map(|i| (i % 251) as u8));
            let _ = s.write_all(&reply).await;
            let _ = s.shutdown().await;
        }
        Pod::Reset => {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
        Pod::Observe(tx) => {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => {
                        let _ = tx.send("eof");
                        return;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        let _ = tx.send("reset");
                        return;
                    }
                }
            }
        }
    }
}

async fn start_pod(kind: Pod) -> SocketAddr {
    let l = TcpListener::bind((POD_IP, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve_pod(s, kind.clone()));
        }
    });
    addr
}

/// How to build a two-node mesh.
struct Opts {
    pod: Pod,
    /// Node B's pod identity (the endpoint should be `web`).
    pod_sa: &'static str,
    max_streams: u32,
    pooling: bool,
    lifetime: Duration,
    /// Node B's authorization rules (YAML list items under `rules:`).
    rules: &'static str,
    /// The CA both nodes use (default: a new one).
    ca: Option<Arc<LocalCa>>,
    /// Node A's signer (default: the shared CA).
    signer_a: Option<Arc<dyn Signer>>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            pod: Pod::Echo,
            pod_sa: "web",
            max_streams: 100,
            pooling: true,
            lifetime: Duration::from_secs(3600),
            rules: "[]",
            ca: None,
            signer_a: None,
        }
    }
}

struct Mesh {
    vip: SocketAddr,
    inbound: SocketAddr,
    metrics_a: Arc<Metrics>,
    metrics_b: Arc<Metrics>,
    tls_a: Arc<TlsContext>,
    tls_b: Arc<TlsContext>,
    pool: Arc<Pool>,
    stop: CancellationToken,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn mesh(o: Opts) -> Mesh {
    let ca =
        o.ca.clone()
            .unwrap_or_else(|| Arc::new(LocalCa::generate(TD).unwrap()));
    let pod = start_pod(o.pod.clone()).await;
    let inbound_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound = inbound_l.local_addr().unwrap();
    let outbound_l = TcpListener::bind((VIP, 0)).await.unwrap();
    let vip = outbound_l.local_addr().unwrap();

    let cfg_a = config::parse(
        &format!(
            "node: {{ name: node-a }}
capture: {{ enabled: false }}
workloads: [{{ address: {CLIENT_IP}, service_account: client }}]
nodes: {{ node-b: \"{inbound}\" }}
hbone: {{ max_streams_per_connection: {}, pooling: {} }}
services:
  - name: web
    addresses: [{VIP}]
    ports: [{{ port: {}, target_port: {} }}]
    endpoints: [{{ address: {POD_IP}, node: node-b, service_account: web }}]
",
            o.max_streams,
            o.pooling,
            vip.port(),
            pod.port()
        ),
        "node-a.yaml",
    )
    .unwrap();
    let cfg_b = config::parse(
        &format!(
            "node: {{ name: node-b }}
capture: {{ enabled: false }}
workloads: [{{ address: {POD_IP}, service_account: {} }}]
authorization:
  rules: {}
",
            o.pod_sa, o.rules
        ),
        "node-b.yaml",
    )
    .unwrap();
    let signer_a: Arc<dyn Signer> = o.signer_a.unwrap_or_else(|| ca.clone());
    let tls_a = Arc::new(TlsContext::new(TD, signer_a, vec![], o.lifetime).unwrap());
    let tls_b = Arc::new(TlsContext::new(TD, ca.clone(), vec![], o.lifetime).unwrap());
    let state_a = Arc::new(State::new(Snapshot::new(&cfg_a)));
    let state_b = Arc::new(State::new(Snapshot::new(&cfg_b)));
    tls_a
        .store()
        .sync(&state_a.load().workload_identities())
        .await
        .unwrap();
    tls_b
        .store()
        .sync(&state_b.load().workload_identities())
        .await
        .unwrap();
    let metrics_a = Arc::new(Metrics::new("node-a"));
    let metrics_b = Arc::new(Metrics::new("node-b"));
    tls_a
        .store()
        .count_issues(metrics_a.hbone.certificates_issued.clone());
    let pool = Arc::new(Pool::new(
        tls_a.clone(),
        metrics_a.hbone.clone(),
        PoolSettings {
            max_streams: o.max_streams as usize,
            pooling: o.pooling,
            connect_timeout: Duration::from_secs(5),
            bypass_mark: 0,
        },
    ));
    let proxy = Arc::new(Proxy {
        state: state_a,
        metrics: metrics_a.proxy.clone(),
        destinations: Destinations::LocalAddress,
        bypass_mark: 0,
        balance_metrics: Arc::new(ferry::balance::BalanceMetrics::default()),
        tunnel: Some(pool.clone()),
        relay_mode: ferry::proxy::lean::Mode::from_zero_copy(true),
        socket_join: None,
    });
    let inb = Arc::new(Inbound {
        tls: tls_b.clone(),
        state: state_b,
        metrics: metrics_b.hbone.clone(),
        bypass_mark: 0,
        connect_timeout: Duration::from_secs(5),
        max_streams: o.max_streams,
    });
    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    tokio::spawn(proxy.serve(outbound_l, TaskTracker::new(), stop.clone(), kill.clone()));
    tokio::spawn(inb.serve(inbound_l, TaskTracker::new(), stop.clone(), kill));
    Mesh {
        vip,
        inbound,
        metrics_a,
        metrics_b,
        tls_a,
        tls_b,
        pool,
        stop,
    }
}

/// A client pod's connection to the service (from 127.0.0.3).
async fn dial(vip: SocketAddr) -> TcpStream {
    try_dial(vip).await.unwrap()
}

async fn try_dial(vip: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind((CLIENT_IP.parse::<std::net::IpAddr>().unwrap(), 0).into())?;
    s.connect(vip).await
}

fn sample(m: &Metrics, sample: &str) -> f64 {
    let text = m.encode();
    let (name, labels) = sample.split_once('{').unwrap_or((sample, ""));
    let labels = labels.trim_end_matches('}');
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (k, l) = key.split_once('{').unwrap_or((key, ""));
        if k == name && l.trim_end_matches('}') == labels {
            return value.parse().unwrap();
        }
    }
    0.0
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data`, half-closes, and reads the whole echo.
async fn echo_round(vip: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = dial(vip).await;
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut got = Vec::with_capacity(data.len());
    let recv = r.read_to_end(&mut got);
    let (a, b) = tokio::join!(send, recv);
    a?;
    b?;
    Ok(got)
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_both_ways() {
    let m = mesh(Opts::default()).await;
    let data = random_bytes(4 << 20, 7);
    let got = echo_round(m.vip, &data).await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echo differs");
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_tcp_bytes_total{service="default/web",direction="upstream"}"#
        ),
        data.len() as f64
    );
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_hbone_streams_total{direction="outbound"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m.metrics_b,
            r#"ferry_hbone_streams_total{direction="inbound"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction() {
    let m = mesh(Opts {
        pod: Pod::DrainThenReply,
        ..Opts::default()
    })
    .await;
    let mut s = dial(m.vip).await;
    let data = random_bytes(300_000, 3);
    s.write_all(&data).await.unwrap();
    // FIN → END_STREAM → FIN to the pod, which only then answers.
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    let header = b"got=300000\n";
    assert_eq!(&got[..header.len()], header);
    let body = &got[header.len()..];
    assert_eq!(body.len(), 65536);
    assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_reset_reaches_the_client_as_a_reset() {
    let m = mesh(Opts {
        pod: Pod::Reset,
        ..Opts::default()
    })
    .await;
    let mut s = dial(m.vip).await;
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer");
    let e = r.expect_err("a reset, not a clean end of stream");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_the_pod_as_a_reset_and_fin_as_fin() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let m = mesh(Opts {
        pod: Pod::Observe(tx),
        ..Opts::default()
    })
    .await;
    // A FIN arrives as a FIN.
    let mut s = dial(m.vip).await;
    s.write_all(b"bye").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(rx.recv().await, Some("eof"));
    // A reset arrives as a reset.
    let mut s = dial(m.vip).await;
    s.write_all(b"x").await.unwrap();
    // The stream must be established before we reset (the pod has read).
    eventually("the stream to open", || {
        sample(
            &m.metrics_b,
            r#"ferry_hbone_streams_total{direction="inbound"}"#,
        ) >= 2.0
    })
    .await;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    assert_eq!(rx.recv().await, Some("reset"));
}

/// Opens `n` connections and keeps them open (each has exchanged a byte).
async fn hold_open(vip: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..n {
        let mut s = dial(vip).await;
        s.write_all(&[i as u8]).await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i as u8);
        held.push(s);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooling_shares_one_connection() {
    let m = mesh(Opts::default()).await;
    let held = hold_open(m.vip, 20).await;
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_hbone_connections_total{direction="outbound"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m.metrics_b,
            r#"ferry_hbone_connections_total{direction="inbound"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m.metrics_b,
            r#"ferry_hbone_streams_total{direction="inbound"}"#
        ),
        20.0
    );
    assert_eq!(m.pool.open_connections(), 1);
    drop(held);
    // Closed streams free their slots: more streams still use one connection.
    let again = hold_open(m.vip, 5).await;
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_hbone_connections_total{direction="outbound"}"#
        ),
        1.0
    );
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooling_honours_the_stream_cap() {
    let m = mesh(Opts {
        max_streams: 5,
        ..Opts::default()
    })
    .await;
    let held = hold_open(m.vip, 12).await;
    // 12 streams, 5 per connection: 3 connections.
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_hbone_connections_total{direction="outbound"}"#
        ),
        3.0
    );
    assert_eq!(m.pool.open_connections(), 3);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooling_off_opens_a_connection_per_stream() {
    let m = mesh(Opts {
        pooling: false,
        ..Opts::default()
    })
    .await;
    let held = hold_open(m.vip, 4).await;
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_hbone_connections_total{direction="outbound"}"#
        ),
        4.0
    );
    drop(held);
    eventually("tunnel connections to close", || {
        sample(
            &m.metrics_a,
            r#"ferry_hbone_connections_active{direction="outbound"}"#,
        ) == 0.0
    })
    .await;
}

/// Expects the client's connection to be refused (reset, no data).
async fn assert_refused(vip: SocketAddr) {
    let mut s = match try_dial(vip).await {
        Ok(s) => s,
        // Refused so fast that the reset beat the end of connect().
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect: {e}"),
    };
    let _ = s.write_all(b"secret").await;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("refusal within 10s");
    assert!(
        r.is_err() || buf.is_empty(),
        "expected a refusal, got {r:?} {buf:?}"
    );
    let e = r.expect_err("a reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_from_another_ca_is_refused() {
    let other = Arc::new(LocalCa::generate(TD).unwrap());
    let m = mesh(Opts {
        signer_a: Some(other.clone()),
        ..Opts::default()
    })
    .await;
    // A trusts only its own CA: B's certificate is refused by A.
    assert_refused(m.vip).await;
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_tls_handshake_failures_total{direction="outbound"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_connection_failures_total{reason="tunnel_failed"}"#
        ),
        1.0
    );
    // A now trusts B's CA too, but B does not trust A's: B refuses A's
    // client certificate.
    m.tls_a
        .set_trust_bundle(m.tls_b.store().signer().roots())
        .unwrap();
    assert_refused(m.vip).await;
    eventually("B to count the failed handshakes", || {
        sample(
            &m.metrics_b,
            r#"ferry_tls_handshake_failures_total{direction="inbound"}"#,
        ) >= 2.0
    })
    .await;
    assert_eq!(
        sample(
            &m.metrics_b,
            r#"ferry_hbone_streams_total{direction="inbound"}"#
        ),
        0.0
    );
    // And once B's bundle is reloaded with A's CA, the same peers connect.
    m.tls_b.set_trust_bundle(other.roots()).unwrap();
    let got = echo_round(m.vip, b"now trusted").await.unwrap();
    assert_eq!(got, b"now trusted");
}

/// Signs with a validity that ended an hour ago.
#[derive(Debug)]
struct ExpiredSigner(Arc<LocalCa>);

impl Signer for ExpiredSigner {
    fn sign(&self, request: SignRequest) -> SignFuture<'_> {
        let now = SystemTime::now();
        let r = self.0.sign_with_validity(
            &request,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        );
        Box::pin(std::future::ready(r))
    }
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.0.roots()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_refused() {
    // A's certificates come from the shared CA but have expired.
    let ca = Arc::new(LocalCa::generate(TD).unwrap());
    let m = mesh(Opts {
        ca: Some(ca.clone()),
        signer_a: Some(Arc::new(ExpiredSigner(ca))),
        ..Opts::default()
    })
    .await;
    assert_refused(m.vip).await;
    eventually("B to refuse the expired certificate", || {
        sample(
            &m.metrics_b,
            r#"ferry_tls_handshake_failures_total{direction="inbound"}"#,
        ) >= 1.0
    })
    .await;
    assert_eq!(
        sample(
            &m.metrics_b,
            r#"ferry_hbone_streams_total{direction="inbound"}"#
        ),
        0.0
    );
}

/// A node that presents a valid certificate of the wrong workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_identity_is_refused() {
    let ca = Arc::new(LocalCa::generate(TD).unwrap());
    let m = mesh(Opts {
        ca: Some(ca.clone()),
        ..Opts::default()
    })
    .await;
    // A rogue node: same CA, but it presents `db` whatever is asked.
    let rogue_ctx = TlsContext::new(TD, ca.clone(), vec![], Duration::from_secs(3600)).unwrap();
    let leaf = rogue_ctx.store().issue(&id("db")).await.unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(ferry::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(leaf.key.clone())));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let rogue = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = rogue.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        while let Ok((s, _)) = rogue.accept().await {
            let _ = acceptor.accept(s).await;
        }
    });
    let err = m
        .pool
        .connect(
            &id("client"),
            rogue_addr,
            &id("web"),
            "127.0.0.2:80".parse().unwrap(),
        )
        .await
        .expect_err("the rogue node must be refused");
    let text = format!("{err} {:?}", std::error::Error::source(&err));
    assert!(
        text.contains("presented spiffe://cluster.local/ns/default/sa/db, expected spiffe://cluster.local/ns/default/sa/web"),
        "{text}"
    );
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_tls_handshake_failures_total{direction="outbound"}"#
        ),
        1.0
    );
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_with_another_identity_is_refused() {
    // The endpoint should be `web`, but the pod at that address is `db`:
    // node B has no `web` workload to present, so the handshake fails.
    let m = mesh(Opts {
        pod_sa: "db",
        ..Opts::default()
    })
    .await;
    assert_refused(m.vip).await;
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_hbone_streams_total{direction="outbound"}"#
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denial_is_refused_and_counted() {
    let m = mesh(Opts {
        rules: r#"[{ action: deny, identities: ["spiffe://cluster.local/ns/default/sa/client"] }]"#,
        ..Opts::default()
    })
    .await;
    assert_refused(m.vip).await;
    assert_refused(m.vip).await;
    assert_eq!(
        sample(
            &m.metrics_b,
            r#"ferry_authorization_denied_total{reason="deny_rule"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_connection_failures_total{reason="denied_by_peer"}"#
        ),
        2.0
    );
    // The TLS connection itself was fine (and pooled).
    assert_eq!(
        sample(
            &m.metrics_b,
            r#"ferry_hbone_connections_total{direction="inbound"}"#
        ),
        1.0
    );

    let allow_other_port = mesh(Opts {
        rules: r#"[{ action: allow, namespaces: [default], ports: [1] }]"#,
        ..Opts::default()
    })
    .await;
    assert_refused(allow_other_port.vip).await;
    assert_eq!(
        sample(
            &allow_other_port.metrics_b,
            r#"ferry_authorization_denied_total{reason="no_allow_rule"}"#
        ),
        1.0
    );

    let allowed = mesh(Opts {
        rules: r#"[{ action: allow, identity_prefixes: ["spiffe://cluster.local/ns/default/"] }]"#,
        ..Opts::default()
    })
    .await;
    assert_eq!(echo_round(allowed.vip, b"ok").await.unwrap(), b"ok");
}

/// The certificates each side presents on a fresh handshake.
async fn presented(m: &Mesh) -> (Vec<u8>, Vec<u8>) {
    // What B presents to a new client connection from A.
    let tcp = TcpStream::connect(m.inbound).await.unwrap();
    let cfg = m.tls_a.client_config(&id("client")).unwrap();
    let name = ServerName::try_from(id("web").server_name()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    drop(tls);
    // What A presents to a new server (B's configuration).
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(m.tls_b.server_config());
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let tls = acceptor.accept(s).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let cfg = m.tls_a.client_config(&id("client")).unwrap();
    let name = ServerName::try_from(id("web").server_name()).unwrap();
    let _c = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let client_cert = server.await.unwrap();
    (server_cert, client_cert)
}

/// Forced rotation every second for ~12 s on both nodes, with new
/// connections (each its own TLS handshake: pooling off) and long-lived
/// connections streaming throughout: nothing fails, long-lived connections
/// survive every rotation, and fresh handshakes present the new certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_continuous_traffic() {
    let m = mesh(Opts {
        pooling: false,
        // Short enough that scheduled rotation (half life) also runs.
        lifetime: Duration::from_secs(4),
        ..Opts::default()
    })
    .await;
    let stop = CancellationToken::new();
    tokio::spawn(ferry::tls::store::run_rotation(
        m.tls_a.store().clone(),
        stop.clone(),
    ));
    tokio::spawn(ferry::tls::store::run_rotation(
        m.tls_b.store().clone(),
        stop.clone(),
    ));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(12);

    // Short connections, 3 at a time.
    let mut tasks = Vec::new();
    for w in 0..3u64 {
        let (ok, failed, vip) = (ok.clone(), failed.clone(), m.vip);
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline && i < 100_000 {
                i += 1;
                let data = random_bytes(2048, w * 1_000_003 + i);
                match tokio::time::timeout(Duration::from_secs(10), echo_round(vip, &data)).await {
                    Ok(Ok(got)) if got == data => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("round failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // Two long-lived connections streaming through every rotation.
    for w in 0..2u64 {
        let vip = m.vip;
        tasks.push(tokio::spawn(async move {
            let mut s = dial(vip).await;
            let mut rounds = 0u64;
            while Instant::now() < deadline && rounds < 1_000_000 {
                rounds += 1;
                let data = random_bytes(8192, 99 + w + rounds);
                s.write_all(&data).await.expect("long-lived write");
                let mut got = vec![0u8; data.len()];
                s.read_exact(&mut got).await.expect("long-lived read");
                assert_eq!(got, data);
            }
            assert!(rounds > 10, "long-lived connection moved data");
        }));
    }
    // Forced rotation every second on both nodes.
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    let mut rotations = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(m.tls_a.store().rotate_all().await, 1);
        assert_eq!(m.tls_b.store().rotate_all().await, 1);
        rotations += 1;
        let gen_a = m.tls_a.store().get(&id("client")).unwrap().generation;
        let gen_b = m.tls_b.store().get(&id("web")).unwrap().generation;
        let (server_cert, client_cert) = presented(&m).await;
        let cur_a = m.tls_a.store().get(&id("client")).unwrap();
        let cur_b = m.tls_b.store().get(&id("web")).unwrap();
        // Unless the scheduled rotation ran meanwhile, a fresh handshake
        // presents exactly the current certificate.
        if cur_b.generation == gen_b {
            assert!(
                server_cert == cur_b.der(),
                "B presented a stale certificate"
            );
        }
        if cur_a.generation == gen_a {
            assert!(
                client_cert == cur_a.der(),
                "A presented a stale certificate"
            );
        }
        assert!(
            !seen_b.contains(&server_cert),
            "B presented an old certificate"
        );
        assert!(
            !seen_a.contains(&client_cert),
            "A presented an old certificate"
        );
        seen_b.push(server_cert);
        seen_a.push(client_cert);
    }
    for t in tasks {
        t.await.expect("traffic task");
    }
    stop.cancel();
    let ok = ok.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    eprintln!("rotation: {rotations} forced rotations, {ok} connections ok, {failed} failed");
    assert_eq!(failed, 0, "no connection may fail during rotation");
    assert!(ok > 50, "enough traffic to mean something: {ok}");
    assert!(rotations >= 10);
    assert!(
        sample(&m.metrics_a, "ferry_certificates_issued_total") >= 11.0,
        "A issued its first certificate and one per rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed_busy_ones_are_not() {
    let m = mesh(Opts::default()).await;
    let held = hold_open(m.vip, 3).await;
    // Busy: never closed, however short the idle limit.
    assert_eq!(m.pool.close_idle(Duration::ZERO), 0);
    drop(held);
    let mut closed = 0;
    eventually("the idle connection to be closed", || {
        closed += m.pool.close_idle(Duration::ZERO);
        closed == 1
    })
    .await;
    eventually("both sides to see it closed", || {
        sample(
            &m.metrics_a,
            r#"ferry_hbone_connections_active{direction="outbound"}"#,
        ) == 0.0
            && sample(
                &m.metrics_b,
                r#"ferry_hbone_connections_active{direction="inbound"}"#,
            ) == 0.0
    })
    .await;
    // The next stream opens a new connection.
    assert_eq!(echo_round(m.vip, b"again").await.unwrap(), b"again");
    assert_eq!(
        sample(
            &m.metrics_a,
            r#"ferry_hbone_connections_total{direction="outbound"}"#
        ),
        2.0
    );
}
