//! `cargo xtask vm-test`: tracer's kernel-facing tests on Debian 12's own 6.1 kernel under qemu.
//!
//! The host kernel is new (TCX, newest verifier); many Calico nodes run 5.15/6.1 LTS kernels
//! with legacy clsact filters only and an older, stricter verifier. This boots
//! `linux-image-6.1.0-*-amd64` (fetched with `apt-get download`, never installed) with an
//! initramfs holding the test binaries, the tools they shell out to, the kernel modules they
//! need and an init script that runs [`GUEST_STEPS`] and powers off. The serial console is
//! parsed here: no start marker means the guest did not boot, a missing end marker means it hung
//! or crashed, and a step that ran no test fails like a failing one.
//!
//! TCG, not KVM: a KVM guest hangs in early boot in the nested VMs CI runs on.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    hash::{Hash, Hasher},
    io::{BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};

use crate::{cargo, root, run};

/// What the guest's tests come from.
#[derive(Clone, Copy)]
enum Kind {
    /// An integration test target of the tracer package (`tests/NAME.rs`).
    Test(&'static str),
    /// tracer's unit tests (the library's test binary).
    Lib,
    /// tracer-bench; its lines with a `median` figure are reported as information.
    Bench,
}

/// One thing the guest runs: a test binary with libtest arguments (filters, `--exact`...).
struct Step {
    name: &'static str,
    kind: Kind,
    args: &'static [&'static str],
}

/// The guest's work, in order. A new kernel-facing test file goes in with one line here (and
/// its `[[test]]` in tracer/Cargo.toml). Tests that need etcd or BIRD (tests/seeds.rs) stay on
/// the host: the guest has the tools listed in [`HOST_TOOLS`] only.
const GUEST_STEPS: &[Step] = &[
    // Load and verify every program, BPF_PROG_TEST_RUN parsing, kfree_skb drops with reasons.
    Step {
        name: "kernel",
        kind: Kind::Test("kernel"),
        args: &[],
    },
    // BTF offsets and the kfree_skb tracepoint format of the running kernel.
    Step {
        name: "btf",
        kind: Kind::Lib,
        args: &["btf::", "hooks::drops::"],
    },
    // Attach through clsact, real packets between namespaces, seed 002 end to end.
    Step {
        name: "snat",
        kind: Kind::Test("snat"),
        args: &[
            "healthy_pool_is_masqueraded_and_replied",
            "seed_002_overlapping_pool_is_diagnosed",
        ],
    },
    // Attached with what the kernel offers (clsact here), traced, detached on SIGTERM.
    Step {
        name: "compat",
        kind: Kind::Test("compat"),
        args: &[],
    },
    // Legacy clsact filters left by SIGKILLed agents are removed by the next one, and only
    // those.
    Step {
        name: "legacy_tc",
        kind: Kind::Test("legacy_tc"),
        args: &[],
    },
    // Other programs on the same hooks (before/after tracer) are obeyed and see every packet.
    Step {
        name: "coexist",
        kind: Kind::Test("coexist"),
        args: &[],
    },
    // felix's nftables dataplane read over nfnetlink from 6.1's nf_tables, seed 002 in it.
    Step {
        name: "nftables",
        kind: Kind::Test("nftables"),
        args: &[],
    },
    // A real iptables DROP reported with the kernel's reason.
    Step {
        name: "drops",
        kind: Kind::Test("drops"),
        args: &[],
    },
    // Degraded, not dead: no tracefs (so no drop reasons) is reported in /healthz.
    Step {
        name: "degraded",
        kind: Kind::Test("hardening"),
        args: &[
            "--exact",
            "survives_rename_missing_ipsets_and_missing_tracefs",
        ],
    },
    // Per-packet cost of the tc programs against an empty program (information only).
    Step {
        name: "tc-cost",
        kind: Kind::Bench,
        args: &["--profile-tc", "50000"],
    },
];

/// Tools the tests and the lab run, copied from the host with their shared libraries.
const HOST_TOOLS: &[(&str, bool)] = &[
    ("ip", true),
    ("tc", true),
    ("bridge", true),
    ("iptables", true),
    ("iptables-save", true),
    ("iptables-restore", true),
    ("ipset", true),
    ("nft", true),
    ("unshare", true),
    ("mount", true),
    ("umount", true),
    ("nsenter", false),
    ("tcpdump", false),
    ("ping", false),
];

