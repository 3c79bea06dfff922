//! Ferry's integration harness: a node in a network namespace, pods in their
//! own network namespaces joined to the node's bridge by veth pairs, an
//! enrolled cgroup for captured pods and a non-enrolled one, and helpers to
//! run real processes (Ferry, servers, curl) inside them.
//!
//! Everything a [`Topology`] creates is named after it and removed when it is
//! dropped (also on panic): processes are killed, namespaces deleted,
//! cgroups removed. Addresses live only inside the namespaces it made:
//! the node bridge is `10.77.1.1/24` and `fd77:1::1/64`; pods get
//! `10.77.1.N` / `fd77:1::N`. Two topologies never see each other, so tests
//! can run in parallel.
//!
//! [`Topology::add_second_node`] adds node B: its own namespace, bridge
//! `10.77.2.1/24` (`fd77:2::1/64`, pods `10.77.2.N`) and cgroups, joined to
//! node A by a veth pair (`n2` in A with `10.77.0.1/24` and `fd77::1/64`,
//! `n1` in B with `10.77.0.2/24` and `fd77::2/64`), with routes to each
//! other's pod subnets (both families) and forwarding on, like two
//! dual-stack machines on one L2 segment.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod fake_api;
pub mod mesh;

pub use mesh::{HBONE_PORT, LinkCapture, LinkReport, marker};

/// Node address on the pod bridge (IPv4).
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
/// Node address on the pod bridge (IPv6).
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1);
/// Node A's address on the node-to-node link.
pub const LINK_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Node B's address on the node-to-node link.
pub const LINK_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Node A's end of the node-to-node link (in node A's namespace).
pub const LINK_IFACE_A: &str = "n2";
/// Node A's IPv6 address on the node-to-node link.
pub const LINK_A_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
/// Node B's IPv6 address on the node-to-node link.
pub const LINK_B_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);

/// Why a root test cannot run here, or `None` when it can.
pub fn root_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    for tool in ["ip", "nsenter", "curl"] {
        if which(tool).is_none() {
            return Some(format!(
                "`{tool}` is not installed (run `cargo xtask setup`)"
            ));
        }
    }
    if cgroup2_mount().is_err() {
        return Some("no cgroup2 mount".into());
    }
    match ferry_binary() {
        Ok(bin) => {
            let out = Command::new(&bin).arg("version").output();
            match out {
                Ok(o) if String::from_utf8_lossy(&o.stdout).contains("eBPF object embedded") => {}
                Ok(_) => {
                    return Some(format!(
                        "{} was built without its eBPF object (run `cargo xtask build-ebpf` and rebuild)",
                        bin.display()
                    ));
                }
                Err(e) => return Some(format!("cannot run {}: {e}", bin.display())),
            }
        }
        Err(e) => return Some(e.to_string()),
    }
    None
}

/// True when root tests must run (CI or explicitly required): then a missing
/// capability fails the test instead of skipping it.
pub fn root_tests_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("FERRY_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1")
}

/// Call first in every root test: returns false (and says why) when the test
/// should be skipped, panics when it cannot run but is required to.
pub fn root_test_can_run(test: &str) -> bool {
    match root_unavailable() {
        None => true,
        Some(why) if root_tests_required() => {
            panic!("{test}: required root/eBPF test cannot run: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why} (set CI=true to make this a failure)");
            false
        }
    }
}

/// Finds a program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    Ok(ferry::capture::cgroup2_mount()?)
}

/// The `ferry` binary of this build: `$FERRY_BIN`, or `ferry` in the target
/// directory this test binary was built in.
pub fn ferry_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>  or  target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("ferry");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "cannot find the ferry binary near {} (build it with `cargo build -p ferry-agent`, or set FERRY_BIN)",
        exe.display()
    )
}

