//! STUN message parsing and response building on top of `rtc-stun` and `rtc-turn::proto`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use rtc_stun::attributes::{
    ATTR_FINGERPRINT, ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256, ATTR_SOFTWARE,
    AttrType,
};
use rtc_stun::error_code::{ErrorCode, ErrorCodeAttribute};
use rtc_stun::fingerprint::{FINGERPRINT, fingerprint_value};
use rtc_stun::message::{Message, MessageClass, MessageType, Method, Setter, TransactionId};
use rtc_stun::xoraddr::XorMappedAddress;

use crate::auth::{
    INTEGRITY_LEN, INTEGRITY_SHA256_LEN, Integrity, SigningKey, integrity, integrity_sha256,
};
use crate::framing::{MAGIC_COOKIE, STUN_HEADER_LEN};

/// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11), comprehension-optional.
pub(crate) const ATTR_ADDITIONAL_ADDRESS_FAMILY: AttrType = AttrType(0x8000);
/// ADDITIONAL-ADDRESS-FAMILY under the number draft-ietf-tram-turn-ipv6 gave it before RFC
/// 8656 assigned 0x8000: coturn's server accepts it and its `turnutils_uclient -Z` (dual
/// allocation) still sends it, so it is read as the same attribute.
pub(crate) const ATTR_ADDITIONAL_ADDRESS_FAMILY_DRAFT: AttrType = AttrType(0x8032);
/// ADDRESS-ERROR-CODE (RFC 8656 §18.12), comprehension-optional.
pub(crate) const ATTR_ADDRESS_ERROR_CODE: AttrType = AttrType(0x8001);

/// ALTERNATE-DOMAIN (RFC 8489 §14.16), comprehension-optional.
pub(crate) const ATTR_ALTERNATE_DOMAIN: AttrType = AttrType(0x8003);
/// ALTERNATE-SERVER (RFC 8489 §14.15), comprehension-optional.
pub(crate) const ATTR_ALTERNATE_SERVER: AttrType = AttrType(0x8023);

const ATTR_HEADER_LEN: usize = 4;
const MAX_REASON_LEN: usize = 763;

/// Why a datagram is not a STUN message we will look at; all of these are dropped silently
/// (RFC 8489 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// Not a STUN header: too short, wrong leading bits, wrong magic cookie or length.
    #[error("not a STUN message")]
    NotStun,
    /// The attributes do not parse.
    #[error("malformed STUN attributes")]
    Malformed,
    /// FINGERPRINT present but not last or wrong (RFC 8489 §14.7).
    #[error("FINGERPRINT mismatch")]
    BadFingerprint,
}

/// A decoded STUN message with the positions of its integrity attributes.
#[derive(Debug)]
pub(crate) struct Parsed<'a> {
    /// The decoded message. Attributes after the first integrity attribute are already
    /// dropped but for the integrity attributes themselves (RFC 8489 §9: after
    /// MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and FINGERPRINT count, after
    /// MESSAGE-INTEGRITY-SHA256 only FINGERPRINT).
    pub(crate) msg: Message,
    /// The message bytes (trailing bytes of the datagram cut off).
    pub(crate) raw: &'a [u8],
    /// Byte offset of the MESSAGE-INTEGRITY attribute header, if present and not after
    /// MESSAGE-INTEGRITY-SHA256.
    pub(crate) integrity_at: Option<usize>,
    /// Byte offset of the MESSAGE-INTEGRITY-SHA256 attribute header, if present.
    pub(crate) integrity_sha256_at: Option<usize>,
}

