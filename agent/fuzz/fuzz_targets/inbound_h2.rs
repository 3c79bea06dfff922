//! The inbound tunnel after the TLS handshake: arbitrary bytes from an
//! authenticated peer (after the HTTP/2 preface) into the same
//! `Inbound::serve_h2` Ferry runs, with a policy that refuses everything
//! before any connect, so the target never opens a socket. It must not
//! panic and must finish (time is paused and auto-advances, so timeouts
//! fire at once when nothing else can happen).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry::hbone::inbound::Inbound;
use ferry::state::{Snapshot, State};
use ferry::tls::{Identity, LocalCa, TlsContext};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct Fixture {
    rt: tokio::runtime::Runtime,
    inbound: Arc<Inbound>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        // One local workload (127.0.0.2, default/default) and a deny-all
        // policy: requests are parsed, looked up and refused.
        let cfg = ferry::config::parse(
            "capture: { enabled: false }
workloads: [{ address: 127.0.0.2 }]
authorization: { rules: [{ action: deny }] }
",
            "fuzz",
        )
        .expect("fuzz config");
        let ca = Arc::new(LocalCa::generate("cluster.local").expect("CA"));
        let tls = Arc::new(
            TlsContext::new("cluster.local", ca, vec![], Duration::from_secs(3600)).expect("tls"),
        );
        let metrics = Arc::new(ferry::metrics::Metrics::new("fuzz"));
        let inbound = Arc::new(Inbound {
            tls,
            state: Arc::new(State::new(Snapshot::new(&cfg))),
            metrics: metrics.hbone.clone(),
            bypass_mark: 0,
            connect_timeout: Duration::from_millis(1),
            max_streams: 16,
        });
        Fixture { rt, inbound }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let source = Identity::new("cluster.local", "fuzz", "client").expect("identity");
    let local = Identity::new("cluster.local", "default", "default").expect("identity");
    f.rt.block_on(async {
        let (peer, server) = tokio::io::duplex(64 * 1024);
        let tracker = TaskTracker::new();
        let kill = CancellationToken::new();
        let serve = tokio::spawn(f.inbound.clone().serve_h2(
            server,
            source,
            local,
            tracker.clone(),
            kill.clone(),
        ));
        let (mut from_server, mut to_server) = tokio::io::split(peer);
        // Take whatever the server answers so it never blocks on a full pipe.
        let drain = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut tokio::io::sink()).await;
        });
        let write = async {
            to_server.write_all(PREFACE).await?;
            to_server.write_all(data).await?;
            to_server.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
        drain.abort();
        kill.cancel();
        tracker.close();
        tracker.wait().await;
    });
});