/// Loaded at boot so that a missing one is reported once, up front; anything else a test needs
/// is loaded on demand by the kernel through busybox's modprobe.
const MODULES: &[&str] = &[
    "veth",
    "bridge",
    "vxlan",
    "tun",
    "dummy",
    "ipip",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nf_conntrack",
    "nf_nat",
    "ip_set",
    "ip_set_hash_net",
    "xt_set",
    "xt_comment",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_tcpudp",
];

/// Module directories of the kernel package the guest gets (all of net/ and what it needs).
const MODULE_DIRS: &[&str] = &[
    "kernel/net",
    "kernel/lib",
    "kernel/crypto",
    "kernel/arch/x86/crypto",
    "kernel/drivers/net/vxlan",
    "kernel/drivers/net/wireguard",
    "kernel/drivers/net/ipvlan",
    "kernel/drivers/net/veth.ko",
    "kernel/drivers/net/dummy.ko",
    "kernel/drivers/net/tun.ko",
    "kernel/drivers/net/ifb.ko",
    "kernel/drivers/net/macvlan.ko",
    "kernel/drivers/net/geneve.ko",
];

/// Debian 12's kernel packages; the newest ABI number wins.
const KERNEL_PACKAGE_PREFIX: &str = "linux-image-6.1.0-";
const KERNEL_PACKAGE_SUFFIX: &str = "-amd64";

const MARK: &str = "@@VMTEST";
/// A hung step is killed inside the guest, so the steps after it still run and report.
const STEP_TIMEOUT_SECS: u64 = 600;

pub struct Opts {
    /// Hard limit for the whole guest run; qemu is killed after it.
    pub timeout: Duration,
    /// A kernel package name instead of the newest `linux-image-6.1.0-*-amd64`.
    pub package: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            timeout: Duration::from_secs(1200),
            package: None,
        }
    }
}

pub fn vm_test(opts: &Opts) -> Result<()> {
    let started = Instant::now();
    let qemu = which("qemu-system-x86_64")
        .context("qemu-system-x86_64 not found; run scripts/setup.sh (qemu-system-x86)")?;
    let busybox = which("busybox").context("busybox not found; run scripts/setup.sh")?;
    let vm_dir = root().join("target/vm");
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    let artifacts = build_artifacts()?;
    let kernel = fetch_kernel(&vm_dir, opts.package.as_deref())?;
    let initrd = build_initramfs(&vm_dir, &kernel, &artifacts, &busybox)?;
    eprintln!(
        "\x1b[1;34m[xtask]\x1b[0m vm-test: booting {} under qemu (TCG, 2 vCPUs), limit {} s",
        kernel.package,
        opts.timeout.as_secs()
    );
    let log_path = vm_dir.join(format!("guest-{}.log", kernel.version));
    let lines = boot(&qemu, &kernel, &initrd, opts.timeout, &log_path)?;
    let report =
        parse(&lines).map_err(|e| anyhow::anyhow!("{e:#}\n(console: {})", log_path.display()))?;
    let text = report.render(&kernel, started.elapsed());
    eprint!("{text}");
    let _ = std::fs::write(vm_dir.join("report.txt"), &text);
    report.verdict()
}

/// Built binaries the guest needs, by what they are.
struct Artifacts {
    /// Test binaries by [`Kind`] key ("lib", test target name, "bench").
    bins: BTreeMap<String, PathBuf>,
    /// The agent binary; tests find it at this very path (CARGO_BIN_EXE_tracer).
    tracer: PathBuf,
}

fn key(kind: Kind) -> String {
    match kind {
        Kind::Test(t) => t.to_string(),
        Kind::Lib => "lib".into(),
        Kind::Bench => "bench".into(),
    }
}

