//! `make bench`: relays measured in isolation, written to BENCHMARKS.md and a chart.
//!
//! Every system under test runs alone in a relay namespace joined by one veth
//! to a generator namespace (see `tests::bench`). A real TURN client sets up an
//! allocation and a channel binding first; then an XDP program driven by
//! `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` sends frames that
//! match the binding, and an XDP sink on the same veth counts, checks and
//! drops what the relay sends back. The same generator and sink serve every
//! system: coturn, turn-control alone, turn-control with xdp-agent in each
//! next-hop mode (the kernel's FIB, the default, and MAC swap), and the floor
//! program of each mode (`floor_fib`, `floor`). Then the relay program with
//! and without its expiry check, side by side (`tests::bench::expiry`), and
//! with its usage counters and rate limits on and off beside the floor
//! (`tests::bench::usage`).
//! Apart: TURN over TLS, coturn beside turn-control (`tests::bench::tls`).
//!
//! Usage: bench [--out BENCHMARKS.md] [--png tests/bench/bench.png] [--expiry-only | --usage-only | --tls-only]
//! (`--expiry-only`: only the expiry check's section, printed; `--usage-only`: only the usage
//! counters' and rate limits' section, printed; `--tls-only`: only TURN over TLS, its section
//! printed; no report written)
//! Environment: BENCH_QUICK=1 for a tiny run; BENCH_RUNS, BENCH_SECONDS.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tests::bench::control::{ControlFigures, RawOptions};
use tests::bench::raw::percentile;
use tests::bench::{
    BenchNet, BpfStats, Direction, Handling, Offered, case_frames, floor_key, plot, prog_stats,
    tls, turn,
};
use tests::workspace_binary;

#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    seconds: f64,
    trial_seconds: f64,
    quick: bool,
    /// Measure only the expiry check and print its section.
    expiry_only: bool,
    /// Measure only the usage counters and rate limits and print their section.
    usage_only: bool,
    /// Measure only TURN over TLS and print its section.
    tls_only: bool,
    out: PathBuf,
    png: PathBuf,
}

/// coturn as every run here starts it: the relay's address and ports, the bench's user,
/// plain UDP/TCP only.
const COTURN_ARGS: &[&str] = &[
    "-n",
    "--listening-ip=203.0.113.10",
    "--relay-ip=203.0.113.10",
    "--listening-port=3478",
    "--min-port=50000",
    "--max-port=59999",
    "--lt-cred-mech",
    "--user=test:testpass",
    "--realm=example.org",
    "--no-tls",
    "--no-dtls",
    "--no-cli",
    "--allow-loopback-peers",
];

