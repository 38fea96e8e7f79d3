//! A kernel binding never outlives its authorisation: with turn-control
//! killed, the kernel keeps relaying a channel only until the earliest
//! expiry of its channel, permission and allocation, then stops, and the
//! agent empties its maps; a turn-control stopped for good (SIGTERM, the
//! agent kept) takes its bindings out at once.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tests::agent::Agent;
use tests::{
    AGENT_METRICS, CLIENT_V4, Lab, PEER_V4, Site, TURN_CONTROL_METRICS, sample, sample_sum,
    wait_for,
};
use turn::client::Client;

const T: Duration = Duration::from_secs(5);
/// The allocation lifetime turn-control grants here: the earliest expiry of
/// each binding, so the kernel's entries end this long after the last
/// refresh.
const LIFETIME_SECONDS: u64 = 6;

/// The relay counters of both directions, IPv4 to IPv4.
fn relayed_counts(agent: &mut Agent) -> (u64, u64) {
    (
        agent.counter("relay_client_to_peer_v4_v4").unwrap().0,
        agent.counter("relay_peer_to_client_v4_v4").unwrap().0,
    )
}

/// Frames the program passed to the stack for want of a live binding, each
/// direction: unknown (swept) or expired (not swept yet).
fn unbound(agent: &mut Agent) -> (u64, u64) {
    let expired = agent.counter("pass_expired").unwrap().0;
    (
        agent.counter("pass_unknown_binding").unwrap().0 + expired,
        agent.counter("pass_unknown_peer").unwrap().0 + expired,
    )
}

/// A lab with both daemons, turn-control granting allocations of
/// [`LIFETIME_SECONDS`], and a client whose channel to the peer is relayed in
/// the kernel.
struct Relay {
    lab: Lab,
    agent: Agent,
    runtime: tokio::runtime::Runtime,
    client: Client,
    peer: tokio::net::UdpSocket,
}

fn relayed_in_the_kernel() -> (Relay, impl webrtc_util::Conn) {
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&["--xdp-mode", "native", "--metrics", AGENT_METRICS])
        .unwrap();
    let lifetime = LIFETIME_SECONDS.to_string();
    lab.start_turn_control(
        Some(&socket),
        &[
            "--default-allocation-lifetime",
            &lifetime,
            "--max-allocation-lifetime",
            &lifetime,
        ],
    )
    .unwrap();
    wait_for("turn-control to connect to the agent", T * 3, || {
        let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS)?;
        Ok((sample(&body, "turn_agent_connected", "") == Some(1.0)).then_some(()))
    })
    .unwrap();
    let runtime = tests::clients::runtime().unwrap();
    let (client, relayed, peer) = runtime.block_on(async {
        let server = SocketAddr::new(IpAddr::V4(Site::A.v4()), 3478);
        let client = tests::clients::webrtc_client(&lab.client, IpAddr::V4(CLIENT_V4), server)
            .await
            .unwrap();
        let relayed = client.allocate().await.unwrap();
        let peer = tests::clients::udp_socket(&lab.peer, IpAddr::V4(PEER_V4)).unwrap();
        (client, relayed, peer)
    });
    let mut agent = Agent::connect(&socket).unwrap();
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 1, T))
        .unwrap();
    wait_for("the channel in the kernel", T, || {
        Ok((agent.list()?.len() == 1).then_some(()))
    })
    .unwrap();
    let before = relayed_counts(&mut agent);
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 20, T))
        .unwrap();
    let after = relayed_counts(&mut agent);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "relayed in the kernel both ways: {before:?} -> {after:?}"
    );
    let relay = Relay {
        lab,
        agent,
        runtime,
        client,
        peer,
    };
    (relay, relayed)
}

impl Relay {
    /// Sends `count` datagrams each way through `relayed` and waits until
    /// the program has seen them all pass to the stack for want of a
    /// binding; asserts that none was relayed by the kernel and none reached
    /// the peer.
    fn assert_nothing_relayed(&mut self, relayed_conn: &impl webrtc_util::Conn, count: u64) {
        let relayed_before = relayed_counts(&mut self.agent);
        let unbound_before = unbound(&mut self.agent);
        let peer_addr = self.peer.local_addr().unwrap();
        let relayed_addr = relayed_conn.local_addr().unwrap();
        self.runtime.block_on(async {
            for i in 0..count {
                let message = format!("after expiry {i}");
                relayed_conn
                    .send_to(message.as_bytes(), peer_addr)
                    .await
                    .unwrap();
                self.peer
                    .send_to(message.as_bytes(), relayed_addr)
                    .await
                    .unwrap();
            }
        });
        wait_for("the program to pass every datagram", T, || {
            let unbound = unbound(&mut self.agent);
            Ok(
                (unbound.0 >= unbound_before.0 + count && unbound.1 >= unbound_before.1 + count)
                    .then_some(()),
            )
        })
        .unwrap();
        assert_eq!(
            relayed_counts(&mut self.agent),
            relayed_before,
            "the kernel relayed a datagram of a binding past its lifetime"
        );
        let mut buffer = [0u8; 2048];
        assert!(
            self.peer.try_recv_from(&mut buffer).is_err(),
            "the peer got a datagram"
        );
    }

