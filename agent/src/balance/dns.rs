//! Hostname endpoints: every address a DNS name resolves to is a member of
//! the set, with the hostname endpoint's port, weight and locality.
//!
//! One refresher per snapshot ([`start`]) resolves every distinct hostname
//! of every set with hickory-resolver, A and AAAA queried side by side, and
//! re-resolves each name when its records expire: the smallest TTL of the
//! answer, clamped to `[dns.min_ttl, dns.max_ttl]`.
//!
//! * A resolver failure (timeout, SERVFAIL, refused, ...) keeps the last good
//!   addresses of that address family, logs a warning and retries after
//!   `dns.negative_ttl`: a broken resolver never empties a set.
//! * NXDOMAIN, or an answer without records, removes the name's addresses
//!   (of that family); when neither family has any, the name is retried after
//!   `dns.negative_ttl`.
//! * The two families are queried and judged separately (not with
//!   `lookup_ip`, which would turn "AAAA timed out, A answered" into "the name
//!   has no IPv6 addresses" and drop them).
//!
//! **Reloads.** The last good answer of every name (and when it is due again)
//! is kept in [`DnsState`], which outlives snapshots. [`start`] copies those
//! addresses into the new snapshot's sets *synchronously*, before the
//! snapshot is published, so a reload never blanks a hostname's endpoints,
//! and the new refresher re-resolves each name when its old answer expires
//! (not all at once). Starting a refresher stops the previous snapshot's: a
//! replaced snapshot stays alive while connections hold it, but it takes no
//! new connections, so it needs no fresh DNS. A name seen for the first time
//! (at start-up, or added by a reload) is resolved at once; until the answer
//! arrives its set has no members from it.
//!
//! **Capture.** Queries go over UDP (TCP only for truncated answers); capture
//! only redirects TCP `connect()`s to configured service addresses, and the
//! configuration rejects a nameserver that is a service address, so Ferry's
//! own DNS traffic is never captured.
//!
//! Names are looked up as configured: with the system configuration the
//! search domains and `ndots` of `/etc/resolv.conf` apply, as for any process
//! on the node; with `dns.nameservers` there are no search domains.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::SetBalancer;
use crate::config::Dns;

