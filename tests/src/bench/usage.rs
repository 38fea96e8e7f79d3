//! The live per-packet cost of the relay program's usage counters and rate
//! limits: the program as the agent loads it takes turns on the relay's `x0`
//! with the floor of its next-hop mode (`floor_fib`) under the generator's
//! load, timed by the kernel's bpf_stats, and checked: what the binding's
//! `USAGE` slot counted must be what the program relayed and dropped.
//!
//! One program, four ways to hold its one binding, switched by writing the
//! binding's two entries again (as the agent does for a new limit), not by
//! loading another program: no slot and no meter (what every binding was
//! before counters existed), a slot, a slot and a meter far above the
//! offered load (each packet metered, none dropped), and a slot and a meter
//! of 1 Mbit/s (nearly every packet metered out). Beside them the same
//! source built without the counters and meters (`relay_uncounted`: no
//! terms copied, no meter checked, nothing counted), which the bookkeeping
//! of a binding without a slot or meter is measured against, and the floor.
//! All six take turns in alternating order, so that a drift of a shared
//! machine's load falls on all alike; each run is paired with the other
//! variants' runs of the same round.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bpf_common::usage::{METER_BURST_NS, METER_MIN_BURST_BYTES, meter_key};
use bpf_common::{BindingUsage, Counter, KernelConfig, Reason};

use super::raw::percentile;
use super::turn::FIRST_CHANNEL;
use super::{
    BenchNet, CLIENT, Direction, Handling, Offered, PEER, RELAY, Rule, case_frames, floor_key,
    prog_stats,
};
use crate::xdp::{Reference, RelayObject};

/// The binding's allocation port.
pub const ALLOCATION_PORT: u16 = 50000;
/// The binding's `USAGE` slot when it is counted.
pub const SLOT: u32 = 1;
/// The rate of the meter that never drops: 100 Gbit/s, in bytes per second,
/// far above what the generator offers at either size.
pub const UNDER_RATE: u64 = 12_500_000_000;
/// The rate of the meter that drops: 1 Mbit/s, in bytes per second.
pub const LIMIT_RATE: u64 = 125_000;

/// The meter names of the two limits (`bpf_common::usage::meter_key`).
const UNDER_METER: &str = "allocation:bench-under";
const LIMIT_METER: &str = "allocation:bench-limit";

/// What runs on `x0`: the relay without counters, the relay with its
/// binding held one of four ways, or the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `relay_uncounted`, its own binding naming slot [`SLOT`] and the
    /// meter of [`LIMIT_RATE`], both ignored: nothing counted or metered.
    Uncounted,
    /// Usage slot 0, no meter: neither counted nor metered.
    NoCounters,
    /// Usage slot [`SLOT`], no meter.
    Counters,
    /// Slot [`SLOT`] and one meter of [`UNDER_RATE`].
    LimitUnder,
    /// Slot [`SLOT`] and one meter of [`LIMIT_RATE`].
    LimitDropping,
    /// `floor_fib`: one hash lookup, the FIB's next hop, `XDP_TX`.
    Floor,
}

impl Variant {
    /// In the report's order, which is also the first round's.
    pub const ALL: [Self; 6] = [
        Self::Uncounted,
        Self::NoCounters,
        Self::Counters,
        Self::LimitUnder,
        Self::LimitDropping,
        Self::Floor,
    ];

    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Uncounted => "without counters (relay_uncounted)",
            Self::NoCounters => "no counters",
            Self::Counters => "counters",
            Self::LimitUnder => "counters + limit, under it",
            Self::LimitDropping => "counters + limit, dropping",
            Self::Floor => "floor-fib",
        }
    }

    /// The binding's usage slot and meters, `None` for the floor.
    fn terms(self) -> Option<(u32, [u64; 2])> {
        match self {
            // Terms that would count and drop, were they read.
            Self::Uncounted => Some((SLOT, [meter_key(LIMIT_METER), 0])),
            Self::NoCounters => Some((0, [0; 2])),
            Self::Counters => Some((SLOT, [0; 2])),
            Self::LimitUnder => Some((SLOT, [meter_key(UNDER_METER), 0])),
            Self::LimitDropping => Some((SLOT, [meter_key(LIMIT_METER), 0])),
            Self::Floor => None,
        }
    }
}

