//! coturn's `turnutils_uclient` (many clients) echoing through `turnutils_peer` via the real
//! daemon: UDP and TCP, IPv4 and IPv6 (::1). Missing tools fail the test when `CI=true`
//! and print a loud SKIPPED line otherwise.

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, free_port};
use tests_harness::coturn::{Totals, tools_present};

/// `turnutils_peer`, killed on drop.
struct Peer(Child);

impl Peer {
    fn start(ip: &str) -> (Peer, u16) {
        let port = free_port(ip);
        let child = Command::new("turnutils_peer")
            .args(["-L", ip, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let peer = Peer(child);
        // Ready when it echoes.
        let probe = UdpSocket::bind((ip, 0)).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 16];
        loop {
            probe.send_to(b"ping", (ip, port)).unwrap();
            if probe.recv_from(&mut buf).is_ok() {
                return (peer, port);
            }
            assert!(Instant::now() < deadline, "turnutils_peer did not echo");
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the uclient against a fresh daemon listening on `ip` and asserts (nearly) every
/// message came back.
fn echo(test: &str, ip: &str, extra: &[&str]) {
    if !tools_present(test) {
        return;
    }
    let daemon = Daemon::start(ip, &["--dev", "--user", "test:testpass"]);
    let (_peer, peer_port) = Peer::start(ip);
    let (clients, messages) = (10u64, 100u64);
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args([
        "-u",
        "test",
        "-w",
        "testpass",
        "-e",
        ip,
        "-r",
        &peer_port.to_string(),
    ])
    .args([
        "-m",
        &clients.to_string(),
        "-n",
        &messages.to_string(),
        "-l",
        "100",
        "-z",
        "5",
        "-c",
    ])
    .args(extra)
    .args(["-p", &daemon.listen.port().to_string(), ip])
    .stdin(Stdio::null());
    let started = Instant::now();
    let output = run_with_deadline(cmd, Duration::from_secs(60));
    let totals = Totals::parse(&output)
        .unwrap_or_else(|| panic!("{test}: no totals in uclient output:\n{output}"));
    eprintln!("{test}: {totals:?} in {:?}", started.elapsed());
    assert_eq!(totals.sent, clients * messages, "{test}: {output}");
    assert!(
        totals.received * 100 >= totals.sent * 99,
        "{test}: only {} of {} echoed:\n{output}",
        totals.received,
        totals.sent
    );
    daemon.wait_metric(
        "data_relayed_userspace_packets_total{direction=\"peer_to_client\"}",
        |v| v >= totals.received as f64,
        Duration::from_secs(5),
    );
}

fn run_with_deadline(mut cmd: Command, timeout: Duration) -> String {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            let out = out.unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        }
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("turnutils_uclient did not finish within {timeout:?}");
        }
    }
}

// `-s`: Send and Data indications. coturn's uclient draws channel numbers from the RFC 5766
// range 0x4000-0x7FFF, and turn-control-core accepts only RFC 8656's 0x4000-0x4FFF (§12), so three
// of four of its ChannelBinds get 400 and it stops; see `channel_data_ipv4_udp` below.

#[test]
fn send_indications_ipv4_udp() {
    echo("send_indications_ipv4_udp", "127.0.0.1", &["-s", "-X"]);
}

#[test]
fn send_indications_ipv4_tcp() {
    echo(
        "send_indications_ipv4_tcp",
        "127.0.0.1",
        &["-s", "-X", "-t"],
    );
}

#[test]
fn send_indications_ipv6_udp() {
    echo("send_indications_ipv6_udp", "::1", &["-s", "-x"]);
}

#[test]
fn send_indications_ipv6_tcp() {
    echo("send_indications_ipv6_tcp", "::1", &["-s", "-x", "-t"]);
}

#[test]
fn channel_data_ipv4_udp() {
    echo("channel_data_ipv4_udp", "127.0.0.1", &["-X"]);
}

#[test]
fn channel_data_ipv4_tcp() {
    echo("channel_data_ipv4_tcp", "127.0.0.1", &["-X", "-t"]);
}
