//! Wire layouts of the headers the data plane reads and writes, and the pure
//! header rewrites, shared by the XDP program and host tests.
//!
//! Every struct is `#[repr(C, align(2))]` over byte arrays. Every header of an
//! untagged frame starts at an even offset (all their lengths are even), so a
//! pointer into a frame that starts at an even address may be read as one of
//! them; and the alignment lets the BPF backend, which has no misaligned
//! access, move 16-bit words instead of single bytes.

use crate::csum::Incremental;
use crate::{Pod, Reason};

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options.
pub const IPV4_LEN: usize = 20;
/// IPv6 header length.
pub const IPV6_LEN: usize = 40;
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
/// IPv6 next-header value of the fragment header.
pub const IPPROTO_FRAGMENT: u8 = 44;
/// IPv4 `frag_off` bits that mark a fragment: More Fragments and the offset.
pub const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
/// IPv4 `frag_off` bit Don't Fragment (RFC 791).
pub const IPV4_DONT_FRAGMENT: u16 = 0x4000;

/// Ethernet II header.
#[repr(C, align(2))]
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
#[repr(C, align(2))]
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
#[repr(C, align(2))]
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
#[repr(C, align(2))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelHdr {
    /// Channel number, 0x4000-0x7FFF.
    pub channel: [u8; 2],
    /// Length of the application data that follows, without padding.
    pub len: [u8; 2],
}

impl ChannelHdr {
    /// Whether the first two bits mark a ChannelData message: channel numbers
    /// 0x4000-0x7FFF (RFC 5766 section 11; RFC 8656 section 12 reserves
    /// 0x5000-0x7FFF, but RFC 5766 clients still bind them, as turn-control
    /// accepts). STUN messages start with two zero bits (RFC 8489 section 5).
    #[inline(always)]
    pub fn is_channel_data(&self) -> bool {
        self.channel[0] & 0xc0 == 0x40
    }
}

/// IPv6 header (RFC 8200 section 3).
#[repr(C, align(2))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub vtc_flow: [u8; 4],
    /// Length of what follows this header.
    pub payload_len: [u8; 2],
    /// Protocol of the next header.
    pub next_header: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address.
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
}

/// Headers of an untagged Ethernet frame carrying UDP over `Ip`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFrame<Ip> {
    /// Ethernet.
    pub eth: EthHdr,
    /// IPv4 without options, or IPv6 without extension headers.
    pub ip: Ip,
    /// UDP.
    pub udp: UdpHdr,
}

/// Headers of a frame carrying a ChannelData message over UDP over `Ip`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelFrame<Ip> {
    /// Ethernet, IP and UDP.
    pub udp: UdpFrame<Ip>,
    /// The ChannelData header; the application data follows.
    pub channel: ChannelHdr,
}

// SAFETY: repr(C) over u8 fields; every size is even, so align(2) adds no padding.
unsafe impl Pod for EthHdr {}
// SAFETY: as above.
unsafe impl Pod for Ipv4Hdr {}
// SAFETY: as above.
unsafe impl Pod for Ipv6Hdr {}
// SAFETY: as above.
unsafe impl Pod for UdpHdr {}
// SAFETY: as above.
unsafe impl Pod for ChannelHdr {}
// SAFETY: repr(C) over Pod fields of even sizes and alignment 2: no padding.
unsafe impl<Ip: Pod> Pod for UdpFrame<Ip> {}
// SAFETY: as above.
unsafe impl<Ip: Pod> Pod for ChannelFrame<Ip> {}

/// An IP address as bytes in network order: `[u8; 4]` or `[u8; 16]`.
pub trait IpBytes: Copy + PartialEq + Default {
    /// Adds the address's 16-bit words to a checksum.
    fn add_to(&self, sum: &mut Incremental);
    /// Takes the address's 16-bit words out of a checksum.
    fn remove_from(&self, sum: &mut Incremental);
    /// Whether this is the all-zero (unset) address.
    fn is_unset(&self) -> bool;
}

impl<const N: usize> IpBytes for [u8; N]
where
    [u8; N]: Default,
{
    #[inline(always)]
    fn add_to(&self, sum: &mut Incremental) {
        let mut i = 0;
        while i + 1 < N {
            sum.add16([self[i], self[i + 1]]);
            i += 2;
        }
    }

    #[inline(always)]
    fn remove_from(&self, sum: &mut Incremental) {
        let mut i = 0;
        while i + 1 < N {
            sum.remove16([self[i], self[i + 1]]);
            i += 2;
        }
    }

    #[inline(always)]
    fn is_unset(&self) -> bool {
        *self == [0; N]
    }
}

/// What the data plane needs to know of an IP header.
pub trait IpHeader: Pod + Default {
    /// Header length (no options, no extension headers).
    const LEN: usize;
    /// EtherType of this family.
    const ETHER_TYPE: [u8; 2];
    /// Whether UDP over this family must carry a checksum (IPv6, RFC 8200
    /// section 8.1) or may send zero (IPv4, RFC 768).
    const CHECKSUM_REQUIRED: bool;
    /// An address of this family.
    type Addr: IpBytes;

