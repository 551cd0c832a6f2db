//! `tracer watch pod/NAME|iface/NAME`: attach on demand, follow the flows, detach on exit.
//! On the node it asks the local agent; from anywhere else (`kubectl tracer watch`) it finds
//! the pod's node and that node's agent through the API server and talks to it there. The
//! hold is a lease the client renews while it runs, so a killed client's attachment lapses.
use std::{cell::Cell, io::IsTerminal, time::Duration};

use tracer::{
    apiserver::Cluster,
    cli::{Output, Via, WatchArgs},
    client::{Agent, ClientError},
};
use tracer_model::{
    attach::{AttachBody, AttachRequest},
    AttachHow, FlowQuery, WatchLine,
};

use super::render;

/// The agent that serves `target` on `args`' path.
async fn agent_for(args: &WatchArgs, namespace: &str, pod: Option<&str>) -> Result<Agent, String> {
    if args.conn.via(false) == Via::Direct {
        return Ok(Agent::new(&args.conn.agent, args.conn.token()?));
    }
    let cluster = Cluster::connect(&args.conn.kubeconfig(), &args.conn.agents_namespace)
        .await
        .map_err(|e| e.to_string())?;
    let node = match (pod, &args.node) {
        (_, Some(node)) => node.clone(),
        (Some(pod), None) => cluster
            .pod_node(namespace, pod)
            .await
            .map_err(|e| e.to_string())?,
        (None, None) => {
            return Err("iface/NAME through the API server: say whose, with --node NAME".into())
        }
    };
    let agent_pod = cluster.agent_on(&node).await.map_err(|e| e.to_string())?;
    let token = match args.conn.token()? {
        Some(t) => t,
        None => cluster.token().await.map_err(|e| e.to_string())?,
    };
    eprintln!(
        "tracer: node {node}: agent {}/{} through the API server",
        cluster.namespace, agent_pod.name
    );
    Ok(cluster.agent(&agent_pod, Some(token)))
}

pub async fn run(
    args: WatchArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let (kind, name) = args
        .target
        .split_once('/')
        .ok_or_else(|| format!("{:?}: expected pod/NAME or iface/NAME", args.target))?;
    let is_pod = matches!(kind, "pod" | "po" | "pods");
    // As kubectl: -n, else the kubeconfig context's namespace.
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| args.conn.kubeconfig().namespace());
    let agent = agent_for(&args, &namespace, is_pod.then_some(name)).await?;
    let (body, q, label) = match kind {
        _ if is_pod => {
            let veth = tracer::calico::veth_name_with_prefix(&args.iface_prefix, &namespace, name);
            let pod = format!("{namespace}/{name}");
            if let Some(ips) = local_pod_ips(&veth).await {
                eprintln!("tracer: pod {pod} is on {veth} here ({ips})");
            }
            let q = FlowQuery {
                pod: Some((namespace.clone(), name.to_string())),
                ..FlowQuery::default()
            };
            (
                AttachRequest::Pod { pod: pod.clone() },
                q,
                format!("pod {pod} ({veth})"),
            )
        }
        "iface" | "if" => {
            tracer::calico::check_iface_name(name).map_err(|e| e.to_string())?;
            (
                AttachRequest::Iface {
                    iface: name.to_string(),
                },
                FlowQuery::default(),
                format!("interface {name}"),
            )
        }
        other => {
            return Err(format!(
                "unknown target kind {other:?}: use pod/NAME or iface/NAME"
            ))
        }
    };
    let ttl = Duration::from(args.lease_ttl).as_secs().max(1);
    let body = AttachBody {
        target: body,
        ttl_seconds: Some(ttl),
    };
    let attached = agent.attach(&body).await.map_err(|e| e.to_string())?;
    let ours = attached.how == AttachHow::OnDemand;
    let iface = attached.iface.clone();
    // The hold to let go of on exit; a lapsed lease is taken again by `renew`.
    let held = Cell::new((attached.id, attached.lease.map(|l| l.id)));
    eprintln!("tracer: watching {label}; Ctrl-C to stop");
    let color =
        std::io::stdout().is_terminal() && matches!(args.output, Output::Table | Output::Wide);
    let mut stream_agent = agent.clone();
    // A watch runs until stopped: no overall deadline on the stream.
    stream_agent.timeout = Duration::from_secs(3600 * 24 * 365);
    let output = args.output;
    let follow = stream_agent.watch(&q, |line| {
        let f = match line {
            WatchLine::Heartbeat { .. } => return true,
            WatchLine::Skipped { skipped } => {
                eprintln!("tracer: fell behind the agent; {skipped} changed flows were skipped");
                return true;
            }
            WatchLine::Flow(f) => f,
        };
        // iface/NAME: the stream carries every flow; keep those that crossed the interface.
        if !is_pod && !f.path.iter().any(|h| h.iface == iface) {
            return true;
        }
        print!("{}", render::watch_output(&f, output, color));
        true
    });
    let result = tokio::select! {
        r = follow => r.map_err(|e| e.to_string()),
        _ = stop => Ok(()),
        _ = renew(&agent, &body, ttl, &held) => Ok(()),
    };
    let (id, lease) = held.get();
    if ours && id != 0 {
        match agent.detach(id, lease).await {
            Ok(()) => eprintln!("tracer: detached from {iface}"),
            Err(e) => eprintln!("tracer: detaching from {iface}: {e}"),
        }
    }
    result
}

/// Renews the lease every third of its time to live, forever; a lease the agent no longer
/// has (it lapsed while the network was away) is taken again. Failures are said and retried.
async fn renew(agent: &Agent, body: &AttachBody, ttl: u64, held: &Cell<(u32, Option<u64>)>) {
    let every = Duration::from_millis(ttl * 1000 / 3).max(Duration::from_millis(500));
    loop {
        tokio::time::sleep(every).await;
        let (id, Some(lease)) = held.get() else {
            // Nothing held (an automatic attachment, or an agent without leases).
            std::future::pending::<()>().await;
            continue;
        };
        match agent.renew(id, lease).await {
            Ok(_) => {}
            Err(ClientError::Status { status: 404, .. }) => match agent.attach(body).await {
                Ok(a) => {
                    eprintln!(
                        "tracer: the agent had let go of {} (lease lapsed); attached again",
                        a.iface
                    );
                    held.set((a.id, a.lease.map(|l| l.id)));
                }
                Err(e) => eprintln!("tracer: attaching again: {e}"),
            },
            Err(e) => eprintln!("tracer: renewing the lease: {e}"),
        }
    }
}

/// The pod's addresses from this node's routes through its veth, when run on its node.
async fn local_pod_ips(veth: &str) -> Option<String> {
    let (conn, handle, _) = rtnetlink::new_connection().ok()?;
    tokio::spawn(conn);
    let facts = tracer::netlink::snapshot(&handle).await.ok()?;
    let link = facts.link_by_name(veth)?;
    let ips: Vec<String> = facts
        .routes
        .iter()
        .filter(|r| r.oif == Some(link.index) && r.dst.prefix() >= 32)
        .map(|r| r.dst.addr().to_string())
        .collect();
    Some(if ips.is_empty() {
        "no /32 route".into()
    } else {
        ips.join(", ")
    })
}
