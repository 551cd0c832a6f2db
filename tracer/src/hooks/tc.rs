//! tc ingress/egress attachment (TCX links on kernels >= 6.6, clsact filters before).
use aya::{
    programs::{tc, tc::SchedClassifierLinkId, ProgramError, SchedClassifier, TcAttachType},
    Ebpf,
};
use tracer_common::{PROG_TC_EGRESS, PROG_TC_INGRESS, PROG_TC_L3_EGRESS, PROG_TC_L3_INGRESS};

use super::HookError;

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

pub fn attach(ebpf: &mut Ebpf, iface: &str, l3: bool) -> Result<Links, ProgramError> {
    // Kernels before 6.6 attach through a clsact qdisc; TCX (6.6+, which aya picks) needs none,
    // and adding one would leave a qdisc behind on the interface.
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    if !tcx {
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            tracing::debug!(iface, error = %e, "clsact qdisc not added (probably exists)");
        }
    }
    let (in_prog, out_prog) = programs(l3);
    let ingress = attach_one(ebpf, in_prog, iface, TcAttachType::Ingress)?;
    let egress = match attach_one(ebpf, out_prog, iface, TcAttachType::Egress) {
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
    name: &'static str,
    iface: &str,
    kind: TcAttachType,
) -> Result<SchedClassifierLinkId, ProgramError> {
    let prog = program(ebpf, name).map_err(|e| match e {
        HookError::Program(p) => p,
        other => ProgramError::IOError(std::io::Error::other(other.to_string())),
    })?;
    prog.attach(iface, kind)
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
