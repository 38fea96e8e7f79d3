//! The agent link against a fake xdp-agent (a tonic server on a unix socket): channel
//! installs reach it and are acknowledged, an agent restart brings a full Sync, SIGTERM's
//! drain removes every binding, and the agent's absence never fails a client. A refused
//! Sync is retried, and removals that do not fit in the queue to the agent force a Sync.

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use proto::v1::data_plane_server::{DataPlane, DataPlaneServer};
use proto::v1::*;
use tokio::net::{UdpSocket, UnixListener};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use webrtc_util::Conn as _;

const T: Duration = Duration::from_secs(15);

/// The fake agent: what it was asked, and how it answers.
#[derive(Default, Clone)]
struct Fake {
    /// What it was asked, in order: `add B`, `remove B`, `sync [B, ...]` (accepted),
    /// `refused sync [...]`, `remove waiting`, `config ...`.
    log: Arc<Mutex<Vec<String>>>,
    /// The generation of the last accepted Sync, as Health reports it.
    generation: Arc<Mutex<u64>>,
    /// How many Syncs to refuse (RESOURCE_EXHAUSTED, as from an agent whose maps are full)
    /// before accepting them.
    refuse_syncs: Arc<AtomicU32>,
    /// With a gate, removals wait until it closes: a slow agent, on cue.
    remove_gate: Option<Arc<Semaphore>>,
}

fn show(b: &ChannelBinding) -> String {
    format!(
        "{} {:#06x} {} {} {}",
        b.client, b.channel, b.peer, b.allocation_port, b.listener
    )
}

impl Fake {
    fn log(&self, entry: String) {
        self.log.lock().unwrap().push(entry);
    }

    fn entries(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The bindings it holds after what it was asked (installs, removals and accepted
    /// Syncs, in order), and how many Syncs it accepted.
    fn state(&self) -> (BTreeSet<String>, usize) {
        let mut held = BTreeSet::new();
        let mut syncs = 0;
        for entry in self.entries() {
            if let Some(b) = entry.strip_prefix("add ") {
                held.insert(b.to_owned());
            } else if let Some(b) = entry.strip_prefix("remove ") {
                held.remove(b);
            } else if let Some(list) = entry.strip_prefix("sync [") {
                let list = list.strip_suffix(']').unwrap();
                held = list
                    .split(", ")
                    .filter(|b| !b.is_empty())
                    .map(str::to_owned)
                    .collect();
                syncs += 1;
            }
        }
        (held, syncs)
    }

    /// Waits until `check` holds of [`Fake::state`], and returns that state.
    async fn wait_state(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&BTreeSet<String>, usize) -> bool,
    ) -> (BTreeSet<String>, usize) {
        let deadline = Instant::now() + timeout;
        loop {
            let (held, syncs) = self.state();
            if check(&held, syncs) {
                return (held, syncs);
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}: holds {held:?}; asked {:?}",
                self.entries()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_for(&self, prefix: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            if let Some(e) = self.entries().into_iter().find(|e| e.starts_with(prefix)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "agent never got {prefix}: {:?}",
                self.entries()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Serves on `path` until the returned sender is dropped, then closes its connections
    /// (as a stopping agent process would).
    fn serve(&self, path: &Path) -> tokio::sync::oneshot::Sender<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let service = DataPlaneServer::new(self.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        stop
    }
}

#[tonic::async_trait]
impl DataPlane for Fake {
    async fn install_channel_binding(
        &self,
        request: Request<InstallChannelBindingRequest>,
    ) -> Result<Response<InstallChannelBindingResponse>, Status> {
        let bindings = request.into_inner().bindings;
        for b in &bindings {
            assert!(b.lifetime_ms > 0, "an install has a lifetime: {b:?}");
            self.log(format!("add {}", show(b)));
        }
        Ok(Response::new(InstallChannelBindingResponse {
            installed: bindings.len() as u64,
        }))
    }

    async fn remove_channel_binding(
        &self,
        request: Request<RemoveChannelBindingRequest>,
    ) -> Result<Response<RemoveChannelBindingResponse>, Status> {
        let bindings = request.into_inner().bindings;
        if let Some(gate) = &self.remove_gate {
            self.log("remove waiting".to_owned());
            // Closed: open for good.
            let _ = gate.acquire().await;
        }
        for b in &bindings {
            self.log(format!("remove {}", show(b)));
        }
        Ok(Response::new(RemoveChannelBindingResponse {
            removed: bindings.len() as u64,
            removed_bindings: bindings,
        }))
    }

    type ListUsageStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<ListUsageResponse, Status>> + Send + 'static>,
    >;

    /// No traffic goes through a fake: every binding it holds has counted nothing.
    async fn list_usage(
        &self,
        _: Request<ListUsageRequest>,
    ) -> Result<Response<Self::ListUsageStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::iter(Vec::new()))))
    }

    async fn sync(
        &self,
        request: Request<tonic::Streaming<SyncRequest>>,
    ) -> Result<Response<SyncResponse>, Status> {
        let mut parts = request.into_inner();
        let mut all = Vec::new();
        let mut generation = None;
        while let Some(part) = parts.message().await? {
            assert!(
                generation.is_none_or(|g| g == part.generation),
                "a Sync's parts carry one generation"
            );
            generation = Some(part.generation);
            for b in &part.bindings {
                assert!(b.lifetime_ms > 0, "a synced binding has a lifetime: {b:?}");
            }
            all.extend(part.bindings.iter().map(show));
        }
        let Some(generation) = generation else {
            return Err(Status::invalid_argument("a Sync has at least one part"));
        };
        let refuse = self
            .refuse_syncs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            self.log(format!("refused sync [{}]", all.join(", ")));
            return Err(Status::resource_exhausted("channel map full"));
        }
        self.log(format!("sync [{}]", all.join(", ")));
        *self.generation.lock().unwrap() = generation;
        Ok(Response::new(SyncResponse {
            generation,
            added: 0,
            removed: 0,
            installed: all.len() as u64,
            refused: 0,
            refusals: Vec::new(),
        }))
    }

