//! calico-node's start-up against its datastore: how many request/response exchanges it makes
//! (read from Calico's source), the kubelet probe windows that kill it when it is late, and the
//! projection from a measured per-exchange latency to a start-up time. Shared by the agent's
//! `datastore_latency` rule and the lab's seed-001 stand-in, so both count the same way.
//!
//! Sources (see docs/compatibility.md for versions):
//! - Calico v3 on etcdv3: `node/pkg/lifecycle/startup/startup.go` `Run` (v3.32), every Get,
//!   Create and List one etcd request (`libcalico-go/lib/backend/etcdv3/etcdv3.go`: a List is one
//!   prefix Get), so cluster size adds bytes, not round trips.
//! - Calico v2.x on etcdv2 (seed 001 ran v2.6.5): `calico_node/startup/startup.go` with
//!   libcalico-go v1.7 `lib/backend/compat/compat.go`: listing nodes lists the host directories
//!   once, then Gets six keys per node (`getNodeSubcomponents`), one request each.
//! - Probes: manifests `calico.yaml` (liveness 10 s delay, 10 s period, 6 failures);
//!   tigera/operator `pkg/render/node.go` (liveness with Kubernetes defaults: no delay, 10 s
//!   period, 3 failures; recent operators add a startupProbe of 2 s x 150).
//! - The kubelet (`pkg/kubelet/prober/worker.go`) probes on a ticker once `initialDelaySeconds`
//!   have passed and kills at the `failureThreshold`-th consecutive failure: between
//!   `delay + (threshold - 1) x period` and `delay + threshold x period` after the start.

use serde::{Deserialize, Serialize};

/// A read pattern of calico-node's start-up, by the Calico release line that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPattern {
    /// Calico v3 with the etcdv3 datastore: a fixed number of Gets, Creates and Lists.
    CalicoV3Etcdv3,
    /// Calico v2.x with etcdv2: a fixed part plus six Gets per node in the cluster.
    CalicoV2Etcdv2,
}

impl ReadPattern {
    pub const ALL: [ReadPattern; 2] = [ReadPattern::CalicoV3Etcdv3, ReadPattern::CalicoV2Etcdv2];

    /// Exchanges whatever the cluster size, for a node joining the cluster (as in seed 001).
    ///
    /// v3 (startup.go `Run`, v3.32): List blockaffinities (IPAM `UpgradeHost`), Get the node,
    /// List nodes (`checkConflictingNodes`, the IP is new), Create the node, List ippools,
    /// Get clusterinformations/default, Create tiers default, kube-admin, kube-baseline
    /// (`EnsureInitialized`), Get felixconfigurations default and node.<name>, Create
    /// node.<name>, Get bgpconfigurations/default: 13.
    ///
    /// v2.6 (startup.go `main` + libcalico-go v1.7): Get the host metadata and its directory
    /// (both missing), list the host directories, apply the node (metadata + 7 components),
    /// List the pools, 10 config Gets/Sets (`ensureDefaultConfig`), 6 directories
    /// (`EnsureCalicoNodeInitialized`): 28.
    pub fn fixed_exchanges(self) -> u32 {
        match self {
            ReadPattern::CalicoV3Etcdv3 => 13,
            ReadPattern::CalicoV2Etcdv2 => 28,
        }
    }

    /// Exchanges per node already in the cluster.
    pub fn per_node_exchanges(self) -> u32 {
        match self {
            ReadPattern::CalicoV3Etcdv3 => 0,
            // ip_addr_v4, network_v4, ip_addr_v6, network_v6, as_num, orchestrator_refs.
            ReadPattern::CalicoV2Etcdv2 => 6,
        }
    }

    /// Exchanges for a cluster of `nodes` nodes.
    pub fn exchanges(self, nodes: u32) -> u32 {
        self.fixed_exchanges() + self.per_node_exchanges() * nodes
    }
}

/// Which kind of install a probe budget belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Install {
    /// Calico's manifests (`calico.yaml`, `calico-etcd.yaml`).
    Manifest,
    /// tigera/operator without a startupProbe.
    Operator,
    /// tigera/operator with its startupProbe (liveness waits until it succeeds).
    OperatorStartupProbe,
    /// The value of `--liveness-budget`.
    Flag,
}

