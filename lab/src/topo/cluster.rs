//! Two (or more) Calico nodes on an underlay LAN, with pods, felix's dataplane (ipsets, NAT,
//! VXLAN), BIRD's node-to-node mesh, an external "master" (apiserver and a real etcd) and a
//! gateway that does not know the pod network.
//!
//! ```text
//!            underlay ns: bridge br0 (LAN, e.g. 10.51.0.0/24)     [br1: extra LANs]
//!      +-----------+-------------+---------------+----------------+
//!   gateway .1   external .10    node1 .100      node2 .101 ...
//!   (no pool     apiserver :6443 vxlan.calico    vxlan.calico
//!    routes)     etcd :2379      BIRD, pods      BIRD, pods [nerdctl0, eth1]
//! ```
//!
//! What each node advertises (its "autodetected" address, see [`NodeConfig::autodetect_iface`])
//! is what the other nodes use as VXLAN FDB destination and BGP neighbor: picking the wrong
//! interface reproduces seeds 003 and 004.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::addr::{ensure_lab_cidr, ensure_lab_ip, parse_ip, Cidr};
use crate::bird::{self, Bird, BirdConfig};
use crate::calico::{self, Dataplane, Encapsulation, FelixNat, Pool, Vtep};
use crate::daemon::{poll, LabDir};
use crate::etcd::{DelayProxy, Etcd};
use crate::netns::{unique_prefix, Netns};
use crate::node::Pod;
use crate::startup;
use crate::topo::lan_attach;
use crate::traffic::TcpServer;
use crate::LabError;

/// The underlay bridge of the main LAN, in the underlay namespace.
pub const LAN_BRIDGE: &str = "br0";
/// Where etcd really listens when a delay proxy sits on the datastore address.
const ETCD_BEHIND_PROXY: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 23790));

/// How pod traffic crosses nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Calico VXLAN (`vxlanMode: Always`): felix programs `vxlan.calico`, its FDB, neighbours
    /// and block routes; BIRD still peers but does not program pool routes.
    Vxlan,
    /// No encapsulation: BIRD installs the peers' block routes (`via <peer> proto bird`), so
    /// pod -> pod across nodes needs an Established BGP session. (Calico IPIP would need the
    /// ipip module, which this kernel lacks.)
    Bgp,
}

/// A pod to create on a node, serving TCP on [`ClusterConfig::pod_port`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodConfig {
    pub namespace: String,
    pub name: String,
    pub ip: String,
}

impl PodConfig {
    pub fn new(namespace: &str, name: &str, ip: &str) -> PodConfig {
        PodConfig {
            namespace: namespace.into(),
            name: name.into(),
            ip: ip.into(),
        }
    }
}

/// A Linux bridge on the node with one container attached, like nerdctl's `nerdctl0` (seed 003).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraBridge {
    /// e.g. "nerdctl0".
    pub name: String,
    /// The bridge's address, e.g. "10.4.0.1/24".
    pub address: String,
    /// The container's veth on the node, e.g. "veth76f5219b".
    pub container_veth: String,
    /// The container's address inside the bridge's subnet, e.g. "10.4.0.2".
    pub container_ip: String,
}

/// A second NIC on a LAN of its own that no other node is on (seed 004's 10.0.0.66).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraNic {
    /// e.g. "eth1".
    pub name: String,
    /// e.g. "10.0.0.66/24".
    pub address: String,
}

/// One Calico node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The Kubernetes node name, e.g. "ce-demo-1"; also names its namespace `<prefix>-<name>`.
    pub name: String,
    /// The node's address on the LAN (on [`ClusterConfig::nic`]).
    pub ip: String,
    /// Its affine IPAM block, e.g. "10.244.142.0/26"; the first address is its tunnel address.
    pub block: String,
    /// VTEP MAC; `None` derives one ([`calico::vtep_mac`]).
    pub vtep_mac: Option<String>,
    pub pods: Vec<PodConfig>,
    pub extra_bridge: Option<ExtraBridge>,
    pub extra_nic: Option<ExtraNic>,
    /// The interface whose address calico-node's autodetection picked (first-found): the
    /// node's `IPv4Address`, BGP source/router id and VXLAN parent. `None`: the LAN NIC.
    pub autodetect_iface: Option<String>,
}

