//! Ferry's eBPF programs.
//!
//! * `ferry_connect4` / `ferry_connect6` (`cgroup/connect4`, `cgroup/connect6`):
//!   when an enrolled socket connects to a mesh service address (a key of
//!   `FERRY_SERVICES`), rewrite the destination to Ferry's outbound listener and
//!   remember the original destination under the socket's cookie.
//! * `ferry_track_established` (`sock_ops`): when such a socket's connection is
//!   established, move the record to a map keyed by the client's own address and
//!   port, which is the peer address Ferry sees when it accepts the connection.
//!
//! Sockets carrying Ferry's bypass mark (its own upstream connections) and every
//! non-TCP socket are never touched. Diagnostics go through aya-log only when
//! the agent sets `FLAG_LOG`, so the data path pays one branch for them.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{info, warn};
use ferry_common::{
    CaptureConfig, Counter, FLAG_LOG, FLAG_V4, FLAG_V6, MAX_IN_FLIGHT, MAX_SERVICES, OrigDst,
    PROTO_TCP, ServiceKey, ServiceValue, TupleKey, v4_mapped,
};

/// cgroup sock_addr programs return 1 to let the syscall proceed.
const ALLOW: i32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;

#[map(name = "FERRY_CONFIG")]
static FERRY_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

#[map(name = "FERRY_SERVICES")]
static FERRY_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "FERRY_ORIG_BY_COOKIE")]
static FERRY_ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(MAX_IN_FLIGHT, 0);

#[map(name = "FERRY_ORIG_BY_TUPLE")]
static FERRY_ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> =
    LruHashMap::with_max_entries(MAX_IN_FLIGHT, 0);

#[map(name = "FERRY_COUNTERS")]
static FERRY_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = FERRY_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it
        // points at this CPU's u64 slot, which nothing else on this CPU touches
        // while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<CaptureConfig> {
    FERRY_CONFIG.get(0).copied()
}

/// Reads the bypass mark test and protocol checks shared by both families.
/// Returns the socket's mark when it is a TCP stream socket.
#[inline(always)]
fn tcp_socket_mark(sa: *const bpf_sock_addr) -> Option<u32> {
    // SAFETY: `sa` is the context pointer the kernel passed to this program;
    // these fields are readable in every cgroup sock_addr program.
    let (ty, proto, sk) = unsafe { ((*sa).type_, (*sa).protocol, (*sa).__bindgen_anon_1.sk) };
    if ty != SOCK_STREAM || proto != PROTO_TCP as u32 || sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is the kernel's non-null socket pointer for this call; the
    // verifier allows reading `mark` from it.
    Some(unsafe { (*sk).mark })
}

