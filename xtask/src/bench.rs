//! `cargo xtask bench`: what going through Ferry costs, measured side by side
//! on the integration harness's topology.
//!
//! One client pod (in the enrolled cgroup) and one server pod. Each
//! measurement runs twice, back to back: (a) the client connects to the
//! server pod's address directly (connect4 runs and lets it pass), (b) it
//! connects to a service address, which Ferry's eBPF capture redirects to
//! Ferry (a release build), which connects to the same server. Measured:
//!
//! * bulk throughput: iperf3, one stream, 10 s (2 s with `--quick`);
//! * request/response latency: `ferry-testkit rr-client`, 64-byte request
//!   and response on one connection, 20000 round trips (2000), p50 to p99.9;
//! * new connections per second: `rr-client --new-connection`, each round
//!   trip on its own connection, 5000 connections (500).
//!
//! The results go to `tests/bench/RESULTS.md`; a `--quick` run writes them to
//! a temporary file instead (so a CI run leaves the tree clean) unless
//! `--write` is given.

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
}

impl Plan {
    fn for_args(args: &BenchArgs) -> Plan {
        if args.quick {
            Plan {
                iperf_seconds: 2,
                round_trips: 2000,
                connections: 500,
                rounds: 1,
            }
        } else {
            Plan {
                iperf_seconds: 10,
                round_trips: 20_000,
                connections: 5000,
                rounds: 3,
            }
        }
    }
}

const CLIENT_HOST: u8 = 10;
const SERVER_HOST: u8 = 11;
const VIP: &str = "10.96.0.30";
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;
/// The new-connections test of round `r` uses echo port `CONN_PORT + r`:
/// the TIME_WAIT sockets one round leaves (toward its port) then never
/// slow the next round's ephemeral-port search.
const CONN_PORT: u16 = 7100;
/// The client pod's ephemeral port range (the default, 32768-60999, fills up
/// with TIME_WAIT sockets toward Ferry's one listener port over the rounds).
const CLIENT_PORT_RANGE: &str = "10000 65000";
const SIZE: u64 = 64;
/// Upper bound on one rr-client run.
const RR_MAX_SECONDS: u64 = 60;
const SERVICE: &str = "default/bench";

/// The two ways the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Direct,
    Ferry,
}

impl Way {
    const BOTH: [Way; 2] = [Way::Direct, Way::Ferry];

