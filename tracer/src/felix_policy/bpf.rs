//! felix's eBPF dataplane: which policy rule dropped a packet, from felix's own rule counters.
//!
//! felix's policy program records the id of every rule a packet matched (`writeRecordRuleID`,
//! `felix/bpf/polprog/pol_prog_builder.go`: Allow, Pass and Deny rules and the end of each
//! tier), and its tc program adds one to each recorded id's counter in the pinned per-CPU hash
//! `cali_rule_ctrs2` (key: u64 rule id, value: u64 per possible CPU;
//! `felix/bpf-gpl/rule_counters.h` `update_rule_counters`, `felix/bpf/counters/map.go`
//! `PolicyMapParameters`) both on the allow path and in `calico_tc_skb_drop`
//! (`felix/bpf-gpl/tc.c`). So a drop moves its Deny or end-of-tier id, and also the Pass ids
//! of the tiers before it; allowed packets move Allow ids. Only Deny and end-of-tier ids are
//! candidates for a drop.
//!
//! A rule's id is the FNV-1a 64 hash of its NFLOG prefix (`bpf_ep_mgr.go`
//! `ruleMatchIDFromNFLOGPrefix`; `felix/rules/nflogprefix.go`): `<A|P|D>P<I|E><index>|<policy
//! id>` for a policy rule (policy id `felix/types/policy_id.go` `PolicyID.ID()`, the same id as
//! the iptables chain names'), `DP<I|E>|<tier>` for the end of a tier, hashed when 63 characters
//! or longer. felix computes ids this way only while its flow logs are off: with flow logs (or
//! Goldmane) on they come from a run-time allocator (`calc.PolicyLookupsCache`) and cannot be
//! computed here; nor can those of felix before v3.32 (other inputs). Such a counter matches no
//! id computed from the datastore, and the evidence says so instead of naming a policy.
//!
//! The map is opened read-only (`BPF_OBJ_GET` with `BPF_F_RDONLY`): tracer never writes felix's
//! maps. It is read like the iptables counters: when traced flows saw new kernel drops, at most
//! every 250 ms and a tenth of a core.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::Path,
    sync::Arc,
};

use tracer_model::diagnosis::{PolicyAction, PolicyDirection, PolicyHit, PolicyLookup};

use super::{keep_interval, length_limited_id, Policy, SLACK_NS};

/// felix's rule counters map as pinned (`cali_rule_ctrs`, version 2; unchanged v3.25 to HEAD).
pub const RULE_COUNTERS_MAP: &str = "cali_rule_ctrs2";
/// `NFLOGPrefixMaxLengthWoTerm`: a prefix this long or longer is hashed.
const PREFIX_MAX: usize = 63;
/// `hashedPrefixPrefixLen`, `hashedPrefixSuffixLen`.
const HASH_KEEP: usize = 10;
/// `hashLen`.
const HASH_LEN: usize = PREFIX_MAX - 2 * HASH_KEEP - 1;

/// `maybeHash`: the first and last 10 characters around a hash of the whole prefix.
pub fn maybe_hash(prefix: String) -> String {
    if prefix.len() < PREFIX_MAX {
        return prefix;
    }
    // Policy ids are ASCII (Kubernetes names); a byte slice at a char boundary otherwise.
    let (Some(head), Some(tail)) = (
        prefix.get(..HASH_KEEP),
        prefix.get(prefix.len() - HASH_KEEP..),
    ) else {
        return prefix;
    };
    format!("{head}{}_{tail}", length_limited_id("", &prefix, HASH_LEN))
}

fn dir_char(dir: PolicyDirection) -> char {
    match dir {
        PolicyDirection::Ingress => 'I',
        PolicyDirection::Egress => 'E',
    }
}

/// `CalculateNFLOGPrefixStr` for a policy rule: `action` is `A`, `P` or `D`.
pub fn rule_prefix(action: char, dir: PolicyDirection, index: usize, policy_id: &str) -> String {
    maybe_hash(format!("{action}P{}{index}|{policy_id}", dir_char(dir)))
}

/// `CalculateEndOfTierDropNFLOGPrefixStr` (`action` `D`), or its Pass form (`P`).
pub fn end_of_tier_prefix(action: char, dir: PolicyDirection, tier: &str) -> String {
    maybe_hash(format!("{action}P{}|{tier}", dir_char(dir)))
}

/// FNV-1a, 64 bits (Go's `hash/fnv` `New64a`).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What a rule id stands for.
#[derive(Debug, Clone)]
pub enum RuleId {
    Deny {
        policy: Arc<Policy>,
        dir: PolicyDirection,
        index: usize,
    },
    EndOfTier {
        tier: String,
        dir: PolicyDirection,
    },
    /// Allow and Pass rules, a tier's end when it passes: counted, never a drop.
    NotADrop,
}

