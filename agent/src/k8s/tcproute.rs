//! Gateway API `TCPRoute` (`gateway.networking.k8s.io/v1alpha2`): only the
//! fields Ferry reads. A route whose parentRef is a Service (the GAMMA
//! pattern) splits that Service's connections between backend Services by
//! weight.

use k8s_openapi::NamespaceResourceScope;
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};

/// A `TCPRoute` object.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct TcpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TcpRouteSpec,
}

resource!(
    TcpRoute,
    NamespaceResourceScope,
    "gateway.networking.k8s.io",
    "v1alpha2",
    "TCPRoute",
    "tcproutes"
);

/// `TCPRoute.spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<TcpRouteRule>,
}

/// What a route attaches to: a Gateway, or (GAMMA) a Service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Default `gateway.networking.k8s.io`; `""` or `core` for a Service.
    pub group: Option<String>,
    /// Default `Gateway`.
    pub kind: Option<String>,
    pub name: String,
    /// Default: the route's namespace.
    pub namespace: Option<String>,
    pub port: Option<i32>,
    pub section_name: Option<String>,
}

impl ParentRef {
    /// True when the parent is a core Service.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), Some("") | Some("core"))
            && self.kind.as_deref() == Some("Service")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRouteRule {
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// A backend Service and its share.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    pub group: Option<String>,
    /// Default `Service`.
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i32>,
    /// Default 1; 0 sends nothing.
    pub weight: Option<i32>,
}
