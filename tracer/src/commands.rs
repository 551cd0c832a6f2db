//! The client subcommands: `flows`, `watch`, `diagnoses`.
use std::{
    io::IsTerminal,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hyper::Method;
use serde_json::{json, Value};

use crate::{
    cli::{DiagnosesArgs, FlowsArgs, Output, WatchArgs},
    client::Agent,
    report,
};

pub async fn flows(args: FlowsArgs) -> Result<(), String> {
    let token = args.conn.token()?;
    let q = args.query_string();
    let path = if q.is_empty() {
        "/flows".to_string()
    } else {
        format!("/flows?{q}")
    };
    let answer = if args.all_nodes || !args.agents.is_empty() {
        let agents = if args.agents.is_empty() {
            discover(&args.service, args.agent_port).await?
        } else {
            args.agents.clone()
        };
        fan_out(&agents, token, &path).await?
    } else {
        Agent::new(&args.conn.agent, token)
            .get(&path)
            .await
            .map_err(|e| e.to_string())?
    };
    match args.output {
        Output::Json => {
            for f in answer["flows"].as_array().into_iter().flatten() {
                println!("{f}");
            }
        }
        Output::Table => print!("{}", report::flows_table(&answer)),
    }
    for e in answer["unreachable"].as_array().into_iter().flatten() {
        eprintln!("tracer: node {} did not answer: {}", e["agent"], e["error"]);
    }
    Ok(())
}

/// Every address behind the headless Service's name: one per DaemonSet pod.
async fn discover(service: &str, port: u16) -> Result<Vec<String>, String> {
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

/// Asks every agent at once and merges: each flow gets a `node` field; agents that fail are
/// listed under `unreachable`, which is not fatal unless every agent failed.
pub async fn fan_out(
    agents: &[String],
    token: Option<String>,
    path: &str,
) -> Result<Value, String> {
    let mut tasks = Vec::new();
    for a in agents {
        let mut agent = Agent::new(a, token.clone());
        agent.timeout = Duration::from_secs(5);
        let path = path.to_string();
        let name = a.clone();
        tasks.push(tokio::spawn(async move { (name, agent.get(&path).await) }));
    }
    let mut flows: Vec<Value> = Vec::new();
    let mut unreachable = Vec::new();
    let mut matched = 0u64;
    for t in tasks {
        let Ok((name, result)) = t.await else {
            continue;
        };
        match result {
            Ok(v) => {
                matched += v["matched"].as_u64().unwrap_or(0);
                for mut f in v["flows"].as_array().cloned().unwrap_or_default() {
                    f["node"] = json!(name);
                    flows.push(f);
                }
            }
            Err(e) => unreachable.push(json!({"agent": name, "error": e.to_string()})),
        }
    }
    if !agents.is_empty() && unreachable.len() == agents.len() {
        return Err(format!("no agent answered: {}", Value::Array(unreachable)));
    }
    // Newest first across nodes (RFC 3339 strings of one format sort as time).
    flows.sort_by(|a, b| b["last_seen"].as_str().cmp(&a["last_seen"].as_str()));
    Ok(json!({"flows": flows, "matched": matched, "unreachable": unreachable}))
}

pub async fn diagnoses(args: DiagnosesArgs) -> Result<(), String> {
    let token = args.conn.token()?;
    // As for `flows`: an explicit --agents list wins over discovery.
    let agents = if !args.agents.is_empty() {
        args.agents.clone()
    } else if args.all_nodes {
        discover(&args.service, args.agent_port).await?
    } else {
        vec![args.conn.agent.clone()]
    };
    let mut failed = 0;
    for a in &agents {
        let agent = Agent::new(a, token.clone());
        match agent.get("/diagnoses").await {
            Ok(v) => match args.output {
                Output::Json => println!("{}", json!({"node": a, "diagnoses": v})),
                Output::Table => {
                    if agents.len() > 1 {
                        println!("== {a}");
                    }
                    print!("{}", report::diagnoses(&v));
                }
            },
            Err(e) => {
                failed += 1;
                eprintln!("tracer: node {a} did not answer: {e}");
            }
        }
    }
    if failed == agents.len() {
        return Err("no agent answered".into());
    }
    Ok(())
}

pub async fn watch(
    args: WatchArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let agent = Agent::new(&args.conn.agent, args.conn.token()?);
    let (kind, name) = args
        .target
        .split_once('/')
        .ok_or_else(|| format!("{:?}: expected pod/NAME or iface/NAME", args.target))?;
    let (body, filter, label) = match kind {
        "pod" | "po" | "pods" => {
            let veth =
                crate::calico::veth_name_with_prefix(&args.iface_prefix, &args.namespace, name);
            let pod = format!("{}/{name}", args.namespace);
            if let Some(ips) = local_pod_ips(&veth).await {
                eprintln!("tracer: pod {pod} is on {veth} here ({ips})");
            }
            (
                json!({"pod": pod}),
                format!("pod={pod}"),
                format!("pod {pod} ({veth})"),
            )
        }
        "iface" | "if" => {
            crate::calico::check_iface_name(name).map_err(|e| e.to_string())?;
            (
                json!({"iface": name}),
                String::new(),
                format!("interface {name}"),
            )
        }
        other => {
            return Err(format!(
                "unknown target kind {other:?}: use pod/NAME or iface/NAME"
            ))
        }
    };
    let attached = agent
        .json(Method::POST, "/attach", Some(body))
        .await
        .map_err(|e| e.to_string())?;
    let id = attached["id"].as_u64().unwrap_or(0);
    let ours = attached["how"] == "on-demand";
    let iface = attached["iface"].as_str().unwrap_or("").to_string();
    eprintln!("tracer: watching {label}; Ctrl-C to stop");
    let path = if filter.is_empty() {
        "/watch".to_string()
    } else {
        format!("/watch?{filter}")
    };
    let color = std::io::stdout().is_terminal() && args.output == Output::Table;
    let mut stream_agent = agent.clone();
    // A watch runs until stopped: no overall deadline on the stream.
    stream_agent.timeout = Duration::from_secs(3600 * 24 * 365);
    let json_out = args.output == Output::Json;
    let follow = stream_agent.stream(&path, |v| {
        if v.get("heartbeat").is_some() {
            return true;
        }
        if let Some(n) = v.get("skipped").and_then(|n| n.as_u64()) {
            eprintln!("tracer: fell behind the agent; {n} changed flows were skipped");
            return true;
        }
        // iface/NAME: the stream carries every flow; keep those that crossed the interface.
        if !iface.is_empty() && kind != "pod" && kind != "po" && kind != "pods" {
            let crossed = v["path"]
                .as_array()
                .is_some_and(|p| p.iter().any(|h| h["iface"] == iface.as_str()));
            if !crossed {
                return true;
            }
        }
        if json_out {
            println!("{v}");
        } else {
            print!("{}", report::watch_line(&v, color));
        }
        true
    });
    let result = tokio::select! {
        r = follow => r.map_err(|e| e.to_string()),
        _ = stop => Ok(()),
    };
    if ours && id != 0 {
        match agent
            .json(Method::DELETE, &format!("/attach/{id}"), None)
            .await
        {
            Ok(_) => eprintln!("tracer: detached from {iface}"),
            Err(e) => eprintln!("tracer: detaching from {iface}: {e}"),
        }
    }
    result
}

/// The pod's addresses from this node's routes through its veth, when run on its node.
async fn local_pod_ips(veth: &str) -> Option<String> {
    let (conn, handle, _) = rtnetlink::new_connection().ok()?;
    tokio::spawn(conn);
    let facts = crate::netlink::snapshot(&handle).await.ok()?;
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
