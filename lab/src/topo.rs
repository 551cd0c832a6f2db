//! Whole lab topologies: [`SingleNode`] (seed 002's shape) and [`Cluster`] (two Calico nodes).

mod cluster;

pub use cluster::{
    Cluster, ClusterConfig, ClusterNode, ClusterPod, Datastore, ExtraBridge, ExtraNic, MtuConfig,
    NodeConfig, PodConfig, Routing, HOST_FIREWALL_TABLE,
};

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::addr::{ensure_lab_cidr, ensure_lab_ip, parse_ip, Cidr};
use crate::calico::{self, Encapsulation, FelixNat, Pool};
use crate::netns::{unique_prefix, Netns};
use crate::node::Pod;
use crate::traffic::TcpServer;
use crate::LabError;

/// The pod [`SingleNode`] creates: seed 002's failing workload.
pub const POD_NAMESPACE: &str = "calico-system";
pub const POD_NAME: &str = "calico-kube-controllers-596576f79-j2pkg";
/// The bridge of the underlay LAN, in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

/// The seed-002 shape: one Calico node, an underlay LAN, an "apiserver" host and a default
/// gateway that does not know the pod network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleNodeConfig {
    /// The underlay LAN, e.g. "192.168.21.0/24".
    pub host_subnet: String,
    /// The node's address on the LAN, e.g. "192.168.21.10".
    pub node_ip: String,
    /// The "master", serving TCP on `apiserver_port`, e.g. "192.168.21.11".
    pub apiserver_ip: String,
    pub apiserver_port: u16,
    /// Default gateway of node and apiserver; forwards, but has no route to the pool, so
    /// replies to un-SNATed pod addresses die there.
    pub gateway_ip: String,
    /// The IPAM pool, e.g. 192.168.0.0/16 (overlapping the LAN: seed 002) or 10.244.0.0/16.
    pub pool: Pool,
    /// The pod's address, inside the pool.
    pub pod_ip: String,
    /// A Service VIP and port DNATed on the node to apiserver_ip:apiserver_port.
    pub service_vip: Option<(String, u16)>,
    /// More pools felix knows, e.g. a LoadBalancer-only one.
    pub extra_pools: Vec<Pool>,
    /// felix's natOutgoing settings (pool sets by version, exclusions, interface filter).
    pub felix: FelixNat,
    /// The apiserver host routes the pod pool via the node, as Calico nodes and BGP-peered
    /// hosts do: un-masqueraded pod traffic is then answered.
    pub apiserver_routes_pool: bool,
}

/// A built [`SingleNodeConfig`]. Dropping it stops the apiserver listener and deletes every
/// namespace (fields drop in declaration order: server, pod, then the hosts).
#[derive(Debug)]
pub struct SingleNode {
    /// The apiserver's TCP listener (answers `hello from <addr>`).
    pub apiserver_server: TcpServer,
    pub pod: Pod,
    /// The Calico node: ip_forward, felix's NAT, the pod's veth and route, `eth0` on the LAN.
    pub node: Netns,
    pub apiserver: Netns,
    pub gateway: Netns,
    /// Holds the LAN bridge `br0` that every host's `eth0` peer is enslaved to.
    pub underlay: Netns,
    /// The node's LAN interface in the node namespace ("eth0").
    pub node_nic: String,
    /// What was built.
    pub config: SingleNodeConfig,
    /// The common prefix of all namespace names of this instance.
    pub prefix: String,
}

struct Plan {
    subnet: Cidr,
    node_ip: Ipv4Addr,
    apiserver_ip: Ipv4Addr,
    gateway_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
}

