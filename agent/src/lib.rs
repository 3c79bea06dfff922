//! Ferry: a per-node agent that captures pod connections with eBPF and
//! carries them through one shared L4 proxy on the node.
//!
//! * [`config`]: the configuration model and its validation.
//! * [`state`]: the immutable snapshot every component reads; swapped on reload.
//! * [`capture`]: the only module that touches eBPF (aya): load, attach, maps.
//! * [`balance`]: endpoint choice.
//! * [`proxy`]: the outbound listener, connect, and the byte relay.
//! * [`metrics`]: the Prometheus registry and the metrics/readiness servers.
//! * [`k8s`]: the Kubernetes config source (watches, translation).
//! * [`app`]: wiring, start-up order, reload and drain.
//! * [`cli`]: the `ferry` command line.

pub mod app;
pub mod balance;
pub mod capture;
pub mod cli;
pub mod config;
pub mod k8s;
pub mod metrics;
pub mod preflight;
pub mod proxy;
pub mod state;
