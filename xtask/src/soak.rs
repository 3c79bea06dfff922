//! `cargo xtask soak`: does Ferry's memory stay flat under steady load?
//!
//! One client pod (enrolled) and one server pod; Ferry (release build, eBPF
//! capture, default relay) between them. For the whole run, at fixed rates
//! (open loop, so the load does not sag when the machine is busy):
//!
//! * connection churn: `ferry-testkit connrate-client --rate`, each
//!   connection one 1-byte exchange with an echo server, then closed;
//! * one long-lived connection with 64-byte round trips
//!   (`rr-client --rate`);
//! * every third sample, a one-second bulk burst (`stream-client` to a
//!   sink), so that the relay's buffers are exercised at full size too.
//!
//! Ferry's resident memory (VmRSS), open descriptors and active
//! connections are sampled at a fixed interval. Growth is the last sample
//! against the first one after the warm-up; the run fails when it exceeds
//! `--max-growth-kib` or any client saw a failure. The full run (10 minutes)
//! writes `tests/bench/SOAK.md`; `--quick` runs 20 seconds and writes to a
//! temporary file unless `--write` is given.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::{Ferry, Group, Topology};

use crate::bench;
use crate::demo::{self, Stop};
use crate::util;

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,

    /// A 20-second run (CI); results go to a temporary file unless --write.
    #[arg(long)]
    pub quick: bool,

    /// Write tests/bench/SOAK.md even with --quick.
    #[arg(long)]
    pub write: bool,

    /// New connections per second (connection churn).
    #[arg(long, default_value_t = 200)]
    pub conn_rate: u32,

    /// Round trips per second on the long-lived connection.
    #[arg(long, default_value_t = 1000)]
    pub rr_rate: u32,

    /// The most the resident memory may grow from the end of the warm-up to
    /// the end of the run, in KiB.
    #[arg(long, default_value_t = 1024)]
    pub max_growth_kib: u64,
}

impl Default for SoakArgs {
    /// The same defaults as the command line's.
    fn default() -> SoakArgs {
        SoakArgs {
            seconds: 600,
            quick: false,
            write: false,
            conn_rate: 200,
            rr_rate: 1000,
            max_growth_kib: 1024,
        }
    }
}

const CLIENT_HOST: u8 = 10;
const SERVER_HOST: u8 = 11;
const VIP: &str = "10.96.0.50";
const ECHO_PORT: u16 = 7000;
const SINK_PORT: u16 = 7001;

/// One sample of the proxy's state.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: f64,
    fds: usize,
    active: f64,
    opened: f64,
}

pub fn run(args: &SoakArgs) -> Result<()> {
    let stop = Stop::install()?;
    let mut steps = demo::Steps::new(6);
    let seconds = if args.quick { 20 } else { args.seconds };
    if !(10..=3600).contains(&seconds) {
        bail!("--seconds must be between 10 and 3600");
    }
    println!(
        "Ferry soak: {seconds} s of steady load through Ferry, its memory sampled throughout.\n\
         Ctrl-C stops it and removes everything."
    );
    let mut slot = None;
    let result = demo::prepare(&mut steps, &stop)
        .and_then(|_| soak(args, seconds, &mut steps, &stop, &mut slot));
    if let Some(topology) = slot {
        demo::teardown(topology, result.is_err() && !stop.is_set());
    }
    stop.outcome(result)
}

