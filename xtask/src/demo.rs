//! `cargo xtask demo`: Ferry's main job, end to end, on this machine.
//!
//! From a fresh machine: setup (eBPF toolchain and runtime tools), the eBPF
//! build, a release build of `ferry` and `ferry-testkit` (or binaries given
//! with `--ferry-bin`/`--testkit-bin`), then the integration harness's
//! topology: node A (a client pod in the cgroup Ferry enrolls, three backend
//! pods) and node B (two backend pods) joined by a veth link, Ferry on both
//! with one CA, and real connections from the client pod: N to the service's
//! IPv4 address (the weighted split is shown as a table), 100 to its IPv6
//! address, one straight to a backend (which bypasses Ferry), a failover,
//! and the two-node scene: a service with endpoints on both nodes (node B's
//! reached through the HBONE tunnel), split per backend and per node, while
//! tshark on node A's end of the node link records what crossed it; the
//! capture shows only TLS on port 15008 and never the random marker each
//! request carried. Then a few of Ferry's metrics, and everything is torn
//! down, also when the demo is interrupted with Ctrl-C (SIGINT) or SIGTERM.
//!
//! The pieces the bench shares (the stop flag, step headers, preparing the
//! binaries) live here too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::{Ferry, Group, LinkCapture, Pod, Topology, count_ids, marker, metric_value};

use crate::setup::{self, SetupArgs};
use crate::util::{self, CleanEnv};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How many connections to open to the service's IPv4 address.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,

    /// After the demo, keep the topology and Ferry up until Ctrl-C, and print
    /// how to reach them.
    #[arg(long)]
    pub keep_running: bool,

    /// Run with this `ferry` binary instead of setup, the eBPF build and a
    /// release build (with --testkit-bin; the test suite uses its own
    /// build). The runtime tools (curl, tshark) must be installed.
    #[arg(long, requires = "testkit_bin", value_name = "PATH")]
    pub ferry_bin: Option<PathBuf>,

    /// The `ferry-testkit` binary to use with --ferry-bin.
    #[arg(long, requires = "ferry_bin", value_name = "PATH")]
    pub testkit_bin: Option<PathBuf>,
}

// ------------------------------------------------------------ shared pieces

/// The error a task returns when SIGINT or SIGTERM stopped it.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Set by SIGINT or SIGTERM. The handler only sets the flag: the task notices
/// it between steps and while it waits, stops what it runs, and returns, so
/// the topology's `Drop` removes everything.
#[derive(Clone, Debug)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    pub fn install() -> Result<Stop> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&flag))
                .context("installing the SIGINT/SIGTERM handler")?;
        }
        Ok(Stop(flag))
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }

    /// `Err(Interrupted)` once a signal came.
    pub fn check(&self) -> Result<()> {
        if self.is_set() {
            return Err(Interrupted.into());
        }
        Ok(())
    }

    /// Turns the outcome of a task into `Err(Interrupted)` when a signal
    /// came (whatever failed then failed because of it).
    pub fn outcome(&self, result: Result<()>) -> Result<()> {
        if self.is_set() {
            return Err(Interrupted.into());
        }
        result
    }
}

/// Numbered step headers with timings.
#[derive(Debug)]
pub struct Steps {
    started: Instant,
    done: usize,
    total: usize,
}

impl Steps {
    pub fn new(total: usize) -> Steps {
        Steps {
            started: Instant::now(),
            done: 0,
            total,
        }
    }

    /// Runs one step under a header, then prints how long it took.
    pub fn run<T>(&mut self, stop: &Stop, title: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        stop.check()?;
        self.done += 1;
        println!("\n==> [{}/{}] {title}", self.done, self.total);
        let t = Instant::now();
        let value = f()?;
        println!("    ({})", secs(t.elapsed()));
        Ok(value)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// `1.2s`, `85ms`, `3m 05s`.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", d.as_millis())
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// The release binaries the harness runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub ferry: PathBuf,
    pub testkit: PathBuf,
}

/// Setup (with the runtime tools), the eBPF build and the release build of
/// `ferry` and `ferry-testkit`, as three steps; then points the harness at
/// the binaries (`FERRY_BIN`, `FERRY_TESTKIT`) and checks that it can run.
pub fn prepare(steps: &mut Steps, stop: &Stop) -> Result<Binaries> {
    need_root()?;
    let toolchain = steps.run(stop, "Setup: eBPF toolchain and runtime tools", || {
        setup::run(&SetupArgs::default())
    })?;
    let linker = toolchain
        .bpf_linker
        .context("setup did not provide a bpf-linker")?;
    steps.run(stop, "Build the eBPF programs", || {
        crate::ebpf::build(&linker, false)
    })?;
    let bins = steps.run(
        stop,
        "Build ferry and ferry-testkit (release)",
        build_release,
    )?;
    use_binaries(stop, bins)
}

/// Points the harness at the binaries (`FERRY_BIN`, `FERRY_TESTKIT`) and
/// checks that it can run.
fn use_binaries(stop: &Stop, bins: Binaries) -> Result<Binaries> {
    stop.check()?;
    // SAFETY: no other thread runs at this point: the signal handler was
    // installed without one, and every thread the command runner started
    // has been joined. Nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("FERRY_BIN", &bins.ferry);
        std::env::set_var("FERRY_TESTKIT", &bins.testkit);
    }
    if let Some(why) = ferry_tests::root_unavailable() {
        bail!("the topology cannot be built here: {why}");
    }
    Ok(bins)
}