/// A kubelet probe that kills calico-node when it is not live in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeBudget {
    pub install: Install,
    /// `livenessProbe` or `startupProbe`.
    pub probe: String,
    /// The earliest kill: `initialDelaySeconds + (failureThreshold - 1) x periodSeconds`.
    pub kill_from_s: f64,
    /// The latest kill: `initialDelaySeconds + failureThreshold x periodSeconds`.
    pub kill_by_s: f64,
}

/// `probe` is `&'static str` here so the constants stay `const`.
struct Probe {
    install: Install,
    probe: &'static str,
    initial_delay_s: f64,
    period_s: f64,
    failure_threshold: u32,
}

impl Probe {
    fn budget(&self) -> ProbeBudget {
        let until = |n: u32| self.initial_delay_s + f64::from(n) * self.period_s;
        ProbeBudget {
            install: self.install,
            probe: self.probe.to_string(),
            kill_from_s: until(self.failure_threshold.saturating_sub(1)),
            kill_by_s: until(self.failure_threshold),
        }
    }
}

/// Manifests: 10 s + 6 x 10 s (killed 60-70 s after the start).
const MANIFEST_LIVENESS: Probe = Probe {
    install: Install::Manifest,
    probe: "livenessProbe",
    initial_delay_s: 10.0,
    period_s: 10.0,
    failure_threshold: 6,
};
/// Operator: Kubernetes defaults, 0 s + 3 x 10 s (killed 20-30 s after the start).
const OPERATOR_LIVENESS: Probe = Probe {
    install: Install::Operator,
    probe: "livenessProbe",
    initial_delay_s: 0.0,
    period_s: 10.0,
    failure_threshold: 3,
};
/// Operator with a startupProbe: 150 x 2 s (the liveness probe waits for it).
const OPERATOR_STARTUP: Probe = Probe {
    install: Install::OperatorStartupProbe,
    probe: "startupProbe",
    initial_delay_s: 0.0,
    period_s: 2.0,
    failure_threshold: 150,
};

impl ProbeBudget {
    pub fn manifest() -> ProbeBudget {
        MANIFEST_LIVENESS.budget()
    }

    pub fn operator() -> ProbeBudget {
        OPERATOR_LIVENESS.budget()
    }

    pub fn operator_startup_probe() -> ProbeBudget {
        OPERATOR_STARTUP.budget()
    }

    /// `--liveness-budget`: the given time is the latest kill; the earliest is unknown, so
    /// both are the flag's value.
    pub fn flag(budget_s: f64) -> ProbeBudget {
        ProbeBudget {
            install: Install::Flag,
            probe: "livenessProbe".into(),
            kill_from_s: budget_s,
            kill_by_s: budget_s,
        }
    }

    /// What a start-up of `startup_s` seconds meets under this probe.
    pub fn outcome(&self, startup_s: f64) -> Outcome {
        if startup_s < self.kill_from_s {
            Outcome::Fits
        } else if startup_s < self.kill_by_s {
            Outcome::AtRisk
        } else {
            Outcome::Killed
        }
    }
}

/// Why the projection uses the budgets it shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetBasis {
    /// `--liveness-budget` was given.
    LivenessBudgetFlag,
    /// The datastore is etcd, which only manifest installs use (the operator always renders
    /// `DATASTORE_TYPE=kubernetes`): the manifests' probe.
    EtcdMeansManifest,
    /// The datastore is the apiserver or Typha, used by both kinds: every budget is shown.
    UnknownInstallKind,
}

