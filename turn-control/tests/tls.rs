//! TURN over TLS (RFC 8656 §3.1) against the real daemon on loopback (issue #16): a
//! certificate that cannot be served stops the start with one line; reloads (files renamed
//! into place, a symlink swap, SIGHUP, a key that does not match) reach new connections while
//! an allocation made before keeps relaying; bad input on a TLS port (plain HTTP, no cipher in
//! common, a handshake left half-way, a client that stops reading, TLS without a certificate)
//! is closed within its deadline and counted while a well-behaved client on the same daemon
//! keeps working; ALPN `stun.turn` (RFC 7443); session resumption over TLS 1.3 and 1.2.

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, free_port, quiet_port_range, run_to_exit};
use rustls::ProtocolVersion;
use rustls::pki_types::ServerName;
use tests_harness::stun::{Answer, attr, class};
use tests_harness::tls::{self, ALPN_STUN_TURN, CertFiles, Connector, Validity, certificate};

/// The long-term credential the daemons are started with (`--user`).
const USER: &str = "test";
const PASSWORD: &str = "testpass";
/// The names the test certificates are for; the clients verify the IP address.
const NAMES: &[&str] = &["127.0.0.1", "localhost"];
/// How long a reload, a metric or a relayed datagram may take at the most (the daemon looks
/// at the certificate files every two seconds and publishes metrics every second).
const T: Duration = Duration::from_secs(10);
/// The channel the clients bind to their peer (RFC 8656 §12: 0x4000 through 0x4FFF).
const CHANNEL: u16 = 0x4000;
/// `--tls-handshake-timeout-seconds` of the bad-input tests: short, to keep them short.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one write to a client may block before the daemon closes the connection
/// (`tcp::WRITE_TIMEOUT`).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a connection the daemon refuses on sight (not TURN, TLS without a certificate)
/// is closed at the most: at once, with room for a loaded machine.
const AT_ONCE: Duration = Duration::from_secs(2);

const RELOADS_OK: &str = "turn_tls_certificate_reloads_total{result=\"ok\"}";
const RELOADS_ERROR: &str = "turn_tls_certificate_reloads_total{result=\"error\"}";
const EXPIRY: &str = "tls_certificate_expiry_seconds";

// ---- start-up -----------------------------------------------------------------------------

#[test]
fn a_certificate_that_cannot_be_served_stops_the_start_with_one_line() {
    let dir = TempDir::new("startup");
    let good = certificate(dir.path(), "good", NAMES, Validity::days(30)).unwrap();
    let other = certificate(dir.path(), "other", NAMES, Validity::days(30)).unwrap();
    let expired = certificate(dir.path(), "expired", NAMES, Validity::expired()).unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let (cert, key) = (text(&good.cert), text(&good.key));

    // A missing file: the OS error, with the path.
    let line = start_error(&["--tls-cert", text(&missing), "--tls-key", key]);
    assert!(line.contains(text(&missing)), "{line}");
    assert!(line.contains("No such file or directory"), "{line}");
    // A file that cannot be read. Taking its permissions away would not stop a test run as
    // root, so the path names a directory, which nobody can read as a file.
    let line = start_error(&["--tls-cert", text(dir.path()), "--tls-key", key]);
    assert!(line.contains(text(dir.path())), "{line}");
    assert!(line.contains("Is a directory"), "{line}");
    // A file without a certificate in it, as the chain and as the key.
    let line = start_error(&["--tls-cert", text(&garbage), "--tls-key", key]);
    assert!(line.contains(text(&garbage)), "{line}");
    assert!(line.contains("no certificate"), "{line}");
    let line = start_error(&["--tls-cert", cert, "--tls-key", text(&garbage)]);
    assert!(line.contains(text(&garbage)), "{line}");
    assert!(line.contains("private key"), "{line}");
    // The key of another certificate.
    let line = start_error(&["--tls-cert", cert, "--tls-key", text(&other.key)]);
    assert!(line.contains("does not match"), "{line}");
    // An expired leaf.
    let line = start_error(&[
        "--tls-cert",
        text(&expired.cert),
        "--tls-key",
        text(&expired.key),
    ]);
    assert!(line.contains("expired"), "{line}");
    // A TLS listener without a certificate.
    let tls_listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let line = start_error(&["--tls-listen", &tls_listen]);
    assert!(line.contains("needs a certificate"), "{line}");
    // Only one of the pair.
    let line = start_error(&["--tls-cert", cert]);
    assert!(line.contains("--tls-cert needs --tls-key"), "{line}");
    let line = start_error(&["--tls-key", key]);
    assert!(line.contains("--tls-key needs --tls-cert"), "{line}");
}

