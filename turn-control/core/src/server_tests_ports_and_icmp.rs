//! EVEN-PORT with the R bit and RESERVATION-TOKEN, DONT-FRAGMENT (RFC 8656 §7.2) and ICMP
//! relaying (RFC 8656 §11.5), through the harness of `server_tests.rs`.

use std::collections::HashSet;

use super::*;
use crate::config::{RESERVATION_LIFETIME, RESERVATIONS_PER_USER};
use crate::icmp::ATTR_ICMP;

/// EVEN-PORT with the R bit set or not.
pub(super) fn even_port(b: &mut Builder, reserve: bool) {
    b.raw(ATTR_EVEN_PORT, &[if reserve { 0x80 } else { 0x00 }]);
}

pub(super) fn reservation_token(b: &mut Builder, token: &[u8]) {
    b.raw(ATTR_RESERVATION_TOKEN, token);
}

/// An Allocate with EVEN-PORT R=1 that succeeds: the relayed address and the token.
pub(super) fn reserve_pair(h: &mut Harness, c: &mut Client) -> (RelayAddr, Vec<u8>) {
    let resp = h.allocate_with(c, |b| even_port(b, true));
    assert!(resp.is_success(), "{:?}", resp.code());
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    (relay, resp.attr(ATTR_RESERVATION_TOKEN).unwrap())
}

/// `relay` one port up.
pub(super) fn next_port(relay: RelayAddr) -> RelayAddr {
    RelayAddr(SocketAddr::new(relay.0.ip(), relay.0.port() + 1))
}

fn bind(relay: RelayAddr, dont_fragment: bool) -> Command {
    Command::BindRelayPort {
        relay,
        dont_fragment,
    }
}

pub(super) fn reserve(relay: RelayAddr, dont_fragment: bool) -> Command {
    Command::ReservePort {
        relay,
        dont_fragment,
    }
}

pub(super) fn adopt(relay: RelayAddr, dont_fragment: bool) -> Command {
    Command::AdoptReservedPort {
        relay,
        dont_fragment,
    }
}

// ---- EVEN-PORT and RESERVATION-TOKEN --------------------------------------------------------

#[test]
fn even_port_with_r_reserves_the_next_port_under_a_token() {
    let mut h = Harness::new();
    let mut rtp = Client::new("192.0.2.1:5000", "alice", "alice-pw");
    let resp = h.allocate_with(&mut rtp, |b| {
        // As turnutils_uclient asks.
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0]);
        even_port(b, true);
    });
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(resp.integrity_ok(&rtp.key));
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    assert_eq!(relay.0.port() % 2, 0);
    let token = resp.attr(ATTR_RESERVATION_TOKEN).unwrap();
    assert_eq!(token.len(), 8);
    let reserved = next_port(relay);
    assert_eq!(
        h.take_commands(),
        vec![bind(relay, false), reserve(reserved, false)]
    );
    assert_eq!(h.server.stats().reservations_active, 1);
    // Nothing arriving at the reserved port goes anywhere.
    assert!(h.peer_send(reserved, PEER, b"early").is_empty());

    // The RTCP socket of the same client: another 5-tuple, the same user.
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = h.allocate_with(&mut rtcp, |b| reservation_token(b, &token));
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(resp.integrity_ok(&rtcp.key));
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS), vec![reserved.0]);
    assert_eq!(resp.attr(ATTR_RESERVATION_TOKEN), None);
    // Its socket is the one bound for the reservation.
    assert_eq!(h.take_commands(), vec![adopt(reserved, false)]);
    assert_eq!(h.server.stats().reservations_active, 0);
    assert_eq!(h.server.config.reservations.total(), 0);
    assert_eq!(h.server.allocation_count(), 2);
    assert_eq!(
        h.server.stats().responses_for(RequestMethod::Allocate, 200),
        2
    );

    // The port relays for its new allocation.
    assert!(h.permit(&mut rtcp, PEER).is_success());
    assert_eq!(h.peer_send(reserved, PEER, b"rtcp").len(), 1);

    // Single use.
    let mut again = Client::new("192.0.2.1:5002", "alice", "alice-pw");
    let resp = h.allocate_with(&mut again, |b| reservation_token(b, &token));
    assert_eq!(resp.code(), Some(508));
    assert!(resp.integrity_ok(&again.key));
    assert_eq!(h.server.allocation_count(), 2);
}

