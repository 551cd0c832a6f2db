//! Running external tools with errors that say what was run and what it printed.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::LabError;

/// Renders a command line for error messages and logs (arguments with spaces are quoted).
pub(crate) fn cmdline(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) || a.contains('"') {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion, feeding `stdin` if given; returns stdout, or an error carrying
/// the command line, exit status and stderr.
pub(crate) fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String, LabError> {
    let line = cmdline(cmd);
    tracing::debug!(cmd = %line, "lab: running");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| LabError::io(format!("spawning `{line}`"), e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are small (a ruleset), far below the pipe buffer, so writing before reading
        // stdout cannot deadlock.
        pipe.write_all(input.as_bytes())
            .map_err(|e| LabError::io(format!("writing stdin of `{line}`"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::io(format!("waiting for `{line}`"), e))?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmdline: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