fn soak(
    args: &SoakArgs,
    seconds: u64,
    steps: &mut demo::Steps,
    stop: &Stop,
    slot: &mut Option<Topology>,
) -> Result<()> {
    let (client, ferry) = steps.run(stop, "Topology, servers and Ferry", || {
        let t = slot.insert(Topology::new("soak")?);
        let client = t.add_pod("client", CLIENT_HOST)?;
        let server = t.add_pod("server", SERVER_HOST)?;
        ferry_tests::tune_for_connection_churn(&[&t.node_netns, &client.netns])?;
        t.start_server(&server, ECHO_PORT, "echo", &["--mode", "echo"])?;
        t.start_server(&server, SINK_PORT, "sink", &["--mode", "sink"])?;
        let services = format!(
            "  - name: soak\n    addresses: [{VIP}]\n    ports:\n      - {{ port: {ECHO_PORT} }}\n      \
             - {{ port: {SINK_PORT} }}\n    endpoints:\n      - {{ address: {} }}\n",
            server.v4
        );
        let config = t.ferry_config(&services);
        let ferry = t.start_ferry("ferry", &config)?;
        Ok((client, ferry))
    })?;
    let t = slot.as_mut().context("the topology was just created")?;
    let testkit = ferry_tests::testkit_binary()?;

    let interval = if args.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    let warmup = if args.quick {
        Duration::from_secs(6)
    } else {
        Duration::from_secs(60)
    };
    let samples = steps.run(stop, "Steady load, sampling Ferry", || {
        let secs = seconds.to_string();
        let echo = format!("{VIP}:{ECHO_PORT}");
        let sink = format!("{VIP}:{SINK_PORT}");
        let conn_rate = args.conn_rate.to_string();
        let rr_rate = args.rr_rate.to_string();
        let rr_count = (u64::from(args.rr_rate) * seconds).to_string();
        t.spawn(
            "churn",
            &client.netns,
            Group::Enrolled,
            &testkit,
            &[
                "connrate-client",
                "--connect",
                &echo,
                "--seconds",
                &secs,
                "--concurrency",
                "2",
                "--rate",
                &conn_rate,
            ],
        )?;
        t.spawn(
            "rr",
            &client.netns,
            Group::Enrolled,
            &testkit,
            &[
                "rr-client",
                "--connect",
                &echo,
                "--count",
                &rr_count,
                "--max-seconds",
                &secs,
                "--rate",
                &rr_rate,
            ],
        )?;
        println!(
            "    {conn_rate} new connections/s, {rr_rate} round trips/s on one connection, a 1 s \
             bulk burst every {} s; sampling every {} s",
            interval.as_secs() * 3,
            interval.as_secs()
        );
        let start = Instant::now();
        let mut samples = Vec::new();
        let mut bursts = 0u32;
        let end = Duration::from_secs(seconds);
        let mut next = Duration::ZERO;
        while start.elapsed() < end {
            stop.check()?;
            let now = start.elapsed();
            if now < next {
                // A fixed sampling cadence.
                std::thread::sleep((next - now).min(Duration::from_millis(200)));
                continue;
            }
            let s = sample(&ferry, start.elapsed())?;
            print_sample(&s);
            samples.push(s);
            if samples.len() % 3 == 0 && start.elapsed() + Duration::from_secs(2) < end {
                t.exec_bounded(
                    &client.netns,
                    Group::Enrolled,
                    &testkit,
                    &["stream-client", "--connect", &sink, "--seconds", "1"],
                    Duration::from_secs(30),
                    Some(stop.flag()),
                )
                .context("bulk burst")?;
                bursts += 1;
            }
            next += interval;
        }
        for label in ["churn", "rr"] {
            let code = t
                .wait_exit(label, Duration::from_secs(30))
                .with_context(|| format!("the {label} client"))?;
            if code != Some(0) {
                bail!(
                    "the {label} client failed ({code:?}):\n{}",
                    t.log_text(label)
                );
            }
        }
        let last = sample(&ferry, start.elapsed())?;
        print_sample(&last);
        samples.push(last);
        println!("    {bursts} bulk bursts");
        Ok(samples)
    })?;

    steps.run(stop, "Verdict", || {
        let churn = t.log_text("churn");
        let rr = t.log_text("rr");
        println!("    churn: {}", churn.trim());
        println!("    rr:    {}", rr.trim());
        let failed: u64 = churn
            .split_whitespace()
            .find_map(|w| w.strip_prefix("failed="))
            .context("the churn client printed no failure count")?
            .parse()?;
        let base = samples
            .iter()
            .find(|s| s.at >= warmup)
            .copied()
            .context("no sample after the warm-up")?;
        let last = *samples.last().context("no samples")?;
        let max = samples
            .iter()
            .filter(|s| s.at >= warmup)
            .map(|s| s.rss_kib)
            .fold(0.0, f64::max);
        let growth = last.rss_kib - base.rss_kib;
        let ok = failed == 0 && growth <= args.max_growth_kib as f64;
        let verdict = format!(
            "RSS {:.0} KiB after the warm-up ({} s), {:.0} KiB at the end, peak {:.0} KiB: \
             growth {growth:+.0} KiB (limit {} KiB); descriptors {} -> {}; {} connections \
             opened; {failed} failed",
            base.rss_kib,
            warmup.as_secs(),
            last.rss_kib,
            max,
            args.max_growth_kib,
            base.fds,
            last.fds,
            last.opened
        );
        println!("    {verdict}");
        let path = if args.quick && !args.write {
            std::env::temp_dir().join("ferry-soak-quick.md")
        } else {
            util::workspace_root().join("tests/bench/SOAK.md")
        };
        write_report(&path, args, seconds, &samples, &verdict, ok, &churn, &rr)?;
        println!("    report: {}", path.display());
        if !ok {
            bail!("the soak failed: {verdict}");
        }
        Ok(())
    })
}

