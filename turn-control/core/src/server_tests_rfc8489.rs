//! Scenario tests of RFC 8489 long-term credentials: the nonce cookie and PASSWORD-ALGORITHMS
//! in challenges, SHA-256 keys and MESSAGE-INTEGRITY-SHA256 (truncated too), USERHASH, the
//! bid-down check, and RFC 5389 clients next to all of it. Requests are signed and responses
//! verified here with `hmac`, `md-5` and `sha2` directly, not with the core's helpers.

use hmac::{Hmac, Mac as _};
use md5::Md5;
use sha2::{Digest as _, Sha256};

use super::*;

const MI_SHA256: u16 = 0x001C;
const PASSWORD_ALGORITHMS_VALUE: [u8; 8] = [0, 2, 0, 0, 0, 1, 0, 0];

/// A client that speaks RFC 8489: it learns the nonce and PASSWORD-ALGORITHMS from a 401 and
/// signs with MESSAGE-INTEGRITY-SHA256.
struct Modern {
    /// Address, transport and username.
    base: Client,
    password: String,
    /// PASSWORD-ALGORITHM to send (with the matching key), or none (MD5 key).
    algorithm: Option<u16>,
    /// PASSWORD-ALGORITHMS to send: what the 401 carried, unless a test alters it.
    algorithms: Option<Vec<u8>>,
    /// USERHASH instead of USERNAME.
    userhash: bool,
    /// Length of the MESSAGE-INTEGRITY-SHA256 value sent.
    integrity_len: usize,
    nonce: Option<Vec<u8>>,
}

impl Modern {
    fn new(addr: &str, user: &str, password: &str) -> Self {
        Self {
            base: Client::new(addr, user, password),
            password: password.to_owned(),
            algorithm: Some(2),
            algorithms: None,
            userhash: false,
            integrity_len: 32,
            nonce: None,
        }
    }

    fn alice() -> Self {
        Self::new("192.0.2.41:5000", "alice", "alice-pw")
    }

    /// The long-term key of the algorithm in use (RFC 8489 §9.2.2).
    fn key(&self) -> Vec<u8> {
        let input = format!("{}:{REALM}:{}", self.base.user, self.password);
        match self.algorithm {
            Some(2) => Sha256::digest(input).to_vec(),
            _ => Md5::digest(input).to_vec(),
        }
    }

    /// A request with the attributes `f` adds; with credentials once a nonce is known.
    fn request(&mut self, method: Method, f: impl FnOnce(&mut Builder)) -> Vec<u8> {
        let txid = self.base.next_txid();
        let mut b = Builder::new(method, CLASS_REQUEST, TransactionId(txid));
        f(&mut b);
        let Some(nonce) = &self.nonce else {
            return b.finish(None, None, false);
        };
        if self.userhash {
            let hash = Sha256::digest(format!("{}:{REALM}", self.base.user));
            b.raw(ATTR_USER_HASH, &hash);
        } else {
            b.raw(ATTR_USERNAME, self.base.user.as_bytes());
        }
        b.raw(ATTR_REALM, REALM.as_bytes()).raw(ATTR_NONCE, nonce);
        if let Some(algorithm) = self.algorithm {
            let [hi, lo] = algorithm.to_be_bytes();
            b.raw(ATTR_PASSWORD_ALGORITHM, &[hi, lo, 0, 0]);
        }
        if let Some(algorithms) = &self.algorithms {
            b.raw(ATTR_PASSWORD_ALGORITHMS, algorithms);
        }
        sign_sha256(b.finish(None, None, false), &self.key(), self.integrity_len)
    }

    fn allocate(&mut self, h: &mut Harness) -> Resp {
        let req = self.request(METHOD_ALLOCATE, udp_transport);
        h.call(&self.base, &req)
    }
}

/// Appends MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), truncated to `len` bytes.
fn sign_sha256(mut wire: Vec<u8>, key: &[u8], len: usize) -> Vec<u8> {
    let padded = len.next_multiple_of(4);
    let covered = (wire.len() - 20 + 4 + padded) as u16;
    wire[2..4].copy_from_slice(&covered.to_be_bytes());
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).unwrap();
    mac.update(&wire);
    let mac = mac.finalize().into_bytes();
    wire.extend_from_slice(&MI_SHA256.to_be_bytes());
    wire.extend_from_slice(&(len as u16).to_be_bytes());
    wire.extend_from_slice(&mac[..len]);
    wire.resize(wire.len() + padded - len, 0);
    wire
}

/// The offsets and values of a message's attributes, walked by hand.
fn attributes(wire: &[u8]) -> Vec<(usize, u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 20;
    while at + 4 <= wire.len() {
        let t = u16::from_be_bytes([wire[at], wire[at + 1]]);
        let len = usize::from(u16::from_be_bytes([wire[at + 2], wire[at + 3]]));
        out.push((at, t, &wire[at + 4..at + 4 + len]));
        at += 4 + len.next_multiple_of(4);
    }
    out
}

