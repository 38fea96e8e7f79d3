//! Bandwidth limits and usage accounting: `max_bps`, `user_max_bps` and `bps_capacity`
//! (coturn's names), the kernel's figures, and the start, interim and stop records.

use super::*;
use crate::SavedAllocation;
use crate::allocation::Account;
use crate::config::{KERNEL_FINAL_WAIT, UserLimits};
use crate::usage::{EndReason, Meter, RecordKind, Traffic, Usage};
use crate::{BandwidthLedger, QuotaLedger};
use std::collections::HashMap;
use std::sync::Arc;

const START: &str = "2023-11-14T22:13:20.000Z";

fn t(packets: u64, bytes: u64) -> Traffic {
    Traffic { packets, bytes }
}

/// A cumulative kernel reading: `up` client to peer, `down` peer to client.
fn reading(up: Traffic, down: Traffic) -> Usage {
    Usage {
        client_to_peer: up,
        peer_to_client: down,
        ..Usage::default()
    }
}

fn send_indication(h: &mut Harness, c: &mut Client, peer: &str, data: &[u8]) -> Vec<Transmit> {
    let mut b = Builder::new(METHOD_SEND, CLASS_INDICATION, TransactionId(c.next_txid()));
    peer_attr(&mut b, peer);
    b.raw(ATTR_DATA, data);
    h.send(c, &b.finish(None, None, false))
}

/// The account of the only allocation.
fn account(h: &Harness) -> &Account {
    let [alloc] = h.server.allocations.values().collect::<Vec<_>>()[..] else {
        panic!("not one allocation");
    };
    &alloc.account
}

/// Binds channel `n` to `peer` and returns the install command, not yet answered.
fn bind_unanswered(h: &mut Harness, c: &mut Client, n: u16, peer: &str) -> Command {
    h.bind(c, n, peer);
    h.take_commands()
        .into_iter()
        .find(|c| matches!(c, Command::InstallChannel { .. }))
        .unwrap()
}

fn rest_client(h: &Harness, addr: &str, id: &str, lifetime: u64) -> Client {
    let user = format!("{}:{id}", h.unix_now() + lifetime);
    let password = rest_password(b"new-secret", &user);
    Client::new(addr, &user, &password)
}

#[test]
fn bps_capacity_grants_what_is_left_then_486() {
    let mut h = Harness::with(|c| {
        c.max_bps = Some(100_000);
        c.bps_capacity = Some(250_000);
    });
    let mut clients: Vec<Client> = (1..=4)
        .map(|i| Client::new(&format!("192.0.2.{i}:5000"), "alice", "alice-pw"))
        .collect();
    for c in &mut clients[..3] {
        h.allocate(c);
    }
    let granted: Vec<Option<u64>> = h.records.iter().map(|r| r.max_bps).collect();
    assert_eq!(granted, [Some(100_000), Some(100_000), Some(50_000)]);
    // RFC 8656 §7.2: nothing left is 486 (Allocation Quota Reached), and counts nothing.
    let resp = h.allocate_with(&mut clients[3], |_| {});
    assert_eq!(resp.code(), Some(486));
    assert!(resp.integrity_ok(&clients[3].key));
    assert_eq!(h.server.config().bandwidth.reserved(), 250_000);
    assert_eq!(h.server.config().quotas.total(), 3);
    // The end of an allocation releases what it reserved.
    let req = refresh_for(&mut clients[0], 0);
    assert!(h.call(&clients[0], &req).is_success());
    assert_eq!(h.server.config().bandwidth.reserved(), 150_000);
    h.allocate(&mut clients[3]);
    assert_eq!(h.records.last().unwrap().max_bps, Some(100_000));

    // Every install of a limited allocation's bindings names its meter.
    let Command::InstallChannel { limits, .. } =
        bind_unanswered(&mut h, &mut clients[3], 0x4000, PEER)
    else {
        unreachable!()
    };
    let id = &h.records.last().unwrap().allocation;
    assert_eq!(
        limits,
        RateLimits {
            allocation: Some(Meter {
                name: format!("allocation:{id}"),
                bytes_per_second: 100_000,
            }),
            user: None,
        }
    );
    let binding = channel_binding(
        &clients[3],
        h.server.allocations[&FiveTuple {
            client: clients[3].addr,
            server: sa(LISTEN),
            transport: Transport::Udp,
        }]
            .relay_v4
            .unwrap(),
        0x4000,
        PEER,
    );
    assert_eq!(h.server.channel_limits(&binding), limits);
}

