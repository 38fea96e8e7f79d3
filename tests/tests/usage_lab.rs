//! Usage accounting and bandwidth limits (issue #18) end to end in the lab: turn-control and
//! xdp-agent together, the accounting file read back record by record, and real datagrams
//! counted at the client and the peers.
//!
//! The harness's raw TURN client drives the allocations: the byte counts must be exactly what
//! the test chose (varied sizes, every payload checked), channel data to one peer (relayed by
//! the kernel) and Send indications to another (relayed in user space) on one allocation.
//! - one allocation's records: start, interims while it runs, one stop whose totals are, byte
//!   for byte, what crossed each way in each path, and the Prometheus usage counters;
//! - a SIGKILL of turn-control (with `--state-dir` under the stand-in service manager) and of
//!   the agent in the middle of the flow: the stop record still holds everything;
//! - `--max-bps` holding an allocation to its rate in the kernel and in user space, the
//!   dropped rest counted exactly, another user's allocation untouched;
//! - `--bps-capacity`: what is left granted, then 486 (RFC 8656 §7.2), and room again once an
//!   allocation ends.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use nix::sys::signal::Signal;
use tests::records::{self, Record, Traffic};
use tests::stun::{Answer, Client, Msg, attr, channel_data, channel_number, class, method};
use tests::{
    CLIENT_V4, LISTEN_PORT, Lab, PEER_V4, RELAY_V4, Site, TURN_CONTROL_METRICS, wait_for,
    workspace_binary,
};
use tests_harness::service_manager::ServiceManager;

const T: Duration = Duration::from_secs(5);
const REALM: &str = "lab.example";
/// The channel to the peer whose traffic the kernel relays.
const KERNEL_CHANNEL: u16 = 0x4000;
/// The pace of the accounted flow: one exchange every 10 ms.
const STEP: Duration = Duration::from_millis(10);
/// The accounted flow runs at least this long, so that interim records come while it runs.
const MIN_FLOW: Duration = Duration::from_secs(3);
/// How long turn-control may take to write a record (the kernel's figures come every 2 s).
const RECORD_DEADLINE: Duration = Duration::from_secs(10);

fn server() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(RELAY_V4), LISTEN_PORT)
}

/// What reached the client from the relay.
#[derive(Debug)]
enum Received {
    /// ChannelData on a channel.
    Channel(u16, Vec<u8>),
    /// A Data indication from a peer.
    Data(SocketAddr, Vec<u8>),
}

/// One UDP allocation of the harness's raw client, on a socket of its own in the client
/// namespace.
struct Turn {
    client: Client,
    relayed: SocketAddr,
    local: SocketAddr,
}

impl Turn {
    /// A client of `user` not yet allocated.
    fn client(lab: &Lab, user: &str, password: &str) -> anyhow::Result<Client> {
        let socket = lab.client.enter(|| Ok(UdpSocket::bind((CLIENT_V4, 0))?))?;
        Client::new(socket, server(), user, password, None)
    }

    /// An allocation of `user`; fails unless the Allocate succeeds.
    fn allocate(lab: &Lab, user: &str, password: &str) -> anyhow::Result<Self> {
        let mut client = Self::client(lab, user, password)?;
        let relayed = client.allocate_relayed()?;
        let local = client.socket.local_addr()?;
        Ok(Self {
            client,
            relayed,
            local,
        })
    }

    fn succeed(
        &mut self,
        what: &str,
        method: u16,
        build: impl Fn(&mut Msg) -> &mut Msg,
    ) -> anyhow::Result<()> {
        let answer = self.client.request(method, build)?;
        ensure!(
            answer.class == class::SUCCESS,
            "{what} answered {:?}",
            answer.error_code()
        );
        Ok(())
    }

    fn permit(&mut self, peer: SocketAddr) -> anyhow::Result<()> {
        self.succeed("CreatePermission", method::CREATE_PERMISSION, |m| {
            m.xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })
    }

    /// Binds `channel` to `peer`: its success means the agent holds the binding.
    fn bind(&mut self, channel: u16, peer: SocketAddr) -> anyhow::Result<()> {
        self.succeed("ChannelBind", method::CHANNEL_BIND, |m| {
            m.attr(attr::CHANNEL_NUMBER, &channel_number(channel))
                .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })
    }

    /// Ends the allocation: a Refresh with LIFETIME 0 (RFC 8656 §7.3).
    fn delete(&mut self) -> anyhow::Result<()> {
        self.succeed("Refresh 0", method::REFRESH, |m| {
            m.attr(attr::LIFETIME, &[0; 4])
        })
    }

    fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> anyhow::Result<()> {
        let mut indication = Msg::new(method::SEND, class::INDICATION, self.client.next_txid());
        indication
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, data);
        self.client
            .socket
            .send_to(&indication.finish(None, false), self.client.server)?;
        Ok(())
    }

    fn send_channel(&self, channel: u16, data: &[u8]) -> anyhow::Result<()> {
        self.client
            .socket
            .send_to(&channel_data(channel, data), self.client.server)?;
        Ok(())
    }

    /// The next ChannelData or Data indication, within [`T`].
    fn receive(&self) -> anyhow::Result<Received> {
        let mut buffer = [0u8; 2048];
        let start = Instant::now();
        while start.elapsed() < T {
            let length = match self.client.socket.recv(&mut buffer) {
                Ok(length) => length,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            if let Some(received) = decode(&buffer[..length]) {
                return Ok(received);
            }
        }
        bail!("the client got nothing from the relay within {T:?}")
    }
}

/// A ChannelData message (RFC 8656 §12.4: 0x4000 to 0x7FFF first) or a Data indication.
fn decode(datagram: &[u8]) -> Option<Received> {
    if let [first, _, length_hi, length_lo, ref rest @ ..] = *datagram
        && first & 0xC0 == 0x40
    {
        let length = usize::from(u16::from_be_bytes([length_hi, length_lo]));
        let channel = u16::from_be_bytes([datagram[0], datagram[1]]);
        return Some(Received::Channel(channel, rest.get(..length)?.to_vec()));
    }
    let answer = Answer::parse(datagram)?;
    if (answer.method, answer.class) != (method::DATA, class::INDICATION) {
        return None;
    }
    Some(Received::Data(
        answer.xor_addr(attr::XOR_PEER_ADDRESS)?,
        answer.attr(attr::DATA)?.to_vec(),
    ))
}

/// A peer's UDP socket in the peer namespace.
fn peer(lab: &Lab) -> anyhow::Result<UdpSocket> {
    let socket = lab.peer.enter(|| Ok(UdpSocket::bind((PEER_V4, 0))?))?;
    socket.set_read_timeout(Some(T))?;
    Ok(socket)
}

/// `size` bytes that tell step `step` apart.
fn payload(step: u64, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (step as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

/// Which way the client sends to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// ChannelData on [`KERNEL_CHANNEL`] to peer A: the kernel relays it, and A's answers.
    Kernel,
    /// Send indications to peer B: user space relays them, and B's answers as Data
    /// indications.
    UserSpace,
}

/// What crossed the relay, counted where it arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    client_to_peer: Traffic,
    peer_to_client: Traffic,
    kernel_client_to_peer: Traffic,
    kernel_peer_to_client: Traffic,
}

/// The client's exchanges with its two peers, each datagram checked where it arrives.
struct Flow<'a> {
    turn: &'a mut Turn,
    a: &'a UdpSocket,
    b: &'a UdpSocket,
    tally: Tally,
    step: u64,
}

impl<'a> Flow<'a> {
    /// A flow of `turn`, which has permissions for both peers and [`KERNEL_CHANNEL`] bound
    /// to `a`.
    fn new(turn: &'a mut Turn, a: &'a UdpSocket, b: &'a UdpSocket) -> Self {
        Self {
            turn,
            a,
            b,
            tally: Tally::default(),
            step: 0,
        }
    }

    /// Alternates the paths, answers every third datagram.
    fn next(&mut self) -> anyhow::Result<()> {
        let path = if self.step.is_multiple_of(2) {
            Route::Kernel
        } else {
            Route::UserSpace
        };
        self.exchange(path, self.step.is_multiple_of(3))
    }

    /// One datagram of a size of its own from the client over `path`, checked at the peer;
    /// with `answer`, one back, checked at the client.
    fn exchange(&mut self, path: Route, answer: bool) -> anyhow::Result<()> {
        let step = self.step;
        self.step += 1;
        let data = payload(step, 1 + (step as usize * 37) % 1200);
        let peer = match path {
            Route::Kernel => {
                self.turn.send_channel(KERNEL_CHANNEL, &data)?;
                self.a
            }
            Route::UserSpace => {
                self.turn.send_indication(self.b.local_addr()?, &data)?;
                self.b
            }
        };
        let mut buffer = [0u8; 2048];
        let (length, from) = peer
            .recv_from(&mut buffer)
            .with_context(|| format!("step {step}: the {path:?} peer got nothing"))?;
        ensure!(
            (&buffer[..length], from) == (&data[..], self.turn.relayed),
            "step {step}: the {path:?} peer got {length} bytes from {from}, not {} from {}",
            data.len(),
            self.turn.relayed
        );
        self.tally.client_to_peer.count(data.len());
        if path == Route::Kernel {
            self.tally.kernel_client_to_peer.count(data.len());
        }
        if answer {
            self.answer(step, path, peer)?;
        }
        Ok(())
    }

