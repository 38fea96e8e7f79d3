//! Certificates for the TLS tests: a private CA and leaf certificates it signs, written as
//! PEM files the way an operator's are (`fullchain.pem` with the leaf first, then the CA;
//! `privkey.pem` with the leaf's PKCS#8 key). And a blocking TURN-over-TLS client
//! ([`Client`], RFC 8656 §3.1) that tells what the server presented: its leaf certificate,
//! the ALPN protocol it chose (RFC 7443), whether the session was resumed.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, ProtocolVersion, RootCertStore, StreamOwned,
    SupportedProtocolVersion,
};

use crate::stun::{Answer, LongTerm, Msg, attr, channel_data, channel_number, class, method};

/// A certificate's PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The chain: the leaf, then the CA.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
    /// The CA alone, for clients that verify.
    pub ca: PathBuf,
    /// The leaf's DER, to compare with what a client was served.
    pub leaf_der: Vec<u8>,
    /// The leaf's notAfter as Unix time, in whole seconds as the certificate encodes it.
    pub not_after: i64,
}

/// The validity of a leaf, in days relative to now: `-2..-1` is expired, `-1..30` is good.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Days from now to notBefore (negative: in the past).
    pub from_days: i32,
    /// Days from now to notAfter.
    pub until_days: i32,
}

impl Validity {
    /// Valid from yesterday for `days` days.
    pub fn days(days: i32) -> Self {
        Validity {
            from_days: -1,
            until_days: days,
        }
    }

    /// Expired yesterday.
    pub fn expired() -> Self {
        Validity {
            from_days: -30,
            until_days: -1,
        }
    }
}

/// Writes `<dir>/<name>.{crt,key,ca.crt}`: a leaf for `names` (IP addresses become IP SANs,
/// the rest DNS SANs) valid for `validity`, signed by a fresh CA.
pub fn certificate(
    dir: &Path,
    name: &str,
    names: &[&str],
    validity: Validity,
) -> anyhow::Result<CertFiles> {
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.not_before = now - day * 2;
    ca_params.not_after = now + day * 3650;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName((*name).try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params
        .distinguished_name
        .push(DnType::CommonName, names.first().copied().unwrap_or(name));
    params.not_before = now + day * validity.from_days;
    params.not_after = now + day * validity.until_days;
    let key = KeyPair::generate()?;
    let leaf = params.signed_by(&key, &issuer)?;

    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join(format!("{name}.ca.crt")),
        leaf_der: leaf.der().to_vec(),
        not_after: params.not_after.unix_timestamp(),
    };
    let write = |path: &Path, contents: String| {
        std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
    };
    write(&files.cert, format!("{}{}", leaf.pem(), ca_cert.pem()))?;
    write(&files.key, key.serialize_pem())?;
    write(&files.ca, ca_cert.pem())?;
    Ok(files)
}

/// The ALPN protocol of TURN (RFC 7443 §3).
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";

/// How long a client's reads and writes may block before they fail (the test then fails
/// instead of hanging).
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A blocking TLS connection over TCP.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// What a TLS client trusts and offers. Connections made by one `Connector` share its
/// session cache, so a later one to the same server resumes an earlier one's session (TLS 1.3
/// tickets; TLS 1.2 tickets or session IDs).
#[derive(Debug, Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
}

