//! TURN over TLS (RFC 8656 §3.1; ALPN `stun.turn`, RFC 7443), coturn beside turn-control
//! in the same run on the same machine: TLS handshakes per second, full and resumed, and
//! messages relayed per second from a client on TLS to a UDP peer.
//!
//! Each server runs alone in the relay namespace of its own [`BenchNet`], both at once and
//! both with the same certificate files (an ECDSA P-256 leaf for 203.0.113.10 signed by a
//! private CA, `tests_harness::tls`), on [`TLS_PORT`]. The clients are tokio tasks on
//! threads that entered the net's generator namespace: rustls with the workspace's crypto
//! provider (the daemon's), verifying the server's certificate against the CA and the relay's IP address SAN, as a
//! TURN client configured with the relay's address does.
//!
//! - Handshakes: tasks that each connect, complete the TLS handshake, send a STUN Binding
//!   request over the stream and read its success response (the stream carries TURN, not
//!   only TLS), then close (close_notify, FIN, and the server's close read to the end);
//!   completed cycles are counted over a fixed window after a warm-up. Once with no
//!   resumption (every handshake full: the certificate signed by the server and verified
//!   by the client), once with a session cache shared by the tasks (TLS 1.3 tickets: a
//!   resumed handshake skips the certificate, not the key exchange); the share of resumed
//!   handshakes is what the client saw.
//! - Relayed messages: clients on TLS each allocate (long-term credentials, the realm
//!   learnt from the 401) and bind a channel to their own port of the peer's address, then
//!   write ChannelData frames back to back for a fixed window, as fast as the relay reads
//!   them (TCP's flow control holds the writer back). The XDP sink on the generator's `rx`
//!   counts and checks what reaches the peer, per client (source: the allocation's relayed
//!   address; UDP length), and drops it: what is counted is what the peer receives.
//!
//! Rounds interleave the servers (alternating which goes first) so that a drift of a shared
//! machine's load falls on both alike; the report quotes medians over the rounds.

use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, NamedGroup, ProtocolVersion, RootCertStore,
};
use tests_harness::stun::{Answer, LongTerm, Msg, attr, channel_number, class, method};
use tests_harness::tls::{CertFiles, Validity};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::raw::percentile;
use super::turn::FIRST_CHANNEL;
use super::{BenchNet, CLIENT, Ns, PEER, RELAY, RULES, Rule, process_cpu_ns};

/// The relays' TLS port (RFC 8656 §3.1: 5349 by convention), on [`RELAY`]'s address.
pub const TLS_PORT: u16 = 5349;
/// The ChannelData payload of the relayed-message runs: with its 4-byte header a multiple of
/// four, so that no padding is needed on a stream (RFC 8656 §12.5).
pub const PAYLOAD: usize = 100;
/// Relay client `i` binds its channel to [`PEER`]'s address, this port + `i`.
pub const FIRST_PEER_PORT: u16 = PEER.port();
/// The ALPN protocol a TURN client offers (RFC 7443 §5).
const ALPN: &[u8] = b"stun.turn";
/// ChannelData frames per write: 150 of 104 bytes fill one TLS record (at most 16 KiB).
const FRAMES_PER_WRITE: usize = 150;
/// A connection's cycle, or a write, that takes longer has failed.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The bench's user (as in `tests::bench::turn`).
const USER: &str = "test";
const PASSWORD: &str = "testpass";

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// coturn's `turnserver` with a TLS listener.
    Coturn,
    /// turn-control with `--tls-listen`.
    TurnControl,
}

impl Server {
    /// Both, in the order of the report's columns.
    pub const BOTH: [Server; 2] = [Server::Coturn, Server::TurnControl];

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Server::Coturn => "coturn 4.6",
            Server::TurnControl => "turn-control",
        }
    }

    /// The name of its process (and log file) in its [`BenchNet`].
    fn process(self) -> &'static str {
        match self {
            Server::Coturn => "turnserver",
            Server::TurnControl => "turn-control",
        }
    }
}

/// What the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TLS 1.2 alone: what both servers take (coturn 4.6.1 as Debian builds it answers a TLS
    /// 1.3 ClientHello with a handshake_failure alert), so the comparison is like for like.
    Tls12,
    /// What the client offers by default (TLS 1.3 and 1.2, key exchange groups in a
    /// browser's order: X25519MLKEM768, X25519, secp256r1, secp384r1): measured for a server
    /// that then negotiates TLS 1.3.
    Offered,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Tls12 => "TLS 1.2",
            Protocol::Offered => "TLS 1.3 (as offered)",
        }
    }
}

/// The servers' arguments as the rest of the bench starts them (listeners on [`RELAY`], the
/// bench's user and realm, relay ports, logging), without any TLS option: this module adds
/// the certificate and the TLS listener.
#[derive(Debug, Clone)]
pub struct Commands {
    /// `turnserver`'s arguments (without `--no-tls`).
    pub coturn: Vec<String>,
    /// The turn-control binary.
    pub turn_control: PathBuf,
    /// Its arguments.
    pub turn_control_args: Vec<String>,
}

/// The shape of a run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Rounds; each measures every figure of both servers once.
    pub rounds: usize,
    /// The counted window of each measurement.
    pub window: Duration,
    /// What runs before each window and is not counted (for the resumed handshakes it also
    /// fills the session cache).
    pub warm_up: Duration,
    /// Client threads (each entered the generator's namespace).
    pub threads: usize,
    /// Handshake tasks running at once.
    pub handshake_tasks: usize,
    /// Relay clients, each its own TLS connection, allocation and peer port.
    pub relay_clients: usize,
}

impl Shape {
    /// The bench's shape: `rounds` rounds of `window` each, after a warm-up of 0.3 s (0.1 s
    /// when `quick`); one client thread per CPU, twice as many handshake tasks and relay
    /// clients (at most one per sink rule).
    pub fn bench(rounds: usize, window: Duration, quick: bool) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            rounds,
            window,
            warm_up: Duration::from_millis(if quick { 100 } else { 300 }),
            threads: cpus,
            handshake_tasks: 2 * cpus,
            relay_clients: (2 * cpus).min(RULES),
        }
    }
}

