//! Abuse resistance: answers to unauthenticated requests limited per source and host-wide,
//! the 438 of a real user outside those limits, the per-allocation caps on permissions and
//! channels, each user's share of the data plane, and one timer per object whatever clients
//! refresh; through the harness of `server_tests.rs`.

use super::*;
use crate::QuotaLedger;
use crate::config::{
    MAX_PERMISSIONS_PER_ALLOCATION, SourceRate, UNAUTHENTICATED_BURST_PER_SOURCE,
    UNAUTHENTICATED_RATE_PER_SOURCE, USER_KERNEL_BINDINGS,
};

/// An Allocate without credentials from `addr`: the request of a flood.
fn anonymous_allocate(h: &mut Harness, addr: &str) -> Vec<Transmit> {
    let c = Client::new(addr, "alice", "alice-pw");
    let req = c.request_with_txid(METHOD_ALLOCATE, [7; 12], udp_transport);
    h.send(&c, &req)
}

/// Whether `client` gets a 401 with a nonce for an Allocate without credentials.
fn gets_a_nonce(h: &mut Harness, addr: &str) -> bool {
    match &anonymous_allocate(h, addr)[..] {
        [] => false,
        [answer] => {
            let resp = Resp(answer.payload().to_vec());
            assert_eq!(resp.code(), Some(401));
            resp.attr(ATTR_NONCE).is_some()
        }
        more => panic!("{more:?}"),
    }
}

/// Answers to `n` Allocates without credentials from `ip`, each from another port.
fn flood(h: &mut Harness, ip: &str, n: u16) -> usize {
    (0..n)
        .map(|port| anonymous_allocate(h, &format!("{ip}:{}", 10_000 + port)).len())
        .sum()
}

#[test]
fn a_flood_from_one_ipv4_source_spends_its_budget_not_the_others() {
    let mut h = Harness::new();
    let burst = UNAUTHENTICATED_BURST_PER_SOURCE as usize;
    assert_eq!(flood(&mut h, "203.0.113.5", 1000), burst);
    let stats = h.server.stats();
    assert_eq!(
        stats.unauthenticated_source_limited,
        1000 - burst as u64,
        "{stats:?}"
    );
    assert_eq!(stats.unauthorized_rate_limited, 0);
    assert!(!gets_a_nonce(&mut h, "203.0.113.5:40000"));
    // Another host still gets its nonce, and logs in.
    assert!(gets_a_nonce(&mut h, "192.0.2.1:5000"));
    let mut alice = Client::alice();
    h.allocate(&mut alice);
    // The flooder gets its rate back, no more.
    h.advance(Duration::from_secs(1));
    assert_eq!(
        flood(&mut h, "203.0.113.5", 1000),
        UNAUTHENTICATED_RATE_PER_SOURCE as usize
    );
}

#[test]
fn an_ipv6_slash_64_is_one_source() {
    let mut h = Harness::with(|c| c.unauthenticated_per_source = Some(SourceRate::new(1, 3)));
    for port in 1..=3 {
        assert!(gets_a_nonce(&mut h, &format!("[2001:db8:1:2::1]:{port}")));
    }
    // Other addresses of the same /64 share its budget; another /64 has its own.
    assert!(!gets_a_nonce(&mut h, "[2001:db8:1:2::1]:4"));
    assert!(!gets_a_nonce(
        &mut h,
        "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:1"
    ));
    assert!(gets_a_nonce(&mut h, "[2001:db8:1:3::1]:1"));
    assert!(gets_a_nonce(&mut h, "192.0.2.1:1"));
    assert_eq!(h.server.stats().unauthenticated_source_limited, 2);
}

#[test]
fn the_host_wide_backstop_holds_against_many_sources() {
    let mut h = Harness::with(|c| c.unauthorized_rate = Some(50));
    let answered: usize = (0..200u32)
        .map(|i| anonymous_allocate(&mut h, &format!("203.0.{}.{}:1", i / 200, i % 200 + 1)).len())
        .sum();
    assert_eq!(answered, 50);
    let stats = h.server.stats();
    assert_eq!(
        (
            stats.unauthorized_rate_limited,
            stats.unauthenticated_source_limited
        ),
        (150, 0)
    );
}

