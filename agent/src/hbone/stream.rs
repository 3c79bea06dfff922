//! One tunnelled connection: an HTTP/2 CONNECT stream as a relay [`Peer`].
//!
//! * bytes are DATA frames; flow control is released as bytes are taken, so
//!   at most one window is buffered per direction;
//! * the relay's FIN (write shutdown) is END_STREAM, and END_STREAM from the
//!   peer is a read of 0 bytes (a FIN);
//! * the relay's abort is RST_STREAM(CONNECT_ERROR) (RFC 9113 §8.5: a TCP
//!   reset is signalled that way), and RST_STREAM from the peer is a read or
//!   write error of kind `ConnectionReset`, which the relay turns back into
//!   a TCP reset.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::relay::Peer;

/// Largest DATA payload written at once.
const MAX_CHUNK: usize = 64 * 1024;

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
    pending: Bytes,
    ended: bool,
    _slot: Option<Slot>,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<Slot>) -> TunnelStream {
        TunnelStream {
            send,
            recv,
            pending: Bytes::new(),
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

pub struct TunnelRead<'a> {
    recv: &'a mut RecvStream,
    pending: &'a mut Bytes,
}

pub struct TunnelWrite<'a> {
    send: &'a mut SendStream<Bytes>,
    ended: &'a mut bool,
}

impl AsyncRead for TunnelRead<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())), // END_STREAM: a FIN
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(data)) => {
                    // Let the peer send more as soon as we hold the bytes.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    *this.pending = data;
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelWrite<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let want = buf.len().min(MAX_CHUNK);
        this.send.reserve_capacity(want);
        while this.send.capacity() == 0 {
            match ready!(this.send.poll_capacity(cx)) {
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
        let n = this.send.capacity().min(want);
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !*this.ended {
            *this.ended = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Peer for TunnelStream {
    type Read<'a> = TunnelRead<'a>;
    type Write<'a> = TunnelWrite<'a>;

    fn halves(&mut self) -> (TunnelRead<'_>, TunnelWrite<'_>) {
        (
            TunnelRead {
                recv: &mut self.recv,
                pending: &mut self.pending,
            },
            TunnelWrite {
                send: &mut self.send,
                ended: &mut self.ended,
            },
        )
    }

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
