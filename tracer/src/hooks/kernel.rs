//! Every decision that depends on the running kernel, in one place.
use aya::util::KernelVersion;
use serde::Serialize;

/// How tc programs are attached, as asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcMode {
    /// TCX links where the kernel has them (6.6+), clsact filters before.
    #[default]
    Auto,
    /// TCX links (bpf_mprog); refused on kernels before 6.6.
    Tcx,
    /// Legacy clsact qdisc filters (netlink), as on 5.11-6.5, whatever the kernel.
    Clsact,
}

/// The attachment mechanism actually in use (wire type of the model).
pub use tracer_model::health::TcBackend;

/// TCX (bpf_mprog on tc ingress/egress) arrived in Linux 6.6.
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The oldest kernel tracer's programs are written for: bpf_ktime_get_coarse_ns is 5.11.
pub const MIN_KERNEL: (u8, u8) = (5, 11);

/// Refuses a kernel older than [`MIN_KERNEL`] before the verifier gives a cryptic answer.
pub fn check_minimum() -> Result<(), String> {
    match KernelVersion::current() {
        Ok(v) if v < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) => Err(format!(
            "kernel {v} is older than {}.{}: tracer's programs need bpf_ktime_get_coarse_ns (5.11), \
             BPF ring buffers (5.8) and BTF",
            MIN_KERNEL.0, MIN_KERNEL.1
        )),
        // An unreadable version is not a reason to refuse: the verifier has the last word.
        _ => Ok(()),
    }
}

impl TcMode {
    pub fn resolve(self) -> Result<TcBackend, String> {
        match self {
            TcMode::Auto if has_tcx() => Ok(TcBackend::Tcx),
            TcMode::Auto | TcMode::Clsact => Ok(TcBackend::Clsact),
            TcMode::Tcx if has_tcx() => Ok(TcBackend::Tcx),
            TcMode::Tcx => Err("--tc-mode tcx needs Linux 6.6 or later; use auto or clsact".into()),
        }
    }
}