/// The `xtask` binary (`cargo xtask`), for tests that run a task such as
/// the demo: `$FERRY_XTASK`, or `xtask` in the target directory this binary
/// was built in (`cargo xtask test` builds it first, as does any `cargo
/// xtask` command).
pub fn xtask_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_XTASK") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("xtask");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "cannot find the xtask binary near {} (build it with `cargo build -p xtask`, or set FERRY_XTASK)",
        exe.display()
    )
}

/// The `ferry-testkit` binary (servers and clients for tests):
/// `$FERRY_TESTKIT`, or the one cargo built alongside, or `ferry-testkit` in
/// the target directory this binary was built in.
pub fn testkit_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_TESTKIT") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_ferry-testkit") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("ferry-testkit");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "cannot find ferry-testkit near {} (build it with `cargo build -p ferry-tests`, or set FERRY_TESTKIT)",
        exe.display()
    )
}

/// Reads a child's pipe to the end on a thread.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs a command to completion; fails with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sets sysctls (`key=value`) inside network namespace `netns`.
pub fn sysctl(netns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", netns, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    run("ip", &args).map(drop)
}

/// For load runs with tens of thousands of short connections to one server
/// port within TIME_WAIT's minute: a wide ephemeral port range and TIME_WAIT
/// reuse in each namespace that connects (the client's; the node's, where a
/// proxy connects onward). Otherwise every connecting side soon spends its
/// CPU searching for a free port.
pub fn tune_for_connection_churn(netns: &[&str]) -> Result<()> {
    for ns in netns {
        sysctl(
            ns,
            &[
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        )?;
    }
    Ok(())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A pod: a network namespace with one interface on the node's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// Where a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// The cgroup Ferry enrolls (captured).
    Enrolled,
    /// A cgroup Ferry does not enroll.
    Other,
}

/// One node with pods, in network namespaces, and its cgroups.
#[derive(Debug)]
pub struct Topology {
    pub name: String,
    pub node_netns: String,
    /// Relative to the cgroup2 mount: what Ferry's config names.
    pub enrolled_cgroup: String,
    pub cgroup_root: PathBuf,
    pub dir: PathBuf,
    pods: Vec<Pod>,
    children: Vec<(String, Child)>,
    netns: Vec<String>,
    /// Node B, once added.
    pub node_b: Option<NodeB>,
}

/// The second node of a two-node topology.
#[derive(Debug, Clone)]
pub struct NodeB {
    pub netns: String,
    /// Node B's bridge address (its pods' gateway).
    pub bridge_v4: Ipv4Addr,
}

impl Topology {
    /// Creates the node namespace with its bridge and the two cgroups.
    /// `name` must be short (it prefixes interface names) and unique among
    /// topologies alive at once.
    pub fn new(name: &str) -> Result<Topology> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("{name}{}-{n}", std::process::id() % 10000);
        let mount = cgroup2_mount()?;
        let rel = format!("ferry-test/{name}");
        let cgroup_root = mount.join(&rel);
        let dir = std::env::temp_dir().join(format!("ferry-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut t = Topology {
            node_netns: format!("{name}-node"),
            enrolled_cgroup: format!("{rel}/pods"),
            cgroup_root,
            dir,
            name,
            pods: Vec::new(),
            children: Vec::new(),
            netns: Vec::new(),
            node_b: None,
        };
        // Clean leftovers of a crashed run with the same name.
        let _ = run("ip", &["netns", "del", &t.node_netns]);
        run("ip", &["netns", "add", &t.node_netns])?;
        t.netns.push(t.node_netns.clone());
        let node = t.node_netns.clone();
        run("ip", &["-n", &node, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        run(
            "ip",
            &["-n", &node, "addr", "add", "10.77.1.1/24", "dev", "br0"],
        )?;
        run(
            "ip",
            &[
                "-n",
                &node,
                "addr",
                "add",
                "fd77:1::1/64",
                "dev",
                "br0",
                "nodad",
            ],
        )?;
        run("ip", &["-n", &node, "link", "set", "br0", "up"])?;
        std::fs::create_dir_all(t.cgroup_root.join("pods"))?;
        std::fs::create_dir_all(t.cgroup_root.join("other"))?;
        Ok(t)
    }

    /// Adds node B (see the module docs); the existing node is node A.
    pub fn add_second_node(&mut self) -> Result<NodeB> {
        if let Some(b) = &self.node_b {
            return Ok(b.clone());
        }
        let netns = format!("{}-nodeb", self.name);
        let _ = run("ip", &["netns", "del", &netns]);
        run("ip", &["netns", "add", &netns])?;
        self.netns.push(netns.clone());
        let a = self.node_netns.clone();
        let b = netns.clone();
        run("ip", &["-n", &b, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &b, "link", "add", "br0", "type", "bridge"])?;
        run(
            "ip",
            &["-n", &b, "addr", "add", "10.77.2.1/24", "dev", "br0"],
        )?;
        run(
            "ip",
            &[
                "-n",
                &b,
                "addr",
                "add",
                "fd77:2::1/64",
                "dev",
                "br0",
                "nodad",
            ],
        )?;
        run("ip", &["-n", &b, "link", "set", "br0", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &a,
                "link",
                "add",
                LINK_IFACE_A,
                "type",
                "veth",
                "peer",
                "name",
                "n1",
                "netns",
                &b,
            ],
        )?;
        run(
            "ip",
            &["-n", &a, "addr", "add", "10.77.0.1/24", "dev", LINK_IFACE_A],
        )?;
        run(
            "ip",
            &["-n", &b, "addr", "add", "10.77.0.2/24", "dev", "n1"],
        )?;
        for (ns, dev, addr) in [
            (&a, LINK_IFACE_A, format!("{LINK_A_V6}/64")),
            (&b, "n1", format!("{LINK_B_V6}/64")),
        ] {
            run("ip", &["-n", ns, "addr", "add", &addr, "dev", dev, "nodad"])?;
        }
        run("ip", &["-n", &a, "link", "set", LINK_IFACE_A, "up"])?;
        run("ip", &["-n", &b, "link", "set", "n1", "up"])?;
        run(
            "ip",
            &["-n", &a, "route", "add", "10.77.2.0/24", "via", "10.77.0.2"],
        )?;
        run(
            "ip",
            &["-n", &b, "route", "add", "10.77.1.0/24", "via", "10.77.0.1"],
        )?;
        let (a6, b6) = (LINK_A_V6.to_string(), LINK_B_V6.to_string());
        run(
            "ip",
            &["-n", &a, "-6", "route", "add", "fd77:2::/64", "via", &b6],
        )?;
        run(
            "ip",
            &["-n", &b, "-6", "route", "add", "fd77:1::/64", "via", &a6],
        )?;
        for ns in [&a, &b] {
            sysctl(
                ns,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            )?;
        }
        let nb = NodeB {
            netns,
            bridge_v4: Ipv4Addr::new(10, 77, 2, 1),
        };
        self.node_b = Some(nb.clone());
        Ok(nb)
    }

    /// Adds a pod with host number `host` (2..=250): `10.77.1.host`.
    pub fn add_pod(&mut self, name: &str, host: u8) -> Result<Pod> {
        let node = self.node_netns.clone();
        self.add_pod_on(&node, 1, name, host)
    }

    /// Adds a pod on node B (after [`Topology::add_second_node`]):
    /// `10.77.2.host`.
    pub fn add_pod_b(&mut self, name: &str, host: u8) -> Result<Pod> {
        let node = self
            .node_b
            .as_ref()
            .context("add_second_node first")?
            .netns
            .clone();
        self.add_pod_on(&node, 2, name, host)
    }

    fn add_pod_on(&mut self, node: &str, subnet: u8, name: &str, host: u8) -> Result<Pod> {
        let netns = format!("{}-{name}", self.name);
        let _ = run("ip", &["netns", "del", &netns]);
        run("ip", &["netns", "add", &netns])?;
        self.netns.push(netns.clone());
        let node = node.to_owned();
        let veth = format!("v{host}");
        let v4 = Ipv4Addr::new(10, 77, subnet, host);
        let v6 = Ipv6Addr::new(0xfd77, u16::from(subnet), 0, 0, 0, 0, 0, u16::from(host));
        let gw4 = format!("10.77.{subnet}.1");
        let gw6 = format!("fd77:{subnet}::1");
        run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n", &node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &netns,
            ],
        )?;
        run(
            "ip",
            &["-n", &node, "link", "set", &veth, "master", "br0", "up"],
        )?;
        run(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                "eth0",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
        run(
            "ip",
            &["-n", &netns, "route", "add", "default", "via", &gw4],
        )?;
        run(
            "ip",
            &["-n", &netns, "-6", "route", "add", "default", "via", &gw6],
        )?;
        let pod = Pod {
            name: name.into(),
            netns,
            v4,
            v6,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Adds an address to the node namespace's loopback (e.g. a service VIP
    /// that a decoy server answers on, to show what is *not* captured).
    pub fn add_node_address(&self, cidr: &str) -> Result<()> {
        let mut args = vec!["-n", &self.node_netns, "addr", "add", cidr, "dev", "lo"];
        if cidr.contains(':') {
            args.push("nodad");
        }
        run("ip", &args)?;
        Ok(())
    }

    fn cgroup_dir(&self, group: Group) -> PathBuf {
        match group {
            Group::Enrolled => self.cgroup_root.join("pods"),
            Group::Other => self.cgroup_root.join("other"),
        }
    }

    /// A command that runs `program args` in `netns` and in `group`'s cgroup.
    pub fn command(&self, netns: &str, group: Group, program: &Path, args: &[&str]) -> Command {
        self.command_in(netns, &self.cgroup_dir(group), program, args)
    }

    /// Runs a command to completion in `netns` and in the cgroup directory
    /// `cgroup` (absolute); returns stdout.
    pub fn exec_in(
        &self,
        netns: &str,
        cgroup: &Path,
        program: &Path,
        args: &[&str],
    ) -> Result<String> {
        let out = self
            .command_in(netns, cgroup, program, args)
            .output()
            .with_context(|| format!("running {} in {netns}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} {} in {netns} failed ({}): {}",
                program.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A command that runs `program args` in `netns` and in the cgroup
    /// directory `cgroup` (absolute).
    pub fn command_in(&self, netns: &str, cgroup: &Path, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        // Join the cgroup first, then enter the network namespace (nsenter
        // keeps the mount namespace, so the cgroup2 mount stays visible; `ip
        // netns exec` would remount /sys and hide it).
        c.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec nsenter --net="/run/netns/$1" "${@:2}""#)
            .arg(cgroup)
            .arg(netns)
            .arg(program)
            .args(args);
        c
    }

    /// Runs a command to completion inside a pod/cgroup; returns stdout.
    pub fn exec(&self, netns: &str, group: Group, program: &Path, args: &[&str]) -> Result<String> {
        let out = self
            .command(netns, group, program, args)
            .output()
            .with_context(|| format!("running {} in {netns}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} {} in {netns} failed ({}): {}",
                program.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Like [`Topology::exec`], but bounded: the process is killed and an
    /// error returned when it runs longer than `timeout`, or as soon as
    /// `stop` is set (e.g. by a signal handler).
    pub fn exec_bounded(
        &self,
        netns: &str,
        group: Group,
        program: &Path,
        args: &[&str],
        timeout: Duration,
        stop: Option<&AtomicBool>,
    ) -> Result<String> {
        let what = || format!("{} {} in {netns}", program.display(), args.join(" "));
        let mut child = self
            .command(netns, group, program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", what()))?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let start = Instant::now();
        let gave_up = loop {
            if let Some(status) = child.try_wait()? {
                break Ok(status);
            }
            if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                break Err(format!("{} stopped (interrupted)", what()));
            }
            if start.elapsed() > timeout {
                break Err(format!("{} did not finish within {timeout:?}", what()));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if gave_up.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = stdout.join().unwrap_or_default();
        let err = stderr.join().unwrap_or_default();
        let err = String::from_utf8_lossy(&err);
        match gave_up {
            Err(why) => bail!("{why}: {}", err.trim()),
            Ok(status) if !status.success() => {
                bail!("{} failed ({status}): {}", what(), err.trim())
            }
            Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
        }
    }

    /// Starts a long-running process; it is killed when the topology drops.
    /// Its stdout and stderr go to `<dir>/<label>.log`.
    pub fn spawn(
        &mut self,
        label: &str,
        netns: &str,
        group: Group,
        program: &Path,
        args: &[&str],
    ) -> Result<u32> {
        let log = std::fs::File::create(self.dir.join(format!("{label}.log")))?;
        let child = self
            .command(netns, group, program, args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {label}"))?;
        let pid = child.id();
        self.children.push((label.to_owned(), child));
        Ok(pid)
    }

    /// Starts an HTTP test server (`ferry-testkit serve`) in a pod, outside
    /// the enrolled cgroup, and waits until it accepts connections.
    pub fn start_server(&mut self, pod: &Pod, port: u16, id: &str, extra: &[&str]) -> Result<()> {
        let kit = testkit_binary()?;
        let listen = format!("[::]:{port}");
        let mut args = vec!["serve", "--id", id, "--listen", &listen];
        args.extend_from_slice(extra);
        let label = format!("server-{id}");
        self.spawn(&label, &pod.netns.clone(), Group::Other, &kit, &args)?;
        self.wait_log(&label, "listening", Duration::from_secs(10))
    }

    /// The most recent child process started with `label`.
    fn child(&mut self, label: &str) -> Option<&mut Child> {
        self.children
            .iter_mut()
            .rev()
            .find(|(l, _)| l == label)
            .map(|(_, c)| c)
    }

    /// How the child labelled `label` ended, if it has.
    fn exited(&mut self, label: &str) -> Option<std::process::ExitStatus> {
        self.child(label)?.try_wait().ok().flatten()
    }

    /// Waits until `<label>.log` contains `needle` (the process says it is
    /// ready), failing early if the process exits.
    pub fn wait_log(&mut self, label: &str, needle: &str, timeout: Duration) -> Result<()> {
        let path = self.dir.join(format!("{label}.log"));
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.exited(label) {
                bail!("{label} exited ({status}) before it was ready:\n{text}");
            }
            if start.elapsed() > timeout {
                bail!("{label} not ready after {timeout:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes a Ferry config for this topology and starts Ferry in the node
    /// namespace; returns when Ferry reports ready on its readiness port.
    pub fn start_ferry(&mut self, label: &str, config_yaml: &str) -> Result<Ferry> {
        self.start_ferry_env(label, config_yaml, &[])
    }

    /// [`Topology::start_ferry`] with extra environment variables.
    pub fn start_ferry_env(
        &mut self,
        label: &str,
        config_yaml: &str,
        env: &[(&str, &str)],
    ) -> Result<Ferry> {
        let node = self.node_netns.clone();
        self.start_ferry_in_env(&node, label, config_yaml, env)
    }

    /// [`Topology::start_ferry`] in another node's namespace (node B's).
    pub fn start_ferry_in(
        &mut self,
        node_netns: &str,
        label: &str,
        config_yaml: &str,
    ) -> Result<Ferry> {
        self.start_ferry_in_env(node_netns, label, config_yaml, &[])
    }

    /// [`Topology::start_ferry_in`] with extra environment variables.
    pub fn start_ferry_in_env(
        &mut self,
        node_netns: &str,
        label: &str,
        config_yaml: &str,
        env: &[(&str, &str)],
    ) -> Result<Ferry> {
        let path = self.dir.join(format!("{label}.yaml"));
        std::fs::write(&path, config_yaml)?;
        let bin = ferry_binary()?;
        let log = std::fs::File::create(self.dir.join(format!("{label}.log")))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node_netns}"))
            .arg(&bin)
            .args(["run", "--config"])
            .arg(&path)
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_LOG").unwrap_or("info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ferry")?;
        let pid = child.id();
        self.children.push((label.to_owned(), child));
        let ready_port = readiness_port(config_yaml)?;
        let ferry = Ferry {
            label: label.to_owned(),
            pid,
            node_netns: node_netns.to_owned(),
            log: self.dir.join(format!("{label}.log")),
            config: path,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited(label) {
                bail!(
                    "ferry exited ({status}) during start-up:\n{}",
                    ferry.log_text()
                );
            }
            if ferry
                .http(&ready_port, "/ready")
                .is_ok_and(|(code, _)| code == 200)
            {
                return Ok(ferry);
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "ferry not ready after 20s (/ready on port {ready_port}):\n{}",
                    ferry.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The absolute path of `group`'s cgroup directory.
    pub fn cgroup_path(&self, group: Group) -> PathBuf {
        self.cgroup_dir(group)
    }

    /// What a labelled process has written so far (`<dir>/<label>.log`).
    pub fn log_text(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default()
    }

    /// Writes `config_yaml` and runs `ferry run` with it in the node
    /// namespace, expecting it to exit by itself (a configuration or start-up
    /// error). Fails if it is still running after `timeout` (it is killed).
    pub fn run_ferry_expect_exit(
        &self,
        label: &str,
        config_yaml: &str,
        timeout: Duration,
    ) -> Result<Exited> {
        let path = self.dir.join(format!("{label}.yaml"));
        std::fs::write(&path, config_yaml)?;
        let bin = ferry_binary()?;
        let out_path = self.dir.join(format!("{label}.out"));
        let err_path = self.dir.join(format!("{label}.log"));
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_netns))
            .arg(&bin)
            .args(["run", "--config"])
            .arg(&path)
            .env("FERRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()
            .context("starting ferry")?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "ferry ({label}) still running after {timeout:?}:\n{}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Exited {
            code: status.code(),
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        })
    }

    /// Waits for a child process to exit and returns its exit code.
    pub fn wait_exit(&mut self, label: &str, timeout: Duration) -> Result<Option<i32>> {
        let start = Instant::now();
        loop {
            let Some(child) = self.child(label) else {
                bail!("no process labelled {label}");
            };
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if start.elapsed() > timeout {
                bail!("{label} still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a process directly in a network namespace (no cgroup move):
    /// for tools such as tshark in a node namespace. Output goes to
    /// `<dir>/<label>.log`; killed when the topology drops.
    pub fn spawn_in_netns(
        &mut self,
        label: &str,
        netns: &str,
        program: &str,
        args: &[&str],
    ) -> Result<u32> {
        let log = std::fs::File::create(self.dir.join(format!("{label}.log")))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {label}"))?;
        let pid = child.id();
        self.children.push((label.to_owned(), child));
        Ok(pid)
    }

    /// Sends SIGINT to one labelled child and waits (bounded) for it to exit,
    /// so that tools like tshark flush their output.
    pub fn interrupt(&mut self, label: &str, timeout: Duration) -> Result<()> {
        let Some(child) = self.child(label) else {
            bail!("no process labelled {label}");
        };
        // SAFETY: kill(2) on a pid we started, with a valid signal number.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{label} did not exit within {timeout:?} of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills one labelled child now.
    pub fn kill(&mut self, label: &str) {
        if let Some(child) = self.child(label) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Pods added so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// A standard Ferry config for this topology: capture the enrolled
    /// cgroup, redirect to the node bridge addresses, and the given services
    /// (YAML list items, already indented by 2).
    pub fn ferry_config(&self, services_yaml: &str) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "node:\n  name: {}\nlisteners:\n  outbound: \"[::]:15001\"\n  metrics: \"0.0.0.0:15020\"\n  readiness: \"0.0.0.0:15021\"\n  inbound: \"[::]:15008\"\n\
             capture:\n  cgroups: [\"{}\"]\n  redirect_ipv4: {NODE_V4}\n  redirect_ipv6: \"{NODE_V6}\"\nproxy:\n  drain_deadline: 5s\nservices:\n{services_yaml}",
            self.name, self.enrolled_cgroup
        );
        s
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Processes started through `sh -c ... exec` are the children
        // themselves; anything else left in our cgroups is killed too.
        for g in ["pods", "other"] {
            let kill = self.cgroup_root.join(g).join("cgroup.kill");
            let _ = std::fs::write(&kill, "1");
        }
        for ns in self.netns.iter().rev() {
            let _ = run("ip", &["netns", "del", ns]);
        }
        for g in ["pods", "other"] {
            let dir = self.cgroup_root.join(g);
            for _ in 0..100 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup_root);
    }
}

/// How a process that was expected to exit ended.
#[derive(Debug, Clone)]
pub struct Exited {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// The names of the BPF programs attached directly to the cgroup at `path`
/// (absolute), as `bpftool cgroup show` lists them. Kernel program names are
/// at most 15 characters (`ferry_track_established` shows as `ferry_track_est`).
pub fn cgroup_programs(path: &Path) -> Result<Vec<String>> {
    let bpftool =
        which("bpftool").context("`bpftool` is not installed (run `cargo xtask setup`)")?;
    let path = path.to_str().context("cgroup path is not UTF-8")?;
    let out = run(&bpftool.to_string_lossy(), &["-j", "cgroup", "show", path])?;
    // JSON is YAML: one array of {id, attach_type, attach_flags, name}.
    #[derive(serde::Deserialize)]
    struct Attached {
        #[serde(default)]
        name: String,
    }
    let text = out.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<Attached> = serde_yaml_ng::from_str(text)
        .with_context(|| format!("parsing `bpftool -j cgroup show {path}`: {text}"))?;
    Ok(list.into_iter().map(|a| a.name).collect())
}

/// The programs of [`cgroup_programs`] that are Ferry's (named `ferry_*`).
pub fn ferry_programs_on(path: &Path) -> Result<Vec<String>> {
    Ok(cgroup_programs(path)?
        .into_iter()
        .filter(|n| n.starts_with("ferry_"))
        .collect())
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most `timeout`;
/// `what` names the awaited condition in the error.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The port of the readiness listener a Ferry config names
/// (`listeners.readiness`), or Ferry's default 15021. Start-up waits on it,
/// so that a second Ferry in one namespace is not taken for ready because
/// the first one answers.
fn readiness_port(config_yaml: &str) -> Result<String> {
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(config_yaml).context("the Ferry config is not YAML")?;
    let Some(addr) = doc
        .get("listeners")
        .and_then(|l| l.get("readiness"))
        .and_then(|a| a.as_str())
    else {
        return Ok("15021".to_owned());
    };
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("listeners.readiness {addr:?} is not IP:PORT"))?;
    Ok(addr.port().to_string())
}

/// A running Ferry.
#[derive(Debug, Clone)]
pub struct Ferry {
    pub label: String,
    pub pid: u32,
    pub node_netns: String,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Ferry {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on one of Ferry's admin ports (inside the node namespace).
    pub fn http(&self, port: &str, path: &str) -> Result<(u16, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_netns))
            .args(["curl", "-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }

    /// The metrics exposition.
    pub fn metrics(&self) -> Result<String> {
        let (code, body) = self.http("15020", "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body)
    }

    /// The value of one sample, e.g.
    /// `ferry_connections_opened_total{service="default/web"}`; 0 if absent.
    pub fn metric(&self, sample: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics()?, sample))
    }

    /// Waits until Ferry's log contains `needle` at least `count` times.
    pub fn wait_log_count(&self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("{count}x {needle:?} in {}", self.log.display()),
            timeout,
            || Ok((self.log_text().matches(needle).count() >= count).then_some(())),
        )
        .with_context(|| self.log_text())
    }

    /// Waits until a GET on an admin port answers `code` (0: no answer).
    pub fn wait_status(&self, port: &str, path: &str, code: u16, timeout: Duration) -> Result<()> {
        wait_for(&format!("{path} to answer {code}"), timeout, || {
            Ok((self.http(port, path)?.0 == code).then_some(()))
        })
    }

    /// Waits until `sample` (as in [`Ferry::metric`]) equals `value`.
    pub fn wait_metric(&self, sample: &str, value: f64, timeout: Duration) -> Result<()> {
        let mut last = None;
        wait_for(&format!("{sample} == {value}"), timeout, || {
            let v = self.metric(sample)?;
            last = Some(v);
            Ok((v == value).then_some(()))
        })
        .with_context(|| format!("last value: {last:?}"))
    }

    /// Sends a signal to Ferry.
    pub fn signal(&self, sig: i32) -> Result<()> {
        // SAFETY: kill(2) with a pid we started and a valid signal number.
        let rc = unsafe { libc::kill(self.pid as i32, sig) };
        if rc != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Finds `sample` (metric name with labels exactly as exposed) in a text
/// exposition; the labels may be given in any order.
pub fn metric_value(exposition: &str, sample: &str) -> f64 {
    let (name, labels) = match sample.split_once('{') {
        Some((n, l)) => (n, l.trim_end_matches('}')),
        None => (sample, ""),
    };
    let want: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
    for line in exposition.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (kname, klabels) = match key.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (key, ""),
        };
        if kname != name {
            continue;
        }
        let have: Vec<&str> = klabels.split(',').filter(|s| !s.is_empty()).collect();
        if want.len() == have.len() && want.iter().all(|w| have.contains(w)) {
            return value.trim().parse().unwrap_or(0.0);
        }
    }
    0.0
}

/// Counts backend ids in `curl` output where each response body is one line
/// starting with `id=<id>`.
pub fn count_ids(output: &str) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("id=") {
            let id = rest.split_whitespace().next().unwrap_or("").to_owned();
            *m.entry(id).or_insert(0) += 1;
        }
    }
    m
}

/// A plain TCP request/response from the calling process (which runs in the
/// root namespace): only for talking to addresses the caller can reach.
pub fn tcp_request(addr: SocketAddr, req: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(req)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Binds a TCP listener inside the network namespace `netns` (e.g.
/// `127.0.0.1:0` on that namespace's loopback). The socket stays in that
/// namespace whichever thread later serves it.
pub fn bind_in_netns(netns: &str, addr: &str) -> Result<std::net::TcpListener> {
    let path = format!("/run/netns/{netns}");
    let addr = addr.to_owned();
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a valid namespace fd we own; it changes only
        // this short-lived thread's network namespace, which ends with it.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(std::net::TcpListener::bind(&addr)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bind thread panicked"))?
}

/// A pod's own cgroup (as the kubelet makes one per pod), removed on drop,
/// before the topology removes its parent.
#[derive(Debug)]
pub struct CgroupDir(pub PathBuf);

impl CgroupDir {
    pub fn create(path: PathBuf) -> Result<CgroupDir> {
        std::fs::create_dir_all(&path)?;
        Ok(CgroupDir(path))
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Parses `ip` as IPv4 or IPv6.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}
