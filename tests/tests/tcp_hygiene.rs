//! TURN-over-TCP stream hygiene against the real `turn-control` on loopback
//! (turn-control/src/tcp.rs): a stream whose first frame is not STUN is closed at once
//! (HTTP text frames as ChannelData), a connection that sends nothing is closed after the
//! first-frame deadline, a frame trickled slower than the frame deadline closes its
//! connection, while a request split across writes is answered and a connection idle
//! between complete frames stays open. A connection without an allocation is closed after
//! `--tcp-idle-unallocated-seconds`, one with an allocation stays; ten thousand connections
//! from one source meet `--tcp-connections-per-source` (and `--tcp-connections-max`) and
//! leave the daemon's memory as it was. Every close is counted in
//! `turn_tcp_connections_closed_total{reason}`.
//!
//! No root and no namespace: the daemon listens on 127.0.0.1 (and loopback holds all of
//! 127/8 for other sources). The stream deadlines are the daemon's constants (not
//! configurable), so the slow cases really wait for them, in parallel threads, each bounded
//! by a deadline.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failure is a test failure"
)]

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tests::stun::attr::{LIFETIME, REQUESTED_TRANSPORT};
use tests::stun::class::SUCCESS;
use tests::stun::method::{ALLOCATE, REFRESH};
use tests::stun::{Answer, Client, Msg};
use tests_harness::daemon::{Daemon, port_range};

/// `FIRST_FRAME_TIMEOUT` in turn-control/src/tcp.rs.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// `FRAME_TIMEOUT` in turn-control/src/tcp.rs.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How early a deadline may seem to fire, seen from the client (the client starts its
/// clock before the daemon accepts; this only absorbs clock granularity).
const EARLY: Duration = Duration::from_millis(500);
/// How late a deadline may fire on a loaded two-core machine.
const LATE: Duration = Duration::from_secs(5);
/// What "at once" means for a close that needs no deadline.
const PROMPT: Duration = Duration::from_secs(3);
/// Every other wait (start-up, answers, metrics).
const DEADLINE: Duration = Duration::from_secs(20);
/// The counter of closes.
const CLOSED: &str = "turn_tcp_connections_closed_total";

/// Waits until `turn_tcp_connections_closed_total{reason}` is `expected`, and returns the scraped
/// body.
fn wait_closed_count(daemon: &mut Daemon, reason: &str, expected: f64) -> String {
    let labels = format!("reason=\"{reason}\"");
    daemon.wait(&format!("{CLOSED}{{{labels}}} = {expected}"), |d| {
        let body = d.scrape()?;
        Ok((tests::sample(&body, CLOSED, &labels) == Some(expected)).then_some(body))
    })
}

/// The daemon with the tests' realm and user.
fn start() -> Daemon {
    start_with(&[])
}

/// [`start`] with `args` added.
fn start_with(args: &[&str]) -> Daemon {
    let ports = port_range(200, &["127.0.0.1"]);
    let realm = ["--realm", "tcp.example", "--user", "alice:alice-pw"];
    Daemon::spawn("127.0.0.1", ports, "info", &[&realm[..], args].concat())
}

// ---- the client side ----------------------------------------------------------------------

/// A STUN Binding request without attributes (RFC 8489 §5, §6.3.1: no credentials needed).
fn binding_request(txid: [u8; 12]) -> Vec<u8> {
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    request.extend_from_slice(&txid);
    request
}

/// Reads one STUN message and checks it is the Binding success for `txid`.
fn expect_binding_success(tcp: &mut TcpStream, txid: [u8; 12]) {
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut head = [0u8; 20];
    tcp.read_exact(&mut head).expect("Binding answered");
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
    tcp.read_exact(&mut body).expect("Binding answer's body");
    assert_eq!(&head[..2], &[0x01, 0x01], "Binding success response");
    assert_eq!(&head[8..], &txid, "the request's transaction ID");
}

/// Reads one STUN message.
fn read_answer(tcp: &mut TcpStream) -> Answer {
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut head = [0u8; 20];
    tcp.read_exact(&mut head).expect("an answer");
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
    tcp.read_exact(&mut body).expect("the answer's body");
    Answer::parse(&[&head[..], &body].concat()).expect("a STUN answer")
}

/// Builds requests signed with the tests' user (its UDP socket is never used: requests go
/// over TCP with [`tcp_request`]).
fn signer() -> Client {
    let unused = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server: SocketAddr = "127.0.0.1:9".parse().unwrap();
    Client::new(unused, server, "alice", "alice-pw", Some("tcp.example")).unwrap()
}

