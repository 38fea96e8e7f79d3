//! The binding maps hold 65 536 bindings per direction and family, cost a
//! bounded amount of kernel memory, and when full the agent says so instead
//! of evicting a live binding; a streamed Sync fills both families and
//! converges on another set, and one beyond a family's capacity installs
//! what fits.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use proto::v1::ChannelBinding;
use tests::agent::{self, Agent, LIFETIME, bare, binding};
use tests::{Lab, kernel_clock_ns};
use tonic::Code;

const CAPACITY: u32 = 65_536;
/// What the four preallocated binding maps may cost together.
const MEMORY_BUDGET: u64 = 64 << 20;

/// The `i`-th distinct IPv4 binding: distinct client keys and peer keys.
fn nth(i: u32) -> proto::v1::ChannelBinding {
    let client = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2 + (i / 60_000) as u8)),
        1 + (i % 60_000) as u16,
    );
    let peer = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2 + (i / 60_000) as u8)),
        1 + (i % 60_000) as u16,
    );
    binding(client, 0x4000 + (i % 0x4000) as u16, peer, 50_000)
}

/// The `i`-th distinct IPv6 binding, as [`nth`].
fn nth_v6(i: u32) -> ChannelBinding {
    let host = 2 + (i / 60_000) as u16;
    let port = 1 + (i % 60_000) as u16;
    let client = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, host)),
        port,
    );
    let peer = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, host)),
        port,
    );
    binding(client, 0x4000 + (i % 0x4000) as u16, peer, 50_000)
}

/// The memlock of a pinned map, from bpftool's JSON.
fn memlock(pin: &std::path::Path) -> u64 {
    let output = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text.find("\"bytes_memlock\":").unwrap() + "\"bytes_memlock\":".len();
    text[start..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn full_maps_refuse_new_bindings_and_keep_the_installed_ones() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&["--xdp-mode", "native"]))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();

    let mut total = 0;
    for batch in (0..CAPACITY).collect::<Vec<_>>().chunks(4096) {
        total = agent
            .install(batch.iter().map(|&i| nth(i)).collect())
            .unwrap();
    }
    assert_eq!(total, u64::from(CAPACITY));

    let refused = agent
        .install(vec![nth(CAPACITY), nth(CAPACITY + 1)])
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "{}",
        refused.message()
    );
    assert!(refused.message().contains("full"), "{}", refused.message());
    // Nothing evicted, nothing half-written.
    let listed = bare(agent.list().unwrap());
    assert_eq!(listed.len(), CAPACITY as usize);
    assert!(listed.contains(&bare([nth(0)])[0]));
    // Replacing an installed binding still works when full.
    assert_eq!(agent.install(vec![nth(7)]).unwrap(), u64::from(CAPACITY));
    // Room again after a removal.
    assert_eq!(agent.remove(vec![nth(0)]).unwrap(), 1);
    assert_eq!(
        agent.install(vec![nth(CAPACITY)]).unwrap(),
        u64::from(CAPACITY)
    );

    let maps = ["CLIENT_V4", "CLIENT_V6", "PEER_V4", "PEER_V6"];
    let bytes: u64 = maps
        .iter()
        .map(|name| memlock(&lab.pin_dir().join(name)))
        .sum();
    eprintln!(
        "binding maps: {} MiB of kernel memory for {CAPACITY} bindings per map",
        bytes >> 20
    );
    assert!(
        bytes <= MEMORY_BUDGET,
        "the binding maps take {bytes} bytes"
    );
}