#[test]
fn a_retransmitted_reserving_allocate_gets_the_same_token() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.login(&mut c);
    let txid = c.next_txid();
    let req = c.request_with_txid(METHOD_ALLOCATE, txid, |b| {
        udp_transport(b);
        even_port(b, true);
    });
    let first = h.call(&c, &req);
    h.take_commands();
    let again = h.call(&c, &req);
    assert!(again.is_success());
    assert_eq!(
        again.attr(ATTR_RESERVATION_TOKEN),
        first.attr(ATTR_RESERVATION_TOKEN)
    );
    assert!(h.take_commands().is_empty());
    assert_eq!(h.server.stats().reservations_active, 1);
}

#[test]
fn a_reservation_token_works_for_its_user_only() {
    let mut h = Harness::new();
    let mut alice = Client::alice();
    let (relay, token) = reserve_pair(&mut h, &mut alice);
    // Another user holding the token gets what an unknown token gets, and the token stays.
    let mut bob = Client::new("192.0.2.2:5000", "bob", "bob-pw");
    let resp = h.allocate_with(&mut bob, |b| reservation_token(b, &token));
    assert_eq!(resp.code(), Some(508));
    let mut forged = token.clone();
    forged[0] ^= 1;
    let mut alice2 = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = h.allocate_with(&mut alice2, |b| reservation_token(b, &forged));
    assert_eq!(resp.code(), Some(508));
    let resp = h.allocate_with(&mut alice2, |b| reservation_token(b, &token));
    assert_eq!(
        resp.addresses(ATTR_XOR_RELAYED_ADDRESS),
        vec![next_port(relay).0]
    );
}

#[test]
fn an_unused_reservation_expires_frees_its_port_and_voids_its_token() {
    let mut h = Harness::with(|c| c.port_range = 50000..=50001);
    let mut alice = Client::alice();
    let (relay, token) = reserve_pair(&mut h, &mut alice);
    assert_eq!(relay.port(), AllocationPort(50000));
    h.take_commands();
    // The reserved port is nobody else's meanwhile.
    let mut bob = Client::new("192.0.2.2:5000", "bob", "bob-pw");
    assert_eq!(h.allocate_with(&mut bob, |_| {}).code(), Some(508));

    h.advance(RESERVATION_LIFETIME - Duration::from_secs(1));
    assert!(h.take_commands().is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(
        h.take_commands(),
        vec![Command::ReleaseReservedPort {
            relay: next_port(relay)
        }]
    );
    assert_eq!(h.server.stats().reservations_active, 0);
    let mut alice2 = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = h.allocate_with(&mut alice2, |b| reservation_token(b, &token));
    assert_eq!(resp.code(), Some(508));
    // The port is free again.
    assert_eq!(h.allocate(&mut bob).port(), AllocationPort(50001));
    // The allocation that made the reservation is untouched.
    assert_eq!(h.server.allocation_count(), 2);
}

#[test]
fn the_reservation_outlives_the_allocation_that_made_it() {
    let mut h = Harness::new();
    let mut rtp = Client::alice();
    let (relay, token) = reserve_pair(&mut h, &mut rtp);
    h.take_commands();
    let req = refresh_for(&mut rtp, 0);
    assert!(h.call(&rtp, &req).is_success());
    assert_eq!(h.take_commands(), vec![Command::FreeRelayPort { relay }]);
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = h.allocate_with(&mut rtcp, |b| reservation_token(b, &token));
    assert_eq!(
        resp.addresses(ATTR_XOR_RELAYED_ADDRESS),
        vec![next_port(relay).0]
    );
}

#[test]
fn even_port_without_r_gives_an_even_port_and_no_token() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |b| even_port(b, false));
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    assert_eq!(relay.0.port() % 2, 0);
    assert_eq!(resp.attr(ATTR_RESERVATION_TOKEN), None);
    assert_eq!(h.take_commands(), vec![bind(relay, false)]);
    assert_eq!(h.server.stats().reservations_active, 0);
    // The bits besides R are ignored (RFC 8656 §18.7).
    let mut c = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_EVEN_PORT, &[0x7F]);
    });
    assert_eq!(resp.attr(ATTR_RESERVATION_TOKEN), None);
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0].port() % 2, 0);
}