    fn label(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Ferry => "through Ferry",
        }
    }

    fn address(self) -> String {
        match self {
            Way::Direct => format!("10.77.1.{SERVER_HOST}"),
            Way::Ferry => VIP.to_string(),
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
    gbit_per_s: f64,
    retransmits: u64,
    rr: Rr,
    conn: Rr,
    /// Ferry's CPU time (user + system) during each test, through Ferry only.
    ferry_cpu: [Option<f64>; 3],
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

/// `(received bits/s, sender retransmits)` from `iperf3 -J` output.
fn parse_iperf(json: &str) -> Result<(f64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing iperf3's JSON")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.bits_per_second")?;
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps, retransmits))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let stop = Stop::install()?;
    let plan = Plan::for_args(args);
    let mut steps = demo::Steps::new(9);
    println!(
        "Ferry bench: client pod -> server pod, (a) directly and (b) through a service address \
         that\nFerry's eBPF capture sends to Ferry. Ctrl-C stops it and removes everything."
    );
    let mut slot = None;
    let result = demo::prepare(&mut steps, &stop)
        .and_then(|bins| bench(args, plan, &bins, &mut steps, &stop, &mut slot));
    if stop.is_set() {
        println!("\n*** interrupted: stopping and cleaning up");
    }
    if let Some(topology) = slot {
        demo::teardown(topology, result.is_err() && !stop.is_set());
    }
    let result = stop.outcome(result);
    if result.is_ok() {
        println!("\nBench finished in {}.", demo::secs(steps.elapsed()));
    }
    result
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
    let (client, server) = steps.run(
        stop,
        "Create the topology: a node, a client pod, a server pod",
        || {
            let t = slot.insert(Topology::new("bench")?);
            let client = t.add_pod("client", CLIENT_HOST)?;
            let server = t.add_pod("server", SERVER_HOST)?;
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
            for r in 0..plan.rounds {
                let port = conn_port(r);
                t.start_server(&server, port, &format!("echo-{port}"), &["--mode", "echo"])?;
            }
            ferry_tests::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &client.netns,
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.ipv4.ip_local_port_range={CLIENT_PORT_RANGE}"),
                ],
            )?;
            println!(
                "    client {} (enrolled cgroup, ephemeral ports {CLIENT_PORT_RANGE}), server {}: \
                 iperf3 -s on {IPERF_PORT},\n    echo on {ECHO_PORT} (request/response) and {} \
                 (new connections, one port per round)",
                client.v4,
                server.v4,
                conn_ports(plan.rounds)
            );
            Ok((client, server))
        },
    )?;
    let t = slot.as_mut().context("the topology was just created")?;

    let ferry = steps.run(stop, "Start Ferry (release build)", || {
        let mut services = format!(
            "  - name: bench\n    addresses: [{VIP}]\n    ports:\n      \
             - {{ port: {IPERF_PORT} }}\n      - {{ port: {ECHO_PORT} }}\n"
        );
        for r in 0..plan.rounds {
            services.push_str(&format!("      - {{ port: {} }}\n", conn_port(r)));
        }
        services.push_str(&format!(
            "    endpoints:\n      - {{ address: {} }}\n",
            server.v4
        ));
        let config = t.ferry_config(&services);
        let ferry = t.start_ferry("ferry", &config)?;
        println!(
            "    {} (pid {}): {VIP}:{{{IPERF_PORT},{ECHO_PORT},{}}} -> {}",
            bins.ferry.display(),
            ferry.pid,
            conn_ports(plan.rounds),
            server.v4
        );
        Ok(ferry)
    })?;
    let t = &*t;
    let clk_tck: f64 = util::stdout_of(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100.0);
    let run = Runner {
        t,
        stop,
        ferry: &ferry,
        client: &client,
        clk_tck,
    };
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
    let mut rounds = vec![[Measured::default(); 2]; plan.rounds];
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
            "Bulk throughput: iperf3, 1 stream, {} s{times}",
            plan.iperf_seconds
        ),
        || {
            for (r, round) in rounds.iter_mut().enumerate() {
                for (i, way) in Way::BOTH.into_iter().enumerate() {
                    let (out, cpu) = run.measure(way, 1, || {
                        let secs = plan.iperf_seconds.to_string();
                        let port = IPERF_PORT.to_string();
                        let addr = way.address();
                        let args = [
                            "-c",
                            &addr,
                            "-p",
                            &port,
                            "-t",
                            &secs,
                            "-P",
                            "1",
                            "-J",
                            "--connect-timeout",
                            "5000",
                        ];
                        run.exec(&iperf3, &args, plan.iperf_seconds + 30)
                    })?;
                    let (bps, retransmits) = parse_iperf(&out)?;
                    round[i].gbit_per_s = bps / 1e9;
                    round[i].retransmits = retransmits;
                    round[i].ferry_cpu[0] = cpu;
                    println!(
                        "    {}{:<14} {:>7.2} Gbit/s  ({retransmits} retransmits){}",
                        round_label(r),
                        way.label(),
                        bps / 1e9,
                        cpu_note(cpu, plan.iperf_seconds as f64)
                    );
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
                for (i, way) in Way::BOTH.into_iter().enumerate() {
                    let (rr, cpu) = run.measure(way, 1, || {
                        run.rr(&bins.testkit, way, ECHO_PORT, plan.round_trips, false)
                    })?;
                    round[i].rr = rr;
                    round[i].ferry_cpu[1] = cpu;
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
                for (i, way) in Way::BOTH.into_iter().enumerate() {
                    let (conn, cpu) = run.measure(way, plan.connections, || {
                        run.rr(&bins.testkit, way, conn_port(r), plan.connections, true)
                    })?;
                    round[i].conn = conn;
                    round[i].ferry_cpu[2] = cpu;
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

    let (direct, ferry_m) = (median_of(&rounds, 0), median_of(&rounds, 1));
    steps.run(stop, "Results", || {
        if plan.rounds > 1 {
            println!("    Medians of {} rounds:", plan.rounds);
        }
        print_summary(&direct, &ferry_m);
        let mut machine = Machine::probe();
        machine.load = load.clone();
        let command = format!(
            "cargo xtask bench{}{}",
            if args.quick { " --quick" } else { "" },
            if args.write { " --write" } else { "" }
        );
        let text = results_markdown(&command, &machine, plan, &rounds, &direct, &ferry_m);
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

fn conn_port(round: usize) -> u16 {
    CONN_PORT + round as u16
}

/// `7100` or `7100-7102`.
fn conn_ports(rounds: usize) -> String {
    match rounds {
        0 | 1 => CONN_PORT.to_string(),
        n => format!("{CONN_PORT}-{}", conn_port(n - 1)),
    }
}

/// The 1, 5 and 15 minute load averages, from /proc/loadavg.
fn load_average() -> String {
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
fn median_of(rounds: &[[Measured; 2]], i: usize) -> Measured {
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
        gbit_per_s: m(&|x| x.gbit_per_s),
        retransmits: m(&|x| x.retransmits as f64) as u64,
        rr: rr(&|x| x.rr),
        conn: rr(&|x| x.conn),
        ferry_cpu: [0, 1, 2].map(|k| {
            let v: Vec<f64> = rounds.iter().filter_map(|r| r[i].ferry_cpu[k]).collect();
            (!v.is_empty()).then(|| median(v))
        }),
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
            "; Ferry used {cpu:.2} s CPU ({:.0}% of one core)",
            100.0 * cpu / wall
        ),
        _ => String::new(),
    }
}

/// Runs the measuring clients in the client pod.
struct Runner<'a> {
    t: &'a Topology,
    stop: &'a Stop,
    ferry: &'a Ferry,
    client: &'a Pod,
    clk_tck: f64,
}

impl Runner<'_> {
    fn exec(&self, program: &Path, args: &[&str], timeout_secs: u64) -> Result<String> {
        self.t.exec_bounded(
            &self.client.netns,
            Group::Enrolled,
            program,
            args,
            Duration::from_secs(timeout_secs),
            Some(self.stop.flag()),
        )
    }

    fn rr(
        &self,
        testkit: &Path,
        way: Way,
        port: u16,
        count: u64,
        new_connection: bool,
    ) -> Result<Rr> {
        let addr = format!("{}:{port}", way.address());
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
        let rr = parse_rr(&self.exec(testkit, &args, RR_MAX_SECONDS + 30)?)?;
        if rr.count < count {
            println!(
                "    note: {} stopped after {RR_MAX_SECONDS} s with {} of {count} done",
                way.label(),
                rr.count
            );
        }
        Ok(rr)
    }

    /// Runs one measurement and checks it went the intended way: through
    /// Ferry, Ferry accepted at least `min_opened` connections; directly, it
    /// accepted none. Returns the result and Ferry's CPU seconds (through
    /// Ferry only).
    fn measure<T>(
        &self,
        way: Way,
        min_opened: u64,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Option<f64>)> {
        let opened = format!(r#"ferry_connections_opened_total{{service="{SERVICE}"}}"#);
        let before = metric_value(&self.ferry.metrics()?, &opened);
        let cpu_before = self.cpu_seconds();
        let value = f()?;
        let cpu = match (cpu_before, self.cpu_seconds()) {
            (Some(a), Some(b)) if way == Way::Ferry => Some(b - a),
            _ => None,
        };
        let after = metric_value(&self.ferry.metrics()?, &opened);
        let delta = after - before;
        match way {
            Way::Direct if delta != 0.0 => {
                bail!("Ferry accepted {delta} connections during a direct run")
            }
            Way::Ferry if delta < min_opened as f64 => bail!(
                "Ferry accepted only {delta} connections during a run through it \
                 (expected at least {min_opened})"
            ),
            _ => {}
        }
        Ok((value, cpu))
    }

    /// Ferry's user + system CPU time so far, from /proc.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.ferry.pid)).ok()?;
        // Fields after the command name (which is in parentheses): state is
        // field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / self.clk_tck)
    }
}

/// Ferry/direct.
fn ratio(ferry: f64, direct: f64) -> String {
    if direct > 0.0 {
        format!("{:.2}×", ferry / direct)
    } else {
        "-".into()
    }
}

fn print_summary(direct: &Measured, ferry: &Measured) {
    println!(
        "\n    {:<14} {:>13} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "", "throughput", "rr p50", "rr p99", "rr p99.9", "conn/s", "conn p99"
    );
    for (label, m) in [("direct", direct), ("through Ferry", ferry)] {
        println!(
            "    {:<14} {:>7.2} Gbit/s {:>7.1} µs {:>7.1} µs {:>7.1} µs {:>10.0} {:>8.1} µs",
            label,
            m.gbit_per_s,
            m.rr.p50_us,
            m.rr.p99_us,
            m.rr.p999_us,
            m.conn.rate_per_s,
            m.conn.p99_us
        );
    }
    println!(
        "    {:<14} {:>13} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "Ferry/direct",
        ratio(ferry.gbit_per_s, direct.gbit_per_s),
        ratio(ferry.rr.p50_us, direct.rr.p50_us),
        ratio(ferry.rr.p99_us, direct.rr.p99_us),
        ratio(ferry.rr.p999_us, direct.rr.p999_us),
        ratio(ferry.conn.rate_per_s, direct.conn.rate_per_s),
        ratio(ferry.conn.p99_us, direct.conn.p99_us),
    );
    println!(
        "    (throughput and conn/s: higher is better; latencies: lower is better. \
         Client, Ferry and server\n    share this machine's CPUs, so timings are noisy.)"
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
    rounds: &[[Measured; 2]],
    direct: &Measured,
    ferry: &Measured,
) -> String {
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let mut row = |what: String, d: f64, f: f64, digits: usize| {
        rows.push((
            what,
            format!("{d:.digits$}"),
            format!("{f:.digits$}"),
            ratio(f, d),
        ));
    };
    row(
        format!(
            "Bulk throughput, iperf3 1 stream {} s (Gbit/s)",
            plan.iperf_seconds
        ),
        direct.gbit_per_s,
        ferry.gbit_per_s,
        2,
    );
    for (name, d, f) in [
        ("p50", direct.rr.p50_us, ferry.rr.p50_us),
        ("p90", direct.rr.p90_us, ferry.rr.p90_us),
        ("p99", direct.rr.p99_us, ferry.rr.p99_us),
        ("p99.9", direct.rr.p999_us, ferry.rr.p999_us),
        ("mean", direct.rr.mean_us, ferry.rr.mean_us),
    ] {
        row(
            format!("Request/response {SIZE} B, one connection, {name} (µs)"),
            d,
            f,
            1,
        );
    }
    row(
        "New connections per second (connect + echo + close)".into(),
        direct.conn.rate_per_s,
        ferry.conn.rate_per_s,
        0,
    );
    for (name, d, f) in [
        ("p50", direct.conn.p50_us, ferry.conn.p50_us),
        ("p99", direct.conn.p99_us, ferry.conn.p99_us),
    ] {
        row(
            format!("New connection + {SIZE} B round trip, {name} (µs)"),
            d,
            f,
            1,
        );
    }

    let cpu = |i: usize| {
        ferry.ferry_cpu[i]
            .map(|c| format!("{c:.2} s"))
            .unwrap_or_else(|| "n/a".into())
    };
    let mut s = String::new();
    s.push_str("# Ferry benchmark: direct vs. through Ferry\n\n");
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
         {} vCPUs: through Ferry, three busy processes compete for them instead of two, and \
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
    s.push_str(
        "## What runs\n\n\
         The integration harness's topology (`tests/src/lib.rs`): a node network namespace \
         with a bridge, a client pod `10.77.1.10` whose processes are in the cgroup Ferry \
         enrolls, and a server pod `10.77.1.11` running `iperf3 -s` and `ferry-testkit serve \
         --mode echo`; veth pairs join the pods to the bridge.\n\n\
         - **direct**: the client connects to `10.77.1.11`. Ferry's connect4 program still \
         runs for it and lets it pass.\n\
         - **through Ferry**: the client connects to the service address `10.96.0.30`; \
         connect4 redirects the connect to Ferry's listener on the node (`10.77.1.1:15001`), \
         and Ferry connects to `10.77.1.11` and relays both directions.\n\n\
         Each measurement checks it went the intended way (Ferry's \
         `ferry_connections_opened_total` must not move during a direct run, and must during a \
         run through Ferry).\n\n",
    );
    s.push_str(&format!(
        "- Throughput: `iperf3 -c ADDR -t {} -P 1 -J`, `end.sum_received.bits_per_second` \
         (sender retransmits, median: direct {}, through Ferry {}).\n\
         - Request/response: `ferry-testkit rr-client --count {} --size {SIZE}`: one connection, \
         TCP_NODELAY, write {SIZE} bytes and read the {SIZE}-byte echo, {} round trips after \
         {} uncounted warm-up ones.\n\
         - New connections: `ferry-testkit rr-client --new-connection --count {}`: each round \
         trip on its own connection (connect, {SIZE} B each way, close), one after another. \
         Each round uses its own server port ({}) and the client pod's ephemeral port range is \
         {}: otherwise the TIME_WAIT sockets of earlier rounds fill the range and the kernel's \
         search for a free port, not Ferry, dominates the later rounds.\n\n",
        plan.iperf_seconds,
        direct.retransmits,
        ferry.retransmits,
        plan.round_trips,
        plan.round_trips,
        (plan.round_trips / 10).min(100),
        plan.connections,
        conn_ports(plan.rounds),
        CLIENT_PORT_RANGE.replace(' ', "-"),
    ));
    s.push_str("## Results\n\n");
    if rounds.len() > 1 {
        s.push_str(&format!(
            "Each measurement ran {} times (direct, then through Ferry, each time); every \
             figure below is the median of its {} values. The rounds are listed after.\n\n",
            rounds.len(),
            rounds.len()
        ));
    }
    s.push_str("| Measurement | direct | through Ferry | Ferry/direct |\n");
    s.push_str("| --- | ---: | ---: | ---: |\n");
    for (what, d, f, r) in &rows {
        s.push_str(&format!("| {what} | {d} | {f} | {r} |\n"));
    }
    s.push_str(&format!(
        "\nFor throughput and connections per second higher is better (a ratio below 1× is \
         Ferry's cost); for latencies lower is better (a ratio above 1× is Ferry's cost).\n\n\
         Ferry's own CPU time (user + system) during the runs through it: {} in the \
         throughput test, {} in the request/response test, {} in the new-connections test.\n",
        cpu(0),
        cpu(1),
        cpu(2)
    ));
    if rounds.len() > 1 {
        s.push_str(
            "\n## Each round\n\n\
             | Round | Way | Throughput (Gbit/s) | RR p50 (µs) | RR p99 (µs) | RR p99.9 (µs) \
             | Connections/s |\n\
             | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for (r, round) in rounds.iter().enumerate() {
            for (m, way) in round.iter().zip(Way::BOTH) {
                s.push_str(&format!(
                    "| {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
                    r + 1,
                    way.label(),
                    m.gbit_per_s,
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
                      "sum_received":{"bits_per_second":2.4e10}}}"#;
        assert_eq!(parse_iperf(json).unwrap(), (2.4e10, 3));
        let err = parse_iperf(r#"{"error":"unable to connect to server"}"#).unwrap_err();
        assert!(err.to_string().contains("unable to connect"), "{err}");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
        let mut rounds = [[Measured::default(); 2]; 3];
        for (r, g) in [(0, 9.0), (1, 1.0), (2, 5.0)] {
            rounds[r][1].gbit_per_s = g;
            rounds[r][1].rr.p99_us = g * 10.0;
            rounds[r][1].ferry_cpu[2] = Some(g);
        }
        let m = median_of(&rounds, 1);
        assert_eq!(m.gbit_per_s, 5.0);
        assert_eq!(m.rr.p99_us, 50.0);
        assert_eq!(m.ferry_cpu, [None, None, Some(5.0)]);
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
        let direct = Measured {
            gbit_per_s: 20.0,
            ..Default::default()
        };
        let ferry = Measured {
            gbit_per_s: 5.0,
            ..Default::default()
        };
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
            &[[direct, ferry]; 3],
            &direct,
            &ferry,
        );
        assert!(md.contains("| 20.00 | 5.00 | 0.25× |"), "{md}");
        assert!(md.contains("| 3 | through Ferry | 5.00 |"), "{md}");
        assert!(md.contains("Command: `cargo xtask bench`"), "{md}");
    }
}
