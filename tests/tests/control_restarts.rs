//! turn-control restarts that keep every allocation (issue #21), in the lab: both daemons,
//! the XDP data plane, and a TURN client we did not write (webrtc-rs).
//!
//! turn-control runs with `--state-dir` under a stand-in for systemd's file-descriptor store
//! ([`ServiceManager`]), inside the relay namespace through `ip netns exec`, which execs
//! without forking, so that `LISTEN_PID` names the daemon. It is restarted three ways: SIGTERM
//! (a hand-over), SIGKILL (a crash), and SIGTERM followed by a newer build (a copy of the
//! binary elsewhere) on the same state. Across each restart:
//! - the webrtc-rs client streams numbered channel data every 5 ms to one peer, relayed by the
//!   kernel, and numbered Send indications to another, relayed in user space (turn-control
//!   holds one channel per allocation here, so its ChannelBind for the second peer gets 508
//!   and webrtc-rs keeps sending Send indications there): not one channel-data datagram may
//!   be lost or leave the kernel path; the user-space pause is measured and printed;
//! - a second UDP allocation (the harness's client) answers Refresh at once, with no 438 (the
//!   nonce key's seed outlives the process), and relays from the same address;
//! - a TURN-over-TCP client's connection stays open (its socket waits in the store), and a
//!   Refresh it sends while no process runs is answered by the next one.
//!
//! Afterwards the agent's bindings are turn-control's, channel data is relayed in the kernel
//! both ways, `turn_restart_restored_total` counts what came back, the fd store holds the
//! relay sockets of exactly the allocations, webrtc-rs's own Refresh is answered 200, and
//! the user's allocations still count against `--user-quota` (a third Allocate gets 486).
//! At the end SIGINT ends the relay for good: the kernel and the fd store are emptied.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use nix::sys::signal::Signal;
use proto::v1::ChannelBinding;
use tests::agent::{Agent, bare};
use tests::stun::{Answer, Msg, attr, class, long_term_key, method};
use tests::{
    AGENT_METRICS, CLIENT_V4, LISTEN_PORT, Lab, PEER_V4, RELAY_V4, Site, TURN_CONTROL_METRICS,
    sample, sample_sum, wait_for, workspace_binary,
};
use tests_harness::service_manager::ServiceManager;
use webrtc_util::Conn;

const T: Duration = Duration::from_secs(5);
/// The allocation lifetime turn-control grants: webrtc-rs refreshes every half of it, so
/// its own Refresh reaches each new process within a few seconds.
const LIFETIME_SECONDS: u64 = 8;
/// `--user-quota`: the lab user's two UDP allocations fill it.
const QUOTA: &str = "2";
/// The user of the TCP client, so that its allocation leaves the lab user's quota alone.
const TCP_USER: (&str, &str) = ("tcp", "tcppass");
/// How often the streams send.
const STREAM_INTERVAL: Duration = Duration::from_millis(5);
/// Datagrams each stream sends before the signal, and after the new process is ready.
const STREAM_MARGIN: usize = 40;
/// The last Send indications of a stream, sent well after the new process is ready, must
/// all arrive.
const USER_SPACE_TAIL: u64 = 20;
/// A sanity bound on the user-space pause; the measured one is printed.
const PAUSE_BOUND: Duration = Duration::from_secs(10);
/// webrtc-rs's first channel number (the binding manager counts from 0x4000).
const FIRST_CHANNEL: u32 = 0x4000;

/// How a scenario stops the running turn-control and what starts next.
#[derive(Clone, Copy, Debug)]
enum Restart {
    /// SIGTERM (a hand-over), then the same binary.
    Term,
    /// SIGKILL (a crash), then the same binary.
    Kill,
    /// SIGTERM, then a newer build: a copy of the binary elsewhere, on the same state.
    NewerBuild,
}

impl Restart {
    fn signal(self) -> Signal {
        match self {
            Restart::Kill => Signal::SIGKILL,
            Restart::Term | Restart::NewerBuild => Signal::SIGTERM,
        }
    }
}

/// turn-control started by the service manager in the relay namespace, killed on drop.
struct TurnControl {
    child: Child,
    log: PathBuf,
    binary: PathBuf,
}

impl TurnControl {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits for the exit status.
    fn stop(&mut self, signal: Signal) -> anyhow::Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid())?);
        nix::sys::signal::kill(pid, signal)?;
        wait_for(&format!("turn-control to exit on {signal}"), T, || {
            Ok(self.child.try_wait()?)
        })
    }
}

