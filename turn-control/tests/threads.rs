//! One event loop per thread (`--threads N`) against the real binary on loopback, with the
//! webrtc-rs TURN client: the kernel spreads clients over every thread's SO_REUSEPORT socket,
//! each thread relays from its own slice of `--ports`, quotas hold across threads, and data
//! flows both ways whichever thread a client landed on.

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, thread_of};
use tokio::task::JoinSet;
use turn::client::Client;
use webrtc_util::Conn;

const T: Duration = Duration::from_secs(15);

/// The daemon on 127.0.0.1 with relay ports that no other socket takes meanwhile.
fn start(args: &[&str]) -> Daemon {
    Daemon::start_with_ports("127.0.0.1", common::quiet_port_range(200), args)
}

type Relay = Box<dyn Conn + Send + Sync>;

/// `count` clients allocating at once; each one's client and allocation or error text, in
/// no particular order.
async fn allocate_many(
    server: SocketAddr,
    users: &[(&str, &str)],
    count: usize,
) -> Vec<(Client, Result<Relay, String>)> {
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let (user, password) = users[i % users.len()];
        let (user, password) = (user.to_owned(), password.to_owned());
        tasks.spawn(async move {
            let client = common::turn_client(server, &user, &password).await;
            let relay = match client.allocate().await {
                Ok(relay) => Ok(Box::new(relay) as Relay),
                Err(error) => Err(error.to_string()),
            };
            (client, relay)
        });
    }
    let mut out = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        out.push(done.unwrap());
    }
    out
}

