//! `tracer agent --config FILE`: agent flags from a YAML file (mounted from a ConfigMap), as an
//! alternative to the command line. The file's keys are the flags' long names; each becomes
//! the flag itself, placed before the command line's own flags, so clap checks every value
//! exactly as it checks the command line and a flag given there wins.
use std::{ffi::OsString, path::Path};

use clap::CommandFactory;
use yaml_rust2::{Yaml, YamlLoader};

use crate::cli::{Cli, Command};

/// Largest config file read: flags, not data.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// `argv` with the flags of `agent --config FILE` (or `TRACER_CONFIG`) inserted after `agent`;
/// unchanged for other commands, for an agent without a config file, or when `argv` does not
/// parse (clap then reports that as usual).
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Ok(cli) = <Cli as clap::Parser>::try_parse_from(&argv) else {
        return Ok(argv);
    };
    let Command::Agent(agent) = cli.command else {
        return Ok(argv);
    };
    let Some(path) = agent.config else {
        return Ok(argv);
    };
    let flags = read(&path)?;
    let Some(at) = argv.iter().position(|a| a == "agent") else {
        return Ok(argv);
    };
    let mut out = argv[..=at].to_vec();
    out.extend(flags.into_iter().map(OsString::from));
    out.extend_from_slice(&argv[at + 1..]);
    // The command line parsed without the file: a failure now is the file's, so say so.
    if let Err(e) = <Cli as clap::Parser>::try_parse_from(&out) {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("invalid setting");
        return Err(format!(
            "config file {}: {}",
            path.display(),
            first.trim_start_matches("error: ")
        ));
    }
    Ok(out)
}

/// The flags a config file stands for, e.g. `["--flow-cap", "5000", "--insecure"]`.
pub fn read(path: &Path) -> Result<Vec<String>, String> {
    let where_ = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("config file {where_}: {e}"))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "config file {where_}: {} bytes, more than {MAX_CONFIG_BYTES}",
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("config file {where_}: {e}"))?;
    flags(&text).map_err(|e| format!("config file {where_}: {e}"))
}

/// The flags of a config file's text.
pub fn flags(text: &str) -> Result<Vec<String>, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let map = match docs.as_slice() {
        [] => return Ok(Vec::new()),
        [Yaml::Hash(map)] => map,
        [Yaml::Null] => return Ok(Vec::new()),
        [_] => return Err("expected a mapping of flag names to values".into()),
        _ => return Err("expected one YAML document".into()),
    };
    let known = agent_flags();
    let mut out = Vec::new();
    for (k, v) in map {
        let Yaml::String(name) = k else {
            return Err(format!("key {k:?} is not a flag name"));
        };
        if name == "config" || !known.iter().any(|(n, _)| n == name) {
            let mut names: Vec<&str> = known
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| *n != "config")
                .collect();
            names.sort_unstable();
            return Err(format!(
                "unknown setting {name:?} (known: {})",
                names.join(", ")
            ));
        }
        let takes_value = known.iter().any(|(n, t)| n == name && *t);
        let flag = format!("--{name}");
        match v {
            Yaml::Boolean(b) if !takes_value => {
                if *b {
                    out.push(flag);
                }
            }
            Yaml::Array(items) if takes_value => {
                for item in items {
                    out.push(flag.clone());
                    out.push(scalar(name, item)?);
                }
            }
            other if takes_value => {
                out.push(flag);
                out.push(scalar(name, other)?);
            }
            _ => return Err(format!("{name}: a switch, give true or false")),
        }
    }
    Ok(out)
}

fn scalar(name: &str, v: &Yaml) -> Result<String, String> {
    match v {
        Yaml::String(s) | Yaml::Real(s) => Ok(s.clone()),
        Yaml::Integer(i) => Ok(i.to_string()),
        Yaml::Boolean(b) => Ok(b.to_string()),
        _ => Err(format!(
            "{name}: expected a value (string, number) or a list of them"
        )),
    }
}

/// The agent's flags by long name, and whether each takes a value.
fn agent_flags() -> Vec<(String, bool)> {
    let cmd = Cli::command();
    let Some(agent) = cmd.find_subcommand("agent") else {
        return Vec::new();
    };
    agent
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            Some((long.to_string(), a.get_action().takes_values()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<crate::cli::AgentArgs, String> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        match <Cli as clap::Parser>::try_parse_from(&argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Agent(a) => Ok(a),
            _ => Err("not the agent".into()),
        }
    }

    #[test]
    fn settings_become_the_flags_they_name() -> Result<(), String> {
        let f = flags(
            "flow-cap: 5000\ninsecure: true\nhost-iface: [eth0, eth1]\nno-reply-timeout: 2s\n\
             tc-mode: clsact\nlisten: 0.0.0.0:9464\nflow-log: \"-\"\n",
        )?;
        let mut argv = vec!["tracer", "agent"];
        argv.extend(f.iter().map(String::as_str));
        let a = parse(&argv)?;
        assert_eq!(a.flow_cap, 5000);
        assert!(a.insecure);
        assert_eq!(a.host_ifaces, ["eth0", "eth1"]);
        assert_eq!(a.listen.to_string(), "0.0.0.0:9464");
        assert_eq!(a.flow_log, Some(crate::agent::FlowLogTarget::Stdout));
        // The command line wins over the file.
        argv.extend(["--flow-cap", "7"]);
        assert_eq!(parse(&argv)?.flow_cap, 7);
        Ok(())
    }

    #[test]
    fn bad_files_are_clear_errors() {
        for (text, says) in [
            ("flow_cap: 5", "unknown setting \"flow_cap\""),
            ("config: x.yaml", "unknown setting \"config\""),
            ("- a\n- b", "expected a mapping"),
            ("insecure: yes please", "a switch"),
            ("flow-cap: {a: 1}", "expected a value"),
            ("flow-cap: [", "not YAML"),
        ] {
            match flags(text) {
                Ok(f) => panic!("{text:?} accepted as {f:?}"),
                Err(e) => assert!(e.contains(says), "{text:?}: {e}"),
            }
        }
        assert_eq!(flags(""), Ok(Vec::new()));
        assert_eq!(flags("insecure: false"), Ok(Vec::new()));
    }

    #[test]
    fn a_bad_value_is_caught_by_the_flags_own_parser_and_blamed_on_the_file() -> Result<(), String>
    {
        let f = flags("flow-cap: lots")?;
        let mut argv = vec!["tracer", "agent"];
        argv.extend(f.iter().map(String::as_str));
        assert!(parse(&argv).is_err_and(|e| e.contains("lots")));
        let path =
            std::env::temp_dir().join(format!("tracer-bad-value-{}.yaml", std::process::id()));
        std::fs::write(&path, "flow-cap: lots\n").map_err(|e| e.to_string())?;
        let argv: Vec<OsString> = ["tracer", "agent", "--config"]
            .iter()
            .map(OsString::from)
            .chain([path.clone().into_os_string()])
            .collect();
        let err = expand(argv).err().unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        assert!(
            err.contains("config file") && err.contains("lots") && err.contains("--flow-cap"),
            "{err}"
        );
        Ok(())
    }
}
