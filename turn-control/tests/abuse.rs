//! One host cannot starve authentication for everyone, against the real binary on
//! loopback: while one source (127.0.0.1, one thread sending from many ports) floods the
//! relay with unauthenticated Allocates, another host (127.0.0.2) allocates and refreshes as
//! usual and every one of its requests is answered; the flood is limited per source and
//! counted.

mod common;

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Daemon;
use tests_harness::stun::{Client, Msg, attr, class, method};

/// Sockets the flooding host sends from: the kernel spreads their ports over every
/// event-loop thread.
const FLOOD_SOCKETS: usize = 64;

#[test]
fn a_flood_from_one_host_leaves_authentication_to_the_others() {
    let daemon = Daemon::start_with_ports(
        "127.0.0.1",
        common::quiet_port_range(50),
        &["--user", "alice:alice-pw", "--threads", "2"],
    );
    let server = daemon.listen;

    // The flood: unauthenticated Allocates from one thread, as fast as it can send, each
    // from the next of its sockets (the attack of a single host with varying ports).
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, flooded) = (Arc::clone(&stop), Arc::clone(&flooded));
        std::thread::spawn(move || {
            let sockets: Vec<UdpSocket> = (0..FLOOD_SOCKETS)
                .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            let mut txid = [0xF1u8; 12];
            let mut n: u32 = 0;
            while !stop.load(Ordering::Relaxed) {
                txid[8..].copy_from_slice(&n.to_be_bytes());
                let request = Msg::new(method::ALLOCATE, class::REQUEST, txid)
                    .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                    .finish(None, false);
                let socket = &sockets[n as usize % FLOOD_SOCKETS];
                if socket.send_to(&request, server).is_ok() {
                    flooded.fetch_add(1, Ordering::Relaxed);
                }
                n = n.wrapping_add(1);
            }
        })
    };
    // The flood has run for a second, well past any budget, before the legitimate host
    // starts.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) || flooded.load(Ordering::Relaxed) < 10_000 {
        std::thread::sleep(Duration::from_millis(10));
    }

    // The legitimate host, retransmitting as STUN clients do (RFC 8489 section 6.2.1):
    // each request answered or the test fails.
    let socket = UdpSocket::bind("127.0.0.2:0").unwrap();
    let mut alice = Client::new(socket, server, "alice", "alice-pw", None).unwrap();
    let answer = alice.allocate().unwrap();
    assert_eq!(answer.class, class::SUCCESS, "Allocate: {answer:?}");
    for lifetime in [600u32, 300, 600, 300, 600, 300, 600, 300, 600, 300] {
        std::thread::sleep(Duration::from_millis(100));
        let answer = alice
            .request(method::REFRESH, |m| {
                m.attr(attr::LIFETIME, &lifetime.to_be_bytes())
            })
            .unwrap();
        assert_eq!(answer.class, class::SUCCESS, "Refresh: {answer:?}");
    }
    // A second legitimate client of the same host, new to the relay: its first Allocate
    // needs a 401 with a nonce, which the flood must not have taken.
    let socket = UdpSocket::bind("127.0.0.2:0").unwrap();
    let mut second = Client::new(socket, server, "alice", "alice-pw", None).unwrap();
    assert_eq!(second.allocate().unwrap().class, class::SUCCESS);

    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    let sent = flooded.load(Ordering::Relaxed);
    // Of the flood's requests, all but about its source's budget (40, then 20 a second)
    // went unanswered.
    let limited = daemon.wait_metric(
        "turn_unauthenticated_source_limited_total",
        |limited| limited >= sent as f64 / 2.0,
        Duration::from_secs(5),
    );
    println!("flood: {sent} unauthenticated Allocates, {limited} answers withheld");
}
