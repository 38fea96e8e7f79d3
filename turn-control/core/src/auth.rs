//! Long-term credentials (RFC 8489 §9.2) with both password algorithms (MD5 and SHA-256,
//! §9.2.2, §18.5) and username anonymity (USERHASH, §14.4), TURN REST API ephemeral
//! credentials (draft-uberti-behave-turn-rest-00, coturn `use-auth-secret`), stateless nonces
//! carrying the RFC 8489 nonce cookie, and the MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and
//! FINGERPRINT computations.
//!
//! Usernames, realms and passwords are used as the bytes they are given: the OpaqueString
//! preparation of RFC 8265 that RFC 8489 §9.2.2 asks for is left to whoever configures them.

use std::collections::HashMap;
use std::net::SocketAddr;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha1::Sha1;
use sha2::Sha256;

type HmacSha1 = Hmac<Sha1>;
type HmacSha256 = Hmac<Sha256>;

/// A password algorithm (RFC 8489 §18.5): how the long-term key is derived from the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    /// MD5 (0x0001): the only key RFC 5389 clients know, and the one used when a request names
    /// no algorithm.
    Md5,
    /// SHA-256 (0x0002).
    Sha256,
}

impl PasswordAlgorithm {
    /// The algorithms this server offers in PASSWORD-ALGORITHMS, most preferred first.
    pub const OFFERED: [Self; 2] = [Self::Sha256, Self::Md5];

    /// The number IANA registered for the algorithm (RFC 8489 §18.5).
    pub const fn number(self) -> u16 {
        match self {
            Self::Md5 => 0x0001,
            Self::Sha256 => 0x0002,
        }
    }

    /// The algorithm registered as `number`, if this server implements it.
    pub const fn from_number(number: u16) -> Option<Self> {
        match number {
            0x0001 => Some(Self::Md5),
            0x0002 => Some(Self::Sha256),
            _ => None,
        }
    }
}

/// A long-term key (RFC 8489 §9.2.2): the hash of `username ":" realm ":" password` under one
/// password algorithm. Only keys are kept, never passwords.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LongTermKey {
    /// `MD5(username ":" realm ":" password)`, 16 bytes.
    Md5([u8; 16]),
    /// `SHA-256(username ":" realm ":" password)`, 32 bytes.
    Sha256([u8; 32]),
}

impl std::fmt::Debug for LongTermKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LongTermKey::{:?}(..)", self.algorithm())
    }
}

impl LongTermKey {
    /// Computes the key of `username`, `realm` and `password` under `algorithm`.
    pub fn new(algorithm: PasswordAlgorithm, username: &str, realm: &str, password: &str) -> Self {
        match algorithm {
            PasswordAlgorithm::Md5 => Self::Md5(long_term_key(username, realm, password)),
            PasswordAlgorithm::Sha256 => {
                Self::Sha256(colon_joined::<Sha256>(&[username, realm, password]).into())
            }
        }
    }

    /// The password algorithm the key was derived with.
    pub const fn algorithm(&self) -> PasswordAlgorithm {
        match self {
            Self::Md5(_) => PasswordAlgorithm::Md5,
            Self::Sha256(_) => PasswordAlgorithm::Sha256,
        }
    }

    /// The key as HMAC input (RFC 8489 §14.5, §14.6).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Md5(key) => key,
            Self::Sha256(key) => key,
        }
    }
}

/// The bytes of the MD5 long-term key, `MD5(username ":" realm ":" password)`: the key RFC 5389
/// clients compute, held by [`LongTermKey::Md5`].
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    colon_joined::<Md5>(&[username, realm, password]).into()
}

/// The USERHASH of `username` in `realm` (RFC 8489 §14.4): `SHA-256(username ":" realm)`.
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    colon_joined::<Sha256>(&[username, realm]).into()
}