impl BudgetBasis {
    /// The budgets for this basis (`flag_s` for [`BudgetBasis::LivenessBudgetFlag`]).
    pub fn budgets(self, flag_s: Option<f64>) -> Vec<ProbeBudget> {
        match (self, flag_s) {
            (BudgetBasis::LivenessBudgetFlag, Some(s)) => vec![ProbeBudget::flag(s)],
            (BudgetBasis::EtcdMeansManifest, _) => vec![ProbeBudget::manifest()],
            _ => vec![
                ProbeBudget::manifest(),
                ProbeBudget::operator(),
                ProbeBudget::operator_startup_probe(),
            ],
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            BudgetBasis::LivenessBudgetFlag => "the value of --liveness-budget, as given",
            BudgetBasis::EtcdMeansManifest => {
                "the datastore is etcd, which only manifest installs use (the operator always runs the Kubernetes datastore): the manifests' livenessProbe, killed 60-70 s after the start"
            }
            BudgetBasis::UnknownInstallKind => {
                "unknown install kind: the manifests' livenessProbe (60-70 s), the operator's (Kubernetes defaults, 20-30 s) and its startupProbe (2 s x 150, about 300 s) are all shown"
            }
        }
    }
}

/// Where a start-up lands within a probe's kill window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Live before the earliest kill.
    Fits,
    /// Inside the kill window: killed or not depending on the probe ticker's phase.
    AtRisk,
    /// Past the latest kill.
    Killed,
}

/// One read pattern projected at the measured latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatternProjection {
    pub pattern: ReadPattern,
    pub fixed_exchanges: u32,
    pub per_node_exchanges: u32,
    /// connect + fixed exchanges.
    pub fixed_s: f64,
    /// Added by each node in the cluster (0 for v3).
    pub per_node_s: f64,
    /// One per budget, in the order of [`StartupProjection::budgets`].
    pub fits: Vec<PatternFit>,
}

/// One read pattern against one budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatternFit {
    pub install: Install,
    pub probe: String,
    /// For a pattern that does not grow with the cluster: where the start-up lands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// For a per-node pattern: the most nodes whose start-up ends before the earliest kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_nodes: Option<u64>,
}

/// calico-node's start-up projected from the measured per-exchange latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartupProjection {
    pub basis: BudgetBasis,
    /// [`BudgetBasis::explain`], for people.
    pub basis_note: String,
    pub budgets: Vec<ProbeBudget>,
    /// The connection's set-up (the TCP handshake as measured, else one exchange).
    pub connect_ms: f64,
    /// The latency each exchange is projected at (the measured median).
    pub per_exchange_ms: f64,
    pub patterns: Vec<PatternProjection>,
}

/// Projects every [`ReadPattern`] at `per_exchange_ms` (plus `connect_ms` once) against
/// `budgets`.
pub fn project(
    basis: BudgetBasis,
    budgets: Vec<ProbeBudget>,
    connect_ms: f64,
    per_exchange_ms: f64,
) -> StartupProjection {
    let per_s = per_exchange_ms / 1e3;
    // Milliseconds are all a projection can claim.
    let ms = |s: f64| (s * 1e3).round() / 1e3;
    let patterns = ReadPattern::ALL
        .iter()
        .map(|&pattern| {
            let fixed_s = ms(connect_ms / 1e3 + f64::from(pattern.fixed_exchanges()) * per_s);
            let per_node_s = ms(f64::from(pattern.per_node_exchanges()) * per_s);
            let fits = budgets
                .iter()
                .map(|b| {
                    let (outcome, max_nodes) = if per_node_s > 0.0 {
                        let room = b.kill_from_s - fixed_s;
                        let n = if room > 0.0 {
                            // Strictly before the earliest kill.
                            (room / per_node_s).ceil() as u64 - 1
                        } else {
                            0
                        };
                        (None, Some(n))
                    } else {
                        (Some(b.outcome(fixed_s)), None)
                    };
                    PatternFit {
                        install: b.install,
                        probe: b.probe.clone(),
                        outcome,
                        max_nodes,
                    }
                })
                .collect();
            PatternProjection {
                pattern,
                fixed_exchanges: pattern.fixed_exchanges(),
                per_node_exchanges: pattern.per_node_exchanges(),
                fixed_s,
                per_node_s,
                fits,
            }
        })
        .collect();
    StartupProjection {
        basis,
        basis_note: basis.explain().to_string(),
        budgets,
        connect_ms,
        per_exchange_ms,
        patterns,
    }
}