    fn answer(&mut self, step: u64, path: Route, peer: &UdpSocket) -> anyhow::Result<()> {
        let data = payload(!step, 1 + (step as usize * 53) % 900);
        peer.send_to(&data, self.turn.relayed)?;
        let received = self
            .turn
            .receive()
            .with_context(|| format!("step {step}: the {path:?} peer's answer"))?;
        let expected = match (&received, path) {
            (Received::Channel(KERNEL_CHANNEL, got), Route::Kernel) => got == &data,
            (Received::Data(from, got), Route::UserSpace) => {
                *from == peer.local_addr()? && got == &data
            }
            _ => false,
        };
        ensure!(
            expected,
            "step {step}: the client got {received:?}, not {} bytes over {path:?}",
            data.len()
        );
        self.tally.peer_to_client.count(data.len());
        if path == Route::Kernel {
            self.tally.kernel_peer_to_client.count(data.len());
        }
        Ok(())
    }
}

/// The records of `turn`'s allocation so far.
fn records_of(file: &Path, turn: &Turn) -> anyhow::Result<Vec<Record>> {
    Ok(records::of_allocation(
        &records::read(file)?,
        turn.local,
        turn.relayed,
    ))
}

/// Waits for a record of `turn`'s allocation that `accept` takes.
fn wait_for_record(
    file: &Path,
    turn: &Turn,
    what: &str,
    accept: impl Fn(&Record) -> bool,
) -> anyhow::Result<Record> {
    let found = wait_for(what, RECORD_DEADLINE, || {
        Ok(records_of(file, turn)?
            .into_iter()
            .find(|record| accept(record)))
    });
    found.with_context(|| {
        format!(
            "the allocation's records: {:#?}",
            records_of(file, turn).unwrap_or_default()
        )
    })
}

fn wait_for_stop(file: &Path, turn: &Turn) -> anyhow::Result<Record> {
    wait_for_record(file, turn, "the stop record", |record| {
        record.record == "stop"
    })
}

/// The records of one allocation in order: one start first, interims, one stop last, with
/// sequence numbers that only grow (`contiguous`: 0, 1, 2, ...), each interim within the
/// stop's totals, and every record naming the allocation alike.
fn check_sequence(records: &[Record], contiguous: bool) -> anyhow::Result<()> {
    let kinds: Vec<&str> = records
        .iter()
        .map(|record| record.record.as_str())
        .collect();
    ensure!(
        kinds.first() == Some(&"start") && kinds.last() == Some(&"stop"),
        "records {kinds:?}"
    );
    ensure!(
        kinds[1..kinds.len() - 1]
            .iter()
            .all(|kind| *kind == "interim"),
        "records {kinds:?}"
    );
    let sequences: Vec<u64> = records.iter().map(|record| record.sequence).collect();
    if contiguous {
        ensure!(
            sequences == (0..records.len() as u64).collect::<Vec<_>>(),
            "sequence numbers {sequences:?}"
        );
    } else {
        ensure!(
            sequences[0] == 0 && sequences.windows(2).all(|pair| pair[0] < pair[1]),
            "sequence numbers {sequences:?}"
        );
    }
    let stop = &records[records.len() - 1];
    for record in records {
        ensure!(
            (
                &record.username,
                &record.client,
                &record.relay,
                &record.started
            ) == (&stop.username, &stop.client, &stop.relay, &stop.started),
            "records disagree about the allocation: {record:?} and {stop:?}"
        );
        ensure!(
            record.client_to_peer.within(stop.client_to_peer)
                && record.peer_to_client.within(stop.peer_to_client),
            "a record beyond the stop's totals: {record:?}"
        );
    }
    Ok(())
}

/// The stop record holds exactly `tally`, with the kernel's final figures, of a deletion.
fn check_stop(stop: &Record, tally: &Tally) -> anyhow::Result<()> {
    let got = Tally {
        client_to_peer: stop.client_to_peer,
        peer_to_client: stop.peer_to_client,
        kernel_client_to_peer: stop.kernel_client_to_peer,
        kernel_peer_to_client: stop.kernel_peer_to_client,
    };
    ensure!(
        got == *tally,
        "the stop record counts\n{got:#?}\nwhat crossed:\n{tally:#?}\n{stop:#?}"
    );
    ensure!(
        (stop.dropped_client_to_peer, stop.dropped_peer_to_client)
            == (Traffic::default(), Traffic::default()),
        "dropped without a limit: {stop:?}"
    );
    ensure!(
        (
            stop.end_reason.as_deref(),
            stop.kernel_final,
            stop.ended.is_some()
        ) == (Some("deleted"), Some(true), true),
        "end: {stop:?}"
    );
    Ok(())
}

/// The records' fields that name the allocation of `turn` (user `test`, no limit).
fn check_identity(record: &Record, turn: &Turn) -> anyhow::Result<()> {
    let identity = (
        record.username.as_str(),
        record.user.as_str(),
        record.realm.as_str(),
        record.client,
        record.transport.as_str(),
        record.server,
        record.relay.as_slice(),
        record.max_bps,
    );
    let expected = (
        "test",
        "test",
        REALM,
        turn.local,
        "udp",
        server(),
        std::slice::from_ref(&turn.relayed),
        None,
    );
    ensure!(identity == expected, "{record:?}");
    ensure!(
        record.allocation.len() == 16 && record.allocation.chars().all(|c| c.is_ascii_hexdigit()),
        "allocation id {:?}",
        record.allocation
    );
    Ok(())
}

