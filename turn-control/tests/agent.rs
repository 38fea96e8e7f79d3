//! The agent link against a fake xdp-agent (a tonic server on a unix socket): channel
//! installs reach it and are acknowledged, an agent restart brings a full Sync, SIGTERM's
//! drain removes every binding, and the agent's absence never fails a client.

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use proto::v1::data_plane_server::{DataPlane, DataPlaneServer};
use proto::v1::*;
use tokio::net::{UdpSocket, UnixListener};
use tonic::{Request, Response, Status};
use webrtc_util::Conn as _;

const T: Duration = Duration::from_secs(15);

/// What the fake agent was asked, in order, and the generation of the last Sync.
#[derive(Default, Clone)]
struct Fake(Arc<Mutex<Vec<String>>>, Arc<Mutex<u64>>);

fn show(b: &ChannelBinding) -> String {
    format!(
        "{} {:#06x} {} {} {}",
        b.client, b.channel, b.peer, b.allocation_port, b.listener
    )
}

impl Fake {
    fn log(&self, entry: String) {
        self.0.lock().unwrap().push(entry);
    }

    fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
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
        for b in &bindings {
            self.log(format!("remove {}", show(b)));
        }
        Ok(Response::new(RemoveChannelBindingResponse {
            removed: bindings.len() as u64,
        }))
    }

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let request = request.into_inner();
        let all: Vec<String> = request.bindings.iter().map(show).collect();
        self.log(format!("sync [{}]", all.join(", ")));
        *self.1.lock().unwrap() = request.generation;
        Ok(Response::new(SyncResponse {
            generation: request.generation,
            added: 0,
            removed: 0,
            installed: request.bindings.len() as u64,
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
            generation: *self.1.lock().unwrap(),
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
