//! `make bench`: relays measured in isolation, written to BENCHMARKS.md and a chart.
//!
//! Every system under test runs alone in a relay namespace joined by one veth
//! to a generator namespace (see `lab::bench`). A real TURN client sets up an
//! allocation and a channel binding first; then an XDP program driven by
//! `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` sends frames that
//! match the binding, and an XDP sink on the same veth counts, checks and
//! drops what the relay sends back. The same generator and sink serve every
//! system: coturn, turn-control alone, turn-control with xdp-agent, and the
//! floor program.
//!
//! Usage: bench [--out BENCHMARKS.md] [--png tests/bench/bench.png]
//! Environment: BENCH_QUICK=1 for a tiny run; BENCH_RUNS, BENCH_SECONDS.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lab::bench::control::{ControlFigures, RawOptions};
use lab::bench::raw::percentile;
use lab::bench::{
    BenchNet, BpfStats, Direction, Offered, case_frames, floor_key, plot, prog_stats, turn,
};
use lab::workspace_binary;

#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    seconds: f64,
    trial_seconds: f64,
    quick: bool,
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
        out: PathBuf::from("BENCHMARKS.md"),
        png: PathBuf::from("tests/bench/bench.png"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--out" => options.out = value()?.into(),
            "--png" => options.png = value()?.into(),
            "--help" | "-h" => {
                println!("usage: bench [--out BENCHMARKS.md] [--png tests/bench/bench.png]");
                println!("env: BENCH_QUICK=1, BENCH_RUNS=N, BENCH_SECONDS=S");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(options.runs > 0, "BENCH_RUNS must be positive");
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
    TurnControlXdp,
    Floor,
}

impl System {
    const ALL: [System; 4] = [
        System::Coturn,
        System::TurnControl,
        System::TurnControlXdp,
        System::Floor,
    ];

    fn name(self) -> &'static str {
        match self {
            System::Coturn => "coturn 4.6",
            System::TurnControl => "turn-control (user space)",
            System::TurnControlXdp => "turn-control + xdp-agent (XDP)",
            System::Floor => "floor XDP program",
        }
    }

    fn short(self) -> &'static str {
        match self {
            System::Coturn => "coturn",
            System::TurnControl => "turn-control",
            System::TurnControlXdp => "turn-control+XDP",
            System::Floor => "floor",
        }
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
            CpuSource::Process(pid) => Ok((lab::bench::process_cpu_ns(pid)?, 0)),
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
    mirror: bool,
    _session: Option<turn::Session>,
    _floor: Option<lab::xdp::Reference>,
    notes: Vec<String>,
}