/// Errors of the DNS refresher.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}")]
    SystemConfig(#[source] NetError),
    #[error("cannot build the DNS resolver: {0}")]
    Build(#[source] NetError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, `error` or `nxdomain`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostnameLabels {
    pub service: String,
    pub hostname: String,
}

/// DNS metrics. Hostname labels are bounded by the configured hostnames;
/// series of hostnames no longer configured are removed on reload.
#[derive(Debug, Default)]
pub struct DnsMetrics {
    pub resolutions: Family<ResultLabel, Counter>,
    pub endpoints: Family<HostnameLabels, Gauge>,
}

impl DnsMetrics {
    pub fn register(&self, r: &mut PromRegistry) {
        r.register(
            "ferry_dns_resolutions",
            "Resolutions of hostname endpoints (A and AAAA of one name), by result: ok, error (resolver failure: last good addresses kept), nxdomain (no such name or no records: addresses removed)",
            self.resolutions.clone(),
        );
        r.register(
            "ferry_dns_endpoints",
            "Addresses a hostname endpoint resolves to now, per service",
            self.endpoints.clone(),
        );
    }

    fn count(&self, result: &'static str) {
        self.resolutions
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The counter value for one result (tests, diagnostics).
    pub fn resolutions(&self, result: &'static str) -> u64 {
        self.resolutions
            .get_or_create(&ResultLabel { result })
            .get()
    }
}

/// The last good answer for a name.
#[derive(Debug, Clone, Default)]
struct Cached {
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
    /// When the name is to be resolved again.
    due: Option<Instant>,
}

impl Cached {
    fn addrs(&self) -> Vec<IpAddr> {
        self.v4.iter().chain(&self.v6).copied().collect()
    }
}

/// DNS state that outlives snapshots: the last good answer of every name
/// and the running refresher.
#[derive(Debug, Default)]
pub struct DnsState {
    cache: Mutex<HashMap<String, Cached>>,
    current: Mutex<Option<CancellationToken>>,
    /// The gauge series set so far (prometheus-client cannot list them).
    gauges: Mutex<HashSet<HostnameLabels>>,
    pub metrics: Arc<DnsMetrics>,
}

impl DnsState {
    pub fn new(metrics: Arc<DnsMetrics>) -> DnsState {
        DnsState {
            metrics,
            ..DnsState::default()
        }
    }

    fn cached(&self, name: &str) -> Option<Cached> {
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.get(name).cloned()
    }

    /// Removes gauge series whose (service, hostname) is not in `live`.
    fn prune_gauges(&self, live: &HashSet<HostnameLabels>) {
        let mut known = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|l| {
            let keep = live.contains(l);
            if !keep {
                self.metrics.endpoints.remove(l);
            }
            keep
        });
        known.extend(live.iter().cloned());
    }

    fn store(&self, name: &str, entry: Cached) {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.insert(name.to_owned(), entry);
    }
}

/// Builds a resolver from the `dns:` settings.
pub fn resolver(cfg: &Dns) -> Result<TokioResolver, DnsError> {
    let builder = match &cfg.nameservers {
        None => TokioResolver::builder_tokio().map_err(DnsError::SystemConfig)?,
        Some(list) => {
            let servers = list
                .iter()
                .map(|a| {
                    let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut ns.connections {
                        c.port = a.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        }
    };
    builder.build().map_err(DnsError::Build)
}

/// Where one name's addresses go: (set, index of the hostname in the set).
type Targets = Vec<(Arc<SetBalancer>, usize)>;

/// Starts the refresher for a new snapshot's `sets`; it runs until `stop`
/// fires or the next call to `start`. Addresses known from earlier snapshots
/// are applied before this returns. Returns `None` when there is nothing to
/// resolve (or the resolver cannot be built: logged).
pub fn start<'a>(
    sets: impl IntoIterator<Item = &'a Arc<SetBalancer>>,
    cfg: &Dns,
    state: &Arc<DnsState>,
    stop: &CancellationToken,
) -> Option<JoinHandle<()>> {
    let mut names: BTreeMap<String, Targets> = BTreeMap::new();
    for set in sets {
        for (i, h) in set.hostnames().iter().enumerate() {
            names
                .entry(h.hostname.clone())
                .or_default()
                .push((set.clone(), i));
        }
    }
    // This snapshot's refresher replaces the previous one.
    let token = stop.child_token();
    if let Some(prev) = state
        .current
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(token.clone())
    {
        prev.cancel();
    }
    // Forget names (and their metric series) no longer configured.
    {
        let mut c = state.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|n, _| names.contains_key(n));
    }
    let live: HashSet<HostnameLabels> = names
        .iter()
        .flat_map(|(n, t)| {
            t.iter().map(|(s, _)| HostnameLabels {
                service: s.service().to_owned(),
                hostname: n.clone(),
            })
        })
        .collect();
    state.prune_gauges(&live);

    let now = Instant::now();
    let mut jobs = Vec::with_capacity(names.len());
    for (name, targets) in names {
        let due = match state.cached(&name) {
            Some(c) => {
                apply(&state.metrics, &name, &targets, &c.addrs());
                c.due.unwrap_or(now)
            }
            None => now,
        };
        jobs.push((name, targets, due));
    }
    if jobs.is_empty() {
        return None;
    }
    let resolver = match resolver(cfg) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, hostnames = jobs.len(), "hostname endpoints will not be resolved");
            return None;
        }
    };
    let cfg = cfg.clone();
    let state = state.clone();
    Some(tokio::spawn(async move {
        let loops = jobs.into_iter().map(|(name, targets, due)| {
            refresh(&resolver, &cfg, &state, name, targets, due, &token)
        });
        futures_util::future::join_all(loops).await;
    }))
}

fn apply(m: &DnsMetrics, name: &str, targets: &Targets, addrs: &[IpAddr]) {
    for (set, idx) in targets {
        set.set_resolved(*idx, addrs.to_vec());
        m.endpoints
            .get_or_create(&HostnameLabels {
                service: set.service().to_owned(),
                hostname: name.to_owned(),
            })
            .set(addrs.len() as i64);
    }
}

