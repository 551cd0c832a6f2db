//! Proof that nothing we run touches services it did not start: before the test task, decoy
//! processes named `bird` and `etcd` (what a Calico node and a control-plane node run) start
//! in the root namespace; after setup, the lab scenarios and the whole suite, both must still
//! be alive. Anything that kills by name (`pkill bird`, `systemctl stop etcd`) fails the run.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};

pub struct Decoys {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

/// The names felix's node and a control plane run under.
const NAMES: [&str; 2] = ["bird", "etcd"];

impl Decoys {
    pub fn start() -> Result<Decoys> {
        let dir = std::env::temp_dir().join(format!("tracer-decoys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let sleep = ["/usr/bin/sleep", "/bin/sleep"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .context("no sleep binary to make decoys from")?;
        let mut children = Vec::new();
        for name in NAMES {
            // A copy, so the process's comm (what pkill -x and pidof match) is the name.
            let bin = dir.join(name);
            std::fs::copy(sleep, &bin).with_context(|| format!("copying {sleep}"))?;
            let child = Command::new(&bin)
                .arg("infinity")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting decoy {name}"))?;
            eprintln!("[xtask] decoy `{name}` running as pid {}", child.id());
            children.push((name.to_string(), child));
        }
        Ok(Decoys { dir, children })
    }

    /// Fails when a decoy died while the task ran.
    pub fn check(&mut self) -> Result<()> {
        let mut dead = Vec::new();
        for (name, child) in &mut self.children {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => dead.push(format!("{name} ({status})")),
                Err(e) => dead.push(format!("{name} ({e})")),
            }
        }
        if !dead.is_empty() {
            bail!(
                "host rule broken: decoy processes {} were stopped while setup, the lab or the \
                 tests ran; something kills services it did not start",
                dead.join(", ")
            );
        }
        eprintln!("[xtask] decoys `bird` and `etcd` survived setup, the lab and the tests");
        Ok(())
    }
}

impl Drop for Decoys {
    fn drop(&mut self) {
        // Ours to stop: we started them.
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
