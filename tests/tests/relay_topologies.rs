//! Topologies beyond one client and one peer, with the webrtc-rs TURN client
//! (a client we did not write) and both daemons on each relay: a client on
//! relay A talking to a client on relay B through both relays, and two
//! allocations on one relay talking through the hairpin. Channel data must
//! cross every relay in the kernel.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: failures should panic"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tests::agent::Agent;
use tests::{CLIENT_V4, Lab, Netns, PEER_V4, Site};
use turn::client::Client;

const T: Duration = Duration::from_secs(5);

/// A TURN client whose socket lives in `netns`, for the relay at `site`.
async fn client(netns: &Netns, local: IpAddr, site: Site) -> Client {
    let server = SocketAddr::new(IpAddr::V4(site.v4()), 3478);
    tests::clients::webrtc_client(netns, local, server)
        .await
        .unwrap()
}

/// Starts an agent and a turn-control connected to it at `site`, and waits
/// for the link; returns the agent's socket.
fn start_relay(lab: &mut Lab, site: Site, allow: &str) -> std::path::PathBuf {
    let socket = lab
        .start_xdp_agent_at(site, &["--xdp-mode", "native", "--allow-peer", allow])
        .unwrap();
    lab.start_turn_control_at(site, Some(&socket), &["--allow-peer", allow])
        .unwrap();
    lab.wait_agent_connected(site).unwrap();
    socket
}

/// Sends `count` messages each way between two relayed connections whose
/// peers are each other; the first exchange is retried while permissions
/// and channels settle, the rest must arrive.
async fn exchange(
    a: &Arc<dyn webrtc_util::Conn + Send + Sync>,
    b: &Arc<dyn webrtc_util::Conn + Send + Sync>,
    count: usize,
) {
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let mut buffer = vec![0u8; 2048];
    // Each side permits the other; then settle until a message gets through.
    let settled = async {
        loop {
            b.send_to(b"hello a", a_addr).await.unwrap();
            a.send_to(b"hello b", b_addr).await.unwrap();
            if let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_millis(200), b.recv_from(&mut buffer)).await
                && &buffer[..n] == b"hello b"
            {
                assert_eq!(from, a_addr);
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), settled)
        .await
        .expect("the relays never connected");
    // Drain what else settling left behind.
    while tokio::time::timeout(Duration::from_millis(100), a.recv_from(&mut buffer))
        .await
        .is_ok()
    {}
    while tokio::time::timeout(Duration::from_millis(100), b.recv_from(&mut buffer))
        .await
        .is_ok()
    {}
    for i in 0..count {
        let message = format!("a to b {i}");
        a.send_to(message.as_bytes(), b_addr).await.unwrap();
        let (n, from) = tokio::time::timeout(T, b.recv_from(&mut buffer))
            .await
            .expect("b got nothing")
            .unwrap();
        assert_eq!(&buffer[..n], message.as_bytes());
        assert_eq!(from, a_addr);
        let reply = format!("b to a {i}");
        b.send_to(reply.as_bytes(), a_addr).await.unwrap();
        let (n, from) = tokio::time::timeout(T, a.recv_from(&mut buffer))
            .await
            .expect("a got nothing")
            .unwrap();
        assert_eq!(&buffer[..n], reply.as_bytes());
        assert_eq!(from, b_addr);
    }
}

#[test]
fn clients_on_two_relays_talk_through_both_kernels() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.add_second_relay().unwrap();
    let socket_a = start_relay(&mut lab, Site::A, "198.18.0.0/24");
    let socket_b = start_relay(&mut lab, Site::B, "203.0.113.0/24");
    let runtime = tests::clients::runtime().unwrap();
    runtime.block_on(async {
        let client_a = client(&lab.client, IpAddr::V4(CLIENT_V4), Site::A).await;
        let client_b = client(&lab.peer, IpAddr::V4(PEER_V4), Site::B).await;
        let relayed_a: Arc<dyn webrtc_util::Conn + Send + Sync> =
            Arc::new(client_a.allocate().await.unwrap());
        let relayed_b: Arc<dyn webrtc_util::Conn + Send + Sync> =
            Arc::new(client_b.allocate().await.unwrap());
        assert_eq!(
            relayed_a.local_addr().unwrap().ip(),
            IpAddr::V4(Site::A.v4())
        );
        assert_eq!(
            relayed_b.local_addr().unwrap().ip(),
            IpAddr::V4(Site::B.v4())
        );
        exchange(&relayed_a, &relayed_b, 50).await;
        client_a.close().await.unwrap();
        client_b.close().await.unwrap();
    });
    for socket in [socket_a, socket_b] {
        let mut agent = Agent::connect(&socket).unwrap();
        let (to_peer, _) = agent.counter("relay_client_to_peer_v4_v4").unwrap();
        let (to_client, _) = agent.counter("relay_peer_to_client_v4_v4").unwrap();
        assert!(
            to_peer >= 50 && to_client >= 50,
            "{}: {to_peer} out, {to_client} in",
            socket.display()
        );
    }
}

#[test]
fn two_allocations_on_one_relay_talk_through_the_kernel_hairpin() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    // The operator opens the relay's own address to its clients: the hairpin.
    let socket = start_relay(&mut lab, Site::A, "203.0.113.10/32");
    let runtime = tests::clients::runtime().unwrap();
    runtime.block_on(async {
        let first = client(&lab.client, IpAddr::V4(CLIENT_V4), Site::A).await;
        let second = client(&lab.peer, IpAddr::V4(PEER_V4), Site::A).await;
        let relayed_first: Arc<dyn webrtc_util::Conn + Send + Sync> =
            Arc::new(first.allocate().await.unwrap());
        let relayed_second: Arc<dyn webrtc_util::Conn + Send + Sync> =
            Arc::new(second.allocate().await.unwrap());
        exchange(&relayed_first, &relayed_second, 50).await;
        first.close().await.unwrap();
        second.close().await.unwrap();
    });
    let mut agent = Agent::connect(&socket).unwrap();
    let (hairpin, _) = agent.counter("relay_hairpin_v4_v4").unwrap();
    assert!(
        hairpin >= 100,
        "only {hairpin} messages crossed the hairpin in the kernel"
    );
}
