//! Unit and scenario tests of [`Server`], driven with simulated time.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use proptest::prelude::*;
use rtc_stun::attributes::*;
use rtc_stun::message::*;

use super::*;
use crate::auth::{SigningKey, long_term_key, rest_password, verify_integrity};
use crate::stun::{
    ATTR_ADDITIONAL_ADDRESS_FAMILY, ATTR_ADDITIONAL_ADDRESS_FAMILY_DRAFT, ATTR_ADDRESS_ERROR_CODE,
    Builder, error_code, parse,
};
use crate::{Change, RestoreRefusal, Restored, SavedChannel};

const REALM: &str = "example.org";
const LISTEN: &str = "198.51.100.1:3478";
const RELAY4: &str = "198.51.100.7";
const RELAY6: &str = "2001:4860:4860::7";
const PEER: &str = "8.8.8.8:5000";
const PEER2: &str = "1.1.1.1:6000";
const PEER6: &str = "[2a00:1450::1]:7000";
const UNIX_START: u64 = 1_700_000_000;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn config() -> Config {
    let mut config = Config::new(REALM, [42; 32]);
    config.credentials = Credentials::new(REALM)
        .with_user("alice", "alice-pw")
        .with_user("bob", "bob-pw")
        .with_rest_secret(b"old-secret".to_vec())
        .with_rest_secret(b"new-secret".to_vec());
    config.relay_ipv4 = Some(RELAY4.parse().unwrap());
    config.listeners = vec![sa(LISTEN)];
    // Long scenarios would otherwise need to follow 438s; `stale_and_foreign_nonces_get_438`
    // tests the default.
    config.nonce_lifetime = Duration::from_secs(86_400);
    // Interim accounting records have tests of their own (`server_tests_usage.rs`).
    config.interim_interval = None;
    config
}

struct Client {
    addr: ClientAddr,
    transport: Transport,
    user: String,
    key: [u8; 16],
    nonce: Option<String>,
    txid: u8,
}

impl Client {
    fn new(addr: &str, user: &str, password: &str) -> Self {
        Self {
            addr: ClientAddr(sa(addr)),
            transport: Transport::Udp,
            user: user.to_owned(),
            key: long_term_key(user, REALM, password),
            nonce: None,
            txid: 0,
        }
    }

    fn alice() -> Self {
        Self::new("192.0.2.1:5000", "alice", "alice-pw")
    }

    fn next_txid(&mut self) -> [u8; 12] {
        self.txid = self.txid.wrapping_add(1);
        let mut t = [self.txid; 12];
        t[0] = self.addr.0.port() as u8;
        t
    }

    /// A request with the given attributes, authenticated when a nonce is known.
    fn request(&mut self, method: Method, f: impl FnOnce(&mut Builder)) -> Vec<u8> {
        let txid = self.next_txid();
        self.request_with_txid(method, txid, f)
    }

    fn request_with_txid(
        &self,
        method: Method,
        txid: [u8; 12],
        f: impl FnOnce(&mut Builder),
    ) -> Vec<u8> {
        let mut b = Builder::new(method, CLASS_REQUEST, TransactionId(txid));
        f(&mut b);
        match &self.nonce {
            Some(nonce) => {
                b.raw(ATTR_USERNAME, self.user.as_bytes())
                    .raw(ATTR_REALM, REALM.as_bytes())
                    .raw(ATTR_NONCE, nonce.as_bytes());
                b.finish(None, Some(&SigningKey::classic(self.key)), true)
            }
            None => b.finish(None, None, true),
        }
    }
}

fn udp_transport(b: &mut Builder) {
    b.raw(ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
}

fn peer_attr(b: &mut Builder, peer: &str) {
    b.xor_address(ATTR_XOR_PEER_ADDRESS, sa(peer));
}

fn channel_attr(b: &mut Builder, n: u16) {
    let [hi, lo] = n.to_be_bytes();
    b.raw(ATTR_CHANNEL_NUMBER, &[hi, lo, 0, 0]);
}

/// A decoded response.
#[derive(Debug, Clone)]
struct Resp(Vec<u8>);

impl Resp {
    fn class(&self) -> MessageClass {
        parse(&self.0).unwrap().class()
    }
    fn code(&self) -> Option<u16> {
        error_code(&parse(&self.0).unwrap())
    }
    fn is_success(&self) -> bool {
        self.class() == CLASS_SUCCESS_RESPONSE
    }
    fn attr(&self, t: AttrType) -> Option<Vec<u8>> {
        parse(&self.0).unwrap().attr(t).map(<[u8]>::to_vec)
    }
    fn addresses(&self, t: AttrType) -> Vec<SocketAddr> {
        let p = parse(&self.0).unwrap();
        p.attrs(t).filter_map(|v| p.xor_address(v)).collect()
    }
    fn lifetime(&self) -> Option<u32> {
        self.attr(ATTR_LIFETIME)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }
    /// FINGERPRINT is the last attribute (after MESSAGE-INTEGRITY, where `attr` stops).
    fn has_fingerprint(&self) -> bool {
        let n = self.0.len();
        n >= 28 && self.0[n - 8..n - 4] == [0x80, 0x28, 0x00, 0x04]
    }
    fn integrity_ok(&self, key: &[u8; 16]) -> bool {
        let p = parse(&self.0).unwrap();
        p.integrity_input()
            .is_some_and(|(prefix, len, mac)| verify_integrity(key, prefix, len, mac))
    }
}

struct Harness {
    server: Server,
    now: Instant,
    commands: Vec<Command>,
    /// The accounting records, kept apart from the other commands.
    records: Vec<UsageRecord>,
    /// Answer each [`Command::RemoveChannel`] at once, as a data plane that relayed nothing
    /// on the binding.
    answer_removals: bool,
}

impl Harness {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(f: impl FnOnce(&mut Config)) -> Self {
        let mut config = config();
        f(&mut config);
        let now = Instant::now();
        let unix = SystemTime::UNIX_EPOCH + Duration::from_secs(UNIX_START);
        Self {
            server: Server::new(config, now, unix).unwrap(),
            now,
            commands: Vec::new(),
            records: Vec::new(),
            answer_removals: true,
        }
    }

    fn unix_now(&self) -> u64 {
        self.server.wall.unix_secs(self.now)
    }

    /// Sends `bytes` from `client`, returns everything transmitted; commands are collected.
    fn send(&mut self, client: &Client, bytes: &[u8]) -> Vec<Transmit> {
        self.server
            .handle_client(self.now, client.transport, sa(LISTEN), client.addr, bytes);
        self.drain()
    }

    /// Carries out the commands as the daemon does (every relay port binds, every reserved
    /// socket is adopted) and collects them, then returns the transmits.
    fn drain(&mut self) -> Vec<Transmit> {
        while let Some(c) = self.server.poll_command() {
            if let Command::Account { record } = c {
                self.records.push(record);
                continue;
            }
            if let Command::RemoveChannel { binding } = &c
                && self.answer_removals
            {
                let none = crate::Usage::default();
                self.server.channel_removed(self.now, binding, Some(none));
            }
            if let Command::BindRelayPort { relay, .. }
            | Command::ReservePort { relay, .. }
            | Command::AdoptReservedPort { relay, .. } = c
            {
                self.server.relay_bound(self.now, relay);
            }
            self.commands.push(c);
        }
        std::iter::from_fn(|| self.server.poll_transmit()).collect()
    }

    fn take_commands(&mut self) -> Vec<Command> {
        self.drain();
        std::mem::take(&mut self.commands)
    }

    /// Sends a request and returns the single response.
    fn call(&mut self, client: &Client, bytes: &[u8]) -> Resp {
        let out = self.send(client, bytes);
        assert_eq!(out.len(), 1, "expected one response, got {out:?}");
        match &out[0] {
            Transmit::ToClient {
                client: to,
                server,
                transport,
                payload,
            } => {
                assert_eq!(*to, client.addr);
                assert_eq!(*server, sa(LISTEN));
                assert_eq!(*transport, client.transport);
                Resp(payload.clone())
            }
            other => panic!("not a response: {other:?}"),
        }
    }

    fn call_no_reply(&mut self, client: &Client, bytes: &[u8]) {
        let out = self.send(client, bytes);
        assert!(out.is_empty(), "expected no output, got {out:?}");
    }

    /// Gets a nonce with an unauthenticated request (401).
    fn login(&mut self, client: &mut Client) {
        client.nonce = None;
        let req = client.request(METHOD_ALLOCATE, udp_transport);
        let resp = self.call(client, &req);
        assert_eq!(resp.code(), Some(401));
        let nonce = resp.attr(ATTR_NONCE).unwrap();
        client.nonce = Some(String::from_utf8(nonce).unwrap());
    }

    fn allocate_with(&mut self, client: &mut Client, f: impl FnOnce(&mut Builder)) -> Resp {
        if client.nonce.is_none() {
            self.login(client);
        }
        let req = client.request(METHOD_ALLOCATE, |b| {
            udp_transport(b);
            f(b);
        });
        self.call(client, &req)
    }

    fn allocate(&mut self, client: &mut Client) -> RelayAddr {
        let resp = self.allocate_with(client, |_| {});
        assert!(resp.is_success(), "allocate failed: {:?}", resp.code());
        RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0])
    }

    fn permit(&mut self, client: &mut Client, peer: &str) -> Resp {
        let req = client.request(METHOD_CREATE_PERMISSION, |b| peer_attr(b, peer));
        self.call(client, &req)
    }

    /// ChannelBind; returns the output (the response may be held).
    fn bind(&mut self, client: &mut Client, n: u16, peer: &str) -> Vec<Transmit> {
        let req = client.request(METHOD_CHANNEL_BIND, |b| {
            channel_attr(b, n);
            peer_attr(b, peer);
        });
        self.send(client, &req)
    }

    fn bind_acked(&mut self, client: &mut Client, n: u16, peer: &str) -> Resp {
        let out = self.bind(client, n, peer);
        if out.len() == 1 {
            return Resp(out[0].payload().to_vec());
        }
        assert!(out.is_empty());
        // Earlier requests, and this bind for other channels to the same IP, may have
        // re-installed other bindings with new expiries.
        let wanted = |b: &ChannelBinding| b.channel.value() == n && b.peer.0 == sa(peer);
        let binding = self
            .take_commands()
            .into_iter()
            .find_map(|c| match c {
                Command::InstallChannel { binding, .. } if wanted(&binding) => Some(binding),
                _ => None,
            })
            .unwrap();
        self.server.channel_installed(self.now, &binding, Ok(()));
        let out = self.drain();
        assert_eq!(out.len(), 1);
        Resp(out[0].payload().to_vec())
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.server.handle_timeout(self.now);
    }

    fn peer_send(&mut self, relay: RelayAddr, peer: &str, data: &[u8]) -> Vec<Transmit> {
        self.server
            .handle_peer(self.now, relay, PeerAddr(sa(peer)), data);
        self.drain()
    }
}

