//! Shared pieces of the fuzz targets: the server the targets drive, its credentials, the
//! re-signing of mutated messages and reference Internet checksums. The STUN encoder and
//! decoder are `tests-stun`'s (independent of the core's own, so that the targets do not test
//! the core against itself).

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tests_stun::{Answer, MAGIC, Msg, attr, class, method};
use turn_control_core::{
    ClientAddr, Command, Config, Credentials, Server, Transmit, Transport,
};

/// The realm every target's server uses.
pub const REALM: &str = "fuzz.example";
/// The static user and password.
pub const USER: &str = "alice";
/// The static user's password.
pub const PASSWORD: &str = "alice-pw";
/// The TURN REST API shared secret.
pub const REST_SECRET: &[u8] = b"rest-secret";
/// The wall clock at the server's start: nonces and REST usernames depend on it, so a fixed
/// value makes the seed corpus's nonces valid on every run.
pub const UNIX_START: u64 = 1_700_000_000;
/// The REST username, valid for an hour after [`UNIX_START`].
pub const REST_USER: &str = "1700003600:fuzz";
/// The listener.
pub const LISTEN: &str = "198.51.100.1:3478";
/// The listener for IPv6 clients.
pub const LISTEN6: &str = "[2001:db8::1]:3478";
/// The relay's IPv4 address.
pub const RELAY4: &str = "198.51.100.7";
/// The relay's IPv6 address.
pub const RELAY6: &str = "2001:db8::7";
/// The port range allocations are drawn from: small, so that ports collide and run out.
pub const PORTS: (u16, u16) = (50000, 50015);

/// The long-term key of a user (RFC 8489 §9.2.2): MD5 of `user:realm:password`.
pub fn user_key(user: &str, password: &str) -> [u8; 16] {
    turn_control_core::long_term_key(user, REALM, password)
}

/// The long-term key of [`REST_USER`].
pub fn rest_key() -> [u8; 16] {
    let password = turn_control_core::rest_password(REST_SECRET, REST_USER);
    user_key(REST_USER, &password)
}

/// Parses a socket address constant.
pub fn sa(s: &str) -> SocketAddr {
    s.parse().expect("constant address")
}

/// The configuration every target's server runs with: one static user, one REST secret,
/// dual-stack relay addresses, a small port range, quotas and a constant RNG seed.
pub fn config() -> Config {
    let mut config = Config::new(REALM, [7; 32]);
    config.credentials = Credentials::new(REALM)
        .with_user(USER, PASSWORD)
        .with_rest_secret(REST_SECRET.to_vec());
    config.relay_ipv4 = Some(RELAY4.parse().expect("constant address"));
    config.relay_ipv6 = Some(RELAY6.parse().expect("constant address"));
    config.listeners = vec![sa(LISTEN), sa(LISTEN6)];
    config.port_range = PORTS.0..=PORTS.1;
    config.user_quota = Some(6);
    config.total_quota = Some(12);
    config.unauthorized_rate = Some(50);
    config
}

/// A server started at `now`, with the wall clock at [`UNIX_START`].
pub fn server(now: Instant) -> Server {
    Server::new(config(), now, wall_clock()).expect("valid configuration")
}

/// [`UNIX_START`] as a `SystemTime`.
pub fn wall_clock() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(UNIX_START)
}

/// Sends `bytes` from `client` and returns what the server answers to it, after draining the
/// commands (every relay port binds).
pub fn exchange(
    server: &mut Server,
    now: Instant,
    transport: Transport,
    local: SocketAddr,
    client: ClientAddr,
    bytes: &[u8],
) -> Vec<Vec<u8>> {
    server.handle_client(now, transport, local, client, bytes);
    while let Some(command) = server.poll_command() {
        if let Command::BindRelayPort { relay, .. } = command {
            server.relay_bound(now, relay);
        }
    }
    let mut out = Vec::new();
    while let Some(t) = server.poll_transmit() {
        if let Transmit::ToClient { payload, .. } = t {
            out.push(payload);
        }
    }
    out
}

/// Asks the server for a nonce with an unauthenticated Allocate and returns it.
pub fn fetch_nonce(
    server: &mut Server,
    now: Instant,
    transport: Transport,
    local: SocketAddr,
    client: ClientAddr,
) -> Option<Vec<u8>> {
    let request = Msg::new(method::ALLOCATE, class::REQUEST, [0x4E; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .finish(None, false);
    exchange(server, now, transport, local, client, &request)
        .iter()
        .find_map(|r| {
            Answer::parse_exact(r)?
                .attr(attr::NONCE)
                .map(<[u8]>::to_vec)
        })
}

/// Re-signs `message` for `user`: drops any USERNAME, REALM, NONCE, integrity and
/// FINGERPRINT attributes the bytes carry, appends the right ones and a valid
/// MESSAGE-INTEGRITY. Short or malformed input is padded to a header and its attributes
/// are taken as far as they parse.
pub fn sign(message: &[u8], user: &str, key: &[u8], nonce: &[u8], fingerprint: bool) -> Vec<u8> {
    let mut header = [0u8; 20];
    let n = message.len().min(20);
    header[..n].copy_from_slice(&message[..n]);
    // Keep the message STUN: the first two bits zero and the magic cookie present.
    header[0] &= 0x3F;
    header[4..8].copy_from_slice(&MAGIC);
    let mut m = Msg::from_header(&header);
    let mut rest = message.get(20..).unwrap_or_default();
    while let [t0, t1, l0, l1, ref tail @ ..] = *rest {
        let t = u16::from_be_bytes([t0, t1]);
        let l = usize::from(u16::from_be_bytes([l0, l1]));
        let Some(value) = tail.get(..l) else { break };
        if !matches!(
            t,
            attr::USERNAME
                | attr::REALM
                | attr::NONCE
                | attr::MESSAGE_INTEGRITY
                | attr::MESSAGE_INTEGRITY_SHA256
                | attr::FINGERPRINT
        ) {
            m.attr(t, value);
        }
        rest = tail.get(l.next_multiple_of(4)..).unwrap_or_default();
    }
    m.attr(attr::USERNAME, user.as_bytes())
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, nonce);
    m.finish(Some(key), fingerprint)
}

/// Sum of 16-bit big-endian words (odd trailing byte padded with zero), unfolded.
pub fn sum16(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

/// Folds a sum to 16 bits and complements it (RFC 1071).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// The UDP checksum (RFC 768, RFC 8200 §8.1) over the pseudo-header of `saddr`/`daddr`
/// (both 4 or both 16 bytes) and `udp` (header with its checksum field as is, then payload):
/// zero when the stored checksum is right.
pub fn udp_check(saddr: &[u8], daddr: &[u8], udp: &[u8]) -> u16 {
    let len = udp.len() as u64;
    fold(sum16(saddr) + sum16(daddr) + 17 + len + sum16(udp))
}
