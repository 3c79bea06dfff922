//! One tunnelled connection: an HTTP/2 CONNECT stream, and the relay
//! between it and a TCP socket ([`relay_until`]).
//!
//! * bytes are DATA frames. A read from the socket goes into the buffer
//!   that becomes the DATA payload, and a received payload is written to the
//!   socket from the buffer it arrived in: Ferry copies no payload itself
//!   (TLS encrypts and decrypts in place below). An idle stream holds no
//!   buffer: the socket is read only once it is readable;
//! * flow control is released once the socket has taken the bytes, so at
//!   most one window waits per direction, and the socket is not read again
//!   until the stream has the capacity for what was read;
//! * a FIN from the socket is END_STREAM, END_STREAM from the peer is a FIN
//!   (write shutdown) on the socket;
//! * a reset becomes RST_STREAM(CONNECT_ERROR) (RFC 9113 §8.5: a TCP reset
//!   is signalled that way), and RST_STREAM from the peer an error of kind
//!   `ConnectionReset`, which the relay turns back into a TCP reset.

use std::future::{Future, poll_fn};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::net::TcpStream;

use crate::proxy::lean::{pass_fin, write_all};
use crate::proxy::relay::{Ending, Observe, Outcome, PumpError, reset, settle};

/// Stream accounting of one tunnel connection.
#[derive(Debug, Default)]
pub struct Usage {
    /// Streams open (or being opened).
    pub active: AtomicUsize,
    /// When the last stream ended, in milliseconds since [`epoch`].
    pub idle_since_ms: AtomicU64,
}