impl Drop for TurnControl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binaries the restarts run, in the lab's directory: a link to the workspace's (so that
/// a rebuild meanwhile changes nothing here), and a copy elsewhere standing for a newer
/// build. Removed on drop, also when the lab keeps its logs after a failure.
struct Binaries {
    current: PathBuf,
    newer: PathBuf,
}

impl Binaries {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let built = workspace_binary("turn-control")?;
        let current = dir.join("turn-control");
        std::fs::hard_link(&built, &current)
            .or_else(|_| std::fs::copy(&built, &current).map(drop))?;
        let newer_dir = dir.join("newer");
        std::fs::create_dir(&newer_dir)?;
        let newer = newer_dir.join("turn-control");
        std::fs::copy(&current, &newer)?;
        Ok(Self { current, newer })
    }
}

impl Drop for Binaries {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.current);
        let _ = std::fs::remove_file(&self.newer);
    }
}

/// The lab, the agent, the service manager and turn-control under it.
struct Rig {
    // Drop order: turn-control, then the manager (it holds the stored sockets), the lab last.
    control: Option<TurnControl>,
    manager: ServiceManager,
    agent: Agent,
    agent_socket: PathBuf,
    lab: Lab,
}

impl Rig {
    fn new() -> anyhow::Result<Self> {
        let mut lab = Lab::new()?;
        let agent_socket =
            lab.start_xdp_agent(&["--xdp-mode", "native", "--metrics", AGENT_METRICS])?;
        let manager = ServiceManager::new(lab.dir())?;
        let agent = Agent::connect(&agent_socket)?;
        Ok(Self {
            control: None,
            manager,
            agent,
            agent_socket,
            lab,
        })
    }

    /// What Lab::start_turn_control passes, and the state directory, the quota, a second user
    /// for the TCP client, two threads, short allocations and one channel per allocation.
    fn arguments(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--listen",
            &format!("{RELAY_V4}:{LISTEN_PORT}"),
            "--listen",
            &format!("[{}]:{LISTEN_PORT}", Site::A.v6()),
            "--relay-ip",
            &RELAY_V4.to_string(),
            "--relay-ip",
            &Site::A.v6().to_string(),
            "--ports",
            "49152-65535",
            "--realm",
            "lab.example",
            "--user",
            "test:testpass",
            "--allow-peer",
            "198.51.100.0/24",
            "--allow-peer",
            "2001:db8:3::/64",
            "--metrics",
            TURN_CONTROL_METRICS,
            "--user",
            &format!("{}:{}", TCP_USER.0, TCP_USER.1),
            "--user-quota",
            QUOTA,
            "--threads",
            "2",
            "--default-allocation-lifetime",
            &LIFETIME_SECONDS.to_string(),
            "--max-allocation-lifetime",
            &LIFETIME_SECONDS.to_string(),
            "--max-channels-per-allocation",
            "1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.extend(["--agent".into(), self.agent_socket.clone().into_os_string()]);
        args.extend([
            "--state-dir".into(),
            self.lab.dir().join("state").into_os_string(),
        ]);
        args
    }

    /// Starts `binary` as the service manager starts a service (the stored fds passed, if
    /// any), waits for its READY=1 and checks that it is the process LISTEN_PID names. The
    /// agent link comes up after.
    fn start(&mut self, binary: &Path, instance: usize) -> anyhow::Result<()> {
        let fds_passed = self.manager.count() > 0;
        let mut command = self.manager.command("ip")?;
        command
            .args(["netns", "exec", self.lab.relay.name()])
            .arg(binary)
            .args(self.arguments());
        let log = self.lab.dir().join(format!("turn-control-{instance}.log"));
        let file = File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("cannot start turn-control")?;
        let mut control = TurnControl {
            child,
            log,
            binary: binary.to_owned(),
        };
        let ready = wait_for("turn-control's READY=1", Duration::from_secs(20), || {
            if let Some(status) = control.child.try_wait()? {
                bail!("turn-control exited: {status}");
            }
            Ok(self
                .manager
                .wait_for("READY=1", Duration::from_millis(50))
                .ok())
        });
        let checked = ready.and_then(|()| check_exec(&control, fds_passed));
        let log = control.log();
        self.control = Some(control);
        checked.with_context(|| format!("turn-control {instance}'s log:\n{log}"))
    }

    fn control(&mut self) -> &mut TurnControl {
        self.control.as_mut().unwrap()
    }

    fn metrics(&self) -> String {
        Lab::scrape(&self.lab.relay, TURN_CONTROL_METRICS).unwrap()
    }