/// Builds with the same command as `cargo xtask test` (so after it nothing is rebuilt: per-package
/// builds would resolve features differently and recompile dependencies) and picks the guest's
/// binaries from cargo's JSON messages.
fn build_artifacts() -> Result<Artifacts> {
    let mut build = cargo();
    build.args([
        "build",
        "--workspace",
        "--all-targets",
        "--message-format=json-render-diagnostics",
    ]);
    let tracer_manifest = root().join("tracer/Cargo.toml");
    let bench_manifest = root().join("bench/Cargo.toml");
    let mut bins = BTreeMap::new();
    let mut tracer = None;
    for a in cargo_artifacts(&mut build)? {
        let key = if a.manifest == tracer_manifest {
            match (a.kind.as_str(), a.test) {
                ("lib", true) => "lib".to_string(),
                ("test", true) => a.name.clone(),
                ("bin", false) if a.name == "tracer" => {
                    tracer = Some(a.executable);
                    continue;
                }
                _ => continue,
            }
        } else if a.manifest == bench_manifest && a.kind == "bin" && !a.test {
            "bench".to_string()
        } else {
            continue;
        };
        bins.insert(key, a.executable);
    }
    for s in GUEST_STEPS {
        if !bins.contains_key(&key(s.kind)) {
            bail!("cargo built no binary for guest step {}", s.name);
        }
    }
    let tracer = tracer.context("cargo built no tracer binary")?;
    Ok(Artifacts { bins, tracer })
}

struct Artifact {
    manifest: PathBuf,
    name: String,
    kind: String,
    test: bool,
    executable: PathBuf,
}

/// Runs a cargo build with JSON messages and returns the executables it produced.
fn cargo_artifacts(cmd: &mut Command) -> Result<Vec<Artifact>> {
    eprintln!("\x1b[1;34m[xtask]\x1b[0m {cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        found.push(Artifact {
            manifest: PathBuf::from(v["manifest_path"].as_str().unwrap_or_default()),
            name: v["target"]["name"].as_str().unwrap_or_default().to_string(),
            kind: v["target"]["kind"][0]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            test: v["profile"]["test"].as_bool().unwrap_or(false),
            executable: PathBuf::from(exe),
        });
    }
    Ok(found)
}

/// An unpacked kernel package.
struct Kernel {
    package: String,
    /// `uname -r` of the kernel, e.g. 6.1.0-56-amd64.
    version: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The newest Debian 12 kernel package apt knows, downloaded and unpacked once under
/// target/vm/kernel/ (reused while apt offers no newer one, or when apt cannot answer).
fn fetch_kernel(vm_dir: &Path, wanted: Option<&str>) -> Result<Kernel> {
    let base = vm_dir.join("kernel");
    std::fs::create_dir_all(&base)?;
    let package = match wanted {
        Some(p) => p.to_string(),
        None => pick_kernel_package(&base)?,
    };
    let dir = base.join(&package);
    if find_vmlinuz(&dir).is_none() {
        let tmp = base.join(format!(".download-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let fetched = (|| -> Result<()> {
            let mut dl = Command::new("apt-get");
            dl.current_dir(&tmp).args(["download", "-q", &package]);
            if run(&mut dl).is_err() {
                run(Command::new("apt-get").args(["update", "-q"]))?;
                run(&mut dl)?;
            }
            let deb = std::fs::read_dir(&tmp)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .context("apt-get download left no .deb")?;
            let unpacked = tmp.join("root");
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&unpacked, &dir)?;
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&tmp);
        fetched.with_context(|| format!("fetching {package}"))?;
    }
    let vmlinuz = find_vmlinuz(&dir).with_context(|| format!("no boot/vmlinuz-* in {package}"))?;
    let version = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_string();
    let modules = dir.join("lib/modules").join(&version);
    if !modules.is_dir() {
        bail!("{package} has no {}", modules.display());
    }
    Ok(Kernel {
        package,
        version,
        vmlinuz,
        modules,
    })
}

/// The newest `linux-image-6.1.0-NN-amd64` apt offers (after `apt-get update` on a fresh
/// machine), else the newest one unpacked before.
fn pick_kernel_package(base: &Path) -> Result<String> {
    if let Some(p) = newest_kernel_package()? {
        return Ok(p);
    }
    if let Err(e) = run(Command::new("apt-get").args(["update", "-q"])) {
        eprintln!("vm-test: {e:#}");
    }
    if let Some(p) = newest_kernel_package()? {
        return Ok(p);
    }
    if let Some(p) = cached_kernels(base).pop() {
        eprintln!("vm-test: apt offers no {KERNEL_PACKAGE_PREFIX}NN{KERNEL_PACKAGE_SUFFIX}; using the cached {p}");
        return Ok(p);
    }
    bail!(
        "apt offers no Debian 12 kernel package ({KERNEL_PACKAGE_PREFIX}NN{KERNEL_PACKAGE_SUFFIX}); \
         add a bookworm source or pass --package"
    )
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// The ABI number of `linux-image-6.1.0-NN-amd64`, if `name` is one.
fn abi(name: &str) -> Option<u32> {
    name.strip_prefix(KERNEL_PACKAGE_PREFIX)?
        .strip_suffix(KERNEL_PACKAGE_SUFFIX)?
        .parse()
        .ok()
}

fn newest_kernel_package() -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            "^linux-image-6\\.1\\.0-[0-9]+-amd64$",
        ])
        .output()
        .context("running apt-cache (this runner needs Debian's apt)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|n| abi(n).map(|a| (a, n.to_string())))
        .max()
        .map(|(_, n)| n))
}