impl SingleNodeConfig {
    /// Parses and checks the config: lab ranges only, hosts inside the LAN, pod inside the pool.
    fn plan(&self) -> Result<Plan, LabError> {
        let subnet = Cidr::parse(&self.host_subnet)?;
        ensure_lab_cidr(&subnet, "host subnet")?;
        let pool = Cidr::parse(&self.pool.cidr)?;
        ensure_lab_cidr(&pool, "pool")?;
        let host = |s: &str, what: &str| -> Result<Ipv4Addr, LabError> {
            let ip = parse_ip(s, what)?;
            ensure_lab_ip(ip, what)?;
            if !subnet.contains(ip) {
                return Err(LabError::Config(format!(
                    "{what} {ip} is outside the host subnet {}",
                    self.host_subnet
                )));
            }
            Ok(ip)
        };
        let plan = Plan {
            subnet,
            node_ip: host(&self.node_ip, "node IP")?,
            apiserver_ip: host(&self.apiserver_ip, "apiserver IP")?,
            gateway_ip: host(&self.gateway_ip, "gateway IP")?,
            pod_ip: parse_ip(&self.pod_ip, "pod IP")?,
        };
        if !pool.contains(plan.pod_ip) {
            return Err(LabError::Config(format!(
                "pod IP {} is outside the pool {}",
                plan.pod_ip, self.pool.cidr
            )));
        }
        if let Some((vip, _)) = &self.service_vip {
            ensure_lab_ip(parse_ip(vip, "service VIP")?, "service VIP")?;
        }
        for p in &self.extra_pools {
            ensure_lab_cidr(&Cidr::parse(&p.cidr)?, "pool")?;
        }
        Ok(plan)
    }
}

impl SingleNode {
    /// Seed 002: the IPAM pool 192.168.0.0/16 overlaps the LAN 192.168.21.0/24, so felix's
    /// natOutgoing rule (masquerade pool sources unless the destination is in a pool) skips
    /// pod -> apiserver traffic, and the apiserver's replies go to a gateway that cannot route
    /// them back.
    pub fn seed_002() -> SingleNodeConfig {
        SingleNodeConfig {
            host_subnet: "192.168.21.0/24".into(),
            node_ip: "192.168.21.10".into(),
            apiserver_ip: "192.168.21.11".into(),
            apiserver_port: 6443,
            gateway_ip: "192.168.21.1".into(),
            pool: Pool::new("192.168.0.0/16", true),
            pod_ip: "192.168.236.10".into(),
            service_vip: Some(("10.96.0.1".into(), 443)),
            extra_pools: Vec::new(),
            felix: FelixNat::default(),
            apiserver_routes_pool: false,
        }
    }

    /// The healthy control: same LAN, pool 10.244.0.0/16, so pod -> apiserver is masqueraded.
    pub fn healthy() -> SingleNodeConfig {
        SingleNodeConfig {
            pool: Pool::new("10.244.0.0/16", true),
            pod_ip: "10.244.1.10".into(),
            ..SingleNode::seed_002()
        }
    }