/// The data-plane binding of `client`'s channel `n` to `peer` through `relay`.
fn channel_binding(client: &Client, relay: RelayAddr, n: u16, peer: &str) -> ChannelBinding {
    ChannelBinding {
        client: client.addr,
        server: sa(LISTEN),
        transport: client.transport,
        relay,
        peer: PeerAddr(sa(peer)),
        channel: ChannelNumber::new(n).unwrap(),
        dont_fragment: false,
    }
}

/// A Refresh asking for `secs` of lifetime.
fn refresh_for(client: &mut Client, secs: u32) -> Vec<u8> {
    client.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_LIFETIME, &secs.to_be_bytes());
    })
}

fn channel_data(n: u16, payload: &[u8]) -> Vec<u8> {
    ChannelData {
        channel: ChannelNumber::new(n).unwrap(),
        payload,
    }
    .encode(Transport::Udp)
}

// ---- Binding ------------------------------------------------------------------------------

#[test]
fn binding_answers_with_xor_mapped_address_software_and_fingerprint() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let req = c.request(METHOD_BINDING, |_| {});
    let resp = h.call(&c, &req);
    assert!(resp.is_success());
    assert_eq!(resp.addresses(ATTR_XORMAPPED_ADDRESS), vec![c.addr.0]);
    assert!(resp.attr(ATTR_SOFTWARE).is_some());
    assert!(resp.has_fingerprint());
    assert_eq!(
        h.server.stats().responses_for(RequestMethod::Binding, 200),
        1
    );
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn binding_with_unknown_required_attribute_gets_420() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let req = c.request(METHOD_BINDING, |b| {
        b.raw(AttrType(0x7777), &[1, 2, 3, 4]);
        // Comprehension-optional unknowns are ignored.
        b.raw(AttrType(0xC001), &[1]);
    });
    let resp = h.call(&c, &req);
    assert_eq!(resp.code(), Some(420));
    assert_eq!(resp.attr(ATTR_UNKNOWN_ATTRIBUTES), Some(vec![0x77, 0x77]));
}

#[test]
fn unknown_request_method_gets_400_and_other_classes_are_dropped() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let mut connect = MessageType::default();
    connect.read_value(0x000a);
    let req = c.request(connect.method, |_| {});
    assert_eq!(h.call(&c, &req).code(), Some(400));
    let mut b = Builder::new(
        METHOD_BINDING,
        CLASS_SUCCESS_RESPONSE,
        TransactionId([1; 12]),
    );
    b.raw(ATTR_SOFTWARE, b"x");
    h.call_no_reply(&c, &b.finish(None, None, true));
}

#[test]
fn bad_fingerprint_and_garbage_are_dropped() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let mut req = c.request(METHOD_BINDING, |_| {});
    let last = req.len() - 1;
    req[last] ^= 0xff;
    h.call_no_reply(&c, &req);
    h.call_no_reply(&c, &[]);
    h.call_no_reply(&c, &[0xff; 40]);
    h.call_no_reply(&c, &[0x00, 0x01, 0x00, 0x00]);
    assert_eq!(h.server.stats().dropped, 4);
}

// ---- Authentication -----------------------------------------------------------------------

#[test]
fn unauthenticated_request_gets_401_with_realm_and_nonce_and_no_state() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    let resp = h.call(&c, &req);
    assert_eq!(resp.code(), Some(401));
    assert_eq!(resp.attr(ATTR_REALM), Some(REALM.as_bytes().to_vec()));
    assert!(resp.attr(ATTR_NONCE).is_some());
    assert!(resp.attr(ATTR_MESSAGE_INTEGRITY).is_none());
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.take_commands().is_empty());
    assert_eq!(h.server.poll_timeout(), None);
}

#[test]
fn allocate_success_carries_integrity_and_fingerprint() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |_| {});
    assert!(resp.is_success());
    assert!(resp.integrity_ok(&c.key));
    assert!(!resp.integrity_ok(&[0; 16]));
    assert!(resp.has_fingerprint());
    assert!(resp.attr(ATTR_SOFTWARE).is_some());
}

#[test]
fn wrong_password_unknown_user_and_missing_username() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.1:5000", "alice", "wrong");
    let resp = h.allocate_with(&mut c, |_| {});
    assert_eq!(resp.code(), Some(401));
    assert!(resp.attr(ATTR_NONCE).is_some());
    let mut c = Client::new("192.0.2.2:5000", "mallory", "x");
    assert_eq!(h.allocate_with(&mut c, |_| {}).code(), Some(401));
    assert_eq!(h.server.stats().auth_failures, 2);

    // MESSAGE-INTEGRITY without USERNAME: 400.
    let mut b = Builder::new(METHOD_ALLOCATE, CLASS_REQUEST, TransactionId([9; 12]));
    udp_transport(&mut b);
    let req = b.finish(None, Some(&SigningKey::classic(c.key)), true);
    assert_eq!(h.call(&c, &req).code(), Some(400));
    // Wrong realm: 401.
    let mut a = Client::alice();
    h.login(&mut a);
    let nonce = a.nonce.clone().unwrap();
    let mut b = Builder::new(METHOD_ALLOCATE, CLASS_REQUEST, TransactionId([8; 12]));
    udp_transport(&mut b);
    b.raw(ATTR_USERNAME, b"alice")
        .raw(ATTR_REALM, b"other")
        .raw(ATTR_NONCE, nonce.as_bytes());
    let req = b.finish(
        None,
        Some(&SigningKey::classic(long_term_key(
            "alice", "other", "alice-pw",
        ))),
        true,
    );
    assert_eq!(h.call(&a, &req).code(), Some(401));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn stale_and_foreign_nonces_get_438() {
    let mut h = Harness::with(|c| c.nonce_lifetime = Config::new(REALM, [0; 32]).nonce_lifetime);
    let mut c = Client::alice();
    h.login(&mut c);
    // A nonce issued to another client address is not valid here.
    let mut other = Client::new("192.0.2.99:5000", "alice", "alice-pw");
    other.nonce = c.nonce.clone();
    let req = other.request(METHOD_ALLOCATE, udp_transport);
    let resp = h.call(&other, &req);
    assert_eq!(resp.code(), Some(438));
    assert!(resp.attr(ATTR_NONCE).is_some());
    // Garbage nonce.
    other.nonce = Some("not-a-nonce".into());
    let req = other.request(METHOD_ALLOCATE, udp_transport);
    assert_eq!(h.call(&other, &req).code(), Some(438));

    // The nonce goes stale after the configured lifetime (600 s).
    h.advance(Duration::from_secs(600));
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    let resp = h.call(&c, &req);
    assert_eq!(resp.code(), Some(438));
    c.nonce = Some(String::from_utf8(resp.attr(ATTR_NONCE).unwrap()).unwrap());
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    assert!(h.call(&c, &req).is_success());
}

#[test]
fn rest_api_credentials() {
    let mut h = Harness::new();
    let expiry = h.unix_now() + 3600;
    let user = format!("{expiry}:carol");
    for secret in [&b"old-secret"[..], b"new-secret"] {
        let mut c = Client::new(
            if secret == b"old-secret" {
                "192.0.2.5:1"
            } else {
                "192.0.2.6:1"
            },
            &user,
            &rest_password(secret, &user),
        );
        let resp = h.allocate_with(&mut c, |_| {});
        assert!(resp.is_success(), "{secret:?}");
    }
    // Wrong secret.
    let mut c = Client::new("192.0.2.7:1", &user, &rest_password(b"nope", &user));
    assert_eq!(h.allocate_with(&mut c, |_| {}).code(), Some(401));
    // Expired username.
    let old = format!("{}:carol", h.unix_now() - 1);
    let mut c = Client::new("192.0.2.8:1", &old, &rest_password(b"new-secret", &old));
    assert_eq!(h.allocate_with(&mut c, |_| {}).code(), Some(401));
    // A username that expires while the allocation lives can no longer refresh.
    let short = format!("{}:dave", h.unix_now() + 60);
    let mut c = Client::new("192.0.2.9:1", &short, &rest_password(b"new-secret", &short));
    h.allocate(&mut c);
    h.now += Duration::from_secs(61);
    let req = c.request(METHOD_REFRESH, |_| {});
    assert_eq!(h.call(&c, &req).code(), Some(401));
}

#[test]
fn credentials_reload_keeps_allocations() {
    let mut h = Harness::new();
    let mut alice = Client::alice();
    h.allocate(&mut alice);
    let new = Credentials::new(REALM).with_user("alice", "rotated");
    h.server.set_credentials(new).unwrap();
    assert_eq!(h.server.allocation_count(), 1);
    let req = alice.request(METHOD_REFRESH, |_| {});
    assert_eq!(h.call(&alice, &req).code(), Some(401));
    alice.key = long_term_key("alice", REALM, "rotated");
    let req = alice.request(METHOD_REFRESH, |_| {});
    assert!(h.call(&alice, &req).is_success());
    assert_eq!(
        h.server.set_credentials(Credentials::new("elsewhere")),
        Err(ConfigError::RealmMismatch)
    );
}

#[test]
fn unauthorized_answers_are_rate_limited() {
    let mut h = Harness::with(|c| c.unauthorized_rate = Some(2));
    let mut c = Client::alice();
    for _ in 0..2 {
        let req = c.request(METHOD_ALLOCATE, udp_transport);
        assert_eq!(h.call(&c, &req).code(), Some(401));
    }
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    h.call_no_reply(&c, &req);
    assert_eq!(h.server.stats().unauthorized_rate_limited, 1);
    h.advance(Duration::from_secs(1));
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    assert_eq!(h.call(&c, &req).code(), Some(401));
}

// ---- Allocate -----------------------------------------------------------------------------

#[test]
fn allocate_ipv4_binds_a_random_port_in_range() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |_| {});
    let relays = resp.addresses(ATTR_XOR_RELAYED_ADDRESS);
    assert_eq!(relays.len(), 1);
    let relay = RelayAddr(relays[0]);
    assert_eq!(relay.0.ip().to_string(), RELAY4);
    assert!(relay.0.port() >= 49152);
    assert_eq!(resp.lifetime(), Some(600));
    assert_eq!(resp.addresses(ATTR_XORMAPPED_ADDRESS), vec![c.addr.0]);
    assert_eq!(
        h.take_commands(),
        vec![Command::BindRelayPort {
            relay,
            dont_fragment: false
        }]
    );
    assert_eq!(h.server.stats().allocations_active, 1);

    // A second client gets a different port.
    let mut b = Client::new("192.0.2.2:5000", "bob", "bob-pw");
    let relay_b = h.allocate(&mut b);
    assert_ne!(relay_b.port(), relay.port());
}