#[test]
fn a_stale_nonce_with_valid_integrity_gets_438_while_the_budget_is_spent() {
    let mut h = Harness::with(|c| {
        c.nonce_lifetime = Duration::from_secs(60);
        c.unauthorized_rate = Some(50);
    });
    let mut alice = Client::alice();
    h.allocate(&mut alice);
    h.advance(Duration::from_secs(60));
    // A flood from alice's own address and from many others spends both her source's budget
    // and the host-wide one.
    flood(&mut h, "192.0.2.1", 1000);
    for i in 0..200u32 {
        anonymous_allocate(&mut h, &format!("203.0.113.{}:{}", i % 250, 1000 + i));
    }
    assert!(!gets_a_nonce(&mut h, "192.0.2.1:6000"));
    assert!(!gets_a_nonce(&mut h, "198.51.100.200:6000"));

    // Alice's nonce went stale: her Refresh is signed with her key, so she gets her 438.
    let req = alice.request(METHOD_REFRESH, |_| {});
    let resp = h.call(&alice, &req);
    assert_eq!(resp.code(), Some(438));
    alice.nonce = Some(String::from_utf8(resp.attr(ATTR_NONCE).unwrap()).unwrap());
    let req = alice.request(METHOD_REFRESH, |_| {});
    assert!(h.call(&alice, &req).is_success());
    assert_eq!(h.server.stats().stale_nonce_verified, 1);

    // The same stale request with a wrong key is one more unauthenticated answer: held back.
    let mut mallory = Client::new("192.0.2.1:5000", "alice", "guess");
    mallory.nonce = Some("not-a-nonce".into());
    let req = mallory.request(METHOD_REFRESH, |_| {});
    h.call_no_reply(&mallory, &req);
    assert_eq!(h.server.stats().stale_nonce_verified, 1);
}

#[test]
fn binding_requests_beyond_the_source_rate_are_not_answered() {
    let mut h = Harness::new();
    let burst = UNAUTHENTICATED_BURST_PER_SOURCE as u64;
    let mut answered = 0;
    for port in 0..100u16 {
        let c = Client::new(&format!("198.51.100.77:{}", 2000 + port), "x", "y");
        let req = c.request_with_txid(METHOD_BINDING, [1; 12], |_| {});
        answered += h.send(&c, &req).len() as u64;
    }
    assert_eq!(answered, burst);
    let stats = h.server.stats();
    assert_eq!(stats.responses_for(RequestMethod::Binding, 200), burst);
    assert_eq!(stats.unauthenticated_source_limited, 100 - burst);
    // One more per 1/20 s.
    h.now += Duration::from_millis(50);
    let mut c = Client::new("198.51.100.77:9999", "x", "y");
    let req = c.request(METHOD_BINDING, |_| {});
    assert!(h.call(&c, &req).is_success());
    let req = c.request(METHOD_BINDING, |_| {});
    h.call_no_reply(&c, &req);
    // Over TCP the source is proven and nothing is reflected: answered.
    c.transport = Transport::Tcp;
    let req = c.request(METHOD_BINDING, |_| {});
    assert!(h.call(&c, &req).is_success());
}

#[test]
fn the_source_table_stays_within_its_capacity() {
    let capacity = 256;
    let mut h = Harness::with(|c| {
        c.source_table_capacity = capacity;
        c.unauthorized_rate = None;
    });
    for i in 0..20_000u32 {
        let ip = if i % 2 == 0 {
            IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))
        } else {
            let v6 = (0x2001_0db8_u128 << 96) | (u128::from(i) << 64);
            IpAddr::from(std::net::Ipv6Addr::from(v6))
        };
        let c = Client::new(&SocketAddr::new(ip, 5000).to_string(), "x", "y");
        let req = c.request_with_txid(METHOD_BINDING, [2; 12], |_| {});
        assert_eq!(h.send(&c, &req).len(), 1, "a new source has its burst");
        let held = h.server.sources.as_ref().map_or(0, |s| s.len());
        assert!(held <= capacity, "{held} sources held");
    }
}