#[test]
fn contradicting_or_malformed_reservation_requests_get_400() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    let mut alice = Client::alice();
    let (_, token) = reserve_pair(&mut h, &mut alice);
    let mut c = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let with_token = |h: &mut Harness, c: &mut Client, f: fn(&mut Builder)| {
        let token = token.clone();
        h.allocate_with(c, move |b| {
            reservation_token(b, &token);
            f(b);
        })
        .code()
    };
    assert_eq!(
        with_token(&mut h, &mut c, |b| even_port(b, false)),
        Some(400)
    );
    assert_eq!(
        with_token(&mut h, &mut c, |b| {
            b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0]);
        }),
        Some(400)
    );
    assert_eq!(
        with_token(&mut h, &mut c, |b| {
            b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        }),
        Some(400)
    );
    let short = h.allocate_with(&mut c, |b| reservation_token(b, &token[..7]));
    assert_eq!(short.code(), Some(400));
    // A reservation is for one family.
    let resp = h.allocate_with(&mut c, |b| {
        even_port(b, true);
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(resp.code(), Some(400));
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_EVEN_PORT, &[0x80, 0]);
    });
    assert_eq!(resp.code(), Some(400));
    // None of that used the token up.
    let resp = h.allocate_with(&mut c, |b| reservation_token(b, &token));
    assert!(resp.is_success(), "{:?}", resp.code());
}

#[test]
fn an_ipv6_allocation_reserves_on_ipv6() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    let mut rtp = Client::alice();
    let resp = h.allocate_with(&mut rtp, |b| {
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        even_port(b, true);
    });
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    assert_eq!(relay.family(), Family::V6);
    let token = resp.attr(ATTR_RESERVATION_TOKEN).unwrap();
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = h.allocate_with(&mut rtcp, |b| reservation_token(b, &token));
    assert_eq!(
        resp.addresses(ATTR_XOR_RELAYED_ADDRESS),
        vec![next_port(relay).0]
    );
}

#[test]
fn no_free_even_odd_pair_gives_508() {
    // 50001 is odd and 50002 has no neighbour in the range: no pair at all.
    let mut h = Harness::with(|c| c.port_range = 50001..=50002);
    let mut c = Client::alice();
    assert_eq!(
        h.allocate_with(&mut c, |b| even_port(b, true)).code(),
        Some(508)
    );
    // An even port alone there is.
    let resp = h.allocate_with(&mut c, |b| even_port(b, false));
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0].port(), 50002);

    // One pair, half taken.
    let mut h = Harness::with(|c| c.port_range = 50000..=50001);
    let mut a = Client::new("192.0.2.1:1", "alice", "alice-pw");
    h.allocate(&mut a);
    let mut b = Client::new("192.0.2.1:2", "alice", "alice-pw");
    assert_eq!(
        h.allocate_with(&mut b, |b| even_port(b, true)).code(),
        Some(508)
    );
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(h.server.stats().reservations_active, 0);
    assert_eq!(
        h.server.stats().responses_for(RequestMethod::Allocate, 508),
        1
    );
}

#[test]
fn reservations_are_bounded_per_user_and_in_total() {
    let mut h = Harness::with(|c| c.max_reservations = RESERVATIONS_PER_USER + 1);
    for i in 0..RESERVATIONS_PER_USER {
        let mut c = Client::new(&format!("192.0.2.1:{}", 1000 + i), "alice", "alice-pw");
        reserve_pair(&mut h, &mut c);
    }
    let mut c = Client::new("192.0.2.1:2000", "alice", "alice-pw");
    assert_eq!(
        h.allocate_with(&mut c, |b| even_port(b, true)).code(),
        Some(508)
    );
    // Without R she still gets an allocation.
    assert!(
        h.allocate_with(&mut c, |b| even_port(b, false))
            .is_success()
    );
    let mut bob = Client::new("192.0.2.2:1", "bob", "bob-pw");
    reserve_pair(&mut h, &mut bob);
    let mut bob2 = Client::new("192.0.2.2:2", "bob", "bob-pw");
    assert_eq!(
        h.allocate_with(&mut bob2, |b| even_port(b, true)).code(),
        Some(508)
    );
    assert_eq!(
        h.server.stats().reservations_active,
        RESERVATIONS_PER_USER as u64 + 1
    );
    // Expiry gives them back.
    h.advance(RESERVATION_LIFETIME);
    assert_eq!(h.server.stats().reservations_active, 0);
    reserve_pair(&mut h, &mut bob2);
}

