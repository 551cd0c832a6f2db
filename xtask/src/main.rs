//! Project tasks: `cargo xtask setup | build | test | vm-test | lab | image | bench | hardening | fuzz`.
//!
//! Every task first runs scripts/setup.sh, which installs what a fresh machine lacks
//! (idempotent, quick when everything is present).
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod decoys;
mod vm;

#[derive(Parser)]
#[command(name = "xtask", about = "tracer's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install toolchain pieces and Debian packages, mount bpffs/tracefs.
    Setup,
    /// Build the release binaries (the eBPF object is built and embedded by tracer's build.rs).
    Build,
    /// Format check, clippy, the whole test suite (real eBPF, real namespaces; needs root), then
    /// the kernel-facing tests again on Debian 12's 6.1 kernel in a VM (`vm-test`).
    Test {
        /// Local use only, never in CI: leave out the VM run on 6.1 (~4 minutes under TCG).
        #[arg(long)]
        skip_vm: bool,
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The kernel-facing tests on Debian 12's own 6.1 kernel (clsact, no TCX) under qemu/TCG:
    /// program loading and verification, clsact attachment, real packets, kfree_skb drops, BTF,
    /// seed 002. Fails if the guest does not boot or does not finish.
    VmTest {
        /// Hard limit for the guest, in seconds; qemu is killed after it.
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
        /// Boot this kernel package instead of the newest linux-image-6.1.0-NN-amd64.
        #[arg(long)]
        package: Option<String>,
    },
    /// The main job: bring up the built-in Calico lab, run a scenario (all by default), and print
    /// what tracer diagnoses on each node.
    Lab {
        /// Scenario name (healthy, seed-001, seed-002, seed-003, seed-004, seed-004-passive); all when omitted.
        #[arg(long)]
        scenario: Option<String>,
        /// felix's dataplane (iptables, nftables); every scenario runs in both when omitted.
        #[arg(long)]
        dataplane: Option<String>,
        /// Keep the lab up after the report until Ctrl-C, to query the agents by hand.
        #[arg(long)]
        keep: bool,
    },
    /// The agent's container image, FROM scratch (scripts/build-image.sh) from the release
    /// binary, imported into podman; prints its size and writes target/image/manifest.tsv (every
    /// file and why it is there).
    Image {
        /// The image name.
        #[arg(long, default_value = "localhost/tracer:latest")]
        tag: String,
    },
    /// The hardening tests at full length: 5,000 veths of churn, 30 s of API load.
    Hardening,
    /// Fuzz the decoder, the query parser, BTF parsing and correlation (cargo-fuzz, nightly).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Benchmarks: data-path overhead, agent throughput, time to verdict, memory, a big cluster
    /// (100 agents), a busy node (250 veths, 5k conn/s) (needs root; ~10 minutes, results in a
    /// table; see docs/benchmarks.md).
    Bench {
        /// A ~1 minute smoke run.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for tracer-bench, e.g. `--only records`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("\x1b[1;34m[xtask]\x1b[0m {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn setup() -> Result<()> {
    if is_root() {
        run(Command::new("bash").arg(root().join("scripts/setup.sh")))
    } else {
        bail!("tracer's setup, tests and lab need root (eBPF, network namespaces)")
    }
}

fn is_root() -> bool {
    // Reading /proc avoids a libc dependency just for geteuid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// fmt, clippy and the whole suite.
fn test(args: &[String]) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let mut t = cargo();
    t.args(["test", "--workspace"]);
    if !args.is_empty() {
        t.arg("--").args(args);
    }
    run(&mut t)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Build => setup().and_then(|_| {
            run(cargo().args(["build", "--release", "-p", "tracer", "-p", "tracer-lab"]))
        }),
        Task::Test { skip_vm, args } => decoys::Decoys::start().and_then(|mut decoys| {
            setup()?;
            test(&args)?;
            if skip_vm {
                eprintln!("xtask: --skip-vm: the 6.1 VM tests did NOT run (CI always runs them)");
            } else {
                vm::vm_test(&vm::Opts::default())?;
            }
            decoys.check()
        }),
        Task::VmTest { timeout, package } => setup().and_then(|_| {
            vm::vm_test(&vm::Opts {
                timeout: std::time::Duration::from_secs(timeout),
                package,
            })
        }),
        Task::Image { tag } => setup().and_then(|_| {
            run(cargo().args(["build", "--release", "-p", "tracer"]))?;
            let out = root().join("target/image");
            std::fs::create_dir_all(&out)?;
            run(Command::new("bash")
                .arg(root().join("scripts/build-image.sh"))
                .arg(root().join("target/release/tracer"))
                .arg(&tag)
                .arg(out.join("manifest.tsv")))
        }),
        Task::Hardening => setup().and_then(|_| {
            let mut t = cargo();
            t.args([
                "test",
                "-p",
                "tracer",
                "--test",
                "hardening",
                "--",
                "--nocapture",
            ])
            .env("TRACER_CHURN", "5000")
            .env("TRACER_LOAD_SECS", "30");
            run(&mut t)
        }),
        Task::Fuzz { seconds } => setup().and_then(|_| {
            let have = Command::new("cargo")
                .args(["fuzz", "--version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !have {
                run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
            }
            for target in ["decode", "query", "btf", "correlate"] {
                run(Command::new("cargo")
                    .current_dir(root().join("fuzz"))
                    .args(["+nightly", "fuzz", "run", target, "--"])
                    .arg(format!("-max_total_time={seconds}")))?;
            }
            Ok(())
        }),
        Task::Bench { quick, args } => setup().and_then(|_| {
            run(cargo().args(["build", "--release", "-p", "tracer", "-p", "tracer-bench"]))?;
            let target = root().join("target/release");
            let mut c = Command::new(target.join("tracer-bench"));
            c.current_dir(root())
                .arg("--tracer")
                .arg(target.join("tracer"))
                .args(&args);
            if quick {
                c.arg("--quick");
            }
            run(&mut c)
        }),
        Task::Lab {
            scenario,
            dataplane,
            keep,
        } => setup().and_then(|_| {
            run(cargo().args(["build", "--release", "-p", "tracer", "-p", "tracer-lab"]))?;
            let target = root().join("target/release");
            let mut c = Command::new(target.join("tracer-lab"));
            c.arg("run").arg("--tracer").arg(target.join("tracer"));
            if let Some(s) = scenario {
                c.arg("--scenario").arg(s);
            }
            if let Some(d) = dataplane {
                c.arg("--dataplane").arg(d);
            }
            if keep {
                c.arg("--keep");
            }
            run(&mut c)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
