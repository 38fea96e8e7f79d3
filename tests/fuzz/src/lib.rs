//! Shared pieces of the fuzz targets: a minimal STUN encoder and decoder (independent of the
//! core's own, so that the targets do not test the core against itself), the server the
//! targets drive, its credentials, and reference Internet checksums.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac as _};
use sha1::Sha1;
use turn_core::{ClientAddr, Config, Credentials, Server, Transmit, Transport};

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

/// STUN methods (RFC 8489 §18.2, RFC 8656 §17).
pub mod method {
    /// Binding.
    pub const BINDING: u16 = 0x001;
    /// Allocate.
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh.
    pub const REFRESH: u16 = 0x004;
    /// Send.
    pub const SEND: u16 = 0x006;
    /// Data.
    pub const DATA: u16 = 0x007;
    /// CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// STUN classes (RFC 8489 §5).
pub mod class {
    /// Request.
    pub const REQUEST: u16 = 0;
    /// Indication.
    pub const INDICATION: u16 = 1;
    /// Success response.
    pub const SUCCESS: u16 = 2;
    /// Error response.
    pub const ERROR: u16 = 3;
}

/// STUN and TURN attribute types (RFC 8489 §18.3, RFC 8656 §18).
pub mod attr {
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME.
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA.
    pub const DATA: u16 = 0x0013;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY.
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// MESSAGE-INTEGRITY-SHA256.
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// ADDITIONAL-ADDRESS-FAMILY.
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// A STUN message under construction.
#[derive(Debug, Clone)]
pub struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    /// A header for `method` and `class` (RFC 8489 §5: the class bits sit between method bits).
    pub fn new(method: u16, class: u16, txid: [u8; 12]) -> Self {
        let t = (method & 0x000F)
            | ((method & 0x0070) << 1)
            | ((method & 0x0F80) << 2)
            | ((class & 1) << 4)
            | ((class & 2) << 7);
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&t.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&txid);
        Self { buf }
    }

    /// Continues a message whose header (at least 20 bytes) is given.
    pub fn from_header(header: &[u8; 20]) -> Self {
        Self {
            buf: header.to_vec(),
        }
    }

    /// The transaction id.
    pub fn txid(&self) -> [u8; 12] {
        let mut t = [0; 12];
        t.copy_from_slice(&self.buf[8..20]);
        t
    }

    /// Appends an attribute, padded to four bytes.
    pub fn attr(&mut self, t: u16, value: &[u8]) -> &mut Self {
        let len = value.len().min(usize::from(u16::MAX) - 3);
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        self.buf.extend_from_slice(&value[..len]);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        self
    }

    /// Appends an XOR-*-ADDRESS attribute (RFC 8489 §14.2).
    pub fn xor_addr(&mut self, t: u16, addr: SocketAddr) -> &mut Self {
        let value = xor_address(addr, self.txid());
        self.attr(t, &value)
    }

    /// Sets the length and appends MESSAGE-INTEGRITY with `key` (RFC 8489 §14.5) and
    /// FINGERPRINT (§14.7) as asked.
    pub fn finish(mut self, key: Option<&[u8]>, fingerprint: bool) -> Vec<u8> {
        if let Some(key) = key {
            self.set_len(self.buf.len() - 20 + 24);
            let mut mac = <Hmac<Sha1>>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(&self.buf);
            let tag = mac.finalize().into_bytes();
            self.attr(attr::MESSAGE_INTEGRITY, &tag);
        }
        if fingerprint {
            self.set_len(self.buf.len() - 20 + 8);
            let crc = crc32(&self.buf) ^ 0x5354_554E;
            self.attr(attr::FINGERPRINT, &crc.to_be_bytes());
        }
        let len = self.buf.len() - 20;
        self.set_len(len);
        self.buf
    }

    fn set_len(&mut self, len: usize) {
        let len = (len.min(usize::from(u16::MAX)) as u16).to_be_bytes();
        self.buf[2..4].copy_from_slice(&len);
    }
}

