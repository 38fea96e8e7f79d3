//! Writes the seed corpora under the directory given (default `corpus`): real requests for
//! `stun_auth` (Binding, Allocate with MESSAGE-INTEGRITY and a valid nonce, Refresh,
//! CreatePermission, ChannelBind, Send, ChannelData, over UDP and TCP), operation lists for
//! `server_ops`, streams for `tcp_framing` and frames for `xdp_parse`.

use std::path::Path;
use std::time::Instant;

use tests_fuzz::{
    LISTEN, PASSWORD, REST_USER, USER, fetch_nonce, fold, rest_key, sa, server, sign, sum16,
    udp_check, user_key,
};
use tests_stun::{Msg, attr, class, method};
use turn_control_core::{ClientAddr, Transport};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("creating the corpus directory");
    std::fs::write(dir.join(name), bytes).expect("writing a seed");
}

fn main() {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus".to_owned());
    let dir = Path::new(&arg);
    stun_auth(dir);
    server_ops(dir);
    tcp_framing(dir);
    xdp_parse(dir);
}

fn stun_auth(dir: &Path) {
    let client = ClientAddr(sa("192.0.2.5:40000"));
    let now = Instant::now();
    let mut s = server(now);
    let nonce = fetch_nonce(&mut s, now, Transport::Udp, sa(LISTEN), client).expect("nonce");
    let key = user_key(USER, PASSWORD);
    let t = |b: u8| [b; 12];

    let binding = Msg::new(method::BINDING, class::REQUEST, t(1)).finish(None, true);
    write(
        dir,
        "stun_auth",
        "binding",
        &[[0].as_slice(), &binding].concat(),
    );
    write(
        dir,
        "stun_auth",
        "binding-tcp",
        &[[1].as_slice(), &binding, &binding].concat(),
    );

    let mut m = Msg::new(method::ALLOCATE, class::REQUEST, t(2));
    m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let allocate = m.finish(None, false);
    write(
        dir,
        "stun_auth",
        "allocate-unauth",
        &[[0].as_slice(), &allocate].concat(),
    );
    // A complete request with a valid nonce and MESSAGE-INTEGRITY, as a client sends it.
    let signed = sign(&allocate, USER, &key, &nonce, true);
    write(
        dir,
        "stun_auth",
        "allocate-signed-raw",
        &[[0].as_slice(), &signed].concat(),
    );
    // The same, re-signed by the target: flags bit 1 (sign), bit 3 (fingerprint).
    write(
        dir,
        "stun_auth",
        "allocate-sign",
        &[[0x0A].as_slice(), &allocate].concat(),
    );
    write(
        dir,
        "stun_auth",
        "allocate-rest-tcp",
        &[[0x07].as_slice(), &allocate].concat(),
    );

    let mut m = Msg::new(method::ALLOCATE, class::REQUEST, t(3));
    m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0])
        .attr(attr::LIFETIME, &300u32.to_be_bytes())
        .attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    write(
        dir,
        "stun_auth",
        "allocate-dual",
        &[[0x02].as_slice(), &m.finish(None, false)].concat(),
    );

    let mut m = Msg::new(method::REFRESH, class::REQUEST, t(4));
    m.attr(attr::LIFETIME, &0u32.to_be_bytes());
    write(
        dir,
        "stun_auth",
        "refresh-delete",
        &[[0x12].as_slice(), &m.finish(None, false)].concat(),
    );

    let mut m = Msg::new(method::CREATE_PERMISSION, class::REQUEST, t(5));
    m.xor_addr(attr::XOR_PEER_ADDRESS, sa("8.8.8.8:5000"))
        .xor_addr(attr::XOR_PEER_ADDRESS, sa("[2a00:1450::1]:7000"));
    write(
        dir,
        "stun_auth",
        "create-permission",
        &[[0x12].as_slice(), &m.finish(None, false)].concat(),
    );

    let mut m = Msg::new(method::CHANNEL_BIND, class::REQUEST, t(6));
    m.attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
        .xor_addr(attr::XOR_PEER_ADDRESS, sa("8.8.8.8:5000"));
    let bind = m.finish(None, false);
    write(
        dir,
        "stun_auth",
        "channel-bind",
        &[[0x12].as_slice(), &bind].concat(),
    );
    write(
        dir,
        "stun_auth",
        "channel-bind-tcp",
        &[[0x13].as_slice(), &bind].concat(),
    );

    let mut m = Msg::new(method::SEND, class::INDICATION, t(7));
    m.xor_addr(attr::XOR_PEER_ADDRESS, sa("8.8.8.8:5000"))
        .attr(attr::DATA, b"hello peer");
    write(
        dir,
        "stun_auth",
        "send",
        &[[0x10].as_slice(), &m.finish(None, false)].concat(),
    );

    write(
        dir,
        "stun_auth",
        "channel-data",
        &[0x10, 0x40, 0x01, 0x00, 0x03, 1, 2, 3],
    );
    write(
        dir,
        "stun_auth",
        "channel-data-tcp",
        &[0x11, 0x40, 0x01, 0x00, 0x03, 1, 2, 3, 0],
    );

    // REST user over IPv6.
    let mut s6 = server(now);
    let c6 = ClientAddr(sa("[2001:db8:1::5]:40000"));
    let n6 = fetch_nonce(&mut s6, now, Transport::Udp, sa(tests_fuzz::LISTEN6), c6).expect("nonce");
    let signed = sign(&allocate, REST_USER, &rest_key(), &n6, false);
    write(
        dir,
        "stun_auth",
        "allocate-rest-v6-raw",
        &[[0x44].as_slice(), &signed].concat(),
    );
}

