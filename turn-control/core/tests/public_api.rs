//! The server driven through its public API by a client built from `rtc-stun`'s own
//! MESSAGE-INTEGRITY code (with a small RustCrypto provider), as the daemon would drive it.
//! This checks our integrity and fingerprint handling against an independent implementation.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a test failure"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, Mac as _};
use md5::Digest as _;
use rtc_stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use rtc_stun::crypto::{
    CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, Mac, RTCCrypto,
};
use rtc_stun::error_code::ErrorCodeAttribute;
use rtc_stun::fingerprint::FINGERPRINT;
use rtc_stun::integrity::MessageIntegrity;
use rtc_stun::message::{
    CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, Getter, METHOD_ALLOCATE,
    METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_DATA, METHOD_REFRESH, METHOD_SEND,
    Message, MessageType, Method, Setter, TransactionId,
};
use rtc_stun::textattrs::TextAttribute;
use rtc_turn::proto::PROTO_UDP;
use rtc_turn::proto::channum::ChannelNumber as ChannelAttr;
use rtc_turn::proto::data::Data;
use rtc_turn::proto::lifetime::Lifetime;
use rtc_turn::proto::peeraddr::PeerAddress;
use rtc_turn::proto::relayaddr::RelayedAddress;
use rtc_turn::proto::reqtrans::RequestedTransport;
use turn_control_core::{
    ChannelData, ChannelNumber, ClientAddr, Command, Config, Credentials, PeerAddr, RelayAddr,
    Server, Transmit, Transport, frame_len, rest_password,
};

const REALM: &str = "example.org";

/// HMAC-SHA1 and MD5 from RustCrypto, for `rtc-stun`'s provider-neutral integrity code.
struct RustCrypto;

struct HmacSha1(Hmac<sha1::Sha1>);

impl Mac for HmacSha1 {
    fn output_len(&self) -> usize {
        20
    }

    fn sign(&mut self, input: &[&[u8]], output: &mut [u8]) -> Result<(), CryptoError> {
        let mut mac = self.0.clone();
        for part in input {
            mac.update(part);
        }
        output.copy_from_slice(&mac.finalize().into_bytes());
        Ok(())
    }

    fn verify(&mut self, input: &[&[u8]], expected: &[u8]) -> Result<(), CryptoError> {
        let mut mac = self.0.clone();
        for part in input {
            mac.update(part);
        }
        mac.verify_slice(expected)
            .map_err(|_| CryptoError::AuthenticationFailed)
    }
}

impl RTCCrypto for RustCrypto {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        matches!(
            algorithm,
            CryptoAlgorithm::Hash(HashAlgorithm::Md5) | CryptoAlgorithm::Hmac(HmacAlgorithm::Sha1)
        )
    }

    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match algorithm {
            HashAlgorithm::Md5 => Ok(md5::Md5::digest(data).to_vec()),
            other => Err(CryptoError::UnsupportedAlgorithm(CryptoAlgorithm::Hash(
                other,
            ))),
        }
    }

    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        match algorithm {
            HmacAlgorithm::Sha1 => Ok(Box::new(HmacSha1(
                Hmac::new_from_slice(key).map_err(|_| CryptoError::AuthenticationFailed)?,
            ))),
            other => Err(CryptoError::UnsupportedAlgorithm(CryptoAlgorithm::Hmac(
                other,
            ))),
        }
    }
}

struct Client {
    addr: ClientAddr,
    transport: Transport,
    user: String,
    password: String,
    nonce: Option<String>,
    n: u8,
}

impl Client {
    fn new(addr: &str, user: &str, password: &str) -> Self {
        Self {
            addr: ClientAddr(addr.parse().unwrap()),
            transport: Transport::Udp,
            user: user.into(),
            password: password.into(),
            nonce: None,
            n: 0,
        }
    }

    fn key(&self) -> Vec<u8> {
        MessageIntegrity::long_term_integrity_key(
            self.user.clone(),
            REALM.into(),
            self.password.clone(),
            &RustCrypto,
        )
        .unwrap()
    }