fn cached_kernels(base: &Path) -> Vec<String> {
    let mut found: Vec<(u32, String)> = std::fs::read_dir(base)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| find_vmlinuz(&base.join(n)).is_some())
                .filter_map(|n| abi(&n).map(|a| (a, n)))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.into_iter().map(|(_, n)| n).collect()
}

/// Which host files go where in the guest's root.
#[derive(Default)]
struct Plan {
    /// Guest path -> host file (regular files).
    files: BTreeMap<PathBuf, (PathBuf, bool)>,
    /// Guest path -> symlink target.
    links: BTreeMap<PathBuf, PathBuf>,
    dirs: BTreeSet<PathBuf>,
    /// Generated files: guest path -> (contents, mode).
    generated: BTreeMap<PathBuf, (Vec<u8>, u32)>,
}

impl Plan {
    /// Adds a host file at its own path, following symlinks (recreated as links) and, for ELF
    /// files, their shared libraries. Parent directories that are symlinks on the host (the
    /// usr merge) are recreated by [`Plan::merged_usr`].
    fn host_file(&mut self, path: &Path, strip: bool) -> Result<()> {
        let path = match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => std::fs::canonicalize(parent)
                .with_context(|| format!("{}", parent.display()))?
                .join(name),
            _ => bail!("not a file path: {}", path.display()),
        };
        if self.files.contains_key(&path) || self.links.contains_key(&path) {
            return Ok(());
        }
        let meta =
            std::fs::symlink_metadata(&path).with_context(|| format!("{}", path.display()))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            self.links.insert(path.clone(), target.clone());
            let resolved = match path.parent() {
                Some(p) => p.join(&target),
                None => target,
            };
            return self.host_file(&resolved, strip);
        }
        self.files.insert(path.clone(), (path.clone(), strip));
        if is_elf(&path) {
            for lib in shared_libraries(&path)? {
                self.host_file(&lib, false)?;
            }
        }
        Ok(())
    }

    /// Recreates the host's top-level symlinks (/bin -> usr/bin and friends).
    fn merged_usr(&mut self) {
        for top in ["bin", "sbin", "lib", "lib64"] {
            let host = Path::new("/").join(top);
            match std::fs::read_link(&host) {
                Ok(target) => {
                    self.links.insert(host, target);
                }
                Err(_) => {
                    self.dirs.insert(host);
                }
            }
        }
    }

    fn generate(&mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) {
        self.generated
            .insert(PathBuf::from(path), (contents.into(), mode));
    }

    /// Cheap identity of everything that goes in: paths, sizes, mtimes, generated contents.
    fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (dst, (src, strip)) in &self.files {
            (dst, src, strip).hash(&mut h);
            if let Ok(m) = std::fs::metadata(src) {
                m.len().hash(&mut h);
                m.modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .hash(&mut h);
            }
        }
        self.links.hash(&mut h);
        self.dirs.hash(&mut h);
        self.generated.hash(&mut h);
        h.finish()
    }
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// The libraries `ldd` resolves for `path` (empty for static binaries and kernel modules).
fn shared_libraries(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("running ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let l = l.trim();
            let p = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn build_initramfs(
    vm_dir: &Path,
    kernel: &Kernel,
    artifacts: &Artifacts,
    busybox: &Path,
) -> Result<PathBuf> {
    let mut plan = Plan::default();
    plan.merged_usr();
    for (tool, required) in HOST_TOOLS {
        match which(tool) {
            Some(p) => plan.host_file(&p, false)?,
            None if *required => bail!("{tool} not found; run scripts/setup.sh"),
            None => eprintln!("vm-test: {tool} not found on the host; the guest goes without"),
        }
    }
    // iptables loads its matches and targets (libxt_*.so) at run time.
    let xtables = which("iptables")
        .map(|p| shared_libraries(&p))
        .transpose()?
        .unwrap_or_default()
        .into_iter()
        .find(|l| {
            l.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libxtables"))
        })
        .and_then(|l| l.parent().map(|d| d.join("xtables")));
    if let Some(dir) = xtables.filter(|d| d.is_dir()) {
        for e in std::fs::read_dir(&dir)? {
            plan.host_file(&e?.path(), false)?;
        }
    }
    for etc in ["/etc/protocols", "/etc/services", "/etc/ethertypes"] {
        if Path::new(etc).is_file() {
            plan.host_file(Path::new(etc), false)?;
        }
    }
    plan.generate(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\ntcpdump:x:104:108::/nonexistent:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        0o644,
    );
    plan.generate(
        "/etc/group",
        "root:x:0:\ntcpdump:x:108:\nnogroup:x:65534:\n",
        0o644,
    );
    // The binaries at their host paths: tests were compiled with the agent's absolute path.
    plan.host_file(&artifacts.tracer, true)?;
    for bin in artifacts.bins.values() {
        plan.host_file(bin, true)?;
    }
    plan.files.insert(
        PathBuf::from("/busybox/busybox"),
        (busybox.to_path_buf(), false),
    );
    // busybox-static needs none; a dynamic busybox brings its libraries.
    for lib in shared_libraries(busybox)? {
        plan.host_file(&lib, false)?;
    }
    for (link, target) in [
        ("/usr/bin/sh", "/busybox/busybox"),
        ("/usr/sbin/modprobe", "/busybox/busybox"),
        ("/init", "/busybox/init.sh"),
    ] {
        plan.links
            .insert(PathBuf::from(link), PathBuf::from(target));
    }
    plan.generate("/busybox/init.sh", init_script(artifacts), 0o755);
    for d in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/var/tmp"] {
        plan.dirs.insert(PathBuf::from(d));
    }
    let guest_modules = PathBuf::from("/usr/lib/modules").join(&kernel.version);
    for rel in MODULE_DIRS {
        let src = kernel.modules.join(rel);
        if src.exists() {
            add_tree(&mut plan, &src, &guest_modules.join(rel))?;
        }
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let src = kernel.modules.join(f);
        if src.is_file() {
            plan.files.insert(guest_modules.join(f), (src, false));
        }
    }

    let image = vm_dir.join("initramfs.cpio");
    let stamp = vm_dir.join("initramfs.fingerprint");
    let fingerprint = format!("{:016x} {}", plan.fingerprint(), kernel.version);
    if image.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == fingerprint) {
        eprintln!("vm-test: initramfs unchanged ({})", image.display());
        return Ok(image);
    }
    let stage = vm_dir.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    materialize(&plan, &stage)?;
    // Module dependencies and aliases for the subset copied, so that modprobe and the kernel's
    // on-demand loading find them.
    run(Command::new(busybox)
        .args(["depmod", "-b"])
        .arg(&stage)
        .arg(&kernel.version))?;
    let tmp = vm_dir.join("initramfs.cpio.tmp");
    write_cpio(&stage, &tmp)?;
    std::fs::rename(&tmp, &image)?;
    std::fs::write(&stamp, fingerprint)?;
    let _ = std::fs::remove_dir_all(&stage);
    let size = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "vm-test: initramfs {} ({} MiB)",
        image.display(),
        size >> 20
    );
    Ok(image)
}