/// Whether `wire` carries a full MESSAGE-INTEGRITY-SHA256 that verifies with `key`.
fn sha256_integrity_ok(wire: &[u8], key: &[u8]) -> bool {
    let Some((at, _, value)) = attributes(wire).into_iter().find(|a| a.1 == MI_SHA256) else {
        return false;
    };
    let mut prefix = wire[..at].to_vec();
    let covered = (at - 20 + 4 + value.len()) as u16;
    prefix[2..4].copy_from_slice(&covered.to_be_bytes());
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).unwrap();
    mac.update(&prefix);
    value.len() == 32 && mac.verify_slice(value).is_ok()
}

/// Sends an unauthenticated Allocate, checks the 401 and learns its nonce and
/// PASSWORD-ALGORITHMS.
fn challenge(h: &mut Harness, c: &mut Modern) -> Resp {
    c.nonce = None;
    let req = c.request(METHOD_ALLOCATE, udp_transport);
    let resp = h.call(&c.base, &req);
    assert_eq!(resp.code(), Some(401));
    c.nonce = resp.attr(ATTR_NONCE);
    c.algorithms = resp.attr(ATTR_PASSWORD_ALGORITHMS);
    resp
}

fn static_users_only(c: &mut Config) {
    c.credentials = Credentials::new(REALM).with_user("alice", "alice-pw");
}

#[test]
fn challenges_carry_the_nonce_cookie_and_password_algorithms() {
    // With a REST secret, "Password algorithms" only (bit 0): 0x000001.
    let mut h = Harness::new();
    let mut c = Modern::alice();
    let resp = challenge(&mut h, &mut c);
    let nonce = c.nonce.clone().unwrap();
    assert!(nonce.starts_with(b"obMatJos2AAAB"), "{nonce:?}");
    assert_eq!(
        resp.attr(ATTR_PASSWORD_ALGORITHMS),
        Some(PASSWORD_ALGORITHMS_VALUE.to_vec())
    );
    assert!(resp.attr(ATTR_MESSAGE_INTEGRITY).is_none());
    assert!(resp.attr(ATTR_MESSAGE_INTEGRITY_SHA256).is_none());
    assert!(resp.has_fingerprint());

    // Static users only: username anonymity too (bit 1): 0x000003.
    let mut h = Harness::with(static_users_only);
    let mut c = Modern::alice();
    challenge(&mut h, &mut c);
    assert!(c.nonce.as_ref().unwrap().starts_with(b"obMatJos2AAAD"));

    // 438 carries them as well (RFC 8489 §9.2.4).
    let mut h = Harness::with(|c| c.nonce_lifetime = Duration::from_secs(600));
    let mut c = Modern::alice();
    challenge(&mut h, &mut c);
    h.advance(Duration::from_secs(600));
    let resp = c.allocate(&mut h);
    assert_eq!(resp.code(), Some(438));
    assert!(resp.attr(ATTR_NONCE).unwrap().starts_with(b"obMatJos2AAAB"));
    assert_eq!(
        resp.attr(ATTR_PASSWORD_ALGORITHMS),
        Some(PASSWORD_ALGORITHMS_VALUE.to_vec())
    );
    c.nonce = resp.attr(ATTR_NONCE);
    assert!(c.allocate(&mut h).is_success());
}

#[test]
fn sha256_allocate_is_answered_with_sha256_integrity() {
    let mut h = Harness::new();
    let mut c = Modern::alice();
    challenge(&mut h, &mut c);
    let resp = c.allocate(&mut h);
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(sha256_integrity_ok(&resp.0, &c.key()));
    assert!(!sha256_integrity_ok(&resp.0, &[0; 32]));
    assert!(resp.attr(ATTR_MESSAGE_INTEGRITY).is_none());
    assert!(resp.has_fingerprint());
    assert_eq!(h.server.allocation_count(), 1);

    // Later requests and their errors are signed alike.
    let resp = h.permit_modern(&mut c, PEER);
    assert!(resp.is_success());
    assert!(sha256_integrity_ok(&resp.0, &c.key()));
    let req = c.request(METHOD_CREATE_PERMISSION, |_| {});
    let resp = h.call(&c.base, &req);
    assert_eq!(resp.code(), Some(400));
    assert!(sha256_integrity_ok(&resp.0, &c.key()));
    assert_eq!(h.server.stats().auth_failures, 0);
}

