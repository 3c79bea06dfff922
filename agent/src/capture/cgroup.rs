//! Finding the cgroup v2 hierarchy and the cgroups to enroll.

use std::path::{Component, Path, PathBuf};

/// Errors about cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[source] std::io::Error),
    #[error(
        "no cgroup2 file system is mounted (looked in /proc/self/mountinfo); Ferry needs cgroup v2"
    )]
    NoCgroup2,
    #[error("cgroup {given:?} is not under the cgroup2 mount {mount}")]
    OutsideMount { given: String, mount: PathBuf },
    #[error("cgroup {given:?} does not exist ({path} is not a directory)")]
    Missing { given: String, path: PathBuf },
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    parse_mountinfo(&text).ok_or(CgroupError::NoCgroup2)
}

/// Finds the first cgroup2 mount point in mountinfo text.
pub fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mountpoint = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\NNN`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Turns a configured cgroup (relative to the mount, or absolute under it)
/// into an existing directory path.
pub fn resolve_cgroup(mount: &Path, given: &str) -> Result<PathBuf, CgroupError> {
    let p = Path::new(given);
    let path = if p.is_absolute() {
        if !p.starts_with(mount) || p.components().any(|c| c == Component::ParentDir) {
            return Err(CgroupError::OutsideMount {
                given: given.to_owned(),
                mount: mount.to_owned(),
            });
        }
        p.to_owned()
    } else {
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(CgroupError::OutsideMount {
                given: given.to_owned(),
                mount: mount.to_owned(),
            });
        }
        mount.join(p)
    };
    if !path.is_dir() {
        return Err(CgroupError::Missing {
            given: given.to_owned(),
            path,
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "33 24 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_mountinfo(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_mountinfo("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        let escaped = "1 2 0:1 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            parse_mountinfo(escaped),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn resolves_relative_and_rejects_escapes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        assert_eq!(
            resolve_cgroup(dir.path(), "a/b").unwrap(),
            dir.path().join("a/b")
        );
        let abs = dir.path().join("a").display().to_string();
        assert_eq!(
            resolve_cgroup(dir.path(), &abs).unwrap(),
            dir.path().join("a")
        );
        assert!(matches!(
            resolve_cgroup(dir.path(), "../x"),
            Err(CgroupError::OutsideMount { .. })
        ));
        assert!(matches!(
            resolve_cgroup(dir.path(), "/etc"),
            Err(CgroupError::OutsideMount { .. })
        ));
        assert!(matches!(
            resolve_cgroup(dir.path(), "nope"),
            Err(CgroupError::Missing { .. })
        ));
    }
}
