//! Control-plane figures: allocations per second and memory per allocation (the server's
//! RSS growth) with webrtc-rs `turn` clients, 16 in flight; channel bindings per second with
//! the pipelined raw client of [`super::raw`] (K allocations, a window of ChannelBind
//! requests in flight on each); and, for the XDP system, the time from a ChannelBind request
//! to the first packet relayed by XDP.
//!
//! Every client runs in the generator's namespace: on a 2-core machine it shares the CPUs
//! with the server, so these are lower bounds of what the server could do.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use webrtc_util::Conn;

use super::raw::{self, BindFigures, OffloadLatency};
use super::{Ns, PEER, RELAY};

/// What one control-plane run measured.
#[derive(Debug, Clone)]
pub struct ControlFigures {
    /// Allocations made.
    pub allocations: usize,
    /// Allocations per second (Allocate with its 401 round trip).
    pub allocations_per_second: f64,
    /// Server RSS growth per allocation, in bytes.
    pub rss_bytes_per_allocation: f64,
    /// The raw client's channel bindings (successes per second).
    pub bindings: Result<BindFigures, String>,
    /// With an agent: how many of those bindings it listed afterwards (all, or the run
    /// fails).
    pub agent_listed: Option<usize>,
    /// With an agent: ChannelBind request -> first packet relayed by XDP.
    pub first_offload: Option<Result<OffloadLatency, String>>,
}

/// The shape of the raw client's runs.
#[derive(Debug, Clone, Copy)]
pub struct RawOptions {
    /// Allocations, each from its own source port.
    pub allocations: usize,
    /// Channels bound on each.
    pub channels: u16,
    /// ChannelBind requests in flight per allocation.
    pub window: usize,
    /// First peer port (channel i goes to PEER's address, this port + i).
    pub first_peer_port: u16,
    /// Samples of the first-offload latency (with an agent).
    pub samples: usize,
    /// Interval of the channel data sent while a sample waits for XDP.
    pub interval: Duration,
}

impl RawOptions {
    /// The bench's shape: 32 allocations of 512 channels (64 when `quick`), 16 in flight
    /// each (512 in all), peer ports from 10000 (clear of the sink's 9000 and the client's
    /// 40000), 200 latency samples (30) with data every 20 us. coturn 4.6 stops answering
    /// ChannelBind on an allocation after about 1,000 channels, hence many allocations of a
    /// few hundred channels. BENCH_BIND_ALLOCATIONS, BENCH_BIND_CHANNELS and
    /// BENCH_BIND_WINDOW override the shape.
    pub fn bench(quick: bool) -> Self {
        let env = |name: &str, default: usize| -> usize {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Self {
            allocations: env("BENCH_BIND_ALLOCATIONS", 32),
            channels: env("BENCH_BIND_CHANNELS", if quick { 64 } else { 512 }) as u16,
            window: env("BENCH_BIND_WINDOW", 16),
            first_peer_port: 10000,
            samples: if quick { 30 } else { 200 },
            interval: Duration::from_micros(20),
        }
    }
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

/// Makes `count` allocations against the relay from the generator's namespace with
/// webrtc-rs clients (allocations per second, RSS per allocation); then binds channels with
/// the raw client and, with an agent (its socket and the bindings it already holds), checks
/// that the agent lists every one of them and measures the first offload, with the
/// processes `boost` (the server and the agent) and the measuring thread at nice -10.
pub fn run(
    ns: &Ns,
    count: usize,
    server_pid: u32,
    agent: Option<(&Path, usize)>,
    options: RawOptions,
    boost: Vec<u32>,
) -> anyhow::Result<ControlFigures> {
    let (to_main, from_thread) = std::sync::mpsc::channel::<anyhow::Result<Duration>>();
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
                        let client =
                            super::turn::client(SocketAddr::from((Ipv4Addr::new(192, 0, 2, 2), 0)))
                                .await?;
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
                let _ = stop_rx.await;
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
        Ok(ControlFigures {
            allocations: count,
            allocations_per_second: count as f64 / elapsed.as_secs_f64(),
            rss_bytes_per_allocation: (rss_after as f64 - rss_before as f64) / count as f64,
            bindings: Err("not run".to_owned()),
            agent_listed: None,
            first_offload: None,
        })
    })();
    // The webrtc-rs clients end (and delete their allocations) before the raw client runs.
    let _ = stop_tx.send(());
    let _ = thread.join();
    let mut figures = outcome?;
    match raw_figures(ns, agent, options, boost) {
        Ok((bindings, listed, first)) => {
            figures.bindings = Ok(bindings);
            figures.agent_listed = listed;
            figures.first_offload = first.map(|r| r.map_err(|e| format!("{e:#}")));
        }
        Err(error) => figures.bindings = Err(format!("{error:#}")),
    }
    Ok(figures)
}

type RawOutcome = (
    BindFigures,
    Option<usize>,
    Option<anyhow::Result<OffloadLatency>>,
);

fn raw_figures(
    ns: &Ns,
    agent: Option<(&Path, usize)>,
    options: RawOptions,
    boost: Vec<u32>,
) -> anyhow::Result<RawOutcome> {
    let mut allocs = raw::allocate(
        Some(ns),
        Ipv4Addr::new(192, 0, 2, 2),
        SocketAddr::V4(RELAY),
        options.allocations,
    )?;
    let bindings = raw::bind_channels(
        &mut allocs,
        *PEER.ip(),
        options.first_peer_port,
        options.channels,
        options.window,
        Duration::from_millis(250),
        Duration::from_secs(120),
    )?;
    let Some((socket, already)) = agent else {
        return Ok((bindings, None, None));
    };
    // turn-control answered each ChannelBind after the agent acknowledged it: the agent
    // lists them all now.
    let mut agent = crate::agent::Agent::connect(socket)?;
    let expected: BTreeSet<(String, u32)> = allocs
        .iter()
        .flat_map(|a| (0..u32::from(options.channels)).map(|i| (a.local.to_string(), 0x4000 + i)))
        .collect();
    let listed = crate::wait_for(
        "the agent to list every binding",
        Duration::from_secs(10),
        || {
            let list = agent.list()?;
            let found = list
                .iter()
                .filter(|b| expected.contains(&(b.client.clone(), b.channel)))
                .count();
            Ok(
                (found == expected.len() && list.len() >= already + expected.len())
                    .then_some(found),
            )
        },
    )?;
    let _boost = raw::Boost::new(&boost, -10);
    let first = raw::first_offload(
        ns,
        allocs.first_mut().context("no allocation")?,
        *PEER.ip(),
        options.first_peer_port + options.channels,
        options.channels,
        options.samples,
        options.interval,
    );
    Ok((bindings, Some(listed), Some(first)))
}