    /// The relay ports of the relay sockets in the fd store.
    fn stored_relay_ports(&self) -> BTreeSet<u16> {
        self.manager
            .names()
            .iter()
            .filter_map(|name| name.strip_prefix("relay-v4-")?.parse().ok())
            .collect()
    }

    /// Fails unless the store comes to hold exactly the relay sockets of `ports`: the
    /// daemon sends FDSTORE before it answers, but the manager reads it on its own thread.
    fn expect_stored_relay_ports(&self, ports: &[u16], what: &str) {
        let expected: BTreeSet<u16> = ports.iter().copied().collect();
        let waited = wait_for(what, T, || {
            Ok((self.stored_relay_ports() == expected).then_some(()))
        });
        assert!(
            waited.is_ok(),
            "{what}: stored {:?}, expected {expected:?}",
            self.stored_relay_ports()
        );
    }

    /// Channel data relayed by the kernel: (client to peer, peer to client), IPv4.
    fn kernel_counters(&mut self) -> (u64, u64) {
        (
            self.agent.counter("relay_client_to_peer_v4_v4").unwrap().0,
            self.agent.counter("relay_peer_to_client_v4_v4").unwrap().0,
        )
    }
}

/// The process runs `binary` itself (sh and `ip netns exec` exec'd it, neither forked), and
/// its LISTEN_PID is its own pid whenever fds were passed.
fn check_exec(control: &TurnControl, fds_passed: bool) -> anyhow::Result<()> {
    let pid = control.pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    ensure!(
        exe == control.binary.canonicalize()?,
        "pid {pid} runs {}, not {}: something forked on the way",
        exe.display(),
        control.binary.display()
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    let listen_pid = environ
        .split(|byte| *byte == 0)
        .find_map(|variable| variable.strip_prefix(b"LISTEN_PID="))
        .map(|value| String::from_utf8_lossy(value).into_owned());
    let expected = fds_passed.then(|| pid.to_string());
    ensure!(
        listen_pid == expected,
        "LISTEN_PID={listen_pid:?}, expected {expected:?}"
    );
    Ok(())
}

/// One datagram of a numbered stream as a peer got it.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    number: u64,
    from: SocketAddr,
    at: Instant,
}