#[test]
fn md5_password_algorithm_with_sha256_integrity() {
    // PASSWORD-ALGORITHM MD5: the MD5 key, under MESSAGE-INTEGRITY-SHA256.
    let mut h = Harness::new();
    let mut c = Modern::alice();
    c.algorithm = Some(1);
    challenge(&mut h, &mut c);
    let resp = c.allocate(&mut h);
    assert!(resp.is_success(), "{:?}", resp.code());
    assert_eq!(c.key(), c.base.key);
    assert!(sha256_integrity_ok(&resp.0, &c.key()));
}

#[test]
fn userhash_finds_a_static_user() {
    let mut h = Harness::with(static_users_only);
    let mut c = Modern::alice();
    c.userhash = true;
    challenge(&mut h, &mut c);
    let resp = c.allocate(&mut h);
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(sha256_integrity_ok(&resp.0, &c.key()));
    // The allocation belongs to alice: her Refresh by USERNAME and MESSAGE-INTEGRITY on the
    // same 5-tuple is hers (no 441).
    c.base.nonce = c
        .nonce
        .as_ref()
        .map(|n| String::from_utf8(n.clone()).unwrap());
    let req = c.base.request(METHOD_REFRESH, |_| {});
    let resp = h.call(&c.base, &req);
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(resp.integrity_ok(&c.base.key));

    // An unknown hash: 401.
    let mut mallory = Modern::new("192.0.2.42:5000", "mallory", "alice-pw");
    mallory.userhash = true;
    challenge(&mut h, &mut mallory);
    assert_eq!(mallory.allocate(&mut h).code(), Some(401));
    assert_eq!(h.server.stats().auth_failures, 1);
}

#[test]
fn userhash_of_a_rest_user_is_refused() {
    // REST usernames cannot be found from their hash; the same user with USERNAME succeeds.
    let mut h = Harness::new();
    let user = format!("{}:carol", h.unix_now() + 3600);
    let password = rest_password(b"new-secret", &user);
    let mut c = Modern::new("192.0.2.43:5000", &user, &password);
    c.userhash = true;
    challenge(&mut h, &mut c);
    assert_eq!(c.allocate(&mut h).code(), Some(401));
    c.userhash = false;
    challenge(&mut h, &mut c);
    let resp = c.allocate(&mut h);
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(sha256_integrity_ok(&resp.0, &c.key()));
}

#[test]
fn a_classic_md5_client_is_unchanged() {
    // RFC 5389/5766: MESSAGE-INTEGRITY with the MD5 key, no PASSWORD-ALGORITHM(S), the nonce
    // echoed as it came.
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.login(&mut c);
    assert!(c.nonce.as_ref().unwrap().starts_with("obMatJos2"));
    let resp = h.allocate_with(&mut c, |_| {});
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(resp.integrity_ok(&c.key));
    assert!(resp.attr(ATTR_MESSAGE_INTEGRITY_SHA256).is_none());
    let resp = h.permit(&mut c, PEER);
    assert!(resp.is_success());
    assert!(resp.integrity_ok(&c.key));
}

#[test]
fn altered_password_algorithms_get_400() {
    let mut h = Harness::new();
    let mut c = Modern::alice();
    challenge(&mut h, &mut c);
    let bad_request = |h: &mut Harness, c: &mut Modern| {
        let resp = c.allocate(h);
        assert_eq!(resp.code(), Some(400));
        // RFC 8489 §9.2.4: no integrity, no nonce, no realm in the 400.
        assert!(resp.attr(ATTR_MESSAGE_INTEGRITY_SHA256).is_none());
        assert!(resp.attr(ATTR_MESSAGE_INTEGRITY).is_none());
        assert!(resp.attr(ATTR_NONCE).is_none());
    };
    // A bid-down: MD5 only, as if SHA-256 had not been offered.
    c.algorithm = Some(1);
    c.algorithms = Some(vec![0, 1, 0, 0]);
    bad_request(&mut h, &mut c);
    // Reordered.
    c.algorithms = Some(vec![0, 1, 0, 0, 0, 2, 0, 0]);
    bad_request(&mut h, &mut c);
    // PASSWORD-ALGORITHM without PASSWORD-ALGORITHMS.
    c.algorithms = None;
    bad_request(&mut h, &mut c);
    // PASSWORD-ALGORITHMS without PASSWORD-ALGORITHM.
    c.algorithm = None;
    c.algorithms = Some(PASSWORD_ALGORITHMS_VALUE.to_vec());
    bad_request(&mut h, &mut c);
    // An unknown algorithm.
    c.algorithm = Some(3);
    bad_request(&mut h, &mut c);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.server.stats().auth_failures, 0);
    // Unaltered, it works.
    c.algorithm = Some(2);
    assert!(c.allocate(&mut h).is_success());
}

