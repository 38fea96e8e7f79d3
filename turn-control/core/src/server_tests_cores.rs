//! RESERVATION-TOKENs across the cores of one daemon (RFC 8656 §7.2: a token is good
//! server-wide): two [`Server`]s as the daemon builds them, with the same seed, disjoint slices
//! of the port range, one quota ledger, one reservation ledger and one clock.

use super::ports_and_icmp::{
    adopt, even_port, next_port, reservation_token, reserve, reserve_pair,
};
use super::*;
use crate::config::{RESERVATION_LIFETIME, RESERVATIONS_PER_USER};
use crate::{QuotaLedger, ReservationLedger};

/// Two cores of one daemon, core 0 on ports 50000-50099 and core 1 on 50100-50199 unless `f`
/// says otherwise, both at the same `now`.
fn cores(f: impl Fn(&mut Config)) -> [Harness; 2] {
    let quotas = QuotaLedger::shared();
    let reservations = ReservationLedger::shared();
    let mut cores = [0u16, 1].map(|index| {
        Harness::with(|c| {
            c.core_index = u32::from(index);
            c.port_range = 50000 + 100 * index..=50099 + 100 * index;
            c.quotas = quotas.clone();
            c.reservations = reservations.clone();
            f(c);
        })
    });
    // One clock, no earlier than either server's start.
    cores[0].now = cores[1].now;
    cores
}

fn advance(cores: &mut [Harness; 2], d: Duration) {
    for h in cores {
        h.advance(d);
    }
}

/// An Allocate of `client` with `token`.
fn allocate_with_token(h: &mut Harness, client: &mut Client, token: &[u8]) -> Resp {
    h.allocate_with(client, |b| reservation_token(b, token))
}

fn held(h: &Harness, relay: RelayAddr) -> Option<PortUse> {
    h.server.by_port.get(&relay.port()).copied()
}

#[test]
fn a_token_made_on_one_core_is_taken_on_another() {
    let mut cores = cores(|_| {});
    let [core0, core1] = &mut cores;
    let mut rtp = Client::alice();
    let (relay, token) = reserve_pair(core0, &mut rtp);
    let reserved = next_port(relay);
    let made = core0.take_commands();
    assert_eq!(made[1..], [reserve(reserved, false)]);

    // The RTCP socket of the same client lands on the other core.
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = allocate_with_token(core1, &mut rtcp, &token);
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(resp.integrity_ok(&rtcp.key));
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS), vec![reserved.0]);
    assert!(!core1.server.config.port_range.contains(&reserved.0.port()));
    assert_eq!(core1.take_commands(), vec![adopt(reserved, false)]);
    let rtcp_tuple = FiveTuple {
        client: rtcp.addr,
        server: sa(LISTEN),
        transport: Transport::Udp,
    };
    assert_eq!(held(core1, reserved), Some(PortUse::Allocation(rtcp_tuple)));
    assert_eq!(core1.server.config.reservations.total(), 0);
    assert_eq!(core1.server.config.quotas.user("alice"), 2);
    assert!(core1.permit(&mut rtcp, PEER).is_success());
    assert_eq!(core1.peer_send(reserved, PEER, b"rtcp").len(), 1);

    // Single use, on either core.
    let mut again = Client::new("192.0.2.1:5002", "alice", "alice-pw");
    let resp = allocate_with_token(core0, &mut again, &token);
    assert_eq!(resp.code(), Some(508));
    let resp = allocate_with_token(core1, &mut again, &token);
    assert_eq!(resp.code(), Some(508));

    // Core 0 keeps the port out of its picks until the reservation's time is up, then forgets
    // it without releasing the socket: that is core 1's allocation's now.
    assert!(matches!(held(core0, reserved), Some(PortUse::Reserved(_))));
    assert_eq!(core0.server.stats().reservations_active, 1);
    advance(&mut cores, RESERVATION_LIFETIME);
    let [core0, core1] = &mut cores;
    assert!(core0.take_commands().is_empty());
    assert_eq!(held(core0, reserved), None);
    assert_eq!(core0.server.stats().reservations_active, 0);
    assert_eq!(core0.server.allocation_count(), 1);
    assert_eq!(
        core0.server.poll_timeout(),
        core0.server.allocations.values().map(|a| a.expires).min()
    );

    // Core 1's allocation relays on, and frees the port as any other when it ends.
    assert_eq!(core1.peer_send(reserved, PEER, b"rtcp").len(), 1);
    let req = refresh_for(&mut rtcp, 0);
    assert!(core1.call(&rtcp, &req).is_success());
    assert_eq!(
        core1.take_commands(),
        vec![Command::FreeRelayPort { relay: reserved }]
    );
    assert_eq!(held(core1, reserved), None);
    assert_eq!(core1.server.config.quotas.user("alice"), 1);
}

