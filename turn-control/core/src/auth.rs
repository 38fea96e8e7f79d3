//! Long-term credentials (RFC 8489 §9.2), TURN REST API ephemeral credentials
//! (draft-uberti-behave-turn-rest-00, coturn `use-auth-secret`), stateless nonces and the
//! MESSAGE-INTEGRITY / FINGERPRINT computations.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

/// The long-term key `MD5(username ":" realm ":" password)` (RFC 8489 §9.2.2). Only the
/// key is kept, never the password.
pub type LongTermKey = [u8; 16];

/// Length of a MESSAGE-INTEGRITY value (HMAC-SHA1, RFC 8489 §14.5).
pub const INTEGRITY_LEN: usize = 20;

/// Computes the long-term key for `username`, `realm` and `password`.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> LongTermKey {
    let mut md5 = Md5::new();
    md5.update(username.as_bytes());
    md5.update(b":");
    md5.update(realm.as_bytes());
    md5.update(b":");
    md5.update(password.as_bytes());
    md5.finalize().into()
}

/// The TURN REST API password for `username`: `base64(HMAC-SHA1(secret, username))`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let mut mac = hmac_sha1(secret);
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The expiry (unix seconds) of a TURN REST username `expiry:user`, if it has that form.
pub fn rest_expiry(username: &str) -> Option<u64> {
    let (expiry, _) = username.split_once(':')?;
    expiry.parse().ok()
}

fn hmac_sha1(key: &[u8]) -> HmacSha1 {
    // HMAC takes keys of any length (RFC 2104 §2): `new_from_slice` cannot fail here.
    match HmacSha1::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

/// The users a server accepts: static users by long-term key, and shared secrets for
/// ephemeral REST credentials (several, so that a secret can be rotated).
#[derive(Clone, Default)]
pub struct Credentials {
    realm: String,
    users: HashMap<String, LongTermKey>,
    rest_secrets: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field("users", &self.users.len())
            .field("rest_secrets", &self.rest_secrets.len())
            .finish()
    }
}

impl Credentials {
    /// No users and no secrets, for `realm`.
    pub fn new(realm: impl Into<String>) -> Self {
        Self {
            realm: realm.into(),
            ..Self::default()
        }
    }

    /// Adds a static user by password; only the long-term key is stored.
    pub fn with_user(mut self, username: impl Into<String>, password: &str) -> Self {
        let username = username.into();
        let key = long_term_key(&username, &self.realm, password);
        self.users.insert(username, key);
        self
    }

    /// Adds a static user by precomputed long-term key (as coturn's `0x...` user entries).
    pub fn with_user_key(mut self, username: impl Into<String>, key: LongTermKey) -> Self {
        self.users.insert(username.into(), key);
        self
    }

    /// Adds a TURN REST API shared secret. All configured secrets are tried in order.
    pub fn with_rest_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.rest_secrets.push(secret.into());
        self
    }

    /// The realm the keys were made for.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The candidate keys for `username` at wall-clock `unix_secs`: the static key, then one
    /// key per REST secret when the username is an unexpired `expiry:user`.
    pub(crate) fn keys_for(&self, username: &str, unix_secs: u64) -> Result<Keys, CredentialError> {
        let mut keys = Keys::default();
        if let Some(key) = self.users.get(username) {
            keys.push(*key);
        }
        if !self.rest_secrets.is_empty()
            && let Some(expiry) = rest_expiry(username)
        {
            if expiry <= unix_secs {
                if keys.is_empty() {
                    return Err(CredentialError::Expired);
                }
            } else {
                for secret in &self.rest_secrets {
                    let password = rest_password(secret, username);
                    keys.push(long_term_key(username, &self.realm, &password));
                }
            }
        }
        if keys.is_empty() {
            return Err(CredentialError::UnknownUser);
        }
        Ok(keys)
    }
}

/// Candidate keys for one username; small and on the stack in the common case.
#[derive(Debug, Default)]
pub(crate) struct Keys(Vec<LongTermKey>);

impl Keys {
    fn push(&mut self, key: LongTermKey) {
        self.0.push(key);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &LongTermKey> {
        self.0.iter()
    }
}

/// Why a username has no key. Both are answered with 401 (RFC 8489 §9.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Neither a static user nor a REST username under a configured secret.
    #[error("unknown username")]
    UnknownUser,
    /// A REST username whose expiry timestamp has passed.
    #[error("ephemeral username expired")]
    Expired,
}

