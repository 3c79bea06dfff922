//! TCP semantics of every relay, each case run against each of them: the
//! direct legs' lean relay (`ferry::proxy::lean`) in both of its modes, copy
//! (scratch buffer, nothing held while idle) and splice (zero-copy through a
//! pipe), and the tunnel relay (`ferry::hbone::stream::relay_until`) as it
//! runs in production, in pairs: client socket → relay → HTTP/2 CONNECT
//! stream → relay → endpoint socket. Byte-exact transfer, half-close both ways, resets both ways and
//! after a half-close, exact byte counts, back-pressure from a sink that
//! stops reading; plus splice-only checks.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferry::hbone::stream::{TcpRole, TunnelStream};
use ferry::hbone::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use ferry::proxy::lean::{self, Mode};
use ferry::proxy::relay::{Ending, Observe, Outcome};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(20);
const MIB: usize = 1024 * 1024;

/// Runs a test body, failing it if it does not finish within [`LIMIT`].
async fn within<F: Future>(body: F) -> F::Output {
    match tokio::time::timeout(LIMIT, body).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {LIMIT:?} (relay hung?)"),
    }
}

/// Deterministic pseudo-random bytes.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut buf);
    buf
}

/// Counts what the relay reports as it goes.
#[derive(Debug, Default)]
struct Counting {
    up: AtomicU64,
    down: AtomicU64,
}

impl Observe for Counting {
    fn upstream(&self, n: u64) {
        self.up.fetch_add(n, Ordering::Relaxed);
    }
    fn downstream(&self, n: u64) {
        self.down.fetch_add(n, Ordering::Relaxed);
    }
}

/// Which relay a case runs against.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Two `hbone::stream::relay_until`, joined by an HTTP/2 CONNECT stream
    /// (the outcome is the client side's).
    Tunnel,
    /// `proxy::lean::relay` in one of its modes.
    Lean(Mode),
}

/// The relay under test, running in its own task.
struct Relay {
    task: JoinHandle<Outcome>,
    /// What the relay reported through `Observe`.
    observed: Arc<Counting>,
}

impl Relay {
    /// Waits for the relay to end; checks that `Observe` saw what it counted.
    async fn outcome(self) -> Outcome {
        let out = self.task.await.expect("relay task panicked");
        assert_eq!(
            self.observed.up.load(Ordering::Relaxed),
            out.upstream_bytes,
            "Observe::upstream disagrees with the outcome"
        );
        assert_eq!(
            self.observed.down.load(Ordering::Relaxed),
            out.downstream_bytes,
            "Observe::downstream disagrees with the outcome"
        );
        out
    }
}

/// Joins a client and an endpoint through one relay. Returns the client's
/// socket (connected to the proxy listener), the endpoint's accepted socket
/// (connected from the proxy) and the relay.
async fn harness(kind: Kind) -> (TcpStream, TcpStream, Relay) {
    let endpoint_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint_addr = endpoint_listener.local_addr().unwrap();
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy_listener.local_addr().unwrap();
    let observed = Arc::new(Counting::default());

    // The proxy's accept handler: connect to the endpoint, then relay.
    let obs = observed.clone();
    let task = tokio::spawn(async move {
        let (client_side, _) = proxy_listener.accept().await.unwrap();
        let endpoint_side = TcpStream::connect(endpoint_addr).await.unwrap();
        match kind {
            Kind::Tunnel => tunnel_pair(client_side, endpoint_side, &obs).await,
            Kind::Lean(mode) => lean::relay(client_side, endpoint_side, &*obs, mode).await,
        }
    });

    let client = TcpStream::connect(proxy_addr).await.unwrap();
    let (endpoint, _) = endpoint_listener.accept().await.unwrap();
    (client, endpoint, Relay { task, observed })
}