/// What one query (one address family) said.
#[derive(Debug)]
enum Answer {
    /// Addresses and the smallest TTL of the answer.
    Addrs(Vec<IpAddr>, Duration),
    /// NXDOMAIN or no records of the type.
    Gone,
    /// The resolver failed.
    Failed(NetError),
}

fn judge(r: Result<Lookup, NetError>, rtype: RecordType) -> Answer {
    match r {
        Ok(l) => {
            let mut ttl = u32::MAX;
            let mut addrs = Vec::new();
            for rec in l.answers() {
                let ip = match (&rec.data, rtype) {
                    (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
                    (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
                    _ => {
                        // CNAMEs on the way count for the TTL.
                        ttl = ttl.min(rec.ttl);
                        continue;
                    }
                };
                ttl = ttl.min(rec.ttl);
                addrs.push(ip);
            }
            if addrs.is_empty() {
                Answer::Gone
            } else {
                Answer::Addrs(addrs, Duration::from_secs(u64::from(ttl)))
            }
        }
        Err(e) if e.is_no_records_found() => Answer::Gone,
        Err(e) => Answer::Failed(e),
    }
}

/// Resolves `name` whenever it is due, until `stop` fires.
async fn refresh(
    resolver: &TokioResolver,
    cfg: &Dns,
    state: &DnsState,
    name: String,
    targets: Targets,
    mut due: Instant,
    stop: &CancellationToken,
) {
    let mut last = state.cached(&name).unwrap_or_default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        // Our own schedule decides when to ask again: never answer from the
        // resolver's cache.
        resolver.clear_lookup_cache(name.as_str(), RecordType::A);
        resolver.clear_lookup_cache(name.as_str(), RecordType::AAAA);
        let (a, aaaa) = tokio::select! {
            _ = stop.cancelled() => return,
            r = futures_util::future::join(
                resolver.lookup(name.as_str(), RecordType::A),
                resolver.lookup(name.as_str(), RecordType::AAAA),
            ) => r,
        };
        let (a, aaaa) = (judge(a, RecordType::A), judge(aaaa, RecordType::AAAA));
        let mut next = Vec::with_capacity(2);
        let mut failed = false;
        let mut any = false;
        let mut pick = |ans: Answer, prev: &mut Vec<IpAddr>, family: &'static str| match ans {
            Answer::Addrs(mut v, ttl) => {
                v.sort();
                v.dedup();
                *prev = v;
                any = true;
                next.push(ttl.clamp(cfg.min_ttl, cfg.max_ttl));
            }
            Answer::Gone => prev.clear(),
            Answer::Failed(e) => {
                failed = true;
                warn!(
                    hostname = %name,
                    family,
                    error = %e,
                    kept = prev.len(),
                    retry_in = ?cfg.negative_ttl,
                    "DNS resolution failed; keeping the last good addresses"
                );
            }
        };
        let before = last.addrs();
        pick(a, &mut last.v4, "ipv4");
        pick(aaaa, &mut last.v6, "ipv6");
        let result = if failed {
            next.push(cfg.negative_ttl);
            "error"
        } else if any {
            "ok"
        } else {
            next.push(cfg.negative_ttl);
            "nxdomain"
        };
        let wait = next.into_iter().min().unwrap_or(cfg.negative_ttl);
        due = Instant::now() + wait;
        last.due = Some(due);
        let addrs = last.addrs();
        if stop.is_cancelled() {
            return;
        }
        state.store(&name, last.clone());
        apply(&state.metrics, &name, &targets, &addrs);
        state.metrics.count(result);
        if addrs != before {
            info!(
                hostname = %name,
                addresses = ?addrs,
                result,
                next_in = ?wait,
                "hostname endpoints changed"
            );
        } else {
            debug!(hostname = %name, addresses = addrs.len(), result, next_in = ?wait, "resolved");
        }
    }
}

/// The addresses a set's members have now (tests, diagnostics).
pub fn member_addrs(set: &SetBalancer) -> HashSet<SocketAddr> {
    set.view().members.iter().map(|m| m.stats.addr).collect()
}

#[cfg(test)]
mod tests;
