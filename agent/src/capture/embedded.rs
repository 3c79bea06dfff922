//! The eBPF objects, embedded at build time by `agent/build.rs` from the output
//! of `cargo xtask build-ebpf`. Empty when the object had not been built; the
//! agent then refuses to start capture with a message saying how to build it.

pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-ebpf.o"));

/// The socket-joining object (`ferry-join`); empty when not built.
pub(super) static JOIN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-join.o"));