/// The tunnel as production runs it, minus TLS: the client side's relay
/// (`TcpRole::Client`) opens a CONNECT stream over an HTTP/2 connection
/// whose server side relays it to the endpoint (`TcpRole::Endpoint`).
async fn tunnel_pair(client_side: TcpStream, endpoint_side: TcpStream, obs: &Counting) -> Outcome {
    let (a, b) = tokio::io::duplex(1024 * 1024);
    let server = tokio::spawn(async move {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(b)
            .await
            .unwrap();
        let (request, mut respond) = conn.accept().await.unwrap().unwrap();
        let send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        // Keep driving the connection for the stream's lifetime.
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let stream = TunnelStream::new(send, request.into_body(), None);
        ferry::hbone::stream::relay_until(
            endpoint_side,
            stream,
            TcpRole::Endpoint,
            &(),
            std::future::pending(),
        )
        .await
    });
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, Bytes>(a)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("10.0.0.1:80")
        .body(())
        .unwrap();
    let (response, send) = client.send_request(request, false).unwrap();
    let recv = response.await.unwrap().into_body();
    let out = ferry::hbone::stream::relay_until(
        client_side,
        TunnelStream::new(send, recv, None),
        TcpRole::Client,
        obs,
        std::future::pending(),
    )
    .await;
    // The endpoint side's relay is checked by what the endpoint socket sees;
    // it must not have panicked.
    if server.is_finished() {
        server.await.unwrap();
    }
    out
}

/// Closes a socket with RST instead of FIN.
fn abort(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// Reads until EOF or an error; returns what was read and how it ended.
async fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Compares large buffers without printing megabytes on failure.
#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// Writes `data` and then, if `fin`, shuts the write side down (FIN).
async fn write_all_then(stream: &mut TcpStream, data: &[u8], fin: bool) {
    stream.write_all(data).await.unwrap();
    if fin {
        stream.shutdown().await.unwrap();
    }
}

/// Writes `data` and then FIN on one side while reading the other side to
/// EOF, concurrently; returns what was read.
async fn send_and_receive(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w // keep the write half alive until the reader is done
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    let _w = writer.await.unwrap();
    got
}

/// Asserts that a read ends in a reset: no clean EOF, and nothing but a
/// prefix of `sent` before the error.
#[track_caller]
fn assert_reset(got: &[u8], end: io::Result<()>, sent: &[u8], who: &str) {
    match end {
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionReset,
            "{who} saw {e} instead of a reset"
        ),
        Ok(()) => panic!(
            "{who} saw a clean EOF after {} bytes instead of a reset",
            got.len()
        ),
    }
    assert!(
        sent.starts_with(got),
        "{who} received bytes that were never sent"
    );
}

async fn transfers_8_mib_both_ways_at_once_byte_exact(kind: Kind) {
    within(async {
        let (client, endpoint, relay) = harness(kind).await;
        let up = payload(1, 8 * MIB);
        let down = payload(2, 8 * MIB);
        let (at_endpoint, at_client) = tokio::join!(
            tokio::spawn(send_and_receive(endpoint, down.clone())),
            tokio::spawn(send_and_receive(client, up.clone())),
        );
        assert_same(&at_endpoint.unwrap(), &up, "client to endpoint");
        assert_same(&at_client.unwrap(), &down, "endpoint to client");
        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::Clean);
        assert_eq!(out.error, None);
        assert_eq!(out.upstream_bytes, (8 * MIB) as u64);
        assert_eq!(out.downstream_bytes, (8 * MIB) as u64);
    })
    .await
}

