//! The snapshot of services and endpoints every component reads.
//!
//! A [`Snapshot`] is immutable once built; [`State`] holds the current one and
//! swaps it atomically on reload, so a connection in flight keeps the snapshot
//! it started with and a bad reload never replaces the last good one (it is
//! rejected before a snapshot is built).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::balance::{HostnameEndpoint, Registry, ServiceBalancer, SetBalancer};
use crate::config::{Authorization, Config, EndpointTarget, Service};
use crate::tls::Identity;

/// One service port's balancing.
#[derive(Debug)]
pub struct PortState {
    pub port: u16,
    pub target_port: u16,
    pub balancer: ServiceBalancer,
}

/// One service as the proxy sees it.
#[derive(Debug)]
pub struct ServiceState {
    /// Index in the snapshot; also the id the eBPF maps carry.
    pub id: u32,
    /// `namespace/name`.
    pub key: String,
    pub service: Service,
    pub ports: Vec<PortState>,
}

/// What a captured destination resolves to.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub service: &'a ServiceState,
    pub port: &'a PortState,
}

/// An immutable view of the configured services. Background work tied to
/// it (health checks) stops when it is dropped.
#[derive(Debug)]
pub struct Snapshot {
    services: Vec<ServiceState>,
    by_vip: HashMap<(IpAddr, u16), (usize, usize)>,
    stop: CancellationToken,
    trust_domain: String,
    /// This node's pods, by address, with their identities.
    workloads: HashMap<IpAddr, Identity>,
    /// Endpoints on other mesh nodes, by address: reached through the tunnel.
    routes: HashMap<IpAddr, Route>,
    authorization: Authorization,
}

/// How to reach a pod on another mesh node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The node's name.
    pub node: String,
    /// The node's HBONE listener.
    pub node_addr: SocketAddr,
    /// The identity the pod must present.
    pub identity: Identity,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Snapshot {
    /// Builds a snapshot with fresh endpoint state (tests, tools).
    pub fn new(config: &Config) -> Snapshot {
        Snapshot::build(config, &Arc::new(Registry::default()))
    }

    /// Builds a snapshot, reusing the state of endpoints `registry` already
    /// knows and forgetting those no longer configured.
    pub fn build(config: &Config, registry: &Arc<Registry>) -> Snapshot {
        let mut by_vip = HashMap::new();
        let mut live = HashSet::new();
        let services = config
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = s.key();
                let ports = s
                    .ports
                    .iter()
                    .enumerate()
                    .map(|(pi, p)| {
                        for a in &s.addresses {
                            by_vip.insert((*a, p.port), (i, pi));
                        }
                        let sets = s
                            .sets
                            .iter()
                            .map(|set| {
                                let mut statics = Vec::new();
                                let mut hostnames = Vec::new();
                                for e in &set.endpoints {
                                    let port = e.port.unwrap_or(p.target_port);
                                    match &e.target {
                                        EndpointTarget::Ip(ip) => {
                                            let addr = SocketAddr::new(*ip, port);
                                            live.insert((key.clone(), addr));
                                            statics.push((addr, e.weight, e.locality.clone()));
                                        }
                                        EndpointTarget::Hostname(h) => {
                                            hostnames.push(HostnameEndpoint {
                                                hostname: h.clone(),
                                                port,
                                                weight: e.weight,
                                                locality: e.locality.clone(),
                                            })
                                        }
                                    }
                                }
                                Arc::new(SetBalancer::new(
                                    &key,
                                    &set.name,
                                    set.weight,
                                    &config.locality,
                                    &s.policy,
                                    registry.clone(),
                                    statics,
                                    hostnames,
                                ))
                            })
                            .collect();
                        PortState {
                            port: p.port,
                            target_port: p.target_port,
                            balancer: ServiceBalancer::new(&key, &s.policy, sets),
                        }
                    })
                    .collect();
                ServiceState {
                    id: i as u32,
                    key,
                    service: s.clone(),
                    ports,
                }
            })
            .collect();
        registry.retain_static(&live);
        let trust_domain = config.tls.trust_domain.clone();
        let workloads = config
            .workloads
            .iter()
            .filter_map(|w| {
                Identity::new(&trust_domain, &w.namespace, &w.service_account)
                    .ok()
                    .map(|id| (w.address, id))
            })
            .collect();
        // An endpoint is tunnelled when it is a mesh pod and its node is
        // another node whose HBONE address we know; endpoints outside the
        // mesh or on unknown nodes are reached directly.
        let mut routes = HashMap::new();
        for s in &config.services {
            for set in &s.sets {
                for e in &set.endpoints {
                    let (EndpointTarget::Ip(ip), Some(node)) = (&e.target, &e.locality.node) else {
                        continue;
                    };
                    if *node == config.node_name || !e.mesh {
                        continue;
                    }
                    let (Some(node_addr), Ok(identity)) = (
                        config.nodes.get(node),
                        Identity::new(&trust_domain, &e.namespace, &e.service_account),
                    ) else {
                        continue;
                    };
                    routes.entry(*ip).or_insert(Route {
                        node: node.clone(),
                        node_addr: *node_addr,
                        identity,
                    });
                }
            }
        }
        Snapshot {
            services,
            by_vip,
            stop: CancellationToken::new(),
            trust_domain,
            workloads,
            routes,
            authorization: config.authorization.clone(),
        }
    }

    /// The service behind a service address and port, if any. IPv4-mapped
    /// IPv6 addresses match their IPv4 form.
    pub fn lookup(&self, dst: SocketAddr) -> Option<Target<'_>> {
        let ip = canonical_ip(dst.ip());
        self.by_vip.get(&(ip, dst.port())).map(|(i, pi)| Target {
            service: &self.services[*i],
            port: &self.services[*i].ports[*pi],
        })
    }

    pub fn services(&self) -> &[ServiceState] {
        &self.services
    }

    /// The identity of the local pod at `ip` (IPv4-mapped forms match).
    pub fn workload(&self, ip: IpAddr) -> Option<&Identity> {
        self.workloads.get(&canonical_ip(ip))
    }

    /// Every local workload identity, without duplicates.
    pub fn workload_identities(&self) -> Vec<Identity> {
        let mut ids: Vec<Identity> = self.workloads.values().cloned().collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Local workload addresses (what STRICT mode protects).
    pub fn workload_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.workloads.keys().copied()
    }

    /// The tunnel route to an endpoint on another mesh node, if it is one.
    pub fn route(&self, ip: IpAddr) -> Option<&Route> {
        self.routes.get(&canonical_ip(ip))
    }

    pub fn authorization(&self) -> &Authorization {
        &self.authorization
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every backend set of every service port.
    pub fn sets(&self) -> impl Iterator<Item = &Arc<SetBalancer>> + '_ {
        self.services
            .iter()
            .flat_map(|s| s.ports.iter())
            .flat_map(|p| p.balancer.sets.iter())
    }

    /// Cancelled when this snapshot is dropped (replaced and unused).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Every (service address, port) with its service id: what capture matches.
    pub fn service_addresses(&self) -> impl Iterator<Item = (SocketAddr, u32)> + '_ {
        self.by_vip
            .iter()
            .map(|((ip, port), (i, _))| (SocketAddr::new(*ip, *port), *i as u32))
    }
}