/// One window of handshake cycles.
#[derive(Debug, Clone, Copy, Default)]
pub struct HandshakeRun {
    /// Completed cycles (handshake, Binding, close) per second.
    pub per_second: f64,
    /// The share of them the client saw resumed.
    pub resumed_share: f64,
    /// The share of them whose server closed with a bare FIN, without answering the
    /// client's close_notify with its own (RFC 8446 §6.1).
    pub bare_close_share: f64,
    /// The server's CPU time (user + system) per completed cycle, in µs.
    pub server_cpu_us: f64,
    /// Cycles that failed in the window.
    pub failed: u64,
}

/// One window of relayed messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayRun {
    /// ChannelData messages that reached the peer, per second.
    pub delivered_per_second: f64,
    /// Messages the clients wrote into their TLS streams, per second.
    pub written_per_second: f64,
    /// The server's CPU time per delivered message, in µs.
    pub server_cpu_us: f64,
    /// Datagrams at the peer that failed the sink's checks.
    pub bad: u64,
}

/// The handshake windows of one client configuration, one a round.
#[derive(Debug, Clone)]
pub struct HandshakeSeries {
    /// What the client offered.
    pub protocol: Protocol,
    /// Whether it kept a session cache.
    pub resumption: bool,
    /// One per round.
    pub runs: Vec<HandshakeRun>,
}

/// What was measured of one server.
#[derive(Debug, Clone)]
pub struct Figures {
    /// The server.
    pub server: Server,
    /// What a handshake of each client configuration negotiated with it (version, cipher
    /// suite, key exchange, ALPN).
    pub negotiated: Vec<(Protocol, String)>,
    /// The relay clients' allocations: relayed address -> peer.
    pub allocations: Vec<(SocketAddrV4, SocketAddrV4)>,
    /// Handshake windows, one a round, per client configuration measured.
    pub handshakes: Vec<HandshakeSeries>,
    /// Relayed messages, one per round.
    pub relayed: Vec<RelayRun>,
    /// Messages written over the whole run that never reached the peer (after a drain).
    pub lost: u64,
    /// Messages written over the whole run.
    pub written: u64,
    /// The first failure of a handshake cycle, if any.
    pub first_failure: Option<String>,
}

impl Figures {
    /// The windows of `protocol` with or without `resumption` (none: not measured).
    pub fn handshakes(&self, protocol: Protocol, resumption: bool) -> Option<&[HandshakeRun]> {
        self.handshakes
            .iter()
            .find(|s| s.protocol == protocol && s.resumption == resumption)
            .map(|s| s.runs.as_slice())
    }

    fn push_handshakes(&mut self, protocol: Protocol, resumption: bool, run: HandshakeRun) {
        match self
            .handshakes
            .iter_mut()
            .find(|s| s.protocol == protocol && s.resumption == resumption)
        {
            Some(series) => series.runs.push(run),
            None => self.handshakes.push(HandshakeSeries {
                protocol,
                resumption,
                runs: vec![run],
            }),
        }
    }
}