async fn client_half_close_still_gets_the_whole_response(kind: Kind) {
    within(async {
        let (mut client, mut endpoint, relay) = harness(kind).await;
        let request = payload(3, 100 * 1024 + 7);
        let response = payload(4, MIB);

        // The client sends its request and finishes sending (FIN); the
        // endpoint sees the whole request and then EOF: the FIN was carried
        // across, not swallowed and not turned into a close.
        let (_, (got, end)) = tokio::join!(
            write_all_then(&mut client, &request, true),
            read_until_end(&mut endpoint),
        );
        end.expect("the endpoint must see a clean EOF after the request");
        assert_same(&got, &request, "request");

        // Only after that EOF does it answer, then close. The half-closed
        // client still receives all of it, then a clean EOF.
        let (_, (got, end)) = tokio::join!(
            async {
                write_all_then(&mut endpoint, &response, true).await;
                drop(endpoint);
            },
            read_until_end(&mut client),
        );
        end.expect("the client must see a clean EOF after the response");
        assert_same(&got, &response, "response");

        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::Clean);
        assert_eq!(out.error, None);
        assert_eq!(out.upstream_bytes, request.len() as u64);
        assert_eq!(out.downstream_bytes, response.len() as u64);
    })
    .await
}

async fn endpoint_half_close_still_gets_the_whole_request(kind: Kind) {
    within(async {
        // The other direction: a server that speaks first and finishes
        // sending, then keeps reading.
        let (mut client, mut endpoint, relay) = harness(kind).await;
        let greeting = payload(5, 64 * 1024);
        let upload = payload(6, 2 * MIB + 3);

        let (_, (got, end)) = tokio::join!(
            write_all_then(&mut endpoint, &greeting, true),
            read_until_end(&mut client),
        );
        end.expect("the client must see a clean EOF after the greeting");
        assert_same(&got, &greeting, "greeting");

        let (_, (got, end)) = tokio::join!(
            write_all_then(&mut client, &upload, true),
            read_until_end(&mut endpoint),
        );
        end.expect("the endpoint must see a clean EOF after the upload");
        assert_same(&got, &upload, "upload");

        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::Clean);
        assert_eq!(out.upstream_bytes, upload.len() as u64);
        assert_eq!(out.downstream_bytes, greeting.len() as u64);
    })
    .await
}

async fn endpoint_reset_reaches_the_client_as_a_reset(kind: Kind) {
    within(async {
        let (mut client, mut endpoint, relay) = harness(kind).await;
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        endpoint.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // The endpoint crashes: RST, not FIN.
        abort(endpoint);

        let (got, end) = read_until_end(&mut client).await;
        assert_reset(&got, end, b"", "the client");
        assert!(got.is_empty());

        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::EndpointReset);
        assert_eq!(out.error, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(out.upstream_bytes, 5);
        assert_eq!(out.downstream_bytes, 0);
    })
    .await
}

async fn endpoint_reset_mid_response_is_not_a_clean_end(kind: Kind) {
    within(async {
        // The dangerous case: the client already has part of a response; a
        // clean EOF now would pass a truncated response off as complete.
        let (mut client, mut endpoint, relay) = harness(kind).await;
        let part = payload(7, 256 * 1024);
        let mut got = vec![0u8; part.len()];
        let (_, read) = tokio::join!(
            write_all_then(&mut endpoint, &part, false),
            client.read_exact(&mut got),
        );
        read.unwrap();
        assert_same(&got, &part, "partial response");

        abort(endpoint);
        let (rest, end) = read_until_end(&mut client).await;
        assert_reset(&rest, end, b"", "the client");

        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::EndpointReset);
        assert_eq!(out.error, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(out.upstream_bytes, 0);
        assert_eq!(out.downstream_bytes, part.len() as u64);
    })
    .await
}

async fn client_reset_reaches_the_endpoint_as_a_reset(kind: Kind) {
    within(async {
        let (mut client, mut endpoint, relay) = harness(kind).await;
        let request = payload(8, 4096);
        client.write_all(&request).await.unwrap();
        let mut got = vec![0u8; request.len()];
        endpoint.read_exact(&mut got).await.unwrap();
        assert_same(&got, &request, "request");
        endpoint.write_all(b"partial answer").await.unwrap();
        let mut buf = [0u8; 14];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"partial answer");

        // The client goes away with RST.
        abort(client);

        let (rest, end) = read_until_end(&mut endpoint).await;
        assert_reset(&rest, end, b"", "the endpoint");

        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::ClientReset);
        assert_eq!(out.error, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(out.upstream_bytes, request.len() as u64);
        assert_eq!(out.downstream_bytes, 14);
    })
    .await
}

