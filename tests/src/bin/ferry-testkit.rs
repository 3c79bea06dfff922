//! Small, real TCP servers and clients for Ferry's integration tests, run
//! inside the test topology's network namespaces.
//!
//! ```text
//! ferry-testkit serve --id ID --listen ADDR [--mode http|drain-then-reply|reset|report|echo] [--reply-bytes N] [--delay-ms MS] [--exit-after N]
//! ferry-testkit halfclose-client --connect ADDR --send N
//! ferry-testkit rr-client --connect ADDR --count N [--size BYTES] [--new-connection] [--max-seconds S] [--rate PER_S]
//! ferry-testkit hold-client --connect ADDR --send N --release FILE [--max-wait SECS]
//! ferry-testkit reset-client --connect ADDR --send N
//! ferry-testkit stream-client --connect ADDR --seconds S
//! ferry-testkit connrate-client --connect ADDR --seconds S --concurrency C [--rate PER_S]
//! ferry-testkit hold-server --listen ADDR
//! ferry-testkit idle-client --connect ADDR --count N --release FILE [--max-wait SECS]
//! ferry-testkit hash-client --connect ADDR --send N --reply M [--seed S] [--pause-ms P] [--after-eof] [--reset-after K] [--abort-after K]
//! ```
//!
//! `hash-client` talks to a `hash` server: it sends one header line
//! (`send=M seed=S pause_ms=P after_eof=0|1 reset_after=K`), waits for the
//! server's `ok` line (so the whole path is up before the payload), then
//! sends N pseudo-random bytes (seeded by S) and shuts down its write side
//! while reading the server's M pseudo-random bytes to the end, and prints
//! `sent=N sent_hash=H received=R recv_hash=H end=eof|reset|error:KIND send_end=ok|reset|...`.
//! The `hash` server prints `hash-ended got=N hash=H sent=M sent_hash=H end=... send_end=...`.
//! With `pause_ms` the server stops reading for that long after the first
//! MiB (a peer that stops reading); with `after_eof` it sends only after the
//! client's FIN (half-close); with `reset_after` it aborts with RST once it
//! has read K bytes. `--abort-after K` makes the client send K bytes, wait
//! a moment, and abort with RST (it prints `aborted sent=K sent_hash=H`).
//! A blocking read that fails with EAGAIN is retried after poll(2) (as an
//! event-driven client would), unless `--strict-reads`. `--tokio` runs the
//! same exchange on a tokio runtime (non-blocking socket, edge-triggered
//! epoll).
//!
//! `hold-server` accepts connections and keeps them open, never reading or
//! writing (one thread, no per-connection cost beyond the socket).
//! `idle-client` opens N connections one after another, sends nothing,
//! prints `holding N`, and keeps them open until FILE exists (at most
//! `--max-wait` seconds, default 120). Both raise their open-file limit.
//!
//! * `http`: answers each request (one per connection) with
//!   `HTTP/1.1 200`, body `id=ID peer=CLIENT_ADDR\n`, then closes; with
//!   `--delay-ms` it is a deliberately slow server that answers that late.
//!   `--exit-after N` (any mode): the process dies right after its Nth
//!   connection ends.
//! * `drain-then-reply`: reads until the client's FIN, then sends
//!   `got=N\n` followed by `--reply-bytes` bytes of a fixed pattern, then FIN.
//! * `reset`: reads one chunk, then aborts the connection with RST.
//! * `echo`: writes back whatever it reads (TCP_NODELAY) until the client's
//!   FIN, then FIN.
//! * `sink`: reads and discards until the client's FIN, then answers
//!   `got=N\n` (the byte count) and FIN.
//! * `report`: answers the first bytes it receives with `ack\n`, then reads
//!   until the connection ends and prints (to its log)
//!   `ended peer=CLIENT_ADDR bytes=N end=eof|reset|error:KIND`.
//!
//! `halfclose-client` sends N bytes, shuts down its write side, reads to the
//! end and prints `header=LINE received=BYTES pattern_ok=BOOL end=eof|reset|error:KIND`
//! (a reset while sending is reported as `end=reset` too).
//!
//! `hold-client` connects, sends N bytes and prints `holding`, then keeps the
//! connection open until FILE exists (at most `--max-wait` seconds, default
//! 60); then it finishes like `halfclose-client`. If the connection ends
//! while it is held, it prints
//! `closed-while-held received=BYTES end=eof|reset|error:KIND`.
//!
//! `reset-client` connects, sends N bytes, waits for the server's first line
//! (`ack` from a `report` server: the whole path is up), then aborts the
//! connection with RST (`SO_LINGER` 0) and prints `reset sent`.
//!
//! `stream-client` sends as fast as it can for S seconds to a `sink` server
//! and prints `bytes=N seconds=F mbit_s=F` (checked against the sink's count).
//!
//! `connrate-client` runs C threads for S seconds, each opening a new
//! connection per one-byte exchange with an `echo` server, and prints
//! `conns=N per_s=F failed=N`. With `--rate` (connections per second, all
//! threads together) it paces itself open-loop instead of going flat out.
//! `rr-client --rate` paces its round trips the same way.
//!
//! `rr-client` measures request/response latency against an `echo` server:
//! each round trip writes `--size` bytes (default 64) and reads as many back.
//! By default all round trips share one connection (after `min(100, N/10)`
//! uncounted warm-up round trips); with `--new-connection` each one opens its
//! own connection (the time includes the connect) and closes it. It stops
//! after N round trips or `--max-seconds` (default 60), whichever comes
//! first, and prints one line (`count` is how many were done):
//!
//! ```text
//! rr mode=persistent|new-connection size=64 count=N requested=N elapsed_s=F rate_per_s=F mean_us=F p50_us=F p90_us=F p99_us=F p999_us=F max_us=F
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn need(args: &[String], name: &str) -> Result<String> {
    arg(args, name).with_context(|| format!("missing {name}"))
}

