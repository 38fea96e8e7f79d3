//! A minimal STUN/TURN encoder and decoder (RFC 8489, RFC 8656) for the tests and the bench,
//! written independently of the core's: a message builder with long-term credentials
//! (MESSAGE-INTEGRITY, RFC 8489 §9.2 and §14.5) and FINGERPRINT (§14.7), XOR addresses,
//! a response parser, and a blocking UDP client that follows 401/438 for the nonce.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hmac::{Hmac, Mac as _};
use md5::{Digest as _, Md5};
use sha1::Sha1;

/// Binding.
pub const BINDING: u16 = 0x001;
/// Allocate.
pub const ALLOCATE: u16 = 0x003;
/// Refresh.
pub const REFRESH: u16 = 0x004;
/// CreatePermission.
pub const CREATE_PERMISSION: u16 = 0x008;
/// ChannelBind.
pub const CHANNEL_BIND: u16 = 0x009;

/// Request class.
pub const REQUEST: u16 = 0;
/// Indication class.
pub const INDICATION: u16 = 1;
/// Success response class.
pub const SUCCESS: u16 = 2;
/// Error response class.
pub const ERROR: u16 = 3;

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
/// REALM.
pub const REALM: u16 = 0x0014;
/// NONCE.
pub const NONCE: u16 = 0x0015;
/// XOR-RELAYED-ADDRESS.
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
/// REQUESTED-TRANSPORT.
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
/// XOR-MAPPED-ADDRESS.
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// ADDITIONAL-ADDRESS-FAMILY.
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
/// FINGERPRINT.
pub const FINGERPRINT: u16 = 0x8028;
/// The magic cookie.
pub const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// The long-term key, MD5(username ":" realm ":" password) (RFC 8489 §9.2.2).
pub fn long_term_key(user: &str, realm: &str, password: &str) -> [u8; 16] {
    Md5::digest(format!("{user}:{realm}:{password}")).into()
}

/// The value of a CHANNEL-NUMBER attribute.
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

    /// Appends an attribute (padded to 4 bytes).
    pub fn attr(mut self, t: u16, value: &[u8]) -> Self {
        self.push(t, value);
        self
    }

    fn push(&mut self, t: u16, value: &[u8]) {
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    /// Appends an XOR address attribute (XOR-PEER-ADDRESS and the like).
    pub fn xor_addr(self, t: u16, addr: SocketAddr) -> Self {
        let mut txid = [0u8; 12];
        txid.copy_from_slice(&self.buf[8..20]);
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
        self.attr(t, &v)
    }

    /// USERNAME, REALM and NONCE (the attributes of an authenticated request).
    pub fn credentials(self, user: &str, realm: &[u8], nonce: &[u8]) -> Self {
        self.attr(USERNAME, user.as_bytes())
            .attr(REALM, realm)
            .attr(NONCE, nonce)
    }

    /// Sets the length and appends MESSAGE-INTEGRITY (RFC 8489 §14.5) when `key` is given.
    pub fn finish(self, key: Option<&[u8]>) -> Vec<u8> {
        self.finish_with(key, false)
    }

    /// [`Msg::finish`], then FINGERPRINT (RFC 8489 §14.7) when `fingerprint`.
    pub fn finish_with(mut self, key: Option<&[u8]>, fingerprint: bool) -> Vec<u8> {
        if let Some(key) = key {
            let len = (self.buf.len() - 20 + 24) as u16;
            self.buf[2..4].copy_from_slice(&len.to_be_bytes());
            // HMAC accepts keys of any length.
            if let Ok(mut mac) = <Hmac<Sha1>>::new_from_slice(key) {
                mac.update(&self.buf);
                let tag = mac.finalize().into_bytes();
                self.push(MESSAGE_INTEGRITY, &tag);
            }
        }
        if fingerprint {
            let len = (self.buf.len() - 20 + 8) as u16;
            self.buf[2..4].copy_from_slice(&len.to_be_bytes());
            let crc = crc32(&self.buf) ^ 0x5354_554E;
            self.push(FINGERPRINT, &crc.to_be_bytes());
        }
        let len = (self.buf.len() - 20) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        self.buf
    }
}

