//! The Prometheus endpoint: the data plane's counters and the agent's state,
//! refreshed from the kernel every second.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bpf_common::Verdict;
use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::state::AgentState;

/// How often gauges and counters are refreshed from the maps.
const REFRESH: Duration = Duration::from_secs(1);

/// Starts serving metrics on `address` (within the current tokio runtime).
pub fn install(address: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .install()
        .with_context(|| format!("cannot serve metrics on {address}"))?;
    describe();
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
        "data_relayed_ebpf_bytes_total",
        "Application bytes relayed by the XDP program, as it reports them through perf events (brought up to date from its per-CPU counters)."
    );
    describe_counter!(
        "data_relayed_ebpf_packets_total",
        "Packets relayed by the XDP program."
    );
    describe_counter!(
        "xdp_packets_total",
        "Frames seen by the XDP program, by verdict and reason."
    );
    describe_counter!(
        "xdp_bytes_total",
        "Bytes by verdict and reason: application bytes for relayed frames, frame bytes otherwise."
    );
    describe_counter!(
        "xdp_perf_events_total",
        "Relay reports received through the perf-event array."
    );
    describe_counter!(
        "xdp_perf_events_lost_total",
        "Relay reports the kernel could not deliver."
    );
    describe_gauge!(
        "xdp_bindings_installed",
        "Channel bindings installed in the kernel."
    );
    describe_gauge!("xdp_binding_map_entries", "Entries in each binding map.");
    describe_gauge!(
        "xdp_binding_map_capacity",
        "The most entries each binding map holds."
    );
    describe_gauge!(
        "xdp_attached",
        "1 for each interface the program is attached to, by mode."
    );
    describe_gauge!(
        "xdp_agent_sync_generation",
        "Generation of turn-control's last full Sync."
    );
    describe_gauge!(
        "xdp_agent_adopted",
        "1 if the program's maps were adopted from an earlier run."
    );
    describe_gauge!(
        "xdp_agent_uptime_seconds",
        "Seconds since the agent started."
    );
    describe_counter!(
        "xdp_agent_grpc_requests_total",
        "gRPC requests by method and status code."
    );
}

fn refresh(state: &AgentState) {
    let dataplane = &state.dataplane;
    if let Ok(counters) = dataplane.counters() {
        for (reason, value) in counters {
            let verdict = match reason.verdict() {
                Verdict::Tx => "tx",
                Verdict::Pass => "pass",
                Verdict::Drop => "drop",
            };
            counter!("xdp_packets_total", "verdict" => verdict, "reason" => reason.name())
                .absolute(value.packets);
            counter!("xdp_bytes_total", "verdict" => verdict, "reason" => reason.name())
                .absolute(value.bytes);
        }
    }
    let relayed = state.reports.relayed_total(dataplane);
    counter!("data_relayed_ebpf_bytes_total").absolute(relayed.bytes);
    counter!("data_relayed_ebpf_packets_total").absolute(relayed.packets);
    let (events, lost) = state.reports.events_and_lost();
    counter!("xdp_perf_events_total").absolute(events);
    counter!("xdp_perf_events_lost_total").absolute(lost);
    gauge!("xdp_bindings_installed").set(dataplane.installed() as f64);
    for (map, entries) in dataplane.map_entries() {
        gauge!("xdp_binding_map_entries", "map" => map).set(entries as f64);
    }
    gauge!("xdp_binding_map_capacity").set(f64::from(dataplane.capacity()));
    for (interface, mode) in &state.attachments {
        gauge!("xdp_attached", "interface" => interface.clone(), "mode" => mode.to_string())
            .set(1.0);
    }
    gauge!("xdp_agent_sync_generation").set(state.generation() as f64);
    gauge!("xdp_agent_adopted").set(if state.adopted { 1.0 } else { 0.0 });
    gauge!("xdp_agent_uptime_seconds").set(state.started.elapsed().as_secs_f64());
}
