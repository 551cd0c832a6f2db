//! The two-node Calico cluster and the seed scenarios, proven at the packet level with no
//! tracer code involved. Needs root; every test builds its own uniquely named lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Instant;

use tracer_lab::calico;
use tracer_lab::netns;
use tracer_lab::scenario::healthy::{self, Healthy};
use tracer_lab::scenario::seed_001::Seed001;
use tracer_lab::scenario::seed_002::Seed002;
use tracer_lab::scenario::seed_003::Seed003;
use tracer_lab::scenario::seed_004::{self, Seed004};
use tracer_lab::scenario::ScenarioSpec;
use tracer_lab::topo::{Cluster, ClusterConfig};

/// Builds, prints how long it took, runs `f`.
fn with_lab(cfg: &ClusterConfig, what: &str, f: impl FnOnce(&Cluster)) {
    let t = Instant::now();
    let lab = Cluster::build(cfg).unwrap();
    let built = t.elapsed();
    f(&lab);
    eprintln!(
        "{what}: build {built:.2?}, checks {:.2?}",
        t.elapsed() - built
    );
}

fn show_evidence(spec: &dyn ScenarioSpec, lab: &Cluster) {
    let s = spec.name();
    let t = Instant::now();
    match spec.evidence(lab) {
        Ok(ev) => {
            for line in ev {
                eprintln!("  {s}: {line}");
            }
        }
        Err(e) => panic!("{s}: {e}"),
    }
    eprintln!("  {s}: verified in {:.2?}", t.elapsed());
}

#[test]
fn healthy_vxlan_cluster_works_end_to_end() {
    with_lab(&Healthy.config(), "healthy", |lab| {
        show_evidence(&Healthy, lab);
        let report = Healthy.drive(lab).unwrap();
        eprintln!("{report}");
        assert!(report.attempts.iter().all(|a| a.ok()), "{report}");
        assert!(report.startup.as_ref().unwrap().finished_in_budget);
    });
}

#[test]
fn healthy_bgp_routed_pod_traffic_follows_birds_routes() {
    with_lab(&healthy::bgp_config(), "healthy bgp-routed", |lab| {
        show_evidence(&Healthy, lab);
        // No overlay at all: the peer's block is reachable only through BIRD's route.
        assert!(lab.nodes[0]
            .netns
            .ip(&["link", "show", calico::VXLAN_DEVICE])
            .is_err());
        let blackhole = lab.nodes[0]
            .netns
            .ip(&["route", "show", &lab.nodes[0].block])
            .unwrap();
        assert!(
            blackhole.contains("blackhole") && blackhole.contains("proto bird"),
            "{blackhole}"
        );
    });
}

#[test]
fn vxlan_device_fdb_and_routes_are_felixs() {
    with_lab(&Healthy.config(), "felix vxlan", |lab| {
        let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
        let link = n1
            .netns
            .ip(&["-d", "link", "show", "vxlan.calico"])
            .unwrap();
        for want in [
            "mtu 1450",
            "link/ether 66:e0:bb:93:52:4f",
            "vxlan id 4096 local 10.51.0.100 dev eth0",
            "dstport 4789",
            "nolearning",
        ] {
            assert!(link.contains(want), "{want:?} in {link}");
        }
        let addr = n1
            .netns
            .ip(&["-o", "-4", "addr", "show", "vxlan.calico"])
            .unwrap();
        assert!(addr.contains("10.244.142.0/32"), "{addr}");
        let peer = n2.vtep.as_ref().unwrap();
        let routes = n1.netns.ip(&["route"]).unwrap();
        assert!(
            routes.contains("10.244.228.128/26 via 10.244.228.128 dev vxlan.calico onlink"),
            "{routes}"
        );
        assert!(
            routes.contains("blackhole 10.244.142.0/26 proto 80"),
            "{routes}"
        );
        let neigh = n1
            .netns
            .ip(&["neigh", "show", "dev", "vxlan.calico"])
            .unwrap();
        assert!(
            neigh.contains(&format!("10.244.228.128 lladdr {} PERMANENT", peer.mac)),
            "{neigh}"
        );
        let fdb = n1
            .netns
            .exec(&["bridge", "fdb", "show", "dev", "vxlan.calico"])
            .unwrap();
        assert!(
            fdb.contains(&format!("{} dst 10.51.0.101 self permanent", peer.mac)),
            "{fdb}"
        );
        // BIRD is configured like confd's mesh and does not fight felix over pool routes.
        let cfg = std::fs::read_to_string(&n1.bird.as_ref().unwrap().config).unwrap();
        assert!(cfg.contains("protocol bgp Mesh_10_51_0_101 from bgp_template"));
        assert!(cfg.contains("source address 10.51.0.100;"));
        assert!(!routes.contains("proto bird"), "{routes}");
    });
}

