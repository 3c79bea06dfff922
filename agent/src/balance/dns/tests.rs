//! The refresher against a tiny DNS server on 127.0.0.1 (real wire
//! protocol, parsed and built with hickory-proto), whose answers the tests
//! change while it runs. Changes are awaited with bounded polls.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::balance::{HostnameEndpoint, Registry};
use crate::config::{Locality, Policy};

/// What the server answers, per family.
#[derive(Debug, Clone)]
enum Reply {
    Addrs(Vec<IpAddr>, u32),
    NxDomain,
    NoData,
    ServFail,
}

#[derive(Debug)]
struct Zone {
    v4: Reply,
    v6: Reply,
    /// (arrival, type) of every query for the test name.
    log: Vec<(Instant, RecordType)>,
}

struct Server {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const NAME: &str = "backend.ferry.test";

impl Server {
    async fn start(v4: Reply, v6: Reply) -> Server {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = sock.local_addr().expect("addr");
        let zone = Arc::new(Mutex::new(Zone {
            v4,
            v6,
            log: Vec::new(),
        }));
        let stop = CancellationToken::new();
        let (z, st) = (zone.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = tokio::select! {
                    _ = st.cancelled() => return,
                    r = sock.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let resp = answer(&q, &z);
                if let Ok(bytes) = resp.to_vec() {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        });
        Server { addr, zone, stop }
    }

    fn set(&self, v4: Reply, v6: Reply) {
        let mut z = self.zone.lock().unwrap();
        z.v4 = v4;
        z.v6 = v6;
    }

    fn queries(&self, t: RecordType) -> Vec<Instant> {
        let z = self.zone.lock().unwrap();
        z.log
            .iter()
            .filter(|(_, rt)| *rt == t)
            .map(|(at, _)| *at)
            .collect()
    }
}

fn answer(q: &Message, zone: &Mutex<Zone>) -> Message {
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.message_type = MessageType::Response;
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.metadata.authoritative = true;
    let Some(query) = q.queries.first() else {
        r.metadata.response_code = ResponseCode::FormErr;
        return r;
    };
    r.add_query(query.clone());
    let name = query.name().to_ascii();
    if name.trim_end_matches('.') != NAME {
        r.metadata.response_code = ResponseCode::NXDomain;
        return r;
    }
    let mut z = zone.lock().unwrap();
    z.log.push((Instant::now(), query.query_type()));
    let reply = match query.query_type() {
        RecordType::A => z.v4.clone(),
        RecordType::AAAA => z.v6.clone(),
        _ => Reply::NoData,
    };
    match reply {
        Reply::Addrs(addrs, ttl) => {
            for ip in addrs {
                let data = match ip {
                    IpAddr::V4(a) if query.query_type() == RecordType::A => RData::A(A(a)),
                    IpAddr::V6(a) if query.query_type() == RecordType::AAAA => RData::AAAA(AAAA(a)),
                    _ => continue,
                };
                r.add_answer(Record::from_rdata(query.name().clone(), ttl, data));
            }
        }
        Reply::NxDomain => r.metadata.response_code = ResponseCode::NXDomain,
        Reply::NoData => {}
        Reply::ServFail => r.metadata.response_code = ResponseCode::ServFail,
    }
    r
}

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}
fn v6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last))
}

fn dns_cfg(server: &Server, min_ttl: Duration, negative_ttl: Duration) -> Dns {
    Dns {
        nameservers: Some(vec![server.addr]),
        min_ttl,
        max_ttl: Duration::from_secs(300),
        negative_ttl,
    }
}

fn default_policy() -> Policy {
    let cfg = crate::config::parse(
        "capture: { enabled: false }\nservices:\n  - name: web\n    addresses: [10.96.0.1]\n    ports: [{ port: 80 }]\n    endpoints: [{ hostname: backend.ferry.test }]\n",
        "test",
    )
    .expect("valid");
    cfg.services[0].policy.clone()
}

fn set_with_hostname(registry: &Arc<Registry>) -> Arc<SetBalancer> {
    Arc::new(SetBalancer::new(
        "default/web",
        "default",
        1,
        &Locality::default(),
        &default_policy(),
        registry.clone(),
        vec![("10.9.9.9:80".parse().unwrap(), 1, Locality::default())],
        vec![HostnameEndpoint {
            hostname: NAME.to_owned(),
            port: 8080,
            weight: 3,
            locality: Locality::default(),
        }],
    ))
}

fn addrs(ips: &[IpAddr]) -> HashSet<SocketAddr> {
    let mut s: HashSet<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, 8080)).collect();
    s.insert("10.9.9.9:80".parse().unwrap());
    s
}

