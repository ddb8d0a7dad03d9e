//! A small node of the test's own for the end-to-end tests and the datapath benchmarks:
//! cgroups, two network namespaces wired with a veth pair, fixed addresses, and the workloads
//! file that describes them.
//!
//! ```text
//!  cgroups (T = the test's own cgroup)          network namespaces
//!  T/outside           agent, services          "node": ztunnel 10.99.0.1 fd00:99::1 (lo)
//!  T/attach            programs attached here           service 10.96.0.10 fd00:96::10 (lo)
//!  T/attach/ztunnel    the fake ztunnel                 veth 10.99.1.1/24 fd00:99:1::1/64
//!  T/attach/pods/app   the ambient pod          "pod":  veth 10.99.1.2/24 fd00:99:1::2/64
//!  T/attach/pods/other a pod outside the mesh           default routes via the node
//!  T/attach/host       a host process
//!  T/attach/exempt     an exempt host process (kubelet)
//! ```
//!
//! The fake ztunnel, the service and host processes live in the "node" namespace; pods live
//! in the "pod" namespace. Addresses are the same in every mesh: namespaces keep them apart.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{NetNs, TestCgroup};

pub const ZTUNNEL4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
pub const ZTUNNEL6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1));
pub const SERVICE4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
pub const SERVICE6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10));
pub const NODE4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 1, 1));
pub const NODE6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 1, 0, 0, 0, 0, 1));
pub const POD4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 1, 2));
pub const POD6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 1, 0, 0, 0, 0, 2));
/// The service port.
pub const SERVICE_PORT: u16 = 80;

/// The cgroups and namespaces of one mesh; everything is removed on drop (cgroups last, after
/// their processes were killed).
pub struct Mesh {
    pub pod_ns: NetNs,
    pub node_ns: NetNs,
    pub cgroup: TestCgroup,
    /// `T/attach`: where the programs are attached.
    pub attach: String,
    pub outside: String,
    pub ztunnel: String,
    pub app: String,
    pub other: String,
    pub host: String,
    pub exempt: String,
}

impl Mesh {
    pub fn new(prefix: &str) -> std::io::Result<Self> {
        let cgroup = TestCgroup::new(prefix)?;
        let attach = cgroup.child("attach")?;
        let mesh = Mesh {
            outside: cgroup.child("outside")?,
            ztunnel: cgroup.child("attach/ztunnel")?,
            app: cgroup.child("attach/pods/app")?,
            other: cgroup.child("attach/pods/other")?,
            host: cgroup.child("attach/host")?,
            exempt: cgroup.child("attach/exempt")?,
            attach,
            pod_ns: NetNs::new(&format!("{prefix}-pod"))?,
            node_ns: NetNs::new(&format!("{prefix}-node"))?,
            cgroup,
        };
        let (node, pod) = (&mesh.node_ns, &mesh.pod_ns);
        node.veth("zb-node", pod, "zb-pod")?;
        for cidr in [
            "10.99.0.1/32",
            "10.96.0.10/32",
            "fd00:99::1/128",
            "fd00:96::10/128",
        ] {
            node.addr("lo", cidr)?;
        }
        node.addr("zb-node", "10.99.1.1/24")?;
        node.addr("zb-node", "fd00:99:1::1/64")?;
        pod.addr("zb-pod", "10.99.1.2/24")?;
        pod.addr("zb-pod", "fd00:99:1::2/64")?;
        pod.route("default", "10.99.1.1")?;
        pod.route("default", "fd00:99:1::1")?;
        Ok(mesh)
    }

    /// The directory of the attach cgroup (for `--attach-cgroup`).
    pub fn attach_dir(&self) -> std::path::PathBuf {
        self.cgroup.dir_of(&self.attach)
    }

    /// Starts `BINARY --log-level warn run --standalone --workloads FILE` on this mesh (the
    /// programs on the attach cgroup, maps pinned under `pin_dir`, no ops endpoint) plus
    /// `extra` flags, in the `outside` cgroup (so that it dies with the test's cgroup), stderr
    /// to `log`. The caller kills it (by its PID) when done.
    pub fn spawn_standalone_agent(
        &self,
        binary: &std::path::Path,
        pin_dir: &std::path::Path,
        workloads: &std::path::Path,
        log: &std::path::Path,
        extra: &[&std::ffi::OsStr],
    ) -> std::io::Result<std::process::Child> {
        let mut agent = std::process::Command::new(binary);
        agent
            .args(["--log-level", "warn", "run", "--standalone", "--workloads"])
            .arg(workloads)
            .arg("--attach-cgroup")
            .arg(self.attach_dir())
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(["--metrics-addr", "off"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log)?);
        // SAFETY: the hook only writes to cgroup.procs.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(
                &mut agent,
                self.cgroup.pre_exec_join(&self.outside),
            );
        }
        agent.spawn()
    }

    /// The cgroup id of a path of this mesh.
    pub fn id(&self, path: &str) -> u64 {
        self.cgroup.id_of(path).expect("mesh cgroup exists")
    }

    /// A workloads file (v1): ztunnel with `ztunnel_addresses` (none: the key `address` is
    /// `auto`, and no process runs there to learn it from), the app pod ambient, the exempt
    /// host cgroup; `extra` workload entries are appended as they are.
    pub fn workloads(&self, ztunnel_addresses: &[IpAddr], extra: &str) -> String {
        let zt = if ztunnel_addresses.is_empty() {
            "auto".to_string()
        } else {
            list(ztunnel_addresses)
        };
        format!(
            "version: 1\n\
             ztunnel:\n  cgroup: {ztunnel}\n  address: {zt}\n\
             workloads:\n  - name: e2e/app\n    cgroup: {app}\n    address: {pod}\n    mode: ambient\n\
             {extra}\
             exempt:\n  - {exempt}\n",
            ztunnel = self.ztunnel,
            app = self.app,
            pod = list(&[POD4, POD6]),
            exempt = self.exempt,
        )
    }
}

fn list(ips: &[IpAddr]) -> String {
    let quoted: Vec<String> = ips.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The service's addresses.
pub fn service_addrs() -> [SocketAddr; 2] {
    [
        SocketAddr::new(SERVICE4, SERVICE_PORT),
        SocketAddr::new(SERVICE6, SERVICE_PORT),
    ]
}
