//! Wire layouts of the headers the data plane reads and writes, and the pure
//! header rewrites, shared by the XDP program and host tests.
//!
//! Every struct is `#[repr(C)]` over byte arrays (alignment 1), so a pointer
//! into a frame at any offset may be read as one of them.

use crate::Pod;
use crate::csum::Incremental;
use crate::{ClientKeyV4, PeerTarget};

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options.
pub const IPV4_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// ChannelData header length: channel number and length (RFC 8656 section 12.4).
pub const CHANNEL_HEADER_LEN: usize = 4;

/// EtherType of IPv4.
pub const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
/// EtherType of IPv6.
pub const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 `frag_off` bits that mark a fragment: More Fragments and the offset.
pub const IPV4_FRAGMENT_MASK: u16 = 0x3fff;

/// Ethernet II header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EthHdr {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// EtherType.
    pub ether_type: [u8; 2],
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub version_ihl: u8,
    /// DSCP and ECN.
    pub tos: u8,
    /// Total length of header and payload.
    pub tot_len: [u8; 2],
    /// Identification.
    pub id: [u8; 2],
    /// Flags and fragment offset.
    pub frag_off: [u8; 2],
    /// Time to live.
    pub ttl: u8,
    /// Payload protocol.
    pub protocol: u8,
    /// Header checksum.
    pub check: [u8; 2],
    /// Source address.
    pub saddr: [u8; 4],
    /// Destination address.
    pub daddr: [u8; 4],
}

/// UDP header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpHdr {
    /// Source port.
    pub source: [u8; 2],
    /// Destination port.
    pub dest: [u8; 2],
    /// Length of header and payload.
    pub len: [u8; 2],
    /// Checksum; zero means none was computed (IPv4 only).
    pub check: [u8; 2],
}

/// ChannelData header (RFC 8656 section 12.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelHdr {
    /// Channel number, 0x4000-0x4FFF.
    pub channel: [u8; 2],
    /// Length of the application data that follows, without padding.
    pub len: [u8; 2],
}

impl ChannelHdr {
    /// Whether the first two bits mark a ChannelData message and the number
    /// lies in the assignable range 0x4000-0x4FFF (RFC 8656 section 12).
    /// STUN messages start with two zero bits (RFC 8489 section 5).
    #[inline(always)]
    pub fn is_channel_data(&self) -> bool {
        self.channel[0] & 0xf0 == 0x40
    }
}

/// The headers in front of a UDP payload in an untagged IPv4 frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4UdpHeaders {
    /// Ethernet.
    pub eth: EthHdr,
    /// IPv4 without options.
    pub ip: Ipv4Hdr,
    /// UDP.
    pub udp: UdpHdr,
}

// SAFETY: repr(C) over u8 fields and Pod structs of u8 fields.
unsafe impl Pod for EthHdr {}
// SAFETY: as above.
unsafe impl Pod for Ipv4Hdr {}
// SAFETY: as above.
unsafe impl Pod for UdpHdr {}
// SAFETY: as above.
unsafe impl Pod for ChannelHdr {}
// SAFETY: as above.
unsafe impl Pod for V4UdpHeaders {}

impl V4UdpHeaders {
    /// The `CLIENT_V4` key of a channel-data datagram with these headers.
    #[inline(always)]
    pub fn client_key(&self, channel: &ChannelHdr) -> ClientKeyV4 {
        ClientKeyV4 {
            client_ip: self.ip.saddr,
            client_port: self.udp.source,
            channel: channel.channel,
        }
    }

