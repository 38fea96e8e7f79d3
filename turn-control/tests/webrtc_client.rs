//! The webrtc-rs TURN client (a client we did not write) against the real daemon on
//! loopback: allocate, permission, channel, data both ways, refresh; wrong password; denied
//! peer.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Daemon;
use turn::client::Client;
use webrtc_util::Conn as _;

const T: Duration = Duration::from_secs(10);

async fn client(daemon: &Daemon, user: &str, password: &str) -> Client {
    common::turn_client(daemon.listen, user, password).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_permission_channel_data_refresh() {
    let daemon = Daemon::start("127.0.0.1", &["--dev", "--user", "test:testpass"]);
    let client = client(&daemon, "test", "testpass").await;
    let relay = client.allocate().await.expect("allocate");
    let relayed = relay.local_addr().unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");

    // 50 messages each way: a permission, then a channel.
    common::echo(&relay, "client", 50, T).await;
    daemon.wait_metric(
        "turn_requests_total{method=\"create_permission\",code=\"200\"}",
        |v| v >= 1.0,
        T,
    );
    daemon.wait_metric(
        "turn_requests_total{method=\"channel_bind\",code=\"200\"}",
        |v| v >= 1.0,
        T,
    );
    daemon.wait_metric("turn_channel_bindings_active", |v| v == 1.0, T);
    daemon.wait_metric("turn_allocations_active", |v| v == 1.0, T);
    daemon.wait_metric(
        "data_relayed_userspace_packets_total{direction=\"client_to_peer\"}",
        |v| v >= 50.0,
        T,
    );
    daemon.wait_metric(
        "data_relayed_userspace_packets_total{direction=\"peer_to_client\"}",
        |v| v >= 50.0,
        T,
    );
    // Without an agent every channel is relayed in user space at once.
    assert!(daemon.metric("turn_offload_installs_total{result=\"failed\"}") >= 1.0);
    assert_eq!(daemon.metric("turn_agent_connected"), 0.0);

    // Closing the relayed connection sends Refresh with LIFETIME 0 (RFC 8656 §8).
    relay.close().await.unwrap();
    daemon.wait_metric(
        "turn_requests_total{method=\"refresh\",code=\"200\"}",
        |v| v >= 1.0,
        T,
    );
    daemon.wait_metric("turn_allocations_active", |v| v == 0.0, T);
    daemon.wait_metric("turn_relay_sockets_open", |v| v == 0.0, T);
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_gets_401_then_fails() {
    let daemon = Daemon::start("127.0.0.1", &["--dev", "--user", "test:testpass"]);
    let client = client(&daemon, "test", "wrong").await;
    let error = match client.allocate().await {
        Ok(_) => panic!("allocation with a wrong password succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("401") || error.to_lowercase().contains("unauthorized"),
        "{error}"
    );
    // One 401 for the unauthenticated first try, one for the wrong key.
    daemon.wait_metric(
        "turn_requests_total{method=\"allocate\",code=\"401\"}",
        |v| v >= 2.0,
        T,
    );
    daemon.wait_metric("turn_auth_failures_total", |v| v >= 1.0, T);
    assert_eq!(daemon.metric("turn_allocations_active"), 0.0);
    client.close().await.unwrap();
}

async fn denied(daemon: &Daemon, peer: &str) {
    let client = client(daemon, "test", "testpass").await;
    let relay = client.allocate().await.expect("allocate");
    let peer: SocketAddr = peer.parse().unwrap();
    let error = relay
        .send_to(b"x", peer)
        .await
        .expect_err("a denied peer was allowed");
    let error = error.to_string();
    assert!(
        error.contains("403") || error.to_lowercase().contains("forbidden"),
        "{error}"
    );
    daemon.wait_metric(
        "turn_requests_total{method=\"create_permission\",code=\"403\"}",
        |v| v >= 1.0,
        T,
    );
    daemon.wait_metric("turn_peers_denied_total", |v| v >= 1.0, T);
    relay.close().await.unwrap();
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_peer_denied_outside_dev_mode() {
    let daemon = Daemon::start("127.0.0.1", &["--user", "test:testpass"]);
    denied(&daemon, "127.0.0.1:9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_peer_wins_in_dev_mode() {
    let daemon = Daemon::start(
        "127.0.0.1",
        &[
            "--dev",
            "--user",
            "test:testpass",
            "--deny-peer",
            "127.0.0.2/32",
        ],
    );
    denied(&daemon, "127.0.0.2:9").await;
}
