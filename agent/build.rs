//! Embeds the eBPF objects built by `cargo xtask build-ebpf`.
//!
//! The capture object is looked for at `$FERRY_EBPF_OBJECT` or, by default,
//! at `<workspace>/target/ebpf/bpfel-unknown-none/release/ferry-ebpf` (under
//! `$CARGO_TARGET_DIR` when that is set); the socket-joining object
//! `ferry-join` next to it. When one is missing an empty object is embedded,
//! so `cargo build` and `cargo test` work without the eBPF toolchain; such a
//! binary refuses to start capture (or runs without socket joining) and says
//! how to fix it.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=FERRY_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = match std::env::var_os("FERRY_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .map(|t| {
                    if t.is_absolute() {
                        t
                    } else {
                        manifest.join("..").join(t)
                    }
                })
                .unwrap_or_else(|| manifest.join("../target"));
            target.join("ebpf/bpfel-unknown-none/release/ferry-ebpf")
        }
    };
    let join = object.with_file_name("ferry-join");
    embed(&object, "ferry-ebpf.o", "capture");
    embed(&join, "ferry-join.o", "socket joining");
}

fn embed(object: &std::path::Path, name: &str, what: &str) {
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join(name);
    match std::fs::read(object) {
        Ok(bytes) => {
            std::fs::write(&out, bytes).expect("write the object to OUT_DIR");
        }
        Err(_) => {
            println!(
                "cargo:warning=eBPF object not found at {}; ferry will be built without {what} (run `cargo xtask build-ebpf`)",
                object.display()
            );
            std::fs::write(&out, b"").expect("write an empty object to OUT_DIR");
        }
    }
}
