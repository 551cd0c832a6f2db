//! felix's eBPF dataplane (`bpfEnabled: true`): telling that it runs, and what tracer cannot
//! judge while it does.
//!
//! Checked in projectcalico/calico at v3.24.0, v3.27.0, v3.31.0, v3.32.0 and HEAD 87c15906
//! (Aug 2026):
//! - felix attaches one program per tc hook, `cali_tc_preamble` (`felix/bpf-gpl/tc_preamble.c`,
//!   attached by that name in `felix/bpf/tc/attach.go` since v3.27; as a clsact filter, and from
//!   v3.31 as a TCX link with no position flags, so it goes last on the hook as of its attach).
//!   The kernel keeps 15 characters of a name: `cali_tc_preambl`, which felix's own cleanup
//!   matches too (`attach.go`, `strings.Contains(..., "cali_tc_preambl")`).
//! - felix pins its maps in `/sys/fs/bpf/tc/globals/` (`felix/bpf/bpfdefs/defs.go`
//!   `GlobalPinDir`), among them the routes maps `cali_v4_routes` and `cali_v6_routes`
//!   (`felix/bpf/routes/map.go`, `map6.go`; unversioned names from v3.24 to HEAD). They exist
//!   only while felix runs in eBPF mode (or until its cleanup after leaving it).
//!
//! tracer only looks: a `stat` of two paths and, on TCX, a query of the host NICs' hooks, on
//! every node sync (felix can switch modes). It never changes felix's maps or programs; the
//! one map it reads is felix's rule counters, opened read-only (`felix_policy::bpf`). Reading pool and natOutgoing flags from `cali_v4_routes` (its layout, key
//! `{u32 prefixlen; be32 addr}` and value `{u32 flags; ...}` with `IN_POOL` 0x01 and `NAT_OUT`
//! 0x02, is the same from v3.24 to HEAD) is left out: the natOutgoing decision also depends on
//! `NATOutgoingExclusions`, which lives in the programs' globals, not in a map.
use std::path::Path;

use tracer_model::{health::TurnedOff, Cause, Dir, Verdict};

/// felix's pin directory (`bpfdefs.GlobalPinDir`); `--felix-bpf-dir` points elsewhere when
/// the host's bpffs is mounted at another path in the agent's container.
pub const GLOBALS_DIR: &str = "/sys/fs/bpf/tc/globals";
/// felix's routes maps (pool and natOutgoing flags per CIDR): present in eBPF mode only.
pub const ROUTES_MAPS: [&str; 2] = ["cali_v4_routes", "cali_v6_routes"];
/// The kernel's (15-character) name of felix's per-hook program `cali_tc_preamble`.
pub const PREAMBLE_PROG: &str = "cali_tc_preambl";
/// The kernel names of tracer's own tc programs start so (`tracer_tc_ingress`...).
const TRACER_PROG_PREFIX: &str = "tracer_tc_";

/// What showed that felix runs its eBPF dataplane here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EbpfMode {
    /// felix's pinned maps found (paths).
    pub pinned_maps: Vec<String>,
    /// felix's programs on the hooks of the host NICs tracer watches.
    pub programs: Vec<FelixProgram>,
}

/// felix's program on one hook, and where tracer sits relative to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FelixProgram {
    pub iface: String,
    pub dir: Dir,
    pub program: String,
    /// Whether tracer's program runs before felix's (`None`: tracer is not on this hook).
    pub tracer_first: Option<bool>,
}

impl From<&EbpfMode> for tracer_model::health::EbpfDataplaneView {
    fn from(m: &EbpfMode) -> Self {
        tracer_model::health::EbpfDataplaneView {
            pinned_maps: m.pinned_maps.clone(),
            programs: m
                .programs
                .iter()
                .map(|p| tracer_model::health::FelixProgramView {
                    iface: p.iface.clone(),
                    dir: p.dir,
                    program: p.program.clone(),
                    tracer_first: p.tracer_first,
                })
                .collect(),
        }
    }
}

/// felix's routes maps pinned in `dir`.
pub fn pinned_maps(dir: &Path) -> Vec<String> {
    ROUTES_MAPS
        .iter()
        .map(|m| dir.join(m))
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .map(|p| p.display().to_string())
        .collect()
}

/// felix's program among the names of one hook's programs, in the order they run.
pub fn felix_on_hook(iface: &str, dir: Dir, names: &[String]) -> Option<FelixProgram> {
    let felix = names.iter().position(|n| n.contains(PREAMBLE_PROG))?;
    let tracer = names.iter().position(|n| n.starts_with(TRACER_PROG_PREFIX));
    Some(FelixProgram {
        iface: iface.to_string(),
        dir,
        program: names[felix].clone(),
        tracer_first: tracer.map(|t| t < felix),
    })
}

/// Looks for felix's eBPF dataplane: its routes maps pinned in `globals`, and (with TCX) its
/// program on the hooks of `host_ifaces`. None when neither is there.
pub fn detect(globals: &Path, host_ifaces: &[String], tcx: bool) -> Option<EbpfMode> {
    let mut mode = EbpfMode {
        pinned_maps: pinned_maps(globals),
        programs: Vec::new(),
    };
    if tcx {
        use aya::programs::{SchedClassifier, TcAttachType};
        for iface in host_ifaces {
            for (kind, dir) in [
                (TcAttachType::Ingress, Dir::Ingress),
                (TcAttachType::Egress, Dir::Egress),
            ] {
                match SchedClassifier::query_tcx(iface, kind) {
                    Ok((_, progs)) => {
                        let names: Vec<String> = progs
                            .iter()
                            .filter_map(|p| p.name_as_str().map(String::from))
                            .collect();
                        mode.programs.extend(felix_on_hook(iface, dir, &names));
                    }
                    // The interface may have gone since the snapshot: the next sync sees.
                    Err(e) => tracing::debug!(iface, error = %e, "cannot query tcx programs"),
                }
            }
        }
    }
    (!mode.pinned_maps.is_empty() || !mode.programs.is_empty()).then_some(mode)
}

