//! Kubernetes objects → Ferry's configuration.
//!
//! Pure functions over an [`Objects`] cache: the watch loop keeps the cache,
//! this module turns it into the same validated [`config::Service`] list the
//! file source produces, the cgroups to enroll, this node's locality and the
//! workload identities of the pods on this node. Nothing here panics on API
//! input: a Service that does not translate into a valid configuration is
//! left out (and named in [`Translated::rejected`]), the rest go on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::tcproute::TcpRoute;
use crate::config::{
    self, CgroupDriver, Kubernetes, RawBackendSet, RawConfig, RawEndpoint, RawPort, RawService,
};

/// Label on a Namespace that enrolls its pods.
pub const MESH_LABEL: &str = "ferry.io/mesh";
/// The value of [`MESH_LABEL`] that enrolls.
pub const MESH_ENABLED: &str = "enabled";
/// Pod annotation that opts one pod out (`disabled`).
pub const CAPTURE_ANNOTATION: &str = "ferry.io/capture";
/// Service annotation that picks the balancing algorithm
/// (`p2c_peak_ewma`, `least_connections`, `round_robin`, `random`).
pub const BALANCING_ANNOTATION: &str = "ferry.io/balancing";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// The cluster objects the source watches, by `namespace/name` (cluster-
/// scoped objects by name).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: BTreeMap<String, Service>,
    pub slices: BTreeMap<String, EndpointSlice>,
    pub pods: BTreeMap<String, Pod>,
    pub nodes: BTreeMap<String, Node>,
    pub namespaces: BTreeMap<String, Namespace>,
    pub routes: BTreeMap<String, TcpRoute>,
}

/// The key an object is cached under.
pub fn key<K: kube::Resource>(o: &K) -> String {
    match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

/// Errors turning a printed object into a cached one.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object has no kind")]
    NoKind,
    #[error("kind {0} is not one Ferry watches")]
    UnknownKind(String),
    #[error("{kind}: {source}")]
    Decode {
        kind: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Objects {
    /// Adds or replaces an object given as `kubectl get -o yaml|json`
    /// prints it (a `List` applies each item).
    pub fn apply_value(&mut self, v: serde_json::Value) -> Result<(), ObjectError> {
        self.change(v, true)
    }

    /// Removes the object named by `v` (only its kind and metadata matter).
    pub fn delete_value(&mut self, v: serde_json::Value) -> Result<(), ObjectError> {
        self.change(v, false)
    }

    fn change(&mut self, v: serde_json::Value, add: bool) -> Result<(), ObjectError> {
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or(ObjectError::NoKind)?
            .to_owned();
        fn put<K: kube::Resource + serde::de::DeserializeOwned>(
            map: &mut BTreeMap<String, K>,
            kind: &str,
            v: serde_json::Value,
            add: bool,
        ) -> Result<(), ObjectError> {
            let o: K = serde_json::from_value(v).map_err(|source| ObjectError::Decode {
                kind: kind.to_owned(),
                source,
            })?;
            let k = key(&o);
            if add {
                map.insert(k, o);
            } else {
                map.remove(&k);
            }
            Ok(())
        }
        match kind.as_str() {
            "List" => {
                let items = v
                    .get("items")
                    .and_then(|i| i.as_array())
                    .cloned()
                    .unwrap_or_default();
                for item in items {
                    self.change(item, add)?;
                }
                Ok(())
            }
            "Service" => put(&mut self.services, &kind, v, add),
            "EndpointSlice" => put(&mut self.slices, &kind, v, add),
            "Pod" => put(&mut self.pods, &kind, v, add),
            "Node" => put(&mut self.nodes, &kind, v, add),
            "Namespace" => put(&mut self.namespaces, &kind, v, add),
            "TCPRoute" => put(&mut self.routes, &kind, v, add),
            _ => Err(ObjectError::UnknownKind(kind)),
        }
    }
}

/// What the cluster says this node should run.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// Validated services, sorted by `namespace/name`.
    pub services: Vec<config::Service>,
    /// Cgroups to enroll, relative to the cgroup2 mount.
    pub cgroups: BTreeSet<String>,
    /// This node's zone and region, from its labels.
    pub zone: Option<String>,
    pub region: Option<String>,
    /// Workload identity (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`) of each
    /// enrolled pod on this node, by pod IP.
    pub identities: BTreeMap<IpAddr, String>,
    /// Services left out, with why.
    pub rejected: Vec<(String, String)>,
}

/// What the translation needs besides the objects.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub node_name: &'a str,
    /// The agent's own settings (listeners, defaults) that each translated
    /// service is validated with.
    pub settings: &'a RawConfig,
    pub kubernetes: &'a Kubernetes,
    pub trust_domain: &'a str,
}

