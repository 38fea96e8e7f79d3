//! The Prometheus endpoint: the data plane's counters and the agent's state,
//! refreshed from the kernel every second.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::socket::Refusal;
use crate::state::AgentState;

/// The agent's metric names, each defined once: dashboards and alerts in
/// `deploy/` use them, so they do not change.
pub mod name {
    /// Counter: application bytes the XDP program relayed (perf reports,
    /// brought up to date from the per-CPU counters).
    pub const RELAYED_BYTES: &str = "data_relayed_ebpf_bytes_total";
    /// Counter: packets the XDP program relayed.
    pub const RELAYED_PACKETS: &str = "data_relayed_ebpf_packets_total";
    /// Counter: frames the XDP program saw, by `verdict` and `reason`.
    pub const PACKETS: &str = "xdp_packets_total";
    /// Counter: bytes by `verdict` and `reason` (application bytes when relayed).
    pub const BYTES: &str = "xdp_bytes_total";
    /// Counter: relayed frames that left through another interface (`XDP_REDIRECT`).
    pub const REDIRECTED_PACKETS: &str = "xdp_redirected_packets_total";
    /// Counter: application bytes of those frames.
    pub const REDIRECTED_BYTES: &str = "xdp_redirected_bytes_total";
    /// Counter: relay reports received through the perf-event array.
    pub const PERF_EVENTS: &str = "xdp_perf_events_total";
    /// Counter: relay reports the kernel could not deliver.
    pub const PERF_EVENTS_LOST: &str = "xdp_perf_events_lost_total";
    /// Gauge: channel bindings installed in the kernel.
    pub const BINDINGS_INSTALLED: &str = "xdp_bindings_installed";
    /// Counter: bindings the agent deleted because their lifetime ended
    /// (turn-control neither refreshed nor removed them in time).
    pub const BINDINGS_EXPIRED: &str = "xdp_bindings_expired_total";
    /// Gauge: entries in each binding `map`.
    pub const BINDING_MAP_ENTRIES: &str = "xdp_binding_map_entries";
    /// Gauge: the most entries each binding map holds.
    pub const BINDING_MAP_CAPACITY: &str = "xdp_binding_map_capacity";
    /// Gauge: 1 per `interface` the program is attached to, by `mode`.
    pub const ATTACHED: &str = "xdp_attached";
    /// Gauge: generation of turn-control's last full Sync.
    pub const SYNC_GENERATION: &str = "xdp_agent_sync_generation";
    /// Counter: bindings of Syncs left out, invalid or beyond the maps' capacity.
    pub const SYNC_REFUSED: &str = "xdp_agent_sync_refused_bindings_total";
    /// Gauge: 1 if the maps were adopted from an earlier run.
    pub const ADOPTED: &str = "xdp_agent_adopted";
    /// Gauge: 1 while the program is attached to every interface, as the
    /// kernel says, and the maps answer (what `/readyz` reports), else 0.
    pub const READY: &str = "xdp_agent_ready";
    /// Gauge: seconds since the agent started.
    pub const UPTIME: &str = "xdp_agent_uptime_seconds";
    /// Counter: gRPC requests by `method` and status `code`.
    pub const GRPC_REQUESTS: &str = "xdp_agent_grpc_requests_total";
    /// Counter: gRPC connections closed unserved, by `reason` (`user`, `group`,
    /// `credentials`): their peer is not one the agent serves.
    pub const GRPC_REFUSED: &str = crate::socket::REFUSED_CONNECTIONS;
}

/// How often gauges and counters are refreshed from the maps.
const REFRESH: Duration = Duration::from_secs(1);

/// Starts serving metrics on `address` (within the current tokio runtime).
pub fn install(address: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .install()
        .with_context(|| format!("cannot serve metrics on {address}"))?;
    describe();
    // Served at zero from the start, so that the first refusal is an increase.
    counter!(name::SYNC_REFUSED).increment(0);
    for refusal in Refusal::ALL {
        counter!(name::GRPC_REFUSED, "reason" => refusal.name()).increment(0);
    }
    Ok(())
}

/// Refreshes the metrics from the kernel's maps until the task is dropped.
pub async fn refresh_forever(state: Arc<AgentState>) {
    let mut tick = tokio::time::interval(REFRESH);
    loop {
        tick.tick().await;
        refresh(&state);
    }
}

