//! Builds tracer-ebpf for bpfel-unknown-none and hands its path to the agent's `include_bytes!`.
//!
//! The kernel crate needs Debian's rustc (it ships the BPF `core`) and bpf-linker; see
//! scripts/setup.sh. A nested cargo with its own target dir avoids deadlocking on our lock.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let root = manifest.parent().unwrap_or(Path::new("..")).to_path_buf();
    let ebpf = root.join("tracer-ebpf");
    let common = root.join("tracer-common");
    for dir in [ebpf.join("src"), common.join("src")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    for f in [
        ebpf.join("Cargo.toml"),
        ebpf.join("Cargo.lock"),
        ebpf.join(".cargo").join("config.toml"),
        common.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-env-changed=TRACER_EBPF_RUSTC");

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| "target".into()));
    let target_dir = root.join("target").join("ebpf");
    let rustc = env::var("TRACER_EBPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf)
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1");
    // The outer build's settings (host rustc wrapper, flags, profile) must not leak into the BPF one.
    for (k, _) in env::vars() {
        if k.starts_with("CARGO_")
            || k == "RUSTC_WRAPPER"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k == "RUSTFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("RUSTC_LINKER");
    let status = cmd.status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "building tracer-ebpf failed ({s}); run scripts/setup.sh (Debian rustc-web, \
             libstd-rust-web-dev-bpf, bpf-linker 0.13) and retry"
        ),
        Err(e) => panic!("could not run cargo for tracer-ebpf: {e}"),
    }
    let release = target_dir.join("bpfel-unknown-none").join("release");
    // tracer.bpf.o is the agent's; standins.bpf.o holds the coexistence stand-ins (tests, lab).
    for (bin, name) in [
        ("tracer-ebpf", "tracer.bpf.o"),
        ("tracer-standins", "standins.bpf.o"),
    ] {
        let obj = release.join(bin);
        let dst = out_dir.join(name);
        if let Err(e) = std::fs::copy(&obj, &dst) {
            panic!("copying {} to {}: {e}", obj.display(), dst.display());
        }
    }
}
