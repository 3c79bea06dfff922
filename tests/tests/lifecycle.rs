//! Ferry's life cycle as an operator sees it: start-up refusals that leave
//! nothing attached, SIGTERM drain (with and without hitting the deadline),
//! SIGHUP reload (good and bad files), the eBPF log switch, and the
//! readiness, liveness and metrics endpoints.
//! Needs root; fails (does not skip) when CI=true and it cannot run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferry_tests::{
    Ferry, Group, Pod, Topology, count_ids, ferry_binary, ferry_programs_on, metric_value,
    root_test_can_run, root_tests_required, testkit_binary, which,
};

const WAIT: Duration = Duration::from_secs(10);
const SERVICE: &str = r#"  - name: web
    addresses: [10.96.0.40, "fd96::40"]
    ports: [{ port: 80, target_port: 9000 }]
    endpoints:
      - { address: 10.77.1.11 }
"#;
const ACTIVE: &str = r#"ferry_connections_active{service="default/web"}"#;
const UP_BYTES: &str = r#"ferry_tcp_bytes_total{service="default/web",direction="upstream"}"#;

/// Root tests here also need bpftool (installed by `cargo xtask setup`).
fn can_run(test: &str) -> bool {
    if !root_test_can_run(test) {
        return false;
    }
    if which("bpftool").is_none() {
        if root_tests_required() {
            panic!("{test}: `bpftool` is not installed (run `cargo xtask setup`)");
        }
        eprintln!("SKIPPED {test}: `bpftool` is not installed (run `cargo xtask setup`)");
        return false;
    }
    true
}

/// Ferry's programs attached to the enrolled cgroup.
fn attached(t: &Topology) -> Result<Vec<String>> {
    let mut names = ferry_programs_on(&t.cgroup_path(Group::Enrolled))?;
    names.sort();
    Ok(names)
}

fn curl(t: &Topology, pod: &Pod, group: Group, url: &str) -> Result<String> {
    let curl = which("curl").context("curl")?;
    t.exec(
        &pod.netns,
        group,
        &curl,
        &["-sS", "--max-time", "20", "--connect-timeout", "5", url],
    )
}

/// A decoy answering on the VIPs themselves in the node namespace: a
/// connection that is not captured reaches it instead of the service.
fn start_decoy(t: &mut Topology, vips: &[&str]) -> Result<()> {
    for vip in vips {
        t.add_node_address(&format!("{vip}/32"))?;
    }
    let node = t.node_netns.clone();
    let kit = testkit_binary()?;
    t.spawn(
        "decoy",
        &node,
        Group::Other,
        &kit,
        &["serve", "--id", "decoy", "--listen", "0.0.0.0:80"],
    )?;
    t.wait_log("decoy", "listening", WAIT)
}

fn ferry_check(config: &Path) -> Result<(Option<i32>, String)> {
    let out = std::process::Command::new(ferry_binary()?)
        .args(["check", "--config"])
        .arg(config)
        .env("NO_COLOR", "1")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code(), text))
}

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/ferry.yaml")
}

// ---------------------------------------------------------------------------
// (a) Refusing to start.
// ---------------------------------------------------------------------------

