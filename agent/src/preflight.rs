//! Checks, before anything is loaded, that this kernel and this process
//! can run capture; each failure says what is missing and what to do.
//!
//! Required: Linux 5.14 or newer (cgroup BPF links since 5.7, CAP_BPF since
//! 5.8, `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on hash maps since 5.14, which is
//! how the proxy takes a connection's original destination), a cgroup v2 hierarchy, and either CAP_SYS_ADMIN or CAP_BPF +
//! CAP_NET_ADMIN (plus CAP_SYS_ADMIN to attach to cgroups). Ferry refuses to
//! start when one is missing rather than run without capture.

/// What is missing.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "kernel {found} is too old: Ferry's capture needs Linux 5.14 or newer (cgroup BPF links, CAP_BPF, lookup-and-delete on hash maps)"
    )]
    Kernel { found: String },
    #[error(
        "no cgroup v2 hierarchy is mounted: Ferry attaches to pods' cgroup v2 directories (mount cgroup2, e.g. at /sys/fs/cgroup, and run the kubelet with cgroup v2)"
    )]
    NoCgroup2,
    #[error(
        "missing capabilities {missing}: run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (see deploy/kustomize/base/daemonset.yaml)"
    )]
    Capabilities { missing: String },
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Runs every check.
pub fn check() -> Result<(), PreflightError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    check_kernel(release.trim())?;
    if crate::capture::cgroup2_mount().is_err() {
        return Err(PreflightError::NoCgroup2);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    check_caps(&status)
}

/// `5.15.0-91-generic` → ok; `5.10.0` → too old.
pub fn check_kernel(release: &str) -> Result<(), PreflightError> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (5, 14) {
        return Err(PreflightError::Kernel {
            found: release.to_owned(),
        });
    }
    Ok(())
}

/// Checks the effective capability set (`CapEff:` of /proc/self/status).
pub fn check_caps(status: &str) -> Result<(), PreflightError> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN");
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities {
            missing: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert!(check_kernel("6.18.0").is_ok());
        assert!(check_kernel("5.14.0-284.el9.x86_64").is_ok());
        assert!(check_kernel("5.15.0-91-generic").is_ok());
        let e = check_kernel("5.10.0-28-amd64").unwrap_err().to_string();
        assert!(e.contains("5.10.0-28-amd64") && e.contains("5.14"), "{e}");
        assert!(check_kernel("").is_err());
    }

    #[test]
    fn capabilities() {
        // root: everything
        assert!(check_caps("CapEff:\t000001ffffffffff\n").is_ok());
        let bpf_net_sys = (1u64 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN);
        assert!(check_caps(&format!("CapEff:\t{bpf_net_sys:016x}\n")).is_ok());
        let only_bpf = (1u64 << CAP_BPF) | (1 << CAP_NET_ADMIN);
        let e = check_caps(&format!("CapEff:\t{only_bpf:016x}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("missing capabilities CAP_SYS_ADMIN: "), "{e}");
        let e = check_caps("CapEff:\t0000000000000000\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("missing capabilities CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN: "),
            "{e}"
        );
    }
}
