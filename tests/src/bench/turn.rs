//! The control-plane exchange before a measurement: a real TURN client
//! (webrtc-rs `turn`) in the generator's namespace allocates on the relay,
//! binds a channel to the peer, checks that data crosses both ways, and keeps
//! the allocation alive until dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

use super::{CLIENT, Ns, PEER, RELAY};

/// A listening webrtc-rs TURN client for the relay, as the bench's user, on a socket
/// bound to `local` (the realm is taken from the server's 401). Call from within a tokio
/// runtime in the generator's namespace.
pub async fn client(local: SocketAddr) -> anyhow::Result<Client> {
    let conn = Arc::new(UdpSocket::bind(local).await?);
    let client = Client::new(ClientConfig {
        stun_serv_addr: RELAY.to_string(),
        turn_serv_addr: RELAY.to_string(),
        username: "test".to_owned(),
        password: "testpass".to_owned(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await?;
    client.listen().await?;
    Ok(client)
}

/// The channel webrtc-rs binds first (it counts up from 0x4000).
pub const FIRST_CHANNEL: u16 = 0x4000;

/// An allocation with a bound channel, alive until dropped.
#[derive(Debug)]
pub struct Session {
    /// The allocation's relayed port on the relay.
    pub allocation_port: u16,
    /// The channel bound to the peer.
    pub channel: u16,
    /// How long Allocate took (both round trips, 401 included).
    pub allocate_time: Duration,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Allocates from `CLIENT` on the relay and binds a channel to `PEER`,
/// retrying until `deadline` (the server may still be starting).
pub fn open(ns: &Ns, deadline: Duration) -> anyhow::Result<Session> {
    let start = Instant::now();
    loop {
        match open_once(ns) {
            Ok(session) => return Ok(session),
            Err(error) if start.elapsed() < deadline => {
                eprintln!("bench: TURN exchange failed, retrying: {error:#}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => return Err(error),
        }
    }
}

fn open_once(ns: &Ns) -> anyhow::Result<Session> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<(u16, Duration)>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let path = format!("/run/netns/{}", ns.name());
    let thread = std::thread::spawn(move || {
        let result = (|| -> anyhow::Result<()> {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let exchange = async {
                    let client = client(SocketAddr::V4(CLIENT)).await?;
                    let started = Instant::now();
                    let relay = client.allocate().await?;
                    let allocate_time = started.elapsed();
                    let relayed = relay.local_addr()?;
                    let peer = UdpSocket::bind(SocketAddr::V4(PEER)).await?;
                    let mut buf = [0u8; 256];
                    // The first send triggers CreatePermission and ChannelBind;
                    // the later ones go as channel data once the bind succeeds.
                    for _ in 0..5 {
                        relay.send_to(b"bench", SocketAddr::V4(PEER)).await?;
                        tokio::time::timeout(Duration::from_secs(3), peer.recv_from(&mut buf))
                            .await
                            .context("no data at the peer")??;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    peer.send_to(b"back", relayed).await?;
                    tokio::time::timeout(Duration::from_secs(3), relay.recv_from(&mut buf))
                        .await
                        .context("no data back at the client")??;
                    anyhow::Ok((client, relay, relayed.port(), allocate_time))
                };
                match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                    Ok(Ok((client, relay, port, allocate_time))) => {
                        let _ = ready_tx.send(Ok((port, allocate_time)));
                        let _ = stop_rx.await;
                        let _ = relay.close().await;
                        let _ = client.close().await;
                    }
                    Ok(Err(error)) => {
                        let _ = ready_tx.send(Err(error));
                    }
                    Err(_) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("TURN exchange timed out")));
                    }
                }
                anyhow::Ok(())
            })
        })();
        if let Err(error) = result {
            eprintln!("bench: TURN client thread: {error:#}");
        }
    });
    let received = ready_rx.recv_timeout(Duration::from_secs(15));
    let mut session = Session {
        allocation_port: 0,
        channel: FIRST_CHANNEL,
        allocate_time: Duration::ZERO,
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    match received {
        Ok(Ok((port, allocate_time))) => {
            session.allocation_port = port;
            session.allocate_time = allocate_time;
            Ok(session)
        }
        Ok(Err(error)) => Err(error),
        Err(_) => bail!("the TURN client thread did not answer"),
    }
}
