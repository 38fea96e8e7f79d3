//! TURN over TLS and one port for every transport, in the lab (issue #16): turn-control
//! holding a certificate serves UDP, plain TCP and TLS on port 443 of each relay address
//! (its TCP listener tells a TLS handshake from TURN framing by the first byte) and TLS
//! alone on 5349, beside the xdp-agent relaying UDP channel data in the kernel. Clients we
//! did not write: coturn's `turnutils_uclient` in TLS (channel data and Send indications),
//! TCP and UDP modes over IPv4 and IPv6, every message echoed; the webrtc-rs client
//! allocating on UDP 443; and turn-control's handshake counters matching, by version, every
//! handshake uclient made, with uclient's deliberate TLS 1.0 and 1.1 attempts, refused, as
//! the only failures. Each run's figures are printed as a table (`--nocapture`).
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tests::agent::Agent;
use tests::{
    CLIENT_V4, CLIENT_V6, Lab, PEER_V4, PEER_V6, RELAY_V4, RELAY_V6, Site, TURN_CONTROL_METRICS,
    wait_for,
};
use tests_harness::coturn::{Totals, tools_present};
use tests_harness::tls::{CertFiles, Validity, certificate};

/// Clients per run (even: uclient pairs them up) and messages per client; small, the
/// figures are about every transport working, not load.
const CLIENTS: u64 = 4;
const MESSAGES: u64 = 30;
/// The one port for every transport: HTTPS's, which networks that let nothing else out still
/// let through.
const ONE_PORT: u16 = 443;
/// The conventional port of TURN over TLS (RFC 8656 §3.1), served by a TLS-only listener.
const TLS_PORT: u16 = 5349;
/// TLS connections uclient opens in a run of its default mode: its clients go in pairs (an
/// RTP and an RTCP session, EVEN-PORT and RESERVATION-TOKEN), a connection each, and every
/// pair first allocates once on a connection of its own (the "load balancing probe" of
/// coturn's startuclient.c `start_connection`).
const TLS_CONNECTIONS_PER_RUN: u64 = CLIENTS / 2 * 3;
/// Round trips of the webrtc-rs client through its allocation.
const ROUND_TRIPS: usize = 20;
/// How long a relayed datagram or a counter may take.
const T: Duration = Duration::from_secs(10);

/// How a mode of uclient reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// One mode of `turnutils_uclient`.
struct Mode {
    name: &'static str,
    /// `-S` alone is DTLS; over TCP (`-t`) it is TLS.
    flags: &'static [&'static str],
    transport: Transport,
}

const TLS_CHANNELS: Mode = Mode {
    name: "-t -S (TLS, channel data)",
    flags: &["-t", "-S"],
    transport: Transport::Tls,
};
const TLS_SEND: Mode = Mode {
    name: "-t -S -s (TLS, Send indications)",
    flags: &["-t", "-S", "-s"],
    transport: Transport::Tls,
};
const TCP: Mode = Mode {
    name: "-t (TCP)",
    flags: &["-t"],
    transport: Transport::Tcp,
};
const UDP: Mode = Mode {
    name: "UDP (channel data in the kernel)",
    flags: &[],
    transport: Transport::Udp,
};

/// What each port serves: 443 every transport, 5349 TLS alone.
const RUNS: &[(u16, &[Mode])] = &[
    (ONE_PORT, &[TLS_CHANNELS, TLS_SEND, TCP, UDP]),
    (TLS_PORT, &[TLS_CHANNELS, TLS_SEND]),
];

/// The sum of the samples of `name` whose labels contain `label` (`""`: all), in a
/// Prometheus text body.
fn labelled_sum(body: &str, name: &str, label: &str) -> u64 {
    body.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
                && line.contains(label)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// uclient's log lines, each once. Its logger writes the first line to stdout before it
/// learns that its log file is stdout too, and then writes it there again (coturn's
/// ns_turn_utils.c `turn_log_func_default`); every later line is written once.
fn uclient_log(stdout: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = stdout.lines().collect();
    if lines.len() >= 2 && lines[0] == lines[1] {
        lines.remove(0);
    }
    lines
}

/// TLS handshakes as one side counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Handshakes {
    tls12: u64,
    tls13: u64,
    /// Refused for no protocol version or cipher suite in common.
    refused: u64,
    /// Failed for any other reason (timeout, protocol, alert, closed).
    failed: u64,
}

