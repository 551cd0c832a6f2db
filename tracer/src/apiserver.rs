//! Reaching the agents from anywhere with a kubeconfig (`kubectl tracer ...`): find a pod's
//! node and that node's agent pod, read the agents' token from its Secret, and talk to the
//! agents through the API server's pods/proxy subresource ([`Agent::through_api_server`]).
//! Everything goes through kube-rs with the kubeconfig's credentials; RBAC needs `get` on
//! `pods` (the watched pod), `list` on the agents' pods, `get`/`create`/`update`/`delete` on
//! `pods/proxy` (the verbs of GET, POST, PUT, DELETE) and `get` on the one Secret.
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Pod, PodStatus, Secret};
use kube::{
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};
use tracer_model::defaults;

use crate::client::Agent;

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("reading the kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("connecting to the API server: {0}")]
    Client(#[from] kube::Error),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Missing(String),
}

/// Which kubeconfig and context, as kubectl takes them.
#[derive(Debug, Clone, Default)]
pub struct KubeconfigChoice {
    /// `--kubeconfig FILE`: this file alone. None: `KUBECONFIG` (a list of files, merged as
    /// kubectl merges them: the first to set a value wins), else `~/.kube/config`.
    pub file: Option<PathBuf>,
    /// `--context NAME`: None is the kubeconfig's current-context.
    pub context: Option<String>,
}

impl KubeconfigChoice {
    /// The namespace kubectl would use: the chosen context's, else `default`. An unreadable
    /// kubeconfig is not an error here: on the direct path the agent, not the API server,
    /// answers.
    pub fn namespace(&self) -> String {
        let kc = match &self.file {
            Some(path) => Kubeconfig::read_from(path).ok(),
            None => Kubeconfig::read().ok(),
        };
        kc.and_then(|kc| {
            let name = self.context.as_deref().or(kc.current_context.as_deref())?;
            kc.contexts
                .iter()
                .find(|c| c.name == name)?
                .context
                .as_ref()?
                .namespace
                .clone()
        })
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".into())
    }

    pub async fn client(&self) -> Result<Client, ApiServerError> {
        let opts = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let mut config = match &self.file {
            Some(path) => {
                kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &opts).await?
            }
            None => kube::Config::from_kubeconfig(&opts).await?,
        };
        // A watch through pods/proxy is quiet between the agent's heartbeats: no read deadline
        // on the connection (each request has its own timeout in the client).
        config.read_timeout = None;
        Ok(Client::try_from(config)?)
    }
}

/// One agent pod of the DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub name: String,
    /// The node it runs on (`spec.nodeName`).
    pub node: String,
    /// Its API port: the container port named `http`, else the default.
    pub port: u16,
    /// Why it cannot answer, from its status: not running, no address yet, or not ready (as
    /// the node controller marks the pods of a node that stopped reporting). `None` when its
    /// status says nothing against it.
    pub not_ready: Option<String>,
}

/// Why a pod with this status cannot answer, if its status says so: a phase other than
/// Running, no pod IP (the API server proxies to it), or a Ready condition that is not True.
/// A status that says nothing (no phase, no conditions) is not held against the pod.
fn not_ready(name: &str, st: &PodStatus) -> Option<String> {
    if let Some(phase) = st.phase.as_deref().filter(|p| *p != "Running") {
        return Some(format!("pod {name} is {phase}"));
    }
    if st.phase.is_some() && st.pod_ip.as_deref().unwrap_or("").is_empty() {
        return Some(format!("pod {name} has no IP yet"));
    }
    let ready = st
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")?;
    if ready.status == "True" {
        return None;
    }
    let why = [ready.reason.as_deref(), ready.message.as_deref()]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    Some(if why.is_empty() {
        format!("pod {name} is not ready (Ready={})", ready.status)
    } else {
        format!("pod {name} is not ready (Ready={}, {why})", ready.status)
    })
}

/// The cluster's API server and where the agents run in it.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// The agents' namespace (deploy/'s `kube-system`).
    pub namespace: String,
}

impl Cluster {
    pub async fn connect(
        choice: &KubeconfigChoice,
        namespace: &str,
    ) -> Result<Cluster, ApiServerError> {
        Ok(Cluster {
            client: choice.client().await?,
            namespace: namespace.to_string(),
        })
    }