#[test]
fn capacity_is_released_on_every_end() {
    let mut h = Harness::with(|c| {
        c.max_bps = Some(100_000);
        c.bps_capacity = Some(100_000);
    });
    let reserved = |h: &Harness| h.server.config().bandwidth.reserved();
    // Expiry.
    let mut c = Client::alice();
    h.allocate(&mut c);
    assert_eq!(reserved(&h), 100_000);
    h.advance(Duration::from_secs(600));
    assert_eq!(reserved(&h), 0);
    // A TCP connection that closes.
    let mut tcp = Client::new("192.0.2.2:5000", "alice", "alice-pw");
    tcp.transport = Transport::Tcp;
    h.allocate(&mut tcp);
    h.server
        .handle_client_closed(Transport::Tcp, sa(LISTEN), tcp.addr);
    h.drain();
    assert_eq!(reserved(&h), 0);
    // Relay ports that cannot be bound: 508, and no record either.
    let records = h.records.len();
    let mut d = Client::new("192.0.2.3:5000", "alice", "alice-pw");
    let attempts = usize::from(RELAY_BIND_ATTEMPTS);
    let (_, out) = allocate_with_bind_failures(&mut h, &mut d, |_| {}, attempts);
    assert_eq!(Resp(out[0].payload().to_vec()).code(), Some(508));
    assert_eq!(reserved(&h), 0);
    // Shutdown.
    h.allocate(&mut c);
    h.server.shutdown();
    h.drain();
    assert_eq!(reserved(&h), 0);
    let reasons: Vec<_> = h.records[records..]
        .iter()
        .map(|r| (r.record, r.end_reason))
        .collect();
    assert_eq!(
        reasons,
        [
            (RecordKind::Start, None),
            (RecordKind::Stop, Some(EndReason::Shutdown))
        ]
    );
}

#[test]
fn user_space_relaying_over_max_bps_is_dropped_and_counted() {
    // 10 000 B/s: a burst of 2000 bytes.
    let mut h = Harness::with(|c| c.max_bps = Some(10_000));
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    let payload = [7u8; 1000];
    let relayed: usize = (0..3)
        .map(|_| h.send(&c, &channel_data(0x4000, &payload)).len())
        .sum();
    assert_eq!(relayed, 2);
    // The other direction has a meter of its own.
    let relayed: usize = (0..3)
        .map(|_| h.peer_send(relay, PEER, &payload).len())
        .sum();
    assert_eq!(relayed, 2);
    // 100 ms refill 1000 bytes.
    h.advance(Duration::from_millis(100));
    assert_eq!(h.send(&c, &channel_data(0x4000, &payload)).len(), 1);
    assert!(h.send(&c, &channel_data(0x4000, &payload)).is_empty());
    let expected = Usage {
        client_to_peer: t(3, 3000),
        peer_to_client: t(2, 2000),
        dropped_client_to_peer: t(2, 2000),
        dropped_peer_to_client: t(1, 1000),
    };
    assert_eq!(account(&h).usage, expected);
    assert_eq!(h.server.stats().usage, expected);
    assert_eq!(h.server.stats().relayed_to_peer, t(3, 3000));
    // Send indications and Data indications are metered too.
    h.permit(&mut c, PEER2);
    h.advance(Duration::from_millis(200));
    assert_eq!(send_indication(&mut h, &mut c, PEER2, &payload).len(), 1);
    assert_eq!(send_indication(&mut h, &mut c, PEER2, &payload).len(), 1);
    assert!(send_indication(&mut h, &mut c, PEER2, &payload).is_empty());
    assert_eq!(account(&h).usage.dropped_client_to_peer, t(3, 3000));
}

