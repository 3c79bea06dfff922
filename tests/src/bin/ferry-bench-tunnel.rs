//! The cross-node benchmark (`cargo xtask bench-tunnel`): two nodes in
//! network namespaces, a client pod on node A, a server pod on node B, and
//! the same measurements made twice between the same two pods:
//! * direct: plaintext, pod to pod, routed across the node link (the client
//!   runs outside the enrolled cgroup, so nothing captures it);
//! * tunnel: the client connects to a service address, eBPF capture hands
//!   it to Ferry A, which carries it over mutual TLS (HBONE) to Ferry B,
//!   which connects to the pod.
//!
//! Then new connections per second through the tunnel with pooling on and
//! off. Needs root. Writes a Markdown report to `--out` (and stdout).
//!
//! ```text
//! ferry-bench-tunnel [--out FILE] [--seconds S]
//! ```

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use ferry_tests::{Group, LINK_B, Pod, Topology, root_unavailable, testkit_binary};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn field(out: &str, key: &str) -> Result<f64> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key}= in {out:?}"))
}

struct Bench {
    t: Topology,
    client: Pod,
    kit: std::path::PathBuf,
}

impl Bench {
    fn client(&self, group: Group, args: &[&str]) -> Result<String> {
        self.t.exec(&self.client.netns, group, &self.kit, args)
    }
}