#[test]
fn a_token_unused_ends_on_its_core_and_is_refused_on_another() {
    let mut cores = cores(|_| {});
    let mut rtp = Client::alice();
    let (relay, token) = reserve_pair(&mut cores[0], &mut rtp);
    cores[0].take_commands();
    advance(&mut cores, RESERVATION_LIFETIME);
    let [core0, core1] = &mut cores;
    assert_eq!(
        core0.take_commands(),
        vec![Command::ReleaseReservedPort {
            relay: next_port(relay)
        }]
    );
    assert_eq!(held(core0, next_port(relay)), None);
    assert_eq!(core0.server.config.reservations.total(), 0);
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = allocate_with_token(core1, &mut rtcp, &token);
    assert_eq!(resp.code(), Some(508));
    assert!(resp.integrity_ok(&rtcp.key));
    assert!(core1.take_commands().is_empty());
    assert_eq!(core1.server.allocation_count(), 0);
    assert_eq!(core1.server.config.quotas.user("alice"), 1);
}

#[test]
fn another_users_token_is_refused_on_every_core_and_stays_for_its_own() {
    let mut cores = cores(|_| {});
    let [core0, core1] = &mut cores;
    let mut alice = Client::alice();
    let (relay, token) = reserve_pair(core0, &mut alice);
    let mut bob = Client::new("192.0.2.2:5000", "bob", "bob-pw");
    assert_eq!(
        allocate_with_token(core1, &mut bob, &token).code(),
        Some(508)
    );
    assert_eq!(
        allocate_with_token(core0, &mut bob, &token).code(),
        Some(508)
    );
    assert_eq!(core1.server.config.quotas.user("bob"), 0);
    let mut alice2 = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    let resp = allocate_with_token(core1, &mut alice2, &token);
    assert_eq!(
        resp.addresses(ATTR_XOR_RELAYED_ADDRESS),
        vec![next_port(relay).0]
    );
}

#[test]
fn reservation_bounds_hold_across_cores() {
    let mut cores = cores(|c| c.max_reservations = RESERVATIONS_PER_USER + 1);
    let mut tokens = Vec::new();
    for i in 0..RESERVATIONS_PER_USER {
        let mut c = Client::new(&format!("192.0.2.1:{}", 1000 + i), "alice", "alice-pw");
        tokens.push(reserve_pair(&mut cores[i % 2], &mut c).1);
    }
    let [core0, core1] = &mut cores;
    assert_eq!(core0.server.stats().reservations_active, 4);
    assert_eq!(core1.server.stats().reservations_active, 4);
    // Alice's ninth, on either core: over her bound.
    let mut c = Client::new("192.0.2.1:2000", "alice", "alice-pw");
    for core in [&mut *core0, &mut *core1] {
        assert_eq!(
            core.allocate_with(&mut c, |b| even_port(b, true)).code(),
            Some(508)
        );
    }
    // Bob's first fills the ledger, so his second is over the total.
    let mut bob = Client::new("192.0.2.2:1", "bob", "bob-pw");
    reserve_pair(core1, &mut bob);
    let mut bob2 = Client::new("192.0.2.2:2", "bob", "bob-pw");
    assert_eq!(
        core0
            .allocate_with(&mut bob2, |b| even_port(b, true))
            .code(),
        Some(508)
    );
    // A token used on the other core frees its place in the ledger at once, before the core
    // that made it has learned of it.
    let mut rtcp = Client::new("192.0.2.1:3000", "alice", "alice-pw");
    assert!(allocate_with_token(core1, &mut rtcp, &tokens[0]).is_success());
    assert_eq!(core0.server.stats().reservations_active, 4);
    reserve_pair(core0, &mut bob2);
    assert_eq!(
        core0.server.config.reservations.total(),
        RESERVATIONS_PER_USER + 1
    );
}