async fn close_all(clients: Vec<(Client, Result<Relay, String>)>) {
    for (client, relay) in clients {
        if let Ok(relay) = relay {
            let _ = relay.close().await;
        }
        client.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_spread_over_every_thread() {
    let daemon = start(&["--dev", "--user", "test:testpass", "--threads", "2"]);
    let clients = allocate_many(daemon.listen, &[("test", "testpass")], 32).await;
    let mut per_thread = [0usize; 2];
    let mut relayed_ports = BTreeSet::new();
    for (_, relay) in &clients {
        let relay = relay.as_ref().expect("allocate");
        let relayed = relay.local_addr().unwrap();
        assert_eq!(relayed.ip().to_string(), "127.0.0.1");
        let port = relayed.port();
        assert!(
            daemon.ports.contains(&port),
            "relayed port {port} outside --ports {:?}",
            daemon.ports
        );
        per_thread[thread_of(&daemon.ports, 2, port).unwrap()] += 1;
        assert!(
            relayed_ports.insert(port),
            "relayed port {port} given twice"
        );
    }
    // All 32 on one of the two threads has a chance of 2^-31.
    assert!(
        per_thread.iter().all(|&n| n > 0),
        "32 allocations per thread (by port slice of {:?}): {per_thread:?}",
        daemon.ports
    );
    daemon.wait_metric("turn_allocations_active", |v| v == 32.0, T);
    daemon.wait_metric("turn_relay_sockets_open", |v| v == 32.0, T);
    close_all(clients).await;
    daemon.wait_metric("turn_allocations_active", |v| v == 0.0, T);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_holds_across_threads() {
    let daemon = start(&[
        "--dev",
        "--user",
        "test:testpass",
        "--threads",
        "4",
        "--user-quota",
        "3",
    ]);
    let user = [("test", "testpass")];
    let mut clients = allocate_many(daemon.listen, &user, 12).await;
    let (ok, failed): (Vec<_>, Vec<_>) = clients.iter().partition(|(_, r)| r.is_ok());
    assert_eq!(ok.len(), 3, "successes with --user-quota 3 over 4 threads");
    assert_eq!(failed.len(), 9);
    for (_, error) in &failed {
        let error = error.as_ref().err().unwrap();
        assert!(error.contains("486"), "{error}");
    }
    daemon.wait_metric(
        "turn_requests_total{method=\"allocate\",code=\"486\"}",
        |v| v == 9.0,
        T,
    );
    daemon.wait_metric("turn_allocations_active", |v| v == 3.0, T);

    // Deleting one allocation (Refresh with LIFETIME 0) gives its quota back, whichever
    // thread the next client lands on; one more is again too many.
    let index = clients.iter().position(|(_, r)| r.is_ok()).unwrap();
    let (client, relay) = clients.swap_remove(index);
    relay.unwrap().close().await.unwrap();
    client.close().await.unwrap();
    daemon.wait_metric("turn_allocations_active", |v| v == 2.0, T);
    let again = allocate_many(daemon.listen, &user, 1).await;
    assert!(again[0].1.is_ok(), "{:?}", again[0].1.as_ref().err());
    let over = allocate_many(daemon.listen, &user, 1).await;
    let error = over[0]
        .1
        .as_ref()
        .err()
        .expect("a 4th allocation succeeded");
    assert!(error.contains("486"), "{error}");
    daemon.wait_metric(
        "turn_requests_total{method=\"allocate\",code=\"486\"}",
        |v| v == 10.0,
        T,
    );
    daemon.wait_metric("turn_allocations_active", |v| v == 3.0, T);
    close_all(clients).await;
    close_all(again).await;
    close_all(over).await;
    daemon.wait_metric("turn_allocations_active", |v| v == 0.0, T);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn total_quota_holds_across_threads() {
    let daemon = start(&[
        "--dev",
        "--user",
        "alice:pw1",
        "--user",
        "bob:pw2",
        "--threads",
        "4",
        "--total-quota",
        "5",
    ]);
    let users = [("alice", "pw1"), ("bob", "pw2")];
    let clients = allocate_many(daemon.listen, &users, 12).await;
    let (ok, failed): (Vec<_>, Vec<_>) = clients.iter().partition(|(_, r)| r.is_ok());
    assert_eq!(ok.len(), 5, "successes with --total-quota 5 over 4 threads");
    for (_, error) in &failed {
        let error = error.as_ref().err().unwrap();
        assert!(error.contains("486"), "{error}");
    }
    daemon.wait_metric(
        "turn_requests_total{method=\"allocate\",code=\"486\"}",
        |v| v == 7.0,
        T,
    );
    daemon.wait_metric("turn_allocations_active", |v| v == 5.0, T);
    close_all(clients).await;
    daemon.wait_metric("turn_allocations_active", |v| v == 0.0, T);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_flows_on_every_thread() {
    const CLIENTS: usize = 16;
    const ROUNDS: u32 = 20;
    let daemon = start(&["--dev", "--user", "test:testpass", "--threads", "2"]);
    let mut per_thread = [0usize; 2];
    let mut relays = Vec::new();
    let mut keep = Vec::new();
    let mut batch = CLIENTS;
    // 16 clients all on one thread has a chance of 2^-15; then more join until both have
    // one.
    loop {
        for (client, relay) in allocate_many(daemon.listen, &[("test", "testpass")], batch).await {
            let relay = Arc::new(relay.expect("allocate"));
            let port = relay.local_addr().unwrap().port();
            per_thread[thread_of(&daemon.ports, 2, port).unwrap()] += 1;
            relays.push(relay);
            keep.push(client);
        }
        if !per_thread.contains(&0) || relays.len() >= 4 * CLIENTS {
            break;
        }
        batch = 1;
    }
    assert!(!per_thread.contains(&0), "{per_thread:?}");
    let clients = relays.len() as f64;
    let mut tasks = JoinSet::new();
    for (index, relay) in relays.iter().enumerate() {
        let relay = Arc::clone(relay);
        tasks.spawn(
            async move { common::echo(&**relay, &format!("client {index}"), ROUNDS, T).await },
        );
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    daemon.wait_metric("turn_channel_bindings_active", |v| v == clients, T);
    daemon.wait_metric(
        "turn_requests_total{method=\"channel_bind\",code=\"200\"}",
        |v| v >= clients,
        T,
    );
    let total = f64::from(ROUNDS) * clients;
    daemon.wait_metric(
        "data_relayed_userspace_packets_total{direction=\"client_to_peer\"}",
        |v| v >= total,
        T,
    );
    daemon.wait_metric(
        "data_relayed_userspace_packets_total{direction=\"peer_to_client\"}",
        |v| v >= total,
        T,
    );
    for relay in relays {
        relay.close().await.unwrap();
    }
    for client in keep {
        client.close().await.unwrap();
    }
    daemon.wait_metric("turn_allocations_active", |v| v == 0.0, T);
}