/// Everything a [`Cluster`] is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The underlay LAN, e.g. "10.51.0.0/24".
    pub lan: String,
    /// Default gateway of every host; forwards, but knows nothing beyond the LAN.
    pub gateway_ip: String,
    /// The external host ("master"): apiserver-like TCP service and the real etcd.
    pub external_ip: String,
    pub apiserver_port: u16,
    /// A Service VIP DNATed on every node to the apiserver (kube-proxy-like).
    pub service_vip: Option<(String, u16)>,
    /// etcd's client port on the external host (its peer port is this + 1).
    pub etcd_port: u16,
    /// Extra latency on every datastore response (a userspace delay proxy on the etcd
    /// address; etcd then listens on 127.0.0.1:23790). `None`: clients talk to etcd directly.
    pub datastore_delay: Option<Duration>,
    /// The nodes' LAN interface name ("eth0", "ens160"...).
    pub nic: String,
    pub pool: Pool,
    /// felix's dataplane on every node: ipsets and iptables, or `table ip calico`.
    pub dataplane: Dataplane,
    pub routing: Routing,
    /// The cluster's BGP AS number.
    pub as_num: u32,
    /// Every pod's TCP server port.
    pub pod_port: u16,
    pub nodes: Vec<NodeConfig>,
    /// MTUs the MTU scenarios change; the default changes nothing.
    pub mtu: MtuConfig,
    /// FelixConfiguration `natPortRange` on every node (the conntrack scenarios).
    pub nat_port_range: Option<(u16, u16)>,
}

/// MTU settings of the MTU scenarios. The default leaves every device at the kernel's 1500 and
/// vxlan.calico at felix's 1450.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MtuConfig {
    /// Every pod's veth, both ends, as Calico's CNI plugin sets them from `veth_mtu` (or
    /// felix's /var/lib/calico/mtu).
    pub pod_mtu: Option<u32>,
    /// `(node index, MTU)`: that node's port on the LAN switch (the underlay bridge) carries
    /// only this much; larger frames are dropped there, silently, as a switch does.
    pub switch_port_mtu: Option<(usize, u32)>,
    /// Node index whose host firewall (its OUTPUT chain) drops ICMP fragmentation-needed.
    pub drop_frag_needed_on: Option<usize>,
    /// TSO/GSO off on the pods' eth0: the pods then send MTU-sized packets, as they reach a
    /// real wire. (Within one kernel a GSO super-packet crosses veths and bridges whole, and
    /// only a real NIC cuts it to its MTU.)
    pub wire_sized_frames: bool,
}

impl ClusterConfig {
    /// The healthy two-node VXLAN cluster of seed 003's write-up: LAN 10.51.0.0/24, pool
    /// 10.244.0.0/16 (natOutgoing), ce-demo-1 (10.51.0.100, block 10.244.142.0/26) and
    /// ce-demo-2 (10.51.0.101, block 10.244.228.128/26), two demo pods on each.
    pub fn two_nodes() -> ClusterConfig {
        const NS: &str = "deepflow-otel-spring-demo";
        ClusterConfig {
            lan: "10.51.0.0/24".into(),
            gateway_ip: "10.51.0.1".into(),
            external_ip: "10.51.0.10".into(),
            apiserver_port: 6443,
            service_vip: Some(("10.96.0.1".into(), 443)),
            etcd_port: 2379,
            datastore_delay: None,
            nic: "eth0".into(),
            pool: Pool::new("10.244.0.0/16", true),
            dataplane: Dataplane::Iptables,
            routing: Routing::Vxlan,
            as_num: 64512,
            pod_port: 8090,
            mtu: MtuConfig::default(),
            nat_port_range: None,
            nodes: vec![
                NodeConfig {
                    name: "ce-demo-1".into(),
                    ip: "10.51.0.100".into(),
                    block: "10.244.142.0/26".into(),
                    // The VTEP MAC in seed 003's `ip a s vxlan.calico` on ce-demo-1.
                    vtep_mac: Some("66:e0:bb:93:52:4f".into()),
                    pods: vec![
                        PodConfig::new(NS, "svc-item-588b4cfcc9-zkvpd", "10.244.142.36"),
                        PodConfig::new(NS, "nacos-0", "10.244.142.37"),
                    ],
                    extra_bridge: None,
                    extra_nic: None,
                    autodetect_iface: None,
                },
                NodeConfig {
                    name: "ce-demo-2".into(),
                    ip: "10.51.0.101".into(),
                    block: "10.244.228.128/26".into(),
                    vtep_mac: None,
                    pods: vec![
                        PodConfig::new(NS, "web-shop-5d495d8cbc-lnpxq", "10.244.228.139"),
                        PodConfig::new(NS, "svc-order-5f67c67555-ds7bj", "10.244.228.140"),
                    ],
                    extra_bridge: None,
                    extra_nic: None,
                    autodetect_iface: None,
                },
            ],
        }
    }
}

/// A pod of the cluster and its TCP server (`hello from <ip>:<port>` to every client).
#[derive(Debug)]
pub struct ClusterPod {
    /// Dropped before the pod's namespace.
    pub server: TcpServer,
    pub pod: Pod,
    /// Index of its node in [`Cluster::nodes`].
    pub node: usize,
}

impl ClusterPod {
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip
    }

    pub fn netns(&self) -> &Netns {
        &self.pod.netns
    }

    /// Where its server listens (pod IP and [`ClusterConfig::pod_port`]).
    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.pod.namespace, self.pod.name)
    }
}

