//! The namespace primitives. Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tracer_lab::netns::{self, unique_prefix, Netns};
use tracer_lab::traffic::{self, ProbeOutcome, TcpServer};
use tracer_lab::LabError;

#[test]
fn exec_runs_inside_and_reports_failures() {
    let ns = Netns::create(&format!("{}-exec", unique_prefix())).unwrap();
    let links = ns.exec(&["ip", "-o", "link"]).unwrap();
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    assert!(links.contains("lo: <LOOPBACK,UP"), "lo is up: {links}");

    match ns.exec(&["ip", "link", "show", "nosuchdev"]) {
        Err(LabError::Command {
            cmdline, stderr, ..
        }) => {
            assert!(cmdline.contains("ip link show nosuchdev"), "{cmdline}");
            assert!(stderr.contains("nosuchdev"), "{stderr}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    assert!(
        Netns::create(ns.name()).is_err(),
        "existing names are refused"
    );
}

#[test]
fn spawn_and_run_are_inside_the_namespace() {
    let ns = Netns::create(&format!("{}-spawn", unique_prefix())).unwrap();
    // /sys is remounted for the child, like `ip netns exec`: only the namespace's lo.
    let out = ns
        .spawn(
            Command::new("ls")
                .arg("/sys/class/net")
                .stdout(Stdio::piped()),
        )
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "lo");

    // A long-running child is killed when the namespace goes.
    let mut child = ns.spawn(Command::new("sleep").arg("600")).unwrap();
    let name = ns.name().to_string();
    drop(ns);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!netns::list().unwrap().contains(&name));
}

#[test]
fn run_threads_and_tcp_server_live_in_the_namespace() {
    let ns = Netns::create(&format!("{}-tcp", unique_prefix())).unwrap();
    let inode = ns
        .run(|| {
            std::fs::metadata("/proc/thread-self/ns/net").map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
        })
        .unwrap()
        .unwrap();
    let own = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    };
    assert_ne!(inode, own, "run() executes in another network namespace");

    let addr: SocketAddr = "127.0.0.1:7777".parse().unwrap();
    let server = TcpServer::start(&ns, addr).unwrap();
    assert_eq!(
        traffic::tcp_connect(&ns, addr, Duration::from_secs(2)).unwrap(),
        ProbeOutcome::Connected {
            greeting: "hello from 127.0.0.1:7777".into()
        }
    );
    assert_eq!(server.peers().len(), 1);
    drop(server);
    assert_eq!(
        traffic::tcp_connect(&ns, addr, Duration::from_secs(2)).unwrap(),
        ProbeOutcome::Refused
    );
    assert!(!traffic::tcp_probe(&ns, addr, Duration::from_secs(1)).unwrap());
}

#[test]
fn run_reports_panics() {
    let ns = Netns::create(&format!("{}-panic", unique_prefix())).unwrap();
    match ns.run(|| panic!("boom")) {
        Err(LabError::Panicked { message, .. }) => assert_eq!(message, "boom"),
        other => panic!("expected Panicked, got {other:?}"),
    }
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    // No pid exceeds PID_MAX_LIMIT (4194304): this owner is certainly dead. The letters make the
    // name unique to this test process.
    let letters: String = std::process::id()
        .to_string()
        .bytes()
        .map(|d| char::from(b'a' + (d - b'0')))
        .collect();
    let stale = format!("tr4194305{letters}-stale");
    let status = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(status.success());
    // Our own namespaces are not stale.
    let mine = Netns::create(&format!("{}-live", unique_prefix())).unwrap();

    // (A parallel first call of unique_prefix() may have removed it already.)
    netns::cleanup_stale();
    let listed = netns::list().unwrap();
    assert!(!listed.contains(&stale), "{listed:?}");
    assert!(listed.contains(&mine.name().to_string()), "{listed:?}");
}
