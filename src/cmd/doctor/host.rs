//! The host checks: kernel version, BTF, cgroup2, bpffs under the pin dir, capabilities. Each
//! is a function of the text it reads, so tests feed it a simulated host.

use std::path::{Path, PathBuf};

use super::{fail, Check, Outcome};

/// The files the host checks read; tests point them at simulated hosts.
#[derive(Debug, Clone)]
pub struct HostFiles {
    pub osrelease: PathBuf,
    pub btf: PathBuf,
    pub mountinfo: PathBuf,
    pub status: PathBuf,
}

impl Default for HostFiles {
    fn default() -> Self {
        HostFiles {
            osrelease: "/proc/sys/kernel/osrelease".into(),
            btf: "/sys/kernel/btf/vmlinux".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            status: "/proc/self/status".into(),
        }
    }
}
/// The checks that need no Kubernetes.
pub fn host_checks(files: &HostFiles, pin_dir: &Path) -> Vec<Check> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let mountinfo = read(&files.mountinfo);
    vec![
        Check {
            name: "kernel",
            outcome: match read(&files.osrelease) {
                Ok(text) => check_kernel(text.trim()),
                Err(e) => fail(
                    format!("cannot read the kernel version ({e})"),
                    "run on Linux",
                ),
            },
        },
        Check {
            name: "btf",
            outcome: check_btf(&files.btf),
        },
        Check {
            name: "cgroup2",
            outcome: match &mountinfo {
                Ok(text) => check_cgroup2(text),
                Err(e) => fail(e.clone(), "mount /proc"),
            },
        },
        Check {
            name: "bpffs",
            outcome: match &mountinfo {
                Ok(text) => match check_bpffs(text, pin_dir) {
                    // On a bpffs: the programmer's own check says whether the way to the pins
                    // is root's alone (the loader refuses it otherwise).
                    Outcome::Pass(msg) => match programmer::check_pin_dir(pin_dir) {
                        Ok(_) => Outcome::Pass(msg),
                        Err(e) => fail(e.to_string(), programmer::pins::MOUNT_HINT),
                    },
                    other => other,
                },
                Err(e) => fail(e.clone(), "mount /proc"),
            },
        },
        Check {
            name: "capabilities",
            outcome: match read(&files.status) {
                Ok(text) => check_capabilities(&text),
                Err(e) => fail(e, "mount /proc"),
            },
        },
    ]
}
/// The oldest kernel with every hook and helper the programs use: cgroup getsockopt (5.3),
/// `bpf_get_current_ancestor_cgroup_id` and map batch operations (5.6), BPF links for cgroup
/// programs (5.7); 5.10 is the first long-term kernel with all of them.
const MIN_KERNEL: (u32, u32) = (5, 10);
/// The proc connector accepts an event mask from this version on (fewer wake-ups).
const MASK_KERNEL: (u32, u32) = (6, 6);

pub fn check_kernel(release: &str) -> Outcome {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    let (Some(major), Some(minor)) = (major, minor) else {
        return fail(
            format!("cannot parse the kernel release {release:?}"),
            "report this release string as a bug",
        );
    };
    if (major, minor) < MIN_KERNEL {
        return fail(
            format!(
                "kernel {release} is older than {}.{}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            "upgrade the node's kernel to 5.10 or later (cgroup getsockopt, ancestor cgroup ids, \
             map batch operations and BPF links are needed)",
        );
    }
    if (major, minor) < MASK_KERNEL {
        return Outcome::Warn {
            what: format!("kernel {release}: the proc connector cannot filter event types"),
            fix: "works as is; kernel 6.6 or later wakes the agent less often".into(),
        };
    }
    Outcome::Pass(format!("{release} (5.10 or later needed)"))
}

pub fn check_btf(path: &Path) -> Outcome {
    if path.exists() {
        Outcome::Pass(format!("{} present", path.display()))
    } else {
        fail(
            format!("{} is missing: the kernel exposes no BTF", path.display()),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels are)",
        )
    }
}

pub fn check_cgroup2(mountinfo: &str) -> Outcome {
    match watcher::procfs::cgroup2_mount_in(mountinfo) {
        Some(mount) if mount == Path::new("/sys/fs/cgroup") => {
            Outcome::Pass("unified hierarchy at /sys/fs/cgroup".into())
        }
        Some(mount) => Outcome::Pass(format!(
            "hybrid hierarchy: cgroup2 at {} (pass --cgroup-root {} if it is not found)",
            mount.display(),
            mount.display()
        )),
        None => fail(
            "no cgroup2 filesystem is mounted",
            "mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) or boot with \
             systemd.unified_cgroup_hierarchy=1; in a pod, mount the host's /sys/fs/cgroup",
        ),
    }
}

