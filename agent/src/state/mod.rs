//! The snapshot of services and endpoints every component reads.
//!
//! A [`Snapshot`] is immutable once built; [`State`] holds the current one and
//! swaps it atomically on reload, so a connection in flight keeps the snapshot
//! it started with and a bad reload never replaces the last good one (it is
//! rejected before a snapshot is built).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance::SmoothWeighted;
use crate::config::{Authorization, Config, Endpoint, Service};
use crate::tls::Identity;

/// One service as the proxy sees it.
#[derive(Debug)]
pub struct ServiceState {
    /// Index in the snapshot; also the id the eBPF maps carry.
    pub id: u32,
    /// `namespace/name`.
    pub key: String,
    pub service: Service,
    picker: SmoothWeighted,
}

impl ServiceState {
    /// The next endpoint by weight, or `None` when the service has none.
    pub fn pick(&self) -> Option<&Endpoint> {
        self.picker.pick().map(|i| &self.service.endpoints[i])
    }
}

/// What a captured destination resolves to.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub service: &'a ServiceState,
    /// The port endpoints listen on for this service port.
    pub target_port: u16,
}

/// An immutable view of the configured services.
#[derive(Debug)]
pub struct Snapshot {
    services: Vec<ServiceState>,
    by_vip: HashMap<(IpAddr, u16), (usize, u16)>,
    trust_domain: String,
    /// This node's pods, by address, with their identities.
    workloads: HashMap<IpAddr, Identity>,
    /// Other nodes' HBONE addresses.
    nodes: BTreeMap<String, SocketAddr>,
    authorization: Authorization,
}

impl Snapshot {
    pub fn new(config: &Config) -> Snapshot {
        let mut by_vip = HashMap::new();
        let services = config
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                for a in &s.addresses {
                    for p in &s.ports {
                        by_vip.insert((*a, p.port), (i, p.target_port));
                    }
                }
                let weights: Vec<u32> = s.endpoints.iter().map(|e| e.weight).collect();
                ServiceState {
                    id: i as u32,
                    key: s.key(),
                    service: s.clone(),
                    picker: SmoothWeighted::new(&weights),
                }
            })
            .collect();
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
        Snapshot {
            services,
            by_vip,
            trust_domain,
            workloads,
            nodes: config.nodes.clone(),
            authorization: config.authorization.clone(),
        }
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

    /// The HBONE address of another node.
    pub fn node(&self, name: &str) -> Option<SocketAddr> {
        self.nodes.get(name).copied()
    }

    /// The identity an endpoint must present.
    pub fn endpoint_identity(&self, ep: &Endpoint) -> Option<Identity> {
        Identity::new(&self.trust_domain, &ep.namespace, &ep.service_account).ok()
    }

    pub fn authorization(&self) -> &Authorization {
        &self.authorization
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The service behind a service address and port, if any. IPv4-mapped
    /// IPv6 addresses match their IPv4 form.
    pub fn lookup(&self, dst: SocketAddr) -> Option<Target<'_>> {
        let ip = canonical_ip(dst.ip());
        self.by_vip
            .get(&(ip, dst.port()))
            .map(|(i, target_port)| Target {
                service: &self.services[*i],
                target_port: *target_port,
            })
    }

    pub fn services(&self) -> &[ServiceState] {
        &self.services
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
            assert_eq!(t.target_port, 8080);
        }
        assert!(snap.lookup("10.96.0.20:81".parse().unwrap()).is_none());
        assert!(snap.lookup("10.96.0.21:80".parse().unwrap()).is_none());
        assert_eq!(snap.service_addresses().count(), 2);
    }
}