/// The hash of `parts` joined with colons.
fn colon_joined<D: sha2::Digest>(parts: &[&str]) -> sha2::digest::Output<D> {
    let mut hash = D::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hash.update(b":");
        }
        hash.update(part.as_bytes());
    }
    hash.finalize()
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

fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

/// The users a server accepts: static users by long-term key (one per password algorithm) and
/// by USERHASH, and shared secrets for ephemeral REST credentials (several, so that a secret
/// can be rotated).
///
/// A REST username (`expiry:user`) cannot be found from its USERHASH, so a request naming one
/// that way is refused with 401, as RFC 8489 §9.2.4 allows. For the same reason the nonce
/// cookie announces "Username anonymity", which obliges RFC 8489 clients to send USERHASH
/// (§9.2.5), only while no REST secret is configured.
#[derive(Clone, Default)]
pub struct Credentials {
    realm: String,
    users: HashMap<String, Vec<LongTermKey>>,
    /// The static users by USERHASH (RFC 8489 §14.4). REST usernames cannot be listed here:
    /// there are as many as expiry times and names.
    userhashes: HashMap<[u8; 32], String>,
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

    /// Adds a static user by password; only its keys (MD5 and SHA-256) are stored.
    pub fn with_user(mut self, username: impl Into<String>, password: &str) -> Self {
        let username = username.into();
        let keys = PasswordAlgorithm::OFFERED
            .map(|algorithm| LongTermKey::new(algorithm, &username, &self.realm, password));
        self.userhashes
            .insert(userhash(&username, &self.realm), username.clone());
        self.users.insert(username, keys.to_vec());
        self
    }

    /// Adds a static user by precomputed key, or its key for one more password algorithm
    /// (coturn's `0x...` user entries are MD5 keys). A user known by an MD5 key only cannot
    /// authenticate with SHA-256.
    pub fn with_user_key(mut self, username: impl Into<String>, key: LongTermKey) -> Self {
        let username = username.into();
        self.userhashes
            .insert(userhash(&username, &self.realm), username.clone());
        let keys = self.users.entry(username).or_default();
        keys.retain(|k| k.algorithm() != key.algorithm());
        keys.push(key);
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

    /// The STUN Security Features announced in the nonce cookie (RFC 8489 §9.2, §18.1).
    /// "Password algorithms" always. "Username anonymity" only without REST secrets: a client
    /// told so must send USERHASH instead of USERNAME (§9.2.5), and a REST username cannot be
    /// found from its hash, so announcing it would lock every RFC 8489 REST client out.
    pub(crate) fn security_features(&self) -> SecurityFeatures {
        if self.rest_secrets.is_empty() {
            SecurityFeatures::PASSWORD_ALGORITHMS.with(SecurityFeatures::USERNAME_ANONYMITY)
        } else {
            SecurityFeatures::PASSWORD_ALGORITHMS
        }
    }

    /// The static user whose USERHASH is `hash` (RFC 8489 §14.4). REST users are never found:
    /// the RFC lets a server refuse a USERHASH it does not know (§9.2.4, 401).
    pub(crate) fn user_by_hash(&self, hash: &[u8; 32]) -> Option<&str> {
        self.userhashes.get(hash).map(String::as_str)
    }

    /// The candidate keys under `algorithm` for `username` at wall-clock `unix_secs`: the
    /// static key, then one key per REST secret when the username is an unexpired
    /// `expiry:user`.
    pub(crate) fn keys_for(
        &self,
        username: &str,
        algorithm: PasswordAlgorithm,
        unix_secs: u64,
    ) -> Result<Keys, CredentialError> {
        let mut keys = Keys::default();
        let static_keys = self.users.get(username);
        if let Some(key) = static_keys
            .into_iter()
            .flatten()
            .find(|k| k.algorithm() == algorithm)
        {
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
                    keys.push(LongTermKey::new(
                        algorithm,
                        username,
                        &self.realm,
                        &password,
                    ));
                }
            }
        }
        match (keys.is_empty(), static_keys) {
            (false, _) => Ok(keys),
            (true, Some(_)) => Err(CredentialError::AlgorithmUnavailable),
            (true, None) => Err(CredentialError::UnknownUser),
        }
    }
}

