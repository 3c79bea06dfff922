//! `cargo xtask bench`: what going through Ferry costs, measured side by side
//! on the integration harness's topology, against direct TCP and HAProxy.
//!
//! One client pod and one server pod; in one run, each measurement goes
//! every way in turn: direct; Ferry with eBPF capture and the splice relay;
//! a second Ferry process with the copy relay; a fourth with splice and
//! in-kernel socket joining (`proxy.socket_join`); Ferry (splice) reached by
//! iptables `REDIRECT` instead of eBPF (the client outside the enrolled
//! cgroup); HAProxy in TCP mode on the node. Measured:
//!
//! * bulk throughput: iperf3, 1 and 4 streams, 10 s (1 s with `--quick`);
//! * request/response latency: `ferry-testkit rr-client`, 64-byte request
//!   and response on one connection, 20000 round trips (2000), p50 to p99.9;
//! * new connections per second: `rr-client --new-connection`, each round
//!   trip on its own connection, 5000 connections (500);
//! * the proxy's resident memory idle and holding 9,900 idle connections
//!   (1,000), and its CPU seconds per GB moved in the throughput tests.
//!
//! The results go to `tests/bench/RESULTS.md`; a `--quick` run writes them to
//! a temporary file instead (so a CI run leaves the tree clean) unless
//! `--write` is given. Then, in the same command, the cross-node rows: two
//! nodes, the same two pods directly and through Ferry A -> mutual-TLS
//! HBONE tunnel -> Ferry B, and new connections per second with pooling on
//! and off (`ferry-bench-tunnel`, also `cargo xtask bench-tunnel` alone;
//! results in `tests/bench/TUNNEL.md`, or a temporary file likewise).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ferry_tests::{Ferry, Group, Pod, Topology, metric_value};

use crate::demo::{self, Stop};
use crate::util;

#[derive(clap::Args, Debug, Default, Clone)]
pub struct BenchArgs {
    /// A short run: 2 s of iperf3, 2000 round trips, 500 connections. Writes
    /// its results to a temporary file unless --write is given.
    #[arg(long)]
    pub quick: bool,

    /// Write tests/bench/RESULTS.md even with --quick.
    #[arg(long)]
    pub write: bool,
}

/// How much of each measurement to run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    iperf_seconds: u64,
    round_trips: u64,
    connections: u64,
    /// Each measurement runs this many times (direct, then through Ferry,
    /// each time); the results are the medians.
    rounds: usize,
    /// Idle connections held for the memory measurement.
    idle_connections: u64,
}

impl Plan {
    fn for_args(args: &BenchArgs) -> Plan {
        if args.quick {
            Plan {
                iperf_seconds: 1,
                round_trips: 2000,
                connections: 500,
                rounds: 1,
                idle_connections: 1000,
            }
        } else {
            Plan {
                iperf_seconds: 10,
                round_trips: 20_000,
                connections: 5000,
                rounds: 3,
                idle_connections: 9_900,
            }
        }
    }
}

const CLIENT_HOST: u8 = 10;
const SERVER_HOST: u8 = 11;
/// The service address Ferry (splice) captures.
const VIP: &str = "10.96.0.30";
/// The service address the second Ferry (copy relay) captures.
const VIP_COPY: &str = "10.96.0.31";
/// The service address the fourth Ferry (splice + in-kernel socket join)
/// captures.
const VIP_JOIN: &str = "10.96.0.33";
/// The service address a client outside the enrolled cgroup reaches Ferry
/// (splice) at through iptables `REDIRECT` in the node namespace.
const VIP_REDIRECT: &str = "10.96.0.32";
/// HAProxy's listening address, on the node namespace's loopback.
const HAPROXY_ADDR: &str = "10.96.0.40";
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;
/// The server that accepts and holds idle connections.
const HOLD_PORT: u16 = 7100;
const SIZE: u64 = 64;
/// Upper bound on one rr-client run.
const RR_MAX_SECONDS: u64 = 60;
const SERVICE: &str = "default/bench";
/// Connections a proxy here can hold: each takes two descriptors, and the
/// hard open-file limit on these machines is 20,000 (no CAP_SYS_RESOURCE to
/// raise it), so 10,000 proxied connections cannot fit; HAProxy's maxconn.
const MAX_PROXIED: u64 = 9_950;

/// Stream counts of the throughput test.
const STREAMS: [u64; 2] = [1, 4];

/// How many ways are measured.
const WAYS: usize = 6;

/// The ways the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Direct,
    /// Ferry with eBPF capture, `proxy.zero_copy: true` (splice).
    Ferry,
    /// A second Ferry with eBPF capture, `proxy.zero_copy: false`.
    FerryCopy,
    /// A fourth Ferry with eBPF capture, splice and `proxy.socket_join:
    /// true` (client → server bytes go socket to socket in the kernel).
    FerryJoin,
    /// Ferry (splice), reached by iptables `REDIRECT` instead of eBPF
    /// capture; it learns the destination from `SO_ORIGINAL_DST`.
    Redirect,
    /// HAProxy in TCP mode on the node.
    Haproxy,
}

impl Way {
    const ALL: [Way; WAYS] = [
        Way::Direct,
        Way::Ferry,
        Way::FerryCopy,
        Way::FerryJoin,
        Way::Redirect,
        Way::Haproxy,
    ];

    fn label(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Ferry => "Ferry splice",
            Way::FerryCopy => "Ferry copy",
            Way::FerryJoin => "Ferry socket join",
            Way::Redirect => "iptables->Ferry",
            Way::Haproxy => "HAProxy",
        }
    }

    fn address(self) -> String {
        match self {
            Way::Direct => format!("10.77.1.{SERVER_HOST}"),
            Way::Ferry => VIP.to_string(),
            Way::FerryCopy => VIP_COPY.to_string(),
            Way::FerryJoin => VIP_JOIN.to_string(),
            Way::Redirect => VIP_REDIRECT.to_string(),
            Way::Haproxy => HAPROXY_ADDR.to_string(),
        }
    }

    /// The client's cgroup: only the eBPF ways run it in the enrolled one.
    fn group(self) -> Group {
        match self {
            Way::Redirect | Way::Haproxy => Group::Other,
            Way::Direct | Way::Ferry | Way::FerryCopy | Way::FerryJoin => Group::Enrolled,
        }
    }

    /// Which Ferry (0: splice, 1: copy, 2: REDIRECT target, 3: socket
    /// join) serves this way.
    fn ferry(self) -> Option<usize> {
        match self {
            Way::Ferry => Some(0),
            Way::FerryCopy => Some(1),
            Way::Redirect => Some(2),
            Way::FerryJoin => Some(3),
            Way::Direct | Way::Haproxy => None,
        }
    }
}

