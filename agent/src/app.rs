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
use tracing::{error, info, warn};

use crate::balance::dns::DnsState;
use crate::balance::{BalanceMetrics, Registry};
use crate::capture::{Capture, CaptureError};
use crate::config::{self, Config};
use crate::metrics::{self, EbpfCounterSource, Metrics, MetricsError, Readiness};
use crate::proxy::{self, Destinations, Proxy, ProxyError};
use crate::state::{Snapshot, State};

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
    let state = Arc::new(State::new(Snapshot::build(&config, &registry)));
    let mark = if config.capture.enabled {
        config.capture.bypass_mark
    } else {
        0
    };
    start_snapshot_tasks(&state.load(), mark, &config.dns, &dns);

    // One listener per worker thread (SO_REUSEPORT), each with its own
    // accept loop: the kernel spreads connections over them.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let outbound = proxy::bind_many(config.listeners.outbound, workers)?;
    let metrics_listener = metrics::bind("metrics", config.listeners.metrics).await?;
    let ready_listener = metrics::bind("readiness", config.listeners.readiness).await?;
    let outbound_port = outbound[0]
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(config.listeners.outbound.port());

    let capture = if config.capture.enabled {
        Some(Arc::new(Capture::start(
            &config.capture,
            outbound_port,
            &state.load(),
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

    let proxy = Arc::new(Proxy {
        state: state.clone(),
        metrics: metrics.proxy.clone(),
        destinations,
        bypass_mark: mark,
        balance_metrics: balance_metrics.clone(),
        relay_mode: proxy::lean::Mode::from_zero_copy(config.proxy.zero_copy),
    });
    let maintenance_stop = CancellationToken::new();
    tokio::spawn(maintain(state.clone(), maintenance_stop.clone()));
    if let Some(c) = &capture {
        metrics.register_ebpf(Arc::new(CaptureCounters(c.clone())));
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
    ready.set(true);
    info!(
        node = %config.node_name,
        outbound = %config.listeners.outbound,
        workers,
        metrics = %config.listeners.metrics,
        readiness = %config.listeners.readiness,
        services = config.services.len(),
        capture = config.capture.enabled,
        "ferry is serving"
    );

    let mut current = config;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { info!("SIGINT: draining"); break; }
            _ = sighup.recv() => {
                let Some(path) = &config_path else {
                    warn!("SIGHUP ignored: no config file to re-read");
                    continue;
                };
                match config::load(path) {
                    Err(e) => error!(error = %e, "reload rejected; keeping the running configuration"),
                    Ok(new) => {
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
                        start_snapshot_tasks(&snapshot, mark, &new.dns, &dns);
                        state.store(snapshot);
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
    drop(proxy);
    drop(capture);
    info!("drained; capture detached; bye");
    Ok(())
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