/// One timed run of one variant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// BPF run time per run of the program (bpf_stats), in ns.
    pub ns_per_packet: f64,
    /// Frames the sink counted, per second.
    pub delivered_pps: f64,
    /// Frames the generator sent, per second.
    pub offered_pps: f64,
    /// How long the generator ran, in seconds.
    pub seconds: f64,
    /// Packets the binding's slot counted as relayed (0 for the floor,
    /// `relay_uncounted` and the binding without a slot).
    pub counted: u64,
    /// Packets the binding's slot counted as dropped by a meter.
    pub dropped: u64,
    /// Relayed frames the sink did not receive (lost on the veth back).
    pub not_received: u64,
    /// Runs of the relay on other frames than the generator's (passed).
    pub others: u64,
}

/// One direction and payload size: each variant's runs, paired by index.
#[derive(Debug, Clone)]
pub struct Case {
    /// Client to peer or peer to client.
    pub direction: Direction,
    /// Application bytes per frame.
    pub payload: usize,
    /// The runs of each variant, in the order of [`Variant::ALL`].
    pub runs: [Vec<Run>; 6],
}

impl Case {
    fn new(direction: Direction, payload: usize) -> Self {
        Self {
            direction,
            payload,
            runs: Default::default(),
        }
    }

    /// The runs of `variant`.
    pub fn of(&self, variant: Variant) -> &[Run] {
        &self.runs[variant as usize]
    }

    /// The median of `figure` over `variant`'s runs.
    pub fn median(&self, variant: Variant, figure: impl Fn(&Run) -> f64) -> f64 {
        percentile(
            &self.of(variant).iter().map(figure).collect::<Vec<_>>(),
            0.5,
        )
    }

    /// What `more` costs over `less` per packet, round by round.
    pub fn differences(&self, more: Variant, less: Variant) -> Vec<f64> {
        self.of(more)
            .iter()
            .zip(self.of(less))
            .map(|(more, less)| more.ns_per_packet - less.ns_per_packet)
            .collect()
    }
}

/// The relay program, the same without counters and the floor, loaded and
/// configured: the two relays alike with the FIB next hop, the two meters
/// and one binding each (the same addresses; each program has its own
/// maps); the floor with the two flows addressed past the relay.
struct Programs {
    config: KernelConfig,
    relay: RelayObject,
    uncounted: RelayObject,
    floor: Reference,
}

impl Programs {
    fn load(net: &BenchNet) -> anyhow::Result<Self> {
        let config = KernelConfig::new(&[RELAY.port()], (49152, 65535), Some(*RELAY.ip()), None);
        let relay = RelayObject::relay()?;
        let uncounted = RelayObject::uncounted()?;
        for program in [&relay, &uncounted] {
            program.configure(&config)?;
            program.set_meter(meter_key(UNDER_METER), UNDER_RATE)?;
            program.set_meter(meter_key(LIMIT_METER), LIMIT_RATE)?;
        }
        let mut keys = Vec::new();
        for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
            let (frame, _) = case_frames(
                net,
                direction,
                100,
                FIRST_CHANNEL,
                ALLOCATION_PORT,
                Handling::Forward,
            );
            keys.push(floor_key(&frame)?);
        }
        let programs = Self {
            config,
            relay,
            uncounted,
            floor: Reference::floor_fib(&keys)?,
        };
        programs.hold(Variant::Uncounted)?;
        programs.hold(Variant::NoCounters)?;
        Ok(programs)
    }

    /// The relay whose maps `variant` uses (the floor has none of the
    /// relay's: while it runs, the relay's must not move).
    fn relay_of(&self, variant: Variant) -> &RelayObject {
        if variant == Variant::Uncounted {
            &self.uncounted
        } else {
            &self.relay
        }
    }

    /// The program `variant` runs on `x0`.
    fn program(&self, variant: Variant) -> anyhow::Result<libbpf_rs::ProgramMut<'_>> {
        if variant == Variant::Floor {
            self.floor.program()
        } else {
            self.relay_of(variant).program()
        }
    }

    /// Writes the binding's entries as `variant` holds them, in its
    /// relay's maps (nothing for the floor).
    fn hold(&self, variant: Variant) -> anyhow::Result<()> {
        let Some((slot, meters)) = variant.terms() else {
            return Ok(());
        };
        self.relay_of(variant).bind_with(
            &self.config,
            SocketAddr::V4(CLIENT),
            FIRST_CHANNEL,
            SocketAddr::V4(PEER),
            ALLOCATION_PORT,
            slot,
            meters,
        )
    }
}

