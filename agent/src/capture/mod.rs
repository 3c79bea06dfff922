//! eBPF capture: the only module that touches aya.
//!
//! [`Capture::start`] loads the embedded object, writes the redirect target
//! and the service addresses into the maps, and attaches `connect4`,
//! `connect6` and `sock_ops` to each enrolled cgroup. Attachments are BPF links
//! owned by this process: they are detached when [`Capture`] is dropped *and*
//! when the process dies for any reason, so a crashed agent never leaves pods
//! redirected to a listener that is gone (capture fails open to the kernel's
//! normal path). Nothing is pinned.

mod cgroup;
mod embedded;
pub mod join;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::sock_ops::SockOpsLinkId;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};
use aya::{Ebpf, EbpfError};
use ferry_common::{
    CaptureConfig, Counter, FLAG_LOG, FLAG_V4, FLAG_V6, OrigDst, PROTO_TCP, ServiceKey,
    ServiceValue, TupleKey, names,
};
use tracing::{debug, info, warn};

pub use cgroup::{CgroupError, cgroup2_mount, resolve_cgroup};
pub use join::JoinGuard;

use crate::config;
use crate::state::Snapshot;

/// Errors of the capture module.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "this ferry binary was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild ferry"
    )]
    NotBuilt,
    #[error("loading the eBPF object failed (needs root or CAP_BPF + CAP_NET_ADMIN): {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF log: {0}")]
    Log(String),
    #[error("map lookup: {0}")]
    Syscall(#[source] std::io::Error),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> CaptureError {
    move |source| CaptureError::Map {
        name,
        source: Box::new(source),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> CaptureError {
    move |source| CaptureError::Program {
        name,
        source: Box::new(source),
    }
}

/// Loaded and attached capture programs and the maps Ferry uses.
pub struct Capture {
    // Field order matters for drop: maps first, the object (programs and
    // links) last.
    orig_by_tuple: HashMap<MapData, TupleKey, OrigDst>,
    services: std::sync::Mutex<HashMap<MapData, ServiceKey, ServiceValue>>,
    counters: PerCpuArray<MapData, u64>,
    attached: std::sync::Mutex<BTreeMap<PathBuf, Links>>,
    /// Socket joining, when asked for and the kernel supports it.
    join: Option<join::Join>,
    _logger: Option<tokio::task::JoinHandle<()>>,
    ebpf: std::sync::Mutex<Ebpf>,
}

/// One cgroup's attachments (BPF links owned by the programs).
struct Links {
    sock_ops: Option<SockOpsLinkId>,
    connect: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(prog_err(name))
}

fn detach_links(ebpf: &mut Ebpf, links: Links) {
    if let Some(id) = links.sock_ops
        && let Ok(p) = program::<SockOps>(ebpf, names::PROG_SOCK_OPS)
        && let Err(e) = p.detach(id)
    {
        debug!(error = %e, "sock_ops detach");
    }
    for (name, id) in links.connect {
        if let Ok(p) = program::<CgroupSockAddr>(ebpf, name)
            && let Err(e) = p.detach(id)
        {
            debug!(error = %e, "connect detach");
        }
    }
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("attached", &self.attached())
            .finish_non_exhaustive()
    }
}

/// The destination a captured connection asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Original {
    pub dst: SocketAddr,
    pub service_id: u32,
}

impl Capture {
    /// True when this binary carries its eBPF object.
    pub fn object_embedded() -> bool {
        !embedded::OBJECT.is_empty()
    }

