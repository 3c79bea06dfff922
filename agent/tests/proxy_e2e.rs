//! The whole proxy path in-process, without eBPF (tier 2: loopback, no root).
//!
//! The outbound listener is bound to the service address itself
//! (127.0.0.2:P) and uses `Destinations::LocalAddress`, so the address a
//! client connected to is the original destination. Endpoints listen on
//! 127.0.0.3/4/5 (every 127/8 address is local on Linux, no setup needed).
//! The tests check endpoint choice by weight, the metrics the proxy keeps,
//! and that a connection the proxy cannot serve is reset and counted.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use ferry::metrics::Metrics;
use ferry::proxy::{self, Destinations, Proxy};
use ferry::state::{Snapshot, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const LIMIT: Duration = Duration::from_secs(20);
const SERVICE_IP: &str = "127.0.0.2";
/// What every client sends: its request, then FIN.
const REQUEST: &[u8] = b"which endpoint are you?\n";

/// Runs a test body on its own runtime and fails the test if the body does
/// not finish within [`LIMIT`]. The watchdog is an OS thread rather than a
/// `tokio::time::timeout`: the proxy's metrics sit behind blocking locks, and
/// a lock deadlock parks every runtime worker, timers included, so only a
/// watchdog outside the runtime can still fail the test instead of hanging.
fn run<F>(body: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done, finished) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body);
        let _ = done.send(());
    });
    match finished.recv_timeout(LIMIT) {
        Ok(()) => worker.join().unwrap(),
        // The body panicked (the channel closed unsent): show its panic.
        Err(RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body finished without reporting"),
        },
        Err(RecvTimeoutError::Timeout) => {
            panic!("test did not finish within {LIMIT:?} (proxy hung or deadlocked?)")
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An endpoint's answer: the same length for every endpoint, so byte
/// counts do not depend on which one served a connection.
fn answer(id: u8) -> Vec<u8> {
    format!("endpoint-{id}\n").into_bytes()
}

/// Binds one listener per address, all on the same (free) port.
async fn bind_same_port(addrs: &[&str]) -> (u16, Vec<TcpListener>) {
    for _ in 0..100 {
        let first = TcpListener::bind((ip(addrs[0]), 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for a in &addrs[1..] {
            match TcpListener::bind((ip(a), port)).await {
                Ok(l) => listeners.push(l),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => break,
                Err(e) => panic!("bind {a}:{port}: {e}"),
            }
        }
        if listeners.len() == addrs.len() {
            return (port, listeners);
        }
    }
    panic!("no port free on all of {addrs:?}");
}

/// An endpoint: reads each request to EOF, then answers with its id and
/// closes. Runs until the test ends.
fn spawn_endpoint(listener: TcpListener, id: u8, tasks: &mut JoinSet<()>) {
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            conns.spawn(async move {
                let mut req = Vec::new();
                s.read_to_end(&mut req).await.unwrap();
                assert_eq!(req, REQUEST, "endpoint {id} got a wrong request");
                s.write_all(&answer(id)).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
}

/// A running proxy and what a test needs to inspect and stop it.
struct Running {
    service: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tracker: TaskTracker,
    serve: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting and waits until every connection task has finished,
    /// so that per-connection metrics are final.
    async fn shut_down(self) -> Arc<Metrics> {
        self.stop.cancel();
        self.serve.await.unwrap();
        self.tracker.close();
        self.tracker.wait().await;
        self.metrics
    }
}

/// Starts the proxy on `listener` with the configuration `yaml`.
fn start(listener: TcpListener, yaml: &str) -> Running {
    let config = ferry::config::parse(yaml, "test.yaml").expect("valid test config");
    let metrics = Arc::new(Metrics::new("test"));
    let proxy = Arc::new(Proxy {
        state: Arc::new(State::new(Snapshot::new(&config))),
        metrics: metrics.proxy.clone(),
        destinations: Destinations::LocalAddress,
        bypass_mark: 0,
        balance_metrics: Arc::new(ferry::balance::BalanceMetrics::default()),
        tunnel: None,
        relay_mode: ferry::proxy::lean::Mode::from_zero_copy(config.proxy.zero_copy),
        socket_join: None,
    });
    let service = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let serve = tokio::spawn(proxy.serve(
        listener,
        tracker.clone(),
        stop.clone(),
        CancellationToken::new(),
    ));
    Running {
        service,
        metrics,
        stop,
        tracker,
        serve,
    }
}

/// One client connection: request, FIN, read the answer to EOF.
async fn ask(service: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(service).await.unwrap();
    s.write_all(REQUEST).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    answer
}

/// The value of one sample in the text exposition, e.g.
/// `ferry_connections_opened_total{service="default/web"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.parse().unwrap())
    })
}

#[track_caller]
fn assert_sample(text: &str, series: &str, want: f64) {
    assert_eq!(
        sample(text, series),
        Some(want),
        "{series} in the metrics:\n{text}"
    );
}

/// Expects the proxy to reset the connection: no bytes and no clean EOF.
async fn expect_reset(service: SocketAddr) {
    let mut s = match TcpStream::connect(service).await {
        Ok(s) => s,
        // The kernel completed the handshake and the proxy's RST arrived
        // before the connect was reported: the reset shows up right here.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect to {service}: {e}"),
    };
    let mut buf = [0u8; 64];
    match s.read(&mut buf).await {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes / EOF"),
    }
}

#[test]
fn weighted_split_and_metrics_over_1000_connections() {
    run(async {
        let (target_port, endpoints) =
            bind_same_port(&["127.0.0.3", "127.0.0.4", "127.0.0.5"]).await;
        let mut tasks = JoinSet::new();
        for (l, id) in endpoints.into_iter().zip([3u8, 4, 5]) {
            spawn_endpoint(l, id, &mut tasks);
        }
        let listener = proxy::bind(format!("{SERVICE_IP}:0").parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = start(
            listener,
            &format!(
                "capture: {{ enabled: false }}
services:
  - name: web
    addresses: [{SERVICE_IP}]
    ports: [{{ port: {port}, target_port: {target_port} }}]
    balancing: {{ algorithm: round_robin }}
    endpoints:
      - {{ address: 127.0.0.3, weight: 60 }}
      - {{ address: 127.0.0.4, weight: 30 }}
      - {{ address: 127.0.0.5, weight: 10 }}
"
            ),
        );
        assert_eq!(
            proxy.service,
            format!("{SERVICE_IP}:{port}").parse().unwrap()
        );

        const CONNECTIONS: usize = 1000;
        const PARALLEL: usize = 50;
        let mut served: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut clients = JoinSet::new();
        let mut started = 0;
        while started < CONNECTIONS || !clients.is_empty() {
            while started < CONNECTIONS && clients.len() < PARALLEL {
                clients.spawn(ask(proxy.service));
                started += 1;
            }
            let answer = clients.join_next().await.unwrap().unwrap();
            *served.entry(answer).or_default() += 1;
        }

        let share = |id| served.get(&answer(id)).copied().unwrap_or(0);
        let (a, b, c) = (share(3), share(4), share(5));
        assert_eq!(
            a + b + c,
            CONNECTIONS,
            "every answer comes from one of the endpoints: {served:?}"
        );
        for (n, weight) in [(a, 60.0), (b, 30.0), (c, 10.0)] {
            let pct = n as f64 * 100.0 / CONNECTIONS as f64;
            assert!(
                (pct - weight).abs() <= 2.0,
                "split {a}/{b}/{c} is off the 60/30/10 weights"
            );
        }

        let metrics = proxy.shut_down().await;
        tasks.abort_all();
        let text = metrics.encode();
        let n = CONNECTIONS as f64;
        assert_sample(
            &text,
            r#"ferry_connections_opened_total{service="default/web"}"#,
            n,
        );
        assert_sample(
            &text,
            r#"ferry_connections_closed_total{service="default/web"}"#,
            n,
        );
        assert_sample(
            &text,
            r#"ferry_connections_active{service="default/web"}"#,
            0.0,
        );
        assert_sample(
            &text,
            r#"ferry_tcp_bytes_total{service="default/web",direction="upstream"}"#,
            n * REQUEST.len() as f64,
        );
        assert_sample(
            &text,
            r#"ferry_tcp_bytes_total{service="default/web",direction="downstream"}"#,
            n * answer(3).len() as f64,
        );
        assert!(
            !text.contains("ferry_connection_failures_total{"),
            "no connection failed:\n{text}"
        );
    })
}

#[test]
fn destination_that_is_not_a_service_is_reset_and_counted() {
    run(async {
        // The listener is at 127.0.0.2:Q but the only service is on another
        // port, so the destination is no service.
        let listener = proxy::bind(format!("{SERVICE_IP}:0").parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let other = if port == 65535 { 1 } else { port + 1 };
        let proxy = start(
            listener,
            &format!(
                "capture: {{ enabled: false }}
services:
  - name: web
    addresses: [{SERVICE_IP}]
    ports: [{{ port: {other} }}]
    endpoints: [{{ address: 127.0.0.3 }}]
"
            ),
        );
        expect_reset(proxy.service).await;
        expect_reset(proxy.service).await;

        let text = proxy.shut_down().await.encode();
        assert_sample(
            &text,
            r#"ferry_connection_failures_total{reason="unknown_service"}"#,
            2.0,
        );
        // It was never counted as a connection of any service.
        assert!(
            !text.contains("ferry_connections_opened_total{"),
            "no service connection was opened:\n{text}"
        );
    })
}

#[test]
fn service_without_endpoints_resets_and_counts() {
    run(async {
        let listener = proxy::bind(format!("{SERVICE_IP}:0").parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = start(
            listener,
            &format!(
                "capture: {{ enabled: false }}
services:
  - name: idle
    namespace: shop
    addresses: [{SERVICE_IP}]
    ports: [{{ port: {port} }}]
"
            ),
        );
        expect_reset(proxy.service).await;

        let text = proxy.shut_down().await.encode();
        assert_sample(
            &text,
            r#"ferry_connection_failures_total{reason="no_endpoints"}"#,
            1.0,
        );
        assert_sample(
            &text,
            r#"ferry_connections_opened_total{service="shop/idle"}"#,
            1.0,
        );
        assert_sample(
            &text,
            r#"ferry_connections_closed_total{service="shop/idle"}"#,
            1.0,
        );
        assert_sample(
            &text,
            r#"ferry_connections_active{service="shop/idle"}"#,
            0.0,
        );
    })
}

#[test]
fn refused_endpoint_resets_the_client_and_counts() {
    run(async {
        // A port nobody listens on: bind one, note it, close it.
        let dead_port = {
            let l = TcpListener::bind("127.0.0.6:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let listener = proxy::bind(format!("{SERVICE_IP}:0").parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = start(
            listener,
            &format!(
                "capture: {{ enabled: false }}
services:
  - name: web
    addresses: [{SERVICE_IP}]
    ports: [{{ port: {port}, target_port: {dead_port} }}]
    endpoints: [{{ address: 127.0.0.6 }}]
"
            ),
        );
        expect_reset(proxy.service).await;

        let text = proxy.shut_down().await.encode();
        assert_sample(
            &text,
            r#"ferry_connection_failures_total{reason="connect_failed"}"#,
            1.0,
        );
        assert_sample(
            &text,
            r#"ferry_connections_closed_total{service="default/web"}"#,
            1.0,
        );
    })
}
