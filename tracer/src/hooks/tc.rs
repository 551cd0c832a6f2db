//! tc ingress/egress attachment (TCX links on kernels >= 6.6, clsact filters before).
//!
//! Where tracer sits among other programs on the same hook (a CNI's eBPF dataplane, policy
//! programs, other observers) is decided here, and said in docs/architecture.md: **first on
//! ingress, last on egress**, so tracer records the packet as it was on the wire: before anyone
//! rewrites, redirects or drops an arriving packet, and after everyone has had their say on a
//! leaving one. Every program hands the packet on (TCX_NEXT / TC_ACT_UNSPEC), so its position
//! never changes what the others see.
use std::collections::HashSet;

use aya::{
    programs::{
        tc,
        tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use futures::TryStreamExt;
use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
use tracer_common::{PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_TC_L3_EGRESS, PROG_TC_L3_INGRESS};

use super::{kernel::TcBackend, HookError};

/// clsact filter priorities (lower runs first): the two ends of the range, for "first on
/// ingress, last on egress". Fixed values also let a restarted agent recognise its filters.
pub const CLSACT_INGRESS_PRIORITY: u16 = 1;
pub const CLSACT_EGRESS_PRIORITY: u16 = u16::MAX;

pub struct Links {
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
    l3: bool,
}

/// The (ingress, egress) programs for a device with or without an Ethernet header.
fn programs(l3: bool) -> (&'static str, &'static str) {
    if l3 {
        (PROG_TC_L3_INGRESS, PROG_TC_L3_EGRESS)
    } else {
        (PROG_TC_INGRESS, PROG_TC_EGRESS)
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, HookError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(HookError::MissingProgram(name))?;
    Ok(prog.try_into()?)
}

pub fn load(ebpf: &mut Ebpf) -> Result<(), HookError> {
    for name in [
        PROG_TC_INGRESS,
        PROG_TC_EGRESS,
        PROG_TC_L3_INGRESS,
        PROG_TC_L3_EGRESS,
    ] {
        program(ebpf, name)?.load()?;
    }
    Ok(())
}

pub fn attach(
    ebpf: &mut Ebpf,
    backend: TcBackend,
    iface: &str,
    l3: bool,
) -> Result<Links, ProgramError> {
    if backend == TcBackend::Clsact {
        // Added when missing and never removed: deleting a clsact qdisc would take every other
        // program's filters with it, and an empty one changes nothing for the packets.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            tracing::debug!(iface, error = %e, "clsact qdisc not added (probably exists)");
        }
    }
    let (in_prog, out_prog) = programs(l3);
    let ingress = attach_one(ebpf, backend, in_prog, iface, TcAttachType::Ingress)?;
    let egress = match attach_one(ebpf, backend, out_prog, iface, TcAttachType::Egress) {
        Ok(l) => l,
        Err(e) => {
            if let Ok(p) = program(ebpf, in_prog) {
                let _ = p.detach(ingress);
            }
            return Err(e);
        }
    };
    Ok(Links {
        ingress,
        egress,
        l3,
    })
}

fn attach_one(
    ebpf: &mut Ebpf,
    backend: TcBackend,
    name: &'static str,
    iface: &str,
    kind: TcAttachType,
) -> Result<SchedClassifierLinkId, ProgramError> {
    let prog = program(ebpf, name).map_err(|e| match e {
        HookError::Program(p) => p,
        other => ProgramError::IOError(std::io::Error::other(other.to_string())),
    })?;
    let ingress = kind == TcAttachType::Ingress;
    let options = match backend {
        TcBackend::Tcx if ingress => TcAttachOptions::TcxOrder(LinkOrder::first()),
        TcBackend::Tcx => TcAttachOptions::TcxOrder(LinkOrder::last()),
        TcBackend::Clsact => TcAttachOptions::Netlink(NlOptions {
            priority: if ingress {
                CLSACT_INGRESS_PRIORITY
            } else {
                CLSACT_EGRESS_PRIORITY
            },
            ..Default::default()
        }),
    };
    match prog.attach_with_options(iface, kind, options) {
        Err(e) if backend == TcBackend::Clsact => {
            // Another program's filter may hold that priority with another protocol, which the
            // kernel refuses to share: observing from another position beats not observing.
            tracing::warn!(iface, error = %e, "clsact priority taken; letting the kernel pick one");
            prog.attach_with_options(iface, kind, TcAttachOptions::Netlink(NlOptions::default()))
        }
        other => other,
    }
}

/// A clsact filter running one of tracer's programs that no live process holds any more: left
/// by an agent that was killed (SIGKILL, OOM) before it could detach. TCX links die with their
/// process; filters do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleFilter {
    pub iface: String,
    pub ingress: bool,
    pub priority: u16,
    pub handle: u32,
    pub program: String,
    pub prog_id: u32,
}

fn is_ours(name: &str) -> bool {
    [
        PROG_TC_INGRESS,
        PROG_TC_EGRESS,
        PROG_TC_L3_INGRESS,
        PROG_TC_L3_EGRESS,
    ]
    .contains(&name)
}

/// BPF program ids that some process visible to us holds a file descriptor to (its fdinfo
/// says `prog_id:`). None when /proc cannot be read: then nothing can be called stale.
pub fn live_program_ids() -> Option<HashSet<u32>> {
    let mut ids = HashSet::new();
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let name = p.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Processes come and go while we look; an unreadable one is skipped.
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
            {
                ids.insert(id);
            }
        }
    }
    Some(ids)
}