    fn message(
        &mut self,
        method: Method,
        class: rtc_stun::message::MessageClass,
        setters: &[&dyn Setter],
    ) -> Vec<u8> {
        self.n += 1;
        let mut m = Message::new();
        m.typ = MessageType::new(method, class);
        m.transaction_id = TransactionId([self.n; 12]);
        m.write_header();
        for s in setters {
            s.add_to(&mut m).unwrap();
        }
        if class == CLASS_REQUEST
            && let Some(nonce) = &self.nonce
        {
            TextAttribute::new(ATTR_USERNAME, self.user.clone())
                .add_to(&mut m)
                .unwrap();
            TextAttribute::new(ATTR_REALM, REALM.into())
                .add_to(&mut m)
                .unwrap();
            TextAttribute::new(ATTR_NONCE, nonce.clone())
                .add_to(&mut m)
                .unwrap();
            MessageIntegrity::new_long_term_integrity_with_provider(
                self.user.clone(),
                REALM.into(),
                self.password.clone(),
                &RustCrypto,
            )
            .unwrap()
            .add_to(&mut m)
            .unwrap();
        }
        FINGERPRINT.add_to(&mut m).unwrap();
        m.raw
    }

    fn request(&mut self, method: Method, setters: &[&dyn Setter]) -> Vec<u8> {
        self.message(method, CLASS_REQUEST, setters)
    }
}

struct Relay {
    server: Server,
    now: Instant,
    listen: SocketAddr,
    commands: Vec<Command>,
}

impl Relay {
    fn new(f: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new(REALM, [1; 32]);
        config.credentials = Credentials::new(REALM)
            .with_user("alice", "pw")
            .with_rest_secret(b"shared".to_vec());
        config.relay_ipv4 = Some("198.51.100.7".parse().unwrap());
        config.relay_ipv6 = Some("2001:4860::7".parse().unwrap());
        let listen: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        config.listeners = vec![listen];
        f(&mut config);
        let now = Instant::now();
        Self {
            server: Server::new(config, now, SystemTime::now()).unwrap(),
            now,
            listen,
            commands: Vec::new(),
        }
    }

    fn feed(&mut self, c: &Client, bytes: &[u8]) -> Vec<Transmit> {
        self.server
            .handle_client(self.now, c.transport, self.listen, c.addr, bytes);
        while let Some(cmd) = self.server.poll_command() {
            // Accounting records go to their own sink, not to sockets or the data plane.
            if matches!(cmd, Command::Account { .. }) {
                continue;
            }
            if let Command::BindRelayPort { relay, .. } = cmd {
                self.server.relay_bound(self.now, relay);
            }
            self.commands.push(cmd);
        }
        std::iter::from_fn(|| self.server.poll_transmit()).collect()
    }

    /// One response, decoded; MESSAGE-INTEGRITY checked with rtc-stun when `key` is given.
    fn call(&mut self, c: &Client, bytes: &[u8], key: Option<&[u8]>) -> Message {
        let out = self.feed(c, bytes);
        assert_eq!(out.len(), 1, "{out:?}");
        decode(out[0].payload(), key)
    }
}

fn decode(payload: &[u8], key: Option<&[u8]>) -> Message {
    let mut m = Message::new();
    m.unmarshal_binary(payload).unwrap();
    FINGERPRINT.check(&m).unwrap();
    if let Some(key) = key {
        MessageIntegrity::check(&mut m, key, &RustCrypto).unwrap();
    }
    m
}

fn error_code(m: &Message) -> Option<u16> {
    let mut e = ErrorCodeAttribute::default();
    e.get_from(m).ok().map(|_| e.code.0)
}

fn login(relay: &mut Relay, c: &mut Client) {
    let req = c.request(
        METHOD_ALLOCATE,
        &[&RequestedTransport {
            protocol: PROTO_UDP,
        }],
    );
    let resp = relay.call(c, &req, None);
    assert_eq!(error_code(&resp), Some(401));
    c.nonce = Some(TextAttribute::get_from_as(&resp, ATTR_NONCE).unwrap().text);
}

fn allocate(relay: &mut Relay, c: &mut Client) -> RelayAddr {
    login(relay, c);
    let req = c.request(
        METHOD_ALLOCATE,
        &[&RequestedTransport {
            protocol: PROTO_UDP,
        }],
    );
    let resp = relay.call(c, &req, Some(&c.key()));
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
    let mut relayed = RelayedAddress::default();
    relayed.get_from(&resp).unwrap();
    let mut lifetime = Lifetime::default();
    lifetime.get_from(&resp).unwrap();
    assert_eq!(lifetime.0, Duration::from_secs(600));
    RelayAddr(SocketAddr::new(relayed.ip, relayed.port))
}