impl Connector {
    /// Trusts the CAs in the PEM files `cas`; offers ALPN `stun.turn`, TLS 1.3 and 1.2.
    pub fn new(cas: &[&Path]) -> anyhow::Result<Self> {
        Self::with(
            cas,
            &[ALPN_STUN_TURN],
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
    }

    /// Trusts the CAs in `cas`; offers the ALPN protocols `alpn` (none: no ALPN extension)
    /// and the protocol `versions`. The crypto provider is the one rustls is built with (the
    /// workspace's, as the daemon's).
    pub fn with(
        cas: &[&Path],
        alpn: &[&[u8]],
        versions: &[&'static SupportedProtocolVersion],
    ) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for ca in cas {
            let certificates = CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?;
            for certificate in certificates {
                roots.add(certificate?)?;
            }
        }
        let mut config = ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// The client configuration, for a test that drives a handshake by hand.
    pub fn config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }

    /// Connects to `server` (with `TCP_NODELAY`) and completes the handshake.
    pub fn connect(&self, server: SocketAddr) -> anyhow::Result<TlsStream> {
        let tcp = TcpStream::connect_timeout(&server, IO_TIMEOUT)
            .with_context(|| format!("connecting to {server}"))?;
        tcp.set_nodelay(true)?;
        self.handshake(tcp)
    }

    /// Completes a handshake over the connected `tcp` (set up as the caller needs, e.g. with
    /// a small receive buffer), with [`IO_TIMEOUT`] on its reads and writes from now on. The
    /// server is verified by its IP address, which the test certificates carry as a SAN.
    pub fn handshake(&self, mut tcp: TcpStream) -> anyhow::Result<TlsStream> {
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        let server = ServerName::IpAddress(tcp.peer_addr()?.ip().into());
        let mut connection = ClientConnection::new(Arc::clone(&self.config), server)?;
        while connection.is_handshaking() {
            connection
                .complete_io(&mut tcp)
                .context("the TLS handshake")?;
        }
        Ok(StreamOwned::new(connection, tcp))
    }
}

/// A frame of TURN over a stream (RFC 8656 §3.1): a STUN message or ChannelData.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A STUN message.
    Stun(Answer),
    /// ChannelData (RFC 8656 §12.4), without its padding.
    ChannelData {
        /// The channel number.
        channel: u16,
        /// The application data.
        data: Vec<u8>,
    },
}

/// A blocking TURN client over a stream (TLS by default; plain TCP frames the same) with
/// long-term credentials: the realm is learnt from the first 401, the nonce from each 401
/// and 438. Over a reliable transport a request is sent once (RFC 8489 §6.2.2). Frames that
/// arrive while an answer is awaited are kept for [`Client::recv`].
#[derive(Debug)]
pub struct Client<S = TlsStream> {
    /// The stream to the server.
    pub stream: S,
    credentials: LongTerm,
    txid: u64,
    pending: VecDeque<Frame>,
}

impl Client<TlsStream> {
    /// Connects to `server` with `connector`, as `user:password`.
    pub fn connect(
        connector: &Connector,
        server: SocketAddr,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self::new(connector.connect(server)?, user, password))
    }

    /// The DER of the leaf certificate the server presented.
    pub fn served_leaf(&self) -> Option<Vec<u8>> {
        let chain = self.stream.conn.peer_certificates()?;
        chain.first().map(|leaf| leaf.to_vec())
    }

    /// The ALPN protocol the server selected, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.stream.conn.alpn_protocol()
    }

    /// Whether the handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.stream.conn.handshake_kind() == Some(HandshakeKind::Resumed)
    }

    /// The TLS version negotiated.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.stream.conn.protocol_version()
    }
}

impl<S: Read + Write> Client<S> {
    /// A client over the connected `stream` as `user:password`.
    pub fn new(stream: S, user: &str, password: &str) -> Self {
        Self {
            stream,
            credentials: LongTerm::new(user, password),
            txid: 0,
            pending: VecDeque::new(),
        }
    }

    /// A fresh transaction id (its first byte, 0x7C, tells these clients apart in captures).
    fn next_txid(&mut self) -> [u8; 12] {
        self.txid += 1;
        let mut txid = [0x7C; 12];
        txid[4..].copy_from_slice(&self.txid.to_be_bytes());
        txid
    }

    /// A request of `method` with what `build` adds, signed once a nonce is known.
    pub fn build(&mut self, method: u16, build: impl Fn(&mut Msg) -> &mut Msg) -> Vec<u8> {
        let mut msg = Msg::new(method, class::REQUEST, self.next_txid());
        build(&mut msg);
        self.credentials.finish(&mut msg, false)
    }

