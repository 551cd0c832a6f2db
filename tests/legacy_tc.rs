//! The legacy clsact path (kernels 5.11-6.5, forced here with `--tc-mode clsact`): filters are
//! not tied to the agent's process the way TCX links are, so an agent killed with SIGKILL (or by
//! the OOM killer) leaves them behind. The next agent must remove exactly those: never a filter
//! or qdisc it did not create, never a filter a live tracer still holds, and after any crash
//! loop each hook runs tracer once.
mod common;

use common::{Agent, TestResult, API_PORT, READY};
use tracer_lab::netns::{unique_prefix, Netns};

const VETH: &str = "cali0123456789a";

/// A namespace holding a workload-style veth (peer in a second namespace), with a clsact qdisc
/// and a foreign filter that belong to "someone else".
fn node() -> Result<(Netns, Netns), Box<dyn std::error::Error>> {
    let p = unique_prefix();
    let node = Netns::create(&format!("{p}-node"))?;
    let pod = Netns::create(&format!("{p}-pod"))?;
    node.ip(&["link", "add", VETH, "type", "veth", "peer", "name", "eth0"])?;
    node.ip(&["link", "set", "eth0", "netns", pod.name()])?;
    node.ip(&["link", "set", VETH, "up"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    node.exec(&["tc", "qdisc", "add", "dev", VETH, "clsact"])?;
    // Someone else's bpf filter on the same hook (classic BPF that matches nothing): must
    // survive every agent start.
    node.exec(&[
        "tc",
        "filter",
        "add",
        "dev",
        VETH,
        "ingress",
        "prio",
        "50",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
        "classid",
        "1:2",
    ])?;
    Ok((node, pod))
}

/// (tracer ingress filters, tracer egress filters, foreign filters, clsact present).
fn census(ns: &Netns) -> Result<(usize, usize, usize, bool), Box<dyn std::error::Error>> {
    let ingress = ns.exec(&["tc", "filter", "show", "dev", VETH, "ingress"])?;
    let egress = ns.exec(&["tc", "filter", "show", "dev", VETH, "egress"])?;
    let qdisc = ns.exec(&["tc", "qdisc", "show", "dev", VETH])?;
    // `tc` prints one "filter ... handle ... bpf ..." line per filter and names the program.
    let count = |text: &str, what: &str| text.lines().filter(|l| l.contains(what)).count();
    Ok((
        count(&ingress, "tracer_tc_ingress"),
        count(&egress, "tracer_tc_egress"),
        count(&ingress, "bytecode"),
        qdisc.contains("clsact"),
    ))
}

fn agent(ns: &Netns, port: u16) -> Result<Agent, Box<dyn std::error::Error>> {
    let mut a = common::start_on(ns, &format!("127.0.0.1:{port}"), &["--tc-mode", "clsact"])?;
    a.wait_ready(ns, READY)?;
    wait_census(ns, |c| c.0 >= 1 && c.1 >= 1)?;
    Ok(a)
}

fn wait_census(
    ns: &Netns,
    ok: impl Fn((usize, usize, usize, bool)) -> bool,
) -> Result<(usize, usize, usize, bool), Box<dyn std::error::Error>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let c = census(ns)?;
        if ok(c) || std::time::Instant::now() > deadline {
            return Ok(c);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn sigkilled_agents_leave_no_duplicate_filters() -> TestResult {
    let (node, _pod) = node()?;
    let mut first = agent(&node, API_PORT)?;
    assert_eq!(census(&node)?, (1, 1, 1, true));
    first.signal_and_wait(libc::SIGKILL)?;
    // The kernel keeps a killed agent's filters (and their programs) in place.
    assert_eq!(
        census(&node)?,
        (1, 1, 1, true),
        "SIGKILL must leave the filters"
    );

    // A crash loop: every new agent cleans up after the last one.
    for round in 0..3 {
        let mut next = agent(&node, API_PORT)?;
        let c = wait_census(&node, |c| c.0 == 1 && c.1 == 1)?;
        assert_eq!(
            c,
            (1, 1, 1, true),
            "round {round}: one tracer filter per hook, the foreign filter and qdisc kept; log:\n{}",
            next.log()
        );
        next.signal_and_wait(libc::SIGKILL)?;
    }

    // A clean stop removes its own filters and nothing else; the clsact it did not create stays.
    let mut last = agent(&node, API_PORT)?;
    last.signal_and_wait(libc::SIGTERM)?;
    assert_eq!(census(&node)?, (0, 0, 1, true));
    Ok(())
}

#[test]
fn a_live_agents_filters_are_never_removed() -> TestResult {
    let (node, _pod) = node()?;
    // Agent A keeps running; agent B is killed; agent C starts: C removes B's filters only.
    let _a = agent(&node, API_PORT)?;
    let mut b = agent(&node, API_PORT + 1)?;
    let c = wait_census(&node, |c| c.0 == 2 && c.1 == 2)?;
    assert_eq!(c, (2, 2, 1, true), "two live agents, two filters per hook");
    b.signal_and_wait(libc::SIGKILL)?;
    let mut c_agent = agent(&node, API_PORT + 2)?;
    let c = wait_census(&node, |c| c.0 == 2 && c.1 == 2)?;
    assert_eq!(
        c,
        (2, 2, 1, true),
        "A's live filters and C's own remain, B's stale ones are gone; log:\n{}",
        c_agent.log()
    );
    c_agent.signal_and_wait(libc::SIGTERM)?;
    assert_eq!(census(&node)?, (1, 1, 1, true), "only A's filters remain");
    Ok(())
}

#[test]
fn a_clsact_priority_someone_else_holds_does_not_stop_observing() -> TestResult {
    let (node, _pod) = node()?;
    // Another program's filter at tracer's ingress priority, for another protocol: the kernel
    // will not put a protocol-all filter beside it.
    node.exec(&[
        "tc", "filter", "add", "dev", VETH, "ingress", "prio", "1", "protocol", "ip", "u32",
        "match", "u32", "0", "0", "classid", "1:1",
    ])?;
    let mut a = agent(&node, API_PORT)?;
    let (t_in, t_out, foreign, qdisc) = census(&node)?;
    assert_eq!(
        (t_in, t_out, foreign, qdisc),
        (1, 1, 1, true),
        "log:\n{}",
        a.log()
    );
    let ingress = node.exec(&["tc", "filter", "show", "dev", VETH, "ingress"])?;
    assert!(ingress.contains("u32"), "the other filter stays: {ingress}");
    assert!(
        a.log().contains("clsact priority taken"),
        "the kernel refused the shared priority and tracer took another: {}",
        a.log()
    );
    a.signal_and_wait(libc::SIGTERM)?;
    Ok(())
}
