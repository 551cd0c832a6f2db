//! Names the kernel gives to numbers in drop records: drop reasons (from the `skb:kfree_skb`
//! tracepoint's format) and the functions that dropped (from kallsyms). Plain data, read by the
//! eBPF loader ([`crate::hooks::drops`]), the rules and the flow view alike.
use std::collections::HashMap;

/// Drop reason names, as this kernel numbers them (the numbers move between kernels).
#[derive(Debug, Clone, Default)]
pub struct DropReasons {
    names: HashMap<u32, String>,
}

impl DropReasons {
    pub fn name(&self, reason: u32) -> String {
        self.names
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| format!("REASON_{reason}"))
    }

    /// From the tracepoint's format file: its `__print_symbolic` table.
    pub fn from_format(format: &str) -> DropReasons {
        DropReasons {
            names: parse_symbolic(format),
        }
    }

    /// Every known reason, number and name, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names.iter().map(|(n, name)| (*n, name.as_str()))
    }
}

/// `{ 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, ...` from the print fmt line.
fn parse_symbolic(format: &str) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    let Some(start) = format.find("__print_symbolic(") else {
        return out;
    };
    let mut rest = &format[start..];
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find('}') else {
            break;
        };
        let entry = &rest[..close];
        if let Some((num, name)) = entry.split_once(',') {
            if let Ok(n) = num.trim().parse::<u32>() {
                out.insert(n, name.trim().trim_matches('"').to_string());
            }
        }
        rest = &rest[close + 1..];
    }
    out
}

/// Kernel text symbols, to name the function that dropped a packet.
#[derive(Debug, Default)]
pub struct Symbols {
    syms: Vec<(u64, String)>,
}

impl Symbols {
    /// Reads /proc/kallsyms (addresses are zero without CAP_SYSLOG: then names are unknown).
    pub fn load() -> Symbols {
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                (addr != 0 && matches!(kind, "t" | "T")).then(|| (addr, name.to_string()))
            })
            .collect();
        syms.sort_unstable_by_key(|(a, _)| *a);
        Symbols { syms }
    }

    pub fn name(&self, addr: u64) -> Option<String> {
        let i = self.syms.partition_point(|(a, _)| *a <= addr);
        let (base, name) = self.syms.get(i.checked_sub(1)?)?;
        Some(format!("{name}+0x{:x}", addr - base))
    }
}
