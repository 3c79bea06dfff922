//! Balancing and failover, in two levels kept apart (as linkerd2-proxy keeps
//! `distribute` apart from `balance`):
//!
//! 1. **Split** ([`ServiceBalancer::choose_set`]): a service's connections are
//!    divided between its backend sets by weight (smooth weighted round-robin,
//!    so a 80/20 split is exact over every 100 connections).
//! 2. **Balance** ([`SetBalancer::pick`]): inside a set, an endpoint is chosen
//!    by the service's algorithm (P2C over peak-EWMA by default, least
//!    connections, round robin, random; all weighted), preferring the same
//!    node, then zone, then region, spilling over as a level's healthy share
//!    falls (overprovisioning factor), and ignoring health past the panic
//!    threshold.
//!
//! Connect failures feed passive outlier detection ([`endpoint`]); optional
//! active health checks ([`health`]) do the same from probes. Both only flip
//! per-endpoint flags and trigger a rebuild of the set's [`set::View`].

pub mod dns;
pub mod endpoint;
pub mod health;
pub mod sampling;
pub mod set;
pub mod split;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tracing::{info, warn};

pub use endpoint::{ConnectFailure, EndpointMetrics, EndpointStats, FailureVerdict};
pub use set::{Member, View};
pub use split::SmoothWeighted;

use crate::config::{Locality, Policy};

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// Runs `f` with this thread's fast random generator.
pub fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|r| f(&mut r.borrow_mut()))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub service: String,
    pub endpoint: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

/// Per-endpoint and per-service balancing metrics. Endpoint labels are
/// bounded by the configured endpoints; series of removed endpoints are
/// deleted.
#[derive(Debug, Default)]
pub struct BalanceMetrics {
    active: Family<EndpointLabels, Gauge>,
    attempts: Family<EndpointLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    healthy: Family<EndpointLabels, Gauge>,
    pub retries: Family<ServiceLabel, Counter>,
    pub exhausted: Family<ServiceLabel, Counter>,
}

impl BalanceMetrics {
    pub fn register(self: &Arc<Self>, r: &mut PromRegistry) {
        r.register(
            "ferry_endpoint_active_connections",
            "Connections open to the endpoint now",
            self.active.clone(),
        );
        r.register(
            "ferry_endpoint_connect_attempts",
            "Connect attempts to the endpoint",
            self.attempts.clone(),
        );
        r.register(
            "ferry_endpoint_connect_failures",
            "Failed connect attempts, by reason (refused, unreachable, timeout, other)",
            self.failures.clone(),
        );
        r.register(
            "ferry_endpoint_ejections",
            "Times outlier detection ejected the endpoint",
            self.ejections.clone(),
        );
        r.register(
            "ferry_endpoint_healthy",
            "1 when the endpoint takes traffic (not ejected, passing health checks)",
            self.healthy.clone(),
        );
        r.register(
            "ferry_connect_retries",
            "Connect attempts after the first, per service",
            self.retries.clone(),
        );
        r.register(
            "ferry_connect_exhausted",
            "Client connections refused because no endpoint could be connected",
            self.exhausted.clone(),
        );
    }

    fn endpoint(&self, service: &str, addr: SocketAddr) -> EndpointMetrics {
        let l = EndpointLabels {
            service: service.to_owned(),
            endpoint: addr.to_string(),
        };
        let f = |reason: &'static str| {
            self.failures
                .get_or_create(&FailureLabels {
                    service: l.service.clone(),
                    endpoint: l.endpoint.clone(),
                    reason,
                })
                .clone()
        };
        let failures_refused = f("refused");
        let failures_unreachable = f("unreachable");
        let failures_timeout = f("timeout");
        let failures_other = f("other");
        let active = self.active.get_or_create(&l).clone();
        let attempts = self.attempts.get_or_create(&l).clone();
        let ejections = self.ejections.get_or_create(&l).clone();
        let healthy = self.healthy.get_or_create(&l).clone();
        EndpointMetrics {
            active,
            attempts,
            failures_refused,
            failures_unreachable,
            failures_timeout,
            failures_other,
            ejections,
            healthy,
        }
    }

    fn forget(&self, service: &str, addr: SocketAddr) {
        let l = EndpointLabels {
            service: service.to_owned(),
            endpoint: addr.to_string(),
        };
        self.active.remove(&l);
        self.attempts.remove(&l);
        self.ejections.remove(&l);
        self.healthy.remove(&l);
        for reason in ["refused", "unreachable", "timeout", "other"] {
            self.failures.remove(&FailureLabels {
                service: l.service.clone(),
                endpoint: l.endpoint.clone(),
                reason,
            });
        }
    }
}