/// Measures both servers: starts them with one certificate, sets the relay clients up, then
/// runs `shape.rounds` rounds, each measuring full handshakes, resumed handshakes and
/// relayed messages of both servers in turn (the first server alternating).
pub fn measure(commands: &Commands, shape: Shape) -> anyhow::Result<Vec<Figures>> {
    let certificate = CertificateDir::new()?;
    let mut contenders = Vec::new();
    for server in Server::BOTH {
        eprintln!("bench: TLS: starting {}", server.name());
        contenders.push(Contender::start(
            server,
            commands,
            &certificate.files,
            shape,
        )?);
    }
    for round in 0..shape.rounds {
        let mut order: Vec<usize> = (0..contenders.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for resumption in [false, true] {
            for &index in &order {
                let contender = &mut contenders[index];
                for protocol in contender.protocols.clone() {
                    let run = contender.handshakes(shape, protocol, resumption)?;
                    contender.figures.push_handshakes(protocol, resumption, run);
                }
            }
        }
        for &index in &order {
            let run = contenders[index].relayed(shape)?;
            contenders[index].figures.relayed.push(run);
        }
        for contender in &contenders {
            log_round(&contender.figures, round, shape.rounds);
        }
    }
    let mut figures = Vec::new();
    for mut contender in contenders {
        contender.finish()?;
        figures.push(contender.figures.clone());
    }
    Ok(figures)
}

/// A round's figures of one server, as they come (the section has them in full).
fn log_round(figures: &Figures, round: usize, rounds: usize) {
    let mut line = format!(
        "bench: TLS round {}/{rounds} {:<13}",
        round + 1,
        figures.server.name()
    );
    for series in &figures.handshakes {
        if let Some(run) = series.runs.get(round) {
            line.push_str(&format!(
                " {} {}: {:.0}/s ({:.0}% resumed, {:.0} us CPU);",
                series.protocol.label(),
                if series.resumption { "cached" } else { "full" },
                run.per_second,
                run.resumed_share * 100.0,
                run.server_cpu_us
            ));
        }
    }
    if let Some(run) = figures.relayed.get(round) {
        line.push_str(&format!(
            " relayed {:.0} msg/s ({:.2} us CPU; written {:.0}/s)",
            run.delivered_per_second, run.server_cpu_us, run.written_per_second
        ));
    }
    eprintln!("{line}");
}

/// How the section's figures were measured: the setup, the servers' configuration and the
/// shape of the rounds.
fn method(out: &mut String, shape: &Shape) -> std::fmt::Result {
    writeln!(out, "{HEADING}\n")?;
    writeln!(
        out,
        "coturn (`turnserver` as in the rest of this report, without `--no-tls`, with `--cert`, `--pkey` and `--tls-listening-port={TLS_PORT}`) and turn-control (as in the rest of this report, with `--tls-cert`, `--tls-key` and `--tls-listen {ip}:{TLS_PORT}`) run at the same time, each alone in the relay namespace of its own copy of the topology above, with the same certificate files: an ECDSA P-256 leaf for the IP address {ip} signed by a private CA (`tests_harness::tls::certificate`). The clients run in the generator namespace, from {client}, on {threads} tokio thread(s): rustls 0.23 with the workspace's crypto provider, its key exchange groups offered in a browser's order (X25519MLKEM768 for TLS 1.3 only, X25519, secp256r1, secp384r1), ALPN `stun.turn` offered, the certificate verified against the CA and the relay's IP address SAN. They share the machine's CPUs with the server, so the absolute figures are what a server does beside its clients; the same clients serve both servers.\n",
        ip = RELAY.ip(),
        client = CLIENT.ip(),
        threads = shape.threads,
    )?;
    writeln!(
        out,
        "The comparison is at TLS 1.2, the client offering TLS 1.2 alone to both servers: coturn 4.6.1 as Debian builds it answers a TLS 1.3 ClientHello with a handshake_failure alert, and offered both versions it negotiates TLS 1.2. turn-control's handshakes are also measured as the client offers them by default (TLS 1.3 and 1.2), which it takes as TLS 1.3; negotiated parameters below.\n"
    )?;
    writeln!(
        out,
        "- Handshakes/s: {tasks} tasks at once, each in a loop: connect to {ip}:{TLS_PORT}, TLS handshake, one STUN Binding request over the stream and its success response read, then close (close_notify and FIN, and the server's close read to its end); completed cycles per second in the window. Full: no session cache, a fresh client configuration each window (the server signs and the client verifies the certificate in every handshake). Cached: one client configuration with its session cache (256 sessions) shared by the tasks, fresh each window; the share the client saw resumed is given (TLS 1.2: a session ticket or ID; TLS 1.3: a ticket, with a new key exchange but no certificate). Server CPU is its process's utime + stime (/proc/PID/stat) over the window per completed cycle.",
        tasks = shape.handshake_tasks,
        ip = RELAY.ip(),
    )?;
    writeln!(
        out,
        "- Relayed messages/s (TLS 1.2): {clients} clients, each on its own TLS connection, allocate (long-term credentials, user test) and bind channel {FIRST_CHANNEL:#06x} to {peer}:{FIRST_PEER_PORT}+i, set up once per server; each window they write ChannelData frames of {PAYLOAD} B ({FRAMES_PER_WRITE} per TLS write) back to back, as fast as the server reads them. The sink on the generator's `rx` counts the UDP datagrams that reach the peer (checking their source, the allocation's relayed address, and their length) and drops them: relayed messages/s is that count over the window; written/s, what the clients' TLS streams took. Server CPU per relayed message as above.",
        clients = shape.relay_clients,
        peer = PEER.ip(),
    )?;
    writeln!(
        out,
        "- {rounds} round(s); in each, full handshakes, then cached ones, then relayed messages, each of both servers in turn (which server goes first alternates), each a warm-up of {warm:.1} s and then a counted window of {window:.1} s. The figures are medians over the rounds, with their range.\n",
        rounds = shape.rounds,
        warm = shape.warm_up.as_secs_f64(),
        window = shape.window.as_secs_f64(),
    )?;
    Ok(())
}

/// The report's section: how it was measured, the table of medians over the rounds (with
/// their range) and the ratio turn-control / coturn, and what each server negotiated.
pub fn section(figures: &[Figures], shape: &Shape) -> anyhow::Result<String> {
    let (Some(coturn), Some(turn_control)) = (
        figures.iter().find(|f| f.server == Server::Coturn),
        figures.iter().find(|f| f.server == Server::TurnControl),
    ) else {
        bail!("the figures of a server are missing");
    };
    let mut md = String::new();
    method(&mut md, shape)?;
    let offered: Vec<&Figures> = [coturn, turn_control]
        .into_iter()
        .filter(|f| f.handshakes(Protocol::Offered, false).is_some())
        .collect();
    write!(
        md,
        "| median of {} round(s) (range) | {}, TLS 1.2 | {}, TLS 1.2 | turn-control / coturn |",
        shape.rounds,
        coturn.server.name(),
        turn_control.server.name()
    )?;
    for f in &offered {
        write!(md, " {}, {} |", f.server.name(), Protocol::Offered.label())?;
    }
    writeln!(
        md,
        "\n|---|---:|---:|---:|{}",
        "---:|".repeat(offered.len())
    )?;
    let table = Table {
        coturn,
        turn_control,
        offered: &offered,
    };
    for resumption in [false, true] {
        let kind = if resumption { "cached" } else { "full" };
        table.row(&mut md, &format!("{kind} handshakes/s"), 0, |f, p| {
            Some(
                f.handshakes(p, resumption)?
                    .iter()
                    .map(|r| r.per_second)
                    .collect(),
            )
        })?;
        table.row(
            &mut md,
            &format!("{kind} handshakes: server CPU per handshake, µs"),
            0,
            |f, p| {
                Some(
                    f.handshakes(p, resumption)?
                        .iter()
                        .map(|r| r.server_cpu_us)
                        .collect(),
                )
            },
        )?;
    }
    table.row(&mut md, "cached handshakes: resumed, %", 0, |f, p| {
        Some(
            f.handshakes(p, true)?
                .iter()
                .map(|r| r.resumed_share * 100.0)
                .collect(),
        )
    })?;
    let relayed = |figure: fn(&RelayRun) -> f64| {
        move |f: &Figures, p: Protocol| {
            (p == Protocol::Tls12).then(|| f.relayed.iter().map(figure).collect())
        }
    };
    table.row(
        &mut md,
        &format!("relayed messages/s ({PAYLOAD} B ChannelData over TLS -> UDP peer)"),
        0,
        relayed(|r| r.delivered_per_second),
    )?;
    table.row(
        &mut md,
        "relayed messages: server CPU per message, µs",
        2,
        relayed(|r| r.server_cpu_us),
    )?;
    table.row(
        &mut md,
        "relayed messages: written by the clients/s",
        0,
        relayed(|r| r.written_per_second),
    )?;
    writeln!(md)?;
    for f in [coturn, turn_control] {
        notes(&mut md, f)?;
    }
    writeln!(md)?;
    Ok(md)
}

/// The section's heading.
pub const HEADING: &str = "## TURN over TLS: handshakes and relayed messages";

/// The table's columns: both servers at TLS 1.2, then those measured as offered.
struct Table<'a> {
    coturn: &'a Figures,
    turn_control: &'a Figures,
    offered: &'a [&'a Figures],
}