#[test]
fn the_success_waits_for_the_reserved_socket_and_a_failed_pair_moves() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.login(&mut c);
    let req = c.request(METHOD_ALLOCATE, |b| {
        udp_transport(b);
        even_port(b, true);
    });
    h.server
        .handle_client(h.now, c.transport, sa(LISTEN), c.addr, &req);
    let (
        Some(Command::BindRelayPort { relay: first, .. }),
        Some(Command::ReservePort { relay: odd, .. }),
        None,
    ) = (
        h.server.poll_command(),
        h.server.poll_command(),
        h.server.poll_command(),
    )
    else {
        panic!("a bind and a reservation expected");
    };
    assert_eq!(odd, next_port(first));
    h.server.relay_bound(h.now, first);
    // The allocation's socket alone does not release the success.
    assert_eq!(h.server.poll_transmit(), None);
    h.server.relay_bind_failed(odd);
    // The bound even socket goes, the pair moves.
    let mut moved = Vec::new();
    while let Some(command) = h.server.poll_command() {
        moved.push(command);
    }
    let [
        Command::FreeRelayPort { relay: freed },
        Command::BindRelayPort { relay: even, .. },
        Command::ReservePort {
            relay: reserved, ..
        },
    ] = moved.as_slice()
    else {
        panic!("unexpected {moved:?}");
    };
    assert_eq!(*freed, first);
    assert_eq!(even.0.port() % 2, 0);
    assert_ne!(*even, first);
    assert_eq!(*reserved, next_port(*even));
    // Reserved socket first this time: still waiting for the even one.
    h.server.relay_bound(h.now, *reserved);
    assert_eq!(h.server.poll_transmit(), None);
    h.server.relay_bound(h.now, *even);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    let resp = Resp(out[0].payload().to_vec());
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS), vec![even.0]);
    let token = resp.attr(ATTR_RESERVATION_TOKEN).unwrap();
    // The old odd port holds nothing; the new one the reservation.
    assert!(!h.server.by_port.contains_key(&odd.port()));
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = h.allocate_with(&mut rtcp, |b| reservation_token(b, &token));
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS), vec![reserved.0]);
}

#[test]
fn a_reserved_socket_lost_after_the_success_voids_the_token_only() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let (relay, token) = reserve_pair(&mut h, &mut c);
    h.take_commands();
    h.server.relay_bind_failed(next_port(relay));
    assert_eq!(
        h.take_commands(),
        vec![Command::ReleaseReservedPort {
            relay: next_port(relay)
        }]
    );
    assert_eq!(h.server.allocation_count(), 1);
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = h.allocate_with(&mut rtcp, |b| reservation_token(b, &token));
    assert_eq!(resp.code(), Some(508));
}

#[test]
fn a_reserving_allocate_whose_client_goes_takes_its_reservation_along() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    c.transport = Transport::Tcp;
    h.login(&mut c);
    let req = c.request(METHOD_ALLOCATE, |b| {
        udp_transport(b);
        even_port(b, true);
    });
    h.server
        .handle_client(h.now, c.transport, sa(LISTEN), c.addr, &req);
    // The TCP connection closes before the daemon bound anything.
    h.server
        .handle_client_closed(c.transport, sa(LISTEN), c.addr);
    let commands: Vec<Command> = std::iter::from_fn(|| h.server.poll_command()).collect();
    assert!(
        !commands
            .iter()
            .any(|c| matches!(c, Command::BindRelayPort { relay, .. } if relay.0.port() % 2 == 1)),
        "{commands:?}"
    );
    assert_eq!(h.server.stats().reservations_active, 0);
    assert!(h.server.by_port.is_empty());
    assert_eq!(h.server.poll_timeout(), None);
}