async fn counts_bytes_exactly(kind: Kind) {
    within(async {
        // Odd sizes that are not multiples of the relay's buffer, written in
        // uneven pieces, so a miscount at a chunk edge shows.
        let up = payload(9, 3 * 16 * 1024 * 17 + 1);
        let down = payload(10, 5 * 16 * 1024 + 12_345);
        let (mut client, mut endpoint, relay) = harness(kind).await;

        let (_, (got, end)) = tokio::join!(
            async {
                for piece in up.chunks(7_919) {
                    client.write_all(piece).await.unwrap();
                }
                client.shutdown().await.unwrap();
            },
            read_until_end(&mut endpoint),
        );
        end.unwrap();
        assert_same(&got, &up, "upstream");

        let (_, (got, end)) = tokio::join!(
            async {
                for piece in down.chunks(104_729) {
                    endpoint.write_all(piece).await.unwrap();
                }
                drop(endpoint);
            },
            read_until_end(&mut client),
        );
        end.unwrap();
        assert_same(&got, &down, "downstream");

        let out = relay.outcome().await;
        assert_eq!(
            (out.upstream_bytes, out.downstream_bytes, out.ending),
            (up.len() as u64, down.len() as u64, Ending::Clean)
        );
    })
    .await
}

async fn empty_connection_ends_cleanly_with_zero_bytes(kind: Kind) {
    within(async {
        let (mut client, mut endpoint, relay) = harness(kind).await;
        client.shutdown().await.unwrap();
        let (got, end) = read_until_end(&mut endpoint).await;
        end.unwrap();
        assert!(got.is_empty());
        drop(endpoint);
        let (got, end) = read_until_end(&mut client).await;
        end.unwrap();
        assert!(got.is_empty());
        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::Clean);
        assert_eq!((out.upstream_bytes, out.downstream_bytes), (0, 0));
    })
    .await
}

async fn endpoint_reset_after_the_client_half_closed_is_a_reset(kind: Kind) {
    within(async {
        // A request, FIN, then the server crashes while answering: the client
        // (which can no longer send) must still learn it was a crash.
        let (mut client, mut endpoint, relay) = harness(kind).await;
        let request = payload(11, 10_000);
        let (_, (got, end)) = tokio::join!(
            write_all_then(&mut client, &request, true),
            read_until_end(&mut endpoint),
        );
        end.unwrap();
        assert_same(&got, &request, "request");

        let part = payload(12, 70_000);
        let mut got = vec![0u8; part.len()];
        let (_, read) = tokio::join!(
            write_all_then(&mut endpoint, &part, false),
            client.read_exact(&mut got),
        );
        read.unwrap();
        assert_same(&got, &part, "partial response");
        abort(endpoint);

        let (rest, end) = read_until_end(&mut client).await;
        assert_reset(&rest, end, b"", "the half-closed client");

        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::EndpointReset);
        assert_eq!(out.upstream_bytes, request.len() as u64);
        assert_eq!(out.downstream_bytes, part.len() as u64);
    })
    .await
}

async fn client_reset_after_the_endpoint_half_closed_is_a_reset(kind: Kind) {
    within(async {
        // The server finished sending (FIN) and is still reading an upload
        // when the client crashes: the server must not take the partial
        // upload for a complete one.
        let (mut client, mut endpoint, relay) = harness(kind).await;
        let (_, (got, end)) = tokio::join!(
            write_all_then(&mut endpoint, b"ready", true),
            read_until_end(&mut client),
        );
        end.unwrap();
        assert_eq!(got, b"ready");

        let part = payload(13, 50_000);
        let mut got = vec![0u8; part.len()];
        let (_, read) = tokio::join!(
            write_all_then(&mut client, &part, false),
            endpoint.read_exact(&mut got),
        );
        read.unwrap();
        assert_same(&got, &part, "partial upload");
        abort(client);

        let (rest, end) = read_until_end(&mut endpoint).await;
        assert_reset(&rest, end, b"", "the half-closed endpoint");

        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::ClientReset);
        assert_eq!(out.upstream_bytes, part.len() as u64);
        assert_eq!(out.downstream_bytes, 5);
    })
    .await
}