fn sample(ferry: &Ferry, at: Duration) -> Result<Sample> {
    let rss_kib =
        bench::rss_kib(ferry.pid).context("Ferry's /proc status is gone (did it exit?)")?;
    let fds = bench::open_fds(ferry.pid);
    let metrics = ferry.metrics()?;
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok(Sample {
        at,
        rss_kib,
        fds,
        active: sum("ferry_connections_active"),
        opened: sum("ferry_connections_opened_total"),
    })
}

fn print_sample(s: &Sample) {
    println!(
        "    t={:>4} s  rss={:>6.0} KiB  fds={:>4}  active={:>3}  opened={}",
        s.at.as_secs(),
        s.rss_kib,
        s.fds,
        s.active,
        s.opened
    );
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    path: &PathBuf,
    args: &SoakArgs,
    seconds: u64,
    samples: &[Sample],
    verdict: &str,
    ok: bool,
    churn: &str,
    rr: &str,
) -> Result<()> {
    use std::fmt::Write as _;
    let mut s = String::new();
    let command = if args.quick {
        "cargo xtask soak --quick".to_owned()
    } else {
        format!("cargo xtask soak --seconds {seconds}")
    };
    let date = util::stdout_of(std::process::Command::new("date").args(["-u", "+%F %R UTC"]))
        .unwrap_or_default();
    let _ = writeln!(s, "# Ferry soak: memory under steady load\n");
    let _ = writeln!(
        s,
        "Written by `{command}` (see `xtask/src/soak.rs`) on {}; {} vCPUs, load average before \
         the run {}.\n",
        date.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bench::load_average()
    );
    let _ = writeln!(
        s,
        "Load, open loop at fixed rates for {seconds} s, client pod -> service address -> \
         eBPF capture -> Ferry (release build, default settings) -> server pod: {} new \
         connections/s (each one 1-byte exchange, then closed), {} 64-byte round trips/s on one \
         long-lived connection, and a 1 s bulk burst (as fast as it goes, to a sink) every third \
         sample. Caveat: the client, Ferry and the servers share this machine's cores; memory is \
         what this measures, not speed.\n",
        args.conn_rate, args.rr_rate
    );
    let _ = writeln!(
        s,
        "**Verdict: {}.** {verdict}.\n",
        if ok { "no growth" } else { "FAILED" }
    );
    let _ = writeln!(s, "Clients: `{}`; `{}`.\n", churn.trim(), rr.trim());
    let _ = writeln!(
        s,
        "Descriptors: besides the listeners and the open connections' sockets, each worker \
         thread keeps up to 32 idle splice pipes (2 descriptors each) for reuse; the count rises \
         in steps at bulk bursts until those pools are full, and is bounded by them.\n"
    );
    let _ = writeln!(
        s,
        "| t (s) | RSS (KiB) | descriptors | active connections | connections opened |"
    );
    let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: |");
    for x in samples {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {} | {} |",
            x.at.as_secs(),
            x.rss_kib,
            x.fds,
            x.active,
            x.opened
        );
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}