/// Polls `cond` every 10ms until it holds, for at most `limit`.
async fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn members_follow_the_answers_with_weight_and_port() {
    let server = Server::start(
        Reply::Addrs(vec![v4(10), v4(11)], 1),
        Reply::Addrs(vec![v6(10)], 1),
    )
    .await;
    let registry = Arc::new(Registry::default());
    let set = set_with_hostname(&registry);
    let state = Arc::new(DnsState::default());
    let stop = CancellationToken::new();
    let cfg = dns_cfg(&server, Duration::from_millis(200), Duration::from_secs(5));
    let task = start([&set], &cfg, &state, &stop).expect("a refresher");

    let want = addrs(&[v4(10), v4(11), v6(10)]);
    until(WAIT, "first answer", || member_addrs(&set) == want).await;
    for m in set.view().members.iter() {
        let w = if m.stats.addr.port() == 8080 { 3 } else { 1 };
        assert_eq!(m.weight, w, "{}", m.stats.addr);
    }
    let gauge = |s: &DnsState| {
        s.metrics
            .endpoints
            .get_or_create(&HostnameLabels {
                service: "default/web".into(),
                hostname: NAME.into(),
            })
            .get()
    };
    assert_eq!(gauge(&state), 3);

    server.set(Reply::Addrs(vec![v4(12)], 1), Reply::Addrs(vec![v6(10)], 1));
    let want = addrs(&[v4(12), v6(10)]);
    until(WAIT, "changed answer", || member_addrs(&set) == want).await;
    assert_eq!(gauge(&state), 2);
    assert!(state.metrics.resolutions("ok") >= 2);
    assert_eq!(state.metrics.resolutions("error"), 0);
    // Picks only return members.
    for _ in 0..100 {
        let m = set.pick(&[]).expect("a member");
        assert!(want.contains(&m.stats.addr));
    }

    stop.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("refresher stops")
        .expect("no panic");
}

#[tokio::test]
async fn ttl_is_honoured_and_clamped_to_min_ttl() {
    // TTL 1s, min_ttl 100ms: re-queried about every second, never sooner.
    let server = Server::start(Reply::Addrs(vec![v4(20)], 1), Reply::NoData).await;
    let registry = Arc::new(Registry::default());
    let set = set_with_hostname(&registry);
    let state = Arc::new(DnsState::default());
    let stop = CancellationToken::new();
    let cfg = dns_cfg(&server, Duration::from_millis(100), Duration::from_secs(5));
    let _task = start([&set], &cfg, &state, &stop).expect("a refresher");
    until(WAIT, "3 A queries (TTL 1s)", || {
        server.queries(RecordType::A).len() >= 3
    })
    .await;
    let q = server.queries(RecordType::A);
    for w in q.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(950),
            "re-queried after {gap:?}, before the 1s TTL"
        );
    }
    // A v4-only name: no AAAA records is not a reason to retry early (the
    // negative TTL is 5s, the A TTL 1s; the schedule follows the A TTL).
    assert!(server.queries(RecordType::AAAA).len() >= 2);
    stop.cancel();

    // TTL 0, min_ttl 700ms: the floor applies.
    server.set(Reply::Addrs(vec![v4(21)], 0), Reply::NoData);
    let before = server.queries(RecordType::A).len();
    let set = set_with_hostname(&registry);
    let state = Arc::new(DnsState::default());
    let stop = CancellationToken::new();
    let cfg = dns_cfg(&server, Duration::from_millis(700), Duration::from_secs(5));
    let _task = start([&set], &cfg, &state, &stop).expect("a refresher");
    until(WAIT, "3 more A queries (TTL 0)", || {
        server.queries(RecordType::A).len() >= before + 3
    })
    .await;
    let q = server.queries(RecordType::A);
    for w in q[before..].windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(650),
            "re-queried after {gap:?}, before min_ttl (700ms)"
        );
    }
    assert_eq!(member_addrs(&set), addrs(&[v4(21)]));
    stop.cancel();
}