#[test]
fn errors_before_authentication_count_against_the_source() {
    let mut h = Harness::with(|c| c.unauthenticated_per_source = Some(SourceRate::new(1, 2)));
    let mut c = Client::alice();
    let mut connect = MessageType::default();
    connect.read_value(0x000a);
    let req = c.request(connect.method, |_| {});
    assert_eq!(h.call(&c, &req).code(), Some(400));
    let req = c.request(METHOD_BINDING, |b| {
        b.raw(AttrType(0x7777), &[1, 2, 3, 4]);
    });
    assert_eq!(h.call(&c, &req).code(), Some(420));
    let req = c.request(connect.method, |_| {});
    h.call_no_reply(&c, &req);
    assert_eq!(h.server.stats().unauthenticated_source_limited, 1);
}

#[test]
fn permissions_beyond_the_cap_get_508() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    let peer = |i: usize| format!("8.8.{}.{}:9", i / 200, i % 200 + 1);
    for i in 0..MAX_PERMISSIONS_PER_ALLOCATION {
        assert!(h.permit(&mut c, &peer(i)).is_success(), "permission {i}");
    }
    let over = peer(MAX_PERMISSIONS_PER_ALLOCATION);
    assert_eq!(h.permit(&mut c, &over).code(), Some(508));
    // A refresh of held permissions is no new one.
    assert!(h.permit(&mut c, &peer(0)).is_success());
    // All or nothing (RFC 8656 §10.2): held and new together are refused.
    let req = c.request(METHOD_CREATE_PERMISSION, |b| {
        peer_attr(b, &peer(1));
        peer_attr(b, &over);
    });
    assert_eq!(h.call(&c, &req).code(), Some(508));
    // A ChannelBind needs a permission too.
    let out = h.bind(&mut c, 0x4000, &over);
    assert_eq!(Resp(out[0].payload().to_vec()).code(), Some(508));
    assert!(h.bind_acked(&mut c, 0x4000, &peer(2)).is_success());
    let stats = h.server.stats();
    assert_eq!(stats.permission_cap_reached, 3);
    assert_eq!(
        stats.permissions_active,
        MAX_PERMISSIONS_PER_ALLOCATION as u64
    );
    assert_eq!(stats.responses_for(RequestMethod::CreatePermission, 508), 2);
}

#[test]
fn channels_beyond_the_cap_get_508() {
    let mut h = Harness::with(|c| c.max_channels_per_allocation = 2);
    let mut c = Client::alice();
    h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    assert!(h.bind_acked(&mut c, 0x4001, PEER2).is_success());
    let out = h.bind(&mut c, 0x4002, "8.8.4.4:53");
    assert_eq!(Resp(out[0].payload().to_vec()).code(), Some(508));
    assert!(
        h.take_commands().is_empty(),
        "nothing installed for a refused bind"
    );
    // Refreshing a bound channel is always possible.
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    let stats = h.server.stats();
    assert_eq!((stats.channel_cap_reached, stats.channels_active), (1, 2));
    assert_eq!(stats.responses_for(RequestMethod::ChannelBind, 508), 1);
    // Once they expire, another may be bound.
    let req = refresh_for(&mut c, 3600);
    assert!(h.call(&c, &req).is_success());
    h.advance(CHANNEL_LIFETIME);
    assert!(h.bind_acked(&mut c, 0x4002, "8.8.4.4:53").is_success());
}

/// Binds `channels` channels on a new allocation of `client`, each installed and acknowledged
/// by the data plane.
fn bind_installed(h: &mut Harness, client: &mut Client, channels: u16) {
    h.allocate(client);
    for i in 0..channels {
        let peer = format!("8.8.8.8:{}", 10_000 + i);
        assert!(h.bind_acked(client, 0x4000 + i, &peer).is_success());
    }
}

