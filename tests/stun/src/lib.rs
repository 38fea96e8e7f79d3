//! A minimal STUN/TURN encoder and decoder (RFC 8489, RFC 8656) for the lab tests, the bench
//! and the fuzz targets, written independently of the core's so that they do not test the
//! core against itself: a message builder with long-term credentials (MESSAGE-INTEGRITY,
//! RFC 8489 §9.2 and §14.5) and FINGERPRINT (§14.7), XOR addresses (§14.2), ChannelData
//! (RFC 8656 §12.4) and a decoder of answers.
//!
//! No sockets and no BPF: the fuzz workspace (`tests/fuzz`) builds it by path.

use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac as _};
use md5::{Digest as _, Md5};
use sha1::Sha1;

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
    /// ICMP (RFC 8656 §18.13).
    pub const ICMP: u16 = 0x8004;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

/// The magic cookie (RFC 8489 §6).
pub const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// The long-term key, MD5(username ":" realm ":" password) (RFC 8489 §9.2.2).
pub fn long_term_key(user: &str, realm: &str, password: &str) -> [u8; 16] {
    Md5::digest(format!("{user}:{realm}:{password}")).into()
}

/// The value of a CHANNEL-NUMBER attribute (RFC 8656 §18.1).
pub fn channel_number(number: u16) -> [u8; 4] {
    let [hi, lo] = number.to_be_bytes();
    [hi, lo, 0, 0]
}

/// A ChannelData message (RFC 8656 §12.4) without padding.
pub fn channel_data(number: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + data.len());
    out.extend_from_slice(&number.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A STUN message under construction.
#[derive(Debug, Clone)]
pub struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    /// A header of `method` and `class` with transaction id `txid`.
    pub fn new(method: u16, class: u16, txid: [u8; 12]) -> Self {
        // RFC 8489 §5: the class bits sit between the method bits.
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

    /// Continues a message whose header is given.
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

    /// Appends an attribute, padded to four bytes (a value too long for the length field
    /// is cut).
    pub fn attr(&mut self, t: u16, value: &[u8]) -> &mut Self {
        let len = value.len().min(usize::from(u16::MAX) - 3);
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        self.buf.extend_from_slice(&value[..len]);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        self
    }

    /// Appends an XOR address attribute (XOR-PEER-ADDRESS and the like, RFC 8489 §14.2).
    pub fn xor_addr(&mut self, t: u16, addr: SocketAddr) -> &mut Self {
        let value = xor_address(addr, self.txid());
        self.attr(t, &value)
    }

    /// USERNAME, REALM and NONCE (the attributes of an authenticated request).
    pub fn credentials(&mut self, user: &str, realm: &[u8], nonce: &[u8]) -> &mut Self {
        self.attr(attr::USERNAME, user.as_bytes())
            .attr(attr::REALM, realm)
            .attr(attr::NONCE, nonce)
    }

    /// The message's bytes: the length set, MESSAGE-INTEGRITY with `key` (RFC 8489 §14.5)
    /// and FINGERPRINT (§14.7) appended as asked. The builder is left as it was.
    pub fn finish(&self, key: Option<&[u8]>, fingerprint: bool) -> Vec<u8> {
        let mut m = self.clone();
        if let Some(key) = key {
            m.set_len(m.buf.len() - 20 + 24);
            // HMAC accepts keys of any length.
            if let Ok(mut mac) = <Hmac<Sha1>>::new_from_slice(key) {
                mac.update(&m.buf);
                let tag = mac.finalize().into_bytes();
                m.attr(attr::MESSAGE_INTEGRITY, &tag);
            }
        }
        if fingerprint {
            m.set_len(m.buf.len() - 20 + 8);
            let crc = crc32(&m.buf) ^ 0x5354_554E;
            m.attr(attr::FINGERPRINT, &crc.to_be_bytes());
        }
        m.set_len(m.buf.len() - 20);
        m.buf
    }

    fn set_len(&mut self, len: usize) {
        let len = (len.min(usize::from(u16::MAX)) as u16).to_be_bytes();
        self.buf[2..4].copy_from_slice(&len);
    }
}

/// The value of an XOR-*-ADDRESS attribute (RFC 8489 §14.2).
pub fn xor_address(addr: SocketAddr, txid: [u8; 12]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&[0, if addr.is_ipv4() { 1 } else { 2 }]);
    v.extend_from_slice(&(addr.port() ^ 0x2112).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => v.extend(ip.octets().iter().zip(MAGIC).map(|(a, m)| a ^ m)),
        IpAddr::V6(ip) => {
            let mask = MAGIC.iter().chain(txid.iter());
            v.extend(ip.octets().iter().zip(mask).map(|(a, m)| a ^ m));
        }
    }
    v
}

/// CRC-32 (ISO-HDLC, as in zlib), bitwise: the inputs are small.
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

/// A decoded STUN message (typically a server's answer).
#[derive(Debug, Clone)]
pub struct Answer {
    /// The method.
    pub method: u16,
    /// The class.
    pub class: u16,
    /// The transaction id.
    pub txid: [u8; 12],
    /// The attributes in order, values without padding.
    pub attrs: Vec<(u16, Vec<u8>)>,
}