/// Runs the daemon with `tls_args` (and a listener, metrics and a credential of its own),
/// which must exit at once with status 1 and one line on stderr; that line.
fn start_error(tls_args: &[&str]) -> String {
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let mut args = vec!["--dev", "--listen", &listen, "--metrics", "127.0.0.1:0"];
    args.extend_from_slice(tls_args);
    let started = Instant::now();
    let (status, _, stderr) = run_to_exit(&args, &[]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "{tls_args:?}: exited after {took:?}"
    );
    assert_eq!(status.code(), Some(1), "{tls_args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{tls_args:?}: not one line on stderr:\n{stderr}"
    );
    lines[0].to_owned()
}

// ---- reloads ------------------------------------------------------------------------------

/// Renewal as certbot's deploy hooks and most scripts do it: the new files are written beside
/// the served ones and renamed over them, each rename atomic.
#[test]
fn a_certificate_renamed_into_place_reaches_new_connections_while_old_ones_relay_on() {
    let dir = TempDir::new("rename");
    let served = certificate(dir.path(), "served", NAMES, Validity::days(30)).unwrap();
    let (daemon, tls_listen) = start(&served, &[]);
    wait_for_expiry(&daemon, served.not_after);
    let mut before = Relayed::new(&Connector::new(&[&served.ca]).unwrap(), tls_listen);
    assert_eq!(before.client.served_leaf().unwrap(), served.leaf_der);
    before.round();

    let next = certificate(dir.path(), "next", NAMES, Validity::days(60)).unwrap();
    // Between the two renames key and chain do not match. The daemon looks every two seconds
    // and almost never at that moment; if it does, it counts an error and loads the pair at
    // its next look. So errors are not asserted here (the symlink swap and SIGHUP tests,
    // which change both files at once, do).
    std::fs::rename(&next.key, &served.key).unwrap();
    std::fs::rename(&next.cert, &served.cert).unwrap();
    relay_until_counted(&daemon, &mut before, RELOADS_OK);

    assert_reloaded(&daemon, tls_listen, &next, &mut before);
}

/// The layout kubelet gives a Secret volume, where cert-manager's certificates arrive:
/// `tls.crt -> ..data/tls.crt`, `..data -> ` a directory per version, and an update renames a
/// new `..data` symlink over the old one, so both files change in one step.
#[test]
fn a_symlink_swap_reloads_the_certificate() {
    let dir = TempDir::new("symlink");
    let version = |name: &str, validity| {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        certificate(&dir.path().join(name), "tls", NAMES, validity).unwrap()
    };
    let first = version("v1", Validity::days(30));
    let data = dir.path().join("..data");
    std::os::unix::fs::symlink("v1", &data).unwrap();
    let served = CertFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        ..first.clone()
    };
    std::os::unix::fs::symlink("..data/tls.crt", &served.cert).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", &served.key).unwrap();
    let (daemon, tls_listen) = start(&served, &[]);
    let mut before = Relayed::new(&Connector::new(&[&first.ca]).unwrap(), tls_listen);
    assert_eq!(before.client.served_leaf().unwrap(), first.leaf_der);
    before.round();

    let second = version("v2", Validity::days(60));
    let swap = dir.path().join("..data_tmp");
    std::os::unix::fs::symlink("v2", &swap).unwrap();
    std::fs::rename(&swap, &data).unwrap();
    relay_until_counted(&daemon, &mut before, RELOADS_OK);

    assert_reloaded(&daemon, tls_listen, &second, &mut before);
    assert_eq!(daemon.metric(RELOADS_ERROR), 0.0);
}