/// Adds a host directory tree (or one file) at `dst`.
fn add_tree(plan: &mut Plan, src: &Path, dst: &Path) -> Result<()> {
    if src.is_dir() {
        plan.dirs.insert(dst.to_path_buf());
        for e in std::fs::read_dir(src)? {
            let e = e?;
            add_tree(plan, &e.path(), &dst.join(e.file_name()))?;
        }
    } else {
        plan.files
            .insert(dst.to_path_buf(), (src.to_path_buf(), false));
    }
    Ok(())
}

fn in_stage(stage: &Path, guest: &Path) -> PathBuf {
    stage.join(guest.strip_prefix("/").unwrap_or(guest))
}

fn materialize(plan: &Plan, stage: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(stage)?;
    // Links first: /lib -> usr/lib must exist before anything is copied "into" /lib.
    let (top, deep): (Vec<_>, Vec<_>) = plan
        .links
        .iter()
        .partition(|(p, _)| p.components().count() == 2);
    for (link, target) in top.into_iter().chain(deep) {
        let at = in_stage(stage, link);
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if std::fs::symlink_metadata(&at).is_err() {
            std::os::unix::fs::symlink(target, &at)
                .with_context(|| format!("link {}", at.display()))?;
        }
    }
    for d in &plan.dirs {
        std::fs::create_dir_all(in_stage(stage, d))?;
    }
    let strip = which("strip");
    for (dst, (src, want_strip)) in &plan.files {
        let at = in_stage(stage, dst);
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Debug info is most of a test binary's size and the guest never reads it.
        let stripped = *want_strip
            && strip.as_ref().is_some_and(|s| {
                Command::new(s)
                    .arg("--strip-debug")
                    .arg("-o")
                    .arg(&at)
                    .arg(src)
                    .status()
                    .is_ok_and(|st| st.success())
            });
        if !stripped {
            std::fs::copy(src, &at)
                .with_context(|| format!("copying {} to {}", src.display(), at.display()))?;
        }
    }
    for (dst, (contents, mode)) in &plan.generated {
        let at = in_stage(stage, dst);
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&at, contents)?;
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

/// An uncompressed newc archive: the kernel unpacks it without a decompressor, which under TCG
/// is seconds saved.
fn write_cpio(stage: &Path, out: &Path) -> Result<()> {
    fn walk(dir: &Path, base: &Path, list: &mut Vec<String>) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            if let Ok(rel) = p.strip_prefix(base) {
                list.push(rel.to_string_lossy().into_owned());
            }
            if e.file_type()?.is_dir() {
                walk(&p, base, list)?;
            }
        }
        Ok(())
    }
    let mut list = Vec::new();
    walk(stage, stage, &mut list)?;
    let file = std::fs::File::create(out)?;
    let mut child = Command::new("cpio")
        .current_dir(stage)
        .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::from(file))
        .spawn()
        .context("running cpio (run scripts/setup.sh)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all((list.join("\n") + "\n").as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cpio failed: {status}");
    }
    Ok(())
}

