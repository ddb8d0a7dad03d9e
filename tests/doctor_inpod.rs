//! `zbridge doctor`'s in-pod checks, the real binary on this machine: the ZDS socket served by
//! a process of the test's own (named `istio-cni`, then `zbridge`), absent and stale; and (root)
//! istio-cni's chains in the network namespace of a process in a pod-like cgroup.

mod doctor_support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use doctor_support::{check_lines, doctor};

/// Runs doctor with Kubernetes checks (the in-pod ones come with them) against an absent
/// kubeconfig (those fail at once and are not looked at here); the ZDS socket at `socket`.
fn doctor_inpod(socket: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("absent-kubeconfig");
    let (_, out) = doctor(
        &[],
        &[
            "--zds-socket",
            &socket.to_string_lossy(),
            "--kubeconfig",
            &kubeconfig.to_string_lossy(),
            "--node-name",
            "node-a",
        ],
    );
    out
}

/// A listening `SOCK_SEQPACKET` Unix socket bound at `path`, as ZDS's server makes it.
fn seqpacket_listener(path: &Path) -> OwnedFd {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(
        bytes.len() < addr.sun_path.len(),
        "{} too long",
        path.display()
    );
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a filled sockaddr_un of `len` bytes; fd is open.
    let bound = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
    assert_eq!(
        bound,
        0,
        "bind {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: listen(2) on an open, bound socket.
    let listening = unsafe { libc::listen(fd.as_raw_fd(), 16) };
    assert_eq!(listening, 0, "listen: {}", std::io::Error::last_os_error());
    fd
}

fn sleep_binary() -> PathBuf {
    ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("sleep is installed")
}

/// A `sleep` started as `name` (a symlink of that name, so its comm is `name`), killed and
/// reaped on drop.
struct Named {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Named {
    /// Started holding `socket` (as its descriptor 3), which this process then closes: the
    /// child is the socket's only holder.
    fn holding(name: &str, socket: OwnedFd) -> Named {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join(name);
        std::os::unix::fs::symlink(sleep_binary(), &program).unwrap();
        let mut cmd = Command::new(&program);
        cmd.arg("600");
        let raw = socket.as_raw_fd();
        // SAFETY: between fork and exec the hook only calls dup2(2) or fcntl(2): the socket
        // becomes descriptor 3 without the close-on-exec flag, so it survives the exec.
        unsafe {
            cmd.pre_exec(move || {
                let done = match raw {
                    3 => libc::fcntl(3, libc::F_SETFD, 0),
                    _ => libc::dup2(raw, 3),
                };
                match done {
                    -1 => Err(std::io::Error::last_os_error()),
                    _ => Ok(()),
                }
            });
        }
        let child = cmd.spawn().expect("start the holder");
        drop(socket);
        Named { child, _dir: dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_zds_socket_served_by_another_process_is_named_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let holder = Named::holding("istio-cni", seqpacket_listener(&socket));
    let out = doctor_inpod(&socket);
    let zds = check_lines(&out, "zds socket");
    assert!(zds.starts_with("FAIL"), "{out}");
    assert!(
        zds.contains(&format!(
            "{} is served by pid {} (istio-cni, {}), not zbridge",
            socket.display(),
            holder.pid(),
            sleep_binary().display()
        )),
        "{out}"
    );
    assert!(
        zds.contains(
            "fix: istio-cni's node agent serves this socket: install Istio without istio-cni \
             (README) or stop it; two node agents would each hand ztunnel pods"
        ),
        "{out}"
    );
}

#[test]
fn a_zds_socket_served_by_zbridge_passes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let holder = Named::holding("zbridge", seqpacket_listener(&socket));
    let out = doctor_inpod(&socket);
    let zds = check_lines(&out, "zds socket");
    assert!(zds.starts_with("PASS"), "{out}");
    assert!(
        zds.contains(&format!("served by zbridge (pid {})", holder.pid())),
        "{out}"
    );
}

#[test]
fn an_absent_or_stale_zds_socket_passes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let out = doctor_inpod(&socket);
    assert!(
        check_lines(&out, "zds socket").starts_with(&format!(
            "PASS  zds socket       {}: not served yet (zbridge run serves it)",
            socket.display()
        )),
        "{out}"
    );
    // Bound and closed: the file stays, nobody listens.
    drop(seqpacket_listener(&socket));
    let out = doctor_inpod(&socket);
    let zds = check_lines(&out, "zds socket");
    assert!(
        zds.starts_with("PASS") && zds.contains("zbridge run replaces it"),
        "{out}"
    );
}

#[test]
fn standalone_has_no_in_pod_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = doctor(&[], &["--standalone", "--pin-dir", "/nonexistent/pins"]);
    assert!(
        !out.contains("zds socket") && !out.contains("istio-cni rules"),
        "{out}"
    );
    // `run --standalone` serves no ZDS socket: the flag makes no sense with it.
    let socket = dir.path().join("ztunnel.sock");
    let (code, _) = doctor(
        &[],
        &["--standalone", "--zds-socket", &socket.to_string_lossy()],
    );
    assert_eq!(code, 2, "clap refuses conflicting flags with exit code 2");
}

#[test]
fn istio_chains_in_a_pod_namespace_are_named_and_fail() {
    if !testkit::require_root("doctor_inpod_istio_chains_in_a_pod_namespace") {
        return;
    }
    if Command::new("iptables").arg("--version").output().is_err() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true: scripts/setup.sh installs iptables"
        );
        eprintln!(
            "SKIPPED doctor_inpod_istio_chains_in_a_pod_namespace: iptables is not installed \
             (scripts/setup.sh installs it)"
        );
        return;
    }
    // A pod as the kubelet lays it out (cgroupfs driver), under the test's own cgroup.
    let cgroup = testkit::TestCgroup::new("doctor-inpod").unwrap();
    let pod = format!(
        "{}/kubepods/besteffort/pod{}",
        cgroup.path, "0f8e0e4c-7d4b-4e1a-9c3f-5d6e7f809aab"
    );
    let container = cgroup
        .child(&format!(
            "{}/{}",
            pod.strip_prefix(&format!("{}/", cgroup.path)).unwrap(),
            "ab".repeat(32)
        ))
        .unwrap();
    let netns = testkit::NetNs::new("doctor-inpod").unwrap();
    netns
        .exec("iptables", &["-t", "nat", "-N", "ISTIO_OUTPUT"])
        .unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    netns.place(&mut cmd, &cgroup, &container).unwrap();
    // Declared after the cgroup and the namespace: killed before they go.
    let app = Sleeping(cmd.spawn().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let out = doctor_inpod(&dir.path().join("ztunnel.sock"));
    let rules = check_lines(&out, "istio-cni rules");
    assert!(rules.starts_with("FAIL"), "{out}");
    assert!(
        rules.contains(&format!("{pod} (pid {}): ISTIO_OUTPUT", app.0.id())),
        "{out}"
    );
    assert!(
        rules.contains(
            "fix: istio-cni's node agent put these chains there: install Istio \
                        without istio-cni (README) or stop it"
        ),
        "{out}"
    );
}

/// A child killed and reaped on drop.
struct Sleeping(Child);

impl Drop for Sleeping {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
