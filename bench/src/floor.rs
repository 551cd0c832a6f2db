//! The floors tracer's tc programs are measured against, on the same frame and in the same run:
//! an empty program (`r0 = TC_ACT_UNSPEC; exit`): what BPF_PROG_TEST_RUN itself costs; and a
//! program that does one hash lookup that hits (an LRU hash map with FLOWS's value size and a
//! key of a given size): the least a program that keeps per-flow state can do. A figure from a
//! slow machine (a TCG guest) still says how much work the programs add.
//!
//! Loaded with raw bpf(2) calls: they are a few instructions, and keeping them out of
//! tracer-ebpf's object means the agent never carries them.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// bpf_map_lookup_elem's helper id.
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
/// `ld_imm64`'s source register value that makes the immediate a map fd.
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

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

/// The leading fields of `union bpf_attr` for BPF_MAP_CREATE.
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
#[derive(Default)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
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

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE of a TCX link (flags 0 and no
/// relative program: appended after the links already there).
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
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

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// `r0 = -1` (TC_ACT_UNSPEC / TCX_NEXT: carry on); BPF_ALU64 | BPF_MOV | BPF_K.
const RET_PASS_ON: Insn = insn(0xb7, 0, 0, 0, -1);
/// BPF_JMP | BPF_EXIT.
const EXIT: Insn = insn(0x95, 0, 0, 0, 0);

/// A floor program, loaded and verified (with the map it looks up, if any).
pub struct Floor {
    fd: OwnedFd,
    _map: Option<OwnedFd>,
}

impl Floor {
    /// The empty program.
    pub fn load() -> Result<Floor> {
        Floor::load_insns(&[RET_PASS_ON, EXIT], None, "tracer_tc_floor")
    }

    /// A program that looks up an all-zero `key_size`-byte key (present) in an LRU hash map of
    /// FLOWS's size with a 24-byte value, and carries on.
    pub fn load_lookup(key_size: u32) -> Result<Floor> {
        if key_size == 0 || key_size > 64 || !key_size.is_multiple_of(4) {
            bail!("lookup floor: key size {key_size} is not a multiple of 4 up to 64");
        }
        let mut create = MapCreate {
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size,
            value_size: 24,
            max_entries: 65536,
            map_flags: 0,
        };
        let map = match bpf(BPF_MAP_CREATE, &mut create) {
            // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
            Err(e) => bail!("creating the lookup floor's map: {e}"),
        };
        let key = [0u8; 64];
        let value = [0u8; 24];
        let mut update = MapUpdate {
            map_fd: map.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            ..Default::default()
        };
        if let Err(e) = bpf(BPF_MAP_UPDATE_ELEM, &mut update) {
            bail!("filling the lookup floor's map: {e}");
        }
        let words = (key_size as i16 + 7) / 8;
        let mut insns = vec![insn(0xb7, 1, 0, 0, 0)]; // r1 = 0
        for w in 1..=words {
            // *(u64 *)(r10 - 8w) = r1: BPF_STX | BPF_MEM | BPF_DW
            insns.push(insn(0x7b, 10, 1, -8 * w, 0));
        }
        insns.extend([
            // r1 = map (ld_imm64, two slots)
            insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd()),
            insn(0, 0, 0, 0, 0),
            // r2 = r10 - 8 * words: the key
            insn(0xbf, 2, 10, 0, 0),
            insn(0x07, 2, 0, 0, -8 * i32::from(words)),
            insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
            RET_PASS_ON,
            EXIT,
        ]);
        Floor::load_insns(&insns, Some(map), "tracer_tc_lookup")
    }

    fn load_insns(insns: &[Insn], map: Option<OwnedFd>, name: &str) -> Result<Floor> {
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        let n = name.len().min(15);
        prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            ..Default::default()
        };
        let fd = match bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(fd) => fd,
            Err(e) => bail!("loading the {name} floor program: {e}"),
        };
        // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Floor { fd, _map: map })
    }

    /// Attaches the program as a TCX link on `ifindex` of the calling thread's network
    /// namespace; the link (and the attachment) lasts as long as the returned fd.
    pub fn attach_tcx(prog_fd: RawFd, ifindex: u32, ingress: bool) -> Result<OwnedFd> {
        let mut attr = LinkCreate {
            prog_fd: prog_fd as u32,
            target_ifindex: ifindex,
            attach_type: if ingress {
                BPF_TCX_INGRESS
            } else {
                BPF_TCX_EGRESS
            },
            ..Default::default()
        };
        match bpf(BPF_LINK_CREATE, &mut attr) {
            // SAFETY: BPF_LINK_CREATE returned a new fd that nothing else owns.
            Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
            Err(e) => bail!("attaching the floor program to ifindex {ifindex}: {e}"),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The program's run time (ns) and run count so far, from this process's fdinfo (counted
    /// while BPF run-time stats are enabled).
    pub fn run_stats(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/self/fdinfo/{}", self.fd.as_raw_fd());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok((
            crate::datapath::fdinfo_field(&text, "run_time_ns"),
            crate::datapath::fdinfo_field(&text, "run_cnt"),
        ))
    }

    /// The kernel's average ns per run of the program on `frame`, `repeat` times.
    pub fn time(&self, frame: &[u8], repeat: u32) -> Result<f64> {
        let mut attr = TestRun {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: repeat.max(1),
            ..Default::default()
        };
        if let Err(e) = bpf(BPF_PROG_TEST_RUN, &mut attr) {
            bail!("test run of a floor program: {e}");
        }
        Ok(f64::from(attr.duration))
    }
}
