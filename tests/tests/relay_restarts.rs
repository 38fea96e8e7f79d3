//! Restarts of either daemon under traffic, and expiry: afterwards the
//! agent's bindings equal turn-control's, nothing stale remains, and channel
//! data is relayed in the kernel again.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use tests::agent::Agent;
use tests::records;
use tests::{CLIENT_V4, Lab, PEER_V4, Site, TURN_CONTROL_METRICS, sample, wait_for};
use turn::client::Client;

const T: Duration = Duration::from_secs(5);

async fn client(lab: &Lab) -> Client {
    let server = SocketAddr::new(IpAddr::V4(Site::A.v4()), 3478);
    tests::clients::webrtc_client(&lab.client, IpAddr::V4(CLIENT_V4), server)
        .await
        .unwrap()
}

fn turn_control_bindings(lab: &Lab) -> f64 {
    let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS).unwrap();
    sample(&body, "turn_channel_bindings_active", "").unwrap_or(-1.0)
}

/// A lab whose turn-control is connected to its agent, and the agent's socket; with
/// `accounting`, turn-control writes its records to [`records_file`].
fn connected_lab(accounting: bool) -> (Lab, PathBuf) {
    let mut lab = Lab::new().unwrap();
    let socket = lab.start_xdp_agent(&["--xdp-mode", "native"]).unwrap();
    let file = records_file(&lab);
    let args: &[&str] = if accounting {
        &["--accounting-file", file.to_str().unwrap()]
    } else {
        &[]
    };
    lab.start_turn_control(Some(&socket), args).unwrap();
    lab.wait_agent_connected(Site::A).unwrap();
    (lab, socket)
}

/// Where turn-control writes its accounting records, in the lab's directory.
fn records_file(lab: &Lab) -> PathBuf {
    lab.dir().join("records.jsonl")
}

fn connected(lab: &Lab) -> anyhow::Result<Option<()>> {
    agent_link(lab, 1.0)
}

/// Some(()) once turn-control reports its agent link as `state` (1 up, 0 down).
fn agent_link(lab: &Lab, state: f64) -> anyhow::Result<Option<()>> {
    let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS)?;
    Ok((sample(&body, "turn_agent_connected", "") == Some(state)).then_some(()))
}

#[test]
fn either_daemon_restarts_and_the_kernel_path_recovers_without_stale_bindings() {
    if !tests::privileged() {
        return;
    }
    let (mut lab, socket) = connected_lab(false);
    let runtime = tests::clients::runtime().unwrap();
    let _guard = runtime.enter();
    let peer = tests::clients::udp_socket(&lab.peer, IpAddr::V4(PEER_V4)).unwrap();

    // A client with a channel to the peer, relayed in the kernel.
    let first = runtime.block_on(client(&lab));
    let relayed = runtime.block_on(first.allocate()).unwrap();
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 20, T))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    wait_for("the binding in both daemons", T, || {
        Ok((agent.list()?.len() == 1 && turn_control_bindings(&lab) == 1.0).then_some(()))
    })
    .unwrap();
    drop(agent);

    // The agent is killed and started again: turn-control re-syncs, the
    // bindings match and traffic stays in the kernel.
    lab.take_process("xdp-agent")
        .unwrap()
        .stop(Signal::SIGKILL)
        .unwrap();
    let socket = lab.start_xdp_agent(&["--xdp-mode", "native"]).unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    let before = agent.counter("relay_client_to_peer_v4_v4").unwrap().0;
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 20, T))
        .unwrap();
    assert_eq!(
        agent.counter("relay_client_to_peer_v4_v4").unwrap().0,
        before + 20,
        "offloaded after the agent restart"
    );
    assert_eq!(agent.list().unwrap().len(), 1);

    // turn-control is killed and started again: its allocations are gone, so
    // its Sync removes every binding from the kernel; nothing stale remains.
    lab.take_process("turn-control")
        .unwrap()
        .stop(Signal::SIGKILL)
        .unwrap();
    lab.start_turn_control(Some(&socket), &[]).unwrap();
    wait_for("turn-control to reconnect", Duration::from_secs(15), || {
        connected(&lab)
    })
    .unwrap();
    wait_for("the stale binding to go", T, || {
        Ok(agent.list()?.is_empty().then_some(()))
    })
    .unwrap();
    wait_for("turn-control to report no channels", T, || {
        Ok((turn_control_bindings(&lab) == 0.0).then_some(()))
    })
    .unwrap();

    // A new client is offloaded at once.
    let second = runtime.block_on(client(&lab));
    let relayed_again = runtime.block_on(second.allocate()).unwrap();
    let before = agent.counter("relay_client_to_peer_v4_v4").unwrap().0;
    runtime
        .block_on(tests::clients::round_trips(&relayed_again, &peer, 20, T))
        .unwrap();
    assert!(
        agent.counter("relay_client_to_peer_v4_v4").unwrap().0 > before,
        "offloaded after the turn-control restart"
    );
    assert_eq!(agent.list().unwrap().len(), 1);

    // Deallocation (Refresh with lifetime 0) removes the kernel's entries.
    runtime
        .block_on(webrtc_util::Conn::close(&relayed_again))
        .unwrap();
    wait_for("the deallocated binding to go", T, || {
        Ok(agent.list()?.is_empty().then_some(()))
    })
    .unwrap();
    let _ = runtime.block_on(first.close());
}

