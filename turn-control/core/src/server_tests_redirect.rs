//! Draining and load shedding (RFC 8489 §10 ALTERNATE-SERVER): a new Allocate gets 300 (Try
//! Alternate) naming the first alternate of the client's family, signed with its key; 508
//! without one; allocations made before keep working; through the harness of
//! `server_tests.rs`.

use super::*;
use crate::QuotaLedger;
use crate::stun::{ATTR_ALTERNATE_DOMAIN, ATTR_ALTERNATE_SERVER};

const ALTERNATE4: &str = "203.0.113.9:3478";
const ALTERNATE6: &str = "[2001:db8::9]:3479";

fn with_alternates() -> Harness {
    Harness::with(|c| {
        c.alternate_servers = vec![sa(ALTERNATE6), sa(ALTERNATE4), sa("203.0.113.10:3478")];
    })
}

#[test]
fn a_draining_server_redirects_new_allocates_and_keeps_the_old_ones() {
    let mut h = with_alternates();
    let mut old = Client::alice();
    let relay = h.allocate(&mut old);
    h.server.set_draining(true);
    assert!(h.server.is_draining());

    let mut new = Client::new("192.0.2.2:5000", "bob", "bob-pw");
    let resp = h.allocate_with(&mut new, |_| {});
    assert_eq!(resp.class(), CLASS_ERROR_RESPONSE);
    assert_eq!(resp.code(), Some(300));
    // ALTERNATE-SERVER of the client's family (IPv4), not XORed: zero, family 1, port, address.
    assert_eq!(
        resp.attr(ATTR_ALTERNATE_SERVER).unwrap(),
        [0, 1, 0x0d, 0x96, 203, 0, 113, 9]
    );
    assert_eq!(resp.attr(ATTR_ALTERNATE_DOMAIN), None);
    // RFC 8489 §10: signed with the request's key, so the client can trust it.
    assert!(resp.integrity_ok(&new.key));
    assert!(resp.has_fingerprint());
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(h.server.stats().redirected_drain, 1);
    assert_eq!(
        h.server.stats().responses_for(RequestMethod::Allocate, 300),
        1
    );

    // The allocation made before lives on: Refresh, CreatePermission, data.
    let req = refresh_for(&mut old, 600);
    assert!(h.call(&old, &req).is_success());
    assert!(h.permit(&mut old, PEER).is_success());
    let out = h.peer_send(relay, PEER, b"still relayed");
    assert_eq!(out.len(), 1);
    // Its deletion leaves none.
    let req = refresh_for(&mut old, 0);
    assert!(h.call(&old, &req).is_success());
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn an_ipv6_client_is_sent_to_the_ipv6_alternate_with_the_domain() {
    let mut h = Harness::with(|c| {
        c.alternate_servers = vec![sa(ALTERNATE4), sa(ALTERNATE6)];
        c.alternate_domain = Some("turn.example.org".to_owned());
    });
    h.server.set_draining(true);
    let mut c = Client::new("[2001:db8::1]:5000", "alice", "alice-pw");
    let resp = h.allocate_with(&mut c, |_| {});
    assert_eq!(resp.code(), Some(300));
    let mut want = vec![0, 2, 0x0d, 0x97];
    want.extend_from_slice(
        &"2001:db8::9"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    assert_eq!(resp.attr(ATTR_ALTERNATE_SERVER).unwrap(), want);
    assert_eq!(
        resp.attr(ATTR_ALTERNATE_DOMAIN).unwrap(),
        b"turn.example.org"
    );
}

#[test]
fn without_an_alternate_of_the_family_a_draining_server_answers_508() {
    let mut h = Harness::with(|c| c.alternate_servers = vec![sa(ALTERNATE6)]);
    h.server.set_draining(true);
    let resp = h.allocate_with(&mut Client::alice(), |_| {});
    assert_eq!(resp.code(), Some(508));
    assert_eq!(resp.attr(ATTR_ALTERNATE_SERVER), None);
    // Reloaded alternates count at once.
    h.server.set_alternates(vec![sa(ALTERNATE4)], None);
    let resp = h.allocate_with(&mut Client::alice(), |_| {});
    assert_eq!(resp.code(), Some(300));
    // Draining ends: allocations are made again.
    h.server.set_draining(false);
    h.allocate(&mut Client::alice());
}

#[test]
fn an_unauthenticated_allocate_gets_its_401_not_a_redirect() {
    let mut h = with_alternates();
    h.server.set_draining(true);
    let mut c = Client::alice();
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    assert_eq!(h.call(&c, &req).code(), Some(401));
}

#[test]
fn a_retransmitted_allocate_of_an_allocation_made_before_the_drain_gets_its_success() {
    let mut h = with_alternates();
    let mut c = Client::alice();
    h.login(&mut c);
    let txid = c.next_txid();
    let req = c.request_with_txid(METHOD_ALLOCATE, txid, udp_transport);
    assert!(h.call(&c, &req).is_success());
    h.server.set_draining(true);
    assert!(h.call(&c, &req).is_success());
}

#[test]
fn shedding_redirects_once_the_shared_ledger_holds_the_threshold() {
    let quotas = QuotaLedger::shared();
    let shed = |quotas: &std::sync::Arc<QuotaLedger>| {
        let quotas = std::sync::Arc::clone(quotas);
        Harness::with(move |c| {
            c.alternate_servers = vec![sa(ALTERNATE4)];
            c.shed_allocations = Some(2);
            c.quotas = quotas;
        })
    };
    // Two cores sharing the ledger: one allocation on each reaches the threshold.
    let (mut one, mut two) = (shed(&quotas), shed(&quotas));
    one.allocate(&mut Client::alice());
    two.allocate(&mut Client::new("192.0.2.2:5000", "bob", "bob-pw"));
    let mut third = Client::new("192.0.2.3:5000", "alice", "alice-pw");
    let resp = one.allocate_with(&mut third, |_| {});
    assert_eq!(resp.code(), Some(300));
    assert_eq!(one.server.stats().redirected_load, 1);
    assert_eq!(one.server.stats().redirected_drain, 0);
    // Below the threshold again, it is served.
    two.server.shutdown();
    two.drain();
    assert_eq!(quotas.total(), 1);
    one.allocate(&mut third);
}