#[test]
fn full_udp_session_with_offload_handshake() {
    let mut relay = Relay::new(|_| {});
    let mut c = Client::new("192.0.2.1:40000", "alice", "pw");
    let relay_addr = allocate(&mut relay, &mut c);
    assert!(
        matches!(relay.commands.as_slice(), [Command::BindRelayPort { relay, dont_fragment: false }] if *relay == relay_addr)
    );

    let peer = PeerAddr("8.8.4.4:9000".parse().unwrap());
    let peer_attr = PeerAddress {
        ip: peer.0.ip(),
        port: peer.0.port(),
    };
    let req = c.request(METHOD_CHANNEL_BIND, &[&ChannelAttr(0x4ABC), &peer_attr]);
    assert!(relay.feed(&c, &req).is_empty());
    let Some(Command::InstallChannel {
        binding, expires, ..
    }) = relay.commands.pop()
    else {
        panic!("no install command");
    };
    assert_eq!(binding.channel, ChannelNumber::new(0x4ABC).unwrap());
    // The permission the bind created (RFC 8656 §9: 300 s) ends first.
    assert_eq!(expires, relay.now + Duration::from_secs(300));
    assert_eq!(
        (binding.client, binding.server, binding.relay, binding.peer),
        (c.addr, relay.listen, relay_addr, peer)
    );
    relay.server.channel_installed(relay.now, &binding, Ok(()));
    let out: Vec<_> = std::iter::from_fn(|| relay.server.poll_transmit()).collect();
    let resp = decode(out[0].payload(), Some(&c.key()));
    assert_eq!(
        resp.typ,
        MessageType::new(METHOD_CHANNEL_BIND, CLASS_SUCCESS_RESPONSE)
    );

    // Both directions in user space (as when the XDP path passes a packet up).
    let frame = ChannelData {
        channel: binding.channel,
        payload: b"ping",
    }
    .encode(Transport::Udp);
    let out = relay.feed(&c, &frame);
    assert_eq!(
        out,
        vec![Transmit::ToPeer {
            relay: relay_addr,
            peer,
            payload: b"ping".to_vec()
        }]
    );
    relay
        .server
        .handle_peer(relay.now, relay_addr, peer, b"pong");
    let Some(Transmit::ToClient { payload, .. }) = relay.server.poll_transmit() else {
        panic!("nothing to the client");
    };
    assert_eq!(ChannelData::parse(&payload).unwrap().payload, b"pong");

    // Send / Data indications with a second peer.
    let other = PeerAddr("9.9.9.9:53".parse().unwrap());
    let other_attr = PeerAddress {
        ip: other.0.ip(),
        port: other.0.port(),
    };
    let req = c.request(METHOD_CREATE_PERMISSION, &[&other_attr]);
    let resp = relay.call(&c, &req, Some(&c.key()));
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
    let ind = c.message(
        METHOD_SEND,
        CLASS_INDICATION,
        &[&other_attr, &Data(b"query".to_vec())],
    );
    assert_eq!(
        relay.feed(&c, &ind),
        vec![Transmit::ToPeer {
            relay: relay_addr,
            peer: other,
            payload: b"query".to_vec()
        }]
    );
    relay
        .server
        .handle_peer(relay.now, relay_addr, other, b"answer");
    let Some(Transmit::ToClient { payload, .. }) = relay.server.poll_transmit() else {
        panic!("nothing to the client");
    };
    let mut m = Message::new();
    m.unmarshal_binary(&payload).unwrap();
    assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
    let mut data = Data::default();
    data.get_from(&m).unwrap();
    assert_eq!(data.0, b"answer");
    let mut from = PeerAddress::default();
    from.get_from(&m).unwrap();
    assert_eq!(SocketAddr::new(from.ip, from.port), other.0);

    // Delete: every data-plane entry and socket goes.
    relay.commands.clear();
    let req = c.request(METHOD_REFRESH, &[&Lifetime(Duration::ZERO)]);
    let resp = relay.call(&c, &req, Some(&c.key()));
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(
        relay.commands,
        vec![
            Command::RemoveChannel { binding },
            Command::FreeRelayPort { relay: relay_addr }
        ]
    );
    assert_eq!(relay.server.stats().allocations_active, 0);
}