fn server_ops(dir: &Path) {
    // `arbitrary` takes enum variants from a u32 and fields in order; these byte strings
    // are only starting points for the fuzzer's mutations.
    write(dir, "server_ops", "empty", &[]);
    let allocate = [0u8, 0, 0, 0, 0, 0, 0, 0, 0];
    write(
        dir,
        "server_ops",
        "allocate",
        &[&allocate[..], &[1, 0, 0, 0]].concat(),
    );
    let mut seq = Vec::new();
    for variant in 0u32..12 {
        seq.extend_from_slice(&variant.to_le_bytes());
        seq.extend_from_slice(&[1, 0, 0x40, 3, 1, 0, 0, 0]);
    }
    write(dir, "server_ops", "each-op", &seq);
}

fn tcp_framing(dir: &Path) {
    let binding = Msg::new(method::BINDING, class::REQUEST, [1; 12]).finish(None, false);
    let stream = [
        binding.as_slice(),
        &[0x40, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0],
        &[0x7F, 0xFF, 0x00, 0x00],
        &[0x40, 0x00, 0x00, 0x07, 1],
    ]
    .concat();
    write(dir, "tcp_framing", "stream", &stream);
    write(
        dir,
        "tcp_framing",
        "garbage",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    write(
        dir,
        "tcp_framing",
        "bad-channel",
        &[0x3F, 0xFF, 0, 4, 0x80, 0, 0, 0],
    );
}

fn xdp_parse(dir: &Path) {
    // Flags 0x17: fix lengths, IPv4 header checksum, UDP checksum and ChannelData length.
    let eth = |t: [u8; 2]| [[2u8; 6].as_slice(), &[4u8; 6], &t].concat();
    let mut ip4 = vec![0x45, 0xb8, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
    ip4.extend_from_slice(&[192, 0, 2, 1]);
    ip4.extend_from_slice(&[198, 51, 100, 7]);
    let udp = |sport: u16, dport: u16| {
        [sport.to_be_bytes(), dport.to_be_bytes(), [0, 0], [0, 0]].concat()
    };
    let cd = [0x40, 0x01, 0x00, 0x06, b'h', b'e', b'l', b'l', b'o', b'!'];
    let mut v4 = [eth([0x08, 0x00]), ip4.clone(), udp(5000, 3478), cd.to_vec()].concat();
    fix(&mut v4, 14, 20);
    write(
        dir,
        "xdp_parse",
        "v4-channel-data",
        &[[0u8].as_slice(), &v4].concat(),
    );
    write(
        dir,
        "xdp_parse",
        "v4-channel-data-fixup",
        &[[0x17u8].as_slice(), &v4].concat(),
    );
    let peer = [
        eth([0x08, 0x00]),
        ip4,
        udp(5000, 50001),
        b"from a peer".to_vec(),
    ]
    .concat();
    write(
        dir,
        "xdp_parse",
        "v4-peer-fixup",
        &[[0x07u8].as_slice(), &peer].concat(),
    );
    let mut ip6 = vec![0x6b, 0x80, 0x12, 0x34, 0, 0, 17, 64];
    ip6.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
    ip6.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    let v6 = [eth([0x86, 0xdd]), ip6, udp(5000, 3478), cd.to_vec()].concat();
    write(
        dir,
        "xdp_parse",
        "v6-channel-data-fixup",
        &[[0x15u8].as_slice(), &v6].concat(),
    );
}

/// Sets lengths and checksums of an IPv4 frame (IP header at `ip`, `len` bytes long).
fn fix(frame: &mut [u8], ip: usize, len: usize) {
    let udp_at = ip + len;
    let udp_len = (frame.len() - udp_at) as u16;
    frame[ip + 2..ip + 4].copy_from_slice(&(udp_len + 20).to_be_bytes());
    frame[udp_at + 4..udp_at + 6].copy_from_slice(&udp_len.to_be_bytes());
    let check = fold(sum16(&frame[ip..ip + 20]));
    frame[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
    let (s, d) = (
        frame[ip + 12..ip + 16].to_vec(),
        frame[ip + 16..ip + 20].to_vec(),
    );
    let check = udp_check(&s, &d, &frame[udp_at..]);
    frame[udp_at + 6..udp_at + 8].copy_from_slice(&check.to_be_bytes());
}
