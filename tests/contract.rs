//! docs/openapi.yaml is the API's contract, and it cannot drift:
//! - every answer pinned in tracer/tests/golden/ (one per verdict and cause, written by the
//!   agent's own rendering code) validates against its endpoint's schema in strict mode, so an
//!   undocumented field fails (scripts/check-openapi.py);
//! - Schemathesis (PyPI, installed by scripts/setup.sh) runs with all of its checks against a
//!   live agent holding real flows: schema-valid requests must be accepted, invalid ones refused,
//!   every answer must match its schema, undeclared methods get 405 with `Allow`. /watch is
//!   left out because it streams.
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{TestResult, READY};
use tracer_lab::{topo::SingleNode, traffic};
use tracer_model::FlowsPage;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check_openapi(golden: &Path) -> Result<std::process::Output, Box<dyn std::error::Error>> {
    Ok(Command::new("python3")
        .arg(repo().join("scripts/check-openapi.py"))
        .arg(repo().join("docs/openapi.yaml"))
        .arg(golden)
        .output()?)
}

#[test]
fn golden_answers_conform_to_the_openapi_schema() -> TestResult {
    let golden = repo().join("tracer/tests/golden");
    let out = check_openapi(&golden)?;
    assert!(
        out.status.success(),
        "the API's answers drifted from docs/openapi.yaml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The check is strict: an answer with a field the schema does not list fails it.
    let dir = std::env::temp_dir().join(format!("tracer-contract-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut flow: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden.join("kernel-drop.flow.json"))?)?;
    flow["undocumented"] = serde_json::json!(1);
    std::fs::write(dir.join("kernel-drop.flow.json"), flow.to_string())?;
    let out = check_openapi(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("undocumented"),
        "an undocumented field passed: {out:?}"
    );
    Ok(())
}

#[test]
fn schemathesis_finds_no_contract_violation_on_a_live_agent() -> TestResult {
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let token = "contract-test-token";
    let token_file = std::env::temp_dir().join(format!("tracer-token-{}", lab.prefix));
    std::fs::write(&token_file, format!("{token}\n"))?;
    let mut agent = common::start(&lab.node, &["--token-file", &token_file.to_string_lossy()])?;
    // Ready = programs loaded and the first interface sync done (/readyz needs no token).
    agent.wait_ready(&lab.node, READY)?;
    // Real flows, so /flows answers carry Flow objects for the schema check.
    let answered =
        traffic::tcp_probe(&lab.pod.netns, lab.apiserver_addr(), Duration::from_secs(2))?;
    assert!(
        answered,
        "the pod's connection to the apiserver was not answered"
    );
    let auth = format!("Authorization: Bearer {token}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page: FlowsPage = serde_json::from_str(&lab.node.exec(&[
            "curl",
            "-sf",
            "-H",
            &auth,
            "http://127.0.0.1:9464/flows",
        ])?)?;
        if page.matched > 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err("the probe's flow never showed up".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Hypothesis keeps its example database in the working directory: a scratch one.
    let work = std::env::temp_dir().join(format!("tracer-schemathesis-{}", lab.prefix));
    std::fs::create_dir_all(&work)?;
    let budget = std::env::var("TRACER_SCHEMATHESIS_SECS").unwrap_or_else(|_| "45".into());
    let out = lab
        .node
        .command("timeout")
        .args(["--kill-after=10", "300", "schemathesis", "run"])
        .arg(repo().join("docs/openapi.yaml"))
        .args(["--url", "http://127.0.0.1:9464"])
        .args(["-H", &auth])
        .args(["--checks", "all", "--exclude-path", "/watch"])
        .args(["--max-time", &budget, "--no-color"])
        .current_dir(&work)
        .output();
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_file(&token_file);
    let out = out.map_err(|e| format!("schemathesis: {e} (scripts/setup.sh installs it)"))?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Schemathesis found violations:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It really ran: operations were tested and cases generated.
    assert!(report.contains("generated"), "{report}");
    assert!(
        agent.exited().is_none(),
        "the agent died under Schemathesis"
    );
    Ok(())
}
