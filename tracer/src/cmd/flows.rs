//! `tracer flows`: one agent's flows, or every agent's merged.
use std::{cmp::Reverse, collections::BinaryHeap};

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

/// Asks every agent at once and merges the newest `limit` flows across them (each agent
/// already answers its newest `limit`); agents that fail are listed under `unreachable`, which
/// is not fatal unless every agent failed.
async fn fan_out(
    targets: Vec<nodes::Target>,
    q: &tracer_model::FlowQuery,
) -> Result<Merged, String> {
    let asked = targets.len();
    let mut newest = Newest::new(q.limit.unwrap_or(tracer_model::query::DEFAULT_LIMIT));
    let mut merged = Merged {
        multi: true,
        ..Merged::default()
    };
    let mut unreachable = Vec::new();
    nodes::ask_each(
        targets,
        |a| {
            let q = q.clone();
            async move { a.flows(&q).await }
        },
        |i, node, result| match result {
            Ok(page) => {
                merged.matched += page.matched;
                for (pos, flow) in page.flows.into_iter().enumerate() {
                    newest.offer((i as u64) << 32 | pos as u64, &node, flow);
                }
            }
            Err(e) => unreachable.push((i, node, e.to_string())),
        },
    )
    .await;
    // Answers come as agents finish; the report follows the targets' order.
    unreachable.sort_by_key(|(i, ..)| *i);
    merged.unreachable = unreachable.into_iter().map(|(_, n, e)| (n, e)).collect();
    if asked > 0 && merged.unreachable.len() == asked {
        let why: Vec<String> = merged
            .unreachable
            .iter()
            .map(|(a, e)| format!("{a}: {e}"))
            .collect();
        return Err(format!("no agent answered: {}", why.join("; ")));
    }
    merged.flows = newest.into_sorted();
    Ok(merged)
}

/// The newest `limit` flows of a merge, kept as answers arrive: the client holds the result,
/// not every node's answer. Ties go by the order given with each flow (the target's index,
/// then the flow's place in its page), so the answer does not depend on which agent was
/// quicker.
struct Newest {
    limit: usize,
    /// Min-heap on (last_seen, later order first): the top is the first to go.
    heap: BinaryHeap<Reverse<Kept>>,
}

struct Kept {
    last_seen: String,
    seq: Reverse<u64>,
    flow: NodeFlow,
}

impl Kept {
    fn key(&self) -> (&str, Reverse<u64>) {
        (&self.last_seen, self.seq)
    }
}

impl PartialEq for Kept {
    fn eq(&self, other: &Kept) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Kept {}
impl PartialOrd for Kept {
    fn partial_cmp(&self, other: &Kept) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Kept {
    fn cmp(&self, other: &Kept) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl Newest {
    fn new(limit: usize) -> Newest {
        Newest {
            limit,
            heap: BinaryHeap::with_capacity(limit.min(4096) + 1),
        }
    }

    fn offer(&mut self, order: u64, node: &str, flow: FlowView) {
        if self.limit == 0 {
            return;
        }
        let kept = Kept {
            // RFC 3339 strings of one format sort as time.
            last_seen: flow.last_seen.clone(),
            seq: Reverse(order),
            flow: NodeFlow {
                node: node.to_string(),
                flow,
            },
        };
        if self.heap.len() == self.limit {
            match self.heap.peek() {
                Some(Reverse(oldest)) if kept > *oldest => {
                    self.heap.pop();
                }
                _ => return,
            }
        }
        self.heap.push(Reverse(kept));
    }

    /// Newest first.
    fn into_sorted(self) -> Vec<NodeFlow> {
        // Ascending on Reverse = descending on (last_seen, earlier order first).
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(k)| k.flow)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(id: u64, last_seen: &str) -> Result<FlowView, serde_json::Error> {
        let mut f: FlowView = serde_json::from_str(include_str!(
            "../../tests/golden/masquerade-not-applied-named.flow.json"
        ))?;
        f.id = id;
        f.last_seen = last_seen.to_string();
        Ok(f)
    }

    /// The bounded merge answers what sorting every node's flows and taking the first `limit`
    /// would, ties in the order given.
    #[test]
    fn the_newest_flows_across_nodes_equal_a_full_sort() -> Result<(), serde_json::Error> {
        let times = [
            "2026-11-27T10:00:03.000000Z",
            "2026-11-27T10:00:01.000000Z",
            "2026-11-27T10:00:03.000000Z",
            "2026-11-27T10:00:02.000000Z",
            "2026-11-27T10:00:05.000000Z",
            "2026-11-27T10:00:01.000000Z",
            "2026-11-27T10:00:04.000000Z",
            "2026-11-27T10:00:03.000000Z",
        ];
        let mut all = Vec::new();
        for (i, t) in times.iter().enumerate() {
            all.push((format!("node-{}", i % 3), flow(i as u64, t)?));
        }
        for limit in 0..=times.len() + 1 {
            let mut newest = Newest::new(limit);
            // Offered out of order: ties still go by the order given.
            for (i, (node, f)) in all.iter().enumerate().rev() {
                newest.offer(i as u64, node, f.clone());
            }
            let got: Vec<(String, u64)> = newest
                .into_sorted()
                .into_iter()
                .map(|nf| (nf.node, nf.flow.id))
                .collect();
            let mut want: Vec<&(String, FlowView)> = all.iter().collect();
            want.sort_by(|a, b| b.1.last_seen.cmp(&a.1.last_seen));
            let want: Vec<(String, u64)> = want
                .into_iter()
                .take(limit)
                .map(|(n, f)| (n.clone(), f.id))
                .collect();
            assert_eq!(got, want, "limit {limit}");
        }
        Ok(())
    }
}
