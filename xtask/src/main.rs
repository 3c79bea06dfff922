//! Ferry's developer tasks, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`).
//!
//! Each task lives in its own module; this file only parses the command line
//! and dispatches.

mod bench;
mod bench_tunnel;
mod demo;
mod ebpf;
mod fuzz;
mod setup;
mod soak;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Ferry's developer tasks",
    long_about = "Ferry's developer tasks.\n\n\
        Start with `cargo xtask setup` (installs the eBPF toolchain and the test tools when \
        missing; needs root for apt), then `cargo xtask build-ebpf`, or run everything CI \
        runs with `cargo xtask test`. `cargo xtask demo` shows Ferry at work from a fresh \
        machine; `cargo xtask bench` measures what going through Ferry costs."
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install what building and testing needs, when missing (idempotent).
    ///
    /// The eBPF toolchain: the rust-src component, Debian's LLVM 22 packages
    /// (llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev) and bpf-linker
    /// 0.13 built against them. The runtime tools the tests and the demo use:
    /// iproute2 curl iperf3 wrk haproxy bpftool tshark. Each piece is checked
    /// first; apt-get runs only when a package is missing (and needs root).
    Setup(setup::SetupArgs),

    /// Build the eBPF programs (runs the eBPF part of setup first).
    ///
    /// Builds ebpf/programs with `RUSTC_BOOTSTRAP=1 cargo build -Z
    /// build-std=core --target bpfel-unknown-none --release` into
    /// <target>/ebpf, where <target> is $CARGO_TARGET_DIR or
    /// <workspace>/target. The object, target/ebpf/bpfel-unknown-none/release/ferry-ebpf,
    /// is what the agent embeds at build time. Host settings such as
    /// RUSTFLAGS are not passed to this build.
    BuildEbpf(ebpf::BuildEbpfArgs),

    /// Run the whole test suite, as CI does.
    ///
    /// Runs setup, build-ebpf, `cargo build --workspace --all-targets` (so
    /// the agent embeds the fresh object) and `cargo test --workspace`.
    /// With CI=true, tests that need root fail instead of skipping
    /// (FERRY_REQUIRE_ROOT_TESTS=1). Exits non-zero when any step fails.
    Test(test::TestArgs),

    /// Show Ferry at work, from a fresh machine (needs root).
    ///
    /// Runs setup, build-ebpf and a release build of ferry and ferry-testkit,
    /// then builds two nodes in network namespaces (node A: a client pod and
    /// three backend pods; node B: two backend pods; a veth link between
    /// them), starts Ferry on both with one CA (service 10.96.0.20:80 and
    /// [fd96::20]:80, backends weighted 60/30/10), opens N connections from
    /// the client pod to the service with curl and prints how they were
    /// split, then 100 over IPv6, one direct connection that bypasses Ferry,
    /// a failover, and a two-node scene: 200 connections to 10.96.0.30:80,
    /// split between node A's pod and node B's pods (through the mutual-TLS
    /// tunnel), with tshark on the node link showing that only TLS crossed
    /// and a random marker never did in clear. Then a few of Ferry's metrics.
    /// Everything is removed at the end, also on Ctrl-C.
    Demo(demo::DemoArgs),

    /// Measure what going through Ferry costs (needs root).
    ///
    /// Runs setup, build-ebpf and a release build, then on the local
    /// topology measures client pod -> server pod (a) directly and (b)
    /// through a service address captured by Ferry: iperf3 throughput,
    /// 64-byte request/response latency on one connection (p50..p99.9) and
    /// new connections per second. Prints a table with the ratio
    /// Ferry/direct and writes tests/bench/RESULTS.md (a --quick run writes a
    /// temporary file unless --write is given).
    Bench(bench::BenchArgs),

    /// Fuzz the inbound tunnel's request parsing briefly (cargo fuzz).
    ///
    /// Runs each target in agent/fuzz (`inbound_request`: CONNECT target
    /// parsing; `inbound_h2`: raw HTTP/2 from an authenticated peer into the
    /// inbound server) for its share of --seconds, with RUSTC_BOOTSTRAP=1.
    /// Installs cargo-fuzz when missing. `cargo xtask test` runs it with CI=true.
    Fuzz(fuzz::FuzzArgs),

    /// Cross-node benchmark: direct vs HBONE tunnel between the same pods
    /// (root).
    ///
    /// Throughput and p50/p99 round-trip latency, and new connections per
    /// second with pooling on and off; results in tests/bench/TUNNEL.md.
    BenchTunnel(bench_tunnel::BenchTunnelArgs),

    /// Steady load through Ferry for 10 minutes, its memory sampled (root).
    ///
    /// Connection churn, round trips on a long-lived connection and bulk
    /// bursts at fixed rates; fails when Ferry's resident memory grows more
    /// than --max-growth-kib after the warm-up or a client sees a failure.
    /// Writes tests/bench/SOAK.md (--quick: 20 s, a temporary file).
    Soak(soak::SoakArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Task::Setup(args) => setup::run(args).map(drop),
        Task::BuildEbpf(args) => ebpf::run(args).map(drop),
        Task::Test(args) => test::run(args),
        Task::Demo(args) => demo::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Fuzz(args) => fuzz::run(args),
        Task::BenchTunnel(args) => bench_tunnel::run(args),
        Task::Soak(args) => soak::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<demo::Interrupted>() => {
            eprintln!("interrupted: stopped and cleaned up");
            ExitCode::from(130)
        }
        Err(err) => {
            // Not `{err:?}`: with RUST_BACKTRACE set that adds a backtrace,
            // which says nothing useful about a failed install or build.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_extra_args_through() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--",
            "-p",
            "ferry-agent",
            "--",
            "--nocapture",
        ])
        .unwrap();
        let Task::Test(args) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!(
            args.cargo_test_args,
            ["-p", "ferry-agent", "--", "--nocapture"]
        );
    }

    #[test]
    fn fuzz_flags() {
        let cli = Cli::try_parse_from(["xtask", "fuzz", "--seconds", "5"]).unwrap();
        assert!(matches!(cli.command, Task::Fuzz(ref a) if a.seconds == 5 && a.target.is_none()));
        let cli = Cli::try_parse_from(["xtask", "fuzz"]).unwrap();
        assert!(matches!(cli.command, Task::Fuzz(ref a) if a.seconds == 20));
        assert!(Cli::try_parse_from(["xtask", "fuzz", "--target", "nope"]).is_err());
    }

    #[test]
    fn build_ebpf_flags() {
        let cli = Cli::try_parse_from(["xtask", "build-ebpf", "--debug"]).unwrap();
        assert!(matches!(cli.command, Task::BuildEbpf(ref a) if a.debug));
        let cli = Cli::try_parse_from(["xtask", "setup", "--ebpf-only", "--dry-run"]).unwrap();
        assert!(matches!(cli.command, Task::Setup(ref a) if a.ebpf_only && a.dry_run));
    }

    #[test]
    fn demo_and_bench_flags() {
        let cli = Cli::try_parse_from(["xtask", "demo"]).unwrap();
        assert!(
            matches!(cli.command, Task::Demo(ref a) if a.connections == 1000 && !a.keep_running)
        );
        let cli = Cli::try_parse_from(["xtask", "demo", "--connections", "50", "--keep-running"])
            .unwrap();
        assert!(matches!(cli.command, Task::Demo(ref a) if a.connections == 50 && a.keep_running));
        assert!(Cli::try_parse_from(["xtask", "demo", "--connections", "0"]).is_err());
        let cli = Cli::try_parse_from(["xtask", "bench", "--quick"]).unwrap();
        assert!(matches!(cli.command, Task::Bench(ref a) if a.quick && !a.write));
    }

    #[test]
    fn soak_defaults_match_the_command_line() {
        let cli = Cli::try_parse_from(["xtask", "soak"]).unwrap();
        let Task::Soak(a) = cli.command else {
            panic!("not the soak command");
        };
        let d = soak::SoakArgs::default();
        assert_eq!(
            (
                a.seconds,
                a.quick,
                a.write,
                a.conn_rate,
                a.rr_rate,
                a.max_growth_kib
            ),
            (
                d.seconds,
                d.quick,
                d.write,
                d.conn_rate,
                d.rr_rate,
                d.max_growth_kib
            )
        );
        let cli = Cli::try_parse_from(["xtask", "soak", "--quick"]).unwrap();
        assert!(matches!(cli.command, Task::Soak(ref a) if a.quick));
    }
}
