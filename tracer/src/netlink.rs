//! What the node's kernel says about its interfaces, addresses and routes (rtnetlink).
//!
//! Diagnoses rest on these facts as much as on packets: which device is a bridge, which device
//! vxlan.calico hangs off, which interface the kernel routes toward a peer.
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::{
    address::AddressAttribute,
    link::{
        InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo,
        LinkLayerType, LinkMessage,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::net::{Cidr, IfAddr};

/// How often the node is read again even without a netlink notification.
pub const DEFAULT_RESYNC: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink request failed: {0}")]
    Request(#[from] rtnetlink::Error),
}

#[derive(Debug, Clone, Serialize)]
pub struct VxlanInfo {
    pub vni: Option<u32>,
    /// The underlying device felix chose (`ip -d link`: `dev X`).
    pub parent_index: Option<u32>,
    pub local: Option<IpAddr>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// rtnetlink kind: "bridge", "vxlan", "veth", "wireguard", "ipip", ... (None for physical NICs).
    pub kind: Option<String>,
    /// Bridge or bond this device is enslaved to.
    pub master: Option<u32>,
    pub up: bool,
    /// Frames start at the IP header (no Ethernet), e.g. tunl0, wireguard.
    pub l3: bool,
    pub vxlan: Option<VxlanInfo>,
    pub addrs: Vec<IfAddr>,
    /// IFLA_MTU.
    pub mtu: Option<u32>,
}

impl Link {
    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub dst: Cidr,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub pref_src: Option<IpAddr>,
    pub table: u32,
    /// A blackhole/unreachable/prohibit route: matches, but delivers nowhere.
    pub blackhole: bool,
}

/// A snapshot of the node's links, addresses and main-table routes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeFacts {
    pub links: BTreeMap<u32, Link>,
    pub routes: Vec<Route>,
    /// Local addresses of the agent's own TCP connections ([`crate::own_sockets`]).
    #[serde(skip)]
    pub own_sockets: HashSet<SocketAddr>,
}

impl NodeFacts {
    pub fn link(&self, index: u32) -> Option<&Link> {
        self.links.get(&index)
    }

    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.values().find(|l| l.name == name)
    }

    pub fn name_of(&self, index: u32) -> String {
        self.link(index)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| format!("if{index}"))
    }

    /// The interface that holds `ip` as one of its addresses.
    pub fn iface_holding(&self, ip: IpAddr) -> Option<&Link> {
        self.links
            .values()
            .find(|l| l.addrs.iter().any(|a| a.ip == ip))
    }

    /// Longest-prefix match in the main table, as the kernel would route `dst`.
    pub fn route_to(&self, dst: IpAddr) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.table == 254 && r.dst.contains(dst))
            .max_by_key(|r| r.dst.prefix())
    }

    /// Subnets directly attached to an interface (scope link routes from its addresses).
    pub fn connected_subnets(&self) -> impl Iterator<Item = (Cidr, &Link)> {
        self.links.values().flat_map(|l| {
            l.addrs
                .iter()
                .filter(|a| !a.ip.is_loopback() && !a.is_host())
                .map(move |a| (a.network(), l))
        })
    }

    /// Interfaces carrying a default route.
    pub fn default_route_ifaces(&self) -> Vec<u32> {
        self.routes
            .iter()
            .filter(|r| r.table == 254 && r.dst.prefix() == 0)
            .filter_map(|r| r.oif)
            .collect()
    }
}