    /// Builds everything: namespaces, LAN, routes, the pod, felix's NAT, the Service DNAT and
    /// the apiserver's listener. On error, whatever was built is torn down.
    pub fn build(cfg: &SingleNodeConfig) -> Result<SingleNode, LabError> {
        let plan = cfg.plan()?;
        let prefix = unique_prefix();
        let len = plan.subnet.prefix;

        let underlay = Netns::create(&format!("{prefix}-underlay"))?;
        let node = Netns::create(&format!("{prefix}-node"))?;
        let apiserver = Netns::create(&format!("{prefix}-apiserver"))?;
        let gateway = Netns::create(&format!("{prefix}-gw"))?;
        for ns in [&underlay, &node, &apiserver, &gateway] {
            ns.disable_ipv6()?;
        }

        underlay.ip(&["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
        underlay.ip(&["link", "set", UNDERLAY_BRIDGE, "up"])?;
        for (host, port, ip) in [
            (&node, "node", plan.node_ip),
            (&apiserver, "apiserver", plan.apiserver_ip),
            (&gateway, "gw", plan.gateway_ip),
        ] {
            lan_attach(&underlay, host, "eth0", UNDERLAY_BRIDGE, port, ip, len)?;
        }

        let gw = plan.gateway_ip.to_string();
        // New namespaces start from kernel defaults (rp_filter 0, forwarding off) unless the
        // host sets net.core.devconf_inherit_init_net, which would copy the host's (often
        // strict) rp_filter. Pin what the scenario needs: the node forwards pod traffic and
        // must accept replies on eth0 whatever their source; the gateway forwards.
        node.sysctl("net/ipv4/ip_forward", "1")?;
        for conf in ["all", "default", "eth0"] {
            node.sysctl(&format!("net/ipv4/conf/{conf}/rp_filter"), "0")?;
        }
        node.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        apiserver.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        // The gateway gets nothing but its LAN address: no route to the pool.
        gateway.sysctl("net/ipv4/ip_forward", "1")?;

        let pod = Pod::create(&node, POD_NAMESPACE, POD_NAME, plan.pod_ip)?;
        let mut pools = vec![cfg.pool.clone()];
        pools.extend(cfg.extra_pools.iter().cloned());
        calico::write_felix_nat_config(&node, &pools, Encapsulation::Vxlan, &cfg.felix)?;
        if cfg.apiserver_routes_pool {
            let node_ip = plan.node_ip.to_string();
            apiserver.ip(&[
                "route",
                "add",
                &cfg.pool.cidr,
                "via",
                &node_ip,
                "dev",
                "eth0",
            ])?;
        }
        let api_ip = plan.apiserver_ip.to_string();
        if let Some((vip, port)) = &cfg.service_vip {
            calico::write_service_dnat(&node, vip, *port, &api_ip, cfg.apiserver_port)?;
        }
        let apiserver_server = TcpServer::start(
            &apiserver,
            SocketAddr::V4(SocketAddrV4::new(plan.apiserver_ip, cfg.apiserver_port)),
        )?;
        tracing::info!(%prefix, pool = %cfg.pool.cidr, pod = %plan.pod_ip, "lab: single node built");
        Ok(SingleNode {
            apiserver_server,
            pod,
            node,
            apiserver,
            gateway,
            underlay,
            node_nic: "eth0".into(),
            config: cfg.clone(),
            prefix,
        })
    }

    /// apiserver_ip:apiserver_port.
    pub fn apiserver_addr(&self) -> SocketAddr {
        self.apiserver_server.local_addr()
    }

    /// The Service VIP and port, if configured.
    pub fn service_addr(&self) -> Option<SocketAddr> {
        let (vip, port) = self.config.service_vip.as_ref()?;
        Some(SocketAddr::new(vip.parse().ok()?, *port))
    }

    /// The node's LAN address.
    pub fn node_ip(&self) -> Result<Ipv4Addr, LabError> {
        parse_ip(&self.config.node_ip, "node IP")
    }

    /// Names of every namespace of this instance (pod, node, hosts, underlay).
    pub fn netns_names(&self) -> Vec<String> {
        [
            &self.pod.netns,
            &self.node,
            &self.apiserver,
            &self.gateway,
            &self.underlay,
        ]
        .iter()
        .map(|n| n.name().to_string())
        .collect()
    }
}

/// Gives `host` an interface `iface` on a LAN: a veth created inside `host` whose peer (`port`)
/// lands in the underlay namespace, enslaved to `bridge`. Nothing touches the root namespace.
pub(crate) fn lan_attach(
    underlay: &Netns,
    host: &Netns,
    iface: &str,
    bridge: &str,
    port: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), LabError> {
    host.add_veth(iface, port, underlay)?;
    underlay.ip(&["link", "set", port, "master", bridge])?;
    underlay.ip(&["link", "set", port, "up"])?;
    host.ip(&["addr", "add", &format!("{ip}/{prefix_len}"), "dev", iface])?;
    host.ip(&["link", "set", iface, "up"])?;
    Ok(())
}
