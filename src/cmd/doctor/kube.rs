//! The Kubernetes checks: the node name, the configuration, the API server, then RBAC
//! (`rbac.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::rbac::{check_access, ACCESS_NEEDS};
use super::{fail, Check, Outcome};

/// Where the Kubernetes checks look.
#[derive(Debug, Clone, Default)]
pub struct KubeTarget {
    /// `--kubeconfig`; `None`: in-cluster, else inferred.
    pub kubeconfig: Option<PathBuf>,
    /// `--node-name` / `NODE_NAME`.
    pub node_name: Option<String>,
}
/// The Kubernetes checks: the configuration, the node name, the API server, and RBAC (by
/// SelfSubjectAccessReview, which answers for whoever the configuration authenticates as).
pub fn kube_checks(target: &KubeTarget) -> Vec<Check> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return vec![Check {
                name: "kubernetes",
                outcome: fail(
                    format!("cannot start an async runtime for the API client: {e}"),
                    "report this as a bug, with the error above",
                ),
            }]
        }
    };
    runtime.block_on(kube_checks_async(target))
}

async fn kube_checks_async(target: &KubeTarget) -> Vec<Check> {
    let mut checks = vec![Check {
        name: "node name",
        outcome: check_node_name(target.node_name.as_deref()),
    }];
    let config = match load_kube_config(target.kubeconfig.as_deref()).await {
        Ok((config, source)) => {
            checks.push(Check {
                name: "kube config",
                outcome: Outcome::Pass(format!(
                    "{source}: API server {}",
                    config.cluster_url.to_string().trim_end_matches('/')
                )),
            });
            config
        }
        Err(outcome) => {
            checks.push(Check {
                name: "kube config",
                outcome,
            });
            checks.push(not_checked(
                "api server",
                "the API server and RBAC",
                "kube config",
            ));
            return checks;
        }
    };
    let url = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let client = match kube::Client::try_from(config) {
        Ok(client) => client,
        Err(e) => {
            checks.push(Check {
                name: "api server",
                outcome: fail(
                    format!("cannot make a client for {url}: {e}"),
                    "check the server URL and the credentials of the configuration",
                ),
            });
            checks.push(not_checked("rbac", "RBAC", "api server"));
            return checks;
        }
    };
    let reachable = check_api_server(&client, &url).await;
    let ok = !matches!(reachable, Outcome::Fail { .. });
    checks.push(Check {
        name: "api server",
        outcome: reachable,
    });
    if !ok {
        checks.push(not_checked("rbac", "RBAC", "api server"));
        return checks;
    }
    for need in &ACCESS_NEEDS {
        checks.push(Check {
            name: need.name,
            outcome: check_access(&client, need).await,
        });
    }
    checks
}

/// A check that could not run because an earlier one failed.
fn not_checked(name: &'static str, what: &str, because: &str) -> Check {
    Check {
        name,
        outcome: fail(
            format!("{what} not checked: the {because} check failed"),
            format!("fix the {because} check first"),
        ),
    }
}

pub fn check_node_name(node_name: Option<&str>) -> Outcome {
    match node_name.map(str::trim) {
        Some(name) if !name.is_empty() => Outcome::Pass(format!(
            "{name} (pods are watched with fieldSelector spec.nodeName={name})"
        )),
        _ => fail(
            "no node name: --node-name and NODE_NAME are unset (the hostname is not used: it \
             may differ from the node's name, and a wrong name watches no pods at all)",
            "set NODE_NAME from the downward API in the DaemonSet: env: [{name: NODE_NAME, \
             valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]; or pass --node-name",
        ),
    }
}

/// The configuration as `run` and `record` load it (`kubecache::config`: `--kubeconfig`, else
/// the in-cluster service account, else inferred), with words saying where it came from, and
/// timeouts of the doctor's own: a doctor that hangs on a black-holed address answers nothing.
async fn load_kube_config(kubeconfig: Option<&Path>) -> Result<(kube::Config, String), Outcome> {
    use kubecache::config::{load_async, ConfigError};
    let loaded = match load_async(kubeconfig).await {
        Ok(loaded) => loaded,
        Err(ConfigError::Read { path, error } | ConfigError::Use { path, error }) => {
            return Err(fail(
                format!("cannot use the kubeconfig {}: {error}", path.display()),
                format!(
                    "check the file (`kubectl --kubeconfig {} cluster-info` should work)",
                    path.display()
                ),
            ))
        }
        Err(ConfigError::NotFound(inferred)) => {
            return Err(fail(
                format!("no Kubernetes configuration ({inferred})"),
                "run in a pod with a service account token mounted, or pass --kubeconfig \
                 PATH; on a host without Kubernetes run `zbridge doctor --standalone`",
            ))
        }
        Err(other) => return Err(fail(other.to_string(), "report this as a bug")),
    };
    let mut config = loaded.config;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(10));
    Ok((config, loaded.origin))
}

async fn check_api_server(client: &kube::Client, url: &str) -> Outcome {
    match client.apiserver_version().await {
        Ok(info) => Outcome::Pass(format!(
            "GET {url}/version: Kubernetes {}",
            info.git_version
        )),
        Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => fail(
            format!(
                "GET {url}/version answered {} {}: the credentials were refused",
                status.code, status.message
            ),
            "check the service account token (automountServiceAccountToken) or the kubeconfig's \
             user",
        ),
        Err(e) => fail(
            format!("GET {url}/version failed: {e}"),
            format!(
                "check that {url} is reachable from this node (a hostNetwork pod uses the node's \
                 routes, DNS and firewall) and that the configuration names the right server"
            ),
        ),
    }
}

#[cfg(test)]
mod tests;
