//! The server side of the tunnel (port 15008): mutual TLS, then HTTP/2
//! CONNECT streams, each authorized and relayed to a pod on this node.
//!
//! A stream is served only when all hold:
//! * the client's certificate chains to the trust bundle and carries a
//!   SPIFFE identity of our trust domain (else the handshake fails);
//! * the request is `CONNECT IP:PORT` ([`super::parse_connect`]);
//! * the target is a pod of this node, and its identity is the one the
//!   client asked this node to present (the TLS server name), so a
//!   connection opened for one workload cannot reach another;
//! * the authorization policy allows the client's identity on that port.
//!
//! A refused stream gets `403` (counted in `ferry_authorization_denied_total`
//! by reason, logged once); a pod that cannot be reached gets `503`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::policy::{Denial, authorize};
use super::pool::connect_marked;
use super::stream::{TcpRole, TunnelStream};
use super::{CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, HboneError, MAX_FRAME, STREAM_WINDOW};
use crate::metrics::{DenyLabels, DirectionLabels, HboneMetrics};
use crate::proxy::relay;
use crate::state::State;
use crate::tls::{Identity, TlsContext, verify};

const INBOUND: DirectionLabels = DirectionLabels {
    direction: "inbound",
};

/// Binds the inbound listener. A `[::]` address is made dual-stack.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, HboneError> {
    crate::proxy::bind(addr).map_err(|e| match e {
        crate::proxy::ProxyError::Bind { addr, source } => HboneError::Bind { addr, source },
    })
}

/// What the inbound side needs.
#[derive(Debug)]
pub struct Inbound {
    pub tls: Arc<TlsContext>,
    pub state: Arc<State>,
    pub metrics: Arc<HboneMetrics>,
    /// `SO_MARK` on connections to pods: STRICT mode lets only these through.
    pub bypass_mark: u32,
    pub connect_timeout: Duration,
    pub max_streams: u32,
}