fn options() -> anyhow::Result<Options> {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let env_num = |name: &str, default: f64| -> anyhow::Result<f64> {
        match std::env::var(name) {
            Ok(v) => Ok(v.parse()?),
            Err(_) => Ok(default),
        }
    };
    let mut options = Options {
        runs: env_num("BENCH_RUNS", if quick { 1.0 } else { 5.0 })? as usize,
        seconds: env_num("BENCH_SECONDS", if quick { 0.3 } else { 2.0 })?,
        trial_seconds: if quick { 0.2 } else { 0.6 },
        quick,
        expiry_only: false,
        usage_only: false,
        tls_only: false,
        out: PathBuf::from("BENCHMARKS.md"),
        png: PathBuf::from("tests/bench/bench.png"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--out" => options.out = value()?.into(),
            "--png" => options.png = value()?.into(),
            "--expiry-only" => options.expiry_only = true,
            "--usage-only" => options.usage_only = true,
            "--tls-only" => options.tls_only = true,
            "--help" | "-h" => {
                println!(
                    "usage: bench [--out BENCHMARKS.md] [--png tests/bench/bench.png] [--expiry-only | --usage-only | --tls-only]"
                );
                println!("env: BENCH_QUICK=1, BENCH_RUNS=N, BENCH_SECONDS=S");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(options.runs > 0, "BENCH_RUNS must be positive");
    ensure!(
        [options.expiry_only, options.usage_only, options.tls_only]
            .into_iter()
            .filter(|only| *only)
            .count()
            <= 1,
        "--expiry-only, --usage-only and --tls-only exclude each other"
    );
    Ok(options)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Coturn,
    TurnControl,
    /// turn-control with xdp-agent, next hop by the kernel's FIB (the default).
    XdpFib,
    /// The floor of `XdpFib`.
    FloorFib,
    /// turn-control with xdp-agent `--next-hop mac-swap`.
    XdpMacSwap,
    /// The floor of `XdpMacSwap`.
    Floor,
}

impl System {
    /// In the order of the report: each XDP mode beside its floor.
    const ALL: [System; 6] = [
        System::Coturn,
        System::TurnControl,
        System::XdpFib,
        System::FloorFib,
        System::XdpMacSwap,
        System::Floor,
    ];

    /// The XDP relay's modes, each with its floor.
    const XDP_MODES: [(System, System); 2] = [
        (System::XdpFib, System::FloorFib),
        (System::XdpMacSwap, System::Floor),
    ];

    fn name(self) -> &'static str {
        match self {
            System::Coturn => "coturn 4.6",
            System::TurnControl => "turn-control (user space)",
            System::XdpFib => "turn-control + xdp-agent (XDP, FIB next hop)",
            System::FloorFib => "floor-fib XDP program",
            System::XdpMacSwap => "turn-control + xdp-agent (XDP, MAC swap)",
            System::Floor => "floor XDP program (MAC swap)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            System::Coturn => "coturn",
            System::TurnControl => "turn-control",
            System::XdpFib => "xdp-fib",
            System::FloorFib => "floor-fib",
            System::XdpMacSwap => "xdp-mac-swap",
            System::Floor => "floor",
        }
    }

    /// The XDP relay's mode, or the floor, checked on the generator's frame
    /// before the measurement: what the program on x0 returns and to which MAC.
    fn is_xdp(self) -> bool {
        !matches!(self, System::Coturn | System::TurnControl)
    }
}

/// Where a system's CPU time is read.
#[derive(Debug, Clone, Copy)]
enum CpuSource {
    /// A process's utime + stime.
    Process(u32),
    /// An XDP program's bpf_stats.
    Program(u32),
}

impl CpuSource {
    /// (cumulative ns, cumulative runs; 0 for a process).
    fn read(self) -> anyhow::Result<(u64, u64)> {
        match self {
            CpuSource::Process(pid) => Ok((tests::bench::process_cpu_ns(pid)?, 0)),
            CpuSource::Program(id) => prog_stats(id),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    offered_pps: f64,
    delivered_pps: f64,
    loss: f64,
    cpu_ns_per_packet: f64,
    bad: u64,
}

#[derive(Debug, Clone)]
struct CaseResult {
    system: System,
    direction: Direction,
    payload: usize,
    full: Vec<Sample>,
    /// Offered rate of the sustained runs (None: full speed already loses < 1%).
    paced_rate: Option<f64>,
    sustained: Vec<Sample>,
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

impl CaseResult {
    fn med(&self, f: impl Fn(&Sample) -> f64, sustained: bool) -> f64 {
        let samples = if sustained {
            &self.sustained
        } else {
            &self.full
        };
        median(samples.iter().map(f).collect())
    }
}

struct Sut {
    cpu: CpuSource,
    server_pid: Option<u32>,
    agent_socket: Option<PathBuf>,
    channel: u16,
    allocation_port: u16,
    handling: Handling,
    _session: Option<turn::Session>,
    _floor: Option<tests::xdp::Reference>,
    notes: Vec<String>,
}

/// What the steps of starting one system share: the bench's network and its
/// directory (pid file, logs, the agent's socket).
struct Startup<'a> {
    net: &'a mut BenchNet,
    dir: PathBuf,
}

fn start_system(net: &mut BenchNet, system: System) -> anyhow::Result<Sut> {
    let mut startup = Startup {
        dir: net.dir().to_owned(),
        net,
    };
    match system {
        System::Coturn | System::TurnControl => startup.user_space(system),
        System::XdpFib => startup.with_agent(false),
        System::XdpMacSwap => startup.with_agent(true),
        System::Floor => startup.floor(Handling::Mirror),
        System::FloorFib => startup.floor(Handling::Forward),
    }
}

impl Startup<'_> {
    /// coturn or turn-control alone: XDP_PASS on x0, the relay, one TURN session.
    fn user_space(&mut self, system: System) -> anyhow::Result<Sut> {
        // veth delivers XDP_TX frames only to a peer that runs XDP: x0
        // gets XDP_PASS, a few ns per packet, as in any XDP deployment.
        let pass = self.attach_pass()?;
        std::mem::forget(pass);
        let name = if system == System::Coturn {
            self.spawn_coturn()?
        } else {
            self.spawn_turn_control(None)?
        };
        let session = turn::open(&self.net.gen_ns, Duration::from_secs(20))
            .with_context(|| format!("TURN exchange with {name}: {}", self.net.log(name)))?;
        self.net.process(name)?.ensure_running()?;
        let pid = self.net.process(name)?.pid();
        let note = format!(
            "allocation port {}, channel {:#06x}, Allocate took {:.1} ms",
            session.allocation_port,
            session.channel,
            session.allocate_time.as_secs_f64() * 1e3
        );
        Ok(Sut {
            cpu: CpuSource::Process(pid),
            server_pid: Some(pid),
            agent_socket: None,
            channel: session.channel,
            allocation_port: session.allocation_port,
            handling: Handling::Relay,
            _session: Some(session),
            _floor: None,
            notes: vec![note],
        })
    }

    /// turn-control driving xdp-agent (next hop by the FIB, or by MAC swap):
    /// the agent, the control plane, one TURN session, and the binding as the
    /// agent lists it.
    fn with_agent(&mut self, mac_swap: bool) -> anyhow::Result<Sut> {
        let socket = self.dir.join("agent.sock");
        self.start_agent(&socket, mac_swap)?;
        self.spawn_turn_control(Some(&socket))?;
        let session = turn::open(&self.net.gen_ns, Duration::from_secs(20))
            .with_context(|| format!("TURN exchange: {}", self.net.log("turn-control")))?;
        let channel = agent_channel(&socket, &session)?;
        let note = format!(
            "allocation port {}, channel {channel:#06x} (as the agent lists it), Allocate took {:.1} ms",
            session.allocation_port,
            session.allocate_time.as_secs_f64() * 1e3
        );
        Ok(Sut {
            cpu: CpuSource::Program(self.net.relay_prog_id()?),
            server_pid: Some(self.net.process("turn-control")?.pid()),
            agent_socket: Some(socket),
            channel,
            allocation_port: session.allocation_port,
            handling: Handling::Relay,
            _session: Some(session),
            _floor: None,
            notes: vec![note],
        })
    }

    /// A floor program on x0 (`floor` for `Handling::Mirror`, `floor_fib`
    /// for `Handling::Forward`), its FLOWS holding the two generated flows.
    fn floor(&mut self, handling: Handling) -> anyhow::Result<Sut> {
        let net = &mut *self.net;
        let (port, channel) = (50000, turn::FIRST_CHANNEL);
        let mut keys = Vec::new();
        for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
            keys.push(floor_key(
                &case_frames(net, direction, 100, channel, port, handling).0,
            )?);
        }
        let floor = if handling == Handling::Forward {
            tests::xdp::Reference::floor_fib(&keys)?
        } else {
            tests::xdp::Reference::floor(&keys)?
        };
        net.attach_relay(&floor.program()?)?;
        let note = if handling == Handling::Forward {
            "no control plane: FLOWS holds the two generated flows, addressed past the relay \
             (client->peer 192.0.2.2:40000 -> 198.51.100.2:9000, peer->client the reverse), \
             the FIB gives the next hop"
        } else {
            "no control plane: FLOWS holds the two generated flows"
        };
        Ok(Sut {
            cpu: CpuSource::Program(net.relay_prog_id()?),
            server_pid: None,
            agent_socket: None,
            channel,
            allocation_port: port,
            handling,
            _session: None,
            _floor: Some(floor),
            notes: vec![note.to_owned()],
        })
    }

    /// The lab's XDP_PASS program, attached to x0.
    fn attach_pass(&mut self) -> anyhow::Result<libbpf_rs::Object> {
        let object = libbpf_rs::ObjectBuilder::default()
            .open_file(env!("LAB_PASS_OBJECT"))?
            .load()?;
        let program = object.progs_mut().next().context("no program")?;
        self.net.attach_relay(&program)?;
        Ok(object)
    }

    /// Spawns coturn in the relay namespace; returns its process name.
    fn spawn_coturn(&mut self) -> anyhow::Result<&'static str> {
        let mut command = self.net.relay_ns.command("turnserver");
        command
            .args(COTURN_ARGS)
            .args(["--no-stun-backward-compatibility", "--simple-log"]);
        command.arg(format!(
            "--pidfile={}",
            self.dir.join("turnserver.pid").display()
        ));
        command.arg(format!(
            "--log-file={}",
            self.dir.join("turnserver-file.log").display()
        ));
        self.net.spawn("turnserver", command)?;
        Ok("turnserver")
    }

    /// Spawns turn-control in the relay namespace, driving the agent at `agent`
    /// if given; returns its process name.
    fn spawn_turn_control(&mut self, agent: Option<&Path>) -> anyhow::Result<&'static str> {
        let mut command = self.net.relay_ns.command(workspace_binary("turn-control")?);
        command.args(turn_control_args());
        if let Some(socket) = agent {
            command.arg("--agent").arg(socket);
        }
        self.net.spawn("turn-control", command)?;
        Ok("turn-control")
    }

    /// Spawns xdp-agent on x0 in native mode (next hop by the FIB, its
    /// default, or `--next-hop mac-swap`) and waits until its socket accepts.
    fn start_agent(&mut self, socket: &Path, mac_swap: bool) -> anyhow::Result<()> {
        let mut command = self.net.relay_ns.command(workspace_binary("xdp-agent")?);
        if mac_swap {
            command.args(["--next-hop", "mac-swap"]);
        }
        command
            .args(["--iface", "x0", "--xdp-mode", "native", "--grpc"])
            .arg(socket)
            .arg("--pin-dir")
            .arg(self.net.pin_dir())
            // The bench's peer is on a test net, which the agent denies unless allowed.
            .args(["--allow-peer", "198.51.100.0/24"]);
        self.net.spawn("xdp-agent", command)?;
        tests::wait_for("xdp-agent's socket", Duration::from_secs(20), || {
            Ok(std::os::unix::net::UnixStream::connect(socket)
                .ok()
                .map(|_| ()))
        })
        .with_context(|| self.net.log("xdp-agent"))?;
        Ok(())
    }
}

