//! Prometheus metrics. The core's [`Stats`] are plain counters updated in place; the event
//! loop copies them into the recorder once a second ([`publish`]), so the packet path is
//! counted exactly once, by the core. Rare daemon-side events (bind failures, agent link)
//! are counted where they happen.

use std::net::SocketAddr;

use anyhow::Context as _;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use turn_core::Stats;

/// Names of the metrics, one place to read them all.
pub mod name {
    /// Gauge: allocations alive.
    pub const ALLOCATIONS: &str = "turn_allocations_active";
    /// Counter: allocations created.
    pub const ALLOCATIONS_CREATED: &str = "turn_allocations_created_total";
    /// Gauge: permissions alive.
    pub const PERMISSIONS: &str = "turn_permissions_active";
    /// Gauge: channel bindings alive.
    pub const CHANNELS: &str = "turn_channel_bindings_active";
    /// Counter: responses by `method` and `code` (200 for success).
    pub const REQUESTS: &str = "turn_requests_total";
    /// Counter: requests refused for credentials.
    pub const AUTH_FAILURES: &str = "turn_auth_failures_total";
    /// Counter: 401 answers suppressed by the rate cap.
    pub const UNAUTHORIZED_RATE_LIMITED: &str = "turn_unauthorized_rate_limited_total";
    /// Counter: peers refused by policy.
    pub const PEERS_DENIED: &str = "turn_peers_denied_total";
    /// Counter: packets dropped by the core.
    pub const DROPPED: &str = "turn_packets_dropped_total";
    /// Counter: payload bytes relayed in user space, by `direction`.
    pub const RELAYED_BYTES: &str = "data_relayed_userspace_bytes_total";
    /// Counter: packets relayed in user space, by `direction`.
    pub const RELAYED_PACKETS: &str = "data_relayed_userspace_packets_total";
    /// Counter: channel offloads by `result` (installed, failed, timed_out).
    pub const OFFLOADS: &str = "turn_offload_installs_total";
    /// Gauge: 1 while the xdp-agent is connected.
    pub const AGENT_CONNECTED: &str = "agent_connected";
    /// Counter: failed agent RPCs.
    pub const AGENT_RPC_ERRORS: &str = "agent_rpc_errors_total";
    /// Counter: relay sockets that could not be bound.
    pub const RELAY_BIND_FAILURES: &str = "relay_port_bind_failures_total";
    /// Counter: datagrams not sent, by `reason` (buffer_full, error).
    pub const UDP_SEND_DROPS: &str = "udp_send_dropped_total";
    /// Counter: frames not queued to a TCP client that does not read its stream.
    pub const TCP_SEND_DROPS: &str = "tcp_send_dropped_total";
    /// Counter: datagrams received too long for a receive slot.
    pub const UDP_TRUNCATED: &str = "udp_recv_truncated_total";
    /// Gauge: TURN-over-TCP connections open.
    pub const TCP_CONNECTIONS: &str = "tcp_connections_active";
    /// Counter: TURN-over-TCP connections closed, by `reason` (client, error, server,
    /// shutdown, not_turn, first_frame_timeout, frame_timeout, frame_too_long,
    /// write_timeout).
    pub const TCP_CLOSED: &str = "tcp_connections_closed_total";
    /// Gauge: relay sockets open.
    pub const RELAY_SOCKETS: &str = "relay_sockets_open";
    /// Gauge: allocations alive per event-loop `thread`.
    pub const THREAD_ALLOCATIONS: &str = "turn_thread_allocations_active";
    /// Gauge: event-loop threads.
    pub const THREADS: &str = "turn_threads";
    /// Counter: SIGHUP reloads by `result`.
    pub const RELOADS: &str = "config_reloads_total";
}