    /// Turns the headers of a channel-data datagram from a client into the
    /// headers of the plain UDP datagram that carries its application data
    /// from the allocation to the peer (RFC 8656 section 12.6), for a frame
    /// that loses the 4-byte channel header right behind `self.udp`.
    ///
    /// - Addresses: from `relay_ip` (the allocation's relayed address) to the peer.
    /// - Ports: from the allocation port to the peer's port.
    /// - Lengths shrink by the channel header.
    /// - TTL: the incoming value less one (RFC 8656 section 14, preferred
    ///   behaviour); the caller passes frames with TTL <= 1 to the stack.
    /// - DSCP, ECN and DF are kept (section 14: preferred behaviour).
    /// - MACs swap: the frame goes back to the router it came from.
    /// - Both checksums are updated incrementally (RFC 1624 eqn. 3), the
    ///   UDP one including the removal of the channel header's two words; a
    ///   zero UDP checksum stays zero (no checksum, RFC 768).
    #[inline(always)]
    pub fn client_to_peer_v4(
        &mut self,
        channel: &ChannelHdr,
        relay_ip: [u8; 4],
        target: &PeerTarget,
    ) {
        core::mem::swap(&mut self.eth.src, &mut self.eth.dst);
        let peer_ip = target.peer_v4();
        let shrink = CHANNEL_HEADER_LEN as u16;

        let old_tot_len = self.ip.tot_len;
        let new_tot_len = u16::from_be_bytes(old_tot_len)
            .wrapping_sub(shrink)
            .to_be_bytes();
        let old_ttl_proto = [self.ip.ttl, self.ip.protocol];
        let new_ttl = self.ip.ttl.wrapping_sub(1);
        let mut ip_check = Incremental::new(self.ip.check);
        ip_check.replace16(old_tot_len, new_tot_len);
        ip_check.replace16(old_ttl_proto, [new_ttl, self.ip.protocol]);
        ip_check.replace32(self.ip.saddr, relay_ip);
        ip_check.replace32(self.ip.daddr, peer_ip);

        let old_udp_len = self.udp.len;
        let new_udp_len = u16::from_be_bytes(old_udp_len)
            .wrapping_sub(shrink)
            .to_be_bytes();
        if self.udp.check != [0, 0] {
            let mut udp_check = Incremental::new(self.udp.check);
            // Pseudo-header (RFC 768): addresses and the UDP length.
            udp_check.replace32(self.ip.saddr, relay_ip);
            udp_check.replace32(self.ip.daddr, peer_ip);
            udp_check.replace16(old_udp_len, new_udp_len);
            // Header: ports and the length again.
            udp_check.replace16(self.udp.source, target.allocation_port);
            udp_check.replace16(self.udp.dest, target.peer_port);
            udp_check.replace16(old_udp_len, new_udp_len);
            // The channel header leaves the payload; it sat at an even offset,
            // so the words behind it keep their alignment.
            udp_check.remove16(channel.channel);
            udp_check.remove16(channel.len);
            self.udp.check = udp_check.finish_udp();
        }

        self.ip.tot_len = new_tot_len;
        self.ip.ttl = new_ttl;
        self.ip.saddr = relay_ip;
        self.ip.daddr = peer_ip;
        self.ip.check = ip_check.finish();
        self.udp.source = target.allocation_port;
        self.udp.dest = target.peer_port;
        self.udp.len = new_udp_len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    /// Reference Internet checksum (RFC 1071), independent of `csum`.
    fn checksum(chunks: &[&[u8]]) -> u16 {
        let bytes: std::vec::Vec<u8> = chunks.concat();
        let mut sum: u64 = 0;
        for pair in bytes.chunks(2) {
            sum += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn udp_checksum(ip: &Ipv4Hdr, udp: &UdpHdr, payload: &[u8]) -> u16 {
        let pseudo = [
            &ip.saddr[..],
            &ip.daddr[..],
            &[0, IPPROTO_UDP],
            &udp.len[..],
        ]
        .concat();
        let header = UdpHdr {
            check: [0, 0],
            ..*udp
        };
        match checksum(&[&pseudo, header.as_bytes(), payload]) {
            0 => 0xffff,
            check => check,
        }
    }

    /// A channel-data frame from 192.0.2.2:40000 to 203.0.113.10:3478 with
    /// correct checksums (or a zero UDP checksum).
    fn client_frame(data: &[u8], with_udp_checksum: bool) -> (V4UdpHeaders, ChannelHdr) {
        let channel = ChannelHdr {
            channel: [0x40, 0x01],
            len: (data.len() as u16).to_be_bytes(),
        };
        let udp_len = (UDP_LEN + CHANNEL_HEADER_LEN + data.len()) as u16;
        let mut headers = V4UdpHeaders {
            eth: EthHdr {
                dst: [2; 6],
                src: [4; 6],
                ether_type: ETH_P_IPV4,
            },
            ip: Ipv4Hdr {
                version_ihl: 0x45,
                tos: 0xb8,
                tot_len: (udp_len + IPV4_LEN as u16).to_be_bytes(),
                id: [0x12, 0x34],
                frag_off: [0x40, 0],
                ttl: 63,
                protocol: IPPROTO_UDP,
                check: [0, 0],
                saddr: [192, 0, 2, 2],
                daddr: [203, 0, 113, 10],
            },
            udp: UdpHdr {
                source: 40000u16.to_be_bytes(),
                dest: 3478u16.to_be_bytes(),
                len: udp_len.to_be_bytes(),
                check: [0, 0],
            },
        };
        headers.ip.check = checksum(&[headers.ip.as_bytes()]).to_be_bytes();
        if with_udp_checksum {
            let payload = [channel.as_bytes(), data].concat();
            headers.udp.check = udp_checksum(&headers.ip, &headers.udp, &payload).to_be_bytes();
        }
        (headers, channel)
    }

    #[test]
    fn client_to_peer_rewrite_matches_a_freshly_built_datagram() {
        for len in [0usize, 1, 2, 3, 100, 1199] {
            let data: std::vec::Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let (mut headers, channel) = client_frame(&data, true);
            let target = PeerTarget::v4(Ipv4Addr::new(198, 51, 100, 2), 9000, 50000);
            headers.client_to_peer_v4(&channel, [203, 0, 113, 10], &target);

            assert_eq!(headers.eth.dst, [4; 6]);
            assert_eq!(headers.eth.src, [2; 6]);
            assert_eq!(headers.ip.saddr, [203, 0, 113, 10]);
            assert_eq!(headers.ip.daddr, [198, 51, 100, 2]);
            assert_eq!(headers.ip.ttl, 62);
            assert_eq!(headers.ip.tos, 0xb8, "DSCP and ECN are kept");
            assert_eq!(headers.ip.frag_off, [0x40, 0], "DF is kept");
            assert_eq!(
                u16::from_be_bytes(headers.ip.tot_len) as usize,
                IPV4_LEN + UDP_LEN + len
            );
            assert_eq!(u16::from_be_bytes(headers.udp.len) as usize, UDP_LEN + len);
            assert_eq!(headers.udp.source, 50000u16.to_be_bytes());
            assert_eq!(headers.udp.dest, 9000u16.to_be_bytes());
            assert_eq!(
                checksum(&[headers.ip.as_bytes()]),
                0,
                "IPv4 header checksum, len {len}"
            );
            assert_eq!(
                u16::from_be_bytes(headers.udp.check),
                udp_checksum(&headers.ip, &headers.udp, &data),
                "UDP checksum, len {len}"
            );
        }
    }

    #[test]
    fn zero_udp_checksum_stays_zero() {
        let (mut headers, channel) = client_frame(b"no checksum", false);
        let target = PeerTarget::v4(Ipv4Addr::new(198, 51, 100, 2), 9000, 50000);
        headers.client_to_peer_v4(&channel, [203, 0, 113, 10], &target);
        assert_eq!(headers.udp.check, [0, 0]);
        assert_eq!(checksum(&[headers.ip.as_bytes()]), 0);
    }

    #[test]
    fn channel_data_is_told_from_stun() {
        let stun = ChannelHdr {
            channel: [0x00, 0x01],
            len: [0, 0],
        };
        assert!(!stun.is_channel_data());
        assert!(
            ChannelHdr {
                channel: [0x40, 0x00],
                len: [0, 0]
            }
            .is_channel_data()
        );
        assert!(
            ChannelHdr {
                channel: [0x4f, 0xff],
                len: [0, 0]
            }
            .is_channel_data()
        );
        // Reserved by RFC 8656 (valid in RFC 5766): not relayed in the kernel.
        assert!(
            !ChannelHdr {
                channel: [0x50, 0x00],
                len: [0, 0]
            }
            .is_channel_data()
        );
    }
}
