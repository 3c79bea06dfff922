//! The proxy's data path: a relay with the same TCP semantics as
//! [`super::relay`] (a FIN stays a FIN, a reset stays a reset, half-close
//! keeps the other direction flowing, the drain deadline resets both sides),
//! built so that an idle connection holds no buffer at all.
//!
//! Each direction waits for its source to become readable before it takes
//! anything to read into:
//! * [`Mode::Copy`] reads into a per-thread scratch buffer and writes at
//!   once; only bytes the sink cannot take right now are copied into a
//!   buffer owned by the connection, sized to those bytes and freed as soon
//!   as they are written.
//! * [`Mode::Splice`] moves bytes socket → pipe → socket with `splice(2)`,
//!   so payload never enters user space. The pipe comes from a small
//!   per-thread pool when the source has data and goes back, empty, when the
//!   source has none; only a connection whose sink is not taking data keeps
//!   one (holding the bytes the kernel already moved, at most one pipe's
//!   worth). Up to [`LARGE_PIPES_MAX`] pipes at a time are enlarged to
//!   [`SPLICE_CHUNK`] (1 MiB) so one splice moves more per call; the rest
//!   keep the default 64 KiB (the kernel charges pipe capacity to the user,
//!   root, whose other processes share the quota). A kernel that will not
//!   splice these sockets (`EINVAL`, `ENOSYS`, no pipe) makes that direction
//!   fall back to [`Mode::Copy`] before any byte has moved.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::relay::{Ending, Observe, Outcome, PumpError, reset};

/// Errors of the zero-copy plumbing (pipe creation); they only ever make a
/// direction fall back to copying.
#[derive(Debug, thiserror::Error)]
pub enum LeanError {
    #[error("cannot create a pipe for splice: {0}")]
    Pipe(#[source] io::Error),
}

/// How payload bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// read(2)/write(2) through a per-thread scratch buffer.
    Copy,
    /// splice(2) through a pipe, falling back to [`Mode::Copy`] if the kernel
    /// refuses.
    Splice,
}

impl Mode {
    /// The mode `proxy.zero_copy` asks for.
    pub fn from_zero_copy(zero_copy: bool) -> Mode {
        if zero_copy { Mode::Splice } else { Mode::Copy }
    }
}

/// Large pipes open now (at most [`LARGE_PIPES_MAX`]).
static LARGE_PIPES: AtomicUsize = AtomicUsize::new(0);
/// Directions that fell back from splice to copying, process-wide.
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many relay directions fell back from splice to copying since start.
pub fn splice_fallbacks() -> u64 {
    FALLBACKS.load(Ordering::Relaxed)
}