#[tokio::test]
async fn resolver_errors_keep_the_last_good_addresses() {
    let server = Server::start(Reply::Addrs(vec![v4(30)], 1), Reply::Addrs(vec![v6(30)], 1)).await;
    let registry = Arc::new(Registry::default());
    let set = set_with_hostname(&registry);
    let state = Arc::new(DnsState::default());
    let stop = CancellationToken::new();
    let cfg = dns_cfg(
        &server,
        Duration::from_millis(100),
        Duration::from_millis(200),
    );
    let _task = start([&set], &cfg, &state, &stop).expect("a refresher");
    let good = addrs(&[v4(30), v6(30)]);
    until(WAIT, "first answer", || member_addrs(&set) == good).await;

    // Both families fail: everything is kept, retried after negative_ttl.
    server.set(Reply::ServFail, Reply::ServFail);
    until(WAIT, "two failed resolutions", || {
        state.metrics.resolutions("error") >= 2
    })
    .await;
    assert_eq!(member_addrs(&set), good);

    // Only IPv6 fails: IPv4 follows its answer, IPv6 keeps the last good.
    server.set(Reply::Addrs(vec![v4(31)], 1), Reply::ServFail);
    let want = addrs(&[v4(31), v6(30)]);
    until(WAIT, "v4 updated, v6 kept", || member_addrs(&set) == want).await;

    // Recovery.
    server.set(Reply::Addrs(vec![v4(31)], 1), Reply::Addrs(vec![v6(31)], 1));
    let want = addrs(&[v4(31), v6(31)]);
    until(WAIT, "recovered", || member_addrs(&set) == want).await;
    stop.cancel();
}

#[tokio::test]
async fn nxdomain_and_empty_answers_remove_the_addresses() {
    let server = Server::start(Reply::Addrs(vec![v4(40)], 1), Reply::Addrs(vec![v6(40)], 1)).await;
    let registry = Arc::new(Registry::default());
    let set = set_with_hostname(&registry);
    let state = Arc::new(DnsState::default());
    let stop = CancellationToken::new();
    let cfg = dns_cfg(
        &server,
        Duration::from_millis(100),
        Duration::from_millis(200),
    );
    let _task = start([&set], &cfg, &state, &stop).expect("a refresher");
    until(WAIT, "first answer", || {
        member_addrs(&set) == addrs(&[v4(40), v6(40)])
    })
    .await;

    server.set(Reply::NxDomain, Reply::NxDomain);
    until(WAIT, "NXDOMAIN removes", || {
        member_addrs(&set) == addrs(&[])
    })
    .await;
    assert!(state.metrics.resolutions("nxdomain") >= 1);

    // Back, then an empty (NOERROR, no records) answer also removes.
    server.set(Reply::Addrs(vec![v4(41)], 1), Reply::NoData);
    until(WAIT, "back", || member_addrs(&set) == addrs(&[v4(41)])).await;
    server.set(Reply::NoData, Reply::NoData);
    until(WAIT, "empty answer removes", || {
        member_addrs(&set) == addrs(&[])
    })
    .await;
    stop.cancel();
}

#[tokio::test]
async fn a_new_snapshot_starts_with_the_known_addresses() {
    let server = Server::start(Reply::Addrs(vec![v4(50)], 300), Reply::NoData).await;
    let registry = Arc::new(Registry::default());
    let state = Arc::new(DnsState::default());
    let cfg = dns_cfg(&server, Duration::from_millis(100), Duration::from_secs(5));

    let old = set_with_hostname(&registry);
    let old_stop = CancellationToken::new();
    let old_task = start([&old], &cfg, &state, &old_stop).expect("a refresher");
    let want = addrs(&[v4(50)]);
    until(WAIT, "first answer", || member_addrs(&old) == want).await;
    let queries = server.queries(RecordType::A).len();

    // A reload: the new set has the addresses before anything is awaited.
    let new = set_with_hostname(&registry);
    assert_eq!(member_addrs(&new), addrs(&[]));
    let new_stop = CancellationToken::new();
    let _new_task = start([&new], &cfg, &state, &new_stop).expect("a refresher");
    assert_eq!(member_addrs(&new), want);
    // The old refresher stops at once, though its snapshot lives on.
    tokio::time::timeout(WAIT, old_task)
        .await
        .expect("old refresher stops")
        .expect("no panic");
    assert!(!old_stop.is_cancelled());
    // ...and the name is not re-resolved before its TTL (300s) because of
    // the reload: a round trip through the server proves the refresher had
    // its chance to query.
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::query();
    q.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii("other.test.").unwrap(),
        RecordType::A,
    ));
    probe
        .send_to(&q.to_vec().unwrap(), server.addr)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    tokio::time::timeout(WAIT, probe.recv_from(&mut buf))
        .await
        .expect("server answers")
        .unwrap();
    assert_eq!(server.queries(RecordType::A).len(), queries);
    new_stop.cancel();
}

#[tokio::test]
async fn resolver_from_system_configuration_builds() {
    // No query is sent; only checks /etc/resolv.conf handling does not fail
    // where one exists.
    if std::path::Path::new("/etc/resolv.conf").exists() {
        resolver(&Dns::default()).expect("system resolver");
    }
}