/// A built node. Fields drop in order: BIRD, the container namespace, then the node namespace.
#[derive(Debug)]
pub struct ClusterNode {
    pub bird: Option<Bird>,
    /// The container on [`ExtraBridge`], if any.
    pub container: Option<Netns>,
    pub name: String,
    /// The LAN interface.
    pub nic: String,
    /// The node's real LAN address.
    pub ip: Ipv4Addr,
    /// What calico-node autodetected and advertised, and on which interface.
    pub autodetected_ip: Ipv4Addr,
    pub autodetected_iface: String,
    pub block: String,
    /// The node's VTEP (VXLAN routing only).
    pub vtep: Option<Vtep>,
    pub netns: Netns,
}

impl ClusterNode {
    /// BIRD's control socket.
    pub fn bird_socket(&self) -> Option<&Path> {
        self.bird.as_ref().map(|b| b.socket.as_path())
    }
}

/// The datastore: etcd on the external host, possibly behind a delay proxy.
#[derive(Debug)]
pub struct Datastore {
    /// Dropped before etcd.
    pub proxy: Option<DelayProxy>,
    pub etcd: Etcd,
    /// What clients use: external_ip:etcd_port (the proxy when there is one).
    pub endpoint: SocketAddr,
    /// The cluster's other nodes, whose Calico keys (v3 and 2.x layouts) etcd holds
    /// ([`crate::startup`]).
    pub hosts: Vec<String>,
}

/// A built [`ClusterConfig`]. Dropping it stops servers, proxy, etcd and BIRD, deletes every
/// namespace (killing whatever still runs there) and removes the lab directory; fields drop in
/// declaration order.
#[derive(Debug)]
pub struct Cluster {
    pub pods: Vec<ClusterPod>,
    /// The apiserver-like listener on external_ip:apiserver_port.
    pub apiserver: TcpServer,
    pub datastore: Datastore,
    pub nodes: Vec<ClusterNode>,
    /// The external host ("master").
    pub external: Netns,
    pub gateway: Netns,
    /// Holds the LAN bridge `br0` (and one bridge per [`ExtraNic`]).
    pub underlay: Netns,
    pub config: ClusterConfig,
    /// The common prefix of this instance's namespace names.
    pub prefix: String,
    /// Config, state, sockets and logs of BIRD and etcd.
    pub dir: LabDir,
    /// When the build finished (BGP timers run from BIRD's start, just before).
    pub built_at: Instant,
}

/// Validated addresses of one node.
struct NodePlan {
    ip: Ipv4Addr,
    tunnel_ip: Ipv4Addr,
    autodetect_iface: String,
    autodetected_ip: Ipv4Addr,
    pods: Vec<Ipv4Addr>,
    bridge: Option<(Cidr, Ipv4Addr)>,
    extra_nic: Option<Cidr>,
    mac: String,
}

struct Plan {
    lan: Cidr,
    gateway_ip: Ipv4Addr,
    external_ip: Ipv4Addr,
    nodes: Vec<NodePlan>,
}

fn cidr_text(c: &Cidr) -> String {
    format!("{}/{}", c.addr, c.prefix)
}

fn network_of(c: &Cidr) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(c.prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(c.addr) & mask)
}

