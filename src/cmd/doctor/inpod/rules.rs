//! istio-cni's rules in pod network namespaces: its in-pod capture is a set of iptables chains
//! named `ISTIO_*` (ISTIO_PRERT, ISTIO_OUTPUT, ISTIO_REDIRECT, ...) in each pod's namespace.
//! doctor finds the namespaces of processes in pod cgroups and dumps their rules from inside
//! (`nsenter --net=/proc/PID/ns/net iptables-save`, `nft list ruleset`).

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use resolver::cgroup_path::{parse_cgroup_path, CgroupKind};

use super::super::Outcome;

/// How many pod network namespaces doctor looks into: each costs a few process starts, and
/// istio-cni, when it runs, has put its chains in every pod it captured.
pub const MAX_POD_NAMESPACES: usize = 20;

/// What to do when istio-cni's chains are found.
pub const FIX_ISTIO_RULES: &str = "istio-cni's node agent put these chains there: install \
                                   Istio without istio-cni (README) or stop it; its rules \
                                   capture these pods' traffic a second time, and two node \
                                   agents would each hand ztunnel pods";

/// The pod cgroup of a process, from its `/proc/PID/cgroup`: the pod-level path of the first
/// line (the unified one, or a v1 hierarchy's) that parses as a pod's.
pub fn pod_cgroup_of(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        match parse_cgroup_path(path) {
            CgroupKind::Pod(pod) => Some(pod.pod_path),
            _ => None,
        }
    })
}

/// A pod network namespace and a process in it to enter it through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetns {
    /// The namespace's inode.
    pub netns: u64,
    /// The lowest pid in it.
    pub pid: u32,
    /// The pod cgroups of its processes.
    pub pod_cgroups: Vec<String>,
}

/// The network namespaces of the processes under `proc_root` that are in pod cgroups, each
/// once, by lowest pid. `own_netns` (the node's: hostNetwork pods share it) is left out: it
/// holds no pod's in-pod rules.
pub fn pod_namespaces(proc_root: &Path, own_netns: u64) -> Vec<PodNetns> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut found: Vec<PodNetns> = Vec::new();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        // A process that exited meanwhile is simply not there any more.
        let Some(pod) = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|text| pod_cgroup_of(&text))
        else {
            continue;
        };
        let Ok(netns) = std::fs::metadata(dir.join("ns/net")).map(|m| m.ino()) else {
            continue;
        };
        if netns == own_netns {
            continue;
        }
        match found.iter_mut().find(|ns| ns.netns == netns) {
            Some(ns) if !ns.pod_cgroups.contains(&pod) => ns.pod_cgroups.push(pod),
            Some(_) => {}
            None => found.push(PodNetns {
                netns,
                pid,
                pod_cgroups: vec![pod],
            }),
        }
    }
    found
}

/// The `ISTIO_*` chains an `iptables-save` dump declares (`:ISTIO_OUTPUT - [0:0]`).
pub fn istio_chains_in_iptables_save(text: &str) -> Vec<String> {
    let chains: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix(':')?.split_whitespace().next())
        .filter(|chain| chain.starts_with("ISTIO_"))
        .map(str::to_string)
        .collect();
    chains.into_iter().collect()
}

/// The `ISTIO_*` chains of an `nft list ruleset` dump (iptables-nft's chains show there too),
/// and tables named `istio*`, which is how istio-cni's nftables mode names its own.
pub fn istio_chains_in_nft_ruleset(text: &str) -> Vec<String> {
    let mut found = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("chain"), Some(chain), _) if chain.starts_with("ISTIO_") => {
                found.insert(chain.to_string());
            }
            (Some("table"), Some(family), Some(table))
                if table.to_ascii_lowercase().starts_with("istio") =>
            {
                found.insert(format!("nft table {family} {table}"));
            }
            _ => {}
        }
    }
    found.into_iter().collect()
}

/// A program that dumps a namespace's rules.
#[derive(Debug, Clone)]
pub struct DumpTool {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: &'static [&'static str],
    /// Whether its output is `nft list ruleset`'s (else `iptables-save`'s).
    pub nft: bool,
}

/// The programs found to enter namespaces and dump rules, and those missing.
#[derive(Debug, Clone, Default)]
pub struct RuleTools {
    pub nsenter: Option<PathBuf>,
    pub dumps: Vec<DumpTool>,
    /// Dumps not installed, whose rules are therefore not looked at.
    pub missing: Vec<&'static str>,
}

/// (name, arguments, nft output, whether its absence is worth a note). Rules written by the
/// legacy iptables are invisible to the nf_tables one and to nft, so the legacy dumps run too
/// when present; their absence means there are no legacy rules to miss.
const DUMPS: [(&str, &[&str], bool, bool); 5] = [
    ("iptables-save", &[], false, true),
    ("ip6tables-save", &[], false, true),
    ("iptables-legacy-save", &[], false, false),
    ("ip6tables-legacy-save", &[], false, false),
    ("nft", &["list", "ruleset"], true, true),
];