impl Answer {
    /// Parses a STUN message leniently: the header's length is not checked and attributes
    /// are taken while they fit (the last one may lack its padding). `None` when `buf` is
    /// not STUN or an attribute runs past the end.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let (mut answer, mut rest) = Self::header(buf)?;
        while let [t0, t1, l0, l1, ref tail @ ..] = *rest {
            let l = usize::from(u16::from_be_bytes([l0, l1]));
            let value = tail.get(..l)?;
            answer
                .attrs
                .push((u16::from_be_bytes([t0, t1]), value.to_vec()));
            rest = tail.get(l.next_multiple_of(4)..).unwrap_or_default();
        }
        Some(answer)
    }

    /// Parses a well-formed STUN message only: the header's length matches `buf` and is a
    /// multiple of four, and the padded attributes fill it exactly.
    pub fn parse_exact(buf: &[u8]) -> Option<Self> {
        let len = usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]));
        if len % 4 != 0 || buf.len() != 20 + len {
            return None;
        }
        let (mut answer, mut rest) = Self::header(buf)?;
        while !rest.is_empty() {
            let [t0, t1, l0, l1, ref tail @ ..] = *rest else {
                return None;
            };
            let l = usize::from(u16::from_be_bytes([l0, l1]));
            let value = tail.get(..l)?;
            answer
                .attrs
                .push((u16::from_be_bytes([t0, t1]), value.to_vec()));
            rest = tail.get(l.next_multiple_of(4)..)?;
        }
        Some(answer)
    }

    /// The header decoded (no attributes yet) and the bytes after it.
    fn header(buf: &[u8]) -> Option<(Self, &[u8])> {
        let t = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]);
        if t & 0xC000 != 0 || buf.get(4..8)? != MAGIC {
            return None;
        }
        let answer = Self {
            method: (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2),
            class: ((t >> 4) & 1) | ((t >> 7) & 2),
            txid: buf.get(8..20)?.try_into().ok()?,
            attrs: Vec::new(),
        };
        Some((answer, &buf[20..]))
    }

    /// The first attribute of type `t`.
    pub fn attr(&self, t: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(a, _)| *a == t)
            .map(|(_, v)| v.as_slice())
    }

    /// The ERROR-CODE's number, class × 100 + number (e.g. 401).
    pub fn error_code(&self) -> Option<u16> {
        match *self.attr(attr::ERROR_CODE)? {
            [_, _, class, number, ..] => Some(u16::from(class & 7) * 100 + u16::from(number)),
            _ => None,
        }
    }

    /// An XOR address attribute decoded (XOR-RELAYED-ADDRESS and the like).
    pub fn xor_addr(&self, t: u16) -> Option<SocketAddr> {
        let v = self.attr(t)?;
        let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]) ^ 0x2112;
        let ip: IpAddr = match v.get(1)? {
            1 => {
                let mut o = [0u8; 4];
                for (i, b) in o.iter_mut().enumerate() {
                    *b = v.get(4 + i)? ^ MAGIC[i];
                }
                o.into()
            }
            2 => {
                let mask: Vec<u8> = MAGIC.iter().chain(self.txid.iter()).copied().collect();
                let mut o = [0u8; 16];
                for (i, b) in o.iter_mut().enumerate() {
                    *b = v.get(4 + i)? ^ mask[i];
                }
                o.into()
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_of_the_check_string() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_built_message_parses_back() {
        let peer: SocketAddr = "198.51.100.2:10000".parse().unwrap();
        let bytes = Msg::new(method::CHANNEL_BIND, class::SUCCESS, [7; 12])
            .attr(attr::CHANNEL_NUMBER, &channel_number(0x4001))
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .finish(Some(&[1; 16]), true);
        let answer = Answer::parse_exact(&bytes).unwrap();
        assert_eq!(
            (answer.method, answer.class),
            (method::CHANNEL_BIND, class::SUCCESS)
        );
        assert_eq!(answer.xor_addr(attr::XOR_PEER_ADDRESS), Some(peer));
        assert_eq!(
            answer.attr(attr::CHANNEL_NUMBER),
            Some(&[0x40, 1, 0, 0][..])
        );
        assert!(answer.attr(attr::MESSAGE_INTEGRITY).is_some());
        assert_eq!(
            answer.attrs.last().map(|(t, _)| *t),
            Some(attr::FINGERPRINT)
        );
    }

    #[test]
    fn an_ipv6_address_is_masked_with_the_transaction_id() {
        let peer: SocketAddr = "[2001:db8::2]:7000".parse().unwrap();
        let bytes = Msg::new(method::SEND, class::INDICATION, [9; 12])
            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .finish(None, false);
        let answer = Answer::parse(&bytes).unwrap();
        assert_eq!(answer.xor_addr(attr::XOR_PEER_ADDRESS), Some(peer));
    }

    #[test]
    fn only_the_exact_parser_checks_the_length() {
        let mut bytes = Msg::new(method::BINDING, class::REQUEST, [1; 12]).finish(None, true);
        bytes.push(0);
        assert!(Answer::parse(&bytes).is_some());
        assert!(Answer::parse_exact(&bytes).is_none());
    }
}
