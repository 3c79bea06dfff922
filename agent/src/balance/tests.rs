//! Unit tests of the balancing algorithms, locality, panic, outlier
//! detection and failover exclusion. Random draws use fixed seeds; shares
//! are checked against bounds several standard deviations wide.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::endpoint::{ConnectFailure, EndpointStats, OutlierPhase};
use super::set::{Member, View};
use super::*;
use crate::config::{Algorithm, Locality, LocalityPolicy, Outlier, Policy};

const ALGOS: [Algorithm; 4] = [
    Algorithm::P2cPeakEwma,
    Algorithm::LeastConnections,
    Algorithm::RoundRobin,
    Algorithm::Random,
];

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)),
        8080,
    )
}

fn loc(node: &str, zone: &str, region: &str) -> Locality {
    Locality {
        node: Some(node.into()),
        zone: Some(zone.into()),
        region: Some(region.into()),
    }
}

fn members(weights: &[u32], locality: &Locality) -> Arc<Vec<Member>> {
    Arc::new(
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Member {
                stats: Arc::new(EndpointStats::new(
                    addr(i),
                    locality.clone(),
                    EndpointMetrics::default(),
                )),
                weight: *w,
            })
            .collect(),
    )
}

fn lp() -> LocalityPolicy {
    LocalityPolicy {
        overprovisioning_factor: 1.4,
        panic_threshold_percent: 50,
    }
}

fn shares(view: &View, algo: Algorithm, picks: usize, seed: u64) -> Vec<f64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut n = vec![0usize; view.members.len()];
    for _ in 0..picks {
        let i = view.pick(algo, &[], &mut rng).expect("an endpoint");
        n[i as usize] += 1;
    }
    n.iter().map(|c| *c as f64 * 100.0 / picks as f64).collect()
}

#[test]
fn every_algorithm_follows_weights_when_idle() {
    let here = loc("n1", "z1", "r1");
    for weights in [vec![60, 30, 10], vec![1, 1, 1, 1], vec![5, 1, 1, 3, 10]] {
        let total: u32 = weights.iter().sum();
        for algo in ALGOS {
            let view = View::build(members(&weights, &here), &here, &lp(), algo);
            let got = shares(&view, algo, 200_000, 7);
            for (i, w) in weights.iter().enumerate() {
                let want = f64::from(*w) * 100.0 / f64::from(total);
                // 200k draws: one standard deviation is at most 0.12 points.
                assert!(
                    (got[i] - want).abs() < 0.75,
                    "{algo:?} weights {weights:?}: endpoint {i} got {:.2}% want {want:.2}%",
                    got[i]
                );
            }
        }
    }
}

#[test]
fn large_sets_follow_weights() {
    // Past 16 endpoints least connections switches to two choices; all
    // algorithms still follow weights when idle.
    let here = loc("n1", "z1", "r1");
    let weights: Vec<u32> = (0..1000)
        .map(|i| if i % 10 == 0 { 10 } else { 1 })
        .collect();
    let heavy_share = 100.0 * 100.0 * 10.0 / (100.0 * 10.0 + 900.0);
    for algo in ALGOS {
        let view = View::build(members(&weights, &here), &here, &lp(), algo);
        let got = shares(&view, algo, 400_000, 11);
        let heavy: f64 = got.iter().step_by(10).sum();
        assert!(
            (heavy - heavy_share).abs() < 1.0,
            "{algo:?}: heavy endpoints got {heavy:.2}%, want {heavy_share:.2}%"
        );
    }
}