impl Parsed<'_> {
    pub(crate) fn method(&self) -> Method {
        self.msg.typ.method
    }

    pub(crate) fn class(&self) -> MessageClass {
        self.msg.typ.class
    }

    pub(crate) fn transaction_id(&self) -> TransactionId {
        self.msg.transaction_id
    }

    /// The first value of attribute `t` before MESSAGE-INTEGRITY.
    /// ADDITIONAL-ADDRESS-FAMILY's value, under its RFC 8656 number or its draft one.
    pub(crate) fn additional_address_family(&self) -> Option<&[u8]> {
        self.attr(ATTR_ADDITIONAL_ADDRESS_FAMILY)
            .or_else(|| self.attr(ATTR_ADDITIONAL_ADDRESS_FAMILY_DRAFT))
    }

    pub(crate) fn attr(&self, t: AttrType) -> Option<&[u8]> {
        self.msg
            .attributes
            .0
            .iter()
            .find(|a| a.typ == t)
            .map(|a| a.value.as_slice())
    }

    /// Every value of attribute `t` before MESSAGE-INTEGRITY.
    pub(crate) fn attrs(&self, t: AttrType) -> impl Iterator<Item = &[u8]> {
        self.msg
            .attributes
            .0
            .iter()
            .filter(move |a| a.typ == t)
            .map(|a| a.value.as_slice())
    }

    pub(crate) fn has(&self, t: AttrType) -> bool {
        self.attr(t).is_some()
    }

    /// Attribute types that are comprehension-required (< 0x8000) and not in `known`
    /// (RFC 8489 §6.3.1, answered with 420).
    pub(crate) fn unknown_required(&self, known: &[AttrType]) -> Vec<AttrType> {
        let mut unknown: Vec<AttrType> = Vec::new();
        for a in &self.msg.attributes.0 {
            if a.typ.required() && !known.contains(&a.typ) && !unknown.contains(&a.typ) {
                unknown.push(a.typ);
            }
        }
        unknown
    }

    /// Decodes XOR-PEER-ADDRESS / XOR-RELAYED-ADDRESS style value (RFC 8489 §14.2) with
    /// exact length checks.
    pub(crate) fn xor_address(&self, value: &[u8]) -> Option<SocketAddr> {
        decode_xor_address(value, &self.msg.transaction_id.0)
    }

    /// The integrity attribute a request is checked with (RFC 8489 §9.2.4):
    /// MESSAGE-INTEGRITY-SHA256 when present, else MESSAGE-INTEGRITY.
    pub(crate) fn integrity(&self) -> Option<Integrity> {
        match (self.integrity_sha256_at, self.integrity_at) {
            (Some(_), _) => Some(Integrity::Sha256),
            (None, Some(_)) => Some(Integrity::Sha1),
            (None, None) => None,
        }
    }

    /// The bytes the `kind` integrity attribute covers, the length to put in the header for
    /// it, and its value; `None` when it is absent or of a length RFC 8489 §14.5 or §14.6
    /// does not allow.
    pub(crate) fn signed(&self, kind: Integrity) -> Option<(&[u8], u16, &[u8])> {
        let at = match kind {
            Integrity::Sha1 => self.integrity_at?,
            Integrity::Sha256 => self.integrity_sha256_at?,
        };
        let prefix = self.raw.get(..at)?;
        let declared = usize::from(u16::from_be_bytes([
            *self.raw.get(at + 2)?,
            *self.raw.get(at + 3)?,
        ]));
        if !kind.valid_len(declared) {
            return None;
        }
        let value = self
            .raw
            .get(at + ATTR_HEADER_LEN..at + ATTR_HEADER_LEN + declared)?;
        let length = u16::try_from(at - STUN_HEADER_LEN + ATTR_HEADER_LEN + declared).ok()?;
        Some((prefix, length, value))
    }

    /// The bytes MESSAGE-INTEGRITY covers, the length to put in the header, and the value.
    #[cfg(test)]
    pub(crate) fn integrity_input(&self) -> Option<(&[u8], u16, &[u8])> {
        self.signed(Integrity::Sha1)
    }
}