    /// Writes `frame` and flushes it (a TLS stream holds records until then).
    pub fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(frame).context("write")?;
        self.stream.flush().context("flush")
    }

    /// The next frame: one kept while an answer was awaited, else the next from the stream.
    pub fn recv(&mut self) -> anyhow::Result<Frame> {
        match self.pending.pop_front() {
            Some(frame) => Ok(frame),
            None => self.read_frame(),
        }
    }

    /// Reads one frame, by the length its header announces (RFC 8656 §3.1): STUN, or
    /// ChannelData with its padding to four bytes (§12.5).
    fn read_frame(&mut self) -> anyhow::Result<Frame> {
        let mut head = [0u8; 4];
        self.stream.read_exact(&mut head).context("read")?;
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        match head[0] >> 6 {
            0 => {
                let mut message = vec![0; 20 + len];
                message[..4].copy_from_slice(&head);
                self.stream.read_exact(&mut message[4..]).context("read")?;
                let answer = Answer::parse_exact(&message)
                    .with_context(|| format!("a malformed STUN message: {message:02x?}"))?;
                Ok(Frame::Stun(answer))
            }
            1 => {
                let mut data = vec![0; len.next_multiple_of(4)];
                self.stream.read_exact(&mut data).context("read")?;
                data.truncate(len);
                let channel = u16::from_be_bytes([head[0], head[1]]);
                Ok(Frame::ChannelData { channel, data })
            }
            _ => bail!("not TURN framing: a frame starts {head:02x?}"),
        }
    }

    /// Sends `request` and returns the answer with its transaction id; other frames are kept
    /// for [`Client::recv`].
    pub fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Answer> {
        let txid = request.get(8..20).context("short request")?.to_vec();
        self.send(request)?;
        loop {
            match self.read_frame()? {
                Frame::Stun(answer) if answer.txid[..] == txid[..] => return Ok(answer),
                other => self.pending.push_back(other),
            }
        }
    }

    /// An authenticated request; follows 401 and 438 for the realm and nonce (three times at
    /// most).
    pub fn request(
        &mut self,
        method: u16,
        build: impl Fn(&mut Msg) -> &mut Msg,
    ) -> anyhow::Result<Answer> {
        for _ in 0..3 {
            let request = self.build(method, &build);
            let answer = self.exchange(&request)?;
            if answer.method != method {
                bail!("answer of method {:#x} to {method:#x}", answer.method);
            }
            if !self.credentials.learn(&answer) {
                return Ok(answer);
            }
        }
        bail!("authentication did not converge")
    }

    /// A UDP allocation (REQUESTED-TRANSPORT 17).
    pub fn allocate(&mut self) -> anyhow::Result<Answer> {
        self.request(method::ALLOCATE, |m| {
            m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        })
    }

    /// A Refresh asking for `lifetime` seconds (0 deletes the allocation).
    pub fn refresh(&mut self, lifetime: u32) -> anyhow::Result<Answer> {
        self.request(method::REFRESH, |m| {
            m.attr(attr::LIFETIME, &lifetime.to_be_bytes())
        })
    }

    /// Binds `channel` to `peer` (RFC 8656 §11), which also installs its permission.
    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> anyhow::Result<Answer> {
        self.request(method::CHANNEL_BIND, |m| {
            m.attr(attr::CHANNEL_NUMBER, &channel_number(channel))
                .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })
    }

    /// Sends `data` on `channel`, padded to four bytes as over TCP it must be (RFC 8656
    /// §12.5).
    pub fn send_channel_data(&mut self, channel: u16, data: &[u8]) -> anyhow::Result<()> {
        let mut frame = channel_data(channel, data);
        frame.resize(frame.len().next_multiple_of(4), 0);
        self.send(&frame)
    }

    /// The next frame, which must be ChannelData: its channel and data.
    pub fn recv_channel_data(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        match self.recv()? {
            Frame::ChannelData { channel, data } => Ok((channel, data)),
            Frame::Stun(answer) => bail!("a STUN message instead of ChannelData: {answer:?}"),
        }
    }
}
