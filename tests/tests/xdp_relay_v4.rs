//! The first channel-data packet through the real XDP program and the real
//! `xdp-agent`: relayed with correct checksums (checked independently on the
//! captured frame) until its binding is removed.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use proto::v1::ChannelBinding;
use tests::agent::{Agent, binding};
use tests::packet::{Capture, channel_data};
use tests::{CLIENT_V4, Lab, PEER_V4, RELAY_V4, wait_for};

const LISTEN_PORT: u16 = 3478;
const ALLOCATION_PORT: u16 = 50_000;
const CHANNEL: u16 = 0x4001;
const DEADLINE: Duration = Duration::from_secs(5);
/// The binding's lifetime: far beyond the test.
const LIFETIME_MS: u32 = 600_000;

#[test]
fn channel_data_is_relayed_in_the_kernel_until_the_binding_is_removed() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&[
            "--xdp-mode",
            "native",
            "--listen",
            "203.0.113.10:3478",
            "--ports",
            "49152-65535",
        ])
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();

    let client = lab
        .client
        .enter(|| Ok(UdpSocket::bind((CLIENT_V4, 0))?))
        .unwrap();
    let peer = lab
        .peer
        .enter(|| Ok(UdpSocket::bind((PEER_V4, 0))?))
        .unwrap();
    let capture = lab.peer.enter(|| Capture::open("p0")).unwrap();
    peer.set_read_timeout(Some(DEADLINE)).unwrap();
    let peer_address = peer.local_addr().unwrap();

    let bound = ChannelBinding {
        lifetime_ms: LIFETIME_MS,
        ..binding(
            client.local_addr().unwrap(),
            CHANNEL,
            peer_address,
            ALLOCATION_PORT,
        )
    };
    assert_eq!(agent.install(vec![bound.clone()]).unwrap(), 1);
    // Listed with what is left of its lifetime.
    let listed = agent.list().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        (1..=LIFETIME_MS).contains(&listed[0].lifetime_ms),
        "{listed:?}"
    );
    // And with what it relayed so far: nothing.
    assert_eq!(
        listed[0].usage,
        Some(tests::agent::usage((0, 0), (0, 0), (0, 0), (0, 0)))
    );
    assert_eq!(
        ChannelBinding {
            lifetime_ms: LIFETIME_MS,
            usage: None,
            ..listed[0].clone()
        },
        bound
    );

    // Relayed: exactly the payload, from the relay's allocation port.
    let relayed_before = agent.counter("relay_client_to_peer_v4_v4").unwrap();
    let payload = b"channel data relayed by XDP, checksums and all";
    client
        .send_to(&channel_data(CHANNEL, payload), (RELAY_V4, LISTEN_PORT))
        .unwrap();
    let mut buffer = [0u8; 2048];
    let (len, from) = peer
        .recv_from(&mut buffer)
        .expect("the peer received nothing");
    assert_eq!(&buffer[..len], payload);
    assert_eq!(from, SocketAddr::from((RELAY_V4, ALLOCATION_PORT)));

    // The frame as it arrived, checked independently: IPv4 header and UDP
    // checksums recomputed from scratch by `parse_udp_v4`.
    let frame = capture
        .next_udp_v4(DEADLINE, |frame| {
            SocketAddr::V4(frame.destination) == peer_address
        })
        .unwrap();
    assert_eq!(frame.payload, payload);
    assert_eq!(
        SocketAddr::V4(frame.source),
        SocketAddr::from((RELAY_V4, ALLOCATION_PORT))
    );
    assert_ne!(
        frame.udp_checksum, 0,
        "the client sent a checksum, so must the relay"
    );

    let relayed_after = agent.counter("relay_client_to_peer_v4_v4").unwrap();
    assert_eq!(relayed_after.0, relayed_before.0 + 1);
    assert_eq!(relayed_after.1, relayed_before.1 + payload.len() as u64);

    // Removed: the same traffic goes to the stack and no longer reaches the peer.
    assert_eq!(agent.remove(vec![bound]).unwrap(), 1);
    assert!(agent.list().unwrap().is_empty());
    let unknown_before = agent.counter("pass_unknown_binding").unwrap().0;
    client
        .send_to(
            &channel_data(CHANNEL, b"after removal"),
            (RELAY_V4, LISTEN_PORT),
        )
        .unwrap();
    wait_for(
        "the kernel to pass the unbound channel data",
        DEADLINE,
        || Ok((agent.counter("pass_unknown_binding")?.0 > unknown_before).then_some(())),
    )
    .unwrap();
    assert_eq!(
        agent.counter("relay_client_to_peer_v4_v4").unwrap(),
        relayed_after
    );
    peer.set_nonblocking(true).unwrap();
    let error = peer
        .recv_from(&mut buffer)
        .expect_err("the peer received data after the removal");
    assert_eq!(error.kind(), ErrorKind::WouldBlock);
}
