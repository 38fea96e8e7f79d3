//! The two daemons converge with the real agent: removals that do not fit in
//! the queue to the agent (a queue of one request, on purpose) force a full
//! Sync within a second, after which the kernel holds exactly what
//! turn-control holds.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tests::agent::Agent;
use tests::{
    AGENT_METRICS, CLIENT_V4, Lab, PEER_V4, Site, TURN_CONTROL_METRICS, sample, sample_sum,
    wait_for,
};

const T: Duration = Duration::from_secs(5);
/// Channels of the one allocation: its deletion emits this many removals at
/// once, which a queue of one request cannot hold.
const CHANNELS: usize = 8;

fn turn_control_metric(lab: &Lab, series: &str) -> f64 {
    let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS).unwrap();
    sample(&body, series, "").unwrap_or(0.0)
}

#[test]
fn removals_dropped_by_a_full_queue_force_a_sync_and_the_kernel_converges() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&["--xdp-mode", "native", "--metrics", AGENT_METRICS])
        .unwrap();
    // The allocation's lifetime, shorter than a permission's, is every
    // binding's expiry: binding the next channel (which refreshes the
    // permission they share) moves no other binding's expiry, so the installs
    // come one by one and each fits the queue.
    lab.start_turn_control(
        Some(&socket),
        &[
            "--agent-queue",
            "1",
            "--threads",
            "1",
            "--default-allocation-lifetime",
            "120",
            "--max-allocation-lifetime",
            "120",
        ],
    )
    .unwrap();
    lab.wait_agent_connected(Site::A).unwrap();
    let runtime = tests::clients::runtime().unwrap();
    let _guard = runtime.enter();
    let mut agent = Agent::connect(&socket).unwrap();

    // One client, one channel to each of CHANNELS peers, each relayed in the
    // kernel.
    let server = SocketAddr::new(IpAddr::V4(Site::A.v4()), 3478);
    let client = runtime
        .block_on(tests::clients::webrtc_client(
            &lab.client,
            IpAddr::V4(CLIENT_V4),
            server,
        ))
        .unwrap();
    let relayed = runtime.block_on(client.allocate()).unwrap();
    let peers: Vec<_> = (0..CHANNELS)
        .map(|_| tests::clients::udp_socket(&lab.peer, IpAddr::V4(PEER_V4)).unwrap())
        .collect();
    for peer in &peers {
        runtime
            .block_on(tests::clients::round_trips(&relayed, peer, 5, T))
            .unwrap();
    }
    wait_for("every channel in the kernel", T, || {
        Ok((agent.list()?.len() == CHANNELS).then_some(()))
    })
    .unwrap();
    let before = agent.counter("relay_client_to_peer_v4_v4").unwrap().0;
    for peer in &peers {
        runtime
            .block_on(tests::clients::round_trips(&relayed, peer, 5, T))
            .unwrap();
    }
    assert!(
        agent.counter("relay_client_to_peer_v4_v4").unwrap().0 >= before + 5 * CHANNELS as u64,
        "relayed in the kernel"
    );
    let forced_before = turn_control_metric(&lab, "turn_agent_syncs_forced_total");

    // The allocation is deleted: its removals come in one burst, most of
    // them do not fit, and a full Sync takes them out.
    runtime
        .block_on(webrtc_util::Conn::close(&relayed))
        .unwrap();
    wait_for("the kernel to converge on turn-control's state", T, || {
        let listed = agent.list()?;
        let body = Lab::scrape(&lab.relay, AGENT_METRICS)?;
        let entries = sample_sum(&body, "xdp_binding_map_entries");
        Ok((listed.is_empty() && entries == 0.0).then_some(()))
    })
    .unwrap();
    // Within T, where the bindings' own lifetimes would have taken minutes.
    assert!(
        turn_control_metric(&lab, "turn_agent_syncs_forced_total") > forced_before,
        "the dropped removals forced a full sync"
    );
    // turn-control publishes its gauges once a second.
    wait_for("turn-control to hold nothing either", T, || {
        Ok((turn_control_metric(&lab, "turn_channel_bindings_active") == 0.0).then_some(()))
    })
    .unwrap();
    let _ = runtime.block_on(client.close());
}