/// A peer socket's arrivals, collected by a task until stopped.
struct Receiver {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    fn start(runtime: &tokio::runtime::Runtime, socket: Arc<tokio::net::UdpSocket>) -> Self {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = runtime.spawn({
            let (arrivals, stop) = (Arc::clone(&arrivals), Arc::clone(&stop));
            async move {
                let mut buffer = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let received = tokio::time::timeout(
                        Duration::from_millis(20),
                        socket.recv_from(&mut buffer),
                    )
                    .await;
                    if let Ok(Ok((length, from))) = received
                        && let Some(number) = std::str::from_utf8(&buffer[..length])
                            .ok()
                            .and_then(|text| text.strip_prefix("stream "))
                            .and_then(|number| number.parse().ok())
                    {
                        arrivals.lock().unwrap().push(Arrival {
                            number,
                            from,
                            at: Instant::now(),
                        });
                    }
                }
            }
        });
        Self {
            arrivals,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    fn distinct(&self) -> usize {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals
            .iter()
            .map(|arrival| arrival.number)
            .collect::<BTreeSet<_>>()
            .len()
    }

    fn finish(self, runtime: &tokio::runtime::Runtime) -> Vec<Arrival> {
        self.stop.store(true, Ordering::Relaxed);
        runtime.block_on(self.task).unwrap();
        Arc::try_unwrap(self.arrivals)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// The longest time between two arrivals in a row.
fn longest_gap(arrivals: &[Arrival]) -> Duration {
    arrivals
        .windows(2)
        .map(|pair| pair[1].at.duration_since(pair[0].at))
        .max()
        .unwrap_or_default()
}

/// The numbered streams of one restart: channel data to the kernel peer and Send
/// indications to the user-space peer, one of each every [`STREAM_INTERVAL`].
struct Streams {
    stop: Arc<AtomicBool>,
    sender: tokio::task::JoinHandle<anyhow::Result<u64>>,
    kernel: Receiver,
    user_space: Receiver,
}

impl Streams {
    fn start<C: Conn + Send + Sync + 'static>(
        runtime: &tokio::runtime::Runtime,
        relayed: &Arc<C>,
        kernel_peer: &Arc<tokio::net::UdpSocket>,
        user_space_peer: &Arc<tokio::net::UdpSocket>,
    ) -> Self {
        let kernel = Receiver::start(runtime, Arc::clone(kernel_peer));
        let user_space = Receiver::start(runtime, Arc::clone(user_space_peer));
        let stop = Arc::new(AtomicBool::new(false));
        let to = (
            kernel_peer.local_addr().unwrap(),
            user_space_peer.local_addr().unwrap(),
        );
        let sender = runtime.spawn({
            let (relayed, stop) = (Arc::clone(relayed), Arc::clone(&stop));
            async move {
                let mut tick = tokio::time::interval(STREAM_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut number = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let message = format!("stream {number}");
                    relayed.send_to(message.as_bytes(), to.0).await?;
                    relayed.send_to(message.as_bytes(), to.1).await?;
                    number += 1;
                }
                Ok::<_, anyhow::Error>(number)
            }
        });
        Self {
            stop,
            sender,
            kernel,
            user_space,
        }
    }

    /// Waits until both peers got `count` more datagrams than they had.
    fn wait_for_more(&self, count: usize) -> anyhow::Result<()> {
        let (kernel, user_space) = (self.kernel.count(), self.user_space.count());
        wait_for("the streams to flow", T, || {
            Ok((self.kernel.count() >= kernel + count
                && self.user_space.count() >= user_space + count)
                .then_some(()))
        })
    }

    /// Stops sending and collects what arrived: how many were sent, and each peer's
    /// arrivals. Every channel-data datagram must arrive; Send indications get a short
    /// while, and what is missing then is lost.
    fn finish(self, runtime: &tokio::runtime::Runtime) -> (u64, Vec<Arrival>, Vec<Arrival>) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = runtime.block_on(self.sender).unwrap().unwrap();
        let all = usize::try_from(sent).unwrap();
        let kernel_complete = wait_for("every channel-data datagram", T, || {
            Ok((self.kernel.distinct() >= all).then_some(()))
        });
        let _ = wait_for("every Send indication", Duration::from_secs(1), || {
            Ok((self.user_space.distinct() >= all).then_some(()))
        });
        let kernel = self.kernel.finish(runtime);
        let user_space = self.user_space.finish(runtime);
        if let Err(error) = kernel_complete {
            let got: BTreeSet<u64> = kernel.iter().map(|arrival| arrival.number).collect();
            let missing: Vec<u64> = (0..sent).filter(|n| !got.contains(n)).collect();
            panic!("{error:#}: {sent} sent, missing {missing:?}");
        }
        (sent, kernel, user_space)
    }
}

/// The harness's blocking TURN client over UDP with one allocation of the lab user.
struct UdpAllocation {
    client: tests::stun::Client,
    relayed: SocketAddr,
}

impl UdpAllocation {
    fn new(lab: &Lab, server: SocketAddr) -> anyhow::Result<Self> {
        let mut client = harness_client(lab, server)?;
        let relayed = client.allocate_relayed()?;
        Ok(Self { client, relayed })
    }

    /// A Refresh signed with the nonce it has; the answer (no retry after a 438).
    fn refresh(&mut self) -> anyhow::Result<Answer> {
        let lifetime = u32::try_from(LIFETIME_SECONDS)?.to_be_bytes();
        let request = self
            .client
            .build(method::REFRESH, |m| m.attr(attr::LIFETIME, &lifetime));
        self.client
            .exchange(&request)?
            .context("Refresh unanswered")
    }

    fn create_permission(&mut self, peer: SocketAddr) -> anyhow::Result<()> {
        let answer = self.client.request(method::CREATE_PERMISSION, |m| {
            m.xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })?;
        ensure!(
            answer.class == class::SUCCESS,
            "CreatePermission answered {:?}",
            answer.error_code()
        );
        Ok(())
    }

    /// A Send indication of `data` to `peer`.
    fn send(&mut self, peer: SocketAddr, data: &[u8]) -> anyhow::Result<()> {
        let mut indication = Msg::new(method::SEND, class::INDICATION, self.client.next_txid());
        indication
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, data);
        self.client
            .socket
            .send_to(&indication.finish(None, false), self.client.server)?;
        Ok(())
    }
}

/// The harness's blocking TURN client of the lab user, on a socket of its own in the client
/// namespace.
fn harness_client(lab: &Lab, server: SocketAddr) -> anyhow::Result<tests::stun::Client> {
    let socket = lab.client.enter(|| Ok(UdpSocket::bind((CLIENT_V4, 0))?))?;
    tests::stun::Client::new(socket, server, "test", "testpass", None)
}

/// A TURN-over-TCP client (RFC 8656 §3.1) with a UDP allocation of [`TCP_USER`].
struct TcpAllocation {
    stream: TcpStream,
    relayed: SocketAddr,
    /// The long-term key, realm and nonce it allocated with.
    credentials: ([u8; 16], Vec<u8>, Vec<u8>),
}

