//! Verdicts, causes, interface roles, attach modes and packet directions, with their stable wire
//! names.
use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Declares a fieldless enum whose variants have fixed wire names: serde, `Display`, `FromStr`
/// and the list of every value all come from the one table.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident => $wire:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $wire)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownName { what: $what, name: s.to_owned() }),
                }
            }
        }
    };
}

/// A name that is not one of an enum's wire names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} {:?}", self.what, self.name)
    }
}

impl std::error::Error for UnknownName {}

wire_enum! {
    /// What happened to a flow, from its packets alone.
    Verdict, "verdict" {
        SnatApplied => "snat_applied",
        SnatSkipped => "snat_skipped",
        /// A pod's packet left un-masqueraded because felix's own configuration says so
        /// (`NATOutgoingExclusions`, `IptablesNATOutgoingInterfaceFilter`, a LoadBalancer-only
        /// pool): healthy, and the flow names the setting.
        SnatExcluded => "snat_excluded",
        Replied => "replied",
        NoReply => "no_reply",
        Encapsulated => "encapsulated",
        WrongParentDevice => "wrong_parent_device",
        WrongSourceAddress => "wrong_source_address",
        Dropped => "dropped",
        SlowResponse => "slow_response",
        /// Records the flow may depend on were lost (ring buffer full) while it ran: an
        /// unanswered request is then not called `no_reply`, since its reply may be among them.
        EvidenceIncomplete => "evidence_incomplete",
    }
}

impl Verdict {
    /// Whether the verdict means something went wrong (the rest describe healthy behaviour).
    pub const fn is_fault(self) -> bool {
        matches!(
            self,
            Verdict::SnatSkipped
                | Verdict::NoReply
                | Verdict::WrongParentDevice
                | Verdict::WrongSourceAddress
                | Verdict::Dropped
                | Verdict::SlowResponse
        )
    }
}

wire_enum! {
    /// Why a flow (or the node) went wrong: the cause of a diagnosis.
    Cause, "cause" {
        IppoolOverlapsHostNetwork => "ippool_overlaps_host_network",
        NatOutgoingDisabled => "nat_outgoing_disabled",
        MasqueradeNotApplied => "masquerade_not_applied",
        NodeAddressOnWrongInterface => "node_address_on_wrong_interface",
        DatastoreLatency => "datastore_latency",
        KernelDrop => "kernel_drop",
        /// A Calico policy (or the end of a tier, or the endpoint's profiles) dropped it.
        DeniedByPolicy => "denied_by_policy",
        /// Full-size packets do not fit the path (tunnel or underlay MTU) while small ones pass.
        MtuMismatch => "mtu_mismatch",
        /// The node's conntrack could not insert the flow's masqueraded connection
        /// (`insert_failed`): every source port of the SNAT range to that destination was taken.
        SnatPortExhaustion => "snat_port_exhaustion",
        DestinationUnresponsive => "destination_unresponsive",
        PodRouteMissing => "pod_route_missing",
    }
}

wire_enum! {
    /// Why tracer watches an interface.
    Role, "role" {
        /// A pod's host-side veth (felix's InterfacePrefix).
        Workload => "workload",
        /// Calico's tunnel devices.
        Tunnel => "tunnel",
        /// A host NIC.
        Host => "host",
    }
}

wire_enum! {
    /// How an interface came to be attached.
    AttachHow, "attach mode" {
        /// It matched a role when the agent read the node.
        Auto => "auto",
        /// A client asked for it (`POST /attach`, `tracer watch`).
        OnDemand => "on-demand",
    }
}

wire_enum! {
    /// Which tc hook of an interface saw a packet.
    Dir, "direction" {
        Ingress => "ingress",
        Egress => "egress",
    }
}

impl From<tracer_common::Direction> for Dir {
    fn from(d: tracer_common::Direction) -> Dir {
        match d {
            tracer_common::Direction::Ingress => Dir::Ingress,
            tracer_common::Direction::Egress => Dir::Egress,
        }
    }
}

wire_enum! {
    /// Which way a packet went, relative to the flow's first packet.
    Side, "side" {
        /// The direction of the flow's first packet (the request).
        Forward => "forward",
        /// Replies.
        Reverse => "reverse",
    }
}

wire_enum! {
    /// The tunnel a packet was carried in.
    Encap, "encapsulation" {
        Vxlan => "vxlan",
        Ipip => "ipip",
    }
}

wire_enum! {
    /// Why a flow was written to the flow log when it was.
    LogReason, "flow log reason" {
        /// Its verdicts can no longer change with time alone: it was answered and the
        /// no-reply timeout has passed since its first reply, or it went unanswered past it.
        Settled => "settled",
        /// It left the flow table (over `--flow-cap`) before it settled.
        Evicted => "evicted",
        /// The agent stopped (SIGTERM) before it settled.
        Shutdown => "shutdown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_through_serde_and_fromstr() {
        for v in Verdict::ALL {
            let json = serde_json::to_string(v).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", v.as_str()));
            assert_eq!(v.as_str().parse::<Verdict>().ok(), Some(*v));
        }
        for c in Cause::ALL {
            let back: Option<Cause> = serde_json::from_str(&format!("\"{c}\"")).ok();
            assert_eq!(back, Some(*c));
        }
        assert_eq!(AttachHow::OnDemand.as_str(), "on-demand");
        assert!("bogus".parse::<Cause>().is_err());
    }

    #[test]
    fn fault_verdicts_are_the_documented_six() {
        let faults: Vec<&str> = Verdict::ALL
            .iter()
            .filter(|v| v.is_fault())
            .map(|v| v.as_str())
            .collect();
        assert_eq!(
            faults,
            [
                "snat_skipped",
                "no_reply",
                "wrong_parent_device",
                "wrong_source_address",
                "dropped",
                "slow_response"
            ]
        );
    }
}
