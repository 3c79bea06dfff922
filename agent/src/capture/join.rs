//! In-kernel socket joining (`proxy.socket_join`): the user-space half.
//!
//! The join object (`ferry-join`, separate from the capture object so that a
//! kernel without sockmap still gets capture) enrols every captured client
//! socket in a SockHash whose `sk_msg` program decides, per message the
//! client sends, whether it takes the normal TCP path to Ferry or goes
//! straight into the send queue of Ferry's upstream socket. Ferry's part,
//! per connection to a plaintext backend ([`Join::begin`]):
//!
//! 1. put the upstream socket in `FERRY_JOIN_DST` under the connection id;
//! 2. write the join record for the client's 4-tuple: that id and
//!    `forwarded` = bytes relayed client → upstream so far;
//! 3. while relaying client → upstream, raise `forwarded` after every write
//!    ([`JoinGuard::forwarded`]). The program switches the client socket to
//!    redirection at the first message it sees when `forwarded` equals what
//!    it let through, i.e. when nothing the client sent is still on its way
//!    through Ferry; from then on the client's bytes never reach user space.
//!    A stale `forwarded` is only ever smaller than the truth, so a lost or
//!    late update can delay the switch but never reorder bytes;
//! 4. at the end, remove the record and the upstream socket's entry.
//!
//! The client's FIN and RST still travel the TCP path to Ferry, after every
//! redirected byte (the redirect is synchronous in the client's sendmsg),
//! so Ferry's relay passes half-close and resets on in order. The other
//! direction (backend → client) stays on Ferry's relay.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aya::Ebpf;
use aya::maps::{Array, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::sock_ops::SockOpsLinkId;
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use ferry_common::{CaptureConfig, Counter, FLAG_JOIN, JoinKey, JoinRecord, names};
use tracing::debug;

use super::{CaptureError, addr16, map_err, prog_err, program, take_map};

/// The loaded join programs and the maps Ferry writes.
pub(super) struct Join {
    // Field order matters for drop: maps first, the object last.
    dst: MapData,
    rec: MapData,
    counters: PerCpuArray<MapData, u64>,
    /// Keeps the SockHash the sk_msg program is attached to alive.
    _src: SockHash<MapData, JoinKey>,
    links: Mutex<BTreeMap<PathBuf, SockOpsLinkId>>,
    /// Connections whose join record was installed.
    pub(super) joined: AtomicU64,
    ebpf: Mutex<Ebpf>,
}

impl Join {
    /// Loads the join object and attaches `sk_msg` to the client SockHash.
    /// Any failure means "this kernel cannot join sockets".
    pub(super) fn start(object: &[u8], mut entry: CaptureConfig) -> Result<Join, CaptureError> {
        if object.is_empty() {
            return Err(CaptureError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(object).map_err(|e| CaptureError::Load(Box::new(e)))?;
        entry.flags |= FLAG_JOIN;
        {
            let map = ebpf
                .map_mut(names::JOIN_CONFIG)
                .ok_or(CaptureError::Missing {
                    kind: "map",
                    name: names::JOIN_CONFIG,
                })?;
            let mut arr: Array<&mut MapData, CaptureConfig> =
                Array::try_from(map).map_err(map_err(names::JOIN_CONFIG))?;
            arr.set(0, entry, 0).map_err(map_err(names::JOIN_CONFIG))?;
        }
        let src: SockHash<MapData, JoinKey> =
            SockHash::try_from(take_map(&mut ebpf, names::JOIN_SRC)?)
                .map_err(map_err(names::JOIN_SRC))?;
        let dst = map_data(take_map(&mut ebpf, names::JOIN_DST)?, names::JOIN_DST)?;
        let rec = map_data(take_map(&mut ebpf, names::JOIN_REC)?, names::JOIN_REC)?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, names::JOIN_COUNTERS)?)
            .map_err(map_err(names::JOIN_COUNTERS))?;
        {
            let msg = program::<SkMsg>(&mut ebpf, names::PROG_JOIN_MSG)?;
            msg.load().map_err(prog_err(names::PROG_JOIN_MSG))?;
            let fd = src.fd().try_clone().map_err(CaptureError::Syscall)?;
            msg.attach(&fd).map_err(prog_err(names::PROG_JOIN_MSG))?;
            program::<SockOps>(&mut ebpf, names::PROG_JOIN_SOCK_OPS)?
                .load()
                .map_err(prog_err(names::PROG_JOIN_SOCK_OPS))?;
        }
        Ok(Join {
            dst,
            rec,
            counters,
            _src: src,
            links: Mutex::new(BTreeMap::new()),
            joined: AtomicU64::new(0),
            ebpf: Mutex::new(ebpf),
        })
    }

    /// Attaches the enrol program to a cgroup (no-op if attached).
    pub(super) fn attach(&self, path: &Path, dir: &std::fs::File) -> Result<(), CaptureError> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.contains_key(path) {
            return Ok(());
        }
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let id = program::<SockOps>(&mut ebpf, names::PROG_JOIN_SOCK_OPS)?
            .attach(dir.as_fd(), CgroupAttachMode::Single)
            .map_err(prog_err(names::PROG_JOIN_SOCK_OPS))?;
        links.insert(path.to_owned(), id);
        Ok(())
    }

    pub(super) fn detach(&self, path: &Path) {
        let id = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
        if let Some(id) = id {
            let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(p) = program::<SockOps>(&mut ebpf, names::PROG_JOIN_SOCK_OPS)
                && let Err(e) = p.detach(id)
            {
                debug!(error = %e, "join sock_ops detach");
            }
        }
    }

    pub(super) fn counters(&self) -> Result<Vec<(Counter, u64)>, CaptureError> {
        Counter::JOIN
            .iter()
            .map(|c| {
                let per_cpu = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(map_err(names::JOIN_COUNTERS))?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Installs a join for the client connection Ferry accepted (`peer` is
    /// the client, `local` Ferry's listener address) towards `upstream`.
    pub(super) fn begin<'a>(
        &'a self,
        id: u64,
        peer: SocketAddr,
        local: SocketAddr,
        upstream: &impl AsRawFd,
    ) -> Result<JoinGuard<'a>, CaptureError> {
        let key = join_key(peer, local);
        let fd: u32 = upstream.as_raw_fd() as u32;
        map_update(raw(&self.dst), &id, &fd).map_err(CaptureError::Syscall)?;
        let rec = JoinRecord {
            target: id,
            forwarded: 0,
        };
        if let Err(e) = map_update(raw(&self.rec), &key, &rec) {
            let _ = map_delete(raw(&self.dst), &id);
            return Err(CaptureError::Syscall(e));
        }
        self.joined.fetch_add(1, Ordering::Relaxed);
        Ok(JoinGuard {
            join: self,
            key,
            id,
            forwarded: AtomicU64::new(0),
            live: AtomicBool::new(true),
        })
    }
}

/// One connection's join; removes the record and the upstream socket's
/// entry when dropped.
pub struct JoinGuard<'a> {
    join: &'a Join,
    key: JoinKey,
    id: u64,
    forwarded: AtomicU64,
    live: AtomicBool,
}

impl std::fmt::Debug for JoinGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinGuard")
            .field("id", &self.id)
            .field("forwarded", &self.forwarded.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl JoinGuard<'_> {
    /// Records that `n` more bytes read from the client were written to
    /// the upstream socket. Called by the client → upstream relay only.
    pub fn forwarded(&self, n: u64) {
        let total = self.forwarded.fetch_add(n, Ordering::Relaxed) + n;
        if !self.live.load(Ordering::Relaxed) {
            return;
        }
        let rec = JoinRecord {
            target: self.id,
            forwarded: total,
        };
        if let Err(e) = map_update(raw(&self.join.rec), &self.key, &rec) {
            // A stale `forwarded` only delays the switch (it is never more
            // than the truth); stop updating rather than retry per chunk.
            debug!(error = %e, "join record update failed; this connection stays relayed");
            self.live.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for JoinGuard<'_> {
    fn drop(&mut self) {
        let _ = map_delete(raw(&self.join.rec), &self.key);
        let _ = map_delete(raw(&self.join.dst), &self.id);
    }
}

/// The join key of a connection Ferry accepted.
pub fn join_key(peer: SocketAddr, local: SocketAddr) -> JoinKey {
    JoinKey {
        client_addr: addr16(crate::state::canonical_ip(peer.ip())),
        ferry_addr: addr16(crate::state::canonical_ip(local.ip())),
        client_port: peer.port().to_be_bytes(),
        ferry_port: local.port().to_be_bytes(),
    }
}

fn map_data(map: aya::maps::Map, name: &'static str) -> Result<MapData, CaptureError> {
    match map {
        aya::maps::Map::SockHash(m) | aya::maps::Map::HashMap(m) => Ok(m),
        _ => Err(map_err(name)(MapError::InvalidName {
            name: name.to_owned(),
        })),
    }
}

fn raw(map: &MapData) -> RawFd {
    map.fd().as_fd().as_raw_fd()
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &MapElemAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the map element
    // commands (map_fd, key, value, flags, as in the kernel's union); the
    // callers point `key` and `value` at live objects of exactly the map's
    // key and value sizes, which the kernel only reads for these commands.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// BPF_MAP_UPDATE_ELEM (BPF_ANY), without locks: safe from every task.
fn map_update<K, V>(fd: RawFd, key: &K, value: &V) -> std::io::Result<()> {
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &MapElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: value as *const V as u64,
            flags: 0,
        },
    )
}

/// BPF_MAP_DELETE_ELEM; a missing key is not an error.
fn map_delete<K>(fd: RawFd, key: &K) -> std::io::Result<()> {
    match bpf(
        BPF_MAP_DELETE_ELEM,
        &MapElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: 0,
            flags: 0,
        },
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_from_accepted_socket() {
        let k = join_key(
            "10.1.2.3:40000".parse().unwrap(),
            "[::ffff:10.77.1.1]:15001".parse().unwrap(),
        );
        assert_eq!(&k.client_addr[10..], &[0xff, 0xff, 10, 1, 2, 3]);
        assert_eq!(&k.ferry_addr[10..], &[0xff, 0xff, 10, 77, 1, 1]);
        assert_eq!(k.client_port, 40000u16.to_be_bytes());
        assert_eq!(k.ferry_port, 15001u16.to_be_bytes());
    }
}