#[test]
fn allocate_lifetime_is_clamped_between_default_and_max() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_LIFETIME, &10u32.to_be_bytes());
    });
    assert_eq!(resp.lifetime(), Some(600));
    let mut c = Client::new("192.0.2.2:1", "alice", "alice-pw");
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_LIFETIME, &7200u32.to_be_bytes());
    });
    assert_eq!(resp.lifetime(), Some(3600));
    let mut c = Client::new("192.0.2.3:1", "alice", "alice-pw");
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_LIFETIME, &1800u32.to_be_bytes());
    });
    assert_eq!(resp.lifetime(), Some(1800));
    let mut c = Client::new("192.0.2.4:1", "alice", "alice-pw");
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_LIFETIME, &[0, 1]);
    });
    assert_eq!(resp.code(), Some(400));
}

#[test]
fn allocate_retransmission_and_mismatch() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.login(&mut c);
    let txid = c.next_txid();
    let req = c.request_with_txid(METHOD_ALLOCATE, txid, udp_transport);
    let first = h.call(&c, &req);
    assert!(first.is_success());
    h.take_commands();
    // Same transaction: the same relayed address again, no new socket.
    let again = h.call(&c, &req);
    assert!(again.is_success());
    assert_eq!(
        again.addresses(ATTR_XOR_RELAYED_ADDRESS),
        first.addresses(ATTR_XOR_RELAYED_ADDRESS)
    );
    assert!(h.take_commands().is_empty());
    // A new Allocate on the same 5-tuple: 437.
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    assert_eq!(h.call(&c, &req).code(), Some(437));
}

#[test]
fn requested_transport_rules() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.login(&mut c);
    let req = c.request(METHOD_ALLOCATE, |_| {});
    assert_eq!(h.call(&c, &req).code(), Some(400));
    let req = c.request(METHOD_ALLOCATE, |b| {
        b.raw(ATTR_REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    });
    assert_eq!(h.call(&c, &req).code(), Some(442));
    assert_eq!(
        h.server.stats().responses_for(RequestMethod::Allocate, 442),
        1
    );
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn even_port_gives_an_even_port() {
    let mut h = Harness::new();
    for i in 0..20 {
        let mut c = Client::new(&format!("192.0.2.1:{}", 1000 + i), "alice", "alice-pw");
        let resp = h.allocate_with(&mut c, |b| {
            b.raw(ATTR_EVEN_PORT, &[0]);
        });
        let relay = resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0];
        assert_eq!(relay.port() % 2, 0);
    }
}

#[test]
fn address_families() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    // IPv6 only.
    let mut c = Client::new("192.0.2.1:1", "alice", "alice-pw");
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    let relays = resp.addresses(ATTR_XOR_RELAYED_ADDRESS);
    assert_eq!(relays.len(), 1);
    assert_eq!(relays[0].ip().to_string(), RELAY6);
    // Dual stack: both, on the same port, IPv4 first.
    let mut c = Client::new("192.0.2.2:1", "alice", "alice-pw");
    h.take_commands();
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    let relays = resp.addresses(ATTR_XOR_RELAYED_ADDRESS);
    assert_eq!(relays.len(), 2);
    assert!(relays[0].is_ipv4() && relays[1].is_ipv6());
    assert_eq!(relays[0].port(), relays[1].port());
    assert!(resp.attr(ATTR_ADDRESS_ERROR_CODE).is_none());
    let binds = h.take_commands();
    assert_eq!(binds.len(), 2);
    // Under its draft number (coturn's `turnutils_uclient -Z`): the same.
    let mut c = Client::new("192.0.2.4:1", "alice", "alice-pw");
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY_DRAFT, &[2, 0, 0, 0]);
    });
    let relays = resp.addresses(ATTR_XOR_RELAYED_ADDRESS);
    assert_eq!(relays.len(), 2, "{resp:?}");
    assert!(relays[0].is_ipv4() && relays[1].is_ipv6());
    assert_eq!(h.take_commands().len(), 2);
    // Both attributes: 400. ADDITIONAL-ADDRESS-FAMILY asking for IPv4: 400.
    let mut c = Client::new("192.0.2.3:1", "alice", "alice-pw");
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0]);
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(resp.code(), Some(400));
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[1, 0, 0, 0]);
    });
    assert_eq!(resp.code(), Some(400));
    // An unknown family value: 440.
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0]);
    });
    assert_eq!(resp.code(), Some(440));
}

#[test]
fn missing_families_give_440_or_address_error_code() {
    // IPv4-only server.
    let mut h = Harness::new();
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(resp.code(), Some(440));
    // Dual-stack request on an IPv4-only server: IPv4 plus ADDRESS-ERROR-CODE for IPv6.
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert!(resp.is_success());
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS).len(), 1);
    let aec = resp.attr(ATTR_ADDRESS_ERROR_CODE).unwrap();
    assert_eq!(&aec[..4], &[2, 0, 4, 40]);

    // IPv6-only server: no family means IPv4, which is missing.
    let mut h = Harness::with(|c| {
        c.relay_ipv4 = None;
        c.relay_ipv6 = Some(RELAY6.parse().unwrap());
    });
    let mut c = Client::alice();
    assert_eq!(h.allocate_with(&mut c, |_| {}).code(), Some(440));
}

#[test]
fn quotas() {
    let mut h = Harness::with(|c| {
        c.user_quota = Some(1);
        c.total_quota = Some(2);
    });
    let mut a1 = Client::new("192.0.2.1:1", "alice", "alice-pw");
    let mut a2 = Client::new("192.0.2.1:2", "alice", "alice-pw");
    h.allocate(&mut a1);
    assert_eq!(h.allocate_with(&mut a2, |_| {}).code(), Some(486));
    let mut b1 = Client::new("192.0.2.2:1", "bob", "bob-pw");
    h.allocate(&mut b1);
    let expiry = h.unix_now() + 100;
    let user = format!("{expiry}:carol");
    let mut c1 = Client::new("192.0.2.3:1", &user, &rest_password(b"new-secret", &user));
    assert_eq!(h.allocate_with(&mut c1, |_| {}).code(), Some(486));
    // Deleting frees the user's quota.
    let req = a1.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_LIFETIME, &0u32.to_be_bytes());
    });
    assert!(h.call(&a1, &req).is_success());
    let req = a2.request(METHOD_ALLOCATE, udp_transport);
    assert!(h.call(&a2, &req).is_success());
}

#[test]
fn ports_running_out_gives_508() {
    let mut h = Harness::with(|c| c.port_range = 50000..=50001);
    let mut a = Client::new("192.0.2.1:1", "alice", "alice-pw");
    let mut b = Client::new("192.0.2.1:2", "alice", "alice-pw");
    let mut c = Client::new("192.0.2.1:3", "alice", "alice-pw");
    let pa = h.allocate(&mut a).port();
    let pb = h.allocate(&mut b).port();
    assert_ne!(pa, pb);
    assert_eq!(h.allocate_with(&mut c, |_| {}).code(), Some(508));
}

// ---- Refresh ------------------------------------------------------------------------------

#[test]
fn refresh_extends_and_zero_deletes() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.take_commands();
    h.advance(Duration::from_secs(500));
    let req = c.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_LIFETIME, &1200u32.to_be_bytes());
    });
    let resp = h.call(&c, &req);
    assert_eq!(resp.lifetime(), Some(1200));
    assert!(resp.integrity_ok(&c.key));
    // The original 600 s have passed; the allocation lives on.
    h.advance(Duration::from_secs(200));
    assert_eq!(h.server.allocation_count(), 1);
    let req = c.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_LIFETIME, &0u32.to_be_bytes());
    });
    let resp = h.call(&c, &req);
    assert_eq!(resp.lifetime(), Some(0));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.take_commands(), vec![Command::FreeRelayPort { relay }]);
    // Now there is nothing to refresh.
    let req = c.request(METHOD_REFRESH, |_| {});
    assert_eq!(h.call(&c, &req).code(), Some(437));
}

#[test]
fn requests_need_the_allocation_owner() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    // Bob on Alice's 5-tuple (same client address): 441.
    let mut bob = Client::new("192.0.2.1:5000", "bob", "bob-pw");
    h.login(&mut bob);
    let req = bob.request(METHOD_REFRESH, |_| {});
    assert_eq!(h.call(&bob, &req).code(), Some(441));
    let req = bob.request(METHOD_CREATE_PERMISSION, |b| peer_attr(b, PEER));
    assert_eq!(h.call(&bob, &req).code(), Some(441));
    // Another 5-tuple without allocation: 437 for every method.
    let mut other = Client::new("192.0.2.50:1", "alice", "alice-pw");
    h.login(&mut other);
    for (method, expected) in [
        (METHOD_REFRESH, 437),
        (METHOD_CREATE_PERMISSION, 437),
        (METHOD_CHANNEL_BIND, 437),
    ] {
        let req = other.request(method, |b| {
            channel_attr(b, 0x4000);
            peer_attr(b, PEER);
        });
        assert_eq!(h.call(&other, &req).code(), Some(expected));
    }
}

#[test]
fn refresh_with_requested_family() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    let mut v4 = Client::new("192.0.2.1:1", "alice", "alice-pw");
    h.allocate(&mut v4);
    let req = v4.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(h.call(&v4, &req).code(), Some(443));

    // Dual stack: lifetime 0 with IPv6 frees only the IPv6 side.
    let mut dual = Client::new("192.0.2.2:1", "alice", "alice-pw");
    let resp = h.allocate_with(&mut dual, |b| {
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    let relays = resp.addresses(ATTR_XOR_RELAYED_ADDRESS);
    assert!(h.permit(&mut dual, PEER6).is_success());
    assert!(h.permit(&mut dual, PEER).is_success());
    h.take_commands();
    let req = dual.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        b.raw(ATTR_LIFETIME, &0u32.to_be_bytes());
    });
    assert!(h.call(&dual, &req).is_success());
    assert_eq!(
        h.take_commands(),
        vec![Command::FreeRelayPort {
            relay: RelayAddr(relays[1])
        }]
    );
    assert_eq!(h.server.allocation_count(), 2);
    // The IPv6 side is gone: IPv6 peers now mismatch, IPv4 peers still work.
    assert_eq!(h.permit(&mut dual, PEER6).code(), Some(443));
    assert!(h.permit(&mut dual, PEER).is_success());
}

// ---- CreatePermission and Send ------------------------------------------------------------

#[test]
fn create_permission_and_send_indication() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    let send = |c: &mut Client, peer: &str| {
        let mut b = Builder::new(METHOD_SEND, CLASS_INDICATION, TransactionId(c.next_txid()));
        peer_attr(&mut b, peer);
        b.raw(ATTR_DATA, b"hello");
        b.finish(None, None, true)
    };
    // No permission yet: dropped.
    let ind = send(&mut c, PEER);
    h.call_no_reply(&c, &ind);
    let resp = h.permit(&mut c, PEER);
    assert!(resp.is_success());
    assert!(resp.integrity_ok(&c.key));
    assert_eq!(h.server.stats().permissions_active, 1);
    // Permissions are per IP address: another port of the same peer is fine too.
    for peer in [PEER, "8.8.8.8:1"] {
        let ind = send(&mut c, peer);
        let out = h.send(&c, &ind);
        assert_eq!(
            out,
            vec![Transmit::ToPeer {
                relay,
                peer: PeerAddr(sa(peer)),
                payload: b"hello".to_vec()
            }]
        );
    }
    assert_eq!(h.server.stats().relayed_to_peer.packets, 2);
    // A Send without DATA is dropped; one to a denied peer is dropped and counted.
    let mut b = Builder::new(METHOD_SEND, CLASS_INDICATION, TransactionId([5; 12]));
    peer_attr(&mut b, PEER);
    h.call_no_reply(&c, &b.finish(None, None, false));
    let ind = send(&mut c, "127.0.0.1:53");
    h.call_no_reply(&c, &ind);
    assert_eq!(h.server.stats().peers_denied, 1);
}