/// Entries of the four binding maps as (map, key, value without expiry).
type Content = BTreeSet<(&'static str, Vec<u8>, Vec<u8>)>;

/// What the four binding maps hold, and the range of their expiries.
fn maps_content(lab: &Lab) -> (Content, (u64, u64)) {
    let mut content = BTreeSet::new();
    let (mut earliest, mut latest) = (u64::MAX, 0);
    for name in ["CLIENT_V4", "CLIENT_V6", "PEER_V4", "PEER_V6"] {
        for entry in agent::map_entries(&lab.pin_dir(), name).unwrap() {
            earliest = earliest.min(entry.expires_at_ns);
            latest = latest.max(entry.expires_at_ns);
            content.insert((name, entry.key, entry.value));
        }
    }
    (content, (earliest, latest))
}

/// What the maps must hold for `set`: both entries of each binding.
fn expected_content(set: &[ChannelBinding]) -> Content {
    let mut content = BTreeSet::new();
    for bound in set {
        let v6 = bound.client.starts_with('[');
        let peer_v6 = bound.peer.starts_with('[');
        let [client, peer] = agent::entries_of(bound, 0).unwrap();
        let client_map = if v6 { "CLIENT_V6" } else { "CLIENT_V4" };
        let peer_map = if peer_v6 { "PEER_V6" } else { "PEER_V4" };
        content.insert((client_map, client.key, client.value));
        content.insert((peer_map, peer.key, peer.value));
    }
    content
}

/// How long the agent's sweeps of expired bindings took, in microseconds,
/// from its debug log.
fn sweep_times(lab: &Lab) -> Vec<u64> {
    lab.log("xdp-agent")
        .lines()
        .filter(|line| line.contains("expired bindings swept"))
        .filter_map(|line| {
            let at = line.find("took_us=")? + "took_us=".len();
            line[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// 65 000 IPv4 and 65 000 IPv6 bindings in one streamed Sync (parts of
/// `proto::SYNC_PART_BINDINGS`, one generation): all installed, both
/// directions, until the Sync's clock plus their lifetime. A second Sync of
/// another 130 000, half of them the first set's, converges: the maps hold
/// exactly its entries, with no orphan.
#[test]
fn a_streamed_sync_of_130_000_bindings_installs_them_and_another_converges() {
    if !tests::privileged() {
        return;
    }
    const PER_FAMILY: u32 = 65_000;
    let mut lab = Lab::new().unwrap();
    // The sweep's timing at debug level, without a line per binding.
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&[
            "--xdp-mode",
            "native",
            "--log-level",
            "info,xdp_agent=debug,xdp_agent::maps=info",
        ]))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    let set = |from: u32| -> Vec<ChannelBinding> {
        (from..from + PER_FAMILY)
            .map(nth)
            .chain((from..from + PER_FAMILY).map(nth_v6))
            .collect()
    };
    let lifetime = u64::try_from(LIFETIME.as_nanos()).unwrap();

    let first = set(0);
    let before = kernel_clock_ns();
    let started = Instant::now();
    let synced = agent.sync(1, &first).unwrap();
    let took = started.elapsed();
    let after = kernel_clock_ns();
    eprintln!("Sync of {} new bindings: {took:?}", first.len());
    assert_eq!(
        (
            synced.added,
            synced.removed,
            synced.installed,
            synced.refused
        ),
        (130_000, 0, 130_000, 0),
        "{:?}",
        synced.refusals
    );
    let health = agent.health().unwrap();
    assert_eq!((health.installed, health.generation), (130_000, 1));
    let (content, (earliest, latest)) = maps_content(&lab);
    assert!(
        content == expected_content(&first),
        "the maps differ from the set"
    );
    assert!(before + lifetime <= earliest && latest <= after + lifetime);

    let started = Instant::now();
    let listed = agent.list().unwrap();
    eprintln!(
        "ListChannelBindings of {}: {:?}",
        listed.len(),
        started.elapsed()
    );
    assert_eq!(listed.len(), 130_000);

    // Every binding's usage, as turn-control polls it every 2 s: one
    // streamed answer in parts, each binding with its (zero) figures.
    let started = Instant::now();
    let usage = agent.usage().unwrap();
    eprintln!("ListUsage of {}: {:?}", usage.len(), started.elapsed());
    assert_eq!(usage.len(), 130_000);
    assert!(usage.iter().all(|binding| binding.usage.is_some()));

    // Half kept, half new, in the other order of families.
    let second: Vec<ChannelBinding> = set(PER_FAMILY / 2).into_iter().rev().collect();
    let started = Instant::now();
    let synced = agent.sync(2, &second).unwrap();
    eprintln!(
        "Sync of {} bindings, half of them new: {:?}",
        second.len(),
        started.elapsed()
    );
    assert_eq!(
        (
            synced.added,
            synced.removed,
            synced.installed,
            synced.refused
        ),
        (65_000, 65_000, 130_000, 0)
    );
    assert_eq!(agent.health().unwrap().generation, 2);
    let (content, _) = maps_content(&lab);
    assert!(
        content == expected_content(&second),
        "the maps differ from the set"
    );
    assert_eq!(bare(agent.list().unwrap()), bare(second));

    // Sweeps ran over the full maps meanwhile (one a second).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut times = sweep_times(&lab);
    while times.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        times = sweep_times(&lab);
    }
    eprintln!("sweeps (us, the last at 130 000 bindings): {times:?}");
}

/// A Sync of more bindings of a family than its maps hold installs the
/// first 65 536 and refuses the rest, saying why.
#[test]
fn a_sync_beyond_a_familys_capacity_installs_what_fits_and_refuses_the_rest() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&["--xdp-mode", "native"]))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    let set: Vec<ChannelBinding> = (0..CAPACITY + 10).map(nth).collect();
    let synced = agent.sync(9, &set).unwrap();
    assert_eq!(
        (synced.added, synced.installed, synced.refused),
        (u64::from(CAPACITY), u64::from(CAPACITY), 10)
    );
    assert_eq!(synced.refusals.len(), 8);
    let first = &synced.refusals[0];
    assert!(
        first.starts_with(&format!("bindings[{CAPACITY}]: ")) && first.contains("full"),
        "{first}"
    );
    let listed = bare(agent.list().unwrap());
    assert_eq!(listed, bare(set[..CAPACITY as usize].to_vec()));
    for name in ["CLIENT_V4", "PEER_V4"] {
        let entries = agent::map_entries(&lab.pin_dir(), name).unwrap();
        assert_eq!(entries.len(), CAPACITY as usize, "{name}");
    }
    assert_eq!(agent.health().unwrap().generation, 9);
}
