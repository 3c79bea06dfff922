//! Types shared between Ferry's eBPF programs and the user-space agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and is the exact
//! layout of a BPF map key or value. Addresses are stored as 16 bytes in
//! network byte order; IPv4 addresses use the IPv4-mapped IPv6 form
//! (`::ffff:a.b.c.d`), so one map serves both families and a dual-stack socket
//! connecting to a mapped address is handled like an IPv4 one.
#![no_std]

/// Names of the maps and programs in the eBPF object, used by the agent to find them.
pub mod names {
    pub const CONFIG: &str = "FERRY_CONFIG";
    pub const SERVICES: &str = "FERRY_SERVICES";
    pub const ORIG_BY_COOKIE: &str = "FERRY_ORIG_BY_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "FERRY_ORIG_BY_TUPLE";
    pub const COUNTERS: &str = "FERRY_COUNTERS";
    pub const PROG_CONNECT4: &str = "ferry_connect4";
    pub const PROG_CONNECT6: &str = "ferry_connect6";
    pub const PROG_SOCK_OPS: &str = "ferry_track_established";

    // The socket-joining object (`ferry-join`), loaded separately so that a
    // kernel without sockmap still gets capture.
    pub const JOIN_CONFIG: &str = "FERRY_JOIN_CONFIG";
    pub const JOIN_SRC: &str = "FERRY_JOIN_SRC";
    pub const JOIN_DST: &str = "FERRY_JOIN_DST";
    pub const JOIN_STATE: &str = "FERRY_JOIN_STATE";
    pub const JOIN_REC: &str = "FERRY_JOIN_REC";
    pub const JOIN_COUNTERS: &str = "FERRY_JOIN_COUNTERS";
    pub const PROG_JOIN_SOCK_OPS: &str = "ferry_join_enroll";
    pub const PROG_JOIN_MSG: &str = "ferry_join_msg";
}

/// Capacity of the service map (VIP:port entries).
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the LRU maps holding original destinations in flight.
pub const MAX_IN_FLIGHT: u32 = 262_144;

/// `CaptureConfig::flags`: the eBPF programs emit aya-log records.
pub const FLAG_LOG: u32 = 1 << 0;
/// `CaptureConfig::flags`: an IPv4 redirect target is configured.
pub const FLAG_V4: u32 = 1 << 1;
/// `CaptureConfig::flags`: an IPv6 redirect target is configured.
pub const FLAG_V6: u32 = 1 << 2;

/// `CaptureConfig::flags` (join object only): enrol captured client sockets
/// for joining. Without it the join programs do nothing.
pub const FLAG_JOIN: u32 = 1 << 3;

/// IP protocol number of TCP, as in `ServiceKey::protocol`.
pub const PROTO_TCP: u8 = 6;

/// The single entry of the `FERRY_CONFIG` array map. Until the agent writes it,
/// it is all zero and the programs redirect nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where captured IPv4 connects are sent: Ferry's outbound listener address,
    /// network byte order as it sits in memory.
    pub redirect_v4: [u8; 4],
    /// Where captured IPv6 connects are sent (network byte order).
    pub redirect_v6: [u8; 16],
    /// Ferry's outbound listener port, network byte order in memory.
    pub redirect_port: [u8; 2],
    pub _pad: [u8; 2],
    /// Sockets carrying this `SO_MARK` are Ferry's own and are never redirected.
    pub bypass_mark: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// Key of the service map: a mesh service address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv6 address or IPv4-mapped IPv6 address, network byte order.
    pub addr: [u8; 16],
    /// Port, network byte order in memory.
    pub port: [u8; 2],
    /// IP protocol number (`PROTO_TCP`).
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// The agent's index of the service in its current snapshot (diagnostics only).
    pub service_id: u32,
}

/// The destination a captured socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 or IPv4-mapped address, network byte order.
    pub addr: [u8; 16],
    /// Port, network byte order in memory.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    /// The service's id from `ServiceValue`.
    pub service_id: u32,
}

/// Key of the established-connection map: the captured client's own address,
/// which is the peer address Ferry sees on accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    /// Client address (IPv6 or IPv4-mapped), network byte order.
    pub addr: [u8; 16],
    /// Client port, network byte order in memory.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// A captured client socket's connection, as the client sees it: its own
/// address and port, then Ferry's (the redirect target). Ferry builds the
/// same key from its accepted socket's peer and local addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct JoinKey {
    /// Client address (IPv6 or IPv4-mapped), network byte order.
    pub client_addr: [u8; 16],
    /// Ferry's listener address as the client connected to it.
    pub ferry_addr: [u8; 16],
    /// Client port, network byte order in memory.
    pub client_port: [u8; 2],
    /// Ferry's listener port, network byte order in memory.
    pub ferry_port: [u8; 2],
}

/// Per-client-socket state, written only by the eBPF programs (under the
/// client socket's lock): created at establishment, removed at close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinState {
    /// Bytes the `sk_msg` program let through the normal TCP path (to Ferry's
    /// accepted socket) before switching.
    pub passed: u64,
    /// `FERRY_JOIN_DST` key of the upstream socket, once switched.
    pub target: u64,
    /// Non-zero once every further message is redirected to `target`.
    pub switched: u32,
    pub _pad: u32,
}

/// Join record, written only by Ferry: where the client's bytes go once
/// everything sent so far has been relayed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinRecord {
    /// `FERRY_JOIN_DST` key of Ferry's upstream socket.
    pub target: u64,
    /// Bytes Ferry has read from its accepted socket and written to the
    /// upstream socket.
    pub forwarded: u64,
}