/// Lays out four network-order words as the 16 bytes they are in memory.
#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(mark) = tcp_socket_mark(sa) else {
        count(Counter::Connect4Passed);
        return ALLOW;
    };
    let Some(cfg) = config() else {
        count(Counter::Connect4Errors);
        return ALLOW;
    };
    if cfg.flags & FLAG_V4 == 0 || (cfg.bypass_mark != 0 && mark == cfg.bypass_mark) {
        count(Counter::Connect4Passed);
        return ALLOW;
    }
    // SAFETY: reading the destination fields of our own context.
    let (ip4, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let ip = ip4.to_ne_bytes();
    let p = port.to_ne_bytes();
    let key = ServiceKey {
        addr: v4_mapped(ip),
        port: [p[0], p[1]],
        protocol: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; a concurrent update can at worst
    // give us the previous or next id, which is only used for diagnostics.
    let Some(svc) = (unsafe { FERRY_SERVICES.get(key) }).copied() else {
        count(Counter::Connect4Passed);
        return ALLOW;
    };
    // SAFETY: the helper takes this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        addr: key.addr,
        port: key.port,
        _pad: [0; 2],
        service_id: svc.service_id,
    };
    if FERRY_ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without a record Ferry could not route the connection: leave it alone.
        count(Counter::Connect4Errors);
        return ALLOW;
    }
    let rp = cfg.redirect_port;
    // SAFETY: writing the destination of our own context is what connect4
    // programs are for; both stores are 4 bytes wide as the verifier requires.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(cfg.redirect_v4);
        (*sa).user_port = u32::from_ne_bytes([rp[0], rp[1], 0, 0]);
    }
    count(Counter::Connect4Redirected);
    if cfg.flags & FLAG_LOG != 0 {
        info!(
            &ctx,
            "connect4 redirected cookie={} service={} port={}",
            cookie,
            svc.service_id,
            u16::from_be_bytes(key.port)
        );
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn ferry_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(mark) = tcp_socket_mark(sa) else {
        count(Counter::Connect6Passed);
        return ALLOW;
    };
    let Some(cfg) = config() else {
        count(Counter::Connect6Errors);
        return ALLOW;
    };
    if cfg.bypass_mark != 0 && mark == cfg.bypass_mark {
        count(Counter::Connect6Passed);
        return ALLOW;
    }
    // SAFETY: reading the destination fields of our own context, one 4-byte
    // load per field at a constant offset, as the verifier requires.
    let (w, port) = unsafe {
        (
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            read_volatile(&raw const (*sa).user_port),
        )
    };
    let addr = words_to_bytes(w);
    // A dual-stack socket connecting to an IPv4-mapped address is an IPv4
    // connection on the wire: redirect it to Ferry's IPv4 address.
    let mapped = addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff;
    let wanted = if mapped { FLAG_V4 } else { FLAG_V6 };
    if cfg.flags & wanted == 0 {
        count(Counter::Connect6Passed);
        return ALLOW;
    }
    let p = port.to_ne_bytes();
    let key = ServiceKey {
        addr,
        port: [p[0], p[1]],
        protocol: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: see ferry_connect4.
    let Some(svc) = (unsafe { FERRY_SERVICES.get(key) }).copied() else {
        count(Counter::Connect6Passed);
        return ALLOW;
    };
    // SAFETY: the helper takes this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        addr: key.addr,
        port: key.port,
        _pad: [0; 2],
        service_id: svc.service_id,
    };
    if FERRY_ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        count(Counter::Connect6Errors);
        return ALLOW;
    }
    let target = if mapped {
        v4_mapped(cfg.redirect_v4)
    } else {
        cfg.redirect_v6
    };
    let rp = cfg.redirect_port;
    // SAFETY: rewriting our own context's destination with 4-byte stores.
    unsafe {
        (*sa).user_ip6[0] = u32::from_ne_bytes([target[0], target[1], target[2], target[3]]);
        (*sa).user_ip6[1] = u32::from_ne_bytes([target[4], target[5], target[6], target[7]]);
        (*sa).user_ip6[2] = u32::from_ne_bytes([target[8], target[9], target[10], target[11]]);
        (*sa).user_ip6[3] = u32::from_ne_bytes([target[12], target[13], target[14], target[15]]);
        (*sa).user_port = u32::from_ne_bytes([rp[0], rp[1], 0, 0]);
    }
    count(Counter::Connect6Redirected);
    if cfg.flags & FLAG_LOG != 0 {
        info!(
            &ctx,
            "connect6 redirected cookie={} service={} port={}",
            cookie,
            svc.service_id,
            u16::from_be_bytes(key.port)
        );
    }
    ALLOW
}

#[sock_ops]
pub fn ferry_track_established(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 0;
    }
    // SAFETY: the helper takes this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once; the entry is ours (keyed by this socket).
    let Some(orig) = (unsafe { FERRY_ORIG_BY_COOKIE.get(cookie) }).copied() else {
        count(Counter::SockOpsPassed);
        return 0;
    };
    let _ = FERRY_ORIG_BY_COOKIE.remove(cookie);
    let addr = match ctx.family() {
        AF_INET => v4_mapped(ctx.local_ip4().to_ne_bytes()),
        AF_INET6 => {
            let ops = ctx.ops;
            // SAFETY: one 4-byte load per field of our own context at a
            // constant offset (the verifier rejects a computed ctx pointer).
            let w = unsafe {
                [
                    read_volatile(&raw const (*ops).local_ip6[0]),
                    read_volatile(&raw const (*ops).local_ip6[1]),
                    read_volatile(&raw const (*ops).local_ip6[2]),
                    read_volatile(&raw const (*ops).local_ip6[3]),
                ]
            };
            words_to_bytes(w)
        }
        _ => {
            count(Counter::SockOpsErrors);
            return 0;
        }
    };
    let key = TupleKey {
        addr,
        port: (ctx.local_port() as u16).to_be_bytes(),
        _pad: [0; 2],
    };
    if FERRY_ORIG_BY_TUPLE.insert(key, orig, 0).is_err() {
        count(Counter::SockOpsErrors);
        if let Some(cfg) = config()
            && cfg.flags & FLAG_LOG != 0
        {
            warn!(&ctx, "sock_ops: recording cookie={} failed", cookie);
        }
        return 0;
    }
    count(Counter::SockOpsRecorded);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
