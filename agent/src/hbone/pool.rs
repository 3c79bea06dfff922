//! The client side of the tunnel: pooled mutual-TLS HTTP/2 connections to
//! other nodes' Ferry.
//!
//! A connection is keyed by (source identity, destination node, destination
//! identity): the client presents the source pod's certificate and asks the
//! peer, by TLS server name, for the destination workload's; both are fixed
//! at the handshake, so a connection can only carry streams between that
//! pair. (Pods of a service on a node usually share one service account, so
//! in practice this is one connection per source identity and node.)
//! Up to `max_streams` streams share a connection; the next one opens
//! another connection. With pooling off, every stream gets its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::stream::{Slot, TunnelStream, Usage, now_ms};
use super::{CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, HboneError, MAX_FRAME, STREAM_WINDOW};
use crate::metrics::{DirectionLabels, HboneMetrics};
use crate::tls::{ALPN_H2, Identity, TlsContext, TlsError};

const OUTBOUND: DirectionLabels = DirectionLabels {
    direction: "outbound",
};

/// How the pool behaves.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Streams per connection before another connection is opened.
    pub max_streams: usize,
    /// Share connections between streams.
    pub pooling: bool,
    /// Upper bound on TCP connect, and on waiting for the peer's answer.
    pub connect_timeout: Duration,
    /// `SO_MARK` for the node-to-node sockets (0: none).
    pub bypass_mark: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    node: SocketAddr,
    peer: Identity,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    /// Streams open (or being opened) on this connection, and since when
    /// it has had none.
    usage: Arc<Usage>,
    /// Set when the connection has ended; it is then never chosen again.
    closed: Arc<AtomicBool>,
}

type Entry = Arc<tokio::sync::Mutex<Vec<Arc<Conn>>>>;

/// Pooled tunnel connections of one agent.
#[derive(Debug)]
pub struct Pool {
    tls: Arc<TlsContext>,
    metrics: Arc<HboneMetrics>,
    settings: PoolSettings,
    conns: Mutex<HashMap<PoolKey, Entry>>,
    next_id: AtomicU64,
}

impl Pool {
    pub fn new(tls: Arc<TlsContext>, metrics: Arc<HboneMetrics>, settings: PoolSettings) -> Pool {
        Pool {
            tls,
            metrics,
            settings,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// TLS connections open now (all keys); for tests and diagnostics.
    pub fn open_connections(&self) -> usize {
        let entries: Vec<Entry> = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        entries
            .iter()
            .map(|e| match e.try_lock() {
                Ok(list) => list
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .count(),
                Err(_) => 0,
            })
            .sum()
    }

    /// Closes pooled connections that have carried no stream for `max_idle`
    /// (their streams are all done, so nothing is cut); returns how many.
    pub fn close_idle(&self, max_idle: Duration) -> usize {
        let cutoff = now_ms().saturating_sub(max_idle.as_millis() as u64);
        let entries: Vec<(PoolKey, Entry)> = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let mut closed = 0;
        for (key, entry) in entries {
            // A key being dialled is busy, not idle.
            let Ok(mut list) = entry.try_lock() else {
                continue;
            };
            let before = list.len();
            list.retain(|c| {
                !c.closed.load(Ordering::Acquire)
                    && (c.usage.active.load(Ordering::Acquire) > 0
                        || c.usage.idle_since_ms.load(Ordering::Acquire) > cutoff)
            });
            closed += before - list.len();
            if list.is_empty() {
                drop(list);
                let mut map = self.conns.lock().unwrap_or_else(|e| e.into_inner());
                if map.get(&key).is_some_and(|e| Arc::ptr_eq(e, &entry))
                    && Arc::strong_count(&entry) <= 2
                {
                    map.remove(&key);
                }
            }
        }
        closed
    }

    /// Opens a stream to `target` (a pod on the node at `node`, which must
    /// present `peer`), on behalf of a pod with identity `source`.
    pub async fn connect(
        &self,
        source: &Identity,
        node: SocketAddr,
        peer: &Identity,
        target: SocketAddr,
    ) -> Result<TunnelStream, HboneError> {
        if !self.settings.pooling {
            let conn = self.dial(source, node, peer).await?;
            let slot = Slot::take(&conn.usage);
            return self.open_stream(&conn, target, slot).await;
        }
        let key = PoolKey {
            source: source.clone(),
            node,
            peer: peer.clone(),
        };
        let entry = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        // One retry: a pooled connection may have been closed by the peer
        // (GOAWAY, idle timeout) between our check and the request.
        for attempt in 0..2 {
            let (conn, slot) = {
                let mut list = entry.lock().await;
                list.retain(|c| !c.closed.load(Ordering::Acquire));
                let found = list
                    .iter()
                    .find(|c| c.usage.active.load(Ordering::Acquire) < self.settings.max_streams)
                    .cloned();
                let conn = match found {
                    Some(c) => c,
                    None => {
                        let c = self.dial(source, node, peer).await?;
                        list.push(c.clone());
                        c
                    }
                };
                let slot = Slot::take(&conn.usage);
                (conn, slot)
            };
            match self.open_stream(&conn, target, slot).await {
                Err(HboneError::Http2(e)) if attempt == 0 && (e.is_go_away() || e.is_io()) => {
                    debug!(conn = conn.id, error = %e, "pooled connection is gone; opening another");
                    conn.closed.store(true, Ordering::Release);
                }
                r => return r,
            }
        }
        Err(HboneError::Refused { status: 0, target })
    }

    async fn open_stream(
        &self,
        conn: &Conn,
        target: SocketAddr,
        slot: Slot,
    ) -> Result<TunnelStream, HboneError> {
        let timeout = self.settings.connect_timeout;
        let answer = async {
            let mut send = conn.send.clone().ready().await?;
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .body(())
                .map_err(|_| HboneError::Refused { status: 0, target })?;
            let (response, stream) = send.send_request(req, false)?;
            let response = response.await?;
            Ok::<_, HboneError>((response, stream))
        };
        let (response, send) = match tokio::time::timeout(timeout, answer).await {
            Ok(r) => r?,
            Err(_) => return Err(HboneError::Timeout { target, timeout }),
        };
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused {
                status: response.status().as_u16(),
                target,
            });
        }
        self.metrics.streams.get_or_create(&OUTBOUND).inc();
        Ok(TunnelStream::new(send, response.into_body(), Some(slot)))
    }