/// The generator's frame and the sink's rule of one variant.
struct Traffic {
    frame: Vec<u8>,
    rule: Rule,
}

/// What one direction and size sends: to the relay, and past it to the floor.
struct Frames {
    relay: Traffic,
    floor: Traffic,
}

impl Frames {
    fn new(net: &BenchNet, direction: Direction, payload: usize) -> Self {
        let traffic = |handling| {
            let (frame, rule) = case_frames(
                net,
                direction,
                payload,
                FIRST_CHANNEL,
                ALLOCATION_PORT,
                handling,
            );
            Traffic { frame, rule }
        };
        Self {
            relay: traffic(Handling::Relay),
            floor: traffic(Handling::Forward),
        }
    }

    fn of(&self, variant: Variant) -> &Traffic {
        if variant == Variant::Floor {
            &self.floor
        } else {
            &self.relay
        }
    }
}

/// Measures the relay without counters, the four ways of holding a binding
/// and the floor in both
/// directions at each of `payloads`: `runs` runs of `duration` per variant
/// at full generator speed, after a warm-up of `warm_up` each.
pub fn measure(
    runs: usize,
    duration: Duration,
    warm_up: Duration,
    payloads: &[usize],
) -> anyhow::Result<Vec<Case>> {
    let mut net = BenchNet::new()?;
    let programs = Programs::load(&net)?;
    net.attach_relay(&programs.relay.program()?)?;
    let mut cases = Vec::new();
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        for &payload in payloads {
            let frames = Frames::new(&net, direction, payload);
            let mut case = Case::new(direction, payload);
            let context = || format!("{} {payload} B", direction.label());
            for variant in Variant::ALL {
                let traffic = frames.of(variant);
                switch(&net, &programs, variant, &traffic.rule)?;
                // A test run would charge the dropping meter; the same
                // program was checked with the binding held the other ways.
                if variant != Variant::LimitDropping {
                    net.check_next_hop(net.relay_prog_id()?, &traffic.frame)
                        .with_context(context)?;
                }
                let warm = run(&net, &programs, variant, &case, &traffic.frame, warm_up)
                    .with_context(context)?;
                ensure!(warm.delivered_pps > 0.0, "{}: nothing came back", context());
            }
            for index in 0..runs {
                // Alternating order: the report's order in even rounds,
                // the reverse in odd ones.
                let mut order = Variant::ALL;
                if index % 2 == 1 {
                    order.reverse();
                }
                for variant in order {
                    let traffic = frames.of(variant);
                    switch(&net, &programs, variant, &traffic.rule)?;
                    let sample = run(&net, &programs, variant, &case, &traffic.frame, duration)
                        .with_context(|| format!("{}, {}", context(), variant.label()))?;
                    case.runs[variant as usize].push(sample);
                }
            }
            log(&case);
            cases.push(case);
        }
    }
    Ok(cases)
}

/// Puts `variant` on `x0`: the binding's entries written as it holds them,
/// the program replaced in place, the sink's rule set.
fn switch(
    net: &BenchNet,
    programs: &Programs,
    variant: Variant,
    rule: &Rule,
) -> anyhow::Result<()> {
    programs.hold(variant)?;
    net.replace_relay(&programs.program(variant)?)?;
    net.set_rules(&[*rule])
}

/// Prints a case's medians as it ends.
fn log(case: &Case) {
    let ns = |variant| case.median(variant, |r| r.ns_per_packet);
    let paired = |more, less| percentile(&case.differences(more, less), 0.5);
    eprintln!(
        "bench: usage {:<13} {:>5} B  ns/pkt: without {:>6.1}, none {:>6.1}, counters {:>6.1}, limit under {:>6.1}, dropping {:>6.1}, floor {:>6.1}; none - without {:>+5.1}, counters - without {:>+5.1}, limit under - without {:>+5.1}; dropping delivers {:.0} pps",
        case.direction.label(),
        case.payload,
        ns(Variant::Uncounted),
        ns(Variant::NoCounters),
        ns(Variant::Counters),
        ns(Variant::LimitUnder),
        ns(Variant::LimitDropping),
        ns(Variant::Floor),
        paired(Variant::NoCounters, Variant::Uncounted),
        paired(Variant::Counters, Variant::Uncounted),
        paired(Variant::LimitUnder, Variant::Uncounted),
        case.median(Variant::LimitDropping, |r| r.delivered_pps),
    );
}

