//! The XDP program's header logic, built for the host: arbitrary bytes as an Ethernet frame
//! go through the same steps as `bpf/xdp`'s `from_family` / `from_client` / `from_peer`
//! (`Pod::from_bytes` of `UdpFrame<Ip>` from the front, `IpHeader::check`, `ChannelHdr`, then
//! `relay()` to both families for fixed routes).
//!
//! Input: a flags byte, then the frame. Flags fix up the frame before parsing, so that
//! well-formed frames are explored too: bit 0 lengths (IP and UDP, from the buffer), bit 1
//! the IPv4 header checksum, bit 2 the UDP checksum, bit 3 a zero UDP checksum, bit 4 the
//! ChannelData length.
//!
//! Checks: no panic; for every relayed frame, length fields agree with the data moved, the
//! TTL / hop limit drops by one, MACs are swapped, the IPv4 header checksum is valid when it
//! was (and always when built fresh), and the UDP checksum is valid when it was (zero only
//! when it was zero, and never to IPv6).
#![no_main]

use bpf_common::Pod;
use bpf_common::packet::{
    CHANNEL_HEADER_LEN, ChannelHdr, ETH_LEN, IpHeader, Ipv4Hdr, Ipv6Hdr, Padding, Relay, Translate,
    UDP_LEN, UdpFrame, relay,
};
use libfuzzer_sys::fuzz_target;
use tests_fuzz::{fold, sum16, udp_check};

const RELAY_V4: [u8; 4] = [198, 51, 100, 7];
const RELAY_V6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const PEER_V4: [u8; 4] = [203, 0, 113, 9];
const PEER_V6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, frame)) = data.split_first() else {
        return;
    };
    let mut frame = frame.to_vec();
    if frame.len() >= 14 {
        match [frame[12], frame[13]] {
            [0x08, 0x00] => fix_up::<Ipv4Hdr>(&mut frame, flags),
            [0x86, 0xdd] => fix_up::<Ipv6Hdr>(&mut frame, flags),
            _ => {}
        }
    }
    from_family::<Ipv4Hdr>(&frame);
    from_family::<Ipv6Hdr>(&frame);
});

/// Addresses of a family as bytes.
trait IpVersion: IpHeader + Translate<Ipv4Hdr> + Translate<Ipv6Hdr> {
    fn addr_bytes(a: &Self::Addr) -> &[u8];
    fn udp_len_field(&self) -> usize;
}

impl IpVersion for Ipv4Hdr {
    fn addr_bytes(a: &[u8; 4]) -> &[u8] {
        a
    }
    fn udp_len_field(&self) -> usize {
        usize::from(u16::from_be_bytes(self.tot_len)).saturating_sub(Self::LEN)
    }
}

impl IpVersion for Ipv6Hdr {
    fn addr_bytes(a: &[u8; 16]) -> &[u8] {
        a
    }
    fn udp_len_field(&self) -> usize {
        usize::from(u16::from_be_bytes(self.payload_len))
    }
}

/// Makes some fields right so that the fuzzer reaches the relaying paths.
fn fix_up<Ip: IpHeader>(frame: &mut [u8], flags: u8) {
    let ip_at = ETH_LEN;
    let udp_at = ETH_LEN + Ip::LEN;
    if frame.len() < udp_at + UDP_LEN {
        return;
    }
    let udp_len = (frame.len() - udp_at).min(0xFFFF - Ip::LEN);
    let v4 = Ip::LEN == 20;
    if flags & 1 != 0 {
        let len = udp_len as u16;
        if v4 {
            frame[ip_at + 2..ip_at + 4].copy_from_slice(&(len + 20).to_be_bytes());
        } else {
            frame[ip_at + 4..ip_at + 6].copy_from_slice(&len.to_be_bytes());
        }
        frame[udp_at + 4..udp_at + 6].copy_from_slice(&len.to_be_bytes());
    }
    if flags & 0x10 != 0 && udp_len >= UDP_LEN + CHANNEL_HEADER_LEN {
        let data = (udp_len - UDP_LEN - CHANNEL_HEADER_LEN) as u16;
        frame[udp_at + 10..udp_at + 12].copy_from_slice(&data.to_be_bytes());
    }
    if v4 && flags & 2 != 0 {
        frame[ip_at + 10..ip_at + 12].fill(0);
        let check = fold(sum16(&frame[ip_at..ip_at + 20]));
        frame[ip_at + 10..ip_at + 12].copy_from_slice(&check.to_be_bytes());
    }
    if flags & 8 != 0 {
        frame[udp_at + 6..udp_at + 8].fill(0);
    } else if flags & 4 != 0 {
        let (s, d) = if v4 { (12, 16) } else { (8, 24) };
        let alen = if v4 { 4 } else { 16 };
        frame[udp_at + 6..udp_at + 8].fill(0);
        let saddr = frame[ip_at + s..ip_at + s + alen].to_vec();
        let daddr = frame[ip_at + d..ip_at + d + alen].to_vec();
        let check = match udp_check(&saddr, &daddr, &frame[udp_at..udp_at + udp_len]) {
            0 => 0xFFFF,
            c => c,
        };
        frame[udp_at + 6..udp_at + 8].copy_from_slice(&check.to_be_bytes());
    }
}

