//! Defaults of the API contract, defined once for the agent, the CLI, the lab, the tests and
//! the bench.

/// The port number as text, so the addresses below are built from it at compile time.
macro_rules! api_port {
    () => {
        "9464"
    };
}

/// The port the agent serves its API on.
pub const API_PORT: u16 = 9464;
/// Where the agent listens by default (loopback: the DaemonSet passes its own address).
pub const LISTEN: &str = concat!("127.0.0.1:", api_port!());
/// The agent a client asks by default.
pub const AGENT_URL: &str = concat!("http://127.0.0.1:", api_port!());
/// The DaemonSet's headless Service, for `--all-nodes`.
pub const SERVICE: &str = "tracer.kube-system.svc.cluster.local";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_addresses_carry_the_port() {
        assert!(LISTEN.ends_with(&format!(":{API_PORT}")));
        assert!(AGENT_URL.ends_with(&format!(":{API_PORT}")));
    }
}
