//! Small, real TCP servers and clients for Ferry's integration tests, run
//! inside the test topology's network namespaces.
//!
//! ```text
//! ferry-testkit serve --id ID --listen ADDR [--mode http|drain-then-reply|reset] [--reply-bytes N]
//! ferry-testkit halfclose-client --connect ADDR --send N
//! ferry-testkit rr-client --connect ADDR --count N
//! ferry-testkit stream-client --connect ADDR --seconds S
//! ferry-testkit connrate-client --connect ADDR --seconds S --concurrency C
//! ```
//!
//! * `http`: answers each request (one per connection) with
//!   `HTTP/1.1 200`, body `id=ID peer=CLIENT_ADDR\n`, then closes.
//! * `drain-then-reply`: reads until the client's FIN, then sends
//!   `got=N\n` followed by `--reply-bytes` bytes of a fixed pattern, then FIN.
//! * `reset`: reads one chunk, then aborts the connection with RST.
//! * `echo`: echoes every byte until the client's FIN.
//! * `sink`: reads and discards until the client's FIN, then answers the
//!   byte count.
//!
//! Benchmark clients (each bounded by its count or seconds):
//! * `rr-client`: N one-byte request/responses on one connection (against
//!   `echo`); prints `p50_us=.. p99_us=.. count=..`;
//! * `stream-client`: sends as fast as it can for S seconds (against
//!   `sink`); prints `bytes=.. seconds=.. mbit_s=..`;
//! * `connrate-client`: C threads, each opening a new connection per
//!   one-byte exchange (against `echo`), for S seconds; prints
//!   `conns=.. per_s=.. failed=..`.
//!
//! `halfclose-client` sends N bytes, shuts down its write side, reads to the
//! end and prints `received=BYTES pattern_ok=BOOL end=eof|reset|error:KIND`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

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
        Some("stream-client") => stream_client(&args),
        Some("connrate-client") => connrate_client(&args),
        _ => bail!("usage: ferry-testkit serve|halfclose-client ... (see the source's header)"),
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
    let listener = bind_dual(listen)?;
    println!("listening on {listen} id={id} mode={mode}");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let id = id.clone();
        let mode = mode.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let r = match mode.as_str() {
                "http" => serve_http(stream, &id),
                "drain-then-reply" => serve_drain(stream, reply_bytes),
                "reset" => serve_reset(stream),
                "echo" => serve_echo(stream),
                "sink" => serve_sink(stream),
                other => Err(anyhow::anyhow!("unknown mode {other}")),
            };
            if let Err(e) = r {
                eprintln!("connection error: {e:#}");
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

fn serve_echo(mut s: TcpStream) -> Result<()> {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
    }
    s.shutdown(Shutdown::Write)?;
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

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn rr_client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let count: usize = need(args, "--count")?.parse()?;
    let mut s = connect(addr)?;
    let mut lat = Vec::with_capacity(count);
    let mut b = [0u8; 1];
    for i in 0..count {
        let t = std::time::Instant::now();
        s.write_all(&[i as u8])?;
        s.read_exact(&mut b)?;
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!("p50_us={} p99_us={} count={count}", pct(0.50), pct(0.99));
    Ok(())
}

fn stream_client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let seconds: f64 = need(args, "--seconds")?.parse()?;
    let mut s = connect(addr)?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = std::time::Instant::now();
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
    let threads: usize = need(args, "--concurrency")?.parse()?;
    let start = std::time::Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while start.elapsed().as_secs_f64() < seconds {
                    let r = connect(addr).and_then(|mut s| {
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

fn halfclose_client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = need(args, "--connect")?.parse()?;
    let send: u64 = need(args, "--send")?.parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0u64;
    while sent < send {
        let n = (send - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    // Read the header line, then the pattern.
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset".to_owned(),
            Err(e) => break format!("error:{:?}", e.kind()),
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