/// One `rr-client` line.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Rr {
    count: u64,
    rate_per_s: f64,
    mean_us: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

/// What one way measured.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    /// iperf3, 1 and 4 streams.
    gbit_per_s: [f64; 2],
    retransmits: u64,
    rr: Rr,
    conn: Rr,
    /// The proxy's CPU time (user + system) during each test (throughput 1
    /// stream, 4 streams, request/response, new connections); none direct.
    ferry_cpu: [Option<f64>; 4],
    /// Bytes the throughput tests moved (1 and 4 streams).
    bytes: [f64; 2],
    /// The proxy's resident memory (KiB) when idle, and while holding the
    /// idle connections.
    rss_idle_kib: Option<f64>,
    rss_held_kib: Option<f64>,
    /// How many idle connections the proxy held when `rss_held_kib` was
    /// read.
    idle_held: u64,
}

impl Measured {
    /// Proxy CPU seconds per GB moved in the throughput tests.
    fn cpu_per_gb(&self) -> Option<f64> {
        let cpu = self.ferry_cpu[0]? + self.ferry_cpu[1]?;
        let gb = (self.bytes[0] + self.bytes[1]) / 1e9;
        (gb > 0.0).then(|| cpu / gb)
    }

    /// KiB per idle connection held.
    fn kib_per_idle(&self) -> Option<f64> {
        Some((self.rss_held_kib? - self.rss_idle_kib?) / self.idle_held.max(1) as f64)
    }
}

fn parse_rr(line: &str) -> Result<Rr> {
    let line = line
        .lines()
        .find(|l| l.starts_with("rr "))
        .with_context(|| format!("no `rr ...` line in {line:?}"))?;
    let field = |key: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("no {key}= in {line:?}"))?
            .parse::<f64>()
            .with_context(|| format!("{key}= in {line:?}"))
    };
    Ok(Rr {
        count: field("count")? as u64,
        rate_per_s: field("rate_per_s")?,
        mean_us: field("mean_us")?,
        p50_us: field("p50_us")?,
        p90_us: field("p90_us")?,
        p99_us: field("p99_us")?,
        p999_us: field("p999_us")?,
        max_us: field("max_us")?,
    })
}

/// `(received bits/s, sender retransmits, bytes received)` from `iperf3 -J`
/// output.
fn parse_iperf(json: &str) -> Result<(f64, u64, f64)> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing iperf3's JSON")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.bits_per_second")?;
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps, retransmits, bytes))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let stop = Stop::install()?;
    let plan = Plan::for_args(args);
    let mut steps = demo::Steps::new(11);
    println!(
        "Ferry bench: client pod -> server pod, directly, through Ferry (eBPF capture; splice and \
         copy relays)\nand through HAProxy. Ctrl-C stops it and removes everything."
    );
    let mut slot = None;
    let bins = match demo::prepare(&mut steps, &stop) {
        Ok(bins) => bins,
        Err(e) => return stop.outcome(Err(e)),
    };
    let result = bench(args, plan, &bins, &mut steps, &stop, &mut slot);
    if stop.is_set() {
        println!("\n*** interrupted: stopping and cleaning up");
    }
    if let Some(topology) = slot {
        demo::teardown(topology, result.is_err() && !stop.is_set());
    }
    // Then the cross-node rows: two nodes, direct vs Ferry A -> mutual TLS
    // tunnel -> Ferry B, pooling on and off (tests/bench/TUNNEL.md).
    let result = result.and_then(|()| {
        let out = if args.quick && !args.write {
            std::env::temp_dir().join("ferry-bench-quick-TUNNEL.md")
        } else {
            util::workspace_root().join("tests/bench/TUNNEL.md")
        };
        let seconds = if args.quick { 1 } else { 5 };
        let dir = bins
            .ferry
            .parent()
            .context("the ferry binary has no directory")?;
        crate::bench_tunnel::cross_node(&dir.join("ferry-bench-tunnel"), &bins.ferry, &out, seconds)
    });
    let result = stop.outcome(result);
    if result.is_ok() {
        println!("\nBench finished in {}.", demo::secs(steps.elapsed()));
    }
    result
}

fn haproxy_config(server: &str) -> String {
    let mut s = format!(
        "global\n  maxconn {MAX_PROXIED}\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 10m\n  timeout server 10m\n"
    );
    for port in [IPERF_PORT, ECHO_PORT, HOLD_PORT] {
        s.push_str(&format!(
            "\nlisten p{port}\n  bind {HAPROXY_ADDR}:{port}\n  maxconn {MAX_PROXIED}\n  \
             server s1 {server}:{port}\n"
        ));
    }
    s
}