#[test]
fn create_permission_errors() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    let req = c.request(METHOD_CREATE_PERMISSION, |_| {});
    assert_eq!(h.call(&c, &req).code(), Some(400));
    // A malformed address: 400.
    let req = c.request(METHOD_CREATE_PERMISSION, |b| {
        b.raw(ATTR_XOR_PEER_ADDRESS, &[0, 1, 0, 0, 1]);
    });
    assert_eq!(h.call(&c, &req).code(), Some(400));
    assert_eq!(h.permit(&mut c, PEER6).code(), Some(443));
    // All or nothing: one denied peer refuses the whole request.
    let req = c.request(METHOD_CREATE_PERMISSION, |b| {
        peer_attr(b, PEER);
        peer_attr(b, "10.0.0.1:1");
    });
    let resp = h.call(&c, &req);
    assert_eq!(resp.code(), Some(403));
    assert!(resp.integrity_ok(&c.key));
    assert_eq!(h.server.stats().permissions_active, 0);
    let req = c.request(METHOD_CREATE_PERMISSION, |b| {
        peer_attr(b, PEER);
        peer_attr(b, PEER2);
    });
    assert!(h.call(&c, &req).is_success());
    assert_eq!(h.server.stats().permissions_active, 2);
}

#[test]
fn cve_forms_are_refused_on_every_method() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    let mut c = Client::alice();
    h.allocate_with(&mut c, |b| {
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    let bad = [
        "0.0.0.0:80",
        "[::]:80",
        "[::1]:80",
        "127.0.0.1:80",
        "[::ffff:127.0.0.1]:80",
        "[::ffff:0.0.0.0]:80",
        "[::127.0.0.1]:80",
        "[64:ff9b::7f00:1]:80",
        "[::ffff:10.0.0.1]:80",
        "[::ffff:169.254.169.254]:80",
        "198.51.100.7:50000",
        "198.51.100.1:3478",
    ];
    for (i, peer) in bad.iter().enumerate() {
        assert_eq!(h.permit(&mut c, peer).code(), Some(403), "{peer}");
        let out = h.bind(&mut c, 0x4000 + i as u16, peer);
        assert_eq!(Resp(out[0].payload().to_vec()).code(), Some(403), "{peer}");
    }
    assert_eq!(h.server.stats().permissions_active, 0);
    assert_eq!(h.server.stats().channels_active, 0);
    assert_eq!(h.server.stats().peers_denied, 2 * bad.len() as u64);
}

#[test]
fn operator_lists_and_dev_mode() {
    let mut h = Harness::with(|c| {
        c.allow_peers = vec!["10.1.0.0/16".parse().unwrap()];
        c.deny_peers = vec!["8.8.8.0/24".parse().unwrap()];
    });
    let mut c = Client::alice();
    h.allocate(&mut c);
    assert!(h.permit(&mut c, "10.1.2.3:1").is_success());
    assert_eq!(h.permit(&mut c, PEER).code(), Some(403));
    assert!(h.permit(&mut c, PEER2).is_success());
    h.server.set_peer_lists(Vec::new(), Vec::new());
    assert!(h.permit(&mut c, PEER).is_success());
    assert_eq!(h.permit(&mut c, "10.1.2.3:1").code(), Some(403));

    let mut h = Harness::with(|c| c.allow_loopback_peers = true);
    let mut c = Client::alice();
    h.allocate(&mut c);
    assert!(h.permit(&mut c, "127.0.0.1:9").is_success());
    assert_eq!(h.permit(&mut c, "10.0.0.1:9").code(), Some(403));
}

// ---- Peer data ----------------------------------------------------------------------------

#[test]
fn peer_data_goes_as_data_indication_when_only_permitted() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.peer_send(relay, PEER, b"x").is_empty());
    h.permit(&mut c, PEER);
    let out = h.peer_send(relay, PEER, b"from peer");
    assert_eq!(out.len(), 1);
    let Transmit::ToClient {
        client, payload, ..
    } = &out[0]
    else {
        panic!("{out:?}");
    };
    assert_eq!(*client, c.addr);
    let ind = parse(payload).unwrap();
    assert_eq!(ind.method(), METHOD_DATA);
    assert_eq!(ind.class(), CLASS_INDICATION);
    assert_eq!(ind.attr(ATTR_DATA), Some(&b"from peer"[..]));
    let v = ind.attr(ATTR_XOR_PEER_ADDRESS).unwrap();
    assert_eq!(ind.xor_address(v), Some(sa(PEER)));
    // Unknown relay port or other peers: dropped.
    assert!(
        h.peer_send(RelayAddr(sa("198.51.100.7:1")), PEER, b"x")
            .is_empty()
    );
    assert!(h.peer_send(relay, PEER2, b"x").is_empty());
    assert_eq!(h.server.stats().relayed_to_client.packets, 1);
}

// ---- ChannelBind and ChannelData ----------------------------------------------------------

#[test]
fn channel_bind_waits_for_the_data_plane() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.take_commands();
    let out = h.bind(&mut c, 0x4001, PEER);
    assert!(out.is_empty(), "the success is held");
    let binding = channel_binding(&c, relay, 0x4001, PEER);
    // The permission the bind installed (300 s) ends before the channel (600 s) and the
    // allocation (600 s).
    let expires = h.now + Duration::from_secs(300);
    assert_eq!(
        h.take_commands(),
        vec![Command::InstallChannel {
            binding,
            expires,
            limits: RateLimits::default(),
        }]
    );
    assert_eq!(
        h.server.channel_bindings().collect::<Vec<_>>(),
        vec![(binding, expires)]
    );
    // Peer data before the success goes as Data indication (the permission came with it).
    let out = h.peer_send(relay, PEER, b"early");
    assert_eq!(parse(out[0].payload()).unwrap().method(), METHOD_DATA);

    h.server.channel_installed(h.now, &binding, Ok(()));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    let resp = Resp(out[0].payload().to_vec());
    assert!(resp.is_success());
    assert!(resp.integrity_ok(&c.key));
    assert_eq!(h.server.stats().offload_installed, 1);
    // Now peer data goes as ChannelData.
    let out = h.peer_send(relay, PEER, b"late");
    assert_eq!(out[0].payload(), &channel_data(0x4001, b"late")[..]);
    // And ChannelData from the client goes to the peer.
    let out = h.send(&c, &channel_data(0x4001, b"to peer"));
    assert_eq!(
        out,
        vec![Transmit::ToPeer {
            relay,
            peer: PeerAddr(sa(PEER)),
            payload: b"to peer".to_vec()
        }]
    );
    // A refresh in the same instant moves no expiry: no new install, answered at once.
    let out = h.bind(&mut c, 0x4001, PEER);
    assert_eq!(out.len(), 1);
    assert!(Resp(out[0].payload().to_vec()).is_success());
    assert!(h.take_commands().is_empty());
}

#[test]
fn channel_bind_offload_failure_answers_at_once() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.take_commands();
    assert!(h.bind(&mut c, 0x4002, PEER).is_empty());
    let Some(Command::InstallChannel { binding, .. }) = h.take_commands().pop() else {
        panic!("no install");
    };
    h.server
        .channel_installed(h.now, &binding, Err(OffloadError::Unavailable));
    let out = h.drain();
    assert!(Resp(out[0].payload().to_vec()).is_success());
    // The daemon sent no install (no agent connected): nothing to take out of the kernel.
    assert_eq!(h.take_commands(), vec![]);
    assert_eq!(h.server.stats().offload_failed, 1);
    assert_eq!(h.server.channel_bindings().count(), 0);
    // User space relays it.
    let out = h.peer_send(relay, PEER, b"x");
    assert_eq!(out[0].payload(), &channel_data(0x4002, b"x")[..]);
    // Expiry of a binding that never reached the data plane removes nothing there.
    h.advance(Duration::from_secs(600));
    assert!(
        !h.take_commands()
            .iter()
            .any(|c| matches!(c, Command::RemoveChannel { .. }))
    );
}

#[test]
fn channel_bind_offload_timeout_answers_anyway() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind(&mut c, 0x4003, PEER).is_empty());
    let Some(Command::InstallChannel { binding, .. }) = h.take_commands().pop() else {
        panic!("no install");
    };
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.now + Duration::from_millis(50))
    );
    // A retransmitted bind while waiting is held too.
    assert!(h.bind(&mut c, 0x4003, PEER).is_empty());
    h.advance(Duration::from_millis(49));
    assert!(h.drain().is_empty());
    h.advance(Duration::from_millis(1));
    let out = h.drain();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|t| Resp(t.payload().to_vec()).is_success()));
    assert_eq!(h.server.stats().offload_timed_out, 1);
    // A late acknowledgement is counted and changes nothing else.
    h.server.channel_installed(h.now, &binding, Ok(()));
    assert!(h.drain().is_empty());
    assert_eq!(h.server.stats().offload_installed, 1);
    let out = h.peer_send(relay, PEER, b"x");
    assert_eq!(out[0].payload(), &channel_data(0x4003, b"x")[..]);
}

#[test]
fn tcp_clients_are_not_offloaded_and_get_padded_channel_data() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    c.transport = Transport::Tcp;
    let relay = h.allocate(&mut c);
    h.take_commands();
    let resp = Resp(h.bind(&mut c, 0x4004, PEER)[0].payload().to_vec());
    assert!(resp.is_success());
    assert!(h.take_commands().is_empty());
    let out = h.peer_send(relay, PEER, b"abcde");
    let Transmit::ToClient {
        transport, payload, ..
    } = &out[0]
    else {
        panic!("{out:?}");
    };
    assert_eq!(*transport, Transport::Tcp);
    assert_eq!(
        payload,
        &ChannelData {
            channel: ChannelNumber::new(0x4004).unwrap(),
            payload: b"abcde"
        }
        .encode(Transport::Tcp)
    );
    assert_eq!(payload.len(), 12);
    // Padded ChannelData from the TCP client is understood.
    let frame = ChannelData {
        channel: ChannelNumber::new(0x4004).unwrap(),
        payload: b"xyz",
    }
    .encode(Transport::Tcp);
    assert_eq!(crate::frame_len(&frame), Ok(Some(8)));
    let out = h.send(&c, &frame);
    assert_eq!(out[0].payload(), b"xyz");
    // Closing the connection deletes the allocation.
    h.server
        .handle_client_closed(Transport::Tcp, sa(LISTEN), c.addr);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.take_commands(), vec![Command::FreeRelayPort { relay }]);
}

