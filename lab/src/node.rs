//! A Calico node's workloads, wired the way Calico's CNI plugin and felix wire them.

use std::net::Ipv4Addr;

use crate::addr::ensure_lab_ip;
use crate::calico::{self, HOST_VETH_MAC, POD_GATEWAY};
use crate::netns::Netns;
use crate::LabError;

/// A pod on a node: its own namespace with `eth0` (a /32 address and a default route via
/// 169.254.1.1), and the host side `cali...` veth in the node namespace (proxy ARP, no address,
/// a /32 route to the pod). Dropping it deletes the pod namespace, which removes both veth ends
/// and the node's route.
#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The host-side veth in the node namespace: [`calico::veth_name`] of namespace and name.
    pub veth: String,
    pub netns: Netns,
}

impl Pod {
    /// Creates the pod namespace `<node ns>-<veth>` and wires it to `node` like Calico's CNI
    /// (plus the per-interface sysctls felix sets on workload interfaces).
    pub fn create(
        node: &Netns,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
    ) -> Result<Pod, LabError> {
        ensure_lab_ip(ip, "pod IP")?;
        let veth = calico::veth_name(namespace, name);
        let netns = Netns::create(&format!("{}-{veth}", node.name()))?;
        netns.disable_ipv6()?;
        netns.add_veth("eth0", &veth, node)?;

        // Host side. The fixed MAC is the CNI's: pods never need to learn per-node MACs.
        node.ip(&["link", "set", &veth, "address", HOST_VETH_MAC])?;
        let conf = format!("net/ipv4/conf/{veth}");
        // Proxy ARP answers the pod's ARP for 169.254.1.1 (the node routes it elsewhere, so the
        // kernel replies with the veth's MAC); proxy_delay=0 drops the default random delay of
        // up to 0.8 s before proxy replies.
        node.sysctl(&format!("{conf}/proxy_arp"), "1")?;
        node.sysctl(&format!("net/ipv4/neigh/{veth}/proxy_delay"), "0")?;
        node.sysctl(&format!("{conf}/forwarding"), "1")?;
        // felix's anti-spoofing: strict reverse-path filter on workload interfaces. Pod
        // sources route back via this veth, so legitimate traffic passes.
        node.sysctl(&format!("{conf}/rp_filter"), "1")?;
        node.ip(&["link", "set", &veth, "up"])?;
        let ip_s = ip.to_string();
        node.ip(&["route", "add", &ip_s, "dev", &veth, "scope", "link"])?;

        // Pod side, as the CNI plugin writes it.
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"])?;

        tracing::debug!(pod = %format!("{namespace}/{name}"), %ip, %veth, "lab: pod wired");
        Ok(Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            ip,
            veth,
            netns,
        })
    }
}
