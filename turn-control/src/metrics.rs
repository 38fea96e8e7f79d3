//! Prometheus metrics. The core's [`Stats`] are plain counters updated in place; the event
//! loop copies them into the recorder once a second ([`publish`]), so the packet path is
//! counted exactly once, by the core. Rare daemon-side events (bind failures, agent link)
//! are counted where they happen.

use std::net::SocketAddr;

use anyhow::Context as _;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use turn_control_core::Stats;

/// Declares every metric once: its name in [`name`], documented by its help text, and that
/// help text for the exporter ([`describe`]).
macro_rules! declare_metrics {
    ($($kind:ident $id:ident = $name:literal, $help:literal;)*) => {
        /// Names of the metrics, one place to read them all. Every name carries the `turn_`
        /// prefix except the user-space relay counters, which pair with the agent's
        /// `data_relayed_ebpf_*` (the product brief fixes both), and the certificate's
        /// expiry, named as certificate exporters name it so that one alert rule fits.
        pub mod name {
            $(
                #[doc = concat!(stringify!($kind), ": ", $help, ".")]
                pub const $id: &str = $name;
            )*
        }

        /// The `# HELP` line of every metric.
        fn describe() {
            $(declare_metrics!(@describe $kind name::$id, $help);)*
        }
    };
    (@describe gauge $id:path, $help:literal) => {
        metrics::describe_gauge!($id, $help)
    };
    (@describe counter $id:path, $help:literal) => {
        metrics::describe_counter!($id, $help)
    };
}