/// The byte at offset `i` of the reply pattern.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args),
        Some("halfclose-client") => halfclose_client(&args),
        Some("rr-client") => rr_client(&args),
        Some("hold-client") => hold_client(&args),
        Some("reset-client") => reset_client(&args),
        Some("stream-client") => stream_client(&args),
        Some("connrate-client") => connrate_client(&args),
        Some("hold-server") => hold_server(&args),
        Some("idle-client") => idle_client(&args),
        Some("hash-client") => hash_client(&args),
        _ => bail!(
            "usage: ferry-testkit serve|halfclose-client|rr-client|hold-client|reset-client ... (see the source's header)"
        ),
    }
}

fn serve(args: &[String]) -> Result<()> {
    let id = need(args, "--id")?;
    let listen: SocketAddr = need(args, "--listen")?.parse()?;
    let mode = arg(args, "--mode").unwrap_or_else(|| "http".into());
    let reply_bytes: u64 = arg(args, "--reply-bytes")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0);
    let delay = Duration::from_millis(
        arg(args, "--delay-ms")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(0),
    );
    let exit_after: Option<u64> = arg(args, "--exit-after").map(|s| s.parse()).transpose()?;
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = bind_dual(listen)?;
    println!("listening on {listen} id={id} mode={mode}");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let id = id.clone();
        let mode = mode.clone();
        let served = served.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let r = match mode.as_str() {
                "http" => {
                    // A deliberately slow server: answer only after `delay`.
                    if !delay.is_zero() {
                        std::thread::sleep(delay);
                    }
                    serve_http(stream, &id)
                }
                "drain-then-reply" => serve_drain(stream, reply_bytes),
                "reset" => serve_reset(stream),
                "echo" => serve_echo(stream),
                "sink" => serve_sink(stream),
                "report" => serve_report(stream),
                "hash" => serve_hash(stream),
                other => Err(anyhow::anyhow!("unknown mode {other}")),
            };
            if let Err(e) = r {
                eprintln!("connection error: {e:#}");
            }
            // Die abruptly (no orderly shutdown, like a crash) right after
            // finishing the Nth connection, so no connection is in flight.
            let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if exit_after == Some(n) {
                println!("exiting after {n} connections");
                let _ = std::io::stdout().flush();
                std::process::exit(0);
            }
        });
    }
    Ok(())
}

fn bind_dual(addr: SocketAddr) -> Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

fn serve_http(mut s: TcpStream, id: &str) -> Result<()> {
    let peer = s.peer_addr()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            bail!("request too large");
        }
    }
    let peer_ip = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(std::net::IpAddr::V4)
            .unwrap_or(std::net::IpAddr::V6(v6)),
        v4 => v4,
    };
    let body = format!("id={id} peer={}\n", SocketAddr::new(peer_ip, peer.port()));
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    // Wait for the client to close so the FIN handshake completes cleanly.
    let _ = s.read(&mut chunk);
    Ok(())
}