fn bench(
    args: &BenchArgs,
    plan: Plan,
    bins: &demo::Binaries,
    steps: &mut demo::Steps,
    stop: &Stop,
    slot: &mut Option<Topology>,
) -> Result<()> {
    let iperf3 = demo::tool("iperf3")?;
    let haproxy = demo::tool("haproxy")?;
    let (client, server) = steps.run(
        stop,
        "Create the topology: a node, a client pod, a server pod",
        || {
            let t = slot.insert(Topology::new("bench")?);
            let client = t.add_pod("client", CLIENT_HOST)?;
            let server = t.add_pod("server", SERVER_HOST)?;
            // Thousands of short connections per run, all to one server
            // port; the same settings for every way.
            ferry_tests::tune_for_connection_churn(&[&t.node_netns, &client.netns])?;
            let port = IPERF_PORT.to_string();
            t.spawn(
                "iperf3-server",
                &server.netns,
                Group::Other,
                &iperf3,
                &["-s", "-p", &port, "--forceflush"],
            )?;
            t.wait_log("iperf3-server", "Server listening", Duration::from_secs(10))?;
            t.start_server(&server, ECHO_PORT, "echo", &["--mode", "echo"])?;
            let hold = format!("[::]:{HOLD_PORT}");
            t.spawn(
                "hold-server",
                &server.netns,
                Group::Other,
                &bins.testkit,
                &["hold-server", "--listen", &hold],
            )?;
            t.wait_log("hold-server", "listening", Duration::from_secs(10))?;
            println!(
                "    client {} (enrolled cgroup), server {}: iperf3 -s on {IPERF_PORT}, \
                 echo on {ECHO_PORT}, idle-connection holder on {HOLD_PORT}",
                client.v4, server.v4
            );
            Ok((client, server))
        },
    )?;
    let t = slot.as_mut().context("the topology was just created")?;

    let (ferry, ferry_copy, ferry_redirect, ferry_join, haproxy_pid) = steps.run(
        stop,
        "Start Ferry four times (splice, copy, REDIRECT target, socket join; release build) \
         and HAProxy",
        || {
            let services = |vip: &str| {
                format!(
                    "  - name: bench\n    addresses: [{vip}]\n    ports:\n      \
                     - {{ port: {IPERF_PORT} }}\n      - {{ port: {ECHO_PORT} }}\n      \
                     - {{ port: {HOLD_PORT} }}\n    endpoints:\n      - {{ address: {} }}\n",
                    server.v4
                )
            };
            // Instance k listens on the default ports + 100·k (outbound,
            // metrics, readiness, HBONE inbound) and captures only its own
            // service address; all attach to the enrolled cgroup (BPF links
            // coexist).
            let config = |k: u16, vip: &str, extra: &str| {
                let mut c = t.ferry_config(&services(vip));
                for (host, port) in [
                    ("[::]", 15001),
                    ("0.0.0.0", 15020),
                    ("0.0.0.0", 15021),
                    ("[::]", 15008),
                ] {
                    c = c.replace(
                        &format!("{host}:{port}"),
                        &format!("{host}:{}", port + 100 * k),
                    );
                }
                c.replace("proxy:\n", &format!("proxy:\n{extra}"))
            };
            let splice = config(0, VIP, "  zero_copy: true\n");
            let copy = config(1, VIP_COPY, "  zero_copy: false\n");
            // The third: no eBPF capture; clients outside the enrolled
            // cgroup reach it by netfilter, REDIRECT to its listener. (Its
            // own port: REDIRECTed flows' conntrack entries would clash with
            // eBPF-captured flows to the same listener, and netfilter then
            // remaps their source ports.)
            let redirect = config(2, VIP_REDIRECT, "  zero_copy: true\n")
                .replace("capture:\n", "capture:\n  enabled: false\n");
            // The fourth: like the first, plus in-kernel socket joining.
            let join = config(3, VIP_JOIN, "  zero_copy: true\n  socket_join: true\n");
            // start_ferry waits for each instance's own /ready.
            let ferry = t.start_ferry("ferry", &splice)?;
            let ferry_copy = t.start_ferry("ferry-copy", &copy)?;
            let ferry_redirect = t.start_ferry("ferry-redirect", &redirect)?;
            let ferry_join = t.start_ferry("ferry-join", &join)?;
            let (code, body) = ferry_join.http("15320", "/metrics")?;
            if code != 200 || metric_value(&body, "ferry_socket_join_enabled") != 1.0 {
                bail!("the socket-join Ferry runs without joining (kernel refused it?)");
            }
            let node = t.node_netns.clone();
            ferry_tests::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &node,
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    VIP_REDIRECT,
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15201",
                ],
            )?;
            t.add_node_address(&format!("{HAPROXY_ADDR}/32"))?;
            let cfg_path = std::env::temp_dir().join("ferry-bench-haproxy.cfg");
            std::fs::write(&cfg_path, haproxy_config(&server.v4.to_string()))?;
            let cfg = cfg_path.to_string_lossy().into_owned();
            let haproxy_pid = t.spawn(
                "haproxy",
                &node,
                Group::Other,
                &haproxy,
                &["-db", "-f", &cfg],
            )?;
            println!(
                "    {} (pid {}, splice): {VIP} -> {}\n    same binary (pid {}, copy): \
                 {VIP_COPY} -> {}\n    same binary (pid {}, no eBPF, iptables REDIRECT): \
                 {VIP_REDIRECT} -> {}\n    same binary (pid {}, splice + socket join): \
                 {VIP_JOIN} -> {}\n    {} (pid {haproxy_pid}): {HAPROXY_ADDR} -> {}",
                bins.ferry.display(),
                ferry.pid,
                server.v4,
                ferry_copy.pid,
                server.v4,
                ferry_redirect.pid,
                server.v4,
                ferry_join.pid,
                server.v4,
                haproxy.display(),
                server.v4
            );
            Ok((ferry, ferry_copy, ferry_redirect, ferry_join, haproxy_pid))
        },
    )?;
    let t = &*t;
    let clk_tck: f64 = util::stdout_of(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100.0);
    let run = Runner {
        t,
        stop,
        ferries: [&ferry, &ferry_copy, &ferry_redirect, &ferry_join],
        haproxy_pid,
        client: &client,
        clk_tck,
    };
    // HAProxy answers once it has bound its ports; a few bounded attempts.
    let mut ready = Err(anyhow::anyhow!("HAProxy never answered"));
    for _ in 0..50 {
        ready = run.rr(&bins.testkit, Way::Haproxy, 10, false);
        if ready.is_ok() || stop.is_set() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ready.context("HAProxy is not serving")?;
    // Idle resident memory: before any traffic through Ferry (HAProxy has
    // just served the 10 round trips above).
    let idle = Way::ALL.map(|w| run.pid(w).and_then(rss_kib));
    let load = load_average();
    if let Some(one) = load
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        && let Ok(cpus) = std::thread::available_parallelism()
        && one > cpus.get() as f64 / 2.0
    {
        println!(
            "\nwarning: load average {load}: other work on this machine will distort the numbers"
        );
    }
    let mut rounds = vec![[Measured::default(); WAYS]; plan.rounds];
    let round_label = |r: usize| {
        if plan.rounds > 1 {
            format!("round {}/{}  ", r + 1, plan.rounds)
        } else {
            String::new()
        }
    };
    let times = if plan.rounds > 1 {
        format!(", {} rounds", plan.rounds)
    } else {
        String::new()
    };

    steps.run(
        stop,
        &format!(
            "Bulk throughput: iperf3, 1 and 4 streams, {} s each{times}",
            plan.iperf_seconds
        ),
        || {
            for (r, round) in rounds.iter_mut().enumerate() {
                for (k, streams) in STREAMS.into_iter().enumerate() {
                    for (i, way) in Way::ALL.into_iter().enumerate() {
                        let (out, cpu) = run.measure(way, 1, || {
                            let secs = plan.iperf_seconds.to_string();
                            let port = IPERF_PORT.to_string();
                            let addr = way.address();
                            let p = streams.to_string();
                            let args = [
                                "-c",
                                &addr,
                                "-p",
                                &port,
                                "-t",
                                &secs,
                                "-P",
                                &p,
                                "-J",
                                "--connect-timeout",
                                "5000",
                            ];
                            run.exec(way, &iperf3, &args, plan.iperf_seconds + 30)
                        })?;
                        let (bps, retransmits, bytes) = parse_iperf(&out)?;
                        round[i].gbit_per_s[k] = bps / 1e9;
                        round[i].bytes[k] = bytes;
                        if k == 0 {
                            round[i].retransmits = retransmits;
                        }
                        round[i].ferry_cpu[k] = cpu;
                        println!(
                            "    {}{streams} stream(s) {:<13} {:>7.2} Gbit/s  ({retransmits} \
                             retransmits){}",
                            round_label(r),
                            way.label(),
                            bps / 1e9,
                            cpu_note(cpu, plan.iperf_seconds as f64)
                        );
                    }
                }
            }
            Ok(())
        },
    )?;

    steps.run(
        stop,
        &format!(
            "Request/response latency: {SIZE} B each way, one connection, {} round trips{times}",
            plan.round_trips
        ),
        || {
            for (r, round) in rounds.iter_mut().enumerate() {
                for (i, way) in Way::ALL.into_iter().enumerate() {
                    let (rr, cpu) = run.measure(way, 1, || {
                        run.rr(&bins.testkit, way, plan.round_trips, false)
                    })?;
                    round[i].rr = rr;
                    round[i].ferry_cpu[2] = cpu;
                    println!(
                        "    {}{:<14} p50 {:>6.1} µs  p90 {:>6.1}  p99 {:>6.1}  p99.9 {:>7.1}  \
                         ({:.0}/s){}",
                        round_label(r),
                        way.label(),
                        rr.p50_us,
                        rr.p90_us,
                        rr.p99_us,
                        rr.p999_us,
                        rr.rate_per_s,
                        cpu_note(cpu, rr.count as f64 / rr.rate_per_s.max(1e-9))
                    );
                }
            }
            Ok(())
        },
    )?;

    steps.run(
        stop,
        &format!(
            "New connections: {} connections, each connect + {SIZE} B echo + close{times}",
            plan.connections
        ),
        || {
            for (r, round) in rounds.iter_mut().enumerate() {
                for (i, way) in Way::ALL.into_iter().enumerate() {
                    let (conn, cpu) = run.measure(way, plan.connections, || {
                        run.rr(&bins.testkit, way, plan.connections, true)
                    })?;
                    round[i].conn = conn;
                    round[i].ferry_cpu[3] = cpu;
                    println!(
                        "    {}{:<14} {:>7.0} connections/s  (p50 {:.1} µs, p99 {:.1} µs){}",
                        round_label(r),
                        way.label(),
                        conn.rate_per_s,
                        conn.p50_us,
                        conn.p99_us,
                        cpu_note(cpu, conn.count as f64 / conn.rate_per_s.max(1e-9))
                    );
                }
            }
            Ok(())
        },
    )?;

    let mut held = [None; WAYS];
    let mut held_count = [0u64; WAYS];
    steps.run(
        stop,
        &format!(
            "Resident memory: idle (before any traffic), and holding {} idle connections",
            plan.idle_connections
        ),
        || {
            for (i, way) in Way::ALL.into_iter().enumerate().skip(1) {
                (held[i], held_count[i]) =
                    run.hold_idle(&bins.testkit, way, plan.idle_connections)?;
                println!(
                    "    {:<14} idle {:>8} KiB   holding {}: {:>8} KiB",
                    way.label(),
                    kib(idle[i]),
                    plan.idle_connections,
                    kib(held[i])
                );
            }
            Ok(())
        },
    )?;

    let mut medians = [Measured::default(); WAYS];
    for (i, m) in medians.iter_mut().enumerate() {
        *m = median_of(&rounds, i);
        m.rss_idle_kib = idle[i];
        m.rss_held_kib = held[i];
        m.idle_held = held_count[i];
    }
    steps.run(stop, "Results", || {
        if plan.rounds > 1 {
            println!("    Medians of {} rounds:", plan.rounds);
        }
        print_summary(&medians, plan);
        let mut machine = Machine::probe();
        machine.load = load.clone();
        let command = format!(
            "cargo xtask bench{}{}",
            if args.quick { " --quick" } else { "" },
            if args.write { " --write" } else { "" }
        );
        let text = results_markdown(&command, &machine, plan, &rounds, &medians);
        let path = results_path(args);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("\n    written to {}", path.display());
        if args.quick && !args.write {
            println!("    (a --quick run; add --write to update tests/bench/RESULTS.md)");
        }
        Ok(())
    })?;
    Ok(())
}

