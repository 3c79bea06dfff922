//! The `ferry` binary: everything lives in the library; see `ferry::cli`.

fn main() -> std::process::ExitCode {
    tune_allocator();
    ferry::cli::main()
}

/// glibc's allocator hands the top of a heap back to the kernel once more
/// than 128 KiB is free there, and serves blocks of 128 KiB and up with
/// their own mmap. A relay moving 64 KiB buffers crosses both lines all the
/// time, so every buffer's pages were unmapped and faulted in again (tens of
/// thousands of page faults per second in `cargo xtask bench-tunnel`).
/// Fixed thresholds of 1 MiB keep at most that much free memory per arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    const ONE_MIB: libc::c_int = 1024 * 1024;
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // any other thread exists, with valid parameter numbers and values.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_MIB);
        libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_MIB);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