/// Waits for the session's binding to reach the agent at `socket`, checks it is
/// the allocation's, and returns its channel as the agent lists it.
fn agent_channel(socket: &Path, session: &turn::Session) -> anyhow::Result<u16> {
    let mut agent = tests::agent::Agent::connect(socket)?;
    let bindings = tests::wait_for(
        "the binding to reach the agent",
        Duration::from_secs(10),
        || {
            let list = agent.list()?;
            Ok((!list.is_empty()).then_some(list))
        },
    )?;
    let binding = bindings.first().context("no binding")?;
    ensure!(
        binding.allocation_port == u32::from(session.allocation_port),
        "the agent's binding {binding:?} is not the allocation's"
    );
    Ok(binding.channel as u16)
}

fn turn_control_args() -> Vec<&'static str> {
    vec![
        "--listen",
        "203.0.113.10:3478",
        "--relay-ip",
        "203.0.113.10",
        "--ports",
        "49152-65535",
        "--realm",
        "lab.example",
        "--user",
        "test:testpass",
        "--allow-peer",
        "198.51.100.0/24",
        "--metrics",
        "127.0.0.1:9641",
    ]
}

fn sample(
    net: &BenchNet,
    sut: &Sut,
    frame: &[u8],
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<Sample> {
    let before = net.counts()?[0];
    let (cpu_before, runs_before) = sut.cpu.read()?;
    let Offered { frames, elapsed } = net.generate(frame, duration, rate)?;
    // What is still queued (a user-space relay's socket buffer) drains.
    std::thread::sleep(Duration::from_millis(50));
    let after = net.counts()?[0];
    let (cpu_after, runs_after) = sut.cpu.read()?;
    let delivered = after.packets - before.packets;
    let secs = elapsed.as_secs_f64();
    let cpu_ns_per_packet = match sut.cpu {
        CpuSource::Program(_) => {
            (cpu_after - cpu_before) as f64 / (runs_after - runs_before).max(1) as f64
        }
        CpuSource::Process(_) => (cpu_after - cpu_before) as f64 / delivered.max(1) as f64,
    };
    Ok(Sample {
        offered_pps: frames as f64 / secs,
        delivered_pps: delivered as f64 / secs,
        loss: 1.0 - delivered as f64 / frames.max(1) as f64,
        cpu_ns_per_packet,
        bad: after.bad - before.bad,
    })
}

fn measure(
    net: &BenchNet,
    sut: &Sut,
    system: System,
    direction: Direction,
    payload: usize,
    options: &Options,
) -> anyhow::Result<CaseResult> {
    let (frame, rule) = case_frames(
        net,
        direction,
        payload,
        sut.channel,
        sut.allocation_port,
        sut.handling,
    );
    if system.is_xdp() {
        net.check_next_hop(net.relay_prog_id()?, &frame)
            .with_context(|| format!("{} {} {payload} B", system.short(), direction.label()))?;
    }
    net.set_rules(&[rule])?;
    let duration = Duration::from_secs_f64(options.seconds);
    let trial = Duration::from_secs_f64(options.trial_seconds);
    // Warm-up (and a check that anything arrives at all).
    let warm = sample(net, sut, &frame, trial, None)?;
    ensure!(
        warm.delivered_pps > 0.0,
        "{} {} {payload} B: nothing came back (check the binding)",
        system.short(),
        direction.label()
    );
    let mut full = Vec::new();
    for _ in 0..options.runs {
        full.push(sample(net, sut, &frame, duration, None)?);
    }
    let full_loss = median(full.iter().map(|s| s.loss).collect());
    let mut result = CaseResult {
        system,
        direction,
        payload,
        full: full.clone(),
        paced_rate: None,
        sustained: full,
    };
    if full_loss >= 0.01 {
        // Step the offered rate down from what was delivered until a trial
        // loses under 1%, then bisect twice towards the last rate that lost.
        let lossless = |rate: f64| -> anyhow::Result<bool> {
            let s = sample(net, sut, &frame, trial, Some(rate))?;
            eprintln!(
                "bench:   trial at {rate:.0} pps: offered {:.0}, delivered {:.0}, loss {:.2}%",
                s.offered_pps,
                s.delivered_pps,
                s.loss * 100.0
            );
            Ok(s.loss < 0.01)
        };
        let mut bad = result.med(|s| s.delivered_pps, false);
        let mut good = None;
        let mut rate = bad * 0.97;
        for _ in 0..12 {
            if lossless(rate)? {
                good = Some(rate);
                break;
            }
            bad = rate;
            rate *= 0.85;
        }
        let mut good = good.unwrap_or(rate);
        for _ in 0..2 {
            let mid = (good + bad) / 2.0;
            if lossless(mid)? {
                good = mid;
            } else {
                bad = mid;
            }
        }
        let mut sustained = Vec::new();
        for _ in 0..options.runs {
            sustained.push(sample(net, sut, &frame, duration, Some(good))?);
        }
        result.paced_rate = Some(good);
        result.sustained = sustained;
    }
    eprintln!(
        "bench: {:<18} {:<13} {:>5} B  full load: {:>9.0} pps delivered ({:>5.1}% loss); <1% loss: {:>9.0} pps; cpu {:>7.1} ns/pkt",
        system.short(),
        direction.label(),
        payload,
        result.med(|s| s.delivered_pps, false),
        result.med(|s| s.loss, false) * 100.0,
        result.med(|s| s.delivered_pps, true),
        result.med(|s| s.cpu_ns_per_packet, true),
    );
    Ok(result)
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_owned(), |(_, m)| m.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024);
    let coturn = tests::run("turnserver", ["--version"])
        .ok()
        .and_then(|v| v.lines().next().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "- CPUs: {cpus} (`nproc`), {model}\n- Kernel: {}\n- Memory: {memory} GiB\n- coturn: {} (Debian)\n- Load average when the report was written: {} (a shared machine: other builds ran on the same cores, so absolute figures are low and noisy; the ratios within the run are the result)\n",
        kernel.trim(),
        coturn.trim(),
        load_average()
    )
}