/// An authenticated request over `tcp`, following 401 and 438 for the nonce.
fn tcp_request(
    tcp: &mut TcpStream,
    signer: &mut Client,
    method: u16,
    build: impl Fn(&mut Msg) -> &mut Msg,
) -> Answer {
    for _ in 0..3 {
        let request = signer.build(method, &build);
        tcp.write_all(&request).unwrap();
        let answer = read_answer(tcp);
        if !signer.credentials.learn(&answer) {
            return answer;
        }
    }
    panic!("authentication over TCP did not converge");
}

/// An allocation (UDP relaying, RFC 8656 §7.2) for the TCP connection `tcp`.
fn tcp_allocate(tcp: &mut TcpStream) {
    let answer = tcp_request(tcp, &mut signer(), ALLOCATE, |m| {
        m.attr(REQUESTED_TRANSPORT, &[17, 0, 0, 0])
    });
    assert_eq!(answer.class, SUCCESS, "Allocate over TCP: {answer:?}");
}

/// Whether a read result means the daemon closed the connection (EOF, or a reset after
/// we wrote into a closed connection); `None` for a read that timed out.
fn closed(read: std::io::Result<usize>) -> Option<bool> {
    match read {
        Ok(0) => Some(true),
        Ok(n) => panic!("unexpected {n} bytes from the daemon"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Some(true),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("read: {e}"),
    }
}

/// Waits, sending nothing, until the daemon closes `tcp`; returns the time since `since`.
/// Fails after `limit`.
fn wait_for_close(tcp: &mut TcpStream, since: Instant, limit: Duration, what: &str) -> Duration {
    tcp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 512];
    loop {
        if closed(tcp.read(&mut buf)) == Some(true) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "{what}: still open after {limit:?}"
        );
    }
}

// ---- the tests ----------------------------------------------------------------------------

/// "GET / HTTP/1.1" frames as ChannelData on channel 0x4745 claiming 21 KB: as the first
/// frame it cannot belong to an allocation, and the daemon closes at once instead of waiting
/// for the bytes. Other garbage is counted under the same reason.
#[test]
fn http_request_is_closed_at_once() {
    let mut daemon = start();
    let mut tcp = daemon.connect();
    let start = Instant::now();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: relay.example\r\nUser-Agent: curl/8\r\n\r\n")
        .unwrap();
    let took = wait_for_close(&mut tcp, start, PROMPT, "GET /");
    eprintln!("GET / closed after {took:?}");
    // A valid ChannelData frame, channel and all, is no better as a first frame.
    let mut tcp = daemon.connect();
    let start = Instant::now();
    tcp.write_all(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4])
        .unwrap();
    wait_for_close(&mut tcp, start, PROMPT, "ChannelData first");

    let body = wait_closed_count(&mut daemon, "not_turn", 2.0);
    assert!(
        body.contains(&format!("# TYPE {CLOSED} counter"))
            && body.contains(&format!("# HELP {CLOSED} ")),
        "{CLOSED} is a described counter:\n{body}"
    );
    // The daemon still serves well-behaved clients over TCP.
    let mut tcp = daemon.connect();
    tcp.write_all(&binding_request([7; 12])).unwrap();
    expect_binding_success(&mut tcp, [7; 12]);
}

