//! The seed incidents (and a healthy control) on a [`Cluster`].
//!
//! Each scenario is a [`ScenarioSpec`] in a file of its own: a configuration (`config()`),
//! traffic that exercises the fault (`drive()`, what tracer should then explain) and a
//! packet-level proof that the fault is really there, independent of tracer (`evidence()`,
//! built on tcpdump, BIRD, iptables counters and what servers saw). [`Scenario::ALL`] lists
//! them; adding a scenario is one file plus one line there.
//!
//! | scenario | what breaks | expected tracer cause |
//! |---|---|---|
//! | `healthy` | nothing | none |
//! | `seed-001` | datastore 220 ms away: calico 2.6's per-node startup reads outlive its liveness probe | `datastore_latency` |
//! | `seed-002` | pool contains the host LAN: pod -> apiserver leaves un-SNATed | `ippool_overlaps_host_network` |
//! | `seed-003` | node2's VXLAN parent is the bridge `nerdctl0` (10.4.0.1) | `node_address_on_wrong_interface` |
//! | `seed-004` | node2's BGP address is its second NIC (10.66.0.66); node2 dials | `node_address_on_wrong_interface` |
//! | `seed-004-passive` | the same with 10.0.0.66, which makes node2 passive; node1 dials it | `node_address_on_wrong_interface` |
//! | `mtu-underlay` | node2's LAN switch port carries 1400 bytes, vxlan.calico assumes 1500 | `mtu_mismatch` |
//! | `mtu-blackhole` | pods at 1500 over vxlan.calico's 1450, node1 drops its ICMP frag-needed | `mtu_mismatch` |
//! | `mtu-pmtud` | pods at 1500 over vxlan.calico's 1450, PMTU discovery works | none |
//! | `policy` | a tiered Calico NetworkPolicy and a GlobalNetworkPolicy deny two pods; a third is allowed | `denied_by_policy` |
//! | `snat-ports` | natPortRange 40000:40001, short connections from a pod to one external address | `snat_port_exhaustion` |
//! | `snat-ports-wide` | the same traffic with natPortRange 32768:65535 | none |

mod common;
pub mod conntrack;
pub mod healthy;
pub mod mtu;
pub mod policy;
pub mod seed_001;
pub mod seed_002;
pub mod seed_003;
pub mod seed_004;

use std::fmt;
use std::net::IpAddr;
use std::ops::Deref;
use std::str::FromStr;

use tracer_model::{Cause, Verdict};

pub use common::{Attempt, TrafficReport};

use crate::topo::{Cluster, ClusterConfig};
use crate::LabError;

/// One scenario: its lab, its traffic, its proof, and what tracer should say about it.
pub trait ScenarioSpec: Sync {
    /// `healthy`, `seed-001`...
    fn name(&self) -> &'static str;

    /// One line on what the scenario is.
    fn title(&self) -> &'static str;

    /// The cause tracer should report, if any.
    fn expected_cause(&self) -> Option<Cause>;

    /// The verdict of the flows behind the expected diagnosis, where it has one of its own.
    fn expected_verdict(&self) -> Option<Verdict>;

    /// What tracer should report, as the lab's summary shows it: the cause, and the verdict
    /// where it tells apart diagnoses of the same cause.
    fn expected_text(&self) -> String {
        match (self.expected_cause(), self.expected_verdict()) {
            (None, _) => "none".into(),
            (Some(c), Some(v)) => format!("{c} ({v})"),
            (Some(c), None) => c.to_string(),
        }
    }

    fn config(&self) -> ClusterConfig;

    /// Generates the traffic tracer should then explain.
    fn drive(&self, lab: &Cluster) -> Result<TrafficReport, LabError>;

    /// The packet-level proof, one finding per line; `Err(LabError::Verify)` if the lab does
    /// not show the fault (or, for `healthy`, shows one).
    fn evidence(&self, lab: &Cluster) -> Result<Vec<String>, LabError>;

    /// The address worth querying the agents about: by default node2's first pod.
    fn focus(&self, lab: &Cluster) -> Option<IpAddr> {
        lab.pods_on(1).next().map(|p| IpAddr::V4(p.ip()))
    }
}

/// A scenario, by name (`Display`/`FromStr`); derefs to its [`ScenarioSpec`].
#[derive(Clone, Copy)]
pub struct Scenario(&'static dyn ScenarioSpec);

impl Scenario {
    /// Every scenario, in the order `tracer-lab run` runs them.
    pub const ALL: &'static [Scenario] = &[
        Scenario(&healthy::Healthy),
        Scenario(&seed_001::Seed001),
        Scenario(&seed_002::Seed002),
        Scenario(&seed_003::Seed003),
        Scenario(&seed_004::Seed004::Active),
        Scenario(&seed_004::Seed004::Passive),
        Scenario(&mtu::Mtu::Underlay),
        Scenario(&mtu::Mtu::Blackhole),
        Scenario(&mtu::Mtu::Pmtud),
        Scenario(&policy::Policy),
        Scenario(&conntrack::SnatPorts::Narrow),
        Scenario(&conntrack::SnatPorts::Wide),
    ];

    /// Every scenario's name, comma-separated.
    pub fn names() -> String {
        Scenario::ALL
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Deref for Scenario {
    type Target = dyn ScenarioSpec;

    fn deref(&self) -> &Self::Target {
        self.0
    }
}

/// Scenarios are equal when their names are: [`Scenario::ALL`] holds each name once.
impl PartialEq for Scenario {
    fn eq(&self, other: &Scenario) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Scenario {}

impl fmt::Debug for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Scenario").field(&self.name()).finish()
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Scenario, LabError> {
        Scenario::ALL
            .iter()
            .find(|sc| sc.name() == s)
            .copied()
            .ok_or_else(|| {
                LabError::Config(format!(
                    "unknown scenario {s:?} (known: {})",
                    Scenario::names()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::topo::Routing;

    #[test]
    fn names_round_trip() -> Result<(), LabError> {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>()?, *s);
        }
        let names: HashSet<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), Scenario::ALL.len(), "a name is listed twice");
        assert!("seed-005".parse::<Scenario>().is_err());
        Ok(())
    }

    #[test]
    fn configs_are_valid_shapes() {
        for s in Scenario::ALL {
            let c = s.config();
            assert_eq!(c.nodes.len(), 2, "{s}");
            assert!(c.nodes.iter().all(|n| !n.pods.is_empty()), "{s}");
        }
        assert_eq!(
            seed_003::Seed003.config().nodes[1]
                .autodetect_iface
                .as_deref(),
            Some("nerdctl0")
        );
        assert_eq!(seed_004::Seed004::Active.config().routing, Routing::Bgp);
        assert_eq!(seed_004::Seed004::Passive.config().routing, Routing::Bgp);
    }
}
