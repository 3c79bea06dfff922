//! Pods, cluster-wide, reduced to what Ferry reads.
//!
//! The Pod watch covers every node: an endpoint's identity (the service
//! account of the pod behind it) is needed for pods on other nodes too, and
//! this node's pods are simply those whose `spec.nodeName` is this node.
//! Whole Pod objects (containers, volumes, managed fields, conditions) run to
//! kilobytes each, so neither the watch nor the cache keeps them: the watch
//! decodes [`PodObject`], which reads only the fields below (serde skips the
//! rest while parsing), and the cache keeps its [`PodInfo`] (a few dozen
//! bytes of strings and addresses per pod).

use std::net::IpAddr;

use k8s_openapi::NamespaceResourceScope;
use kube::api::ObjectMeta;
use serde::{Deserialize, Deserializer};

use super::translate::CAPTURE_ANNOTATION;

/// A Pod as the watch decodes it: metadata, and only the spec and status
/// fields Ferry reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodSpec>,
    #[serde(default)]
    pub status: Option<PodStatus>,
}

/// `Pod.spec`: the fields Ferry reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    pub host_network: Option<bool>,
}

/// `Pod.status`: the fields Ferry reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub phase: Option<String>,
    pub qos_class: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// Addresses that do not parse are dropped (never an error: one odd
    /// pod must not fail the whole watch).
    #[serde(rename = "podIPs", default, deserialize_with = "pod_ips")]
    pub pod_ips: Vec<IpAddr>,
}

fn pod_ips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    #[derive(Deserialize)]
    struct PodIp {
        #[serde(default)]
        ip: String,
    }
    let v: Option<Vec<PodIp>> = Option::deserialize(d)?;
    Ok(v.into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect())
}

resource!(PodObject, NamespaceResourceScope, "", "v1", "Pod", "pods");

/// What the cache keeps of a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub uid: Option<String>,
    /// `spec.nodeName` (unset while the pod is not scheduled).
    pub node: Option<String>,
    /// `spec.serviceAccountName`; `None` is `default`.
    pub service_account: Option<String>,
    pub host_network: bool,
    /// Annotated `ferry.io/capture: disabled`.
    pub opted_out: bool,
    /// Phase `Succeeded` or `Failed`.
    pub finished: bool,
    pub qos_class: Option<String>,
    /// `status.podIPs` (or `status.podIP` when that is all there is).
    pub ips: Vec<IpAddr>,
}

impl PodInfo {
    /// The pod's service account, `default` when unset.
    pub fn service_account(&self) -> &str {
        self.service_account
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
    }
}

impl From<PodObject> for PodInfo {
    fn from(p: PodObject) -> PodInfo {
        let spec = p.spec.unwrap_or_default();
        let status = p.status.unwrap_or_default();
        let mut ips = status.pod_ips;
        if ips.is_empty()
            && let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok())
        {
            ips.push(ip);
        }
        let opted_out = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CAPTURE_ANNOTATION))
            .is_some_and(|v| v == "disabled");
        PodInfo {
            namespace: p.metadata.namespace.unwrap_or_default(),
            uid: p.metadata.uid,
            node: spec.node_name.filter(|n| !n.is_empty()),
            service_account: spec.service_account_name,
            host_network: spec.host_network == Some(true),
            opted_out,
            finished: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            qos_class: status.qos_class,
            ips,
        }
    }
}