/// What the bench reads before and after a run.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// Frames the sink counted.
    received: u64,
    /// bpf_stats of the program on `x0`: run time (ns) and runs.
    time_ns: u64,
    runs: u64,
    /// The binding's slot.
    usage: BindingUsage,
    /// The relay program's `STATS` for the direction's relay reason and
    /// for `drop_rate_limited`.
    relayed: Counter,
    dropped: Counter,
    /// Runs counted under every other reason: frames that are not the
    /// generator's (the generator side's own IPv6 neighbour discovery and
    /// multicast listener reports), passed to the stack.
    others: u64,
}

impl Reading {
    fn take(
        net: &BenchNet,
        relay: &RelayObject,
        direction: Direction,
        prog_id: u32,
    ) -> anyhow::Result<Self> {
        let (time_ns, runs) = prog_stats(prog_id)?;
        let relaying = relay_reason(direction);
        let mut others = 0;
        for &reason in Reason::ALL {
            if reason != relaying && reason != Reason::DropRateLimited {
                others += relay.counter(reason)?.packets;
            }
        }
        Ok(Self {
            received: net.counts()?[0].packets,
            time_ns,
            runs,
            usage: relay.usage(SLOT)?,
            relayed: relay.counter(relaying)?,
            dropped: relay.counter(Reason::DropRateLimited)?,
            others,
        })
    }
}

/// The reason the relay counts a frame of the bench's binding under.
fn relay_reason(direction: Direction) -> Reason {
    match direction {
        Direction::ClientToPeer => Reason::RelayClientToPeerV4V4,
        Direction::PeerToClient => Reason::RelayPeerToClientV4V4,
    }
}

/// The direction's relayed and dropped counters of a slot.
fn slot_counters(usage: &BindingUsage, direction: Direction) -> (Counter, Counter) {
    match direction {
        Direction::ClientToPeer => (usage.client_to_peer, usage.dropped_client_to_peer),
        Direction::PeerToClient => (usage.peer_to_client, usage.dropped_peer_to_client),
    }
}

/// `after` less `before`.
fn grown(after: Counter, before: Counter) -> Counter {
    Counter {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
    }
}

/// One run of the generator with `frame` for `duration` at full speed,
/// timed by the program on `x0`, its counts checked against `variant`.
fn run(
    net: &BenchNet,
    programs: &Programs,
    variant: Variant,
    case: &Case,
    frame: &[u8],
    duration: Duration,
) -> anyhow::Result<Run> {
    let id = net.relay_prog_id()?;
    let read = || Reading::take(net, programs.relay_of(variant), case.direction, id);
    let before = read()?;
    let Offered { frames, elapsed } = net.generate(frame, duration, None)?;
    // What is still in flight arrives.
    std::thread::sleep(Duration::from_millis(50));
    let after = read()?;
    let secs = elapsed.as_secs_f64();
    let (counted, dropped, others) = check_counts(variant, case, &before, &after)?;
    let received = after.received - before.received;
    Ok(Run {
        ns_per_packet: (after.time_ns - before.time_ns) as f64
            / (after.runs - before.runs).max(1) as f64,
        delivered_pps: received as f64 / secs,
        offered_pps: frames as f64 / secs,
        seconds: secs,
        counted,
        dropped,
        not_received: (after.relayed.packets - before.relayed.packets).saturating_sub(received),
        others,
    })
}