declare_metrics! {
    gauge ALLOCATIONS = "turn_allocations_active", "TURN allocations alive";
    counter ALLOCATIONS_CREATED = "turn_allocations_created_total", "TURN allocations created";
    gauge PERMISSIONS = "turn_permissions_active", "TURN permissions alive";
    gauge CHANNELS = "turn_channel_bindings_active", "TURN channel bindings alive";
    gauge RESERVATIONS = "turn_reservations_active",
        "RESERVATION-TOKENs held (EVEN-PORT with the R bit), each holding a relay port";
    counter REQUESTS = "turn_requests_total",
        "TURN/STUN responses sent, by method and code (200 = success)";
    counter AUTH_FAILURES = "turn_auth_failures_total",
        "Requests refused for credentials (unknown user, bad MESSAGE-INTEGRITY, expired REST username)";
    counter UNAUTHORIZED_RATE_LIMITED = "turn_unauthorized_rate_limited_total",
        "Answers to unauthenticated requests (Binding, 401, 438, errors before authentication) suppressed by the host-wide cap (--unauthenticated-rate)";
    counter UNAUTHENTICATED_SOURCE_LIMITED = "turn_unauthenticated_source_limited_total",
        "Answers to unauthenticated requests suppressed because their source (IPv4 address or IPv6 /64) used its share (--unauthenticated-rate-per-source)";
    counter STALE_NONCE_VERIFIED = "turn_stale_nonce_verified_total",
        "438 answers to requests signed with a valid key, sent outside the limits on unauthenticated answers";
    counter ALLOCATION_CAPS = "turn_allocation_cap_reached_total",
        "Requests refused with 508 for a cap per allocation, by cap (permissions, channels)";
    counter KERNEL_SHARE_EXCEEDED = "turn_user_kernel_share_exceeded_total",
        "Channel bindings relayed in user space because their user held --user-kernel-bindings in the data plane";
    counter PEERS_DENIED = "turn_peers_denied_total", "Peer addresses refused by policy (403)";
    counter DROPPED = "turn_packets_dropped_total",
        "Packets dropped: not TURN, no allocation, permission or channel";
    counter RELAYED_BYTES = "data_relayed_userspace_bytes_total",
        "Application bytes relayed in user space, by direction";
    counter RELAYED_PACKETS = "data_relayed_userspace_packets_total",
        "Packets relayed in user space, by direction";
    counter USAGE_BYTES = "turn_usage_bytes_total",
        "Application bytes relayed, both paths (user space, and the kernel as the agent reports it), by realm and direction";
    counter USAGE_PACKETS = "turn_usage_packets_total",
        "Packets relayed, both paths, by realm and direction";
    counter USAGE_DROPPED_BYTES = "turn_usage_dropped_bytes_total",
        "Application bytes dropped by max_bps and user_max_bps, both paths, by realm and direction";
    counter USAGE_DROPPED_PACKETS = "turn_usage_dropped_packets_total",
        "Packets dropped by max_bps and user_max_bps, both paths, by realm and direction";
    counter ACCOUNTING_RECORDS = "turn_accounting_records_total",
        "Accounting records by sink (file, webhook) and result (written, delivered, dropped, rejected, error)";
    gauge ACCOUNTING_WEBHOOK_QUEUE = "turn_accounting_webhook_queue_depth",
        "Accounting records waiting for the webhook";
    counter ACCOUNTING_WEBHOOK_RETRIES = "turn_accounting_webhook_retries_total",
        "Webhook deliveries tried again after a failure";
    counter ICMP_RELAYED = "turn_icmp_relayed_total",
        "ICMP errors about relayed datagrams sent to clients as Data indications";
    counter ICMP_RATE_LIMITED = "turn_icmp_rate_limited_total",
        "ICMP errors not relayed because their allocation's rate cap was reached";
    counter OFFLOADS = "turn_offload_installs_total",
        "Channel bindings sent to the XDP data plane, by result (installed; failed: relayed in user space; timed_out: the ChannelBind success went out before the answer, which may still be installed)";
    gauge AGENT_CONNECTED = "turn_agent_connected",
        "1 while the xdp-agent is connected, 0 otherwise";
    counter AGENT_RPC_ERRORS = "turn_agent_rpc_errors_total", "Failed gRPC calls to the xdp-agent";
    counter AGENT_SYNCS_FORCED = "turn_agent_syncs_forced_total",
        "Full syncs sent to the xdp-agent because removals did not fit in the queue to it";
    counter AGENT_SYNC_RETRIES = "turn_agent_sync_retries_total",
        "Full syncs sent again after the xdp-agent refused one (backoff from 1 s, doubling to 30 s)";
    counter AGENT_SYNC_REFUSED_BINDINGS = "turn_agent_sync_refused_bindings_total",
        "Bindings the xdp-agent left out of a full sync (invalid, or beyond its maps' capacity); they are relayed in user space";
    counter RELAY_BIND_FAILURES = "turn_relay_port_bind_failures_total",
        "Relay sockets that could not be bound (the allocation moves to another port; 508 after 4 tries)";
    counter UDP_SEND_DROPS = "turn_udp_send_dropped_total",
        "Datagrams not sent, by reason (buffer_full, error)";
    counter TCP_SEND_DROPS = "turn_tcp_send_dropped_total",
        "Frames dropped because a TCP client's queue was full";
    counter UDP_TRUNCATED = "turn_udp_recv_truncated_total",
        "Datagrams too long for the receive buffer, dropped";
    gauge TCP_CONNECTIONS = "turn_tcp_connections_active", "TURN-over-TCP connections open";
    counter TCP_CLOSED = "turn_tcp_connections_closed_total",
        "TURN-over-TCP and TLS connections closed, by reason (client, error, server, shutdown, not_turn, first_frame_timeout, frame_timeout, frame_too_long, write_timeout, unallocated_timeout, tls_handshake, tls_not_configured; refused at once: per_source_cap, total_cap)";
    counter RESTORED = "turn_restart_restored_total",
        "What a start restored from --state-dir, by kind (allocations, permissions, channels, kernel_channels, relay_sockets_kept, relay_sockets_rebound, listeners_kept)";
    counter RESTORE_DROPPED = "turn_restart_dropped_total",
        "Saved allocations a start did not restore, by reason (expired, port_out_of_range, relay_address_changed, listener_removed, port_taken, malformed_key, relay_port_unavailable, tcp_connection_closed; a whole journal: threads_changed, journal_format, journal_unreadable)";
    counter JOURNAL_ERRORS = "turn_journal_write_errors_total",
        "Failed writes of the allocation journal (--state-dir): a restart would lose what they held";
    counter TLS_HANDSHAKES = "turn_tls_handshakes_total",
        "TLS handshakes completed, by protocol version (1.2, 1.3) and whether the session was resumed";
    counter TLS_HANDSHAKE_FAILURES = "turn_tls_handshake_failures_total",
        "TLS handshakes that failed, by reason (timeout, no_common_cipher, alert, closed, protocol)";
    counter TLS_RELOADS = "turn_tls_certificate_reloads_total",
        "TLS certificate reloads (SIGHUP, files changed on disk), by result; a failed one keeps the served certificate";
    gauge TLS_CERTIFICATE_EXPIRY = "tls_certificate_expiry_seconds",
        "When the served TLS certificate expires: its notAfter as Unix time";
    gauge RELAY_SOCKETS = "turn_relay_sockets_open", "Relay UDP sockets open";
    gauge THREAD_ALLOCATIONS = "turn_thread_allocations_active",
        "TURN allocations alive per event-loop thread (the kernel spreads clients by address hash)";
    gauge THREADS = "turn_threads", "Event-loop threads (--threads)";
    counter RELOADS = "turn_config_reloads_total", "Configuration reloads (SIGHUP), by result";
    gauge DRAINING = "turn_draining",
        "1 while the relay drains (POST /drain, SIGUSR1): new Allocates are redirected";
    gauge READY = "turn_ready", "1 while the relay takes new allocations (GET /readyz answers 200)";
    counter REDIRECTS = "turn_redirects_total",
        "Allocates redirected (300 Try Alternate, or 508 without an alternate of the client's family), by reason (drain, load)";
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

/// Copies the core's counters into the recorder; `realm` labels the usage totals (one
/// label value per realm: per-user or per-address labels would grow without bound, the
/// per-allocation detail is in the accounting records).
pub fn publish(stats: &Stats, realm: &str) {
    let usage = &stats.usage;
    for (direction, relayed, dropped) in [
        (
            "client_to_peer",
            usage.client_to_peer,
            usage.dropped_client_to_peer,
        ),
        (
            "peer_to_client",
            usage.peer_to_client,
            usage.dropped_peer_to_client,
        ),
    ] {
        let realm = realm.to_owned();
        counter!(name::USAGE_BYTES, "realm" => realm.clone(), "direction" => direction)
            .absolute(relayed.bytes);
        counter!(name::USAGE_PACKETS, "realm" => realm.clone(), "direction" => direction)
            .absolute(relayed.packets);
        counter!(name::USAGE_DROPPED_BYTES, "realm" => realm.clone(), "direction" => direction)
            .absolute(dropped.bytes);
        counter!(name::USAGE_DROPPED_PACKETS, "realm" => realm, "direction" => direction)
            .absolute(dropped.packets);
    }
    gauge!(name::ALLOCATIONS).set(stats.allocations_active as f64);
    counter!(name::ALLOCATIONS_CREATED).absolute(stats.allocations_created);
    gauge!(name::PERMISSIONS).set(stats.permissions_active as f64);
    gauge!(name::CHANNELS).set(stats.channels_active as f64);
    gauge!(name::RESERVATIONS).set(stats.reservations_active as f64);
    for ((method, code), count) in &stats.responses {
        counter!(name::REQUESTS, "method" => method.as_str(), "code" => code.to_string())
            .absolute(*count);
    }
    counter!(name::AUTH_FAILURES).absolute(stats.auth_failures);
    counter!(name::UNAUTHORIZED_RATE_LIMITED).absolute(stats.unauthorized_rate_limited);
    counter!(name::UNAUTHENTICATED_SOURCE_LIMITED).absolute(stats.unauthenticated_source_limited);
    counter!(name::STALE_NONCE_VERIFIED).absolute(stats.stale_nonce_verified);
    for (cap, count) in [
        ("permissions", stats.permission_cap_reached),
        ("channels", stats.channel_cap_reached),
    ] {
        counter!(name::ALLOCATION_CAPS, "cap" => cap).absolute(count);
    }
    counter!(name::KERNEL_SHARE_EXCEEDED).absolute(stats.kernel_share_exceeded);
    counter!(name::PEERS_DENIED).absolute(stats.peers_denied);
    counter!(name::DROPPED).absolute(stats.dropped);
    for (direction, traffic) in [
        ("client_to_peer", stats.relayed_to_peer),
        ("peer_to_client", stats.relayed_to_client),
    ] {
        counter!(name::RELAYED_BYTES, "direction" => direction).absolute(traffic.bytes);
        counter!(name::RELAYED_PACKETS, "direction" => direction).absolute(traffic.packets);
    }
    counter!(name::ICMP_RELAYED).absolute(stats.icmp_relayed);
    counter!(name::ICMP_RATE_LIMITED).absolute(stats.icmp_rate_limited);
    for (reason, count) in [
        ("drain", stats.redirected_drain),
        ("load", stats.redirected_load),
    ] {
        counter!(name::REDIRECTS, "reason" => reason).absolute(count);
    }
    for (result, count) in [
        ("installed", stats.offload_installed),
        ("failed", stats.offload_failed),
        ("timed_out", stats.offload_timed_out),
    ] {
        counter!(name::OFFLOADS, "result" => result).absolute(count);
    }
}