#[test]
fn tcp_stream_is_split_with_frame_len() {
    let mut relay = Relay::new(|_| {});
    let mut c = Client::new("192.0.2.2:40000", "alice", "pw");
    c.transport = Transport::Tcp;
    let relay_addr = allocate(&mut relay, &mut c);
    let peer = PeerAddr("8.8.4.4:9000".parse().unwrap());
    let peer_attr = PeerAddress {
        ip: peer.0.ip(),
        port: peer.0.port(),
    };
    // A ChannelBind and two ChannelData frames arrive in one TCP read.
    let mut stream = c.request(METHOD_CHANNEL_BIND, &[&ChannelAttr(0x4000), &peer_attr]);
    let ch = ChannelNumber::new(0x4000).unwrap();
    stream.extend(
        ChannelData {
            channel: ch,
            payload: b"a",
        }
        .encode(Transport::Tcp),
    );
    stream.extend(
        ChannelData {
            channel: ch,
            payload: b"bcdefgh",
        }
        .encode(Transport::Tcp),
    );
    let mut out = Vec::new();
    let mut rest = &stream[..];
    while let Some(n) = frame_len(rest).unwrap() {
        assert!(n <= rest.len());
        out.extend(relay.feed(&c, &rest[..n]));
        rest = &rest[n..];
    }
    assert!(rest.is_empty());
    assert_eq!(out.len(), 3);
    let resp = decode(out[0].payload(), Some(&c.key()));
    assert_eq!(resp.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(
        out[1],
        Transmit::ToPeer {
            relay: relay_addr,
            peer,
            payload: b"a".to_vec()
        }
    );
    assert_eq!(out[2].payload(), b"bcdefgh");
    // TCP clients are never offloaded.
    assert!(
        !relay
            .commands
            .iter()
            .any(|c| matches!(c, Command::InstallChannel { .. }))
    );
}

#[test]
fn rest_credentials_with_rtc_stun_integrity() {
    let mut relay = Relay::new(|_| {});
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let user = format!("{}:svc", unix + 600);
    let mut c = Client::new("192.0.2.3:1", &user, &rest_password(b"shared", &user));
    allocate(&mut relay, &mut c);
    let expired = format!("{}:svc", unix - 1);
    let mut c = Client::new("192.0.2.4:1", &expired, &rest_password(b"shared", &expired));
    login(&mut relay, &mut c);
    let req = c.request(
        METHOD_ALLOCATE,
        &[&RequestedTransport {
            protocol: PROTO_UDP,
        }],
    );
    assert_eq!(error_code(&relay.call(&c, &req, None)), Some(401));
}

#[test]
fn dual_stack_allocation_reaches_both_families() {
    let mut relay = Relay::new(|_| {});
    let mut c = Client::new("192.0.2.5:1", "alice", "pw");
    login(&mut relay, &mut c);
    let mut m = Message::new();
    m.add(rtc_stun::attributes::AttrType(0x8000), &[2, 0, 0, 0]);
    let additional = m.attributes.0[0].clone();
    let req = c.request(
        METHOD_ALLOCATE,
        &[
            &RequestedTransport {
                protocol: PROTO_UDP,
            },
            &additional,
        ],
    );
    let resp = relay.call(&c, &req, Some(&c.key()));
    let relays: Vec<_> = resp
        .attributes
        .0
        .iter()
        .filter(|a| a.typ == rtc_stun::attributes::ATTR_XOR_RELAYED_ADDRESS)
        .collect();
    assert_eq!(relays.len(), 2);
    let v4 = PeerAddress {
        ip: "8.8.8.8".parse().unwrap(),
        port: 1,
    };
    let v6 = PeerAddress {
        ip: "2a00:1450::1".parse().unwrap(),
        port: 1,
    };
    let req = c.request(METHOD_CREATE_PERMISSION, &[&v4, &v6]);
    let resp = relay.call(&c, &req, Some(&c.key()));
    assert_eq!(
        resp.typ.class,
        CLASS_SUCCESS_RESPONSE,
        "{:?}",
        error_code(&resp)
    );
    assert_eq!(relay.server.stats().permissions_active, 2);
}