#[test]
fn round_robin_is_exact_and_spread() {
    let here = loc("n1", "z1", "r1");
    let view = View::build(members(&[3, 1], &here), &here, &lp(), Algorithm::RoundRobin);
    let mut rng = SmallRng::seed_from_u64(1);
    let seq: Vec<u32> = (0..8)
        .map(|_| view.pick(Algorithm::RoundRobin, &[], &mut rng).unwrap())
        .collect();
    assert_eq!(seq.iter().filter(|i| **i == 0).count(), 6);
    // Never the light endpoint twice in a row.
    assert!(seq.windows(2).all(|w| !(w[0] == 1 && w[1] == 1)), "{seq:?}");
    let equal = View::build(
        members(&[1, 1, 1], &here),
        &here,
        &lp(),
        Algorithm::RoundRobin,
    );
    let seq: Vec<u32> = (0..6)
        .map(|_| equal.pick(Algorithm::RoundRobin, &[], &mut rng).unwrap())
        .collect();
    assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn p2c_prefers_the_faster_and_less_busy_endpoint() {
    let here = loc("n1", "z1", "r1");
    let ms = members(&[1, 1], &here);
    let outlier = Outlier::default();
    ms[0].stats.on_success(Duration::from_millis(1), &outlier);
    ms[1].stats.on_success(Duration::from_millis(20), &outlier);
    let view = View::build(ms.clone(), &here, &lp(), Algorithm::P2cPeakEwma);
    let got = shares(&view, Algorithm::P2cPeakEwma, 10_000, 3);
    assert!(got[0] > 99.0, "fast endpoint share {got:?}");
    // Random ignores load.
    let random = shares(&view, Algorithm::Random, 10_000, 3);
    assert!((random[0] - 50.0).abs() < 3.0, "{random:?}");
    // Active connections count too: 30 open on the fast one outweigh 20x.
    let _guards: Vec<_> = (0..30).map(|_| ms[0].stats.begin()).collect();
    let got = shares(&view, Algorithm::P2cPeakEwma, 10_000, 3);
    assert!(got[1] > 99.0, "{got:?}");
}

#[test]
fn least_connections_picks_the_least_loaded_per_weight() {
    let here = loc("n1", "z1", "r1");
    let ms = members(&[1, 2, 1], &here);
    let _a: Vec<_> = (0..4).map(|_| ms[0].stats.begin()).collect();
    let _b: Vec<_> = (0..4).map(|_| ms[1].stats.begin()).collect();
    let _c: Vec<_> = (0..3).map(|_| ms[2].stats.begin()).collect();
    // active/weight: 4, 2, 3 -> endpoint 1.
    let view = View::build(ms, &here, &lp(), Algorithm::LeastConnections);
    let got = shares(&view, Algorithm::LeastConnections, 1000, 5);
    assert_eq!(got[1], 100.0, "{got:?}");
}

#[test]
fn peak_ewma_jumps_up_and_decays_down() {
    let here = loc("n1", "z1", "r1");
    let ms = members(&[1], &here);
    let st = &ms[0].stats;
    let o = Outlier::default();
    assert_eq!(st.ewma_ns(), endpoint::DEFAULT_RTT_NS);
    // (Reads decay toward zero with time, so compare with a tolerance.)
    let near = |v: f64, want: f64| (v - want).abs() < want * 0.01;
    st.on_success(Duration::from_millis(2), &o);
    assert!(near(st.ewma_ns(), 2_000_000.0), "{}", st.ewma_ns());
    st.on_success(Duration::from_millis(50), &o);
    assert!(near(st.ewma_ns(), 50_000_000.0), "a peak is taken at once");
    st.on_success(Duration::from_millis(1), &o);
    let after = st.ewma_ns();
    assert!(after < 50_000_000.0 && after > 1_000_000.0, "{after}");
}

fn eight_by_locality() -> (Locality, Arc<Vec<Member>>) {
    let here = loc("n1", "z1", "r1");
    let locs = [
        loc("n1", "z1", "r1"),
        loc("n1", "z1", "r1"),
        loc("n2", "z1", "r1"),
        loc("n2", "z1", "r1"),
        loc("n3", "z2", "r1"),
        loc("n3", "z2", "r1"),
        loc("n4", "z9", "r9"),
        loc("n4", "z9", "r9"),
    ];
    let ms = Arc::new(
        locs.iter()
            .enumerate()
            .map(|(i, l)| Member {
                stats: Arc::new(EndpointStats::new(
                    addr(i),
                    l.clone(),
                    EndpointMetrics::default(),
                )),
                weight: 1,
            })
            .collect::<Vec<_>>(),
    );
    (here, ms)
}

#[test]
fn locality_prefers_node_then_zone_then_region_and_spills_by_health() {
    let (here, ms) = eight_by_locality();
    let o = Outlier::default();
    let now = Instant::now();
    let build = || View::build(ms.clone(), &here, &lp(), Algorithm::Random);
    assert_eq!(build().level_loads(), vec![(0, 10_000)]);
    // One of two node-local endpoints out: 1.4 x 50% = 70% stays local.
    ms[0].stats.eject(&o, now);
    assert_eq!(build().level_loads(), vec![(0, 7_000), (1, 3_000)]);
    // Both out: the zone takes all.
    ms[1].stats.eject(&o, now);
    assert_eq!(build().level_loads(), vec![(1, 10_000)]);
    // The zone too: the region.
    ms[2].stats.eject(&o, now);
    ms[3].stats.eject(&o, now);
    let v = build();
    assert_eq!(v.level_loads(), vec![(2, 10_000)]);
    assert!(!v.panic);
    // Picks follow the loads.
    let got = shares(&v, Algorithm::Random, 10_000, 9);
    assert_eq!(got[4] + got[5], 100.0, "{got:?}");
    // Recovery brings traffic back to the node.
    let later = now + Duration::from_secs(3600);
    for m in ms.iter() {
        m.stats.expire(later);
    }
    assert_eq!(build().level_loads(), vec![(0, 10_000)]);
}

#[test]
fn panic_threshold_uses_every_endpoint() {
    let here = loc("n1", "z1", "r1");
    let o = Outlier::default();
    let ms = members(&[1, 1, 1], &here);
    ms[0].stats.eject(&o, Instant::now());
    ms[1].stats.eject(&o, Instant::now());
    // 1.4 x 1/3 = 47% < 50%: panic, health ignored.
    let v = View::build(ms.clone(), &here, &lp(), Algorithm::Random);
    assert!(v.panic);
    let got = shares(&v, Algorithm::Random, 30_000, 2);
    assert!(got.iter().all(|s| (s - 33.3).abs() < 2.0), "{got:?}");
    // With the threshold at 0 there is no panic: only the healthy one.
    let no_panic = LocalityPolicy {
        overprovisioning_factor: 1.4,
        panic_threshold_percent: 0,
    };
    let v = View::build(ms.clone(), &here, &no_panic, Algorithm::Random);
    assert!(!v.panic);
    let got = shares(&v, Algorithm::Random, 1000, 2);
    assert_eq!(got[2], 100.0, "{got:?}");
}

fn set_with(weights: &[u32], outlier: Outlier) -> SetBalancer {
    let here = loc("n1", "z1", "r1");
    let policy = Policy {
        algorithm: Algorithm::Random,
        locality: LocalityPolicy {
            overprovisioning_factor: 1.4,
            panic_threshold_percent: 0,
        },
        failover: crate::config::Failover {
            max_connect_attempts: 3,
            connect_timeout: Duration::from_secs(1),
            budget: Duration::from_secs(5),
        },
        outlier,
        health_check: None,
    };
    let statics = weights
        .iter()
        .enumerate()
        .map(|(i, w)| (addr(i), *w, here.clone()))
        .collect();
    SetBalancer::new(
        "default/web",
        "default",
        1,
        &here,
        &policy,
        Arc::new(Registry::default()),
        statics,
        Vec::new(),
    )
}

#[test]
fn consecutive_failures_eject_with_growing_capped_time_and_trial() {
    let o = Outlier {
        consecutive_failures: 3,
        failure_rate_percent: 0,
        base_ejection_time: Duration::from_secs(10),
        max_ejection_time: Duration::from_secs(25),
        ..Outlier::default()
    };
    let set = set_with(&[1, 1, 1, 1], o);
    let m = set.view().members[0].clone();
    set.report_failure(&m, ConnectFailure::Refused);
    set.report_failure(&m, ConnectFailure::Refused);
    assert!(!m.stats.is_ejected());
    let t0 = Instant::now();
    set.report_failure(&m, ConnectFailure::Refused);
    assert!(m.stats.is_ejected());
    let until = m.stats.ejected_until().unwrap();
    assert!(
        until >= t0 + Duration::from_secs(10) && until <= Instant::now() + Duration::from_secs(10)
    );
    // No picks while ejected.
    for _ in 0..1000 {
        assert_ne!(set.pick(&[]).unwrap().stats.addr, m.stats.addr);
    }
    // Not before its time...
    set.expire_ejections(t0 + Duration::from_secs(9));
    assert!(m.stats.is_ejected());
    // ...then on trial; one failure ejects it again, for 2 x base.
    set.expire_ejections(until);
    assert_eq!(m.stats.phase(), OutlierPhase::Trial);
    assert!(!m.stats.is_ejected());
    let t1 = Instant::now();
    set.report_failure(&m, ConnectFailure::Timeout);
    let until2 = m.stats.ejected_until().unwrap();
    assert!(until2 >= t1 + Duration::from_secs(20));
    // Third ejection is capped at max_ejection_time (25s, not 30s).
    set.expire_ejections(until2);
    let t2 = Instant::now();
    set.report_failure(&m, ConnectFailure::Refused);
    let until3 = m.stats.ejected_until().unwrap();
    assert!(until3 >= t2 + Duration::from_secs(25) && until3 < t2 + Duration::from_secs(26));
    // A trial success restores it fully.
    set.expire_ejections(until3);
    set.report_success(&m, Duration::from_millis(1));
    assert_eq!(m.stats.phase(), OutlierPhase::Active);
}

#[test]
fn failure_rate_ejects() {
    let o = Outlier {
        consecutive_failures: 1000,
        failure_rate_percent: 50,
        failure_rate_minimum: 10,
        ..Outlier::default()
    };
    let set = set_with(&[1, 1, 1, 1], o);
    let m = set.view().members[1].clone();
    for i in 0..10 {
        if i % 2 == 0 {
            set.report_success(&m, Duration::from_millis(1));
        } else {
            set.report_failure(&m, ConnectFailure::Refused);
        }
        // Below the minimum number of connects: never ejected.
        if i < 9 {
            assert!(!m.stats.is_ejected(), "after {} connects", i + 1);
        }
    }
    assert!(m.stats.is_ejected(), "50% of 10 failed");
}

#[test]
fn maximum_ejection_percentage_is_honoured() {
    let o = Outlier {
        consecutive_failures: 1,
        max_ejection_percent: 50,
        ..Outlier::default()
    };
    let set = set_with(&[1, 1, 1, 1, 1], o);
    let ms = set.view().members.clone();
    for m in ms.iter() {
        set.report_failure(m, ConnectFailure::Refused);
    }
    // 50% of 5 = 2.5: two ejected, the other three kept.
    assert_eq!(ms.iter().filter(|m| m.stats.is_ejected()).count(), 2);
    // One endpoint can always be ejected, even when the percentage is below
    // one endpoint's share.
    let o = Outlier {
        consecutive_failures: 1,
        max_ejection_percent: 10,
        ..Outlier::default()
    };
    let set = set_with(&[1, 1, 1], o);
    let ms = set.view().members.clone();
    for m in ms.iter() {
        set.report_failure(m, ConnectFailure::Refused);
    }
    assert_eq!(ms.iter().filter(|m| m.stats.is_ejected()).count(), 1);
}

#[test]
fn failover_never_repeats_a_tried_endpoint() {
    let set = set_with(&[5, 1, 1], Outlier::default());
    for _ in 0..100 {
        let mut tried = Vec::new();
        while let Some(m) = set.pick(&tried) {
            assert!(!tried.contains(&m.stats.addr));
            tried.push(m.stats.addr);
        }
        assert_eq!(tried.len(), 3);
    }
}

#[test]
fn health_check_verdicts_take_endpoints_out_and_back() {
    let set = set_with(&[1, 1], Outlier::default());
    let ms = set.view().members.clone();
    assert!(ms[0].stats.set_health(false));
    set.rebuild();
    for _ in 0..200 {
        assert_eq!(set.pick(&[]).unwrap().stats.addr, ms[1].stats.addr);
    }
    assert!(ms[0].stats.set_health(true));
    set.rebuild();
    let hits = (0..1000)
        .filter(|_| set.pick(&[]).unwrap().stats.addr == ms[0].stats.addr)
        .count();
    assert!((400..600).contains(&hits), "{hits}");
}

#[test]
fn reload_keeps_endpoint_state() {
    let cfg = crate::config::parse(
        r#"
capture: { enabled: false }
services:
  - name: web
    addresses: [10.96.0.20]
    ports: [{ port: 80, target_port: 8080 }]
    endpoints: [{ address: 10.1.0.5 }, { address: 10.1.0.6 }]
"#,
        "test",
    )
    .unwrap();
    let registry = Arc::new(Registry::default());
    let a = crate::state::Snapshot::build(&cfg, &registry);
    let m = a.sets().next().unwrap().view().members[0].clone();
    m.stats.eject(&Outlier::default(), Instant::now());
    let b = crate::state::Snapshot::build(&cfg, &registry);
    let m2 = b.sets().next().unwrap().view().members[0].clone();
    assert!(Arc::ptr_eq(&m.stats, &m2.stats));
    assert!(m2.stats.is_ejected());
}

#[test]
fn split_between_sets_is_exact() {
    let cfg = crate::config::parse(
        r#"
capture: { enabled: false }
services:
  - name: reviews
    addresses: [10.96.0.30]
    ports: [{ port: 80 }]
    backend_sets:
      - { name: v1, weight: 80, endpoints: [{ address: 10.1.0.5 }] }
      - { name: v2, weight: 20, endpoints: [{ address: 10.1.0.6 }, { address: 10.1.0.7 }] }
"#,
        "test",
    )
    .unwrap();
    let snap = crate::state::Snapshot::new(&cfg);
    let t = snap.lookup("10.96.0.30:80".parse().unwrap()).unwrap();
    let mut v2 = 0;
    for _ in 0..1000 {
        if t.port.balancer.choose_set().unwrap().name == "v2" {
            v2 += 1;
        }
    }
    assert_eq!(v2, 200);
}
