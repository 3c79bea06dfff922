//! Kubernetes objects → Ferry's configuration.
//!
//! Pure functions over an [`Objects`] cache: the watch loop keeps the cache,
//! this module turns it into what the file source gives: the validated
//! [`config::Service`] list, the cgroups to enroll, this node's locality,
//! the mesh's local workloads (`workloads`) and the other nodes' tunnel
//! addresses (`nodes`). Nothing here panics on API input: a Service that
//! does not translate into a valid configuration is left out (and named in
//! [`Translated::rejected`]), the rest go on.
//!
//! **The mesh.** A pod is in the mesh when its namespace is labelled
//! `ferry.io/mesh=enabled`, it is not annotated `ferry.io/capture:
//! disabled`, it is not on the host network and its service account is a
//! DNS label (a SPIFFE identity must be one). Each endpoint of an
//! EndpointSlice is matched to its pod through `targetRef` (kind Pod, same
//! uid); it carries its node (`nodeName`, else the pod's) and, when the pod
//! is in the mesh and either on this node or on a node whose address is
//! known, its identity (namespace, service account) with `mesh: true`. Any
//! other endpoint is `mesh: false` and is connected to directly, as before
//! Ferry. A node's tunnel address is its first `InternalIP` (IPv4 before
//! IPv6), else its first `ExternalIP`, with the agent's own HBONE port
//! (`listeners.inbound`, all nodes run the same DaemonSet).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::node::{NodeInfo, NodeObject};
use super::pod::{PodInfo, PodObject};
use super::tcproute::TcpRoute;
use crate::config::{
    self, CgroupDriver, Kubernetes, RawBackendSet, RawConfig, RawEndpoint, RawPort, RawService,
    Workload,
};
use crate::tls::identity::valid_label;

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

/// The cluster objects the source watches, by `namespace/name` (cluster-
/// scoped objects by name).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: BTreeMap<String, Service>,
    pub slices: BTreeMap<String, EndpointSlice>,
    /// Every pod of the cluster, reduced to what Ferry reads.
    pub pods: BTreeMap<String, PodInfo>,
    /// Every node of the cluster, reduced to its address and locality.
    pub nodes: BTreeMap<String, NodeInfo>,
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
        /// Decodes a `K` and caches it as a `V` (what the watch does).
        fn put<K: kube::Resource + serde::de::DeserializeOwned, V: From<K>>(
            map: &mut BTreeMap<String, V>,
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
                map.insert(k, V::from(o));
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
            "Service" => put::<Service, _>(&mut self.services, &kind, v, add),
            "EndpointSlice" => put::<EndpointSlice, _>(&mut self.slices, &kind, v, add),
            "Pod" => put::<PodObject, _>(&mut self.pods, &kind, v, add),
            "Node" => put::<NodeObject, _>(&mut self.nodes, &kind, v, add),
            "Namespace" => put::<Namespace, _>(&mut self.namespaces, &kind, v, add),
            "TCPRoute" => put::<TcpRoute, _>(&mut self.routes, &kind, v, add),
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
    /// The enrolled pods on this node, one entry per pod address, by
    /// address: the identities the tunnel presents for them.
    pub workloads: Vec<Workload>,
    /// Tunnel (HBONE) address of every node whose address is known.
    pub nodes: BTreeMap<String, SocketAddr>,
    /// Other nodes with mesh endpoints that cannot be tunnelled to because
    /// no address of theirs is known (no Node object, or neither an
    /// `InternalIP` nor an `ExternalIP`): those endpoints go direct.
    pub unaddressed_nodes: BTreeSet<String>,
    /// Services left out, with why.
    pub rejected: Vec<(String, String)>,
}

/// What the translation needs besides the objects.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub node_name: &'a str,
    /// The agent's own settings (listeners, defaults) that each translated
    /// service is validated with.
    /// Its `listeners.inbound` port is every node's HBONE port.
    pub settings: &'a RawConfig,
    pub kubernetes: &'a Kubernetes,
}

