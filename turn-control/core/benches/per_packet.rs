//! Per-packet decisions and an authenticated request, through the public API only.
//!
//! The requests are built the way a client would build them, with `rtc-stun` and
//! `rtc-turn::proto`, and MESSAGE-INTEGRITY computed here with `hmac`/`sha1`.

#![expect(
    clippy::unwrap_used,
    reason = "benchmark setup: any failure should abort the run"
)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hmac::{Hmac, Mac};
use rtc_stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use rtc_stun::fingerprint::FINGERPRINT;
use rtc_stun::message::Getter;
use rtc_stun::message::{
    CLASS_REQUEST, METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH,
    Message, MessageType, Method, Setter, TransactionId,
};
use rtc_stun::textattrs::TextAttribute;
use rtc_turn::proto::channum::ChannelNumber as ChannelAttr;
use rtc_turn::proto::peeraddr::PeerAddress;
use rtc_turn::proto::relayaddr::RelayedAddress;
use rtc_turn::proto::reqtrans::RequestedTransport;
use rtc_turn::proto::{PROTO_UDP, lifetime::Lifetime};
use turn_control_core::{
    ChannelData, ChannelNumber, ClientAddr, Command, Config, Credentials, PeerAddr, RelayAddr,
    Server, Transmit, Transport, long_term_key,
};

const REALM: &str = "example.org";

struct Client {
    addr: ClientAddr,
    key: [u8; 16],
    nonce: Option<String>,
    n: u8,
}

impl Client {
    fn request(&mut self, method: Method, setters: &[&dyn Setter]) -> Vec<u8> {
        self.n += 1;
        let mut m = Message::new();
        m.typ = MessageType::new(method, CLASS_REQUEST);
        m.transaction_id = TransactionId([self.n; 12]);
        m.write_header();
        for s in setters {
            s.add_to(&mut m).unwrap();
        }
        if let Some(nonce) = &self.nonce {
            TextAttribute::new(ATTR_USERNAME, "alice".into())
                .add_to(&mut m)
                .unwrap();
            TextAttribute::new(ATTR_REALM, REALM.into())
                .add_to(&mut m)
                .unwrap();
            TextAttribute::new(ATTR_NONCE, nonce.clone())
                .add_to(&mut m)
                .unwrap();
            // RFC 8489 §14.5: the length field covers MESSAGE-INTEGRITY while hashing.
            let mut raw = m.raw.clone();
            raw[2..4].copy_from_slice(&((m.length + 24) as u16).to_be_bytes());
            let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&self.key).unwrap();
            mac.update(&raw);
            m.add(ATTR_MESSAGE_INTEGRITY, &mac.finalize().into_bytes());
        }
        FINGERPRINT.add_to(&mut m).unwrap();
        m.raw
    }
}

struct Setup {
    server: Server,
    now: Instant,
    listen: SocketAddr,
    client: Client,
    relay: RelayAddr,
    peer: PeerAddr,
    other_peer: PeerAddr,
}

fn exchange(s: &mut Server, now: Instant, listen: SocketAddr, c: &Client, req: &[u8]) -> Message {
    s.handle_client(now, Transport::Udp, listen, c.addr, req);
    while let Some(cmd) = s.poll_command() {
        if let Command::BindRelayPort { relay, .. } = cmd {
            s.relay_bound(now, relay);
        }
    }
    let Some(Transmit::ToClient { payload, .. }) = s.poll_transmit() else {
        panic!("no response");
    };
    let mut m = Message::new();
    m.unmarshal_binary(&payload).unwrap();
    m
}