impl ClusterConfig {
    fn plan(&self) -> Result<Plan, LabError> {
        let bad = |m: String| Err(LabError::Config(m));
        let lan = Cidr::parse(&self.lan)?;
        ensure_lab_cidr(&lan, "LAN")?;
        let pool = Cidr::parse(&self.pool.cidr)?;
        ensure_lab_cidr(&pool, "pool")?;
        let on_lan = |s: &str, what: &str| -> Result<Ipv4Addr, LabError> {
            let ip = parse_ip(s, what)?;
            ensure_lab_ip(ip, what)?;
            if !lan.contains(ip) {
                return Err(LabError::Config(format!(
                    "{what} {ip} is outside the LAN {}",
                    self.lan
                )));
            }
            Ok(ip)
        };
        if self.nodes.is_empty() {
            return bad("a cluster needs at least one node".into());
        }
        if self.nic.is_empty() || self.nic.len() > 15 {
            return bad(format!("bad NIC name {:?}", self.nic));
        }
        if let Some((vip, _)) = &self.service_vip {
            ensure_lab_ip(parse_ip(vip, "service VIP")?, "service VIP")?;
        }
        let gateway_ip = on_lan(&self.gateway_ip, "gateway IP")?;
        let external_ip = on_lan(&self.external_ip, "external host IP")?;
        let mut seen_names = HashSet::new();
        let mut seen_ips = HashSet::from([gateway_ip, external_ip]);
        let mut nodes = Vec::new();
        for n in &self.nodes {
            if n.name.is_empty()
                || n.name.len() > 40
                || !n
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return bad(format!("bad node name {:?}", n.name));
            }
            if !seen_names.insert(n.name.clone()) {
                return bad(format!("duplicate node name {}", n.name));
            }
            let ip = on_lan(&n.ip, &format!("{} IP", n.name))?;
            if !seen_ips.insert(ip) {
                return bad(format!("{} reuses address {ip}", n.name));
            }
            let block = Cidr::parse(&n.block)?;
            if !block.within(&pool) || block.addr != network_of(&block) {
                return bad(format!(
                    "block {} of {} is not an aligned block of pool {}",
                    n.block, n.name, self.pool.cidr
                ));
            }
            let mut pods = Vec::new();
            for p in &n.pods {
                let ip = parse_ip(&p.ip, "pod IP")?;
                // The first address is the node's tunnel address.
                if !block.contains(ip) || ip == block.addr {
                    return bad(format!(
                        "pod {}/{} ({ip}) is not a free address of block {}",
                        p.namespace, p.name, n.block
                    ));
                }
                pods.push(ip);
            }
            let bridge = match &n.extra_bridge {
                Some(b) => {
                    let c = Cidr::parse(&b.address)?;
                    ensure_lab_cidr(&c, "extra bridge subnet")?;
                    let ctr = parse_ip(&b.container_ip, "container IP")?;
                    if !c.contains(ctr) || ctr == c.addr {
                        return bad(format!("container {ctr} is not on bridge {}", b.address));
                    }
                    Some((c, ctr))
                }
                None => None,
            };
            let extra_nic = match &n.extra_nic {
                Some(x) => {
                    let c = Cidr::parse(&x.address)?;
                    ensure_lab_cidr(&c, "extra NIC subnet")?;
                    Some(c)
                }
                None => None,
            };
            let iface = n
                .autodetect_iface
                .clone()
                .unwrap_or_else(|| self.nic.clone());
            let bridge_addr = n
                .extra_bridge
                .as_ref()
                .zip(bridge.as_ref())
                .filter(|(b, _)| b.name == iface)
                .map(|(_, (c, _))| c.addr);
            let nic_addr = n
                .extra_nic
                .as_ref()
                .zip(extra_nic.as_ref())
                .filter(|(x, _)| x.name == iface)
                .map(|(_, c)| c.addr);
            let autodetected_ip = if iface == self.nic {
                ip
            } else {
                match bridge_addr.or(nic_addr) {
                    Some(a) => a,
                    None => return bad(format!("{} has no interface {iface}", n.name)),
                }
            };
            nodes.push(NodePlan {
                ip,
                tunnel_ip: block.addr,
                autodetect_iface: iface,
                autodetected_ip,
                pods,
                bridge,
                extra_nic,
                mac: n
                    .vtep_mac
                    .clone()
                    .unwrap_or_else(|| calico::vtep_mac(&n.name)),
            });
        }
        Ok(Plan {
            lan,
            gateway_ip,
            external_ip,
            nodes,
        })
    }
}

impl Cluster {
    /// Builds the cluster; see [`Cluster::build_with_progress`].
    pub fn build(cfg: &ClusterConfig) -> Result<Cluster, LabError> {
        Self::build_with_progress(cfg, &mut |_| {})
    }