/// Verdicts tracer does not give in eBPF mode.
pub const OFF_VERDICTS: [Verdict; 5] = [
    Verdict::SnatSkipped,
    Verdict::SnatExcluded,
    Verdict::NoReply,
    Verdict::WrongSourceAddress,
    Verdict::WrongParentDevice,
];

/// Causes tracer does not diagnose in eBPF mode.
pub const OFF_CAUSES: [Cause; 7] = [
    Cause::MasqueradeNotApplied,
    Cause::NatOutgoingDisabled,
    Cause::IppoolOverlapsHostNetwork,
    Cause::DestinationUnresponsive,
    Cause::PodRouteMissing,
    Cause::NodeAddressOnWrongInterface,
    // Its symptom is a segment with no ACK past it: an ACK felix redirects past tracer's hooks
    // would look like none.
    Cause::MtuMismatch,
];

/// What is off in eBPF mode, and why (fixed words: sent without the token too).
pub fn turned_off() -> Vec<TurnedOff> {
    let dataplane = "calico-ebpf".to_string();
    vec![
        TurnedOff {
            dataplane: dataplane.clone(),
            verdicts: OFF_VERDICTS[..2].to_vec(),
            causes: OFF_CAUSES[..3].to_vec(),
            why: "felix's eBPF programs decide natOutgoing from the pool flags of its routes map (IN_POOL, NAT_OUT) and mark the packet; its iptables/nft rule matches only that mark, so felix's ipsets, nft sets and natOutgoing rule do not say which pod traffic it means to masquerade.".into(),
        },
        TurnedOff {
            dataplane,
            verdicts: OFF_VERDICTS[2..].to_vec(),
            causes: OFF_CAUSES[3..].to_vec(),
            why: "felix's tc programs translate packets and redirect them past the host stack (into pods with bpf_redirect_peer, which skips the veth's egress hook), and a program felix attaches after tracer's runs after it on egress: a reply, or the translated packet it answers, may never reach a hook tracer watches, so a flow that looks unanswered (or a segment that looks unacknowledged) may have been answered. vxlan.calico is flow-based (no parent device).".into(),
        },
    ]
}

pub fn is_off_verdict(v: Verdict) -> bool {
    OFF_VERDICTS.contains(&v)
}

pub fn is_off_cause(c: Cause) -> bool {
    OFF_CAUSES.contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pinned_routes_maps_are_found_by_felix_names() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("tracer-felix-bpf-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // A node without eBPF mode: felix's other pins may be there (leftovers), not routes.
        std::fs::write(dir.join("cali_v4_ct3"), b"")?;
        assert!(detect(&dir, &[], false).is_none());
        std::fs::write(dir.join("cali_v4_routes"), b"")?;
        let m = detect(&dir, &[], false);
        let _ = std::fs::remove_dir_all(&dir);
        let m = m.ok_or_else(|| std::io::Error::other("not detected"))?;
        assert_eq!(
            m.pinned_maps,
            [dir.join("cali_v4_routes").display().to_string()]
        );
        assert!(m.programs.is_empty());
        assert!(detect(Path::new("/nonexistent/tracer"), &[], false).is_none());
        Ok(())
    }

    #[test]
    fn felix_program_and_tracers_place_on_a_hook() {
        // Ingress: tracer attached first (BPF_F_BEFORE), felix appended.
        let p = felix_on_hook(
            "eth0",
            Dir::Ingress,
            &names(&["tracer_tc_ingre", "cali_tc_preambl"]),
        );
        assert_eq!(
            p,
            Some(FelixProgram {
                iface: "eth0".into(),
                dir: Dir::Ingress,
                program: "cali_tc_preambl".into(),
                tracer_first: Some(true),
            })
        );
        // Egress after felix re-attached: felix last, tracer before it.
        let p = felix_on_hook(
            "eth0",
            Dir::Egress,
            &names(&["cali_tc_preambl", "tracer_tc_egres"]),
        );
        assert_eq!(p.and_then(|p| p.tracer_first), Some(false));
        // tracer not on the hook; other programs only.
        let p = felix_on_hook("eth0", Dir::Egress, &names(&["cali_tc_preambl"]));
        assert_eq!(p.map(|p| p.tracer_first), Some(None));
        assert!(felix_on_hook("eth0", Dir::Egress, &names(&["cil_from_netdev"])).is_none());
    }

    #[test]
    fn off_lists_match_the_reasons() {
        let off = turned_off();
        let verdicts: Vec<Verdict> = off.iter().flat_map(|t| t.verdicts.clone()).collect();
        let causes: Vec<Cause> = off.iter().flat_map(|t| t.causes.clone()).collect();
        assert_eq!(verdicts, OFF_VERDICTS);
        assert_eq!(causes, OFF_CAUSES);
        // Positive observations and kernel evidence stay on.
        for v in [
            Verdict::SnatApplied,
            Verdict::Replied,
            Verdict::Dropped,
            Verdict::SlowResponse,
        ] {
            assert!(!is_off_verdict(v));
        }
        assert!(!is_off_cause(Cause::KernelDrop) && !is_off_cause(Cause::DatastoreLatency));
    }
}