fn need_root() -> Result<()> {
    if !util::is_root() {
        bail!(
            "this needs root: it creates network namespaces and cgroups and loads eBPF programs \
             (run it as root)"
        );
    }
    Ok(())
}

/// Uses binaries built elsewhere (`--ferry-bin`, `--testkit-bin`): no
/// setup, no build.
fn prebuilt(stop: &Stop, ferry: &Path, testkit: &Path) -> Result<Binaries> {
    need_root()?;
    for bin in [ferry, testkit] {
        if !bin.is_file() {
            bail!("{} does not exist", bin.display());
        }
    }
    let bins = Binaries {
        ferry: ferry.canonicalize()?,
        testkit: testkit.canonicalize()?,
    };
    println!(
        "Using {} and {} (no setup, no build).",
        bins.ferry.display(),
        bins.testkit.display()
    );
    use_binaries(stop, bins)
}

fn build_release() -> Result<Binaries> {
    let root = util::workspace_root();
    let mut cmd = Command::new(util::cargo());
    cmd.current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "ferry-agent",
        "-p",
        "ferry-tests",
        "--bins",
    ]);
    util::clean_cargo_env(&mut cmd, CleanEnv::Host);
    util::run(&mut cmd)?;
    let dir = util::target_dir(&root).join("release");
    let bins = Binaries {
        ferry: dir.join("ferry"),
        testkit: dir.join("ferry-testkit"),
    };
    for bin in [&bins.ferry, &bins.testkit] {
        if !bin.is_file() {
            bail!("the build succeeded but {} is missing", bin.display());
        }
    }
    let version = util::stdout_of(Command::new(&bins.ferry).arg("version"))?;
    println!("{version}");
    Ok(bins)
}

/// A program on `PATH` (the harness runs it inside a pod).
pub fn tool(name: &str) -> Result<PathBuf> {
    util::find_in_path(name)
        .with_context(|| format!("`{name}` is not installed (run `cargo xtask setup`)"))
}

