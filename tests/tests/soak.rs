//! Soak: allocations and channel bindings created, refreshed and deleted at a high rate with
//! channel data flowing through the lab (turn-control + xdp-agent, relayed by XDP), for
//! `SOAK_SECONDS` (default 60; `make soak` runs 600).
//!
//! Checked: every request of the churn succeeds; at the end, with each worker holding one
//! allocation and its channels, the agent's maps (ListChannelBindings) hold exactly the
//! bindings turn-control reports (`turn_channel_bindings_active`) and the workers made;
//! after the workers delete them, both are zero: no binding leaked. Both daemons' VmRSS is
//! sampled (start, peak, end reported) and must not grow in the second half of the run.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failure is a test failure"
)]

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac as _};
use lab::agent::Agent;
use lab::{CLIENT_V4, Lab, Netns, PEER_V4, RELAY_V4, TURN_CONTROL_METRICS, wait_for};
use md5::{Digest as _, Md5};
use sha1::Sha1;

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
    if !lab::privileged() {
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
    let rss_start = (vm_rss_kib(control_pid), vm_rss_kib(agent_pid));

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
        let now = (vm_rss_kib(control_pid), vm_rss_kib(agent_pid));
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
            let active = lab::sample(&body, "turn_channel_bindings_active", "").unwrap_or(-1.0);
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
        lab::sample(&body, "turn_allocations_active", ""),
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
        let active = lab::sample(&body, "turn_channel_bindings_active", "").unwrap_or(-1.0);
        let allocations = lab::sample(&body, "turn_allocations_active", "").unwrap_or(-1.0);
        let listed = agent.list()?.len();
        Ok((active == 0.0 && allocations == 0.0 && listed == 0).then_some(()))
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();

    let end = (vm_rss_kib(control_pid), vm_rss_kib(agent_pid));
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
    let exe = lab::workspace_binary(binary)
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

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
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

// ---- a minimal STUN client with long-term credentials (RFC 8489 §9.2) ---------------------

const ALLOCATE: u16 = 0x003;
const REFRESH: u16 = 0x004;
const CHANNEL_BIND: u16 = 0x009;
const SUCCESS: u16 = 2;
const USERNAME: u16 = 0x0006;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const ERROR_CODE: u16 = 0x0009;
const CHANNEL_NUMBER: u16 = 0x000C;
const LIFETIME: u16 = 0x000D;
const XOR_PEER_ADDRESS: u16 = 0x0012;
const REALM_ATTR: u16 = 0x0014;
const NONCE: u16 = 0x0015;
const REQUESTED_TRANSPORT: u16 = 0x0019;
const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

fn message(method: u16, txid: [u8; 12], attrs: &[(u16, Vec<u8>)], key: Option<&[u8]>) -> Vec<u8> {
    // RFC 8489 §5: request class, method bits around the class bits.
    let t = (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2);
    let mut buf = t.to_be_bytes().to_vec();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&txid);
    let push = |buf: &mut Vec<u8>, t: u16, v: &[u8]| {
        buf.extend_from_slice(&t.to_be_bytes());
        buf.extend_from_slice(&(v.len() as u16).to_be_bytes());
        buf.extend_from_slice(v);
        buf.resize(buf.len().next_multiple_of(4), 0);
    };
    for (t, v) in attrs {
        push(&mut buf, *t, v);
    }
    if let Some(key) = key {
        let len = (buf.len() - 20 + 24) as u16;
        buf[2..4].copy_from_slice(&len.to_be_bytes());
        let mut mac = <Hmac<Sha1>>::new_from_slice(key).unwrap();
        mac.update(&buf);
        let tag = mac.finalize().into_bytes();
        push(&mut buf, MESSAGE_INTEGRITY, &tag);
    }
    let len = (buf.len() - 20) as u16;
    buf[2..4].copy_from_slice(&len.to_be_bytes());
    buf
}

fn xor_peer(addr: SocketAddr) -> (u16, Vec<u8>) {
    let IpAddr::V4(ip) = addr.ip() else {
        unreachable!("IPv4 peers only")
    };
    let mut v = vec![0, 1];
    v.extend_from_slice(&(addr.port() ^ 0x2112).to_be_bytes());
    v.extend(ip.octets().iter().zip(MAGIC).map(|(a, m)| a ^ m));
    (XOR_PEER_ADDRESS, v)
}