/// Issues and checks stateless nonces: `hex(timestamp) || hex(MAC(key, timestamp, client))`,
/// so a nonce proves the server made it for this client address, without any table.
#[derive(Clone)]
pub(crate) struct NonceKey([u8; 32]);

/// Result of checking a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NonceCheck {
    /// Made by us for this client and still fresh.
    Valid,
    /// Not ours, not for this client, or too old: answer 438 (RFC 8489 §9.2.4).
    Stale,
}

const NONCE_MAC_LEN: usize = 12;
/// Length of an issued nonce: 16 hex digits of timestamp, 24 of MAC.
pub(crate) const NONCE_LEN: usize = 16 + 2 * NONCE_MAC_LEN;

impl NonceKey {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Self(key)
    }

    fn mac(&self, timestamp: u64, client: SocketAddr) -> [u8; NONCE_MAC_LEN] {
        let mut mac = hmac_sha1(&self.0);
        mac.update(&timestamp.to_be_bytes());
        match client.ip() {
            std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&client.port().to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0; NONCE_MAC_LEN];
        out.copy_from_slice(&full[..NONCE_MAC_LEN]);
        out
    }

    pub(crate) fn issue(&self, unix_secs: u64, client: SocketAddr) -> String {
        let mut out = String::with_capacity(NONCE_LEN);
        push_hex(&mut out, &unix_secs.to_be_bytes());
        push_hex(&mut out, &self.mac(unix_secs, client));
        out
    }

    pub(crate) fn check(
        &self,
        nonce: &[u8],
        client: SocketAddr,
        unix_secs: u64,
        lifetime_secs: u64,
    ) -> NonceCheck {
        let Some((ts, mac)) = decode_nonce(nonce) else {
            return NonceCheck::Stale;
        };
        let expected = self.mac(ts, client);
        // Constant-time comparison of the MAC.
        let diff = expected
            .iter()
            .zip(mac.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 || ts > unix_secs || unix_secs - ts >= lifetime_secs {
            return NonceCheck::Stale;
        }
        NonceCheck::Valid
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

fn decode_nonce(nonce: &[u8]) -> Option<(u64, [u8; NONCE_MAC_LEN])> {
    if nonce.len() != NONCE_LEN {
        return None;
    }
    let mut raw = [0u8; NONCE_LEN / 2];
    for (dst, pair) in raw.iter_mut().zip(nonce.chunks_exact(2)) {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        *dst = (hi * 16 + lo) as u8;
    }
    let (ts, mac) = raw.split_at(8);
    let ts = u64::from_be_bytes(ts.try_into().ok()?);
    Some((ts, mac.try_into().ok()?))
}

/// HMAC-SHA1 of a STUN message prefix whose header length is rewritten to
/// `length` (RFC 8489 §14.5: the length covers the attributes up to and including
/// MESSAGE-INTEGRITY).
pub(crate) fn integrity(key: &[u8], prefix: &[u8], length: u16) -> [u8; INTEGRITY_LEN] {
    let mut mac = hmac_sha1(key);
    if let (Some(kind), Some(rest)) = (prefix.get(..2), prefix.get(4..)) {
        mac.update(kind);
        mac.update(&length.to_be_bytes());
        mac.update(rest);
    }
    mac.finalize().into_bytes().into()
}

/// Checks `value` against the MESSAGE-INTEGRITY of `prefix` in constant time.
pub(crate) fn verify_integrity(key: &[u8], prefix: &[u8], length: u16, value: &[u8]) -> bool {
    let mut mac = hmac_sha1(key);
    if let (Some(kind), Some(rest)) = (prefix.get(..2), prefix.get(4..)) {
        mac.update(kind);
        mac.update(&length.to_be_bytes());
        mac.update(rest);
    }
    mac.verify_slice(value).is_ok()
}

/// A token bucket limiting how many 401 answers leave per second (design brief: a cap on
/// the rate of 401s, so the server is no reflector for spoofed requests).
#[derive(Debug, Clone)]
pub(crate) struct RateLimiter {
    per_second: u32,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            per_second,
            tokens: f64::from(per_second),
            last: None,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.per_second);
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn long_term_key_is_md5_of_user_realm_password() {
        // The RFC 5769 §2.4 inputs: username "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}",
        // realm "example.org", password "TheMatrIX" (after SASLprep).
        let key = long_term_key(
            "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}",
            "example.org",
            "TheMatrIX",
        );
        // MD5 of the same input computed independently (Python hashlib).
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "e8ca7ad59d5eb0518e312911d2dab2a9");
    }

    #[test]
    fn rest_password_matches_coturn_style() {
        // base64(HMAC-SHA1("secret", "1700000000:alice")), computed independently.
        let pw = rest_password(b"secret", "1700000000:alice");
        assert_eq!(pw, "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
        assert_ne!(rest_password(b"other", "1700000000:alice"), pw);
        assert_eq!(rest_expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(rest_expiry("alice"), None);
        assert_eq!(rest_expiry("x:alice"), None);
    }

    #[test]
    fn keys_for_static_and_rest_users() {
        let creds = Credentials::new("r")
            .with_user("bob", "pw")
            .with_rest_secret(b"s1".to_vec())
            .with_rest_secret(b"s2".to_vec());
        let keys = creds.keys_for("bob", 100).unwrap();
        assert_eq!(keys.iter().count(), 1);
        let keys = creds.keys_for("200:alice", 100).unwrap();
        assert_eq!(keys.iter().count(), 2);
        let expected = long_term_key("200:alice", "r", &rest_password(b"s2", "200:alice"));
        assert!(keys.iter().any(|k| *k == expected));
        assert_eq!(
            creds.keys_for("100:alice", 100).unwrap_err(),
            CredentialError::Expired
        );
        assert_eq!(
            creds.keys_for("carol", 100).unwrap_err(),
            CredentialError::UnknownUser
        );
        let no_secret = Credentials::new("r");
        assert_eq!(
            no_secret.keys_for("200:alice", 100).unwrap_err(),
            CredentialError::UnknownUser
        );
    }

    #[test]
    fn nonce_is_bound_to_client_and_time() {
        let key = NonceKey::new([7; 32]);
        let client: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let other: SocketAddr = "198.51.100.1:4001".parse().unwrap();
        let nonce = key.issue(1000, client);
        assert_eq!(nonce.len(), NONCE_LEN);
        assert_eq!(
            key.check(nonce.as_bytes(), client, 1000, 600),
            NonceCheck::Valid
        );
        assert_eq!(
            key.check(nonce.as_bytes(), client, 1599, 600),
            NonceCheck::Valid
        );
        assert_eq!(
            key.check(nonce.as_bytes(), client, 1600, 600),
            NonceCheck::Stale
        );
        assert_eq!(
            key.check(nonce.as_bytes(), other, 1000, 600),
            NonceCheck::Stale
        );
        assert_eq!(
            key.check(nonce.as_bytes(), client, 999, 600),
            NonceCheck::Stale
        );
        assert_eq!(
            NonceKey::new([8; 32]).check(nonce.as_bytes(), client, 1000, 600),
            NonceCheck::Stale
        );
        assert_eq!(key.check(b"garbage", client, 1000, 600), NonceCheck::Stale);
    }

    #[test]
    fn rate_limiter_refills() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(2);
        assert!(limiter.allow(start));
        assert!(limiter.allow(start));
        assert!(!limiter.allow(start));
        assert!(limiter.allow(start + Duration::from_millis(500)));
        assert!(!limiter.allow(start + Duration::from_millis(500)));
    }

    proptest! {
        #[test]
        fn nonce_round_trips(ts in 0u64..u64::MAX / 2, port in any::<u16>(), ip in any::<[u8; 16]>()) {
            let key = NonceKey::new([1; 32]);
            let client = SocketAddr::new(ip.into(), port);
            let nonce = key.issue(ts, client);
            prop_assert_eq!(decode_nonce(nonce.as_bytes()).map(|(t, _)| t), Some(ts));
            prop_assert_eq!(key.check(nonce.as_bytes(), client, ts, 1), NonceCheck::Valid);
        }

        #[test]
        fn nonce_check_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let key = NonceKey::new([1; 32]);
            let client: SocketAddr = "192.0.2.1:1".parse().unwrap();
            let _ = key.check(&bytes, client, 10, 600);
        }
    }
}
