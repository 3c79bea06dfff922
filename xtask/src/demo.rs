//! `cargo xtask demo`: Ferry's main job, end to end, on this machine.
//!
//! From a fresh machine: setup (eBPF toolchain and runtime tools), the eBPF
//! build, a release build of `ferry` and `ferry-testkit`, then the
//! integration harness's topology (a node network namespace with a bridge, a
//! client pod in the cgroup Ferry enrolls, three backend pods), Ferry with a
//! generated config, and real connections from the client pod: N to the
//! service's IPv4 address (the weighted split is shown as a table), 100 to
//! its IPv6 address, one straight to a backend (which bypasses Ferry), and a
//! few of Ferry's metrics. Then everything is torn down, also when the demo
//! is interrupted with Ctrl-C (SIGINT) or SIGTERM.
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
use ferry_tests::{Ferry, Group, Pod, Topology, count_ids, metric_value};

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
    if !util::is_root() {
        bail!(
            "this needs root: it creates network namespaces and cgroups and loads eBPF programs \
             (run it as root)"
        );
    }
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
    host: u8,
    weight: u32,
}

const BACKENDS: [Backend; 3] = [
    Backend {
        id: "web-1",
        host: 11,
        weight: 60,
    },
    Backend {
        id: "web-2",
        host: 12,
        weight: 30,
    },
    Backend {
        id: "web-3",
        host: 13,
        weight: 10,
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
            "      - {{ address: 10.77.1.{}, weight: {} }}   # {}\n",
            b.host, b.weight, b.id
        ));
    }
    s
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let stop = Stop::install()?;
    let mut steps = Steps::new(11 + usize::from(args.keep_running));
    println!(
        "Ferry demo: pods connect to a service address; Ferry's eBPF programs send those \
         connections\nto one proxy on the node, which spreads them over the backends by weight. \
         Ctrl-C stops it\nand removes everything it created."
    );
    let mut slot = None;
    let result = prepare(&mut steps, &stop).and_then(|_| demo(args, &mut steps, &stop, &mut slot));
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
        "Create the topology: a node, a client pod, three backend pods",
        || {
            let t = slot.insert(Topology::new("demo")?);
            let client = t.add_pod("client", CLIENT_HOST)?;
            let mut pods = Vec::new();
            for b in &BACKENDS {
                stop.check()?;
                let pod = t.add_pod(b.id, b.host)?;
                t.start_server(&pod, BACKEND_PORT, b.id, &[])?;
                pods.push(pod);
            }
            print_topology(t, &client, &pods);
            Ok(client)
        },
    )?;
    let t = slot.as_mut().context("the topology was just created")?;

    let ferry = steps.run(stop, "Start Ferry with a generated config", || {
        let config = t.ferry_config(&services_yaml());
        let ferry = t.start_ferry("ferry", &config)?;
        println!("    {}:", ferry.config.display());
        for line in config.lines() {
            println!("      {line}");
        }
        println!(
            "    Ferry is ready (pid {}): connects from {} to {VIP4}:80 or [{VIP6}]:80 now go to Ferry",
            ferry.pid, t.enrolled_cgroup
        );
        Ok(ferry)
    })?;

    let curl = tool("curl")?;
    steps.run(
        stop,
        &format!("{n} connections from the client pod to http://{VIP4}/"),
        || {
            let url = format!("http://{VIP4}/[1-{n}]");
            let out = drive(t, stop, &client, &curl, &url, n)?;
            check_split(&out, n, true)
        },
    )?;

    steps.run(
        stop,
        &format!("IPv6: 100 connections to http://[{VIP6}]/"),
        || {
            let url = format!("http://[{VIP6}]/[1-100]");
            let out = drive(t, stop, &client, &curl, &url, 100)?;
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

    steps.run(stop, "Ferry's metrics", || {
        let m = ferry.metrics()?;
        let interesting = |l: &&str| {
            l.starts_with("ferry_connections_opened_total")
                || l.starts_with("ferry_tcp_bytes_total")
                || l.starts_with("ferry_connect_retries_total")
                || l.starts_with("ferry_endpoint_ejections_total")
                || (l.starts_with("ferry_ebpf_events_total") && !l.ends_with(" 0"))
        };
        let mut lines: Vec<&str> = m.lines().filter(interesting).collect();
        lines.sort_unstable();
        for line in lines {
            println!("    {line}");
        }
        Ok(())
    })?;

    if args.keep_running {
        steps.run(stop, "Keep running until Ctrl-C", || keep_running(t, stop))?;
    }
    Ok(())
}

fn print_topology(t: &Topology, client: &Pod, backends: &[Pod]) {
    println!(
        "    node      netns {:<20} bridge 10.77.1.1/24, fd77:1::1/64; Ferry runs here",
        t.node_netns
    );
    println!(
        "    client    netns {:<20} {}, {}   cgroup {} (enrolled)",
        client.netns, client.v4, client.v6, t.enrolled_cgroup
    );
    for (pod, b) in backends.iter().zip(&BACKENDS) {
        println!(
            "    {:<9} netns {:<20} {}:{BACKEND_PORT}   HTTP server, answers `id={} peer=...`",
            b.id, pod.netns, pod.v4, b.id
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
    url: &str,
    n: usize,
) -> Result<String> {
    println!("    $ curl -sS '{url}'   (in the client pod)");
    let started = Instant::now();
    let out = t.exec_bounded(
        &client.netns,
        Group::Enrolled,
        curl,
        &["-sS", "--max-time", "10", "--connect-timeout", "5", url],
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

/// Prints the split table; fails unless every connection was answered by a
/// backend (through Ferry: each saw the node's address as the peer).
fn check_split(out: &str, n: usize, first: bool) -> Result<()> {
    let ids = count_ids(out);
    print_split(&ids, n);
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

fn print_split(ids: &BTreeMap<String, usize>, n: usize) {
    let total_weight: u32 = BACKENDS.iter().map(|b| b.weight).sum();
    println!();
    println!(
        "    {:<8} {:<16} {:>7} {:>12} {:>9} {:>11}",
        "backend", "endpoint", "weight", "connections", "observed", "difference"
    );
    let pct = |count: usize| 100.0 * count as f64 / n.max(1) as f64;
    for b in &BACKENDS {
        let weight = 100.0 * f64::from(b.weight) / f64::from(total_weight);
        let count = ids.get(b.id).copied().unwrap_or(0);
        let observed = pct(count);
        println!(
            "    {:<8} {:<16} {:>6.1}% {:>12} {:>8.1}% {:>+7.1} pts",
            b.id,
            format!("10.77.1.{}:{BACKEND_PORT}", b.host),
            weight,
            count,
            observed,
            observed - weight
        );
    }
    for (id, count) in ids {
        if !BACKENDS.iter().any(|b| b.id == id) {
            println!(
                "    {:<8} {:<16} {:>7} {:>12} {:>8.1}%",
                id,
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
            "    {:<8} {:<16} {:>7} {:>12} {:>8.1}%",
            "none",
            "(no answer)",
            "-",
            n - answered,
            pct(n - answered)
        );
    }
    println!(
        "    {:<8} {:<16} {:>6.1}% {:>12} {:>8.1}%",
        "total",
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
    print_split(&ids, 1000);
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
    let out = drive(t, stop, client, curl, &url, 100)?;
    check_split(&out, 100, false)?;
    println!("    web-2 is back in rotation at its weight.");
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
