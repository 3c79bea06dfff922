//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is looked for at `$FERRY_EBPF_OBJECT` or, by default, at
//! `<workspace>/target/ebpf/bpfel-unknown-none/release/ferry-ebpf` (under
//! `$CARGO_TARGET_DIR` when that is set). When it is missing an empty object
//! is embedded, so `cargo build` and `cargo test` work without the eBPF
//! toolchain; such a binary refuses to start capture and says how to fix it.

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
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("ferry-ebpf.o");
    match std::fs::read(&object) {
        Ok(bytes) => {
            std::fs::write(&out, bytes).expect("write OUT_DIR/ferry-ebpf.o");
        }
        Err(_) => {
            println!(
                "cargo:warning=eBPF object not found at {}; ferry will be built without capture (run `cargo xtask build-ebpf`)",
                object.display()
            );
            std::fs::write(&out, b"").expect("write OUT_DIR/ferry-ebpf.o");
        }
    }
}