/// One invalid configuration and what Ferry must say about it.
struct Bad {
    label: &'static str,
    yaml: String,
    /// `ferry run`'s exit code.
    run_code: i32,
    /// `ferry check`'s exit code: 2 for a file that is invalid in itself;
    /// 0 for one that is valid but names something this machine lacks
    /// (check validates the file and touches nothing, so it cannot know).
    check_code: i32,
    /// Every one must appear in stderr.
    says: Vec<String>,
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn bad_configs_exit_nonzero_and_attach_nothing() -> Result<()> {
    if !can_run("bad_configs_exit_nonzero_and_attach_nothing") {
        return Ok(());
    }
    let mut t = Topology::new("bad")?;
    let good = t.ferry_config(SERVICE);
    let edit = |from: &str, to: &str| -> String {
        assert!(good.contains(from), "{from:?} not in the config");
        good.replacen(from, to, 1)
    };
    let missing_cgroup = format!("{}/absent", t.enrolled_cgroup);
    let bads = vec![
        Bad {
            label: "zero-weight",
            yaml: edit(
                "{ address: 10.77.1.11 }",
                "{ address: 10.77.1.11, weight: 0 }",
            ),
            run_code: 2,
            check_code: 2,
            says: strings(&["services[0].endpoints[0].weight: must be greater than 0"]),
        },
        Bad {
            label: "unknown-field",
            yaml: edit("    ports:", "    colour: blue\n    ports:"),
            run_code: 2,
            check_code: 2,
            says: strings(&["services[0]", "unknown field `colour`"]),
        },
        Bad {
            label: "malformed",
            yaml: edit("drain_deadline: 5s", "drain_deadline: 5s: 6s"),
            run_code: 2,
            check_code: 2,
            says: strings(&[
                "malformed.yaml",
                "proxy",
                "mapping values are not allowed in this context at line",
            ]),
        },
        Bad {
            label: "v6-redirect-ipv4",
            yaml: edit("redirect_ipv4: 10.77.1.1", "redirect_ipv4: \"fd77:1::1\""),
            run_code: 2,
            check_code: 2,
            says: strings(&["capture.redirect_ipv4: must be an IPv4 address"]),
        },
        Bad {
            label: "missing-cgroup",
            yaml: edit(
                &format!("[\"{}\"]", t.enrolled_cgroup),
                &format!("[\"{}\", \"{missing_cgroup}\"]", t.enrolled_cgroup),
            ),
            run_code: 1,
            check_code: 0,
            says: strings(&["capture", &missing_cgroup, "does not exist"]),
        },
        Bad {
            label: "port-in-use",
            yaml: good.clone(),
            run_code: 1,
            check_code: 0,
            says: strings(&["cannot bind the outbound listener on [::]:15001", "in use"]),
        },
    ];

    for bad in &bads {
        // Another process already holds the outbound port.
        let blocker = bad.label == "port-in-use";
        if blocker {
            let node = t.node_netns.clone();
            let kit = testkit_binary()?;
            t.spawn(
                "blocker",
                &node,
                Group::Other,
                &kit,
                &["serve", "--id", "blocker", "--listen", "[::]:15001"],
            )?;
            t.wait_log("blocker", "listening", WAIT)?;
        }
        let out = t.run_ferry_expect_exit(bad.label, &bad.yaml, Duration::from_secs(20))?;
        if blocker {
            t.kill("blocker");
        }
        assert_eq!(
            out.code,
            Some(bad.run_code),
            "{}: ferry run exit code; stderr:\n{}",
            bad.label,
            out.stderr
        );
        for needle in &bad.says {
            assert!(
                out.stderr.contains(needle),
                "{}: stderr does not say {needle:?}:\n{}",
                bad.label,
                out.stderr
            );
        }
        assert!(
            !out.stderr.contains("ferry is serving") && !out.stderr.contains("capture attached"),
            "{}: {}",
            bad.label,
            out.stderr
        );
        assert_eq!(
            attached(&t)?,
            Vec::<String>::new(),
            "{}: programs left attached",
            bad.label
        );
        let (code, text) = ferry_check(&t.dir.join(format!("{}.yaml", bad.label)))?;
        assert_eq!(
            code,
            Some(bad.check_code),
            "{}: ferry check: {text}",
            bad.label
        );
        if bad.check_code == 2 {
            for needle in &bad.says {
                assert!(text.contains(needle), "{}: check: {text}", bad.label);
            }
        }
    }

    // The shipped example is valid.
    let (code, text) = ferry_check(&example_config())?;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(": ok ("), "{text}");

    // The attachment check sees Ferry's programs when they are there.
    let ferry = t.start_ferry("good", &good)?;
    assert_eq!(
        attached(&t)?,
        ["ferry_connect4", "ferry_connect6", "ferry_track_est"],
        "{}",
        ferry.log_text()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// (b), (c) SIGTERM.
// ---------------------------------------------------------------------------

/// Starts a `hold-client` from the enrolled client pod to the VIP and waits
/// until Ferry relays its first `send` bytes; returns the release file.
fn hold_connection(t: &mut Topology, ferry: &Ferry, client: &Pod, send: u64) -> Result<PathBuf> {
    let release = t.dir.join("release");
    let kit = testkit_binary()?;
    let send = send.to_string();
    let release_s = release.to_str().context("path")?.to_owned();
    t.spawn(
        "hold",
        &client.netns.clone(),
        Group::Enrolled,
        &kit,
        &[
            "hold-client",
            "--connect",
            "10.96.0.40:80",
            "--send",
            &send,
            "--release",
            &release_s,
            "--max-wait",
            "30",
        ],
    )?;
    t.wait_log("hold", "holding", WAIT)?;
    ferry.wait_metric(ACTIVE, 1.0, WAIT)?;
    ferry.wait_metric(UP_BYTES, send.parse()?, WAIT)?;
    Ok(release)
}

#[test]
fn sigterm_drains_open_connections_then_detaches() -> Result<()> {
    if !can_run("sigterm_drains_open_connections_then_detaches") {
        return Ok(());
    }
    let mut t = Topology::new("drn")?;
    let client = t.add_pod("cli", 10)?;
    let backend = t.add_pod("be", 11)?;
    t.start_server(
        &backend,
        9000,
        "be",
        &["--mode", "drain-then-reply", "--reply-bytes", "1048576"],
    )?;
    start_decoy(&mut t, &["10.96.0.40"])?;
    let cfg = t.ferry_config(SERVICE);
    assert!(cfg.contains("drain_deadline: 5s"));
    let ferry = t.start_ferry("ferry", &cfg)?;
    assert_eq!(
        attached(&t)?,
        ["ferry_connect4", "ferry_connect6", "ferry_track_est"]
    );

    let release = hold_connection(&mut t, &ferry, &client, 65536)?;
    let sent = Instant::now();
    ferry.signal(libc::SIGTERM)?;
    // Not ready any more, and no longer accepting, while the open connection
    // is still being served.
    ferry.wait_status("15021", "/ready", 503, WAIT)?;
    ferry.wait_log_count("waiting for open connections", 1, WAIT)?;
    assert!(ferry.log_text().contains("open=1"), "{}", ferry.log_text());
    // A new captured connection is still redirected (capture stays until
    // the end) but finds the outbound listener closed: refused at once.
    let refused = curl(&t, &client, Group::Enrolled, "http://10.96.0.40/");
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("curl: (7)")),
        "a new captured connection during drain must be refused: {refused:?}"
    );
    assert_eq!(
        ferry.http("15021", "/healthz")?.0,
        200,
        "alive while draining"
    );