#[test]
fn user_max_bps_is_shared_by_the_users_allocations_over_udp_and_tcp() {
    let limits = HashMap::from([(
        "carol".to_owned(),
        UserLimits {
            max_bps: None,
            user_max_bps: Some(10_000),
        },
    )]);
    let mut h = Harness::with(|c| c.user_limits = Arc::new(limits));
    // Two REST usernames of one user (the part after ':'), one over TCP.
    let mut udp = rest_client(&h, "192.0.2.1:5000", "carol", 3600);
    let mut tcp = rest_client(&h, "192.0.2.2:5000", "carol", 7200);
    tcp.transport = Transport::Tcp;
    let mut alice = Client::new("192.0.2.3:5000", "alice", "alice-pw");
    for c in [&mut udp, &mut tcp, &mut alice] {
        h.allocate(c);
        h.permit(c, PEER);
    }
    assert_eq!(h.records[0].user, "carol");
    assert_eq!(h.records[1].user, "carol");
    let payload = [1u8; 1000];
    assert_eq!(send_indication(&mut h, &mut udp, PEER, &payload).len(), 1);
    assert_eq!(send_indication(&mut h, &mut tcp, PEER, &payload).len(), 1);
    assert!(send_indication(&mut h, &mut tcp, PEER, &payload).is_empty());
    assert!(send_indication(&mut h, &mut udp, PEER, &payload).is_empty());
    // Another user is not limited.
    for _ in 0..10 {
        assert_eq!(send_indication(&mut h, &mut alice, PEER, &payload).len(), 1);
    }
    // TCP ChannelData too, and the data plane gets the user's meter.
    assert!(h.bind_acked(&mut tcp, 0x4000, PEER).is_success());
    assert!(h.send(&tcp, &channel_data(0x4000, &payload)).is_empty());
    let Command::InstallChannel { limits, .. } = bind_unanswered(&mut h, &mut udp, 0x4000, PEER)
    else {
        unreachable!()
    };
    assert_eq!(
        limits.user,
        Some(Meter {
            name: "user:carol".to_owned(),
            bytes_per_second: 10_000,
        })
    );
    assert_eq!(limits.allocation, None);
    assert_eq!(h.server.stats().usage.dropped_client_to_peer, t(3, 3000));
    // The user's meters go with its last allocation.
    assert_eq!(h.server.config().bandwidth.metered_users(), 1);
    h.server.shutdown();
    assert_eq!(h.server.config().bandwidth.metered_users(), 0);
}

#[test]
fn records_start_interim_and_stop_with_exact_figures() {
    let mut h = Harness::with(|c| c.interim_interval = Some(Duration::from_secs(60)));
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    let [start] = &h.records[..] else {
        panic!("{:?}", h.records);
    };
    let id = start.allocation.clone();
    assert_eq!(id.len(), 16);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    let mut expected = UsageRecord {
        record: RecordKind::Start,
        sequence: 0,
        allocation: id,
        time: START.to_owned(),
        username: "alice".to_owned(),
        user: "alice".to_owned(),
        realm: REALM.to_owned(),
        client: c.addr.0,
        transport: Transport::Udp,
        server: sa(LISTEN),
        relay: vec![relay.0],
        started: START.to_owned(),
        ended: None,
        end_reason: None,
        max_bps: None,
        client_to_peer: t(0, 0),
        peer_to_client: t(0, 0),
        dropped_client_to_peer: t(0, 0),
        dropped_peer_to_client: t(0, 0),
        kernel_client_to_peer: t(0, 0),
        kernel_peer_to_client: t(0, 0),
        kernel_final: None,
    };
    assert_eq!(*start, expected);
    h.permit(&mut c, PEER);
    send_indication(&mut h, &mut c, PEER, &[1; 100]);
    h.peer_send(relay, PEER, &[2; 50]);
    h.peer_send(relay, PEER, &[2; 30]);
    h.advance(Duration::from_secs(60));
    h.drain();
    expected.record = RecordKind::Interim;
    expected.sequence = 1;
    expected.time = "2023-11-14T22:14:20.000Z".to_owned();
    expected.client_to_peer = t(1, 100);
    expected.peer_to_client = t(2, 80);
    assert_eq!(h.records[1..], [expected.clone()]);
    h.advance(Duration::from_secs(30));
    let req = refresh_for(&mut c, 0);
    assert!(h.call(&c, &req).is_success());
    expected.record = RecordKind::Stop;
    expected.sequence = 2;
    expected.time = "2023-11-14T22:14:50.000Z".to_owned();
    expected.ended = Some(expected.time.clone());
    expected.end_reason = Some(EndReason::Deleted);
    expected.kernel_final = Some(true);
    assert_eq!(h.records[2..], [expected]);
    assert_eq!(h.server.poll_timeout(), None, "no interim timer left");
}