fn ferry_a_config(t: &Topology, tls: &str, pooling: bool) -> String {
    let services = "  - name: bench
    addresses: [10.96.0.40]
    ports: [{ port: 80, target_port: 8080 }, { port: 81, target_port: 8081 }]
    endpoints: [{ address: 10.77.2.11, node: node-b, service_account: server }]
";
    format!(
        "{}workloads: [{{ address: 10.77.1.10, service_account: client }}]\n\
         nodes: {{ node-b: \"{LINK_B}:15008\" }}\nhbone: {{ pooling: {pooling} }}\n{tls}",
        t.ferry_config(services)
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{cores} cores ({cpu}), Linux {}; load average at the start: {load}",
        kernel.trim()
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out_path = arg(&args, "--out");
    let seconds: u64 = arg(&args, "--seconds").map_or(Ok(5), |s| s.parse())?;
    if let Some(why) = root_unavailable() {
        bail!("the tunnel benchmark needs root and the eBPF build: {why}");
    }
    let mut t = Topology::new("bt")?;
    let node_b = t.add_second_node()?;
    let client = t.add_pod("cli", 10)?;
    let server = t.add_pod_b("srv", 11)?;
    let kit = testkit_binary()?;
    for (port, mode) in [(8080, "echo"), (8081, "sink")] {
        t.start_server(&server, port, mode, &["--mode", mode])?;
    }
    let ca = ferry::tls::LocalCa::generate("cluster.local")?;
    let (ca_pem, key_pem) = ca.to_pem();
    std::fs::write(t.dir.join("ca.pem"), ca_pem)?;
    std::fs::write(t.dir.join("ca-key.pem"), key_pem)?;
    let tls = format!(
        "tls: {{ ca: {{ cert: \"{}\", key: \"{}\" }} }}\n",
        t.dir.join("ca.pem").display(),
        t.dir.join("ca-key.pem").display()
    );
    let cfg_b = format!(
        "node: {{ name: node-b }}\ncapture: {{ enabled: false }}\n\
         workloads: [{{ address: 10.77.2.11, service_account: server }}]\n{tls}"
    );
    t.start_ferry_in(&node_b.netns, "ferry-b", &cfg_b)?;
    let cfg_a = ferry_a_config(&t, &tls, true);
    t.start_ferry("ferry-a", &cfg_a)?;
    let mut b = Bench { t, client, kit };
    let secs = seconds.to_string();

    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Cross-node tunnel benchmark\n\nCommand: `cargo xtask bench-tunnel` (release build; \
         {secs} s per throughput and connection-rate run, 5000 round trips per latency run).\n\
         Machine: {}.\n",
        machine()
    );
    let _ = writeln!(
        report,
        "Between the same two pods (client 10.77.1.10 on node A, server 10.77.2.11 on node B; \
         each node a network namespace, joined by a veth pair):\n\
         * **direct**: plaintext TCP pod to pod, routed over the node link (not captured);\n\
         * **tunnel**: to the service address, captured by eBPF on node A, Ferry A → mutual TLS \
         1.3 + HTTP/2 CONNECT (one pooled connection) → Ferry B → the pod.\n"
    );
    let _ = writeln!(
        report,
        "| measurement | direct | tunnel | tunnel / direct |\n|---|---|---|---|"
    );

    let mut row = |name: &str, unit: &str, d: f64, tun: f64| {
        let line = format!(
            "| {name} | {d:.0} {unit} | {tun:.0} {unit} | {:.2} |",
            if d > 0.0 { tun / d } else { 0.0 }
        );
        println!("{line}");
        let _ = writeln!(report, "{line}");
    };

    // Throughput: one connection, as fast as it goes.
    let d = b.client(
        Group::Other,
        &[
            "stream-client",
            "--connect",
            "10.77.2.11:8081",
            "--seconds",
            &secs,
        ],
    )?;
    let tu = b.client(
        Group::Enrolled,
        &[
            "stream-client",
            "--connect",
            "10.96.0.40:81",
            "--seconds",
            &secs,
        ],
    )?;
    row(
        "throughput, 1 connection",
        "Mbit/s",
        field(&d, "mbit_s")?,
        field(&tu, "mbit_s")?,
    );

    // Latency: 1-byte request/response on one connection.
    let d = b.client(
        Group::Other,
        &[
            "rr-client",
            "--connect",
            "10.77.2.11:8080",
            "--count",
            "5000",
        ],
    )?;
    let tu = b.client(
        Group::Enrolled,
        &["rr-client", "--connect", "10.96.0.40:80", "--count", "5000"],
    )?;
    row(
        "round trip p50",
        "µs",
        field(&d, "p50_us")?,
        field(&tu, "p50_us")?,
    );
    row(
        "round trip p99",
        "µs",
        field(&d, "p99_us")?,
        field(&tu, "p99_us")?,
    );

    // New connections per second (4 clients, one exchange per connection).
    let rate = |b: &Bench, group: Group, addr: &str| -> Result<(f64, f64)> {
        let out = b.client(
            group,
            &[
                "connrate-client",
                "--connect",
                addr,
                "--seconds",
                &secs,
                "--concurrency",
                "4",
            ],
        )?;
        Ok((field(&out, "per_s")?, field(&out, "failed")?))
    };
    let (direct_rate, df) = rate(&b, Group::Other, "10.77.2.11:8080")?;
    let (pooled, pf) = rate(&b, Group::Enrolled, "10.96.0.40:80")?;
    row(
        "new connections/s, pooling on",
        "conn/s",
        direct_rate,
        pooled,
    );
    b.t.kill("ferry-a");
    let cfg_a = ferry_a_config(&b.t, &tls, false);
    b.t.start_ferry("ferry-a-unpooled", &cfg_a)?;
    let (unpooled, uf) = rate(&b, Group::Enrolled, "10.96.0.40:80")?;
    row(
        "new connections/s, pooling off",
        "conn/s",
        direct_rate,
        unpooled,
    );
    let _ = writeln!(
        report,
        "\nPooling: {:.1}× the new-connection rate with pooling on vs off \
         (failed connections: direct {df}, pooled {pf}, unpooled {uf}).\n",
        if unpooled > 0.0 {
            pooled / unpooled
        } else {
            0.0
        }
    );
    let _ = writeln!(
        report,
        "Caveats: everything shares the machine's cores — client, server, both Ferry \
         processes and the kernel's forwarding — so the tunnel's numbers include Ferry's \
         own CPU competing with the load generator, and the run is noisy on a busy host \
         (other builds). Loopback-speed veths have no real link latency or bandwidth limit, \
         so the ratios show Ferry's CPU cost per byte and per connection, not what a real \
         network would show. Each connection in the rate test carries one byte each way; \
         with pooling off every connection is a full TLS 1.3 handshake (ECDSA P-256, \
         X25519) plus an HTTP/2 handshake."
    );
    print!("{report}");
    if let Some(p) = out_path {
        std::fs::write(&p, &report).with_context(|| format!("writing {p}"))?;
        eprintln!("wrote {p}");
    }
    drop(b);
    Ok(())
}