#[test]
fn channel_bind_errors() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    let mut c = Client::alice();
    h.allocate(&mut c);
    let code = |h: &mut Harness, c: &mut Client, n: u16, peer: &str| {
        let out = h.bind(c, n, peer);
        Resp(out[0].payload().to_vec()).code()
    };
    assert_eq!(code(&mut h, &mut c, 0x3FFF, PEER), Some(400));
    assert_eq!(code(&mut h, &mut c, 0x8000, PEER), Some(400));
    assert_eq!(code(&mut h, &mut c, 0xFFFF, PEER), Some(400));
    assert_eq!(code(&mut h, &mut c, 0x4000, PEER6), Some(443));
    assert_eq!(code(&mut h, &mut c, 0x4000, "192.168.1.1:1"), Some(403));
    let req = c.request(METHOD_CHANNEL_BIND, |b| channel_attr(b, 0x4000));
    assert_eq!(h.call(&c, &req).code(), Some(400));
    let req = c.request(METHOD_CHANNEL_BIND, |b| peer_attr(b, PEER));
    assert_eq!(h.call(&c, &req).code(), Some(400));

    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    // The number is taken by PEER, and PEER has its number.
    assert_eq!(code(&mut h, &mut c, 0x4000, PEER2), Some(400));
    assert_eq!(code(&mut h, &mut c, 0x4001, PEER), Some(400));
    // Another port of the same IP is another peer.
    assert!(h.bind_acked(&mut c, 0x4001, "8.8.8.8:5001").is_success());
    assert_eq!(h.server.stats().channels_active, 2);
}

#[test]
fn channel_data_edge_cases_are_dropped() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    // No allocation.
    h.call_no_reply(&c, &channel_data(0x4000, b"x"));
    h.allocate(&mut c);
    // Unbound channel, truncated frame, reserved channel numbers.
    h.call_no_reply(&c, &channel_data(0x4000, b"x"));
    h.call_no_reply(&c, &[0x40, 0x00, 0x00, 0x09, 1]);
    h.call_no_reply(&c, &[0x50, 0x00, 0x00, 0x00]);
    assert_eq!(h.server.stats().dropped, 4);
}

// ---- Lifetimes with simulated time --------------------------------------------------------

#[test]
fn allocation_expires_with_its_channels() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.bind_acked(&mut c, 0x4000, PEER);
    h.take_commands();
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    let start = h.now;
    let install = |secs| Command::InstallChannel {
        binding,
        expires: start + Duration::from_secs(secs),
        limits: RateLimits::default(),
    };
    // Keep permission and channel fresh; the allocation itself is not refreshed, and ends
    // their bindings in the data plane once it is the earliest.
    h.advance(Duration::from_secs(290));
    h.permit(&mut c, PEER);
    assert_eq!(h.take_commands(), vec![install(590)]);
    h.advance(Duration::from_secs(290));
    h.bind_acked(&mut c, 0x4000, PEER);
    assert_eq!(h.take_commands(), vec![install(600)]);
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.now + Duration::from_secs(20))
    );
    h.advance(Duration::from_secs(19));
    assert_eq!(h.server.allocation_count(), 1);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(
        h.take_commands(),
        vec![
            Command::RemoveChannel { binding },
            Command::FreeRelayPort { relay }
        ]
    );
    let s = h.server.stats();
    assert_eq!(
        (
            s.allocations_active,
            s.channels_active,
            s.permissions_active
        ),
        (0, 0, 0)
    );
    assert!(h.peer_send(relay, PEER, b"x").is_empty());
    assert_eq!(h.server.poll_timeout(), None);
}

#[test]
fn permission_expires_after_300_seconds_and_takes_kernel_entries_with_it() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.bind_acked(&mut c, 0x4000, PEER);
    h.take_commands();
    h.advance(Duration::from_secs(299));
    assert_eq!(h.peer_send(relay, PEER, b"x").len(), 1);
    h.advance(Duration::from_secs(1));
    // The permission lapsed: nothing flows, and the data plane entry is removed.
    assert!(h.peer_send(relay, PEER, b"x").is_empty());
    h.call_no_reply(&c, &channel_data(0x4000, b"x"));
    let cmds = h.take_commands();
    assert!(
        matches!(cmds.as_slice(), [Command::RemoveChannel { .. }]),
        "{cmds:?}"
    );
    assert_eq!(h.server.channel_bindings().count(), 0);
    assert_eq!(h.server.stats().permissions_active, 0);
    // CreatePermission brings the channel back into the data plane, until the new
    // permission ends.
    assert!(h.permit(&mut c, PEER).is_success());
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    let expires = h.now + Duration::from_secs(300);
    assert_eq!(
        h.take_commands(),
        vec![Command::InstallChannel {
            binding,
            expires,
            limits: RateLimits::default(),
        }]
    );
    assert_eq!(
        h.server.channel_bindings().collect::<Vec<_>>(),
        vec![(binding, expires)]
    );
    assert_eq!(
        h.peer_send(relay, PEER, b"x")[0].payload(),
        &channel_data(0x4000, b"x")[..]
    );
}

#[test]
fn channel_expires_after_600_seconds_then_cools_down_for_300() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.bind_acked(&mut c, 0x4000, PEER);
    // Keep the allocation and permission alive, not the channel.
    h.advance(Duration::from_secs(290));
    h.permit(&mut c, PEER);
    let req = c.request(METHOD_REFRESH, |_| {});
    h.call(&c, &req);
    h.advance(Duration::from_secs(290));
    h.permit(&mut c, PEER);
    h.take_commands();
    h.advance(Duration::from_secs(19));
    assert_eq!(h.server.stats().channels_active, 1);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.server.stats().channels_active, 0);
    let cmds = h.take_commands();
    assert!(
        matches!(cmds.as_slice(), [Command::RemoveChannel { .. }]),
        "{cmds:?}"
    );
    // Peer data falls back to Data indications.
    let out = h.peer_send(relay, PEER, b"x");
    assert_eq!(parse(out[0].payload()).unwrap().method(), METHOD_DATA);
    // Cooldown: the number may not go to another peer, nor the peer to another number...
    h.permit(&mut c, PEER2);
    let code = |h: &mut Harness, c: &mut Client, n: u16, peer: &str| {
        Resp(h.bind(c, n, peer)[0].payload().to_vec()).code()
    };
    assert_eq!(code(&mut h, &mut c, 0x4000, PEER2), Some(400));
    assert_eq!(code(&mut h, &mut c, 0x4001, PEER), Some(400));
    // ...but the same pair may be bound again at once.
    h.advance(Duration::from_secs(100));
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());

    // Let it expire again and wait out the cooldown: then rebinding is free.
    let req = c.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_LIFETIME, &3600u32.to_be_bytes());
    });
    h.call(&c, &req);
    h.advance(Duration::from_secs(600));
    h.advance(Duration::from_secs(299));
    h.permit(&mut c, PEER2);
    assert_eq!(code(&mut h, &mut c, 0x4000, PEER2), Some(400));
    h.advance(Duration::from_secs(1));
    assert!(h.bind_acked(&mut c, 0x4000, PEER2).is_success());
    assert!(h.bind_acked(&mut c, 0x4001, PEER).is_success());
}

// ---- Data-plane expiries (RFC 8656 §7, §9, §12) ------------------------------------------

#[test]
fn a_first_install_expires_with_the_allocation_when_it_ends_first() {
    // Allocations may be as short as 120 s here, less than a permission's 300 s.
    let mut h = Harness::with(|c| c.default_lifetime = Duration::from_secs(120));
    let mut c = Client::alice();
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_LIFETIME, &120u32.to_be_bytes());
    });
    assert_eq!(resp.lifetime(), Some(120));
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    h.take_commands();
    assert!(h.bind(&mut c, 0x4000, PEER).is_empty());
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    let expires = h.now + Duration::from_secs(120);
    assert_eq!(
        h.take_commands(),
        vec![Command::InstallChannel {
            binding,
            expires,
            limits: RateLimits::default(),
        }]
    );
    assert_eq!(
        h.server.channel_bindings().collect::<Vec<_>>(),
        vec![(binding, expires)]
    );
}

#[test]
fn a_channel_bind_refresh_reinstalls_with_a_later_expiry() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    h.take_commands();
    h.advance(Duration::from_secs(100));
    // Answered at once; the bind refreshed the permission too (RFC 8656 §12.2), which
    // still ends first.
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    let expires = h.now + Duration::from_secs(300);
    assert_eq!(
        h.take_commands(),
        vec![Command::InstallChannel {
            binding,
            expires,
            limits: RateLimits::default(),
        }]
    );
    assert_eq!(
        h.server.channel_bindings().collect::<Vec<_>>(),
        vec![(binding, expires)]
    );
    // Its acknowledgement releases nothing: no answer was held for it.
    h.server.channel_installed(h.now, &binding, Ok(()));
    assert!(h.drain().is_empty());
    assert_eq!(h.server.stats().offload_installed, 2);
}

#[test]
fn a_create_permission_refresh_reinstalls_the_channels_of_its_ip_only() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    let same_ip = "8.8.8.8:5001";
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    assert!(h.bind_acked(&mut c, 0x4001, same_ip).is_success());
    assert!(h.permit(&mut c, PEER2).is_success());
    h.take_commands();
    h.advance(Duration::from_secs(100));
    // Another IP: no binding's expiry moves.
    assert!(h.permit(&mut c, PEER2).is_success());
    assert!(h.take_commands().is_empty());
    // The bound IP: both its channels follow the new permission.
    assert!(h.permit(&mut c, PEER).is_success());
    let expires = h.now + Duration::from_secs(300);
    let commands = h.take_commands();
    assert_eq!(commands.len(), 2, "{commands:?}");
    for (n, peer) in [(0x4000, PEER), (0x4001, same_ip)] {
        let binding = channel_binding(&c, relay, n, peer);
        assert!(
            commands.contains(&Command::InstallChannel {
                binding,
                expires,
                limits: RateLimits::default(),
            }),
            "{commands:?}"
        );
    }
}