    /// Entries in the four binding maps, as the agent exports them.
    fn map_entries(&self) -> anyhow::Result<f64> {
        let body = Lab::scrape(&self.lab.relay, AGENT_METRICS)?;
        Ok(sample_sum(&body, "xdp_binding_map_entries"))
    }

    fn metric(&self, series: &str) -> f64 {
        let body = Lab::scrape(&self.lab.relay, AGENT_METRICS).unwrap();
        sample(&body, series, "").unwrap_or(0.0)
    }
}

#[test]
fn with_turn_control_killed_the_kernel_relays_until_the_lifetime_ends_and_no_longer() {
    if !tests::privileged() {
        return;
    }
    let (mut relay, relayed_conn) = relayed_in_the_kernel();
    let listed = relay.agent.list().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        listed[0].lifetime_ms > 0 && listed[0].lifetime_ms <= 1000 * LIFETIME_SECONDS as u32,
        "the binding ends with its allocation: {listed:?}"
    );
    let expired_before = relay.metric("xdp_bindings_expired_total");

    relay
        .lab
        .take_process("turn-control")
        .unwrap()
        .stop(Signal::SIGKILL)
        .unwrap();
    // The kernel's entry still holds what turn-control last granted.
    let lifetime_ms = relay.agent.list().unwrap()[0].lifetime_ms;
    let expiry = Instant::now() + Duration::from_millis(u64::from(lifetime_ms));
    let before = relayed_counts(&mut relay.agent);
    relay
        .runtime
        .block_on(tests::clients::round_trips(
            &relayed_conn,
            &relay.peer,
            3,
            T,
        ))
        .unwrap();
    assert_eq!(
        relayed_counts(&mut relay.agent),
        (before.0 + 3, before.1 + 3),
        "until the lifetime ends, the kernel relays without turn-control"
    );

    // Once it has ended: nothing relayed, the maps emptied by the agent.
    wait_for(
        "the agent to delete the expired binding",
        Duration::from_millis(u64::from(lifetime_ms)) + T,
        || Ok(relay.agent.list()?.is_empty().then_some(())),
    )
    .unwrap();
    assert!(
        Instant::now() >= expiry,
        "deleted before its lifetime ended"
    );
    wait_for("all four binding maps to be empty", T, || {
        Ok((relay.map_entries()? == 0.0).then_some(()))
    })
    .unwrap();
    wait_for("the expiry to be counted", T, || {
        Ok((relay.metric("xdp_bindings_expired_total") > expired_before).then_some(()))
    })
    .unwrap();
    relay.assert_nothing_relayed(&relayed_conn, 10);
    let _ = relay.runtime.block_on(relay.client.close());
}

#[test]
fn turn_control_stopped_for_good_takes_its_bindings_out_of_the_kernel_at_once() {
    if !tests::privileged() {
        return;
    }
    let (mut relay, relayed_conn) = relayed_in_the_kernel();
    assert_eq!(relay.agent.list().unwrap().len(), 1);
    let expired_before = relay.metric("xdp_bindings_expired_total");
    let status = relay
        .lab
        .take_process("turn-control")
        .unwrap()
        .stop(Signal::SIGTERM)
        .unwrap();
    assert!(status.success(), "turn-control exited with {status}");
    // Well before the lifetime could end: the stop removed the binding.
    let stopped = Instant::now();
    assert!(
        relay.agent.list().unwrap().is_empty(),
        "a stop removes every binding before the process exits"
    );
    wait_for("all four binding maps to be empty", T, || {
        Ok((relay.map_entries()? == 0.0).then_some(()))
    })
    .unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(LIFETIME_SECONDS));
    relay.assert_nothing_relayed(&relayed_conn, 10);
    assert_eq!(
        relay.metric("xdp_bindings_expired_total"),
        expired_before,
        "removed, not expired"
    );
    let _ = relay.runtime.block_on(relay.client.close());
}