#[test]
fn a_port_taken_on_another_core_fails_to_bind_when_picked_again_and_the_allocation_moves_on() {
    // Core 0 has three ports: the only pair is 50000/50001.
    let mut cores = cores(|c| {
        if c.core_index == 0 {
            c.port_range = 50000..=50002;
        }
    });
    let mut rtp = Client::alice();
    let (relay, token) = reserve_pair(&mut cores[0], &mut rtp);
    let reserved = next_port(relay);
    assert_eq!(reserved.port(), AllocationPort(50001));
    let mut rtcp = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    assert!(allocate_with_token(&mut cores[1], &mut rtcp, &token).is_success());
    advance(&mut cores, RESERVATION_LIFETIME);
    let core0 = &mut cores[0];
    core0.take_commands();
    assert_eq!(held(core0, reserved), None);

    // Two more allocations on core 0, while core 1 holds 50001: whichever picks it first fails
    // to bind it (the daemon's EADDRINUSE) and moves to 50002 if that is free; the other gets
    // 508 or takes 50002. One bind of 50001 is tried either way.
    let mut tried = 0;
    let mut outcomes = Vec::new();
    for port in [1, 2] {
        let mut c = Client::new(&format!("192.0.2.3:{port}"), "bob", "bob-pw");
        core0.login(&mut c);
        let req = c.request(METHOD_ALLOCATE, udp_transport);
        core0
            .server
            .handle_client(core0.now, c.transport, sa(LISTEN), c.addr, &req);
        while let Some(command) = core0.server.poll_command() {
            if let Command::BindRelayPort { relay, .. } = command {
                if relay == reserved {
                    tried += 1;
                    core0.server.relay_bind_failed(relay);
                } else {
                    core0.server.relay_bound(core0.now, relay);
                }
            }
        }
        let out: Vec<Transmit> = std::iter::from_fn(|| core0.server.poll_transmit()).collect();
        assert_eq!(out.len(), 1);
        let resp = Resp(out[0].payload().to_vec());
        outcomes.push(match resp.code() {
            Some(code) => Err(code),
            None => Ok(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0].port()),
        });
    }
    outcomes.sort();
    assert_eq!(outcomes, [Ok(50002), Err(508)]);
    assert_eq!(tried, 1);
    assert_eq!(held(core0, reserved), None);
}

#[test]
fn shutdown_releases_the_reservations_no_other_core_took() {
    let mut cores = cores(|_| {});
    let [core0, core1] = &mut cores;
    let mut a = Client::new("192.0.2.1:1", "alice", "alice-pw");
    let (relay_a, token_a) = reserve_pair(core0, &mut a);
    let mut b = Client::new("192.0.2.1:2", "alice", "alice-pw");
    let (relay_b, token_b) = reserve_pair(core0, &mut b);
    core0.take_commands();
    let mut taker = Client::new("192.0.2.1:3", "alice", "alice-pw");
    assert!(allocate_with_token(core1, &mut taker, &token_a).is_success());

    core0.server.shutdown();
    let commands = core0.take_commands();
    assert!(commands.contains(&Command::ReleaseReservedPort {
        relay: next_port(relay_b)
    }));
    assert!(!commands.iter().any(|c| matches!(
        c,
        Command::ReleaseReservedPort { relay } | Command::FreeRelayPort { relay }
            if *relay == next_port(relay_a)
    )));
    // Nothing core 0 made is left for core 1 to take once core 0 has stopped.
    assert_eq!(core1.server.config.reservations.total(), 0);
    let mut late = Client::new("192.0.2.1:4", "alice", "alice-pw");
    assert_eq!(
        allocate_with_token(core1, &mut late, &token_b).code(),
        Some(508)
    );
    assert_eq!(core1.server.allocation_count(), 1);
}