#[test]
fn shutdown_frees_reserved_ports() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let (relay, _) = reserve_pair(&mut h, &mut c);
    h.take_commands();
    h.server.shutdown();
    let commands = h.take_commands();
    assert!(commands.contains(&Command::FreeRelayPort { relay }));
    assert!(commands.contains(&Command::ReleaseReservedPort {
        relay: next_port(relay)
    }));
    assert_eq!(h.server.stats().reservations_active, 0);
    assert_eq!(h.server.config.reservations.total(), 0);
    assert!(h.server.by_port.is_empty());
}

// ---- DONT-FRAGMENT ----------------------------------------------------------------------------

#[test]
fn dont_fragment_reaches_the_relay_socket_and_the_data_plane() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_DONT_FRAGMENT, &[]);
    });
    assert!(resp.is_success(), "{:?}", resp.code());
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    assert_eq!(h.take_commands(), vec![bind(relay, true)]);
    let out = h.bind(&mut c, 0x4000, PEER);
    assert!(out.is_empty());
    let installed = h
        .take_commands()
        .into_iter()
        .find_map(|c| match c {
            Command::InstallChannel { binding, .. } => Some(binding),
            _ => None,
        })
        .unwrap();
    assert!(installed.dont_fragment);
    assert_eq!(
        installed,
        ChannelBinding {
            dont_fragment: true,
            ..channel_binding(&c, relay, 0x4000, PEER)
        }
    );
    h.server.channel_installed(h.now, &installed, Ok(()));
    assert_eq!(h.drain().len(), 1);
    assert!(h.server.channel_bindings().all(|(b, _)| b.dont_fragment));

    // Without it, nothing is set.
    let mut c2 = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let relay2 = h.allocate(&mut c2);
    assert_eq!(h.take_commands(), vec![bind(relay2, false)]);
    let resp = h.bind_acked(&mut c2, 0x4000, PEER);
    assert!(resp.is_success());
    assert!(
        h.server
            .channel_bindings()
            .all(|(b, _)| b.dont_fragment == (b.relay == relay))
    );
}

#[test]
fn dont_fragment_with_a_value_gets_400() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_DONT_FRAGMENT, &[0, 0, 0, 0]);
    });
    assert_eq!(resp.code(), Some(400));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn a_reserved_socket_is_adopted_with_the_dont_fragment_of_the_allocate_that_takes_it() {
    let mut h = Harness::new();
    let mut rtp = Client::alice();
    let resp = h.allocate_with(&mut rtp, |b| {
        even_port(b, true);
        b.raw(ATTR_DONT_FRAGMENT, &[]);
    });
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    let token = resp.attr(ATTR_RESERVATION_TOKEN).unwrap();
    let reserved = next_port(relay);
    assert_eq!(
        h.take_commands(),
        vec![bind(relay, true), reserve(reserved, true)]
    );
    // The RTCP Allocate does not ask for DONT-FRAGMENT: the socket is adopted without it (the
    // daemon clears the option), and the success follows the adoption.
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    h.login(&mut rtcp);
    let req = rtcp.request(METHOD_ALLOCATE, |b| {
        udp_transport(b);
        reservation_token(b, &token);
    });
    h.server
        .handle_client(h.now, rtcp.transport, sa(LISTEN), rtcp.addr, &req);
    assert_eq!(h.server.poll_transmit(), None);
    assert_eq!(h.server.poll_command(), Some(adopt(reserved, false)));
    assert_eq!(h.server.poll_command(), None);
    h.server.relay_bound(h.now, reserved);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    let resp = Resp(out[0].payload().to_vec());
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS), vec![reserved.0]);
}

#[test]
fn a_reserved_socket_that_cannot_be_adopted_gets_508() {
    let mut h = Harness::new();
    let mut rtp = Client::alice();
    let (relay, token) = reserve_pair(&mut h, &mut rtp);
    h.take_commands();
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    h.login(&mut rtcp);
    let req = rtcp.request(METHOD_ALLOCATE, |b| {
        udp_transport(b);
        reservation_token(b, &token);
    });
    h.server
        .handle_client(h.now, rtcp.transport, sa(LISTEN), rtcp.addr, &req);
    let reserved = next_port(relay);
    assert_eq!(h.server.poll_command(), Some(adopt(reserved, false)));
    // Gone and its port taken: the token names this one address, so no other port is tried.
    h.server.relay_bind_failed(reserved);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(Resp(out[0].payload().to_vec()).code(), Some(508));
    assert!(h.take_commands().is_empty());
    assert_eq!(h.server.allocation_count(), 1);
    assert!(!h.server.by_port.contains_key(&reserved.port()));
    assert_eq!(h.server.config.quotas.user("alice"), 1);
}