fn serve_drain(mut s: TcpStream, reply_bytes: u64) -> Result<()> {
    let mut got = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    s.write_all(format!("got={got}\n").as_bytes())?;
    let mut sent = 0u64;
    while sent < reply_bytes {
        let n = (reply_bytes - sent).min(chunk.len() as u64) as usize;
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern(sent + i as u64);
        }
        s.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(())
}

fn serve_reset(mut s: TcpStream) -> Result<()> {
    let mut chunk = [0u8; 4096];
    let _ = s.read(&mut chunk)?;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    drop(s);
    Ok(())
}

/// How a read or write error ended a connection, as the clients print it.
fn ending(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => "reset".to_owned(),
        k => format!("error:{k:?}"),
    }
}

fn serve_report(mut s: TcpStream) -> Result<()> {
    let peer = s.peer_addr()?;
    let mut bytes = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    let end = loop {
        match s.read(&mut chunk) {
            Ok(0) => break "eof".to_owned(),
            Ok(n) => {
                if bytes == 0 {
                    s.write_all(b"ack\n")?;
                }
                bytes += n as u64;
            }
            Err(e) => break ending(&e),
        }
    };
    println!("ended peer={peer} bytes={bytes} end={end}");
    Ok(())
}

fn connect(args: &[String]) -> Result<(TcpStream, u64)> {
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let send: u64 = need(args, "--send")?.parse()?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok((s, send))
}

/// Sends `n` bytes of `x`.
fn send_bytes(s: &mut TcpStream, n: u64) -> std::io::Result<()> {
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0u64;
    while sent < n {
        let k = (n - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..k])?;
        sent += k as u64;
    }
    Ok(())
}

fn halfclose_client(args: &[String]) -> Result<()> {
    let (mut s, send) = connect(args)?;
    if let Err(e) = send_bytes(&mut s, send) {
        println!("header= received=0 pattern_ok=true end={}", ending(&e));
        return Ok(());
    }
    finish(s, Vec::new())
}

/// Shuts down the write side, reads the reply to its end and prints it;
/// `all` holds what was already read.
fn finish(mut s: TcpStream, mut all: Vec<u8>) -> Result<()> {
    // A connection already reset fails the shutdown with ENOTCONN; the read
    // below then reports the pending reset (or EOF) as it is.
    if let Err(e) = s.shutdown(Shutdown::Write)
        && e.kind() != std::io::ErrorKind::NotConnected
    {
        println!("header= received=0 pattern_ok=true end={}", ending(&e));
        return Ok(());
    }
    // Read the header line, then the pattern.
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => break ending(&e),
        }
    };
    let (header, body) = match all.iter().position(|b| *b == b'\n') {
        Some(i) => (
            String::from_utf8_lossy(&all[..i]).into_owned(),
            &all[i + 1..],
        ),
        None => (
            String::from_utf8_lossy(&all).into_owned(),
            &all[all.len()..],
        ),
    };
    let pattern_ok = body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(i as u64));
    println!(
        "header={header} received={} pattern_ok={pattern_ok} end={end}",
        body.len()
    );
    Ok(())
}

fn hold_client(args: &[String]) -> Result<()> {
    let release = need(args, "--release")?;
    let max_wait = Duration::from_secs(
        arg(args, "--max-wait")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(60),
    );
    let (mut s, send) = connect(args)?;
    send_bytes(&mut s, send)?;
    println!("holding");
    std::io::stdout().flush()?;
    // Watch the socket while waiting (reading what arrives, kept for the
    // end): a connection closed under us is reported at once instead of
    // when the release comes.
    s.set_read_timeout(Some(Duration::from_millis(20)))?;
    let start = Instant::now();
    let mut early = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !Path::new(&release).exists() {
        if start.elapsed() > max_wait {
            bail!("not released within {max_wait:?}");
        }
        match s.read(&mut buf) {
            Ok(0) => {
                println!("closed-while-held received={} end=eof", early.len());
                return Ok(());
            }
            Ok(n) => early.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                println!(
                    "closed-while-held received={} end={}",
                    early.len(),
                    ending(&e)
                );
                return Ok(());
            }
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    finish(s, early)
}

fn reset_client(args: &[String]) -> Result<()> {
    let (mut s, send) = connect(args)?;
    send_bytes(&mut s, send)?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b)? {
            0 => bail!("connection ended before the server's first line"),
            _ => line.push(b[0]),
        }
    }
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    drop(s);
    println!("reset sent");
    Ok(())
}

