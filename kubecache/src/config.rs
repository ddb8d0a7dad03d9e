//! The one way zbridge's commands (`run`, `record`, `doctor`) find their Kubernetes client
//! configuration: the `--kubeconfig` file when one is given, else the in-cluster service
//! account (the DaemonSet), else inferred from `$KUBECONFIG` or `~/.kube/config` (a person on
//! their machine).

use std::path::{Path, PathBuf};

use kube::config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};

/// A client configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: kube::Config,
    /// Where `config` came from, in words for logs and checks (`kubeconfig FILE`,
    /// `in-cluster service account`, `inferred ($KUBECONFIG or ~/.kube/config)`).
    pub origin: String,
}

/// Why no client configuration could be had. Each cause is in the message and not the error's
/// source: a chain printer (anyhow's `{:#}`) would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot build a tokio runtime to read the Kubernetes configuration: {0}")]
    Runtime(std::io::Error),
    #[error("--kubeconfig {}: cannot read it: {error}", path.display())]
    Read {
        path: PathBuf,
        error: KubeconfigError,
    },
    #[error("--kubeconfig {}: cannot make a client configuration of it: {error}", path.display())]
    Use {
        path: PathBuf,
        error: KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a pod with a service account, and none in \
         $KUBECONFIG or ~/.kube/config ({0}); pass --kubeconfig FILE"
    )]
    NotFound(InferConfigError),
}

/// The configuration from `explicit` (the `--kubeconfig` file), else in-cluster, else
/// inferred. Not to be called on a tokio runtime (it runs one of its own to read the file, as
/// kube-rs reads kubeconfigs asynchronously): there, use [`load_async`].
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    // This runtime is gone before the kube cache starts, which must not start inside one.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ConfigError::Runtime)?;
    runtime.block_on(load_async(explicit))
}

/// [`load`], on the caller's tokio runtime.
pub async fn load_async(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    if let Some(path) = explicit {
        let file = Kubeconfig::read_from(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .map_err(|error| ConfigError::Use {
                path: path.to_path_buf(),
                error,
            })?;
        return Ok(Loaded {
            config,
            origin: format!("kubeconfig {}", path.display()),
        });
    }
    if let Ok(config) = kube::Config::incluster() {
        return Ok(Loaded {
            config,
            origin: "in-cluster service account".to_string(),
        });
    }
    // infer() tries the kubeconfig, then in-cluster again: its error names both.
    let config = kube::Config::infer().await.map_err(ConfigError::NotFound)?;
    Ok(Loaded {
        config,
        origin: "inferred ($KUBECONFIG or ~/.kube/config)".to_string(),
    })
}

/// Why [`client_on_own_runtime`] failed; each user turns it into its own error, which says
/// whose client it was.
#[derive(Debug)]
pub(crate) enum ClientError {
    Runtime(std::io::Error),
    Client { url: String, error: kube::Error },
}

/// A current-thread tokio runtime and a Kubernetes client for `config` made in its context
/// (the client spawns its request buffer task there): the kube cache, the status writer and
/// the probe each run their client on a thread of their own.
pub(crate) fn client_on_own_runtime(
    config: kube::Config,
) -> Result<(tokio::runtime::Runtime, kube::Client), ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    let url = config.cluster_url.to_string();
    let client = {
        let _context = runtime.enter();
        kube::Client::try_from(config).map_err(|error| ClientError::Client { url, error })?
    };
    Ok((runtime, client))
}