#[test]
fn an_allocation_refresh_reinstalls_only_when_it_moves_the_earliest_expiry() {
    let mut h = Harness::with(|c| c.default_lifetime = Duration::from_secs(60));
    let mut c = Client::alice();
    let start = h.now;
    let at = |secs| start + Duration::from_secs(secs);
    let resp = h.allocate_with(&mut c, |b| {
        b.raw(ATTR_LIFETIME, &600u32.to_be_bytes());
    });
    let relay = RelayAddr(resp.addresses(ATTR_XOR_RELAYED_ADDRESS)[0]);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    h.take_commands();
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    assert_eq!(
        h.server.channel_bindings().collect::<Vec<_>>(),
        vec![(binding, at(300))]
    );
    let mut refresh = |h: &mut Harness, secs: u32| {
        let req = refresh_for(&mut c, secs);
        assert!(h.call(&c, &req).is_success());
        h.take_commands()
    };
    // Longer: the permission still ends first, nothing moves.
    assert!(refresh(&mut h, 1200).is_empty());
    // Shorter than the permission: the allocation ends first now.
    let install = |secs| Command::InstallChannel {
        binding,
        expires: at(secs),
        limits: RateLimits::default(),
    };
    assert_eq!(refresh(&mut h, 100), vec![install(100)]);
    // Up, and still the earliest.
    assert_eq!(refresh(&mut h, 200), vec![install(200)]);
    // Up past the permission, which is the earliest again.
    assert_eq!(refresh(&mut h, 3600), vec![install(300)]);
    assert_eq!(
        h.server.channel_bindings().collect::<Vec<_>>(),
        vec![(binding, at(300))]
    );
    // Lifetime 0 deletes the allocation and takes the binding out of the data plane.
    assert_eq!(
        refresh(&mut h, 0),
        vec![
            Command::RemoveChannel { binding },
            Command::FreeRelayPort { relay }
        ]
    );
    assert_eq!(h.server.channel_bindings().count(), 0);
}

#[test]
fn a_failed_reinstall_removes_the_binding_it_replaced() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    h.take_commands();
    h.advance(Duration::from_secs(100));
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    let binding = channel_binding(&c, relay, 0x4000, PEER);
    let expires = h.now + Duration::from_secs(300);
    assert_eq!(
        h.take_commands(),
        vec![Command::InstallChannel {
            binding,
            expires,
            limits: RateLimits::default(),
        }]
    );
    h.server.channel_installed(
        h.now,
        &binding,
        Err(OffloadError::Rejected("map full".into())),
    );
    assert!(h.drain().is_empty());
    // The first install, with its earlier expiry, may still be in the data plane.
    assert_eq!(h.take_commands(), vec![Command::RemoveChannel { binding }]);
    assert_eq!(h.server.channel_bindings().count(), 0);
    assert_eq!(h.server.stats().offload_failed, 1);
    // User space relays the channel from now on.
    let out = h.peer_send(relay, PEER, b"x");
    assert_eq!(out[0].payload(), &channel_data(0x4000, b"x")[..]);
    // Refreshes re-install nothing, and the deletion has nothing left to remove.
    h.advance(Duration::from_secs(10));
    assert!(h.permit(&mut c, PEER).is_success());
    assert!(h.take_commands().is_empty());
    let req = refresh_for(&mut c, 0);
    assert!(h.call(&c, &req).is_success());
    assert_eq!(h.take_commands(), vec![Command::FreeRelayPort { relay }]);
}

#[test]
fn channel_bindings_carry_each_effective_expiry() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let start = h.now;
    let relay = h.allocate(&mut c);
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    h.advance(Duration::from_secs(100));
    assert!(h.bind_acked(&mut c, 0x4001, PEER2).is_success());
    // A TCP client's channel is relayed in user space and is not listed.
    let mut tcp = Client::new("192.0.2.9:7000", "bob", "bob-pw");
    tcp.transport = Transport::Tcp;
    h.allocate(&mut tcp);
    assert!(h.bind_acked(&mut tcp, 0x4000, PEER).is_success());
    let mut held: Vec<(ChannelBinding, Instant)> = h.server.channel_bindings().collect();
    held.sort_by_key(|(binding, _)| binding.channel.value());
    assert_eq!(
        held,
        vec![
            (
                channel_binding(&c, relay, 0x4000, PEER),
                start + Duration::from_secs(300)
            ),
            (
                channel_binding(&c, relay, 0x4001, PEER2),
                start + Duration::from_secs(400)
            ),
        ]
    );
}

/// Sends an Allocate and carries out its commands as the daemon does, failing the first
/// `failures` relay binds. Returns every command seen and the transmits.
fn allocate_with_bind_failures(
    h: &mut Harness,
    c: &mut Client,
    extra: impl FnOnce(&mut Builder),
    failures: usize,
) -> (Vec<Command>, Vec<Transmit>) {
    h.login(c);
    let req = c.request(METHOD_ALLOCATE, |b| {
        udp_transport(b);
        extra(b);
    });
    h.server
        .handle_client(h.now, c.transport, sa(LISTEN), c.addr, &req);
    let mut seen = Vec::new();
    let mut failed = 0;
    while let Some(command) = h.server.poll_command() {
        if let Command::BindRelayPort { relay, .. } = command {
            if failed < failures {
                failed += 1;
                h.server.relay_bind_failed(relay);
            } else {
                h.server.relay_bound(h.now, relay);
            }
        }
        seen.push(command);
    }
    (
        seen,
        std::iter::from_fn(|| h.server.poll_transmit()).collect(),
    )
}

/// Sends a dual-stack Allocate (ADDITIONAL-ADDRESS-FAMILY IPv6) and leaves its outputs
/// queued.
fn send_dual_stack_allocate(h: &mut Harness) {
    let mut c = Client::new("192.0.2.2:1", "alice", "alice-pw");
    h.login(&mut c);
    let req = c.request(METHOD_ALLOCATE, |b| {
        udp_transport(b);
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    h.server
        .handle_client(h.now, c.transport, sa(LISTEN), c.addr, &req);
}

fn binds(commands: &[Command]) -> Vec<RelayAddr> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::BindRelayPort { relay, .. } => Some(*relay),
            _ => None,
        })
        .collect()
}

#[test]
fn a_relay_port_that_cannot_be_bound_is_replaced_before_the_success_goes_out() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let (commands, out) = allocate_with_bind_failures(&mut h, &mut c, |_| {}, 1);
    let tried = binds(&commands);
    assert_eq!(tried.len(), 2, "{commands:?}");
    let (first, second) = (tried[0], tried[1]);
    assert_ne!(first.port(), second.port());
    assert_eq!(first.0.ip(), second.0.ip());
    // Nothing was bound for the first port, so nothing is freed.
    assert!(
        !commands
            .iter()
            .any(|c| matches!(c, Command::FreeRelayPort { .. })),
        "{commands:?}"
    );
    // One answer only: the success for the port that was bound, signed.
    assert_eq!(out.len(), 1, "{out:?}");
    let resp = Resp(out[0].payload().to_vec());
    assert!(resp.is_success());
    assert!(resp.integrity_ok(&c.key));
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS), vec![second.0]);
    // The allocation lives on the new port.
    assert!(h.permit(&mut c, PEER).is_success());
    let out = h.peer_send(second, PEER, b"hello");
    assert_eq!(out.len(), 1, "peer data relayed on the new port");
    assert!(h.peer_send(first, PEER, b"hello").is_empty());
}

#[test]
fn a_dual_stack_allocation_moves_both_families() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    let mut c = Client::new("192.0.2.2:1", "alice", "alice-pw");
    let dual = |b: &mut Builder| {
        b.raw(ATTR_ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    };
    let (commands, out) = allocate_with_bind_failures(&mut h, &mut c, dual, 1);
    // The first (IPv4) bind failed: the queued IPv6 bind of the old port never runs.
    let tried = binds(&commands);
    assert_eq!(tried.len(), 3, "{commands:?}");
    let resp = Resp(out[0].payload().to_vec());
    assert_eq!(out.len(), 1);
    assert!(resp.is_success());
    let announced = resp.addresses(ATTR_XOR_RELAYED_ADDRESS);
    assert_eq!(announced.len(), 2);
    assert_eq!(announced, vec![tried[1].0, tried[2].0]);
    assert_eq!(announced[0].port(), announced[1].port());
    assert_ne!(announced[0].port(), tried[0].0.port());
}

#[test]
fn a_relay_lost_after_the_success_went_out_deletes_the_allocation() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.take_commands();
    h.server.relay_bind_failed(relay);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.take_commands(), vec![Command::FreeRelayPort { relay }]);
    assert!(h.drain().is_empty(), "no second answer to the Allocate");
    let req = c.request(METHOD_REFRESH, |_| {});
    assert_eq!(h.call(&c, &req).code(), Some(437));
}

#[test]
fn a_dual_stack_allocation_whose_second_bind_fails_frees_the_first() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    send_dual_stack_allocate(&mut h);
    let mut seen = Vec::new();
    let mut bound = 0;
    while let Some(command) = h.server.poll_command() {
        if let Command::BindRelayPort { relay, .. } = command {
            bound += 1;
            // The IPv4 socket binds; the IPv6 one on the same port does not.
            if bound == 2 {
                h.server.relay_bind_failed(relay);
            } else {
                h.server.relay_bound(h.now, relay);
            }
        }
        seen.push(command);
    }
    let tried = binds(&seen);
    assert_eq!(tried.len(), 4, "{seen:?}");
    assert!(seen.contains(&Command::FreeRelayPort { relay: tried[0] }));
    assert!(!seen.contains(&Command::FreeRelayPort { relay: tried[1] }));
    let out: Vec<Transmit> = std::iter::from_fn(|| h.server.poll_transmit()).collect();
    assert_eq!(out.len(), 1);
    let resp = Resp(out[0].payload().to_vec());
    assert_eq!(
        resp.addresses(ATTR_XOR_RELAYED_ADDRESS),
        vec![tried[2].0, tried[3].0]
    );
}

#[test]
fn an_allocate_whose_ports_all_fail_gets_508() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let attempts = usize::from(RELAY_BIND_ATTEMPTS);
    let (commands, out) = allocate_with_bind_failures(&mut h, &mut c, |_| {}, attempts);
    assert_eq!(binds(&commands).len(), attempts);
    assert!(
        !commands
            .iter()
            .any(|c| matches!(c, Command::FreeRelayPort { .. })),
        "nothing was bound, nothing is freed: {commands:?}"
    );
    assert_eq!(out.len(), 1, "{out:?}");
    let resp = Resp(out[0].payload().to_vec());
    assert_eq!(resp.code(), Some(508));
    assert!(resp.integrity_ok(&c.key));
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.stats().allocations_active, 0);
    let req = c.request(METHOD_REFRESH, |_| {});
    assert_eq!(h.call(&c, &req).code(), Some(437));
    // The quota was released with the allocation.
    assert!(h.allocate_with(&mut c, |_| {}).is_success());
}

#[test]
fn poll_timeout_skips_stale_entries() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    let first = h.server.poll_timeout().unwrap();
    assert_eq!(first, h.now + Duration::from_secs(600));
    h.advance(Duration::from_secs(10));
    let req = c.request(METHOD_REFRESH, |_| {});
    h.call(&c, &req);
    // The old deadline is stale now.
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.now + Duration::from_secs(600))
    );
}