    async fn dial(
        &self,
        source: &Identity,
        node: SocketAddr,
        peer: &Identity,
    ) -> Result<Arc<Conn>, HboneError> {
        let tcp = connect_marked(
            node,
            self.settings.bypass_mark,
            self.settings.connect_timeout,
        )
        .await
        .map_err(|source| HboneError::Connect { node, source })?;
        let config = self.tls.client_config(source)?;
        let name = ServerName::try_from(peer.server_name())
            .map_err(|e| HboneError::Tls(TlsError::PeerIdentity(format!("server name: {e}"))))?;
        let handshake = TlsConnector::from(config).connect(name, tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                self.metrics
                    .handshake_failures
                    .get_or_create(&OUTBOUND)
                    .inc();
                return Err(HboneError::Handshake { node, source });
            }
            Err(_) => {
                self.metrics
                    .handshake_failures
                    .get_or_create(&OUTBOUND)
                    .inc();
                return Err(HboneError::Handshake {
                    node,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "handshake timed out",
                    ),
                });
            }
        };
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(HboneError::NoAlpn { node });
        }
        let peer_serial = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| crate::tls::verify::serial_of(c))
            .unwrap_or_default();
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tls)
            .await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let closed = Arc::new(AtomicBool::new(false));
        self.metrics.connections.get_or_create(&OUTBOUND).inc();
        let gauge: Gauge = self
            .metrics
            .connections_active
            .get_or_create(&OUTBOUND)
            .clone();
        gauge.inc();
        let done = closed.clone();
        info!(id, %node, src = %source, peer = %peer, peer_serial = %peer_serial, "tunnel connection open");
        let span = debug_span!("hbone_conn", id, %node, %source, %peer);
        tokio::spawn(
            async move {
                if let Err(e) = connection.await {
                    warn!(error = %e, "tunnel connection ended with an error");
                } else {
                    debug!("tunnel connection closed");
                }
                done.store(true, Ordering::Release);
                gauge.dec();
            }
            .instrument(span),
        );
        let usage = Arc::new(Usage::default());
        usage.idle_since_ms.store(now_ms(), Ordering::Release);
        Ok(Arc::new(Conn {
            id,
            send,
            usage,
            closed,
        }))
    }
}

/// A TCP connection with `SO_MARK` (so capture never redirects it).
pub async fn connect_marked(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if mark != 0 {
        socket2::SockRef::from(&sock).set_mark(mark)?;
    }
    sock.set_nodelay(true)?;
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}

/// Closes idle pooled connections every `max_idle / 2` until `stop` fires.
pub async fn run_idle_reaper(
    pool: Arc<Pool>,
    max_idle: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let every = (max_idle / 2).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let n = pool.close_idle(max_idle);
        if n > 0 {
            debug!(closed = n, "idle tunnel connections closed");
        }
    }
}