/// Turns `::ffff:a.b.c.d` into `a.b.c.d`; leaves other addresses alone.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The current snapshot, swapped atomically.
#[derive(Debug)]
pub struct State {
    current: ArcSwap<Snapshot>,
}

impl State {
    pub fn new(snapshot: Snapshot) -> State {
        State {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The snapshot in force now.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot; connections already running keep the old one.
    pub fn store(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_by_either_family_and_mapped_form() {
        let cfg = crate::config::parse(
            r#"
capture: { enabled: false }
services:
  - name: web
    addresses: [10.96.0.20, "fd96::20"]
    ports: [{ port: 80, target_port: 8080 }]
    endpoints: [{ address: 10.1.0.5 }]
"#,
            "test",
        )
        .expect("valid");
        let snap = Snapshot::new(&cfg);
        for dst in ["10.96.0.20:80", "[fd96::20]:80", "[::ffff:10.96.0.20]:80"] {
            let t = snap.lookup(dst.parse().unwrap()).expect(dst);
            assert_eq!(t.service.key, "default/web");
            assert_eq!(t.port.target_port, 8080);
        }
        assert!(snap.lookup("10.96.0.20:81".parse().unwrap()).is_none());
        assert!(snap.lookup("10.96.0.21:80".parse().unwrap()).is_none());
        assert_eq!(snap.service_addresses().count(), 2);
    }

    #[test]
    fn routes_only_to_known_other_nodes_and_workloads_by_address() {
        let cfg = crate::config::parse(
            r#"
node: { name: node-a }
capture: { enabled: false }
workloads: [{ address: 10.77.1.10, namespace: shop, service_account: client }]
nodes: { node-b: 10.77.0.2 }
services:
  - name: web
    namespace: shop
    addresses: [10.96.0.20]
    ports: [{ port: 80 }]
    endpoints:
      - { address: 10.77.2.11, node: node-b, service_account: web }
      - { address: 10.77.1.11, node: node-a }
      - { address: 10.77.3.11, node: node-c }
      - { address: 10.77.2.12, node: node-b, mesh: false }
      - { address: 192.0.2.1 }
"#,
            "test",
        )
        .expect("valid");
        let snap = Snapshot::new(&cfg);
        let r = snap
            .route("10.77.2.11".parse().unwrap())
            .expect("tunnelled");
        assert_eq!(r.node, "node-b");
        assert_eq!(r.node_addr, "10.77.0.2:15008".parse().unwrap());
        assert_eq!(r.identity.uri(), "spiffe://cluster.local/ns/shop/sa/web");
        // This node's pod, a node without a tunnel address (locality only),
        // a pod outside the mesh on a tunnelled node and a non-mesh address
        // are reached directly.
        for direct in ["10.77.1.11", "10.77.3.11", "10.77.2.12", "192.0.2.1"] {
            assert!(snap.route(direct.parse().unwrap()).is_none(), "{direct}");
        }
        let id = snap.workload("::ffff:10.77.1.10".parse().unwrap()).unwrap();
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/shop/sa/client");
        assert!(snap.workload("10.77.1.11".parse().unwrap()).is_none());
        assert_eq!(snap.workload_identities(), vec![id.clone()]);
    }
}
