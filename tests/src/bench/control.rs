//! Control-plane figures: allocations per second and memory per allocation
//! (the server's RSS growth), and for the XDP system channel bindings per
//! second end to end, counted when the agent lists them (turn-control pushes
//! a binding to the agent before it answers the ChannelBind).
//!
//! The clients are webrtc-rs `turn` clients in the generator's namespace, 16
//! in flight at a time: on a 2-core machine they share the CPUs with the
//! server, so these are lower bounds of what the server could do.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

use super::{Ns, RELAY};

/// What one control-plane run measured.
#[derive(Debug, Clone, Copy)]
pub struct ControlFigures {
    /// Allocations made.
    pub allocations: usize,
    /// Allocations per second (Allocate with its 401 round trip).
    pub allocations_per_second: f64,
    /// Server RSS growth per allocation, in bytes.
    pub rss_bytes_per_allocation: f64,
    /// Channel bindings per second until the agent listed them all.
    pub bindings_per_second: Option<f64>,
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

const IN_FLIGHT: usize = 16;

/// Makes `count` allocations against the relay from the generator's
/// namespace, then binds one channel on each (to distinct peer ports) and,
/// with an agent, waits until the agent lists `already + count` bindings.
pub fn run(
    ns: &Ns,
    count: usize,
    server_pid: u32,
    agent: Option<(&Path, usize)>,
) -> anyhow::Result<ControlFigures> {
    let (to_main, from_thread) = std::sync::mpsc::channel::<anyhow::Result<Duration>>();
    let (bind_tx, bind_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let path = format!("/run/netns/{}", ns.name());
    let rss_before = rss_bytes(server_pid)?;
    let thread = std::thread::spawn(move || {
        let result = (|| -> anyhow::Result<()> {
            nix::sched::setns(
                std::fs::File::open(&path)?,
                nix::sched::CloneFlags::CLONE_NEWNET,
            )?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let started = Instant::now();
                let semaphore = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..count {
                    let semaphore = semaphore.clone();
                    tasks.spawn(async move {
                        let _permit = semaphore.acquire_owned().await?;
                        let conn = Arc::new(
                            UdpSocket::bind(SocketAddr::from((Ipv4Addr::new(192, 0, 2, 2), 0)))
                                .await?,
                        );
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
                        let relay = client.allocate().await?;
                        anyhow::Ok((client, relay))
                    });
                }
                let mut sessions = Vec::with_capacity(count);
                while let Some(joined) = tasks.join_next().await {
                    match joined.map_err(anyhow::Error::from).and_then(|r| r) {
                        Ok(session) => sessions.push(session),
                        Err(error) => {
                            let _ = to_main.send(Err(error.context("an allocation failed")));
                            return;
                        }
                    }
                }
                let _ = to_main.send(Ok(started.elapsed()));
                if bind_rx.await.is_ok() {
                    for (index, (_, relay)) in sessions.iter().enumerate() {
                        let peer =
                            SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 2), 10000 + index as u16);
                        let _ = relay.send_to(b"bind", SocketAddr::V4(peer)).await;
                    }
                    let _ = stop_rx.await;
                }
                for (client, relay) in sessions {
                    let _ = relay.close().await;
                    let _ = client.close().await;
                }
            });
            Ok(())
        })();
        if let Err(error) = result {
            eprintln!("bench: control-plane client thread: {error:#}");
        }
    });
    let outcome = (|| -> anyhow::Result<ControlFigures> {
        let elapsed = from_thread
            .recv_timeout(Duration::from_secs(120))
            .context("the allocations did not finish")??;
        // Let the server settle before reading its RSS.
        std::thread::sleep(Duration::from_millis(200));
        let rss_after = rss_bytes(server_pid)?;
        let mut figures = ControlFigures {
            allocations: count,
            allocations_per_second: count as f64 / elapsed.as_secs_f64(),
            rss_bytes_per_allocation: (rss_after as f64 - rss_before as f64) / count as f64,
            bindings_per_second: None,
        };
        if let Some((socket, already)) = agent {
            let mut agent = crate::agent::Agent::connect(socket)?;
            let started = Instant::now();
            let _ = bind_tx.send(());
            crate::wait_for(
                "the agent to list every binding",
                Duration::from_secs(60),
                || Ok((agent.list()?.len() >= already + count).then_some(())),
            )?;
            figures.bindings_per_second = Some(count as f64 / started.elapsed().as_secs_f64());
        }
        Ok(figures)
    })();
    let _ = stop_tx.send(());
    let _ = thread.join();
    outcome
}