fn describe() {
    describe_counter!(
        name::RELAYED_BYTES,
        "Application bytes relayed by the XDP program, as it reports them through perf events (brought up to date from its per-CPU counters)."
    );
    describe_counter!(name::RELAYED_PACKETS, "Packets relayed by the XDP program.");
    describe_counter!(
        name::PACKETS,
        "Frames seen by the XDP program, by verdict and reason."
    );
    describe_counter!(
        name::BYTES,
        "Bytes by verdict and reason: application bytes for relayed frames, frame bytes otherwise."
    );
    describe_counter!(
        name::REDIRECTED_PACKETS,
        "Relayed frames that left through another attached interface than they came in on (XDP_REDIRECT); a part of the relay reasons' counts."
    );
    describe_counter!(
        name::REDIRECTED_BYTES,
        "Application bytes of the relayed frames that left through another attached interface."
    );
    describe_counter!(
        name::PERF_EVENTS,
        "Relay reports received through the perf-event array."
    );
    describe_counter!(
        name::PERF_EVENTS_LOST,
        "Relay reports the kernel could not deliver."
    );
    describe_gauge!(
        name::BINDINGS_INSTALLED,
        "Channel bindings installed in the kernel."
    );
    describe_counter!(
        name::BINDINGS_EXPIRED,
        "Channel bindings deleted because their lifetime ended before turn-control refreshed or removed them."
    );
    describe_gauge!(name::BINDING_MAP_ENTRIES, "Entries in each binding map.");
    describe_gauge!(
        name::BINDING_MAP_CAPACITY,
        "The most entries each binding map holds."
    );
    describe_gauge!(
        name::ATTACHED,
        "1 for each interface the program is attached to, by mode."
    );
    describe_gauge!(
        name::SYNC_GENERATION,
        "Generation of turn-control's last full Sync."
    );
    describe_counter!(
        name::SYNC_REFUSED,
        "Bindings of full-state Syncs left out, invalid or beyond the maps' capacity; their traffic goes to turn-control."
    );
    describe_gauge!(
        name::ADOPTED,
        "1 if the program's maps were adopted from an earlier run."
    );
    describe_gauge!(
        name::READY,
        "1 while the program is attached to every --iface (as the kernel says) and its maps answer, else 0: what /readyz reports."
    );
    describe_gauge!(name::UPTIME, "Seconds since the agent started.");
    describe_counter!(
        name::GRPC_REQUESTS,
        "gRPC requests by method and status code."
    );
    describe_counter!(
        name::GRPC_REFUSED,
        "gRPC connections closed unserved because their peer (SO_PEERCRED) is neither root, the agent's user, --grpc-user nor of the socket's group, by reason."
    );
}

fn refresh(state: &AgentState) {
    let maps = &state.maps;
    if let Ok(counters) = maps.counters() {
        for (reason, value) in counters {
            let (verdict, reason) = (reason.verdict().name(), reason.name());
            counter!(name::PACKETS, "verdict" => verdict, "reason" => reason)
                .absolute(value.packets);
            counter!(name::BYTES, "verdict" => verdict, "reason" => reason).absolute(value.bytes);
        }
    }
    if let Ok(redirected) = maps.redirected() {
        counter!(name::REDIRECTED_PACKETS).absolute(redirected.packets);
        counter!(name::REDIRECTED_BYTES).absolute(redirected.bytes);
    }
    let relayed = state.reports.relayed_total(maps);
    counter!(name::RELAYED_BYTES).absolute(relayed.bytes);
    counter!(name::RELAYED_PACKETS).absolute(relayed.packets);
    let (events, lost) = state.reports.events_and_lost();
    counter!(name::PERF_EVENTS).absolute(events);
    counter!(name::PERF_EVENTS_LOST).absolute(lost);
    gauge!(name::BINDINGS_INSTALLED).set(maps.installed() as f64);
    counter!(name::BINDINGS_EXPIRED).absolute(maps.expired());
    for (map, entries) in maps.map_entries() {
        gauge!(name::BINDING_MAP_ENTRIES, "map" => map).set(entries as f64);
    }
    gauge!(name::BINDING_MAP_CAPACITY).set(f64::from(maps.capacity()));
    for (interface, mode) in &state.attachments {
        gauge!(name::ATTACHED, "interface" => interface.clone(), "mode" => mode.to_string())
            .set(1.0);
    }
    gauge!(name::SYNC_GENERATION).set(state.generation() as f64);
    gauge!(name::ADOPTED).set(if state.adopted { 1.0 } else { 0.0 });
    gauge!(name::READY).set(if state.readiness().is_ok() { 1.0 } else { 0.0 });
    gauge!(name::UPTIME).set(state.started.elapsed().as_secs_f64());
}