fn kib(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "n/a".into())
}

/// A process's resident memory (VmRSS, KiB).
pub(crate) fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Open descriptors of a process.
pub(crate) fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The 1, 5 and 15 minute load averages, from /proc/loadavg.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Each figure's median over the rounds, for way `i`.
fn median_of(rounds: &[[Measured; WAYS]], i: usize) -> Measured {
    let m = |f: &dyn Fn(&Measured) -> f64| median(rounds.iter().map(|r| f(&r[i])).collect());
    let rr = |g: &dyn Fn(&Measured) -> Rr| Rr {
        count: m(&|x| g(x).count as f64) as u64,
        rate_per_s: m(&|x| g(x).rate_per_s),
        mean_us: m(&|x| g(x).mean_us),
        p50_us: m(&|x| g(x).p50_us),
        p90_us: m(&|x| g(x).p90_us),
        p99_us: m(&|x| g(x).p99_us),
        p999_us: m(&|x| g(x).p999_us),
        max_us: m(&|x| g(x).max_us),
    };
    Measured {
        gbit_per_s: [0, 1].map(|k| m(&|x| x.gbit_per_s[k])),
        bytes: [0, 1].map(|k| m(&|x| x.bytes[k])),
        retransmits: m(&|x| x.retransmits as f64) as u64,
        rr: rr(&|x| x.rr),
        conn: rr(&|x| x.conn),
        ferry_cpu: [0, 1, 2, 3].map(|k| {
            let v: Vec<f64> = rounds.iter().filter_map(|r| r[i].ferry_cpu[k]).collect();
            (!v.is_empty()).then(|| median(v))
        }),
        rss_idle_kib: None,
        rss_held_kib: None,
        idle_held: 0,
    }
}