fn installs(commands: &[Command]) -> usize {
    commands
        .iter()
        .filter(|c| matches!(c, Command::InstallChannel { .. }))
        .count()
}

#[test]
fn a_user_past_its_data_plane_share_is_relayed_in_user_space() {
    let mut h = Harness::new();
    // 1024 bindings over eleven allocations of alice (100 channels each at most).
    let per_allocation = 100u16;
    let full = USER_KERNEL_BINDINGS / usize::from(per_allocation);
    for i in 0..full {
        let mut c = Client::new(&format!("192.0.2.1:{}", 6000 + i), "alice", "alice-pw");
        bind_installed(&mut h, &mut c, per_allocation);
    }
    let rest = (USER_KERNEL_BINDINGS % usize::from(per_allocation)) as u16;
    let mut last = Client::new("192.0.2.1:7000", "alice", "alice-pw");
    let relay = {
        let relay = h.allocate(&mut last);
        for i in 0..rest {
            let peer = format!("8.8.8.8:{}", 10_000 + i);
            assert!(h.bind_acked(&mut last, 0x4000 + i, &peer).is_success());
        }
        relay
    };
    let quotas = h.server.config.quotas.clone();
    assert_eq!(quotas.kernel_bindings("alice"), USER_KERNEL_BINDINGS);
    assert_eq!(h.server.channel_bindings().count(), USER_KERNEL_BINDINGS);
    h.take_commands();

    // The 1025th: bound and answered at once, not sent to the data plane.
    let number = 0x4000 + rest;
    let peer = "9.9.9.9:7";
    let out = h.bind(&mut last, number, peer);
    assert_eq!(out.len(), 1, "not held for an install");
    assert!(Resp(out[0].payload().to_vec()).is_success());
    assert_eq!(installs(&h.take_commands()), 0);
    assert_eq!(h.server.stats().kernel_share_exceeded, 1);
    assert_eq!(h.server.channel_bindings().count(), USER_KERNEL_BINDINGS);
    // Relayed in user space, both ways.
    let out = h.send(&last, &channel_data(number, b"up"));
    assert_eq!(
        out,
        vec![Transmit::ToPeer {
            relay,
            peer: PeerAddr(sa(peer)),
            payload: b"up".to_vec(),
        }]
    );
    let out = h.peer_send(relay, peer, b"down");
    assert_eq!(out[0].payload(), &channel_data(number, b"down")[..]);

    // Other users have shares of their own.
    let mut bob = Client::new("192.0.2.2:5000", "bob", "bob-pw");
    h.allocate(&mut bob);
    assert!(
        h.bind(&mut bob, 0x4000, PEER).is_empty(),
        "held for its install"
    );
    assert_eq!(installs(&h.take_commands()), 1);

    // Alice's share comes back with her bindings.
    let req = refresh_for(&mut last, 0);
    assert!(h.call(&last, &req).is_success());
    assert_eq!(
        quotas.kernel_bindings("alice"),
        USER_KERNEL_BINDINGS - usize::from(rest)
    );
    let mut again = Client::new("192.0.2.1:7001", "alice", "alice-pw");
    h.allocate(&mut again);
    assert!(
        h.bind(&mut again, 0x4000, PEER).is_empty(),
        "held for its install"
    );
    assert_eq!(installs(&h.take_commands()), 1);
}