impl Handshakes {
    /// turn-control's counters: `turn_tls_handshakes_total` by version,
    /// `turn_tls_handshake_failures_total` by reason.
    fn scrape(lab: &Lab) -> Handshakes {
        let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS).unwrap();
        let completed = "turn_tls_handshakes_total";
        let failures = "turn_tls_handshake_failures_total";
        let refused = labelled_sum(&body, failures, "reason=\"no_common_cipher\"");
        Handshakes {
            tls12: labelled_sum(&body, completed, "version=\"1.2\""),
            tls13: labelled_sum(&body, completed, "version=\"1.3\""),
            refused,
            failed: labelled_sum(&body, failures, "") - refused,
        }
    }

    /// What uclient printed of its connects. Each TLS connect takes one of its SSL contexts
    /// at random: any version up to 1.3, or TLS 1.0, 1.1 or 1.2 alone (coturn's
    /// mainuclient.c); one that fails is retried on a new connection. So a server that
    /// speaks TLS 1.2 and 1.3 only refuses about half of uclient's attempts by design.
    /// uclient prints "cannot connect" also for a handshake that merely has to wait for
    /// the socket; the OpenSSL error line follows only a handshake that failed.
    fn of_uclient(stdout: &str) -> Handshakes {
        let lines = uclient_log(stdout);
        let count = |pattern: &str| lines.iter().filter(|l| l.contains(pattern)).count() as u64;
        Handshakes {
            tls12: count("client session connected with cipher") - count("method=TLSv1.3"),
            tls13: count("method=TLSv1.3"),
            refused: count("SSL routines::"),
            failed: 0,
        }
    }

    fn completed(self) -> u64 {
        self.tls12 + self.tls13
    }

    fn since(self, before: Handshakes) -> Handshakes {
        Handshakes {
            tls12: self.tls12 - before.tls12,
            tls13: self.tls13 - before.tls13,
            refused: self.refused - before.refused,
            failed: self.failed - before.failed,
        }
    }

    fn add(self, other: Handshakes) -> Handshakes {
        Handshakes {
            tls12: self.tls12 + other.tls12,
            tls13: self.tls13 + other.tls13,
            refused: self.refused + other.refused,
            failed: self.failed + other.failed,
        }
    }
}

/// Starts the agent relaying channel data that arrives on 3478 and 443, and turn-control
/// with the certificate on `--listen` 443 (UDP, TCP and TLS) and `--tls-listen` 5349 (TLS)
/// of both relay addresses, beside the lab's 3478; peers echo on 3480 (IPv4) and 3481
/// (IPv6). Returns the agent's socket and the certificate's files.
fn start(lab: &mut Lab) -> (PathBuf, CertFiles) {
    let names = [
        RELAY_V4.to_string(),
        RELAY_V6.to_string(),
        "relay.lab.example".to_owned(),
    ];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let cert = certificate(lab.dir(), "relay", &names, Validity::days(30)).unwrap();
    let one_port = [
        SocketAddr::new(IpAddr::V4(RELAY_V4), ONE_PORT).to_string(),
        SocketAddr::new(IpAddr::V6(RELAY_V6), ONE_PORT).to_string(),
    ];
    let tls_port = [
        SocketAddr::new(IpAddr::V4(RELAY_V4), TLS_PORT).to_string(),
        SocketAddr::new(IpAddr::V6(RELAY_V6), TLS_PORT).to_string(),
    ];
    // The agent takes from turn-control only the UDP listeners its own flags name.
    let mut agent_args = vec!["--xdp-mode", "native", "--listen", "0.0.0.0:3478,[::]:3478"];
    for listener in &one_port {
        agent_args.extend(["--listen", listener.as_str()]);
    }
    let socket = lab.start_xdp_agent(&agent_args).unwrap();
    let (cert_path, key_path) = (
        cert.cert.to_str().unwrap().to_owned(),
        cert.key.to_str().unwrap().to_owned(),
    );
    let mut args = vec!["--tls-cert", &cert_path, "--tls-key", &key_path];
    for listener in &one_port {
        args.extend(["--listen", listener.as_str()]);
    }
    for listener in &tls_port {
        args.extend(["--tls-listen", listener.as_str()]);
    }
    lab.start_turn_control(Some(&socket), &args).unwrap();
    lab.wait_agent_connected(Site::A).unwrap();
    for (peer, port) in [(IpAddr::V4(PEER_V4), "3480"), (IpAddr::V6(PEER_V6), "3481")] {
        let mut command = lab.peer.command("turnutils_peer");
        command.args(["-L", &peer.to_string(), "-p", port]);
        lab.spawn(&format!("turnutils_peer-{port}"), command)
            .unwrap();
    }
    (socket, cert)
}

