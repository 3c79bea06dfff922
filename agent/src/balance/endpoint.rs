//! One endpoint's live state: active connections, peak-EWMA connect latency,
//! outlier (ejection) state and active health. Shared by every snapshot that
//! contains the endpoint, so reloads keep what was learned.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::{Locality, Outlier};

/// Decay time of the peak-EWMA. Shorter than linkerd2-proxy's 10 s request
/// latency: an L4 connect is one short sample, so Ferry forgets a peak faster.
pub const EWMA_DECAY: Duration = Duration::from_secs(2);
/// Cost assumed for an endpoint never connected to yet: 1 ms.
pub const DEFAULT_RTT_NS: f64 = 1_000_000.0;
/// Connect latencies below this (5 ms) are treated as equal by P2C: inside
/// a cluster connects take well under a millisecond, and differences of a few
/// milliseconds are scheduling noise (measured here: peaks of 2-4 ms on a
/// busy 2-vCPU node), not a property of the endpoint. Slower endpoints, and
/// busy ones (active connections), still lose.
pub const LATENCY_FLOOR_NS: f64 = 5_000_000.0;

/// Why a connect attempt failed; the `reason` label of the failure metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectFailure {
    Refused,
    Unreachable,
    Timeout,
    Other,
}

impl ConnectFailure {
    pub fn classify(e: &std::io::Error) -> ConnectFailure {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ConnectFailure::Refused,
            K::TimedOut => ConnectFailure::Timeout,
            K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
                ConnectFailure::Unreachable
            }
            _ => match e.raw_os_error() {
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN) => {
                    ConnectFailure::Unreachable
                }
                Some(libc::ETIMEDOUT) => ConnectFailure::Timeout,
                Some(libc::ECONNREFUSED) => ConnectFailure::Refused,
                _ => ConnectFailure::Other,
            },
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Other => "other",
        }
    }
}

/// Per-endpoint metric handles (labels: service, endpoint).
#[derive(Debug, Clone, Default)]
pub struct EndpointMetrics {
    pub active: Gauge,
    pub attempts: Counter,
    pub failures_refused: Counter,
    pub failures_unreachable: Counter,
    pub failures_timeout: Counter,
    pub failures_other: Counter,
    pub ejections: Counter,
    /// 1 when the endpoint takes traffic (not ejected, not failing health checks).
    pub healthy: Gauge,
}

impl EndpointMetrics {
    fn failures(&self, f: ConnectFailure) -> &Counter {
        match f {
            ConnectFailure::Refused => &self.failures_refused,
            ConnectFailure::Unreachable => &self.failures_unreachable,
            ConnectFailure::Timeout => &self.failures_timeout,
            ConnectFailure::Other => &self.failures_other,
        }
    }
}

/// Where an endpoint stands in passive outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutlierPhase {
    /// Taking traffic.
    Active,
    /// Ejected until the instant.
    Ejected { until: Instant },
    /// Back from ejection: the next connect decides. Success makes it
    /// Active, failure ejects it again for longer.
    Trial,
}

#[derive(Debug)]
struct OutlierState {
    phase: OutlierPhase,
    consecutive_failures: u32,
    /// Ejections so far (the multiplier of the base ejection time).
    ejections: u32,
    window_start: Instant,
    window_ok: u32,
    window_failed: u32,
}

/// What a failure did to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureVerdict {
    /// Still taking traffic.
    Kept,
    /// Should be ejected (subject to the set's maximum ejection percentage).
    Eject,
}

/// One endpoint. The fields a pick reads (address, active count, latency,
/// availability) come first and share one cache line: at 100,000 endpoints
/// a pick's cost is the cache misses it takes.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct EndpointStats {
    pub addr: SocketAddr,
    active: AtomicU64,
    /// Peak-EWMA cost in nanoseconds (f64 bits).
    ewma_bits: AtomicU64,
    ejected: AtomicBool,
    health_ok: AtomicBool,
    /// When `ewma_bits` was last updated (nanoseconds since `epoch`).
    ewma_stamp: AtomicU64,
    epoch: Instant,
    pub locality: Locality,
    outlier: Mutex<OutlierState>,
    pub metrics: EndpointMetrics,
}