/// Checks what the binding's slot counted in a run of `variant` against
/// what the program did: every relayed packet counted once with its
/// payload, every metered-out one counted as dropped, together every run
/// of the program but those on other frames; nothing counted without a
/// slot or by `relay_uncounted` (read in its own maps), nothing dropped
/// under the rate or by `relay_uncounted`. Returns the packets counted as
/// relayed and as dropped, and the runs on other frames.
fn check_counts(
    variant: Variant,
    case: &Case,
    before: &Reading,
    after: &Reading,
) -> anyhow::Result<(u64, u64, u64)> {
    let (relayed_before, dropped_before) = slot_counters(&before.usage, case.direction);
    let (relayed_after, dropped_after) = slot_counters(&after.usage, case.direction);
    let counted = grown(relayed_after, relayed_before);
    let counted_dropped = grown(dropped_after, dropped_before);
    if variant == Variant::Floor {
        ensure!(
            counted == Counter::default() && counted_dropped == Counter::default(),
            "the slot counted {counted:?} and dropped {counted_dropped:?} while the floor ran"
        );
        return Ok((0, 0, 0));
    }
    let relayed = grown(after.relayed, before.relayed);
    let dropped = grown(after.dropped, before.dropped).packets;
    let runs = after.runs - before.runs;
    let others = after.others - before.others;
    let payload = case.payload as u64;
    let mismatch = |what: &str| {
        format!(
            "{}: {what}: the slot counted {counted:?} relayed and {counted_dropped:?} dropped; the program relayed {relayed:?} (STATS) and dropped {dropped} (drop_rate_limited) in {runs} runs, {others} of them on other frames",
            variant.label()
        )
    };
    match variant {
        Variant::NoCounters | Variant::Uncounted => ensure!(
            counted == Counter::default() && counted_dropped == Counter::default(),
            mismatch(if variant == Variant::Uncounted {
                "the program without counters counted"
            } else {
                "a binding without a slot was counted"
            })
        ),
        _ => ensure!(
            counted == relayed
                && counted.bytes == counted.packets * payload
                && counted_dropped.packets == dropped
                && counted_dropped.bytes == dropped * payload,
            mismatch("the slot's counts are not the program's")
        ),
    }
    ensure!(
        relayed.packets + dropped + others == runs,
        mismatch("relayed, dropped and other frames are not every run of the program")
    );
    match variant {
        Variant::LimitDropping if dropped == 0 => {
            bail!(mismatch("the 1 Mbit/s meter dropped nothing"))
        }
        Variant::LimitDropping => {}
        _ if dropped > 0 => bail!(mismatch("a packet was dropped under the rate or unmetered")),
        _ => {}
    }
    Ok((counted.packets, counted_dropped.packets, others))
}

/// `median (low to high)` of paired differences, signed.
fn spread(differences: &[f64]) -> String {
    format!(
        "{:+.1} ({:+.1} to {:+.1})",
        percentile(differences, 0.5),
        percentile(differences, 0.0),
        percentile(differences, 1.0)
    )
}

/// The report's tables: per direction and size, each variant's median
/// ns/packet; the paired differences against `relay_uncounted` (the
/// bookkeeping, the counters, the limit) and step by step (counters against
/// none, the limit against counters); each relay against the floor; then
/// the delivered rates and what the slot counted.
pub fn table(cases: &[Case]) -> anyhow::Result<String> {
    let pairs = cases
        .first()
        .map_or(0, |case| case.of(Variant::Floor).len());
    let mut md = String::new();
    writeln!(md, "ns/packet, median of {pairs} runs each:\n")?;
    writeln!(
        md,
        "| direction | payload | without counters (relay_uncounted) | no counters | counters | counters + limit, under it | counters + limit, dropping | floor-fib |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|")?;
    for case in cases {
        let ns = |variant| case.median(variant, |r| r.ns_per_packet);
        writeln!(
            md,
            "| {} | {} B | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            case.direction.label(),
            case.payload,
            ns(Variant::Uncounted),
            ns(Variant::NoCounters),
            ns(Variant::Counters),
            ns(Variant::LimitUnder),
            ns(Variant::LimitDropping),
            ns(Variant::Floor),
        )?;
    }
    writeln!(
        md,
        "\nPaired differences, ns/packet: the median of the {pairs} differences between the runs of one round, with their range. Against the program without counters: the bookkeeping alone (no counters - without), the whole feature for a counted binding (counters - without) and with a limit it stays under (limit under - without); then step by step.\n"
    )?;
    writeln!(
        md,
        "| direction | payload | no counters - without counters | counters - without counters | limit under - without counters | counters - no counters | limit under - counters |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|")?;
    for case in cases {
        let paired = |more, less| spread(&case.differences(more, less));
        writeln!(
            md,
            "| {} | {} B | {} | {} | {} | {} | {} |",
            case.direction.label(),
            case.payload,
            paired(Variant::NoCounters, Variant::Uncounted),
            paired(Variant::Counters, Variant::Uncounted),
            paired(Variant::LimitUnder, Variant::Uncounted),
            paired(Variant::Counters, Variant::NoCounters),
            paired(Variant::LimitUnder, Variant::Counters),
        )?;
    }
    over_floor(&mut md, cases)?;
    rates(&mut md, cases)?;
    Ok(md)
}