// ------------------------------------------------------- echo and rr-client

fn serve_echo(mut s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        s.write_all(&chunk[..n])?;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(())
}

/// One round trip on `s`: write `req`, read as many bytes back.
fn round_trip(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> Result<()> {
    s.write_all(req)?;
    s.read_exact(resp).context("reading the echo")?;
    Ok(())
}

fn rr_connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Open-loop pacing for `--rate`: the n-th operation starts no earlier
/// than `offset + n / rate` seconds after the start (a late operation does
/// not push the later ones back, so the average rate holds). Without a rate
/// it never waits.
struct Pace {
    interval: Option<f64>,
    next: f64,
}

impl Pace {
    fn new(rate: Option<f64>, k: usize, of: usize) -> Pace {
        let interval = rate.map(|r| 1.0 / r);
        Pace {
            interval,
            next: interval.map_or(0.0, |i| i * k as f64 / of as f64),
        }
    }

    /// Waits for the next slot (never past `limit` seconds after `start`).
    fn wait(&mut self, start: Instant, limit: f64) {
        let Some(interval) = self.interval else {
            return;
        };
        let now = start.elapsed().as_secs_f64();
        let due = self.next.min(limit);
        if due > now {
            // Pacing an open-loop load generator: the wait is the point.
            std::thread::sleep(Duration::from_secs_f64(due - now));
        }
        self.next += interval;
    }
}

/// The `q` quantile (0..=1) of sorted samples, by nearest rank.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rr_client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let count: usize = need(args, "--count")?.parse()?;
    let size: usize = arg(args, "--size")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(64);
    let max_seconds: f64 = arg(args, "--max-seconds")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(60.0);
    let new_connection = args.iter().any(|a| a == "--new-connection");
    let rate: Option<f64> = arg(args, "--rate").map(|s| s.parse()).transpose()?;
    if rate.is_some_and(|r: f64| !(r > 0.0 && r <= 1e6)) {
        bail!("--rate must be in (0, 1000000]");
    }
    if size == 0 || count == 0 || !(max_seconds > 0.0 && max_seconds <= 3600.0) {
        bail!("--count and --size must be positive, --max-seconds in (0, 3600]");
    }
    let max = Duration::from_secs_f64(max_seconds);
    let req: Vec<u8> = (0..size as u64).map(pattern).collect();
    let mut resp = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    let start;
    if new_connection {
        start = Instant::now();
        let mut pace = Pace::new(rate, 0, 1);
        while samples.len() < count && start.elapsed() < max {
            pace.wait(start, max.as_secs_f64());
            let t = Instant::now();
            let mut s = rr_connect(addr)?;
            round_trip(&mut s, &req, &mut resp)?;
            drop(s);
            samples.push(t.elapsed());
        }
    } else {
        let mut s = rr_connect(addr)?;
        for _ in 0..(count / 10).min(100) {
            round_trip(&mut s, &req, &mut resp)?;
        }
        start = Instant::now();
        let mut pace = Pace::new(rate, 0, 1);
        while samples.len() < count && start.elapsed() < max {
            pace.wait(start, max.as_secs_f64());
            let t = Instant::now();
            round_trip(&mut s, &req, &mut resp)?;
            samples.push(t.elapsed());
        }
        s.shutdown(Shutdown::Write)?;
    }
    let elapsed = start.elapsed();
    if resp != req {
        bail!("the echo differs from the request");
    }
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let total: Duration = samples.iter().sum();
    let mean = total.as_secs_f64() * 1e6 / samples.len().max(1) as f64;
    println!(
        "rr mode={} size={size} count={} requested={count} elapsed_s={:.3} rate_per_s={:.1} \
         mean_us={mean:.1} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        if new_connection {
            "new-connection"
        } else {
            "persistent"
        },
        samples.len(),
        elapsed.as_secs_f64(),
        samples.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        us(quantile(&samples, 0.50)),
        us(quantile(&samples, 0.90)),
        us(quantile(&samples, 0.99)),
        us(quantile(&samples, 0.999)),
        us(samples.last().copied().unwrap_or_default()),
    );
    Ok(())
}