impl Table<'_> {
    /// A row: each column's median of `values` with its range, and the ratio of the TLS 1.2
    /// medians; `-` where `values` has none.
    fn row(
        &self,
        md: &mut String,
        label: &str,
        decimals: usize,
        values: impl Fn(&Figures, Protocol) -> Option<Vec<f64>>,
    ) -> anyhow::Result<()> {
        let cell = |v: &Option<Vec<f64>>| match v {
            Some(v) => format!(
                "{:.decimals$} ({:.decimals$}–{:.decimals$})",
                percentile(v, 0.5),
                percentile(v, 0.0),
                percentile(v, 1.0)
            ),
            None => "-".to_owned(),
        };
        let (c, t) = (
            values(self.coturn, Protocol::Tls12),
            values(self.turn_control, Protocol::Tls12),
        );
        let ratio = match (&c, &t) {
            (Some(c), Some(t)) => format!("{:.2}x", percentile(t, 0.5) / percentile(c, 0.5)),
            _ => "-".to_owned(),
        };
        write!(md, "| {label} | {} | {} | {ratio} |", cell(&c), cell(&t))?;
        for f in self.offered {
            write!(md, " {} |", cell(&values(f, Protocol::Offered)))?;
        }
        writeln!(md)?;
        Ok(())
    }
}

/// A server's line under the table: what it negotiated, its allocations, failures, losses.
fn notes(md: &mut String, f: &Figures) -> anyhow::Result<()> {
    let runs = || f.handshakes.iter().flat_map(|s| &s.runs);
    let failed: u64 = runs().map(|r| r.failed).sum();
    let bare_closes = percentile(
        &runs()
            .map(|r| r.bare_close_share * 100.0)
            .collect::<Vec<_>>(),
        0.5,
    );
    let bad: u64 = f.relayed.iter().map(|r| r.bad).sum();
    let negotiated = f
        .negotiated
        .iter()
        .map(|(protocol, session)| {
            let offer = match protocol {
                Protocol::Tls12 => "offered TLS 1.2",
                Protocol::Offered => "offered TLS 1.3 and 1.2",
            };
            format!("{offer}: {session}")
        })
        .collect::<Vec<_>>()
        .join("; ");
    writeln!(
        md,
        "- {}: {negotiated}. Allocations {}. Handshake cycles failed in the windows: {failed}{}. Cycles whose server closed with a bare FIN instead of answering the client's close_notify with its own (RFC 8446 §6.1; counted as completed): median {bare_closes:.0}% of a window. Relayed messages written: {} in all, of which never at the peer after the run drained: {}; datagrams failing the sink's checks: {bad}.",
        f.server.name(),
        f.allocations
            .iter()
            .map(|(relayed, peer)| format!("{relayed} -> {peer}"))
            .collect::<Vec<_>>()
            .join(", "),
        f.first_failure
            .as_deref()
            .map_or(String::new(), |e| format!(" (first: {e})")),
        f.written,
        f.lost,
    )?;
    Ok(())
}

/// A directory of the certificate files both servers use, removed on drop.
#[derive(Debug)]
struct CertificateDir {
    dir: PathBuf,
    files: CertFiles,
}

impl CertificateDir {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique_name("tls-bench"));
        std::fs::create_dir_all(&dir)?;
        let ip = RELAY.ip().to_string();
        let files = tests_harness::tls::certificate(&dir, "relay", &[&ip], Validity::days(30))?;
        Ok(Self { dir, files })
    }
}

impl Drop for CertificateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One server with its own topology and its clients.
struct Contender {
    // Drop order: the streams and the clients' runtime before the net (its processes and
    // namespaces).
    relay_streams: Vec<TlsStream<TcpStream>>,
    host: ClientHost,
    ca: PathBuf,
    pid: u32,
    /// The client configurations its handshakes are measured with.
    protocols: Vec<Protocol>,
    /// Messages written by the relay clients so far.
    written: Arc<AtomicU64>,
    /// The sink's count when the relay clients' streams were set up.
    delivered_before: u64,
    figures: Figures,
    net: BenchNet,
}

impl Contender {
    /// Starts `server` in a new topology with the certificate `files`, waits for its TLS
    /// listener, and sets the relay clients up.
    fn start(
        server: Server,
        commands: &Commands,
        files: &CertFiles,
        shape: Shape,
    ) -> anyhow::Result<Self> {
        let mut net = BenchNet::new()?;
        // Thousands of connections a second from one address to one port: the client's
        // TIME_WAIT sockets (it closes first) must not run the ephemeral ports out.
        net.gen_ns.exec(
            "sysctl",
            [
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65535",
            ],
        )?;
        let listen = SocketAddrV4::new(*RELAY.ip(), TLS_PORT).to_string();
        let command = match server {
            Server::Coturn => {
                let dir = net.dir().to_owned();
                let mut command = net.relay_ns.command("turnserver");
                command
                    .args(&commands.coturn)
                    .arg("--cert")
                    .arg(&files.cert)
                    .arg("--pkey")
                    .arg(&files.key)
                    .arg(format!("--tls-listening-port={TLS_PORT}"))
                    .arg(format!(
                        "--pidfile={}",
                        dir.join("turnserver.pid").display()
                    ))
                    .arg(format!(
                        "--log-file={}",
                        dir.join("turnserver-file.log").display()
                    ));
                command
            }
            Server::TurnControl => {
                let mut command = net.relay_ns.command(&commands.turn_control);
                command
                    .args(&commands.turn_control_args)
                    .arg("--tls-cert")
                    .arg(&files.cert)
                    .arg("--tls-key")
                    .arg(&files.key)
                    .args(["--tls-listen", &listen]);
                command
            }
        };
        let pid = net.spawn(server.process(), command)?.pid();
        let host = ClientHost::new(&net.gen_ns, shape.threads)?;
        let ca = files.ca.clone();
        let mut negotiated = Vec::new();
        let mut protocols = Vec::new();
        for protocol in [Protocol::Tls12, Protocol::Offered] {
            let session = wait_for_listener(&host, &ca, protocol).with_context(|| {
                format!("{} over TLS: {}", server.name(), net.log(server.process()))
            })?;
            // As offered, measured only where it is another protocol than TLS 1.2.
            if protocol == Protocol::Tls12 || session.version != Some(ProtocolVersion::TLSv1_2) {
                protocols.push(protocol);
            }
            negotiated.push((protocol, session.description));
        }
        net.process(server.process())?.ensure_running()?;
        let mut contender = Self {
            relay_streams: Vec::new(),
            host,
            ca,
            pid,
            protocols,
            written: Arc::new(AtomicU64::new(0)),
            delivered_before: 0,
            figures: Figures {
                server,
                negotiated,
                allocations: Vec::new(),
                handshakes: Vec::new(),
                relayed: Vec::new(),
                lost: 0,
                written: 0,
                first_failure: None,
            },
            net,
        };
        contender
            .open_relay_clients(shape.relay_clients)
            .with_context(|| {
                format!(
                    "{} relay clients over TLS: {}",
                    server.name(),
                    contender.net.log(server.process())
                )
            })?;
        Ok(contender)
    }