// ---- ICMP -------------------------------------------------------------------------------------

fn frag_needed(mtu: u32) -> Icmp {
    Icmp {
        icmp_type: Icmp::V4_DESTINATION_UNREACHABLE,
        code: Icmp::V4_FRAGMENTATION_NEEDED,
        error_data: mtu,
    }
}

fn icmp(h: &mut Harness, relay: RelayAddr, peer: &str, icmp: Icmp) -> Vec<Transmit> {
    h.server.handle_icmp(h.now, relay, PeerAddr(sa(peer)), icmp);
    h.drain()
}

#[test]
fn an_icmp_error_reaches_a_permitted_client_as_a_data_indication() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.permit(&mut c, PEER).is_success());
    let out = icmp(&mut h, relay, PEER, frag_needed(1400));
    assert_eq!(out.len(), 1);
    let Transmit::ToClient {
        client,
        server,
        transport,
        payload,
    } = &out[0]
    else {
        panic!("not to the client: {out:?}");
    };
    assert_eq!(
        (*client, *server, *transport),
        (c.addr, sa(LISTEN), Transport::Udp)
    );
    let indication = Resp(payload.clone());
    let parsed = parse(payload).unwrap();
    assert_eq!(
        (parsed.method(), parsed.class()),
        (METHOD_DATA, CLASS_INDICATION)
    );
    assert_eq!(indication.addresses(ATTR_XOR_PEER_ADDRESS), vec![sa(PEER)]);
    // RFC 8656 §18.13, Figure 11: reserved, type (7 bits) and code (9 bits), error data.
    assert_eq!(
        indication.attr(ATTR_ICMP),
        Some(vec![0, 0, 3 << 1, 4, 0, 0, 0x05, 0x78])
    );
    assert_eq!(indication.attr(ATTR_DATA), None);
    assert_eq!(h.server.stats().icmp_relayed, 1);

    // The permission is for the IP: another port of the peer (or none known) is as good.
    let out = icmp(
        &mut h,
        relay,
        "8.8.8.8:0",
        Icmp {
            icmp_type: Icmp::V4_TIME_EXCEEDED,
            code: 0,
            error_data: 99,
        },
    );
    assert_eq!(out.len(), 1);
    let indication = Resp(out[0].payload().to_vec());
    assert_eq!(
        indication.addresses(ATTR_XOR_PEER_ADDRESS),
        vec![sa("8.8.8.8:0")]
    );
    // Error data is the MTU of the "too big" errors only.
    assert_eq!(
        indication.attr(ATTR_ICMP),
        Some(vec![0, 0, 11 << 1, 0, 0, 0, 0, 0])
    );
}

#[test]
fn icmp_errors_go_nowhere_without_permission_allocation_or_relayable_type() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.permit(&mut c, PEER).is_success());
    // No permission for this peer.
    assert!(icmp(&mut h, relay, PEER2, frag_needed(1400)).is_empty());
    // No allocation on this port, or not this address.
    let elsewhere = RelayAddr(SocketAddr::new(relay.0.ip(), relay.0.port() ^ 1));
    assert!(icmp(&mut h, elsewhere, PEER, frag_needed(1400)).is_empty());
    let v6 = RelayAddr(SocketAddr::new(RELAY6.parse().unwrap(), relay.0.port()));
    assert!(icmp(&mut h, v6, PEER6, frag_needed(1400)).is_empty());
    // Types RFC 8656 §11.5 does not relay: echo reply, redirect, parameter problem.
    for icmp_type in [0, 5, 12] {
        let other = Icmp {
            icmp_type,
            code: 0,
            error_data: 0,
        };
        assert!(icmp(&mut h, relay, PEER, other).is_empty());
    }
    // A family mismatch between relay and peer.
    assert!(icmp(&mut h, relay, PEER6, frag_needed(1400)).is_empty());
    // A lapsed permission.
    h.advance(PERMISSION_LIFETIME);
    assert!(icmp(&mut h, relay, PEER, frag_needed(1400)).is_empty());
    assert_eq!(h.server.stats().icmp_relayed, 0);
    assert_eq!(h.server.stats().icmp_rate_limited, 0);
}

