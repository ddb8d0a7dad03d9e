//! The flags of `zbridge run`.

use std::path::PathBuf;

/// Flags of `zbridge run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The process watcher's flags (`--cgroup-root`, `--coalesce-window-us`).
    #[command(flatten)]
    pub watcher: crate::cli::WatcherArgs,

    /// Run without Kubernetes: the workloads file (--workloads) says which cgroup subtrees are
    /// ambient workloads, which one is ztunnel and which host cgroups are exempt.
    #[arg(long, requires = "workloads")]
    pub standalone: bool,

    /// The workloads file (format v1 or v2: shared/spec/workloads-v1.md, -v2.md) of
    /// --standalone. SIGHUP re-reads it; a bad new file is refused and the old one stays. A
    /// v2 file with `ztunnel.mode: inpod` serves ZDS on its `zds` socket.
    #[arg(long, value_name = "FILE", requires = "standalone")]
    pub workloads: Option<PathBuf>,

    /// Kubernetes mode: the kubeconfig to reach the API server with [default: the in-cluster
    /// service account, else $KUBECONFIG or ~/.kube/config].
    #[arg(long, value_name = "FILE", conflicts_with = "standalone")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes mode: this node's name as the API server knows it (set NODE_NAME from the
    /// downward API, fieldRef spec.nodeName). Required: the hostname is never used, it need
    /// not be the node's name.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubernetes mode: do not write the `ambient.istio.io/redirection` annotation on captured
    /// pods (a `pods/status` patch; istiod reads it).
    #[arg(long, conflicts_with = "standalone")]
    pub no_pod_status: bool,

    /// Kubernetes mode: where ztunnel listens for ambient pods. `inpod` (ztunnel's
    /// PROXY_MODE=shared, every current Istio ambient install): ztunnel connects to the ZDS
    /// socket (--zds-socket), is handed each ambient pod's network namespace and listens
    /// inside it; zbridge captures to those listeners. `node`: ztunnel listens on its own pod
    /// address (PROXY_MODE=dedicated). Standalone mode takes this from the workloads file.
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value = "inpod",
        conflicts_with = "standalone"
    )]
    pub ztunnel_mode: ZtunnelMode,

    /// Kubernetes mode, --ztunnel-mode inpod: the Unix socket zbridge serves ZDS on, where
    /// ztunnel connects (ztunnel's ZTUNNEL_SOCKET / Istio's default). Only root may connect.
    #[arg(
        long,
        value_name = "PATH",
        default_value = zds::DEFAULT_SOCKET,
        conflicts_with = "standalone"
    )]
    pub zds_socket: PathBuf,

    /// --ztunnel-mode inpod: where the ZDS state (each pod: sent, acked, error) is written
    /// for `zbridge dump`.
    #[arg(long, value_name = "FILE", default_value = crate::cmd::dump::ZDS_STATUS_FILE)]
    pub zds_status_file: PathBuf,

    /// Kubernetes mode, --ztunnel-mode inpod: send ambient pods' DNS (UDP and TCP port 53)
    /// to ztunnel's DNS proxy in their namespace (127.0.0.1:15053, [::1]:15053); replies
    /// appear to come from the server asked.
    #[arg(long, conflicts_with = "standalone")]
    pub dns_capture: bool,

    /// Kubernetes mode: the namespace of the node's ztunnel (pods labelled app=ztunnel).
    #[arg(
        long,
        value_name = "NS",
        default_value = "istio-system",
        conflicts_with = "standalone"
    )]
    pub system_namespace: String,

    /// Kubernetes mode: a namespace whose pods are never captured (repeat the flag for more;
    /// giving it replaces the default).
    #[arg(
        long = "exclude-namespace",
        value_name = "NS",
        default_values_t = ["kube-system".to_string()],
        conflicts_with = "standalone"
    )]
    pub exclude_namespaces: Vec<String>,

    /// Kubernetes mode: a host cgroup subtree (relative to the cgroup2 root, e.g.
    /// /system.slice/kubelet.service) whose connects to ambient pods are not sent to
    /// ztunnel's inbound port, so that the kubelet's probes reach the pod (repeatable).
    #[arg(
        long = "exempt-cgroup",
        value_name = "PATH",
        conflicts_with = "standalone"
    )]
    pub exempt_cgroups: Vec<String>,

    /// The cgroup directory the programs are attached to [default: the cgroup2 root].
    #[arg(long, value_name = "DIR")]
    pub attach_cgroup: Option<PathBuf>,

    /// Where maps and links are pinned; must be on a bpffs.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/zbridge")]
    pub pin_dir: PathBuf,

    /// When no ztunnel is there for an ambient pod, let it connect as if not in the mesh
    /// (default: its connects fail). Node mode: while no ztunnel address is known. In-pod
    /// mode: until ztunnel has acked the pod over ZDS (its entry then waits for the ack;
    /// by default it is written at once and the pod's connects are refused until ztunnel
    /// listens in its namespace).
    #[arg(long)]
    pub fail_open: bool,

    /// On a clean stop (SIGTERM, SIGINT) remove the programs, links and pins (default: leave
    /// them, so that traffic stays captured while the agent restarts).
    #[arg(long)]
    pub cleanup_on_exit: bool,

    /// Capacity of cgroup_info_map (entries: pods plus ztunnel and exempt cgroups).
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub max_entries: u32,

    /// Address of the metrics and health endpoints (/metrics, /healthz, /readyz), or `off`
    /// [default: 0.0.0.0:15090 in Kubernetes mode, 127.0.0.1:15090 with --standalone].
    #[arg(long, value_name = "ADDR|off")]
    pub metrics_addr: Option<String>,

    /// Let the programs bpf_printk their decisions (read them from tracefs).
    #[arg(long)]
    pub bpf_debug: bool,

    /// Run the hot path's threads (watcher, resolver, programmer: a new pod's first exec to
    /// its map entry) under SCHED_FIFO at priority N (1-99), so that each wakes at once
    /// instead of waiting for a CPU behind other work. Needs CAP_SYS_NICE (not in the shipped
    /// DaemonSet: add it with this flag); if refused, the agent does not start. [default: the
    /// normal policy, with the kernel's shortest slice]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=99))]
    pub realtime_priority: Option<u8>,

    /// Run the hot path's three threads on CPU N, all of them, so that handing an event on
    /// wakes no other CPU (dear in a virtual machine). In a storm of process events the three
    /// stages then share that one CPU. If the process may not use CPU N, the agent does not
    /// start. [default: any CPU]
    #[arg(long, value_name = "N")]
    pub hot_path_cpu: Option<usize>,
}

impl RunArgs {
    /// The hot path's scheduling the flags ask for.
    pub fn hot_path(&self) -> crate::pipeline::HotPathScheduling {
        crate::pipeline::HotPathScheduling {
            realtime_priority: self.realtime_priority,
            cpu: self.hot_path_cpu,
        }
    }
}

/// Where ztunnel listens for ambient pods (Kubernetes mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ZtunnelMode {
    /// In each pod's own network namespace, handed over ZDS (PROXY_MODE=shared).
    Inpod,
    /// In its own network namespace, on its pod address (PROXY_MODE=dedicated).
    Node,
}