impl TcpAllocation {
    fn new(lab: &Lab, server: SocketAddr) -> anyhow::Result<Self> {
        let mut stream = lab
            .client
            .enter(move || Ok(TcpStream::connect_timeout(&server, T)?))?;
        stream.set_read_timeout(Some(T))?;
        let allocate = |txid: u8| {
            let mut request = Msg::new(method::ALLOCATE, class::REQUEST, [txid; 12]);
            request.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            request
        };
        stream.write_all(&allocate(1).finish(None, false))?;
        let challenge = read_message(&mut stream)?;
        ensure!(
            challenge.error_code() == Some(401),
            "the first Allocate over TCP answered {:?}",
            challenge.error_code()
        );
        let realm = challenge.attr(attr::REALM).context("no REALM")?.to_vec();
        let nonce = challenge.attr(attr::NONCE).context("no NONCE")?.to_vec();
        let key = long_term_key(TCP_USER.0, &String::from_utf8_lossy(&realm), TCP_USER.1);
        let mut signed = allocate(2);
        signed.credentials(TCP_USER.0, &realm, &nonce);
        stream.write_all(&signed.finish(Some(&key), false))?;
        let answer = read_message(&mut stream)?;
        ensure!(
            answer.class == class::SUCCESS,
            "Allocate over TCP answered {:?}",
            answer.error_code()
        );
        let relayed = answer
            .xor_addr(attr::XOR_RELAYED_ADDRESS)
            .context("no XOR-RELAYED-ADDRESS")?;
        Ok(Self {
            stream,
            relayed,
            credentials: (key, realm, nonce),
        })
    }

    /// Sends a Refresh signed as the Allocate was.
    fn send_refresh(&mut self, txid: u8) -> anyhow::Result<()> {
        let (key, realm, nonce) = &self.credentials;
        let mut request = Msg::new(method::REFRESH, class::REQUEST, [txid; 12]);
        request.credentials(TCP_USER.0, realm, nonce);
        self.stream.write_all(&request.finish(Some(key), false))?;
        Ok(())
    }

    /// Checks that the connection is open and quiet: nothing to read, no end.
    fn still_open(&mut self) -> anyhow::Result<()> {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut buffer = [0u8; 256];
        let read = self.stream.read(&mut buffer);
        self.stream.set_read_timeout(Some(T))?;
        match read {
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(())
            }
            Ok(0) => bail!("the server closed the TCP connection"),
            Ok(length) => bail!("{length} unexpected bytes"),
            Err(error) => Err(error).context("the TCP connection broke"),
        }
    }
}

/// One STUN message from a TCP stream (RFC 8656 §3.1: no framing but the message's own).
fn read_message(stream: &mut TcpStream) -> anyhow::Result<Answer> {
    let mut message = vec![0u8; 20];
    stream.read_exact(&mut message)?;
    let length = usize::from(u16::from_be_bytes([message[2], message[3]]));
    message.resize(20 + length, 0);
    stream.read_exact(&mut message[20..])?;
    Answer::parse(&message).context("not STUN")
}

/// A metric of the running turn-control, 0 when absent.
fn metric(body: &str, name: &str, labels: &str) -> f64 {
    sample(body, name, labels).unwrap_or(0.0)
}