#[test]
fn icmpv6_packet_too_big_carries_the_mtu() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    assert!(h.permit(&mut c, PEER6).is_success());
    let too_big = Icmp {
        icmp_type: Icmp::V6_PACKET_TOO_BIG,
        code: 0,
        error_data: 1280,
    };
    let out = icmp(&mut h, relay, PEER6, too_big);
    assert_eq!(out.len(), 1);
    let indication = Resp(out[0].payload().to_vec());
    assert_eq!(indication.addresses(ATTR_XOR_PEER_ADDRESS), vec![sa(PEER6)]);
    assert_eq!(
        indication.attr(ATTR_ICMP),
        Some(vec![0, 0, 2 << 1, 0, 0, 0, 0x05, 0x00])
    );
    // ICMPv4 Time Exceeded is type 11; over IPv6 that is no error RFC 8656 relays.
    let v4_numbers = Icmp {
        icmp_type: Icmp::V4_TIME_EXCEEDED,
        code: 0,
        error_data: 0,
    };
    assert!(icmp(&mut h, relay, PEER6, v4_numbers).is_empty());
}

#[test]
fn icmp_relaying_is_rate_limited_per_allocation() {
    let mut h = Harness::new();
    let mut a = Client::alice();
    let relay_a = h.allocate(&mut a);
    assert!(h.permit(&mut a, PEER).is_success());
    let mut b = Client::new("192.0.2.2:5000", "bob", "bob-pw");
    let relay_b = h.allocate(&mut b);
    assert!(h.permit(&mut b, PEER).is_success());
    let burst = 3 * usize::from(crate::ICMP_RATE);
    let relayed = (0..burst)
        .filter(|_| !icmp(&mut h, relay_a, PEER, frag_needed(1400)).is_empty())
        .count();
    assert_eq!(relayed, usize::from(crate::ICMP_RATE));
    let stats = h.server.stats();
    assert_eq!(
        (stats.icmp_relayed, stats.icmp_rate_limited),
        (
            u64::from(crate::ICMP_RATE),
            (burst - usize::from(crate::ICMP_RATE)) as u64
        )
    );
    // Another allocation has a budget of its own.
    assert_eq!(icmp(&mut h, relay_b, PEER, frag_needed(1400)).len(), 1);
    // One more per tenth of a second.
    h.now += Duration::from_millis(100);
    assert_eq!(icmp(&mut h, relay_a, PEER, frag_needed(1400)).len(), 1);
    assert!(icmp(&mut h, relay_a, PEER, frag_needed(1400)).is_empty());
    h.now += Duration::from_secs(10);
    let relayed = (0..burst)
        .filter(|_| !icmp(&mut h, relay_a, PEER, frag_needed(1400)).is_empty())
        .count();
    assert_eq!(relayed, usize::from(crate::ICMP_RATE));
}

#[test]
fn icmp_for_a_reserved_port_goes_nowhere() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let (relay, _) = reserve_pair(&mut h, &mut c);
    assert!(h.permit(&mut c, PEER).is_success());
    assert!(icmp(&mut h, next_port(relay), PEER, frag_needed(1400)).is_empty());
    assert_eq!(icmp(&mut h, relay, PEER, frag_needed(1400)).len(), 1);
}

proptest! {
    /// Whatever the daemon reports, handle_icmp never panics and sends at most one Data
    /// indication, only to the allocation's client.
    #[test]
    fn arbitrary_icmp_never_panics(
        icmp_type in any::<u8>(),
        code in any::<u8>(),
        error_data in any::<u32>(),
        port in any::<u16>(),
        peer_port in any::<u16>(),
        v6 in any::<bool>(),
    ) {
        let mut h = Harness::new();
        let mut c = Client::alice();
        let relay = h.allocate(&mut c);
        let _ = h.permit(&mut c, PEER);
        let relay = if v6 {
            RelayAddr(SocketAddr::new(RELAY6.parse().unwrap(), port))
        } else {
            RelayAddr(SocketAddr::new(relay.0.ip(), port))
        };
        let peer = SocketAddr::new(sa(PEER).ip(), peer_port);
        h.server.handle_icmp(h.now, relay, PeerAddr(peer), Icmp { icmp_type, code, error_data });
        let out = h.drain();
        prop_assert!(out.len() <= 1);
        for t in out {
            prop_assert_eq!(t.destination(), c.addr.0);
        }
    }
}

