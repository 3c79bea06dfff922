//! Ferry's configuration: the YAML model, its defaults and its validation.
//!
//! A file is parsed into [`RawConfig`] (which rejects unknown fields, naming
//! their path), then [`RawConfig::validate`] checks every rule and reports
//! *all* violations at once, each as `path: reason`, for example
//! `services[2].endpoints[0].weight: must be greater than 0`.
//! Only a validated [`Config`] reaches the rest of the agent.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod balancing;
pub mod dns;
pub mod source;

pub use balancing::{Algorithm, Failover, HealthCheck, LocalityPolicy, Outlier, Policy};
pub use dns::Dns;
pub use source::{CgroupDriver, Kubernetes, Overrides, Source};

/// Ferry's default bypass mark (`SO_MARK` on its own upstream sockets): 0x539,
/// the value Istio uses for the same purpose, so operators recognise it.
pub const DEFAULT_BYPASS_MARK: u32 = 0x539;

/// Errors from loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {field}: {message}")]
    Parse {
        file: String,
        field: String,
        message: String,
    },
    #[error("{file}: invalid configuration:\n{}", format_violations(.violations))]
    Invalid {
        file: String,
        violations: Vec<Violation>,
    },
}

fn format_violations(v: &[Violation]) -> String {
    v.iter()
        .map(|v| format!("  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One broken rule: the field's path and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// A duration written the human way: `250ms`, `5s`, `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

// ---------------------------------------------------------------------------
// The file as written (all optional parts have defaults).
// ---------------------------------------------------------------------------

/// The configuration file as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where services come from: `file` (default) or `kubernetes`.
    #[serde(default)]
    pub source: Source,
    /// Settings of the Kubernetes source.
    #[serde(default)]
    pub kubernetes: source::RawKubernetes,
    #[serde(default)]
    pub node: RawNode,
    #[serde(default)]
    pub listeners: RawListeners,
    #[serde(default)]
    pub capture: RawCapture,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub services: Vec<RawService>,
    /// How hostname endpoints are resolved.
    #[serde(default)]
    pub dns: dns::RawDns,
    /// The pods on this node and their identities (the mesh's local workloads).
    #[serde(default)]
    pub workloads: Vec<RawWorkload>,
    /// Node name → address of that node's HBONE inbound listener.
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub hbone: RawHbone,
    #[serde(default)]
    pub authorization: RawAuthorization,
}

/// A pod on this node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkload {
    pub address: IpAddr,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
}

fn default_service_account() -> String {
    "default".to_owned()
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Default `cluster.local`.
    pub trust_domain: Option<String>,
    /// `generate` (default: an in-memory CA for a one-machine topology) or
    /// `{ cert: FILE, key: FILE }` (PEM).
    pub ca: Option<RawCa>,
    /// Extra trusted CA certificates (PEM), re-read on SIGHUP.
    pub trust_bundle: Option<PathBuf>,
    /// Workload certificate lifetime; renewed at half of it. Default 24h.
    pub leaf_lifetime: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawCa {
    Keyword(String),
    Files(RawCaFiles),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHbone {
    /// Streams per pooled TLS connection before another is opened. Default 100.
    pub max_streams_per_connection: Option<u32>,
    /// Share TLS connections between streams. Default true.
    pub pooling: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAuthorization {
    /// `PERMISSIVE` (default) or `STRICT`.
    #[serde(default)]
    pub mode: AuthorizationMode,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// Whether local mesh pods also accept plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthorizationMode {
    #[default]
    Permissive,
    Strict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
}

/// One rule: matches when every list given matches (a list matches when
/// any of its entries does; an absent list matches everything).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub action: RuleAction,
    /// Source SPIFFE IDs, exact.
    #[serde(default)]
    pub identities: Vec<String>,
    /// Source SPIFFE ID prefixes, e.g. `spiffe://cluster.local/ns/shop/`.
    #[serde(default)]
    pub identity_prefixes: Vec<String>,
    /// Source namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Destination (pod) ports.
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    /// This node's name; defaults to the host name.
    pub name: Option<String>,
    /// This node's zone (`topology.kubernetes.io/zone`), for locality.
    pub zone: Option<String>,
    /// This node's region (`topology.kubernetes.io/region`), for locality.
    pub region: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawListeners {
    /// Where Ferry accepts captured connections. Default `[::]:15001`
    /// (dual-stack: IPv4 clients arrive as IPv4-mapped addresses).
    pub outbound: Option<SocketAddr>,
    /// Prometheus metrics (`/metrics`). Default `0.0.0.0:15020`.
    pub metrics: Option<SocketAddr>,
    /// Readiness (`/ready`) and liveness (`/healthz`). Default `0.0.0.0:15021`.
    pub readiness: Option<SocketAddr>,
    /// The HBONE inbound listener (mutual TLS from other nodes' Ferry).
    /// Default `[::]:15008`.
    pub inbound: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCapture {
    /// Load and attach the eBPF capture programs. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// cgroup v2 directories to enroll: relative to the cgroup2 mount, or
    /// absolute paths under it.
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// The address captured IPv4 connections are sent to: an address of this
    /// node on which the outbound listener is reachable from pods.
    pub redirect_ipv4: Option<IpAddr>,
    /// The same for IPv6 connections.
    pub redirect_ipv6: Option<IpAddr>,
    /// `SO_MARK` Ferry puts on its own upstream sockets so that capture never
    /// loops them back. Default 0x539 (1337).
    #[serde(default = "default_mark")]
    pub bypass_mark: u32,
    /// Forward the eBPF programs' diagnostics to the log. Default false.
    #[serde(default)]
    pub ebpf_log: bool,
}

impl Default for RawCapture {
    fn default() -> Self {
        RawCapture {
            enabled: true,
            cgroups: Vec::new(),
            redirect_ipv4: None,
            redirect_ipv6: None,
            bypass_mark: DEFAULT_BYPASS_MARK,
            ebpf_log: false,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_mark() -> u32 {
    DEFAULT_BYPASS_MARK
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    /// Upper bound on one upstream connect attempt, unless a service's
    /// `failover.connect_timeout` says otherwise. Default 1s.
    pub connect_timeout: Option<HumanDuration>,
    /// On SIGTERM, how long open connections may finish before they are
    /// closed. Default 30s.
    pub drain_deadline: Option<HumanDuration>,
    /// Move plaintext payload with splice(2) instead of copying it through
    /// user space. Default true.
    pub zero_copy: Option<bool>,
    /// Join a captured client's socket to the upstream connection in the
    /// kernel (sockmap + sk_msg) when both legs are plaintext, so the
    /// client's payload skips user space. Default false: on Linux 6.18 an
    /// enrolled client socket's blocking reads can fail with EAGAIN and a
    /// non-blocking client under back-pressure is not woken (see the
    /// README). Ignored (with a warning at start) when the kernel lacks
    /// the feature.
    pub socket_join: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The service's virtual addresses (IPv4 and/or IPv6).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<RawPort>,
    /// The endpoints, when the service has one backend set. Exclusive with
    /// `backend_sets`.
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    /// Weighted split between backend sets (e.g. v1 80 / v2 20); each set is
    /// balanced on its own.
    #[serde(default)]
    pub backend_sets: Vec<RawBackendSet>,
    #[serde(default)]
    pub balancing: balancing::RawBalancing,
    #[serde(default)]
    pub failover: balancing::RawFailover,
    #[serde(default)]
    pub outlier_detection: balancing::RawOutlier,
    pub health_check: Option<balancing::RawHealthCheck>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendSet {
    pub name: String,
    /// Share of the service's connections, relative to the other sets.
    /// Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPort {
    pub port: u16,
    /// The endpoints' port; defaults to `port`.
    pub target_port: Option<u16>,
    /// Only `TCP` is carried today.
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "TCP".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    /// The endpoint's IP address. Exactly one of `address` and `hostname`.
    pub address: Option<IpAddr>,
    /// A DNS name; every address it resolves to is an endpoint, re-resolved
    /// at the record's TTL.
    pub hostname: Option<String>,
    /// The endpoint's port; defaults to the service port's `target_port`.
    pub port: Option<u16>,
    /// Relative weight; default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The node the endpoint runs on (locality: same node is preferred).
    pub node: Option<String>,
    /// The endpoint's zone.
    pub zone: Option<String>,
    /// The endpoint's region.
    pub region: Option<String>,
    /// The pod's namespace (its identity, checked when it is reached
    /// through the tunnel); default the service's.
    pub namespace: Option<String>,
    /// The pod's service account (its identity); default `default`.
    pub service_account: Option<String>,
    /// Whether the pod is in the mesh (its node's Ferry holds its identity);
    /// default true. An endpoint outside the mesh is always connected to
    /// directly, in plaintext, even on a node listed in `nodes`.
    pub mesh: Option<bool>,
}

fn default_weight() -> u32 {
    1
}

// ---------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub source: Source,
    pub kubernetes: Kubernetes,
    pub node_name: String,
    /// This node's locality (`node` is `node_name`).
    pub locality: Locality,
    pub listeners: Listeners,
    pub capture: Capture,
    pub proxy: Proxy,
    pub services: Vec<Service>,
    pub dns: Dns,
    pub workloads: Vec<Workload>,
    pub nodes: BTreeMap<String, SocketAddr>,
    pub tls: Tls,
    pub hbone: Hbone,
    pub authorization: Authorization,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    pub outbound: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub inbound: SocketAddr,
}

/// The HBONE inbound port (Istio's).
pub const HBONE_PORT: u16 = 15008;

/// A pod on this node and its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub address: IpAddr,
    pub namespace: String,
    pub service_account: String,
}

/// Where the CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Generated at start, held in memory only (one-machine topologies:
    /// every node must trust the same CA, so a cluster uses files or a
    /// remote signer).
    Generate,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub trust_domain: String,
    pub ca: CaSource,
    pub trust_bundle: Option<PathBuf>,
    pub leaf_lifetime: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hbone {
    pub max_streams_per_connection: u32,
    pub pooling: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub mode: AuthorizationMode,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: RuleAction,
    pub identities: Vec<String>,
    pub identity_prefixes: Vec<String>,
    pub namespaces: Vec<String>,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub enabled: bool,
    pub cgroups: Vec<String>,
    pub redirect_ipv4: Option<std::net::Ipv4Addr>,
    pub redirect_ipv6: Option<std::net::Ipv6Addr>,
    pub bypass_mark: u32,
    pub ebpf_log: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub connect_timeout: Duration,
    pub drain_deadline: Duration,
    /// splice(2) for plaintext legs (falls back to copying if refused).
    pub zero_copy: bool,
    /// In-kernel socket joining for plaintext legs (`proxy.socket_join`).
    pub socket_join: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<Port>,
    /// At least one set; a service written with `endpoints:` has one set
    /// named `default`.
    pub sets: Vec<BackendSet>,
    pub policy: Policy,
}

/// A weighted group of endpoints within a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSet {
    pub name: String,
    pub weight: u32,
    pub endpoints: Vec<Endpoint>,
}

/// Where an endpoint is: node, zone, region (each optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    pub node: Option<String>,
    pub zone: Option<String>,
    pub region: Option<String>,
}

/// How an endpoint is addressed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointTarget {
    Ip(IpAddr),
    Hostname(String),
}

impl Service {
    /// `namespace/name`, the service's label in logs and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Every endpoint of every set.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.sets.iter().flat_map(|s| s.endpoints.iter())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub target: EndpointTarget,
    /// Overrides the service port's `target_port`.
    pub port: Option<u16>,
    pub weight: u32,
    pub locality: Locality,
    /// The identity the pod presents (namespace, service account); checked
    /// when the endpoint is on another mesh node and reached through the
    /// tunnel.
    pub namespace: String,
    pub service_account: String,
    /// The pod is in the mesh: on another node listed in `nodes` it is
    /// reached through the tunnel (otherwise directly).
    pub mesh: bool,
}

impl Endpoint {
    /// The IP address, for an address endpoint.
    pub fn ip(&self) -> Option<IpAddr> {
        match &self.target {
            EndpointTarget::Ip(ip) => Some(*ip),
            EndpointTarget::Hostname(_) => None,
        }
    }
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Reads and parses a configuration file without validating it.
pub fn load_raw(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_raw(&text, &path.display().to_string())
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let raw = parse_raw(text, file)?;
    raw.validate().map_err(|violations| ConfigError::Invalid {
        file: file.to_owned(),
        violations,
    })
}

/// Parses configuration text without validating it.
pub fn parse_raw(text: &str, file: &str) -> Result<RawConfig, ConfigError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, RawConfig>(de) {
        Ok(raw) => Ok(raw),
        Err(e) => {
            let field = e.path().to_string();
            let field = if field == "." {
                "(top level)".to_owned()
            } else {
                field
            };
            let message = e.into_inner().to_string();
            let message = strip_path_prefix(&message, &field).to_owned();
            Err(ConfigError::Parse {
                file: file.to_owned(),
                field,
                message,
            })
        }
    }
}

/// The YAML parser starts its messages with its own (coarser) path, as in
/// `services[0]: unknown field ...`; the error already names the exact field,
/// so that prefix is dropped rather than shown twice.
fn strip_path_prefix<'a>(message: &'a str, field: &str) -> &'a str {
    match message.split_once(": ") {
        Some((p, rest))
            if field == p
                || field
                    .strip_prefix(p)
                    .is_some_and(|t| t.starts_with('.') || t.starts_with('[')) =>
        {
            rest
        }
        _ => message,
    }
}

fn valid_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl RawConfig {
    /// Checks every rule; on failure returns all violations, in file order.
    pub fn validate(&self) -> Result<Config, Vec<Violation>> {
        let mut v = Vec::new();
        let mut v_policy = Vec::new();
        let mut bad = |field: String, reason: &str| {
            v.push(Violation {
                field,
                reason: reason.to_owned(),
            })
        };

        let node_name = match &self.node.name {
            Some(n) if n.trim().is_empty() => {
                bad("node.name".into(), "must not be empty");
                String::new()
            }
            Some(n) => n.clone(),
            None => hostname(),
        };

        let listeners = Listeners {
            outbound: self
                .listeners
                .outbound
                .unwrap_or_else(|| "[::]:15001".parse().expect("literal address")),
            metrics: self
                .listeners
                .metrics
                .unwrap_or_else(|| "0.0.0.0:15020".parse().expect("literal address")),
            readiness: self
                .listeners
                .readiness
                .unwrap_or_else(|| "0.0.0.0:15021".parse().expect("literal address")),
            inbound: self
                .listeners
                .inbound
                .unwrap_or_else(|| "[::]:15008".parse().expect("literal address")),
        };
        if listeners.outbound.port() == 0 {
            bad("listeners.outbound".into(), "port must not be 0");
        }
        let named = [
            ("listeners.outbound", listeners.outbound),
            ("listeners.metrics", listeners.metrics),
            ("listeners.readiness", listeners.readiness),
            ("listeners.inbound", listeners.inbound),
        ];
        for (i, (a_name, a)) in named.iter().enumerate() {
            for (b_name, b) in &named[i + 1..] {
                if a.port() != 0 && a.port() == b.port() && overlaps(a.ip(), b.ip()) {
                    bad(
                        (*b_name).into(),
                        &format!("{b} collides with {a_name} ({a})"),
                    );
                }
            }
        }

        let c = &self.capture;
        let redirect_ipv4 = match c.redirect_ipv4 {
            Some(IpAddr::V4(a)) if a.is_unspecified() => {
                bad(
                    "capture.redirect_ipv4".into(),
                    "must be a concrete address of this node, not 0.0.0.0",
                );
                None
            }
            Some(IpAddr::V4(a)) => Some(a),
            Some(IpAddr::V6(_)) => {
                bad("capture.redirect_ipv4".into(), "must be an IPv4 address");
                None
            }
            None => None,
        };
        let redirect_ipv6 = match c.redirect_ipv6 {
            Some(IpAddr::V6(a)) if a.is_unspecified() => {
                bad(
                    "capture.redirect_ipv6".into(),
                    "must be a concrete address of this node, not ::",
                );
                None
            }
            Some(IpAddr::V6(a)) => Some(a),
            Some(IpAddr::V4(_)) => {
                bad("capture.redirect_ipv6".into(), "must be an IPv6 address");
                None
            }
            None => None,
        };
        if c.enabled {
            if c.cgroups.is_empty() && self.source == Source::File {
                bad(
                    "capture.cgroups".into(),
                    "must name at least one cgroup to enroll when capture is enabled",
                );
            }
            if c.redirect_ipv4.is_none() && c.redirect_ipv6.is_none() {
                bad(
                    "capture".into(),
                    "needs redirect_ipv4 and/or redirect_ipv6 when capture is enabled",
                );
            }
            if c.bypass_mark == 0 {
                bad(
                    "capture.bypass_mark".into(),
                    "must not be 0 (0 is the mark of every unmarked socket)",
                );
            }
            if let (Some(_), false) = (redirect_ipv4, listeners.outbound.is_ipv4()) {
                // A v6 wildcard listener also accepts IPv4; a concrete v6 one does not.
                if !listeners.outbound.ip().is_unspecified() {
                    bad(
                        "listeners.outbound".into(),
                        "is a concrete IPv6 address but capture.redirect_ipv4 is set: IPv4 clients could not reach it",
                    );
                }
            }
            if redirect_ipv6.is_some() && listeners.outbound.is_ipv4() {
                bad(
                    "listeners.outbound".into(),
                    "is IPv4 but capture.redirect_ipv6 is set: use [::]:PORT to accept both families",
                );
            }
        }
        for (i, cg) in c.cgroups.iter().enumerate() {
            if cg.trim().is_empty() {
                bad(format!("capture.cgroups[{i}]"), "must not be empty");
            } else if cg.split('/').any(|p| p == "..") {
                bad(format!("capture.cgroups[{i}]"), "must not contain '..'");
            }
        }

        let connect_timeout = self
            .proxy
            .connect_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(1));
        if connect_timeout.is_zero() {
            bad("proxy.connect_timeout".into(), "must be greater than 0");
        }
        let drain_deadline = self
            .proxy
            .drain_deadline
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30));

        // Which (address, port) belongs to which service, to catch overlaps.
        let mut owners: HashMap<(IpAddr, u16), usize> = HashMap::new();
        let mut names: HashMap<(String, String), usize> = HashMap::new();
        let mut services = Vec::with_capacity(self.services.len());
        for (si, s) in self.services.iter().enumerate() {
            let at = format!("services[{si}]");
            if !valid_dns_label(&s.name) {
                bad(
                    format!("{at}.name"),
                    "must be a DNS label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
                );
            }
            if !valid_dns_label(&s.namespace) {
                bad(format!("{at}.namespace"), "must be a DNS label");
            }
            if let Some(prev) = names.insert((s.namespace.clone(), s.name.clone()), si) {
                bad(
                    format!("{at}.name"),
                    &format!(
                        "{}/{} is already defined by services[{prev}]",
                        s.namespace, s.name
                    ),
                );
            }
            if s.addresses.is_empty() {
                bad(
                    format!("{at}.addresses"),
                    "must list at least one IPv4 or IPv6 address",
                );
            }
            for (ai, a) in s.addresses.iter().enumerate() {
                if a.is_unspecified() || a.is_multicast() {
                    bad(format!("{at}.addresses[{ai}]"), "must be a unicast address");
                }
                if let Some(v4) = ipv4_mapped(*a) {
                    bad(
                        format!("{at}.addresses[{ai}]"),
                        &format!("is an IPv4-mapped IPv6 address: write it as {v4}"),
                    );
                }
                if s.addresses[..ai].contains(a) {
                    bad(format!("{at}.addresses[{ai}]"), "is listed twice");
                }
            }
            if s.ports.is_empty() {
                bad(format!("{at}.ports"), "must list at least one port");
            }
            let mut ports = Vec::with_capacity(s.ports.len());
            for (pi, p) in s.ports.iter().enumerate() {
                let pat = format!("{at}.ports[{pi}]");
                if p.port == 0 {
                    bad(format!("{pat}.port"), "must be between 1 and 65535");
                }
                if p.target_port == Some(0) {
                    bad(format!("{pat}.target_port"), "must be between 1 and 65535");
                }
                if !p.protocol.eq_ignore_ascii_case("tcp") {
                    bad(
                        format!("{pat}.protocol"),
                        &format!("{:?} is not supported (only TCP)", p.protocol),
                    );
                }
                if s.ports[..pi].iter().any(|q| q.port == p.port) {
                    bad(format!("{pat}.port"), "is listed twice");
                }
                for a in &s.addresses {
                    // The first service to claim an address and port keeps it.
                    let other = *owners.entry((*a, p.port)).or_insert(si);
                    if other != si {
                        bad(
                            format!("{pat}.port"),
                            &format!("{a} port {} is already used by services[{other}]", p.port),
                        );
                    }
                }
                ports.push(Port {
                    port: p.port,
                    target_port: p.target_port.unwrap_or(p.port),
                });
            }
            let raw_sets: Vec<(String, RawBackendSet)> = if !s.backend_sets.is_empty() {
                if !s.endpoints.is_empty() {
                    bad(
                        format!("{at}.endpoints"),
                        "cannot be used together with backend_sets: put the endpoints in a set",
                    );
                }
                s.backend_sets
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (format!("{at}.backend_sets[{i}]"), b.clone()))
                    .collect()
            } else {
                vec![(
                    at.clone(),
                    RawBackendSet {
                        name: "default".into(),
                        weight: 1,
                        endpoints: s.endpoints.clone(),
                    },
                )]
            };
            let mut sets = Vec::with_capacity(raw_sets.len());
            for (set_i, (sat, set)) in raw_sets.iter().enumerate() {
                if !s.backend_sets.is_empty() {
                    if !valid_dns_label(&set.name) {
                        bad(format!("{sat}.name"), "must be a DNS label");
                    }
                    if raw_sets[..set_i].iter().any(|(_, o)| o.name == set.name) {
                        bad(format!("{sat}.name"), "is listed twice");
                    }
                    if set.weight == 0 {
                        bad(format!("{sat}.weight"), "must be greater than 0");
                    }
                    if set.weight > 1_000_000 {
                        bad(format!("{sat}.weight"), "must be at most 1000000");
                    }
                }
                let mut endpoints = Vec::with_capacity(set.endpoints.len());
                for (ei, e) in set.endpoints.iter().enumerate() {
                    let eat = format!("{sat}.endpoints[{ei}]");
                    if e.weight == 0 {
                        bad(format!("{eat}.weight"), "must be greater than 0");
                    }
                    if e.weight > 1_000_000 {
                        bad(format!("{eat}.weight"), "must be at most 1000000");
                    }
                    if e.port == Some(0) {
                        bad(format!("{eat}.port"), "must be between 1 and 65535");
                    }
                    for (f, val) in [("node", &e.node), ("zone", &e.zone), ("region", &e.region)] {
                        if val.as_ref().is_some_and(|x| x.trim().is_empty()) {
                            bad(format!("{eat}.{f}"), "must not be empty");
                        }
                    }
                    if let Some(ns) = &e.namespace
                        && !valid_dns_label(ns)
                    {
                        bad(format!("{eat}.namespace"), "must be a DNS label");
                    }
                    if let Some(sa) = &e.service_account
                        && !valid_dns_label(sa)
                    {
                        bad(format!("{eat}.service_account"), "must be a DNS label");
                    }
                    let has_identity = e.namespace.is_some() || e.service_account.is_some();
                    if e.mesh == Some(false) && has_identity {
                        bad(
                            format!("{eat}.mesh"),
                            "is false but the endpoint has a namespace or service_account (an identity is for mesh pods)",
                        );
                    }
                    // An identity says the pod is in the mesh: on another node
                    // it must be reachable through that node's tunnel.
                    if has_identity
                        && e.mesh != Some(false)
                        && let Some(n) = &e.node
                        && *n != node_name
                        && !self.nodes.contains_key(n)
                    {
                        bad(
                            format!("{eat}.node"),
                            &format!(
                                "{n:?} is not in nodes: a mesh endpoint on another node needs that node's HBONE address"
                            ),
                        );
                    }
                    let target = match (&e.address, &e.hostname) {
                        (Some(_), Some(_)) => {
                            bad(eat.clone(), "has both address and hostname: give one");
                            continue;
                        }
                        (None, None) => {
                            bad(eat.clone(), "needs an address or a hostname");
                            continue;
                        }
                        (None, Some(h)) => {
                            if !balancing::valid_hostname(h) {
                                bad(
                                    format!("{eat}.hostname"),
                                    "must be a DNS name (labels of a-z, 0-9 and '-')",
                                );
                            }
                            if set.endpoints[..ei].iter().any(|f| {
                                f.hostname.as_deref() == Some(h.as_str()) && f.port == e.port
                            }) {
                                bad(format!("{eat}.hostname"), "is listed twice");
                            }
                            EndpointTarget::Hostname(h.trim_end_matches('.').to_ascii_lowercase())
                        }
                        (Some(addr), None) => {
                            let addr = *addr;
                            if addr.is_unspecified() || addr.is_multicast() {
                                bad(format!("{eat}.address"), "must be a unicast address");
                            }
                            if let Some(v4) = ipv4_mapped(addr) {
                                bad(
                                    format!("{eat}.address"),
                                    &format!("is an IPv4-mapped IPv6 address: write it as {v4}"),
                                );
                            }
                            if s.addresses.contains(&addr) {
                                bad(
                                    format!("{eat}.address"),
                                    "is one of the service's own addresses (it would loop)",
                                );
                            }
                            if set.endpoints[..ei]
                                .iter()
                                .any(|f| f.address == Some(addr) && f.port == e.port)
                            {
                                bad(format!("{eat}.address"), "is listed twice");
                            }
                            EndpointTarget::Ip(addr)
                        }
                    };
                    endpoints.push(Endpoint {
                        target,
                        port: e.port,
                        weight: e.weight,
                        locality: Locality {
                            node: e.node.clone(),
                            zone: e.zone.clone(),
                            region: e.region.clone(),
                        },
                        namespace: e.namespace.clone().unwrap_or_else(|| s.namespace.clone()),
                        service_account: e
                            .service_account
                            .clone()
                            .unwrap_or_else(default_service_account),
                        mesh: e.mesh.unwrap_or(true),
                    });
                }
                sets.push(BackendSet {
                    name: set.name.clone(),
                    weight: set.weight,
                    endpoints,
                });
            }
            let policy = balancing::validate_policy(
                &at,
                &s.balancing,
                &s.failover,
                &s.outlier_detection,
                s.health_check.as_ref(),
                connect_timeout,
                &mut v_policy,
            );
            services.push(Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                addresses: s.addresses.clone(),
                ports,
                sets,
                policy,
            });
        }
        // An endpoint that is itself a service address would be captured again.
        for (si, s) in services.iter().enumerate() {
            for (set_i, set) in s.sets.iter().enumerate() {
                for (ei, e) in set.endpoints.iter().enumerate() {
                    let Some(ip) = e.ip() else { continue };
                    for p in &s.ports {
                        let port = e.port.unwrap_or(p.target_port);
                        if let Some(other) = owners.get(&(ip, port))
                            && *other != si
                        {
                            let path = if self.services[si].backend_sets.is_empty() {
                                format!("services[{si}].endpoints[{ei}].address")
                            } else {
                                format!(
                                    "services[{si}].backend_sets[{set_i}].endpoints[{ei}].address"
                                )
                            };
                            bad(
                                path,
                                &format!(
                                    "{ip}:{port} is a service address of services[{other}]; endpoints must be workload addresses"
                                ),
                            );
                        }
                    }
                }
            }
        }
        v.append(&mut v_policy);
        let dns = dns::validate_dns(&self.dns, &services, &mut v);
        let kubernetes = self.kubernetes.validate(&mut v);
        if self.source == Source::Kubernetes && !self.services.is_empty() {
            bad_k(
                &mut v,
                "services",
                "must be empty with `source: kubernetes` (services come from the API)",
            );
        }
        let mesh = self.validate_mesh(&mut v);

        if !v.is_empty() {
            return Err(v);
        }
        let (workloads, nodes, tls, hbone, authorization) = mesh;
        Ok(Config {
            source: self.source,
            kubernetes,
            locality: Locality {
                node: Some(node_name.clone()),
                zone: self.node.zone.clone(),
                region: self.node.region.clone(),
            },
            node_name,
            listeners,
            capture: Capture {
                enabled: c.enabled,
                cgroups: c.cgroups.clone(),
                redirect_ipv4,
                redirect_ipv6,
                bypass_mark: c.bypass_mark,
                ebpf_log: c.ebpf_log,
            },
            proxy: Proxy {
                connect_timeout,
                drain_deadline,
                zero_copy: self.proxy.zero_copy.unwrap_or(true),
                socket_join: self.proxy.socket_join.unwrap_or(false),
            },
            services,
            dns,
            workloads,
            nodes,
            tls,
            hbone,
            authorization,
        })
    }

    /// Workloads, nodes, TLS, HBONE and authorization.
    #[allow(clippy::type_complexity)]
    fn validate_mesh(
        &self,
        v: &mut Vec<Violation>,
    ) -> (
        Vec<Workload>,
        BTreeMap<String, SocketAddr>,
        Tls,
        Hbone,
        Authorization,
    ) {
        let mut bad = |field: String, reason: &str| {
            v.push(Violation {
                field,
                reason: reason.to_owned(),
            })
        };
        let mut workloads = Vec::with_capacity(self.workloads.len());
        for (wi, w) in self.workloads.iter().enumerate() {
            let at = format!("workloads[{wi}]");
            if w.address.is_unspecified() || w.address.is_multicast() {
                bad(format!("{at}.address"), "must be a unicast address");
            }
            if let Some(v4) = ipv4_mapped(w.address) {
                bad(
                    format!("{at}.address"),
                    &format!("is an IPv4-mapped IPv6 address: write it as {v4}"),
                );
            }
            if self.workloads[..wi].iter().any(|o| o.address == w.address) {
                bad(format!("{at}.address"), "is listed twice");
            }
            if !valid_dns_label(&w.namespace) {
                bad(format!("{at}.namespace"), "must be a DNS label");
            }
            if !valid_dns_label(&w.service_account) {
                bad(format!("{at}.service_account"), "must be a DNS label");
            }
            workloads.push(Workload {
                address: w.address,
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
            });
        }

        let mut nodes = BTreeMap::new();
        for (name, addr) in &self.nodes {
            let at = format!("nodes.{name}");
            if name.is_empty() || !name.split('.').all(valid_dns_label) {
                bad(at.clone(), "node name must be a lowercase DNS name");
            }
            let parsed = addr.parse::<SocketAddr>().ok().or_else(|| {
                addr.parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, HBONE_PORT))
            });
            match parsed {
                Some(a) if a.ip().is_unspecified() || a.ip().is_multicast() => {
                    bad(at, "must be a unicast address")
                }
                Some(a) if a.port() == 0 => bad(at, "port must not be 0"),
                Some(a) => {
                    nodes.insert(name.clone(), a);
                }
                None => bad(
                    at,
                    &format!(
                        "{addr:?} is not an address (IP or IP:PORT; the port defaults to {HBONE_PORT})"
                    ),
                ),
            }
        }

        let t = &self.tls;
        let trust_domain = t
            .trust_domain
            .clone()
            .unwrap_or_else(|| "cluster.local".to_owned());
        if !crate::tls::identity::valid_trust_domain(&trust_domain) {
            bad(
                "tls.trust_domain".into(),
                "must be a lowercase DNS name (labels of a-z, 0-9, '-')",
            );
        }
        let ca = match &t.ca {
            None => CaSource::Generate,
            Some(RawCa::Keyword(k)) if k == "generate" => CaSource::Generate,
            Some(RawCa::Keyword(k)) => {
                bad(
                    "tls.ca".into(),
                    &format!("{k:?}: must be \"generate\" or {{ cert: FILE, key: FILE }}"),
                );
                CaSource::Generate
            }
            Some(RawCa::Files(f)) => {
                for (field, p) in [("tls.ca.cert", &f.cert), ("tls.ca.key", &f.key)] {
                    if p.as_os_str().is_empty() {
                        bad(field.into(), "must not be empty");
                    }
                }
                CaSource::Files {
                    cert: f.cert.clone(),
                    key: f.key.clone(),
                }
            }
        };
        if t.trust_bundle
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            bad("tls.trust_bundle".into(), "must not be empty");
        }
        let leaf_lifetime = t
            .leaf_lifetime
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(24 * 3600));
        if leaf_lifetime < Duration::from_secs(1) {
            bad("tls.leaf_lifetime".into(), "must be at least 1s");
        }

        let max_streams = self.hbone.max_streams_per_connection.unwrap_or(100);
        if max_streams == 0 || max_streams > 10_000 {
            bad(
                "hbone.max_streams_per_connection".into(),
                "must be between 1 and 10000",
            );
        }

        let mut rules = Vec::with_capacity(self.authorization.rules.len());
        for (ri, r) in self.authorization.rules.iter().enumerate() {
            let at = format!("authorization.rules[{ri}]");
            for (ii, id) in r.identities.iter().enumerate() {
                if let Err(e) = crate::tls::Identity::parse(id) {
                    bad(format!("{at}.identities[{ii}]"), &format!("{id:?}: {e}"));
                }
            }
            for (pi, p) in r.identity_prefixes.iter().enumerate() {
                if !p.starts_with("spiffe://") || p.len() <= "spiffe://".len() {
                    bad(
                        format!("{at}.identity_prefixes[{pi}]"),
                        "must start with spiffe:// and name at least a trust domain",
                    );
                }
            }
            for (ni, n) in r.namespaces.iter().enumerate() {
                if !valid_dns_label(n) {
                    bad(format!("{at}.namespaces[{ni}]"), "must be a DNS label");
                }
            }
            for (pi, p) in r.ports.iter().enumerate() {
                if *p == 0 {
                    bad(format!("{at}.ports[{pi}]"), "must be between 1 and 65535");
                }
            }
            rules.push(Rule {
                action: r.action,
                identities: r.identities.clone(),
                identity_prefixes: r.identity_prefixes.clone(),
                namespaces: r.namespaces.clone(),
                ports: r.ports.clone(),
            });
        }
        (
            workloads,
            nodes,
            Tls {
                trust_domain,
                ca,
                trust_bundle: t.trust_bundle.clone(),
                leaf_lifetime,
            },
            Hbone {
                max_streams_per_connection: max_streams,
                pooling: self.hbone.pooling.unwrap_or(true),
            },
            Authorization {
                mode: self.authorization.mode,
                rules,
            },
        )
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`. Such an address is the same destination as
/// its IPv4 form (capture and lookups treat it so), so accepting both
/// spellings would hide overlaps and loops from the checks above.
fn ipv4_mapped(a: IpAddr) -> Option<std::net::Ipv4Addr> {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

fn bad_k(v: &mut Vec<Violation>, field: &str, reason: &str) {
    v.push(Violation {
        field: field.to_owned(),
        reason: reason.to_owned(),
    });
}

fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests;