/// Refresh answers by code, summed over the threads' series.
fn refresh_answers(body: &str) -> (f64, f64) {
    let all: Vec<(bool, f64)> = body
        .lines()
        .filter(|line| {
            line.starts_with("turn_requests_total{") && line.contains(r#"method="refresh""#)
        })
        .filter_map(|line| {
            let value = line.rsplit(' ').next()?.parse().ok()?;
            Some((line.contains(r#"code="200""#), value))
        })
        .collect();
    let ok = all.iter().filter(|(ok, _)| *ok).map(|(_, v)| v).sum();
    let other = all.iter().filter(|(ok, _)| !*ok).map(|(_, v)| v).sum();
    (ok, other)
}

/// What one restart measured, for the table printed at the end.
struct Measured {
    how: Restart,
    /// Datagrams each stream sent.
    sent: u64,
    /// From the signal to the new process's READY=1.
    down: Duration,
    /// The longest gap between channel-data datagrams at the kernel peer (the client's own
    /// pace: webrtc-rs stops sending while one of its Refreshes waits for its answer).
    kernel_gap: Duration,
    /// The longest gap between Send indications at the user-space peer: the pause.
    user_space_gap: Duration,
    /// Send indications that never arrived.
    user_space_lost: u64,
}

#[test]
fn turn_control_restarts_keep_every_allocation_and_the_kernel_loses_no_channel_data() {
    if !tests::privileged() {
        return;
    }
    let mut rig = Rig::new().unwrap();
    let binaries = Binaries::new(rig.lab.dir()).unwrap();
    let (current, newer) = (&binaries.current, &binaries.newer);
    rig.start(current, 0).unwrap();
    rig.lab.wait_agent_connected(Site::A).unwrap();
    let listeners_stored = rig
        .manager
        .names()
        .iter()
        .filter(|name| name.starts_with("listener-"))
        .count();
    // Two threads, two addresses, UDP and TCP.
    assert_eq!(listeners_stored, 8, "stored: {:?}", rig.manager.names());

    let runtime = tests::clients::runtime().unwrap();
    let _guard = runtime.enter();
    let server = SocketAddr::new(IpAddr::V4(RELAY_V4), LISTEN_PORT);
    let peer = || Arc::new(tests::clients::udp_socket(&rig.lab.peer, IpAddr::V4(PEER_V4)).unwrap());
    let (kernel_peer, user_space_peer, harness_peer) = (peer(), peer(), peer());

    // The webrtc-rs client: its channel to the kernel peer is relayed in the kernel...
    let client = runtime
        .block_on(tests::clients::webrtc_client(
            &rig.lab.client,
            IpAddr::V4(CLIENT_V4),
            server,
        ))
        .unwrap();
    let relayed = Arc::new(runtime.block_on(client.allocate()).unwrap());
    let relayed_addr = relayed.local_addr().unwrap();
    runtime
        .block_on(tests::clients::round_trips(&*relayed, &kernel_peer, 10, T))
        .unwrap();
    let expected: Vec<ChannelBinding> = wait_for("the channel in the kernel", T, || {
        Ok(Some(bare(rig.agent.list()?)).filter(|listed| listed.len() == 1))
    })
    .unwrap();
    let binding = proto::Binding::try_from(&expected[0]).unwrap();
    assert_eq!(
        (binding.client.ip(), binding.peer, binding.allocation_port),
        (
            IpAddr::V4(CLIENT_V4),
            kernel_peer.local_addr().unwrap(),
            relayed_addr.port()
        ),
        "the kernel's binding: {binding:?}"
    );
    assert_eq!(
        (binding.listener, expected[0].channel),
        (server, FIRST_CHANNEL)
    );
    // ...and its ChannelBind for the user-space peer is refused (one channel per
    // allocation), so it sends Send indications there from now on.
    runtime
        .block_on(relayed.send_to(b"first", user_space_peer.local_addr().unwrap()))
        .unwrap();
    wait_for("the second ChannelBind to be refused", T, || {
        Ok((metric(
            &rig.metrics(),
            "turn_allocation_cap_reached_total",
            r#"cap="channels""#,
        ) >= 1.0)
            .then_some(()))
    })
    .unwrap();

    // The second UDP allocation of the lab user, and the quota it fills.
    let mut second = UdpAllocation::new(&rig.lab, server).unwrap();
    second
        .create_permission(harness_peer.local_addr().unwrap())
        .unwrap();
    let third = harness_client(&rig.lab, server)
        .unwrap()
        .allocate()
        .unwrap();
    assert_eq!(
        third.error_code(),
        Some(486),
        "the quota holds before any restart"
    );
    let mut tcp = TcpAllocation::new(&rig.lab, server).unwrap();
    rig.expect_stored_relay_ports(
        &[
            relayed_addr.port(),
            second.relayed.port(),
            tcp.relayed.port(),
        ],
        "the fd store holds every relay socket",
    );

    let mut table = Vec::new();
    let mut listeners_kept = Vec::new();
    for (instance, how) in [Restart::Term, Restart::Kill, Restart::NewerBuild]
        .into_iter()
        .enumerate()
    {
        // Refreshed before each restart, as the harness client does not refresh by itself.
        let answer = second.refresh().unwrap();
        assert_eq!(answer.class, class::SUCCESS, "{how:?}: Refresh before");
        let counters_before = rig.kernel_counters();

        let streams = Streams::start(&runtime, &relayed, &kernel_peer, &user_space_peer);
        streams.wait_for_more(STREAM_MARGIN).unwrap();
        let signalled = Instant::now();
        let old_log = {
            let control = rig.control();
            let status = control.stop(how.signal()).unwrap();
            let log = control.log();
            match how {
                Restart::Kill => assert_eq!(status.signal(), Some(9), "{how:?}: {status}"),
                Restart::Term | Restart::NewerBuild => {
                    assert!(status.success(), "{how:?}: exited {status}\n{log}");
                    assert!(
                        log.contains("handing over: the allocations stay for the next process"),
                        "{how:?}: no hand-over in the log:\n{log}"
                    );
                }
            }
            log
        };
        // The TCP client's connection stays open: its socket waits in the store. A Refresh it
        // sends now waits there for the next process (answered below).
        tcp.send_refresh(0x40 + instance as u8)
            .with_context(|| format!("{how:?}: old turn-control's log:\n{old_log}"))
            .unwrap();
        let binary = match how {
            Restart::Term | Restart::Kill => current,
            Restart::NewerBuild => newer,
        };
        rig.start(binary, instance + 1).unwrap();
        let down = signalled.elapsed();
        rig.lab.wait_agent_connected(Site::A).unwrap();
        // Each event-loop thread logs its restore as it starts, READY=1 does not wait for it.
        wait_for("the restore in the log", T, || {
            Ok(rig
                .control()
                .log()
                .contains("allocations restored")
                .then_some(()))
        })
        .with_context(|| format!("{how:?}:\n{}", rig.control().log()))
        .unwrap();
        // The agent's bindings are turn-control's: the restored channel, nothing stale.
        wait_for("the bindings to agree", T, || {
            let listed = bare(rig.agent.list()?);
            let entries = sample_sum(
                &Lab::scrape(&rig.lab.relay, AGENT_METRICS)?,
                "xdp_binding_map_entries",
            );
            let channels = sample(&rig.metrics(), "turn_channel_bindings_active", "");
            Ok((listed == expected && entries == 2.0 && channels == Some(1.0)).then_some(()))
        })
        .with_context(|| {
            format!(
                "{how:?}: the agent lists {:?}, expected {expected:?}",
                rig.agent.list()
            )
        })
        .unwrap();
        streams.wait_for_more(STREAM_MARGIN).unwrap();
        let (sent, kernel, user_space) = streams.finish(&runtime);

        // Not one channel-data datagram lost, each once, all relayed by the kernel from the
        // same relayed address.
        let mut sorted: Vec<u64> = kernel.iter().map(|arrival| arrival.number).collect();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..sent).collect::<Vec<_>>(),
            "{how:?}: channel data lost or repeated"
        );
        assert!(
            kernel.iter().all(|arrival| arrival.from == relayed_addr),
            "{how:?}: channel data from another address than {relayed_addr}"
        );
        let counters = rig.kernel_counters();
        assert_eq!(
            counters.0 - counters_before.0,
            sent,
            "{how:?}: every channel-data datagram went through the kernel"
        );
        // Send indications: from the same relayed address; the last ones, sent well after
        // the new process was ready, all arrived.
        assert!(
            user_space
                .iter()
                .all(|arrival| arrival.from == relayed_addr),
            "{how:?}: Send indications relayed from another address than {relayed_addr}"
        );
        let delivered: BTreeSet<u64> = user_space.iter().map(|arrival| arrival.number).collect();
        assert!(
            (sent - USER_SPACE_TAIL..sent).all(|n| delivered.contains(&n)),
            "{how:?}: the last Send indications did not all arrive"
        );
        let user_space_gap = longest_gap(&user_space);
        assert!(
            user_space_gap < PAUSE_BOUND,
            "{how:?}: user space paused {user_space_gap:?}"
        );

        // What came back, as turn-control counts it.
        let body = rig.metrics();
        let restored = |what: &str| {
            metric(
                &body,
                "turn_restart_restored_total",
                &format!(r#"what="{what}""#),
            )
        };
        // Asserted last (below), so that a wrong count does not hide the rest.
        let restored_listeners = restored("listeners_kept");
        let restored_counts = [
            ("allocations", restored("allocations"), 3.0),
            ("permissions", restored("permissions"), 2.0),
            ("channels", restored("channels"), 1.0),
            ("kernel_channels", restored("kernel_channels"), 1.0),
            ("relay_sockets_kept", restored("relay_sockets_kept"), 3.0),
            (
                "tcp_connections_kept",
                restored("tcp_connections_kept"),
                1.0,
            ),
            (
                "relay_sockets_rebound",
                restored("relay_sockets_rebound"),
                0.0,
            ),
        ];
        for (what, got, want) in restored_counts {
            assert_eq!(
                got, want,
                "{how:?}: turn_restart_restored_total{{what=\"{what}\"}}"
            );
        }
        // Nothing was dropped, the TCP allocation neither.
        assert_eq!(
            sample_sum(&body, "turn_restart_dropped_total"),
            0.0,
            "{how:?}: turn_restart_dropped_total"
        );
        assert_eq!(metric(&body, "turn_journal_write_errors_total", ""), 0.0);
        rig.expect_stored_relay_ports(
            &[
                relayed_addr.port(),
                second.relayed.port(),
                tcp.relayed.port(),
            ],
            &format!("{how:?}: the fd store holds the relay sockets of every allocation"),
        );

        // The second allocation answers Refresh at once (the nonce still valid) and relays
        // from its relayed address.
        let answer = second.refresh().unwrap();
        assert_eq!(
            (answer.class, answer.error_code()),
            (class::SUCCESS, None),
            "{how:?}: Refresh after the restart"
        );
        assert_eq!(
            answer.attr(attr::LIFETIME),
            Some(&u32::try_from(LIFETIME_SECONDS).unwrap().to_be_bytes()[..])
        );
        second
            .send(harness_peer.local_addr().unwrap(), b"after")
            .unwrap();
        let mut buffer = [0u8; 64];
        let (length, from) = runtime
            .block_on(tokio::time::timeout(T, harness_peer.recv_from(&mut buffer)))
            .unwrap()
            .unwrap();
        assert_eq!((&buffer[..length], from), (&b"after"[..], second.relayed));

        // Channel data still relayed in the kernel, both ways.
        runtime
            .block_on(tests::clients::round_trips(&*relayed, &kernel_peer, 5, T))
            .unwrap();
        let after = rig.kernel_counters();
        assert!(
            after.0 >= counters.0 + 5 && after.1 >= counters.1 + 5,
            "{how:?}: relayed in the kernel both ways: {counters:?} -> {after:?}"
        );

        // The user's two allocations still count: a third gets 486.
        let third = harness_client(&rig.lab, server)
            .unwrap()
            .allocate()
            .unwrap();
        assert_eq!(
            third.error_code(),
            Some(486),
            "{how:?}: the quota after the restart"
        );

        // The TCP client's Refresh, sent while no process ran, was answered on its connection,
        // which is still open and quiet.
        let answer = read_message(&mut tcp.stream).unwrap();
        tcp.still_open().unwrap();
        assert_eq!(
            (answer.class, answer.error_code()),
            (class::SUCCESS, None),
            "{how:?}: the TCP client's Refresh across the restart"
        );

        // webrtc-rs's own Refresh (every half lifetime) is answered 200 by the new process:
        // the harness's one above and at least one of its.
        wait_for(
            "webrtc-rs to refresh",
            Duration::from_secs(LIFETIME_SECONDS),
            || Ok((refresh_answers(&rig.metrics()).0 >= 2.0).then_some(())),
        )
        .unwrap();
        assert_eq!(
            refresh_answers(&rig.metrics()).1,
            0.0,
            "{how:?}: a Refresh was refused"
        );

        listeners_kept.push((how, restored_listeners));
        table.push(Measured {
            how,
            sent,
            down,
            kernel_gap: longest_gap(&kernel),
            user_space_gap,
            user_space_lost: sent - delivered.len() as u64,
        });
    }

    println!(
        "turn-control restarts under traffic (one datagram per stream every {STREAM_INTERVAL:?}):\n{:<12} {:>6} {:>14} {:>16} {:>20} {:>16}",
        "restart", "sent", "signal to ready", "kernel gap", "user-space pause", "user-space lost"
    );
    for m in &table {
        println!(
            "{:<12} {:>6} {:>14} {:>16} {:>20} {:>16}",
            format!("{:?}", m.how),
            m.sent,
            format!("{:.1?}", m.down),
            format!("{:.1?}", m.kernel_gap),
            format!("{:.1?}", m.user_space_gap),
            m.user_space_lost
        );
    }

    // SIGINT ends the relay for good, state directory or not: every binding leaves the
    // kernel and every relay socket the fd store.
    let status = rig.control().stop(Signal::SIGINT).unwrap();
    assert!(status.success(), "SIGINT: exited {status}");
    wait_for("the kernel to be emptied", T, || {
        let entries = sample_sum(
            &Lab::scrape(&rig.lab.relay, AGENT_METRICS)?,
            "xdp_binding_map_entries",
        );
        Ok((rig.agent.list()?.is_empty() && entries == 0.0).then_some(()))
    })
    .unwrap();
    rig.expect_stored_relay_ports(&[], "no relay socket left in the fd store");
    let _ = runtime.block_on(client.close());

    // Every listener came back from the fd store each time, and is counted so.
    for (how, kept) in listeners_kept {
        assert_eq!(
            kept, listeners_stored as f64,
            "{how:?}: turn_restart_restored_total{{what=\"listeners_kept\"}}"
        );
    }
}
