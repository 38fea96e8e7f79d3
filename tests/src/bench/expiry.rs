//! The live per-packet cost of the relay program's expiry check: the program
//! as the agent loads it and the same source built without the check
//! (`relay_unexpiring`, otherwise instruction for instruction the same) take
//! turns on the relay's `x0` under the generator's load, timed by the
//! kernel's bpf_stats.
//!
//! Both are loaded here from their objects, without agent or control plane,
//! and configured alike: the FIB next hop (the agent's default) and one
//! binding that never expires, so that the check runs, finds the binding
//! live and the frame is relayed as by the other program. They take turns
//! by replacing the XDP link's program in place, in alternating order, so
//! that a drift of a shared machine's load falls on both alike; each run of
//! one is paired with the other's run next to it.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, ensure};
use bpf_common::KernelConfig;

use super::raw::percentile;
use super::turn::FIRST_CHANNEL;
use super::{BenchNet, CLIENT, Direction, Handling, Offered, PEER, RELAY, case_frames, prog_stats};
use crate::xdp::RelayObject;

/// The binding's allocation port.
pub const ALLOCATION_PORT: u16 = 50000;

/// One timed run of one program.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// BPF run time per run of the program (bpf_stats), in ns.
    pub ns_per_packet: f64,
    /// Frames the sink counted, per second.
    pub delivered_pps: f64,
    /// Frames the generator sent, per second.
    pub offered_pps: f64,
}

/// One direction and payload size: each program's runs, paired by index.
#[derive(Debug, Clone)]
pub struct Case {
    /// Client to peer or peer to client.
    pub direction: Direction,
    /// Application bytes per frame.
    pub payload: usize,
    /// The program as the agent loads it.
    pub with_check: Vec<Run>,
    /// `relay_unexpiring`.
    pub without_check: Vec<Run>,
}

impl Case {
    /// The median of `figure` over the program's runs.
    fn median(runs: &[Run], figure: impl Fn(&Run) -> f64) -> f64 {
        percentile(&runs.iter().map(figure).collect::<Vec<_>>(), 0.5)
    }

    /// What the check costs per packet, run by run: with less without.
    pub fn differences(&self) -> Vec<f64> {
        self.with_check
            .iter()
            .zip(&self.without_check)
            .map(|(with, without)| with.ns_per_packet - without.ns_per_packet)
            .collect()
    }
}

/// The two programs, loaded and configured alike.
struct Programs {
    with_check: RelayObject,
    without_check: RelayObject,
}

impl Programs {
    fn load() -> anyhow::Result<Self> {
        let config = KernelConfig::new(&[RELAY.port()], (49152, 65535), Some(*RELAY.ip()), None);
        let programs = Self {
            with_check: RelayObject::relay()?,
            without_check: RelayObject::unexpiring()?,
        };
        for program in [&programs.with_check, &programs.without_check] {
            program.configure(&config)?;
            program.bind(
                &config,
                CLIENT.into(),
                FIRST_CHANNEL,
                PEER.into(),
                ALLOCATION_PORT,
            )?;
        }
        Ok(programs)
    }
}

/// Measures the check in both directions at each of `payloads`: `runs` runs
/// of `duration` per program at full generator speed, after a warm-up of
/// `warm_up` each.
pub fn measure(
    runs: usize,
    duration: Duration,
    warm_up: Duration,
    payloads: &[usize],
) -> anyhow::Result<Vec<Case>> {
    let mut net = BenchNet::new()?;
    let programs = Programs::load()?;
    let (with_check, without_check) = (
        programs.with_check.program()?,
        programs.without_check.program()?,
    );
    net.attach_relay(&with_check)?;
    let mut cases = Vec::new();
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        for &payload in payloads {
            let (frame, rule) = case_frames(
                &net,
                direction,
                payload,
                FIRST_CHANNEL,
                ALLOCATION_PORT,
                Handling::Relay,
            );
            net.set_rules(&[rule])?;
            let mut case = Case {
                direction,
                payload,
                with_check: Vec::new(),
                without_check: Vec::new(),
            };
            let context = || format!("{} {payload} B", direction.label());
            for program in [&with_check, &without_check] {
                net.replace_relay(program)?;
                net.check_next_hop(net.relay_prog_id()?, &frame)
                    .with_context(context)?;
                let warm = run(&net, &frame, warm_up)?;
                ensure!(warm.delivered_pps > 0.0, "{}: nothing came back", context());
            }
            for index in 0..runs {
                // Alternating order: with the check first in even runs.
                let order = if index % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for checked in order {
                    let (program, samples) = if checked {
                        (&with_check, &mut case.with_check)
                    } else {
                        (&without_check, &mut case.without_check)
                    };
                    net.replace_relay(program)?;
                    samples.push(run(&net, &frame, duration)?);
                }
            }
            eprintln!(
                "bench: expiry check {:<13} {:>5} B  with {:>6.1} ns/pkt, without {:>6.1} ns/pkt, paired difference median {:>5.1} ns",
                direction.label(),
                payload,
                Case::median(&case.with_check, |r| r.ns_per_packet),
                Case::median(&case.without_check, |r| r.ns_per_packet),
                percentile(&case.differences(), 0.5),
            );
            cases.push(case);
        }
    }
    Ok(cases)
}

/// One run of the generator with `frame` for `duration` at full speed,
/// timed by the program on `x0`.
fn run(net: &BenchNet, frame: &[u8], duration: Duration) -> anyhow::Result<Run> {
    let id = net.relay_prog_id()?;
    let before = net.counts()?[0];
    let (time_before, runs_before) = prog_stats(id)?;
    let Offered { frames, elapsed } = net.generate(frame, duration, None)?;
    // What is still in flight arrives.
    std::thread::sleep(Duration::from_millis(50));
    let after = net.counts()?[0];
    let (time_after, runs_after) = prog_stats(id)?;
    let secs = elapsed.as_secs_f64();
    Ok(Run {
        ns_per_packet: (time_after - time_before) as f64 / (runs_after - runs_before).max(1) as f64,
        delivered_pps: (after.packets - before.packets) as f64 / secs,
        offered_pps: frames as f64 / secs,
    })
}

/// The report's table: per direction and size, each program's median
/// ns/packet and delivered rate, and the check's cost (the median of the
/// paired differences, and their range).
pub fn table(cases: &[Case]) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "| direction | payload | ns/packet with the check | ns/packet without | the check, ns/packet (range of {} pairs) | delivered pps with | delivered pps without | offered pps |",
        cases.first().map_or(0, |case| case.differences().len())
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|")?;
    for case in cases {
        let differences = case.differences();
        let (low, high) = (percentile(&differences, 0.0), percentile(&differences, 1.0));
        writeln!(
            md,
            "| {} | {} B | {:.1} | {:.1} | {:+.1} ({:+.1} to {:+.1}) | {:.0} | {:.0} | {:.0} |",
            case.direction.label(),
            case.payload,
            Case::median(&case.with_check, |r| r.ns_per_packet),
            Case::median(&case.without_check, |r| r.ns_per_packet),
            percentile(&differences, 0.5),
            low,
            high,
            Case::median(&case.with_check, |r| r.delivered_pps),
            Case::median(&case.without_check, |r| r.delivered_pps),
            Case::median(
                &[&case.with_check[..], &case.without_check[..]].concat(),
                |r| r.offered_pps
            ),
        )?;
    }
    Ok(md)
}