    /// Builds everything in `cfg`, reporting each step to `progress`: namespaces and LANs,
    /// node extras (bridge, second NIC), pods with their servers, felix's dataplane (ipsets,
    /// NAT, blackhole, VXLAN device/FDB/neighbours/routes), BIRD on every node, etcd (and the
    /// delay proxy) and the apiserver on the external host. Returns without waiting for BGP
    /// (see [`Cluster::wait_bgp`]). On error, whatever was built is torn down.
    pub fn build_with_progress(
        cfg: &ClusterConfig,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Cluster, LabError> {
        let plan = cfg.plan()?;
        let b = Build { cfg, plan: &plan };
        let prefix = unique_prefix();
        let dir = LabDir::create(&prefix)?;
        // Each step's results are locals, so an error drops (tears down) them in reverse order.
        let ns = b.namespaces(&prefix, progress)?;
        b.underlay(&ns, progress)?;
        let containers = b.containers(&ns.nodes, progress)?;
        let pods = b.pods(&ns.nodes, progress)?;
        let vteps = b.vteps();
        b.felix(&ns.nodes, &vteps, progress)?;
        let birds = b.birds(&ns.nodes, &dir, progress)?;
        let datastore = b.datastore(&ns.external, &dir, &pods, progress)?;
        let apiserver = TcpServer::start(
            &ns.external,
            SocketAddr::V4(SocketAddrV4::new(plan.external_ip, cfg.apiserver_port)),
        )?;
        let nodes = b.cluster_nodes(ns.nodes, containers, birds, &vteps);
        tracing::info!(%prefix, nodes = cfg.nodes.len(), "lab: cluster built");
        Ok(Cluster {
            pods,
            apiserver,
            datastore,
            nodes,
            external: ns.external,
            gateway: ns.gateway,
            underlay: ns.underlay,
            config: cfg.clone(),
            prefix,
            dir,
            built_at: Instant::now(),
        })
    }

    /// The pods on node `node` (index into [`Cluster::nodes`]).
    pub fn pods_on(&self, node: usize) -> impl Iterator<Item = &ClusterPod> {
        self.pods.iter().filter(move |p| p.node == node)
    }

    /// The first pod on node `node`.
    pub fn first_pod_on(&self, node: usize) -> Result<&ClusterPod, LabError> {
        self.pods_on(node)
            .next()
            .ok_or_else(|| LabError::Config(format!("node {node} of the cluster has no pod")))
    }

    /// The BGP session state on node `node` (`birdc -s SOCK show protocols`), e.g.
    /// "Established", "Active", "Connect".
    pub fn bgp_state(&self, node: usize) -> Result<String, LabError> {
        let n = self
            .nodes
            .get(node)
            .ok_or_else(|| LabError::Config(format!("no node {node}")))?;
        let sock = n
            .bird_socket()
            .ok_or_else(|| LabError::Unexpected(format!("{} runs no BIRD", n.name)))?;
        bird::bgp_state(sock)
    }

    /// Waits until every node's BGP session is Established; on timeout, says which are not.
    pub fn wait_bgp(&self, timeout: Duration) -> Result<(), LabError> {
        let all_up = || {
            (0..self.nodes.len())
                .all(|i| self.bgp_state(i).is_ok_and(|s| s == "Established"))
                .then_some(())
        };
        if poll(timeout, Duration::from_millis(100), all_up).is_some() {
            return Ok(());
        }
        let states: Vec<String> = (0..self.nodes.len())
            .map(|i| {
                format!(
                    "{}: {}",
                    self.nodes[i].name,
                    self.bgp_state(i).unwrap_or_else(|e| e.to_string())
                )
            })
            .collect();
        Err(LabError::Unexpected(format!(
            "BGP not Established within {timeout:?} ({})",
            states.join("; ")
        )))
    }

    /// Where the datastore is served for clients (external_ip:etcd_port).
    pub fn etcd_endpoint(&self) -> SocketAddr {
        self.datastore.endpoint
    }

    /// external_ip:apiserver_port.
    pub fn apiserver_addr(&self) -> SocketAddr {
        self.apiserver.local_addr()
    }

    /// The Service VIP and port, if configured.
    pub fn service_addr(&self) -> Option<SocketAddr> {
        let (vip, port) = self.config.service_vip.as_ref()?;
        Some(SocketAddr::new(vip.parse().ok()?, *port))
    }

    /// The gateway's LAN address.
    pub fn gateway_ip(&self) -> Result<Ipv4Addr, LabError> {
        parse_ip(&self.config.gateway_ip, "gateway IP")
    }

    /// Names of every namespace of this instance.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .pods
            .iter()
            .map(|p| p.netns().name().to_string())
            .collect();
        for n in &self.nodes {
            names.extend(n.container.iter().map(|c| c.name().to_string()));
            names.push(n.netns.name().to_string());
        }
        names.extend(
            [&self.external, &self.gateway, &self.underlay]
                .iter()
                .map(|n| n.name().to_string()),
        );
        names
    }

    /// Time left until `since_build` has passed since the build (for timer-based waits).
    pub fn remaining_since_build(&self, since_build: Duration) -> Duration {
        since_build.saturating_sub(self.built_at.elapsed())
    }
}

/// The namespaces of a cluster being built; fields drop in the order [`Cluster`]'s do.
struct Namespaces {
    nodes: Vec<Netns>,
    external: Netns,
    gateway: Netns,
    underlay: Netns,
}

/// The steps of [`Cluster::build_with_progress`], in the order it runs them.
struct Build<'a> {
    cfg: &'a ClusterConfig,
    plan: &'a Plan,
}

