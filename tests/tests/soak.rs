//! Soak: allocations and channel bindings created, refreshed and deleted at a high rate with
//! channel data flowing through the lab (turn-control + xdp-agent, relayed by XDP), for
//! `SOAK_SECONDS` (default 60; `make soak` runs 600).
//!
//! Checked: every request of the churn succeeds; at the end, with each worker holding one
//! allocation and its channels, the agent's maps (ListChannelBindings) hold exactly the
//! bindings turn-control reports (`turn_channel_bindings_active`) and the workers made;
//! after the workers delete them, both are zero: no binding leaked. Both daemons' VmRSS is
//! sampled (start, peak, end reported) and must not grow in the second half of the run.

#![expect(clippy::unwrap_used, reason = "test code: a failure is a test failure")]

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tests::agent::Agent;
use tests::stun::attr::{CHANNEL_NUMBER, LIFETIME, REQUESTED_TRANSPORT, XOR_PEER_ADDRESS};
use tests::stun::class::SUCCESS;
use tests::stun::method::{ALLOCATE, CHANNEL_BIND, REFRESH};
use tests::stun::{self, Msg};
use tests::{CLIENT_V4, Lab, Netns, PEER_V4, RELAY_V4, TURN_CONTROL_METRICS, vm_rss_kib, wait_for};

const WORKERS: usize = 4;
const CHANNELS: u16 = 2;
const PACKETS: usize = 8;
const PEER_PORT: u16 = 9000;
const REALM: &str = "lab.example";
const USER: &str = "test";
const PASSWORD: &str = "testpass";

#[derive(Debug, Default)]
struct Counters {
    cycles: AtomicU64,
    requests: AtomicU64,
    sent: AtomicU64,
    echoed: AtomicU64,
}