fn start_system(net: &mut BenchNet, system: System) -> anyhow::Result<Sut> {
    let dir = net.dir().to_owned();
    let mut notes = Vec::new();
    let attach_pass = |net: &mut BenchNet| -> anyhow::Result<libbpf_rs::Object> {
        let object = libbpf_rs::ObjectBuilder::default()
            .open_file(env!("LAB_PASS_OBJECT"))?
            .load()?;
        let program = object.progs_mut().next().context("no program")?;
        net.attach_relay(&program)?;
        Ok(object)
    };
    match system {
        System::Coturn | System::TurnControl => {
            // veth delivers XDP_TX frames only to a peer that runs XDP: x0
            // gets XDP_PASS, a few ns per packet, as in any XDP deployment.
            let pass = attach_pass(net)?;
            std::mem::forget(pass);
            let name = if system == System::Coturn {
                let mut command = net.relay_ns.command("turnserver");
                command
                    .args(COTURN_ARGS)
                    .args(["--no-stun-backward-compatibility", "--simple-log"]);
                command.arg(format!(
                    "--pidfile={}",
                    dir.join("turnserver.pid").display()
                ));
                command.arg(format!(
                    "--log-file={}",
                    dir.join("turnserver-file.log").display()
                ));
                net.spawn("turnserver", command)?;
                "turnserver"
            } else {
                let mut command = net.relay_ns.command(workspace_binary("turn-control")?);
                command.args(turn_control_args());
                net.spawn("turn-control", command)?;
                "turn-control"
            };
            let session = turn::open(&net.gen_ns, Duration::from_secs(20))
                .with_context(|| format!("TURN exchange with {name}: {}", net.log(name)))?;
            net.process(name)?.ensure_running()?;
            let pid = net.process(name)?.pid();
            notes.push(format!(
                "allocation port {}, channel {:#06x}, Allocate took {:.1} ms",
                session.allocation_port,
                session.channel,
                session.allocate_time.as_secs_f64() * 1e3
            ));
            Ok(Sut {
                cpu: CpuSource::Process(pid),
                server_pid: Some(pid),
                agent_socket: None,
                channel: session.channel,
                allocation_port: session.allocation_port,
                mirror: false,
                _session: Some(session),
                _floor: None,
                notes,
            })
        }
        System::TurnControlXdp => {
            let socket = dir.join("agent.sock");
            let mut command = net.relay_ns.command(workspace_binary("xdp-agent")?);
            command
                .args(["--iface", "x0", "--xdp-mode", "native", "--grpc"])
                .arg(&socket)
                .arg("--pin-dir")
                .arg(net.pin_dir());
            net.spawn("xdp-agent", command)?;
            lab::wait_for("xdp-agent's socket", Duration::from_secs(20), || {
                Ok(std::os::unix::net::UnixStream::connect(&socket)
                    .ok()
                    .map(|_| ()))
            })
            .with_context(|| net.log("xdp-agent"))?;
            let mut command = net.relay_ns.command(workspace_binary("turn-control")?);
            command
                .args(turn_control_args())
                .arg("--agent")
                .arg(&socket);
            net.spawn("turn-control", command)?;
            let session = turn::open(&net.gen_ns, Duration::from_secs(20))
                .with_context(|| format!("TURN exchange: {}", net.log("turn-control")))?;
            let mut agent = lab::agent::Agent::connect(&socket)?;
            let bindings = lab::wait_for(
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
            let channel = binding.channel as u16;
            notes.push(format!(
                "allocation port {}, channel {channel:#06x} (as the agent lists it), Allocate took {:.1} ms",
                session.allocation_port,
                session.allocate_time.as_secs_f64() * 1e3
            ));
            Ok(Sut {
                cpu: CpuSource::Program(net.relay_prog_id()?),
                server_pid: Some(net.process("turn-control")?.pid()),
                agent_socket: Some(socket),
                channel,
                allocation_port: session.allocation_port,
                mirror: false,
                _session: Some(session),
                _floor: None,
                notes,
            })
        }
        System::Floor => {
            let (port, channel) = (50000, turn::FIRST_CHANNEL);
            let keys = [
                floor_key(&case_frames(net, Direction::ClientToPeer, 100, channel, port, true).0)?,
                floor_key(&case_frames(net, Direction::PeerToClient, 100, channel, port, true).0)?,
            ];
            let floor = lab::xdp::Reference::floor(&keys)?;
            net.attach_relay(&floor.program()?)?;
            notes.push("no control plane: FLOWS holds the two generated flows".to_owned());
            Ok(Sut {
                cpu: CpuSource::Program(net.relay_prog_id()?),
                server_pid: None,
                agent_socket: None,
                channel,
                allocation_port: port,
                mirror: true,
                _session: None,
                _floor: Some(floor),
                notes,
            })
        }
    }
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
        sut.mirror,
    );
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
    let coturn = lab::run("turnserver", ["--version"])
        .ok()
        .and_then(|v| v.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "- CPUs: {cpus} (`nproc`), {model}\n- Kernel: {}\n- Memory: {memory} GiB\n- coturn: {} (Debian)\n- Load average when the report was written: {} (a shared machine: other builds ran on the same cores, so absolute figures are low and noisy; the ratios within the run are the result)\n",
        kernel.trim(),
        coturn.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The existing micro-benchmark (`xdp-microbench --json`), rows of (program, ns, x floor).
fn microbench(options: &Options) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let binary = workspace_binary("xdp-microbench")?;
    let (runs, calls) = if options.quick {
        ("3", "20000")
    } else {
        ("5", "200000")
    };
    let output = lab::run(
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
    let mut lab = lab::Lab::new()?;
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
    let mut uclient = lab.client.command("turnutils_uclient");
    uclient.args([
        "-u",
        "test",
        "-w",
        "testpass",
        "-e",
        "198.51.100.2",
        "-r",
        "3480",
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
    ensure!(lab::privileged(), "the bench needs root (namespaces, XDP)");
    let started = Instant::now();
    let _stats = BpfStats::enable()?;
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
        if let Some(pid) = sut.server_pid {
            net.set_rules(&[])?;
            let count = if options.quick { 20 } else { 200 };
            let boost: Vec<u32> = [Some(pid), net.process("xdp-agent").ok().map(|p| p.pid())]
                .into_iter()
                .flatten()
                .collect();
            let figures = lab::bench::control::run(
                &net.gen_ns,
                count,
                pid,
                sut.agent_socket.as_deref().map(|socket| (socket, 1)),
                RawOptions::bench(options.quick),
                boost,
            );
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
            control.push((system, figures));
        }
        drop(sut);
        drop(net);
    }
    drop(_stats);

    eprintln!("bench: xdp-microbench");
    let micro = microbench(&options);
    eprintln!("bench: end-to-end turnutils_uclient runs");
    let e2e: Vec<(System, anyhow::Result<String>)> = [System::Coturn, System::TurnControlXdp]
        .into_iter()
        .map(|s| (s, end_to_end(s, &options)))
        .collect();

    let report = render(
        &options,
        &results,
        &notes,
        &control,
        &micro,
        &e2e,
        started.elapsed(),
    )?;
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

fn render(
    options: &Options,
    results: &[CaseResult],
    notes: &[String],
    control: &[(System, anyhow::Result<ControlFigures>)],
    micro: &anyhow::Result<Vec<(String, f64, f64)>>,
    e2e: &[(System, anyhow::Result<String>)],
    took: Duration,
) -> anyhow::Result<String> {
    let mut md = String::new();
    let png = options.png.display();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Generated by `make bench` (`tests/src/bin/bench.rs`); do not edit by hand. \
         This run: {} run(s) of {:.1} s per system, direction and size{}; it took {:.0} s.\n",
        options.runs,
        options.seconds,
        if options.quick {
            " (BENCH_QUICK=1: a smoke run, not figures to quote)"
        } else {
            ""
        },
        took.as_secs_f64()
    )?;
    writeln!(md, "![relayed packet rate per system]({png})\n")?;
    writeln!(md, "## Machine\n\n{}", machine())?;
    writeln!(md, "## Method\n")?;
    writeln!(
        md,
        "The relay is measured, not the load generator. Each system runs alone in a relay \
         namespace (`x0`, 203.0.113.10) joined by one veth to a generator namespace (`rx`, \
         203.0.113.1; the client 192.0.2.2 and the peer 198.51.100.2 are local addresses \
         there). No routing namespace, no user-space generator and no receiving socket sit \
         on the data path:\n\n\
         1. Control plane first: a real TURN client (webrtc-rs `turn` 0.17) allocates from \
         192.0.2.2:40000 with user test:testpass, sends to the peer 198.51.100.2:9000 (which \
         makes it CreatePermission and ChannelBind) and checks data both ways. The bench uses \
         the allocation port the server chose and the channel it bound (for the XDP system, as \
         the agent lists it).\n\
         2. Load: the `trafficgen` XDP program run by `BPF_PROG_TEST_RUN` with \
         `BPF_F_TEST_XDP_LIVE_FRAMES` (ingress `rx`, batch 64) returns `XDP_TX` for each frame, \
         so frames leave `rx` for `x0` at millions per second from the kernel. It rewrites the \
         frame's first 64 bytes from a template each run, because live frames come back to its \
         page pool rewritten by the relay. Client->peer frames are channel data from \
         192.0.2.2:40000 to 203.0.113.10:3478, peer->client frames UDP from 198.51.100.2:9000 \
         to the allocation port. Payload 100 or 1200 bytes (channel data adds 4).\n\
         3. Sink: the `sink` XDP program on `rx` counts (per-CPU) what the relay sends back to \
         the peer or the client, checks each frame's source address and port, UDP length and \
         channel number, and drops it. Everything else (ARP, STUN) passes.\n\
         4. Rate: each case runs {} time(s) for {:.1} s at full generator speed; when the \
         median loss there is 1% or more, the offered rate is stepped down from 97% of what \
         was delivered by 15% until a {:.1} s trial loses under 1%, two bisection trials move it \
         up towards the last rate that lost, and the case runs again at that rate. The \
         generator program paces itself: with a pace set, a run that comes before its time \
         returns XDP_DROP (nothing is sent), so frames go out evenly spaced (a late frame does \
         not pull the next ones forward by more than 100 us); it counts what it sends, which is \
         the offered rate reported. Each `BPF_PROG_TEST_RUN` call runs about a quarter of the \
         duration (a call has a fixed cost of about 17 ms here, during which nothing is sent, so \
         paced runs offer somewhat less than the pace). \"Relayed pps\" is the median delivered \
         rate of the final runs (their loss is in the table); \"full load\" the median \
         delivered rate when offered all the generator can.\n\
         5. CPU per relayed packet: XDP programs: `kernel.bpf_stats_enabled=1`, run_time_ns / \
         run_cnt of the program attached to `x0`. User space: utime+stime of the server process \
         (/proc/PID/stat) / packets delivered; the kernel's receive and send path that runs in \
         softirq on the generator's CPU is not in this figure.\n\
         6. Systems: coturn (`turnserver -n --listening-ip=203.0.113.10 --relay-ip=203.0.113.10 \
         --listening-port=3478 --min-port=50000 --max-port=59999 --lt-cred-mech \
         --user=test:testpass --realm=example.org --no-tls --no-dtls --no-cli \
         --allow-loopback-peers --no-stun-backward-compatibility`, default threads), \
         turn-control relaying in user space (no agent; `x0` runs XDP_PASS, which veth needs \
         to deliver XDP_TX frames, for coturn too), turn-control with xdp-agent (native XDP), \
         and the `floor` program (one 12-byte-key hash lookup, MAC swap, XDP_TX: the least an \
         XDP relay must do) on `x0`.\n\
         7. Control plane (after each system's data-plane cases): allocations/s and RSS per \
         allocation with webrtc-rs clients; channel bindings/s with a pipelined raw-UDP STUN \
         client; for turn-control + xdp-agent the time from a ChannelBind request to the first \
         packet relayed by XDP, told apart from user-space relaying by the IP TTL (the client \
         sends with 200, XDP relays with 199, turn-control sends with 64). Details in Control \
         plane below.\n",
        options.runs, options.seconds, options.trial_seconds
    )?;
    writeln!(md, "Commands:\n")?;
    writeln!(
        md,
        "```\nmake bench                      # setup, release build, then as root:\n\
         target/release/bench --out BENCHMARKS.md --png tests/bench/bench.png\n\
         BENCH_QUICK=1 make bench        # a smoke run (1 run of 0.3 s per case)\n\
         BENCH_RUNS=9 BENCH_SECONDS=3 make bench\n```\n"
    )?;
    writeln!(md, "Setup:\n")?;
    for note in notes {
        writeln!(md, "- {note}")?;
    }
    writeln!(md)?;

    writeln!(md, "## Data plane: relayed packet rate\n")?;
    writeln!(
        md,
        "| direction | payload | system | relayed pps (<1% loss) | x coturn | offered pps | loss | full-load delivered pps (loss) | CPU ns/packet | bad frames |"
    )?;
    writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        for payload in [100usize, 1200] {
            let coturn = find(results, System::Coturn, direction, payload)
                .map(|r| r.med(|s| s.delivered_pps, true));
            for system in System::ALL {
                let Some(r) = find(results, system, direction, payload) else {
                    continue;
                };
                let pps = r.med(|s| s.delivered_pps, true);
                let ratio = coturn.map_or("-".to_owned(), |c| format!("{:.1}x", pps / c));
                let bad: u64 = r.full.iter().chain(&r.sustained).map(|s| s.bad).sum();
                writeln!(
                    md,
                    "| {} | {payload} B | {} | {:.0} | {ratio} | {:.0}{} | {:.2}% | {:.0} ({:.1}%) | {:.1} | {bad} |",
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
    writeln!(
        md,
        "\nCPU ns/packet is BPF program time per run for the XDP rows and process CPU time per \
         delivered packet for the user-space rows: the two are not the same measure (see Method).\n"
    )?;

    writeln!(md, "## Targets\n")?;
    let ratio_min = |system: System| -> Option<f64> {
        let mut min: Option<f64> = None;
        for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
            for payload in [100usize, 1200] {
                let c = find(results, System::Coturn, direction, payload)?
                    .med(|s| s.delivered_pps, true);
                let x = find(results, system, direction, payload)?.med(|s| s.delivered_pps, true);
                let ratio = x / c;
                min = Some(min.map_or(ratio, |m: f64| m.min(ratio)));
            }
        }
        min
    };
    let status = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some(r) = ratio_min(System::TurnControlXdp) {
        writeln!(
            md,
            "- XDP relay >= 10x coturn's packet rate: worst case {r:.1}x, {}.",
            status(r >= 10.0)
        )?;
    }
    let bpf_vs_floor = {
        let mut worst: Option<f64> = None;
        for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
            for payload in [100usize, 1200] {
                if let (Some(x), Some(f)) = (
                    find(results, System::TurnControlXdp, direction, payload),
                    find(results, System::Floor, direction, payload),
                ) {
                    let ratio =
                        x.med(|s| s.cpu_ns_per_packet, true) / f.med(|s| s.cpu_ns_per_packet, true);
                    worst = Some(worst.map_or(ratio, |w: f64| w.max(ratio)));
                }
            }
        }
        worst
    };
    if let Some(w) = bpf_vs_floor {
        writeln!(
            md,
            "- Per-packet BPF cost <= 1.3x the floor program (live traffic, bpf_stats): worst case {w:.2}x, {}.",
            status(w <= 1.3)
        )?;
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
                "- The same target in the micro-benchmark (BPF_PROG_TEST_RUN): IPv4 paths up to {v4:.2}x the floor, all paths (IPv6, hairpin) up to {worst:.2}x, {}.",
                status(worst <= 1.3)
            )?;
        }
    }
    if let Some(r) = ratio_min(System::TurnControl) {
        writeln!(
            md,
            "- turn-control in user space >= coturn: worst case {r:.2}x, {}.",
            status(r >= 1.0)
        )?;
    }
    if let Some((_, Ok(f))) = control.iter().find(|(s, _)| *s == System::TurnControlXdp) {
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
    writeln!(
        md,
        "\nWhy a target is not met, and what would meet it: README.md, section Benchmarks."
    )?;
    writeln!(md)?;

    writeln!(md, "## Micro-benchmark (BPF_PROG_TEST_RUN, per path)\n")?;
    writeln!(
        md,
        "`target/release/xdp-microbench --runs {} --calls {} --json`: one run per call, kernel \
         bpf_stats, 96-byte payload, median of runs.\n",
        if options.quick { 3 } else { 5 },
        if options.quick { 20000 } else { 200000 }
    )?;
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
    writeln!(md)?;

    writeln!(md, "## End to end with real sockets (for the record)\n")?;
    writeln!(
        md,
        "`turnutils_uclient -u test -w testpass -e 198.51.100.2 -r 3480 -m M -n N -l 100 -z 1 -c -p 3478 203.0.113.10` \
         in the four-namespace lab (client, router, relay, peer) against `turnutils_peer -L 198.51.100.2 -p 3480`; \
         each echoed message crosses the relay twice each way. These figures include the routing \
         namespace and coturn's own client and peer, so they measure the whole chain, not the relay.\n"
    )?;
    for (system, result) in e2e {
        match result {
            Ok(summary) => writeln!(md, "- {}: {summary}", system.name())?,
            Err(error) => writeln!(md, "- {}: failed: {error:#}", system.name())?,
        }
    }
    writeln!(md)?;
    writeln!(md, "## Control plane\n")?;
    let raw = RawOptions::bench(options.quick);
    writeln!(
        md,
        "After the data-plane cases, with the system still running. Every client runs in the \
         generator's namespace and shares the two cores with the server, so these are lower \
         bounds.\n\n\
         - Allocations: N webrtc-rs `turn` clients (16 in flight) allocate from 192.0.2.2 \
         (Allocate with its 401 round trip); the server's RSS growth (/proc/PID/status VmRSS) \
         over N is the memory per allocation. Then they close.\n\
         - Channel bindings: a raw-UDP STUN client (`tests/src/bench/raw.rs`: one thread, std \
         sockets, HMAC-SHA1 MESSAGE-INTEGRITY and FINGERPRINT on every request) makes {k} \
         allocations from {k} source ports of 192.0.2.2 (401, then Allocate; distinct 5-tuples, \
         so a server with several SO_REUSEPORT shards spreads them), then binds on each of them \
         channels 0x4000+i to 198.51.100.2:(10000+i) for i < {c} (ChannelBind installs the \
         permission, no CreatePermission), keeping {w} requests in flight per allocation and \
         sending a request again after 250 ms without an answer (given up after 10 \
         transmissions, and counted). Many allocations of a few hundred channels rather than \
         a few of thousands: coturn 4.6 stops answering ChannelBind on an allocation after \
         about 1,000 channels. Bindings/s = success responses \
         / time from the first request to the last success. turn-control with xdp-agent sends a \
         ChannelBind success only after the agent acknowledged the AddChannelBinding RPC (or \
         after its offload timeout, when the binding would be missing from the agent: the run \
         then checks that the agent's ListChannelBindings holds every one of the {kc} bindings), \
         so its figure includes the agent's acknowledgement; coturn and turn-control alone \
         answer at once, with no agent in the path.\n\
         - ChannelBind request -> first packet relayed by XDP (turn-control + xdp-agent): {s} \
         samples, each a fresh channel of the first allocation to its own peer port, where a UDP \
         socket of the generator's namespace listens (the sink's rules are cleared, so the \
         relay's datagrams reach the stack). The client sends the ChannelBind and, without \
         waiting for its answer, channel data on that channel every {iv} us (a busy loop; each \
         datagram numbered), until the peer socket (busy-polled on the same thread) receives \
         a datagram relayed by XDP. The IP TTL tells which path relayed a datagram: the client \
         sends with TTL 200, the XDP program relays with the TTL less one (199), turn-control in \
         user space sends with its socket's default (64); datagrams relayed in user space first \
         would be counted. During these samples the server's and the agent's threads and the \
         measuring thread run at nice -10, so that the figure is about the relay's path rather \
         than waiting behind other work on a shared machine. The figure is the peer's receive \
         time less the request's send time \
         (one clock); the ChannelBind's own request -> success time in those samples is given \
         beside it, and that of as many more fresh channels bound one at a time with no channel \
         data (a blocking receive, as a client waits).\n",
        k = raw.allocations,
        c = raw.channels,
        w = raw.window,
        kc = raw.allocations * usize::from(raw.channels),
        s = raw.samples,
        iv = raw.interval.as_micros(),
    )?;
    writeln!(
        md,
        "| system | allocations | allocations/s | RSS per allocation | channel bindings/s (raw client) | agent acknowledgement in the path |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---|")?;
    for (system, figures) in control {
        match figures {
            Ok(f) => {
                let bindings = match &f.bindings {
                    Ok(b) if b.bound == b.requested => format!("{:.0}", b.per_second()),
                    Ok(b) => format!(
                        "{:.0} ({} of {} succeeded: {} errors, {} unanswered after {} tries; first: {})",
                        b.per_second(),
                        b.bound,
                        b.requested,
                        b.errors,
                        b.unanswered,
                        lab::bench::raw::MAX_TRIES,
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
            Err(error) => writeln!(md, "| {} | failed: {error:#} | | | | |", system.name())?,
        }
    }
    writeln!(md)?;
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
    writeln!(md, "## Not measured here\n")?;
    writeln!(
        md,
        "- IPv6 and hairpin paths under load (the micro-benchmark covers them per packet).\n\
         - Multi-queue / multi-core scaling: the veth pair has one queue and the machine 2 cores.\n"
    )?;
    Ok(md)
}