/// The rule ids felix computes from the datastore's policies, with their prefixes.
#[derive(Debug, Default)]
pub struct RuleIds(HashMap<u64, (RuleId, String)>);

impl RuleIds {
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a Arc<Policy>>) -> RuleIds {
        let mut ids = HashMap::new();
        let mut tiers = std::collections::BTreeSet::new();
        for p in policies {
            tiers.insert(p.tier.clone());
            let id = p.id();
            for dir in [PolicyDirection::Ingress, PolicyDirection::Egress] {
                for (index, r) in p.rules(dir).iter().enumerate() {
                    // `ruleMatchID`: a Log rule records id 0 (nothing to name).
                    let (action, what) = match r.action.to_ascii_lowercase().as_str() {
                        "" | "allow" => ('A', RuleId::NotADrop),
                        "pass" | "next-tier" => ('P', RuleId::NotADrop),
                        "deny" => (
                            'D',
                            RuleId::Deny {
                                policy: Arc::clone(p),
                                dir,
                                index,
                            },
                        ),
                        _ => continue,
                    };
                    let prefix = rule_prefix(action, dir, index, &id);
                    ids.insert(fnv1a64(prefix.as_bytes()), (what, prefix));
                }
            }
        }
        for tier in tiers {
            for dir in [PolicyDirection::Ingress, PolicyDirection::Egress] {
                let drop = end_of_tier_prefix('D', dir, &tier);
                let pass = end_of_tier_prefix('P', dir, &tier);
                ids.insert(
                    fnv1a64(drop.as_bytes()),
                    (
                        RuleId::EndOfTier {
                            tier: tier.clone(),
                            dir,
                        },
                        drop,
                    ),
                );
                ids.insert(fnv1a64(pass.as_bytes()), (RuleId::NotADrop, pass));
            }
        }
        RuleIds(ids)
    }

    pub fn get(&self, id: u64) -> Option<&(RuleId, String)> {
        self.0.get(&id)
    }
}

/// Rule counters that moved between two readings (all of them: which ids are drops is judged
/// with the policies as of the answer).
#[derive(Debug, Clone)]
pub struct Interval {
    pub from_ns: u64,
    pub to_ns: u64,
    pub moved: Vec<(u64, u64)>,
}

/// What the agent has read of `cali_rule_ctrs2`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub last: Arc<HashMap<u64, u64>>,
    pub last_read_ns: Option<u64>,
    pub intervals: VecDeque<Arc<Interval>>,
    pub error: Option<String>,
}

impl Counters {
    /// A reading taken at `at_ns` (before the map was walked).
    pub fn record(&mut self, at_ns: u64, read: HashMap<u64, u64>) {
        if let Some(from_ns) = self.last_read_ns {
            // An id absent before started at 0 (felix creates entries on first hit); one that
            // went down was recreated by felix (its map is rebuilt on some upgrades): not
            // compared.
            let mut moved: Vec<(u64, u64)> = read
                .iter()
                .filter_map(|(id, n)| {
                    let before = self.last.get(id).copied().unwrap_or(0);
                    (*n > before).then(|| (*id, n - before))
                })
                .collect();
            moved.sort_unstable();
            if !moved.is_empty() {
                let interval = Interval {
                    from_ns,
                    to_ns: at_ns,
                    moved,
                };
                keep_interval(&mut self.intervals, Arc::new(interval));
            }
        }
        self.last = Arc::new(read);
        self.last_read_ns = Some(at_ns);
        self.error = None;
    }
}

/// The drop's place: which direction of policy can have dropped it. felix's program on a
/// pod's host-side veth judges the pod's egress on the veth's ingress (tc `TC_INGRESS` drop
/// reason) and its ingress on the veth's egress (`TC_EGRESS`).
pub fn direction_of_drop(reason: &str) -> Option<PolicyDirection> {
    match reason {
        "TC_INGRESS" => Some(PolicyDirection::Egress),
        "TC_EGRESS" => Some(PolicyDirection::Ingress),
        _ => None,
    }
}

fn missing(m: String) -> PolicyLookup {
    PolicyLookup {
        candidates: vec![],
        missing: vec![m],
    }
}