fn setup() -> Setup {
    let mut config = Config::new(REALM, [7; 32]);
    config.credentials = Credentials::new(REALM).with_user("alice", "pw");
    config.relay_ipv4 = Some("198.51.100.7".parse().unwrap());
    let listen: SocketAddr = "198.51.100.1:3478".parse().unwrap();
    config.listeners = vec![listen];
    config.unauthorized_rate = None;
    let now = Instant::now();
    let mut server = Server::new(config, now, SystemTime::now()).unwrap();
    let mut client = Client {
        addr: ClientAddr("192.0.2.1:5000".parse().unwrap()),
        key: long_term_key("alice", REALM, "pw"),
        nonce: None,
        n: 0,
    };
    let udp = RequestedTransport {
        protocol: PROTO_UDP,
    };
    let req = client.request(METHOD_ALLOCATE, &[&udp]);
    let resp = exchange(&mut server, now, listen, &client, &req);
    let nonce = TextAttribute::get_from_as(&resp, ATTR_NONCE).unwrap();
    client.nonce = Some(nonce.text);
    let req = client.request(METHOD_ALLOCATE, &[&udp]);
    let resp = exchange(&mut server, now, listen, &client, &req);
    let mut relayed = RelayedAddress::default();
    relayed.get_from(&resp).unwrap();
    let relay = RelayAddr(SocketAddr::new(relayed.ip, relayed.port));

    let peer = PeerAddr("8.8.8.8:5000".parse().unwrap());
    let other_peer = PeerAddr("1.1.1.1:5000".parse().unwrap());
    let peer_attr = PeerAddress {
        ip: peer.0.ip(),
        port: peer.0.port(),
    };
    let req = client.request(METHOD_CHANNEL_BIND, &[&ChannelAttr(0x4000), &peer_attr]);
    server.handle_client(now, Transport::Udp, listen, client.addr, &req);
    while let Some(cmd) = server.poll_command() {
        if let Command::InstallChannel { binding, .. } = cmd {
            server.channel_installed(now, &binding, Ok(()));
        }
    }
    while server.poll_transmit().is_some() {}
    let other_attr = PeerAddress {
        ip: other_peer.0.ip(),
        port: other_peer.0.port(),
    };
    let req = client.request(METHOD_CREATE_PERMISSION, &[&other_attr]);
    exchange(&mut server, now, listen, &client, &req);
    Setup {
        server,
        now,
        listen,
        client,
        relay,
        peer,
        other_peer,
    }
}

fn bench(c: &mut Criterion) {
    let mut s = setup();
    let payload = vec![0xAB; 160];
    let frame = ChannelData {
        channel: ChannelNumber::new(0x4000).unwrap(),
        payload: &payload,
    }
    .encode(Transport::Udp);

    let mut g = c.benchmark_group("per_packet");
    g.throughput(Throughput::Elements(1));
    g.bench_function("client_channel_data_to_peer", |b| {
        b.iter(|| {
            s.server.handle_client(
                s.now,
                Transport::Udp,
                s.listen,
                s.client.addr,
                black_box(&frame),
            );
            black_box(s.server.poll_transmit())
        })
    });
    g.bench_function("peer_to_client_channel_data", |b| {
        b.iter(|| {
            s.server
                .handle_peer(s.now, s.relay, s.peer, black_box(&payload));
            black_box(s.server.poll_transmit())
        })
    });
    g.bench_function("peer_to_client_data_indication", |b| {
        b.iter(|| {
            s.server
                .handle_peer(s.now, s.relay, s.other_peer, black_box(&payload));
            black_box(s.server.poll_transmit())
        })
    });
    g.bench_function("peer_without_permission_dropped", |b| {
        let stranger = PeerAddr("9.9.9.9:1".parse().unwrap());
        b.iter(|| {
            s.server
                .handle_peer(s.now, s.relay, stranger, black_box(&payload));
            black_box(s.server.poll_transmit())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("authenticated_request");
    let peer_attr = PeerAddress {
        ip: s.peer.0.ip(),
        port: s.peer.0.port(),
    };
    let create_permission = s.client.request(METHOD_CREATE_PERMISSION, &[&peer_attr]);
    let refresh = s
        .client
        .request(METHOD_REFRESH, &[&Lifetime(Duration::from_secs(600))]);
    for (name, req) in [
        ("create_permission", &create_permission),
        ("refresh", &refresh),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                s.server.handle_client(
                    s.now,
                    Transport::Udp,
                    s.listen,
                    s.client.addr,
                    black_box(req),
                );
                let Some(t) = s.server.poll_transmit() else {
                    panic!("no response");
                };
                black_box(t)
            })
        });
    }
    g.finish();
    let stats = s.server.stats();
    assert_eq!(stats.auth_failures, 0);
    assert!(stats.relayed_to_peer.packets > 0);
}

criterion_group!(benches, bench);
criterion_main!(benches);
