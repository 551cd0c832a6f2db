//! `tracer flows`: one agent's flows, or every agent's merged.
use serde::Serialize;
use tracer::cli::{FlowsArgs, Output};
use tracer_model::FlowView;

use super::{nodes, render};

/// A flow of a merged answer, with the agent that has it (ids are only unique per node).
#[derive(Debug, Serialize)]
pub struct NodeFlow {
    /// The node's name through the API server; the agent's URL otherwise.
    pub node: String,
    #[serde(flatten)]
    pub flow: FlowView,
}

/// Flows of one or more agents.
#[derive(Debug, Default)]
pub struct Merged {
    pub flows: Vec<NodeFlow>,
    pub matched: usize,
    /// Agents that did not answer, and why.
    pub unreachable: Vec<(String, String)>,
    /// Whether the answer came from several agents (the table then names the node).
    pub multi: bool,
}

pub async fn run(args: FlowsArgs) -> Result<(), String> {
    let q = args.query();
    let (targets, multi) = nodes::targets(&args.conn, &args.nodes).await?;
    let answer = if multi {
        fan_out(targets, &q).await?
    } else {
        let t = targets.into_iter().next().ok_or("no agent to ask")?;
        let page = t.agent.flows(&q).await.map_err(|e| e.to_string())?;
        Merged {
            matched: page.matched,
            flows: page
                .flows
                .into_iter()
                .map(|flow| NodeFlow {
                    node: t.node.clone(),
                    flow,
                })
                .collect(),
            ..Merged::default()
        }
    };
    match args.output {
        Output::Json => {
            for f in &answer.flows {
                let line = if answer.multi {
                    render::sorted_json(f)
                } else {
                    render::sorted_json(&f.flow)
                };
                println!("{line}");
            }
        }
        Output::Yaml => {
            for f in &answer.flows {
                if answer.multi {
                    print!("{}", render::yaml(f));
                } else {
                    print!("{}", render::yaml(&f.flow));
                }
            }
        }
        Output::Table => print!("{}", render::flows_table(&answer, false)),
        Output::Wide => print!("{}", render::flows_table(&answer, true)),
    }
    for (agent, error) in &answer.unreachable {
        eprintln!("tracer: node {agent:?} did not answer: {error:?}");
    }
    Ok(())
}

/// Asks every agent at once and merges; agents that fail are listed under `unreachable`,
/// which is not fatal unless every agent failed.
async fn fan_out(
    targets: Vec<nodes::Target>,
    q: &tracer_model::FlowQuery,
) -> Result<Merged, String> {
    let asked = targets.len();
    let answers = nodes::ask_all(targets, |a| {
        let q = q.clone();
        async move { a.flows(&q).await }
    })
    .await;
    let mut merged = Merged {
        multi: true,
        ..Merged::default()
    };
    for (node, result) in answers {
        match result {
            Ok(page) => {
                merged.matched += page.matched;
                merged
                    .flows
                    .extend(page.flows.into_iter().map(|flow| NodeFlow {
                        node: node.clone(),
                        flow,
                    }));
            }
            Err(e) => merged.unreachable.push((node, e.to_string())),
        }
    }
    if asked > 0 && merged.unreachable.len() == asked {
        let why: Vec<String> = merged
            .unreachable
            .iter()
            .map(|(a, e)| format!("{a}: {e}"))
            .collect();
        return Err(format!("no agent answered: {}", why.join("; ")));
    }
    // Newest first across nodes (RFC 3339 strings of one format sort as time).
    merged
        .flows
        .sort_by(|a, b| b.flow.last_seen.cmp(&a.flow.last_seen));
    Ok(merged)
}