/// Installs the global recorder and serves `/metrics` on `addr`. Must run inside the
/// runtime (the exporter is a task).
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .build()
        .with_context(|| format!("metrics listener {addr}"))?;
    metrics::set_global_recorder(recorder).context("metrics recorder already installed")?;
    tokio::spawn(async move {
        if let Err(error) = exporter.await {
            tracing::error!(?error, "metrics exporter stopped");
        }
    });
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(name::ALLOCATIONS, "TURN allocations alive");
    describe_counter!(name::ALLOCATIONS_CREATED, "TURN allocations created");
    describe_gauge!(name::PERMISSIONS, "TURN permissions alive");
    describe_gauge!(name::CHANNELS, "TURN channel bindings alive");
    describe_counter!(
        name::REQUESTS,
        "TURN/STUN responses sent, by method and code (200 = success)"
    );
    describe_counter!(
        name::AUTH_FAILURES,
        "Requests refused for credentials (unknown user, bad MESSAGE-INTEGRITY, expired REST username)"
    );
    describe_counter!(
        name::UNAUTHORIZED_RATE_LIMITED,
        "401 answers suppressed by the rate cap"
    );
    describe_counter!(name::PEERS_DENIED, "Peer addresses refused by policy (403)");
    describe_counter!(
        name::DROPPED,
        "Packets dropped: not TURN, no allocation, permission or channel"
    );
    describe_counter!(
        name::RELAYED_BYTES,
        "Application bytes relayed in user space, by direction"
    );
    describe_counter!(
        name::RELAYED_PACKETS,
        "Packets relayed in user space, by direction"
    );
    describe_counter!(
        name::OFFLOADS,
        "Channel bindings sent to the XDP data plane, by result"
    );
    describe_gauge!(
        name::AGENT_CONNECTED,
        "1 while the xdp-agent is connected, 0 otherwise"
    );
    describe_counter!(name::AGENT_RPC_ERRORS, "Failed gRPC calls to the xdp-agent");
    describe_counter!(
        name::RELAY_BIND_FAILURES,
        "Relay sockets that could not be bound (the allocation moves to another port; 508 after 4 tries)"
    );
    describe_counter!(name::UDP_SEND_DROPS, "Datagrams not sent, by reason");
    describe_counter!(
        name::UDP_TRUNCATED,
        "Datagrams too long for the receive buffer, dropped"
    );
    describe_counter!(
        name::TCP_SEND_DROPS,
        "Frames dropped because a TCP client's queue was full"
    );
    describe_gauge!(name::TCP_CONNECTIONS, "TURN-over-TCP connections open");
    describe_counter!(
        name::TCP_CLOSED,
        "TURN-over-TCP connections closed, by reason (not_turn, first_frame_timeout, frame_timeout, ...)"
    );
    describe_gauge!(name::RELAY_SOCKETS, "Relay UDP sockets open");
    describe_gauge!(
        name::THREAD_ALLOCATIONS,
        "TURN allocations alive per event-loop thread (the kernel spreads clients by address hash)"
    );
    describe_gauge!(name::THREADS, "Event-loop threads (--threads)");
    describe_counter!(name::RELOADS, "Configuration reloads (SIGHUP), by result");
}

/// Copies the core's counters into the recorder.
pub fn publish(stats: &Stats) {
    gauge!(name::ALLOCATIONS).set(stats.allocations_active as f64);
    counter!(name::ALLOCATIONS_CREATED).absolute(stats.allocations_created);
    gauge!(name::PERMISSIONS).set(stats.permissions_active as f64);
    gauge!(name::CHANNELS).set(stats.channels_active as f64);
    for ((method, code), count) in &stats.responses {
        counter!(name::REQUESTS, "method" => method.as_str(), "code" => code.to_string())
            .absolute(*count);
    }
    counter!(name::AUTH_FAILURES).absolute(stats.auth_failures);
    counter!(name::UNAUTHORIZED_RATE_LIMITED).absolute(stats.unauthorized_rate_limited);
    counter!(name::PEERS_DENIED).absolute(stats.peers_denied);
    counter!(name::DROPPED).absolute(stats.dropped);
    for (direction, traffic) in [
        ("client_to_peer", stats.relayed_to_peer),
        ("peer_to_client", stats.relayed_to_client),
    ] {
        counter!(name::RELAYED_BYTES, "direction" => direction).absolute(traffic.bytes);
        counter!(name::RELAYED_PACKETS, "direction" => direction).absolute(traffic.packets);
    }
    for (result, count) in [
        ("installed", stats.offload_installed),
        ("failed", stats.offload_failed),
        ("timed_out", stats.offload_timed_out),
    ] {
        counter!(name::OFFLOADS, "result" => result).absolute(count);
    }
}