    async fn list_channel_bindings(
        &self,
        _: Request<ListChannelBindingsRequest>,
    ) -> Result<Response<ListChannelBindingsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_channel_binding(
        &self,
        _: Request<GetChannelBindingRequest>,
    ) -> Result<Response<ChannelBinding>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn set_config(
        &self,
        request: Request<SetConfigRequest>,
    ) -> Result<Response<DataPlaneConfig>, Status> {
        let r = request.into_inner();
        self.log(format!(
            "config {} {}-{} {}",
            r.listeners
                .map(|l| l.addresses.join(","))
                .unwrap_or_default(),
            r.port_min.unwrap_or_default(),
            r.port_max.unwrap_or_default(),
            r.relay_ipv4.clone().unwrap_or_default()
        ));
        Err(Status::unimplemented("fake"))
    }

    async fn get_config(
        &self,
        _: Request<GetConfigRequest>,
    ) -> Result<Response<DataPlaneConfig>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn counters(
        &self,
        _: Request<CountersRequest>,
    ) -> Result<Response<CountersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            generation: *self.generation.lock().unwrap(),
            ..HealthResponse::default()
        }))
    }
}

fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("turn-control-agent-{}.sock", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_sync_on_reconnect_and_removes_on_shutdown() {
    let path = socket_path();
    let fake = Fake::default();
    let server = fake.serve(&path);
    let mut daemon = Daemon::start(
        "127.0.0.1",
        &[
            "--dev",
            "--user",
            "test:testpass",
            "--agent",
            path.to_str().unwrap(),
        ],
    );
    daemon.wait_metric("turn_agent_connected", |v| v == 1.0, T);
    let config = fake.wait_for("config ").await;
    assert!(
        config.starts_with(&format!("config {} ", daemon.listen)),
        "{config}"
    );
    assert!(config.ends_with(" 127.0.0.1"), "{config}");
    assert_eq!(fake.wait_for("sync").await, "sync []");

    // A client binds a channel: the binding reaches the agent before the success.
    let conn = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let client_addr = conn.local_addr().unwrap();
    let client = common::turn_client_on(conn, daemon.listen, "test", "testpass").await;
    let relay = client.allocate().await.unwrap();
    let relayed = relay.local_addr().unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    relay.send_to(b"hi", peer_addr).await.unwrap();
    common::recv(&peer, T).await;
    let add = fake.wait_for("add ").await;
    // The listener is the server address the client sent to.
    let expected_tail = format!("{peer_addr} {} {}", relayed.port(), daemon.listen);
    assert!(add.starts_with(&format!("add {client_addr} 0x4")), "{add}");
    assert!(add.ends_with(&expected_tail), "{add}");
    daemon.wait_metric(
        "turn_offload_installs_total{result=\"installed\"}",
        |v| v == 1.0,
        T,
    );
    let binding = add.strip_prefix("add ").unwrap().to_owned();

    // The agent restarts with empty maps: the link notices (a failed probe, or a Health
    // generation that is not ours after the gRPC channel reconnected by itself) and pushes
    // the full state.
    drop(server);
    let fake2 = Fake::default();
    let _server2 = fake2.serve(&path);
    assert_eq!(fake2.wait_for("sync").await, format!("sync [{binding}]"));
    daemon.wait_metric("turn_agent_connected", |v| v == 1.0, T);

    // Relaying keeps working throughout (user space relays whatever reaches it).
    peer.send_to(b"back", relayed).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(T, relay.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"back");

    // SIGTERM: the drain deletes the allocation and its channel leaves the data plane.
    daemon.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.wait_exit(T);
        (status, daemon)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{}", status.1.log.join("\n"));
    assert_eq!(fake2.wait_for("remove ").await, format!("remove {binding}"));
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_agent_is_a_metric_not_an_error() {
    let path =
        std::env::temp_dir().join(format!("turn-control-no-agent-{}.sock", std::process::id()));
    let daemon = Daemon::start(
        "127.0.0.1",
        &[
            "--dev",
            "--user",
            "test:testpass",
            "--agent",
            path.to_str().unwrap(),
        ],
    );
    let client = common::turn_client(daemon.listen, "test", "testpass").await;
    let relay = client.allocate().await.unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..20 {
        relay
            .send_to(b"hi", peer.local_addr().unwrap())
            .await
            .unwrap();
        common::recv(&peer, T).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    daemon.wait_metric(
        "turn_requests_total{method=\"channel_bind\",code=\"200\"}",
        |v| v >= 1.0,
        T,
    );
    assert_eq!(daemon.metric("turn_agent_connected"), 0.0);
    assert!(daemon.metric("turn_offload_installs_total{result=\"failed\"}") >= 1.0);
    assert_eq!(
        daemon.metric("turn_offload_installs_total{result=\"timed_out\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_after_reconnect_is_the_union_of_every_thread() {
    const CLIENTS: usize = 12;
    const THREADS: usize = 4;
    let path = std::env::temp_dir().join(format!(
        "turn-control-agent-union-{}.sock",
        std::process::id()
    ));
    let fake = Fake::default();
    let server = fake.serve(&path);
    // Relay ports below the ephemeral range: a client's or peer's socket taking one would
    // make the daemon delete that allocation after its success.
    let daemon = Daemon::start_with_ports(
        "127.0.0.1",
        common::quiet_port_range(200),
        &[
            "--dev",
            "--user",
            "test:testpass",
            "--threads",
            &THREADS.to_string(),
            "--agent",
            path.to_str().unwrap(),
        ],
    );
    daemon.wait_metric("turn_agent_connected", |v| v == 1.0, T);
    assert_eq!(fake.wait_for("sync").await, "sync []");

    // Clients on whichever threads the kernel picks, each binding a channel to its own
    // peer (the first send to a peer binds one in the background).
    let listen = daemon.listen;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        tasks.spawn(async move {
            let client = common::turn_client(listen, "test", "testpass").await;
            let relay = client.allocate().await.unwrap();
            let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            relay
                .send_to(b"hi", peer.local_addr().unwrap())
                .await
                .unwrap();
            common::recv(&peer, T).await;
            (client, relay, peer)
        });
    }
    let mut clients = Vec::with_capacity(CLIENTS);
    while let Some(done) = tasks.join_next().await {
        clients.push(done.unwrap());
    }

    // Every binding reaches the agent as an install.
    let deadline = Instant::now() + T;
    let adds: Vec<String> = loop {
        let adds: Vec<String> = fake
            .entries()
            .iter()
            .filter_map(|e| e.strip_prefix("add ").map(str::to_owned))
            .collect();
        if adds.len() >= CLIENTS {
            break adds;
        }
        assert!(
            Instant::now() < deadline,
            "{} installs of {CLIENTS}: {:?}",
            adds.len(),
            fake.entries()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let installed: std::collections::BTreeSet<String> = adds.iter().cloned().collect();
    assert_eq!(installed.len(), CLIENTS, "{adds:?}");
    let expected: std::collections::BTreeSet<String> = clients
        .iter()
        .map(|(_, relay, peer)| {
            format!(
                "{} {} {}",
                peer.local_addr().unwrap(),
                relay.local_addr().unwrap().port(),
                daemon.listen
            )
        })
        .collect();
    let installed_tails: std::collections::BTreeSet<String> = installed
        .iter()
        .map(|b| b.splitn(3, ' ').nth(2).unwrap().to_owned())
        .collect();
    assert_eq!(
        installed_tails, expected,
        "peer, relay port and listener of each client"
    );
    // They come from more than one thread (all 12 on one of 4 has a chance of 4^-11).
    let threads: std::collections::BTreeSet<usize> = clients
        .iter()
        .map(|(_, relay, _)| {
            common::thread_of(&daemon.ports, THREADS, relay.local_addr().unwrap().port()).unwrap()
        })
        .collect();
    assert!(threads.len() > 1, "every allocation on thread {threads:?}");

    // The agent restarts with empty maps: the Sync after the reconnect holds every
    // thread's bindings, each once.
    drop(server);
    let fake2 = Fake::default();
    let _server2 = fake2.serve(&path);
    let sync = fake2.wait_for("sync").await;
    let list = sync
        .strip_prefix("sync [")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap();
    let synced: Vec<String> = list.split(", ").map(str::to_owned).collect();
    assert_eq!(synced.len(), CLIENTS, "{sync}");
    let synced: std::collections::BTreeSet<String> = synced.into_iter().collect();
    assert_eq!(synced, installed, "{sync}");
    daemon.wait_metric("turn_agent_connected", |v| v == 1.0, T);
    for (client, relay, _) in clients {
        relay.close().await.unwrap();
        client.close().await.unwrap();
    }
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sync_is_retried_after_a_backoff() {
    let path = std::env::temp_dir().join(format!(
        "turn-control-agent-refuse-{}.sock",
        std::process::id()
    ));
    let fake = Fake {
        refuse_syncs: Arc::new(AtomicU32::new(1)),
        ..Fake::default()
    };
    let _server = fake.serve(&path);
    let daemon = Daemon::start(
        "127.0.0.1",
        &[
            "--dev",
            "--user",
            "test:testpass",
            "--agent",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(fake.wait_for("refused sync").await, "refused sync []");
    let refused = Instant::now();
    assert_eq!(fake.wait_for("sync").await, "sync []");
    let waited = refused.elapsed();
    eprintln!("the refused Sync was retried after {waited:?}");
    // The first retry waits 1 s (the refusal was seen up to 50 ms late).
    assert!(waited >= Duration::from_millis(800), "{waited:?}");
    daemon.wait_metric("turn_agent_sync_retries_total", |v| v >= 1.0, T);
    assert_eq!(daemon.metric("turn_agent_sync_retries_total"), 1.0);
    assert_eq!(
        daemon.metric("turn_agent_connected"),
        1.0,
        "a refusal is not a lost agent"
    );
    assert!(
        daemon.output().contains("xdp-agent refused the full sync"),
        "{}",
        daemon.output()
    );
    let _ = std::fs::remove_file(&path);
}

/// A daemon with one event-loop thread (every request reaches it through one listener
/// socket, in order) and a queue of one request to a fake agent whose removals wait for
/// the returned gate; connected and synced.
async fn gated_agent(name: &str) -> (Daemon, Fake, Arc<Semaphore>, PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "turn-control-agent-{name}-{}.sock",
        std::process::id()
    ));
    let gate = Arc::new(Semaphore::new(0));
    let fake = Fake {
        remove_gate: Some(Arc::clone(&gate)),
        ..Fake::default()
    };
    // Serves until the test's runtime ends.
    std::mem::forget(fake.serve(&path));
    let daemon = Daemon::start_with_ports(
        "127.0.0.1",
        common::quiet_port_range(200),
        &[
            "--dev",
            "--user",
            "test:testpass",
            "--threads",
            "1",
            "--agent-queue",
            "1",
            "--agent",
            path.to_str().unwrap(),
        ],
    );
    daemon.wait_metric("turn_agent_connected", |v| v == 1.0, T);
    assert_eq!(fake.wait_for("sync").await, "sync []");
    (daemon, fake, gate, path)
}

/// `n` clients, one after another, each with a channel to a peer of its own that the
/// agent installed before the next one starts (the queue holds one request).
async fn bound_one_by_one(
    daemon: &Daemon,
    fake: &Fake,
    n: usize,
) -> Vec<(
    turn::client::Client,
    impl webrtc_util::Conn + use<>,
    UdpSocket,
)> {
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let client = common::turn_client(daemon.listen, "test", "testpass").await;
        let relay = client.allocate().await.unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        relay
            .send_to(b"hi", peer.local_addr().unwrap())
            .await
            .unwrap();
        common::recv(&peer, T).await;
        fake.wait_state("install", T, |held, _| held.len() == i + 1)
            .await;
        clients.push((client, relay, peer));
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removals_that_do_not_fit_the_queue_force_a_full_sync() {
    // Deallocated at once; one more client stays.
    const GONE: usize = 5;
    let (daemon, fake, gate, path) = gated_agent("forced").await;
    let mut clients = bound_one_by_one(&daemon, &fake, GONE + 1).await;
    let (survivor, survivor_relay, survivor_peer) = clients.pop().unwrap();
    let tail = format!(
        "{} {} {}",
        survivor_peer.local_addr().unwrap(),
        survivor_relay.local_addr().unwrap().port(),
        daemon.listen
    );
    let live: BTreeSet<String> = fake
        .state()
        .0
        .into_iter()
        .filter(|b| b.ends_with(&tail))
        .collect();
    assert_eq!(live.len(), 1, "{:?}", fake.entries());

    // The others deallocate (Refresh with lifetime 0) while the agent sits on the first
    // removal: the second fills the queue, the rest are dropped.
    for (_, relay, _) in &clients {
        relay.close().await.unwrap();
    }
    // Behind every Refresh on the thread's one listener socket: once answered, each
    // removal has been queued or dropped.
    survivor.send_binding_request().await.unwrap();
    let dropped = Instant::now();
    fake.wait_for("remove waiting").await;
    let released = Instant::now();
    gate.close();

    // The full Sync after the drops leaves the agent with exactly the live binding.
    let (_, syncs) = fake
        .wait_state("full sync", Duration::from_secs(5), |held, _| *held == live)
        .await;
    eprintln!(
        "agent back in step {:?} after the removals were let through, {:?} after the drops",
        released.elapsed(),
        dropped.elapsed()
    );
    assert!(syncs >= 2, "{:?}", fake.entries());
    let entries = fake.entries();
    let last_sync = entries.iter().rev().find(|e| e.starts_with("sync ["));
    assert_eq!(
        last_sync.cloned(),
        Some(format!("sync [{}]", live.first().unwrap()))
    );
    assert!(daemon.metric("turn_agent_syncs_forced_total") >= 1.0);
    daemon.wait_metric("turn_allocations_active", |v| v == 1.0, T);
    daemon.wait_metric("turn_channel_bindings_active", |v| v == 1.0, T);
    assert_eq!(daemon.metric("turn_agent_connected"), 1.0);
    survivor_relay.close().await.unwrap();
    survivor.close().await.unwrap();
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removals_dropped_by_the_shutdown_drain_end_in_an_empty_sync() {
    const CLIENTS: usize = 4;
    let (mut daemon, fake, gate, path) = gated_agent("drain").await;
    let _clients = bound_one_by_one(&daemon, &fake, CLIENTS).await;

    // SIGTERM: the drain deletes every allocation while the agent sits on the first
    // removal; the second fills the queue, the rest are dropped.
    daemon.signal("TERM");
    fake.wait_for("remove waiting").await;
    gate.close();
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.wait_exit(T);
        (status, daemon)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{}", status.1.log.join("\n"));
    // Once the threads are gone, the link empties the agent with a last Sync.
    let (_, syncs) = fake
        .wait_state("empty agent", T, |held, _| held.is_empty())
        .await;
    assert!(syncs >= 2, "{:?}", fake.entries());
    assert_eq!(fake.entries().last().map(String::as_str), Some("sync []"));
    let _ = std::fs::remove_file(&path);
}