/// SIGHUP alone reloads: the files are rewritten in place keeping their inode, size and
/// modification time, all the daemon's watcher looks at, so the watcher cannot see it.
#[test]
fn sighup_reloads_a_certificate_the_watcher_cannot_see_change() {
    let dir = TempDir::new("sighup");
    let served = certificate(dir.path(), "served", NAMES, Validity::days(30)).unwrap();
    let (daemon, tls_listen) = start(&served, &[]);
    let mut before = Relayed::new(&Connector::new(&[&served.ca]).unwrap(), tls_listen);
    before.round();

    // "second" is as long as "served": the name is the CA's common name.
    let next = same_sized_certificate(dir.path(), "second", &served, Validity::days(60));
    overwrite_unseen(&served.key, &next.key);
    overwrite_unseen(&served.cert, &next.cert);
    daemon.signal("HUP");
    relay_until_counted(&daemon, &mut before, RELOADS_OK);

    assert_reloaded(&daemon, tls_listen, &next, &mut before);
    assert_eq!(daemon.metric(RELOADS_ERROR), 0.0);
}

#[test]
fn a_failed_reload_keeps_serving_the_certificate_it_had() {
    let dir = TempDir::new("failed");
    let served = certificate(dir.path(), "served", NAMES, Validity::days(30)).unwrap();
    let other = certificate(dir.path(), "other", NAMES, Validity::days(60)).unwrap();
    let (mut daemon, tls_listen) = start(&served, &[]);
    let connector = Connector::new(&[&served.ca]).unwrap();
    let mut before = Relayed::new(&connector, tls_listen);
    before.round();
    let good_key = dir.path().join("good.key");
    std::fs::copy(&served.key, &good_key).unwrap();

    // A key that does not match the certificate, renamed over the served key.
    std::fs::rename(&other.key, &served.key).unwrap();
    relay_until_counted(&daemon, &mut before, RELOADS_ERROR);
    let line = daemon.wait_for_log("TLS certificate reload failed", T);
    assert!(line.contains("does not match"), "{line}");

    // New connections get the certificate served before; a connector of its own, so that
    // the handshake is a full one and presents it.
    let fresh = Connector::new(&[&served.ca]).unwrap();
    let after = tls::Client::connect(&fresh, tls_listen, USER, PASSWORD).unwrap();
    assert_eq!(after.served_leaf().unwrap(), served.leaf_der);
    Relayed::over(after).still_works();
    before.still_works();
    assert_eq!(daemon.metric(RELOADS_OK), 0.0);
    wait_for_expiry(&daemon, served.not_after);

    // The matching key back: the next look loads the pair again.
    std::fs::rename(&good_key, &served.key).unwrap();
    relay_until_counted(&daemon, &mut before, RELOADS_OK);
    let again = tls::Client::connect(
        &Connector::new(&[&served.ca]).unwrap(),
        tls_listen,
        USER,
        PASSWORD,
    )
    .unwrap();
    assert_eq!(again.served_leaf().unwrap(), served.leaf_der);
    before.still_works();
}

/// After a reload to `next`: a new connection is served `next`'s leaf and relays; the
/// connection `before` (opened before the reload) still gets its Refresh answered and its
/// data relayed through the same relayed address; the expiry gauge shows `next`'s notAfter.
fn assert_reloaded(
    daemon: &Daemon,
    tls_listen: SocketAddr,
    next: &CertFiles,
    before: &mut Relayed,
) {
    // A connector of its own: resuming `before`'s session would present no certificate.
    let connector = Connector::new(&[&next.ca]).unwrap();
    let after = tls::Client::connect(&connector, tls_listen, USER, PASSWORD).unwrap();
    assert_eq!(after.served_leaf().unwrap(), next.leaf_der);
    Relayed::over(after).still_works();
    before.still_works();
    wait_for_expiry(daemon, next.not_after);
}