    /// Loads, configures and attaches the capture programs. Must be called
    /// inside a tokio runtime when `cfg.ebpf_log` is set. With
    /// `socket_join`, also loads the socket-joining programs; if the kernel
    /// refuses them, capture runs without joining and says so once
    /// ([`Capture::socket_join_enabled`] is then false).
    pub fn start(
        cfg: &config::Capture,
        outbound_port: u16,
        snapshot: &Snapshot,
        socket_join: bool,
    ) -> Result<Capture, CaptureError> {
        if !Self::object_embedded() {
            return Err(CaptureError::NotBuilt);
        }
        // Resolve every cgroup before touching the kernel, so a typo fails fast.
        let mount = cgroup2_mount()?;
        let cgroups = cfg
            .cgroups
            .iter()
            .map(|c| resolve_cgroup(&mount, c))
            .collect::<Result<Vec<_>, _>>()?;

        let mut ebpf = Ebpf::load(embedded::OBJECT).map_err(|e| CaptureError::Load(Box::new(e)))?;

        let logger = if cfg.ebpf_log {
            Some(start_logger(&mut ebpf)?)
        } else {
            None
        };

        // The configuration entry: until it is written the programs redirect nothing.
        let mut flags = 0;
        if cfg.ebpf_log {
            flags |= FLAG_LOG;
        }
        if cfg.redirect_ipv4.is_some() {
            flags |= FLAG_V4;
        }
        if cfg.redirect_ipv6.is_some() {
            flags |= FLAG_V6;
        }
        let entry = CaptureConfig {
            redirect_v4: cfg.redirect_ipv4.map(|a| a.octets()).unwrap_or_default(),
            redirect_v6: cfg.redirect_ipv6.map(|a| a.octets()).unwrap_or_default(),
            redirect_port: outbound_port.to_be_bytes(),
            _pad: [0; 2],
            bypass_mark: cfg.bypass_mark,
            flags,
        };
        {
            let map = ebpf.map_mut(names::CONFIG).ok_or(CaptureError::Missing {
                kind: "map",
                name: names::CONFIG,
            })?;
            let mut arr: Array<&mut MapData, CaptureConfig> =
                Array::try_from(map).map_err(map_err(names::CONFIG))?;
            arr.set(0, entry, 0).map_err(map_err(names::CONFIG))?;
        }

        let services = HashMap::try_from(take_map(&mut ebpf, names::SERVICES)?)
            .map_err(map_err(names::SERVICES))?;
        let orig_by_tuple = HashMap::try_from(take_map(&mut ebpf, names::ORIG_BY_TUPLE)?)
            .map_err(map_err(names::ORIG_BY_TUPLE))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, names::COUNTERS)?)
            .map_err(map_err(names::COUNTERS))?;

        let join = if socket_join {
            match join::Join::start(embedded::JOIN_OBJECT, entry) {
                Ok(j) => {
                    info!("socket joining enabled (sockmap + sk_msg)");
                    Some(j)
                }
                Err(e) => {
                    warn!(
                        error = %e,
                        "socket joining unavailable on this kernel (needs BPF sockmap/sockhash and sk_msg); relaying in user space instead"
                    );
                    None
                }
            }
        } else {
            info!("socket joining disabled by proxy.socket_join");
            None
        };

        let capture = Capture {
            orig_by_tuple,
            services: std::sync::Mutex::new(services),
            counters,
            attached: std::sync::Mutex::new(BTreeMap::new()),
            join,
            _logger: logger,
            ebpf: std::sync::Mutex::new(ebpf),
        };
        // Services before attaching, so the first captured connect already
        // sees the whole table.
        capture.sync_services(snapshot)?;

        {
            let mut ebpf = capture.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
                program::<CgroupSockAddr>(&mut ebpf, name)?
                    .load()
                    .map_err(prog_err(name))?;
            }
            program::<SockOps>(&mut ebpf, names::PROG_SOCK_OPS)?
                .load()
                .map_err(prog_err(names::PROG_SOCK_OPS))?;
        }
        for path in cgroups {
            capture.attach(&path)?;
        }
        Ok(capture)
    }

    /// Attaches the capture programs to one more cgroup (an absolute path
    /// under the cgroup2 mount). Attaching twice is a no-op.
    pub fn attach(&self, path: &Path) -> Result<(), CaptureError> {
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if attached.contains_key(path) {
            return Ok(());
        }
        let dir = std::fs::File::open(path).map_err(|source| CaptureError::OpenCgroup {
            path: path.to_owned(),
            source,
        })?;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        // BPF links on cgroups always coexist with other programs (kernel
        // multi-attach semantics); `Single` means "no flags". sock_ops
        // first: by the time a connect can be redirected, its establishment
        // is already tracked. Programs attached to a cgroup also apply to
        // its descendants (a pod's container cgroups).
        let sock_ops = program::<SockOps>(&mut ebpf, names::PROG_SOCK_OPS)?
            .attach(dir.as_fd(), CgroupAttachMode::Single)
            .map_err(prog_err(names::PROG_SOCK_OPS))?;
        let mut links = Links {
            sock_ops: Some(sock_ops),
            connect: Vec::new(),
        };
        for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            let r = program::<CgroupSockAddr>(&mut ebpf, name).and_then(|p| {
                p.attach(dir.as_fd(), CgroupAttachMode::Single)
                    .map_err(prog_err(name))
            });
            match r {
                Ok(id) => links.connect.push((name, id)),
                Err(e) => {
                    detach_links(&mut ebpf, links);
                    return Err(e);
                }
            }
        }
        // Joining is an optimisation: a cgroup it cannot be attached to
        // is still captured, its connections are relayed as usual.
        if let Some(j) = &self.join {
            drop(ebpf);
            if let Err(e) = j.attach(path, &dir) {
                warn!(cgroup = %path.display(), error = %e, "socket join not attached to this cgroup");
            }
        }
        info!(cgroup = %path.display(), "capture attached");
        attached.insert(path.to_owned(), links);
        Ok(())
    }

    /// Detaches the capture programs from a cgroup; a cgroup not attached
    /// (or already removed by the kubelet) is fine.
    pub fn detach(&self, path: &Path) {
        let links = self
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
        if let Some(links) = links {
            let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            detach_links(&mut ebpf, links);
            drop(ebpf);
            if let Some(j) = &self.join {
                j.detach(path);
            }
            info!(cgroup = %path.display(), "capture detached");
        }
    }

    /// Makes the attached set equal to `wanted` plus `keep` (the static
    /// cgroups of the configuration file): attaches what is new, detaches
    /// what is gone. Returns the cgroups that could not be attached (e.g. a
    /// pod whose cgroup the kubelet has not created yet); the caller retries.
    pub fn set_cgroups(
        &self,
        wanted: &std::collections::BTreeSet<PathBuf>,
        keep: &[PathBuf],
    ) -> Vec<(PathBuf, CaptureError)> {
        let gone: Vec<PathBuf> = self
            .attached()
            .into_iter()
            .filter(|p| !wanted.contains(p) && !keep.contains(p))
            .collect();
        for p in gone {
            self.detach(&p);
        }
        let mut failed = Vec::new();
        for p in wanted {
            if let Err(e) = self.attach(p) {
                failed.push((p.clone(), e));
            }
        }
        failed
    }

    /// The cgroups capture is attached to.
    pub fn attached(&self) -> Vec<PathBuf> {
        self.attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Makes the service map match `snapshot`: adds and updates first, then
    /// removes what is gone, so a service present in both never stops being
    /// captured.
    pub fn sync_services(&self, snapshot: &Snapshot) -> Result<(), CaptureError> {
        // A poisoned lock means a panic mid-sync; the map itself is in the
        // kernel and a full sync repairs whatever state it was left in.
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let mut wanted = std::collections::HashMap::new();
        for (addr, id) in snapshot.service_addresses() {
            wanted.insert(service_key(addr), ServiceValue { service_id: id });
        }
        for (k, v) in &wanted {
            services.insert(k, v, 0).map_err(map_err(names::SERVICES))?;
        }
        let present: Vec<ServiceKey> = services
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::SERVICES))?;
        let mut removed = 0;
        for k in present {
            if !wanted.contains_key(&k) {
                match services.remove(&k) {
                    Ok(()) | Err(MapError::KeyNotFound) => removed += 1,
                    Err(e) => return Err(map_err(names::SERVICES)(e)),
                }
            }
        }
        debug!(entries = wanted.len(), removed, "service map synced");
        Ok(())
    }

    /// Takes (reads and deletes) the original destination recorded for the
    /// captured connection whose client address is `peer`. One syscall, no
    /// lock: safe to call from every connection task at once.
    pub fn take_original(&self, peer: SocketAddr) -> Result<Option<Original>, CaptureError> {
        let key = tuple_key(peer);
        let mut value = OrigDst::default();
        let fd = self.orig_by_tuple.map().fd().as_fd().as_raw_fd();
        match lookup_and_delete(fd, &key, &mut value) {
            Ok(true) => {
                let ip = IpAddr::V6(Ipv6Addr::from(value.addr));
                Ok(Some(Original {
                    dst: SocketAddr::new(
                        crate::state::canonical_ip(ip),
                        u16::from_be_bytes(value.port),
                    ),
                    service_id: value.service_id,
                }))
            }
            Ok(false) => Ok(None),
            Err(e) => Err(CaptureError::Syscall(e)),
        }
    }

    /// The programs' counters, summed over CPUs, in `Counter::ALL` order
    /// (the join counters are 0 when joining is off).
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, CaptureError> {
        let mut all: Vec<(Counter, u64)> = Counter::CAPTURE
            .iter()
            .map(|c| {
                let per_cpu = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(map_err(names::COUNTERS))?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect::<Result<_, CaptureError>>()?;
        match &self.join {
            Some(j) => all.extend(j.counters()?),
            None => all.extend(Counter::JOIN.iter().map(|c| (*c, 0))),
        }
        Ok(all)
    }

    /// True when socket joining is loaded and in use.
    pub fn socket_join_enabled(&self) -> bool {
        self.join.is_some()
    }

    /// Connections for which a join was installed since start.
    pub fn joined_connections(&self) -> u64 {
        self.join
            .as_ref()
            .map_or(0, |j| j.joined.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Installs a socket join for a captured connection Ferry accepted from
    /// `peer` on `local` and relays, unencrypted, to `upstream`. `None` when
    /// joining is off or the kernel refused (the connection is then relayed
    /// as usual).
    pub fn join_begin(
        &self,
        id: u64,
        peer: SocketAddr,
        local: SocketAddr,
        upstream: &impl AsRawFd,
    ) -> Option<JoinGuard<'_>> {
        let j = self.join.as_ref()?;
        match j.begin(id, peer, local, upstream) {
            Ok(g) => Some(g),
            Err(e) => {
                debug!(error = %e, "socket join not installed; relaying");
                None
            }
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name)
        .ok_or(CaptureError::Missing { kind: "map", name })
}

fn start_logger(ebpf: &mut Ebpf) -> Result<tokio::task::JoinHandle<()>, CaptureError> {
    use tokio::io::{Interest, unix::AsyncFd};
    let logger = aya_log::EbpfLogger::init(ebpf).map_err(|e| CaptureError::Log(e.to_string()))?;
    // SAFETY: the logger owns its ring buffer's fd for as long as it lives,
    // and the AsyncFd owns the logger, so the fd stays open and the same for
    // the AsyncFd's whole life.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| CaptureError::Log(e.to_string()))?;
    Ok(tokio::spawn(async move {
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "eBPF log reader stopped");
                    return;
                }
            }
        }
    }))
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => ferry_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The service-map key for a service address and port.
pub fn service_key(addr: SocketAddr) -> ServiceKey {
    ServiceKey {
        addr: addr16(addr.ip()),
        port: addr.port().to_be_bytes(),
        protocol: PROTO_TCP,
        _pad: 0,
    }
}