#[test]
fn kernel_readings_add_their_deltas_and_a_lower_one_counts_from_zero() {
    let mut h = Harness::with(|c| c.max_bps = Some(10_000));
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    let now = h.now;
    h.server
        .kernel_usage(now, &binding, reading(t(5, 500), t(1, 100)));
    h.server
        .kernel_usage(now, &binding, reading(t(8, 800), t(1, 100)));
    assert_eq!(account(&h).kernel, reading(t(8, 800), t(1, 100)));
    // A fresh kernel entry (re-installed after its permission lapsed and came back).
    h.server
        .kernel_usage(now, &binding, reading(t(2, 200), t(0, 0)));
    assert_eq!(account(&h).kernel, reading(t(10, 1000), t(1, 100)));
    assert_eq!(account(&h).usage, reading(t(10, 1000), t(1, 100)));
    assert_eq!(h.server.stats().usage, reading(t(10, 1000), t(1, 100)));
    // Figures of a binding that is not in the data plane count for nothing.
    let other = channel_binding(&c, relay, 0x4001, PEER2);
    h.server
        .kernel_usage(now, &other, reading(t(9, 9000), t(0, 0)));
    assert_eq!(account(&h).usage.client_to_peer, t(10, 1000));
    // What the kernel relayed holds back user space: 1000 of the 2000-byte burst are left.
    assert_eq!(h.send(&c, &channel_data(0x4000, &[0; 1000])).len(), 1);
    assert!(h.send(&c, &channel_data(0x4000, &[0; 1000])).is_empty());
    // The peer direction was charged 100 only.
    assert_eq!(h.peer_send(relay, PEER, &[0; 1500]).len(), 1);
}

#[test]
fn a_stop_waits_for_the_kernels_final_figures() {
    let mut h = Harness::new();
    h.answer_removals = false;
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    h.server
        .kernel_usage(h.now, &binding, reading(t(10, 1000), t(8, 800)));
    h.send(&c, &channel_data(0x4000, &[0; 10]));
    let req = refresh_for(&mut c, 0);
    assert!(h.call(&c, &req).is_success());
    assert!(
        h.take_commands()
            .contains(&Command::RemoveChannel { binding })
    );
    assert_eq!(h.records.len(), 1, "the stop waits");
    h.now += Duration::from_secs(1);
    h.server
        .channel_removed(h.now, &binding, Some(reading(t(12, 1200), t(9, 900))));
    h.drain();
    let stop = h.records.last().unwrap();
    assert_eq!(
        (stop.record, stop.end_reason, stop.kernel_final),
        (RecordKind::Stop, Some(EndReason::Deleted), Some(true))
    );
    assert_eq!(stop.ended.as_deref(), Some(START));
    assert_eq!(stop.time, "2023-11-14T22:13:21.000Z");
    assert_eq!(
        (stop.client_to_peer, stop.peer_to_client),
        (t(13, 1210), t(9, 900))
    );
    assert_eq!(
        (stop.kernel_client_to_peer, stop.kernel_peer_to_client),
        (t(12, 1200), t(9, 900))
    );
    assert_eq!(h.server.poll_timeout(), None);
    // An answer that comes again, or late, changes nothing.
    h.server
        .channel_removed(h.now, &binding, Some(Usage::default()));
    assert_eq!(h.records.len(), 2);
}