#[test]
fn churn_keeps_agent_and_control_in_step() {
    if !tests::privileged() {
        return;
    }
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut lab = Lab::new().unwrap();
    let socket = lab.start_xdp_agent(&["--xdp-mode", "native"]).unwrap();
    lab.start_turn_control(Some(&socket), &[]).unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    let control_pid = pid_in(&lab.relay, "turn-control");
    let agent_pid = pid_in(&lab.relay, "xdp-agent");

    let stop = Arc::new(AtomicBool::new(false));
    let echo = start_echo(&lab.peer, stop.clone());
    let counters = Arc::new(Counters::default());
    let rss_start = (
        vm_rss_kib(control_pid).unwrap(),
        vm_rss_kib(agent_pid).unwrap(),
    );

    // Workers churn until the deadline, then each keeps its last allocation until the
    // state has been compared (first barrier), then deletes it (second barrier).
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let hold = Arc::new(Barrier::new(WORKERS + 1));
    let release = Arc::new(Barrier::new(WORKERS + 1));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let counters = counters.clone();
            let (hold, release) = (hold.clone(), release.clone());
            let client_ns = lab.client.name().to_owned();
            std::thread::spawn(move || {
                let mut cycle = 0u64;
                loop {
                    let socket = bind_in(&client_ns, SocketAddr::new(CLIENT_V4.into(), 0));
                    let mut c = Client::new(socket, SocketAddr::new(RELAY_V4.into(), 3478));
                    let bindings = c.churn(w, cycle, &counters);
                    cycle += 1;
                    counters.cycles.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() >= deadline {
                        hold.wait();
                        release.wait();
                        c.delete(&counters);
                        return bindings;
                    }
                    c.delete(&counters);
                }
            })
        })
        .collect();

    // Sample memory while the churn runs.
    let mut peak = rss_start;
    let mut mid = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500).min(deadline - Instant::now()));
        let now = (
            vm_rss_kib(control_pid).unwrap(),
            vm_rss_kib(agent_pid).unwrap(),
        );
        peak = (peak.0.max(now.0), peak.1.max(now.1));
        if mid.is_none() && deadline - Instant::now() < Duration::from_secs(seconds / 2) {
            mid = Some(now);
        }
    }
    hold.wait();
    // Compare the agent's maps with turn-control's state while the last allocations live.
    let expected = WORKERS * usize::from(CHANNELS);
    let body = wait_for(
        "channel bindings to settle",
        Duration::from_secs(10),
        || {
            let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS)?;
            let active = tests::sample(&body, "turn_channel_bindings_active", "").unwrap_or(-1.0);
            let listed = agent.list()?.len();
            Ok((active == expected as f64 && listed == expected).then_some(body))
        },
    )
    .unwrap();
    let in_agent: BTreeSet<(String, u32)> = agent
        .list()
        .unwrap()
        .into_iter()
        .map(|b| (b.client, b.channel))
        .collect();
    assert_eq!(in_agent.len(), expected, "{in_agent:?}");
    assert_eq!(
        tests::sample(&body, "turn_allocations_active", ""),
        Some(WORKERS as f64)
    );
    release.wait();
    let mut made = BTreeSet::new();
    for worker in workers {
        made.extend(worker.join().expect("worker panicked"));
    }
    assert_eq!(
        in_agent, made,
        "the agent holds other bindings than the clients made"
    );

    // Everything deleted: nothing left on either side.
    wait_for("all state gone", Duration::from_secs(10), || {
        let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS)?;
        let active = tests::sample(&body, "turn_channel_bindings_active", "").unwrap_or(-1.0);
        let allocations = tests::sample(&body, "turn_allocations_active", "").unwrap_or(-1.0);
        let listed = agent.list()?.len();
        Ok((active == 0.0 && allocations == 0.0 && listed == 0).then_some(()))
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();

    let end = (
        vm_rss_kib(control_pid).unwrap(),
        vm_rss_kib(agent_pid).unwrap(),
    );
    let mid = mid.unwrap_or(rss_start);
    let c = &counters;
    eprintln!(
        "soak: {seconds} s, {} allocations churned ({} requests), {} channel data sent, {} echoed \
         through XDP; VmRSS KiB turn-control start/mid/peak/end {}/{}/{}/{}, xdp-agent {}/{}/{}/{}",
        c.cycles.load(Ordering::Relaxed),
        c.requests.load(Ordering::Relaxed),
        c.sent.load(Ordering::Relaxed),
        c.echoed.load(Ordering::Relaxed),
        rss_start.0,
        mid.0,
        peak.0,
        end.0,
        rss_start.1,
        mid.1,
        peak.1,
        end.1,
    );
    assert!(c.cycles.load(Ordering::Relaxed) >= WORKERS as u64 * 2);
    assert!(
        c.echoed.load(Ordering::Relaxed) * 10 >= c.sent.load(Ordering::Relaxed) * 9,
        "fewer than 90% of the channel data came back"
    );
    // Stable memory: no growth beyond 8 MiB over the second half of the churn.
    assert!(
        end.0 <= mid.0 + 8192,
        "turn-control grew: {mid:?} -> {end:?}"
    );
    assert!(end.1 <= mid.1 + 8192, "xdp-agent grew: {mid:?} -> {end:?}");
}

/// The pid of the process running `binary` in `netns` (the lab starts each daemon once).
fn pid_in(netns: &Netns, binary: &str) -> u32 {
    let exe = tests::workspace_binary(binary)
        .unwrap()
        .canonicalize()
        .unwrap();
    let ns = std::fs::metadata(format!("/run/netns/{}", netns.name()))
        .unwrap()
        .ino();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe)
                && std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ns)
        })
        .unwrap_or_else(|| panic!("no {binary} running in {}", netns.name()))
}

/// A UDP socket bound in the namespace named `netns`.
fn bind_in(netns: &str, addr: SocketAddr) -> UdpSocket {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(Path::new(&path)).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        UdpSocket::bind(addr).unwrap()
    })
    .join()
    .unwrap()
}