fn results_path(args: &BenchArgs) -> PathBuf {
    if args.quick && !args.write {
        std::env::temp_dir().join("ferry-bench-quick-RESULTS.md")
    } else {
        util::workspace_root().join("tests/bench/RESULTS.md")
    }
}

fn cpu_note(cpu: Option<f64>, wall: f64) -> String {
    match cpu {
        Some(cpu) if wall > 0.0 => format!(
            "; the proxy used {cpu:.2} s CPU ({:.0}% of one core)",
            100.0 * cpu / wall
        ),
        _ => String::new(),
    }
}

/// Runs the measuring clients in the client pod.
struct Runner<'a> {
    t: &'a Topology,
    stop: &'a Stop,
    /// Ferry splice, Ferry copy, Ferry for iptables REDIRECT, Ferry with
    /// socket join.
    ferries: [&'a Ferry; 4],
    haproxy_pid: u32,
    client: &'a Pod,
    clk_tck: f64,
}

impl Runner<'_> {
    fn exec(&self, way: Way, program: &Path, args: &[&str], timeout_secs: u64) -> Result<String> {
        self.t.exec_bounded(
            &self.client.netns,
            way.group(),
            program,
            args,
            Duration::from_secs(timeout_secs),
            Some(self.stop.flag()),
        )
    }

    /// The proxy process of a way.
    fn pid(&self, way: Way) -> Option<u32> {
        match way {
            Way::Direct => None,
            Way::Ferry | Way::FerryCopy | Way::Redirect | Way::FerryJoin => {
                way.ferry().map(|k| self.ferries[k].pid)
            }
            Way::Haproxy => Some(self.haproxy_pid),
        }
    }

    /// Opens `n` idle connections through `way` and returns the proxy's
    /// resident memory (KiB) once it holds them all (both of its sockets
    /// for each).
    fn hold_idle(&self, testkit: &Path, way: Way, n: u64) -> Result<(Option<f64>, u64)> {
        use std::io::BufRead;
        let Some(pid) = self.pid(way) else {
            return Ok((None, 0));
        };
        let release = std::env::temp_dir().join(format!("ferry-bench-release-{pid}"));
        let _ = std::fs::remove_file(&release);
        let addr = format!("{}:{HOLD_PORT}", way.address());
        let count = n.to_string();
        let rel = release.to_string_lossy().into_owned();
        let base_fds = open_fds(pid);
        let mut child = self
            .t
            .command(
                &self.client.netns,
                way.group(),
                testkit,
                &[
                    "idle-client",
                    "--connect",
                    &addr,
                    "--count",
                    &count,
                    "--release",
                    &rel,
                    "--max-wait",
                    "120",
                ],
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("starting idle-client")?;
        let stdout = child.stdout.take().context("idle-client's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let result = (|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                    Ok(line) if line.starts_with("holding") => break,
                    Ok(_) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(_) => bail!("idle-client ended before holding {n} connections"),
                }
                if self.stop.is_set() || left.is_zero() {
                    bail!("idle-client did not open {n} connections in time");
                }
            }
            // Wait until the proxy holds them all (Ferry counts them; for
            // HAProxy, both sockets of each exist), or until the count has
            // not moved for a second (then report what it holds).
            let active = format!(r#"ferry_connections_active{{service="{SERVICE}"}}"#);
            let held = || -> Result<u64> {
                Ok(match way.ferry() {
                    Some(k) => metric_value(&self.metrics(k)?, &active) as u64,
                    None => (open_fds(pid).saturating_sub(base_fds) / 2) as u64,
                })
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let (mut last, mut still) = (0, 0);
            loop {
                let now = held()?;
                still = if now == last { still + 1 } else { 0 };
                last = now;
                if now >= n || (now > 0 && still >= 20) {
                    break;
                }
                if self.stop.is_set() || std::time::Instant::now() > deadline {
                    bail!("{} holds only {now} of {n} connections", way.label());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if last < n {
                println!(
                    "    note: {} holds {last} of the {n} idle connections; memory per \
                     connection is computed over {last}",
                    way.label()
                );
            }
            Ok((rss_kib(pid), last))
        })();
        let _ = std::fs::write(&release, b"");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        let _ = reader.join();
        let _ = std::fs::remove_file(&release);
        // Let the proxy close the connections before the next way.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while open_fds(pid) > base_fds + 16 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        result
    }

    fn rr(&self, testkit: &Path, way: Way, count: u64, new_connection: bool) -> Result<Rr> {
        let addr = format!("{}:{ECHO_PORT}", way.address());
        let count_s = count.to_string();
        let size = SIZE.to_string();
        let max = RR_MAX_SECONDS.to_string();
        let mut args = vec![
            "rr-client",
            "--connect",
            &addr,
            "--count",
            &count_s,
            "--size",
            &size,
            "--max-seconds",
            &max,
        ];
        if new_connection {
            args.push("--new-connection");
        }
        let rr = parse_rr(&self.exec(way, testkit, &args, RR_MAX_SECONDS + 30)?)?;
        if rr.count < count {
            println!(
                "    note: {} stopped after {RR_MAX_SECONDS} s with {} of {count} done",
                way.label(),
                rr.count
            );
        }
        Ok(rr)
    }

    /// Runs one measurement and checks it went the intended way: the Ferry
    /// that serves `way` accepted at least `min_opened` connections, the
    /// other accepted none. Returns the result and the proxy's CPU seconds.
    fn measure<T>(
        &self,
        way: Way,
        min_opened: u64,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Option<f64>)> {
        let opened = format!(r#"ferry_connections_opened_total{{service="{SERVICE}"}}"#);
        let counts = || -> Result<[f64; 4]> {
            Ok([
                metric_value(&self.metrics(0)?, &opened),
                metric_value(&self.metrics(1)?, &opened),
                metric_value(&self.metrics(2)?, &opened),
                metric_value(&self.metrics(3)?, &opened),
            ])
        };
        let before = counts()?;
        let pid = self.pid(way);
        let cpu_before = pid.and_then(|p| self.cpu_seconds(p));
        let value = f()?;
        let cpu = match (cpu_before, pid.and_then(|p| self.cpu_seconds(p))) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let after = counts()?;
        for (k, who) in [
            (0, "Ferry (splice)"),
            (1, "Ferry (copy)"),
            (2, "Ferry (REDIRECT target)"),
            (3, "Ferry (socket join)"),
        ] {
            let delta = after[k] - before[k];
            if way.ferry() == Some(k) && delta < min_opened as f64 {
                bail!(
                    "{who} accepted only {delta} connections during a {} run \
                     (expected at least {min_opened})",
                    way.label()
                );
            }
            if way.ferry() != Some(k) && delta != 0.0 {
                bail!(
                    "{who} accepted {delta} connections during a {} run",
                    way.label()
                );
            }
        }
        Ok((value, cpu))
    }

    /// The metrics of Ferry `k` (each has its own admin port).
    fn metrics(&self, k: usize) -> Result<String> {
        let port = ["15020", "15120", "15220", "15320"][k];
        let (code, body) = self.ferries[k].http(port, "/metrics")?;
        if code != 200 {
            bail!("/metrics on {port} answered {code}");
        }
        Ok(body)
    }

    /// A process's user + system CPU time so far, from /proc.
    fn cpu_seconds(&self, pid: u32) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which is in parentheses): state is
        // field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / self.clk_tck)
    }
}