/// One uclient run's figures.
struct Figures {
    totals: Totals,
    /// Channel data the kernel relayed during the run.
    kernel: u64,
    /// TLS handshakes turn-control counted during the run.
    handshakes: Handshakes,
    /// How long uclient ran.
    seconds: f64,
}

/// Runs uclient in `mode` against `server`, echoing through the peer of the server's
/// family, and checks that every message came back, that UDP channel data went through the
/// kernel, and that turn-control counted exactly the TLS handshakes uclient made (none for
/// plain TCP and UDP).
fn run_uclient(
    lab: &Lab,
    agent: &mut Agent,
    ca: &Path,
    server: SocketAddr,
    mode: &Mode,
) -> Figures {
    let (peer, peer_port) = if server.is_ipv6() {
        (IpAddr::V6(PEER_V6), "3481")
    } else {
        (IpAddr::V4(PEER_V4), "3480")
    };
    let kernel_before = agent.relayed_in_kernel().unwrap();
    let handshakes_before = Handshakes::scrape(lab);
    let mut uclient = lab.client.command("turnutils_uclient");
    uclient
        .args(["-u", "test", "-w", "testpass"])
        .args(["-e", &peer.to_string(), "-r", peer_port])
        .args(["-m", &CLIENTS.to_string(), "-n", &MESSAGES.to_string()])
        .args(["-l", "120", "-z", "5"])
        .args(mode.flags);
    if mode.transport == Transport::Tls {
        // The served chain must verify against the lab's CA (uclient verifies only with -E).
        uclient.arg("-E").arg(ca);
    }
    uclient.args(["-p", &server.port().to_string(), &server.ip().to_string()]);
    let started = Instant::now();
    let output = uclient.output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = || {
        format!(
            "{} to {server}: uclient exited {}\n{stdout}\n{stderr}\nturn-control:\n{}",
            mode.name,
            output.status,
            lab.log("turn-control")
        )
    };
    assert!(output.status.success(), "{}", context());
    let totals =
        Totals::parse(&stdout).unwrap_or_else(|| panic!("no totals from uclient: {}", context()));
    // uclient counts what its clients sent: at least every message of every client (with
    // RTCP, more).
    assert!(totals.sent >= CLIENTS * MESSAGES, "{}", context());
    assert_eq!(
        totals.received,
        totals.sent,
        "every message echoed: {}",
        context()
    );

    let kernel = agent.relayed_in_kernel().unwrap() - kernel_before;
    if mode.transport == Transport::Udp {
        assert!(
            kernel >= totals.sent,
            "{} to {server}: {kernel} of {} relayed in the kernel",
            mode.name,
            totals.sent
        );
    }
    let uclient_handshakes = Handshakes::of_uclient(&stdout);
    if mode.transport == Transport::Tls {
        assert!(
            uclient_handshakes.completed() >= TLS_CONNECTIONS_PER_RUN,
            "uclient made {uclient_handshakes:?}, for {TLS_CONNECTIONS_PER_RUN} connections\n{}",
            context()
        );
    }
    // A handshake is counted when it ends, before the connection carries a message; the
    // wait only covers the scrape racing the count.
    let handshakes = wait_for("turn-control to count uclient's handshakes", T, || {
        let counted = Handshakes::scrape(lab).since(handshakes_before);
        Ok((counted == uclient_handshakes).then_some(counted))
    })
    .unwrap_or_else(|error| {
        let counted = Handshakes::scrape(lab).since(handshakes_before);
        panic!(
            "{error}: turn-control counted {counted:?}, uclient made {uclient_handshakes:?}\n{}",
            context()
        )
    });
    Figures {
        totals,
        kernel,
        handshakes,
        seconds,
    }
}