fn label<'a>(meta: &'a kube::api::ObjectMeta, name: &str) -> Option<&'a str> {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(name))
        .map(String::as_str)
}

fn annotation<'a>(meta: &'a kube::api::ObjectMeta, name: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|l| l.get(name))
        .map(String::as_str)
}

/// Translates the whole cache.
pub fn translate(objects: &Objects, cx: &Context<'_>) -> Translated {
    let this_node = objects.nodes.get(cx.node_name);
    let zone = this_node.and_then(|n| label(&n.metadata, ZONE_LABEL).map(str::to_owned));
    let region = this_node.and_then(|n| label(&n.metadata, REGION_LABEL).map(str::to_owned));

    let mut rejected = Vec::new();
    let mut services = Vec::new();
    for (k, svc) in &objects.services {
        let Some(raw) = raw_service(objects, svc, zone.as_deref()) else {
            continue;
        };
        match validate(cx.settings, vec![raw]) {
            Ok(mut v) => services.append(&mut v),
            Err(why) => {
                tracing::warn!(service = %k, reason = %why, "service left out");
                rejected.push((k.clone(), why));
            }
        }
    }

    let (cgroups, identities) = enrollment(objects, cx);
    Translated {
        services,
        cgroups,
        zone,
        region,
        identities,
        rejected,
    }
}

/// Validates services with the agent's settings; returns them or the
/// violations as one line.
fn validate(
    settings: &RawConfig,
    services: Vec<RawService>,
) -> Result<Vec<config::Service>, String> {
    let mut raw = settings.clone();
    raw.source = config::Source::File;
    raw.capture.enabled = false;
    raw.services = services;
    raw.validate().map(|c| c.services).map_err(|v| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// Ready endpoints of a Service (terminating-but-serving ones when no
/// endpoint is ready), from its EndpointSlices, with zone hints applied for
/// `local_zone`. `port_name` picks the slice port whose number becomes the
/// endpoint port (`None`: no per-endpoint port).
fn endpoints_of(
    objects: &Objects,
    ns: &str,
    name: &str,
    local_zone: Option<&str>,
    port_for: Option<&str>,
) -> Vec<RawEndpoint> {
    struct Cand {
        ip: IpAddr,
        port: Option<u16>,
        ready: bool,
        serving_terminating: bool,
        node: Option<String>,
        zone: Option<String>,
        hints: Option<Vec<String>>,
    }
    let mut cands: Vec<Cand> = Vec::new();
    for slice in slices_of(objects, ns, name) {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let port = match port_for {
            None => None,
            Some(pn) => {
                let Some(p) = slice_port(slice, pn) else {
                    continue;
                };
                Some(p)
            }
        };
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let node = ep.node_name.clone();
            let zone = ep.zone.clone().or_else(|| {
                node.as_ref()
                    .and_then(|n| objects.nodes.get(n))
                    .and_then(|n| label(&n.metadata, ZONE_LABEL).map(str::to_owned))
            });
            let hints = ep
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect::<Vec<_>>());
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                if cands.iter().any(|c| c.ip == ip && c.port == port) {
                    continue;
                }
                cands.push(Cand {
                    ip,
                    port,
                    ready,
                    serving_terminating: serving && terminating,
                    node: node.clone(),
                    zone: zone.clone(),
                    hints: hints.clone(),
                });
            }
        }
    }
    let any_ready = cands.iter().any(|c| c.ready);
    let mut chosen: Vec<Cand> = cands
        .into_iter()
        .filter(|c| {
            if any_ready {
                c.ready
            } else {
                c.serving_terminating
            }
        })
        .collect();
    // Topology-aware hints, as kube-proxy applies them: only when every
    // endpoint carries hints and at least one is meant for this zone.
    if let Some(z) = local_zone
        && !chosen.is_empty()
        && chosen
            .iter()
            .all(|c| c.hints.as_ref().is_some_and(|h| !h.is_empty()))
        && chosen
            .iter()
            .any(|c| c.hints.as_ref().is_some_and(|h| h.iter().any(|x| x == z)))
    {
        chosen.retain(|c| c.hints.as_ref().is_some_and(|h| h.iter().any(|x| x == z)));
    }
    // A stable order whatever the slices are called: IPv4 before IPv6, by address.
    chosen.sort_by_key(|c| (c.ip, c.port));
    let region_of = |node: &Option<String>| {
        node.as_ref()
            .and_then(|n| objects.nodes.get(n))
            .and_then(|n| label(&n.metadata, REGION_LABEL).map(str::to_owned))
    };
    chosen
        .into_iter()
        .map(|c| RawEndpoint {
            address: Some(c.ip),
            hostname: None,
            port: c.port,
            weight: 1,
            region: region_of(&c.node),
            node: c.node.filter(|n| !n.trim().is_empty()),
            zone: c.zone.filter(|z| !z.trim().is_empty()),
            // The pod's identity (its service account) is not read from
            // the API yet: the defaults (service namespace, `default`) apply.
            namespace: None,
            service_account: None,
            mesh: None,
        })
        .collect()
}