/// Parses one STUN message from the start of `packet` (RFC 8489 §5, §6.3).
pub(crate) fn parse(packet: &[u8]) -> Result<Parsed<'_>, ParseError> {
    let Some(header) = packet.get(..STUN_HEADER_LEN) else {
        return Err(ParseError::NotStun);
    };
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let cookie = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if header[0] & 0xC0 != 0 || cookie != MAGIC_COOKIE || length % 4 != 0 {
        return Err(ParseError::NotStun);
    }
    let Some(raw) = packet.get(..STUN_HEADER_LEN + length) else {
        return Err(ParseError::NotStun);
    };
    let mut msg = Message::new();
    msg.unmarshal_binary(raw)
        .map_err(|_| ParseError::Malformed)?;

    // Walk the attributes again for their offsets: rtc-stun keeps only values.
    let mut offset = STUN_HEADER_LEN;
    let mut index = 0;
    // (byte offset, attribute index) of the integrity attributes that count.
    let mut sha1 = None;
    let mut sha256 = None;
    while offset + ATTR_HEADER_LEN <= raw.len() {
        let t = u16::from_be_bytes([raw[offset], raw[offset + 1]]);
        let len = usize::from(u16::from_be_bytes([raw[offset + 2], raw[offset + 3]]));
        let next = offset + ATTR_HEADER_LEN + crate::framing::padded(len);
        // RFC 8489 §9: MESSAGE-INTEGRITY-SHA256 may follow MESSAGE-INTEGRITY, not the reverse.
        if AttrType(t) == ATTR_MESSAGE_INTEGRITY && sha1.is_none() && sha256.is_none() {
            sha1 = Some((offset, index));
        }
        if AttrType(t) == ATTR_MESSAGE_INTEGRITY_SHA256 && sha256.is_none() {
            sha256 = Some((offset, index));
        }
        if AttrType(t) == ATTR_FINGERPRINT {
            // FINGERPRINT must be the last attribute (RFC 8489 §14.7).
            let value = raw.get(offset + ATTR_HEADER_LEN..offset + ATTR_HEADER_LEN + 4);
            let Some(value) = value.filter(|_| len == 4 && next == raw.len()) else {
                return Err(ParseError::BadFingerprint);
            };
            let got = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            if got != fingerprint_value(&raw[..offset]) {
                return Err(ParseError::BadFingerprint);
            }
        }
        offset = next;
        index += 1;
    }
    let kept = [sha1, sha256].map(|at| at.map(|(_, i)| i));
    if let Some(first) = kept.iter().flatten().min().copied() {
        let mut index = 0;
        msg.attributes.0.retain(|_| {
            let i = index;
            index += 1;
            i < first || kept.contains(&Some(i))
        });
    }
    Ok(Parsed {
        msg,
        raw,
        integrity_at: sha1.map(|(at, _)| at),
        integrity_sha256_at: sha256.map(|(at, _)| at),
    })
}

/// MAPPED-ADDRESS's value (RFC 8489 §14.1): a zero byte, the family (1 IPv4, 2 IPv6), the
/// port and the address, all in network order.
pub(crate) fn encode_plain_address(addr: SocketAddr) -> Vec<u8> {
    let mut value = vec![0u8];
    match addr.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&addr.port().to_be_bytes());
            value.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&addr.port().to_be_bytes());
            value.extend_from_slice(&ip.octets());
        }
    }
    value
}

