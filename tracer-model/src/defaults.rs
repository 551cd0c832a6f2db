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

/// Where deploy/ runs the agents (the DaemonSet, its headless Service and the token Secret).
pub const NAMESPACE: &str = "kube-system";
/// The label selector of the DaemonSet's pods (deploy/base's `app.kubernetes.io/name`).
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=tracer";
/// The Secret holding the agents' API token (deploy/overlays/token-secret), and its key.
pub const TOKEN_SECRET: &str = "tracer-token";
pub const TOKEN_SECRET_KEY: &str = "token";
/// The header that carries the token where `Authorization` cannot: the API server's
/// pods/proxy removes `Authorization` once it has authenticated the caller.
pub const TOKEN_HEADER: &str = "x-tracer-token";

/// An on-demand hold's time to live when `POST /attach` names none (`tracer watch` renews
/// its lease every third of it).
pub const LEASE_TTL_SECONDS: u64 = 30;
/// The longest time to live a lease may ask for.
pub const MAX_LEASE_TTL_SECONDS: u64 = 3600;

/// Agents asked at once by `--all-nodes`/`--agents`: one per 32 agents, at least
/// [`FAN_OUT_MIN`] and at most [`FAN_OUT_MAX`]. More slots keep a big cluster's query short
/// (5,000 agents at 32 in flight take half the rounds of 16), the cap keeps the client's memory
/// bounded by the answer: at most that many pages are in flight, whatever the node count.
pub fn fan_out(agents: usize) -> usize {
    (agents / 32).clamp(FAN_OUT_MIN, FAN_OUT_MAX)
}
pub const FAN_OUT_MIN: usize = 16;
pub const FAN_OUT_MAX: usize = 32;

/// How long a client that asks many agents waits for one to accept its connection. Inside a
/// cluster a connection is accepted in a round trip, or refused at once; one that has not
/// been accepted after a second is an agent (or node) that is down, and waiting longer would
/// hold one of the [`fan_out`] slots.
pub const FAN_OUT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long such a client waits for one agent's whole answer.
pub const FAN_OUT_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_addresses_carry_the_port() {
        assert!(LISTEN.ends_with(&format!(":{API_PORT}")));
        assert!(AGENT_URL.ends_with(&format!(":{API_PORT}")));
    }

    #[test]
    fn the_fan_out_grows_with_the_agents_within_bounds() {
        assert_eq!(fan_out(1), FAN_OUT_MIN);
        assert_eq!(fan_out(100), FAN_OUT_MIN);
        assert_eq!(fan_out(800), 25);
        assert_eq!(fan_out(5_000), FAN_OUT_MAX);
    }
}