/// The pin directory (or the nearest existing parent) must be on a bpffs mount.
pub fn check_bpffs(mountinfo: &str, pin_dir: &Path) -> Outcome {
    // The mount that holds the pin dir is the longest mount point that is its prefix.
    let holder = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let point = PathBuf::from(left.split_whitespace().nth(4)?);
            pin_dir
                .starts_with(&point)
                .then_some((point, fstype.to_string()))
        })
        .max_by_key(|(point, _)| point.components().count());
    match holder {
        Some((point, fstype)) if fstype == "bpf" => Outcome::Pass(format!(
            "{} is on the bpffs mounted at {}",
            pin_dir.display(),
            point.display()
        )),
        Some((point, fstype)) => fail(
            format!(
                "{} is on {} ({fstype}), not on a bpffs: pins there would not survive",
                pin_dir.display(),
                point.display()
            ),
            format!(
                "{} (in a pod: mount the host's /sys/fs/bpf), or choose another --pin-dir \
                 than {}",
                programmer::pins::MOUNT_HINT,
                pin_dir.display()
            ),
        ),
        None => fail(
            format!("no mount holds {}", pin_dir.display()),
            programmer::pins::MOUNT_HINT,
        ),
    }
}

/// Capabilities by bit number (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

pub fn check_capabilities(status: &str) -> Outcome {
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return fail("no CapEff line in /proc/self/status", "mount /proc");
    };
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    // CAP_SYS_ADMIN implies what CAP_BPF grants on kernels before 5.8, and still does.
    let missing: Vec<&str> = [
        ("CAP_BPF", has(CAP_BPF) || has(CAP_SYS_ADMIN)),
        ("CAP_NET_ADMIN", has(CAP_NET_ADMIN)),
        ("CAP_SYS_ADMIN", has(CAP_SYS_ADMIN)),
    ]
    .iter()
    .filter(|(_, ok)| !ok)
    .map(|(name, _)| *name)
    .collect();
    if missing.is_empty() {
        Outcome::Pass("CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN are effective".into())
    } else {
        fail(
            format!("missing {}", missing.join(", ")),
            "run as root, or add the capabilities to the container's securityContext \
             (BPF, NET_ADMIN, SYS_ADMIN)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::render;
    use super::super::test_util::is_fail;
    use super::*;

    const HYBRID: &str = "30 24 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
                          31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                          40 24 0:40 / /sys/fs/bpf rw - bpf bpf rw\n\
                          20 1 0:20 / / rw - ext4 /dev/vda rw\n";
    #[test]
    fn kernel_versions() {
        assert!(matches!(check_kernel("6.18.44-fc"), Outcome::Pass(_)));
        assert!(matches!(
            check_kernel("6.1.0-18-amd64"),
            Outcome::Warn { .. }
        ));
        assert!(is_fail(
            &check_kernel("5.4.0-1"),
            "upgrade the node's kernel"
        ));
        assert!(is_fail(&check_kernel("garbage"), "cannot parse"));
    }

    #[test]
    fn cgroup2_found_or_explained() {
        assert!(
            matches!(check_cgroup2(HYBRID), Outcome::Pass(d) if d.contains("hybrid") && d.contains("/sys/fs/cgroup/unified"))
        );
        let v1_only = "32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert!(is_fail(&check_cgroup2(v1_only), "no cgroup2 filesystem"));
    }

    #[test]
    fn bpffs_must_hold_the_pin_dir() {
        assert!(matches!(
            check_bpffs(HYBRID, Path::new("/sys/fs/bpf/zbridge")),
            Outcome::Pass(_)
        ));
        let outcome = check_bpffs(HYBRID, Path::new("/tmp/pins"));
        assert!(is_fail(&outcome, "not on a bpffs"), "{outcome:?}");
        assert!(is_fail(&outcome, programmer::pins::MOUNT_HINT));
    }

    #[test]
    fn capabilities_named_when_missing() {
        let root = "Name:\tzbridge\nCapEff:\t000001ffffffffff\n";
        assert!(matches!(check_capabilities(root), Outcome::Pass(_)));
        let none = "CapEff:\t0000000000000000\n";
        let outcome = check_capabilities(none);
        assert!(
            is_fail(&outcome, "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"),
            "{outcome:?}"
        );
        // NET_ADMIN only: BPF and SYS_ADMIN are named.
        let net_admin = format!("CapEff:\t{:016x}\n", 1u64 << CAP_NET_ADMIN);
        let outcome = check_capabilities(&net_admin);
        assert!(
            is_fail(&outcome, "missing CAP_BPF, CAP_SYS_ADMIN"),
            "{outcome:?}"
        );
    }

    #[test]
    fn simulated_host_renders_actionable_words_and_fails() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let files = HostFiles {
            osrelease: write("osrelease", "6.18.0\n"),
            btf: dir.path().join("no-btf"),
            mountinfo: write("mountinfo", "20 1 0:20 / / rw - ext4 /dev/vda rw\n"),
            status: write("status", "CapEff:\t0000000000000000\n"),
        };
        let checks = host_checks(&files, Path::new("/sys/fs/bpf/zbridge"));
        let mut out = String::new();
        assert!(render(&checks, &mut out));
        assert!(out.contains("PASS  kernel"), "{out}");
        assert!(
            out.contains("FAIL  btf") && out.contains("CONFIG_DEBUG_INFO_BTF"),
            "{out}"
        );
        assert!(out.contains("FAIL  cgroup2"), "{out}");
        assert!(
            out.contains("FAIL  bpffs") && out.contains("not on a bpffs"),
            "{out}"
        );
        assert!(
            out.contains("FAIL  capabilities") && out.contains("missing CAP_BPF"),
            "{out}"
        );
        assert!(out.contains("some required checks failed"), "{out}");
    }
}