/// The XDP program's `from_family` for `In`, without the map lookups: every route is tried.
fn from_family<In: IpVersion>(frame: &[u8]) {
    let size = core::mem::size_of::<UdpFrame<In>>();
    let Some(headers) = frame.get(..size).and_then(UdpFrame::<In>::from_bytes) else {
        return;
    };
    let Ok(udp_len) = headers.ip.check(&headers.udp) else {
        return;
    };
    assert!(udp_len >= UDP_LEN);
    assert_eq!(
        udp_len,
        headers.ip.udp_len_field(),
        "check() accepted inconsistent lengths"
    );
    // Lengths come from the headers; the frame may be longer (Ethernet padding) but not shorter.
    if ETH_LEN + In::LEN + udp_len > frame.len() {
        return;
    }
    let udp_bytes = &frame[ETH_LEN + In::LEN..ETH_LEN + In::LEN + udp_len];
    let payload = &udp_bytes[UDP_LEN..];

    // From a peer: the whole payload, a ChannelData header added.
    let to_client = |removed: Option<(ChannelHdr, Padding)>, data: &[u8]| {
        route::<In, Ipv4Hdr>(
            &headers,
            udp_len,
            udp_bytes,
            data,
            removed,
            Some([0x40, 0x01]),
            PEER_V4,
            RELAY_V4,
        );
        route::<In, Ipv6Hdr>(
            &headers,
            udp_len,
            udp_bytes,
            data,
            removed,
            Some([0x7F, 0xFF]),
            PEER_V6,
            RELAY_V6,
        );
    };
    to_client(None, payload);

    // From a client: a ChannelData message filling the payload exactly.
    let Some(channel) = payload
        .get(..CHANNEL_HEADER_LEN)
        .and_then(ChannelHdr::from_bytes)
    else {
        return;
    };
    if !channel.is_channel_data() {
        return;
    }
    let data_len = usize::from(u16::from_be_bytes(channel.len));
    // Up to three bytes of padding may follow the data (RFC 8656 §12.5); more is not
    // relayed by the kernel.
    let Some(pad) = payload.len().checked_sub(CHANNEL_HEADER_LEN + data_len) else {
        return;
    };
    if pad > 3 {
        return;
    }
    let mut bytes = [0u8; 3];
    bytes[..pad].copy_from_slice(&payload[payload.len() - pad..]);
    let padding = Padding {
        bytes,
        len: pad as u8,
    };
    let data = &payload[CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + data_len];
    // To a peer: the header removed.
    route::<In, Ipv4Hdr>(
        &headers,
        udp_len,
        udp_bytes,
        data,
        Some((channel, padding)),
        None,
        RELAY_V4,
        PEER_V4,
    );
    route::<In, Ipv6Hdr>(
        &headers,
        udp_len,
        udp_bytes,
        data,
        Some((channel, padding)),
        None,
        RELAY_V6,
        PEER_V6,
    );
    // Hairpin to another allocation's client: the header replaced.
    to_client(Some((channel, padding)), data);
}

#[expect(
    clippy::too_many_arguments,
    reason = "one route of the program, spelled out"
)]
fn route<In: IpVersion, Out: IpVersion>(
    input: &UdpFrame<In>,
    udp_len: usize,
    udp_bytes: &[u8],
    data: &[u8],
    removed: Option<(ChannelHdr, Padding)>,
    added: Option<[u8; 2]>,
    saddr: Out::Addr,
    daddr: Out::Addr,
) where
    In: Translate<Out>,
{
    let route = Relay {
        saddr,
        daddr,
        source: [0xC3, 0x50],
        dest: [0x13, 0x88],
        removed: removed.map(|(h, _)| h),
        added,
        padding: removed.map(|(_, p)| p).unwrap_or_default(),
    };
    let Ok((out, header)) = relay::<In, Out>(input, udp_len, &route) else {
        return;
    };
    // Lengths: the UDP datagram is the data plus the headers that frame it.
    let new_udp_len = UDP_LEN
        + data.len()
        + if added.is_some() {
            CHANNEL_HEADER_LEN
        } else {
            0
        };
    assert_eq!(usize::from(u16::from_be_bytes(out.udp.len)), new_udp_len);
    assert_eq!(out.ip.udp_len_field(), new_udp_len);
    // The relayed datagram would pass the program's own checks.
    assert_eq!(out.ip.check(&out.udp), Ok(new_udp_len));
    assert_eq!(header.is_some(), added.is_some());
    if let Some(h) = header {
        assert_eq!(usize::from(u16::from_be_bytes(h.len)), data.len());
        assert_eq!(Some(h.channel), added);
    }
    assert_eq!(out.ip.hop_limit(), input.ip.hop_limit() - 1);
    assert_eq!(out.eth.dst, input.eth.src);
    assert_eq!(out.eth.src, input.eth.dst);
    assert_eq!(out.eth.ether_type, Out::ETHER_TYPE);
    assert!(out.ip.saddr() == saddr && out.ip.daddr() == daddr);

    // IPv4 header checksum: kept valid by the incremental update, always valid when built.
    if Out::LEN == 20 && (In::LEN != 20 || input.ip.header_checksum_ok()) {
        assert!(out.ip.header_checksum_ok(), "bad IPv4 header checksum out");
    }
    // UDP checksum over the outgoing pseudo-header, header, added ChannelData header, data.
    let input_ok = udp_check(
        In::addr_bytes(&input.ip.saddr()),
        In::addr_bytes(&input.ip.daddr()),
        udp_bytes,
    ) == 0;
    if input.udp.check == [0, 0] {
        assert!(
            Out::LEN == 20 && out.udp.check == [0, 0],
            "zero checksum carried to IPv6"
        );
    } else {
        assert_ne!(
            out.udp.check,
            [0, 0],
            "a computed checksum of zero is sent as 0xFFFF"
        );
        if input_ok {
            let mut bytes = out.udp.as_bytes().to_vec();
            if let Some(h) = header {
                bytes.extend_from_slice(h.as_bytes());
            }
            bytes.extend_from_slice(data);
            let check = udp_check(Out::addr_bytes(&saddr), Out::addr_bytes(&daddr), &bytes);
            assert_eq!(check, 0, "valid UDP checksum in, invalid out");
        }
    }
}