async fn sink_that_stops_reading_loses_nothing(kind: Kind) {
    within(async {
        // 64 MiB is far more than both sockets' kernel buffers and the
        // relay's pipe or scratch buffer can hold, so while the endpoint
        // does not read, the client's writes must stall (back-pressure) and
        // nothing may be dropped or buffered without bound in between.
        let (client, mut endpoint, relay) = harness(kind).await;
        let up = payload(21, 64 * MIB);
        let (mut cr, mut cw) = client.into_split();
        let data = up.clone();
        let mut writer = tokio::spawn(async move {
            cw.write_all(&data).await.unwrap();
            cw.shutdown().await.unwrap();
            cw
        });
        // A bounded negative check (not synchronisation): the writer cannot
        // finish while nobody reads.
        let stalled = tokio::time::timeout(Duration::from_millis(300), &mut writer).await;
        assert!(stalled.is_err(), "64 MiB went through without a reader");
        let seen = relay.observed.up.load(Ordering::Relaxed);
        assert!(
            seen < (64 * MIB) as u64,
            "the relay claims to have forwarded everything"
        );
        let (got, end) = read_until_end(&mut endpoint).await;
        end.unwrap();
        assert_same(&got, &up, "client to endpoint after the stall");
        let _cw = writer.await.unwrap();
        drop(endpoint);
        let mut rest = Vec::new();
        cr.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let out = relay.outcome().await;
        assert_eq!(out.ending, Ending::Clean);
        assert_eq!(out.upstream_bytes, (64 * MIB) as u64);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splice_mode_moves_bytes_without_falling_back() {
    within(async {
        let before = lean::splice_fallbacks();
        let (client, endpoint, relay) = harness(Kind::Lean(Mode::Splice)).await;
        let up = payload(31, 2 * MIB);
        let down = payload(32, 2 * MIB);
        let (at_endpoint, at_client) = tokio::join!(
            tokio::spawn(send_and_receive(endpoint, down.clone())),
            tokio::spawn(send_and_receive(client, up.clone())),
        );
        assert_same(&at_endpoint.unwrap(), &up, "client to endpoint");
        assert_same(&at_client.unwrap(), &down, "endpoint to client");
        assert_eq!(relay.outcome().await.ending, Ending::Clean);
        // Copy-mode cases in this binary never touch the counter.
        assert_eq!(
            lean::splice_fallbacks(),
            before,
            "splice fell back to copying"
        );
    })
    .await
}

/// Every case, for one relay.
macro_rules! cases {
    ($kind:expr) => {
        cases!(
            $kind,
            transfers_8_mib_both_ways_at_once_byte_exact,
            client_half_close_still_gets_the_whole_response,
            endpoint_half_close_still_gets_the_whole_request,
            endpoint_reset_reaches_the_client_as_a_reset,
            endpoint_reset_mid_response_is_not_a_clean_end,
            client_reset_reaches_the_endpoint_as_a_reset,
            counts_bytes_exactly,
            empty_connection_ends_cleanly_with_zero_bytes,
            endpoint_reset_after_the_client_half_closed_is_a_reset,
            client_reset_after_the_endpoint_half_closed_is_a_reset,
            sink_that_stops_reading_loses_nothing,
        );
    };
    ($kind:expr, $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name($kind).await
            }
        )*
    };
}

mod tunnel {
    use super::Kind;
    cases!(Kind::Tunnel);
}

mod copy {
    use super::Kind;
    use ferry::proxy::lean::Mode;
    cases!(Kind::Lean(Mode::Copy));
}

mod splice {
    use super::Kind;
    use ferry::proxy::lean::Mode;
    cases!(Kind::Lean(Mode::Splice));
}