/// A Binding request split across two writes with a pause is still answered: the frame
/// deadline counts from the first byte, and a legitimately slow client is far inside it.
/// Two requests in one write are both answered.
#[test]
fn split_and_coalesced_requests_are_answered() {
    let daemon = start();
    let mut tcp = daemon.connect();
    let request = binding_request([1; 12]);
    tcp.write_all(&request[..7]).unwrap();
    // The pause is what is tested: the daemon must wait for the rest of the frame.
    std::thread::sleep(Duration::from_millis(300));
    tcp.write_all(&request[7..]).unwrap();
    expect_binding_success(&mut tcp, [1; 12]);

    let both = [binding_request([2; 12]), binding_request([3; 12])].concat();
    tcp.write_all(&both[..30]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tcp.write_all(&both[30..]).unwrap();
    expect_binding_success(&mut tcp, [2; 12]);
    expect_binding_success(&mut tcp, [3; 12]);
}

/// The deadlines, each waited for in its own thread against one daemon: a silent
/// connection is closed after the first-frame deadline; a frame trickled a byte every
/// 500 ms (activity, but no complete frame) is closed after the frame deadline; a
/// connection idle after a complete frame for longer than both stays open.
#[test]
fn slow_connections_are_closed_after_the_deadlines() {
    let mut daemon = start();
    let limit = FIRST_FRAME_TIMEOUT.max(FRAME_TIMEOUT) + LATE;

    let mut silent = daemon.connect();
    let silent = std::thread::spawn(move || {
        let start = Instant::now();
        wait_for_close(&mut silent, start, limit, "silent connection")
    });

    let mut trickle = daemon.connect();
    let trickle = std::thread::spawn(move || {
        trickle.write_all(&binding_request([4; 12])).unwrap();
        expect_binding_success(&mut trickle, [4; 12]);
        // A STUN header announcing 400 bytes, then one byte every 500 ms (the read timeout
        // paces the writes): 100 s to complete, far beyond the frame deadline.
        let mut frame = vec![0x00, 0x01, 0x01, 0x90, 0x21, 0x12, 0xA4, 0x42];
        frame.resize(20 + 400, 0);
        trickle
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 64];
        for byte in &frame {
            match trickle.write_all(&[*byte]) {
                Ok(()) => {}
                Err(e)
                    if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) =>
                {
                    return start.elapsed();
                }
                Err(e) => panic!("write: {e}"),
            }
            if closed(trickle.read(&mut buf)) == Some(true) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "trickled frame: still open after {limit:?}"
            );
        }
        panic!("the whole trickled frame was accepted");
    });

    let mut idle = daemon.connect();
    let idle = std::thread::spawn(move || {
        idle.write_all(&binding_request([5; 12])).unwrap();
        expect_binding_success(&mut idle, [5; 12]);
        // Idle between complete frames for longer than either deadline: the connection must
        // stay open (the allocation's lifetime, not the stream, decides).
        let idle_for = FIRST_FRAME_TIMEOUT.max(FRAME_TIMEOUT) + Duration::from_secs(1);
        idle.set_read_timeout(Some(idle_for)).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            closed(idle.read(&mut buf)),
            None,
            "an idle connection was closed"
        );
        idle.write_all(&binding_request([6; 12])).unwrap();
        expect_binding_success(&mut idle, [6; 12]);
    });

    let silent = silent.join().unwrap();
    eprintln!("silent connection closed after {silent:?}");
    assert!(
        silent + EARLY >= FIRST_FRAME_TIMEOUT,
        "silent connection closed after {silent:?}, before the first-frame deadline"
    );
    let trickle = trickle.join().unwrap();
    eprintln!("trickled frame closed after {trickle:?}");
    assert!(
        trickle + EARLY >= FRAME_TIMEOUT,
        "trickled frame closed after {trickle:?}, before the frame deadline"
    );
    idle.join().unwrap();

    wait_closed_count(&mut daemon, "first_frame_timeout", 1.0);
    let body = wait_closed_count(&mut daemon, "frame_timeout", 1.0);
    assert_eq!(
        tests::sample(&body, CLOSED, "reason=\"not_turn\""),
        None,
        "nothing here was garbage:\n{body}"
    );
    let log = daemon.output();
    assert!(!log.contains("panicked"), "turn-control log:\n{log}");
}

/// `--tcp-idle-unallocated-seconds`: a connection that sent a Binding request and nothing
/// since, and one whose allocation was deleted, are closed after the idle time; one with an
/// allocation stays open for three times as long and still gets its Refresh answered.
#[test]
fn only_connections_without_an_allocation_are_closed_when_idle() {
    const IDLE: Duration = Duration::from_secs(2);
    let mut daemon = start_with(&["--tcp-idle-unallocated-seconds", "2"]);
    let limit = IDLE + LATE;

    let mut binding_only = daemon.connect();
    let binding_only = std::thread::spawn(move || {
        binding_only.write_all(&binding_request([8; 12])).unwrap();
        expect_binding_success(&mut binding_only, [8; 12]);
        let start = Instant::now();
        wait_for_close(
            &mut binding_only,
            start,
            limit,
            "connection without allocation",
        )
    });

    let mut deleted = daemon.connect();
    let deleted = std::thread::spawn(move || {
        let mut signer = signer();
        tcp_allocate(&mut deleted);
        let answer = tcp_request(&mut deleted, &mut signer, REFRESH, |m| {
            m.attr(LIFETIME, &0u32.to_be_bytes())
        });
        assert_eq!(answer.class, SUCCESS, "Refresh to 0: {answer:?}");
        let start = Instant::now();
        wait_for_close(
            &mut deleted,
            start,
            limit,
            "connection whose allocation ended",
        )
    });

    let mut allocated = daemon.connect();
    let allocated = std::thread::spawn(move || {
        let mut signer = signer();
        tcp_allocate(&mut allocated);
        allocated.set_read_timeout(Some(3 * IDLE)).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            closed(allocated.read(&mut buf)),
            None,
            "a connection with an allocation was closed"
        );
        let answer = tcp_request(&mut allocated, &mut signer, REFRESH, |m| {
            m.attr(LIFETIME, &600u32.to_be_bytes())
        });
        assert_eq!(answer.class, SUCCESS, "Refresh after idling: {answer:?}");
    });

    for (what, took) in [
        ("without allocation", binding_only.join().unwrap()),
        ("allocation deleted", deleted.join().unwrap()),
    ] {
        eprintln!("{what}: closed after {took:?} idle");
        assert!(took + EARLY >= IDLE, "{what}: closed after {took:?}");
    }
    allocated.join().unwrap();
    let body = wait_closed_count(&mut daemon, "unallocated_timeout", 2.0);
    assert_eq!(
        tests::sample(&body, "turn_allocations_active", ""),
        Some(1.0)
    );
}