    /// Source address.
    fn saddr(&self) -> Self::Addr;
    /// Destination address.
    fn daddr(&self) -> Self::Addr;
    /// TTL or hop limit.
    fn hop_limit(&self) -> u8;
    /// Whether the header's own checksum is right (IPv6 has none).
    fn header_checksum_ok(&self) -> bool;
    /// Forbids fragmenting the datagram on its way: IPv4 sets DF, keeping
    /// the header checksum right (an incremental update, RFC 1624, so a
    /// wrong one stays wrong); IPv6 has no such bit, its routers never
    /// fragment.
    fn set_dont_fragment(&mut self);
    /// The checks a header must pass before its UDP payload is relayed:
    /// version, no options or extension headers, not a fragment, UDP, and
    /// a UDP length consistent with the IP length. `Ok(udp_len)`.
    fn check(&self, udp: &UdpHdr) -> Result<usize, Reason>;
}

impl IpHeader for Ipv4Hdr {
    const LEN: usize = IPV4_LEN;
    const ETHER_TYPE: [u8; 2] = ETH_P_IPV4;
    const CHECKSUM_REQUIRED: bool = false;
    type Addr = [u8; 4];

    #[inline(always)]
    fn saddr(&self) -> [u8; 4] {
        self.saddr
    }

    #[inline(always)]
    fn daddr(&self) -> [u8; 4] {
        self.daddr
    }

    #[inline(always)]
    fn hop_limit(&self) -> u8 {
        self.ttl
    }

    #[inline(always)]
    fn header_checksum_ok(&self) -> bool {
        let mut sum = Incremental::new([0xff, 0xff]);
        let bytes = self.as_bytes();
        let mut i = 0;
        while i + 1 < IPV4_LEN {
            sum.add16([bytes[i], bytes[i + 1]]);
            i += 2;
        }
        sum.finish() == [0, 0]
    }

    #[inline(always)]
    fn set_dont_fragment(&mut self) {
        let old = self.frag_off;
        let new = (u16::from_be_bytes(old) | IPV4_DONT_FRAGMENT).to_be_bytes();
        if new != old {
            let mut check = Incremental::new(self.check);
            check.replace16(old, new);
            self.check = check.finish();
            self.frag_off = new;
        }
    }

    #[inline(always)]
    fn check(&self, udp: &UdpHdr) -> Result<usize, Reason> {
        if self.version_ihl != 0x45 {
            return Err(if self.version_ihl >> 4 != 4 {
                Reason::PassNotIp
            } else {
                Reason::PassIpOptions
            });
        }
        if u16::from_be_bytes(self.frag_off) & IPV4_FRAGMENT_MASK != 0 {
            return Err(Reason::PassFragment);
        }
        if self.protocol != IPPROTO_UDP {
            return Err(Reason::PassNotUdp);
        }
        let udp_len = u16::from_be_bytes(udp.len) as usize;
        if udp_len < UDP_LEN || udp_len + IPV4_LEN != u16::from_be_bytes(self.tot_len) as usize {
            return Err(Reason::PassTruncated);
        }
        Ok(udp_len)
    }
}

impl IpHeader for Ipv6Hdr {
    const LEN: usize = IPV6_LEN;
    const ETHER_TYPE: [u8; 2] = ETH_P_IPV6;
    const CHECKSUM_REQUIRED: bool = true;
    type Addr = [u8; 16];

    #[inline(always)]
    fn saddr(&self) -> [u8; 16] {
        self.saddr
    }

    #[inline(always)]
    fn daddr(&self) -> [u8; 16] {
        self.daddr
    }

    #[inline(always)]
    fn hop_limit(&self) -> u8 {
        self.hop_limit
    }

    #[inline(always)]
    fn header_checksum_ok(&self) -> bool {
        true
    }

    #[inline(always)]
    fn set_dont_fragment(&mut self) {}

    #[inline(always)]
    fn check(&self, udp: &UdpHdr) -> Result<usize, Reason> {
        if self.vtc_flow[0] >> 4 != 6 {
            return Err(Reason::PassNotIp);
        }
        match self.next_header {
            IPPROTO_UDP => {}
            IPPROTO_FRAGMENT => return Err(Reason::PassFragment),
            // Hop-by-hop, routing, ESP, AH, destination options, mobility,
            // HIP, shim6 (RFC 7045's list of extension headers).
            0 | 43 | 50 | 51 | 60 | 135 | 139 | 140 => {
                return Err(Reason::PassIpv6ExtensionHeaders);
            }
            _ => return Err(Reason::PassNotUdp),
        }
        let udp_len = u16::from_be_bytes(udp.len) as usize;
        // A zero UDP length (jumbograms, RFC 2675) fails here too.
        if udp_len < UDP_LEN || udp_len != u16::from_be_bytes(self.payload_len) as usize {
            return Err(Reason::PassTruncated);
        }
        // A zero checksum is invalid over IPv6; the stack drops the datagram.
        if udp.check == [0, 0] {
            return Err(Reason::PassZeroChecksumIpv6);
        }
        Ok(udp_len)
    }
}

/// Derives the IP header of a relayed datagram from the incoming one.
///
/// The relayed datagram's TTL / hop limit is the incoming one less one and
/// its DSCP and ECN bits are the incoming ones (RFC 8656 section 14,
/// preferred behaviours); the caller passes datagrams with TTL <= 1 to the
/// stack. Same-family headers are updated in place (IPv4: incremental header
/// checksum, RFC 1624; identification, DF kept; IPv6: flow label kept);
/// cross-family headers are built fresh (IPv4: DF set, identification zero,
/// header checksum computed; IPv6: flow label zero). An allocation that asked
/// for DONT-FRAGMENT has DF set on top ([`IpHeader::set_dont_fragment`]).
pub trait Translate<Out: IpHeader>: IpHeader {
    /// The outgoing header from `saddr` to `daddr` carrying `udp_len` bytes of UDP.
    fn translate(&self, saddr: Out::Addr, daddr: Out::Addr, udp_len: u16) -> Out;
}

