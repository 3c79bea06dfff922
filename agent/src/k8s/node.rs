//! Nodes, reduced to what Ferry reads: the tunnel address and the locality
//! labels.
//!
//! Every agent watches every Node (it needs the other nodes' addresses for
//! the tunnel). A whole Node object carries its images list, conditions,
//! capacity and managed fields, often tens of kilobytes; multiplied by the
//! cluster's nodes and held on every node, that is real memory for two
//! fields. So the watch decodes [`NodeObject`] (metadata and
//! `status.addresses` only; serde skips the rest while parsing) and the
//! cache keeps a [`NodeInfo`]: the chosen address and two labels.

use std::net::IpAddr;

use k8s_openapi::ClusterResourceScope;
use kube::api::ObjectMeta;
use serde::Deserialize;

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// A Node as the watch decodes it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<NodeStatus>,
}

/// `Node.status`: the field Ferry reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeStatus {
    #[serde(default)]
    pub addresses: Option<Vec<NodeAddress>>,
}

/// One entry of `Node.status.addresses`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub address: String,
}

resource!(NodeObject, ClusterResourceScope, "", "v1", "Node", "nodes");

/// What the cache keeps of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's tunnel address (see [`tunnel_address`]).
    pub address: Option<IpAddr>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// `topology.kubernetes.io/region`.
    pub region: Option<String>,
}

impl From<NodeObject> for NodeInfo {
    fn from(n: NodeObject) -> NodeInfo {
        let address = n
            .status
            .and_then(|s| s.addresses)
            .and_then(|a| tunnel_address(&a));
        let mut labels = n.metadata.labels.unwrap_or_default();
        NodeInfo {
            address,
            zone: labels.remove(ZONE_LABEL),
            region: labels.remove(REGION_LABEL),
        }
    }
}

/// A node's address for the tunnel: `InternalIP` before `ExternalIP`, IPv4
/// before IPv6, in the order listed otherwise. Addresses that do not parse,
/// and unspecified, loopback and multicast ones, are skipped.
pub fn tunnel_address(addresses: &[NodeAddress]) -> Option<IpAddr> {
    addresses
        .iter()
        .filter_map(|a| {
            let rank = match a.type_.as_str() {
                "InternalIP" => 0,
                "ExternalIP" => 2,
                _ => return None,
            };
            let ip: IpAddr = a.address.trim().parse().ok()?;
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                return None;
            }
            Some((rank + u8::from(ip.is_ipv6()), ip))
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, ip)| ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_address_and_locality_and_skips_the_rest() {
        let n: NodeObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {
                "topology.kubernetes.io/zone": "z1",
                "topology.kubernetes.io/region": "r1",
                "kubernetes.io/hostname": "n1"}},
            "spec": {"podCIDR": "10.1.0.0/24"},
            "status": {
                "addresses": [
                    {"type": "Hostname", "address": "n1"},
                    {"type": "ExternalIP", "address": "203.0.113.1"},
                    {"type": "InternalIP", "address": "fd00::1"},
                    {"type": "InternalIP", "address": " 192.168.1.1 "},
                    {"type": "InternalIP", "address": "not an address"}
                ],
                "images": [{"names": ["x"], "sizeBytes": 1}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))
        .unwrap();
        let info = NodeInfo::from(n);
        assert_eq!(
            info,
            NodeInfo {
                address: Some("192.168.1.1".parse().unwrap()),
                zone: Some("z1".into()),
                region: Some("r1".into()),
            }
        );
    }

    #[test]
    fn no_status_or_no_usable_address() {
        let bare: NodeObject =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}})).unwrap();
        assert_eq!(NodeInfo::from(bare), NodeInfo::default());
        let only_bad = [
            NodeAddress {
                type_: "InternalIP".into(),
                address: "127.0.0.1".into(),
            },
            NodeAddress {
                type_: "InternalIP".into(),
                address: "::".into(),
            },
            NodeAddress {
                type_: "InternalDNS".into(),
                address: "10.0.0.1".into(),
            },
        ];
        assert_eq!(tunnel_address(&only_bad), None);
    }
}
