//! Per-packet cost of every relay path beside two references, under
//! `BPF_PROG_TEST_RUN`: `trivial` (returns XDP_TX) and `floor` (one hash
//! lookup on a 12-byte key from the packet, MAC swap, XDP_TX).
//!
//! A relay path rewrites its frame (TTL, addresses, length), so the kernel's
//! `repeat` mode, which reruns the program on the same rewritten buffer,
//! would measure a different path after the first run. Every program is
//! therefore run once per `BPF_PROG_TEST_RUN` call, many times, and timed by
//! the kernel's own per-program statistics (`kernel.bpf_stats_enabled`),
//! which measure only the program. The references are also timed in
//! `repeat` mode, where they stay on one path, as a cross-check.
//!
//! Usage: xdp-microbench [--runs N] [--calls N] [--repeat N] [--json]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bpf_common::KernelConfig;
use tests::packet::{FrameSpec, channel_data};
use tests::xdp::{LoadedRelay, Reference, XDP_TX, run_once, run_stats};

const DATA_LEN: usize = 96;

struct Options {
    runs: usize,
    calls: u64,
    repeat: u32,
    json: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        runs: 5,
        calls: 200_000,
        repeat: 10_000_000,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => options.runs = value()?.parse()?,
            "--calls" => options.calls = value()?.parse()?,
            "--repeat" => options.repeat = value()?.parse()?,
            "--json" => options.json = true,
            "--help" | "-h" => {
                println!("usage: xdp-microbench [--runs N] [--calls N] [--repeat N] [--json]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    ensure!(
        options.runs > 0 && options.calls > 0,
        "--runs and --calls must be positive"
    );
    Ok(options)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xdp-microbench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Turns `kernel.bpf_stats_enabled` on and restores it on drop.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(Self::PATH).context("read bpf_stats_enabled")?;
        std::fs::write(Self::PATH, "1").context("enable bpf_stats_enabled (needs root)")?;
        Ok(Self(previous))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// ns per run of `frame` through `program`, one run per call, median of runs.
fn per_call(
    program: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
    options: &Options,
) -> anyhow::Result<f64> {
    ensure!(
        run_once(program, frame)? == XDP_TX,
        "the benchmark frame is not relayed"
    );
    for _ in 0..options.calls / 10 {
        run_once(program, frame)?;
    }
    let mut samples = Vec::with_capacity(options.runs);
    for _ in 0..options.runs {
        let (time_before, count_before) = run_stats(program)?;
        for _ in 0..options.calls {
            run_once(program, frame)?;
        }
        let (time_after, count_after) = run_stats(program)?;
        ensure!(
            count_after - count_before == options.calls,
            "bpf_stats missed runs"
        );
        samples.push((time_after - time_before) as f64 / options.calls as f64);
    }
    Ok(median(samples))
}

/// ns per run in the kernel's repeat mode, median of runs.
fn per_repeat(
    program: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
    options: &Options,
) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(options.runs);
    for _ in 0..options.runs {
        let mut out = vec![0u8; frame.len() + 256];
        let input = libbpf_rs::ProgramInput {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: options.repeat,
            ..Default::default()
        };
        let duration: Duration = program.test_run(input)?.duration;
        samples.push(duration.as_nanos() as f64);
    }
    Ok(median(samples))
}

fn addr(text: &str) -> SocketAddr {
    // Only called with the literals below; an unspecified address would make
    // the benchmark refuse to run (the frame would not be relayed).
    text.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn run() -> anyhow::Result<()> {
    let options = options()?;
    let _stats = BpfStats::enable()?;
    let relay = LoadedRelay::load()?;
    relay.configure(
        &KernelConfig::new(
            &[3478],
            (49152, 65535),
            Some("203.0.113.10".parse()?),
            Some("2001:db8:2::10".parse()?),
        )
        .with_mac_swap(true),
    )?;
    let cases = cases(&relay)?;
    let figures = measure(&relay, &cases, &options)?;
    if options.json {
        figures.print_json(&cases);
    } else {
        figures.print_table(&options);
    }
    Ok(())
}

/// A named benchmark frame.
type Case = (String, Vec<u8>);

/// Binds a channel on `relay` for every client and peer family, and for a hairpin, and
/// returns a frame for each direction of each, sorted by name.
fn cases(relay: &LoadedRelay) -> anyhow::Result<Vec<Case>> {
    let relay4 = addr("203.0.113.10:3478");
    let relay6 = addr("[2001:db8:2::10]:3478");
    let data = vec![0x5a; DATA_LEN];
    let mut cases: Vec<Case> = Vec::new();
    let clients = [
        ("v4", addr("192.0.2.2:40000"), relay4),
        ("v6", addr("[2001:db8:1::2]:40000"), relay6),
    ];
    let peers = [
        ("v4", addr("198.51.100.2:9000")),
        ("v6", addr("[2001:db8:3::2]:9000")),
    ];
    let mut channel = 0x4000;
    let mut port = 50000;
    for (client_family, client, listener) in clients {
        for (peer_family, peer) in peers {
            channel += 1;
            port += 1;
            relay.bind(client, channel, peer, port)?;
            let relayed = SocketAddr::new(
                if peer.is_ipv4() {
                    relay4.ip()
                } else {
                    relay6.ip()
                },
                port,
            );
            cases.push((
                format!("client_to_peer_{client_family}_{peer_family}"),
                FrameSpec::new(client, listener, &channel_data(channel, &data)).build(),
            ));
            cases.push((
                format!("peer_to_client_{peer_family}_{client_family}"),
                FrameSpec::new(peer, relayed, &data).build(),
            ));
        }
    }
    // Hairpin: client A's peer is client B's relayed address and back.
    let (a, b) = (addr("192.0.2.2:40001"), addr("192.0.2.3:40001"));
    relay.bind(a, 0x4100, addr("203.0.113.10:51001"), 51000)?;
    relay.bind(b, 0x4101, addr("203.0.113.10:51000"), 51001)?;
    cases.push((
        "hairpin_v4_v4".into(),
        FrameSpec::new(a, relay4, &channel_data(0x4100, &data)).build(),
    ));
    cases.sort();
    Ok(cases)
}

/// What [`measure`] found, in ns per packet.
struct Figures {
    /// The frame the references run on (`client_to_peer_v4_v4`).
    reference_frame: Vec<u8>,
    /// The floor reference, one run per call: the unit of the "x floor" column.
    floor_ns: f64,
    /// The references in repeat mode.
    trivial_repeat: f64,
    floor_repeat: f64,
    /// One run per call: the references, then every case.
    rows: Vec<(String, f64)>,
}

/// Times the references on the `client_to_peer_v4_v4` frame, then the relay on every case.
fn measure(relay: &LoadedRelay, cases: &[Case], options: &Options) -> anyhow::Result<Figures> {
    let reference_frame = cases
        .iter()
        .find(|(name, _)| name == "client_to_peer_v4_v4")
        .map(|(_, frame)| frame.clone())
        .context("no client_to_peer_v4_v4 case")?;
    let flow: [u8; 12] = reference_frame[26..38].try_into()?;
    let trivial = Reference::trivial()?;
    let floor = Reference::floor(&[flow])?;
    let (trivial_program, floor_program) = (trivial.program()?, floor.program()?);

    let trivial_ns = per_call(&trivial_program, &reference_frame, options)?;
    let floor_ns = per_call(&floor_program, &reference_frame, options)?;
    let trivial_repeat = per_repeat(&trivial_program, &reference_frame, options)?;
    let floor_repeat = per_repeat(&floor_program, &reference_frame, options)?;
    let mut rows = vec![
        ("trivial".to_owned(), trivial_ns),
        ("floor".to_owned(), floor_ns),
    ];
    for (name, frame) in cases {
        rows.push((name.clone(), per_call(relay.program(), frame, options)?));
    }
    Ok(Figures {
        reference_frame,
        floor_ns,
        trivial_repeat,
        floor_repeat,
        rows,
    })
}

impl Figures {
    /// One JSON object a line: every row, then the references in repeat mode.
    fn print_json(&self, cases: &[Case]) {
        let Self {
            reference_frame,
            floor_ns,
            trivial_repeat,
            floor_repeat,
            rows,
        } = self;
        for (name, ns) in rows {
            println!(
                "{{\"program\":\"{name}\",\"ns_per_packet\":{ns:.1},\"vs_floor\":{:.2},\"frame_bytes\":{}}}",
                ns / floor_ns,
                cases
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(reference_frame.len(), |(_, f)| f.len())
            );
        }
        println!(
            "{{\"program\":\"trivial\",\"mode\":\"repeat\",\"ns_per_packet\":{trivial_repeat:.1}}}"
        );
        println!(
            "{{\"program\":\"floor\",\"mode\":\"repeat\",\"ns_per_packet\":{floor_repeat:.1}}}"
        );
    }

    /// A table for people.
    fn print_table(&self, options: &Options) {
        let Self {
            floor_ns,
            trivial_repeat,
            floor_repeat,
            rows,
            ..
        } = self;
        println!(
            "BPF_PROG_TEST_RUN, one run per call, kernel bpf_stats; median of {} runs of {} calls; {DATA_LEN}-byte payload",
            options.runs, options.calls
        );
        println!(
            "{:<28} {:>10} {:>9}",
            "program / path", "ns/packet", "x floor"
        );
        for (name, ns) in rows {
            println!("{name:<28} {ns:>10.1} {:>9.2}", ns / floor_ns);
        }
        println!(
            "repeat mode ({} repeats): trivial {trivial_repeat:.1} ns, floor {floor_repeat:.1} ns",
            options.repeat
        );
    }
}