    // Let the held connection finish its exchange: it completes in full.
    std::fs::write(&release, "go")?;
    assert_eq!(
        t.wait_exit("hold", WAIT)?,
        Some(0),
        "{}",
        t.log_text("hold")
    );
    assert_eq!(
        t.log_text("hold").lines().last().unwrap_or(""),
        "header=got=65536 received=1048576 pattern_ok=true end=eof",
        "{}",
        t.log_text("hold")
    );

    // Ferry exits 0 as soon as it is drained, well within the deadline.
    assert_eq!(
        t.wait_exit("ferry", Duration::from_secs(5))?,
        Some(0),
        "{}",
        ferry.log_text()
    );
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(5), "drain took {took:?}");
    let log = ferry.log_text();
    assert!(!log.contains("drain deadline reached"), "{log}");
    assert!(log.contains("ending=Clean"), "{log}");
    assert!(log.contains("capture detached"), "{log}");

    // Capture is gone: nothing attached, and the pod reaches the VIP itself.
    assert_eq!(attached(&t)?, Vec::<String>::new());
    let direct = curl(&t, &client, Group::Enrolled, "http://10.96.0.40/")?;
    assert!(direct.contains("id=decoy"), "{direct}");
    Ok(())
}

#[test]
fn drain_deadline_closes_stuck_connections() -> Result<()> {
    if !can_run("drain_deadline_closes_stuck_connections") {
        return Ok(());
    }
    let mut t = Topology::new("ddl")?;
    let client = t.add_pod("cli", 10)?;
    let backend = t.add_pod("be", 11)?;
    // The backend acknowledges, then waits for the client forever (and
    // reports how the connection ended).
    t.start_server(&backend, 9000, "be", &["--mode", "report"])?;
    let cfg = t
        .ferry_config(SERVICE)
        .replace("drain_deadline: 5s", "drain_deadline: 1s");
    let ferry = t.start_ferry("ferry", &cfg)?;

    // Never released: only the deadline ends it. The backend's `ack` has
    // gone back to the client before the drain starts.
    hold_connection(&mut t, &ferry, &client, 1000)?;
    ferry.wait_metric(
        r#"ferry_tcp_bytes_total{service="default/web",direction="downstream"}"#,
        4.0,
        WAIT,
    )?;
    let sent = Instant::now();
    ferry.signal(libc::SIGTERM)?;
    assert_eq!(
        t.wait_exit("ferry", Duration::from_secs(10))?,
        Some(0),
        "{}",
        ferry.log_text()
    );
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "exit after {took:?} with a 1s deadline"
    );
    let log = ferry.log_text();
    assert!(log.contains("drain deadline reached"), "{log}");
    assert!(log.contains("ending=Aborted"), "{log}");
    assert!(log.contains("capture detached"), "{log}");

    // Both ends learn that the connection was cut, not finished: a reset,
    // never a clean end of stream.
    t.wait_log("hold", "closed-while-held", WAIT)?;
    let held = t.log_text("hold");
    assert!(held.contains("received=4 end=reset"), "client: {held}");
    t.wait_log("server-be", "ended ", WAIT)?;
    let server = t.log_text("server-be");
    assert!(server.contains("bytes=1000 end=reset"), "backend: {server}");
    assert_eq!(attached(&t)?, Vec::<String>::new());
    Ok(())
}