/// Endpoint state that outlives snapshots: an endpoint present before and
/// after a reload keeps its connections count, latency and ejection.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<(String, SocketAddr), Arc<EndpointStats>>>,
    pub metrics: Arc<BalanceMetrics>,
}

impl Registry {
    pub fn new(metrics: Arc<BalanceMetrics>) -> Registry {
        Registry {
            map: Mutex::default(),
            metrics,
        }
    }

    fn get(&self, service: &str, addr: SocketAddr, locality: &Locality) -> Arc<EndpointStats> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (service.to_owned(), addr);
        if let Some(s) = m.get(&key)
            && s.locality == *locality
        {
            return s.clone();
        }
        let s = Arc::new(EndpointStats::new(
            addr,
            locality.clone(),
            self.metrics.endpoint(service, addr),
        ));
        m.insert(key, s.clone());
        s
    }

    /// Drops state (and metric series) of endpoints that are neither in
    /// `live` (the configured addresses) nor held by any set (resolved
    /// hostnames of a snapshot still in use).
    pub fn retain_static(&self, live: &HashSet<(String, SocketAddr)>) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|k, v| {
            let keep = live.contains(k) || Arc::strong_count(v) > 1;
            if !keep {
                self.metrics.forget(&k.0, k.1);
            }
            keep
        });
    }
}

/// An endpoint given by DNS name: every resolved address is a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostnameEndpoint {
    pub hostname: String,
    pub port: u16,
    pub weight: u32,
    pub locality: Locality,
}

/// One backend set of one service port.
#[derive(Debug)]
pub struct SetBalancer {
    pub name: String,
    pub weight: u32,
    service: String,
    local: Locality,
    policy: Policy,
    registry: Arc<Registry>,
    statics: Vec<(SocketAddr, u32, Locality)>,
    hostnames: Vec<HostnameEndpoint>,
    resolved: Mutex<Vec<Vec<IpAddr>>>,
    view: set::ViewCell,
}

