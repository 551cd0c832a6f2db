//! The running kernel decides how tracer attaches: TCX links on 6.6 and later, clsact filters
//! before. This runs on the host (TCX) and in the Debian 12 guest of `cargo xtask vm-test`
//! (6.1: clsact), and asks the kernel itself what is attached in each case.
mod common;

use std::time::Duration;

use aya::util::KernelVersion;
use common::{probe_apiserver_and_wait, query, TestResult, READY};
use tracer_lab::topo::SingleNode;
use tracer_model::{
    health::{Status, TcBackend},
    Verdict,
};

/// Names of tracer's programs on `dev` (ingress and egress), from TCX or from tc's filter list.
fn tracer_programs_on(
    lab: &SingleNode,
    dev: &str,
    tcx: bool,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut names = Vec::new();
    if tcx {
        use aya::programs::{SchedClassifier, TcAttachType};
        let dev = dev.to_string();
        names = lab.node.run(move || -> Result<Vec<String>, String> {
            let mut names = Vec::new();
            for kind in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, progs) =
                    SchedClassifier::query_tcx(&dev, kind).map_err(|e| e.to_string())?;
                names.extend(
                    progs
                        .iter()
                        .filter_map(|p| p.name_as_str().map(String::from)),
                );
            }
            Ok(names)
        })??;
    } else {
        for hook in ["ingress", "egress"] {
            // One line a filter: "filter protocol all pref 49152 bpf chain 0 handle 0x1
            // tracer_tc_ingress direct-action not_in_hw id 25 name tracer_tc_ingre tag ...";
            // no clsact qdisc at all means no filters.
            let out = lab
                .node
                .exec(&["tc", "filter", "show", "dev", dev, hook])
                .unwrap_or_default();
            names.extend(out.lines().filter_map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("tracer_tc"))
                    .map(String::from)
            }));
        }
    }
    names.retain(|n| n.starts_with("tracer_tc"));
    Ok(names)
}

#[test]
fn attaches_with_what_the_kernel_offers_and_detaches_on_sigterm() -> TestResult {
    let tcx = KernelVersion::current()? >= KernelVersion::new(6, 6, 0);
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let veth = lab.pod.veth.clone();
    let mut agent = common::start(&lab.node, &["--no-reply-timeout", "2s"])?;
    let health = agent.wait_attached(&lab.node, &[veth.as_str(), "eth0"], READY)?;
    let tc = health.detail.and_then(|d| d.tc);
    let want = if tcx {
        TcBackend::Tcx
    } else {
        TcBackend::Clsact
    };
    assert_eq!(tc, Some(want));
    for dev in [veth.as_str(), "eth0"] {
        let names = tracer_programs_on(&lab, dev, tcx)?;
        assert_eq!(
            names.len(),
            2,
            "{dev}: one ingress and one egress program ({}): {names:?}",
            if tcx { "TCX" } else { "clsact" }
        );
    }
    // Real packets through these attachments.
    probe_apiserver_and_wait(
        &agent,
        &lab,
        &query("proto=tcp")?,
        Duration::from_secs(10),
        |f| f.verdicts.contains(&Verdict::Replied),
    )?;
    let status = agent.signal_and_wait(libc::SIGTERM)?;
    assert!(status.success(), "{status}; log:\n{}", agent.log());
    for dev in [veth.as_str(), "eth0"] {
        let left = tracer_programs_on(&lab, dev, tcx)?;
        assert!(left.is_empty(), "{dev} after SIGTERM: {left:?}");
    }
    Ok(())
}

/// `--tc-mode tcx` is honoured where the kernel has TCX, and on an older kernel (the 6.1 guest)
/// leaves the agent up, not ready, and saying why: never a crash loop.
#[test]
fn tcx_where_the_kernel_lacks_it_is_unsupported_not_a_crash_loop() -> TestResult {
    let tcx = KernelVersion::current()? >= KernelVersion::new(6, 6, 0);
    let lab = SingleNode::build(&SingleNode::healthy())?;
    let mut agent = common::start(&lab.node, &["--tc-mode", "tcx"])?;
    if tcx {
        let health = agent.wait_attached(&lab.node, &[lab.pod.veth.as_str()], READY)?;
        assert_eq!(health.detail.and_then(|d| d.tc), Some(TcBackend::Tcx));
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let health = loop {
        if let Ok(h) = agent.health(&lab.node) {
            if h.status == Status::Unsupported {
                break h;
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("never reported unsupported; log:\n{}", agent.log()).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        health
            .unsupported
            .as_ref()
            .is_some_and(|s| s.contains("6.6")),
        "{health:?}"
    );
    std::thread::sleep(Duration::from_secs(6));
    let h = agent.get(&lab.node, "/healthz")?;
    assert_eq!(h.status, 200, "no restart asked for: {}", h.text());
    assert_eq!(agent.get(&lab.node, "/readyz")?.status, 503);
    Ok(())
}