/// The guest's /init: mounts, modules, then every step with a begin and an end marker.
fn init_script(artifacts: &Artifacts) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# Generated by `cargo xtask vm-test` (xtask/src/vm.rs): the guest's init.
/busybox/busybox mount -t proc proc /proc
# Applets go last on PATH: the host's own ip, tc, mount... win.
/busybox/busybox --install -s /busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/busybox
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/net
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# A checkout under /tmp (CI clones anywhere) put the test binaries there: a tmpfs would hide
# them. The initramfs root is writable, so /tmp only gets its own tmpfs when it is empty.
[ -z "$(ls -A /tmp 2>/dev/null)" ] && mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
up() { echo "up=$(cut -d' ' -f1 /proc/uptime)"; }
"#,
    );
    let _ = writeln!(s, "for m in {}; do", MODULES.join(" "));
    let _ = writeln!(
        s,
        "  modprobe $m || echo \"{MARK} WARN module $m did not load\""
    );
    s.push_str("done\nip link set lo up\n");
    let _ = writeln!(
        s,
        "echo \"{MARK} START kernel=$(uname -r) cpus=$(nproc) mem_kib=$(awk '/MemTotal/ {{print $2}}' /proc/meminfo)\""
    );
    // cargo runs tests from the package directory; so does the guest.
    let pkg_dir = artifacts
        .tracer
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .and_then(|t| t.parent())
        .map(|r| r.join("tracer"))
        .unwrap_or_else(|| PathBuf::from("/"));
    let _ = writeln!(s, "mkdir -p '{0}' && cd '{0}'", pkg_dir.display());
    for step in GUEST_STEPS {
        let Some(bin) = artifacts.bins.get(&key(step.kind)) else {
            continue;
        };
        let mut cmd = format!("'{}'", bin.display());
        for a in step.args {
            let _ = write!(cmd, " '{a}'");
        }
        if !matches!(step.kind, Kind::Bench) {
            cmd.push_str(" --test-threads=1");
        }
        let _ = writeln!(
            s,
            "echo \"{MARK} BEGIN {name} $(up)\"\ntimeout -s KILL {STEP_TIMEOUT_SECS} {cmd} </dev/null 2>&1\nrc=$?\necho \"{MARK} END {name} rc=$rc $(up)\"",
            name = step.name
        );
    }
    let _ = writeln!(s, "echo \"{MARK} DONE\"\nsync\npoweroff -f");
    s
}