/// The class, error code and NONCE of a response to `txid`, if `buf` is one.
fn answer(buf: &[u8], txid: &[u8; 12]) -> Option<(u16, Option<u16>, Option<Vec<u8>>)> {
    if buf.len() < 20 || buf[0] & 0xC0 != 0 || buf[8..20] != txid[..] {
        return None;
    }
    let t = u16::from_be_bytes([buf[0], buf[1]]);
    let class = ((t >> 4) & 1) | ((t >> 7) & 2);
    let (mut code, mut nonce) = (None, None);
    let mut rest = &buf[20..];
    while let [t0, t1, l0, l1, ref tail @ ..] = *rest {
        let l = usize::from(u16::from_be_bytes([l0, l1]));
        let v = tail.get(..l)?;
        match u16::from_be_bytes([t0, t1]) {
            ERROR_CODE if l >= 4 => code = Some(u16::from(v[2] & 7) * 100 + u16::from(v[3])),
            NONCE => nonce = Some(v.to_vec()),
            _ => {}
        }
        rest = tail.get(l.next_multiple_of(4)..).unwrap_or_default();
    }
    Some((class, code, nonce))
}

struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    key: [u8; 16],
    nonce: Option<Vec<u8>>,
    txid: u64,
}

impl Client {
    fn new(socket: UdpSocket, server: SocketAddr) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self {
            socket,
            server,
            key: Md5::digest(format!("{USER}:{REALM}:{PASSWORD}")).into(),
            nonce: None,
            txid: 0,
        }
    }

    /// An authenticated request that must succeed; follows 401/438 for the nonce and
    /// retransmits on silence (a rate-limited 401 is dropped).
    fn request(&mut self, method: u16, attrs: &[(u16, Vec<u8>)], counters: &Counters) {
        let start = Instant::now();
        let mut buf = [0u8; 2048];
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "method {method:#x} unanswered"
            );
            self.txid += 1;
            let mut txid = [0x33; 12];
            txid[4..].copy_from_slice(&self.txid.to_be_bytes());
            let mut all = attrs.to_vec();
            if let Some(nonce) = &self.nonce {
                all.push((USERNAME, USER.as_bytes().to_vec()));
                all.push((REALM_ATTR, REALM.as_bytes().to_vec()));
                all.push((NONCE, nonce.clone()));
            }
            let key = self.key;
            let request = message(method, txid, &all, self.nonce.is_some().then_some(&key[..]));
            self.socket.send_to(&request, self.server).unwrap();
            counters.requests.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let got = loop {
                if sent.elapsed() > Duration::from_millis(500) {
                    break None;
                }
                match self.socket.recv(&mut buf) {
                    Ok(n) => {
                        if let Some(a) = answer(&buf[..n], &txid) {
                            break Some(a);
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("recv: {e}"),
                }
            };
            match got {
                None => {}
                Some((SUCCESS, _, _)) => return,
                Some((_, Some(401 | 438), Some(nonce))) => self.nonce = Some(nonce),
                Some((class, code, _)) => {
                    panic!("method {method:#x}: class {class} code {code:?}")
                }
            }
        }
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
            &[
                (REQUESTED_TRANSPORT, vec![17, 0, 0, 0]),
                (LIFETIME, lifetime.to_be_bytes().to_vec()),
            ],
            counters,
        );
        let client = SocketAddr::new(CLIENT_V4.into(), self.socket.local_addr().unwrap().port());
        let mut held = Vec::new();
        for round in 0..2 {
            for k in 0..CHANNELS {
                let number = 0x4000 + ((worker as u16 + k * 7) % 0x1000);
                let peer = SocketAddr::new(PEER_V4.into(), PEER_PORT + k);
                self.request(
                    CHANNEL_BIND,
                    &[
                        (
                            CHANNEL_NUMBER,
                            vec![(number >> 8) as u8, number as u8, 0, 0],
                        ),
                        xor_peer(peer),
                    ],
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
                    &[(LIFETIME, 600u32.to_be_bytes().to_vec())],
                    counters,
                );
            }
        }
        held
    }

    /// Sends channel data and counts the echoes that come back as channel data.
    fn traffic(&mut self, number: u16, counters: &Counters) {
        let mut frame = number.to_be_bytes().to_vec();
        frame.extend_from_slice(&100u16.to_be_bytes());
        frame.extend_from_slice(&[0x5A; 100]);
        for _ in 0..PACKETS {
            self.socket.send_to(&frame, self.server).unwrap();
        }
        counters.sent.fetch_add(PACKETS as u64, Ordering::Relaxed);
        let mut got = 0;
        let start = Instant::now();
        let mut buf = [0u8; 2048];
        while got < PACKETS && start.elapsed() < Duration::from_millis(500) {
            match self.socket.recv(&mut buf) {
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
        self.request(REFRESH, &[(LIFETIME, vec![0, 0, 0, 0])], counters);
    }
}