/// Candidate keys for one username, all under the same password algorithm.
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

/// Why a request's credentials are refused. All are answered with 401 (RFC 8489 §9.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Neither a static user nor a REST username under a configured secret.
    #[error("unknown username")]
    UnknownUser,
    /// A USERHASH of no static user (REST usernames cannot be found from their hash).
    #[error("unknown USERHASH")]
    UnknownUserhash,
    /// A REST username whose expiry timestamp has passed.
    #[error("ephemeral username expired")]
    Expired,
    /// A static user configured by key has no key for the requested password algorithm.
    #[error("no key for the password algorithm")]
    AlgorithmUnavailable,
    /// The REALM is not this server's.
    #[error("foreign realm")]
    ForeignRealm,
    /// The message integrity does not verify with any key of the user.
    #[error("message integrity mismatch")]
    IntegrityMismatch,
}

/// The 24 STUN Security Feature bits of a nonce cookie (RFC 8489 §9.2, §18.1), numbered from
/// the least significant end of the 24-bit number as verified erratum 6290 corrects §9.2:
/// the RFC's own test vector (Appendix B.1) has `obMatJos2AAAC`, 0x000002, bit 1, and carries
/// USERHASH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SecurityFeatures(u32);

/// What every RFC 8489 NONCE starts with, before the four base64 characters of the features.
const NONCE_COOKIE_PREFIX: &[u8; 9] = b"obMatJos2";
/// The nonce cookie: the prefix and the base64 of three bytes.
pub(crate) const NONCE_COOKIE_LEN: usize = NONCE_COOKIE_PREFIX.len() + 4;

impl SecurityFeatures {
    /// Bit 0, "Password algorithms": the server sends PASSWORD-ALGORITHMS and checks that it
    /// comes back unaltered (§9.2.4).
    pub(crate) const PASSWORD_ALGORITHMS: Self = Self(1 << 0);
    /// Bit 1, "Username anonymity": the client sends USERHASH in place of USERNAME.
    pub(crate) const USERNAME_ANONYMITY: Self = Self(1 << 1);

    /// These features and `other`'s.
    pub(crate) const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every feature of `other` is set.
    pub(crate) const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The features of the nonce cookie `nonce` starts with; `None` when it starts with none.
    pub(crate) fn from_nonce(nonce: &[u8]) -> Option<Self> {
        let cookie = nonce.get(..NONCE_COOKIE_LEN)?;
        let (prefix, bits) = cookie.split_at(NONCE_COOKIE_PREFIX.len());
        if prefix != NONCE_COOKIE_PREFIX {
            return None;
        }
        let mut raw = [0u8; 3];
        let decoded = base64::engine::general_purpose::STANDARD
            .decode_slice(bits, &mut raw)
            .ok()?;
        (decoded == raw.len()).then(|| Self(u32::from_be_bytes([0, raw[0], raw[1], raw[2]])))
    }

    /// The 13-character nonce cookie announcing these features.
    fn cookie(self) -> [u8; NONCE_COOKIE_LEN] {
        let mut out = [0u8; NONCE_COOKIE_LEN];
        let (prefix, bits) = out.split_at_mut(NONCE_COOKIE_PREFIX.len());
        prefix.copy_from_slice(NONCE_COOKIE_PREFIX);
        let [_, b0, b1, b2] = self.0.to_be_bytes();
        // Three bytes are exactly four base64 characters: the slice always fits.
        let _ = base64::engine::general_purpose::STANDARD.encode_slice([b0, b1, b2], bits);
        out
    }
}