/// The load averages over 1, 5 and 15 minutes (/proc/loadavg).
fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The existing micro-benchmark (`xdp-microbench --json`), rows of (program, ns, x floor).
fn microbench(options: &Options) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let binary = workspace_binary("xdp-microbench")?;
    let (runs, calls) = if options.quick {
        ("3", "20000")
    } else {
        ("5", "200000")
    };
    let output = tests::run(
        binary.to_str().context("path")?,
        ["--runs", runs, "--calls", calls, "--json"],
    )?;
    let mut rows = Vec::new();
    for line in output.lines() {
        let value: serde_json::Value = serde_json::from_str(line)?;
        if value.get("mode").is_some() {
            continue;
        }
        rows.push((
            value["program"].as_str().unwrap_or_default().to_owned(),
            value["ns_per_packet"].as_f64().unwrap_or(f64::NAN),
            value["vs_floor"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    Ok(rows)
}

/// turnutils_uclient through a real relay in the four-namespace lab; the summary lines.
fn end_to_end(server: System, options: &Options) -> anyhow::Result<String> {
    let mut lab = tests::Lab::new()?;
    match server {
        System::Coturn => {
            let mut command = lab.relay.command("turnserver");
            command.args(COTURN_ARGS).arg("--simple-log");
            command.arg(format!(
                "--pidfile={}",
                lab.dir().join("turnserver.pid").display()
            ));
            lab.spawn("turnserver", command)?;
            std::thread::sleep(Duration::from_secs(1));
        }
        _ => {
            let socket = lab.start_xdp_agent(&["--xdp-mode", "native"])?;
            lab.start_turn_control(Some(&socket), &[])?;
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let mut peer = lab.peer.command("turnutils_peer");
    peer.args(["-L", "198.51.100.2", "-p", "3480"]);
    lab.spawn("turnutils_peer", peer)?;
    std::thread::sleep(Duration::from_millis(300));
    let (clients, messages) = if options.quick {
        ("5", "100")
    } else {
        ("20", "2000")
    };
    let mut uclient = lab.uclient("198.51.100.2");
    uclient.args([
        "-m",
        clients,
        "-n",
        messages,
        "-l",
        "100",
        "-z",
        "1",
        "-c",
        "-p",
        "3478",
        "203.0.113.10",
    ]);
    let started = Instant::now();
    let output = uclient.output()?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut summary: Vec<String> = stdout
        .lines()
        .filter(|l| {
            (l.contains("tot_send_msgs") && !l.contains("msz="))
                || l.contains("Total transmit time")
                || l.contains("Average round trip delay")
                || l.contains("Total lost packets")
        })
        .map(|l| {
            l.trim_start_matches(|c: char| c.is_ascii_digit() || c == ':' || c == ' ')
                .trim_start_matches("start_mclient: ")
                .trim()
                .to_owned()
        })
        .collect();
    summary.dedup();
    summary.push(format!(
        "wall time {:.2} s ({clients} clients x {messages} messages of 100 B, -z 1 ms)",
        elapsed.as_secs_f64()
    ));
    Ok(summary.join("; "))
}

fn run() -> anyhow::Result<()> {
    let options = options()?;
    ensure!(
        tests::privileged(),
        "the bench needs root (namespaces, XDP)"
    );
    if options.tls_only {
        return tls_only(&options);
    }
    let started = Instant::now();
    let _stats = BpfStats::enable()?;
    if options.expiry_only {
        return expiry_only(&options);
    }
    if options.usage_only {
        return usage_only(&options);
    }
    let sizes = [100usize, 1200];
    let directions = [Direction::ClientToPeer, Direction::PeerToClient];
    let mut results: Vec<CaseResult> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut control: Vec<(System, anyhow::Result<ControlFigures>)> = Vec::new();
    let only = std::env::var("BENCH_SYSTEMS").unwrap_or_default();
    for system in System::ALL {
        if !only.is_empty() && !only.split(',').any(|s| s == system.short()) {
            continue;
        }
        eprintln!("bench: {}", system.name());
        let mut net = BenchNet::new()?;
        let sut = start_system(&mut net, system)?;
        for note in &sut.notes {
            notes.push(format!("{}: {note}", system.short()));
        }
        for direction in directions {
            for payload in sizes {
                results.push(measure(&net, &sut, system, direction, payload, &options)?);
            }
        }
        // The control plane is the same in both next-hop modes: measured with
        // the agent's default (FIB) only.
        if system != System::XdpMacSwap
            && let Some(figures) = control_plane(&mut net, &sut, &options)?
        {
            log_control(system, &figures);
            control.push((system, figures));
        }
        drop(sut);
        drop(net);
    }
    let expiry = if only.is_empty() || only.split(',').any(|s| s == "expiry") {
        expiry(&options)
    } else {
        Err(anyhow::anyhow!("not selected (BENCH_SYSTEMS)"))
    };
    let usage = usage_in_report(&options, &only)?;
    drop(_stats);

    eprintln!("bench: xdp-microbench");
    let micro = microbench(&options);
    eprintln!("bench: end-to-end turnutils_uclient runs");
    let e2e: Vec<(System, anyhow::Result<String>)> = [System::Coturn, System::XdpFib]
        .into_iter()
        .map(|s| (s, end_to_end(s, &options)))
        .collect();

    let tls = tls_section_or_why(&options);
    let report = render(
        &options,
        &results,
        &notes,
        &control,
        &micro,
        &expiry,
        &e2e,
        started.elapsed(),
    )? + "\n"
        + &usage
        + "\n"
        + &tls;
    std::fs::write(&options.out, report)
        .with_context(|| format!("cannot write {}", options.out.display()))?;
    if let Some(parent) = options.png.parent() {
        std::fs::create_dir_all(parent)?;
    }
    draw(&options.png, &results)?;
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        options.out.display(),
        options.png.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The control plane's figures of a system with a server (`None` for one
/// without: a floor).
fn control_plane(
    net: &mut BenchNet,
    sut: &Sut,
    options: &Options,
) -> anyhow::Result<Option<anyhow::Result<ControlFigures>>> {
    let Some(pid) = sut.server_pid else {
        return Ok(None);
    };
    net.set_rules(&[])?;
    let count = if options.quick { 20 } else { 200 };
    let boost: Vec<u32> = [Some(pid), net.process("xdp-agent").ok().map(|p| p.pid())]
        .into_iter()
        .flatten()
        .collect();
    Ok(Some(tests::bench::control::run(
        &net.gen_ns,
        count,
        pid,
        sut.agent_socket.as_deref().map(|socket| (socket, 1)),
        RawOptions::bench(options.quick),
        boost,
    )))
}

/// The relay program with and without its expiry check, side by side
/// (`tests::bench::expiry`), in both directions at both sizes.
fn expiry(options: &Options) -> anyhow::Result<Vec<tests::bench::expiry::Case>> {
    eprintln!("bench: the expiry check");
    tests::bench::expiry::measure(
        options.runs,
        Duration::from_secs_f64(options.seconds),
        Duration::from_secs_f64(options.trial_seconds),
        &[100, 1200],
    )
}

/// `--expiry-only`: measures the expiry check alone and prints its section
/// of the report, and when and how it was measured.
fn expiry_only(options: &Options) -> anyhow::Result<()> {
    let load_before = load_average();
    print!("{}", expiry_section(options, &expiry(options))?);
    println!(
        "This section was measured on its own (`bench --expiry-only`, {} run(s) of {:.1} s{}), on the machine above; load average {load_before} before it and {} after.\n",
        options.runs,
        options.seconds,
        if options.quick { ", BENCH_QUICK=1" } else { "" },
        load_average()
    );
    Ok(())
}

/// The relay program's usage counters and rate limits on and off beside the
/// floor (`tests::bench::usage`), in both directions at both sizes: its
/// section of the report, and when it was measured; `alone` when measured by
/// `--usage-only` rather than as part of the whole bench.
fn usage_section(options: &Options, alone: bool) -> anyhow::Result<String> {
    eprintln!("bench: the usage counters and rate limits");
    let load_before = load_average();
    let started = Instant::now();
    let cases = tests::bench::usage::measure(
        options.runs,
        Duration::from_secs_f64(options.seconds),
        Duration::from_secs_f64(options.trial_seconds),
        &[100, 1200],
    );
    let mut section = tests::bench::usage::section(options.runs, options.seconds, &cases)?;
    let quick = if options.quick { ", BENCH_QUICK=1" } else { "" };
    let how = if alone {
        format!(
            "measured on its own (`bench --usage-only`, {} run(s) of {:.1} s{quick})",
            options.runs, options.seconds
        )
    } else {
        "measured in this run".to_owned()
    };
    writeln!(
        section,
        "This section was {how}, on the machine above, in {:.0} s; load average {load_before} before it and {} after.",
        started.elapsed().as_secs_f64(),
        load_average()
    )?;
    Ok(section)
}

/// The usage section of the whole bench's report: measured unless
/// BENCH_SYSTEMS (`only`) selects other systems and not `usage`.
fn usage_in_report(options: &Options, only: &str) -> anyhow::Result<String> {
    if only.is_empty() || only.split(',').any(|s| s == "usage") {
        return usage_section(options, false);
    }
    tests::bench::usage::section(
        options.runs,
        options.seconds,
        &Err(anyhow::anyhow!("not selected (BENCH_SYSTEMS)")),
    )
}

/// `--usage-only`: measures the usage counters and rate limits alone and
/// prints their section of the report.
fn usage_only(options: &Options) -> anyhow::Result<()> {
    print!("{}", usage_section(options, true)?);
    Ok(())
}

/// The expiry check's section of the report: its text from [`TEMPLATE`]
/// with the table.
fn expiry_section(
    options: &Options,
    expiry: &anyhow::Result<Vec<tests::bench::expiry::Case>>,
) -> anyhow::Result<String> {
    let start = TEMPLATE
        .find(EXPIRY_HEADING)
        .context("the template has no expiry section")?;
    let end = TEMPLATE[start + 1..]
        .find("\n## ")
        .map_or(TEMPLATE.len(), |end| start + 1 + end + 1);
    fill(&TEMPLATE[start..end], &expiry_values(options, expiry)?)
}

/// `--tls-only`: measures TURN over TLS, coturn beside turn-control, and prints its section
/// of the report with the machine, the command and the load average before and after.
fn tls_only(options: &Options) -> anyhow::Result<()> {
    print!("{}", tls_report(options, true)?);
    Ok(())
}

/// The TURN-over-TLS section of the whole bench's report, or why it is missing.
fn tls_section_or_why(options: &Options) -> String {
    eprintln!("bench: TURN over TLS beside coturn's");
    tls_report(options, false).unwrap_or_else(|error| {
        format!("## TURN over TLS: handshakes and relayed messages\n\nNot measured: {error:#}\n")
    })
}

/// The TURN-over-TLS section of the report: its figures and how they were measured; `alone`
/// when the section was measured by `--tls-only` rather than as part of the whole bench.
fn tls_report(options: &Options, alone: bool) -> anyhow::Result<String> {
    let load_before = load_average();
    let shape = tls::Shape::bench(
        options.runs,
        Duration::from_secs_f64(options.seconds),
        options.quick,
    );
    eprintln!(
        "bench: TURN over TLS, {} round(s) of {:.1} s per figure and server",
        shape.rounds,
        shape.window.as_secs_f64(),
    );
    let started = Instant::now();
    let figures = tls::measure(&tls_commands()?, shape)?;
    let took = started.elapsed();
    let mut out = tls::section(&figures, &shape)?;
    if alone {
        out.push_str(&format!(
            "Measured on its own with `BENCH_RUNS={} BENCH_SECONDS={}{} target/release/bench --tls-only` (built by `cargo build --release -p turn-control -p tests --bins`; run as root), in {:.0} s, on:\n\n{}- Load average before the run: {load_before}; after it: {} (a shared machine: other builds and tests ran on the same cores, so absolute figures are low and noisy; the servers take turns within each round, and the ratios are the result).\n",
            options.runs,
            options.seconds,
            if options.quick { " BENCH_QUICK=1" } else { "" },
            took.as_secs_f64(),
            machine()
                .lines()
                .filter(|line| !line.starts_with("- Load average"))
                .map(|line| format!("{line}\n"))
                .collect::<String>(),
            load_average()
        ));
    } else {
        out.push_str(&format!(
            "Measured in this run, on the machine above, in {:.0} s; load average {load_before} before it and {} after. `target/release/bench --tls-only` measures this section alone.\n",
            took.as_secs_f64(),
            load_average()
        ));
    }
    Ok(out)
}

/// The servers as the rest of the bench starts them, for TURN over TLS: coturn without
/// `--no-tls`; `tests::bench::tls` adds the certificate and the TLS listener.
fn tls_commands() -> anyhow::Result<tls::Commands> {
    let mut coturn: Vec<String> = COTURN_ARGS
        .iter()
        .filter(|arg| **arg != "--no-tls")
        .map(|arg| (*arg).to_owned())
        .collect();
    coturn.extend(["--no-stun-backward-compatibility", "--simple-log"].map(str::to_owned));
    Ok(tls::Commands {
        coturn,
        turn_control: workspace_binary("turn-control")?,
        turn_control_args: turn_control_args().into_iter().map(str::to_owned).collect(),
    })
}

/// The expiry section's heading in [`TEMPLATE`].
const EXPIRY_HEADING: &str = "## Expiry check: live per-packet cost";

/// The values of the expiry section's placeholders.
fn expiry_values(
    options: &Options,
    expiry: &anyhow::Result<Vec<tests::bench::expiry::Case>>,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    Ok(vec![
        ("expiry_runs", options.runs.to_string()),
        ("expiry_seconds", format!("{:.1}", options.seconds)),
        (
            "expiry_port",
            tests::bench::expiry::ALLOCATION_PORT.to_string(),
        ),
        (
            "expiry",
            match expiry {
                Ok(cases) => tests::bench::expiry::table(cases)?,
                Err(error) => format!("Not run: {error:#}\n"),
            },
        ),
    ])
}

/// Prints a system's control-plane figures as they come (the report has them in full).
fn log_control(system: System, figures: &anyhow::Result<ControlFigures>) {
    match &figures {
        Ok(f) => eprintln!(
            "bench: {:<18} control plane: {:.0} allocations/s, {:.0} B RSS per allocation, bindings {}, first offload {}",
            system.short(),
            f.allocations_per_second,
            f.rss_bytes_per_allocation,
            match &f.bindings {
                Ok(b) => format!(
                    "{:.0}/s ({} of {} in {:.3} s, {} retransmits, {} errors, {} unanswered; {})",
                    b.per_second(),
                    b.bound,
                    b.requested,
                    b.elapsed.as_secs_f64(),
                    b.retransmits,
                    b.errors,
                    b.unanswered,
                    b.first_error.as_deref().unwrap_or("-")
                ),
                Err(e) => format!("failed: {e}"),
            },
            match &f.first_offload {
                Some(Ok(l)) => format!(
                    "median {:.0} us, p99 {:.0} us (success median {:.0} us, alone {:.0} us, {} samples, {} user-space datagrams first, {} sent before the success)",
                    percentile(&l.first_xdp_us, 0.5),
                    percentile(&l.first_xdp_us, 0.99),
                    percentile(&l.bind_success_us, 0.5),
                    percentile(&l.bind_only_us, 0.5),
                    l.samples,
                    l.userspace_before,
                    l.before_success
                ),
                Some(Err(e)) => format!("failed: {e}"),
                None => "-".to_owned(),
            }
        ),
        Err(error) => {
            eprintln!("bench: {} control plane failed: {error:#}", system.short())
        }
    }
}

fn find(
    results: &[CaseResult],
    system: System,
    direction: Direction,
    payload: usize,
) -> Option<&CaseResult> {
    results
        .iter()
        .find(|r| r.system == system && r.direction == direction && r.payload == payload)
}

fn draw(path: &Path, results: &[CaseResult]) -> anyhow::Result<()> {
    let mut groups = Vec::new();
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        for payload in [100usize, 1200] {
            groups.push(plot::Group {
                label: format!("{} {payload} B", direction.label()),
                values: System::ALL
                    .iter()
                    .map(|&s| {
                        find(results, s, direction, payload)
                            .map(|r| r.med(|x| x.delivered_pps, true))
                    })
                    .collect(),
            });
        }
    }
    let series: Vec<&str> = System::ALL.iter().map(|s| s.short()).collect();
    plot::draw(
        path,
        "Relayed packets per second with < 1% loss (median), in-kernel generator and sink",
        &series,
        &groups,
    )
}

/// The report's fixed text, with `{{name}}` where [`render`] puts the results.
const TEMPLATE: &str = include_str!("../../bench/BENCHMARKS.md.in");

/// BENCHMARKS.md: [`TEMPLATE`] filled with the results.
#[expect(
    clippy::too_many_arguments,
    reason = "the options, then one argument per kind of result the report shows"
)]
fn render(
    options: &Options,
    results: &[CaseResult],
    notes: &[String],
    control: &[(System, anyhow::Result<ControlFigures>)],
    micro: &anyhow::Result<Vec<(String, f64, f64)>>,
    expiry: &anyhow::Result<Vec<tests::bench::expiry::Case>>,
    e2e: &[(System, anyhow::Result<String>)],
    took: Duration,
) -> anyhow::Result<String> {
    let raw = RawOptions::bench(options.quick);
    let quick = if options.quick {
        " (BENCH_QUICK=1: a smoke run, not figures to quote)"
    } else {
        ""
    };
    let (micro_runs, micro_calls) = if options.quick {
        (3, 20000)
    } else {
        (5, 200000)
    };
    let end_to_end = e2e.iter().map(|(system, result)| match result {
        Ok(summary) => format!("- {}: {summary}\n", system.name()),
        Err(error) => format!("- {}: failed: {error:#}\n", system.name()),
    });
    let values = [
        ("runs", options.runs.to_string()),
        ("seconds", format!("{:.1}", options.seconds)),
        ("trial_seconds", format!("{:.1}", options.trial_seconds)),
        ("quick", quick.to_owned()),
        ("took", format!("{:.0}", took.as_secs_f64())),
        ("png", options.png.display().to_string()),
        ("machine", machine()),
        ("notes", notes.iter().map(|n| format!("- {n}\n")).collect()),
        ("data_plane_rows", data_plane_rows(results)?),
        ("targets", targets(results, control, micro)?),
        ("micro_runs", micro_runs.to_string()),
        ("micro_calls", micro_calls.to_string()),
        ("micro", micro_table(micro)?),
        ("end_to_end", end_to_end.collect()),
        ("allocations", raw.allocations.to_string()),
        ("channels", raw.channels.to_string()),
        ("window", raw.window.to_string()),
        (
            "bindings",
            (raw.allocations * usize::from(raw.channels)).to_string(),
        ),
        ("samples", raw.samples.to_string()),
        ("interval_us", raw.interval.as_micros().to_string()),
        ("control_rows", control_rows(control)?),
        ("first_offload", first_offload(control)?),
    ];
    fill(
        TEMPLATE,
        &[&values[..], &expiry_values(options, expiry)?].concat(),
    )
}

/// `template` with every `{{name}}` replaced by its value in `values`; fails on a name
/// without a value and on a value whose name does not occur.
fn fill(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = String::with_capacity(template.len() * 2);
    let mut used = vec![false; values.len()];
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let end = rest[start..]
            .find("}}")
            .context("a placeholder is not closed")?;
        let name = &rest[start + 2..start + end];
        let index = values
            .iter()
            .position(|(n, _)| *n == name)
            .with_context(|| format!("no value for {{{{{name}}}}}"))?;
        used[index] = true;
        out.push_str(&rest[..start]);
        out.push_str(&values[index].1);
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    if let Some(unused) = used.iter().position(|u| !u) {
        bail!("{{{{{}}}}} is not in the template", values[unused].0);
    }
    Ok(out)
}

/// The rows of the data-plane table.
fn data_plane_rows(results: &[CaseResult]) -> anyhow::Result<String> {
    let mut md = String::new();
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        for payload in [100usize, 1200] {
            let coturn = find(results, System::Coturn, direction, payload)
                .map(|r| r.med(|s| s.delivered_pps, true));
            let ns = |system| {
                find(results, system, direction, payload)
                    .map(|r| r.med(|s| s.cpu_ns_per_packet, true))
            };
            for system in System::ALL {
                let Some(r) = find(results, system, direction, payload) else {
                    continue;
                };
                let pps = r.med(|s| s.delivered_pps, true);
                let ratio = coturn.map_or("-".to_owned(), |c| format!("{:.1}x", pps / c));
                let vs_floor = System::XDP_MODES
                    .iter()
                    .find(|(xdp, floor)| *xdp == system || *floor == system)
                    .and_then(|&(_, floor)| Some(ns(system)? / ns(floor)?))
                    .map_or("-".to_owned(), |x| format!("{x:.2}x"));
                let bad: u64 = r.full.iter().chain(&r.sustained).map(|s| s.bad).sum();
                writeln!(
                    md,
                    "| {} | {payload} B | {} | {:.0} | {ratio} | {:.0}{} | {:.2}% | {:.0} ({:.1}%) | {:.1} | {vs_floor} | {bad} |",
                    direction.label(),
                    system.name(),
                    pps,
                    r.med(|s| s.offered_pps, true),
                    if r.paced_rate.is_some() {
                        " (paced)"
                    } else {
                        ""
                    },
                    r.med(|s| s.loss, true) * 100.0,
                    r.med(|s| s.delivered_pps, false),
                    r.med(|s| s.loss, false) * 100.0,
                    r.med(|s| s.cpu_ns_per_packet, true),
                )?;
            }
        }
    }
    Ok(md)
}

/// The worst ratio over every direction and size of `figure(system's case, other's case)`
/// (the smallest when `smallest`, else the largest); `None` when a case is missing for
/// `require_all`, or when no case has both.
fn worst_ratio(
    results: &[CaseResult],
    (system, other): (System, System),
    figure: impl Fn(&Sample) -> f64,
    smallest: bool,
    require_all: bool,
) -> Option<f64> {
    let mut worst: Option<f64> = None;
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        for payload in [100usize, 1200] {
            let pair = (
                find(results, system, direction, payload),
                find(results, other, direction, payload),
            );
            let (Some(x), Some(o)) = pair else {
                if require_all {
                    return None;
                }
                continue;
            };
            let ratio = x.med(&figure, true) / o.med(&figure, true);
            worst = Some(worst.map_or(
                ratio,
                |w: f64| {
                    if smallest { w.min(ratio) } else { w.max(ratio) }
                },
            ));
        }
    }
    worst
}

/// The list of targets and whether they were met.
fn targets(
    results: &[CaseResult],
    control: &[(System, anyhow::Result<ControlFigures>)],
    micro: &anyhow::Result<Vec<(String, f64, f64)>>,
) -> anyhow::Result<String> {
    let mut md = String::new();
    let status = |ok: bool| if ok { "met" } else { "NOT met" };
    let pps = |s: &Sample| s.delivered_pps;
    let vs_coturn = |system| worst_ratio(results, (system, System::Coturn), pps, true, true);
    for (system, _) in System::XDP_MODES {
        if let Some(r) = vs_coturn(system) {
            writeln!(
                md,
                "- {} >= 10x coturn's packet rate: worst case {r:.1}x, {}.",
                system.name(),
                status(r >= 10.0)
            )?;
        }
    }
    for pair @ (system, floor) in System::XDP_MODES {
        if let Some(w) = worst_ratio(results, pair, |s| s.cpu_ns_per_packet, false, false) {
            writeln!(
                md,
                "- {}: per-packet BPF cost <= 1.3x its floor, `{}` (live traffic, bpf_stats): worst case {w:.2}x, {}.",
                system.name(),
                floor.short(),
                status(w <= 1.3)
            )?;
        }
    }
    if let Ok(rows) = micro {
        let paths: Vec<&(String, f64, f64)> = rows
            .iter()
            .filter(|(name, _, _)| name != "trivial" && name != "floor")
            .collect();
        let v4 = paths
            .iter()
            .filter(|(name, _, _)| name.ends_with("v4_v4") && !name.starts_with("hairpin"))
            .map(|(_, _, x)| *x)
            .fold(0.0f64, f64::max);
        let worst = paths.iter().map(|(_, _, x)| *x).fold(0.0f64, f64::max);
        if !paths.is_empty() {
            writeln!(
                md,
                "- The same target in the micro-benchmark (BPF_PROG_TEST_RUN, the relay in MAC-swap mode against the floor): IPv4 paths up to {v4:.2}x the floor, all paths (IPv6, hairpin) up to {worst:.2}x, {}.",
                status(worst <= 1.3)
            )?;
        }
    }
    if let Some(r) = vs_coturn(System::TurnControl) {
        writeln!(
            md,
            "- turn-control in user space >= coturn: worst case {r:.2}x, {}.",
            status(r >= 1.0)
        )?;
    }
    if let Some((_, Ok(f))) = control.iter().find(|(s, _)| *s == System::XdpFib) {
        match &f.bindings {
            Ok(b) => writeln!(
                md,
                "- >= 20,000 channel bindings/s end to end including the agent's acknowledgement \
                 (turn-control + xdp-agent, raw client, see Control plane): {:.0}/s{}, {}.",
                b.per_second(),
                if b.bound == b.requested {
                    String::new()
                } else {
                    format!(" ({} of {} succeeded)", b.bound, b.requested)
                },
                status(b.per_second() >= 20_000.0 && b.bound == b.requested)
            )?,
            Err(e) => writeln!(
                md,
                "- >= 20,000 channel bindings/s end to end including the agent's acknowledgement: \
                 not measured ({e}), NOT met."
            )?,
        }
    }
    Ok(md)
}

/// The micro-benchmark's table, or why it did not run.
fn micro_table(micro: &anyhow::Result<Vec<(String, f64, f64)>>) -> anyhow::Result<String> {
    let mut md = String::new();
    match micro {
        Ok(rows) => {
            writeln!(md, "| program / path | ns/packet | x floor |")?;
            writeln!(md, "|---|---:|---:|")?;
            for (name, ns, vs) in rows {
                writeln!(md, "| {name} | {ns:.1} | {vs:.2} |")?;
            }
        }
        Err(error) => writeln!(md, "Not run: {error:#}")?,
    }
    Ok(md)
}

/// The rows of the control-plane table.
fn control_rows(control: &[(System, anyhow::Result<ControlFigures>)]) -> anyhow::Result<String> {
    let mut md = String::new();
    for (system, figures) in control {
        let f = match figures {
            Ok(f) => f,
            Err(error) => {
                writeln!(md, "| {} | failed: {error:#} | | | | |", system.name())?;
                continue;
            }
        };
        let bindings = match &f.bindings {
            Ok(b) if b.bound == b.requested => format!("{:.0}", b.per_second()),
            Ok(b) => format!(
                "{:.0} ({} of {} succeeded: {} errors, {} unanswered after {} tries; first: {})",
                b.per_second(),
                b.bound,
                b.requested,
                b.errors,
                b.unanswered,
                tests::bench::raw::MAX_TRIES,
                b.first_error.as_deref().unwrap_or("-")
            ),
            Err(e) => format!("failed: {e}"),
        };
        let ack = match f.agent_listed {
            Some(n) => format!("yes (the agent listed all {n} afterwards)"),
            None => "no (no agent: answered at once)".to_owned(),
        };
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} B | {bindings} | {ack} |",
            system.name(),
            f.allocations,
            f.allocations_per_second,
            f.rss_bytes_per_allocation,
        )?;
    }
    Ok(md)
}