/// `turn_usage_bytes_total` of the lab's realm in `direction`, 0 when absent.
fn usage_bytes(body: &str, direction: &str) -> f64 {
    body.lines()
        .filter(|line| line.starts_with("turn_usage_bytes_total{"))
        .filter(|line| {
            line.contains(&format!(r#"realm="{REALM}""#))
                && line.contains(&format!(r#"direction="{direction}""#))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Where channel data went, as both daemons count it: turn-control's offload results and
/// the kernel's verdicts for IPv4 channel data (relayed, or passed to user space for want
/// of a binding).
fn data_plane_report(lab: &Lab) -> String {
    let control = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS).unwrap_or_default();
    let offloads: Vec<&str> = control
        .lines()
        .filter(|line| line.starts_with("turn_offload_installs_total{"))
        .collect();
    let kernel = tests::agent::Agent::connect(&lab.dir().join("agent.sock")).map(|mut agent| {
        [
            "relay_client_to_peer_v4_v4",
            "relay_peer_to_client_v4_v4",
            "pass_unknown_binding",
        ]
        .map(|reason| (reason, agent.counter(reason).ok()))
    });
    format!("turn-control: {offloads:?}; the kernel (packets, bytes): {kernel:?}")
}

/// Waits until turn-control's log (`read`) shows its first full Sync to the agent: a
/// ChannelBind made while that Sync is in flight may stay out of the kernel (reported with
/// these tests), which is not what they measure.
fn wait_synced(read: impl Fn() -> String) -> anyhow::Result<()> {
    wait_for("turn-control's first full sync to the agent", T, || {
        Ok(read().contains("full sync sent to xdp-agent").then_some(()))
    })
}

fn accounting_args(file: &Path) -> Vec<String> {
    vec![
        "--accounting-file".into(),
        file.display().to_string(),
        "--accounting-interim-seconds".into(),
        "1".into(),
    ]
}

/// A lab with the agent and turn-control writing records to `accounting.jsonl` every
/// second, plus `extra` flags; the file.
fn lab_with_accounting(extra: &[&str]) -> anyhow::Result<(Lab, PathBuf)> {
    let mut lab = Lab::new()?;
    let agent = lab.start_xdp_agent(&["--xdp-mode", "native"])?;
    let file = lab.dir().join("accounting.jsonl");
    let mut args = accounting_args(&file);
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.start_turn_control(Some(&agent), &args)?;
    lab.wait_agent_connected(Site::A)?;
    wait_synced(|| lab.log("turn-control"))?;
    Ok((lab, file))
}

/// An allocation of the lab user with permissions for both peers and [`KERNEL_CHANNEL`]
/// bound to `a`.
fn allocation_to(lab: &Lab, a: &UdpSocket, b: &UdpSocket) -> anyhow::Result<Turn> {
    let mut turn = Turn::allocate(lab, "test", "testpass")?;
    turn.permit(a.local_addr()?)?;
    turn.permit(b.local_addr()?)?;
    turn.bind(KERNEL_CHANNEL, a.local_addr()?)?;
    // The success may come before the binding is in the kernel (turn-control's offload
    // timeout answers anyway, by design): channel data is the kernel's only from then on.
    let mut agent = tests::agent::Agent::connect(&lab.dir().join("agent.sock"))?;
    wait_for("the channel binding in the kernel", T, || {
        Ok((agent.list()?.len() == 1).then_some(()))
    })
    .with_context(|| data_plane_report(lab))?;
    Ok(turn)
}

/// The stop record's kernel figures are the kernel's own: its relay counters, which count
/// this allocation alone in these labs.
fn check_kernel_counters(lab: &Lab, stop: &Record) -> anyhow::Result<()> {
    let mut agent = tests::agent::Agent::connect(&lab.dir().join("agent.sock"))?;
    let counter = |agent: &mut tests::agent::Agent, reason: &str| {
        agent
            .counter(reason)
            .map(|(packets, bytes)| Traffic { packets, bytes })
    };
    let kernel = (
        counter(&mut agent, "relay_client_to_peer_v4_v4")?,
        counter(&mut agent, "relay_peer_to_client_v4_v4")?,
    );
    ensure!(
        (stop.kernel_client_to_peer, stop.kernel_peer_to_client) == kernel,
        "the stop record's kernel part {:?} is not what the kernel relayed {kernel:?}",
        (stop.kernel_client_to_peer, stop.kernel_peer_to_client)
    );
    Ok(())
}

#[test]
fn one_record_per_allocation_equals_what_was_sent_and_received_in_both_paths() {
    if !tests::privileged() {
        return;
    }
    let (lab, file) = lab_with_accounting(&[]).unwrap();
    let (a, b) = (peer(&lab).unwrap(), peer(&lab).unwrap());
    let mut turn = allocation_to(&lab, &a, &b).unwrap();

    // The flow, on an absolute schedule, until it has run MIN_FLOW and an interim record of
    // the allocation has appeared meanwhile.
    let mut flow = Flow::new(&mut turn, &a, &b);
    let started = Instant::now();
    let mut interim_seen = false;
    while !(interim_seen && started.elapsed() >= MIN_FLOW) {
        let target = started + STEP * u32::try_from(flow.step).unwrap();
        if let Some(wait) = target.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        flow.next().unwrap();
        if flow.step.is_multiple_of(10) {
            interim_seen = records_of(&file, flow.turn)
                .unwrap()
                .iter()
                .any(|record| record.record == "interim");
        }
        assert!(
            started.elapsed() < MIN_FLOW + RECORD_DEADLINE,
            "no interim record while the flow ran: {:#?}",
            records_of(&file, flow.turn).unwrap()
        );
    }
    let tally = flow.tally;
    let (channel_part, user_space_part) = (
        tally.kernel_client_to_peer,
        tally
            .client_to_peer
            .packets
            .checked_sub(tally.kernel_client_to_peer.packets)
            .unwrap(),
    );
    println!(
        "{:.1?}: {} datagrams to the peers ({channel_part:?} as channel data, {user_space_part} Send indications), {:?} back",
        started.elapsed(),
        tally.client_to_peer.packets,
        tally.peer_to_client
    );

    turn.delete().unwrap();
    let stop = wait_for_stop(&file, &turn).unwrap();
    let all = records_of(&file, &turn).unwrap();
    check_sequence(&all, true).unwrap();
    for record in &all {
        check_identity(record, &turn).unwrap();
    }
    check_kernel_counters(&lab, &stop).unwrap();
    check_stop(&stop, &tally)
        .with_context(|| data_plane_report(&lab))
        .unwrap();
    assert!(
        all.iter()
            .filter(|record| record.record == "interim")
            .count()
            >= 1,
        "{all:#?}"
    );

    // The Prometheus counters count the same bytes (and any other allocation's: none here).
    wait_for("turn_usage_bytes_total to count the flow", T, || {
        let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS)?;
        let counted = (
            usage_bytes(&body, "client_to_peer"),
            usage_bytes(&body, "peer_to_client"),
        );
        Ok((counted.0 >= tally.client_to_peer.bytes as f64
            && counted.1 >= tally.peer_to_client.bytes as f64)
            .then_some(()))
    })
    .with_context(|| {
        let body = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS).unwrap_or_default();
        format!(
            "turn_usage_bytes_total: {:?}, {:?}; the flow: {tally:?}",
            usage_bytes(&body, "client_to_peer"),
            usage_bytes(&body, "peer_to_client")
        )
    })
    .unwrap();
}

/// turn-control started by the service manager in the relay namespace (as
/// control_restarts.rs does), SIGKILLed on drop.
struct Managed {
    child: Option<Child>,
    manager: ServiceManager,
    binary: PathBuf,
    instance: usize,
}

impl Managed {
    /// A manager in the lab's directory and a link to the built binary there (a rebuild
    /// meanwhile changes nothing here).
    fn new(lab: &Lab) -> anyhow::Result<Self> {
        let built = workspace_binary("turn-control")?;
        let binary = lab.dir().join("turn-control");
        std::fs::hard_link(&built, &binary)
            .or_else(|_| std::fs::copy(&built, &binary).map(drop))?;
        Ok(Self {
            child: None,
            manager: ServiceManager::new(lab.dir())?,
            binary,
            instance: 0,
        })
    }

    /// Starts turn-control with `args` and waits for its READY=1 and its agent link.
    fn start(&mut self, lab: &Lab, args: &[OsString]) -> anyhow::Result<()> {
        let log = lab
            .dir()
            .join(format!("turn-control-{}.log", self.instance));
        self.instance += 1;
        let file = std::fs::File::create(&log)?;
        let mut child = self
            .manager
            .command("ip")?
            .args(["netns", "exec", lab.relay.name()])
            .arg(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        let ready = wait_for("turn-control's READY=1", Duration::from_secs(20), || {
            if let Some(status) = child.try_wait()? {
                bail!("turn-control exited: {status}");
            }
            Ok(self
                .manager
                .wait_for("READY=1", Duration::from_millis(50))
                .ok())
        });
        self.child = Some(child);
        ready
            .and_then(|()| lab.wait_agent_connected(Site::A))
            .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("turn-control is not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
            Signal::SIGKILL,
        )?;
        child.wait()?;
        Ok(())
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.binary);
    }
}

/// What Lab::start_turn_control passes, the agent, a state directory and the accounting.
fn managed_args(lab: &Lab, agent: &Path, file: &Path) -> Vec<OsString> {
    let v6 = Site::A.v6();
    let mut args: Vec<OsString> = [
        "--listen",
        &format!("{RELAY_V4}:{LISTEN_PORT}"),
        "--listen",
        &format!("[{v6}]:{LISTEN_PORT}"),
        "--relay-ip",
        &RELAY_V4.to_string(),
        "--relay-ip",
        &v6.to_string(),
        "--ports",
        "49152-65535",
        "--realm",
        REALM,
        "--user",
        "test:testpass",
        "--allow-peer",
        "198.51.100.0/24",
        "--allow-peer",
        "2001:db8:3::/64",
        "--metrics",
        TURN_CONTROL_METRICS,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.extend(accounting_args(file).into_iter().map(OsString::from));
    args.extend(["--agent".into(), agent.as_os_str().to_owned()]);
    args.extend([
        "--state-dir".into(),
        lab.dir().join("state").into_os_string(),
    ]);
    args
}

/// `count` exchanges of `flow` (each path in turn), or of the kernel path alone.
fn run(flow: &mut Flow<'_>, count: usize, kernel_only: bool) -> anyhow::Result<()> {
    for _ in 0..count {
        if kernel_only {
            let answer = flow.step.is_multiple_of(3);
            flow.exchange(Route::Kernel, answer)?;
        } else {
            flow.next()?;
        }
    }
    Ok(())
}

/// turn-control SIGKILLed and started again on its state directory, mid-flow.
fn turn_control_crash() -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let agent = lab.start_xdp_agent(&["--xdp-mode", "native"])?;
    let file = lab.dir().join("accounting.jsonl");
    let mut managed = Managed::new(&lab)?;
    let args = managed_args(&lab, &agent, &file);
    let result = turn_control_crash_in(&lab, &mut managed, &args, &file);
    result.with_context(|| {
        let logs = (0..managed.instance).map(|instance| {
            let log =
                std::fs::read_to_string(lab.dir().join(format!("turn-control-{instance}.log")));
            format!(
                "turn-control {instance}'s log:\n{}",
                tail(&log.unwrap_or_default())
            )
        });
        logs.collect::<Vec<_>>().join("\n")
    })
}

fn turn_control_crash_in(
    lab: &Lab,
    managed: &mut Managed,
    args: &[OsString],
    file: &Path,
) -> anyhow::Result<()> {
    managed.start(lab, args)?;
    wait_synced(|| {
        std::fs::read_to_string(lab.dir().join("turn-control-0.log")).unwrap_or_default()
    })?;
    let (a, b) = (peer(lab)?, peer(lab)?);
    let mut turn = allocation_to(lab, &a, &b)?;
    let mut flow = Flow::new(&mut turn, &a, &b);
    run(&mut flow, 60, false)?;
    // User-space counts since the last interim record die with the process by design: wait
    // for one that covers everything so far.
    let so_far = flow.tally;
    wait_for_record(
        file,
        flow.turn,
        "an interim record of everything so far",
        |record| {
            record.record == "interim"
                && (record.client_to_peer, record.peer_to_client)
                    == (so_far.client_to_peer, so_far.peer_to_client)
        },
    )?;
    managed.kill()?;
    // The kernel relays on while no turn-control runs.
    run(&mut flow, 30, true)?;
    managed.start(lab, args)?;
    run(&mut flow, 60, false)?;
    let tally = flow.tally;
    turn.delete()?;
    let stop = wait_for_stop(file, &turn)?;
    let all = records_of(file, &turn)?;
    check_sequence(&all, false).context("across a crash of turn-control")?;
    check_kernel_counters(lab, &stop).context("across a crash of turn-control")?;
    check_stop(&stop, &tally)
        .with_context(|| data_plane_report(lab))
        .context("across a crash of turn-control")
}

/// The agent SIGKILLed mid-flow (the pinned program relaying on) and started again.
fn agent_crash() -> anyhow::Result<()> {
    let (mut lab, file) = lab_with_accounting(&[])?;
    let result = agent_crash_in(&mut lab, &file);
    result.with_context(|| {
        format!(
            "turn-control's log:\n{}\nthe agent's log:\n{}",
            tail(&lab.log("turn-control")),
            tail(&lab.log("xdp-agent"))
        )
    })
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn agent_crash_in(lab: &mut Lab, file: &Path) -> anyhow::Result<()> {
    let (a, b) = (peer(lab)?, peer(lab)?);
    let mut turn = allocation_to(lab, &a, &b)?;
    let mut flow = Flow::new(&mut turn, &a, &b);
    run(&mut flow, 60, false)?;
    lab.take_process("xdp-agent")
        .context("no agent")?
        .stop(Signal::SIGKILL)?;
    run(&mut flow, 60, false)?;
    lab.start_xdp_agent(&["--xdp-mode", "native"])?;
    // turn-control reads the kernel's figures again: everything so far, in an interim.
    let so_far = flow.tally;
    wait_for_record(
        file,
        flow.turn,
        "an interim record with the kernel's figures after the agent's restart",
        |record| {
            record.record == "interim"
                && (record.kernel_client_to_peer, record.kernel_peer_to_client)
                    == (so_far.kernel_client_to_peer, so_far.kernel_peer_to_client)
        },
    )
    .with_context(|| data_plane_report(lab))?;
    run(&mut flow, 60, false)?;
    let tally = flow.tally;
    turn.delete()?;
    let stop = wait_for_stop(file, &turn)?;
    let all = records_of(file, &turn)?;
    check_sequence(&all, true).context("across a crash of the agent")?;
    check_kernel_counters(lab, &stop).context("across a crash of the agent")?;
    check_stop(&stop, &tally)
        .with_context(|| data_plane_report(lab))
        .context("across a crash of the agent")
}

#[test]
fn records_survive_a_crash_of_either_daemon() {
    if !tests::privileged() {
        return;
    }
    // Both run, so that one's failure does not hide the other's result.
    let started = Instant::now();
    let control = turn_control_crash();
    println!("turn-control crash: {:.1?}", started.elapsed());
    let started = Instant::now();
    let agent = agent_crash();
    println!("agent crash: {:.1?}", started.elapsed());
    let failures: Vec<String> = [
        ("turn-control SIGKILLed", control),
        ("xdp-agent SIGKILLed", agent),
    ]
    .into_iter()
    .filter_map(|(what, result)| result.err().map(|error| format!("{what}: {error:#}")))
    .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `--max-bps` of the lab user: 1 Mbit/s.
const MAX_BPS: u64 = 125_000;
/// The limited flows' payloads.
const DATAGRAM: usize = 1000;
/// How long the limited flows send.
const LIMITED_FOR: Duration = Duration::from_secs(10);

/// What one peer socket received from the address `from`, counted by a thread until stopped.
struct Counter {
    traffic: Arc<Mutex<Traffic>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Counter {
    fn start(socket: UdpSocket, from: IpAddr) -> anyhow::Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let traffic = Arc::new(Mutex::new(Traffic::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (traffic, stop) = (Arc::clone(&traffic), Arc::clone(&stop));
            move || {
                let mut buffer = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((length, sender)) = socket.recv_from(&mut buffer)
                        && sender.ip() == from
                    {
                        traffic.lock().unwrap().count(length);
                    }
                }
            }
        });
        Ok(Self {
            traffic,
            stop,
            thread,
        })
    }

    fn finish(self) -> Traffic {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        *self.traffic.lock().unwrap()
    }
}

/// Sends `rate` datagrams of [`DATAGRAM`] bytes a second for [`LIMITED_FOR`] on an absolute
/// schedule (late ones go at once); what was sent.
fn send_paced(
    rate: u32,
    mut send: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Traffic> {
    let count = rate * u32::try_from(LIMITED_FOR.as_secs())?;
    let interval = Duration::from_secs(1) / rate;
    let data = payload(7, DATAGRAM);
    let mut sent = Traffic::default();
    let start = Instant::now();
    for k in 0..count {
        if let Some(wait) = (start + interval * k).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        send(&data)?;
        sent.count(data.len());
    }
    Ok(sent)
}

/// A limited flow's outcome: what was sent, what the peer received, the stop record.
struct Limited {
    name: &'static str,
    sent: Traffic,
    received: Traffic,
    stop: Record,
}

impl Limited {
    /// Sent = relayed + dropped, exactly, and the peer got what the record says was relayed.
    fn check_exact(&self) -> anyhow::Result<()> {
        let stop = &self.stop;
        ensure!(
            stop.client_to_peer.plus(stop.dropped_client_to_peer) == self.sent,
            "{}: sent {:?}, the stop record relayed {:?} and dropped {:?}",
            self.name,
            self.sent,
            stop.client_to_peer,
            stop.dropped_client_to_peer
        );
        ensure!(
            stop.client_to_peer == self.received,
            "{}: the peer received {:?}, the stop record relayed {:?}",
            self.name,
            self.received,
            stop.client_to_peer
        );
        Ok(())
    }
}

/// Starts the three flows: the lab user's channel data (kernel) and Send indications (user
/// space) at ten times `--max-bps`, user `other`'s channel data at 100 kB/s within its own
/// limit. Each returns its allocation and what it sent.
fn limited_flows(lab: &Lab, peers: &[SocketAddr; 3]) -> anyhow::Result<Vec<(Turn, Traffic)>> {
    let mut kernel = Turn::allocate(lab, "test", "testpass")?;
    kernel.permit(peers[0])?;
    kernel.bind(KERNEL_CHANNEL, peers[0])?;
    let mut user_space = Turn::allocate(lab, "test", "testpass")?;
    user_space.permit(peers[1])?;
    let mut other = Turn::allocate(lab, "other", "otherpass")?;
    other.permit(peers[2])?;
    other.bind(KERNEL_CHANNEL, peers[2])?;
    let over = u32::try_from(10 * MAX_BPS / DATAGRAM as u64)?;
    std::thread::scope(|scope| {
        let threads = [
            scope.spawn(move || {
                let sent = send_paced(over, |data| kernel.send_channel(KERNEL_CHANNEL, data))?;
                Ok::<_, anyhow::Error>((kernel, sent))
            }),
            scope.spawn(move || {
                let to = peers[1];
                let sent = send_paced(over, |data| user_space.send_indication(to, data))?;
                Ok((user_space, sent))
            }),
            scope.spawn(move || {
                let sent = send_paced(100, |data| other.send_channel(KERNEL_CHANNEL, data))?;
                Ok((other, sent))
            }),
        ];
        threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect()
    })
}

#[test]
fn max_bps_holds_an_allocation_to_its_rate_in_the_kernel_and_in_user_space() {
    if !tests::privileged() {
        return;
    }
    let started = Instant::now();
    let (lab, file) = lab_with_accounting(&[
        "--max-bps",
        &MAX_BPS.to_string(),
        "--user",
        "other:otherpass",
        "--user-limit",
        "other:max_bps=100000000",
    ])
    .unwrap();
    let sockets = [
        peer(&lab).unwrap(),
        peer(&lab).unwrap(),
        peer(&lab).unwrap(),
    ];
    let peers = sockets
        .each_ref()
        .map(|socket| socket.local_addr().unwrap());
    // The relayed addresses are known only once allocated: count every datagram from the
    // relay's address, the only sender in the lab.
    let counters: Vec<Counter> = sockets
        .into_iter()
        .map(|socket| Counter::start(socket, IpAddr::V4(RELAY_V4)))
        .collect::<anyhow::Result<_>>()
        .unwrap();
    let flows = limited_flows(&lab, &peers).unwrap();
    let mut stops = Vec::new();
    for (mut turn, sent) in flows {
        turn.delete().unwrap();
        stops.push((wait_for_stop(&file, &turn).unwrap(), sent));
    }
    let outcomes: Vec<Limited> = counters
        .into_iter()
        .zip(stops)
        .zip(["kernel", "user space", "other user"])
        .map(|((counter, (stop, sent)), name)| Limited {
            name,
            sent,
            received: counter.finish(),
            stop,
        })
        .collect();
    for outcome in &outcomes {
        println!(
            "{}: sent {:?}, the peer received {:?}, dropped {:?}",
            outcome.name, outcome.sent, outcome.received, outcome.stop.dropped_client_to_peer
        );
    }
    check_limited(&outcomes).unwrap();
    println!("took {:.1?}", started.elapsed());
}

fn check_limited(outcomes: &[Limited]) -> anyhow::Result<()> {
    let allowed = MAX_BPS * LIMITED_FOR.as_secs();
    let mut failures = Vec::new();
    for outcome in &outcomes[..2] {
        let received = outcome.received.bytes;
        if received.abs_diff(allowed) * 20 > allowed {
            failures.push(format!(
                "{}: the peer received {received} bytes, not within 5% of {allowed}",
                outcome.name
            ));
        }
        if outcome.stop.max_bps != Some(MAX_BPS) {
            failures.push(format!(
                "{}: max_bps {:?}",
                outcome.name, outcome.stop.max_bps
            ));
        }
    }
    let other = &outcomes[2];
    if other.received != other.sent || other.stop.dropped_client_to_peer != Traffic::default() {
        failures.push(format!(
            "other user: sent {:?}, received {:?}, dropped {:?}",
            other.sent, other.received, other.stop.dropped_client_to_peer
        ));
    }
    if other.stop.max_bps != Some(100_000_000) {
        failures.push(format!("other user: max_bps {:?}", other.stop.max_bps));
    }
    failures.extend(outcomes.iter().filter_map(|outcome| {
        outcome
            .check_exact()
            .err()
            .map(|error| format!("{error:#}"))
    }));
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn bps_capacity_refuses_allocations_beyond_it_with_486() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let file = lab.dir().join("accounting.jsonl");
    let mut args = accounting_args(&file);
    args.extend(["--max-bps", "100000", "--bps-capacity", "250000"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.start_turn_control(None, &args).unwrap();

    let granted = |turn: &Turn| {
        wait_for_record(&file, turn, "the start record", |record| {
            record.record == "start"
        })
        .unwrap()
        .max_bps
    };
    let mut first = Turn::allocate(&lab, "test", "testpass").unwrap();
    let second = Turn::allocate(&lab, "test", "testpass").unwrap();
    let third = Turn::allocate(&lab, "test", "testpass").unwrap();
    assert_eq!(
        [granted(&first), granted(&second), granted(&third)],
        [Some(100_000), Some(100_000), Some(50_000)],
        "the third gets what is left of the capacity"
    );
    let fourth = Turn::client(&lab, "test", "testpass")
        .unwrap()
        .allocate()
        .unwrap();
    assert_eq!(
        (fourth.class, fourth.error_code()),
        (class::ERROR, Some(486)),
        "nothing left"
    );

    // An allocation's end gives its reservation back.
    first.delete().unwrap();
    let stop = wait_for_stop(&file, &first).unwrap();
    assert_eq!(stop.end_reason.as_deref(), Some("deleted"));
    let fifth = Turn::allocate(&lab, "test", "testpass").unwrap();
    assert_eq!(granted(&fifth), Some(100_000));
}