/// The value of an XOR-*-ADDRESS attribute.
pub fn xor_address(addr: SocketAddr, txid: [u8; 12]) -> Vec<u8> {
    let port = addr.port() ^ 0x2112;
    let mut v = vec![0];
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.push(1);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend(ip.octets().iter().zip(MAGIC).map(|(a, m)| a ^ m));
        }
        IpAddr::V6(ip) => {
            v.push(2);
            v.extend_from_slice(&port.to_be_bytes());
            let mask = MAGIC.iter().chain(txid.iter());
            v.extend(ip.octets().iter().zip(mask).map(|(a, m)| a ^ m));
        }
    }
    v
}

/// CRC-32 (ISO-HDLC), bitwise: the inputs are small.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A decoded STUN message: what the targets look at in the server's answers.
#[derive(Debug, Clone)]
pub struct Decoded<'a> {
    /// Method bits.
    pub method: u16,
    /// Class bits.
    pub class: u16,
    /// Transaction id.
    pub txid: [u8; 12],
    /// Attributes in order.
    pub attrs: Vec<(u16, &'a [u8])>,
}

impl<'a> Decoded<'a> {
    /// Decodes a well-formed STUN message (length matches, attributes fit); `None` otherwise.
    pub fn parse(buf: &'a [u8]) -> Option<Self> {
        let header = buf.get(..20)?;
        let t = u16::from_be_bytes([header[0], header[1]]);
        if t & 0xC000 != 0 || header[4..8] != MAGIC {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if len % 4 != 0 || buf.len() != 20 + len {
            return None;
        }
        let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
        let class = ((t >> 4) & 1) | ((t >> 7) & 2);
        let mut txid = [0; 12];
        txid.copy_from_slice(&header[8..20]);
        let mut attrs = Vec::new();
        let mut rest = &buf[20..];
        while !rest.is_empty() {
            let [t0, t1, l0, l1, ref tail @ ..] = *rest else {
                return None;
            };
            let l = usize::from(u16::from_be_bytes([l0, l1]));
            let value = tail.get(..l)?;
            attrs.push((u16::from_be_bytes([t0, t1]), value));
            rest = tail.get(l.next_multiple_of(4)..)?;
        }
        Some(Self {
            method,
            class,
            txid,
            attrs,
        })
    }

    /// The first attribute of type `t`.
    pub fn attr(&self, t: u16) -> Option<&'a [u8]> {
        self.attrs.iter().find(|(a, _)| *a == t).map(|(_, v)| *v)
    }

    /// The error code (class × 100 + number), if an ERROR-CODE is present.
    pub fn error_code(&self) -> Option<u16> {
        let v = self.attr(attr::ERROR_CODE)?;
        let [_, _, class, number, ..] = *v else {
            return None;
        };
        Some(u16::from(class & 7) * 100 + u16::from(number))
    }
}

/// The long-term key of a user (RFC 8489 §9.2.2): MD5 of `user:realm:password`.
pub fn user_key(user: &str, password: &str) -> [u8; 16] {
    turn_core::long_term_key(user, REALM, password)
}

/// The long-term key of [`REST_USER`].
pub fn rest_key() -> [u8; 16] {
    let password = turn_core::rest_password(REST_SECRET, REST_USER);
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
/// commands (poll order: commands first).
pub fn exchange(
    server: &mut Server,
    now: Instant,
    transport: Transport,
    local: SocketAddr,
    client: ClientAddr,
    bytes: &[u8],
) -> Vec<Vec<u8>> {
    server.handle_client(now, transport, local, client, bytes);
    while server.poll_command().is_some() {}
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
    let mut m = Msg::new(method::ALLOCATE, class::REQUEST, [0x4E; 12]);
    m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let request = m.finish(None, false);
    exchange(server, now, transport, local, client, &request)
        .iter()
        .find_map(|r| Decoded::parse(r)?.attr(attr::NONCE).map(<[u8]>::to_vec))
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