/// Relays through `relayed` (data both ways and a Refresh, paced like a media stream) until
/// the daemon counts `series` at least once: the reload happens under traffic.
fn relay_until_counted(daemon: &Daemon, relayed: &mut Relayed, series: &str) {
    let deadline = Instant::now() + T;
    while daemon.metric(series) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "{series} still 0 after {T:?}; output:\n{}",
            daemon.output()
        );
        relayed.round();
        relayed.refresh();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `tls_certificate_expiry_seconds` is `not_after` (within a second).
fn wait_for_expiry(daemon: &Daemon, not_after: i64) {
    daemon.wait_metric(EXPIRY, |v| (v - not_after as f64).abs() <= 1.0, T);
}

/// A certificate from a fresh CA whose chain and key files are exactly as long as `like`'s
/// (signatures and serial numbers vary by a byte or two, so a few draws find one); `name`
/// must be as long as `like`'s.
fn same_sized_certificate(
    dir: &Path,
    name: &str,
    like: &CertFiles,
    validity: Validity,
) -> CertFiles {
    let len = |path: &Path| std::fs::metadata(path).unwrap().len();
    for _ in 0..1000 {
        let drawn = certificate(dir, name, NAMES, validity).unwrap();
        if len(&drawn.cert) == len(&like.cert) && len(&drawn.key) == len(&like.key) {
            return drawn;
        }
    }
    panic!(
        "no certificate as long as {} in 1000 draws",
        like.cert.display()
    );
}

/// Writes `from`'s contents over `to` in place, keeping `to`'s inode, size and modification
/// time.
fn overwrite_unseen(to: &Path, from: &Path) {
    let modified = std::fs::metadata(to).unwrap().modified().unwrap();
    let contents = std::fs::read(from).unwrap();
    assert_eq!(contents.len() as u64, std::fs::metadata(to).unwrap().len());
    let mut file = std::fs::OpenOptions::new().write(true).open(to).unwrap();
    file.write_all(&contents).unwrap();
    file.set_modified(modified).unwrap();
}

// ---- bad input ----------------------------------------------------------------------------

#[test]
fn plain_http_on_a_tls_port_is_closed_as_not_turn() {
    let dir = TempDir::new("http");
    let (daemon, tls_listen, _, mut good) = start_with_a_good_client(&dir);
    // Both kinds of port take TLS and plain TURN: the TLS-only listener and the one beside UDP.
    for port in [tls_listen, daemon.listen] {
        let mut http = TcpStream::connect(port).unwrap();
        http.write_all(b"GET / HTTP/1.1\r\nHost: relay.example\r\n\r\n")
            .unwrap();
        let took = closed_within(&mut http, T);
        assert!(took < AT_ONCE, "port {port}: closed after {took:?}");
    }
    daemon.wait_metric(
        "turn_tcp_connections_closed_total{reason=\"not_turn\"}",
        |v| v == 2.0,
        T,
    );
    good.still_works();
}

/// The daemon has AEAD suites only and TLS 1.2 and 1.3: a client offering only a CBC suite,
/// or only TLS 1.1, gets a handshake_failure alert (RFC 8446 §6.2) and is counted.
#[test]
fn a_client_without_a_cipher_in_common_is_refused_and_counted() {
    let test = "a_client_without_a_cipher_in_common_is_refused_and_counted";
    let Some(openssl) = tests_harness::required_tool("openssl", test) else {
        return;
    };
    let dir = TempDir::new("cipher");
    let (daemon, tls_listen, _, mut good) = start_with_a_good_client(&dir);
    for offer in [&["-tls1_2", "-cipher", "AES128-SHA"][..], &["-tls1_1"]] {
        let mut s_client = Command::new(&openssl);
        s_client
            .args(["s_client", "-connect", &tls_listen.to_string()])
            .args(offer);
        let (success, output) = run_with_deadline(s_client, T);
        assert!(!success, "{offer:?} was accepted:\n{output}");
        assert!(
            output.contains("alert handshake failure"),
            "{offer:?}:\n{output}"
        );
    }
    daemon.wait_metric(
        "turn_tls_handshake_failures_total{reason=\"no_common_cipher\"}",
        |v| v == 2.0,
        T,
    );
    daemon.wait_metric(
        "turn_tcp_connections_closed_total{reason=\"tls_handshake\"}",
        |v| v == 2.0,
        T,
    );
    good.still_works();
}