/// What endpoint translation needs to know about this node and the mesh.
struct Local<'a> {
    node: &'a str,
    zone: Option<&'a str>,
    nodes: &'a BTreeMap<String, SocketAddr>,
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
    let zone = this_node.and_then(|n| n.zone.clone());
    let region = this_node.and_then(|n| n.region.clone());
    let port = cx
        .settings
        .listeners
        .inbound
        .map(|a| a.port())
        .filter(|p| *p != 0)
        .unwrap_or(config::HBONE_PORT);
    let nodes = node_addresses(objects, port);
    let local = Local {
        node: cx.node_name,
        zone: zone.as_deref(),
        nodes: &nodes,
    };

    // The agent's settings with the nodes' addresses, so that validation
    // accepts mesh endpoints on those nodes.
    let mut base = cx.settings.clone();
    base.source = config::Source::File;
    base.capture.enabled = false;
    base.services.clear();
    base.workloads.clear();
    base.nodes = nodes
        .iter()
        .map(|(n, a)| (n.clone(), a.to_string()))
        .collect();
    let mut rejected = Vec::new();
    let mut services = Vec::new();
    for (k, svc) in &objects.services {
        let Some(raw) = raw_service(objects, svc, &local) else {
            continue;
        };
        match validate(&mut base, raw) {
            Ok(mut v) => services.append(&mut v),
            Err(why) => {
                tracing::warn!(service = %k, reason = %why, "service left out");
                rejected.push((k.clone(), why));
            }
        }
    }

    let (cgroups, workloads) = enrollment(objects, cx);
    let unaddressed_nodes = unaddressed_nodes(objects, &local);
    Translated {
        services,
        cgroups,
        zone,
        region,
        workloads,
        nodes,
        unaddressed_nodes,
        rejected,
    }
}

/// The tunnel address of every node with a usable address.
fn node_addresses(objects: &Objects, port: u16) -> BTreeMap<String, SocketAddr> {
    objects
        .nodes
        .iter()
        // A node name that is not a DNS name cannot be configured (the
        // file source would reject it); such a node is simply not tunnelled to.
        .filter(|(name, _)| name.split('.').all(valid_label))
        .filter_map(|(name, n)| Some((name.clone(), SocketAddr::new(n.address?, port))))
        .collect()
}

/// Whether a pod asks to be in the mesh: its namespace is labelled, it did
/// not opt out, it is not on the host network.
fn wants_mesh(objects: &Objects, pod: &PodInfo) -> bool {
    objects
        .namespaces
        .get(&pod.namespace)
        .is_some_and(|n| label(&n.metadata, MESH_LABEL) == Some(MESH_ENABLED))
        && !pod.opted_out
        && !pod.host_network
}

/// Whether a pod can have a workload identity: namespace and service
/// account are DNS labels.
fn has_identity(pod: &PodInfo) -> bool {
    valid_label(&pod.namespace) && valid_label(pod.service_account())
}

/// Whether a pod is in the mesh (see the module documentation).
fn in_mesh(objects: &Objects, pod: &PodInfo) -> bool {
    wants_mesh(objects, pod) && has_identity(pod)
}

/// The pod an endpoint targets (`targetRef` of kind Pod, with the same uid
/// when both say one), if the cache has it.
fn endpoint_pod<'a>(
    objects: &'a Objects,
    slice_ns: &str,
    ep: &SliceEndpoint,
) -> Option<&'a PodInfo> {
    let r = ep.target_ref.as_ref()?;
    if r.kind.as_deref() != Some("Pod") {
        return None;
    }
    let ns = r.namespace.as_deref().unwrap_or(slice_ns);
    let pod = objects.pods.get(&format!("{ns}/{}", r.name.as_deref()?))?;
    match (&r.uid, &pod.uid) {
        (Some(a), Some(b)) if a != b => None,
        _ => Some(pod),
    }
}

/// An endpoint's node: the slice's `nodeName`, else its pod's.
fn endpoint_node(ep: &SliceEndpoint, pod: Option<&PodInfo>) -> Option<String> {
    ep.node_name
        .clone()
        .or_else(|| pod.and_then(|p| p.node.clone()))
        .filter(|n| !n.trim().is_empty())
}

/// Other nodes that hold mesh endpoints but have no known address.
fn unaddressed_nodes(objects: &Objects, local: &Local<'_>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for slice in objects.slices.values() {
        let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
        for ep in &slice.endpoints {
            let Some(pod) = endpoint_pod(objects, ns, ep).filter(|p| in_mesh(objects, p)) else {
                continue;
            };
            if let Some(node) = endpoint_node(ep, Some(pod))
                && node != local.node
                && !local.nodes.contains_key(&node)
            {
                out.insert(node);
            }
        }
    }
    out
}