#[test]
fn a_stop_goes_out_after_five_seconds_without_the_kernel() {
    let mut h = Harness::new();
    h.answer_removals = false;
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    assert!(h.bind_acked(&mut c, 0x4001, PEER2).is_success());
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    h.server
        .kernel_usage(h.now, &binding, reading(t(3, 300), t(0, 0)));
    // The allocation expires; one binding's final figures come, the other's never do.
    h.advance(Duration::from_secs(600));
    h.server
        .channel_removed(h.now, &binding, Some(reading(t(4, 400), t(0, 0))));
    h.drain();
    assert_eq!(h.records.len(), 1);
    assert_eq!(h.server.poll_timeout(), Some(h.now + KERNEL_FINAL_WAIT));
    h.advance(KERNEL_FINAL_WAIT);
    h.drain();
    let stop = h.records.last().unwrap();
    assert_eq!(
        (
            stop.end_reason,
            stop.kernel_final,
            stop.kernel_client_to_peer
        ),
        (Some(EndReason::Expired), Some(false), t(4, 400))
    );
    assert_eq!(stop.ended.as_deref(), Some("2023-11-14T22:23:20.000Z"));
    assert_eq!(stop.time, "2023-11-14T22:23:25.000Z");
    assert_eq!(h.server.poll_timeout(), None);

    // A removal answered without figures: the stop goes at once, not final.
    let mut d = Client::new("192.0.2.2:5000", "alice", "alice-pw");
    let relay = h.allocate(&mut d);
    assert!(h.bind_acked(&mut d, 0x4000, PEER).is_success());
    let req = refresh_for(&mut d, 0);
    h.call(&d, &req);
    let binding = channel_binding(&d, relay, 0x4000, PEER);
    h.server.channel_removed(h.now, &binding, None);
    h.drain();
    let stop = h.records.last().unwrap();
    assert_eq!(
        (stop.record, stop.kernel_final),
        (RecordKind::Stop, Some(false))
    );
}

#[test]
fn shutdown_sends_every_stop_at_once() {
    let mut h = Harness::new();
    h.answer_removals = false;
    let mut offloaded = Client::alice();
    h.allocate(&mut offloaded);
    assert!(h.bind_acked(&mut offloaded, 0x4000, PEER).is_success());
    let mut plain = Client::new("192.0.2.2:5000", "alice", "alice-pw");
    h.allocate(&mut plain);
    let mut ended = Client::new("192.0.2.3:5000", "bob", "bob-pw");
    h.allocate(&mut ended);
    assert!(h.bind_acked(&mut ended, 0x4000, PEER).is_success());
    let req = refresh_for(&mut ended, 0);
    h.call(&ended, &req);
    assert_eq!(h.records.len(), 3, "three starts; one stop waits");
    h.server.shutdown();
    h.drain();
    let mut stops: Vec<_> = h.records[3..]
        .iter()
        .map(|r| (r.client, r.end_reason, r.kernel_final))
        .collect();
    stops.sort_by_key(|(client, ..)| *client);
    assert_eq!(
        stops,
        [
            (offloaded.addr.0, Some(EndReason::Shutdown), Some(false)),
            (plain.addr.0, Some(EndReason::Shutdown), Some(true)),
            (ended.addr.0, Some(EndReason::Deleted), Some(false)),
        ]
    );
    assert_eq!(h.server.poll_timeout(), None);
}

#[test]
fn a_tcp_close_ends_with_client_closed() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    c.transport = Transport::Tcp;
    h.allocate(&mut c);
    h.server
        .handle_client_closed(Transport::Tcp, sa(LISTEN), c.addr);
    h.drain();
    let stop = h.records.last().unwrap();
    assert_eq!(
        (stop.record, stop.end_reason, stop.kernel_final),
        (RecordKind::Stop, Some(EndReason::ClientClosed), Some(true))
    );
}

