//! Where services come from (`source:`), the settings of the Kubernetes
//! source (`kubernetes:`), and the command-line/environment overrides the
//! DaemonSet uses to fill in per-node values (node name, redirect address).

use std::net::IpAddr;

use serde::Deserialize;

use super::{RawConfig, Violation};

/// Where the services, endpoints and enrolled cgroups come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The `services:` and `capture.cgroups:` of the configuration file.
    #[default]
    File,
    /// The Kubernetes API (Services, EndpointSlices, Pods, Nodes,
    /// Namespaces, TCPRoutes); the file still gives the agent's own settings.
    Kubernetes,
}

/// The kubelet's cgroup driver, which decides where pod cgroups are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`
    /// (dashes in the UID become underscores).
    #[default]
    Systemd,
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
}

/// `kubernetes:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKubernetes {
    /// The kubelet's cgroup driver. Default `systemd`.
    #[serde(default)]
    pub cgroup_driver: CgroupDriver,
    /// The pods' root cgroup, relative to the cgroup2 mount. Default
    /// `kubepods.slice` (systemd) or `kubepods` (cgroupfs).
    pub cgroup_root: Option<String>,
}

/// The validated `kubernetes:` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    pub cgroup_driver: CgroupDriver,
    pub cgroup_root: String,
}

impl RawKubernetes {
    pub(super) fn validate(&self, v: &mut Vec<Violation>) -> Kubernetes {
        let cgroup_root = self.cgroup_root.clone().unwrap_or_else(|| {
            match self.cgroup_driver {
                CgroupDriver::Systemd => "kubepods.slice",
                CgroupDriver::Cgroupfs => "kubepods",
            }
            .to_owned()
        });
        if cgroup_root.split('/').any(|p| p == "..") {
            v.push(Violation {
                field: "kubernetes.cgroup_root".into(),
                reason: "must not contain '..'".into(),
            });
        }
        Kubernetes {
            cgroup_driver: self.cgroup_driver,
            cgroup_root: cgroup_root.trim_matches('/').to_owned(),
        }
    }
}

/// Values given on the command line or in the environment; they replace the
/// file's. The DaemonSet sets `FERRY_NODE_NAME` (spec.nodeName) and
/// `FERRY_REDIRECT_IPV4` (status.hostIP) from the downward API.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub source: Option<Source>,
    pub node_name: Option<String>,
    pub redirect_ipv4: Option<IpAddr>,
    pub redirect_ipv6: Option<IpAddr>,
}

impl RawConfig {
    /// Replaces the file's values with the overrides that are set.
    pub fn apply_overrides(&mut self, o: &Overrides) {
        if let Some(s) = o.source {
            self.source = s;
        }
        if let Some(n) = &o.node_name {
            self.node.name = Some(n.clone());
        }
        if let Some(a) = o.redirect_ipv4 {
            self.capture.redirect_ipv4 = Some(a);
        }
        if let Some(a) = o.redirect_ipv6 {
            self.capture.redirect_ipv6 = Some(a);
        }
    }
}