/// Removes the topology and checks that nothing is left: namespaces,
/// cgroups, processes. Keeps the logs directory when `keep_logs`.
pub fn teardown(topology: Topology, keep_logs: bool) {
    let t = Instant::now();
    println!("\n==> Tear down");
    let mut netns = vec![topology.node_netns.clone()];
    netns.extend(topology.node_b.iter().map(|b| b.netns.clone()));
    netns.extend(topology.pods().iter().map(|p| p.netns.clone()));
    let cgroup = topology.cgroup_root.clone();
    let dir = topology.dir.clone();
    drop(topology);
    // The shared parent (`ferry-test`) too, when no other topology uses it:
    // rmdir fails, harmlessly, while it has children.
    if let Some(parent) = cgroup.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let left: Vec<&String> = netns
        .iter()
        .filter(|ns| {
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns))
        })
        .collect();
    if left.is_empty() && !cgroup.exists() {
        println!(
            "    removed {} network namespaces, the cgroups under {} and every process in them ({})",
            netns.len(),
            cgroup.display(),
            secs(t.elapsed())
        );
    } else {
        println!(
            "    warning: left behind: namespaces {left:?}{}",
            if cgroup.exists() {
                format!(", cgroup {}", cgroup.display())
            } else {
                String::new()
            }
        );
    }
    if keep_logs {
        println!("    logs and config kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ------------------------------------------------------------------- demo

const VIP4: &str = "10.96.0.20";
const VIP6: &str = "fd96::20";
const CLIENT_HOST: u8 = 10;
const BACKEND_PORT: u16 = 8080;

struct Backend {
    id: &'static str,
    /// On node B (`10.77.2.host`, reached through the HBONE tunnel), or on
    /// node A (`10.77.1.host`, where the client and Ferry A run).
    node_b: bool,
    host: u8,
    weight: u32,
}

impl Backend {
    fn address(&self) -> String {
        format!("10.77.{}.{}", if self.node_b { 2 } else { 1 }, self.host)
    }

    fn node(&self) -> &'static str {
        if self.node_b { "node B" } else { "node A" }
    }
}

const BACKENDS: [Backend; 3] = [
    Backend {
        id: "web-1",
        node_b: false,
        host: 11,
        weight: 60,
    },
    Backend {
        id: "web-2",
        node_b: false,
        host: 12,
        weight: 30,
    },
    Backend {
        id: "web-3",
        node_b: false,
        host: 13,
        weight: 10,
    },
];

/// The two-node service: one endpoint on node A (web-1, reached directly)
/// and two pods on node B, reached through the mutual-TLS tunnel.
const VIP_MESH: &str = "10.96.0.30";
const NODE_B: &str = "node-b";
const MESH_CONNECTIONS: usize = 200;

const MESH_BACKENDS: [Backend; 3] = [
    Backend {
        id: "web-1",
        node_b: false,
        host: 11,
        weight: 50,
    },
    Backend {
        id: "web-4",
        node_b: true,
        host: 11,
        weight: 25,
    },
    Backend {
        id: "web-5",
        node_b: true,
        host: 12,
        weight: 25,
    },
];

fn services_yaml() -> String {
    // Weighted round robin, so the split is exact over every 100 connections
    // (the default, P2C over peak-EWMA, also weighs latency and load), and
    // quick outlier detection, so the failover scene fits in seconds.
    let mut s = format!(
        "  - name: web\n    namespace: default\n    addresses: [{VIP4}, \"{VIP6}\"]\n    \
         ports: [{{ port: 80, target_port: {BACKEND_PORT} }}]\n    \
         balancing: {{ algorithm: round_robin }}\n    \
         failover: {{ max_connect_attempts: 3, connect_timeout: 300ms }}\n    \
         outlier_detection: {{ consecutive_failures: 3, base_ejection_time: 3s }}\n    \
         endpoints:\n"
    );
    for b in &BACKENDS {
        s.push_str(&format!(
            "      - {{ address: {}, weight: {} }}   # {}\n",
            b.address(),
            b.weight,
            b.id
        ));
    }
    // Endpoints with a node and an identity are reached through that node's
    // Ferry (HBONE, mutual TLS); the others directly.
    s.push_str(&format!(
        "  - name: web-mesh\n    namespace: default\n    addresses: [{VIP_MESH}]\n    \
         ports: [{{ port: 80, target_port: {BACKEND_PORT} }}]\n    \
         balancing: {{ algorithm: round_robin }}\n    \
         endpoints:\n"
    ));
    for b in &MESH_BACKENDS {
        let mesh = if b.node_b {
            format!(", node: {NODE_B}, service_account: web")
        } else {
            String::new()
        };
        s.push_str(&format!(
            "      - {{ address: {}, weight: {}{mesh} }}   # {} on {}\n",
            b.address(),
            b.weight,
            b.id,
            b.node()
        ));
    }
    s
}

/// Node A's mesh settings (after the services): the client pod's identity,
/// where node B's Ferry listens, the cluster CA.
fn node_a_mesh_yaml(tls: &str) -> String {
    format!(
        "workloads:\n  - {{ address: 10.77.1.{CLIENT_HOST}, service_account: client }}\n\
         nodes:\n  {NODE_B}: \"{}:{}\"\n{tls}",
        ferry_tests::LINK_B,
        ferry_tests::HBONE_PORT
    )
}

/// Node B's Ferry: no capture (no client there), the identities of its
/// pods, the same CA; it accepts tunnels on 15008.
fn node_b_yaml(tls: &str) -> String {
    let mut s = format!(
        "node: {{ name: {NODE_B} }}\ncapture: {{ enabled: false }}\nproxy: {{ drain_deadline: 5s }}\n\
         workloads:\n"
    );
    for b in MESH_BACKENDS.iter().filter(|b| b.node_b) {
        s.push_str(&format!(
            "  - {{ address: {}, service_account: web }}   # {}\n",
            b.address(),
            b.id
        ));
    }
    s.push_str(tls);
    s
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let stop = Stop::install()?;
    let build_steps = if args.ferry_bin.is_some() { 0 } else { 3 };
    let mut steps = Steps::new(build_steps + 10 + usize::from(args.keep_running));
    println!(
        "Ferry demo: pods connect to a service address; Ferry's eBPF programs send those \
         connections\nto one proxy on the node, which spreads them over the backends by weight, \
         also to pods on\nanother node through a mutual-TLS tunnel. Ctrl-C stops it and removes \
         everything it created."
    );
    let mut slot = None;
    let prepared = match (&args.ferry_bin, &args.testkit_bin) {
        (Some(ferry), Some(testkit)) => prebuilt(&stop, ferry, testkit),
        _ => prepare(&mut steps, &stop),
    };
    let result = prepared.and_then(|_| demo(args, &mut steps, &stop, &mut slot));
    if stop.is_set() && !(args.keep_running && result.is_ok()) {
        println!("\n*** interrupted: stopping and cleaning up");
    }
    if let Some(topology) = slot {
        teardown(topology, result.is_err() && !stop.is_set());
    }
    // With --keep-running, Ctrl-C is how a successful demo ends.
    let result = if args.keep_running && result.is_ok() {
        result
    } else {
        stop.outcome(result)
    };
    if result.is_ok() {
        println!("\nDemo finished in {}.", secs(steps.elapsed()));
    }
    result
}

fn demo(
    args: &DemoArgs,
    steps: &mut Steps,
    stop: &Stop,
    slot: &mut Option<Topology>,
) -> Result<()> {
    let n = args.connections as usize;
    let client = steps.run(
        stop,
        "Create the topology: two nodes, a client pod, three backend pods on node A, two on node B",
        || {
            let t = slot.insert(Topology::new("demo")?);
            t.add_second_node()?;
            let client = t.add_pod("client", CLIENT_HOST)?;
            for b in BACKENDS
                .iter()
                .chain(MESH_BACKENDS.iter().filter(|b| b.node_b))
            {
                stop.check()?;
                let pod = if b.node_b {
                    t.add_pod_b(b.id, b.host)?
                } else {
                    t.add_pod(b.id, b.host)?
                };
                t.start_server(&pod, BACKEND_PORT, b.id, &[])?;
            }
            print_topology(t, &client);
            Ok(client)
        },
    )?;
    let t = slot.as_mut().context("the topology was just created")?;

    let (ferry, ferry_b) = steps.run(stop, "Start Ferry on both nodes", || {
        let tls = t.cluster_ca("1h")?;
        let config_b = node_b_yaml(&tls);
        let node_b = t.node_b.clone().context("node B was just created")?;
        let ferry_b = t.start_ferry_in(&node_b.netns, "ferry-b", &config_b)?;
        let config = format!(
            "{}{}",
            t.ferry_config(&services_yaml()),
            node_a_mesh_yaml(&tls)
        );
        let ferry = t.start_ferry("ferry", &config)?;
        println!("    node A: {}:", ferry.config.display());
        for line in config.lines() {
            println!("      {line}");
        }
        println!(
            "    node B: {} (its pods' identities, the same CA; no capture)",
            ferry_b.config.display()
        );
        println!(
            "    Ferry is ready on both nodes (pids {} and {}): connects from {} to {VIP4}:80,\n    \
             [{VIP6}]:80 or {VIP_MESH}:80 now go to Ferry on node A",
            ferry.pid, ferry_b.pid, t.enrolled_cgroup
        );
        Ok((ferry, ferry_b))
    })?;

    let curl = tool("curl")?;
    steps.run(
        stop,
        &format!("{n} connections from the client pod to http://{VIP4}/"),
        || {
            let url = format!("http://{VIP4}/[1-{n}]");
            let out = drive(t, stop, &client, &curl, &[], &url, n)?;
            check_split(&out, n, true)
        },
    )?;

    steps.run(
        stop,
        &format!("IPv6: 100 connections to http://[{VIP6}]/"),
        || {
            let url = format!("http://[{VIP6}]/[1-100]");
            let out = drive(t, stop, &client, &curl, &[], &url, 100)?;
            check_split(&out, 100, false)
        },
    )?;

    steps.run(
        stop,
        "A direct connection to a backend bypasses Ferry",
        || direct(t, stop, &ferry, &client, &curl, n + 100),
    )?;

    steps.run(
        stop,
        "Failover: web-2 is killed in the middle of 1000 connections",
        || failover(t, stop, &ferry, &client, &curl),
    )?;

    steps.run(
        stop,
        "web-2 is restarted: it returns when its ejection ends",
        || restore(t, stop, &ferry, &client, &curl),
    )?;

    let (capture, mark, on_b) = steps.run(
        stop,
        &format!(
            "Two nodes: {MESH_CONNECTIONS} connections to http://{VIP_MESH}/, split over node A \
             and node B"
        ),
        || cross_node(t, stop, &ferry, &ferry_b, &client, &curl),
    )?;

    steps.run(
        stop,
        "What crossed the node-to-node link: only TLS on port 15008",
        || link_proof(t, capture, &mark, on_b, &ferry, &ferry_b),
    )?;

    steps.run(stop, "Ferry's metrics", || {
        let interesting = |l: &&str| {
            l.starts_with("ferry_connections_opened_total")
                || l.starts_with("ferry_tcp_bytes_total")
                || l.starts_with("ferry_connect_retries_total")
                || l.starts_with("ferry_endpoint_ejections_total")
                || l.starts_with("ferry_hbone_connections_total")
                || l.starts_with("ferry_hbone_streams_total")
                || l.starts_with("ferry_certificates_issued_total")
                || (l.starts_with("ferry_ebpf_events_total") && !l.ends_with(" 0"))
        };
        for (node, f) in [("node A", &ferry), ("node B", &ferry_b)] {
            let m = f.metrics()?;
            let mut lines: Vec<&str> = m.lines().filter(interesting).collect();
            lines.sort_unstable();
            println!("    {node}:");
            for line in lines {
                println!("      {line}");
            }
        }
        Ok(())
    })?;

    if args.keep_running {
        steps.run(stop, "Keep running until Ctrl-C", || keep_running(t, stop))?;
    }
    Ok(())
}

fn print_topology(t: &Topology, client: &Pod) {
    println!(
        "    node A    netns {:<20} bridge 10.77.1.1/24, fd77:1::1/64; Ferry runs here, captures the client",
        t.node_netns
    );
    println!(
        "    client    netns {:<20} {}, {}   cgroup {} (enrolled)",
        client.netns, client.v4, client.v6, t.enrolled_cgroup
    );
    for b in &BACKENDS {
        println!(
            "    {:<9} netns {:<20} {}:{BACKEND_PORT}   HTTP server, answers `id={} peer=...`",
            b.id,
            format!("{}-{}", t.name, b.id),
            b.address(),
            b.id
        );
    }
    if let Some(node_b) = &t.node_b {
        println!(
            "    node B    netns {:<20} bridge {}/24; Ferry runs here, accepts the tunnel on port {}",
            node_b.netns,
            node_b.bridge_v4,
            ferry_tests::HBONE_PORT
        );
        for b in MESH_BACKENDS.iter().filter(|b| b.node_b) {
            println!(
                "    {:<9} netns {:<20} {}:{BACKEND_PORT}   HTTP server, answers `id={} peer=...`",
                b.id,
                format!("{}-{}", t.name, b.id),
                b.address(),
                b.id
            );
        }
        println!(
            "    node link veth {} (node A, {}) <-> n1 (node B, {}), like two machines on one segment",
            ferry_tests::LINK_IFACE_A,
            ferry_tests::LINK_A,
            ferry_tests::LINK_B
        );
    }
}

/// Runs curl (one process, a new connection per URL) in the client pod, in
/// the enrolled cgroup, and returns its output.
fn drive(
    t: &Topology,
    stop: &Stop,
    client: &Pod,
    curl: &Path,
    extra: &[&str],
    url: &str,
    n: usize,
) -> Result<String> {
    let shown: Vec<String> = extra.iter().map(|a| shell_quote(a)).collect();
    let shown = if shown.is_empty() {
        String::new()
    } else {
        format!("{} ", shown.join(" "))
    };
    println!("    $ curl -sS {shown}'{url}'   (in the client pod)");
    let mut args = vec!["-sS", "--max-time", "10", "--connect-timeout", "5"];
    args.extend_from_slice(extra);
    args.push(url);
    let started = Instant::now();
    let out = t.exec_bounded(
        &client.netns,
        Group::Enrolled,
        curl,
        &args,
        Duration::from_secs(60 + n as u64 / 10),
        Some(stop.flag()),
    )?;
    let took = started.elapsed();
    println!(
        "    {n} connections in {} ({:.0} connections/s)",
        secs(took),
        n as f64 / took.as_secs_f64().max(1e-3)
    );
    Ok(out)
}

/// `arg`, single-quoted when it has a space.
fn shell_quote(arg: &str) -> String {
    if arg.contains(' ') {
        format!("'{arg}'")
    } else {
        arg.to_owned()
    }
}

/// Prints the split table; fails unless every connection was answered by a
/// backend (through Ferry: each saw the node's address as the peer).
fn check_split(out: &str, n: usize, first: bool) -> Result<()> {
    let ids = count_ids(out);
    print_split(&BACKENDS, &ids, n);
    let answered: usize = ids.values().sum();
    let via_node = out
        .lines()
        .filter(|l| l.starts_with("id=") && l.contains(" peer=10.77.1.1:"))
        .count();
    if answered != n {
        bail!("{answered} of {n} connections were answered");
    }
    if via_node != n {
        bail!("only {via_node} of {n} responses came through Ferry (peer 10.77.1.1)");
    }
    if first {
        println!(
            "    Every backend saw the connections come from 10.77.1.1 (Ferry on the node), \
             not from\n    the client's 10.77.1.{CLIENT_HOST}: the client dialled the service \
             address, eBPF sent it to Ferry."
        );
    }
    Ok(())
}

/// The split over `backends` as a table (with a node column and a per-node
/// summary when some backends are on node B).
fn print_split(backends: &[Backend], ids: &BTreeMap<String, usize>, n: usize) {
    let two_nodes = backends.iter().any(|b| b.node_b);
    let node_col = |s: &str| {
        if two_nodes {
            format!(" {s:<7}")
        } else {
            String::new()
        }
    };
    let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
    println!();
    println!(
        "    {:<8}{} {:<16} {:>7} {:>12} {:>9} {:>11}",
        "backend",
        node_col("node"),
        "endpoint",
        "weight",
        "connections",
        "observed",
        "difference"
    );
    let pct = |count: usize| 100.0 * count as f64 / n.max(1) as f64;
    let row = |id: &str, node: &str, endpoint: &str, weight: u32, count: usize| {
        let weight = 100.0 * f64::from(weight) / f64::from(total_weight.max(1));
        let observed = pct(count);
        println!(
            "    {:<8}{} {:<16} {:>6.1}% {:>12} {:>8.1}% {:>+7.1} pts",
            id,
            node_col(node),
            endpoint,
            weight,
            count,
            observed,
            observed - weight
        );
    };
    for b in backends {
        let count = ids.get(b.id).copied().unwrap_or(0);
        row(
            b.id,
            b.node(),
            &format!("{}:{BACKEND_PORT}", b.address()),
            b.weight,
            count,
        );
    }
    for (id, count) in ids {
        if !backends.iter().any(|b| b.id == id) {
            println!(
                "    {:<8}{} {:<16} {:>7} {:>12} {:>8.1}%",
                id,
                node_col(""),
                "(unexpected)",
                "-",
                count,
                pct(*count)
            );
        }
    }
    let answered: usize = ids.values().sum();
    if answered < n {
        println!(
            "    {:<8}{} {:<16} {:>7} {:>12} {:>8.1}%",
            "none",
            node_col(""),
            "(no answer)",
            "-",
            n - answered,
            pct(n - answered)
        );
    }
    if two_nodes {
        for (node, on_b, how) in [
            ("node A", false, "direct"),
            ("node B", true, "HBONE tunnel"),
        ] {
            let mine = || backends.iter().filter(move |b| b.node_b == on_b);
            let weight: u32 = mine().map(|b| b.weight).sum();
            let count: usize = mine().map(|b| ids.get(b.id).copied().unwrap_or(0)).sum();
            row(node, "", how, weight, count);
        }
    }
    println!(
        "    {:<8}{} {:<16} {:>6.1}% {:>12} {:>8.1}%",
        "total",
        node_col(""),
        "",
        100.0,
        answered,
        pct(answered)
    );
    println!();
}

fn direct(
    t: &Topology,
    stop: &Stop,
    ferry: &Ferry,
    client: &Pod,
    curl: &Path,
    opened_so_far: usize,
) -> Result<()> {
    let opened = r#"ferry_connections_opened_total{service="default/web"}"#;
    let passed = r#"ferry_ebpf_events_total{program="connect4",event="passed"}"#;
    let before = ferry.metrics()?;
    let url = format!("http://10.77.1.12:{BACKEND_PORT}/");
    println!("    $ curl -sS {url}   (in the client pod, same enrolled cgroup)");
    let out = t.exec_bounded(
        &client.netns,
        Group::Enrolled,
        curl,
        &["-sS", "--max-time", "10", &url],
        Duration::from_secs(20),
        Some(stop.flag()),
    )?;
    print!("    {out}");
    let after = ferry.metrics()?;
    let (o1, o2) = (metric_value(&before, opened), metric_value(&after, opened));
    let (p1, p2) = (metric_value(&before, passed), metric_value(&after, passed));
    let me = format!("peer=10.77.1.{CLIENT_HOST}:");
    if !out.contains("id=web-2") || !out.contains(&me) {
        bail!("expected web-2 to see the client's own address ({me}), got: {out}");
    }
    if o2 != o1 || o1 != opened_so_far as f64 {
        bail!(
            "Ferry's opened counter went {o1} -> {o2}; expected {opened_so_far} before and after"
        );
    }
    println!(
        "    web-2 saw the client's own address, and Ferry's opened counter stayed at {o2}:\n    \
         10.77.1.12 is no service address, so connect4 let the connection pass \
         (passed: {p1} -> {p2})."
    );
    Ok(())
}

const WEB2: &str = "10.77.1.12:8080";

fn web2_metric(ferry: &Ferry, name: &str) -> Result<f64> {
    ferry.metric(&format!(
        r#"{name}{{service="default/web",endpoint="{WEB2}"}}"#
    ))
}

/// Polls `probe` every 20 ms for at most `timeout`, or until interrupted.
fn await_event(
    stop: &Stop,
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    while !probe()? {
        stop.check()?;
        if start.elapsed() > timeout {
            bail!("timed out after {} waiting for {what}", secs(timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn failover(t: &mut Topology, stop: &Stop, ferry: &Ferry, client: &Pod, curl: &Path) -> Result<()> {
    let opened = r#"ferry_connections_opened_total{service="default/web"}"#;
    let start = ferry.metric(opened)?;
    let url = format!("http://{VIP4}/[1-1000]");
    println!("    $ curl -sS --rate 300/s '{url}'   (in the client pod, in the background)");
    t.spawn(
        "failover-load",
        &client.netns.clone(),
        Group::Enrolled,
        curl,
        &[
            "-sS",
            "--rate",
            "300/s",
            "--max-time",
            "10",
            "--connect-timeout",
            "5",
            &url,
        ],
    )?;
    await_event(stop, "300 connections", Duration::from_secs(30), || {
        Ok(ferry.metric(opened)? >= start + 300.0)
    })?;
    t.kill("server-web-2");
    println!("    after 300 connections: web-2's server process killed (SIGKILL)");
    await_event(stop, "web-2's ejection", Duration::from_secs(30), || {
        Ok(web2_metric(ferry, "ferry_endpoint_ejections_total")? >= 1.0)
    })?;
    for line in ferry.log_text().lines().filter(|l| {
        l.contains(WEB2) && (l.contains("connect failed") || l.contains("endpoint ejected"))
    }) {
        let msg = line.split_once("ferry::").map(|(_, m)| m).unwrap_or(line);
        println!("    ferry: {msg}");
    }
    let code = t.wait_exit("failover-load", Duration::from_secs(60))?;
    let out = t.log_text("failover-load");
    let ids = count_ids(&out);
    print_split(&BACKENDS, &ids, 1000);
    let answered: usize = ids.values().sum();
    if code != Some(0) || answered != 1000 || out.contains("curl:") {
        bail!("the client saw failures ({answered} of 1000 answered, curl exit {code:?})");
    }
    println!(
        "    The client saw no failure: each connection that picked the dead web-2 was connected\n    \
         to another backend before any byte moved, and after 3 refusals web-2 was ejected\n    \
         (ferry_endpoint_healthy = {}), so later connections skip it until it is retried.",
        web2_metric(ferry, "ferry_endpoint_healthy")?
    );
    Ok(())
}

fn restore(t: &mut Topology, stop: &Stop, ferry: &Ferry, client: &Pod, curl: &Path) -> Result<()> {
    let web2 = t.pods()[2].clone();
    t.start_server(&web2, BACKEND_PORT, "web-2", &[])?;
    println!("    web-2's server is running again; Ferry retries it when its 3 s ejection ends");
    await_event(stop, "web-2 back", Duration::from_secs(30), || {
        Ok(web2_metric(ferry, "ferry_endpoint_healthy")? == 1.0)
    })?;
    let url = format!("http://{VIP4}/[1-100]");
    let out = drive(t, stop, client, curl, &[], &url, 100)?;
    check_split(&out, 100, false)?;
    println!("    web-2 is back in rotation at its weight.");
    Ok(())
}

/// Starts tshark on the node link, then opens [`MESH_CONNECTIONS`]
/// connections to the two-node service, each carrying a random marker (in
/// a header and in its body); prints the split per backend and per node and
/// checks the tunnel counters on both nodes. Returns the running capture,
/// the marker and how many connections went to node B.
fn cross_node(
    t: &mut Topology,
    stop: &Stop,
    ferry: &Ferry,
    ferry_b: &Ferry,
    client: &Pod,
    curl: &Path,
) -> Result<(LinkCapture, String, usize)> {
    tool("tshark")?;
    let capture = LinkCapture::start(t, "tshark")?;
    println!(
        "    tshark captures on {} (node A's end of the node link) from now on",
        ferry_tests::LINK_IFACE_A
    );
    let mark = marker();
    let body = t.dir.join("marker.txt");
    std::fs::write(&body, format!("{mark}\n").repeat(20))?;
    println!(
        "    every request carries a random marker in a header and 20 times in its body: {mark}"
    );
    let outbound = r#"ferry_hbone_streams_total{direction="outbound"}"#;
    let inbound = r#"ferry_hbone_streams_total{direction="inbound"}"#;
    let (out0, in0) = (ferry.metric(outbound)?, ferry_b.metric(inbound)?);
    let header = format!("X-Ferry-Marker: {mark}");
    let data = format!("@{}", body.display());
    let url = format!("http://{VIP_MESH}/[1-{MESH_CONNECTIONS}]");
    let out = drive(
        t,
        stop,
        client,
        curl,
        &["-H", &header, "--data-binary", &data],
        &url,
        MESH_CONNECTIONS,
    )?;
    let ids = count_ids(&out);
    print_split(&MESH_BACKENDS, &ids, MESH_CONNECTIONS);

    let answered: usize = ids.values().sum();
    if answered != MESH_CONNECTIONS {
        bail!("{answered} of {MESH_CONNECTIONS} connections were answered");
    }
    for b in &MESH_BACKENDS {
        if ids.get(b.id).copied().unwrap_or(0) == 0 {
            bail!("{} ({}) got no connection", b.id, b.node());
        }
    }
    // Each pod sees its own node's Ferry as the peer.
    let node_b_v4 = t.node_b.as_ref().context("node B")?.bridge_v4;
    for line in out.lines().filter(|l| l.starts_with("id=")) {
        let on_b = MESH_BACKENDS
            .iter()
            .any(|b| b.node_b && line.starts_with(&format!("id={} ", b.id)));
        let want = if on_b {
            format!(" peer={node_b_v4}:")
        } else {
            " peer=10.77.1.1:".to_owned()
        };
        if !line.contains(&want) {
            bail!("expected{want}... in {line:?}");
        }
    }
    let on_b: usize = MESH_BACKENDS
        .iter()
        .filter(|b| b.node_b)
        .map(|b| ids.get(b.id).copied().unwrap_or(0))
        .sum();
    let (out1, in1) = (ferry.metric(outbound)?, ferry_b.metric(inbound)?);
    if out1 - out0 != on_b as f64 || in1 - in0 != on_b as f64 {
        bail!(
            "{on_b} connections went to node B, but Ferry A opened {} tunnel streams and \
             Ferry B accepted {}",
            out1 - out0,
            in1 - in0
        );
    }
    println!(
        "    web-1 saw Ferry A (10.77.1.1) as its peer; web-4 and web-5 saw Ferry B ({node_b_v4}).\n    \
         Ferry A opened {} HBONE streams to node B and Ferry B accepted {}: one per connection\n    \
         that went to node B, over mutual TLS to {}:{}.",
        out1 - out0,
        in1 - in0,
        ferry_tests::LINK_B,
        ferry_tests::HBONE_PORT
    );
    Ok((capture, mark, on_b))
}

/// The values of the field `key` of the events `message` in `log` (the
/// fields after the message, not those of the spans before it).
fn log_values(log: &str, message: &str, key: &str) -> Vec<String> {
    let needle = format!("{key}=");
    log.lines()
        .filter_map(|l| l.split_once(message).map(|(_, fields)| fields))
        .filter_map(|fields| {
            fields
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&needle))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .collect()
}

/// Distinct values, in order of first appearance, joined.
fn distinct(values: &[String]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for v in values {
        if !seen.contains(&v.as_str()) {
            seen.push(v);
        }
    }
    seen.join(", ")
}

/// Stops the capture and shows what crossed the link: only TLS on port
/// 15008, never the marker or HTTP in clear; then who talked to whom, from
/// both Ferry's logs.
fn link_proof(
    t: &mut Topology,
    capture: LinkCapture,
    mark: &str,
    on_b: usize,
    ferry: &Ferry,
    ferry_b: &Ferry,
) -> Result<()> {
    let pcap = capture.pcap().to_owned();
    let link = capture.finish(t)?;
    println!(
        "    $ tshark -i {} -f tcp -w {}   (node A, during the previous step)",
        ferry_tests::LINK_IFACE_A,
        pcap.display()
    );
    println!(
        "    {} TCP packets ({} bytes) crossed the link; {} carried payload ({} bytes)",
        link.packets, link.bytes, link.payload_packets, link.payload_bytes
    );
    link.check_tls_only()?;
    println!(
        "    every payload packet was TLS to or from port {}: {} handshake(s), all TLS 1.3 \
         (ServerHello {}),\n    {} application-data records",
        ferry_tests::HBONE_PORT,
        link.server_hello_versions.len(),
        distinct(&link.server_hello_versions),
        link.app_data_records
    );
    let sent = MESH_CONNECTIONS * 21;
    let mut clear = Vec::new();
    for (what, needle) in [
        (format!("the marker (sent {sent} times)"), mark),
        ("`HTTP/1.1`".to_owned(), "HTTP/1.1"),
        ("`id=web-4`".to_owned(), "id=web-4"),
        ("`id=web-5`".to_owned(), "id=web-5"),
    ] {
        let found = link.contains(needle.as_bytes());
        clear.push(format!(
            "{what}: {}",
            if found { "FOUND" } else { "0 times" }
        ));
        if found {
            bail!("{what} crossed the node link in clear ({})", pcap.display());
        }
    }
    println!(
        "    searched the capture's {} raw bytes for clear text:\n      {}",
        link.raw.len(),
        clear.join("\n      ")
    );

    // Who talked to whom: the identities in the certificates, as logged.
    ferry_b.wait_log_count("tunnel stream closed", on_b, Duration::from_secs(10))?;
    let (log_a, log_b) = (ferry.log_text(), ferry_b.log_text());
    let conns = log_values(&log_a, "tunnel connection open", "src");
    println!(
        "    identities: node A opened {} mutual-TLS connection(s) to {NODE_B} as {}\n      \
         and verified node B's certificate as {};\n      \
         node B relayed {} streams from {}",
        conns.len(),
        distinct(&conns),
        distinct(&log_values(&log_a, "tunnel connection open", "peer")),
        log_values(&log_b, "tunnel stream closed", "src").len(),
        distinct(&log_values(&log_b, "tunnel stream closed", "src"))
    );
    Ok(())
}

fn keep_running(t: &mut Topology, stop: &Stop) -> Result<()> {
    let client = t
        .pods()
        .iter()
        .find(|p| p.name == "client")
        .context("no client pod")?
        .netns
        .clone();
    let cgroup = t.cgroup_root.join("pods");
    println!("    Everything stays up. Try, from another shell:");
    println!(
        "      bash -c 'echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{client} \
         curl -s http://{VIP4}/'",
        cgroup.display()
    );
    println!(
        "      ip netns exec {} curl -s 127.0.0.1:15020/metrics",
        t.node_netns
    );
    println!("      (the same with http://{VIP_MESH}/: split between node A and node B's pods)");
    println!("      less {}", t.dir.join("ferry.log").display());
    println!("    Press Ctrl-C to tear everything down.");
    loop {
        // Doubles as the sleep: returns once Ferry exits or after 250 ms.
        let exited = t.wait_exit("ferry", Duration::from_millis(250));
        if stop.is_set() {
            // The way this step is meant to end.
            return Ok(());
        }
        if let Ok(code) = exited {
            bail!(
                "Ferry exited ({code:?}); its log is {}",
                t.dir.join("ferry.log").display()
            );
        }
    }
}