/// Peers echoing every datagram back to its sender (the relay), until `stop`.
fn start_echo(peer: &Netns, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let sockets: Vec<UdpSocket> = (0..CHANNELS)
        .map(|k| bind_in(peer.name(), SocketAddr::new(PEER_V4.into(), PEER_PORT + k)))
        .collect();
    for s in &sockets {
        s.set_nonblocking(true).unwrap();
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let mut idle = true;
            for s in &sockets {
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    idle = false;
                    let _ = s.send_to(&buf[..n], from);
                }
            }
            if idle {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    })
}

// ---- the STUN client (tests::stun) with long-term credentials ---------------------------------

struct Client(stun::Client);

impl Client {
    fn new(socket: UdpSocket, server: SocketAddr) -> Self {
        let mut client = stun::Client::new(socket, server, USER, PASSWORD, Some(REALM)).unwrap();
        client.txid_tag = 0x33;
        // Retransmits on silence (a rate-limited 401 is dropped) for 10 s.
        client.tries = 20;
        client.wait = Duration::from_millis(500);
        Self(client)
    }

    /// An authenticated request that must succeed; follows 401/438 for the nonce and
    /// retransmits on silence.
    fn request(&mut self, method: u16, build: impl Fn(&mut Msg) -> &mut Msg, counters: &Counters) {
        let sent = self.0.sent;
        let answer = self.0.request(method, build);
        counters
            .requests
            .fetch_add(self.0.sent - sent, Ordering::Relaxed);
        let answer = answer.unwrap_or_else(|e| panic!("method {method:#x}: {e:#}"));
        assert_eq!(
            answer.class,
            SUCCESS,
            "method {method:#x}: class {} code {:?}",
            answer.class,
            answer.error_code()
        );
    }

    /// One cycle: allocate, bind channels, send channel data and count its echoes, refresh
    /// allocation and channels, send again. Returns the bindings held.
    fn churn(&mut self, worker: usize, cycle: u64, counters: &Counters) -> Vec<(String, u32)> {
        let lifetime = if cycle.is_multiple_of(2) {
            600u32
        } else {
            1200
        };
        self.request(
            ALLOCATE,
            |m| {
                m.attr(REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                    .attr(LIFETIME, &lifetime.to_be_bytes())
            },
            counters,
        );
        let client = SocketAddr::new(CLIENT_V4.into(), self.0.socket.local_addr().unwrap().port());
        let mut held = Vec::new();
        for round in 0..2 {
            for k in 0..CHANNELS {
                let number = 0x4000 + ((worker as u16 + k * 7) % 0x1000);
                let peer = SocketAddr::new(PEER_V4.into(), PEER_PORT + k);
                self.request(
                    CHANNEL_BIND,
                    |m| {
                        m.attr(CHANNEL_NUMBER, &stun::channel_number(number))
                            .xor_addr(XOR_PEER_ADDRESS, peer)
                    },
                    counters,
                );
                if round == 0 {
                    held.push((client.to_string(), u32::from(number)));
                }
                self.traffic(number, counters);
            }
            if round == 0 {
                self.request(
                    REFRESH,
                    |m| m.attr(LIFETIME, &600u32.to_be_bytes()),
                    counters,
                );
            }
        }
        held
    }

    /// Sends channel data and counts the echoes that come back as channel data.
    fn traffic(&mut self, number: u16, counters: &Counters) {
        let frame = stun::channel_data(number, &[0x5A; 100]);
        for _ in 0..PACKETS {
            self.0.socket.send_to(&frame, self.0.server).unwrap();
        }
        counters.sent.fetch_add(PACKETS as u64, Ordering::Relaxed);
        let mut got = 0;
        let start = Instant::now();
        let mut buf = [0u8; 2048];
        while got < PACKETS && start.elapsed() < Duration::from_millis(500) {
            match self.0.socket.recv(&mut buf) {
                Ok(n) if n >= 4 && buf[..2] == number.to_be_bytes() => got += 1,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        counters.echoed.fetch_add(got as u64, Ordering::Relaxed);
    }

    /// Deletes the allocation (RFC 8656 §8: Refresh with LIFETIME 0).
    fn delete(&mut self, counters: &Counters) {
        self.request(REFRESH, |m| m.attr(LIFETIME, &[0, 0, 0, 0]), counters);
    }
}