/// tracer's filters on `ifindex` (clsact ingress and egress) with their program ids.
pub async fn tracer_filters(
    handle: &rtnetlink::Handle,
    ifindex: u32,
    iface: &str,
) -> Result<Vec<StaleFilter>, rtnetlink::Error> {
    let mut out = Vec::new();
    for ingress in [true, false] {
        let req = handle.traffic_filter(ifindex as i32).get();
        let req = if ingress { req.ingress() } else { req.egress() };
        let mut dump = req.execute();
        while let Some(msg) = dump.try_next().await? {
            let (mut program, mut prog_id) = (None, None);
            for attr in &msg.attributes {
                if let TcAttribute::Options(opts) = attr {
                    for o in opts {
                        match o {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => {
                                program = Some(n.clone())
                            }
                            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => prog_id = Some(*id),
                            _ => {}
                        }
                    }
                }
            }
            if let (Some(program), Some(prog_id)) = (program, prog_id) {
                if is_ours(&program) {
                    out.push(StaleFilter {
                        iface: iface.to_string(),
                        ingress,
                        priority: (msg.header.info >> 16) as u16,
                        handle: u32::from(msg.header.handle),
                        program,
                        prog_id,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Removes one stale filter, named by its exact priority and handle (never by name alone, so
/// a live agent's filter of the same name stays).
pub fn remove_filter(f: &StaleFilter) -> Result<(), ProgramError> {
    let kind = if f.ingress {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    let link =
        SchedClassifierLink::attached(&f.iface, kind, f.priority, TcHandle::from(f.handle), None)
            .map_err(ProgramError::IOError)?;
    aya::programs::links::Link::detach(link)
}

pub fn detach(ebpf: &mut Ebpf, links: Links) {
    let (in_prog, out_prog) = programs(links.l3);
    for (name, id) in [(in_prog, links.ingress), (out_prog, links.egress)] {
        match program(ebpf, name) {
            Ok(p) => {
                if let Err(e) = p.detach(id) {
                    tracing::debug!(error = %e, "detach (interface probably gone)");
                }
            }
            Err(e) => tracing::warn!(error = %e, "detach"),
        }
    }
}

/// Runs `frame` through one of the programs inside the kernel (BPF_PROG_TEST_RUN), as if it had
/// crossed a hook on the loopback device; returns the program's verdict and the kernel's
/// average run time.
pub fn test_run(
    ebpf: &mut Ebpf,
    l3: bool,
    egress: bool,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, std::time::Duration), HookError> {
    use aya::{TestRun, TestRunOptions};
    let (in_prog, out_prog) = programs(l3);
    let name = if egress { out_prog } else { in_prog };
    let prog = program(ebpf, name)?;
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat: repeat.max(1),
        ..Default::default()
    };
    let r = prog.test_run(opts)?;
    Ok((r.return_value, r.duration))
}