impl Translate<Ipv4Hdr> for Ipv4Hdr {
    #[inline(always)]
    fn translate(&self, saddr: [u8; 4], daddr: [u8; 4], udp_len: u16) -> Ipv4Hdr {
        let tot_len = (udp_len + IPV4_LEN as u16).to_be_bytes();
        let ttl = self.ttl.wrapping_sub(1);
        let mut check = Incremental::new(self.check);
        check.replace16(self.tot_len, tot_len);
        check.replace16([self.ttl, self.protocol], [ttl, self.protocol]);
        check.replace32(self.saddr, saddr);
        check.replace32(self.daddr, daddr);
        Ipv4Hdr {
            tot_len,
            ttl,
            saddr,
            daddr,
            check: check.finish(),
            ..*self
        }
    }
}

impl Translate<Ipv6Hdr> for Ipv6Hdr {
    #[inline(always)]
    fn translate(&self, saddr: [u8; 16], daddr: [u8; 16], udp_len: u16) -> Ipv6Hdr {
        Ipv6Hdr {
            payload_len: udp_len.to_be_bytes(),
            hop_limit: self.hop_limit.wrapping_sub(1),
            saddr,
            daddr,
            ..*self
        }
    }
}

impl Translate<Ipv6Hdr> for Ipv4Hdr {
    #[inline(always)]
    fn translate(&self, saddr: [u8; 16], daddr: [u8; 16], udp_len: u16) -> Ipv6Hdr {
        // Version 6, traffic class = the IPv4 TOS byte, flow label 0.
        Ipv6Hdr {
            vtc_flow: [0x60 | (self.tos >> 4), self.tos << 4, 0, 0],
            payload_len: udp_len.to_be_bytes(),
            next_header: IPPROTO_UDP,
            hop_limit: self.ttl.wrapping_sub(1),
            saddr,
            daddr,
        }
    }
}

impl Translate<Ipv4Hdr> for Ipv6Hdr {
    #[inline(always)]
    fn translate(&self, saddr: [u8; 4], daddr: [u8; 4], udp_len: u16) -> Ipv4Hdr {
        let mut header = Ipv4Hdr {
            version_ihl: 0x45,
            tos: (self.vtc_flow[0] << 4) | (self.vtc_flow[1] >> 4),
            tot_len: (udp_len + IPV4_LEN as u16).to_be_bytes(),
            id: [0, 0],
            // Don't fragment, as the sender of an IPv6 datagram expects.
            frag_off: [0x40, 0],
            ttl: self.hop_limit.wrapping_sub(1),
            protocol: IPPROTO_UDP,
            check: [0, 0],
            saddr,
            daddr,
        };
        let mut check = Incremental::new([0xff, 0xff]);
        check.add16([header.version_ihl, header.tos]);
        check.add16(header.tot_len);
        check.add16(header.frag_off);
        check.add16([header.ttl, header.protocol]);
        header.saddr.add_to(&mut check);
        header.daddr.add_to(&mut check);
        header.check = check.finish();
        header
    }
}

/// The addresses and ports a relayed datagram goes out with, and how its
/// payload's ChannelData header changes.
#[derive(Clone, Copy, Debug)]
pub struct Relay<Addr> {
    /// Source address: the relay's address in the outgoing family.
    pub saddr: Addr,
    /// Destination address.
    pub daddr: Addr,
    /// Source port.
    pub source: [u8; 2],
    /// Destination port.
    pub dest: [u8; 2],
    /// The ChannelData header the incoming payload starts with, if any;
    /// it is removed.
    pub removed: Option<ChannelHdr>,
    /// The ChannelData header the outgoing payload starts with, if any; it
    /// is added (its length is the application data's length).
    pub added: Option<[u8; 2]>,
    /// Padding after the incoming ChannelData message's data, which the
    /// relayed datagram does not carry.
    pub padding: Padding,
}

/// Bytes that pad a ChannelData message to a multiple of four (RFC 8656
/// section 12.5: optional over UDP, and some clients always send it). The
/// relayed datagram's lengths and checksum leave them out; they stay behind
/// it in the frame as a link-layer trailer, which receivers ignore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Padding {
    /// The padding bytes, `len` of them.
    pub bytes: [u8; 3],
    /// How many, 0-3.
    pub len: u8,
}