fn serve_sink(mut s: TcpStream) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    s.write_all(format!("got={got}\n").as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    Ok(())
}

fn bench_connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn stream_client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let seconds: f64 = need(args, "--seconds")?.parse()?;
    let mut s = bench_connect(addr)?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let secs = start.elapsed().as_secs_f64();
    if reply.trim() != format!("got={sent}") {
        bail!("sink answered {reply:?} after {sent} bytes");
    }
    println!(
        "bytes={sent} seconds={secs:.2} mbit_s={:.0}",
        sent as f64 * 8.0 / secs / 1e6
    );
    Ok(())
}

fn connrate_client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let seconds: f64 = need(args, "--seconds")?.parse()?;
    let threads: usize = need(args, "--concurrency")?.parse::<usize>()?.max(1);
    let rate: Option<f64> = arg(args, "--rate").map(|s| s.parse()).transpose()?;
    if rate.is_some_and(|r: f64| !(r > 0.0 && r <= 1e6)) {
        bail!("--rate must be in (0, 1000000]");
    }
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            // Each thread's share of the rate, its slots offset from the
            // others' so that the connections spread over each interval.
            let pace = Pace::new(rate.map(|r| r / threads as f64), k, threads);
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut pace = pace;
                while start.elapsed().as_secs_f64() < seconds {
                    pace.wait(start, seconds);
                    let r = bench_connect(addr).and_then(|mut s| {
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    });
                    match r {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    for h in handles {
        let (o, f) = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        ok += o;
        failed += f;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("conns={ok} per_s={:.0} failed={failed}", ok as f64 / secs);
    Ok(())
}

/// Raises the soft open-file limit to the hard one (and the hard one too
/// when privileged), for processes that hold many sockets.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    for max in [want.max(lim.rlim_max), lim.rlim_max] {
        let new = libc::rlimit {
            rlim_cur: want.min(max),
            rlim_max: max,
        };
        // SAFETY: `new` is a valid rlimit; setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return;
        }
    }
}

