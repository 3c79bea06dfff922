//! What every relay between a client and its endpoint shares: how a relay
//! ends ([`Ending`], [`Outcome`]), how it reports bytes ([`Observe`]), and
//! [`settle`], which runs the two directions and decides the ending. The
//! relays themselves are [`super::lean`] (TCP to TCP, copy or splice) and
//! [`crate::hbone::stream::relay_until`] (TCP to an HBONE tunnel stream).
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
//! Across nodes the HBONE tunnel's HTTP/2 stream maps a FIN to END_STREAM
//! and a reset to RST_STREAM, so the same rules hold.

use std::future::Future;
use std::io;

use tokio::net::TcpStream;

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

/// Why one direction of a relay stopped.
pub(crate) enum PumpError {
    /// Reading the source failed (it reset).
    Read(io::Error),
    /// Writing the sink failed (it reset or went away).
    Write(io::Error),
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
/// reset; a failed write means the sink reset or went away. Shared by
/// [`super::lean`] and the tunnel relay.
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