/// Rewrites the headers of a UDP datagram that arrived for the relay into
/// those of the datagram the relay sends on (RFC 8656 sections 11 and 12):
/// MACs swapped (the frame goes back to the router it came from), IP header
/// per [`Translate`], ports and UDP length per `relay`, and the UDP checksum
/// updated incrementally (RFC 1624) over the pseudo-header, ports, length and
/// the removed or added ChannelData header; the application data stays where
/// it is, so its words keep their alignment and their sum. Returns the new
/// headers and the new ChannelData header, if one was added.
///
/// The caller has checked the incoming header ([`IpHeader::check`]) and that
/// `udp_len` is its UDP length.
#[inline(always)]
pub fn relay<In, Out>(
    input: &UdpFrame<In>,
    udp_len: usize,
    relay: &Relay<Out::Addr>,
) -> Result<(UdpFrame<Out>, Option<ChannelHdr>), Reason>
where
    In: Translate<Out>,
    Out: IpHeader,
{
    if input.ip.hop_limit() <= 1 {
        return Err(Reason::PassTtlExpired);
    }
    // A same-family header is updated incrementally, which keeps a bad
    // header checksum bad for the next hop to catch; one rebuilt in the other
    // family would hide it, so it is checked first.
    if In::LEN != Out::LEN && !input.ip.header_checksum_ok() {
        return Err(Reason::PassBadHeaderChecksum);
    }
    let zero_checksum = input.udp.check == [0, 0];
    if zero_checksum && Out::CHECKSUM_REQUIRED {
        return Err(Reason::PassZeroChecksumToIpv6);
    }
    let data_len = udp_len
        - UDP_LEN
        - if relay.removed.is_some() {
            CHANNEL_HEADER_LEN + relay.padding.len as usize
        } else {
            0
        };
    let new_udp_len = UDP_LEN
        + data_len
        + if relay.added.is_some() {
            CHANNEL_HEADER_LEN
        } else {
            0
        };
    // The IPv4 total length bounds both families' relayed datagrams.
    if new_udp_len + IPV4_LEN > u16::MAX as usize || new_udp_len + IPV6_LEN > u16::MAX as usize {
        return Err(Reason::PassTooLarge);
    }
    let new_udp_len_bytes = (new_udp_len as u16).to_be_bytes();
    // A match, not `Option::map`: at the XDP program's opt-level the
    // closure would be a call per packet.
    #[expect(
        clippy::manual_map,
        reason = "a closure would be a call in the program"
    )]
    let added = match relay.added {
        Some(channel) => Some(ChannelHdr {
            channel,
            len: (data_len as u16).to_be_bytes(),
        }),
        None => None,
    };

    let mut udp = UdpHdr {
        source: relay.source,
        dest: relay.dest,
        len: new_udp_len_bytes,
        check: [0, 0],
    };
    if !zero_checksum {
        udp.check = relayed_udp_checksum(input, relay, data_len, new_udp_len_bytes, added);
    }

    let frame = UdpFrame {
        eth: EthHdr {
            dst: input.eth.src,
            src: input.eth.dst,
            ether_type: Out::ETHER_TYPE,
        },
        ip: input
            .ip
            .translate(relay.saddr, relay.daddr, new_udp_len as u16),
        udp,
    };
    Ok((frame, added))
}