/// A paragraph per system with the ChannelBind -> first XDP packet figures.
fn first_offload(control: &[(System, anyhow::Result<ControlFigures>)]) -> anyhow::Result<String> {
    let mut md = String::new();
    for (system, figures) in control {
        let Ok(f) = figures else { continue };
        match &f.first_offload {
            Some(Ok(l)) => writeln!(
                md,
                "{}: ChannelBind request -> first packet relayed by XDP: median {:.0} us, p99 {:.0} us \
                 ({} samples; max {:.0} us); ChannelBind request -> success in the same samples: \
                 median {:.0} us, p99 {:.0} us; ChannelBind request -> success alone (no channel \
                 data, {} more fresh channels, one at a time): median {:.0} us, p99 {:.0} us. \
                 Channel data sent per sample: median {:.0}; datagrams relayed in user space \
                 before the first XDP one: {}; samples whose first XDP datagram was sent before \
                 the success arrived: {}.\n",
                system.name(),
                percentile(&l.first_xdp_us, 0.5),
                percentile(&l.first_xdp_us, 0.99),
                l.samples,
                percentile(&l.first_xdp_us, 1.0),
                percentile(&l.bind_success_us, 0.5),
                percentile(&l.bind_success_us, 0.99),
                l.bind_only_us.len(),
                percentile(&l.bind_only_us, 0.5),
                percentile(&l.bind_only_us, 0.99),
                l.sent_median,
                l.userspace_before,
                l.before_success,
            )?,
            Some(Err(e)) => writeln!(
                md,
                "{}: ChannelBind request -> first packet relayed by XDP: failed: {e}\n",
                system.name()
            )?,
            None => {}
        }
    }
    Ok(md)
}