/// CRC-32 (ISO HDLC, as in zlib), table driven.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &byte in data {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A decoded STUN message (typically a response).
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
    /// Parses a STUN message; `None` when `buf` is not one (or its attributes run past
    /// the end).
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let t = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]);
        if t & 0xC000 != 0 || buf.get(4..8)? != MAGIC {
            return None;
        }
        let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
        let class = ((t >> 4) & 1) | ((t >> 7) & 2);
        let txid = buf.get(8..20)?.try_into().ok()?;
        let mut attrs = Vec::new();
        let mut rest = buf.get(20..)?;
        while let [t0, t1, l0, l1, ref tail @ ..] = *rest {
            let l = usize::from(u16::from_be_bytes([l0, l1]));
            attrs.push((u16::from_be_bytes([t0, t1]), tail.get(..l)?.to_vec()));
            rest = tail.get(l.next_multiple_of(4)..).unwrap_or_default();
        }
        Some(Self {
            method,
            class,
            txid,
            attrs,
        })
    }

    /// The first attribute of type `t`.
    pub fn attr(&self, t: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(a, _)| *a == t)
            .map(|(_, v)| v.as_slice())
    }

    /// The ERROR-CODE's number (e.g. 401).
    pub fn code(&self) -> Option<u16> {
        match *self.attr(ERROR_CODE)? {
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

/// A blocking UDP client with long-term credentials. The realm is learnt from the first
/// 401 unless given; the key follows it.
#[derive(Debug)]
pub struct Client {
    /// The client's socket.
    pub socket: UdpSocket,
    /// The server.
    pub server: SocketAddr,
    user: String,
    password: String,
    realm: Option<Vec<u8>>,
    key: Option<[u8; 16]>,
    /// The current nonce (none before the first 401).
    pub nonce: Option<Vec<u8>>,
    txid: u64,
    /// The first byte of every transaction id (tells clients apart in captures).
    pub txid_tag: u8,
    /// Transmissions of one request before giving up.
    pub tries: u32,
    /// How long each transmission waits for its answer.
    pub wait: Duration,
    /// Datagrams sent.
    pub sent: u64,
}

impl Client {
    /// A client of `server` over `socket` (its read timeout is set to 200 ms) as
    /// `user:password`; `realm`: `None` to take the server's from its 401.
    pub fn new(
        socket: UdpSocket,
        server: SocketAddr,
        user: &str,
        password: &str,
        realm: Option<&str>,
    ) -> anyhow::Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut client = Self {
            socket,
            server,
            user: user.to_owned(),
            password: password.to_owned(),
            realm: None,
            key: None,
            nonce: None,
            txid: 0,
            txid_tag: 0x5A,
            tries: 5,
            wait: Duration::from_millis(500),
            sent: 0,
        };
        if let Some(realm) = realm {
            client.set_realm(realm.as_bytes());
        }
        Ok(client)
    }

    fn set_realm(&mut self, realm: &[u8]) {
        self.key = Some(long_term_key(
            &self.user,
            &String::from_utf8_lossy(realm),
            &self.password,
        ));
        self.realm = Some(realm.to_vec());
    }

    /// The realm (once known).
    pub fn realm(&self) -> Option<&[u8]> {
        self.realm.as_deref()
    }

    /// The long-term key (once the realm is known).
    pub fn key(&self) -> Option<[u8; 16]> {
        self.key
    }

    /// A fresh transaction id.
    pub fn next_txid(&mut self) -> [u8; 12] {
        self.txid += 1;
        let mut t = [self.txid_tag; 12];
        t[4..].copy_from_slice(&self.txid.to_be_bytes());
        t
    }

    /// A request of `method` with what `build` adds, signed when a nonce is known.
    pub fn build(&mut self, method: u16, build: impl Fn(Msg) -> Msg) -> Vec<u8> {
        let mut msg = build(Msg::new(method, REQUEST, self.next_txid()));
        match (&self.nonce, &self.realm, self.key) {
            (Some(nonce), Some(realm), Some(key)) => {
                msg = msg.credentials(&self.user, realm, nonce);
                msg.finish(Some(&key))
            }
            _ => msg.finish(None),
        }
    }

    /// Sends `request` (the same bytes each time, up to `tries` times) until an answer
    /// with its transaction id arrives; `None` if none does.
    pub fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Option<Answer>> {
        let txid = request.get(8..20).context("short request")?;
        let mut buf = [0u8; 2048];
        for _ in 0..self.tries {
            self.socket.send_to(request, self.server)?;
            self.sent += 1;
            let start = Instant::now();
            while start.elapsed() < self.wait {
                match self.socket.recv(&mut buf) {
                    Ok(n) => {
                        if let Some(a) = Answer::parse(&buf[..n])
                            && a.txid == txid
                        {
                            return Ok(Some(a));
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e).context("recv"),
                }
            }
        }
        Ok(None)
    }

    /// An authenticated request; follows 401 and 438 for the realm and nonce (three times
    /// at most). Fails when it goes unanswered.
    pub fn request(&mut self, method: u16, build: impl Fn(Msg) -> Msg) -> anyhow::Result<Answer> {
        for _ in 0..3 {
            let request = self.build(method, &build);
            let answer = self
                .exchange(&request)?
                .with_context(|| format!("method {method:#x} unanswered"))?;
            if answer.method != method {
                bail!("answer of method {:#x} to {method:#x}", answer.method);
            }
            match answer.code() {
                Some(401 | 438) if let Some(nonce) = answer.attr(NONCE) => {
                    if let Some(realm) = answer.attr(REALM)
                        && self.realm.as_deref() != Some(realm)
                    {
                        let realm = realm.to_vec();
                        self.set_realm(&realm);
                    }
                    self.nonce = Some(nonce.to_vec());
                }
                _ => return Ok(answer),
            }
        }
        bail!("authentication did not converge")
    }

    /// A UDP allocation.
    pub fn allocate(&mut self) -> anyhow::Result<Answer> {
        self.request(ALLOCATE, |m| m.attr(REQUESTED_TRANSPORT, &[17, 0, 0, 0]))
    }
}

/// VmRSS of a process in KiB (/proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
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
        let bytes = Msg::new(CHANNEL_BIND, SUCCESS, [7; 12])
            .attr(CHANNEL_NUMBER, &channel_number(0x4001))
            .xor_addr(XOR_PEER_ADDRESS, peer)
            .finish_with(Some(&[1; 16]), true);
        let answer = Answer::parse(&bytes).unwrap();
        assert_eq!((answer.method, answer.class), (CHANNEL_BIND, SUCCESS));
        assert_eq!(answer.xor_addr(XOR_PEER_ADDRESS), Some(peer));
        assert_eq!(answer.attr(CHANNEL_NUMBER), Some(&[0x40, 1, 0, 0][..]));
        assert!(answer.attr(MESSAGE_INTEGRITY).is_some());
        assert_eq!(answer.attrs.last().map(|(t, _)| *t), Some(FINGERPRINT));
    }
}