#[test]
fn usage_and_accounting_survive_a_restart() {
    let limits = |c: &mut Config| {
        c.max_bps = Some(100_000);
        c.bps_capacity = Some(1_000_000);
        c.interim_interval = Some(Duration::from_secs(60));
    };
    let mut h = Harness::with(limits);
    h.server.track_changes();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    h.server.take_changes();
    // Per packet and per kernel reading, nothing is journaled.
    h.server
        .kernel_usage(h.now, &binding, reading(t(5, 500), t(0, 0)));
    h.send(&c, &channel_data(0x4000, &[0; 100]));
    assert!(h.server.take_changes().is_empty());
    // With the interim record, the allocation is.
    h.advance(Duration::from_secs(60));
    h.drain();
    let changes = h.server.take_changes();
    let [Change::Saved(saved)] = changes.as_slice() else {
        panic!("{changes:?}");
    };
    let id = h.records[0].allocation.clone();
    assert_eq!(format!("{:016x}", saved.id), id);
    assert_eq!(saved.started_unix_ms, UNIX_START * 1000);
    assert_eq!(saved.max_bps, Some(100_000));
    assert_eq!(saved.usage, reading(t(6, 600), t(0, 0)));
    assert_eq!(saved.kernel, reading(t(5, 500), t(0, 0)));
    assert_eq!(saved.sequence, 2);
    assert_eq!(saved.channels[0].kernel_seen, reading(t(5, 500), t(0, 0)));

    // A new process: the kernel entry lived on and counts on from its last reading.
    let mut r = restarted(&h, Duration::from_secs(10), limits);
    r.server.restore(r.now, saved, &(49152..=65535)).unwrap();
    assert_eq!(r.server.config().bandwidth.reserved(), 100_000);
    r.server
        .kernel_usage(r.now, &binding, reading(t(7, 700), t(1, 10)));
    assert_eq!(account(&r).usage, reading(t(8, 800), t(1, 10)));
    r.advance(Duration::from_secs(60));
    r.drain();
    let [interim] = &r.records[..] else {
        panic!("{:?}", r.records);
    };
    assert_eq!(
        (interim.record, interim.sequence, &interim.allocation),
        (RecordKind::Interim, 2, &id)
    );
    assert_eq!(interim.started, START);
    assert_eq!(interim.max_bps, Some(100_000));
    assert_eq!(interim.kernel_client_to_peer, t(7, 700));

    // A saved allocation the new process goes without gets its stop, "lost".
    let mut moved = restarted(&h, Duration::from_secs(10), |c| {
        limits(c);
        c.relay_ipv4 = Some("198.51.100.8".parse().unwrap());
    });
    let refusal = moved.server.restore(moved.now, saved, &(49152..=65535));
    assert_eq!(refusal, Err(RestoreRefusal::RelayAddressChanged));
    moved.drain();
    let [lost] = &moved.records[..] else {
        panic!("{:?}", moved.records);
    };
    assert_eq!(
        (
            lost.record,
            lost.sequence,
            lost.end_reason,
            lost.kernel_final
        ),
        (RecordKind::Stop, 2, Some(EndReason::Lost), Some(false))
    );
    assert_eq!(lost.client_to_peer, t(6, 600));
    assert_eq!(moved.server.config().bandwidth.reserved(), 0);
}

#[test]
fn saved_allocations_of_earlier_versions_load_and_start_their_accounting() {
    let mut h = Harness::new();
    h.server.track_changes();
    let mut c = Client::alice();
    h.allocate(&mut c);
    let changes = h.server.take_changes();
    let [Change::Saved(saved)] = changes.as_slice() else {
        panic!("{changes:?}");
    };
    // As a version without accounting saved it.
    let old = SavedAllocation {
        id: 0,
        started_unix_ms: 0,
        sequence: 0,
        ..saved.clone()
    };
    let mut r = restarted(&h, Duration::from_secs(10), |_| {});
    r.server.restore(r.now, &old, &(49152..=65535)).unwrap();
    r.drain();
    let [start] = &r.records[..] else {
        panic!("{:?}", r.records);
    };
    assert_eq!((start.record, start.sequence), (RecordKind::Start, 0));
    assert_eq!(start.started, "2023-11-14T22:13:30.000Z");
    assert_ne!(start.allocation, "0000000000000000");
}

#[test]
fn the_ledgers_hold_across_cores() {
    let bandwidth = BandwidthLedger::shared();
    let quotas = QuotaLedger::shared();
    let mut cores = [0u32, 1].map(|index| {
        Harness::with(|c| {
            c.core_index = index;
            c.max_bps = Some(100_000);
            c.bps_capacity = Some(150_000);
            c.bandwidth = bandwidth.clone();
            c.quotas = quotas.clone();
        })
    });
    let mut a = Client::alice();
    let mut b = Client::new("192.0.2.2:5000", "alice", "alice-pw");
    cores[0].allocate(&mut a);
    cores[1].allocate(&mut b);
    assert_eq!(cores[1].records[0].max_bps, Some(50_000));
    let mut d = Client::new("192.0.2.3:5000", "alice", "alice-pw");
    assert_eq!(cores[1].allocate_with(&mut d, |_| {}).code(), Some(486));
    assert_eq!(bandwidth.reserved(), 150_000);
}