impl Inbound {
    /// Accepts until `stop` fires; connections and streams run on `tracker`
    /// and end at once when `kill` fires.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tracker: TaskTracker,
        stop: CancellationToken,
        kill: CancellationToken,
    ) {
        let next = AtomicU64::new(0);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "inbound accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let id = next.fetch_add(1, Ordering::Relaxed) + 1;
            let span = info_span!("hbone_in", id, peer = %peer, src = tracing::field::Empty);
            let this = self.clone();
            let kill = kill.clone();
            let t = tracker.clone();
            tracker.spawn(
                async move {
                    tokio::select! {
                        _ = this.handle_connection(tcp, t, kill.clone()) => {}
                        _ = kill.cancelled() => debug!("closed at drain deadline"),
                    }
                }
                .instrument(span),
            );
        }
        debug!("inbound listener closed");
    }

    async fn handle_connection(
        self: &Arc<Self>,
        tcp: tokio::net::TcpStream,
        tracker: TaskTracker,
        kill: CancellationToken,
    ) {
        let acceptor = TlsAcceptor::from(self.tls.server_config());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics
                    .handshake_failures
                    .get_or_create(&INBOUND)
                    .inc();
                warn!(error = %e, "TLS handshake failed; peer refused");
                return;
            }
            Err(_) => {
                self.metrics
                    .handshake_failures
                    .get_or_create(&INBOUND)
                    .inc();
                warn!("TLS handshake timed out");
                return;
            }
        };
        let (_, conn) = tls.get_ref();
        let td = self.tls.trust_domain();
        let peer_serial = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| verify::serial_of(c))
            .unwrap_or_default();
        let source = match conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| verify::identity_of(c, td))
        {
            Some(Ok(id)) => id,
            Some(Err(e)) => {
                self.metrics
                    .handshake_failures
                    .get_or_create(&INBOUND)
                    .inc();
                warn!(error = %e, "client certificate has no usable identity; refused");
                return;
            }
            None => {
                self.metrics
                    .handshake_failures
                    .get_or_create(&INBOUND)
                    .inc();
                warn!("no client certificate; refused");
                return;
            }
        };
        let Some(local) = conn
            .server_name()
            .and_then(|n| Identity::from_server_name(n, td).ok())
        else {
            // The certificate resolver only answers for such names.
            warn!("handshake without an identity server name; refused");
            return;
        };
        tracing::Span::current().record("src", tracing::field::display(&source));
        self.metrics.connections.get_or_create(&INBOUND).inc();
        let active = self
            .metrics
            .connections_active
            .get_or_create(&INBOUND)
            .clone();
        active.inc();
        info!(local = %local, peer_serial = %peer_serial, "tunnel connection accepted");
        if let Err(e) = self
            .clone()
            .serve_h2(tls, source, local, tracker, kill)
            .await
        {
            debug!(error = %e, "tunnel connection ended with an error");
        }
        active.dec();
    }

    /// Serves HTTP/2 CONNECT streams on an authenticated connection:
    /// `source` is the client's verified identity, `local` the identity
    /// this node presented.
    pub async fn serve_h2<IO>(
        self: Arc<Self>,
        io: IO,
        source: Identity,
        local: Identity,
        tracker: TaskTracker,
        kill: CancellationToken,
    ) -> Result<(), HboneError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut h2 = h2::server::Builder::new()
            .max_concurrent_streams(self.max_streams)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(io)
            .await?;
        let source = Arc::new(source);
        let local = Arc::new(local);
        while let Some(next) = h2.accept().await {
            let (request, respond) = next?;
            let this = self.clone();
            let source = source.clone();
            let local = local.clone();
            let kill = kill.clone();
            let span = info_span!(
                "stream",
                target = tracing::field::Empty,
                stream = ?respond.stream_id()
            );
            tracker.spawn(
                async move {
                    this.handle_stream(request, respond, &source, &local, &kill)
                        .await
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    fn deny(&self, respond: &mut SendResponse<Bytes>, source: &Identity, denial: Denial) {
        self.metrics
            .denied
            .get_or_create(&DenyLabels {
                reason: denial.reason(),
            })
            .inc();
        warn!(src = %source, reason = denial.reason(), "tunnel stream denied");
        reply(respond, StatusCode::FORBIDDEN);
    }

    async fn handle_stream(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        source: &Identity,
        local: &Identity,
        kill: &CancellationToken,
    ) {
        let target = match super::parse_connect(request.method(), request.uri()) {
            Ok(t) => t,
            Err(e) => {
                debug!(error = %e, "bad tunnel request");
                self.deny(&mut respond, source, Denial::BadRequest);
                return;
            }
        };
        tracing::Span::current().record("target", tracing::field::display(target));
        let snapshot = self.state.load();
        let Some(dest) = snapshot.workload(target.ip()) else {
            self.deny(&mut respond, source, Denial::UnknownDestination);
            return;
        };
        if dest != local {
            self.deny(&mut respond, source, Denial::IdentityMismatch);
            return;
        }
        if let Err(d) = authorize(snapshot.authorization(), source, target.port()) {
            self.deny(&mut respond, source, d);
            return;
        }
        drop(snapshot);
        let connect = connect_marked(target, self.bypass_mark, self.connect_timeout);
        let pod = match tokio::select! {
            r = connect => r,
            () = kill.cancelled() => {
                debug!("reset at drain deadline while connecting");
                return;
            }
        } {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "connect to local pod failed");
                reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "client went away before the answer");
                relay::reset(&pod);
                return;
            }
        };
        self.metrics.streams.get_or_create(&INBOUND).inc();
        let tunnel = TunnelStream::new(send, request.into_body(), None);
        // At the drain deadline both sides are reset (RST_STREAM and a TCP
        // reset), never closed as if complete.
        let out =
            super::stream::relay_until(pod, tunnel, TcpRole::Endpoint, &(), kill.cancelled()).await;
        info!(
            src = %source,
            upstream_bytes = out.upstream_bytes,
            downstream_bytes = out.downstream_bytes,
            ending = ?out.ending,
            "tunnel stream closed"
        );
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut r = Response::new(());
    *r.status_mut() = status;
    let _ = respond.send_response(r, true);
}
