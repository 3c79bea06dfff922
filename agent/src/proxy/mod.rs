//! The outbound listener: accept a captured connection, find where it was
//! going, pick an endpoint by weight, connect, relay.

pub mod lean;
pub mod original_dst;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::balance::{BalanceMetrics, ConnectFailure, ServiceLabel};
use crate::capture::Capture;
use crate::metrics::{BytesLabels, ErrorLabels, ProxyMetrics, ServiceLabels};
use crate::state::State;

/// Errors of the proxy module.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot bind the outbound listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Why a connection could not be served; the `reason` label of
/// `ferry_connection_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No record of where the connection was going.
    NoOriginalDestination,
    /// The original destination is not (or no longer) a service.
    UnknownService,
    /// The service has no endpoints.
    NoEndpoints,
    /// The endpoint refused, was unreachable, or timed out.
    ConnectFailed,
    /// The destination lookup itself failed.
    LookupError,
    /// The endpoint is on another node and the client pod has no workload
    /// identity (Ferry never tunnels under a node-wide identity).
    NoSourceIdentity,
    /// The tunnel to the endpoint's node failed or the peer refused the
    /// stream (on the last attempt).
    TunnelFailed,
    /// The endpoint's node refused the client's identity (authorization):
    /// not the endpoint's fault, so no other endpoint is tried.
    DeniedByPeer,
}

impl Failure {
    pub fn reason(self) -> &'static str {
        match self {
            Failure::NoOriginalDestination => "no_original_destination",
            Failure::UnknownService => "unknown_service",
            Failure::NoEndpoints => "no_endpoints",
            Failure::ConnectFailed => "connect_failed",
            Failure::LookupError => "lookup_error",
            Failure::NoSourceIdentity => "no_source_identity",
            Failure::TunnelFailed => "tunnel_failed",
            Failure::DeniedByPeer => "denied_by_peer",
        }
    }
}

/// How the proxy learns a connection's original destination. Both ways
/// fall back to netfilter's record (`SO_ORIGINAL_DST`) for a connection
/// sent to Ferry by iptables `REDIRECT`/`DNAT` instead of eBPF capture.
#[derive(Debug, Clone)]
pub enum Destinations {
    /// From the eBPF capture's connection map.
    Ebpf(Arc<Capture>),
    /// The connection was sent to the address it wanted (the local address
    /// is the destination): for a listener bound to a service address.
    LocalAddress,
}

impl Destinations {
    fn original(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<SocketAddr>, Failure> {
        let netfilter = || match original_dst::original_dst(stream, local) {
            Ok(o) => Ok(o),
            Err(e) => {
                warn!(error = %e, "original destination lookup failed");
                Err(Failure::LookupError)
            }
        };
        match self {
            Destinations::Ebpf(c) => match c.take_original(peer) {
                Ok(Some(o)) => Ok(Some(o.dst)),
                Ok(None) => netfilter(),
                Err(e) => {
                    warn!(error = %e, "original destination lookup failed");
                    Err(Failure::LookupError)
                }
            },
            Destinations::LocalAddress => Ok(Some(netfilter()?.unwrap_or(local))),
        }
    }
}

/// Connection ids, shared by every accept loop.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What every connection task needs.
#[derive(Debug)]
pub struct Proxy {
    pub state: Arc<State>,
    pub metrics: Arc<ProxyMetrics>,
    pub destinations: Destinations,
    /// `SO_MARK` for upstream sockets (0: none).
    pub bypass_mark: u32,
    pub balance_metrics: Arc<BalanceMetrics>,
    /// The HBONE client, for endpoints on other mesh nodes (`None`: such
    /// endpoints cannot be reached and count as failed attempts).
    pub tunnel: Option<Arc<crate::hbone::pool::Pool>>,
    /// How payload is moved on plaintext legs (`proxy.zero_copy`).
    pub relay_mode: lean::Mode,
    /// In-kernel socket joining for direct plaintext legs
    /// (`proxy.socket_join`, when the kernel supports it): the capture that
    /// loaded the join programs.
    pub socket_join: Option<Arc<Capture>>,
}

/// Where a connection goes once an endpoint is picked.
enum Upstream {
    Direct(TcpStream),
    Tunnel(Box<crate::hbone::stream::TunnelStream>),
}

/// Why one connect attempt failed.
enum AttemptError {
    /// A direct or tunnel failure, as an I/O error for the failover policy.
    Io { error: std::io::Error, tunnel: bool },
    /// The client has no identity to tunnel with: no endpoint will do.
    NoIdentity,
    /// The peer node's policy refused the client's identity (403).
    Denied(crate::hbone::HboneError),
}

/// Binds the outbound listener. A `[::]` address is made dual-stack.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    bind_one(addr, false)
}