/// A call set up while the agent is down is relayed in user space; once the agent is back,
/// its channel moves to the kernel without any help from the client, which keeps
/// refreshing the channel as it would for the rest of the call.
#[test]
fn a_channel_bound_while_the_agent_is_down_moves_to_the_kernel_when_it_is_back() {
    if !tests::privileged() {
        return;
    }
    let (mut lab, _) = connected_lab(true);
    lab.take_process("xdp-agent")
        .unwrap()
        .stop(Signal::SIGKILL)
        .unwrap();
    wait_for(
        "turn-control to see the agent gone",
        Duration::from_secs(15),
        || agent_link(&lab, 0.0),
    )
    .unwrap();

    let runtime = tests::clients::runtime().unwrap();
    let _guard = runtime.enter();
    let peer = tests::clients::udp_socket(&lab.peer, IpAddr::V4(PEER_V4)).unwrap();
    let client = runtime.block_on(client(&lab));
    let relayed = runtime.block_on(client.allocate()).unwrap();
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 20, T))
        .unwrap();
    wait_for("turn-control to report the channel", T, || {
        Ok((turn_control_bindings(&lab) == 1.0).then_some(()))
    })
    .unwrap();

    let socket = lab.start_xdp_agent(&["--xdp-mode", "native"]).unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    let listed = wait_for("the channel in the kernel", Duration::from_secs(15), || {
        Ok(Some(agent.list()?).filter(|listed| listed.len() == 1))
    })
    .unwrap();
    let binding = proto::Binding::try_from(&listed[0]).unwrap();
    assert_eq!(
        (binding.client.ip(), binding.peer),
        (IpAddr::V4(CLIENT_V4), peer.local_addr().unwrap()),
        "the kernel's binding: {binding:?}"
    );
    let before = agent.counter("relay_client_to_peer_v4_v4").unwrap().0;
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 20, T))
        .unwrap();
    assert_eq!(
        agent.counter("relay_client_to_peer_v4_v4").unwrap().0,
        before + 20,
        "relayed in the kernel"
    );

    // Deallocated: the stop record has both paths' figures, and the kernel's are final
    // (the install refused while the agent was away left nothing there to wait for).
    let relayed_addr = webrtc_util::Conn::local_addr(&relayed).unwrap();
    runtime
        .block_on(webrtc_util::Conn::close(&relayed))
        .unwrap();
    let client_addr = SocketAddr::new(IpAddr::V4(CLIENT_V4), binding.client.port());
    // A stop waits up to 5 s for the kernel's final figures.
    let stop = wait_for("the stop record", T * 3, || {
        let written = records::read(&records_file(&lab))?;
        Ok(records::of_allocation(&written, client_addr, relayed_addr)
            .into_iter()
            .find(|record| record.record == "stop"))
    })
    .unwrap();
    assert_eq!(stop.kernel_final, Some(true), "{stop:?}");
    assert!(
        stop.kernel_client_to_peer.packets >= 20 && stop.client_to_peer.packets >= 40,
        "20 round trips in user space, then 20 in the kernel: {stop:?}"
    );
    let _ = runtime.block_on(client.close());
}