#[test]
fn the_data_plane_share_holds_across_cores_and_follows_every_removal() {
    let quotas = QuotaLedger::shared();
    let mut cores = [0u16, 1].map(|index| {
        Harness::with(|c| {
            c.core_index = u32::from(index);
            c.port_range = 50000 + 100 * index..=50099 + 100 * index;
            c.quotas = quotas.clone();
            c.user_kernel_bindings = 2;
        })
    });
    cores[0].now = cores[1].now;
    let [core0, core1] = &mut cores;
    let mut a = Client::alice();
    bind_installed(core0, &mut a, 2);
    let req = refresh_for(&mut a, 3600);
    assert!(core0.call(&a, &req).is_success());
    let mut b = Client::new("192.0.2.1:5001", "alice", "alice-pw");
    core1.allocate(&mut b);
    assert_eq!(core1.bind(&mut b, 0x4000, PEER).len(), 1, "user space");
    assert_eq!(core1.server.stats().kernel_share_exceeded, 1);

    // A failed install gives its share back.
    let relay = core0
        .server
        .allocations
        .values()
        .next()
        .unwrap()
        .relay_v4
        .unwrap();
    let binding = channel_binding(&a, relay, 0x4001, "8.8.8.8:10001");
    core0
        .server
        .channel_installed(core0.now, &binding, Err(OffloadError::Unavailable));
    assert_eq!(quotas.kernel_bindings("alice"), 1);
    // So does a lapsed permission; it takes the share again when it comes back.
    advance_both(&mut cores, crate::config::PERMISSION_LIFETIME);
    assert_eq!(quotas.kernel_bindings("alice"), 0);
    let [core0, _] = &mut cores;
    assert!(core0.permit(&mut a, "8.8.8.8:1").is_success());
    assert_eq!(quotas.kernel_bindings("alice"), 2);
    // And the channels' expiry, and the allocation's deletion.
    advance_both(&mut cores, CHANNEL_LIFETIME);
    assert_eq!(quotas.kernel_bindings("alice"), 0);
    let [core0, _] = &mut cores;
    assert!(core0.bind_acked(&mut a, 0x4005, PEER).is_success());
    assert_eq!(quotas.kernel_bindings("alice"), 1);
    let req = refresh_for(&mut a, 0);
    assert!(core0.call(&a, &req).is_success());
    assert_eq!(quotas.kernel_bindings("alice"), 0);
}

fn advance_both(cores: &mut [Harness; 2], d: Duration) {
    for h in cores {
        h.advance(d);
    }
}

#[test]
fn alternating_refresh_lifetimes_keep_one_timer_per_object() {
    let mut h = Harness::with(|c| c.default_lifetime = Duration::from_secs(60));
    let mut c = Client::alice();
    h.allocate(&mut c);
    assert!(h.permit(&mut c, PEER).is_success());
    // The allocation and the permission (which lives 300 s, longer than the loop).
    assert_eq!(h.server.pending_timers(), 2);
    for i in 0..100_000u32 {
        h.now += Duration::from_millis(1);
        let req = refresh_for(&mut c, if i % 2 == 0 { 600 } else { 60 });
        assert!(h.call(&c, &req).is_success());
        assert_eq!(h.server.pending_timers(), 2, "refresh {i}");
    }
    // The last Refresh asked for 60 s, and it holds.
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.now + Duration::from_secs(60))
    );
    h.advance(Duration::from_secs(60));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.pending_timers(), 0);
}

#[test]
fn deleted_objects_take_their_timers_along() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    for _ in 0..1000 {
        h.allocate(&mut c);
        assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
        let req = refresh_for(&mut c, 0);
        assert!(h.call(&c, &req).is_success());
        assert_eq!(h.server.pending_timers(), 0);
    }
}

#[test]
fn default_limits() {
    let config = Config::new(REALM, [0; 32]);
    assert_eq!(config.unauthorized_rate, Some(5000));
    assert_eq!(
        config.unauthenticated_per_source,
        Some(SourceRate::new(20, 40))
    );
    assert_eq!(
        (
            config.max_permissions_per_allocation,
            config.max_channels_per_allocation,
            config.user_kernel_bindings
        ),
        (100, 100, 1024)
    );
    // A daemon of eight cores: a source gets its rate in all, and each core a few answers at
    // once.
    let share = SourceRate::new(20, 40).share(8);
    assert_eq!((share.per_second(), share.burst()), (2.5, 5.0));
    let share = SourceRate::new(20, 40).share(64);
    assert_eq!((share.per_second(), share.burst()), (20.0 / 64.0, 4.0));
    let share = SourceRate::new(20, 2).share(64);
    assert_eq!(share.burst(), 2.0);
}
