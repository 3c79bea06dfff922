//! Per-service balancing and failover settings: the algorithm, connect
//! failover, passive outlier detection, active health checks and locality.
//! Every setting has a documented default; contradictory settings are
//! rejected with the field's path.

use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Violation};

/// How an endpoint is chosen inside a backend set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Power of two choices: two candidates drawn by weight, the one with
    /// the lower peak-EWMA connect latency x (active + 1) wins (the default).
    #[default]
    P2cPeakEwma,
    /// Fewest active connections per unit of weight, ties by weight (exact up to 16
    /// endpoints, best of two weighted random choices beyond).
    LeastConnections,
    /// Weighted round robin (earliest deadline first).
    RoundRobin,
    /// Weighted random.
    Random,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::P2cPeakEwma => "p2c_peak_ewma",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::RoundRobin => "round_robin",
            Algorithm::Random => "random",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawBalancing {
    /// Default `p2c_peak_ewma`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Envoy's overprovisioning factor: a locality level keeps all its load
    /// while `healthy share x factor >= 1`. Default 1.4.
    pub overprovisioning_factor: Option<f64>,
    /// Below this healthy percentage (after overprovisioning) the set panics
    /// and balances over every endpoint, healthy or not. Default 50.
    pub panic_threshold_percent: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawFailover {
    /// Connect attempts per client connection, each to a different endpoint.
    /// Default 3.
    pub max_connect_attempts: Option<u32>,
    /// Per-attempt connect timeout. Default: `proxy.connect_timeout`.
    pub connect_timeout: Option<HumanDuration>,
    /// Overall time for all attempts. Default 5s.
    pub budget: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    /// Default true.
    pub enabled: Option<bool>,
    /// Eject after this many consecutive connect failures. Default 5.
    pub consecutive_failures: Option<u32>,
    /// Eject when at least this percentage of connects in one interval
    /// failed. Default 50; 0 disables the rule.
    pub failure_rate_percent: Option<u32>,
    /// ...and the interval saw at least this many connects. Default 10.
    pub failure_rate_minimum: Option<u32>,
    /// The failure-rate window. Default 10s.
    pub interval: Option<HumanDuration>,
    /// Ejection time = base x number of ejections so far. Default 30s.
    pub base_ejection_time: Option<HumanDuration>,
    /// Cap on one ejection's time. Default 300s.
    pub max_ejection_time: Option<HumanDuration>,
    /// Never eject more than this percentage of a set's endpoints (one
    /// endpoint may always be ejected). Default 50.
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// Default 5s.
    pub interval: Option<HumanDuration>,
    /// Default 1s; must be below the interval.
    pub timeout: Option<HumanDuration>,
    /// Successes in a row to become healthy. Default 2.
    pub healthy_threshold: Option<u32>,
    /// Failures in a row to become unhealthy. Default 3.
    pub unhealthy_threshold: Option<u32>,
    /// Bytes to send after connecting (optional).
    pub send: Option<String>,
    /// Bytes the response must contain (optional).
    pub expect: Option<String>,
}

/// Validated locality settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalityPolicy {
    pub overprovisioning_factor: f64,
    pub panic_threshold_percent: u32,
}

/// Validated failover settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failover {
    pub max_connect_attempts: u32,
    pub connect_timeout: Duration,
    pub budget: Duration,
}

/// Validated outlier-detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    pub enabled: bool,
    pub consecutive_failures: u32,
    pub failure_rate_percent: u32,
    pub failure_rate_minimum: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            enabled: true,
            consecutive_failures: 5,
            failure_rate_percent: 50,
            failure_rate_minimum: 10,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// Validated active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
}

/// A service's balancing and failover policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub algorithm: Algorithm,
    pub locality: LocalityPolicy,
    pub failover: Failover,
    pub outlier: Outlier,
    pub health_check: Option<HealthCheck>,
}

fn d(v: Option<HumanDuration>, default: Duration) -> Duration {
    v.map(|d| d.0).unwrap_or(default)
}

