//! The IPv4 client->peer path through the real XDP program and the real
//! `xdp-agent`, with real sockets in network namespaces.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use lab::packet::Capture;
use lab::{CLIENT_V4, Lab, PEER_V4, RELAY_V4, wait_for};
use proto::v1::{
    AddChannelBindingRequest, ChannelBinding, CountersRequest, ListChannelBindingsRequest,
    RemoveChannelBindingRequest,
};

const LISTEN_PORT: u16 = 3478;
const ALLOCATION_PORT: u16 = 50_000;
const CHANNEL: u16 = 0x4001;
const DEADLINE: Duration = Duration::from_secs(5);

fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut message = channel.to_be_bytes().to_vec();
    message.extend_from_slice(&(data.len() as u16).to_be_bytes());
    message.extend_from_slice(data);
    message
}

/// (packets, bytes) of one counter.
fn counter(
    runtime: &tokio::runtime::Runtime,
    grpc: &mut proto::DataPlaneClient,
    reason: &str,
) -> (u64, u64) {
    let counters = runtime
        .block_on(grpc.counters(CountersRequest {}))
        .unwrap()
        .into_inner();
    let counter = counters
        .counters
        .iter()
        .find(|c| c.reason == reason)
        .unwrap();
    (counter.packets, counter.bytes)
}

#[test]
fn channel_data_is_relayed_in_the_kernel_until_the_binding_is_removed() {
    if !lab::privileged() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&[
            "--xdp-mode",
            "native",
            "--listen-port",
            "3478",
            "--ports",
            "49152-65535",
        ])
        .unwrap();
    let mut grpc = runtime.block_on(proto::connect(socket)).unwrap();

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

    let binding = ChannelBinding {
        client: client.local_addr().unwrap().to_string(),
        channel: u32::from(CHANNEL),
        peer: peer_address.to_string(),
        allocation_port: u32::from(ALLOCATION_PORT),
    };
    let added = runtime
        .block_on(grpc.add_channel_binding(AddChannelBindingRequest {
            bindings: vec![binding.clone()],
        }))
        .unwrap()
        .into_inner();
    assert_eq!(added.installed, 1);
    let listed = runtime
        .block_on(grpc.list_channel_bindings(ListChannelBindingsRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(listed.bindings, vec![binding.clone()]);

    // Relayed: exactly the payload, from the relay's allocation port.
    let relayed_before = counter(&runtime, &mut grpc, "relay_client_to_peer_v4_v4");
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

    let relayed_after = counter(&runtime, &mut grpc, "relay_client_to_peer_v4_v4");
    assert_eq!(relayed_after.0, relayed_before.0 + 1);
    assert_eq!(relayed_after.1, relayed_before.1 + payload.len() as u64);

    // Removed: the same traffic goes to the stack and no longer reaches the peer.
    let removed = runtime
        .block_on(grpc.remove_channel_binding(RemoveChannelBindingRequest {
            bindings: vec![binding],
        }))
        .unwrap()
        .into_inner();
    assert_eq!(removed.removed, 1);
    let unknown_before = counter(&runtime, &mut grpc, "pass_unknown_binding").0;
    client
        .send_to(
            &channel_data(CHANNEL, b"after removal"),
            (RELAY_V4, LISTEN_PORT),
        )
        .unwrap();
    wait_for(
        "the kernel to pass the unbound channel data",
        DEADLINE,
        || {
            Ok(
                (counter(&runtime, &mut grpc, "pass_unknown_binding").0 > unknown_before)
                    .then_some(()),
            )
        },
    )
    .unwrap();
    assert_eq!(
        counter(&runtime, &mut grpc, "relay_client_to_peer_v4_v4"),
        relayed_after
    );
    peer.set_nonblocking(true).unwrap();
    let error = peer
        .recv_from(&mut buffer)
        .expect_err("the peer received data after the removal");
    assert_eq!(error.kind(), ErrorKind::WouldBlock);
}