impl StartupProjection {
    /// The start-up time of `pattern` for a cluster of `nodes` nodes.
    pub fn startup_s(&self, pattern: ReadPattern, nodes: u32) -> Option<f64> {
        self.patterns
            .iter()
            .find(|p| p.pattern == pattern)
            .map(|p| p.fixed_s + f64::from(nodes) * p.per_node_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_windows_follow_the_kubelet() {
        let m = ProbeBudget::manifest();
        assert_eq!((m.kill_from_s, m.kill_by_s), (60.0, 70.0));
        let o = ProbeBudget::operator();
        assert_eq!((o.kill_from_s, o.kill_by_s), (20.0, 30.0));
        let s = ProbeBudget::operator_startup_probe();
        assert_eq!((s.kill_from_s, s.kill_by_s), (298.0, 300.0));
        assert_eq!(m.outcome(59.9), Outcome::Fits);
        assert_eq!(m.outcome(65.0), Outcome::AtRisk);
        assert_eq!(m.outcome(70.0), Outcome::Killed);
    }

    #[test]
    fn seed_001_v2_per_node_reads_outlive_the_manifest_probe_v3_does_not() {
        // The seed: 53 nodes, etcd in Singapore, the node in US-East.
        let at = |ms: f64| {
            project(
                BudgetBasis::EtcdMeansManifest,
                BudgetBasis::EtcdMeansManifest.budgets(None),
                ms,
                ms,
            )
        };
        // 150 ms alone: v2.6 still fits 53 nodes (29 + 318 exchanges = 52 s).
        let p = at(150.0);
        let v2 = p.startup_s(ReadPattern::CalicoV2Etcdv2, 53).unwrap_or(0.0);
        assert!((v2 - 52.05).abs() < 1e-6, "{v2}");
        assert_eq!(p.patterns[1].fits[0].max_nodes, Some(61));
        // A US-East <-> Singapore round trip (220 ms): 76 s, past 70 s.
        let p = at(220.0);
        let v2 = p.startup_s(ReadPattern::CalicoV2Etcdv2, 53).unwrap_or(0.0);
        assert_eq!(p.budgets[0].outcome(v2), Outcome::Killed, "{v2}");
        assert_eq!(p.patterns[1].fits[0].max_nodes, Some(40));
        // v3 on etcdv3 at the same latency: 14 exchanges, about 3 s.
        let v3 = p.startup_s(ReadPattern::CalicoV3Etcdv3, 53).unwrap_or(0.0);
        assert!((v3 - 3.08).abs() < 1e-6, "{v3}");
        assert_eq!(p.patterns[0].fits[0].outcome, Some(Outcome::Fits));
        assert_eq!(p.patterns[0].fits[0].max_nodes, None);
    }

    #[test]
    fn v3_needs_seconds_per_exchange_to_be_killed() {
        // 13 exchanges + connect: the operator's 20 s window is reached at about 1.43 s each.
        let b = BudgetBasis::UnknownInstallKind;
        let p = project(b, b.budgets(None), 1500.0, 1500.0);
        let outcomes: Vec<_> = p.patterns[0].fits.iter().map(|f| f.outcome).collect();
        assert_eq!(
            outcomes,
            [
                Some(Outcome::Fits),
                Some(Outcome::AtRisk),
                Some(Outcome::Fits)
            ]
        );
        assert_eq!(p.budgets.len(), 3);
    }

    #[test]
    fn flag_budget_is_one_window_and_room_runs_out() {
        let b = BudgetBasis::LivenessBudgetFlag;
        let p = project(b, b.budgets(Some(3.0)), 150.0, 150.0);
        assert_eq!(p.budgets, vec![ProbeBudget::flag(3.0)]);
        // 0.15 + 28 x 0.15 = 4.35 s > 3 s: not even an empty cluster; v3 needs 2.1 s.
        assert_eq!(p.patterns[1].fits[0].max_nodes, Some(0));
        assert_eq!(p.patterns[0].fits[0].outcome, Some(Outcome::Fits));
    }
}