#[test]
fn a_handshake_left_half_way_is_closed_at_the_handshake_deadline() {
    let dir = TempDir::new("half");
    let (daemon, tls_listen, _, mut good) = start_with_a_good_client(&dir);
    // A real ClientHello cut in half: its record header promises bytes that never come.
    let hello = client_hello(&Connector::new(&[]).unwrap(), tls_listen);
    let mut stalled = TcpStream::connect(tls_listen).unwrap();
    stalled.write_all(&hello[..hello.len() / 2]).unwrap();
    let took = closed_within(&mut stalled, HANDSHAKE_TIMEOUT + T);
    assert!(
        took >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
        "closed after {took:?}, before the handshake deadline"
    );
    assert!(
        took < HANDSHAKE_TIMEOUT + AT_ONCE,
        "closed after {took:?}, well after the handshake deadline"
    );
    daemon.wait_metric(
        "turn_tls_handshake_failures_total{reason=\"timeout\"}",
        |v| v == 1.0,
        T,
    );
    good.still_works();
}

#[test]
fn a_client_that_stops_reading_is_closed_at_the_write_deadline() {
    let dir = TempDir::new("stops-reading");
    let (daemon, tls_listen, connector, mut good) = start_with_a_good_client(&dir);
    // A receive buffer of a few kilobytes, set before connecting so that the window offered
    // is small from the start: once the daemon's send buffer is full, its writes block.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&tls_listen.into()).unwrap();
    let stream = connector.handshake(socket.into()).unwrap();
    let mut stalled = Relayed::over(tls::Client::new(stream, USER, PASSWORD));
    stalled.round();

    // The peer streams toward the client (about 16 MB/s) until the test ends; the client
    // never reads again.
    let stop = Arc::new(AtomicBool::new(false));
    let streamer = {
        let (peer, relayed) = (stalled.peer.try_clone().unwrap(), stalled.relayed);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let datagram = [0x55u8; 1000];
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..16 {
                    // Refused once the allocation is gone; the loop ends with the test.
                    let _ = peer.send_to(&datagram, relayed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let started = Instant::now();
    daemon.wait_metric(
        "turn_tcp_connections_closed_total{reason=\"write_timeout\"}",
        |v| v == 1.0,
        WRITE_TIMEOUT + T,
    );
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    streamer.join().unwrap();
    assert!(
        took >= WRITE_TIMEOUT,
        "closed after {took:?}, before the write deadline"
    );
    println!(
        "closed after {took:?}; frames dropped for the client meanwhile: {}",
        daemon.metric("turn_tcp_send_dropped_total")
    );
    good.still_works();
}

#[test]
fn a_tls_handshake_without_a_certificate_is_closed_and_counted() {
    let daemon = Daemon::start_with_ports(
        "127.0.0.1",
        quiet_port_range(50),
        &["--dev", "--user", "test:testpass"],
    );
    let started = Instant::now();
    let refused = Connector::new(&[]).unwrap().connect(daemon.listen);
    assert!(
        refused.is_err(),
        "a TLS handshake succeeded without a certificate"
    );
    let took = started.elapsed();
    assert!(took < AT_ONCE, "closed after {took:?}");
    daemon.wait_metric(
        "turn_tcp_connections_closed_total{reason=\"tls_not_configured\"}",
        |v| v == 1.0,
        T,
    );
    // Plain TURN over TCP on the same port is served as before.
    let mut plain = tls::Client::new(daemon.connect(), USER, PASSWORD);
    assert_success("Allocate over TCP", &plain.allocate().unwrap());
}

/// A daemon for the bad-input tests (handshake deadline [`HANDSHAKE_TIMEOUT`]), its TLS
/// listener, a connector that trusts it, and a well-behaved TLS client relaying through an allocation made before the
/// bad input arrives.
fn start_with_a_good_client(dir: &TempDir) -> (Daemon, SocketAddr, Connector, Relayed) {
    let served = certificate(dir.path(), "served", NAMES, Validity::days(30)).unwrap();
    let timeout = HANDSHAKE_TIMEOUT.as_secs().to_string();
    let (daemon, tls_listen) = start(&served, &["--tls-handshake-timeout-seconds", &timeout]);
    let connector = Connector::new(&[&served.ca]).unwrap();
    let mut good = Relayed::new(&connector, tls_listen);
    good.round();
    (daemon, tls_listen, connector, good)
}

/// The first flight of a TLS client of `server`: its ClientHello record.
fn client_hello(connector: &Connector, server: SocketAddr) -> Vec<u8> {
    let name = ServerName::IpAddress(server.ip().into());
    let mut connection = rustls::ClientConnection::new(connector.config(), name).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

/// Reads `stream` until the daemon closes it (EOF or a reset) and returns how long that
/// took; fails after `timeout`.
fn closed_within(stream: &mut TcpStream, timeout: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "not closed within {timeout:?}");
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::ConnectionReset => return started.elapsed(),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) => panic!("reading: {error}"),
        }
    }
}