/// Boots the guest and returns its console lines; qemu is killed at `timeout`.
fn boot(
    qemu: &Path,
    kernel: &Kernel,
    initrd: &Path,
    timeout: Duration,
    log_path: &Path,
) -> Result<Vec<String>> {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "3072"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("\x1b[1;34m[xtask]\x1b[0m {cmd:?}");
    let mut child = cmd.spawn().context("starting qemu")?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || forward(out, &tx)));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || forward(err, &tx)));
    }
    drop(tx);
    let mut log = std::fs::File::create(log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        match rx.recv_timeout(left) {
            Ok(line) => {
                eprintln!("[guest] {line}");
                let _ = writeln!(log, "{line}");
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out {
        // Our own child: kill it rather than leave a guest burning CPU.
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for qemu")?;
    for r in readers {
        let _ = r.join();
    }
    if timed_out {
        lines.push(format!(
            "{MARK} TIMEOUT after {} s: qemu killed",
            timeout.as_secs()
        ));
    } else if !status.success() {
        lines.push(format!("{MARK} QEMU exited with {status}"));
    }
    Ok(lines)
}

fn forward(stream: impl std::io::Read, tx: &mpsc::Sender<String>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                if tx.send(line).is_err() {
                    return;
                }
            }
        }
    }
}

/// What the guest said about one step.
#[derive(Debug, Default)]
struct StepResult {
    rc: Option<i32>,
    passed: u32,
    failed: u32,
    info: Vec<String>,
    secs: f64,
}

