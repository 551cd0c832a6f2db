//! The empty-program floor: what BPF_PROG_TEST_RUN costs for a tc program that returns at once
//! (`r0 = TC_ACT_UNSPEC; exit`), on the same frame. tracer's programs are reported against it,
//! so a figure from a slow machine (a TCG guest) still says how much work the programs add.
//!
//! Loaded with raw bpf(2) calls: it is two instructions, and keeping it out of tracer-ebpf's
//! object means the agent never carries it.
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{bail, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// `struct bpf_insn`: opcode, dst/src registers, offset, immediate.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The leading fields of `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, fully initialised bpf_attr prefix of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The empty tc program, loaded and verified.
pub struct Floor {
    fd: OwnedFd,
}

impl Floor {
    pub fn load() -> Result<Floor> {
        let insns = [
            // r0 = -1 (TC_ACT_UNSPEC: carry on), BPF_ALU64 | BPF_MOV | BPF_K
            Insn {
                code: 0xb7,
                regs: 0,
                off: 0,
                imm: -1,
            },
            // BPF_JMP | BPF_EXIT
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0,
            },
        ];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..15].copy_from_slice(b"tracer_tc_floor");
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..Default::default()
        };
        let fd = match bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(fd) => fd,
            Err(e) => bail!("loading the empty tc program: {e}"),
        };
        // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Floor { fd })
    }

    /// The kernel's average ns per run of the empty program on `frame`, `repeat` times.
    pub fn time(&self, frame: &[u8], repeat: u32) -> Result<f64> {
        use std::os::fd::AsRawFd;
        let mut attr = TestRun {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: repeat.max(1),
            ..Default::default()
        };
        if let Err(e) = bpf(BPF_PROG_TEST_RUN, &mut attr) {
            bail!("test run of the empty tc program: {e}");
        }
        Ok(f64::from(attr.duration))
    }
}
