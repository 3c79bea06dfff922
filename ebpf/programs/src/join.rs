//! Ferry's socket-joining programs (a separate object, so that a kernel
//! without sockmap still gets capture; the agent loads this one only when
//! `proxy.socket_join` is on, and runs without joining if it fails).
//!
//! * `ferry_join_enroll` (`sock_ops`, on the enrolled cgroups): when a client
//!   socket's connection to Ferry's redirect target is established, reset its
//!   `FERRY_JOIN_STATE` entry and put the socket in `FERRY_JOIN_SRC`; when it
//!   closes, drop the state.
//! * `ferry_join_msg` (`sk_msg`, attached to `FERRY_JOIN_SRC` only): for each
//!   message the client sends, either let it take the normal TCP path to
//!   Ferry (counting the bytes in `passed`), or — once Ferry has written a
//!   join record and has relayed every byte that took the TCP path
//!   (`forwarded == passed`) — redirect it into the egress of Ferry's
//!   upstream socket (`FERRY_JOIN_DST`), from then on for good. The program
//!   runs in the client's sendmsg under its socket lock, so the switch point
//!   is exact: nothing the client sent earlier is still on the way to Ferry,
//!   and what it sends later goes straight to the upstream socket's send
//!   queue behind what Ferry wrote.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    macros::{map, sk_msg, sock_ops},
    maps::{Array, HashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use ferry_common::{
    CaptureConfig, Counter, FLAG_JOIN, FLAG_V4, FLAG_V6, JoinKey, JoinRecord, JoinState,
    MAX_IN_FLIGHT, v4_mapped,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
/// `BPF_F_NO_PREALLOC`: records are freed after an RCU grace period, so the
/// program never reads an element user space is replacing.
const NO_PREALLOC: u32 = 1;

#[map(name = "FERRY_JOIN_CONFIG")]
static FERRY_JOIN_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Enrolled client sockets; `ferry_join_msg` is attached here.
#[map(name = "FERRY_JOIN_SRC")]
static FERRY_JOIN_SRC: SockHash<JoinKey> = SockHash::with_max_entries(MAX_IN_FLIGHT, 0);

/// Ferry's upstream sockets, by connection id; a redirect target only (no
/// programs attached), so Ferry's own reads and writes are untouched.
#[map(name = "FERRY_JOIN_DST")]
static FERRY_JOIN_DST: SockHash<u64> = SockHash::with_max_entries(MAX_IN_FLIGHT, 0);

/// Not preallocated either: entries exist only for open client sockets,
/// so an idle node does not pin MAX_IN_FLIGHT entries of kernel memory.
#[map(name = "FERRY_JOIN_STATE")]
static FERRY_JOIN_STATE: HashMap<JoinKey, JoinState> =
    HashMap::with_max_entries(MAX_IN_FLIGHT, NO_PREALLOC);

#[map(name = "FERRY_JOIN_REC")]
static FERRY_JOIN_REC: HashMap<JoinKey, JoinRecord> =
    HashMap::with_max_entries(MAX_IN_FLIGHT, NO_PREALLOC);

#[map(name = "FERRY_JOIN_COUNTERS")]
static FERRY_JOIN_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count_by(counter: Counter, n: u64) {
    if let Some(slot) = FERRY_JOIN_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so
        // it points at this CPU's u64 slot, which nothing else on this CPU
        // touches while the program runs.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn count(counter: Counter) {
    count_by(counter, 1);
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

/// The remote port as network-order bytes. The kernel hands it over in the
/// upper 16 bits of the u32 on little-endian machines; accept either form.
#[inline(always)]
fn remote_port_bytes(raw: u32) -> [u8; 2] {
    let v = if raw > 0xffff { raw >> 16 } else { raw };
    let b = (v as u16).to_ne_bytes();
    [b[0], b[1]]
}

#[sock_ops]
pub fn ferry_join_enroll(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 0;
    }
    let Some(cfg) = FERRY_JOIN_CONFIG.get(0).copied() else {
        return 0;
    };
    let ops = ctx.ops;
    let (client, ferry) = match ctx.family() {
        AF_INET => (
            v4_mapped(ctx.local_ip4().to_ne_bytes()),
            v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        ),
        AF_INET6 => {
            // SAFETY: one 4-byte load per field of our own context at a
            // constant offset (the verifier rejects a computed ctx pointer).
            let (l, r) = unsafe {
                (
                    [
                        read_volatile(&raw const (*ops).local_ip6[0]),
                        read_volatile(&raw const (*ops).local_ip6[1]),
                        read_volatile(&raw const (*ops).local_ip6[2]),
                        read_volatile(&raw const (*ops).local_ip6[3]),
                    ],
                    [
                        read_volatile(&raw const (*ops).remote_ip6[0]),
                        read_volatile(&raw const (*ops).remote_ip6[1]),
                        read_volatile(&raw const (*ops).remote_ip6[2]),
                        read_volatile(&raw const (*ops).remote_ip6[3]),
                    ],
                )
            };
            (words_to_bytes(l), words_to_bytes(r))
        }
        _ => return 0,
    };
    let key = JoinKey {
        client_addr: client,
        ferry_addr: ferry,
        client_port: (ctx.local_port() as u16).to_be_bytes(),
        ferry_port: remote_port_bytes(ctx.remote_port()),
    };
    if op == BPF_SOCK_OPS_STATE_CB {
        // args[1] is the new state. Only sockets we enrolled asked for
        // state callbacks.
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let _ = FERRY_JOIN_STATE.remove(key);
        }
        return 0;
    }
    if cfg.flags & FLAG_JOIN == 0 || key.ferry_port != cfg.redirect_port {
        return 0;
    }
    let v4_target = v4_mapped(cfg.redirect_v4);
    let to_ferry = (cfg.flags & FLAG_V4 != 0 && ferry == v4_target)
        || (cfg.flags & FLAG_V6 != 0 && ferry == cfg.redirect_v6);
    if !to_ferry {
        return 0;
    }
    // A fresh state for this connection: whatever an earlier connection
    // with the same addresses left behind is overwritten here.
    if FERRY_JOIN_STATE
        .insert(key, JoinState::default(), 0)
        .is_err()
    {
        count(Counter::JoinEnrollErrors);
        return 0;
    }
    let mut k = key;
    // SAFETY: `ops` is this program's context pointer, valid for the call.
    if FERRY_JOIN_SRC
        .update(&mut k, unsafe { &mut *ops }, 0)
        .is_err()
    {
        let _ = FERRY_JOIN_STATE.remove(key);
        count(Counter::JoinEnrollErrors);
        return 0;
    }
    // Ask for state callbacks so the state is dropped at close.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
    count(Counter::JoinEnrolled);
    0
}

#[sk_msg]
pub fn ferry_join_msg(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    // SAFETY: reads of our own context's fields, one 4-byte load each at a
    // constant offset, as the verifier requires.
    let (family, lip4, rip4, lport, rport, size) = unsafe {
        (
            read_volatile(&raw const (*msg).family),
            read_volatile(&raw const (*msg).local_ip4),
            read_volatile(&raw const (*msg).remote_ip4),
            read_volatile(&raw const (*msg).local_port),
            read_volatile(&raw const (*msg).remote_port),
            read_volatile(&raw const (*msg).size),
        )
    };
    let (client, ferry) = if family == AF_INET6 {
        // SAFETY: as above.
        let (l, r) = unsafe {
            (
                [
                    read_volatile(&raw const (*msg).local_ip6[0]),
                    read_volatile(&raw const (*msg).local_ip6[1]),
                    read_volatile(&raw const (*msg).local_ip6[2]),
                    read_volatile(&raw const (*msg).local_ip6[3]),
                ],
                [
                    read_volatile(&raw const (*msg).remote_ip6[0]),
                    read_volatile(&raw const (*msg).remote_ip6[1]),
                    read_volatile(&raw const (*msg).remote_ip6[2]),
                    read_volatile(&raw const (*msg).remote_ip6[3]),
                ],
            )
        };
        (words_to_bytes(l), words_to_bytes(r))
    } else {
        (v4_mapped(lip4.to_ne_bytes()), v4_mapped(rip4.to_ne_bytes()))
    };
    let key = JoinKey {
        client_addr: client,
        ferry_addr: ferry,
        client_port: (lport as u16).to_be_bytes(),
        ferry_port: remote_port_bytes(rport),
    };
    let Some(state) = FERRY_JOIN_STATE.get_ptr_mut(key) else {
        count(Counter::JoinPassed);
        return SK_PASS;
    };
    // SAFETY: `state` comes from a successful lookup; the entry is only
    // written by this program and the enrol program, both under this
    // socket's lock, and removed only when the socket closes.
    let st = unsafe { &mut *state };
    if st.switched != 0 {
        let mut target = st.target;
        if FERRY_JOIN_DST.redirect_msg(&ctx, &mut target, 0) as u32 == SK_PASS {
            count(Counter::JoinRedirected);
            count_by(Counter::JoinRedirectedBytes, size as u64);
            return SK_PASS;
        }
        // The upstream socket is gone (closed or removed by Ferry): these
        // bytes can go nowhere in order. Refuse them; the client's send
        // fails instead of losing data silently.
        count(Counter::JoinErrors);
        return SK_DROP;
    }
    // SAFETY: copied out at once; Ferry replaces the record as a whole and
    // the map is not preallocated, so a reader never sees a torn value.
    if let Some(rec) = unsafe { FERRY_JOIN_REC.get(key) }.copied()
        && rec.forwarded == st.passed
    {
        let mut target = rec.target;
        if FERRY_JOIN_DST.redirect_msg(&ctx, &mut target, 0) as u32 == SK_PASS {
            st.target = rec.target;
            st.switched = 1;
            count(Counter::JoinSwitched);
            count(Counter::JoinRedirected);
            count_by(Counter::JoinRedirectedBytes, size as u64);
            return SK_PASS;
        }
        // Target not (or no longer) there: keep using the TCP path.
    }
    st.passed += size as u64;
    count(Counter::JoinPassed);
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