    /// Allocates and binds a channel on `count` TLS connections, points a sink rule at each
    /// one's peer, and checks that a frame on each reaches its peer.
    fn open_relay_clients(&mut self, count: usize) -> anyhow::Result<()> {
        ensure!(
            (1..=RULES).contains(&count),
            "1 to {RULES} relay clients (one sink rule each)"
        );
        let connector = connector(&self.ca, Protocol::Tls12, false)?;
        let mut rules = Vec::new();
        for index in 0..count {
            let peer = SocketAddrV4::new(*PEER.ip(), FIRST_PEER_PORT + index as u16);
            let connector = connector.clone();
            let (stream, relayed) = self.host.run(async move {
                tokio::time::timeout(IO_TIMEOUT * 2, open_relay_client(connector, peer))
                    .await
                    .context("Allocate and ChannelBind over TLS timed out")?
            })?;
            self.relay_streams.push(stream);
            self.figures.allocations.push((relayed, peer));
            rules.push(Rule {
                dst: peer,
                src: relayed,
                udp_len: (8 + PAYLOAD) as u16,
                channel: 0,
            });
        }
        self.net.set_rules(&rules)?;
        let before = self.net.counts()?;
        let frame = Arc::new(channel_data_batch(1));
        let streams = std::mem::take(&mut self.relay_streams);
        self.relay_streams = self.host.run(async move {
            let mut streams = streams;
            for stream in &mut streams {
                stream.write_all(&frame).await?;
                stream.flush().await?;
            }
            anyhow::Ok(streams)
        })?;
        wait_for_setup(
            "a ChannelData frame of each relay client at its peer",
            || {
                let now = self.net.counts()?;
                Ok((0..count)
                    .all(|i| now[i].packets > before[i].packets)
                    .then_some(()))
            },
        )?;
        self.delivered_before = self.delivered()?.0;
        Ok(())
    }

    /// The sink's (packets, bad) summed over the relay clients' rules.
    fn delivered(&self) -> anyhow::Result<(u64, u64)> {
        let counts = self.net.counts()?;
        Ok(counts[..self.figures.allocations.len()]
            .iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bad)))
    }

    /// One window of handshake cycles offering `protocol`, with or without a session cache.
    fn handshakes(
        &mut self,
        shape: Shape,
        protocol: Protocol,
        resumption: bool,
    ) -> anyhow::Result<HandshakeRun> {
        let connector = connector(&self.ca, protocol, resumption)?;
        let tally = Arc::new(Tally::default());
        let stop = StopOnDrop::default();
        let tasks: Vec<JoinHandle<()>> = (0..shape.handshake_tasks)
            .map(|_| {
                self.host.spawn(handshake_loop(
                    connector.clone(),
                    tally.clone(),
                    stop.flag.clone(),
                ))
            })
            .collect();
        // The measurement's own time: a warm-up, then the counted window.
        std::thread::sleep(shape.warm_up);
        let (before, cpu_before, started) =
            (tally.snapshot(), process_cpu_ns(self.pid)?, Instant::now());
        std::thread::sleep(shape.window);
        let (after, cpu_after, elapsed) = (
            tally.snapshot(),
            process_cpu_ns(self.pid)?,
            started.elapsed(),
        );
        stop.flag.store(true, Ordering::Relaxed);
        for task in tasks {
            self.host.join(task)?;
        }
        self.host.ensure_in_namespace()?;
        self.net
            .process(self.figures.server.process())?
            .ensure_running()?;
        let completed = after.completed - before.completed;
        let failed = after.failed - before.failed;
        if self.figures.first_failure.is_none() {
            self.figures.first_failure = tally.first_failure();
        }
        ensure!(
            completed > 0,
            "{}: no TLS handshake cycle completed in {:.1} s ({failed} failed; first: {})",
            self.figures.server.name(),
            elapsed.as_secs_f64(),
            tally.first_failure().unwrap_or_default()
        );
        Ok(HandshakeRun {
            per_second: completed as f64 / elapsed.as_secs_f64(),
            resumed_share: (after.resumed - before.resumed) as f64 / completed as f64,
            bare_close_share: (after.bare_closes - before.bare_closes) as f64 / completed as f64,
            server_cpu_us: (cpu_after - cpu_before) as f64 / 1e3 / completed as f64,
            failed,
        })
    }

    /// One window of ChannelData streamed on every relay client's connection.
    fn relayed(&mut self, shape: Shape) -> anyhow::Result<RelayRun> {
        let batch = Arc::new(channel_data_batch(FRAMES_PER_WRITE));
        let stop = StopOnDrop::default();
        let writers: Vec<JoinHandle<anyhow::Result<TlsStream<TcpStream>>>> =
            std::mem::take(&mut self.relay_streams)
                .into_iter()
                .map(|stream| {
                    self.host.spawn(stream_channel_data(
                        stream,
                        batch.clone(),
                        self.written.clone(),
                        stop.flag.clone(),
                    ))
                })
                .collect();
        std::thread::sleep(shape.warm_up);
        let (before, written_before, cpu_before, started) = (
            self.delivered()?,
            self.written.load(Ordering::Relaxed),
            process_cpu_ns(self.pid)?,
            Instant::now(),
        );
        std::thread::sleep(shape.window);
        let (after, written_after, cpu_after, elapsed) = (
            self.delivered()?,
            self.written.load(Ordering::Relaxed),
            process_cpu_ns(self.pid)?,
            started.elapsed(),
        );
        stop.flag.store(true, Ordering::Relaxed);
        for writer in writers {
            let stream = self.host.join(writer)?.with_context(|| {
                format!(
                    "{} relay client: {}",
                    self.figures.server.name(),
                    self.net.log(self.figures.server.process())
                )
            })?;
            self.relay_streams.push(stream);
        }
        self.host.ensure_in_namespace()?;
        let delivered = after.0 - before.0;
        let secs = elapsed.as_secs_f64();
        ensure!(
            delivered > 0,
            "{}: nothing relayed over TLS in {secs:.1} s",
            self.figures.server.name()
        );
        Ok(RelayRun {
            delivered_per_second: delivered as f64 / secs,
            written_per_second: (written_after - written_before) as f64 / secs,
            server_cpu_us: (cpu_after - cpu_before) as f64 / 1e3 / delivered as f64,
            bad: after.1 - before.1,
        })
    }

    /// Waits for what the relay clients wrote to drain to the peer, and counts what never
    /// arrived.
    fn finish(&mut self) -> anyhow::Result<()> {
        let written = self.written.load(Ordering::Relaxed);
        let mut last = (self.delivered()?.0, Instant::now());
        let delivered = wait_for_setup("the relayed messages to drain", || {
            let now = self.delivered()?.0;
            if now != last.0 {
                last = (now, Instant::now());
            }
            Ok((now - self.delivered_before >= written
                || last.1.elapsed() > Duration::from_millis(200))
            .then_some(now))
        })?;
        self.figures.written = written;
        self.figures.lost = written.saturating_sub(delivered - self.delivered_before);
        Ok(())
    }
}