#[derive(Debug)]
struct Report {
    kernel: String,
    header: String,
    steps: Vec<(&'static str, StepResult)>,
    done: bool,
    problems: Vec<String>,
}

/// Reads the console: markers from init, libtest's summaries, bench figures.
fn parse(lines: &[String]) -> Result<Report> {
    let start = lines
        .iter()
        .find_map(|l| l.split_once(&format!("{MARK} START ")).map(|(_, r)| r));
    let Some(header) = start else {
        let tail: Vec<&str> = lines
            .iter()
            .rev()
            .take(30)
            .rev()
            .map(String::as_str)
            .collect();
        bail!(
            "the guest did not boot (no start marker); last console lines:\n{}",
            tail.join("\n")
        );
    };
    let kernel = header
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kernel="))
        .unwrap_or("?")
        .to_string();
    let mut steps: Vec<(&'static str, StepResult)> = GUEST_STEPS
        .iter()
        .map(|s| (s.name, StepResult::default()))
        .collect();
    let mut problems = Vec::new();
    let mut current: Option<usize> = None;
    let mut began = 0.0f64;
    let mut done = false;
    for line in lines {
        if let Some(rest) = line.split_once(&format!("{MARK} ")).map(|(_, r)| r) {
            let mut words = rest.split_whitespace();
            match (words.next(), words.next()) {
                (Some("BEGIN"), Some(name)) => {
                    current = steps.iter().position(|(n, _)| *n == name);
                    began = uptime(line);
                }
                (Some("END"), Some(name)) => {
                    let rc = words
                        .next()
                        .and_then(|w| w.strip_prefix("rc="))
                        .and_then(|v| v.parse().ok());
                    if let Some((_, r)) = steps.iter_mut().find(|(n, _)| *n == name) {
                        r.rc = rc;
                        r.secs = uptime(line) - began;
                    }
                    current = None;
                }
                (Some("DONE"), _) => done = true,
                (Some("WARN"), _) | (Some("TIMEOUT"), _) | (Some("QEMU"), _) => {
                    problems.push(rest.to_string())
                }
                _ => {}
            }
            continue;
        }
        let Some(i) = current else { continue };
        let r = &mut steps[i].1;
        if let Some(summary) = line.split_once("test result: ").map(|(_, s)| s) {
            r.passed += count(summary, "passed");
            r.failed += count(summary, "failed");
        } else if matches!(GUEST_STEPS[i].kind, Kind::Bench) && line.contains("median") {
            r.info.push(line.trim().to_string());
        }
    }
    Ok(Report {
        kernel,
        header: header
            .split_whitespace()
            .filter(|w| !w.starts_with("kernel="))
            .collect::<Vec<_>>()
            .join(" "),
        steps,
        done,
        problems,
    })
}

/// Seconds since boot stamped on a marker line (`[  12.345678]`-style prefixes are the kernel's,
/// ours carry `up=`); 0 when absent.
fn uptime(line: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("up="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// "6 passed; 0 failed; ..." -> the number before `what`.
fn count(summary: &str, what: &str) -> u32 {
    let words: Vec<&str> = summary
        .split(|c: char| c == ';' || c == '.' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|w| w[1] == what)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

impl Report {
    fn step_ok(step: &Step, r: &StepResult) -> bool {
        let ran = match step.kind {
            Kind::Bench => !r.info.is_empty(),
            _ => r.passed > 0,
        };
        r.rc == Some(0) && r.failed == 0 && ran
    }

    fn render(&self, kernel: &Kernel, took: Duration) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nvm-test: kernel {} ({}, qemu TCG; {}), {} s in all",
            self.kernel,
            kernel.package,
            self.header,
            took.as_secs()
        );
        for (step, (_, r)) in GUEST_STEPS.iter().zip(&self.steps) {
            let status = match r.rc {
                None => "did not finish".to_string(),
                Some(_) if Self::step_ok(step, r) => "ok".to_string(),
                Some(rc) => format!("FAILED (exit {rc})"),
            };
            let what = match step.kind {
                Kind::Bench => "info".to_string(),
                _ => format!("{} run, {} passed", r.passed + r.failed, r.passed),
            };
            let _ = writeln!(
                s,
                "  kernel {}: {:<9} {:<22} {:>6.1} s  {status}",
                self.kernel, step.name, what, r.secs
            );
            for i in &r.info {
                let _ = writeln!(s, "      {i}");
            }
        }
        for p in &self.problems {
            let _ = writeln!(s, "  ! {p}");
        }
        if !self.done {
            let _ = writeln!(
                s,
                "  ! no end marker: the guest hung, crashed or was killed"
            );
        }
        s
    }

    fn verdict(&self) -> Result<()> {
        let failed: Vec<&str> = GUEST_STEPS
            .iter()
            .zip(&self.steps)
            .filter(|(step, (_, r))| !Self::step_ok(step, r))
            .map(|(step, _)| step.name)
            .collect();
        if !self.done {
            bail!(
                "vm-test on {}: the guest did not finish (steps not passed: {})",
                self.kernel,
                failed.join(", ")
            );
        }
        if !failed.is_empty() {
            bail!("vm-test on {}: failed: {}", self.kernel, failed.join(", "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Report> {
        parse(&text.lines().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn no_start_marker_is_a_boot_failure() {
        let e = parsed("SeaBIOS\nKernel panic - not syncing");
        assert!(
            e.as_ref()
                .is_err_and(|e| e.to_string().contains("did not boot")),
            "{e:?}"
        );
    }

    #[test]
    fn every_step_must_run_and_pass() -> Result<()> {
        let mut text = String::from("@@VMTEST START kernel=6.1.0-56-amd64 cpus=2\n");
        for s in GUEST_STEPS {
            text.push_str(&format!("@@VMTEST BEGIN {} up=1.0\n", s.name));
            if matches!(s.kind, Kind::Bench) {
                text.push_str("tcp ack: median 900 ns per run\n");
            } else {
                text.push_str("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1.00s\n");
            }
            text.push_str(&format!("@@VMTEST END {} rc=0 up=3.5\n", s.name));
        }
        let ok = parsed(&(text.clone() + "@@VMTEST DONE\n"))?;
        assert_eq!(ok.kernel, "6.1.0-56-amd64");
        assert!(ok.verdict().is_ok(), "{ok:?}");
        assert_eq!(ok.steps[0].1.passed, 3);
        assert!((ok.steps[0].1.secs - 2.5).abs() < 1e-9);
        // No end marker: the guest hung.
        assert!(parsed(&text)?.verdict().is_err());
        // A filter that matched nothing ran nothing: a failure, not a pass.
        let none = text.replacen("3 passed", "0 passed", 1) + "@@VMTEST DONE\n";
        assert!(parsed(&none)?.verdict().is_err());
        // A failing test.
        let bad = text.replacen("rc=0", "rc=101", 1) + "@@VMTEST DONE\n";
        assert!(parsed(&bad)?.verdict().is_err());
        Ok(())
    }

    #[test]
    fn kernel_package_abi() {
        assert_eq!(abi("linux-image-6.1.0-56-amd64"), Some(56));
        assert_eq!(abi("linux-image-6.1.0-56-cloud-amd64"), None);
        assert_eq!(abi("linux-image-amd64"), None);
    }
}