/// Looks for the programs on `PATH` and in the sbin directories, which a non-login `PATH`
/// often lacks.
pub fn find_rule_tools() -> RuleTools {
    let mut tools = RuleTools {
        nsenter: find_program("nsenter"),
        ..RuleTools::default()
    };
    for (name, args, nft, noted) in DUMPS {
        match find_program(name) {
            Some(program) => tools.dumps.push(DumpTool {
                name,
                program,
                args,
                nft,
            }),
            None if noted => tools.missing.push(name),
            None => {}
        }
    }
    tools
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What the dumps of one namespace showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetnsRules {
    /// istio-cni's chains (and tables) found.
    pub found: BTreeSet<String>,
    /// Dumps that failed, with their error.
    pub errors: Vec<String>,
}

/// Dumps the rules of the network namespace of `pid` with every tool, from inside it.
pub fn scan_netns(proc_root: &Path, pid: u32, tools: &RuleTools) -> NetnsRules {
    let mut rules = NetnsRules::default();
    let Some(nsenter) = &tools.nsenter else {
        rules.errors.push("nsenter is not installed".into());
        return rules;
    };
    let netns = proc_root.join(pid.to_string()).join("ns/net");
    for tool in &tools.dumps {
        let output = std::process::Command::new(nsenter)
            .arg(format!("--net={}", netns.display()))
            .arg(&tool.program)
            .args(tool.args)
            .stdin(std::process::Stdio::null())
            .output();
        match output {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                rules.found.extend(match tool.nft {
                    true => istio_chains_in_nft_ruleset(&text),
                    false => istio_chains_in_iptables_save(&text),
                });
            }
            Ok(out) => rules.errors.push(format!(
                "{} in the network namespace of pid {pid} ({}): {}",
                tool.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => rules.errors.push(format!(
                "nsenter {} for {} in the network namespace of pid {pid}: {e}",
                nsenter.display(),
                tool.name
            )),
        }
    }
    rules
}

/// The words for what was found: `total` pod namespaces on the node, the ones looked into
/// with what their dumps showed, and the dumps that are not installed.
pub fn summarize_pod_rules(
    total: usize,
    scans: &[(PodNetns, NetnsRules)],
    missing: &[&str],
) -> Outcome {
    let looked = format!(
        "{} pod network namespaces looked into ({total} on this node)",
        scans.len()
    );
    let with_rules: Vec<String> = scans
        .iter()
        .filter(|(_, rules)| !rules.found.is_empty())
        .map(|(ns, rules)| {
            format!(
                "{} (pid {}): {}",
                ns.pod_cgroups.join(", "),
                ns.pid,
                rules.found.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    if !with_rules.is_empty() {
        return Outcome::Fail {
            what: format!(
                "istio-cni's chains in {} of {looked}: {}",
                with_rules.len(),
                with_rules.join("; ")
            ),
            fix: FIX_ISTIO_RULES.into(),
        };
    }
    if total == 0 {
        return Outcome::Pass(
            "no pod network namespace to look into (no process in a kubepods cgroup outside \
             this network namespace)"
                .into(),
        );
    }
    let errors: Vec<&str> = scans
        .iter()
        .flat_map(|(_, rules)| rules.errors.iter().map(String::as_str))
        .collect();
    let clean = scans
        .iter()
        .filter(|(_, rules)| rules.errors.is_empty())
        .count();
    if clean == 0 {
        return Outcome::Warn {
            what: format!(
                "not checked: no dump worked in the {looked}: {}",
                errors.join("; ")
            ),
            fix: "run doctor as root in the host's PID namespace (hostPID) with CAP_SYS_ADMIN \
                  to enter pod namespaces"
                .into(),
        };
    }
    let mut detail = format!("no ISTIO_* chain in the {looked}");
    if !missing.is_empty() {
        detail.push_str(&format!(
            "; not checked with (not installed): {}",
            missing.join(", ")
        ));
    }
    if !errors.is_empty() {
        detail.push_str(&format!("; failed: {}", errors.join("; ")));
    }
    Outcome::Pass(detail)
}

/// Looks into up to `limit` pod network namespaces for istio-cni's chains.
pub fn pod_rules_check(proc_root: &Path, limit: usize) -> Outcome {
    let tools = find_rule_tools();
    if tools.nsenter.is_none() {
        return Outcome::Warn {
            what: "not checked: nsenter is not installed, so pod namespaces cannot be entered"
                .into(),
            fix: "install util-linux (nsenter) where doctor runs".into(),
        };
    }
    if tools.dumps.is_empty() {
        return Outcome::Warn {
            what: "not checked: neither iptables-save nor nft is installed".into(),
            fix: "install iptables or nftables where doctor runs to let it look for \
                  istio-cni's chains in pod namespaces"
                .into(),
        };
    }
    let own = proc_root.join("self/ns/net");
    let own_netns = match std::fs::metadata(&own) {
        Ok(meta) => meta.ino(),
        Err(e) => {
            return Outcome::Warn {
                what: format!("not checked: {}: {e}", own.display()),
                fix: "mount /proc".into(),
            }
        }
    };
    let all = pod_namespaces(proc_root, own_netns);
    let scans: Vec<(PodNetns, NetnsRules)> = all
        .iter()
        .take(limit)
        .map(|ns| (ns.clone(), scan_netns(proc_root, ns.pid, &tools)))
        .collect();
    summarize_pod_rules(all.len(), &scans, &tools.missing)
}

#[cfg(test)]
mod tests;