fn slices_of<'a>(objects: &'a Objects, ns: &str, name: &str) -> Vec<&'a EndpointSlice> {
    let prefix = format!("{ns}/");
    objects
        .slices
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(_, s)| s)
        .filter(|s| label(&s.metadata, SERVICE_NAME_LABEL) == Some(name))
        .collect()
}

/// The number a slice gives the (TCP) port named `name` ("" = unnamed).
fn slice_port(slice: &EndpointSlice, name: &str) -> Option<u16> {
    slice.ports.as_ref()?.iter().find_map(|p| {
        let pname = p.name.as_deref().unwrap_or("");
        let tcp = p.protocol.as_deref().unwrap_or("TCP") == "TCP";
        if tcp && pname == name {
            p.port.and_then(|n| u16::try_from(n).ok())
        } else {
            None
        }
    })
}

/// A Service's TCP ports with their resolved target ports.
fn service_ports(objects: &Objects, svc: &Service) -> Vec<(String, RawPort)> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.name_any();
    let slices = slices_of(objects, ns, &name);
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    spec.ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let pname = p.name.clone().unwrap_or_default();
            // Endpoint slices carry the number a (possibly named) target
            // port resolves to; the first slice that names it wins.
            let target = slices
                .iter()
                .find_map(|s| slice_port(s, &pname))
                .or(match &p.target_port {
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    Some(IntOrString::String(s)) => s.parse().ok(),
                    None => Some(port),
                })
                .unwrap_or(port);
            Some((
                pname,
                RawPort {
                    port,
                    target_port: Some(target),
                    protocol: "TCP".into(),
                },
            ))
        })
        .collect()
}

fn raw_service(objects: &Objects, svc: &Service, local_zone: Option<&str>) -> Option<RawService> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let ns = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.name_any();
    let mut addresses: Vec<IpAddr> = Vec::new();
    let ips = spec
        .cluster_ips
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    for ip in ips {
        if let Ok(a) = ip.parse::<IpAddr>()
            && !addresses.contains(&a)
        {
            addresses.push(a);
        }
    }
    // Headless services (clusterIP: None) have no address to capture.
    if addresses.is_empty() {
        return None;
    }
    let ports: Vec<RawPort> = service_ports(objects, svc)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if ports.is_empty() {
        return None;
    }
    let mut balancing = config::balancing::RawBalancing::default();
    if let Some(a) = annotation(&svc.metadata, BALANCING_ANNOTATION) {
        match serde_yaml_ng::from_str::<config::Algorithm>(a) {
            Ok(alg) => balancing.algorithm = alg,
            Err(_) => {
                tracing::warn!(service = %format!("{ns}/{name}"), value = a, "unknown {BALANCING_ANNOTATION}; using the default")
            }
        }
    }
    let backend_sets = route_sets(objects, &ns, &name, local_zone);
    let endpoints = if backend_sets.is_empty() {
        endpoints_of(objects, &ns, &name, local_zone, None)
    } else {
        Vec::new()
    };
    Some(RawService {
        name,
        namespace: ns,
        addresses,
        ports,
        endpoints,
        backend_sets,
        balancing,
        failover: Default::default(),
        outlier_detection: Default::default(),
        health_check: None,
    })
}