/// The established-connection key for a client address.
pub fn tuple_key(peer: SocketAddr) -> TupleKey {
    TupleKey {
        addr: addr16(crate::state::canonical_ip(peer.ip())),
        port: peer.port().to_be_bytes(),
        _pad: [0; 2],
    }
}

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM: Ok(true) when found (and removed).
fn lookup_and_delete(fd: i32, key: &TupleKey, value: &mut OrigDst) -> std::io::Result<bool> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = MapElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as *const TupleKey as u64,
        value: value as *mut OrigDst as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for this command (map_fd,
    // key, value, flags, as in the kernel's union); `key` and `value` point at
    // live objects of exactly the map's key and value sizes, and the kernel
    // writes at most `size_of::<OrigDst>()` bytes into `value`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(false)
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_use_mapped_form_for_ipv4() {
        let a = tuple_key("10.1.2.3:4567".parse().unwrap());
        let b = tuple_key("[::ffff:10.1.2.3]:4567".parse().unwrap());
        assert_eq!(a, b);
        assert_eq!(a.port, [0x11, 0xd7]);
        let s = service_key("[fd96::20]:80".parse().unwrap());
        assert_eq!(s.addr[0], 0xfd);
        assert_eq!(s.port, [0, 80]);
        assert_eq!(s.protocol, 6);
    }
}