/// Validates one service's policy; `at` is the service's path.
pub fn validate_policy(
    at: &str,
    balancing: &RawBalancing,
    failover: &RawFailover,
    outlier: &RawOutlier,
    health: Option<&RawHealthCheck>,
    default_connect_timeout: Duration,
    v: &mut Vec<Violation>,
) -> Policy {
    let mut bad = |field: String, reason: String| v.push(Violation { field, reason });

    let of = balancing.overprovisioning_factor.unwrap_or(1.4);
    if !(1.0..=10.0).contains(&of) || of.is_nan() {
        bad(
            format!("{at}.balancing.overprovisioning_factor"),
            "must be between 1.0 and 10.0".into(),
        );
    }
    let panic = balancing.panic_threshold_percent.unwrap_or(50);
    if panic > 100 {
        bad(
            format!("{at}.balancing.panic_threshold_percent"),
            "must be between 0 and 100".into(),
        );
    }

    let attempts = failover.max_connect_attempts.unwrap_or(3);
    if attempts == 0 {
        bad(
            format!("{at}.failover.max_connect_attempts"),
            "must be at least 1".into(),
        );
    } else if attempts > 16 {
        bad(
            format!("{at}.failover.max_connect_attempts"),
            "must be at most 16".into(),
        );
    }
    let connect_timeout = d(failover.connect_timeout, default_connect_timeout);
    if failover.connect_timeout.is_some() && connect_timeout.is_zero() {
        bad(
            format!("{at}.failover.connect_timeout"),
            "must be greater than 0".into(),
        );
    }
    let budget = d(failover.budget, Duration::from_secs(5));
    if budget < connect_timeout {
        bad(
            format!("{at}.failover.budget"),
            format!(
                "{budget:?} is shorter than one attempt's connect_timeout ({connect_timeout:?})"
            ),
        );
    }

    let dflt = Outlier::default();
    let o = Outlier {
        enabled: outlier.enabled.unwrap_or(dflt.enabled),
        consecutive_failures: outlier
            .consecutive_failures
            .unwrap_or(dflt.consecutive_failures),
        failure_rate_percent: outlier
            .failure_rate_percent
            .unwrap_or(dflt.failure_rate_percent),
        failure_rate_minimum: outlier
            .failure_rate_minimum
            .unwrap_or(dflt.failure_rate_minimum),
        interval: d(outlier.interval, dflt.interval),
        base_ejection_time: d(outlier.base_ejection_time, dflt.base_ejection_time),
        max_ejection_time: d(outlier.max_ejection_time, dflt.max_ejection_time),
        max_ejection_percent: outlier
            .max_ejection_percent
            .unwrap_or(dflt.max_ejection_percent),
    };
    let oat = format!("{at}.outlier_detection");
    if o.enabled {
        if o.consecutive_failures == 0 {
            bad(
                format!("{oat}.consecutive_failures"),
                "must be at least 1".into(),
            );
        }
        if o.failure_rate_percent > 100 {
            bad(
                format!("{oat}.failure_rate_percent"),
                "must be between 0 and 100".into(),
            );
        }
        if o.failure_rate_percent > 0 && o.failure_rate_minimum == 0 {
            bad(
                format!("{oat}.failure_rate_minimum"),
                "must be at least 1 when failure_rate_percent is set".into(),
            );
        }
        if o.interval.is_zero() {
            bad(format!("{oat}.interval"), "must be greater than 0".into());
        }
        if o.base_ejection_time.is_zero() {
            bad(
                format!("{oat}.base_ejection_time"),
                "must be greater than 0".into(),
            );
        }
        if o.max_ejection_time < o.base_ejection_time {
            bad(
                format!("{oat}.max_ejection_time"),
                format!(
                    "{:?} is shorter than base_ejection_time ({:?})",
                    o.max_ejection_time, o.base_ejection_time
                ),
            );
        }
        if o.max_ejection_percent > 100 {
            bad(
                format!("{oat}.max_ejection_percent"),
                "must be between 0 and 100".into(),
            );
        }
    }

    let health_check = health.map(|h| {
        let hat = format!("{at}.health_check");
        let hc = HealthCheck {
            interval: d(h.interval, Duration::from_secs(5)),
            timeout: d(h.timeout, Duration::from_secs(1)),
            healthy_threshold: h.healthy_threshold.unwrap_or(2),
            unhealthy_threshold: h.unhealthy_threshold.unwrap_or(3),
            send: h.send.as_ref().map(|s| s.as_bytes().to_vec()),
            expect: h.expect.as_ref().map(|s| s.as_bytes().to_vec()),
        };
        if hc.interval < Duration::from_millis(100) {
            bad(format!("{hat}.interval"), "must be at least 100ms".into());
        }
        if hc.timeout.is_zero() {
            bad(format!("{hat}.timeout"), "must be greater than 0".into());
        } else if hc.timeout >= hc.interval {
            bad(
                format!("{hat}.timeout"),
                format!(
                    "{:?} must be shorter than the interval ({:?})",
                    hc.timeout, hc.interval
                ),
            );
        }
        if hc.healthy_threshold == 0 {
            bad(
                format!("{hat}.healthy_threshold"),
                "must be at least 1".into(),
            );
        }
        if hc.unhealthy_threshold == 0 {
            bad(
                format!("{hat}.unhealthy_threshold"),
                "must be at least 1".into(),
            );
        }
        if hc.expect.as_ref().is_some_and(|e| e.is_empty()) {
            bad(format!("{hat}.expect"), "must not be empty".into());
        }
        hc
    });

    Policy {
        algorithm: balancing.algorithm,
        locality: LocalityPolicy {
            overprovisioning_factor: of,
            panic_threshold_percent: panic,
        },
        failover: Failover {
            max_connect_attempts: attempts,
            connect_timeout,
            budget,
        },
        outlier: o,
        health_check,
    }
}

/// A DNS name as endpoints may carry: dot-separated labels of letters,
/// digits and '-', 1-253 characters, optionally ending in '.'.
pub fn valid_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && s.parse::<std::net::IpAddr>().is_err()
}