/// The UDP checksum of the datagram [`relay`] builds, updated incrementally
/// (RFC 1624) from the incoming one: pseudo-header addresses and length,
/// ports, length, and the ChannelData header removed (with its padding) or
/// added. The application data is not read: it stays where it is.
#[inline(always)]
fn relayed_udp_checksum<In, Out>(
    input: &UdpFrame<In>,
    relay: &Relay<Out::Addr>,
    data_len: usize,
    new_udp_len_bytes: [u8; 2],
    added: Option<ChannelHdr>,
) -> [u8; 2]
where
    In: Translate<Out>,
    Out: IpHeader,
{
    let mut check = Incremental::new(input.udp.check);
    // Pseudo-header (RFC 768, RFC 8200 section 8.1): addresses and length.
    input.ip.saddr().remove_from(&mut check);
    input.ip.daddr().remove_from(&mut check);
    relay.saddr.add_to(&mut check);
    relay.daddr.add_to(&mut check);
    check.replace16(input.udp.len, new_udp_len_bytes);
    // UDP header: ports and the length again.
    check.replace16(input.udp.source, relay.source);
    check.replace16(input.udp.dest, relay.dest);
    check.replace16(input.udp.len, new_udp_len_bytes);
    // The payload's ChannelData header.
    if let Some(removed) = relay.removed {
        check.remove16(removed.channel);
        check.remove16(removed.len);
        // The data starts at an even offset, so a padding byte's place in
        // its 16-bit word follows from the data length.
        let mut i = 0;
        while i < relay.padding.len as usize && i < 3 {
            let byte = relay.padding.bytes[i];
            check.remove16(if (data_len + i).is_multiple_of(2) {
                [byte, 0]
            } else {
                [0, byte]
            });
            i += 1;
        }
    }
    if let Some(added) = added {
        check.add16(added.channel);
        check.add16(added.len);
    }
    check.finish_udp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// Reference Internet checksum (RFC 1071), independent of `csum`.
    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for pair in bytes.chunks(2) {
            sum += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// The UDP checksum a sender computes for `udp` (with its checksum
    /// field zeroed) and `payload` between `saddr` and `daddr`.
    fn udp_checksum(saddr: &[u8], daddr: &[u8], udp: &UdpHdr, payload: &[u8]) -> u16 {
        let len = (UDP_LEN + payload.len()) as u32;
        let pseudo: Vec<u8> = if saddr.len() == 4 {
            [
                saddr,
                daddr,
                &[0, IPPROTO_UDP],
                &(len as u16).to_be_bytes()[..],
            ]
            .concat()
        } else {
            [
                saddr,
                daddr,
                &len.to_be_bytes()[..],
                &[0, 0, 0, IPPROTO_UDP],
            ]
            .concat()
        };
        let header = UdpHdr {
            check: [0, 0],
            ..*udp
        };
        match checksum(&[&pseudo[..], header.as_bytes(), payload].concat()) {
            0 => 0xffff,
            check => check,
        }
    }

    #[test]
    fn headers_are_their_wire_lengths_at_alignment_two() {
        use core::mem::{align_of, size_of};
        assert_eq!(size_of::<EthHdr>(), ETH_LEN);
        assert_eq!(size_of::<Ipv4Hdr>(), IPV4_LEN);
        assert_eq!(size_of::<Ipv6Hdr>(), IPV6_LEN);
        assert_eq!(size_of::<UdpHdr>(), UDP_LEN);
        assert_eq!(size_of::<ChannelHdr>(), CHANNEL_HEADER_LEN);
        assert_eq!(size_of::<UdpFrame<Ipv4Hdr>>(), ETH_LEN + IPV4_LEN + UDP_LEN);
        assert_eq!(
            size_of::<ChannelFrame<Ipv6Hdr>>(),
            ETH_LEN + IPV6_LEN + UDP_LEN + CHANNEL_HEADER_LEN
        );
        for align in [
            align_of::<EthHdr>(),
            align_of::<Ipv4Hdr>(),
            align_of::<Ipv6Hdr>(),
            align_of::<UdpHdr>(),
            align_of::<ChannelHdr>(),
            align_of::<ChannelFrame<Ipv4Hdr>>(),
        ] {
            assert_eq!(align, 2);
        }
    }

    fn v4_header(saddr: [u8; 4], daddr: [u8; 4], udp_len: usize) -> Ipv4Hdr {
        let mut ip = Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0xb8,
            tot_len: ((IPV4_LEN + udp_len) as u16).to_be_bytes(),
            id: [0x12, 0x34],
            frag_off: [0x40, 0],
            ttl: 63,
            protocol: IPPROTO_UDP,
            check: [0, 0],
            saddr,
            daddr,
        };
        ip.check = checksum(ip.as_bytes()).to_be_bytes();
        ip
    }

    fn v6_header(saddr: [u8; 16], daddr: [u8; 16], udp_len: usize) -> Ipv6Hdr {
        Ipv6Hdr {
            vtc_flow: [0x6b, 0x80, 0x12, 0x34],
            payload_len: (udp_len as u16).to_be_bytes(),
            next_header: IPPROTO_UDP,
            hop_limit: 63,
            saddr,
            daddr,
        }
    }

    /// A frame with correct checksums carrying `payload` (which may start
    /// with a ChannelData header).
    fn frame<Ip: IpHeader>(ip: Ip, source: u16, dest: u16, payload: &[u8]) -> UdpFrame<Ip> {
        let mut udp = UdpHdr {
            source: source.to_be_bytes(),
            dest: dest.to_be_bytes(),
            len: ((UDP_LEN + payload.len()) as u16).to_be_bytes(),
            check: [0, 0],
        };
        let (s, d) = (ip.saddr(), ip.daddr());
        udp.check = udp_checksum(as_slice(&s), as_slice(&d), &udp, payload).to_be_bytes();
        UdpFrame {
            eth: EthHdr {
                dst: [2; 6],
                src: [4; 6],
                ether_type: Ip::ETHER_TYPE,
            },
            ip,
            udp,
        }
    }

    fn as_slice<A: IpBytes>(address: &A) -> &[u8] {
        // SAFETY: IpBytes is only implemented for byte arrays.
        unsafe { core::slice::from_raw_parts((address as *const A).cast(), size_of::<A>()) }
    }

    fn channel_header(channel: u16, data: &[u8]) -> ChannelHdr {
        ChannelHdr {
            channel: channel.to_be_bytes(),
            len: (data.len() as u16).to_be_bytes(),
        }
    }

    const CLIENT4: [u8; 4] = [192, 0, 2, 2];
    const RELAY4: [u8; 4] = [203, 0, 113, 10];
    const PEER4: [u8; 4] = [198, 51, 100, 2];
    const CLIENT6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const RELAY6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const PEER6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// Checks a relayed frame against what a sender would build from scratch.
    fn assert_sent<Out: IpHeader>(
        out: &UdpFrame<Out>,
        saddr: Out::Addr,
        daddr: Out::Addr,
        ports: (u16, u16),
        payload: &[u8],
    ) {
        assert_eq!(
            out.eth,
            EthHdr {
                dst: [4; 6],
                src: [2; 6],
                ether_type: Out::ETHER_TYPE
            }
        );
        assert!(
            out.ip.saddr() == saddr && out.ip.daddr() == daddr,
            "addresses"
        );
        assert_eq!(out.ip.hop_limit(), 62, "TTL / hop limit less one");
        assert_eq!(out.udp.source, ports.0.to_be_bytes());
        assert_eq!(out.udp.dest, ports.1.to_be_bytes());
        assert_eq!(
            out.ip.check(&out.udp),
            Ok(UDP_LEN + payload.len()),
            "lengths"
        );
        if Out::LEN == IPV4_LEN {
            assert_eq!(checksum(out.ip.as_bytes()), 0, "IPv4 header checksum");
        }
        let expected = udp_checksum(as_slice(&saddr), as_slice(&daddr), &out.udp, payload);
        assert_eq!(u16::from_be_bytes(out.udp.check), expected, "UDP checksum");
    }

    fn client_to_peer<In, Out>(ip: In, relay_addr: Out::Addr, peer: Out::Addr)
    where
        In: Translate<Out>,
        Out: IpHeader,
    {
        for len in [0usize, 1, 2, 3, 100, 1199] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let channel = channel_header(0x4001, &data);
            let payload = [channel.as_bytes(), &data].concat();
            let udp_len = UDP_LEN + payload.len();
            let mut ip = ip;
            set_udp_len(&mut ip, udp_len);
            let input = frame(ip, 40000, 3478, &payload);
            let route = Relay {
                saddr: relay_addr,
                daddr: peer,
                source: 50000u16.to_be_bytes(),
                dest: 9000u16.to_be_bytes(),
                removed: Some(channel),
                added: None,
                padding: Padding::default(),
            };
            let (out, added) = relay::<In, Out>(&input, udp_len, &route).unwrap();
            assert_eq!(added, None);
            assert_sent(&out, relay_addr, peer, (50000, 9000), &data);
        }
    }

    fn peer_to_client<In, Out>(ip: In, relay_addr: Out::Addr, client: Out::Addr)
    where
        In: Translate<Out>,
        Out: IpHeader,
    {
        for len in [0usize, 1, 2, 3, 100, 1199] {
            let data: Vec<u8> = (0..len).map(|i| (i * 5 + 1) as u8).collect();
            let udp_len = UDP_LEN + data.len();
            let mut ip = ip;
            set_udp_len(&mut ip, udp_len);
            let input = frame(ip, 9000, 50000, &data);
            let route = Relay {
                saddr: relay_addr,
                daddr: client,
                source: 3478u16.to_be_bytes(),
                dest: 40000u16.to_be_bytes(),
                removed: None,
                added: Some([0x40, 0x07]),
                padding: Padding::default(),
            };
            let (out, added) = relay::<In, Out>(&input, udp_len, &route).unwrap();
            let added = added.unwrap();
            assert_eq!(added, channel_header(0x4007, &data));
            let payload = [added.as_bytes(), &data].concat();
            assert_sent(&out, relay_addr, client, (3478, 40000), &payload);
        }
    }

    fn set_udp_len<Ip: IpHeader>(ip: &mut Ip, udp_len: usize) {
        // Rebuild with the right length and a fresh header checksum.
        let bytes = ip.as_bytes().to_vec();
        if Ip::LEN == IPV4_LEN {
            let old = Ipv4Hdr::from_bytes(&bytes).unwrap();
            let new = v4_header(old.saddr, old.daddr, udp_len);
            *ip = Ip::from_bytes(new.as_bytes()).unwrap();
        } else {
            let old = Ipv6Hdr::from_bytes(&bytes).unwrap();
            let new = v6_header(old.saddr, old.daddr, udp_len);
            *ip = Ip::from_bytes(new.as_bytes()).unwrap();
        }
    }

    #[test]
    fn client_to_peer_every_family_pair() {
        client_to_peer::<Ipv4Hdr, Ipv4Hdr>(v4_header(CLIENT4, RELAY4, 0), RELAY4, PEER4);
        client_to_peer::<Ipv4Hdr, Ipv6Hdr>(v4_header(CLIENT4, RELAY4, 0), RELAY6, PEER6);
        client_to_peer::<Ipv6Hdr, Ipv4Hdr>(v6_header(CLIENT6, RELAY6, 0), RELAY4, PEER4);
        client_to_peer::<Ipv6Hdr, Ipv6Hdr>(v6_header(CLIENT6, RELAY6, 0), RELAY6, PEER6);
    }

    #[test]
    fn peer_to_client_every_family_pair() {
        peer_to_client::<Ipv4Hdr, Ipv4Hdr>(v4_header(PEER4, RELAY4, 0), RELAY4, CLIENT4);
        peer_to_client::<Ipv4Hdr, Ipv6Hdr>(v4_header(PEER4, RELAY4, 0), RELAY6, CLIENT6);
        peer_to_client::<Ipv6Hdr, Ipv4Hdr>(v6_header(PEER6, RELAY6, 0), RELAY4, CLIENT4);
        peer_to_client::<Ipv6Hdr, Ipv6Hdr>(v6_header(PEER6, RELAY6, 0), RELAY6, CLIENT6);
    }

    #[test]
    fn hairpin_replaces_the_channel_header() {
        let data = b"between two allocations";
        let channel = channel_header(0x4001, data);
        let payload = [channel.as_bytes(), &data[..]].concat();
        let udp_len = UDP_LEN + payload.len();
        let input = frame(v4_header(CLIENT4, RELAY4, udp_len), 40000, 3478, &payload);
        let other_client = [192, 0, 2, 3];
        let route = Relay {
            saddr: RELAY4,
            daddr: other_client,
            source: 3478u16.to_be_bytes(),
            dest: 40001u16.to_be_bytes(),
            removed: Some(channel),
            added: Some([0x40, 0x09]),
            padding: Padding::default(),
        };
        let (out, added) = relay::<Ipv4Hdr, Ipv4Hdr>(&input, udp_len, &route).unwrap();
        let added = added.unwrap();
        assert_eq!(added, channel_header(0x4009, data));
        let out_payload = [added.as_bytes(), &data[..]].concat();
        assert_sent(&out, RELAY4, other_client, (3478, 40001), &out_payload);
    }

    #[test]
    fn same_family_keeps_what_the_sender_set_and_cross_family_maps_it() {
        let data = b"x";
        let channel = channel_header(0x4001, data);
        let payload = [channel.as_bytes(), &data[..]].concat();
        let udp_len = UDP_LEN + payload.len();
        let route4 = |removed| Relay {
            saddr: RELAY4,
            daddr: PEER4,
            source: [0xc3, 0x50],
            dest: [0x23, 0x28],
            removed,
            added: None,
            padding: Padding::default(),
        };
        let input = frame(v4_header(CLIENT4, RELAY4, udp_len), 40000, 3478, &payload);
        let (out, _) = relay::<Ipv4Hdr, Ipv4Hdr>(&input, udp_len, &route4(Some(channel))).unwrap();
        assert_eq!(
            (out.ip.tos, out.ip.id, out.ip.frag_off),
            (0xb8, [0x12, 0x34], [0x40, 0])
        );

        let input6 = frame(v6_header(CLIENT6, RELAY6, udp_len), 40000, 3478, &payload);
        let (out, _) = relay::<Ipv6Hdr, Ipv4Hdr>(&input6, udp_len, &route4(Some(channel))).unwrap();
        assert_eq!(out.ip.tos, 0xb8, "traffic class becomes TOS");
        assert_eq!(out.ip.frag_off, [0x40, 0], "DF");

        let route6 = Relay {
            saddr: RELAY6,
            daddr: PEER6,
            source: [0xc3, 0x50],
            dest: [0x23, 0x28],
            removed: Some(channel),
            added: None,
            padding: Padding::default(),
        };
        let (out, _) = relay::<Ipv6Hdr, Ipv6Hdr>(&input6, udp_len, &route6).unwrap();
        assert_eq!(
            out.ip.vtc_flow,
            [0x6b, 0x80, 0x12, 0x34],
            "class and flow label kept"
        );
        let (out, _) = relay::<Ipv4Hdr, Ipv6Hdr>(&input, udp_len, &route6).unwrap();
        assert_eq!(
            out.ip.vtc_flow,
            [0x6b, 0x80, 0, 0],
            "TOS becomes the traffic class"
        );
    }

    #[test]
    fn zero_udp_checksum_stays_zero_on_ipv4_and_is_refused_for_ipv6() {
        let data = b"no checksum";
        let channel = channel_header(0x4001, data);
        let payload = [channel.as_bytes(), &data[..]].concat();
        let udp_len = UDP_LEN + payload.len();
        let mut input = frame(v4_header(CLIENT4, RELAY4, udp_len), 40000, 3478, &payload);
        input.udp.check = [0, 0];
        let route4 = Relay {
            saddr: RELAY4,
            daddr: PEER4,
            source: [0xc3, 0x50],
            dest: [0x23, 0x28],
            removed: Some(channel),
            added: None,
            padding: Padding::default(),
        };
        let (out, _) = relay::<Ipv4Hdr, Ipv4Hdr>(&input, udp_len, &route4).unwrap();
        assert_eq!(out.udp.check, [0, 0]);
        assert_eq!(checksum(out.ip.as_bytes()), 0);
        let route6 = Relay {
            saddr: RELAY6,
            daddr: PEER6,
            ..route4_as_v6(route4)
        };
        assert_eq!(
            relay::<Ipv4Hdr, Ipv6Hdr>(&input, udp_len, &route6).unwrap_err(),
            Reason::PassZeroChecksumToIpv6
        );
    }

    fn route4_as_v6(route: Relay<[u8; 4]>) -> Relay<[u8; 16]> {
        Relay {
            saddr: [0; 16],
            daddr: [0; 16],
            source: route.source,
            dest: route.dest,
            removed: route.removed,
            added: route.added,
            padding: route.padding,
        }
    }

    #[test]
    fn a_bad_ipv4_header_checksum_is_kept_or_refused_never_repaired() {
        let payload = [0x40, 1, 0, 1, 0xaa];
        let mut input = frame(
            v4_header(CLIENT4, RELAY4, UDP_LEN + 5),
            40000,
            3478,
            &payload,
        );
        input.ip.check[1] ^= 1;
        let channel = ChannelHdr {
            channel: [0x40, 1],
            len: [0, 1],
        };
        let route4 = Relay {
            saddr: RELAY4,
            daddr: PEER4,
            source: [0xc3, 0x50],
            dest: [0x23, 0x28],
            removed: Some(channel),
            added: None,
            padding: Padding::default(),
        };
        let (out, _) = relay::<Ipv4Hdr, Ipv4Hdr>(&input, UDP_LEN + 5, &route4).unwrap();
        assert_ne!(
            checksum(out.ip.as_bytes()),
            0,
            "still wrong for the next hop"
        );
        let route6 = Relay {
            saddr: RELAY6,
            daddr: PEER6,
            ..route4_as_v6(route4)
        };
        assert_eq!(
            relay::<Ipv4Hdr, Ipv6Hdr>(&input, UDP_LEN + 5, &route6).unwrap_err(),
            Reason::PassBadHeaderChecksum
        );
    }

    #[test]
    fn padding_leaves_the_relayed_datagram() {
        for len in [1usize, 2, 3, 5, 6, 7, 99] {
            let data: Vec<u8> = (0..len).map(|i| (i * 11 + 5) as u8).collect();
            let pad = (4 - len % 4) % 4;
            let pad_bytes = [0xa5u8, 0x5a, 0xff];
            let padding = Padding {
                bytes: pad_bytes,
                len: pad as u8,
            };
            let channel = channel_header(0x4001, &data);
            let payload = [channel.as_bytes(), &data, &pad_bytes[..pad]].concat();
            let udp_len = UDP_LEN + payload.len();
            let input = frame(v4_header(CLIENT4, RELAY4, udp_len), 40000, 3478, &payload);
            let to_peer = Relay {
                saddr: RELAY6,
                daddr: PEER6,
                source: 50000u16.to_be_bytes(),
                dest: 9000u16.to_be_bytes(),
                removed: Some(channel),
                added: None,
                padding,
            };
            let (out, _) = relay::<Ipv4Hdr, Ipv6Hdr>(&input, udp_len, &to_peer).unwrap();
            assert_sent(&out, RELAY6, PEER6, (50000, 9000), &data);
            // The hairpin: padding off, a new ChannelData header on.
            let other = [192, 0, 2, 3];
            let hairpin = Relay {
                saddr: RELAY4,
                daddr: other,
                source: 3478u16.to_be_bytes(),
                dest: 40001u16.to_be_bytes(),
                removed: Some(channel),
                added: Some([0x40, 0x09]),
                padding,
            };
            let (out, added) = relay::<Ipv4Hdr, Ipv4Hdr>(&input, udp_len, &hairpin).unwrap();
            let added = added.unwrap();
            assert_eq!(added, channel_header(0x4009, &data));
            assert_sent(
                &out,
                RELAY4,
                other,
                (3478, 40001),
                &[added.as_bytes(), &data].concat(),
            );
        }
    }

    #[test]
    fn dont_fragment_sets_df_and_keeps_the_header_checksum() {
        for (frag_off, tos, id) in [
            ([0, 0], 0xb8, [0x12, 0x34]),
            ([0, 0], 0, [0xff, 0xff]),
            ([0x40, 0], 0xb8, [0x12, 0x34]),
            ([0x80, 0], 0x03, [0, 0]),
        ] {
            let mut ip = Ipv4Hdr {
                frag_off,
                tos,
                id,
                check: [0, 0],
                ..v4_header(RELAY4, PEER4, 100)
            };
            ip.check = checksum(ip.as_bytes()).to_be_bytes();
            let before = ip;
            ip.set_dont_fragment();
            assert_eq!(
                ip.frag_off,
                [frag_off[0] | 0x40, frag_off[1]],
                "DF set, the rest kept"
            );
            assert_eq!(checksum(ip.as_bytes()), 0, "header checksum");
            assert_eq!(
                Ipv4Hdr {
                    frag_off: before.frag_off,
                    check: before.check,
                    ..ip
                },
                before,
                "nothing else changes"
            );
            if frag_off[0] & 0x40 != 0 {
                assert_eq!(ip, before, "already set: untouched");
            }
        }
        // A wrong checksum stays wrong, for the next hop to catch.
        let mut bad = v4_header(RELAY4, PEER4, 100);
        bad.frag_off = [0, 0];
        bad.check = [0, 0];
        bad.check = (checksum(bad.as_bytes()) ^ 1).to_be_bytes();
        bad.set_dont_fragment();
        assert_ne!(checksum(bad.as_bytes()), 0);
        // IPv6 has no such bit.
        let mut v6 = v6_header(RELAY6, PEER6, 100);
        let before = v6;
        v6.set_dont_fragment();
        assert_eq!(v6, before);
    }

    #[test]
    fn expiring_ttl_is_left_to_the_stack() {
        let mut input = frame(
            v4_header(CLIENT4, RELAY4, UDP_LEN + 4),
            40000,
            3478,
            &[0x40, 1, 0, 0],
        );
        input.ip.ttl = 1;
        let route = Relay {
            saddr: RELAY4,
            daddr: PEER4,
            source: [0xc3, 0x50],
            dest: [0x23, 0x28],
            removed: Some(channel_header(0x4001, &[])),
            added: None,
            padding: Padding::default(),
        };
        assert_eq!(
            relay::<Ipv4Hdr, Ipv4Hdr>(&input, UDP_LEN + 4, &route).unwrap_err(),
            Reason::PassTtlExpired
        );
    }

    #[test]
    fn headers_are_checked_before_relaying() {
        let udp = UdpHdr {
            source: [0, 1],
            dest: [0, 2],
            len: [0, 12],
            check: [1, 1],
        };
        let good = v4_header(CLIENT4, RELAY4, 12);
        assert_eq!(good.check(&udp), Ok(12));
        assert_eq!(
            Ipv4Hdr {
                version_ihl: 0x46,
                ..good
            }
            .check(&udp),
            Err(Reason::PassIpOptions)
        );
        assert_eq!(
            Ipv4Hdr {
                frag_off: [0x20, 0],
                ..good
            }
            .check(&udp),
            Err(Reason::PassFragment)
        );
        assert_eq!(
            Ipv4Hdr {
                frag_off: [0, 1],
                ..good
            }
            .check(&udp),
            Err(Reason::PassFragment)
        );
        assert_eq!(
            Ipv4Hdr {
                protocol: 6,
                ..good
            }
            .check(&udp),
            Err(Reason::PassNotUdp)
        );
        assert_eq!(
            Ipv4Hdr {
                tot_len: [0, 31],
                ..good
            }
            .check(&udp),
            Err(Reason::PassTruncated)
        );

        let good6 = v6_header(CLIENT6, RELAY6, 12);
        assert_eq!(good6.check(&udp), Ok(12));
        assert_eq!(
            Ipv6Hdr {
                next_header: 44,
                ..good6
            }
            .check(&udp),
            Err(Reason::PassFragment)
        );
        for ext in [0, 43, 60] {
            assert_eq!(
                Ipv6Hdr {
                    next_header: ext,
                    ..good6
                }
                .check(&udp),
                Err(Reason::PassIpv6ExtensionHeaders)
            );
        }
        assert_eq!(
            Ipv6Hdr {
                next_header: 58,
                ..good6
            }
            .check(&udp),
            Err(Reason::PassNotUdp)
        );
        assert_eq!(
            good6.check(&UdpHdr {
                check: [0, 0],
                ..udp
            }),
            Err(Reason::PassZeroChecksumIpv6)
        );
        assert_eq!(
            Ipv6Hdr {
                payload_len: [0, 0],
                ..good6
            }
            .check(&udp),
            Err(Reason::PassTruncated)
        );
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
        // Reserved by RFC 8656, valid in RFC 5766 and still used by its clients.
        assert!(
            ChannelHdr {
                channel: [0x7f, 0xff],
                len: [0, 0]
            }
            .is_channel_data()
        );
        assert!(
            !ChannelHdr {
                channel: [0x80, 0x00],
                len: [0, 0]
            }
            .is_channel_data()
        );
    }
}