/// The rule that dropped a packet at `ts_ns` at a workload endpoint (`dir` from the drop's
/// hook), or why none can be named.
pub fn attribute(
    counters: &Counters,
    ids: Option<&RuleIds>,
    policies_missing: Option<&str>,
    ts_ns: u64,
    dir: PolicyDirection,
) -> Result<PolicyHit, PolicyLookup> {
    if let Some(e) = &counters.error {
        return Err(missing(format!(
            "felix's rule counters ({RULE_COUNTERS_MAP}) unread: {e}"
        )));
    }
    let Some(last) = counters.last_read_ns else {
        return Err(missing(format!(
            "felix's rule counters ({RULE_COUNTERS_MAP}) not read yet"
        )));
    };
    if ts_ns.saturating_add(SLACK_NS) > last {
        return Err(missing(
            "felix's rule counters not read since the drop yet".into(),
        ));
    }
    let Some(ids) = ids else {
        return Err(missing(format!(
            "no policies from the datastore ({}): felix's rule ids are not named",
            policies_missing.unwrap_or("none read")
        )));
    };
    // Deny and end-of-tier ids of the drop's direction, and ids no policy computes (they may
    // be the drop: a policy not read, or ids felix allocated at run time).
    let mut moved: BTreeMap<u64, u64> = BTreeMap::new();
    for iv in &counters.intervals {
        if ts_ns + SLACK_NS > iv.from_ns && ts_ns <= iv.to_ns + SLACK_NS {
            for (id, n) in &iv.moved {
                let candidate = match ids.get(*id).map(|(r, _)| r) {
                    Some(RuleId::Deny { dir: d, .. } | RuleId::EndOfTier { dir: d, .. }) => {
                        *d == dir
                    }
                    Some(RuleId::NotADrop) => false,
                    None => true,
                };
                if candidate {
                    *moved.entry(*id).or_default() += n;
                }
            }
        }
    }
    let name = |id: u64| match ids.get(id) {
        Some((_, prefix)) => format!("{RULE_COUNTERS_MAP}[{id:#018x}] {prefix}"),
        None => format!("{RULE_COUNTERS_MAP}[{id:#018x}]"),
    };
    let candidates: Vec<String> = moved.keys().map(|id| name(*id)).collect();
    let mut it = moved.into_iter();
    let (id, packets) = match (it.next(), it.next()) {
        (Some(one), None) => one,
        (Some(_), Some(_)) => {
            return Err(PolicyLookup {
                candidates,
                missing: vec![
                    "several of felix's rule counters that can mean a drop moved with it: which one dropped this flow's packet is not decided".into(),
                ],
            })
        }
        (None, _) => {
            return Err(missing(
                "no Deny or end-of-tier rule counter of felix moved with the drop (another program or rule dropped it)".into(),
            ))
        }
    };
    let Some((rule, prefix)) = ids.get(id) else {
        return Err(PolicyLookup {
            candidates,
            missing: vec![
                "the rule counter that moved has an id computed from no policy of the datastore: felix allocates rule ids at run time while its flow logs (or Goldmane) are on, and felix before v3.32 computes them from other inputs; or the policy is not in the datastore".into(),
            ],
        });
    };
    let mut hit = super::deny_hit(prefix.clone(), 0, dir, packets);
    match rule {
        RuleId::Deny { policy, index, .. } => {
            hit.kind = Some(policy.kind.as_str().into());
            hit.namespace = policy.namespace.clone();
            hit.name = Some(policy.name.clone());
            hit.tier = Some(policy.tier.clone());
            hit.rule_index = u32::try_from(*index).ok();
            hit.rule = policy.rules(dir).get(*index).map(|r| r.describe());
        }
        RuleId::EndOfTier { tier, .. } => {
            hit.action = PolicyAction::EndOfTier;
            hit.tier = Some(tier.clone());
            hit.missing.push(
                "which of the tier's policies select the endpoint: felix's eBPF policy program is not read".into(),
            );
        }
        RuleId::NotADrop => {
            return Err(missing(format!("{prefix}: not a drop")));
        }
    }
    Ok(hit)
}

/// `bpf(2)` commands and flags (`include/uapi/linux/bpf.h`).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_F_RDONLY: u32 = 1 << 3;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_map_info`.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised bpf_attr member of its own size; the kernel reads
    // and writes at most that many bytes, and any pointers in it outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// felix's rule counters pinned in `globals`, summed over CPUs: id -> packets. Opened