#[cfg(test)]
mod render_tests {
    use super::*;
    use tests::bench::expiry::Run;
    use tests::bench::raw::{BindFigures, OffloadLatency};

    fn sample(scale: f64) -> Sample {
        Sample {
            offered_pps: 1_000_000.0 * scale,
            delivered_pps: 990_000.0 * scale,
            loss: 0.01 / scale,
            cpu_ns_per_packet: 50.0 / scale,
            bad: 0,
        }
    }

    fn results() -> Vec<CaseResult> {
        let mut results = Vec::new();
        for (i, system) in System::ALL.into_iter().enumerate() {
            for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
                for payload in [100usize, 1200] {
                    let scale = (i + 1) as f64 * if payload == 100 { 1.0 } else { 0.5 };
                    results.push(CaseResult {
                        system,
                        direction,
                        payload,
                        full: vec![sample(scale), sample(scale * 1.1)],
                        paced_rate: (i % 2 == 0).then_some(500_000.0),
                        sustained: vec![sample(scale * 0.9), sample(scale), sample(scale * 1.2)],
                    });
                }
            }
        }
        results
    }

    fn control() -> Vec<(System, anyhow::Result<ControlFigures>)> {
        let bindings = |bound| BindFigures {
            bound,
            requested: 2000,
            elapsed: Duration::from_millis(80),
            retransmits: 3,
            errors: 1,
            unanswered: 2,
            first_error: Some("438 Stale Nonce".to_owned()),
        };
        let figures = |bindings, agent_listed, first_offload| ControlFigures {
            allocations: 200,
            allocations_per_second: 812.5,
            rss_bytes_per_allocation: 3456.0,
            bindings,
            agent_listed,
            first_offload,
        };
        let latency = OffloadLatency {
            samples: 3,
            first_xdp_us: vec![120.0, 150.0, 900.0],
            bind_success_us: vec![80.0, 95.0, 400.0],
            bind_only_us: vec![60.0, 70.0],
            userspace_before: 0,
            sent_median: 7.0,
            before_success: 1,
        };
        vec![
            (System::Coturn, Err(anyhow::anyhow!("coturn did not start"))),
            (
                System::TurnControl,
                Ok(figures(Ok(bindings(2000)), None, None)),
            ),
            (
                System::XdpFib,
                Ok(figures(Ok(bindings(1990)), Some(1990), Some(Ok(latency)))),
            ),
            (
                System::Floor,
                Ok(figures(
                    Err("no answer".to_owned()),
                    None,
                    Some(Err("timed out".to_owned())),
                )),
            ),
        ]
    }

    fn options(quick: bool) -> Options {
        Options {
            runs: 3,
            seconds: 2.5,
            trial_seconds: 1.0,
            quick,
            expiry_only: false,
            usage_only: false,
            tls_only: false,
            out: PathBuf::from("BENCHMARKS.md"),
            png: PathBuf::from("tests/bench/bench.png"),
        }
    }

    fn expiry(quick: bool) -> anyhow::Result<Vec<tests::bench::expiry::Case>> {
        if quick {
            return Err(anyhow::anyhow!("relay_unexpiring is missing"));
        }
        let run = |ns_per_packet| Run {
            ns_per_packet,
            delivered_pps: 3_000_000.0,
            offered_pps: 3_100_000.0,
        };
        Ok(vec![tests::bench::expiry::Case {
            direction: Direction::ClientToPeer,
            payload: 100,
            with_check: vec![run(97.0), run(96.5), run(99.0)],
            without_check: vec![run(95.0), run(95.5), run(96.0)],
        }])
    }

    /// The expiry section alone (`--expiry-only`) is the report's, filled.
    #[test]
    fn the_expiry_section_renders_alone_as_in_the_report() {
        let section = expiry_section(&options(false), &expiry(false)).unwrap();
        assert!(section.starts_with(EXPIRY_HEADING), "{section}");
        assert!(
            !section.contains("{{") && !section.contains("## Targets"),
            "{section}"
        );
        assert!(render_fixture(false).contains(&section));
        // Paired differences 2.0, 1.0, 3.0: median +2.0, range +1.0 to +3.0.
        assert!(section.contains("| +2.0 (+1.0 to +3.0) |"), "{section}");
    }

    fn render_fixture(quick: bool) -> String {
        let micro = if quick {
            Err(anyhow::anyhow!("xdp-microbench is missing"))
        } else {
            Ok(vec![
                ("trivial".to_owned(), 10.0, 0.5),
                ("floor".to_owned(), 20.0, 1.0),
                ("client_to_peer_v4_v4".to_owned(), 24.0, 1.2),
                ("hairpin_v4_v4".to_owned(), 30.0, 1.5),
            ])
        };
        let e2e = vec![
            (
                System::Coturn,
                Ok("tot_send_msgs=1000; wall time 1.00 s".to_owned()),
            ),
            (System::XdpFib, Err(anyhow::anyhow!("uclient failed"))),
        ];
        let notes = vec!["coturn: 4.6.1".to_owned(), "xdp: native".to_owned()];
        render(
            &options(quick),
            &results(),
            &notes,
            &control(),
            &micro,
            &expiry(quick),
            &e2e,
            Duration::from_secs(321),
        )
        .unwrap()
    }

    /// Renders synthetic results; with RENDER_OUT=DIR also writes them there (to compare
    /// the report before and after a change of `render`).
    #[test]
    fn a_report_renders_from_synthetic_results() {
        for quick in [false, true] {
            let md = render_fixture(quick);
            if let Some(dir) = std::env::var_os("RENDER_OUT") {
                std::fs::write(Path::new(&dir).join(format!("quick-{quick}.md")), &md).unwrap();
            }
            for heading in [
                "# Benchmarks",
                "## Machine",
                "## Method",
                "## Data plane: relayed packet rate",
                "## Expiry check: live per-packet cost",
                "## Targets",
                "## Micro-benchmark (BPF_PROG_TEST_RUN, per path)",
                "## End to end with real sockets (for the record)",
                "## Control plane",
                "## Not measured here",
            ] {
                assert!(md.lines().any(|l| l == heading), "{heading} missing:\n{md}");
            }
            assert!(!md.contains("{{"), "a placeholder is left:\n{md}");
        }
    }
}