/// Runs `command` (stdin closed) to its end within `timeout`: whether it succeeded, and its
/// stdout and stderr.
fn run_with_deadline(mut command: Command, timeout: Duration) -> (bool, String) {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(timeout) else {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
        panic!("{command:?} did not finish within {timeout:?}");
    };
    let output = output.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

// ---- ALPN and resumption ------------------------------------------------------------------

/// ALPN protocol names, in the order a client offers them.
type Protocols = &'static [&'static [u8]];

/// RFC 7443 §3: `stun.turn` is selected for a client that offers it; a client offering none,
/// or only other protocols, is served without ALPN rather than refused. On both kinds of port.
#[test]
fn alpn_stun_turn_is_selected_when_offered_and_not_required() {
    let dir = TempDir::new("alpn");
    let served = certificate(dir.path(), "served", NAMES, Validity::days(30)).unwrap();
    let (daemon, tls_listen) = start(&served, &[]);
    // What the client offers, and what the daemon must select.
    let offers: [(Protocols, Option<&[u8]>); 4] = [
        (&[ALPN_STUN_TURN], Some(ALPN_STUN_TURN)),
        (&[b"h2", ALPN_STUN_TURN], Some(ALPN_STUN_TURN)),
        (&[], None),
        (&[b"h2", b"http/1.1"], None),
    ];
    for port in [tls_listen, daemon.listen] {
        for (offer, selected) in offers {
            let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
            let connector = Connector::with(&[&served.ca], offer, &versions).unwrap();
            let mut client = tls::Client::connect(&connector, port, USER, PASSWORD)
                .unwrap_or_else(|error| panic!("port {port}, offering {offer:?}: {error:#}"));
            assert_eq!(client.alpn(), selected, "port {port}, offering {offer:?}");
            let answer = client.allocate().unwrap();
            assert_success(&format!("Allocate offering {offer:?}"), &answer);
        }
    }
}

#[test]
fn a_second_connection_resumes_the_first_ones_session() {
    let dir = TempDir::new("resume");
    let served = certificate(dir.path(), "served", NAMES, Validity::days(30)).unwrap();
    let (daemon, tls_listen) = start(&served, &[]);
    let versions = [
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3, "1.3"),
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2, "1.2"),
    ];
    for (version, expected, label) in versions {
        let connector = Connector::with(&[&served.ca], &[ALPN_STUN_TURN], &[version]).unwrap();
        let mut first = tls::Client::connect(&connector, tls_listen, USER, PASSWORD).unwrap();
        assert!(!first.resumed(), "TLS {label}: the first handshake resumed");
        assert_eq!(first.version(), Some(expected));
        // The exchange reads what the server sent after its handshake: TLS 1.3 tickets come
        // then (RFC 8446 §4.6.1).
        assert_success("Allocate", &first.allocate().unwrap());
        drop(first);
        let mut second = tls::Client::connect(&connector, tls_listen, USER, PASSWORD).unwrap();
        assert!(
            second.resumed(),
            "TLS {label}: the second handshake did not resume"
        );
        assert_eq!(second.version(), Some(expected));
        assert_success("Allocate", &second.allocate().unwrap());
        for (resumed, count) in [("false", 1.0), ("true", 1.0)] {
            daemon.wait_metric(
                &format!("turn_tls_handshakes_total{{version=\"{label}\",resumed=\"{resumed}\"}}"),
                |v| v == count,
                T,
            );
        }
    }
}