#[test]
fn wrong_sha256_integrity_gets_401() {
    let mut h = Harness::new();
    let mut c = Modern::new("192.0.2.44:5000", "alice", "wrong");
    challenge(&mut h, &mut c);
    let resp = c.allocate(&mut h);
    assert_eq!(resp.code(), Some(401));
    assert!(resp.attr(ATTR_NONCE).unwrap().starts_with(b"obMatJos2"));
    assert_eq!(
        resp.attr(ATTR_PASSWORD_ALGORITHMS),
        Some(PASSWORD_ALGORITHMS_VALUE.to_vec())
    );
    assert!(resp.attr(ATTR_MESSAGE_INTEGRITY_SHA256).is_none());
    assert_eq!(h.server.stats().auth_failures, 1);
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn truncated_sha256_integrity_of_16_bytes_is_accepted_and_of_12_refused() {
    let mut h = Harness::new();
    let mut c = Modern::alice();
    challenge(&mut h, &mut c);
    // Shorter than 16 bytes or not a multiple of 4: malformed (RFC 8489 §14.6).
    for len in [12, 18] {
        c.integrity_len = len;
        assert_eq!(c.allocate(&mut h).code(), Some(400), "{len}");
    }
    assert_eq!(h.server.allocation_count(), 0);
    c.integrity_len = 16;
    let resp = c.allocate(&mut h);
    assert!(resp.is_success(), "{:?}", resp.code());
    // The response carries the full 32 bytes.
    assert!(sha256_integrity_ok(&resp.0, &c.key()));
    // 16 bytes of a wrong HMAC still fail.
    let mut c = Modern::new("192.0.2.45:5000", "alice", "wrong");
    c.integrity_len = 16;
    challenge(&mut h, &mut c);
    assert_eq!(c.allocate(&mut h).code(), Some(401));
}

#[test]
fn with_both_integrity_attributes_sha256_is_checked() {
    let mut h = Harness::new();
    let mut c = Modern::alice();
    challenge(&mut h, &mut c);
    let md5 = c.base.key;
    let with_both = |c: &mut Modern, sha256_key: &[u8], sha1_key: &[u8; 16]| {
        let txid = c.base.next_txid();
        let mut b = Builder::new(METHOD_ALLOCATE, CLASS_REQUEST, TransactionId(txid));
        udp_transport(&mut b);
        b.raw(ATTR_USERNAME, b"alice")
            .raw(ATTR_REALM, REALM.as_bytes())
            .raw(ATTR_NONCE, c.nonce.as_ref().unwrap())
            .raw(ATTR_PASSWORD_ALGORITHM, &[0, 2, 0, 0])
            .raw(ATTR_PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS_VALUE);
        let classic = b.finish(None, Some(&SigningKey::classic(*sha1_key)), false);
        sign_sha256(classic, sha256_key, 32)
    };
    // A good MESSAGE-INTEGRITY does not save a bad MESSAGE-INTEGRITY-SHA256.
    let req = with_both(&mut c, &[0; 32], &md5);
    assert_eq!(h.call(&c.base, &req).code(), Some(401));
    // A bad MESSAGE-INTEGRITY does not matter next to a good MESSAGE-INTEGRITY-SHA256.
    let key = c.key();
    let req = with_both(&mut c, &key, &[0; 16]);
    let resp = h.call(&c.base, &req);
    assert!(resp.is_success(), "{:?}", resp.code());
    assert!(sha256_integrity_ok(&resp.0, &c.key()));
}

#[test]
fn nonces_of_the_old_format_or_with_other_features_are_stale() {
    let mut h = Harness::new();
    let mut c = Modern::alice();
    challenge(&mut h, &mut c);
    let nonce = c.nonce.clone().unwrap();
    // Without the cookie (the format before RFC 8489 support, or a cookie stripped on the
    // way): 438 and a new nonce, which then works.
    c.nonce = Some(nonce[13..].to_vec());
    let resp = c.allocate(&mut h);
    assert_eq!(resp.code(), Some(438));
    // Feature bits changed (no "Password algorithms", so that MD5 would pass unchecked).
    let mut downgraded = nonce.clone();
    downgraded[12] = b'A';
    c.nonce = Some(downgraded);
    c.algorithm = None;
    c.algorithms = None;
    assert_eq!(c.allocate(&mut h).code(), Some(438));
    c.nonce = resp.attr(ATTR_NONCE);
    c.algorithm = Some(2);
    c.algorithms = Some(PASSWORD_ALGORITHMS_VALUE.to_vec());
    assert!(c.allocate(&mut h).is_success());
}

impl Harness {
    fn permit_modern(&mut self, c: &mut Modern, peer: &str) -> Resp {
        let req = c.request(METHOD_CREATE_PERMISSION, |b| peer_attr(b, peer));
        self.call(&c.base, &req)
    }
}