/// The table of each relay's paired differences over the floor.
fn over_floor(md: &mut String, cases: &[Case]) -> anyhow::Result<()> {
    writeln!(md, "\nOver the floor (`floor-fib`), ns/packet, paired:\n")?;
    writeln!(
        md,
        "| direction | payload | without counters - floor | no counters - floor | counters - floor | limit under - floor | limit dropping - floor |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|")?;
    for case in cases {
        let over = |variant| spread(&case.differences(variant, Variant::Floor));
        writeln!(
            md,
            "| {} | {} B | {} | {} | {} | {} | {} |",
            case.direction.label(),
            case.payload,
            over(Variant::Uncounted),
            over(Variant::NoCounters),
            over(Variant::Counters),
            over(Variant::LimitUnder),
            over(Variant::LimitDropping),
        )?;
    }
    Ok(())
}

/// The table of delivered rates and counts.
fn rates(md: &mut String, cases: &[Case]) -> anyhow::Result<()> {
    write!(
        md,
        "\nDelivered packets per second (the sink's count), medians. What the 1 Mbit/s limit should deliver in a run of `s` seconds: its rate and, once, its burst (the bucket fills up while the other variants run), ({LIMIT_RATE} B/s x s + {} B) / payload / s, the median over its runs. Counted:",
        limit_burst_bytes()
    )?;
    writeln!(
        md,
        " what the slot counted over all timed runs (relayed + dropped), each run checked exactly against the program's STATS and run count; relayed frames the sink did not receive; the relay's runs on other frames.\n"
    )?;
    writeln!(
        md,
        "| direction | payload | offered pps | without counters | no counters | counters | limit under | limit dropping | limit dropping, expected | counted relayed + dropped | relayed, not received by the sink | other frames (passed) |"
    )?;
    writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for case in cases {
        let pps = |variant| case.median(variant, |r| r.delivered_pps);
        let all: Vec<Run> = case.runs.concat();
        let counted: u64 = all.iter().map(|r| r.counted).sum();
        let dropped: u64 = all.iter().map(|r| r.dropped).sum();
        let lost: u64 = all.iter().map(|r| r.not_received).sum();
        let others: u64 = all.iter().map(|r| r.others).sum();
        writeln!(
            md,
            "| {} | {} B | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {counted} + {dropped} | {lost} | {others} |",
            case.direction.label(),
            case.payload,
            percentile(&all.iter().map(|r| r.offered_pps).collect::<Vec<_>>(), 0.5),
            pps(Variant::Uncounted),
            pps(Variant::NoCounters),
            pps(Variant::Counters),
            pps(Variant::LimitUnder),
            pps(Variant::LimitDropping),
            case.median(Variant::LimitDropping, |r| {
                (LIMIT_RATE as f64 * r.seconds + limit_burst_bytes() as f64)
                    / case.payload as f64
                    / r.seconds
            }),
        )?;
    }
    Ok(())
}

/// The burst of the dropping meter, in bytes (see `Meter::new`).
fn limit_burst_bytes() -> u64 {
    (LIMIT_RATE * METER_BURST_NS / 1_000_000_000).max(METER_MIN_BURST_BYTES)
}

/// The report's section: how it was measured, then [`table`] (or why it is
/// missing).
pub fn section(
    runs: usize,
    seconds: f64,
    cases: &anyhow::Result<Vec<Case>>,
) -> anyhow::Result<String> {
    let mut md = String::from(HEADING);
    md.push_str("\n\n");
    write!(
        md,
        "{METHOD_START} {runs} run(s) of {seconds:.1} s each per variant, direction and size at full generator speed; {METHOD_END}\n\n"
    )?;
    match cases {
        Ok(cases) => md.push_str(&table(cases)?),
        Err(error) => writeln!(md, "Not run: {error:#}")?,
    }
    md.push('\n');
    Ok(md)
}

/// The section's heading.
pub const HEADING: &str = "## Usage counters and rate limits: live per-packet cost";