/// read-only and walked once (`BPF_MAP_GET_NEXT_KEY`, `BPF_MAP_LOOKUP_ELEM`).
pub fn read_counters(globals: &Path) -> Result<HashMap<u64, u64>, String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let path = globals.join(RULE_COUNTERS_MAP);
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut get = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        file_flags: BPF_F_RDONLY,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut get).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = MapInfo::default();
    let mut ia = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfo>() as u32,
        info: &mut info as *mut MapInfo as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut ia).map_err(|e| format!("map info: {e}"))?;
    if info.map_type != BPF_MAP_TYPE_PERCPU_HASH || info.key_size != 8 || info.value_size != 8 {
        return Err(format!(
            "{}: not felix's layout (type {}, key {} bytes, value {} bytes)",
            path.display(),
            info.map_type,
            info.key_size,
            info.value_size
        ));
    }
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
    let mut values = vec![0u64; cpus];
    let mut out = HashMap::new();
    let mut key = 0u64;
    let mut next = 0u64;
    let mut first = true;
    // Entries felix adds while we walk may be met or not; the walk never exceeds the map.
    for _ in 0..=info.max_entries {
        let mut a = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: if first { 0 } else { &key as *const u64 as u64 },
            value_or_next_key: &mut next as *mut u64 as u64,
            ..Default::default()
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(format!("next key: {e}")),
        }
        first = false;
        key = next;
        let mut l = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: &key as *const u64 as u64,
            value_or_next_key: values.as_mut_ptr() as u64,
            ..Default::default()
        };
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut l) {
            Ok(_) => {
                out.insert(key, values.iter().fold(0u64, |s, v| s.saturating_add(*v)));
            }
            // Deleted since (felix's cleanup): gone.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(format!("lookup: {e}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::felix_policy::{parse_policy, PolicyKind};

    #[test]
    fn prefixes_are_felix_nflog_prefixes() {
        // felix/rules/nflogprefix_test.go's table.
        let chars62 = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let chars63 = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0";
        assert_eq!(
            rule_prefix(
                'A',
                PolicyDirection::Ingress,
                0,
                "np/namespace1/default.policy"
            ),
            "API0|np/namespace1/default.policy"
        );
        let p = rule_prefix('D', PolicyDirection::Egress, 88, &format!("gnp/{chars62}"));
        assert_eq!(p, format!("DPE88|gnp/{chars62}"));
        assert_eq!(p.len(), 62);
        let p = rule_prefix('D', PolicyDirection::Ingress, 88, &format!("gnp/{chars63}"));
        assert_eq!(
            p,
            "DPI88|gnp/_12IXaBPahNM7a7dZhI8zg6PStmHsgneYaax8LVSIq_RSTUVWXYZ0"
        );
        assert_eq!(p.len(), 63);
        assert_eq!(
            rule_prefix(
                'D',
                PolicyDirection::Egress,
                1,
                "gnp/this-is-still-quite-a-long-tier-name-even-though-its-not-required.quite-a-long-policy-name"
            ),
            "DPE1|gnp/t_FSGxA9eGa6t_A5Rj2agPvl4aq8-eohq0An6xEW4n7_olicy-name"
        );
        assert_eq!(
            end_of_tier_prefix('D', PolicyDirection::Ingress, "security"),
            "DPI|security"
        );
        assert_eq!(
            end_of_tier_prefix('P', PolicyDirection::Egress, "default"),
            "PPE|default"
        );
    }

    #[test]
    fn fnv1a_is_gos() {
        // Go: fnv.New64a() over "" and "a" (the algorithm's published vectors).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    fn policies() -> Vec<Arc<Policy>> {
        let np = parse_policy(
            PolicyKind::NetworkPolicy,
            r#"{"metadata":{"name":"deny-b","namespace":"demo"},"spec":{"tier":"security","ingress":[{"action":"Allow","source":{"nets":["10.0.0.1/32"]}},{"action":"Deny","source":{"nets":["10.0.0.2/32"]}}]}}"#,
        );
        let gnp = parse_policy(
            PolicyKind::GlobalNetworkPolicy,
            r#"{"metadata":{"name":"no-egress"},"spec":{"egress":[{"action":"Deny"}]}}"#,
        );
        [np, gnp]
            .into_iter()
            .filter_map(Result::ok)
            .map(Arc::new)
            .collect()
    }

    fn reading(ids: &[(&str, u64)]) -> HashMap<u64, u64> {
        ids.iter()
            .map(|(p, n)| (fnv1a64(p.as_bytes()), *n))
            .collect()
    }

    #[test]
    fn a_moved_deny_id_names_policy_rule_and_direction() {
        let p = policies();
        let ids = RuleIds::new(&p);
        let mut c = Counters::default();
        c.record(1_000_000_000, reading(&[("API0|np/demo/deny-b", 5)]));
        // The denied packet moved the Deny id, an allowed one its Allow id: the Allow id is
        // never a candidate.
        c.record(
            2_000_000_000,
            reading(&[("API0|np/demo/deny-b", 9), ("DPI1|np/demo/deny-b", 3)]),
        );
        let hit = attribute(
            &c,
            Some(&ids),
            None,
            1_500_000_000,
            PolicyDirection::Ingress,
        );
        let hit = hit.map_err(|e| format!("{e:?}"));
        assert!(hit.is_ok(), "{hit:?}");
        let Ok(hit) = hit else { return };
        assert_eq!(hit.action, PolicyAction::Deny);
        assert_eq!(hit.name.as_deref(), Some("deny-b"));
        assert_eq!(hit.namespace.as_deref(), Some("demo"));
        assert_eq!(hit.tier.as_deref(), Some("security"));
        assert_eq!(hit.kind.as_deref(), Some("NetworkPolicy"));
        assert_eq!(hit.rule_index, Some(1));
        assert_eq!(hit.packets, 3);
        assert_eq!(hit.chain, "DPI1|np/demo/deny-b");
        // The other direction's drop is not this rule.
        let e = attribute(&c, Some(&ids), None, 1_500_000_000, PolicyDirection::Egress);
        assert!(e.is_err(), "{e:?}");
    }

    #[test]
    fn end_of_tier_unknown_ids_and_ambiguity() {
        let p = policies();
        let ids = RuleIds::new(&p);
        let mut c = Counters::default();
        c.record(0, HashMap::new());
        c.record(1_000_000_000, reading(&[("DPE|default", 2)]));
        let hit = attribute(&c, Some(&ids), None, 500_000_000, PolicyDirection::Egress);
        let hit = hit.map_err(|e| format!("{e:?}"));
        assert_eq!(
            hit.as_ref().map(|h| (h.action, h.tier.clone())),
            Ok((PolicyAction::EndOfTier, Some("default".into())))
        );
        // An id no policy computes (felix's flow logs on): said, not named.
        c.record(2_000_000_000, {
            let mut r = reading(&[("DPE|default", 2)]);
            r.insert(0x1234, 1);
            r
        });
        let e = attribute(&c, Some(&ids), None, 1_500_000_000, PolicyDirection::Egress);
        let e = e.err().map(|e| e.missing.join(" "));
        assert!(
            e.as_deref().is_some_and(|m| m.contains("flow logs")),
            "{e:?}"
        );
        // Two candidates: not decided.
        c.record(3_000_000_000, {
            let mut r = reading(&[("DPE|default", 3), ("DPE0|gnp/no-egress", 1)]);
            r.insert(0x1234, 1);
            r
        });
        let e = attribute(&c, Some(&ids), None, 2_500_000_000, PolicyDirection::Egress);
        assert_eq!(e.err().map(|e| e.candidates.len()), Some(2));
        // Without policies, or before a reading since the drop.
        let e = attribute(
            &c,
            None,
            Some("no datastore"),
            2_500_000_000,
            PolicyDirection::Egress,
        );
        assert!(e.is_err());
        let e = attribute(&c, Some(&ids), None, 3_000_000_000, PolicyDirection::Egress);
        assert!(e
            .err()
            .is_some_and(|e| e.missing[0].contains("not read since")));
    }

    #[test]
    fn ids_of_every_kind_and_action() {
        let knp = parse_policy(
            PolicyKind::KubernetesNetworkPolicy,
            r#"{"metadata":{"name":"allow-web","namespace":"shop"},"spec":{"ingress":[{"action":"Log"},{"action":"Pass"},{"action":"Deny"}]}}"#,
        );
        let p: Vec<Arc<Policy>> = knp.into_iter().map(Arc::new).collect();
        let ids = RuleIds::new(&p);
        let kind = |prefix: &str| ids.get(fnv1a64(prefix.as_bytes())).map(|(r, _)| r.clone());
        // A Log rule has no id (felix records 0) but keeps its index: the Deny is rule 2.
        assert!(kind("DPI0|knp/shop/allow-web").is_none());
        assert!(matches!(
            kind("PPI1|knp/shop/allow-web"),
            Some(RuleId::NotADrop)
        ));
        assert!(matches!(
            kind("DPI2|knp/shop/allow-web"),
            Some(RuleId::Deny {
                index: 2,
                dir: PolicyDirection::Ingress,
                ..
            })
        ));
        assert!(matches!(
            kind("DPE|default"),
            Some(RuleId::EndOfTier {
                dir: PolicyDirection::Egress,
                ..
            })
        ));
        assert!(matches!(kind("PPI|default"), Some(RuleId::NotADrop)));
    }

    #[test]
    fn a_missing_pin_is_an_error_not_a_panic() {
        let r = read_counters(Path::new("/nonexistent/tracer"));
        assert!(r.is_err());
    }
}
