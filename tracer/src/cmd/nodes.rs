//! Which agents a client asks: one, an explicit list, every DaemonSet pod behind the headless
//! Service, or, through the API server, every agent pod (or one node's); and asking them all
//! with a bounded fan-out.
use std::{
    io::{IsTerminal, Write},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
};

use futures::StreamExt;
use tracer::{
    apiserver::Cluster,
    cli::{AgentConn, NodeSelection, Via},
    client::{Agent, ClientError},
};
use tracer_model::defaults;

/// Set when some agents answered and others did not: the exit status says so.
static PARTIAL: AtomicBool = AtomicBool::new(false);

/// Whether an answer merged from several agents lacks some of them.
pub fn partial() -> bool {
    PARTIAL.load(Ordering::Relaxed)
}

/// An agent to ask, and the name its answers go under: the node's name through the API
/// server, the agent's URL otherwise.
pub struct Target {
    pub node: String,
    pub agent: Agent,
    /// Why this agent is not asked (its pod is not running or not ready): it is reported as
    /// not answering without spending a slot and a timeout on it.
    pub skip: Option<String>,
}

/// The agents to ask, and whether the answer is a merge of several (named by node).
pub async fn targets(
    conn: &AgentConn,
    scope: &NodeSelection,
) -> Result<(Vec<Target>, bool), String> {
    let direct = |urls: Vec<String>, token: Option<String>| -> Vec<Target> {
        urls.into_iter()
            .map(|u| Target {
                agent: Agent::new(&u, token.clone()),
                node: u,
                skip: None,
            })
            .collect()
    };
    if !scope.agents.is_empty() {
        if scope.node.is_some() {
            return Err("--node picks among the agents the API server lists, not --agents".into());
        }
        return Ok((direct(scope.agents.to_vec(), conn.token()?), true));
    }
    match conn.via(false) {
        Via::Direct => {
            if scope.node.is_some() {
                return Err(
                    "--node picks an agent through the API server (--via apiserver, a kubeconfig)"
                        .into(),
                );
            }
            let token = conn.token()?;
            if scope.all_nodes {
                let urls = discover(&scope.service, scope.agent_port).await?;
                Ok((direct(urls, token), true))
            } else {
                Ok((direct(vec![conn.agent.clone()], token), false))
            }
        }
        Via::Apiserver => {
            if !scope.all_nodes && scope.node.is_none() {
                return Err(
                    "through the API server, say which agents to ask: --all-nodes or --node NAME"
                        .into(),
                );
            }
            let cluster = Cluster::connect(&conn.kubeconfig(), &conn.agents_namespace)
                .await
                .map_err(|e| e.to_string())?;
            let pods = cluster
                .agents(scope.node.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            if pods.is_empty() {
                return Err(match &scope.node {
                    Some(n) => format!(
                        "no tracer agent on node {n} (no pod {} in namespace {})",
                        defaults::AGENT_SELECTOR,
                        conn.agents_namespace
                    ),
                    None => format!(
                        "no tracer agents (no pod {} in namespace {}; is the DaemonSet deployed?)",
                        defaults::AGENT_SELECTOR,
                        conn.agents_namespace
                    ),
                });
            }
            let token = match conn.token()? {
                Some(t) => Some(t),
                None => Some(cluster.token().await.map_err(|e| e.to_string())?),
            };
            // One node asked by name is asked whatever its pod's state says; across all nodes,
            // pods that cannot answer are named and skipped.
            let targets = pods
                .iter()
                .map(|p| Target {
                    node: p.node.clone(),
                    agent: cluster.agent(p, token.clone()),
                    skip: if scope.node.is_some() {
                        None
                    } else {
                        p.not_ready.clone()
                    },
                })
                .collect();
            // Answers through the API server always name their node.
            Ok((targets, true))
        }
    }
}

/// Every address behind the headless Service's name: one per DaemonSet pod.
pub async fn discover(service: &str, port: u16) -> Result<Vec<String>, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((service, port))
        .await
        .map_err(|e| {
            format!(
                "resolving {service}: {e} (outside the cluster: --via apiserver with a \
                 kubeconfig, or --agents URL,URL)"
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{service} has no endpoints"));
    }
    Ok(addrs
        .into_iter()
        .map(|a| match a.ip() {
            IpAddr::V6(v6) => format!("http://[{v6}]:{}", a.port()),
            IpAddr::V4(v4) => format!("http://{v4}:{}", a.port()),
        })
        .collect())
}

/// Runs `ask` against every target, [`defaults::fan_out`] at a time, and gives the answers back
/// in the targets' order. While it waits, a progress line on stderr when that is a terminal.
/// Marks the run [`partial`] when some failed and others answered.
pub async fn ask_all<T, F, Fut>(
    targets: Vec<Target>,
    ask: F,
) -> Vec<(String, Result<T, ClientError>)>
where
    F: Fn(Agent) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut out = Vec::with_capacity(targets.len());
    ask_each(targets, ask, |i, node, answer| out.push((i, node, answer))).await;
    out.sort_by_key(|(i, ..)| *i);
    out.into_iter().map(|(_, node, a)| (node, a)).collect()
}

/// [`ask_all`], handing each answer to `on_answer` with its target's index as it comes, in the
/// order the agents answer, instead of keeping them all: a merge that keeps only what it shows
/// needs memory for the result and the answers in flight, not for every node's; and one slow
/// agent holds one slot, never the answers behind it. Targets with a `skip` reason are not
/// asked: they are answered at once with [`ClientError::NotAsked`].
pub async fn ask_each<T, F, Fut>(
    targets: Vec<Target>,
    ask: F,
    mut on_answer: impl FnMut(usize, String, Result<T, ClientError>),
) where
    F: Fn(Agent) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let total = targets.len();
    let progress = total > 1 && std::io::stderr().is_terminal();
    let (mut answered, mut failed) = (0usize, 0usize);
    let mut asked = Vec::with_capacity(total);
    for (i, t) in targets.into_iter().enumerate() {
        match t.skip {
            Some(why) => {
                failed += 1;
                on_answer(i, t.node, Err(ClientError::NotAsked(why)));
            }
            None => asked.push((i, t)),
        }
    }
    let slots = defaults::fan_out(asked.len());
    let mut answers = futures::stream::iter(asked.into_iter().map(|(i, t)| {
        let mut agent = t.agent;
        // One agent that is down or slow must not hold a slot for long.
        agent.connect_timeout = defaults::FAN_OUT_CONNECT_TIMEOUT;
        agent.timeout = defaults::FAN_OUT_ANSWER_TIMEOUT;
        let asked = ask(agent);
        async move { (i, t.node, asked.await) }
    }))
    .buffer_unordered(slots);
    while let Some((i, node, answer)) = answers.next().await {
        match answer {
            Ok(_) => answered += 1,
            Err(_) => failed += 1,
        }
        on_answer(i, node, answer);
        if progress {
            eprint!("\rtracer: {answered}/{total} agents answered, {failed} did not");
            let _ = std::io::stderr().flush();
        }
    }
    if progress {
        // Clear the progress line.
        eprint!("\r\x1b[K");
    }
    if failed > 0 && answered > 0 {
        PARTIAL.store(true, Ordering::Relaxed);
    }
}