/// [`crate::wait_for`] with the deadline of a step of the set-up.
fn wait_for_setup<T>(
    what: &str,
    condition: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    crate::wait_for(what, Duration::from_secs(10), condition)
}

/// Waits until the server's TLS listener completes a handshake cycle offering `protocol`;
/// what it negotiated.
fn wait_for_listener(host: &ClientHost, ca: &Path, protocol: Protocol) -> anyhow::Result<Session> {
    let connector = connector(ca, protocol, false)?;
    let mut last_error = None;
    crate::wait_for("the TLS listener", Duration::from_secs(20), || {
        let connector = connector.clone();
        match host.run(async move {
            tokio::time::timeout(IO_TIMEOUT, binding_over_tls(&connector))
                .await
                .context("timed out")?
        }) {
            Ok(session) => Ok(Some(session)),
            Err(error) => {
                last_error = Some(format!("{error:#}"));
                Ok(None)
            }
        }
    })
    .with_context(|| last_error.unwrap_or_default())
}

/// A tokio runtime whose threads all entered a namespace: sockets its tasks create belong
/// to it.
struct ClientHost {
    runtime: tokio::runtime::Runtime,
    setns_failed: Arc<AtomicBool>,
}

impl ClientHost {
    fn new(ns: &Ns, threads: usize) -> anyhow::Result<Self> {
        let path = format!("/run/netns/{}", ns.name());
        let file = Arc::new(File::open(&path).with_context(|| format!("cannot open {path}"))?);
        let setns_failed = Arc::new(AtomicBool::new(false));
        let failed = setns_failed.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .enable_all()
            .on_thread_start(move || {
                if nix::sched::setns(&*file, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
            })
            .build()?;
        let host = Self {
            runtime,
            setns_failed,
        };
        host.ensure_in_namespace()?;
        Ok(host)
    }

    /// Fails if a thread of the runtime could not enter the namespace.
    fn ensure_in_namespace(&self) -> anyhow::Result<()> {
        ensure!(
            !self.setns_failed.load(Ordering::Relaxed),
            "a client thread could not enter the generator's namespace"
        );
        Ok(())
    }

    fn spawn<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        self.runtime.spawn(task)
    }

    /// Waits for a task from the calling thread (which creates no socket).
    fn join<T>(&self, task: JoinHandle<T>) -> anyhow::Result<T> {
        Ok(self.runtime.block_on(task)?)
    }

    /// Runs `task` on the runtime's threads and waits for it.
    fn run<T: Send + 'static>(
        &self,
        task: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        let result = self.join(self.spawn(task))?;
        self.ensure_in_namespace()?;
        result
    }
}

/// A stop flag for tasks, raised when dropped so that an early return stops them too.
#[derive(Debug, Default)]
struct StopOnDrop {
    flag: Arc<AtomicBool>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.flag.store(true, Ordering::Relaxed);
    }
}

/// The handshake tasks' counters.
#[derive(Debug, Default)]
struct Tally {
    completed: AtomicU64,
    resumed: AtomicU64,
    /// Completed cycles whose server closed without a close_notify.
    bare_closes: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Copy)]
struct TallySnapshot {
    completed: u64,
    resumed: u64,
    bare_closes: u64,
    failed: u64,
}

impl Tally {
    fn snapshot(&self) -> TallySnapshot {
        TallySnapshot {
            completed: self.completed.load(Ordering::Relaxed),
            resumed: self.resumed.load(Ordering::Relaxed),
            bare_closes: self.bare_closes.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    fn fail(&self, error: anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_failure.lock()
            && first.is_none()
        {
            *first = Some(format!("{error:#}"));
        }
    }

    fn first_failure(&self) -> Option<String> {
        self.first_failure
            .lock()
            .ok()
            .and_then(|first| first.clone())
    }
}

/// A rustls client configuration for the relay: the CA of `ca` as the only root, `protocol`,
/// ALPN `stun.turn`, and a session cache when `resumption` (else none: every handshake full).
fn connector(ca: &Path, protocol: Protocol, resumption: bool) -> anyhow::Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read {}", ca.display()))?
    {
        roots.add(certificate?)?;
    }
    // The crypto provider rustls is built with (the workspace's, as the daemon's), its key
    // exchange groups in a browser's order: rustls 0.23's aws-lc-rs default offers secp384r1
    // before X25519, which a server that follows the client's order (as rustls does, unlike
    // coturn's OpenSSL) then takes at TLS 1.2.
    let mut provider = (**ClientConfig::builder().crypto_provider()).clone();
    provider.kx_groups.sort_by_key(|group| {
        [
            NamedGroup::X25519MLKEM768,
            NamedGroup::X25519,
            NamedGroup::secp256r1,
            NamedGroup::secp384r1,
        ]
        .iter()
        .position(|name| *name == group.name())
        .unwrap_or(usize::MAX)
    });
    let versions: &[&rustls::SupportedProtocolVersion] = match protocol {
        Protocol::Tls12 => &[&rustls::version::TLS12],
        Protocol::Offered => rustls::DEFAULT_VERSIONS,
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name the client verifies the certificate against: the relay's IP address.
fn server_name() -> ServerName<'static> {
    ServerName::from(IpAddr::V4(*RELAY.ip()))
}

/// A TCP connection from the client's address to the relay's TLS port. The port is chosen
/// at connect time (`IP_BIND_ADDRESS_NO_PORT`), so that one port serves several 4-tuples and
/// TIME_WAIT sockets can be reused.
async fn connect() -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(*CLIENT.ip(), 0)))?;
    let stream = socket
        .connect(SocketAddr::V4(SocketAddrV4::new(*RELAY.ip(), TLS_PORT)))
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What a handshake negotiated.
#[derive(Debug, Clone)]
struct Session {
    version: Option<ProtocolVersion>,
    resumed: bool,
    /// Whether the server answered the client's close_notify with its own.
    close_notify: bool,
    description: String,
}