/// Ten thousand connections from one source against `--tcp-connections-per-source 100`:
/// the first hundred are served (and hold their place), every other one is accepted and
/// reset at once and counted, the daemon's memory stays where it was, and other sources are
/// still served. A closed connection gives its place back.
#[test]
fn connections_from_one_source_are_capped() {
    const CAP: usize = 100;
    const ATTEMPTS: usize = 10_000;
    let mut daemon = start_with(&[
        "--tcp-connections-per-source",
        "100",
        "--tcp-idle-unallocated-seconds",
        "600",
    ]);
    // The admitted ones send a frame, so that no deadline closes them during the test.
    let mut held: Vec<TcpStream> = (0..CAP)
        .map(|i| {
            let mut tcp = daemon.connect();
            let txid = [i as u8; 12];
            tcp.write_all(&binding_request(txid)).unwrap();
            expect_binding_success(&mut tcp, txid);
            tcp
        })
        .collect();
    daemon.wait_metric("turn_tcp_connections_active", |v| v == CAP as f64, DEADLINE);
    let rss_before = tests::vm_rss_kib(daemon.pid()).unwrap();

    let start = Instant::now();
    for _ in CAP..ATTEMPTS {
        // The attacker's side keeps nothing: the daemon resets the connection anyway, at
        // times before connect(2) returns.
        match TcpStream::connect(daemon.listen) {
            Ok(tcp) => drop(tcp),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect: {e}"),
        }
    }
    eprintln!("{} connections in {:?}", ATTEMPTS - CAP, start.elapsed());
    wait_closed_count(&mut daemon, "per_source_cap", (ATTEMPTS - CAP) as f64);
    let rss_after = tests::vm_rss_kib(daemon.pid()).unwrap();
    eprintln!("VmRSS {rss_before} -> {rss_after} KiB");
    assert!(
        rss_after <= rss_before + 4096,
        "memory grew under a connection flood: {rss_before} -> {rss_after} KiB"
    );
    assert_eq!(daemon.metric("turn_tcp_connections_active"), CAP as f64);

    // A connection held all along is still served.
    held[0].write_all(&binding_request([0xA0; 12])).unwrap();
    expect_binding_success(&mut held[0], [0xA0; 12]);
    // Another source is served.
    let mut other = connect_from("127.0.0.2", daemon.listen);
    other.write_all(&binding_request([0xA1; 12])).unwrap();
    expect_binding_success(&mut other, [0xA1; 12]);
    // One place given back is one more connection of the source.
    let all = (CAP + 1) as f64;
    daemon.wait_metric("turn_tcp_connections_active", |v| v == all, DEADLINE);
    drop(held.pop());
    daemon.wait_metric("turn_tcp_connections_active", |v| v == CAP as f64, DEADLINE);
    let mut again = daemon.connect();
    again.write_all(&binding_request([0xA2; 12])).unwrap();
    expect_binding_success(&mut again, [0xA2; 12]);
    let log = daemon.output();
    assert!(!log.contains("panicked"), "turn-control log:\n{log}");
}

/// `--tcp-connections-max`: beyond it every source is refused, each refusal counted.
#[test]
fn connections_beyond_the_total_are_refused() {
    let mut daemon = start_with(&[
        "--tcp-connections-per-source",
        "10",
        "--tcp-connections-max",
        "15",
    ]);
    let mut held = Vec::new();
    for (source, count) in [("127.0.0.1", 10), ("127.0.0.2", 5)] {
        for i in 0..count {
            let mut tcp = connect_from(source, daemon.listen);
            tcp.write_all(&binding_request([i; 12])).unwrap();
            expect_binding_success(&mut tcp, [i; 12]);
            held.push(tcp);
        }
    }
    for source in ["127.0.0.2", "127.0.0.3"] {
        let mut tcp = connect_from(source, daemon.listen);
        let start = Instant::now();
        wait_for_close(&mut tcp, start, PROMPT, "a connection beyond the total");
    }
    let body = wait_closed_count(&mut daemon, "total_cap", 2.0);
    assert_eq!(
        tests::sample(&body, CLOSED, "reason=\"per_source_cap\""),
        None
    );
}

/// A TCP connection to `server` from the address `source` (of loopback's 127/8).
fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let source: SocketAddr = (source.parse::<std::net::IpAddr>().unwrap(), 0).into();
    socket.bind(&source.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    socket.into()
}
