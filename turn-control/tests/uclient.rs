//! coturn's `turnutils_uclient` (many clients) echoing through `turnutils_peer` via the real
//! daemon: UDP and TCP, IPv4 and IPv6 (::1). Missing tools fail the test when `CI=true`
//! and print a loud SKIPPED line otherwise.

#![expect(clippy::unwrap_used, reason = "tests: a failure is a test failure")]

mod common;

use std::collections::BTreeSet;
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
    let args = [&["-z", "5", "-c"], extra].concat();
    uclient_echo(test, &daemon, ip, (10, 100), &args);
}

/// Runs the uclient with `args` against `daemon` (listening on `ip`): `clients` of them, each
/// sending `messages` to a fresh `turnutils_peer` on `ip`. Asserts that all were sent and
/// (nearly) all came back, and returns the totals and the uclient's output.
fn uclient_echo(
    test: &str,
    daemon: &Daemon,
    ip: &str,
    (clients, messages): (u64, u64),
    args: &[&str],
) -> (Totals, String) {
    let (_peer, peer_port) = Peer::start(ip);
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
    ])
    .args(args)
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
    (totals, output)
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

/// uclient's default mode (no `-c`): each client allocates its RTP relay with EVEN-PORT and
/// the R bit, then its RTCP relay from another local socket with the RESERVATION-TOKEN. With
/// four threads the kernel (hashing the client's port) usually steers that second Allocate to
/// another thread than the first, whose core must honour the token: RFC 8656 §7.2 makes it
/// server-wide.
#[test]
fn rtp_and_rtcp_relays_pair_up_across_threads_ipv4_udp() {
    let test = "rtp_and_rtcp_relays_pair_up_across_threads_ipv4_udp";
    if !tools_present(test) {
        return;
    }
    let args = ["--dev", "--user", "test:testpass", "--threads", "4"];
    let daemon = Daemon::start("127.0.0.1", &args);
    let (totals, output) = uclient_echo(test, &daemon, "127.0.0.1", (10, 50), &[]);
    assert_eq!(totals.received, totals.sent, "{test}: {output}");
    let refused = "turn_requests_total{method=\"allocate\",code=\"508\"}";
    assert_eq!(daemon.metric(refused), 0.0, "{}", daemon.output());

    // The RTCP relays took the ports their RTP relays reserved: odd, next to an allocation's
    // even port. (uclient leaves one reservation unused with `-m 10`, on one thread as well.)
    let log = daemon.output();
    let field = |line: &str, key: &str| -> String {
        let rest = &line[line.find(key).unwrap() + key.len()..];
        rest.split_whitespace().next().unwrap().to_owned()
    };
    let mut reserved: BTreeSet<String> = log
        .lines()
        .filter(|l| l.contains("port reserved"))
        .map(|l| field(l, " relay="))
        .collect();
    // A pair whose port was taken by another socket moved before its token went out.
    for moved in log.lines().filter(|l| l.contains("reserved port moved")) {
        reserved.remove(&field(moved, " from="));
        reserved.insert(field(moved, " relay="));
    }
    let taken: Vec<(String, String, String)> = log
        .lines()
        .filter(|l| l.contains("reserved port taken "))
        .map(|l| {
            (
                field(l, " relay="),
                field(l, " core="),
                field(l, " maker_core="),
            )
        })
        .collect();
    assert!(
        taken.len() + 1 >= reserved.len() && !taken.is_empty(),
        "{test}: {} of {} reservations used:\n{log}",
        taken.len(),
        reserved.len()
    );
    for (relay, ..) in &taken {
        assert!(reserved.contains(relay), "{test}: {relay} taken unreserved");
        let port: u16 = relay.rsplit_once(':').unwrap().1.parse().unwrap();
        assert_eq!(port % 2, 1, "{test}: reserved port {relay} is even");
        let maker = format!(" port={} ", port - 1);
        assert!(
            log.lines()
                .any(|l| l.contains("allocation created") && l.contains(&maker)),
            "{test}: no allocation on the even port below {relay}:\n{log}"
        );
    }
    // One pair on one thread has a chance of 1/4; all of them, of 4^-(pairs - 1).
    assert!(
        taken.iter().any(|(_, core, maker)| core != maker),
        "{test}: every token was used on the thread that made it: {taken:?}"
    );
}
