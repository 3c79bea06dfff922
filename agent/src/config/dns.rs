//! The `dns:` section: how hostname endpoints are resolved.
//!
//! ```yaml
//! dns:
//!   nameservers: ["10.96.0.10:53"]   # default: /etc/resolv.conf
//!   min_ttl: 1s                      # re-resolve no sooner than this
//!   max_ttl: 300s                    # ...and no later than this
//!   negative_ttl: 5s                 # retry after a failure or NXDOMAIN
//! ```
//!
//! Ferry's own queries go over UDP (TCP only when an answer is truncated);
//! capture only redirects TCP `connect()`s to configured service addresses,
//! so the queries are never captured. A nameserver that is itself a service
//! address and port is rejected, so that the TCP fallback cannot be either.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Service, Violation};

/// The section as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// `ip:port` (or a bare IP, port 53) of each nameserver, tried in order.
    /// Default: the nameservers, search domains and options of
    /// `/etc/resolv.conf`.
    pub nameservers: Option<Vec<String>>,
    /// Lower bound on the time between two resolutions of a name (records
    /// with a shorter TTL are re-resolved after this). Default 1s.
    pub min_ttl: Option<HumanDuration>,
    /// Upper bound on the same (records with a longer TTL are re-resolved
    /// after this). Default 300s.
    pub max_ttl: Option<HumanDuration>,
    /// After a failed resolution or NXDOMAIN / no records, the next attempt
    /// comes this much later. Default 5s.
    pub negative_ttl: Option<HumanDuration>,
}

/// Validated DNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// `None`: use the system configuration (`/etc/resolv.conf`).
    pub nameservers: Option<Vec<SocketAddr>>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            nameservers: None,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
        }
    }
}