#[test]
fn config_validation() {
    let now = Instant::now();
    let unix = SystemTime::UNIX_EPOCH;
    let mut c = config();
    c.relay_ipv4 = None;
    assert_eq!(
        Server::new(c, now, unix).unwrap_err(),
        ConfigError::NoRelayAddress
    );
    let mut c = config();
    c.default_lifetime = Duration::from_secs(7200);
    assert_eq!(
        Server::new(c, now, unix).unwrap_err(),
        ConfigError::Lifetimes
    );
    let mut c = config();
    c.port_range = std::ops::RangeInclusive::new(2, 1);
    assert_eq!(
        Server::new(c, now, unix).unwrap_err(),
        ConfigError::EmptyPortRange
    );
    let mut c = config();
    c.credentials = Credentials::new("other");
    assert_eq!(
        Server::new(c, now, unix).unwrap_err(),
        ConfigError::RealmMismatch
    );
}

// ---- Properties ---------------------------------------------------------------------------

/// Bytes shaped like a STUN request with arbitrary attributes, so the fuzzing reaches past
/// the header checks.
fn stun_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            0x0001u16, 0x0003, 0x0004, 0x0008, 0x0009, 0x0016, 0x0111,
        ]),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    0x0006u16, 0x0008, 0x000C, 0x000D, 0x0012, 0x0013, 0x0014, 0x0015, 0x0017,
                    0x0018, 0x0019, 0x001A, 0x8000, 0x8028, 0x1234,
                ]),
                prop::collection::vec(any::<u8>(), 0..24),
            ),
            0..6,
        ),
        any::<[u8; 12]>(),
    )
        .prop_map(|(kind, attrs, txid)| {
            let mut out = Vec::new();
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&0x2112_A442u32.to_be_bytes());
            out.extend_from_slice(&txid);
            for (t, v) in attrs {
                out.extend_from_slice(&t.to_be_bytes());
                out.extend_from_slice(&(v.len() as u16).to_be_bytes());
                out.extend_from_slice(&v);
                out.resize(crate::framing::padded(out.len()), 0);
            }
            let len = (out.len() - 20) as u16;
            out[2..4].copy_from_slice(&len.to_be_bytes());
            out
        })
}

proptest! {
    #[test]
    fn arbitrary_client_bytes_never_panic_or_create_state(
        packets in prop::collection::vec(
            prop_oneof![prop::collection::vec(any::<u8>(), 0..120), stun_like()],
            1..8,
        ),
        tcp in any::<bool>(),
    ) {
        let mut h = Harness::new();
        let mut c = Client::alice();
        if tcp {
            c.transport = Transport::Tcp;
        }
        for p in &packets {
            h.send(&c, p);
        }
        prop_assert_eq!(h.server.allocation_count(), 0);
        prop_assert!(h.take_commands().is_empty());
        prop_assert_eq!(h.server.poll_timeout(), None);
    }

    #[test]
    fn arbitrary_bytes_on_a_live_allocation_never_panic(
        packets in prop::collection::vec(
            prop_oneof![prop::collection::vec(any::<u8>(), 0..120), stun_like()],
            1..8,
        ),
    ) {
        let mut h = Harness::new();
        let mut c = Client::alice();
        let relay = h.allocate(&mut c);
        h.bind_acked(&mut c, 0x4000, PEER);
        for p in &packets {
            h.send(&c, p);
            h.peer_send(relay, PEER, p);
        }
        prop_assert_eq!(h.server.allocation_count(), 1);
    }

    /// Random operations with random time steps keep the gauges equal to the tables and the
    /// data plane's expiries current.
    #[test]
    fn gauges_match_tables(ops in prop::collection::vec((0u8..11, 0u64..400), 1..30)) {
        let mut h = Harness::new();
        let mut c = Client::alice();
        for (op, secs) in ops {
            let req = match op {
                0 => c.request(METHOD_ALLOCATE, udp_transport),
                1 => c.request(METHOD_CREATE_PERMISSION, |b| peer_attr(b, PEER)),
                2 => c.request(METHOD_CHANNEL_BIND, |b| { channel_attr(b, 0x4000); peer_attr(b, PEER); }),
                3 => c.request(METHOD_CHANNEL_BIND, |b| { channel_attr(b, 0x4001); peer_attr(b, PEER2); }),
                4 => c.request(METHOD_REFRESH, |_| {}),
                5 => c.request(METHOD_REFRESH, |b| { b.raw(ATTR_LIFETIME, &[0; 4]); }),
                6 | 7 => {
                    // The data plane installs (op 6) or refuses (op 7) what it was sent.
                    for cmd in h.take_commands() {
                        if let Command::InstallChannel { binding, .. } = cmd {
                            let result = if op == 6 { Ok(()) } else { Err(OffloadError::Unavailable) };
                            h.server.channel_installed(h.now, &binding, result);
                        }
                    }
                    Vec::new()
                }
                // The link to the data plane comes up (op 9: user-space channels offered)
                // or goes down (op 10).
                9 | 10 => {
                    h.server.set_data_plane_connected(h.now, op == 9);
                    Vec::new()
                }
                // A longer lifetime, which the next plain Refresh (op 4) brings down again.
                _ => c.request(METHOD_REFRESH, |b| { b.raw(ATTR_LIFETIME, &3600u32.to_be_bytes()); }),
            };
            for t in h.send(&c, &req) {
                if let Some(nonce) = Resp(t.payload().to_vec()).attr(ATTR_NONCE) {
                    c.nonce = Some(String::from_utf8(nonce).unwrap());
                }
            }
            h.advance(Duration::from_secs(secs));
            let s = h.server.stats().clone();
            let allocs = &h.server.allocations;
            prop_assert_eq!(s.allocations_active, allocs.len() as u64);
            prop_assert_eq!(s.channels_active, allocs.values().map(|a| a.channels.len() as u64).sum::<u64>());
            prop_assert_eq!(s.permissions_active, allocs.values().map(|a| a.permissions.len() as u64).sum::<u64>());
            prop_assert_eq!(h.server.by_port.len(), allocs.len());
            prop_assert!(h.server.pending.keys().all(|(t, n)| allocs.get(t).is_some_and(|a| a.channels.contains_key(n))));
            // The data plane was told every binding's current effective expiry.
            let current = |a: &Allocation| a.channels.values()
                .all(|ch| ch.kernel_expires.is_none_or(|sent| sent == a.effective_expiry(ch)));
            prop_assert!(allocs.values().all(current));
            // The user's share of the data plane counts what the data plane holds.
            let in_kernel: usize = allocs.values()
                .map(|a| a.channels.values().filter(|ch| ch.kernel_expires.is_some()).count())
                .sum();
            prop_assert_eq!(h.server.config.quotas.kernel_bindings("alice"), in_kernel);
            // One deadline per timed object, none left by the deleted ones.
            let timed = allocs.len()
                + allocs.values()
                    .map(|a| a.permissions.len() + a.channels.len() + a.cooldowns.len())
                    .sum::<usize>()
                + h.server.pending.len()
                + h.server.reservations.len()
                + h.server.finishing.len();
            prop_assert_eq!(h.server.pending_timers(), timed);
        }
    }
}

#[test]
fn refreshes_do_not_grow_the_timer_heap() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    h.bind_acked(&mut c, 0x4000, PEER);
    let base = h.server.timers.len();
    for _ in 0..200 {
        h.now += Duration::from_millis(100);
        assert!(h.permit(&mut c, PEER).is_success());
        let req = c.request(METHOD_REFRESH, |_| {});
        assert!(h.call(&c, &req).is_success());
        assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    }
    assert!(
        h.server.timers.len() <= base,
        "{} > {base}",
        h.server.timers.len()
    );
    // A refresh that shortens the lifetime still takes effect on time.
    let req = c.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_LIFETIME, &3600u32.to_be_bytes());
    });
    h.call(&c, &req);
    let req = c.request(METHOD_REFRESH, |_| {});
    h.call(&c, &req);
    assert_eq!(
        h.server.poll_timeout(),
        Some(h.now + Duration::from_secs(300))
    );
    h.advance(Duration::from_secs(600));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn timer_entry_size() {
    // One queue entry and one index entry per timed object (`Timers`).
    let queue = std::mem::size_of::<(Instant, Timer)>();
    let index = std::mem::size_of::<(Timer, Instant)>();
    println!("timer queue entry {queue} B, index entry {index} B");
    assert!(queue <= 112 && index <= 112, "{queue} {index}");
}

#[test]
fn fingerprint_is_optional_in_requests_and_always_in_responses() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.login(&mut c);
    let mut b = Builder::new(METHOD_ALLOCATE, CLASS_REQUEST, TransactionId([0x33; 12]));
    udp_transport(&mut b);
    b.raw(ATTR_USERNAME, b"alice")
        .raw(ATTR_REALM, REALM.as_bytes())
        .raw(ATTR_NONCE, c.nonce.as_ref().unwrap().as_bytes());
    let req = b.finish(None, Some(&SigningKey::classic(c.key)), false);
    let resp = h.call(&c, &req);
    assert!(resp.is_success());
    assert!(resp.has_fingerprint());
}

#[test]
fn attributes_after_message_integrity_are_ignored() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    // A Refresh whose LIFETIME 0 was appended after MESSAGE-INTEGRITY (by an attacker) must
    // not delete the allocation: RFC 8489 §14.5.
    let mut req = c.request(METHOD_REFRESH, |_| {});
    req.truncate(req.len() - 8); // drop FINGERPRINT
    req.extend_from_slice(&[0x00, 0x0D, 0x00, 0x04, 0, 0, 0, 0]);
    let len = (req.len() - 20) as u16;
    req[2..4].copy_from_slice(&len.to_be_bytes());
    let resp = h.call(&c, &req);
    assert!(resp.is_success());
    assert_eq!(resp.lifetime(), Some(600));
    assert_eq!(h.server.allocation_count(), 1);
}

#[test]
fn tampered_request_fails_integrity() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    let mut req = c.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_LIFETIME, &1200u32.to_be_bytes());
    });
    req.truncate(req.len() - 8); // drop FINGERPRINT so the change is only caught by MI
    let len = (req.len() - 20) as u16;
    req[2..4].copy_from_slice(&len.to_be_bytes());
    req[27] = 0; // LIFETIME value 1200 -> something else
    let resp = h.call(&c, &req);
    assert_eq!(resp.code(), Some(401));
    assert_eq!(h.server.stats().auth_failures, 1);
}

#[test]
fn binding_over_tcp() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    c.transport = Transport::Tcp;
    let req = c.request(METHOD_BINDING, |_| {});
    let resp = h.call(&c, &req);
    assert!(resp.is_success());
    assert_eq!(crate::frame_len(&resp.0), Ok(Some(resp.0.len())));
}