impl Session {
    fn of(connection: &ClientConnection) -> Self {
        let version = connection.protocol_version();
        let name = match version {
            Some(ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
            Some(ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
            other => format!("{other:?}"),
        };
        let suite = connection
            .negotiated_cipher_suite()
            .map_or("-".to_owned(), |s| format!("{:?}", s.suite()));
        let group = connection
            .negotiated_key_exchange_group()
            .map_or("-".to_owned(), |g| format!("{:?}", g.name()));
        let alpn = connection.alpn_protocol().map_or("none".to_owned(), |p| {
            String::from_utf8_lossy(p).into_owned()
        });
        Self {
            version,
            resumed: connection.handshake_kind() == Some(HandshakeKind::Resumed),
            close_notify: true,
            description: format!("{name}, {suite}, {group}, ALPN {alpn}"),
        }
    }
}

/// One handshake cycle: connect, handshake, a Binding request and its success response
/// over the stream, close.
async fn binding_over_tls(connector: &TlsConnector) -> anyhow::Result<Session> {
    let tcp = connect().await?;
    let mut tls = connector.connect(server_name(), tcp).await?;
    let mut session = Session::of(tls.get_ref().1);
    let txid: [u8; 12] = next_txid();
    let request = Msg::new(method::BINDING, class::REQUEST, txid).finish(None, true);
    tls.write_all(&request).await?;
    tls.flush().await?;
    let answer = read_stun(&mut tls).await?;
    ensure!(
        answer.method == method::BINDING && answer.class == class::SUCCESS && answer.txid == txid,
        "not a Binding success for the request: method {:#x} class {}",
        answer.method,
        answer.class
    );
    // close_notify and FIN, then the server's close read to its end. RFC 8446 §6.1 has
    // the server answer with its own close_notify; a bare FIN is counted, not failed.
    tls.shutdown().await?;
    let mut rest = [0u8; 512];
    loop {
        match tls.read(&mut rest).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                session.close_notify = false;
                break;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(session)
}

/// Handshake cycles until `stop`, counted in `tally`.
async fn handshake_loop(connector: TlsConnector, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(IO_TIMEOUT, binding_over_tls(&connector)).await {
            Ok(Ok(session)) => {
                tally.completed.fetch_add(1, Ordering::Relaxed);
                if session.resumed {
                    tally.resumed.fetch_add(1, Ordering::Relaxed);
                }
                if !session.close_notify {
                    tally.bare_closes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Err(error)) => {
                tally.fail(error);
                // A server that refuses at once must not turn the loop into a spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => tally.fail(anyhow::anyhow!("the cycle took over {IO_TIMEOUT:?}")),
        }
    }
}

/// A transaction id no other request of the run has (RFC 8489 §6 asks for a random one so
/// that it cannot be guessed off the path; here only uniqueness matters).
fn next_txid() -> [u8; 12] {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut txid = [0x5A; 12];
    txid[4..].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    txid
}

/// A TLS connection that allocated and bound channel [`FIRST_CHANNEL`] to `peer`, and the
/// allocation's relayed address.
async fn open_relay_client(
    connector: TlsConnector,
    peer: SocketAddrV4,
) -> anyhow::Result<(TlsStream<TcpStream>, SocketAddrV4)> {
    let tcp = connect().await?;
    let tls = connector.connect(server_name(), tcp).await?;
    let mut client = TurnOverTls::new(tls);
    let answer = client
        .request(method::ALLOCATE, |m| {
            m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        })
        .await?;
    let Some(SocketAddr::V4(relayed)) = answer.xor_addr(attr::XOR_RELAYED_ADDRESS) else {
        bail!(
            "Allocate over TLS: no IPv4 relayed address (error {:?})",
            answer.error_code()
        );
    };
    let answer = client
        .request(method::CHANNEL_BIND, |m| {
            m.attr(attr::CHANNEL_NUMBER, &channel_number(FIRST_CHANNEL))
                .xor_addr(attr::XOR_PEER_ADDRESS, SocketAddr::V4(peer))
        })
        .await?;
    ensure!(
        answer.class == class::SUCCESS,
        "ChannelBind over TLS: error {:?}",
        answer.error_code()
    );
    Ok((client.stream, relayed))
}

/// Writes `batch` back to back until `stop`, counting the frames in `written`; the stream
/// back when stopped.
async fn stream_channel_data(
    mut stream: TlsStream<TcpStream>,
    batch: Arc<Vec<u8>>,
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let frames = (batch.len() / (4 + PAYLOAD)) as u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::timeout(IO_TIMEOUT, stream.write_all(&batch))
            .await
            .context("the server stopped reading")??;
        written.fetch_add(frames, Ordering::Relaxed);
    }
    tokio::time::timeout(IO_TIMEOUT, stream.flush())
        .await
        .context("the server stopped reading")??;
    Ok(stream)
}

/// `frames` ChannelData messages of [`PAYLOAD`] bytes on [`FIRST_CHANNEL`], back to back.
fn channel_data_batch(frames: usize) -> Vec<u8> {
    let frame = tests_harness::stun::channel_data(FIRST_CHANNEL, &[0x5a; PAYLOAD]);
    frame.repeat(frames)
}

/// A TURN client with long-term credentials on a TLS stream: follows 401 and 438 for the
/// realm and nonce (RFC 8489 §9.2), as `tests_harness::stun::Client` does over UDP.
struct TurnOverTls {
    stream: TlsStream<TcpStream>,
    credentials: LongTerm,
}

impl TurnOverTls {
    fn new(stream: TlsStream<TcpStream>) -> Self {
        Self {
            stream,
            credentials: LongTerm::new(USER, PASSWORD),
        }
    }

    /// An authenticated request and its final answer.
    async fn request(
        &mut self,
        method: u16,
        build: impl Fn(&mut Msg) -> &mut Msg,
    ) -> anyhow::Result<Answer> {
        for _ in 0..3 {
            let txid = next_txid();
            let mut msg = Msg::new(method, class::REQUEST, txid);
            build(&mut msg);
            let bytes = self.credentials.finish(&mut msg, true);
            self.stream.write_all(&bytes).await?;
            self.stream.flush().await?;
            let answer = read_stun(&mut self.stream).await?;
            ensure!(
                answer.txid == txid && answer.method == method,
                "an answer of method {:#x} to {method:#x}",
                answer.method
            );
            if !self.credentials.learn(&answer) {
                return Ok(answer);
            }
        }
        bail!("authentication over TLS did not converge")
    }
}

/// The next STUN message on a TURN stream, skipping ChannelData (RFC 8656 §3.1: STUN
/// messages and ChannelData back to back, told apart by the first two bits).
async fn read_stun(stream: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<Answer> {
    loop {
        let (stun, message) = read_message(stream).await?;
        if stun {
            return Answer::parse(&message).context("a malformed STUN message");
        }
    }
}

/// The next message on a TURN stream: (whether it is STUN, its bytes). ChannelData comes
/// with its padding to four bytes (RFC 8656 §12.5).
async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<(bool, Vec<u8>)> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let (stun, rest) = match header[0] >> 6 {
        0 => (true, 16 + length),
        1 => (false, length.next_multiple_of(4)),
        _ => bail!(
            "neither STUN nor ChannelData: first byte {:#04x}",
            header[0]
        ),
    };
    let mut message = header.to_vec();
    message.resize(4 + rest, 0);
    stream.read_exact(&mut message[4..]).await?;
    Ok((stun, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<T>(future: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// STUN after padded ChannelData on one stream: the ChannelData is skipped whole.
    #[test]
    fn a_stun_message_is_found_after_channel_data() {
        let txid = [3; 12];
        let binding = Msg::new(method::BINDING, class::SUCCESS, txid).finish(None, true);
        let mut stream = tests_harness::stun::channel_data(0x4001, &[1, 2, 3, 4, 5]);
        stream.extend_from_slice(&[0, 0, 0]);
        stream.extend_from_slice(&binding);
        let answer = block_on(read_stun(&mut stream.as_slice())).unwrap();
        assert_eq!(
            (answer.method, answer.class, answer.txid),
            (method::BINDING, class::SUCCESS, txid)
        );
    }

    #[test]
    fn a_stream_cut_short_is_an_error() {
        let binding = Msg::new(method::BINDING, class::SUCCESS, [1; 12]).finish(None, false);
        assert!(block_on(read_stun(&mut &binding[..binding.len() - 1])).is_err());
        assert!(block_on(read_stun(&mut &[0xC0u8, 0, 0, 0][..])).is_err());
    }

    #[test]
    fn a_batch_is_whole_channel_data_frames() {
        let batch = channel_data_batch(FRAMES_PER_WRITE);
        assert!(batch.len() <= 16384, "one TLS record");
        assert_eq!(batch.len(), FRAMES_PER_WRITE * (4 + PAYLOAD));
        assert_eq!(&batch[..4], &[0x40, 0x00, 0, PAYLOAD as u8]);
    }

    fn figures(server: Server, scale: f64) -> Figures {
        let handshakes = |per_second: f64, share| HandshakeRun {
            per_second: per_second * scale,
            resumed_share: share,
            bare_close_share: 0.0,
            server_cpu_us: 300.0 / scale,
            failed: 0,
        };
        let mut figures = Figures {
            server,
            negotiated: vec![(
                Protocol::Tls12,
                "TLS 1.2, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, X25519, ALPN stun.turn"
                    .to_owned(),
            )],
            allocations: vec![(
                SocketAddrV4::new(*RELAY.ip(), 50000),
                SocketAddrV4::new(*PEER.ip(), FIRST_PEER_PORT),
            )],
            handshakes: Vec::new(),
            relayed: vec![
                RelayRun {
                    delivered_per_second: 100_000.0 * scale,
                    written_per_second: 101_000.0 * scale,
                    server_cpu_us: 5.0 / scale,
                    bad: 0,
                };
                3
            ],
            lost: 0,
            written: 1_000_000,
            first_failure: None,
        };
        for rate in [1000.0, 1100.0, 900.0] {
            figures.push_handshakes(Protocol::Tls12, false, handshakes(rate, 0.0));
            figures.push_handshakes(Protocol::Tls12, true, handshakes(2.0 * rate, 1.0));
            if server == Server::TurnControl {
                figures.push_handshakes(Protocol::Offered, false, handshakes(rate / 2.0, 0.0));
            }
        }
        figures
    }

    #[test]
    fn the_section_has_medians_ranges_and_ratios() {
        let shape = Shape::bench(3, Duration::from_secs(3), false);
        let section = section(
            &[
                figures(Server::Coturn, 1.0),
                figures(Server::TurnControl, 2.0),
            ],
            &shape,
        )
        .unwrap();
        assert!(section.starts_with(HEADING), "{section}");
        assert!(
            section.contains(
                "| full handshakes/s | 1000 (900–1100) | 2000 (1800–2200) | 2.00x | 1000 (900–1100) |"
            ),
            "{section}"
        );
        // CPU per handshake halves; turn-control cached as offered was not measured.
        assert!(
            section.contains("| cached handshakes: server CPU per handshake, µs | 300 (300–300) | 150 (150–150) | 0.50x | - |"),
            "{section}"
        );
        assert!(
            section.contains("| relayed messages: server CPU per message, µs | 5.00 (5.00–5.00) | 2.50 (2.50–2.50) | 0.50x | - |"),
            "{section}"
        );
    }
}