/// The webrtc-rs client from `client` on UDP 443: allocate, then round trips to a peer on
/// the relayed address. webrtc-rs's TURN client speaks UDP only (its `ClientConfig` takes a
/// datagram `Conn`), so TCP and TLS are uclient's part.
fn webrtc_on_one_port(lab: &Lab, client: IpAddr, relay: IpAddr) {
    let runtime = tests::clients::runtime().unwrap();
    runtime.block_on(async {
        let server = SocketAddr::new(relay, ONE_PORT);
        let turn = tests::clients::webrtc_client(&lab.client, client, server)
            .await
            .unwrap();
        let relayed = turn
            .allocate()
            .await
            .unwrap_or_else(|error| panic!("webrtc-rs Allocate to {server}: {error}"));
        // webrtc-rs asks no address family: the relayed address is IPv4 (RFC 8656 §7.2).
        let peer = tests::clients::udp_socket(&lab.peer, IpAddr::V4(PEER_V4)).unwrap();
        tests::clients::round_trips(&relayed, &peer, ROUND_TRIPS, T)
            .await
            .unwrap_or_else(|error| panic!("webrtc-rs through {server}: {error:#}"));
        webrtc_util::Conn::close(&relayed).await.unwrap();
        turn.close().await.unwrap();
    });
}

/// Every transport on 443 and TLS on 5349 of the relay address of the client's family,
/// then the webrtc-rs client on UDP 443, in one lab.
fn run_family(client: IpAddr) {
    if !tests::privileged() || !tools_present("tls_lab") {
        return;
    }
    let relay = if client.is_ipv4() {
        IpAddr::V4(RELAY_V4)
    } else {
        IpAddr::V6(RELAY_V6)
    };
    let mut lab = Lab::new().unwrap();
    let (socket, cert) = start(&mut lab);
    let mut agent = Agent::connect(&socket).unwrap();
    let before = Handshakes::scrape(&lab);

    let mut table = Vec::new();
    let mut tls_connections = 0;
    let mut made = Handshakes::default();
    for (port, modes) in RUNS {
        for mode in *modes {
            let server = SocketAddr::new(relay, *port);
            let Figures {
                totals,
                kernel,
                handshakes,
                seconds,
            } = run_uclient(&lab, &mut agent, &cert.ca, server, mode);
            if mode.transport == Transport::Tls {
                tls_connections += TLS_CONNECTIONS_PER_RUN;
            }
            made = made.add(handshakes);
            table.push(format!(
                "{:<22} {:<34} {:>5} {:>8} {:>4} {:>6} {:>6} {:>6} {:>7} {:>7.1}",
                server.to_string(),
                mode.name,
                totals.sent,
                totals.received,
                totals.sent - totals.received,
                kernel,
                handshakes.tls12,
                handshakes.tls13,
                handshakes.refused,
                seconds
            ));
        }
    }
    println!(
        "turnutils_uclient over {}, {CLIENTS} clients x {MESSAGES} messages (TLS: handshakes \
         turn-control counted, each equal to what uclient printed):\n\
         {:<22} {:<34} {:>5} {:>8} {:>4} {:>6} {:>6} {:>6} {:>7} {:>7}\n{}",
        tests::family(client),
        "server",
        "mode",
        "sent",
        "received",
        "lost",
        "kernel",
        "TLS1.2",
        "TLS1.3",
        "refused",
        "seconds",
        table.join("\n")
    );

    // Every connection uclient opened was a completed handshake; what failed were only its
    // deliberate TLS 1.0 and 1.1 attempts, refused for no version in common.
    let grown = Handshakes::scrape(&lab).since(before);
    println!(
        "turn_tls_handshakes_total grew by {} (1.2: {}, 1.3: {}) for {tls_connections} TLS \
         connections; turn_tls_handshake_failures_total grew by {} no_common_cipher (uclient's \
         TLS 1.0 and 1.1 attempts: {}) and {} otherwise",
        grown.completed(),
        grown.tls12,
        grown.tls13,
        grown.refused,
        made.refused,
        grown.failed
    );
    assert!(
        grown.completed() >= tls_connections,
        "{grown:?} for {tls_connections} TLS connections"
    );
    assert_eq!(grown, made, "turn-control's counters against uclient's");
    assert_eq!(
        grown.failed,
        0,
        "TLS handshakes failed other than for an old version\nturn-control:\n{}",
        lab.log("turn-control")
    );

    webrtc_on_one_port(&lab, client, relay);
    println!(
        "webrtc-rs over {}: allocated on UDP {ONE_PORT}, {ROUND_TRIPS} round trips to the peer",
        tests::family(client)
    );
}

#[test]
fn one_port_serves_udp_tcp_and_tls_and_5349_serves_tls_over_ipv4() {
    run_family(IpAddr::V4(CLIENT_V4));
}

#[test]
fn one_port_serves_udp_tcp_and_tls_and_5349_serves_tls_over_ipv6() {
    run_family(IpAddr::V6(CLIENT_V6));
}
