//! The one place where components are wired, started, reloaded and drained.
//!
//! Start-up order: bind every listener (a port in use fails before anything
//! is attached) → load and attach capture → serve → report ready.
//! SIGHUP re-reads the config file; a file that does not validate is logged
//! and ignored, and the last good snapshot stays in force.
//! SIGTERM/SIGINT: report not ready, stop accepting, let open connections
//! finish up to `proxy.drain_deadline`, close the rest, detach capture, exit 0.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::balance::dns::DnsState;
use crate::balance::{BalanceMetrics, Registry};
use crate::capture::{Capture, CaptureError};
use crate::config::{self, AuthorizationMode, Config};
use crate::hbone::inbound::Inbound;
use crate::hbone::pool::{Pool, PoolSettings};
use crate::hbone::strict::StrictRules;
use crate::hbone::{self, HboneError};
use crate::metrics::{self, EbpfCounterSource, Metrics, MetricsError, Readiness};
use crate::proxy::{self, Destinations, Proxy, ProxyError};
use crate::state::{Snapshot, State};
use crate::tls::{self, TlsError};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Kube(#[from] crate::k8s::KubeError),
    #[error(transparent)]
    Preflight(#[from] crate::preflight::PreflightError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("HBONE: {0}")]
    Hbone(#[from] HboneError),
}

#[derive(Debug)]
struct CaptureCounters(Arc<Capture>);

impl EbpfCounterSource for CaptureCounters {
    fn read(&self) -> Vec<(&'static str, &'static str, u64)> {
        match self.0.counters() {
            Ok(v) => v
                .into_iter()
                .map(|(c, n)| (c.program(), c.event(), n))
                .collect(),
            Err(e) => {
                warn!(error = %e, "reading eBPF counters failed");
                Vec::new()
            }
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT. `config_path` is re-read on SIGHUP.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), AppError> {
    run_with(config, config_path, None).await
}

/// Like [`run`]; `raw` (the configuration as written, with overrides) is
/// what the Kubernetes source validates translated services with, and
/// SIGHUP re-applies `overrides` to a re-read file.
pub async fn run_with(
    mut config: Config,
    config_path: Option<PathBuf>,
    raw: Option<(config::RawConfig, config::Overrides)>,
) -> Result<(), AppError> {
    // Before anything builds a TLS configuration (the Kubernetes client).
    tls::install_process_default();
    if config.capture.enabled {
        crate::preflight::check()?;
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;

    raise_fd_limit();
    let metrics = Arc::new(Metrics::new(&config.node_name));
    let ready = Arc::new(Readiness::default());
    let balance_metrics = Arc::new(BalanceMetrics::default());
    metrics.register_balance(&balance_metrics);
    let registry = Arc::new(Registry::new(balance_metrics.clone()));
    let dns = Arc::new(DnsState::default());
    metrics.register_dns(&dns.metrics);
    // One listener per worker thread (SO_REUSEPORT), each with its own
    // accept loop: the kernel spreads connections over them.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let outbound = proxy::bind_many(config.listeners.outbound, workers)?;
    let inbound_listener = hbone::inbound::bind(config.listeners.inbound)?;
    let metrics_listener = metrics::bind("metrics", config.listeners.metrics).await?;
    let ready_listener = metrics::bind("readiness", config.listeners.readiness).await?;
    let outbound_port = outbound[0]
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(config.listeners.outbound.port());

    let admin_stop = CancellationToken::new();
    tokio::spawn(metrics::serve_metrics(
        metrics_listener,
        metrics.clone(),
        admin_stop.clone(),
    ));
    tokio::spawn(metrics::serve_readiness(
        ready_listener,
        ready.clone(),
        admin_stop.clone(),
    ));
    let snapshot_time =
        prometheus_client::metrics::gauge::Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    metrics.register_snapshot_time(&snapshot_time);

    // The Kubernetes source: nothing is served before every watch has listed.
    let kube_stop = CancellationToken::new();
    let mut kube_rx = None;
    let mut cgroup_mount = None;
    if config.source == config::Source::Kubernetes {
        let kube_metrics = Arc::new(crate::k8s::KubeMetrics::default());
        metrics.register_kube(&kube_metrics);
        let (raw, _) = raw.clone().unwrap_or_default();
        let client = crate::k8s::client().await?;
        let opts = crate::k8s::Options::new(&config.node_name, raw, config.kubernetes.clone());
        let mut rx = crate::k8s::spawn(client, opts, kube_metrics, kube_stop.clone());
        info!(node = %config.node_name, "waiting for the Kubernetes caches to sync");
        let first = loop {
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM before the first sync; bye"); return Ok(()); }
                _ = sigint.recv() => { info!("SIGINT before the first sync; bye"); return Ok(()); }
                r = rx.changed() => {
                    if r.is_err() { break None; }
                    if let Some(t) = rx.borrow_and_update().clone() { break Some(t); }
                }
            }
        };
        if config.tls.ca == config::CaSource::Generate {
            warn!(
                "tls.ca is `generate`: each node's Ferry has its own CA, so no node could verify another; \
                 connections to pods on other nodes go directly, in plaintext. Give every node one CA \
                 (tls.ca: {{ cert, key }} from a Secret) to tunnel them"
            );
        }
        if let Some(t) = first {
            apply_translated(&mut config, &t);
        }
        if config.capture.enabled {
            cgroup_mount = Some(crate::capture::cgroup2_mount().map_err(CaptureError::from)?);
        }
        kube_rx = Some(rx);
    }

    let state = Arc::new(State::new(Snapshot::build(&config, &registry)));
    snapshot_time.set(unix_now());
    // Ferry's own sockets carry the bypass mark when capture is on (so it
    // never captures itself) and in STRICT mode (the mark is what lets its
    // connections to local pods through).
    let strict_mode = config.authorization.mode == AuthorizationMode::Strict;
    let mark = if config.capture.enabled || strict_mode {
        config.capture.bypass_mark
    } else {
        0
    };
    start_snapshot_tasks(&state.load(), mark, &config.dns, &dns);

    // Certificates for every local workload before anything is served.
    let tls = Arc::new(tls::context_from_config(&config.tls)?);
    tls.store()
        .count_issues(metrics.hbone.certificates_issued.clone());
    tls.store()
        .sync(&state.load().workload_identities())
        .await?;
    let strict = if strict_mode {
        let pods: Vec<_> = state.load().workload_addresses().collect();
        let rules = Arc::new(StrictRules::install(&pods, config.capture.bypass_mark)?);
        let r = rules.clone();
        metrics.register_read_counter(
            "ferry_strict_refused",
            "New connections to local mesh pods refused by the STRICT kernel rule (not from Ferry)",
            Box::new(move || r.refused()),
        );
        Some(rules)
    } else {
        None
    };

    let capture = if config.capture.enabled {
        Some(Arc::new(Capture::start(
            &config.capture,
            outbound_port,
            &state.load(),
            config.proxy.socket_join,
        )?))
    } else {
        None
    };
    if capture.is_some() {
        release_startup_memory();
    }
    let destinations = match &capture {
        Some(c) => Destinations::Ebpf(c.clone()),
        None => Destinations::LocalAddress,
    };

    let static_cgroups: Vec<PathBuf> = capture.as_ref().map(|c| c.attached()).unwrap_or_default();
    let mut cgroups_pending = false;
    if let (Some(c), Some(mount), Some(rx)) = (&capture, &cgroup_mount, &kube_rx)
        && let Some(t) = rx.borrow().clone()
    {
        cgroups_pending = sync_cgroups(c, mount, &t, &static_cgroups);
    }

    let pool = Arc::new(Pool::new(
        tls.clone(),
        metrics.hbone.clone(),
        PoolSettings {
            max_streams: config.hbone.max_streams_per_connection as usize,
            pooling: config.hbone.pooling,
            connect_timeout: config.proxy.connect_timeout,
            bypass_mark: mark,
        },
    ));
    let inbound = Arc::new(Inbound {
        tls: tls.clone(),
        state: state.clone(),
        metrics: metrics.hbone.clone(),
        bypass_mark: mark,
        connect_timeout: config.proxy.connect_timeout,
        max_streams: config.hbone.max_streams_per_connection,
    });
    let proxy = Arc::new(Proxy {
        state: state.clone(),
        metrics: metrics.proxy.clone(),
        destinations,
        bypass_mark: mark,
        balance_metrics: balance_metrics.clone(),
        tunnel: Some(pool.clone()),
        relay_mode: proxy::lean::Mode::from_zero_copy(config.proxy.zero_copy),
        socket_join: capture.clone().filter(|c| c.socket_join_enabled()),
    });
    let maintenance_stop = CancellationToken::new();
    tokio::spawn(maintain(state.clone(), maintenance_stop.clone()));
    if let Some(c) = &capture {
        metrics.register_ebpf(Arc::new(CaptureCounters(c.clone())));
    }
    {
        let c = capture.clone();
        metrics.register_read_gauge(
            "ferry_socket_join_enabled",
            "1 when in-kernel socket joining (proxy.socket_join) is in use, 0 when off or unsupported",
            Box::new(move || i64::from(c.as_ref().is_some_and(|c| c.socket_join_enabled()))),
        );
        let c = capture.clone();
        metrics.register_read_counter(
            "ferry_socket_join_connections",
            "Connections whose client socket was set up to be joined to the upstream socket in the kernel",
            Box::new(move || c.as_ref().map_or(0, |c| c.joined_connections())),
        );
    }

    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let kill = CancellationToken::new();
    let accept: Vec<_> = outbound
        .into_iter()
        .map(|listener| {
            tokio::spawn(proxy.clone().serve(
                listener,
                tracker.clone(),
                stop_accepting.clone(),
                kill.clone(),
            ))
        })
        .collect();
    let inbound_task = tokio::spawn(inbound.serve(
        inbound_listener,
        tracker.clone(),
        stop_accepting.clone(),
        kill.clone(),
    ));
    tokio::spawn(hbone::pool::run_idle_reaper(
        pool,
        hbone::POOL_IDLE_TIMEOUT,
        admin_stop.clone(),
    ));
    tokio::spawn(tls::store::run_rotation(
        tls.store().clone(),
        admin_stop.clone(),
    ));
    ready.set(true);
    info!(
        node = %config.node_name,
        outbound = %config.listeners.outbound,
        inbound = %config.listeners.inbound,
        workloads = config.workloads.len(),
        strict = strict.is_some(),
        workers,
        metrics = %config.listeners.metrics,
        readiness = %config.listeners.readiness,
        services = config.services.len(),
        capture = config.capture.enabled,
        "ferry is serving"
    );

    let mut current = config;
    let mut retry = tokio::time::interval(std::time::Duration::from_secs(1));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let kube_changed = async {
            match kube_rx.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = retry.tick(), if cgroups_pending => {
                if let (Some(c), Some(mount), Some(rx)) = (&capture, &cgroup_mount, &kube_rx)
                    && let Some(t) = rx.borrow().clone()
                {
                    cgroups_pending = sync_cgroups(c, mount, &t, &static_cgroups);
                }
            }
            ok = kube_changed => {
                if !ok {
                    warn!("the Kubernetes source stopped; keeping the last configuration");
                    kube_rx = None;
                    continue;
                }
                let Some(t) = kube_rx.as_mut().and_then(|rx| rx.borrow_and_update().clone()) else { continue };
                let mut new = current.clone();
                apply_translated(&mut new, &t);
                let snapshot = Snapshot::build(&new, &registry);
                if let Some(c) = &capture
                    && let Err(e) = c.sync_services(&snapshot)
                {
                    error!(error = %e, "syncing the service map failed; keeping the running configuration");
                    if let Err(e) = c.sync_services(&state.load()) {
                        error!(error = %e, "restoring the service map failed");
                    }
                    continue;
                }
                start_snapshot_tasks(&snapshot, mark, &new.dns, &dns);
                // As on reload: the replaced snapshot's health checks stop now.
                let old = state.load();
                state.store(snapshot);
                old.stop_token().cancel();
                snapshot_time.set(unix_now());
                if let (Some(c), Some(mount)) = (&capture, &cgroup_mount) {
                    cgroups_pending = sync_cgroups(c, mount, &t, &static_cgroups);
                }
                if let Err(e) = tls.store().sync(&state.load().workload_identities()).await {
                    error!(error = %e, "issuing certificates for new workloads failed");
                }
                update_strict(strict.as_deref(), &state.load(), current.capture.bypass_mark);
                info!(
                    services = new.services.len(),
                    workloads = new.workloads.len(),
                    nodes = new.nodes.len(),
                    "configuration updated from the Kubernetes API"
                );
                current = new;
            }
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { info!("SIGINT: draining"); break; }
            _ = sighup.recv() => {
                let Some(path) = &config_path else {
                    warn!("SIGHUP ignored: no config file to re-read");
                    continue;
                };
                let loaded = config::load_raw(path).and_then(|mut r| {
                    if let Some((_, o)) = &raw {
                        r.apply_overrides(o);
                    }
                    r.validate().map_err(|violations| config::ConfigError::Invalid {
                        file: path.display().to_string(),
                        violations,
                    })
                });
                match loaded {
                    Err(e) => error!(error = %e, "reload rejected; keeping the running configuration"),
                    Ok(mut new) => {
                        if new.source == config::Source::Kubernetes {
                            // Services, workloads and nodes come from the API, not the file.
                            new.services = current.services.clone();
                            new.locality = current.locality.clone();
                            new.workloads = current.workloads.clone();
                            new.nodes = current.nodes.clone();
                        }
                        if new.listeners != current.listeners || new.capture != current.capture {
                            warn!("listeners and capture settings change only on restart; services are reloaded");
                        }
                        let snapshot = Snapshot::build(&new, &registry);
                        if let Some(c) = &capture
                            && let Err(e) = c.sync_services(&snapshot)
                        {
                            error!(error = %e, "reload: syncing the service map failed; keeping the running configuration");
                            if let Err(e) = c.sync_services(&state.load()) {
                                error!(error = %e, "restoring the service map failed");
                            }
                            continue;
                        }
                        if let Err(e) = reload_tls(&tls, &new, &snapshot).await {
                            error!(error = %e, "reload: TLS settings rejected; keeping the running configuration");
                            continue;
                        }
                        update_strict(strict.as_deref(), &snapshot, current.capture.bypass_mark);
                        start_snapshot_tasks(&snapshot, mark, &new.dns, &dns);
                        // The old snapshot lives on while connections hold
                        // it, but its background work (health checks) stops
                        // now: the new snapshot's tasks took over.
                        let old = state.load();
                        state.store(snapshot);
                        old.stop_token().cancel();
                        snapshot_time.set(unix_now());
                        info!(services = new.services.len(), "configuration reloaded");
                        current = new;
                    }
                }
            }
        }
    }

    // Drain.
    ready.set(false);
    stop_accepting.cancel();
    for a in accept {
        let _ = a.await;
    }
    let _ = inbound_task.await;
    tracker.close();
    let deadline = current.proxy.drain_deadline;
    let open = tracker.len();
    if open > 0 {
        info!(open, deadline = ?deadline, "waiting for open connections");
    }
    if tokio::time::timeout(deadline, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = tracker.len(),
            "drain deadline reached; closing remaining connections"
        );
        kill.cancel();
        tracker.wait().await;
    }
    admin_stop.cancel();
    maintenance_stop.cancel();
    kube_stop.cancel();
    drop(proxy);
    drop(capture);
    drop(strict);
    info!("drained; capture detached; bye");
    Ok(())
}

/// Points STRICT mode's kernel rule (when it is on) at the snapshot's local
/// mesh pods; a failure is logged and the previous rule stays in force.
fn update_strict(strict: Option<&StrictRules>, snapshot: &Snapshot, mark: u32) {
    if let Some(rules) = strict {
        let pods: Vec<_> = snapshot.workload_addresses().collect();
        if let Err(e) = rules.update(&pods, mark) {
            error!(error = %e, "updating the STRICT rules failed");
        }
    }
}

/// Puts what the cluster says into a configuration: services, this node's
/// locality, its mesh workloads and the other nodes' tunnel addresses. With
/// a generated CA no other node could verify this one's certificates, so no
/// node is tunnelled to (endpoints on other nodes go direct).
fn apply_translated(config: &mut Config, t: &crate::k8s::Translated) {
    config.services = t.services.clone();
    config.locality.zone = t.zone.clone();
    config.locality.region = t.region.clone();
    config.workloads = t.workloads.clone();
    config.nodes = if config.tls.ca == config::CaSource::Generate {
        Default::default()
    } else {
        t.nodes.clone()
    };
}

/// Attaches capture to the enrolled pods' cgroups and detaches it from
/// pods that are gone; true when some cgroup could not be attached yet.
fn sync_cgroups(
    capture: &Capture,
    mount: &std::path::Path,
    t: &crate::k8s::Translated,
    keep: &[PathBuf],
) -> bool {
    let wanted: std::collections::BTreeSet<PathBuf> =
        t.cgroups.iter().map(|c| mount.join(c)).collect();
    let failed = capture.set_cgroups(&wanted, keep);
    for (path, e) in &failed {
        debug!(cgroup = %path.display(), error = %e, "pod cgroup not attached yet; retrying");
    }
    !failed.is_empty()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Starts the background work a snapshot needs (active health checks, DNS
/// refresh of hostname endpoints); it stops when the snapshot is replaced
/// and dropped (the DNS refresher as soon as the next one starts). Call it
/// before the snapshot is published: it fills in hostname addresses known
/// from the previous snapshot.
fn start_snapshot_tasks(
    snapshot: &Snapshot,
    mark: u32,
    dns_cfg: &config::Dns,
    dns: &Arc<DnsState>,
) {
    crate::balance::dns::start(snapshot.sets(), dns_cfg, dns, &snapshot.stop_token());
    for set in snapshot.sets() {
        if let Some(hc) = &set.policy().health_check {
            tokio::spawn(crate::balance::health::run(
                set.clone(),
                hc.clone(),
                mark,
                snapshot.stop_token(),
            ));
        }
    }
}

/// Ends ejections whose time is up, across the current snapshot.
async fn maintain(state: Arc<State>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = std::time::Instant::now();
        for set in state.load().sets() {
            set.expire_ejections(now);
        }
    }
}

/// Applies what a reload may change in TLS: the trust bundle file is re-read,
/// and new workloads get certificates (removed ones lose theirs). The CA,
/// trust domain and lifetime change only on restart.
async fn reload_tls(
    tls: &tls::TlsContext,
    new: &Config,
    snapshot: &Snapshot,
) -> Result<(), TlsError> {
    let extra = match &new.tls.trust_bundle {
        Some(p) => tls::read_pem_certs(p)?,
        None => Vec::new(),
    };
    tls.set_trust_bundle(extra)?;
    tls.store().sync(&snapshot.workload_identities()).await
}

/// Descriptors Ferry asks for: two sockets per relayed connection.
const WANT_FDS: u64 = 1 << 20;

/// Raises the open-file limit toward [`WANT_FDS`] (the hard limit too, when
/// privileged, up to the kernel's `nr_open`): the default soft limit (often
/// 1024) would cap Ferry at a few hundred connections.
fn raise_fd_limit() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(WANT_FDS);
    let want = WANT_FDS.min(nr_open);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    let before = lim.rlim_cur;
    for max in [want.max(lim.rlim_max), lim.rlim_max] {
        let new = libc::rlimit {
            rlim_cur: want.min(max),
            rlim_max: max,
        };
        // SAFETY: `new` is a valid rlimit; setrlimit only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            info!(before, now = new.rlim_cur, "open-file limit raised");
            return;
        }
    }
    warn!(limit = before, "cannot raise the open-file limit");
}

/// Loading the eBPF object parses the kernel's BTF (megabytes, freed once
/// the programs are loaded); glibc keeps freed heap mapped, so hand it back
/// to the kernel or it stays in Ferry's resident memory for good.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only returns free heap memory to the kernel;
        // it does not touch memory in use.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(released = released != 0, "start-up memory trimmed");
    }
}