/// a/b.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "-".into()
    }
}

/// One column of the results: a name and how to get it from a way's
/// medians.
struct Column {
    name: &'static str,
    get: fn(&Measured, &Plan) -> Option<f64>,
    digits: usize,
}

fn columns() -> Vec<Column> {
    fn some(v: f64) -> Option<f64> {
        (v > 0.0).then_some(v)
    }
    vec![
        Column {
            name: "Gbit/s 1 stream",
            get: |m, _| some(m.gbit_per_s[0]),
            digits: 2,
        },
        Column {
            name: "Gbit/s 4 streams",
            get: |m, _| some(m.gbit_per_s[1]),
            digits: 2,
        },
        Column {
            name: "RR p50 µs",
            get: |m, _| some(m.rr.p50_us),
            digits: 1,
        },
        Column {
            name: "RR p99 µs",
            get: |m, _| some(m.rr.p99_us),
            digits: 1,
        },
        Column {
            name: "RR p99.9 µs",
            get: |m, _| some(m.rr.p999_us),
            digits: 1,
        },
        Column {
            name: "new conn/s",
            get: |m, _| some(m.conn.rate_per_s),
            digits: 0,
        },
        Column {
            name: "RSS idle MiB",
            get: |m, _| m.rss_idle_kib.map(|k| k / 1024.0),
            digits: 1,
        },
        Column {
            name: "KiB per idle conn",
            get: |m, _| m.kib_per_idle(),
            digits: 2,
        },
        Column {
            name: "proxy CPU s/GB",
            get: |m, _| m.cpu_per_gb(),
            digits: 3,
        },
    ]
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_summary(medians: &[Measured; WAYS], plan: Plan) {
    let cols = columns();
    print!("\n    {:<14}", "");
    for c in &cols {
        print!(" {:>17}", c.name);
    }
    println!();
    for (way, m) in Way::ALL.iter().zip(medians) {
        print!("    {:<14}", way.label());
        for c in &cols {
            print!(" {:>17}", cell((c.get)(m, &plan), c.digits));
        }
        println!();
    }
    for (base, bi) in [("/ direct", 0), ("/ HAProxy", WAYS - 1)] {
        for (way, m) in Way::ALL.iter().zip(medians).skip(1) {
            if way == &Way::ALL[bi] {
                continue;
            }
            print!("    {:<14}", format!("{} {base}", way.label()));
            for c in &cols {
                let r = match ((c.get)(m, &plan), (c.get)(&medians[bi], &plan)) {
                    (Some(a), Some(b)) => ratio(a, b),
                    _ => "-".into(),
                };
                print!(" {r:>17}");
            }
            println!();
        }
    }
    println!(
        "    (throughput and conn/s: higher is better; latencies, memory, CPU: lower is better. \
         Client,\n    proxy and server share this machine's CPUs, so timings are noisy.)"
    );
}

/// Where the numbers were taken.
#[derive(Debug)]
struct Machine {
    date: String,
    /// Load averages just before the measurements.
    load: String,
    /// Ferry's log filter (the harness passes `FERRY_LOG`, default `info`).
    ferry_log: String,
    nproc: String,
    kernel: String,
    cpu: String,
    commit: String,
    iperf3: String,
}

impl Machine {
    /// Whether the 1-minute load average was above half the CPUs.
    fn busy(&self) -> bool {
        let one = self
            .load
            .split_whitespace()
            .next()
            .and_then(|l| l.parse::<f64>().ok());
        let cpus = self.nproc.parse::<f64>().ok();
        matches!((one, cpus), (Some(one), Some(cpus)) if one > cpus / 2.0)
    }

    fn probe() -> Machine {
        let out = |program: &str, args: &[&str]| {
            util::stdout_of(Command::new(program).args(args))
                .unwrap_or_else(|_| "unknown".to_string())
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let root = util::workspace_root();
        let root = root.to_string_lossy();
        Machine {
            date: out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load: load_average(),
            ferry_log: std::env::var("FERRY_LOG").unwrap_or_else(|_| "info".into()),
            nproc: out("nproc", &[]),
            kernel: out("uname", &["-r"]),
            cpu,
            commit: out("git", &["-C", &root, "describe", "--always", "--dirty"]),
            iperf3: out("iperf3", &["--version"])
                .lines()
                .next()
                .unwrap_or("unknown")
                .to_string(),
        }
    }
}

fn results_markdown(
    command: &str,
    machine: &Machine,
    plan: Plan,
    rounds: &[[Measured; WAYS]],
    medians: &[Measured; WAYS],
) -> String {
    let cols = columns();
    let mut s = String::new();
    s.push_str("# Ferry benchmark: direct, through Ferry (splice and copy), through HAProxy\n\n");
    s.push_str(&format!(
        "Written by `{command}` (see `xtask/src/bench.rs`); rerun it to refresh this file.\n\n"
    ));
    s.push_str(&format!(
        "- Command: `{command}`\n- Date: {}\n- Machine: {} vCPUs (nproc), kernel {}, CPU {}\n\
         - Load average (1, 5, 15 min) just before the measurements: {}\n\
         - Ferry: release build at `{}`, default worker threads (one per CPU), log level `{}` \
         (at `info`, its default, Ferry logs one line per connection, here to a file)\n- {}\n\n",
        machine.date,
        machine.nproc,
        machine.kernel,
        machine.cpu,
        machine.load,
        machine.commit,
        machine.ferry_log,
        machine.iperf3
    ));
    s.push_str(&format!(
        "**Caveat:** client, proxy and server all run on this one machine and share its \
         {} vCPUs: through a proxy, three busy processes compete for them instead of two, and \
         every round trip needs two more wake-ups. Timings are noisy (expect several percent \
         between runs, and much more in the tails); {}. Compare the ratios, not the absolute \
         values, and do not compare across machines.\n\n",
        machine.nproc,
        if rounds.len() > 1 {
            format!("each figure is the median of {} rounds", rounds.len())
        } else {
            "each figure is from a single run".to_string()
        }
    ));
    if machine.busy() {
        s.push_str(&format!(
            "**Warning:** other work was running on this machine during the run (load average \
             {} just before it, on {} vCPUs), which inflates the latency tails and distorts \
             the ratios; rerun on an idle machine for cleaner numbers.\n\n",
            machine.load, machine.nproc
        ));
    }
    s.push_str(&format!(
        "## What runs\n\n\
         The integration harness's topology (`tests/src/lib.rs`): a node network namespace \
         with a bridge, a client pod `10.77.1.10` whose processes are in the cgroup Ferry \
         enrolls, and a server pod `10.77.1.11` running `iperf3 -s`, `ferry-testkit serve \
         --mode echo` and `ferry-testkit hold-server` (accepts and holds idle connections); \
         veth pairs join the pods to the bridge.\n\n\
         - **direct**: the client connects to `10.77.1.11`. Ferry's connect4 programs still \
         run for it and let it pass.\n\
         - **Ferry splice**: the client connects to the service address `{VIP}`; connect4 \
         redirects the connect to Ferry's listener on the node (`10.77.1.1:15001`), and Ferry \
         (`proxy.zero_copy: true`) connects to `10.77.1.11` and relays with splice(2).\n\
         - **Ferry copy**: a second Ferry process (same binary, `proxy.zero_copy: false`, \
         listener `:15101`) captures `{VIP_COPY}` the same way and relays by copying through \
         a per-thread buffer.\n\
         - **Ferry socket join**: a fourth Ferry process (same binary, splice, \
         `proxy.socket_join: true`, listener `:15301`) captures `{VIP_JOIN}`; once it has \
         relayed what the client sent before the join was installed, the client's further \
         bytes go from its socket straight into Ferry's upstream socket (sockmap + sk_msg \
         redirect), and only server → client bytes pass through Ferry's splice relay.\n\
         - **iptables->Ferry**: the client runs outside the enrolled cgroup (no eBPF capture) \
         and connects to `{VIP_REDIRECT}`; an iptables `nat PREROUTING REDIRECT` rule in the \
         node namespace sends it to a third Ferry process (no eBPF capture, splice relay, \
         listener `:15201`), which reads the destination with `SO_ORIGINAL_DST`. What eBPF \
         capture saves is the difference to **Ferry splice**. (A separate listener, because \
         conntrack entries of REDIRECTed flows to the same listener clash with eBPF-captured \
         flows, and netfilter then remaps their source ports.)\n\
         - **HAProxy**: Debian's HAProxy in TCP mode, in the node namespace, listening on \
         `{HAPROXY_ADDR}` (the node's loopback), one `listen` section per port with the server \
         pod as its only server.\n\n\
         Each measurement checks it went the intended way (the serving Ferry's \
         `ferry_connections_opened_total` must move, the other Ferry's must not).\n\n\
         - Throughput: `iperf3 -c ADDR -t {} -P 1|4 -J`, `end.sum_received.bits_per_second` \
         (sender retransmits, 1 stream, median: {}).\n\
         - Request/response: `ferry-testkit rr-client --count {} --size {SIZE}`: one connection, \
         TCP_NODELAY, write {SIZE} bytes and read the {SIZE}-byte echo, back to back (the rate \
         is fixed by the round trip: one request in flight at a time).\n\
         - New connections: `ferry-testkit rr-client --new-connection --count {}`: each round \
         trip on its own connection (connect, {SIZE} B each way, close), one after another.\n\
         - Resident memory: `VmRSS` of the proxy process right after start (idle, before any \
         traffic), and while `ferry-testkit idle-client` holds {} idle connections through it \
         (measured once the proxy holds both sockets of every one); per idle connection is \
         (held − idle) / connections held. (9,900, not 10,000: a proxied connection takes two \
         descriptors and the hard open-file limit here is 20,000, which root cannot raise \
         without CAP_SYS_RESOURCE.)\n\
         - In the client and node namespaces: `net.ipv4.ip_local_port_range=1024 65535` and \
         `net.ipv4.tcp_tw_reuse=1`, for every way: the new-connection runs open tens of \
         thousands of connections to one server port within TIME_WAIT's minute, and otherwise \
         each connecting side (client, and each proxy from the node) ends up burning CPU in \
         the search for a free ephemeral port.\n\
         - CPU per GB: the proxy's utime + stime (`/proc/PID/stat`) during both throughput \
         tests, divided by the bytes they moved.\n\n",
        plan.iperf_seconds,
        Way::ALL
            .iter()
            .zip(medians)
            .map(|(w, m)| format!("{} {}", w.label(), m.retransmits))
            .collect::<Vec<_>>()
            .join(", "),
        plan.round_trips,
        plan.connections,
        plan.idle_connections,
    ));
    s.push_str("## Results\n\n");
    if rounds.len() > 1 {
        s.push_str(&format!(
            "Each measurement ran {} times (every way, in turn, each time); every figure below \
             is the median of its {} values; memory is measured once.\n\n",
            rounds.len(),
            rounds.len()
        ));
    }
    let header = |first: &str| {
        let mut h = format!("| {first} |");
        let mut sep = String::from("| --- |");
        for c in &cols {
            h.push_str(&format!(" {} |", c.name));
            sep.push_str(" ---: |");
        }
        format!("{h}\n{sep}\n")
    };
    s.push_str(&header("Way"));
    for (way, m) in Way::ALL.iter().zip(medians) {
        s.push_str(&format!("| {} |", way.label()));
        for c in &cols {
            s.push_str(&format!(" {} |", cell((c.get)(m, &plan), c.digits)));
        }
        s.push('\n');
    }
    for (title, bi) in [("direct", 0), ("HAProxy", WAYS - 1)] {
        s.push_str(&format!("\n### Ratio to {title}\n\n"));
        s.push_str(&header("Way"));
        for (way, m) in Way::ALL.iter().zip(medians) {
            if *way == Way::ALL[bi] {
                continue;
            }
            s.push_str(&format!("| {} / {title} |", way.label()));
            for c in &cols {
                let r = match ((c.get)(m, &plan), (c.get)(&medians[bi], &plan)) {
                    (Some(a), Some(b)) => ratio(a, b),
                    _ => "-".into(),
                };
                s.push_str(&format!(" {r} |"));
            }
            s.push('\n');
        }
    }
    s.push_str(&format!(
        "\nIdle connections each proxy held when its memory was read (of {}): {}.\n",
        plan.idle_connections,
        Way::ALL
            .iter()
            .zip(medians)
            .skip(1)
            .map(|(w, m)| format!("{} {}", w.label(), m.idle_held))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    s.push_str(
        "\nFor throughput and connections per second higher is better; for latencies, memory \
         and CPU lower is better. `-`: not applicable (direct has no proxy process).\n",
    );
    if rounds.len() > 1 {
        s.push_str(
            "\n## Each round\n\n\
             | Round | Way | Gbit/s 1 stream | Gbit/s 4 streams | RR p50 (µs) | RR p99 (µs) \
             | RR p99.9 (µs) | Connections/s |\n\
             | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for (r, round) in rounds.iter().enumerate() {
            for (m, way) in round.iter().zip(Way::ALL) {
                s.push_str(&format!(
                    "| {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
                    r + 1,
                    way.label(),
                    m.gbit_per_s[0],
                    m.gbit_per_s[1],
                    m.rr.p50_us,
                    m.rr.p99_us,
                    m.rr.p999_us,
                    m.conn.rate_per_s
                ));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rr_lines() {
        let out = "rr mode=persistent size=64 count=2000 requested=2000 elapsed_s=0.101 \
                   rate_per_s=19801.9 mean_us=50.2 p50_us=48.0 p90_us=55.5 p99_us=80.1 \
                   p999_us=120.0 max_us=300.2\n";
        let rr = parse_rr(out).unwrap();
        assert_eq!(rr.count, 2000);
        assert_eq!(rr.p50_us, 48.0);
        assert_eq!(rr.p999_us, 120.0);
        assert_eq!(rr.rate_per_s, 19801.9);
        assert!(parse_rr("nothing here").is_err());
    }

    #[test]
    fn parses_iperf_json() {
        let json = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":2.5e10,"retransmits":3},
                      "sum_received":{"bits_per_second":2.4e10,"bytes":3e10}}}"#;
        assert_eq!(parse_iperf(json).unwrap(), (2.4e10, 3, 3e10));
        let err = parse_iperf(r#"{"error":"unable to connect to server"}"#).unwrap_err();
        assert!(err.to_string().contains("unable to connect"), "{err}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
        let mut rounds = [[Measured::default(); WAYS]; 3];
        for (r, g) in [(0, 9.0), (1, 1.0), (2, 5.0)] {
            rounds[r][1].gbit_per_s = [g, 2.0 * g];
            rounds[r][1].rr.p99_us = g * 10.0;
            rounds[r][1].ferry_cpu[2] = Some(g);
        }
        let m = median_of(&rounds, 1);
        assert_eq!(m.gbit_per_s, [5.0, 10.0]);
        assert_eq!(m.rr.p99_us, 50.0);
        assert_eq!(m.ferry_cpu, [None, None, Some(5.0), None]);
    }

    #[test]
    fn quick_writes_elsewhere_unless_asked() {
        let quick = BenchArgs {
            quick: true,
            write: false,
        };
        assert!(!results_path(&quick).ends_with("tests/bench/RESULTS.md"));
        let quick_write = BenchArgs {
            quick: true,
            write: true,
        };
        assert!(results_path(&quick_write).ends_with("tests/bench/RESULTS.md"));
        assert!(results_path(&BenchArgs::default()).ends_with("tests/bench/RESULTS.md"));
    }

    #[test]
    fn markdown_has_ratios() {
        let mk = |g: f64| Measured {
            gbit_per_s: [g, g],
            ..Default::default()
        };
        let mut medians = [mk(20.0), mk(5.0), mk(4.0), mk(6.0), mk(4.5), mk(2.5)];
        medians[1].rss_idle_kib = Some(1024.0);
        medians[1].rss_held_kib = Some(1024.0 + 9_900.0 * 4.0);
        medians[1].idle_held = 9_900;
        medians[1].ferry_cpu = [Some(1.0), Some(1.0), None, None];
        medians[1].bytes = [1e9, 1e9];
        let machine = Machine {
            date: "d".into(),
            load: "0.1 0.2 0.3".into(),
            ferry_log: "info".into(),
            nproc: "2".into(),
            kernel: "k".into(),
            cpu: "c".into(),
            commit: "abc".into(),
            iperf3: "iperf 3".into(),
        };
        let md = results_markdown(
            "cargo xtask bench",
            &machine,
            Plan::for_args(&BenchArgs::default()),
            &[medians; 3],
            &medians,
        );
        // Ferry splice: 5 / 20 direct, 5 / 2.5 HAProxy; 1 MiB idle, 4 KiB per
        // idle connection, 1 s of CPU per GB.
        assert!(
            md.contains("| Ferry splice | 5.00 | 5.00 | - | - | - | - | 1.0 | 4.00 | 1.000 |"),
            "{md}"
        );
        assert!(
            md.contains("| Ferry splice / direct | 0.25× | 0.25× |"),
            "{md}"
        );
        assert!(
            md.contains("| Ferry splice / HAProxy | 2.00× | 2.00× |"),
            "{md}"
        );
        assert!(md.contains("| 3 | Ferry copy | 4.00 |"), "{md}");
        assert!(md.contains("Command: `cargo xtask bench`"), "{md}");
    }
}
