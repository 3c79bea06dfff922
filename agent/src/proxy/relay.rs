//! The byte relay between a client and its endpoint.
//!
//! TCP semantics are carried across the proxy, not approximated:
//! * a FIN stays a FIN: when one side finishes sending, Ferry shuts down its
//!   write side toward the other and keeps relaying the opposite direction
//!   (a client that half-closes still receives the whole response);
//! * a reset stays a reset: when one side resets (or a write to it fails),
//!   Ferry aborts the other side with RST (`SO_LINGER` 0), so an endpoint
//!   crash is never reported to the client as a clean end of stream;
//! * a connection Ferry gives up on (the drain deadline) is reset on both
//!   sides: a FIN would tell each side that the other finished, and a
//!   truncated request or response would pass for a complete one.
//!
//! Either side may be a TCP socket or anything else that implements
//! [`Peer`]: the HBONE tunnel's HTTP/2 stream maps a FIN to END_STREAM and a
//! reset to RST_STREAM, so the same rules hold across nodes.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

/// One side of a relay: a byte stream that splits into a read and a write
/// half (used concurrently) and can be aborted.
pub trait Peer: Send {
    type Read<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    /// The two halves; `shutdown` on the write half sends a FIN (or its
    /// equivalent), a read of 0 bytes is the peer's FIN, and a read error
    /// is the peer's reset.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
    /// Ends the stream with a reset instead of a FIN (takes effect when the
    /// peer is dropped, or at once).
    fn abort(&mut self);
}

impl Peer for TcpStream {
    type Read<'a> = ReadHalf<'a>;
    type Write<'a> = WriteHalf<'a>;
    fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        self.split()
    }
    fn abort(&mut self) {
        reset(self)
    }
}

/// Bytes per direction read at once.
pub const BUF_SIZE: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Both directions finished with FIN.
    Clean,
    /// The client reset or failed; the endpoint was reset.
    ClientReset,
    /// The endpoint reset or failed; the client was reset.
    EndpointReset,
    /// Ferry stopped the relay (the drain deadline); both sides were reset.
    Aborted,
}

/// What a relay moved and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Client to endpoint.
    pub upstream_bytes: u64,
    /// Endpoint to client.
    pub downstream_bytes: u64,
    pub ending: Ending,
    /// The error behind a reset ending.
    pub error: Option<io::ErrorKind>,
}

/// Observes bytes as they move (for live metrics).
pub trait Observe: Send + Sync {
    fn upstream(&self, n: u64);
    fn downstream(&self, n: u64);
}

impl Observe for () {
    fn upstream(&self, _: u64) {}
    fn downstream(&self, _: u64) {}
}

pub(crate) enum PumpError {
    /// Reading the source failed (it reset).
    Read(io::Error),
    /// Writing the sink failed (it reset or went away).
    Write(io::Error),
}

async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    count: &mut u64,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), PumpError> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await.map_err(PumpError::Read)?;
        if n == 0 {
            // FIN from the source: pass it on, keep the other direction open.
            to.shutdown().await.map_err(PumpError::Write)?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(PumpError::Write)?;
        *count += n as u64;
        on_bytes(n as u64);
    }
}

/// Aborts a connection with RST instead of FIN.
pub fn reset(stream: &TcpStream) {
    // Ignore failure: the socket may already be gone, and then there is
    // nothing left to reset.
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Runs both directions' pumps until both have finished (`Clean`), one
/// fails, or `abort` completes, and says how the connection ended; the
/// failing side's error kind goes to `error`. A failed read means its source
/// reset; a failed write means the sink reset or went away. Shared by this
/// relay and [`super::lean`].
pub(crate) async fn settle(
    upstream: impl Future<Output = Result<(), PumpError>>,
    downstream: impl Future<Output = Result<(), PumpError>>,
    abort: impl Future<Output = ()>,
    error: &mut Option<io::ErrorKind>,
) -> Ending {
    tokio::pin!(upstream, downstream, abort);
    let mut up_done = false;
    let mut down_done = false;
    loop {
        tokio::select! {
            r = &mut upstream, if !up_done => match r {
                Ok(()) => up_done = true,
                // The client reset, or the endpoint stopped taking data.
                Err(PumpError::Read(e)) => { *error = Some(e.kind()); return Ending::ClientReset }
                Err(PumpError::Write(e)) => { *error = Some(e.kind()); return Ending::EndpointReset }
            },
            r = &mut downstream, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(PumpError::Read(e)) => { *error = Some(e.kind()); return Ending::EndpointReset }
                Err(PumpError::Write(e)) => { *error = Some(e.kind()); return Ending::ClientReset }
            },
            () = &mut abort => return Ending::Aborted,
        }
        if up_done && down_done {
            return Ending::Clean;
        }
    }
}

/// Relays until both directions are finished or one side resets; consumes
/// both streams (they are closed, or reset, on return).
pub async fn relay<C: Peer, E: Peer>(client: C, endpoint: E, observe: &dyn Observe) -> Outcome {
    relay_until(client, endpoint, observe, std::future::pending()).await
}

/// [`relay`], but when `abort` completes first, both sides are reset and the
/// relay ends with [`Ending::Aborted`].
pub async fn relay_until<C: Peer, E: Peer>(
    mut client: C,
    mut endpoint: E,
    observe: &dyn Observe,
    abort: impl std::future::Future<Output = ()>,
) -> Outcome {
    let mut up = 0u64;
    let mut down = 0u64;
    let mut error = None;
    let ending = {
        let (mut cr, mut cw) = client.halves();
        let (mut er, mut ew) = endpoint.halves();
        let on_up = |n| observe.upstream(n);
        let on_down = |n| observe.downstream(n);
        let upstream = pump(&mut cr, &mut ew, &mut up, &on_up);
        let downstream = pump(&mut er, &mut cw, &mut down, &on_down);
        settle(upstream, downstream, abort, &mut error).await
    };
    match ending {
        Ending::Clean => {}
        Ending::ClientReset => endpoint.abort(),
        Ending::EndpointReset => client.abort(),
        Ending::Aborted => {
            client.abort();
            endpoint.abort();
        }
    }
    Outcome {
        upstream_bytes: up,
        downstream_bytes: down,
        ending,
        error,
    }
}
