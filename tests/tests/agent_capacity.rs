//! The binding maps hold 65 536 bindings per direction and family, cost a
//! bounded amount of kernel memory, and when full the agent says so instead
//! of evicting a live binding.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tests::Lab;
use tests::agent::{Agent, binding};
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
    let socket = lab.start_xdp_agent(&["--xdp-mode", "native"]).unwrap();
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
    assert_eq!(agent.list().unwrap().len(), CAPACITY as usize);
    assert!(agent.list().unwrap().contains(&nth(0)));
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