fn decode_xor_address(value: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    match (value.get(1)?, value.len()) {
        (0x01, 8) => {
            let mut ip = [0u8; 4];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ cookie[i];
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            for (i, b) in ip.iter_mut().enumerate() {
                let mask = if i < 4 { cookie[i] } else { txid[i - 4] };
                *b = value[4 + i] ^ mask;
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// Builds a response or indication; SOFTWARE, MESSAGE-INTEGRITY and FINGERPRINT go last.
#[derive(Debug)]
pub(crate) struct Builder {
    msg: Message,
}

impl Builder {
    pub(crate) fn new(method: Method, class: MessageClass, txid: TransactionId) -> Self {
        let mut msg = Message::new();
        msg.typ = MessageType::new(method, class);
        msg.transaction_id = txid;
        msg.write_header();
        Self { msg }
    }

    pub(crate) fn raw(&mut self, t: AttrType, value: &[u8]) -> &mut Self {
        self.msg.add(t, value);
        self
    }

    /// Adds an attribute through its `rtc-stun`/`rtc-turn` setter.
    pub(crate) fn attr(&mut self, setter: &dyn Setter) -> &mut Self {
        if let Err(error) = setter.add_to(&mut self.msg) {
            tracing::debug!(%error, "attribute not encoded");
        }
        self
    }

    pub(crate) fn xor_address(&mut self, t: AttrType, addr: SocketAddr) -> &mut Self {
        let attr = XorMappedAddress {
            ip: addr.ip(),
            port: addr.port(),
        };
        if let Err(error) = attr.add_to_as(&mut self.msg, t) {
            tracing::debug!(%error, "address not encoded");
        }
        self
    }

    /// An address attribute encoded as MAPPED-ADDRESS is (RFC 8489 §14.1: not XORed), as
    /// ALTERNATE-SERVER is (§14.15).
    pub(crate) fn plain_address(&mut self, t: AttrType, addr: SocketAddr) -> &mut Self {
        self.raw(t, &encode_plain_address(addr))
    }

    pub(crate) fn error(&mut self, code: u16, reason: &str) -> &mut Self {
        let reason = reason.as_bytes();
        let attr = ErrorCodeAttribute {
            code: ErrorCode(code),
            reason: reason[..reason.len().min(MAX_REASON_LEN)].to_vec(),
        };
        self.attr(&attr)
    }

    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12): family, reserved, class, number, reason.
    pub(crate) fn address_error(&mut self, family: u8, code: u16, reason: &str) -> &mut Self {
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[family, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(&reason.as_bytes()[..reason.len().min(MAX_REASON_LEN)]);
        self.raw(ATTR_ADDRESS_ERROR_CODE, &v)
    }

    /// Adds SOFTWARE, the integrity attribute of `key` (when given: MESSAGE-INTEGRITY or
    /// MESSAGE-INTEGRITY-SHA256, full length) and FINGERPRINT, and returns the encoded message
    /// (RFC 8489 §14.5, §14.6, §14.7).
    pub(crate) fn finish(
        mut self,
        software: Option<&str>,
        key: Option<&SigningKey>,
        fingerprint: bool,
    ) -> Vec<u8> {
        if let Some(software) = software {
            let s = software.as_bytes();
            self.msg
                .add(ATTR_SOFTWARE, &s[..s.len().min(MAX_REASON_LEN)]);
        }
        if let Some(SigningKey {
            key,
            integrity: kind,
        }) = key
        {
            let key = key.as_bytes();
            let raw = &self.msg.raw;
            let covered = |len: usize| (self.msg.length as usize + ATTR_HEADER_LEN + len) as u16;
            match kind {
                Integrity::Sha1 => {
                    let mac = integrity(key, raw, covered(INTEGRITY_LEN));
                    self.msg.add(ATTR_MESSAGE_INTEGRITY, &mac);
                }
                Integrity::Sha256 => {
                    let mac = integrity_sha256(key, raw, covered(INTEGRITY_SHA256_LEN));
                    self.msg.add(ATTR_MESSAGE_INTEGRITY_SHA256, &mac);
                }
            }
        }
        if fingerprint {
            self.attr(&FINGERPRINT);
        }
        self.msg.raw
    }
}

/// Reads the error code of an encoded error response (tests and diagnostics).
#[cfg(test)]
pub(crate) fn error_code(msg: &Parsed<'_>) -> Option<u16> {
    let v = msg.attr(rtc_stun::attributes::ATTR_ERROR_CODE)?;
    Some(u16::from(*v.get(2)?) * 100 + u16::from(*v.get(3)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{LongTermKey, verify_integrity, verify_integrity_sha256};
    use proptest::prelude::*;
    use rtc_stun::message::{CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_BINDING};
    use rtc_turn::proto::lifetime::Lifetime;
    use std::time::Duration;

    #[test]
    fn built_message_parses_with_integrity_and_fingerprint() {
        let key = [9u8; 16];
        let mut b = Builder::new(
            METHOD_BINDING,
            CLASS_SUCCESS_RESPONSE,
            TransactionId([3; 12]),
        );
        b.xor_address(
            rtc_stun::attributes::ATTR_XORMAPPED_ADDRESS,
            "[2001:db8::5]:7".parse().unwrap(),
        )
        .attr(&Lifetime(Duration::from_secs(600)))
        .error(438, "Stale Nonce")
        .address_error(2, 440, "Address Family not Supported");
        let wire = b.finish(Some("test"), Some(&SigningKey::classic(key)), true);
        let parsed = parse(&wire).unwrap();
        assert_eq!(parsed.method(), METHOD_BINDING);
        assert_eq!(error_code(&parsed), Some(438));
        let (prefix, len, value) = parsed.integrity_input().unwrap();
        assert!(verify_integrity(&key, prefix, len, value));
        assert!(!verify_integrity(&[0; 16], prefix, len, value));
        let xor = parsed
            .attr(rtc_stun::attributes::ATTR_XORMAPPED_ADDRESS)
            .unwrap();
        assert_eq!(
            parsed.xor_address(xor),
            Some("[2001:db8::5]:7".parse().unwrap())
        );
        let aec = parsed.attr(ATTR_ADDRESS_ERROR_CODE).unwrap();
        assert_eq!(&aec[..4], &[2, 0, 4, 40]);
    }

    #[test]
    fn fingerprint_is_checked() {
        let b = Builder::new(
            METHOD_BINDING,
            CLASS_SUCCESS_RESPONSE,
            TransactionId([1; 12]),
        );
        let mut wire = b.finish(None, None, true);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert_eq!(parse(&wire).unwrap_err(), ParseError::BadFingerprint);
    }

    #[test]
    fn attributes_after_integrity_are_ignored() {
        let key = [1u8; 16];
        let mut b = Builder::new(
            METHOD_BINDING,
            CLASS_SUCCESS_RESPONSE,
            TransactionId([1; 12]),
        );
        b.raw(AttrType(0x0020), &[0; 8]);
        let mut wire = b.finish(None, Some(&SigningKey::classic(key)), false);
        // Append a LIFETIME after MESSAGE-INTEGRITY and fix the header length.
        wire.extend_from_slice(&[0x00, 0x0D, 0x00, 0x04, 0, 0, 0, 1]);
        let len = (wire.len() - 20) as u16;
        wire[2..4].copy_from_slice(&len.to_be_bytes());
        let parsed = parse(&wire).unwrap();
        assert!(!parsed.has(rtc_stun::attributes::ATTR_LIFETIME));
        let (prefix, len, value) = parsed.integrity_input().unwrap();
        assert!(verify_integrity(&key, prefix, len, value));
    }

    fn sha256_key(byte: u8) -> SigningKey {
        SigningKey {
            key: LongTermKey::Sha256([byte; 32]),
            integrity: Integrity::Sha256,
        }
    }

    #[test]
    fn built_message_parses_with_sha256_integrity() {
        let mut b = Builder::new(
            METHOD_BINDING,
            CLASS_SUCCESS_RESPONSE,
            TransactionId([4; 12]),
        );
        b.error(401, "Unauthorized");
        let wire = b.finish(Some("test"), Some(&sha256_key(5)), true);
        let parsed = parse(&wire).unwrap();
        assert!(parsed.has(ATTR_MESSAGE_INTEGRITY_SHA256));
        assert!(!parsed.has(ATTR_MESSAGE_INTEGRITY));
        assert_eq!(parsed.integrity(), Some(Integrity::Sha256));
        assert!(parsed.signed(Integrity::Sha1).is_none());
        let (prefix, len, value) = parsed.signed(Integrity::Sha256).unwrap();
        assert_eq!(value.len(), INTEGRITY_SHA256_LEN);
        assert!(verify_integrity_sha256(&[5; 32], prefix, len, value));
        assert!(!verify_integrity_sha256(&[6; 32], prefix, len, value));
        assert_eq!(error_code(&parsed), Some(401));
    }

    /// Appends an attribute and fixes the header length.
    fn append(wire: &mut Vec<u8>, t: AttrType, value: &[u8]) {
        wire.extend_from_slice(&t.0.to_be_bytes());
        wire.extend_from_slice(&(value.len() as u16).to_be_bytes());
        wire.extend_from_slice(value);
        wire.resize(wire.len().next_multiple_of(4), 0);
        let len = (wire.len() - STUN_HEADER_LEN) as u16;
        wire[2..4].copy_from_slice(&len.to_be_bytes());
    }

    #[test]
    fn both_integrity_attributes_are_kept_and_sha256_is_the_one_checked() {
        // MESSAGE-INTEGRITY, an attribute to ignore, MESSAGE-INTEGRITY-SHA256 over all of it.
        let mut b = Builder::new(METHOD_BINDING, CLASS_REQUEST, TransactionId([2; 12]));
        b.raw(rtc_stun::attributes::ATTR_USERNAME, b"u");
        let mut wire = b.finish(None, Some(&SigningKey::classic([1; 16])), false);
        append(
            &mut wire,
            rtc_stun::attributes::ATTR_LIFETIME,
            &[0, 0, 0, 1],
        );
        let at = wire.len();
        let covered = (at - STUN_HEADER_LEN + ATTR_HEADER_LEN + 16) as u16;
        let mac = integrity_sha256(&[3; 32], &wire, covered);
        append(&mut wire, ATTR_MESSAGE_INTEGRITY_SHA256, &mac[..16]);
        let parsed = parse(&wire).unwrap();
        assert_eq!(parsed.integrity(), Some(Integrity::Sha256));
        assert!(parsed.has(rtc_stun::attributes::ATTR_USERNAME));
        assert!(!parsed.has(rtc_stun::attributes::ATTR_LIFETIME));
        let (prefix, len, value) = parsed.signed(Integrity::Sha1).unwrap();
        assert!(verify_integrity(&[1; 16], prefix, len, value));
        let (prefix, len, value) = parsed.signed(Integrity::Sha256).unwrap();
        assert_eq!(prefix.len(), at);
        assert!(verify_integrity_sha256(&[3; 32], prefix, len, value));

        // MESSAGE-INTEGRITY after MESSAGE-INTEGRITY-SHA256 is ignored (RFC 8489 §9).
        let mut b = Builder::new(METHOD_BINDING, CLASS_REQUEST, TransactionId([2; 12]));
        b.raw(rtc_stun::attributes::ATTR_USERNAME, b"u");
        let mut wire = b.finish(None, Some(&sha256_key(3)), false);
        append(&mut wire, ATTR_MESSAGE_INTEGRITY, &[0; 20]);
        let parsed = parse(&wire).unwrap();
        assert!(parsed.integrity_at.is_none());
        assert!(!parsed.has(ATTR_MESSAGE_INTEGRITY));
        let (prefix, len, value) = parsed.signed(Integrity::Sha256).unwrap();
        assert!(verify_integrity_sha256(&[3; 32], prefix, len, value));
    }

    #[test]
    fn integrity_of_a_wrong_length_is_not_signed_input() {
        for (t, len, kind) in [
            (ATTR_MESSAGE_INTEGRITY_SHA256, 12, Integrity::Sha256),
            (ATTR_MESSAGE_INTEGRITY_SHA256, 18, Integrity::Sha256),
            (ATTR_MESSAGE_INTEGRITY_SHA256, 36, Integrity::Sha256),
            (ATTR_MESSAGE_INTEGRITY, 16, Integrity::Sha1),
        ] {
            let mut wire = Builder::new(METHOD_BINDING, CLASS_REQUEST, TransactionId([2; 12]))
                .finish(None, None, false);
            append(&mut wire, t, &vec![7; len]);
            let parsed = parse(&wire).unwrap();
            assert_eq!(parsed.integrity(), Some(kind), "{len}");
            assert!(parsed.signed(kind).is_none(), "{len}");
        }
    }

    proptest! {
        #[test]
        fn xor_address_round_trips(ip in any::<[u8; 16]>(), v4 in any::<[u8; 4]>(), port in any::<u16>(),
                                   txid in any::<[u8; 12]>(), use_v4 in any::<bool>()) {
            let addr = if use_v4 { SocketAddr::new(v4.into(), port) } else { SocketAddr::new(ip.into(), port) };
            let mut b = Builder::new(METHOD_BINDING, CLASS_SUCCESS_RESPONSE, TransactionId(txid));
            b.xor_address(rtc_stun::attributes::ATTR_XOR_PEER_ADDRESS, addr);
            let wire = b.finish(None, None, true);
            let parsed = parse(&wire).unwrap();
            let v = parsed.attr(rtc_stun::attributes::ATTR_XOR_PEER_ADDRESS).unwrap();
            prop_assert_eq!(parsed.xor_address(v), Some(addr));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(p) = parse(&bytes) {
                let _ = p.signed(Integrity::Sha1);
                let _ = p.signed(Integrity::Sha256);
                for v in p.msg.attributes.0.iter() {
                    let _ = p.xor_address(&v.value);
                }
            }
        }
    }
}
