//! Network namespaces of the test's own (`ip netns`), removed on drop, and the placement of a
//! child process into a cgroup and a namespace before it execs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::TestCgroup;

/// A named network namespace (`/run/netns/NAME`), deleted on drop. Loopback is up.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `ip netns add <unique name>`, then `lo` up.
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let name = crate::unique_name(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n NAME ARGS...`; fails with ip's stderr.
    pub fn ip(&self, args: &[&str]) -> std::io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a setup command inside the namespace (`ip netns exec`: only for commands that do
    /// not care about cgroups, since it remounts /sys), e.g. `iptables`.
    pub fn exec(&self, program: &str, args: &[&str]) -> std::io::Result<()> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Like [`NetNs::exec`], with stdin fed from `input` (e.g. `iptables-restore`).
    pub fn exec_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: &[u8],
    ) -> std::io::Result<()> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped").write_all(input)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "ip netns exec {} {program}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`)
    /// from a thread that entered it: net sysctls resolve by the writer's namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> std::io::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.in_thread(move || std::fs::write(&path, value))?
    }

    /// Opens `/run/netns/NAME` (close-on-exec).
    pub fn file(&self) -> std::io::Result<File> {
        File::open(format!("/run/netns/{}", self.name))
    }

    /// Runs `f` on a new thread that entered this namespace (threads may switch their own
    /// network namespace), and returns its result.
    pub fn in_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let ns = self.file()?;
        std::thread::spawn(move || -> std::io::Result<T> {
            enter(&ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("thread in netns panicked"))?
    }

    /// Spawns a thread that entered this namespace and then runs `f` (for listeners that live
    /// as long as the test).
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<std::io::Result<T>>> {
        let ns = self.file()?;
        Ok(std::thread::spawn(move || -> std::io::Result<T> {
            enter(&ns)?;
            Ok(f())
        }))
    }

    /// A veth pair: `here` in this namespace, `there` in `other`, both up.
    pub fn veth(&self, here: &str, other: &NetNs, there: &str) -> std::io::Result<()> {
        self.ip(&[
            "link",
            "add",
            here,
            "type",
            "veth",
            "peer",
            "name",
            there,
            "netns",
            &other.name,
        ])?;
        self.ip(&["link", "set", here, "up"])?;
        other.ip(&["link", "set", there, "up"])
    }

    /// Adds an address (`10.0.0.1/24` or `fd00::1/64`; IPv6 without duplicate detection, so it
    /// is usable at once).
    pub fn addr(&self, dev: &str, cidr: &str) -> std::io::Result<()> {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev])
        }
    }

    /// Adds a route (`ip route add DST via GW`).
    pub fn route(&self, dst: &str, via: &str) -> std::io::Result<()> {
        let family = if via.contains(':') { "-6" } else { "-4" };
        self.ip(&[family, "route", "add", dst, "via", via])
    }

    /// Places a child in a cgroup and in this namespace before it execs: it joins the cgroup
    /// first, then `setns(2)`s into `/run/netns/NAME`, so that its exec event already carries
    /// both, without `ip netns exec` (which remounts /sys).
    pub fn place(&self, cmd: &mut Command, cgroup: &TestCgroup, path: &str) -> std::io::Result<()> {
        let mut join = cgroup.pre_exec_join(path);
        let ns = self.file()?;
        // SAFETY: the hooks only call write(2) on a prepared path and setns(2) on an open fd.
        unsafe {
            cmd.pre_exec(move || {
                join()?;
                enter(&ns)
            });
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("testkit: cannot delete netns {}: {e}", self.name);
        }
    }
}

/// `setns(fd, CLONE_NEWNET)` for the calling thread.
fn enter(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns on an open namespace descriptor.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a command; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