/// Issues and checks stateless nonces: `cookie || hex(timestamp) || hex(MAC)`, the MAC keyed
/// by a server secret over the cookie, the timestamp and the client's address and port. A
/// valid nonce proves that the server made it, for this client, and with these security
/// features, without any table: stripping or changing the features (a bid-down, RFC 8489
/// §9.2.1) makes it stale, as does a nonce of the earlier format without a cookie.
#[derive(Clone)]
pub(crate) struct NonceKey([u8; 32]);

/// Result of checking a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NonceCheck {
    /// Made by us for this client and still fresh.
    Valid,
    /// Not ours, not for this client, altered or too old: answer 438 (RFC 8489 §9.2.4).
    Stale,
}

const NONCE_MAC_LEN: usize = 12;
/// Length of an issued nonce: the cookie, 16 hex digits of timestamp, 24 of MAC.
pub(crate) const NONCE_LEN: usize = NONCE_COOKIE_LEN + 16 + 2 * NONCE_MAC_LEN;

impl NonceKey {
    pub(crate) fn new(key: [u8; 32]) -> Self {
        Self(key)
    }

    fn mac(&self, cookie: &[u8], timestamp: u64, client: SocketAddr) -> [u8; NONCE_MAC_LEN] {
        let mut mac = hmac_sha1(&self.0);
        // Fixed-length fields, then the address: the input parses one way only.
        mac.update(cookie);
        mac.update(&timestamp.to_be_bytes());
        mac.update(&client.port().to_be_bytes());
        match client.ip() {
            std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        let full = mac.finalize().into_bytes();
        let mut out = [0; NONCE_MAC_LEN];
        out.copy_from_slice(&full[..NONCE_MAC_LEN]);
        out
    }

    pub(crate) fn issue(
        &self,
        features: SecurityFeatures,
        unix_secs: u64,
        client: SocketAddr,
    ) -> String {
        let cookie = features.cookie();
        let mut out = String::with_capacity(NONCE_LEN);
        out.extend(cookie.iter().map(|b| char::from(*b)));
        push_hex(&mut out, &unix_secs.to_be_bytes());
        push_hex(&mut out, &self.mac(&cookie, unix_secs, client));
        out
    }

    pub(crate) fn check(
        &self,
        nonce: &[u8],
        client: SocketAddr,
        unix_secs: u64,
        lifetime_secs: u64,
    ) -> NonceCheck {
        let Some((cookie, ts, mac)) = decode_nonce(nonce) else {
            return NonceCheck::Stale;
        };
        let expected = self.mac(cookie, ts, client);
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

/// Splits an issued nonce into its cookie, timestamp and MAC.
fn decode_nonce(nonce: &[u8]) -> Option<(&[u8], u64, [u8; NONCE_MAC_LEN])> {
    if nonce.len() != NONCE_LEN {
        return None;
    }
    let (cookie, hex) = nonce.split_at(NONCE_COOKIE_LEN);
    SecurityFeatures::from_nonce(cookie)?;
    let mut raw = [0u8; (NONCE_LEN - NONCE_COOKIE_LEN) / 2];
    for (dst, pair) in raw.iter_mut().zip(hex.chunks_exact(2)) {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        *dst = (hi * 16 + lo) as u8;
    }
    let (ts, mac) = raw.split_at(8);
    let ts = u64::from_be_bytes(ts.try_into().ok()?);
    Some((cookie, ts, mac.try_into().ok()?))
}

/// Length of a MESSAGE-INTEGRITY value (HMAC-SHA1, RFC 8489 §14.5).
pub const INTEGRITY_LEN: usize = 20;
/// Length of a full MESSAGE-INTEGRITY-SHA256 value (HMAC-SHA256, RFC 8489 §14.6); this server
/// signs with the full value.
pub const INTEGRITY_SHA256_LEN: usize = 32;
/// The shortest MESSAGE-INTEGRITY-SHA256 accepted: RFC 8489 §14.6 lets a sender truncate it
/// to no less than 16 bytes, in multiples of 4. Shorter ones are malformed.
pub const INTEGRITY_SHA256_MIN_LEN: usize = 16;

/// The attribute that carries a message's integrity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Integrity {
    /// MESSAGE-INTEGRITY: HMAC-SHA1 (RFC 8489 §14.5).
    Sha1,
    /// MESSAGE-INTEGRITY-SHA256: HMAC-SHA256, possibly truncated (RFC 8489 §14.6).
    Sha256,
}

impl Integrity {
    /// Whether `len` is a valid value length for the attribute.
    pub(crate) fn valid_len(self, len: usize) -> bool {
        match self {
            Self::Sha1 => len == INTEGRITY_LEN,
            Self::Sha256 => {
                (INTEGRITY_SHA256_MIN_LEN..=INTEGRITY_SHA256_LEN).contains(&len)
                    && len.is_multiple_of(4)
            }
        }
    }

    /// Whether `value` is the integrity of `prefix` under `key`, in constant time.
    pub(crate) fn verify(self, key: &[u8], prefix: &[u8], length: u16, value: &[u8]) -> bool {
        match self {
            Self::Sha1 => verify_integrity(key, prefix, length, value),
            Self::Sha256 => verify_integrity_sha256(key, prefix, length, value),
        }
    }
}

/// What a response is signed with: the key that authenticated the request it answers and the
/// integrity attribute the request came with (RFC 8489 §9.1.3, §9.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SigningKey {
    pub(crate) key: LongTermKey,
    pub(crate) integrity: Integrity,
}

impl SigningKey {
    /// The signing of RFC 5389 clients: the MD5 key under MESSAGE-INTEGRITY.
    #[cfg(test)]
    pub(crate) const fn classic(md5: [u8; 16]) -> Self {
        Self {
            key: LongTermKey::Md5(md5),
            integrity: Integrity::Sha1,
        }
    }
}

/// Feeds the MAC with a STUN message prefix whose header length is rewritten to `length`
/// (RFC 8489 §14.5, §14.6: the length covers the attributes up to and including the
/// integrity attribute).
fn feed(mac: &mut impl Mac, prefix: &[u8], length: u16) {
    if let (Some(kind), Some(rest)) = (prefix.get(..2), prefix.get(4..)) {
        mac.update(kind);
        mac.update(&length.to_be_bytes());
        mac.update(rest);
    }
}

/// MESSAGE-INTEGRITY (HMAC-SHA1) of `prefix` with header length `length`.
pub(crate) fn integrity(key: &[u8], prefix: &[u8], length: u16) -> [u8; INTEGRITY_LEN] {
    let mut mac = hmac_sha1(key);
    feed(&mut mac, prefix, length);
    mac.finalize().into_bytes().into()
}

/// Checks `value` against the MESSAGE-INTEGRITY of `prefix` in constant time.
pub(crate) fn verify_integrity(key: &[u8], prefix: &[u8], length: u16, value: &[u8]) -> bool {
    let mut mac = hmac_sha1(key);
    feed(&mut mac, prefix, length);
    mac.verify_slice(value).is_ok()
}

/// The full MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256) of `prefix` with header length `length`.
pub(crate) fn integrity_sha256(
    key: &[u8],
    prefix: &[u8],
    length: u16,
) -> [u8; INTEGRITY_SHA256_LEN] {
    let mut mac = hmac_sha256(key);
    feed(&mut mac, prefix, length);
    mac.finalize().into_bytes().into()
}

/// Checks `value`, a MESSAGE-INTEGRITY-SHA256 possibly truncated to its leading bytes, against
/// that of `prefix` in constant time. Lengths RFC 8489 §14.6 does not allow never verify.
pub(crate) fn verify_integrity_sha256(
    key: &[u8],
    prefix: &[u8],
    length: u16,
    value: &[u8],
) -> bool {
    if !Integrity::Sha256.valid_len(value.len()) {
        return false;
    }
    let mut mac = hmac_sha256(key);
    feed(&mut mac, prefix, length);
    mac.verify_truncated_left(value).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The username of RFC 5769 §2.4 and RFC 8489 Appendix B.1, which OpaqueString leaves as
    /// it is.
    const MATRIX_USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    /// Its password after OpaqueString (SASLprep in RFC 5769).
    const MATRIX_PASSWORD: &str = "TheMatrIX";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn long_term_keys_are_md5_and_sha256_of_user_realm_password() {
        // MD5 and SHA-256 of the same input computed independently (Python hashlib).
        let md5 = long_term_key(MATRIX_USER, "example.org", MATRIX_PASSWORD);
        assert_eq!(hex(&md5), "e8ca7ad59d5eb0518e312911d2dab2a9");
        let key = LongTermKey::new(
            PasswordAlgorithm::Md5,
            MATRIX_USER,
            "example.org",
            MATRIX_PASSWORD,
        );
        assert_eq!(key, LongTermKey::Md5(md5));
        let key = LongTermKey::new(
            PasswordAlgorithm::Sha256,
            MATRIX_USER,
            "example.org",
            MATRIX_PASSWORD,
        );
        assert_eq!(key.algorithm(), PasswordAlgorithm::Sha256);
        assert_eq!(
            hex(key.as_bytes()),
            "dd295a613b9058c3c23d6dc7165bda072304d989c9d0af3a8c7e184b4f9bb4a1"
        );
        // RFC 8489 §9.2.2's own example.
        assert_eq!(
            hex(&long_term_key("user", "realm", "pass")),
            "8493fbc53ba582fb4c044c456bdc40eb"
        );
        assert_eq!(format!("{key:?}"), "LongTermKey::Sha256(..)");
    }

    #[test]
    fn userhash_matches_rfc8489_appendix_b1() {
        assert_eq!(
            hex(&userhash(MATRIX_USER, "example.org")),
            "4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"
        );
    }

    #[test]
    fn password_algorithm_numbers() {
        for algorithm in PasswordAlgorithm::OFFERED {
            assert_eq!(
                PasswordAlgorithm::from_number(algorithm.number()),
                Some(algorithm)
            );
        }
        assert_eq!(PasswordAlgorithm::Md5.number(), 1);
        assert_eq!(PasswordAlgorithm::Sha256.number(), 2);
        assert_eq!(PasswordAlgorithm::from_number(0), None);
        assert_eq!(PasswordAlgorithm::from_number(3), None);
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
    fn keys_for_static_and_rest_users_under_each_algorithm() {
        let creds = Credentials::new("r")
            .with_user("bob", "pw")
            .with_rest_secret(b"s1".to_vec())
            .with_rest_secret(b"s2".to_vec());
        for algorithm in PasswordAlgorithm::OFFERED {
            let keys = creds.keys_for("bob", algorithm, 100).unwrap();
            let keys: Vec<_> = keys.iter().collect();
            assert_eq!(keys, [&LongTermKey::new(algorithm, "bob", "r", "pw")]);
            let keys = creds.keys_for("200:alice", algorithm, 100).unwrap();
            assert_eq!(keys.iter().count(), 2);
            let password = rest_password(b"s2", "200:alice");
            let expected = LongTermKey::new(algorithm, "200:alice", "r", &password);
            assert!(keys.iter().any(|k| *k == expected));
            assert_eq!(
                creds.keys_for("100:alice", algorithm, 100).unwrap_err(),
                CredentialError::Expired
            );
            assert_eq!(
                creds.keys_for("carol", algorithm, 100).unwrap_err(),
                CredentialError::UnknownUser
            );
        }
        let no_secret = Credentials::new("r");
        assert_eq!(
            no_secret
                .keys_for("200:alice", PasswordAlgorithm::Md5, 100)
                .unwrap_err(),
            CredentialError::UnknownUser
        );
    }

    #[test]
    fn a_user_by_md5_key_has_no_sha256_key_until_given_one() {
        let md5 = LongTermKey::Md5(long_term_key("dave", "r", "pw"));
        let sha256 = LongTermKey::new(PasswordAlgorithm::Sha256, "dave", "r", "pw");
        let creds = Credentials::new("r").with_user_key("dave", md5);
        assert!(creds.keys_for("dave", PasswordAlgorithm::Md5, 0).is_ok());
        assert_eq!(
            creds
                .keys_for("dave", PasswordAlgorithm::Sha256, 0)
                .unwrap_err(),
            CredentialError::AlgorithmUnavailable
        );
        let creds = creds.with_user_key("dave", sha256);
        let keys = creds
            .keys_for("dave", PasswordAlgorithm::Sha256, 0)
            .unwrap();
        assert_eq!(keys.iter().collect::<Vec<_>>(), [&sha256]);
        assert_eq!(
            creds.keys_for("dave", PasswordAlgorithm::Md5, 0).unwrap().0,
            [md5]
        );
        assert_eq!(creds.user_by_hash(&userhash("dave", "r")), Some("dave"));
    }

    #[test]
    fn userhash_finds_static_users_only() {
        let creds = Credentials::new("r")
            .with_user("bob", "pw")
            .with_rest_secret(b"s".to_vec());
        assert_eq!(creds.user_by_hash(&userhash("bob", "r")), Some("bob"));
        // The hash depends on the realm.
        assert_eq!(creds.user_by_hash(&userhash("bob", "other")), None);
        assert_eq!(creds.user_by_hash(&userhash("200:alice", "r")), None);
    }

    #[test]
    fn username_anonymity_is_announced_only_without_rest_secrets() {
        let static_only = Credentials::new("r").with_user("bob", "pw");
        let features = static_only.security_features();
        assert!(features.contains(SecurityFeatures::PASSWORD_ALGORITHMS));
        assert!(features.contains(SecurityFeatures::USERNAME_ANONYMITY));
        let features = static_only
            .with_rest_secret(b"s".to_vec())
            .security_features();
        assert!(features.contains(SecurityFeatures::PASSWORD_ALGORITHMS));
        assert!(!features.contains(SecurityFeatures::USERNAME_ANONYMITY));
    }

    #[test]
    fn nonce_cookie_encodes_the_feature_bits() {
        let both = SecurityFeatures::PASSWORD_ALGORITHMS.with(SecurityFeatures::USERNAME_ANONYMITY);
        assert_eq!(&both.cookie(), b"obMatJos2AAAD");
        assert_eq!(
            &SecurityFeatures::PASSWORD_ALGORITHMS.cookie(),
            b"obMatJos2AAAB"
        );
        assert_eq!(&SecurityFeatures::default().cookie(), b"obMatJos2AAAA");
        // RFC 8489 Appendix B.1's nonce: username anonymity only.
        assert_eq!(
            SecurityFeatures::from_nonce(b"obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"),
            Some(SecurityFeatures::USERNAME_ANONYMITY)
        );
        assert_eq!(SecurityFeatures::from_nonce(b"obMatJos2AAAD"), Some(both));
        // No cookie, a short one, a malformed one.
        assert_eq!(
            SecurityFeatures::from_nonce(b"f//499k954d6OL34oL9FSTvy64sA"),
            None
        );
        assert_eq!(SecurityFeatures::from_nonce(b"obMatJos2AA"), None);
        assert_eq!(SecurityFeatures::from_nonce(b"obMatJos2A==="), None);
        assert_eq!(SecurityFeatures::from_nonce(b"obMatJos2A!AA"), None);
    }

    #[test]
    fn nonce_is_bound_to_client_time_and_features() {
        let key = NonceKey::new([7; 32]);
        let features = SecurityFeatures::PASSWORD_ALGORITHMS;
        let client: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let other: SocketAddr = "198.51.100.1:4001".parse().unwrap();
        let nonce = key.issue(features, 1000, client);
        assert_eq!(nonce.len(), NONCE_LEN);
        assert!(nonce.starts_with("obMatJos2AAAB"));
        assert_eq!(
            SecurityFeatures::from_nonce(nonce.as_bytes()),
            Some(features)
        );
        let check = |nonce: &[u8], client, now| key.check(nonce, client, now, 600);
        assert_eq!(check(nonce.as_bytes(), client, 1000), NonceCheck::Valid);
        assert_eq!(check(nonce.as_bytes(), client, 1599), NonceCheck::Valid);
        assert_eq!(check(nonce.as_bytes(), client, 1600), NonceCheck::Stale);
        assert_eq!(check(nonce.as_bytes(), other, 1000), NonceCheck::Stale);
        assert_eq!(check(nonce.as_bytes(), client, 999), NonceCheck::Stale);
        assert_eq!(
            NonceKey::new([8; 32]).check(nonce.as_bytes(), client, 1000, 600),
            NonceCheck::Stale
        );
        assert_eq!(check(b"garbage", client, 1000), NonceCheck::Stale);
        // Other feature bits under the same MAC: a bid-down, refused.
        let stripped = nonce.replacen("obMatJos2AAAB", "obMatJos2AAAA", 1);
        assert_eq!(check(stripped.as_bytes(), client, 1000), NonceCheck::Stale);
        // The earlier format, without a cookie, is stale: the client gets a new nonce.
        assert_eq!(
            check(&nonce.as_bytes()[NONCE_COOKIE_LEN..], client, 1000),
            NonceCheck::Stale
        );
    }

    #[test]
    fn sha256_integrity_may_be_truncated_to_16_bytes_in_steps_of_4() {
        let prefix = [
            0u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        let full = integrity_sha256(b"key", &prefix, 36);
        for len in [16, 20, 24, 28, 32] {
            assert!(verify_integrity_sha256(b"key", &prefix, 36, &full[..len]));
            assert!(!verify_integrity_sha256(
                b"other",
                &prefix,
                36,
                &full[..len]
            ));
            assert!(!verify_integrity_sha256(b"key", &prefix, 40, &full[..len]));
        }
        for len in [0, 4, 12, 15, 17, 18, 31] {
            assert!(!Integrity::Sha256.valid_len(len));
            assert!(!verify_integrity_sha256(b"key", &prefix, 36, &full[..len]));
        }
        assert!(Integrity::Sha1.valid_len(20));
        assert!(!Integrity::Sha1.valid_len(16));
        let sha1 = integrity(b"key", &prefix, 24);
        assert!(Integrity::Sha1.verify(b"key", &prefix, 24, &sha1));
        assert!(Integrity::Sha256.verify(b"key", &prefix, 36, &full));
        assert!(!Integrity::Sha256.verify(b"key", &prefix, 36, &sha1));
    }

    proptest! {
        #[test]
        fn nonce_round_trips(ts in 0u64..u64::MAX / 2, port in any::<u16>(), ip in any::<[u8; 16]>(),
                             bits in 0u32..1 << 24) {
            let key = NonceKey::new([1; 32]);
            let client = SocketAddr::new(ip.into(), port);
            let features = SecurityFeatures(bits);
            let nonce = key.issue(features, ts, client);
            prop_assert_eq!(nonce.len(), NONCE_LEN);
            prop_assert_eq!(SecurityFeatures::from_nonce(nonce.as_bytes()), Some(features));
            prop_assert_eq!(decode_nonce(nonce.as_bytes()).map(|(_, t, _)| t), Some(ts));
            prop_assert_eq!(key.check(nonce.as_bytes(), client, ts, 1), NonceCheck::Valid);
        }

        #[test]
        fn nonce_check_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let key = NonceKey::new([1; 32]);
            let client: SocketAddr = "192.0.2.1:1".parse().unwrap();
            let _ = key.check(&bytes, client, 10, 600);
            let _ = SecurityFeatures::from_nonce(&bytes);
        }
    }
}
