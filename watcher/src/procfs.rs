//! Reading the facts of a process from /proc: cgroup v2 path and id, netns, addresses.

use std::path::PathBuf;

/// Errors finding the host's cgroup2 hierarchy.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no cgroup2 filesystem in /proc/self/mountinfo: zbridge needs the unified (v2) hierarchy \
         (mounted at /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)"
    )]
    NoCgroup2,
}

/// Where the cgroup2 hierarchy is mounted, from `/proc/self/mountinfo` (the first cgroup2
/// mount: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, MountError> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|source| MountError::Read { path, source })?;
    cgroup2_mount_in(&text).ok_or(MountError::NoCgroup2)
}

/// The first cgroup2 mount point in a mountinfo text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - cgroup2 cgroup2 rw": the fields after
        // " - " are the filesystem type, the source and the super options.
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let text = "30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                    32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount_in(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            cgroup2_mount_in("32 30 0:28 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_spaces() {
        let text = "31 30 0:27 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(text),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
