//! Restarts that keep every allocation (`--state-dir`, issue #21), against the real binary on
//! loopback without root: under a service manager (the stand-in of
//! `tests_harness::service_manager`, which keeps the listener and relay sockets while no
//! process runs) after SIGTERM, after SIGKILL and with another copy of the binary; without
//! one (the relay port is bound anew); and what is not kept: everything after SIGINT, saved
//! allocations a new configuration no longer fits, and TCP allocations.
//!
//! Each scenario is one client with a UDP allocation, a permission and a channel to a peer
//! socket of its own; after the restart the same client (same 5-tuple, same nonce) and the
//! same peer go on, and the peer sees the datagrams come from the relayed address of before.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod common;

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::ops::RangeInclusive;
use std::os::unix::fs::DirBuilderExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Daemon, free_port, quiet_port_range};
use tests_harness::daemon::{LOG_LEVEL, READY};
use tests_harness::scratch::TempDir;
use tests_harness::service_manager::ServiceManager;
use tests_harness::stun::{
    Answer, Client, Msg, attr, channel_data, channel_number, class, long_term_key, method,
};

/// How long one step (an answer, a datagram, an exit) may take.
const T: Duration = Duration::from_secs(5);
const USER: &str = "restart";
const PASSWORD: &str = "restart-pw";
const CHANNEL: u16 = 0x4000;
/// Event-loop threads: more than one, so that the restored allocation must land on the thread
/// whose journal holds it again.
const THREADS: &str = "2";
/// LIFETIME 600 s.
const LIFETIME: [u8; 4] = 600u32.to_be_bytes();

const RESTORED_ALLOCATIONS: &str = r#"turn_restart_restored_total{what="allocations"}"#;
const RESTORED_CHANNELS: &str = r#"turn_restart_restored_total{what="channels"}"#;
const RESTORED_PERMISSIONS: &str = r#"turn_restart_restored_total{what="permissions"}"#;
const SOCKETS_KEPT: &str = r#"turn_restart_restored_total{what="relay_sockets_kept"}"#;
const SOCKETS_REBOUND: &str = r#"turn_restart_restored_total{what="relay_sockets_rebound"}"#;
const JOURNAL_ERRORS: &str = "turn_journal_write_errors_total";

