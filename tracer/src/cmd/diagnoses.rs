//! `tracer diagnoses`: one report per agent.
use serde::Serialize;
use tracer::{
    cli::{DiagnosesArgs, Output},
    client::Agent,
};
use tracer_model::DiagnosesAnswer;

use super::{nodes, render};

/// `-o json`: one line per node.
#[derive(Serialize)]
struct NodeDiagnoses<'a> {
    node: &'a str,
    diagnoses: &'a DiagnosesAnswer,
}

pub async fn run(args: DiagnosesArgs) -> Result<(), String> {
    let token = args.conn.token()?;
    // As for `flows`: an explicit --agents list wins over discovery.
    let agents = if !args.agents.is_empty() {
        args.agents.clone()
    } else if args.all_nodes {
        nodes::discover(&args.service, args.agent_port).await?
    } else {
        vec![args.conn.agent.clone()]
    };
    let answers = nodes::ask_all(
        &agents,
        token,
        |a: Agent| async move { a.diagnoses().await },
    )
    .await;
    let mut failed = 0;
    for (node, result) in &answers {
        match result {
            Ok(d) => match args.output {
                Output::Json => println!(
                    "{}",
                    render::sorted_json(&NodeDiagnoses { node, diagnoses: d })
                ),
                Output::Yaml => print!("{}", render::yaml(&NodeDiagnoses { node, diagnoses: d })),
                Output::Table | Output::Wide => {
                    if agents.len() > 1 {
                        println!("== {node}");
                    }
                    print!("{}", render::diagnoses(d, args.output == Output::Wide));
                }
            },
            Err(e) => {
                failed += 1;
                eprintln!("tracer: node {node} did not answer: {e}");
            }
        }
    }
    if failed == agents.len() {
        return Err("no agent answered".into());
    }
    Ok(())
}