/// Indexes of the per-CPU counters in `FERRY_COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Connect4Redirected = 0,
    Connect4Passed = 1,
    Connect4Errors = 2,
    Connect6Redirected = 3,
    Connect6Passed = 4,
    Connect6Errors = 5,
    SockOpsRecorded = 6,
    SockOpsPassed = 7,
    SockOpsErrors = 8,
    /// Join: a captured client socket was enrolled (put in `FERRY_JOIN_SRC`).
    JoinEnrolled = 9,
    /// Join: enrolling failed (map full or refused).
    JoinEnrollErrors = 10,
    /// Join: a client message took the normal TCP path to Ferry.
    JoinPassed = 11,
    /// Join: a client message was redirected into the upstream socket.
    JoinRedirected = 12,
    /// Join: bytes redirected into upstream sockets.
    JoinRedirectedBytes = 13,
    /// Join: a client socket switched to redirection (once per connection).
    JoinSwitched = 14,
    /// Join: a switched socket's target was gone; the message was refused.
    JoinErrors = 15,
}

impl Counter {
    /// Number of counters; the size of the `FERRY_COUNTERS` array.
    pub const COUNT: u32 = 16;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Connect4Redirected,
        Counter::Connect4Passed,
        Counter::Connect4Errors,
        Counter::Connect6Redirected,
        Counter::Connect6Passed,
        Counter::Connect6Errors,
        Counter::SockOpsRecorded,
        Counter::SockOpsPassed,
        Counter::SockOpsErrors,
        Counter::JoinEnrolled,
        Counter::JoinEnrollErrors,
        Counter::JoinPassed,
        Counter::JoinRedirected,
        Counter::JoinRedirectedBytes,
        Counter::JoinSwitched,
        Counter::JoinErrors,
    ];

    /// The capture object's counters (in `FERRY_COUNTERS`).
    pub const CAPTURE: [Counter; 9] = [
        Counter::Connect4Redirected,
        Counter::Connect4Passed,
        Counter::Connect4Errors,
        Counter::Connect6Redirected,
        Counter::Connect6Passed,
        Counter::Connect6Errors,
        Counter::SockOpsRecorded,
        Counter::SockOpsPassed,
        Counter::SockOpsErrors,
    ];

    /// The join object's counters (in `FERRY_JOIN_COUNTERS`).
    pub const JOIN: [Counter; 7] = [
        Counter::JoinEnrolled,
        Counter::JoinEnrollErrors,
        Counter::JoinPassed,
        Counter::JoinRedirected,
        Counter::JoinRedirectedBytes,
        Counter::JoinSwitched,
        Counter::JoinErrors,
    ];

    /// The program that counts it, as named in metrics.
    pub const fn program(self) -> &'static str {
        match self {
            Counter::Connect4Redirected | Counter::Connect4Passed | Counter::Connect4Errors => {
                "connect4"
            }
            Counter::Connect6Redirected | Counter::Connect6Passed | Counter::Connect6Errors => {
                "connect6"
            }
            Counter::SockOpsRecorded | Counter::SockOpsPassed | Counter::SockOpsErrors => {
                "sock_ops"
            }
            Counter::JoinEnrolled | Counter::JoinEnrollErrors => "join_sock_ops",
            Counter::JoinPassed
            | Counter::JoinRedirected
            | Counter::JoinRedirectedBytes
            | Counter::JoinSwitched
            | Counter::JoinErrors => "join_sk_msg",
        }
    }

    /// The event it counts, as named in metrics.
    pub const fn event(self) -> &'static str {
        match self {
            Counter::Connect4Redirected | Counter::Connect6Redirected => "redirected",
            Counter::SockOpsRecorded => "recorded",
            Counter::Connect4Passed | Counter::Connect6Passed | Counter::SockOpsPassed => "passed",
            Counter::Connect4Errors
            | Counter::Connect6Errors
            | Counter::SockOpsErrors
            | Counter::JoinEnrollErrors
            | Counter::JoinErrors => "error",
            Counter::JoinEnrolled => "enrolled",
            Counter::JoinPassed => "passed",
            Counter::JoinRedirected => "redirected",
            Counter::JoinRedirectedBytes => "redirected_bytes",
            Counter::JoinSwitched => "switched",
        }
    }
}

/// Builds the IPv4-mapped IPv6 form of an IPv4 address given in network byte order.
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, has no padding bytes the compiler
    // adds (explicit `_pad` fields fill the gaps) and every bit pattern is valid.
    unsafe impl aya::Pod for super::CaptureConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::JoinKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::JoinState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::JoinRecord {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(
            core::mem::size_of::<CaptureConfig>(),
            4 + 16 + 2 + 2 + 4 + 4
        );
        assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
        assert_eq!(core::mem::size_of::<OrigDst>(), 24);
        assert_eq!(core::mem::size_of::<TupleKey>(), 20);
        assert_eq!(core::mem::size_of::<JoinKey>(), 36);
        assert_eq!(core::mem::size_of::<JoinState>(), 24);
        assert_eq!(core::mem::size_of::<JoinRecord>(), 16);
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
        }
        let split: [Counter; Counter::COUNT as usize] = {
            let mut all = [Counter::Connect4Redirected; Counter::COUNT as usize];
            all[..9].copy_from_slice(&Counter::CAPTURE);
            all[9..].copy_from_slice(&Counter::JOIN);
            all
        };
        assert_eq!(split, Counter::ALL);
    }

    #[test]
    fn mapped_address() {
        assert_eq!(
            v4_mapped([10, 96, 0, 20]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 10, 96, 0, 20]
        );
    }
}