fn dropped(reason: &str) -> String {
    format!(r#"turn_restart_dropped_total{{reason="{reason}"}}"#)
}

/// Prints what `daemon` said about the restore (seen with `--nocapture`).
fn print_restore(test: &str, daemon: &Daemon) {
    let output = daemon.output();
    for line in output.lines().filter(|line| {
        [
            "restored",
            "journal",
            "handing over",
            "inherited",
            "passed back",
        ]
        .iter()
        .any(|word| line.contains(word))
    }) {
        eprintln!("{test}: {line}");
    }
}

// ---- the scenarios ------------------------------------------------------------------------

#[test]
fn sigterm_under_a_service_manager_hands_over_sockets_and_allocations() {
    handover_under_a_service_manager("sigterm", Stop::Term, None);
}

#[test]
fn after_sigkill_the_next_process_restores_the_last_journaled_change() {
    handover_under_a_service_manager("sigkill", Stop::Kill, None);
}

#[test]
fn another_binary_takes_over_the_state_and_sockets() {
    handover_under_a_service_manager("next-binary", Stop::Term, Some("turn-control-next"));
}

#[test]
fn without_a_service_manager_the_relay_port_is_bound_anew() {
    let relay = Relay::new("rebind", false);
    let ports = quiet_port_range(20);
    let mut first = relay.start(THREADS, ports.clone());
    let mut session = Session::open(&first);
    session.check_channel_both_ways("before the restart");

    stop(&mut first, Stop::Term);
    let second = relay.start(THREADS, ports);

    let answer = session.refresh_as_before();
    assert_eq!(answer.class, class::SUCCESS, "Refresh: {answer:?}");
    session.check_relaying("after the restart");
    second.wait_metric(RESTORED_ALLOCATIONS, |v| v == 1.0, T);
    assert_eq!(second.metric(SOCKETS_REBOUND), 1.0, "{}", second.output());
    assert_eq!(second.metric(SOCKETS_KEPT), 0.0);
    assert_eq!(second.metric(RESTORED_CHANNELS), 1.0);
    assert_eq!(second.metric(JOURNAL_ERRORS), 0.0);
    print_restore(
        "without_a_service_manager_the_relay_port_is_bound_anew",
        &second,
    );
}

#[test]
fn sigint_shuts_down_for_good() {
    let relay = Relay::new("sigint", true);
    let ports = quiet_port_range(20);
    let mut first = relay.start(THREADS, ports.clone());
    let mut session = Session::open(&first);
    let relay_name = relay.wait_for_stored_relay(session.relayed);

    stop(&mut first, Stop::Int);
    // Every allocation was deleted: its relay socket left the store before the exit (the
    // daemon waits for the manager to take its last messages).
    let names = relay.manager().names();
    assert!(!names.contains(&relay_name), "{names:?}");

    let second = relay.start(THREADS, ports);
    // The answer also says that the restore of the client's thread is over.
    let answer = session.refresh();
    assert_eq!(answer.error_code(), Some(437), "Refresh: {answer:?}");
    assert_eq!(
        second.metric(RESTORED_ALLOCATIONS),
        0.0,
        "{}",
        second.output()
    );
    assert_eq!(second.metric(RESTORED_CHANNELS), 0.0);
    print_restore("sigint_shuts_down_for_good", &second);
}

#[test]
fn another_thread_count_restores_nothing() {
    let relay = Relay::new("threads", false);
    let ports = quiet_port_range(20);
    let mut first = relay.start(THREADS, ports.clone());
    let mut session = Session::open(&first);

    stop(&mut first, Stop::Term);
    // The kernel's SO_REUSEPORT hash spreads clients over another number of sockets now: the
    // journals are not restored.
    let second = relay.start("1", ports);

    let answer = session.refresh();
    assert_eq!(answer.error_code(), Some(437), "Refresh: {answer:?}");
    second.wait_metric(&dropped("threads_changed"), |v| v >= 1.0, T);
    assert_eq!(
        second.metric(RESTORED_ALLOCATIONS),
        0.0,
        "{}",
        second.output()
    );
    print_restore("another_thread_count_restores_nothing", &second);
}

#[test]
fn a_port_range_without_the_relay_port_restores_nothing() {
    let relay = Relay::new("ports", false);
    let mut first = relay.start(THREADS, quiet_port_range(20));
    let mut session = Session::open(&first);

    stop(&mut first, Stop::Term);
    let others = loop {
        let others = quiet_port_range(20);
        if !others.contains(&session.relayed.port()) {
            break others;
        }
    };
    let second = relay.start(THREADS, others);

    let answer = session.refresh();
    assert_eq!(answer.error_code(), Some(437), "Refresh: {answer:?}");
    second.wait_metric(&dropped("port_out_of_range"), |v| v == 1.0, T);
    assert_eq!(
        second.metric(RESTORED_ALLOCATIONS),
        0.0,
        "{}",
        second.output()
    );
    print_restore(
        "a_port_range_without_the_relay_port_restores_nothing",
        &second,
    );
}

#[test]
fn a_plain_tcp_connection_and_its_allocation_outlive_the_handover() {
    let relay = Relay::new("tcp", true);
    let ports = quiet_port_range(20);
    let mut first = relay.start(THREADS, ports.clone());
    let mut session = Session::open(&first);
    let mut tcp = TcpSession::allocate(first.listen);
    let tcp_relay_name = relay.wait_for_stored_relay(tcp.relayed);

    stop(&mut first, Stop::Term);
    // The connection stays open: its socket waits in the store, as its relay socket does.
    assert_open(&mut tcp.stream);
    let names = relay.manager().names();
    assert!(names.contains(&tcp_relay_name), "{names:?}");
    assert!(
        names.iter().any(|name| name.starts_with("tcp-")),
        "{names:?}"
    );
    // A Refresh sent while no process runs waits in the connection for the next one.
    let refresh = tcp.refresh_request();
    tcp.stream.write_all(&refresh).unwrap();

    let second = relay.start(THREADS, ports);
    let answer = tcp_read(&mut tcp.stream);
    assert_eq!(answer.class, class::SUCCESS, "Refresh over TCP: {answer:?}");
    second.wait_metric(RESTORED_ALLOCATIONS, |v| v == 2.0, T);
    assert_eq!(
        second.metric(r#"turn_restart_restored_total{what="tcp_connections_kept"}"#),
        1.0,
        "{}",
        second.output()
    );
    assert_eq!(second.metric(&dropped("tcp_connection_closed")), 0.0);
    let answer = session.refresh_as_before();
    assert_eq!(answer.class, class::SUCCESS, "Refresh: {answer:?}");
    session.check_relaying("after the restart");
    print_restore(
        "a_plain_tcp_connection_and_its_allocation_outlive_the_handover",
        &second,
    );
}

/// coturn's own client across a SIGTERM hand-over ([`uclient_across`]): not one message is
/// lost, over UDP or TCP.
#[test]
fn coturns_client_loses_nothing_across_a_handover() {
    for (transport, totals, log) in uclient_across("uclient-term", Stop::Term) {
        assert_eq!(
            (totals.sent, totals.received),
            (1200, 1200),
            "{transport}:\n{log}"
        );
    }
}

/// coturn's own client across a SIGKILL ([`uclient_across`]): its allocations, channels and
/// connections survive; what the killed process held in memory at that instant (read from
/// a socket, not yet relayed) is lost with it, a message or two per stream at most.
#[test]
fn coturns_client_survives_a_crash() {
    for (transport, totals, log) in uclient_across("uclient-kill", Stop::Kill) {
        assert_eq!(totals.sent, 1200, "{transport}:\n{log}");
        assert!(
            totals.received >= totals.sent - 8,
            "{transport}: {totals:?}\n{log}"
        );
    }
}

/// coturn's `turnutils_uclient`, client to client (`-y`: each client's channel data goes
/// through the relay to the other's allocation), over UDP and over TCP at once, while the
/// relay is stopped `how` and started again under the service manager: each run's
/// transport, totals and output (2 clients, each an RTP and an RTCP allocation, 300
/// messages on each). Empty when coturn's tools are missing outside CI.
fn uclient_across(name: &str, how: Stop) -> Vec<(String, tests_harness::coturn::Totals, String)> {
    if !tests_harness::coturn::tools_present(name) {
        return Vec::new();
    }
    let relay = Relay::new(name, true);
    let ports = quiet_port_range(40);
    let mut daemon = relay.start(THREADS, ports.clone());
    let port = relay.listen.port().to_string();
    // 300 messages 20 ms apart per client: six seconds of traffic, the restart within it.
    // Output to files: a pipe nobody reads while the client runs could fill and stall it.
    let uclient = |transport: &str, flags: &[&str]| {
        let log = relay.dir.0.join(format!("uclient-{transport}.log"));
        let child = Command::new("turnutils_uclient")
            .args(flags)
            .args(["-y", "-u", USER, "-w", PASSWORD, "-p", &port])
            .args(["-n", "300", "-m", "2", "-l", "100", "-z", "20", "127.0.0.1"])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (transport.to_owned(), child, log)
    };
    let clients = [uclient("UDP", &[]), uclient("TCP", &["-t"])];
    // Both runs have their channels (two pairs of RTP and RTCP allocations each).
    daemon.wait_metric("turn_channel_bindings_active", |v| v >= 8.0, T);
    stop(&mut daemon, how);
    let daemon = relay.start(THREADS, ports);
    // The eight with channels, and any probe allocation uclient makes besides.
    daemon.wait_metric(RESTORED_ALLOCATIONS, |v| v >= 8.0, T);
    clients
        .into_iter()
        .map(|(transport, client, log)| {
            wait_success(client, Duration::from_secs(60));
            let output = std::fs::read_to_string(log).unwrap();
            let totals = tests_harness::coturn::Totals::parse(&output)
                .unwrap_or_else(|| panic!("{transport}: no totals in\n{output}"));
            println!("{name}: {transport}: {totals:?}");
            (transport, totals, output + &daemon.output())
        })
        .collect()
}

/// Waits for `child` to exit successfully within `timeout` (killed and a failure otherwise).
fn wait_success(mut child: std::process::Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("turnutils_uclient did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "turnutils_uclient: {status}");
}

/// Tests 1 to 3: SIGTERM or SIGKILL under a service manager, then `next` (a copy of the
/// binary, by file name) or the same binary again, on the same manager and state.
fn handover_under_a_service_manager(name: &str, how: Stop, next: Option<&str>) {
    let relay = Relay::new(name, true);
    let ports = quiet_port_range(20);
    let next = next.map(|file| relay.copy_binary(file));
    let mut first = relay.start(THREADS, ports.clone());
    let mut session = Session::open(&first);
    match how {
        Stop::Term => session.check_channel_both_ways("before the restart"),
        // At once after the ChannelBind success, the last change: it was journaled before
        // its success left.
        Stop::Kill => {}
        Stop::Int => unreachable!("SIGINT hands nothing over"),
    }

    stop(&mut first, how);
    // Stored when it was bound (after a SIGKILL too: the manager reads what the daemon sent
    // before it died).
    let relay_name = relay.wait_for_stored_relay(session.relayed);
    // No process runs: these wait in the sockets the manager keeps.
    session.peer_sends(b"peer to client while down");
    session.client_sends_channel_data(b"client to peer while down");
    let mut second = match &next {
        // The closest a test gets to an upgrade: another executable file, started on the state
        // and the sockets the previous one left (a real upgrade also brings other code).
        Some(program) => relay.start_program(program, THREADS, ports),
        None => relay.start(THREADS, ports),
    };

    // The counters first: they are complete once the allocation's thread has restored it,
    // and reading them leaves the datagrams waiting for the client alone.
    second.wait_metric(RESTORED_ALLOCATIONS, |v| v == 1.0, T);
    second.wait_for_log("allocations restored", T);
    print_restore(name, &second);
    for (series, expected) in [
        (SOCKETS_KEPT, 1.0),
        (SOCKETS_REBOUND, 0.0),
        (RESTORED_PERMISSIONS, 1.0),
        (RESTORED_CHANNELS, 1.0),
        (JOURNAL_ERRORS, 0.0),
    ] {
        assert_eq!(second.metric(series), expected, "{series}");
    }
    session.client_receives(b"peer to client while down");
    session.peer_receives(b"client to peer while down");
    let answer = session.refresh_as_before();
    assert_eq!(answer.class, class::SUCCESS, "Refresh: {answer:?}");
    session.check_relaying("after the restart");
    let names = relay.manager().names();
    assert!(names.contains(&relay_name), "{names:?}");
}

// ---- starting and stopping ------------------------------------------------------------------

/// How a test ends a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: hand over.
    Term,
    /// SIGKILL: a crash.
    Kill,
    /// SIGINT: shut down for good.
    Int,
}

/// Sends `how` and waits for the exit: 0 after SIGTERM and SIGINT.
fn stop(daemon: &mut Daemon, how: Stop) {
    match how {
        Stop::Term => daemon.signal("TERM"),
        Stop::Int => daemon.signal("INT"),
        // Without kill(1), whose start takes a millisecond or more: the crash follows the
        // test's last step as closely as a test can make it.
        Stop::Kill => {
            let pid = libc::pid_t::try_from(daemon.pid()).unwrap();
            // SAFETY: kill(2) touches no memory of ours; the pid is our child's, not reaped
            // yet (only `wait_exit` reaps it), so it names no other process.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        }
    }
    let status: ExitStatus = daemon.wait_exit(T);
    if how == Stop::Kill {
        assert_eq!(status.signal(), Some(9), "{status:?}\n{}", daemon.output());
        return;
    }
    assert!(status.success(), "{status:?}\n{}", daemon.output());
    if how == Stop::Term {
        daemon.wait_for_log("handing over: the allocations stay for the next process", T);
    }
}

/// One relay's state directory, listener address and service manager (if any), started
/// again and again.
#[derive(Debug)]
struct Relay {
    /// Dropped before the directory that holds its socket.
    manager: Option<ServiceManager>,
    /// The `--state-dir`, in `dir`.
    state: PathBuf,
    dir: TempDir,
    listen: SocketAddr,
}

impl Relay {
    /// `managed`: started through a service manager with a file-descriptor store.
    fn new(name: &str, managed: bool) -> Relay {
        let dir = TempDir::new(name);
        let manager = managed.then(|| ServiceManager::new(&dir.0).unwrap());
        // 0700, as the daemon advises for the keys it holds.
        let state = dir.0.join("state");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state)
            .unwrap();
        Relay {
            manager,
            listen: SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1"))),
            state,
            dir,
        }
    }

    fn manager(&self) -> &ServiceManager {
        self.manager.as_ref().unwrap()
    }

    /// A copy of the binary named `file` in the test's directory.
    fn copy_binary(&self, file: &str) -> PathBuf {
        let copy = self.dir.0.join(file);
        std::fs::copy(BIN, &copy).unwrap();
        copy
    }

    /// Starts the binary ([`Relay::start_program`]).
    fn start(&self, threads: &str, ports: RangeInclusive<u16>) -> Daemon {
        self.start_program(Path::new(BIN), threads, ports)
    }

    /// Starts `program` on the relay's state with `threads` event-loop threads and `ports`,
    /// through the manager if there is one (then waits for its READY=1 as well).
    fn start_program(&self, program: &Path, threads: &str, ports: RangeInclusive<u16>) -> Daemon {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")));
        let mut command = match &self.manager {
            Some(manager) => manager.command(program).unwrap(),
            None => Command::new(program),
        };
        command
            .args(["--listen", &self.listen.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(["--ports", &format!("{}-{}", ports.start(), ports.end())])
            .args(["--threads", threads])
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--user", &format!("{USER}:{PASSWORD}")])
            .args(["--allow-peer", "127.0.0.0/8"])
            .args(["--log-level", LOG_LEVEL])
            .env_remove("RUST_LOG")
            .env_remove("TURN_CONTROL_CONFIG");
        let daemon = Daemon::spawn_command(command, self.listen, metrics, ports);
        if let Some(manager) = &self.manager
            && let Err(error) = manager.wait_for("READY=1", READY)
        {
            panic!("{error:#}\n{}", daemon.output());
        }
        daemon
    }

    /// Waits until the manager stores the relay socket of `relayed`; its name.
    fn wait_for_stored_relay(&self, relayed: SocketAddr) -> String {
        let name = format!("relay-v4-{}", relayed.port());
        let deadline = Instant::now() + T;
        while !self.manager().names().contains(&name) {
            assert!(
                Instant::now() < deadline,
                "{name} not stored; stored: {:?}",
                self.manager().names()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        name
    }
}

// ---- the client and its peer ------------------------------------------------------------

/// A UDP client with an allocation, a permission for its peer and [`CHANNEL`] bound to it.
#[derive(Debug)]
struct Session {
    client: Client,
    peer: UdpSocket,
    relayed: SocketAddr,
}

impl Session {
    /// Allocates, permits the peer (checked with a Send indication) and binds [`CHANNEL`];
    /// the ChannelBind is the last change.
    fn open(daemon: &Daemon) -> Session {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut client = Client::new(socket, daemon.listen, USER, PASSWORD, None).unwrap();
        let answer = client.allocate().unwrap();
        assert_eq!(answer.class, class::SUCCESS, "Allocate: {answer:?}");
        let relayed = answer.xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut session = Session {
            client,
            peer,
            relayed,
        };
        let answer = session.create_permission();
        assert_eq!(answer.class, class::SUCCESS, "CreatePermission: {answer:?}");
        session.send_indication(b"send indication before");
        session.peer_receives(b"send indication before");
        let peer = session.peer_addr();
        let answer = session
            .client
            .request(method::CHANNEL_BIND, |m| {
                m.attr(attr::CHANNEL_NUMBER, &channel_number(CHANNEL))
                    .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            })
            .unwrap();
        assert_eq!(answer.class, class::SUCCESS, "ChannelBind: {answer:?}");
        session
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer.local_addr().unwrap()
    }

    /// ChannelData each way.
    fn check_channel_both_ways(&self, label: &str) {
        let to_peer = format!("channel data to the peer {label}");
        self.client_sends_channel_data(to_peer.as_bytes());
        self.peer_receives(to_peer.as_bytes());
        let to_client = format!("peer to the client {label}");
        self.peer_sends(to_client.as_bytes());
        self.client_receives(to_client.as_bytes());
    }

    /// The allocation is alive with its relayed address of before: a CreatePermission
    /// succeeds, ChannelData goes each way, a Send indication reaches the peer, and the peer
    /// sees both come from the relayed address.
    fn check_relaying(&mut self, label: &str) {
        let answer = self.create_permission();
        assert_eq!(
            answer.class,
            class::SUCCESS,
            "CreatePermission {label}: {answer:?}"
        );
        self.check_channel_both_ways(label);
        let indication = format!("send indication {label}");
        self.send_indication(indication.as_bytes());
        self.peer_receives(indication.as_bytes());
    }

    fn create_permission(&mut self) -> Answer {
        let peer = self.peer_addr();
        self.client
            .request(method::CREATE_PERMISSION, |m| {
                m.xor_addr(attr::XOR_PEER_ADDRESS, peer)
            })
            .unwrap()
    }

    /// A Refresh signed with the nonce and key of before, sent once (no new 401 or 438
    /// round): what a client that saw no restart sends.
    fn refresh_as_before(&mut self) -> Answer {
        assert!(self.client.credentials.nonce.is_some(), "no nonce yet");
        let request = self
            .client
            .build(method::REFRESH, |m| m.attr(attr::LIFETIME, &LIFETIME));
        self.client
            .exchange(&request)
            .unwrap()
            .expect("Refresh unanswered")
    }

    /// A Refresh that follows 401 and 438 for a new nonce.
    fn refresh(&mut self) -> Answer {
        self.client
            .request(method::REFRESH, |m| m.attr(attr::LIFETIME, &LIFETIME))
            .unwrap()
    }

    fn send_indication(&mut self, data: &[u8]) {
        let peer = self.peer_addr();
        let indication = Msg::new(method::SEND, class::INDICATION, self.client.next_txid())
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, data)
            .finish(None, false);
        self.client
            .socket
            .send_to(&indication, self.client.server)
            .unwrap();
    }

    fn client_sends_channel_data(&self, data: &[u8]) {
        self.client
            .socket
            .send_to(&channel_data(CHANNEL, data), self.client.server)
            .unwrap();
    }

    fn peer_sends(&self, data: &[u8]) {
        self.peer.send_to(data, self.relayed).unwrap();
    }

    /// Asserts that the next datagram the peer gets within [`T`] is `data`, from the
    /// relayed address.
    fn peer_receives(&self, data: &[u8]) {
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + T;
        let (n, from) = loop {
            match self.peer.recv_from(&mut buf) {
                Ok(received) => break received,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("peer: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "the peer got no {:?} within {T:?}",
                String::from_utf8_lossy(data)
            );
        };
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            String::from_utf8_lossy(data)
        );
        assert_eq!(from, self.relayed, "the peer sees the relayed address");
    }

    /// Asserts that the next ChannelData the client gets within [`T`] is `data` on
    /// [`CHANNEL`] (STUN messages, late answers, are passed over).
    fn client_receives(&self, data: &[u8]) {
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + T;
        loop {
            match self.client.socket.recv(&mut buf) {
                // ChannelData: the first two bits 01 (RFC 8656 §12.4).
                Ok(n) if n >= 4 && buf[0] & 0xC0 == 0x40 => {
                    let number = u16::from_be_bytes([buf[0], buf[1]]);
                    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                    let payload = buf.get(4..4 + len).unwrap_or(&buf[4..n]);
                    assert_eq!(number, CHANNEL);
                    assert_eq!(
                        String::from_utf8_lossy(payload),
                        String::from_utf8_lossy(data)
                    );
                    return;
                }
                Ok(n) => {
                    // A Data indication carries what ChannelData should have: the channel is
                    // gone.
                    if let Some(answer) = Answer::parse(&buf[..n])
                        && answer.method == method::DATA
                    {
                        panic!(
                            "{:?} came in a Data indication, not on channel {CHANNEL:#x}",
                            answer.attr(attr::DATA).map(String::from_utf8_lossy)
                        );
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("client: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "the client got no {:?} within {T:?}",
                String::from_utf8_lossy(data)
            );
        }
    }
}

// ---- TURN over TCP --------------------------------------------------------------------------

/// A TURN-over-TCP client's allocation of a UDP relay (RFC 8656 §3.1).
struct TcpSession {
    stream: TcpStream,
    relayed: SocketAddr,
    key: [u8; 16],
    realm: Vec<u8>,
    nonce: Vec<u8>,
}

impl TcpSession {
    /// Connects and allocates, after the 401 round.
    fn allocate(server: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(server).unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        let request = Msg::new(method::ALLOCATE, class::REQUEST, [0x7C; 12])
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .finish(None, false);
        stream.write_all(&request).unwrap();
        let challenge = tcp_read(&mut stream);
        assert_eq!(challenge.error_code(), Some(401), "{challenge:?}");
        let realm = challenge.attr(attr::REALM).unwrap().to_vec();
        let nonce = challenge.attr(attr::NONCE).unwrap().to_vec();
        let key = long_term_key(USER, &String::from_utf8_lossy(&realm), PASSWORD);
        let request = Msg::new(method::ALLOCATE, class::REQUEST, [0x7D; 12])
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .credentials(USER, &realm, &nonce)
            .finish(Some(&key), false);
        stream.write_all(&request).unwrap();
        let answer = tcp_read(&mut stream);
        assert_eq!(answer.class, class::SUCCESS, "TCP Allocate: {answer:?}");
        let relayed = answer.xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap();
        Self {
            stream,
            relayed,
            key,
            realm,
            nonce,
        }
    }

    /// A Refresh signed with the Allocate's nonce.
    fn refresh_request(&self) -> Vec<u8> {
        Msg::new(method::REFRESH, class::REQUEST, [0x7E; 12])
            .attr(attr::LIFETIME, &LIFETIME)
            .credentials(USER, &self.realm, &self.nonce)
            .finish(Some(&self.key), false)
    }
}

/// Reads one STUN message, framed by its own length (RFC 8656 §3.1).
fn tcp_read(stream: &mut TcpStream) -> Answer {
    let mut header = [0u8; 20];
    stream.read_exact(&mut header).unwrap();
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut message = header.to_vec();
    message.resize(20 + len, 0);
    stream.read_exact(&mut message[20..]).unwrap();
    Answer::parse(&message).unwrap()
}

/// Asserts that `stream` is still open: no end of file or reset, nothing to read, within a
/// moment.
fn assert_open(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the TCP connection did not stay open: {other:?}"),
    }
    stream.set_read_timeout(Some(T)).unwrap();
}
