//! `tracer watch pod/NAME|iface/NAME`: attach on demand, follow the flows, detach on exit.
use std::{io::IsTerminal, time::Duration};

use tracer::{
    cli::{Output, WatchArgs},
    client::Agent,
};
use tracer_model::{attach::AttachRequest, AttachHow, FlowQuery, WatchLine};

use super::render;

pub async fn run(
    args: WatchArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let agent = Agent::new(&args.conn.agent, args.conn.token()?);
    let (kind, name) = args
        .target
        .split_once('/')
        .ok_or_else(|| format!("{:?}: expected pod/NAME or iface/NAME", args.target))?;
    let is_pod = matches!(kind, "pod" | "po" | "pods");
    let (body, q, label) = match kind {
        _ if is_pod => {
            let namespace = args
                .namespace
                .clone()
                .unwrap_or_else(tracer::cli::kubectl_namespace);
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
    let attached = agent.attach(&body).await.map_err(|e| e.to_string())?;
    let ours = attached.how == AttachHow::OnDemand;
    let iface = attached.iface.clone();
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
    };
    if ours && attached.id != 0 {
        match agent.detach(attached.id).await {
            Ok(()) => eprintln!("tracer: detached from {iface}"),
            Err(e) => eprintln!("tracer: detaching from {iface}: {e}"),
        }
    }
    result
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
