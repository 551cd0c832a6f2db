//! Which agents a client asks: one, an explicit list, or every DaemonSet pod behind the
//! headless Service; and asking them all at once.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tracer::client::{Agent, ClientError};

/// Every address behind the headless Service's name: one per DaemonSet pod.
pub async fn discover(service: &str, port: u16) -> Result<Vec<String>, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((service, port))
        .await
        .map_err(|e| {
            format!("resolving {service}: {e} (use --agents URL,URL outside the cluster)")
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

/// Runs `ask` against every agent at once; the answers come back in the agents' order.
pub async fn ask_all<T, F, Fut>(
    agents: &[String],
    token: Option<String>,
    ask: F,
) -> Vec<(String, Result<T, ClientError>)>
where
    T: Send + 'static,
    F: Fn(Agent) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>> + Send + 'static,
{
    let mut tasks = Vec::new();
    for a in agents {
        let mut agent = Agent::new(a, token.clone());
        agent.timeout = Duration::from_secs(5);
        tasks.push((a.clone(), tokio::spawn(ask(agent))));
    }
    let mut out = Vec::new();
    for (name, t) in tasks {
        if let Ok(r) = t.await {
            out.push((name, r));
        }
    }
    out
}