/// Validates services with the agent's settings; returns them or the
/// violations as one line.
fn validate(base: &mut RawConfig, service: RawService) -> Result<Vec<config::Service>, String> {
    base.services = vec![service];
    let result = base.validate().map(|c| c.services).map_err(|v| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    });
    base.services.clear();
    result
}

/// Ready endpoints of a Service (terminating-but-serving ones when no
/// endpoint is ready), from its EndpointSlices, with zone hints applied for
/// this node's zone and mesh identities where they apply (see the module
/// documentation). `port_for` picks the slice port whose number becomes the
/// endpoint port (`None`: no per-endpoint port).
fn endpoints_of(
    objects: &Objects,
    ns: &str,
    name: &str,
    local: &Local<'_>,
    port_for: Option<&str>,
) -> Vec<RawEndpoint> {
    struct Cand<'p> {
        ip: IpAddr,
        port: Option<u16>,
        ready: bool,
        serving_terminating: bool,
        node: Option<String>,
        zone: Option<String>,
        hints: Option<Vec<String>>,
        pod: Option<&'p PodInfo>,
    }
    let mut cands: Vec<Cand<'_>> = Vec::new();
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
            let pod = endpoint_pod(objects, ns, ep);
            let node = endpoint_node(ep, pod);
            let zone = ep.zone.clone().or_else(|| {
                node.as_ref()
                    .and_then(|n| objects.nodes.get(n))
                    .and_then(|n| n.zone.clone())
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
                    pod,
                });
            }
        }
    }
    let any_ready = cands.iter().any(|c| c.ready);
    let mut chosen: Vec<Cand<'_>> = cands
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
    if let Some(z) = local.zone
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
            .and_then(|n| n.region.clone())
    };
    chosen
        .into_iter()
        .map(|c| {
            // The identity goes with the endpoint only when the tunnel can
            // reach it (or it is local); otherwise it is outside the mesh
            // for this node, and reached directly.
            let reachable = c
                .node
                .as_deref()
                .is_some_and(|n| n == local.node || local.nodes.contains_key(n));
            let identity = c
                .pod
                .filter(|p| reachable && in_mesh(objects, p))
                .map(|p| (p.namespace.clone(), p.service_account().to_owned()));
            RawEndpoint {
                address: Some(c.ip),
                hostname: None,
                port: c.port,
                weight: 1,
                region: region_of(&c.node),
                mesh: Some(identity.is_some()),
                namespace: identity.as_ref().map(|(ns, _)| ns.clone()),
                service_account: identity.map(|(_, sa)| sa),
                node: c.node,
                zone: c.zone.filter(|z| !z.trim().is_empty()),
            }
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

fn raw_service(objects: &Objects, svc: &Service, local: &Local<'_>) -> Option<RawService> {
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
    let backend_sets = route_sets(objects, &ns, &name, local);
    let endpoints = if backend_sets.is_empty() {
        endpoints_of(objects, &ns, &name, local, None)
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
fn route_sets(objects: &Objects, ns: &str, name: &str, local: &Local<'_>) -> Vec<RawBackendSet> {
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
                endpoints: endpoints_of(objects, bns, &b.name, local, port_name.as_deref()),
            });
        }
        if !sets.is_empty() {
            return sets;
        }
    }
    Vec::new()
}

/// The cgroups of the enrolled pods on this node, and their workload
/// entries (one per pod address, by address).
fn enrollment(objects: &Objects, cx: &Context<'_>) -> (BTreeSet<String>, Vec<Workload>) {
    let mut cgroups = BTreeSet::new();
    let mut workloads = BTreeMap::new();
    for (k, pod) in &objects.pods {
        if pod.node.as_deref() != Some(cx.node_name) || pod.finished {
            continue;
        }
        if !wants_mesh(objects, pod) {
            continue;
        }
        if !has_identity(pod) {
            tracing::warn!(pod = %k, service_account = pod.service_account(), "service account is not a DNS label, so it cannot be a workload identity; pod not enrolled");
            continue;
        }
        let (Some(uid), Some(qos)) = (pod.uid.as_deref(), pod.qos_class.as_deref()) else {
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
        for ip in &pod.ips {
            workloads.insert(
                *ip,
                Workload {
                    address: *ip,
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account().to_owned(),
                },
            );
        }
    }
    (cgroups, workloads.into_values().collect())
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