const METHOD_START: &str = "Each binding's entries name its `USAGE` slot (0: not counted) and up to two `METERS` keys (its allocation's and its user's rate limits, 0: none); the program meters a packet once its next hop is known (a GCRA compare-and-exchange per meter on the coarse clock) and, once the frame is relayed, adds it to the slot with two atomic adds. Their cost, measured live: the program as the agent loads it (`xdp_agent_skel::OBJECT`), loaded by the bench itself (no agent, no control plane) with the FIB next hop and one binding that never expires (192.0.2.2:40000, channel 0x4000, peer 198.51.100.2:9000, allocation port 50000), held four ways by writing its two entries again between runs (the program stays loaded): no slot and no meter (nothing counted or metered, but the program still reads the entry's terms, notes in its per-CPU scratch that there is nothing to count or meter and tests that note twice: the bookkeeping, which the other three include too, with the terms themselves written to the scratch); slot 1; slot 1 and one meter of 12 500 000 000 B/s (100 Gbit/s: every packet metered and charged, none dropped); slot 1 and one meter of 125 000 B/s (1 Mbit/s: nearly every packet metered out, `drop_rate_limited`, and counted as dropped). The fifth is `relay_uncounted` (`bpf/xdp/src/bin/relay_uncounted.rs`), the same source built with `COUNT_USAGE` off (no terms written, no meter checked, nothing counted; nothing else differs in the source), loaded and configured alike with its own maps and the same binding, whose entries name slot 1 and the 1 Mbit/s meter, which it ignores: against it the bookkeeping and the whole feature are measured. The sixth is `floor-fib`, the FIB mode's floor as the data-plane table above loads it (its flows addressed past the relay). In the topology above, the six take turns on `x0` (the XDP link's program replaced in place, `BPF_LINK_UPDATE`), in alternating order (forward in even rounds, reversed in odd ones),";

const METHOD_END: &str = "ns/packet is bpf_stats run_time_ns / run_cnt of the program on `x0`. After every run the bench checks the slot against the program: packets and bytes counted as relayed equal the direction's relay reason in `STATS`, packets counted as dropped equal `drop_rate_limited`, bytes are the payload times the packets, relayed plus dropped plus the runs on other frames (the generator side's own IPv6 neighbour discovery and listener reports, passed; every run counts one reason in `STATS`) equal the program's runs (bpf_stats run_cnt), nothing is counted without a slot, by `relay_uncounted` (in its own `USAGE`, read the same way) or while the floor runs, and nothing is dropped under the rate or by `relay_uncounted`; a mismatch fails the bench. A paired difference within its range's spread is noise.";

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ns_per_packet: f64) -> Run {
        Run {
            ns_per_packet,
            delivered_pps: 1_000.0,
            offered_pps: 3_000_000.0,
            seconds: 2.0,
            counted: 10,
            dropped: 1,
            not_received: 0,
            others: 0,
        }
    }

    #[test]
    fn the_table_pairs_runs_by_round() {
        let mut case = Case::new(Direction::ClientToPeer, 100);
        for (variant, times) in Variant::ALL.into_iter().zip([
            [85.0, 87.0, 90.0],
            [90.0, 91.0, 95.0],
            [93.0, 92.0, 99.0],
            [100.0, 99.0, 103.0],
            [60.0, 61.0, 62.0],
            [60.0, 60.0, 64.0],
        ]) {
            case.runs[variant as usize] = times.map(run).to_vec();
        }
        let md = table(&[case]).unwrap();
        // None less without, counters less without, limit under less
        // without: 5, 4, 5; 8, 5, 9; 15, 12, 13. Counters less none: 3, 1,
        // 4. Limit under less counters: 7, 7, 4.
        assert!(
            md.contains("| client->peer | 100 B | +5.0 (+4.0 to +5.0) | +8.0 (+5.0 to +9.0) | +13.0 (+12.0 to +15.0) | +3.0 (+1.0 to +4.0) | +7.0 (+4.0 to +7.0) |"),
            "{md}"
        );
        // Without counters over the floor: 25, 27, 26.
        assert!(
            md.contains("| client->peer | 100 B | +26.0 (+25.0 to +27.0) |"),
            "{md}"
        );
        // Ten relayed and one dropped in each of 18 runs.
        assert!(md.contains("| 180 + 18 | 0 | 0 |"), "{md}");
        let section = section(3, 2.0, &Ok(vec![])).unwrap();
        assert!(section.starts_with(HEADING), "{section}");
        assert!(section.contains("3 run(s) of 2.0 s"), "{section}");
    }
}