// ---- helpers ------------------------------------------------------------------------------

/// A daemon serving `cert`'s files on its `--listen` port (beside UDP) and on a TLS listener
/// of its own (`--tls-listen`), with `extra` arguments; and the TLS listener's address.
fn start(cert: &CertFiles, extra: &[&str]) -> (Daemon, SocketAddr) {
    let tls_listen = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")));
    let tls_listen_arg = tls_listen.to_string();
    let mut args = vec![
        "--dev",
        "--user",
        "test:testpass",
        "--tls-cert",
        text(&cert.cert),
        "--tls-key",
        text(&cert.key),
        "--tls-listen",
        &tls_listen_arg,
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_with_ports("127.0.0.1", quiet_port_range(50), &args);
    (daemon, tls_listen)
}

/// A TLS client with an allocation and [`CHANNEL`] bound to a UDP peer of its own on
/// loopback.
struct Relayed {
    client: tls::Client,
    peer: UdpSocket,
    relayed: SocketAddr,
    rounds: u32,
}

impl Relayed {
    /// Connects to `server` with `connector`, allocates and binds the channel.
    fn new(connector: &Connector, server: SocketAddr) -> Relayed {
        Relayed::over(tls::Client::connect(connector, server, USER, PASSWORD).unwrap())
    }

    /// Allocates over `client` and binds the channel to a new peer.
    fn over(mut client: tls::Client) -> Relayed {
        let answer = client.allocate().unwrap();
        assert_success("Allocate", &answer);
        let relayed = answer.xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(T)).unwrap();
        let answer = client
            .channel_bind(CHANNEL, peer.local_addr().unwrap())
            .unwrap();
        assert_success("ChannelBind", &answer);
        Relayed {
            client,
            peer,
            relayed,
            rounds: 0,
        }
    }

    /// One datagram each way: ChannelData to the peer, which sees it come from the relayed
    /// address, and the peer's answer back on the channel.
    fn round(&mut self) {
        self.rounds += 1;
        let out = format!("client to peer {}", self.rounds);
        self.client
            .send_channel_data(CHANNEL, out.as_bytes())
            .unwrap();
        let mut buf = [0u8; 1500];
        let (len, from) = self.peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], out.as_bytes());
        assert_eq!(from, self.relayed, "the peer sees the relayed address");
        let back = format!("peer to client {}", self.rounds);
        self.peer.send_to(back.as_bytes(), self.relayed).unwrap();
        let (channel, data) = self.client.recv_channel_data().unwrap();
        assert_eq!((channel, data), (CHANNEL, back.into_bytes()));
    }

    /// A Refresh, answered with success.
    fn refresh(&mut self) {
        let answer = self.client.refresh(600).unwrap();
        assert_success("Refresh", &answer);
    }

    /// The allocation is served as before: a Refresh answered, data relayed both ways
    /// through the same relayed address.
    fn still_works(&mut self) {
        self.refresh();
        self.round();
    }
}

fn assert_success(what: &str, answer: &Answer) {
    assert_eq!(answer.class, class::SUCCESS, "{what}: {answer:?}");
}

/// A path as the daemon's argument (the temporary directory's paths are UTF-8).
fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A directory of its own under the temporary directory, removed on drop (also when the
/// test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "turn-control-tls-{test}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