#[test]
fn seed_001_far_datastore_outlives_the_liveness_budget() {
    with_lab(&Seed001.config(), "seed-001", |lab| {
        show_evidence(&Seed001, lab);
    });
}

#[test]
fn seed_002_pool_overlapping_the_lan_skips_snat() {
    with_lab(&Seed002.config(), "seed-002", |lab| {
        show_evidence(&Seed002, lab);
        // Within the pool, across nodes, traffic is fine: only the host network is hit.
        let r = Seed002.drive(lab).unwrap();
        eprintln!("{r}");
        let ok: Vec<bool> = r.attempts.iter().map(|a| a.ok()).collect();
        assert_eq!(ok, [false, true, false, true], "{r}");
    });
}

#[test]
fn seed_003_vxlan_parent_on_the_nerdctl_bridge_blackholes_the_node() {
    with_lab(&Seed003.config(), "seed-003", |lab| {
        show_evidence(&Seed003, lab);
    });
}

#[test]
fn seed_004_bgp_from_the_second_nic_never_establishes() {
    with_lab(&Seed004::Active.config(), "seed-004", |lab| {
        assert_eq!(
            seed_004::dialer(lab),
            1,
            "k8smater1 must dial from 10.66.0.66"
        );
        show_evidence(&Seed004::Active, lab);
    });
}

#[test]
fn seed_004_passive_misdetected_node_is_dialed_and_never_answers() {
    with_lab(&Seed004::Passive.config(), "seed-004-passive", |lab| {
        assert_eq!(seed_004::dialer(lab), 0, "k8smaster2 must dial 10.0.0.66");
        show_evidence(&Seed004::Passive, lab);
    });
}

fn daemons_mentioning(path: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-a", "-f", path])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn teardown_leaves_no_namespaces_processes_or_files() {
    let lab = Cluster::build(&Seed001.config()).unwrap();
    let names = lab.netns_names();
    let prefix = format!("{}-", lab.prefix);
    let dir = lab.dir.path().to_path_buf();
    let dir_s = dir.to_string_lossy().into_owned();
    let listed = netns::list().unwrap();
    assert!(names.iter().all(|n| listed.contains(n)), "{names:?}");
    // BIRD x2 and etcd run with their config/state in the lab directory.
    let running = daemons_mentioning(&dir_s);
    assert_eq!(running.lines().count(), 3, "{running}");
    let pids: Vec<u32> = vec![
        lab.nodes[0].bird.as_ref().unwrap().pid(),
        lab.nodes[1].bird.as_ref().unwrap().pid(),
        lab.datastore.etcd.pid(),
    ];
    drop(lab);
    let listed = netns::list().unwrap();
    assert!(!names.iter().any(|n| listed.contains(n)), "{listed:?}");
    assert!(!listed.iter().any(|n| n.starts_with(&prefix)), "{listed:?}");
    assert_eq!(daemons_mentioning(&dir_s), "");
    assert!(!dir.exists());
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    // Also when the code using the lab panics.
    let seen = std::sync::Arc::new(std::sync::Mutex::new((Vec::new(), String::new())));
    let seen2 = seen.clone();
    let result = std::panic::catch_unwind(move || {
        let lab = Cluster::build(&Healthy.config()).unwrap();
        *seen2.lock().unwrap() = (
            lab.netns_names(),
            lab.dir.path().to_string_lossy().into_owned(),
        );
        panic!("test failure while the cluster is up");
    });
    assert!(result.is_err());
    let (names, dir_s) = seen.lock().unwrap().clone();
    assert!(names.len() >= 9, "{names:?}");
    let listed = netns::list().unwrap();
    assert!(!names.iter().any(|n| listed.contains(n)), "{listed:?}");
    assert_eq!(daemons_mentioning(&dir_s), "");
}

#[test]
fn build_rejects_bad_configs_before_creating_anything() {
    let mut cfg = Healthy.config();
    cfg.lan = "172.16.0.0/24".into();
    assert!(Cluster::build(&cfg).is_err());
    let mut cfg = Healthy.config();
    cfg.nodes[1].pods[0].ip = "10.244.142.50".into(); // in node1's block
    assert!(Cluster::build(&cfg).is_err());
    let mut cfg = Healthy.config();
    cfg.nodes[1].autodetect_iface = Some("nerdctl0".into()); // no such interface
    assert!(Cluster::build(&cfg).is_err());
    let mut cfg = Healthy.config();
    cfg.nodes[1].block = "10.244.228.130/26".into(); // unaligned
    assert!(Cluster::build(&cfg).is_err());
}