/// Reads links, addresses and routes of the namespace the agent runs in.
pub async fn snapshot(handle: &Handle) -> Result<NodeFacts, NetlinkError> {
    let mut facts = NodeFacts::default();
    // Without the counters (IFLA_STATS/STATS64): nothing here reads them, and each sync parses
    // every link, so on a node with hundreds of pods they are most of what a dump allocates.
    let mut links = handle
        .link()
        .get()
        .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::SkipStats])
        .execute();
    while let Some(msg) = links.try_next().await? {
        let link = parse_link(&msg);
        facts.links.insert(link.index, link);
    }
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await? {
        let mut addr = None;
        for a in &msg.attributes {
            match a {
                // For point-to-point links Local is ours and Address the peer.
                AddressAttribute::Local(ip) => addr = Some(*ip),
                AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
                _ => {}
            }
        }
        if let (Some(ip), Some(link)) = (addr, facts.links.get_mut(&msg.header.index)) {
            link.addrs.push(IfAddr {
                ip,
                prefix: msg.header.prefix_len,
            });
        }
    }
    for req in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(req).execute();
        while let Some(msg) = routes.try_next().await? {
            if let Some(r) = parse_route(&msg) {
                facts.routes.push(r);
            }
        }
    }
    Ok(facts)
}

fn parse_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        master: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        l3: !matches!(
            msg.header.link_layer_type,
            LinkLayerType::Ether | LinkLayerType::Loopback
        ),
        vxlan: None,
        addrs: Vec::new(),
        mtu: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Controller(m) => link.master = Some(*m),
            LinkAttribute::Mtu(m) => link.mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(kind_name(k)),
                        LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = Some(parse_vxlan(v)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::Wireguard => "wireguard".into(),
        InfoKind::IpIp => "ipip".into(),
        InfoKind::Dummy => "dummy".into(),
        InfoKind::Bond => "bond".into(),
        InfoKind::Vlan => "vlan".into(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

fn parse_vxlan(v: &[InfoVxlan]) -> VxlanInfo {
    let mut info = VxlanInfo {
        vni: None,
        parent_index: None,
        local: None,
        port: None,
    };
    for a in v {
        match a {
            InfoVxlan::Id(id) => info.vni = Some(*id),
            InfoVxlan::Link(l) if *l != 0 => info.parent_index = Some(*l),
            InfoVxlan::Local(ip) => info.local = Some(IpAddr::V4(*ip)),
            InfoVxlan::Local6(ip) => info.local = Some(IpAddr::V6(*ip)),
            InfoVxlan::Port(p) => info.port = Some(*p),
            _ => {}
        }
    }
    info
}

fn parse_route(msg: &RouteMessage) -> Option<Route> {
    // Blackhole/unreachable routes decide too (Calico installs a blackhole for each local
    // IPAM block): keep them, marked, so route lookups do not fall through to the default.
    let blackhole = match msg.header.kind {
        RouteType::Unicast => false,
        RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit => true,
        _ => return None,
    };
    let mut dst = None;
    let mut oif = None;
    let mut gateway = None;
    let mut pref_src = None;
    let mut table = u32::from(msg.header.table);
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_ip(d),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::PrefSource(s) => pref_src = route_ip(s),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let prefix = msg.header.destination_prefix_length;
    let dst = match dst {
        Some(d) => Cidr::new(d, prefix)?,
        None => {
            let any = if msg.header.address_family == netlink_packet_route::AddressFamily::Inet6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            };
            Cidr::new(any, 0)?
        }
    };
    Some(Route {
        dst,
        oif,
        gateway,
        pref_src,
        table,
        blackhole,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Something about links, addresses or routes changed.
#[derive(Debug, Clone, Copy)]
pub struct Changed;

/// Subscribes to link, address and route notifications and forwards a tick for each.
///
/// The receiver side re-reads a full snapshot: notifications only say *that* something changed.
pub fn watch() -> Result<mpsc::Receiver<Changed>, NetlinkError> {
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let relevant = matches!(
                msg.payload,
                netlink_packet_core::NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewLink(_)
                        | RouteNetlinkMessage::DelLink(_)
                        | RouteNetlinkMessage::NewAddress(_)
                        | RouteNetlinkMessage::DelAddress(_)
                        | RouteNetlinkMessage::NewRoute(_)
                        | RouteNetlinkMessage::DelRoute(_)
                )
            );
            // A full channel already has a pending resync queued: dropping the tick loses nothing.
            if relevant && tx.try_send(Changed).is_err() && tx.is_closed() {
                break;
            }
        }
    });
    Ok(rx)
}