impl SetBalancer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        service: &str,
        name: &str,
        weight: u32,
        local: &Locality,
        policy: &Policy,
        registry: Arc<Registry>,
        statics: Vec<(SocketAddr, u32, Locality)>,
        hostnames: Vec<HostnameEndpoint>,
    ) -> SetBalancer {
        let resolved = vec![Vec::new(); hostnames.len()];
        let members = Arc::new(
            statics
                .iter()
                .map(|(addr, w, loc)| Member {
                    stats: registry.get(service, *addr, loc),
                    weight: *w,
                })
                .collect::<Vec<_>>(),
        );
        let view = View::build(members, local, &policy.locality, policy.algorithm);
        SetBalancer {
            name: name.to_owned(),
            weight,
            service: service.to_owned(),
            local: local.clone(),
            policy: policy.clone(),
            registry,
            statics,
            hostnames,
            resolved: Mutex::new(resolved),
            view: set::ViewCell::new(view),
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The current view (members, levels, panic).
    pub fn view(&self) -> arc_swap::Guard<Arc<View>> {
        self.view.load()
    }

    /// Every member address (for registry pruning).
    pub fn member_addrs(&self) -> Vec<SocketAddr> {
        self.view
            .load()
            .members
            .iter()
            .map(|m| m.stats.addr)
            .collect()
    }

    /// The hostname endpoints, for the DNS refresher.
    pub fn hostnames(&self) -> &[HostnameEndpoint] {
        &self.hostnames
    }

    /// Replaces the addresses hostname `idx` resolves to; rebuilds when
    /// they changed. An empty list (NXDOMAIN, no records) removes them.
    pub fn set_resolved(&self, idx: usize, mut addrs: Vec<IpAddr>) {
        addrs.sort();
        addrs.dedup();
        {
            let mut r = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
            let Some(slot) = r.get_mut(idx) else { return };
            if *slot == addrs {
                return;
            }
            *slot = addrs;
        }
        self.rebuild_members();
    }

    fn rebuild_members(&self) {
        let resolved = self
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut members: Vec<Member> = Vec::new();
        let mut seen = HashSet::new();
        for (addr, w, loc) in &self.statics {
            if seen.insert(*addr) {
                members.push(Member {
                    stats: self.registry.get(&self.service, *addr, loc),
                    weight: *w,
                });
            }
        }
        for (h, ips) in self.hostnames.iter().zip(resolved) {
            for ip in ips {
                let addr = SocketAddr::new(ip, h.port);
                if seen.insert(addr) {
                    members.push(Member {
                        stats: self.registry.get(&self.service, addr, &h.locality),
                        weight: h.weight,
                    });
                }
            }
        }
        self.view.store(View::build(
            Arc::new(members),
            &self.local,
            &self.policy.locality,
            self.policy.algorithm,
        ));
    }

    /// Rebuilds the view from the current members' health.
    pub fn rebuild(&self) {
        let members = self.view.load().members.clone();
        self.view.store(View::build(
            members,
            &self.local,
            &self.policy.locality,
            self.policy.algorithm,
        ));
    }

    /// Picks an endpoint whose address is not in `tried`.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Member> {
        let view = self.view.load();
        let i = with_rng(|rng| view.pick(self.policy.algorithm, tried, rng))?;
        Some(view.members[i as usize].clone())
    }

    /// Records a successful connect.
    pub fn report_success(&self, m: &Member, rtt: Duration) {
        m.stats.on_success(rtt, &self.policy.outlier);
    }

    /// Records a failed connect and ejects the endpoint if outlier detection
    /// says so and the set's maximum ejection percentage allows it.
    pub fn report_failure(&self, m: &Member, why: ConnectFailure) {
        if m.stats.on_failure(why, &self.policy.outlier) != FailureVerdict::Eject {
            return;
        }
        let view = self.view.load();
        let total = view.members.len() as u64;
        let ejected = view.members.iter().filter(|x| x.stats.is_ejected()).count() as u64;
        let max = u64::from(self.policy.outlier.max_ejection_percent);
        if ejected > 0 && (ejected + 1) * 100 > max * total {
            warn!(
                service = %self.service,
                endpoint = %m.stats.addr,
                ejected,
                total,
                max_ejection_percent = max,
                "not ejecting: the set is at its maximum ejection percentage"
            );
            return;
        }
        let time = m.stats.eject(&self.policy.outlier, Instant::now());
        warn!(
            service = %self.service,
            endpoint = %m.stats.addr,
            ejection_time = ?time,
            reason = why.reason(),
            "endpoint ejected"
        );
        drop(view);
        self.rebuild();
    }

    /// Ends ejections whose time is up (the endpoints go on trial).
    pub fn expire_ejections(&self, now: Instant) {
        let view = self.view.load();
        let mut changed = false;
        for m in view.members.iter() {
            if m.stats.expire(now) {
                info!(service = %self.service, endpoint = %m.stats.addr, "ejection over: endpoint on trial");
                changed = true;
            }
        }
        drop(view);
        if changed {
            self.rebuild();
        }
    }
}

/// Balancing for one service port: the split between sets, then each set.
#[derive(Debug)]
pub struct ServiceBalancer {
    pub key: String,
    pub policy: Policy,
    split: SmoothWeighted,
    pub sets: Vec<Arc<SetBalancer>>,
}

impl ServiceBalancer {
    pub fn new(key: &str, policy: &Policy, sets: Vec<Arc<SetBalancer>>) -> ServiceBalancer {
        let weights: Vec<u32> = sets.iter().map(|s| s.weight).collect();
        ServiceBalancer {
            key: key.to_owned(),
            policy: policy.clone(),
            split: SmoothWeighted::new(&weights),
            sets,
        }
    }

    /// The set the next connection goes to.
    pub fn choose_set(&self) -> Option<&Arc<SetBalancer>> {
        self.split.pick().map(|i| &self.sets[i])
    }
}
#[cfg(test)]
mod tests;