#[test]
fn new_deny_list_revokes_permissions_and_kernel_entries() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.bind_acked(&mut c, 0x4000, PEER);
    h.permit(&mut c, PEER2);
    h.take_commands();
    h.server
        .set_peer_lists(Vec::new(), vec!["8.8.8.0/24".parse().unwrap()]);
    let cmds = h.take_commands();
    assert!(
        matches!(cmds.as_slice(), [Command::RemoveChannel { .. }]),
        "{cmds:?}"
    );
    assert!(h.peer_send(relay, PEER, b"x").is_empty());
    assert_eq!(h.peer_send(relay, PEER2, b"x").len(), 1);
    assert_eq!(h.server.stats().permissions_active, 1);
}

#[test]
fn an_allocate_success_waits_for_its_relay_socket_whatever_the_drain_order() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.login(&mut c);
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    h.server
        .handle_client(h.now, c.transport, sa(LISTEN), c.addr, &req);
    // Transmits first: nothing announces a port that is not bound yet.
    assert!(h.server.poll_transmit().is_none());
    let Some(Command::BindRelayPort { relay, .. }) = h.server.poll_command() else {
        panic!("no bind command");
    };
    // A retransmission meanwhile gets no second answer.
    h.server
        .handle_client(h.now, c.transport, sa(LISTEN), c.addr, &req);
    assert!(h.server.poll_transmit().is_none());
    h.server.relay_bound(h.now, relay);
    let out: Vec<Transmit> = std::iter::from_fn(|| h.server.poll_transmit()).collect();
    assert_eq!(out.len(), 1, "{out:?}");
    let resp = Resp(out[0].payload().to_vec());
    assert!(resp.is_success());
    assert_eq!(resp.addresses(ATTR_XOR_RELAYED_ADDRESS), vec![relay.0]);
    // Once announced, a retransmission is answered again.
    assert!(h.call(&c, &req).is_success());
}

#[test]
fn a_socket_bound_for_a_moved_allocation_is_handed_back() {
    let mut h = Harness::with(|c| c.relay_ipv6 = Some(RELAY6.parse().unwrap()));
    send_dual_stack_allocate(&mut h);
    // A daemon that takes both commands before answering either.
    let first: Vec<Command> = std::iter::from_fn(|| h.server.poll_command()).collect();
    let tried = binds(&first);
    assert_eq!(tried.len(), 2);
    h.server.relay_bind_failed(tried[0]);
    h.server.relay_bound(h.now, tried[1]);
    let out = h.drain();
    let next = h.take_commands();
    assert!(
        next.contains(&Command::FreeRelayPort { relay: tried[1] }),
        "{next:?}"
    );
    assert_eq!(out.len(), 1, "{out:?}");
    let announced = Resp(out[0].payload().to_vec()).addresses(ATTR_XOR_RELAYED_ADDRESS);
    assert_eq!(announced.len(), 2);
    assert_ne!(announced[0].port(), tried[0].0.port());
}

#[test]
fn shutdown_removes_every_binding_and_frees_every_socket() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    assert!(h.permit(&mut c, PEER).is_success());
    assert!(h.bind_acked(&mut c, 0x4000, PEER).is_success());
    h.take_commands();
    h.server.shutdown();
    assert_eq!(h.server.allocation_count(), 0);
    let commands = h.take_commands();
    assert!(
        commands
            .iter()
            .any(|c| matches!(c, Command::RemoveChannel { binding } if binding.relay == relay)),
        "{commands:?}"
    );
    assert!(
        commands.contains(&Command::FreeRelayPort { relay }),
        "{commands:?}"
    );
    assert_eq!(h.server.poll_timeout(), None);
    assert!(h.drain().is_empty());
}

/// RFC 8489 long-term credentials: password algorithms, USERHASH, MESSAGE-INTEGRITY-SHA256.
#[path = "server_tests_rfc8489.rs"]
mod rfc8489;

/// EVEN-PORT with the R bit, RESERVATION-TOKEN, DONT-FRAGMENT and ICMP relaying (RFC 8656 §7.2,
/// §11.5).
#[path = "server_tests_ports_and_icmp.rs"]
mod ports_and_icmp;

/// Reservations made on one core of a daemon and used or ended on another, through a shared
/// ledger.
#[path = "server_tests_cores.rs"]
mod cores;

/// Unauthenticated answers limited per source and host-wide, caps per allocation and per
/// user, one timer per object.
#[path = "server_tests_abuse.rs"]
mod abuse;

/// Draining and load shedding: new Allocates redirected with 300 (Try Alternate), existing
/// allocations untouched.
#[path = "server_tests_redirect.rs"]
mod redirect;

/// Bandwidth limits and usage accounting: meters, capacity, kernel figures, records.
#[path = "server_tests_usage.rs"]
mod usage;

/// Channels relayed in user space offered to the data plane again: when the link to it
/// comes back, and when refreshed while it is up.
#[path = "server_tests_offload.rs"]
mod offload;

/// A fresh server of `config()` (adjusted by `f`) started `later` after `h`'s, as a new
/// process keeping its state would be: the nonce key kept (`nonce_seed`: the key `h`'s seed
/// gave), fresh random streams, a new monotonic clock.
fn restarted(h: &Harness, later: Duration, f: impl FnOnce(&mut Config)) -> Harness {
    let mut config = config();
    config.nonce_seed = Some(config.rng_seed);
    config.rng_seed = [7; 32];
    f(&mut config);
    let now = Instant::now() + Duration::from_secs(3600);
    let unix = SystemTime::UNIX_EPOCH + Duration::from_secs(h.unix_now()) + later;
    Harness {
        server: Server::new(config, now, unix).unwrap(),
        now,
        commands: Vec::new(),
        records: Vec::new(),
        answer_removals: true,
    }
}

#[test]
fn a_saved_allocation_is_restored_with_its_permissions_and_kernel_channels() {
    let mut h = Harness::new();
    h.server.track_changes();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.permit(&mut c, PEER2);
    assert!(h.bind_acked(&mut c, 0x4001, PEER).is_success());
    let changes = h.server.take_changes();
    let [Change::Saved(saved)] = changes.as_slice() else {
        panic!("{changes:?}");
    };
    assert_eq!(saved.relays, [relay.0]);
    assert_eq!(saved.username, "alice");
    assert_eq!(saved.permissions.len(), 2);
    assert_eq!(
        saved.channels,
        [SavedChannel {
            number: 0x4001,
            peer: sa(PEER),
            expires_unix_ms: (h.unix_now() + 600) * 1000,
            in_kernel: true,
            kernel_seen: crate::Usage::default(),
        }]
    );
    assert!(h.server.take_changes().is_empty(), "nothing changed since");
    // Relayed data changes nothing to journal: neither ChannelData nor a Send indication.
    h.send(&c, &channel_data(0x4001, b"data"));
    let mut b = Builder::new(METHOD_SEND, CLASS_INDICATION, TransactionId(c.next_txid()));
    peer_attr(&mut b, PEER2);
    b.raw(ATTR_DATA, b"data");
    h.send(&c, &b.finish(None, None, false));
    assert!(
        h.server.take_changes().is_empty(),
        "relayed data is no change"
    );
    // A snapshot has the usage (journaled with the next interim record, not per packet).
    let mut with_usage = saved.clone();
    with_usage.usage.client_to_peer = crate::usage::Traffic {
        packets: 2,
        bytes: 8,
    };
    assert_eq!(h.server.saved_allocations(), [with_usage]);

    // A new process, ten seconds later.
    let mut r = restarted(&h, Duration::from_secs(10), |_| {});
    let restored = r.server.restore(r.now, saved, &(49152..=65535)).unwrap();
    assert_eq!(
        restored,
        Restored {
            permissions: 2,
            channels: 1,
            in_kernel: 1,
        }
    );
    assert_eq!(r.server.allocation_count(), 1);
    assert_eq!(r.server.stats().channels_active, 1);
    // Its first sync carries the binding: the kernel never lets go of it. The permission
    // (300 s from the bind, 10 s gone) bounds it.
    let binding = channel_binding(&c, relay, 0x4001, PEER);
    assert_eq!(
        r.server.channel_bindings().collect::<Vec<_>>(),
        vec![(binding, r.now + Duration::from_secs(290))]
    );
    // The client goes on as if nothing happened: its nonce is still good, its Refresh
    // succeeds, its channel relays both ways.
    let refresh = refresh_for(&mut c, 600);
    let resp = r.call(&c, &refresh);
    assert!(resp.is_success(), "{:?}", resp.code());
    let out = r.send(&c, &channel_data(0x4001, b"after"));
    assert_eq!(
        out,
        vec![Transmit::ToPeer {
            relay,
            peer: PeerAddr(sa(PEER)),
            payload: b"after".to_vec()
        }]
    );
    let out = r.peer_send(relay, PEER, b"back");
    assert_eq!(out[0].payload(), &channel_data(0x4001, b"back")[..]);
    // The quota ledger counts it again.
    assert_eq!(r.server.config().quotas.user("alice"), 1);
    // Restoring it twice is refused.
    assert_eq!(
        r.server.restore(r.now, saved, &(49152..=65535)),
        Err(RestoreRefusal::PortTaken)
    );
}

#[test]
fn what_no_longer_fits_is_not_restored_and_deletions_are_reported() {
    let mut h = Harness::new();
    h.server.track_changes();
    let mut c = Client::alice();
    h.allocate(&mut c);
    let changes = h.server.take_changes();
    let [Change::Saved(saved)] = changes.as_slice() else {
        panic!("{changes:?}");
    };
    // Down longer than the allocation's 600 s.
    let mut r = restarted(&h, Duration::from_secs(601), |_| {});
    assert_eq!(
        r.server.restore(r.now, saved, &(49152..=65535)),
        Err(RestoreRefusal::Expired)
    );
    let mut r = restarted(&h, Duration::ZERO, |config| {
        config.listeners = vec![sa("198.51.100.1:443")];
    });
    assert_eq!(
        r.server.restore(r.now, saved, &(49152..=65535)),
        Err(RestoreRefusal::ListenerRemoved)
    );
    let mut r = restarted(&h, Duration::ZERO, |config| {
        config.relay_ipv4 = Some("198.51.100.8".parse().unwrap());
    });
    assert_eq!(
        r.server.restore(r.now, saved, &(49152..=65535)),
        Err(RestoreRefusal::RelayAddressChanged)
    );
    let shrunk = if saved.port > 50_000 {
        49_152..=50_000
    } else {
        60_000..=65_535
    };
    let mut r = restarted(&h, Duration::ZERO, |config| {
        config.port_range = shrunk.clone();
    });
    assert_eq!(
        r.server.restore(r.now, saved, &shrunk),
        Err(RestoreRefusal::PortOutOfRange)
    );
    assert_eq!(r.server.allocation_count(), 0);

    // A deletion is a change too.
    let refresh = refresh_for(&mut c, 0);
    let resp = h.call(&c, &refresh);
    assert!(resp.is_success());
    assert_eq!(h.server.take_changes(), [Change::Deleted(saved.tuple())]);
    // And nothing is tracked where nobody asked.
    let mut quiet = Harness::new();
    let mut c = Client::alice();
    quiet.allocate(&mut c);
    assert!(quiet.server.take_changes().is_empty());
}