/// The per-thread scratch buffer for [`Mode::Copy`].
const SCRATCH: usize = 64 * 1024;
/// Bytes asked of one splice(2) call, and the capacity asked for a large
/// pipe (`F_SETPIPE_SZ`; 1 MiB is the default `fs.pipe-max-size`). Measured
/// on the same-node path against the default 64 KiB pipe: about 15% more
/// throughput and half the sender's retransmissions (fewer window stalls).
const SPLICE_CHUNK: usize = 1024 * 1024;
/// Most large pipes open at once, process-wide; beyond that new pipes keep
/// the default 64 KiB. The kernel charges a pipe's capacity (not its
/// contents) to its user, and Ferry runs as root: past
/// `fs.pipe-user-pages-soft` (16,384 pages by default) every *other* root
/// process without CAP_SYS_RESOURCE or CAP_SYS_ADMIN on the node would get
/// 8 KiB pipes. 16 large pipes are 4,096 pages, a quarter of that.
const LARGE_PIPES_MAX: usize = 16;
/// Idle pipes kept per thread; beyond that they are closed.
const POOL_MAX: usize = 32;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe used as splice's in-kernel buffer.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Enlarged to [`SPLICE_CHUNK`] (counted in [`LARGE_PIPES`]).
    large: bool,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.large {
            LARGE_PIPES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Pipe {
    fn new() -> Result<Pipe, LeanError> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2
        // requires; the flags are valid.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if r != 0 {
            return Err(LeanError::Pipe(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by
        // nothing else; each OwnedFd takes sole ownership of one.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A large pipe is an optimisation only: past the budget, or if the
        // kernel refuses (a lower `fs.pipe-max-size`, the user's pipe quota
        // spent), the pipe keeps its default size and each splice moves less.
        let mut large = false;
        if LARGE_PIPES.fetch_add(1, Ordering::Relaxed) < LARGE_PIPES_MAX {
            // SAFETY: F_SETPIPE_SZ on a pipe descriptor this function owns,
            // with the int argument it takes.
            let r = unsafe {
                libc::fcntl(
                    write.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    SPLICE_CHUNK as libc::c_int,
                )
            };
            large = r >= 0;
        }
        if !large {
            LARGE_PIPES.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(Pipe { read, write, large })
    }

    /// An empty pipe from this thread's pool, or a new one.
    fn take() -> Result<Pipe, LeanError> {
        match PIPES.with(|p| p.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns an empty pipe to this thread's pool (or closes it).
    fn give_back(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }
}

/// Pipes idle in the current thread's pool (for tests and diagnostics).
pub fn pooled_pipes() -> usize {
    PIPES.with(|p| p.borrow().len())
}

/// One splice(2) call, non-blocking; `Ok(0)` is end of stream from a socket.
fn splice(from: libc::c_int, to: libc::c_int, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (the
    // caller borrows the streams and owns the pipe); null offsets are what
    // splice requires for pipes and sockets; the flags are valid.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether a splice error means "this kernel or these descriptors do not
/// support splice" rather than a network event.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// Passes a FIN on: shuts down the sink's write side.
pub(crate) fn pass_fin(to: &TcpStream) -> Result<(), PumpError> {
    socket2::SockRef::from(to)
        .shutdown(Shutdown::Write)
        .map_err(PumpError::Write)
}

/// Writes all of `data` to `to`, waiting for writability as needed.
pub(crate) async fn write_all(to: &TcpStream, mut data: &[u8]) -> Result<(), PumpError> {
    while !data.is_empty() {
        to.writable().await.map_err(PumpError::Write)?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(PumpError::Write(e)),
        }
    }
    Ok(())
}

/// What one read into the scratch buffer produced.
enum Got {
    /// End of stream.
    Fin,
    /// Nothing to read after all.
    Nothing,
    /// `written` bytes went straight to the sink; `rest` could not be
    /// written yet.
    Bytes { written: usize, rest: Vec<u8> },
}

/// Reads once into the thread's scratch buffer and writes what the sink
/// takes without waiting; the remainder is copied out. Never awaits, so the
/// scratch buffer is never held across a suspension.
fn read_and_forward(from: &TcpStream, to: &TcpStream) -> Result<Got, PumpError> {
    SCRATCH_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < SCRATCH {
            buf.resize(SCRATCH, 0);
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(Got::Fin),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Got::Nothing),
            Err(e) => return Err(PumpError::Read(e)),
        };
        let mut written = 0;
        while written < n {
            match to.try_write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        Ok(Got::Bytes {
            written,
            rest: buf[written..n].to_vec(),
        })
    })
}

/// One direction by copying.
async fn pump_copy(
    from: &TcpStream,
    to: &TcpStream,
    count: &mut u64,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), PumpError> {
    loop {
        from.readable().await.map_err(PumpError::Read)?;
        match read_and_forward(from, to)? {
            Got::Fin => return pass_fin(to),
            Got::Nothing => {}
            Got::Bytes { written, rest } => {
                let total = (written + rest.len()) as u64;
                if !rest.is_empty() {
                    write_all(to, &rest).await?;
                }
                *count += total;
                on_bytes(total);
            }
        }
    }
}

/// Moves everything in `pipe` (`in_pipe` bytes) to `to`.
async fn drain_pipe(
    pipe: &Pipe,
    to: &TcpStream,
    mut in_pipe: usize,
    count: &mut u64,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), PumpError> {
    let to_fd = to.as_raw_fd();
    let pipe_fd = pipe.read.as_raw_fd();
    while in_pipe > 0 {
        match to.try_io(Interest::WRITABLE, || splice(pipe_fd, to_fd, in_pipe)) {
            Ok(0) => {
                // A socket that takes nothing without an error: treat as gone.
                return Err(PumpError::Write(io::ErrorKind::WriteZero.into()));
            }
            Ok(m) => {
                in_pipe -= m;
                *count += m as u64;
                on_bytes(m as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                to.writable().await.map_err(PumpError::Write)?;
            }
            Err(e) => return Err(PumpError::Write(e)),
        }
    }
    Ok(())
}

/// One direction by splice; falls back to copying if the kernel refuses
/// before any byte has moved.
async fn pump_splice(
    from: &TcpStream,
    to: &TcpStream,
    count: &mut u64,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), PumpError> {
    let from_fd = from.as_raw_fd();
    let mut spliced_any = false;
    loop {
        from.readable().await.map_err(PumpError::Read)?;
        let pipe = match Pipe::take() {
            Ok(p) => p,
            Err(e) => {
                FALLBACKS.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "splice unavailable; copying this direction");
                return pump_copy(from, to, count, on_bytes).await;
            }
        };
        let write_fd = pipe.write.as_raw_fd();
        match from.try_io(Interest::READABLE, || {
            splice(from_fd, write_fd, SPLICE_CHUNK)
        }) {
            Ok(0) => {
                pipe.give_back();
                return pass_fin(to);
            }
            Ok(n) => {
                spliced_any = true;
                // On error the pipe (holding bytes) is dropped with the pump.
                drain_pipe(&pipe, to, n, count, on_bytes).await?;
                pipe.give_back();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => pipe.give_back(),
            Err(e) if !spliced_any && unsupported(&e) => {
                pipe.give_back();
                FALLBACKS.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "splice refused; copying this direction");
                return pump_copy(from, to, count, on_bytes).await;
            }
            Err(e) => return Err(PumpError::Read(e)),
        }
    }
}

async fn pump(
    mode: Mode,
    from: &TcpStream,
    to: &TcpStream,
    count: &mut u64,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), PumpError> {
    match mode {
        Mode::Copy => pump_copy(from, to, count, on_bytes).await,
        Mode::Splice => pump_splice(from, to, count, on_bytes).await,
    }
}

/// Relays until both directions are finished or one side resets; consumes
/// both streams. The TCP semantics are those of [`super::relay`]'s module
/// documentation.
pub async fn relay(
    client: TcpStream,
    endpoint: TcpStream,
    observe: &dyn Observe,
    mode: Mode,
) -> Outcome {
    relay_until(client, endpoint, observe, std::future::pending(), mode).await
}

/// [`relay`], but when `abort` completes first, both sides are reset and the
/// relay ends with [`Ending::Aborted`].
pub async fn relay_until(
    client: TcpStream,
    endpoint: TcpStream,
    observe: &dyn Observe,
    abort: impl std::future::Future<Output = ()>,
    mode: Mode,
) -> Outcome {
    let mut up = 0u64;
    let mut down = 0u64;
    let mut error = None;
    let ending = {
        let on_up = |n| observe.upstream(n);
        let on_down = |n| observe.downstream(n);
        let upstream = pump(mode, &client, &endpoint, &mut up, &on_up);
        let downstream = pump(mode, &endpoint, &client, &mut down, &on_down);
        super::relay::settle(upstream, downstream, abort, &mut error).await
    };
    match ending {
        Ending::Clean => {}
        Ending::ClientReset => reset(&endpoint),
        Ending::EndpointReset => reset(&client),
        Ending::Aborted => {
            reset(&client);
            reset(&endpoint);
        }
    }
    Outcome {
        upstream_bytes: up,
        downstream_bytes: down,
        ending,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(p: &Pipe) -> usize {
        // SAFETY: F_GETPIPE_SZ on a pipe descriptor the test owns; no argument.
        let size = unsafe { libc::fcntl(p.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert!(size > 0, "F_GETPIPE_SZ: {}", io::Error::last_os_error());
        size as usize
    }

    #[test]
    fn at_most_the_budget_of_pipes_is_enlarged_and_the_budget_comes_back() {
        // (The only test in this binary that opens pipes.)
        let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .expect("read fs.pipe-max-size")
            .trim()
            .parse()
            .expect("fs.pipe-max-size is a number");
        let pipes: Vec<Pipe> = (0..LARGE_PIPES_MAX + 3)
            .map(|_| Pipe::new().expect("pipe"))
            .collect();
        let large = pipes.iter().filter(|p| p.large).count();
        for p in &pipes {
            let want = if p.large { SPLICE_CHUNK } else { 64 * 1024 };
            assert_eq!(capacity(p), want, "large={}", p.large);
        }
        assert_eq!(LARGE_PIPES.load(Ordering::Relaxed), large);
        if max >= SPLICE_CHUNK {
            assert_eq!(large, LARGE_PIPES_MAX, "the first pipes are enlarged");
        }
        drop(pipes);
        assert_eq!(LARGE_PIPES.load(Ordering::Relaxed), 0);
        let again = Pipe::new().expect("pipe");
        if max >= SPLICE_CHUNK {
            assert!(again.large, "a closed large pipe frees its place");
        }
    }
}