fn parse_nameserver(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

/// Validates the section; `services` are the validated services (a
/// nameserver must not be one of their addresses).
pub fn validate_dns(raw: &RawDns, services: &[Service], v: &mut Vec<Violation>) -> Dns {
    let mut bad = |field: String, reason: String| v.push(Violation { field, reason });
    let dflt = Dns::default();
    let nameservers = raw.nameservers.as_ref().map(|list| {
        if list.is_empty() {
            bad(
                "dns.nameservers".into(),
                "must list at least one nameserver (or be left out to use /etc/resolv.conf)"
                    .into(),
            );
        }
        let mut out: Vec<SocketAddr> = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            let at = format!("dns.nameservers[{i}]");
            let Some(a) = parse_nameserver(s) else {
                bad(
                    at,
                    format!("{s:?} is not an address: write IP:PORT, [IPv6]:PORT or IP"),
                );
                continue;
            };
            if a.port() == 0 {
                bad(at, "port must not be 0".into());
                continue;
            }
            if a.ip().is_unspecified() || a.ip().is_multicast() {
                bad(at, "must be a unicast address".into());
                continue;
            }
            if out.contains(&a) {
                bad(at, "is listed twice".into());
                continue;
            }
            let ip = super::ipv4_mapped(a.ip()).map(IpAddr::V4).unwrap_or(a.ip());
            if let Some(si) = services
                .iter()
                .position(|s| s.addresses.contains(&ip) && s.ports.iter().any(|p| p.port == a.port()))
            {
                bad(
                    at,
                    format!("{a} is a service address of services[{si}]; DNS over TCP to it would be captured"),
                );
                continue;
            }
            out.push(a);
        }
        out
    });
    let d = |x: Option<HumanDuration>, dflt: Duration| x.map(|h| h.0).unwrap_or(dflt);
    let min_ttl = d(raw.min_ttl, dflt.min_ttl);
    let max_ttl = d(raw.max_ttl, dflt.max_ttl);
    let negative_ttl = d(raw.negative_ttl, dflt.negative_ttl);
    if min_ttl < Duration::from_millis(100) {
        bad("dns.min_ttl".into(), "must be at least 100ms".into());
    }
    if max_ttl < min_ttl {
        bad(
            "dns.max_ttl".into(),
            format!("{max_ttl:?} is shorter than min_ttl ({min_ttl:?})"),
        );
    }
    if negative_ttl < Duration::from_millis(100) {
        bad("dns.negative_ttl".into(), "must be at least 100ms".into());
    }
    Dns {
        nameservers,
        min_ttl,
        max_ttl,
        negative_ttl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, parse};

    fn errors(yaml: &str) -> Vec<String> {
        match parse(yaml, "t") {
            Err(ConfigError::Invalid { violations, .. }) => {
                violations.iter().map(|v| v.to_string()).collect()
            }
            Err(e) => vec![e.to_string()],
            Ok(_) => Vec::new(),
        }
    }

    const BASE: &str = "capture: { enabled: false }\n";

    #[test]
    fn defaults_without_section() {
        let c = parse(BASE, "t").expect("valid");
        assert_eq!(c.dns, Dns::default());
        assert_eq!(c.dns.nameservers, None);
        assert_eq!(c.dns.min_ttl, Duration::from_secs(1));
        assert_eq!(c.dns.max_ttl, Duration::from_secs(300));
        assert_eq!(c.dns.negative_ttl, Duration::from_secs(5));
    }

    #[test]
    fn nameservers_and_durations() {
        let c = parse(
            &format!(
                "{BASE}dns:\n  nameservers: [\"10.96.0.10:53\", \"[fd00::a]:5353\", 10.0.0.2]\n  min_ttl: 2s\n  max_ttl: 1m\n  negative_ttl: 500ms\n"
            ),
            "t",
        )
        .expect("valid");
        assert_eq!(
            c.dns.nameservers,
            Some(vec![
                "10.96.0.10:53".parse().unwrap(),
                "[fd00::a]:5353".parse().unwrap(),
                "10.0.0.2:53".parse().unwrap(),
            ])
        );
        assert_eq!(c.dns.min_ttl, Duration::from_secs(2));
        assert_eq!(c.dns.max_ttl, Duration::from_secs(60));
        assert_eq!(c.dns.negative_ttl, Duration::from_millis(500));
    }

    #[test]
    fn violations_name_the_field() {
        let e = errors(&format!(
            "{BASE}dns:\n  nameservers: [\"nope\", \"10.0.0.1:0\", \"0.0.0.0:53\", \"10.0.0.9:53\", \"10.0.0.9:53\"]\n  min_ttl: 10s\n  max_ttl: 5s\n  negative_ttl: 0s\n"
        ));
        assert_eq!(
            e,
            vec![
                "dns.nameservers[0]: \"nope\" is not an address: write IP:PORT, [IPv6]:PORT or IP",
                "dns.nameservers[1]: port must not be 0",
                "dns.nameservers[2]: must be a unicast address",
                "dns.nameservers[4]: is listed twice",
                "dns.max_ttl: 5s is shorter than min_ttl (10s)",
                "dns.negative_ttl: must be at least 100ms",
            ]
        );
        assert_eq!(
            errors(&format!("{BASE}dns: {{ nameservers: [] }}\n")),
            vec![
                "dns.nameservers: must list at least one nameserver (or be left out to use /etc/resolv.conf)"
            ]
        );
        assert_eq!(
            errors(&format!("{BASE}dns: {{ min_ttl: 10ms }}\n")),
            vec!["dns.min_ttl: must be at least 100ms"]
        );
    }

    #[test]
    fn unknown_field_is_rejected_with_its_path() {
        let e = errors(&format!("{BASE}dns: {{ ttl: 1s }}\n"));
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("dns"), "{e:?}");
        assert!(e[0].contains("unknown field"), "{e:?}");
    }

    #[test]
    fn nameserver_must_not_be_a_service_address() {
        let e = errors(&format!(
            "{BASE}services:\n  - name: dns\n    addresses: [10.96.0.10]\n    ports: [{{ port: 53 }}]\n    endpoints: [{{ address: 10.1.0.5 }}]\ndns: {{ nameservers: [\"10.96.0.10:53\", \"10.96.0.10:5353\"] }}\n"
        ));
        assert_eq!(
            e,
            vec![
                "dns.nameservers[0]: 10.96.0.10:53 is a service address of services[0]; DNS over TCP to it would be captured"
            ]
        );
    }
}