fn hold_server(args: &[String]) -> Result<()> {
    raise_nofile(1 << 17);
    let listen: SocketAddr = need(args, "--listen")?.parse()?;
    let listener = bind_dual(listen)?;
    listener.set_nonblocking(true)?;
    println!("listening on {listen} mode=hold");
    std::io::stdout().flush()?;
    let mut held: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 1];
    loop {
        let mut accepted = false;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true)?;
                    held.push(s);
                    accepted = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    eprintln!("accept: {e}");
                    break;
                }
            }
        }
        // Let go of connections the client has ended (EOF or reset), so
        // the descriptors do not pile up across runs.
        held.retain(|s| {
            matches!(s.peek(&mut buf), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        if !accepted {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn idle_client(args: &[String]) -> Result<()> {
    raise_nofile(1 << 17);
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let count: usize = need(args, "--count")?.parse()?;
    let release = need(args, "--release")?;
    let max_wait = Duration::from_secs(
        arg(args, "--max-wait")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(120),
    );
    let start = Instant::now();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connection {} of {count} to {addr}", i + 1))?;
        held.push(s);
        if start.elapsed() > max_wait {
            bail!("only {} of {count} connections within {max_wait:?}", i + 1);
        }
    }
    println!("holding {count}");
    std::io::stdout().flush()?;
    while !Path::new(&release).exists() {
        if start.elapsed() > max_wait {
            bail!("not released within {max_wait:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("released {}", held.len());
    Ok(())
}

/// Pseudo-random payload (xorshift64*), the same for the same seed.
struct Payload(u64);

impl Payload {
    fn new(seed: u64) -> Payload {
        Payload(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let w = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            c.copy_from_slice(&w[..c.len()]);
        }
    }
}

/// An order-sensitive digest of a byte stream, independent of how the
/// stream is cut into reads.
#[derive(Default)]
struct Digest {
    h: u64,
    carry: u64,
    k: u32,
    len: u64,
}

impl Digest {
    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29)
            .wrapping_add(0x9e37_79b9);
    }
    fn update(&mut self, mut d: &[u8]) {
        self.len += d.len() as u64;
        while self.k != 0 && !d.is_empty() {
            self.carry |= u64::from(d[0]) << (8 * self.k);
            self.k += 1;
            d = &d[1..];
            if self.k == 8 {
                let c = self.carry;
                self.mix(c);
                self.carry = 0;
                self.k = 0;
            }
        }
        let mut words = d.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.mix(u64::from_le_bytes(b));
        }
        for &b in words.remainder() {
            self.carry |= u64::from(b) << (8 * self.k);
            self.k += 1;
        }
    }
    fn finish(&self) -> String {
        let mut d = Digest { ..*self };
        let tail = d.carry ^ d.len.rotate_left(17);
        d.mix(tail);
        format!("{:016x}", d.h)
    }
}

/// Sends `n` payload bytes from `seed`; returns the digest of what was
/// written and how sending ended.
fn send_payload(s: &mut TcpStream, n: u64, seed: u64) -> (Digest, String) {
    let mut p = Payload::new(seed);
    let mut d = Digest::default();
    let mut buf = vec![0u8; 128 * 1024];
    let mut sent = 0u64;
    while sent < n {
        let k = (n - sent).min(buf.len() as u64) as usize;
        p.fill(&mut buf[..k]);
        if let Err(e) = s.write_all(&buf[..k]) {
            return (d, ending(&e));
        }
        d.update(&buf[..k]);
        sent += k as u64;
    }
    (d, "ok".to_owned())
}

/// Reads a line byte by byte (so nothing after it is consumed).
fn read_line(s: &mut TcpStream) -> Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            bail!("connection ended before a full line");
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
        if line.len() > 1024 {
            bail!("line too long");
        }
    }
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn serve_hash(mut s: TcpStream) -> Result<()> {
    let header = read_line(&mut s)?;
    let send = field(&header, "send");
    let seed = field(&header, "seed");
    let pause = Duration::from_millis(field(&header, "pause_ms"));
    let after_eof = field(&header, "after_eof") != 0;
    let reset_after = field(&header, "reset_after");
    s.write_all(b"ok\n")?;
    let reply_seed = seed.wrapping_add(1);
    let writer = if after_eof {
        None
    } else {
        let mut w = s.try_clone()?;
        Some(std::thread::spawn(move || {
            let r = send_payload(&mut w, send, reply_seed);
            let _ = w.shutdown(Shutdown::Write);
            r
        }))
    };
    let mut d = Digest::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut paused = pause.is_zero();
    let end = loop {
        if !paused && d.len >= 1 << 20 {
            paused = true;
            std::thread::sleep(pause);
        }
        if reset_after > 0 && d.len >= reset_after {
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            println!(
                "hash-ended got={} hash={} end=reset-sent",
                d.len,
                d.finish()
            );
            std::io::stdout().flush()?;
            return Ok(());
        }
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(n) => d.update(&buf[..n]),
            Err(e) => break ending(&e),
        }
    };
    let (sd, send_end) = match writer {
        Some(h) => h
            .join()
            .unwrap_or_else(|_| (Digest::default(), "panic".into())),
        None if end == "eof" => {
            let r = send_payload(&mut s, send, reply_seed);
            let _ = s.shutdown(Shutdown::Write);
            r
        }
        None => (Digest::default(), "skipped".into()),
    };
    println!(
        "hash-ended got={} hash={} sent={} sent_hash={} end={end} send_end={send_end}",
        d.len,
        d.finish(),
        sd.len,
        sd.finish()
    );
    std::io::stdout().flush()?;
    Ok(())
}

/// Waits until `s` is readable (or has an error or end), at most `limit`.
fn wait_readable(s: &TcpStream, limit: Duration) -> Result<()> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, limit.as_millis() as libc::c_int) };
    if r == 0 {
        bail!("not readable within {limit:?}");
    }
    Ok(())
}