impl Build<'_> {
    /// Every node's config with its validated plan, and its index.
    fn each_node(&self) -> impl Iterator<Item = (usize, &NodeConfig, &NodePlan)> {
        self.cfg
            .nodes
            .iter()
            .zip(&self.plan.nodes)
            .enumerate()
            .map(|(i, (n, p))| (i, n, p))
    }

    /// Underlay, gateway, external host and one namespace per node, IPv6 off.
    fn namespaces(
        &self,
        prefix: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Namespaces, LabError> {
        progress(&format!(
            "creating namespaces (underlay, gateway, external host, {}) with prefix {prefix}...",
            self.cfg
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let underlay = Netns::create(&format!("{prefix}-underlay"))?;
        let gateway = Netns::create(&format!("{prefix}-gw"))?;
        let external = Netns::create(&format!("{prefix}-ext"))?;
        let mut nodes = Vec::new();
        for n in &self.cfg.nodes {
            nodes.push(Netns::create(&format!("{prefix}-{}", n.name))?);
        }
        for ns in [&underlay, &gateway, &external].into_iter().chain(&nodes) {
            ns.disable_ipv6()?;
        }
        Ok(Namespaces {
            nodes,
            external,
            gateway,
            underlay,
        })
    }

    /// The LAN bridge with the gateway, the external host and every node on it, and each
    /// node's second NIC on a LAN of its own.
    fn underlay(&self, ns: &Namespaces, progress: &mut dyn FnMut(&str)) -> Result<(), LabError> {
        let (cfg, plan) = (self.cfg, self.plan);
        let lan_len = plan.lan.prefix;
        progress(&format!(
            "wiring the LAN {} (gateway {}, external host {}, nodes on {})...",
            cfg.lan, plan.gateway_ip, plan.external_ip, cfg.nic
        ));
        let underlay = &ns.underlay;
        underlay.ip(&["link", "add", LAN_BRIDGE, "type", "bridge"])?;
        underlay.ip(&["link", "set", LAN_BRIDGE, "up"])?;
        lan_attach(
            underlay,
            &ns.gateway,
            "eth0",
            LAN_BRIDGE,
            "gw",
            plan.gateway_ip,
            lan_len,
        )?;
        lan_attach(
            underlay,
            &ns.external,
            "eth0",
            LAN_BRIDGE,
            "ext",
            plan.external_ip,
            lan_len,
        )?;
        // The gateway forwards but has nothing beyond its LAN address: replies to pod or
        // foreign source addresses die there, as on the seeds' networks.
        ns.gateway.sysctl("net/ipv4/ip_forward", "1")?;
        let gw = plan.gateway_ip.to_string();
        ns.external
            .ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;

        let mut extra_lans = 0;
        for (i, n, p) in self.each_node() {
            let node = &ns.nodes[i];
            lan_attach(
                underlay,
                node,
                &cfg.nic,
                LAN_BRIDGE,
                &format!("node{}", i + 1),
                p.ip,
                lan_len,
            )?;
            // New namespaces start from kernel defaults unless the host sets
            // devconf_inherit_init_net; pin what a node needs: forwarding, and no reverse-path
            // filtering on host interfaces (felix only sets strict mode on workload veths).
            node.sysctl("net/ipv4/ip_forward", "1")?;
            for conf in ["all", "default", cfg.nic.as_str()] {
                node.sysctl(&format!("net/ipv4/conf/{conf}/rp_filter"), "0")?;
            }
            node.ip(&["route", "add", "default", "via", &gw, "dev", &cfg.nic])?;
            if let Some((_, mtu)) = cfg.mtu.switch_port_mtu.filter(|(at, _)| *at == i) {
                let port = format!("node{}", i + 1);
                progress(&format!(
                    "{}: its LAN switch port {port} carries only {mtu} bytes",
                    n.name
                ));
                underlay.ip(&["link", "set", &port, "mtu", &mtu.to_string()])?;
                // With br_netfilter loaded, a bridge that calls iptables also fragments
                // oversized IPv4 without DF (VXLAN's outer packets) on the way out, which no
                // switch does: turn that off in the underlay, so the port drops them.
                underlay.exec(&[
                    "sh",
                    "-c",
                    "f=/proc/sys/net/bridge/bridge-nf-call-iptables; [ ! -e $f ] || echo 0 > $f",
                ])?;
            }
            if cfg.mtu.drop_frag_needed_on == Some(i) {
                progress(&format!(
                    "{}: host firewall ({}) drops ICMP fragmentation-needed",
                    n.name, cfg.dataplane
                ));
                drop_frag_needed(node, cfg.dataplane)?;
            }
            if let (Some(x), Some(c)) = (&n.extra_nic, &p.extra_nic) {
                extra_lans += 1;
                let bridge = format!("br{extra_lans}");
                progress(&format!(
                    "{}: second NIC {} {} on its own LAN ({bridge}, no other node on it)...",
                    n.name, x.name, x.address
                ));
                underlay.ip(&["link", "add", &bridge, "type", "bridge"])?;
                underlay.ip(&["link", "set", &bridge, "up"])?;
                lan_attach(
                    underlay,
                    node,
                    &x.name,
                    &bridge,
                    &format!("node{}-x", i + 1),
                    c.addr,
                    c.prefix,
                )?;
            }
        }
        Ok(())
    }

    /// Each node's [`ExtraBridge`] with its container (`None` for nodes without one).
    fn containers(
        &self,
        nodes: &[Netns],
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<Option<Netns>>, LabError> {
        let mut containers = Vec::new();
        for (i, n, p) in self.each_node() {
            let ns = &nodes[i];
            let (Some(b), Some((c, ctr_ip))) = (&n.extra_bridge, &p.bridge) else {
                containers.push(None);
                continue;
            };
            progress(&format!(
                "{}: bridge {} {} with a container on {}...",
                n.name, b.name, b.address, b.container_veth
            ));
            ns.ip(&["link", "add", &b.name, "type", "bridge"])?;
            ns.ip(&["addr", "add", &cidr_text(c), "dev", &b.name])?;
            ns.ip(&["link", "set", &b.name, "up"])?;
            let ctr = Netns::create(&format!("{}-ctr", ns.name()))?;
            ctr.disable_ipv6()?;
            ctr.add_veth("eth0", &b.container_veth, ns)?;
            ns.ip(&["link", "set", &b.container_veth, "master", &b.name])?;
            ns.ip(&["link", "set", &b.container_veth, "up"])?;
            ctr.ip(&[
                "addr",
                "add",
                &format!("{ctr_ip}/{}", c.prefix),
                "dev",
                "eth0",
            ])?;
            ctr.ip(&["link", "set", "eth0", "up"])?;
            ctr.ip(&["route", "add", "default", "via", &c.addr.to_string()])?;
            containers.push(Some(ctr));
        }
        Ok(containers)
    }

    /// Every node's pods on cali* veths, each serving TCP on [`ClusterConfig::pod_port`].
    fn pods(
        &self,
        nodes: &[Netns],
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<ClusterPod>, LabError> {
        let mut pods = Vec::new();
        for (i, n, p) in self.each_node() {
            progress(&format!(
                "{}: {} pod(s) on cali* veths in block {} ({})...",
                n.name,
                n.pods.len(),
                n.block,
                n.pods
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.ip))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            for (pc, ip) in n.pods.iter().zip(&p.pods) {
                let pod = Pod::create(&nodes[i], &pc.namespace, &pc.name, *ip)?;
                if let Some(mtu) = self.cfg.mtu.pod_mtu {
                    let mtu = mtu.to_string();
                    nodes[i].ip(&["link", "set", &pod.veth, "mtu", &mtu])?;
                    pod.netns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
                }
                if self.cfg.mtu.wire_sized_frames {
                    pod.netns
                        .exec(&["ethtool", "-K", "eth0", "tso", "off", "gso", "off"])?;
                }
                let server = TcpServer::start(
                    &pod.netns,
                    SocketAddr::V4(SocketAddrV4::new(*ip, self.cfg.pod_port)),
                )?;
                pods.push(ClusterPod {
                    server,
                    pod,
                    node: i,
                });
            }
        }
        Ok(pods)
    }

    /// Every node's VTEP, as felix would publish it (parent: the autodetected address).
    fn vteps(&self) -> Vec<Vtep> {
        self.each_node()
            .map(|(_, n, p)| Vtep {
                node: n.name.clone(),
                mac: p.mac.clone(),
                tunnel_ip: p.tunnel_ip,
                parent_ip: p.autodetected_ip,
                blocks: vec![n.block.clone()],
            })
            .collect()
    }

    /// felix's dataplane on every node: ipsets and NAT for the pool, the Service DNAT, and
    /// with VXLAN routing the block blackhole, `vxlan.calico` and the peers' VTEPs.
    fn felix(
        &self,
        nodes: &[Netns],
        vteps: &[Vtep],
        progress: &mut dyn FnMut(&str),
    ) -> Result<(), LabError> {
        let cfg = self.cfg;
        let encap = match cfg.routing {
            Routing::Vxlan => Encapsulation::Vxlan,
            Routing::Bgp => Encapsulation::None,
        };
        for (i, n, p) in self.each_node() {
            let ns = &nodes[i];
            let what = match cfg.routing {
                Routing::Vxlan => format!(
                    ", blackhole {}, vxlan.calico (dev {} local {})",
                    n.block, p.autodetect_iface, p.autodetected_ip
                ),
                Routing::Bgp => String::new(),
            };
            progress(&format!(
                "{}: felix ({}): sets and NAT for pool {}{what}...",
                n.name, cfg.dataplane, cfg.pool.cidr
            ));
            calico::write_felix_nat_config(
                ns,
                std::slice::from_ref(&cfg.pool),
                encap,
                &FelixNat {
                    dataplane: cfg.dataplane,
                    nat_port_range: cfg.nat_port_range,
                    ..FelixNat::default()
                },
            )?;
            if let Some((vip, port)) = &cfg.service_vip {
                calico::write_service_dnat(
                    ns,
                    vip,
                    *port,
                    &self.plan.external_ip.to_string(),
                    cfg.apiserver_port,
                )?;
            }
            if cfg.routing == Routing::Vxlan {
                // With BGP-routed pools BIRD exports the static blackhole instead.
                calico::write_block_blackhole(ns, &n.block)?;
                calico::write_vxlan_device(ns, &p.autodetect_iface, &vteps[i])?;
                for (j, peer) in vteps.iter().enumerate() {
                    if j != i {
                        calico::write_vxlan_peer(ns, peer)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// BIRD on every node, meshed with every other node's autodetected address.
    fn birds(
        &self,
        nodes: &[Netns],
        dir: &LabDir,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<Bird>, LabError> {
        let cfg = self.cfg;
        let mut birds = Vec::new();
        for (i, n, p) in self.each_node() {
            let peers: Vec<Ipv4Addr> = self
                .plan
                .nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, q)| q.autodetected_ip)
                .collect();
            progress(&format!(
                "starting BIRD on {} (AS {}, router id {}, mesh peers {})...",
                n.name,
                cfg.as_num,
                p.autodetected_ip,
                peers
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            let bird_cfg = BirdConfig {
                node: n.name.clone(),
                node_ip: p.autodetected_ip,
                as_num: cfg.as_num,
                blocks: vec![n.block.clone()],
                pools: vec![(cfg.pool.cidr.clone(), cfg.routing == Routing::Vxlan)],
                peers,
            };
            birds.push(Bird::start(&nodes[i], dir, &bird_cfg)?);
        }
        Ok(birds)
    }

    /// etcd on the external host, loaded with Calico's keys for seed 001's 53 nodes and for the
    /// lab's own nodes and pods (a WorkloadEndpoint each, as the CNI plugin writes it), so an
    /// agent with `DATASTORE_TYPE=etcdv3` names them; behind a delay proxy when the config asks
    /// for one.
    fn datastore(
        &self,
        external: &Netns,
        dir: &LabDir,
        pods: &[ClusterPod],
        progress: &mut dyn FnMut(&str),
    ) -> Result<Datastore, LabError> {
        let cfg = self.cfg;
        let external_ip = self.plan.external_ip;
        let endpoint = SocketAddr::V4(SocketAddrV4::new(external_ip, cfg.etcd_port));
        let peer = SocketAddr::V4(SocketAddrV4::new(
            external_ip,
            cfg.etcd_port.wrapping_add(1),
        ));
        let etcd_client = if cfg.datastore_delay.is_some() {
            ETCD_BEHIND_PROXY
        } else {
            endpoint
        };
        progress(&format!(
            "starting etcd on the external host (clients {etcd_client}, peers {peer})..."
        ));
        let etcd = Etcd::start(external, dir, "master", etcd_client, peer)?;
        let hosts = startup::seed_001_hosts(startup::SEED_001_NODES);
        let mut kvs = startup::v3_layout(&hosts);
        kvs.extend(startup::v2_layout(&hosts));
        for (_, n, p) in self.each_node() {
            kvs.push(startup::calico_node(&n.name, &p.ip.to_string()));
        }
        for p in pods {
            let node = &self.cfg.nodes[p.node].name;
            kvs.push(startup::workload_endpoint(
                node,
                &p.pod.namespace,
                &p.pod.name,
                &p.pod.ip.to_string(),
                &p.pod.veth,
                &[("app", &p.pod.name)],
            ));
        }
        etcd.put_all(external, &kvs)?;
        let proxy = match cfg.datastore_delay {
            Some(delay) => {
                progress(&format!(
                    "delaying datastore answers by {delay:?}: proxy {endpoint} -> {etcd_client}..."
                ));
                Some(DelayProxy::start(external, endpoint, etcd_client, delay)?)
            }
            None => None,
        };
        Ok(Datastore {
            proxy,
            etcd,
            endpoint,
            hosts,
        })
    }

    /// The built nodes, each with its namespace, container, BIRD and (VXLAN) VTEP.
    fn cluster_nodes(
        &self,
        nodes: Vec<Netns>,
        containers: Vec<Option<Netns>>,
        birds: Vec<Bird>,
        vteps: &[Vtep],
    ) -> Vec<ClusterNode> {
        let cfg = self.cfg;
        nodes
            .into_iter()
            .zip(containers)
            .zip(birds)
            .zip(self.each_node())
            .map(|(((netns, container), bird), (i, n, p))| ClusterNode {
                bird: Some(bird),
                container,
                name: n.name.clone(),
                nic: cfg.nic.clone(),
                ip: p.ip,
                autodetected_ip: p.autodetected_ip,
                autodetected_iface: p.autodetect_iface.clone(),
                block: n.block.clone(),
                vtep: (cfg.routing == Routing::Vxlan).then(|| vteps[i].clone()),
                netns,
            })
            .collect()
    }
}

/// The host's own firewall rule dropping the ICMP fragmentation-needed the node sends (its
/// OUTPUT hook), written with the tool the node's dataplane uses: an nft-only node has no
/// iptables. The nft rule sits in its own table ([`HOST_FIREWALL_TABLE`]), not felix's.
fn drop_frag_needed(node: &Netns, dp: Dataplane) -> Result<(), LabError> {
    match dp {
        Dataplane::Iptables => node
            .exec(&[
                "iptables",
                "-w",
                "-I",
                "OUTPUT",
                "-p",
                "icmp",
                "--icmp-type",
                "fragmentation-needed",
                "-j",
                "DROP",
            ])
            .map(drop),
        Dataplane::Nftables => node
            .exec_with_stdin(
                &["nft", "-f", "-"],
                &format!(
                    "table ip {HOST_FIREWALL_TABLE} {{\n\tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n\t\ticmp type destination-unreachable icmp code frag-needed counter drop\n\t}}\n}}\n"
                ),
            )
            .map(drop),
    }
}

/// The nft table holding the host firewall's rule in nftables mode.
pub const HOST_FIREWALL_TABLE: &str = "host-firewall";