    /// The node pod `namespace/name` is scheduled on.
    pub async fn pod_node(&self, namespace: &str, name: &str) -> Result<String, ApiServerError> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .map_err(|source| ApiServerError::Api {
                what: format!("getting pod {namespace}/{name}"),
                source,
            })?;
        pod.spec.and_then(|s| s.node_name).ok_or_else(|| {
            ApiServerError::Missing(format!(
                "pod {namespace}/{name} is not scheduled on a node yet"
            ))
        })
    }

    /// The DaemonSet's pods (label [`defaults::AGENT_SELECTOR`]), on `node` only when given
    /// (field selector `spec.nodeName`), ordered by node name.
    pub async fn agents(&self, node: Option<&str>) -> Result<Vec<AgentPod>, ApiServerError> {
        let mut params = ListParams::default().labels(defaults::AGENT_SELECTOR);
        if let Some(node) = node {
            params = params.fields(&format!("spec.nodeName={node}"));
        }
        let list = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .list(&params)
            .await
            .map_err(|source| ApiServerError::Api {
                what: format!(
                    "listing the tracer agents ({}) in namespace {}",
                    defaults::AGENT_SELECTOR,
                    self.namespace
                ),
                source,
            })?;
        let mut pods: Vec<AgentPod> = list
            .items
            .into_iter()
            .filter_map(|p| {
                let name = p.metadata.name?;
                let spec = p.spec?;
                let port = spec
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|port| port.name.as_deref() == Some("http"))
                    .and_then(|port| u16::try_from(port.container_port).ok())
                    .unwrap_or(defaults::API_PORT);
                let not_ready = p.status.as_ref().and_then(|st| not_ready(&name, st));
                Some(AgentPod {
                    name,
                    node: spec.node_name?,
                    port,
                    not_ready,
                })
            })
            .collect();
        pods.sort_by(|a, b| a.node.cmp(&b.node).then(a.name.cmp(&b.name)));
        Ok(pods)
    }

    /// The agent on `node`.
    pub async fn agent_on(&self, node: &str) -> Result<AgentPod, ApiServerError> {
        self.agents(Some(node))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                ApiServerError::Missing(format!(
                    "no tracer agent on node {node} (no pod {} in namespace {}; is the DaemonSet \
                 deployed there?)",
                    defaults::AGENT_SELECTOR,
                    self.namespace
                ))
            })
    }

    /// The agents' API token, from the Secret deploy/ creates ([`defaults::TOKEN_SECRET`],
    /// key [`defaults::TOKEN_SECRET_KEY`]), trimmed as the agent trims its file.
    pub async fn token(&self) -> Result<String, ApiServerError> {
        let (name, key) = (defaults::TOKEN_SECRET, defaults::TOKEN_SECRET_KEY);
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
            .get(name)
            .await
            .map_err(|source| ApiServerError::Api {
                what: format!(
                    "reading the agents' token from Secret {}/{name} (give --token-file, or get \
                     RBAC `get` on that Secret)",
                    self.namespace
                ),
                source,
            })?;
        let bytes = secret.data.and_then(|mut d| d.remove(key)).ok_or_else(|| {
            ApiServerError::Missing(format!(
                "Secret {}/{name} has no key {key:?}",
                self.namespace
            ))
        })?;
        let token = String::from_utf8_lossy(&bytes.0).trim().to_string();
        if token.is_empty() {
            return Err(ApiServerError::Missing(format!(
                "Secret {}/{name} holds an empty {key:?}",
                self.namespace
            )));
        }
        Ok(token)
    }

    /// A client for `pod`'s agent, through the API server.
    pub fn agent(&self, pod: &AgentPod, token: Option<String>) -> Agent {
        Agent::through_api_server(
            self.client.clone(),
            &self.namespace,
            &pod.name,
            pod.port,
            token,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(v: serde_json::Value) -> Result<PodStatus, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn only_a_status_that_says_so_keeps_an_agent_from_being_asked() -> Result<(), serde_json::Error>
    {
        let ready = serde_json::json!([{"type": "Ready", "status": "True"}]);
        let asked = [
            serde_json::json!({}),
            serde_json::json!({"phase": "Running", "podIP": "10.0.0.1"}),
            serde_json::json!({"phase": "Running", "podIP": "10.0.0.1", "conditions": ready}),
        ];
        for st in asked {
            assert_eq!(not_ready("p", &status(st.clone())?), None, "{st}");
        }
        let skipped = [
            (serde_json::json!({"phase": "Pending"}), "pod p is Pending"),
            (
                serde_json::json!({"phase": "Running", "conditions": ready}),
                "pod p has no IP yet",
            ),
            (
                serde_json::json!({"phase": "Running", "podIP": "10.0.0.1",
                    "conditions": [{"type": "Ready", "status": "False"}]}),
                "pod p is not ready (Ready=False)",
            ),
            (
                serde_json::json!({"phase": "Running", "podIP": "10.0.0.1",
                    "conditions": [{"type": "Ready", "status": "Unknown",
                        "reason": "NodeNotReady", "message": ""}]}),
                "pod p is not ready (Ready=Unknown, NodeNotReady)",
            ),
        ];
        for (st, why) in skipped {
            assert_eq!(not_ready("p", &status(st)?).as_deref(), Some(why));
        }
        Ok(())
    }
}