/// Backend sets from the first TCPRoute (by namespace/name) whose parentRef
/// is this Service. Backends are Services of the route's namespace; each
/// becomes a set named after it, weighted by its `weight`.
fn route_sets(
    objects: &Objects,
    ns: &str,
    name: &str,
    local_zone: Option<&str>,
) -> Vec<RawBackendSet> {
    for (rk, route) in &objects.routes {
        let rns = route.metadata.namespace.as_deref().unwrap_or("default");
        let parent = route.spec.parent_refs.iter().any(|p| {
            p.is_service() && p.name == name && p.namespace.as_deref().unwrap_or(rns) == ns
        });
        if !parent {
            continue;
        }
        let mut sets: Vec<RawBackendSet> = Vec::new();
        for b in route.spec.rules.iter().flat_map(|r| r.backend_refs.iter()) {
            let kind_ok = b.kind.as_deref().unwrap_or("Service") == "Service"
                && matches!(b.group.as_deref(), None | Some("") | Some("core"));
            let bns = b.namespace.as_deref().unwrap_or(rns);
            if !kind_ok || bns != rns {
                tracing::warn!(route = %rk, backend = %b.name, "backendRef skipped: only Services of the route's namespace are supported");
                continue;
            }
            let weight = b.weight.unwrap_or(1);
            if weight <= 0 || sets.iter().any(|s| s.name == b.name) {
                continue;
            }
            // The backend Service's port named by the ref, resolved to the
            // number its endpoints listen on.
            let port_name = b.port.and_then(|bp| {
                let bsvc = objects.services.get(&format!("{bns}/{}", b.name))?;
                service_ports(objects, bsvc)
                    .into_iter()
                    .find(|(_, p)| i32::from(p.port) == bp)
                    .map(|(n, _)| n)
            });
            if b.port.is_some() && port_name.is_none() {
                tracing::warn!(route = %rk, backend = %b.name, "backendRef port not found on the backend Service");
                continue;
            }
            sets.push(RawBackendSet {
                name: b.name.clone(),
                weight: u32::try_from(weight).unwrap_or(1).min(1_000_000),
                endpoints: endpoints_of(objects, bns, &b.name, local_zone, port_name.as_deref()),
            });
        }
        if !sets.is_empty() {
            return sets;
        }
    }
    Vec::new()
}

/// The cgroups of the enrolled pods on this node, and their identities.
fn enrollment(objects: &Objects, cx: &Context<'_>) -> (BTreeSet<String>, BTreeMap<IpAddr, String>) {
    let mut cgroups = BTreeSet::new();
    let mut identities = BTreeMap::new();
    for (k, pod) in &objects.pods {
        let Some(ns) = pod.metadata.namespace.as_deref() else {
            continue;
        };
        let enrolled_ns = objects
            .namespaces
            .get(ns)
            .is_some_and(|n| label(&n.metadata, MESH_LABEL) == Some(MESH_ENABLED));
        if !enrolled_ns || annotation(&pod.metadata, CAPTURE_ANNOTATION) == Some("disabled") {
            continue;
        }
        let Some(spec) = &pod.spec else { continue };
        if spec.node_name.as_deref() != Some(cx.node_name) || spec.host_network == Some(true) {
            continue;
        }
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        ) {
            continue;
        }
        let (Some(uid), Some(qos)) = (
            pod.metadata.uid.as_deref(),
            status.and_then(|s| s.qos_class.as_deref()),
        ) else {
            tracing::debug!(pod = %k, "pod without uid or QoS class yet; not enrolled");
            continue;
        };
        match pod_cgroup(cx.kubernetes, uid, qos) {
            Some(p) => {
                cgroups.insert(p);
            }
            None => {
                tracing::warn!(pod = %k, qos, "unknown QoS class or bad uid; not enrolled");
                continue;
            }
        }
        let sa = spec.service_account_name.as_deref().unwrap_or("default");
        let id = format!("spiffe://{}/ns/{ns}/sa/{sa}", cx.trust_domain);
        for ip in status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
        {
            if let Ok(a) = ip.ip.parse::<IpAddr>() {
                identities.insert(a, id.clone());
            }
        }
    }
    (cgroups, identities)
}

/// The kubelet's cgroup for a pod, relative to the cgroup2 mount:
///
/// * systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`
///   (`-` in the uid become `_`; Guaranteed pods sit directly under
///   `kubepods.slice` as `kubepods-pod<uid>.slice`);
/// * cgroupfs: `kubepods/burstable/pod<uid>` (Guaranteed: `kubepods/pod<uid>`).
///
/// `None` for an unknown QoS class or a uid that is not a plain UUID.
pub fn pod_cgroup(k: &Kubernetes, uid: &str, qos: &str) -> Option<String> {
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return None;
    }
    let qos = match qos {
        "Guaranteed" => None,
        "Burstable" => Some("burstable"),
        "BestEffort" => Some("besteffort"),
        _ => return None,
    };
    let root = &k.cgroup_root;
    let join = |rest: String| {
        if root.is_empty() {
            rest
        } else {
            format!("{root}/{rest}")
        }
    };
    Some(match (k.cgroup_driver, qos) {
        (CgroupDriver::Systemd, None) => {
            join(format!("kubepods-pod{}.slice", uid.replace('-', "_")))
        }
        (CgroupDriver::Systemd, Some(q)) => join(format!(
            "kubepods-{q}.slice/kubepods-{q}-pod{}.slice",
            uid.replace('-', "_")
        )),
        (CgroupDriver::Cgroupfs, None) => join(format!("pod{uid}")),
        (CgroupDriver::Cgroupfs, Some(q)) => join(format!("{q}/pod{uid}")),
    })
}
