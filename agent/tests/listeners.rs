//! The outbound listeners: one per worker with SO_REUSEPORT, sharing one
//! port, and the kernel spreads new connections over all of them.

use std::time::Duration;

use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_every_listener() {
    let listeners = ferry::proxy::bind_many("127.0.0.1:0".parse().unwrap(), 4).unwrap();
    assert_eq!(listeners.len(), 4);
    let port = listeners[0].local_addr().unwrap().port();
    assert_ne!(port, 0);
    for l in &listeners {
        assert_eq!(l.local_addr().unwrap().port(), port, "one port for all");
    }
    // 400 connections from distinct source ports: the flow hash puts some
    // on every listener (all on fewer than 4 would have odds below 4e-50).
    const N: usize = 400;
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N {
        clients.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    let mut per_listener = [0usize; 4];
    let mut total = 0;
    // Every connection is complete in some listener's queue; drain them all.
    while total < N {
        let mut progressed = false;
        for (i, l) in listeners.iter().enumerate() {
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::ZERO, l.accept()).await {
                per_listener[i] += 1;
                total += 1;
                progressed = true;
            }
        }
        if !progressed {
            // Bounded: the connections are already established, so every
            // accept is immediate; wait for readiness on any listener.
            let accepted = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::select! {
                    r = listeners[0].accept() => (0, r),
                    r = listeners[1].accept() => (1, r),
                    r = listeners[2].accept() => (2, r),
                    r = listeners[3].accept() => (3, r),
                }
            })
            .await
            .expect("a connection was lost between the listeners");
            accepted.1.unwrap();
            per_listener[accepted.0] += 1;
            total += 1;
        }
    }
    assert_eq!(total, N);
    assert!(
        per_listener.iter().all(|&n| n > 0),
        "some listener got nothing: {per_listener:?}"
    );
}

#[tokio::test]
async fn a_port_in_use_without_reuseport_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    assert!(ferry::proxy::bind_many(addr, 2).is_err());
}