proptest! {
    /// Random reserving, token-using, plain and deleting Allocates with random time steps keep
    /// the port index, the ledger, the reservation gauge and the daemon's sockets equal to the
    /// tables: every socket read is an allocation's, every one kept aside a reservation's, and
    /// none is left behind.
    #[test]
    fn reservations_keep_ports_sockets_and_gauges_consistent(
        ops in prop::collection::vec((0u8..5, 0usize..3, 0u64..40), 1..40),
    ) {
        let mut h = Harness::with(|c| c.port_range = 50000..=50015);
        let mut clients = [
            Client::new("192.0.2.1:1", "alice", "alice-pw"),
            Client::new("192.0.2.1:2", "alice", "alice-pw"),
            Client::new("192.0.2.2:1", "bob", "bob-pw"),
        ];
        let mut token = vec![0u8; 8];
        // The daemon's sockets: read as an allocation's, or kept aside for a reservation.
        let (mut open, mut parked) = (HashSet::new(), HashSet::new());
        for (op, who, secs) in ops {
            let c = &mut clients[who];
            let req = match op {
                0 => c.request(METHOD_ALLOCATE, |b| { udp_transport(b); even_port(b, true); }),
                1 => c.request(METHOD_ALLOCATE, |b| { udp_transport(b); reservation_token(b, &token); }),
                2 => c.request(METHOD_ALLOCATE, |b| {
                    udp_transport(b);
                    reservation_token(b, &token);
                    b.raw(ATTR_DONT_FRAGMENT, &[]);
                }),
                3 => c.request(METHOD_ALLOCATE, udp_transport),
                _ => refresh_for(c, 0),
            };
            for t in h.send(c, &req) {
                let resp = Resp(t.payload().to_vec());
                if let Some(nonce) = resp.attr(ATTR_NONCE) {
                    c.nonce = Some(String::from_utf8(nonce).unwrap());
                }
                if let Some(t) = resp.attr(ATTR_RESERVATION_TOKEN) {
                    token = t;
                }
            }
            h.advance(Duration::from_secs(secs));
            for command in h.take_commands() {
                match command {
                    Command::BindRelayPort { relay, .. } => prop_assert!(open.insert(relay), "{relay} bound twice"),
                    Command::FreeRelayPort { relay } => prop_assert!(open.remove(&relay), "{relay} freed unbound"),
                    Command::ReservePort { relay, .. } => prop_assert!(parked.insert(relay), "{relay} reserved twice"),
                    Command::ReleaseReservedPort { relay } => prop_assert!(parked.remove(&relay), "{relay} released unreserved"),
                    Command::AdoptReservedPort { relay, .. } => {
                        prop_assert!(parked.remove(&relay), "{relay} adopted unreserved");
                        prop_assert!(open.insert(relay), "{relay} adopted while bound");
                    }
                    _ => {}
                }
            }
            let s = &h.server;
            let allocated: HashSet<RelayAddr> = s.allocations.values().flat_map(|a| a.relays()).collect();
            let reserved: HashSet<RelayAddr> = s.reservations.values().map(|r| r.relay).collect();
            prop_assert_eq!(&open, &allocated);
            prop_assert_eq!(&parked, &reserved);
            prop_assert_eq!(s.stats().reservations_active, s.reservations.len() as u64);
            let ledger = &s.config.reservations;
            prop_assert_eq!(ledger.total(), s.reservations.len());
            for user in ["alice", "bob"] {
                prop_assert!(ledger.user(user) <= RESERVATIONS_PER_USER);
            }
            prop_assert_eq!(s.by_port.len(), s.allocations.len() + s.reservations.len());
            for (port, holder) in &s.by_port {
                match holder {
                    PortUse::Allocation(t) => prop_assert_eq!(s.allocations.get(t).map(|a| a.port), Some(*port)),
                    PortUse::Reserved(k) => prop_assert_eq!(s.reservations.get(k).map(|r| r.relay.port()), Some(*port)),
                }
            }
            prop_assert!(s.reservations.values().all(|r| r.bound && r.expires <= h.now + RESERVATION_LIFETIME));
        }
    }
}