impl EndpointStats {
    pub fn new(addr: SocketAddr, locality: Locality, metrics: EndpointMetrics) -> EndpointStats {
        let now = Instant::now();
        metrics.healthy.set(1);
        EndpointStats {
            addr,
            locality,
            active: AtomicU64::new(0),
            ewma_bits: AtomicU64::new(0f64.to_bits()),
            ewma_stamp: AtomicU64::new(0),
            epoch: now,
            ejected: AtomicBool::new(false),
            health_ok: AtomicBool::new(true),
            outlier: Mutex::new(OutlierState {
                phase: OutlierPhase::Active,
                consecutive_failures: 0,
                ejections: 0,
                window_start: now,
                window_ok: 0,
                window_failed: 0,
            }),
            metrics,
        }
    }

    fn outlier(&self) -> std::sync::MutexGuard<'_, OutlierState> {
        // The state is plain data; a panic elsewhere cannot leave it invalid.
        self.outlier.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes traffic: not ejected and not failing active health checks.
    #[inline]
    pub fn available(&self) -> bool {
        !self.ejected.load(Ordering::Relaxed) && self.health_ok.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    pub fn health_ok(&self) -> bool {
        self.health_ok.load(Ordering::Relaxed)
    }

    pub fn phase(&self) -> OutlierPhase {
        self.outlier().phase
    }

    /// Active connections now.
    #[inline]
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connection as active until the guard drops.
    pub fn begin(self: &std::sync::Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.inc();
        ActiveGuard(self.clone())
    }

    /// Peak-EWMA connect latency in nanoseconds, decayed to now. Without
    /// new samples the estimate decays toward zero, so an endpoint that lost
    /// every comparison after one slow connect is tried again, instead of
    /// being starved by a stale peak.
    #[inline]
    pub fn ewma_ns(&self) -> f64 {
        let cost = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        if cost == 0.0 {
            return DEFAULT_RTT_NS;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.ewma_stamp.load(Ordering::Relaxed);
        let idle = now.saturating_sub(last) as f64;
        cost * (-idle / EWMA_DECAY.as_nanos() as f64).exp()
    }

    /// The P2C cost: peak-EWMA latency, floored at `LATENCY_FLOOR_NS`,
    /// x (active + 1) (lower is better). The floor makes connect jitter count
    /// as equal, so idle, equally fast endpoints are chosen by weight; real
    /// differences (a slow endpoint, a busy one) still decide.
    #[inline]
    pub fn load_cost(&self) -> f64 {
        let stored = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        // Decay only lowers the estimate: one under the floor stays there,
        // and the clock and exp() are needed only for a slow endpoint.
        let latency = if stored <= LATENCY_FLOOR_NS {
            LATENCY_FLOOR_NS
        } else {
            self.ewma_ns().max(LATENCY_FLOOR_NS)
        };
        latency * (self.active() as f64 + 1.0)
    }

    fn observe_rtt(&self, rtt: Duration) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let rtt = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        let last = self.ewma_stamp.swap(now, Ordering::Relaxed);
        let next = if prev == 0.0 || rtt > prev {
            // Peak: jump up at once.
            rtt
        } else {
            // Move toward the sample by how long it has been since the last.
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_bits.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Records a connect attempt being made.
    pub fn on_attempt(&self) {
        self.metrics.attempts.inc();
    }

    /// Records a successful connect and its latency.
    pub fn on_success(&self, rtt: Duration, cfg: &Outlier) {
        self.observe_rtt(rtt);
        let mut o = self.outlier();
        o.consecutive_failures = 0;
        roll_window(&mut o, cfg);
        o.window_ok += 1;
        if o.phase == OutlierPhase::Trial {
            o.phase = OutlierPhase::Active;
        }
    }

    /// Records a failed connect; says whether outlier detection wants the
    /// endpoint ejected.
    pub fn on_failure(&self, why: ConnectFailure, cfg: &Outlier) -> FailureVerdict {
        self.metrics.failures(why).inc();
        // A failed connect is also a (pessimistic) latency sample, so P2C
        // steers away even before ejection.
        if why == ConnectFailure::Timeout {
            self.observe_rtt(Duration::from_secs(1));
        }
        let mut o = self.outlier();
        o.consecutive_failures = o.consecutive_failures.saturating_add(1);
        roll_window(&mut o, cfg);
        o.window_failed += 1;
        if !cfg.enabled {
            return FailureVerdict::Kept;
        }
        match o.phase {
            OutlierPhase::Ejected { .. } => FailureVerdict::Kept,
            OutlierPhase::Trial => FailureVerdict::Eject,
            OutlierPhase::Active => {
                let total = o.window_ok + o.window_failed;
                let rate_tripped = cfg.failure_rate_percent > 0
                    && total >= cfg.failure_rate_minimum
                    && u64::from(o.window_failed) * 100
                        >= u64::from(cfg.failure_rate_percent) * u64::from(total);
                if o.consecutive_failures >= cfg.consecutive_failures || rate_tripped {
                    FailureVerdict::Eject
                } else {
                    FailureVerdict::Kept
                }
            }
        }
    }

    /// Ejects the endpoint: base x ejections so far (capped). Returns the
    /// ejection time.
    pub fn eject(&self, cfg: &Outlier, now: Instant) -> Duration {
        let mut o = self.outlier();
        o.ejections = o.ejections.saturating_add(1);
        let time = cfg
            .base_ejection_time
            .saturating_mul(o.ejections)
            .min(cfg.max_ejection_time);
        o.phase = OutlierPhase::Ejected { until: now + time };
        o.consecutive_failures = 0;
        o.window_ok = 0;
        o.window_failed = 0;
        o.window_start = now;
        self.ejected.store(true, Ordering::Relaxed);
        self.metrics.ejections.inc();
        self.metrics.healthy.set(0);
        time
    }

    /// Ends an ejection whose time is up: the endpoint goes on trial.
    /// Returns true when it changed.
    pub fn expire(&self, now: Instant) -> bool {
        let mut o = self.outlier();
        match o.phase {
            OutlierPhase::Ejected { until } if until <= now => {
                o.phase = OutlierPhase::Trial;
                // What was learned before the ejection (the failures' peak
                // latency) is stale: start over, so P2C gives the trial.
                self.ewma_bits.store(0f64.to_bits(), Ordering::Relaxed);
                self.ejected.store(false, Ordering::Relaxed);
                if self.health_ok() {
                    self.metrics.healthy.set(1);
                }
                true
            }
            _ => false,
        }
    }

    /// When the current ejection ends, if ejected.
    pub fn ejected_until(&self) -> Option<Instant> {
        match self.outlier().phase {
            OutlierPhase::Ejected { until } => Some(until),
            _ => None,
        }
    }

    /// Sets the active health-check verdict; returns true when it changed.
    pub fn set_health(&self, ok: bool) -> bool {
        let was = self.health_ok.swap(ok, Ordering::Relaxed);
        self.metrics
            .healthy
            .set(i64::from(ok && !self.is_ejected()));
        was != ok
    }
}

fn roll_window(o: &mut OutlierState, cfg: &Outlier) {
    let now = Instant::now();
    if now.duration_since(o.window_start) >= cfg.interval {
        o.window_start = now;
        o.window_ok = 0;
        o.window_failed = 0;
    }
}

/// Decrements the endpoint's active count when dropped.
#[derive(Debug)]
pub struct ActiveGuard(std::sync::Arc<EndpointStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
    }
}