// ---------------------------------------------------------------------------
// (d) SIGHUP.
// ---------------------------------------------------------------------------

fn reload_service(endpoints: &str) -> String {
    format!(
        "  - name: app\n    addresses: [10.96.0.50, 10.96.0.51]\n    ports: [{{ port: 80, target_port: 8080 }}]\n    balancing: {{ algorithm: round_robin }}\n    endpoints:\n{endpoints}"
    )
}

#[test]
fn sighup_reloads_services_and_rejects_bad_files() -> Result<()> {
    if !root_test_can_run("sighup_reloads_services_and_rejects_bad_files") {
        return Ok(());
    }
    let mut t = Topology::new("hup")?;
    let client = t.add_pod("cli", 10)?;
    let b1 = t.add_pod("b1", 11)?;
    let b2 = t.add_pod("b2", 12)?;
    t.start_server(&b1, 8080, "b1", &[])?;
    t.start_server(&b2, 8080, "b2", &[])?;
    let v1 = t.ferry_config(&reload_service("      - { address: 10.77.1.11 }\n"));
    let ferry = t.start_ferry("ferry", &v1)?;
    let ids = count_ids(&curl(
        &t,
        &client,
        Group::Enrolled,
        "http://10.96.0.50/[1-20]",
    )?);
    assert_eq!(ids.get("b1"), Some(&20), "{ids:?}");
    assert_eq!(ids.len(), 1, "{ids:?}");

    // New endpoints and weights: b1 1, b2 3.
    let v2 = t.ferry_config(&reload_service(
        "      - { address: 10.77.1.11, weight: 1 }\n      - { address: 10.77.1.12, weight: 3 }\n",
    ));
    std::fs::write(&ferry.config, &v2)?;
    ferry.signal(libc::SIGHUP)?;
    ferry.wait_log_count("configuration reloaded", 1, WAIT)?;
    let ids = count_ids(&curl(
        &t,
        &client,
        Group::Enrolled,
        "http://10.96.0.50/[1-400]",
    )?);
    assert_eq!(
        (ids.get("b1"), ids.get("b2")),
        (Some(&100), Some(&300)),
        "new connections follow the new weights exactly over whole cycles: {ids:?}"
    );

    // An invalid file is rejected, logged with its reason, and the last good
    // configuration keeps serving.
    let bad = v2.replace("weight: 3", "weight: 0");
    std::fs::write(&ferry.config, &bad)?;
    ferry.signal(libc::SIGHUP)?;
    ferry.wait_log_count("reload rejected", 1, WAIT)?;
    let log = ferry.log_text();
    assert!(
        log.contains("services[0].endpoints[1].weight: must be greater than 0"),
        "{log}"
    );
    assert_eq!(ferry.http("15021", "/ready")?.0, 200);
    let ids = count_ids(&curl(
        &t,
        &client,
        Group::Enrolled,
        "http://10.96.0.51/[1-40]",
    )?);
    assert_eq!(
        (ids.get("b1"), ids.get("b2")),
        (Some(&10), Some(&30)),
        "still the last good configuration: {ids:?}"
    );
    assert_eq!(
        ferry.metric(r#"ferry_connections_opened_total{service="default/app"}"#)?,
        460.0
    );
    assert_eq!(
        ferry.log_text().matches("configuration reloaded").count(),
        1
    );
    Ok(())
}

#[test]
fn sighup_reload_captures_added_and_releases_removed_addresses() -> Result<()> {
    if !root_test_can_run("sighup_reload_captures_added_and_releases_removed_addresses") {
        return Ok(());
    }
    let mut t = Topology::new("hup2")?;
    let client = t.add_pod("cli", 10)?;
    let b1 = t.add_pod("b1", 11)?;
    t.start_server(&b1, 8080, "b1", &[])?;
    start_decoy(&mut t, &["10.96.0.50", "10.96.0.52"])?;
    let svc = |addrs: &str| {
        format!(
            "  - name: app\n    addresses: [{addrs}]\n    ports: [{{ port: 80, target_port: 8080 }}]\n    endpoints: [{{ address: 10.77.1.11 }}]\n"
        )
    };
    let ferry = t.start_ferry("ferry", &t.ferry_config(&svc("10.96.0.50")))?;
    // Not a service address yet: reaches the decoy.
    let out = curl(&t, &client, Group::Enrolled, "http://10.96.0.52/")?;
    assert!(out.contains("id=decoy"), "{out}");
    let out = curl(&t, &client, Group::Enrolled, "http://10.96.0.50/")?;
    assert!(out.contains("id=b1"), "{out}");

    std::fs::write(&ferry.config, t.ferry_config(&svc("10.96.0.52")))?;
    ferry.signal(libc::SIGHUP)?;
    ferry.wait_log_count("configuration reloaded", 1, WAIT)?;
    let out = curl(&t, &client, Group::Enrolled, "http://10.96.0.52/")?;
    assert!(out.contains("id=b1"), "added address is captured: {out}");
    // The removed address is no longer captured: it reaches the decoy.
    let gone = curl(&t, &client, Group::Enrolled, "http://10.96.0.50/")?;
    assert!(
        gone.contains("id=decoy"),
        "removed address is released: {gone}"
    );
    assert_eq!(
        ferry.metric(r#"ferry_connections_opened_total{service="default/app"}"#)?,
        2.0
    );
    assert_eq!(
        ferry.metric(r#"ferry_ebpf_events_total{program="connect4",event="redirected"}"#)?,
        2.0
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// (e) eBPF log, (f) admin endpoints.
// ---------------------------------------------------------------------------

fn ebpf_log(name: &str, on: bool) -> Result<(Topology, Ferry)> {
    let mut t = Topology::new(name)?;
    let client = t.add_pod("cli", 10)?;
    let backend = t.add_pod("be", 11)?;
    t.start_server(&backend, 9000, "be", &[])?;
    let mut cfg = t.ferry_config(SERVICE);
    if on {
        cfg = cfg.replace("proxy:\n", "  ebpf_log: true\nproxy:\n");
        assert!(cfg.contains("ebpf_log: true"));
    }
    let ferry = t.start_ferry("ferry", &cfg)?;
    let out4 = curl(&t, &client, Group::Enrolled, "http://10.96.0.40/")?;
    let out6 = curl(&t, &client, Group::Enrolled, "http://[fd96::40]/")?;
    assert!(
        out4.contains("id=be") && out6.contains("id=be"),
        "{out4}{out6}"
    );
    ferry.wait_log_count("connection closed", 2, WAIT)?;
    Ok((t, ferry))
}

#[test]
fn ebpf_log_on_shows_redirects() -> Result<()> {
    if !root_test_can_run("ebpf_log_on_shows_redirects") {
        return Ok(());
    }
    let (_t, ferry) = ebpf_log("elon", true)?;
    ferry.wait_log_count("connect4 redirected", 1, WAIT)?;
    ferry.wait_log_count("connect6 redirected", 1, WAIT)?;
    let log = ferry.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("connect4 redirected"))
        .unwrap_or("");
    assert!(
        line.contains("cookie=") && line.contains("port=80"),
        "{line}"
    );
    Ok(())
}

#[test]
fn ebpf_log_off_by_default() -> Result<()> {
    if !root_test_can_run("ebpf_log_off_by_default") {
        return Ok(());
    }
    let (_t, ferry) = ebpf_log("eloff", false)?;
    let log = ferry.log_text();
    assert!(!log.contains("redirected"), "{log}");
    // Redirects happened; they were just not logged.
    let m = ferry.metrics()?;
    for program in ["connect4", "connect6"] {
        assert_eq!(
            metric_value(
                &m,
                &format!(r#"ferry_ebpf_events_total{{program="{program}",event="redirected"}}"#)
            ),
            1.0,
            "{m}"
        );
    }
    Ok(())
}

#[test]
fn readiness_liveness_and_metrics() -> Result<()> {
    if !root_test_can_run("readiness_liveness_and_metrics") {
        return Ok(());
    }
    let mut t = Topology::new("adm")?;
    let ferry = t.start_ferry("ferry", &t.ferry_config(SERVICE))?;
    let (code, body) = ferry.http("15021", "/ready")?;
    assert_eq!((code, body.trim()), (200, "ready"));
    let (code, body) = ferry.http("15021", "/healthz")?;
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, _) = ferry.http("15021", "/nope")?;
    assert_eq!(code, 404);
    let m = ferry.metrics()?;
    for needle in [
        "# TYPE ferry_ebpf_events counter",
        r#"ferry_ebpf_events_total{program="connect4",event="redirected"} 0"#,
        r#"ferry_ebpf_events_total{program="sock_ops",event="recorded"} 0"#,
    ] {
        assert!(m.contains(needle), "/metrics lacks {needle:?}:\n{m}");
    }
    if !m.contains(&format!("node=\"{}\"", t.name)) {
        bail!("/metrics does not name the node:\n{m}");
    }
    Ok(())
}