/// Binds `n` (at least one) outbound listeners on the same address and port
/// with `SO_REUSEPORT`: the kernel spreads new connections over them by flow
/// hash, so each worker thread's accept loop gets its share instead of one
/// loop accepting for all. Port 0 picks one port for all of them.
pub fn bind_many(addr: SocketAddr, n: usize) -> Result<Vec<TcpListener>, ProxyError> {
    let first = bind_one(addr, true)?;
    let port = first
        .local_addr()
        .map_err(|source| ProxyError::Bind { addr, source })?
        .port();
    let mut all = vec![first];
    let same = SocketAddr::new(addr.ip(), port);
    for _ in 1..n.max(1) {
        all.push(bind_one(same, true)?);
    }
    Ok(all)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> Result<TcpListener, ProxyError> {
    let err = |source| ProxyError::Bind { addr, source };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).map_err(err)?;
    }
    sock.set_reuse_address(true).map_err(err)?;
    if reuse_port {
        sock.set_reuse_port(true).map_err(err)?;
    }
    sock.set_nonblocking(true).map_err(err)?;
    sock.set_tcp_nodelay(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(4096).map_err(err)?;
    TcpListener::from_std(sock.into()).map_err(err)
}

impl Proxy {
    /// Accepts until `stop` fires; every connection runs on `tracker`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tracker: TaskTracker,
        stop: CancellationToken,
        kill: CancellationToken,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly rather than spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let span = info_span!(
                "conn",
                id,
                client = %peer,
                dst = tracing::field::Empty,
                service = tracing::field::Empty,
                endpoint = tracing::field::Empty,
            );
            let this = self.clone();
            let kill = kill.clone();
            tracker
                .spawn(async move { this.handle(id, stream, peer, &kill).await }.instrument(span));
        }
        debug!("outbound listener closed");
    }

    fn fail(&self, f: Failure) {
        self.metrics
            .failures
            .get_or_create(&ErrorLabels { reason: f.reason() })
            .inc();
    }

    /// Serves one connection; when `kill` fires (the drain deadline) it is
    /// reset on both sides.
    async fn handle(&self, id: u64, client: TcpStream, peer: SocketAddr, kill: &CancellationToken) {
        let span = tracing::Span::current();
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "connection gone before it was handled");
                return;
            }
        };
        let dst = match self.destinations.original(&client, peer, local) {
            Ok(Some(d)) => d,
            Ok(None) => {
                warn!("no original destination recorded for this connection; closing it");
                self.fail(Failure::NoOriginalDestination);
                relay::reset(&client);
                return;
            }
            Err(f) => {
                self.fail(f);
                relay::reset(&client);
                return;
            }
        };
        span.record("dst", tracing::field::display(dst));
        let snapshot = self.state.load();
        let Some(target) = snapshot.lookup(dst) else {
            warn!("destination is not a known service; closing");
            self.fail(Failure::UnknownService);
            relay::reset(&client);
            return;
        };
        let svc = target.service;
        span.record("service", svc.key.as_str());
        let labels = ServiceLabels {
            service: svc.key.clone(),
        };
        self.metrics.opened.get_or_create(&labels).inc();
        let active = self.metrics.active.get_or_create(&labels).clone();
        active.inc();
        let _closed = OnDrop(|| {
            active.dec();
            self.metrics.closed.get_or_create(&labels).inc();
        });

        let balancer = &target.port.balancer;
        let Some(set) = balancer.choose_set() else {
            warn!("service has no backend sets; closing");
            self.fail(Failure::NoEndpoints);
            relay::reset(&client);
            return;
        };
        // Connect failover: each attempt to a different endpoint, within the
        // per-attempt timeout and the overall budget, before any byte is
        // read from the client.
        let fo = balancer.policy.failover;
        let deadline = Instant::now() + fo.budget;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut connected = None;
        let mut last_was_tunnel = false;
        for attempt in 0..fo.max_connect_attempts {
            let Some(member) = set.pick(&tried) else {
                break;
            };
            let addr = member.stats.addr;
            tried.push(addr);
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if attempt > 0 {
                self.balance_metrics
                    .retries
                    .get_or_create(&ServiceLabel {
                        service: svc.key.clone(),
                    })
                    .inc();
            }
            member.stats.on_attempt();
            let timeout = fo.connect_timeout.min(deadline - now);
            let result = tokio::select! {
                r = self.connect_upstream(addr, timeout, &snapshot, peer) => r,
                () = kill.cancelled() => {
                    debug!("reset at drain deadline while connecting");
                    relay::reset(&client);
                    return;
                }
            };
            match result {
                Ok(stream) => {
                    set.report_success(&member, now.elapsed());
                    connected = Some((stream, member));
                    break;
                }
                Err(AttemptError::NoIdentity) => {
                    warn!(
                        endpoint = %addr,
                        "endpoint is on another node and the client is not a known workload (no identity to tunnel with); resetting"
                    );
                    self.fail(Failure::NoSourceIdentity);
                    relay::reset(&client);
                    return;
                }
                Err(AttemptError::Denied(e)) => {
                    // Authorization is about the client, not the endpoint:
                    // no failover, and the endpoint's record stays clean.
                    warn!(endpoint = %addr, error = %e, "the endpoint's node denied this client; resetting");
                    self.fail(Failure::DeniedByPeer);
                    relay::reset(&client);
                    return;
                }
                Err(AttemptError::Io { error: e, tunnel }) => {
                    last_was_tunnel = tunnel;
                    let why = ConnectFailure::classify(&e);
                    warn!(attempt = attempt + 1, endpoint = %addr, reason = why.reason(), tunnel, error = %e, "connect failed");
                    set.report_failure(&member, why);
                }
            }
        }
        let Some((upstream, member)) = connected else {
            warn!(
                attempts = tried.len(),
                "no endpoint could be connected; resetting the client"
            );
            self.balance_metrics
                .exhausted
                .get_or_create(&ServiceLabel {
                    service: svc.key.clone(),
                })
                .inc();
            self.fail(if tried.is_empty() {
                Failure::NoEndpoints
            } else if last_was_tunnel {
                Failure::TunnelFailed
            } else {
                Failure::ConnectFailed
            });
            relay::reset(&client);
            return;
        };
        span.record("endpoint", tracing::field::display(member.stats.addr));
        let _active = member.stats.begin();
        // One statement per family access: prometheus-client hands out a read
        // guard that lives until the end of the statement, and a second
        // get_or_create in the same statement would wait on it forever.
        let up = self
            .metrics
            .bytes
            .get_or_create(&BytesLabels {
                service: svc.key.clone(),
                direction: "upstream",
            })
            .clone();
        let down = self
            .metrics
            .bytes
            .get_or_create(&BytesLabels {
                service: svc.key.clone(),
                direction: "downstream",
            })
            .clone();
        let observe = ByteCounters { up, down };
        let out = match upstream {
            Upstream::Direct(s) => {
                // Plaintext on both sides: join the client's socket to the
                // upstream one in the kernel if we can. The guard lives
                // until the relay has finished with both sockets.
                let join = self
                    .socket_join
                    .as_ref()
                    .and_then(|c| c.join_begin(id, peer, local, &s));
                match &join {
                    Some(guard) => {
                        debug!("socket join installed");
                        let observe = Joined {
                            inner: &observe,
                            guard,
                        };
                        lean::relay_until(client, s, &observe, kill.cancelled(), self.relay_mode)
                            .await
                    }
                    None => {
                        lean::relay_until(client, s, &observe, kill.cancelled(), self.relay_mode)
                            .await
                    }
                }
            }
            Upstream::Tunnel(t) => {
                crate::hbone::stream::relay_until(
                    client,
                    *t,
                    crate::hbone::stream::TcpRole::Client,
                    &observe,
                    kill.cancelled(),
                )
                .await
            }
        };
        info!(
            upstream_bytes = out.upstream_bytes,
            downstream_bytes = out.downstream_bytes,
            ending = ?out.ending,
            error = ?out.error,
            "connection closed"
        );
    }

    /// Connects to an endpoint: directly, or through the tunnel when it is
    /// a pod on another mesh node (under the identity of the client pod,
    /// found by its address `peer`).
    async fn connect_upstream(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        snapshot: &crate::state::Snapshot,
        peer: SocketAddr,
    ) -> Result<Upstream, AttemptError> {
        let Some(route) = snapshot.route(addr.ip()) else {
            return self
                .connect(addr, timeout)
                .await
                .map(Upstream::Direct)
                .map_err(|error| AttemptError::Io {
                    error,
                    tunnel: false,
                });
        };
        let tunnel_err = |error| AttemptError::Io {
            error,
            tunnel: true,
        };
        let Some(pool) = &self.tunnel else {
            return Err(tunnel_err(std::io::Error::other(
                "endpoint is on another node and no tunnel is configured",
            )));
        };
        let Some(source) = snapshot.workload(peer.ip()) else {
            return Err(AttemptError::NoIdentity);
        };
        match tokio::time::timeout(
            timeout,
            pool.connect(source, route.node_addr, &route.identity, addr),
        )
        .await
        {
            Ok(Ok(t)) => Ok(Upstream::Tunnel(Box::new(t))),
            Ok(Err(e @ crate::hbone::HboneError::Refused { status: 403, .. })) => {
                Err(AttemptError::Denied(e))
            }
            Ok(Err(e)) => {
                debug!(node = %route.node, src = %source, error = %e, "tunnel attempt failed");
                Err(tunnel_err(e.into_io()))
            }
            Err(_) => Err(tunnel_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "tunnel to node {} gave no answer within {timeout:?}",
                    route.node
                ),
            ))),
        }
    }

    /// Connects to an endpoint with Ferry's bypass mark, so capture never
    /// redirects Ferry's own connections.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if self.bypass_mark != 0 {
            socket2::SockRef::from(&sock).set_mark(self.bypass_mark)?;
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
}

struct ByteCounters {
    up: prometheus_client::metrics::counter::Counter,
    down: prometheus_client::metrics::counter::Counter,
}

impl relay::Observe for ByteCounters {
    fn upstream(&self, n: u64) {
        self.up.inc_by(n);
    }
    fn downstream(&self, n: u64) {
        self.down.inc_by(n);
    }
}

/// Byte counting for a joined connection: every byte relayed client →
/// upstream also advances the join record, which is what lets the kernel
/// switch the client's socket over once nothing is in flight.
struct Joined<'a> {
    inner: &'a ByteCounters,
    guard: &'a crate::capture::JoinGuard<'a>,
}

impl relay::Observe for Joined<'_> {
    fn upstream(&self, n: u64) {
        self.inner.upstream(n);
        self.guard.forwarded(n);
    }
    fn downstream(&self, n: u64) {
        self.inner.downstream(n);
    }
}

struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