fn hash_client(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--tokio") {
        return hash_client_tokio(args);
    }
    let (mut s, send) = connect(args)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let num = |name: &str| -> Result<u64> {
        Ok(arg(args, name).map(|v| v.parse()).transpose()?.unwrap_or(0))
    };
    let reply = num("--reply")?;
    let seed = num("--seed")?;
    let pause = num("--pause-ms")?;
    let reset_after = num("--reset-after")?;
    let abort_after = num("--abort-after")?;
    let after_eof = u64::from(args.iter().any(|a| a == "--after-eof"));
    s.write_all(
        format!(
            "send={reply} seed={seed} pause_ms={pause} after_eof={after_eof} reset_after={reset_after}\n"
        )
        .as_bytes(),
    )?;
    let ok = read_line(&mut s)?;
    if ok != "ok" {
        bail!("unexpected answer {ok:?}");
    }
    if abort_after > 0 {
        let (d, end) = send_payload(&mut s, abort_after, seed);
        std::thread::sleep(Duration::from_millis(500));
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        drop(s);
        println!(
            "aborted sent={} sent_hash={} send_end={end}",
            d.len,
            d.finish()
        );
        return Ok(());
    }
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || {
        let r = send_payload(&mut w, send, seed);
        if r.1 == "ok" {
            let _ = w.shutdown(Shutdown::Write);
        }
        r
    });
    let strict = args.iter().any(|a| a == "--strict-reads");
    let mut d = Digest::default();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(n) => d.update(&buf[..n]),
            // Like an event-driven client: EAGAIN means "wait until
            // readable". (A socket in a sockmap with an sk_msg program can
            // return it from a blocking read; see `--strict-reads`.)
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !strict => {
                wait_readable(&s, Duration::from_secs(60))?;
            }
            Err(e) => break ending(&e),
        }
    };
    let (sd, send_end) = writer
        .join()
        .unwrap_or_else(|_| (Digest::default(), "panic".into()));
    println!(
        "sent={} sent_hash={} received={} recv_hash={} end={end} send_end={send_end}",
        sd.len,
        sd.finish(),
        d.len,
        d.finish()
    );
    Ok(())
}

/// `hash-client --tokio`: the same exchange from a tokio client (non-blocking
/// socket, edge-triggered epoll), the way most event-driven clients work.
fn hash_client_tokio(args: &[String]) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let num = |name: &str| -> Result<u64> {
        Ok(arg(args, name).map(|v| v.parse()).transpose()?.unwrap_or(0))
    };
    let (send, reply, seed) = (num("--send")?, num("--reply")?, num("--seed")?);
    let pause = num("--pause-ms")?;
    let after_eof = u64::from(args.iter().any(|a| a == "--after-eof"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let limit = Duration::from_secs(60);
        let s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await??;
        let (mut r, mut w) = s.into_split();
        w.write_all(
            format!(
                "send={reply} seed={seed} pause_ms={pause} after_eof={after_eof} reset_after=0\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut ok = [0u8; 3];
        tokio::time::timeout(limit, r.read_exact(&mut ok)).await??;
        if &ok != b"ok\n" {
            bail!("unexpected answer {ok:?}");
        }
        let writer = tokio::spawn(async move {
            let mut p = Payload::new(seed);
            let mut d = Digest::default();
            let mut buf = vec![0u8; 128 * 1024];
            let mut sent = 0u64;
            while sent < send {
                let k = (send - sent).min(buf.len() as u64) as usize;
                p.fill(&mut buf[..k]);
                match tokio::time::timeout(limit, w.write_all(&buf[..k])).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return (d, ending(&e)),
                    Err(_) => return (d, "stalled".to_owned()),
                }
                d.update(&buf[..k]);
                sent += k as u64;
            }
            let _ = w.shutdown().await;
            (d, "ok".to_owned())
        });
        let mut d = Digest::default();
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            match tokio::time::timeout(limit, r.read(&mut buf)).await {
                Ok(Ok(0)) => break "eof".to_owned(),
                Ok(Ok(n)) => d.update(&buf[..n]),
                Ok(Err(e)) => break ending(&e),
                Err(_) => break "stalled".to_owned(),
            }
        };
        let (sd, send_end) = writer
            .await
            .unwrap_or_else(|_| (Digest::default(), "panic".into()));
        println!(
            "sent={} sent_hash={} received={} recv_hash={} end={end} send_end={send_end}",
            sd.len,
            sd.finish(),
            d.len,
            d.finish()
        );
        Ok(())
    })
}

#[cfg(test)]
mod hash_tests {
    use super::*;

    #[test]
    fn digest_ignores_read_boundaries() {
        let mut p = Payload::new(7);
        let mut data = vec![0u8; 100_003];
        p.fill(&mut data);
        let mut a = Digest::default();
        a.update(&data);
        let mut b = Digest::default();
        for c in data.chunks(13) {
            b.update(c);
        }
        assert_eq!(a.finish(), b.finish());
        let mut c = Digest::default();
        data.swap(10, 11);
        c.update(&data);
        assert_ne!(a.finish(), c.finish());
    }
}