/// The reference point of [`Usage::idle_since_ms`].
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`].
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Holds one stream slot of a connection; released when the stream ends.
#[derive(Debug)]
pub struct Slot(Arc<Usage>);

impl Slot {
    pub fn take(usage: &Arc<Usage>) -> Slot {
        usage.active.fetch_add(1, Ordering::AcqRel);
        Slot(usage.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_since_ms.store(now_ms(), Ordering::Release);
        }
    }
}

/// A CONNECT stream, either side of the tunnel.
#[derive(Debug)]
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    ended: bool,
    _slot: Option<Slot>,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<Slot>) -> TunnelStream {
        TunnelStream {
            send,
            recv,
            ended: false,
            _slot: slot,
        }
    }
}

/// Maps an HTTP/2 error to the I/O error the relay understands: a stream
/// reset (or the connection going away) is `ConnectionReset`.
pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::new(io::ErrorKind::ConnectionReset, "tunnel I/O error"),
        }
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl TunnelStream {
    /// Ends the stream with RST_STREAM(CONNECT_ERROR): RFC 9113 §8.5's
    /// signal for a TCP reset.
    fn abort(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        // Dropped before our END_STREAM (a task cancelled at the drain
        // deadline): the peer must see a reset, not a stream left open.
        if !self.ended {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

/// Which side of the relay the TCP socket is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpRole {
    /// Ferry's outbound side: the captured client socket; the tunnel leads
    /// to the endpoint.
    Client,
    /// The inbound side: the local pod's socket is the endpoint; the tunnel
    /// carries the client.
    Endpoint,
}

/// Bytes read from the socket at once; one read becomes one DATA payload
/// (split into frames of the peer's maximum frame size, and TLS records,
/// below).
const READ_CHUNK: usize = 64 * 1024;

/// How long a read buffer is kept after the socket ran dry: long enough to
/// serve the next message of a busy connection from the same allocation,
/// short enough that an idle connection holds none.
const KEEP_BUFFER: Duration = Duration::from_millis(5);

/// Socket → tunnel. Reads straight into the buffer that becomes the DATA
/// payload (no copy in Ferry) and does not read again until HTTP/2 flow
/// control has taken all of it. The buffer is reused from one read to the
/// next once the tunnel has sent what it held (a 64 KiB allocation per read
/// would make the allocator hand pages back and fault them in again), and
/// dropped when the socket has been quiet for [`KEEP_BUFFER`].
async fn socket_to_tunnel(
    from: &TcpStream,
    send: &mut SendStream<Bytes>,
    ended: &mut bool,
    count: &mut u64,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), PumpError> {
    let mut spare: Option<BytesMut> = None;
    loop {
        if spare.is_some()
            && tokio::time::timeout(KEEP_BUFFER, from.readable())
                .await
                .is_err()
        {
            spare = None;
        }
        if spare.is_none() {
            from.readable().await.map_err(PumpError::Read)?;
        }
        let mut buf = spare.take().unwrap_or_default();
        buf.reserve(READ_CHUNK);
        match from.try_read_buf(&mut buf) {
            Ok(0) => {
                *ended = true;
                return send
                    .send_data(Bytes::new(), true)
                    .map_err(|e| PumpError::Write(h2_io(e)));
            }
            Ok(n) => {
                let mut data = buf.split().freeze();
                spare = Some(buf);
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    let granted = poll_fn(|cx| poll_granted(send, cx))
                        .await
                        .map_err(PumpError::Write)?;
                    let part = data.split_to(granted.min(data.len()));
                    send.send_data(part, false)
                        .map_err(|e| PumpError::Write(h2_io(e)))?;
                }
                *count += n as u64;
                on_bytes(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => spare = Some(buf),
            Err(e) => return Err(PumpError::Read(e)),
        }
    }
}

/// Waits until the stream has send capacity and says how much.
fn poll_granted(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    loop {
        let c = send.capacity();
        if c > 0 {
            return Poll::Ready(Ok(c));
        }
        match ready!(send.poll_capacity(cx)) {
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "tunnel stream closed",
                )));
            }
            Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            Some(Ok(_)) => {}
        }
    }
}

/// Tunnel → socket: each DATA payload is written from the buffer HTTP/2
/// received it in (no copy in Ferry); its flow-control window is released
/// once the socket has taken it, so at most one window waits per stream.
async fn tunnel_to_socket(
    recv: &mut RecvStream,
    to: &TcpStream,
    count: &mut u64,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), PumpError> {
    loop {
        match poll_fn(|cx| recv.poll_data(cx)).await {
            None => return pass_fin(to), // END_STREAM: a FIN
            Some(Err(e)) => return Err(PumpError::Read(h2_io(e))),
            Some(Ok(data)) => {
                let n = data.len();
                write_all(to, &data).await?;
                let _ = recv.flow_control().release_capacity(n);
                *count += n as u64;
                on_bytes(n as u64);
            }
        }
    }
}

/// Relays between a TCP socket and a tunnel stream until both directions are
/// finished or one side resets; when `abort` completes first both sides are
/// reset. The TCP semantics of [`crate::proxy::relay`] hold: a FIN is
/// END_STREAM, a reset is RST_STREAM, half-close keeps the other direction
/// flowing.
pub async fn relay_until(
    tcp: TcpStream,
    mut tunnel: TunnelStream,
    role: TcpRole,
    observe: &dyn Observe,
    abort: impl Future<Output = ()>,
) -> Outcome {
    let mut up = 0u64;
    let mut down = 0u64;
    let mut error = None;
    let ending = {
        let on_up = |n| observe.upstream(n);
        let on_down = |n| observe.downstream(n);
        let TunnelStream {
            send, recv, ended, ..
        } = &mut tunnel;
        match role {
            TcpRole::Client => {
                let upstream = socket_to_tunnel(&tcp, send, ended, &mut up, &on_up);
                let downstream = tunnel_to_socket(recv, &tcp, &mut down, &on_down);
                settle(upstream, downstream, abort, &mut error).await
            }
            TcpRole::Endpoint => {
                let upstream = tunnel_to_socket(recv, &tcp, &mut up, &on_up);
                let downstream = socket_to_tunnel(&tcp, send, ended, &mut down, &on_down);
                settle(upstream, downstream, abort, &mut error).await
            }
        }
    };
    let tcp_reset = || reset(&tcp);
    match (ending, role) {
        (Ending::Clean, _) => {}
        (Ending::ClientReset, TcpRole::Client) | (Ending::EndpointReset, TcpRole::Endpoint) => {
            tunnel.abort()
        }
        (Ending::ClientReset, TcpRole::Endpoint) | (Ending::EndpointReset, TcpRole::Client) => {
            tcp_reset()
        }
        (Ending::Aborted, _) => {
            tunnel.abort();
            tcp_reset();
        }
    }
    Outcome {
        upstream_bytes: up,
        downstream_bytes: down,
        ending,
        error,
    }
}
