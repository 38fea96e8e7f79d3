//! The one definition of every type that crosses the kernel/user boundary.
//!
//! The XDP program (`bpf/xdp`, built for `bpfel-unknown-none`) and `xdp-agent`
//! (built for the host) both use these types, so a key written by the agent is
//! byte for byte the key the program builds from a packet.
//!
//! Every multi-byte field is a big-endian byte array, exactly as it appears on
//! the wire: the program copies header bytes into keys without swapping, and
//! the host never reinterprets a network-order integer as a native one. Every
//! type has alignment 1 and no implicit padding, so [`Pod::as_bytes`] is the
//! exact image of a map key or value.
#![cfg_attr(not(test), no_std)]

use core::net::Ipv4Addr;

pub mod csum;
pub mod packet;

/// Most channel bindings each direction map holds. 65 536 bindings of
/// `ClientKeyV4 -> PeerTarget` cost about 6.5 MiB of preallocated kernel memory.
pub const MAX_BINDINGS: u32 = 65_536;

/// `DataPlaneConfig::flags`: nothing is relayed unless this bit is set, so a
/// zeroed configuration passes every packet to user space.
pub const CONFIG_ENABLED: u8 = 1 << 0;

/// Address family tag in map values (`AF_INET`).
pub const FAMILY_V4: u8 = 4;
/// Address family tag in map values (`AF_INET6`).
pub const FAMILY_V6: u8 = 6;

/// Plain old data: a `#[repr(C)]` type of byte arrays with alignment 1.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only `u8` and arrays of `u8`
/// (so any bit pattern is valid and there is no padding), and have alignment 1.
pub unsafe trait Pod: Copy + Sized {
    /// The type's bytes, as stored in a BPF map.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the trait's contract says `Self` is `size_of::<Self>()` initialised
        // bytes with no padding.
        unsafe { core::slice::from_raw_parts((self as *const Self).cast(), size_of::<Self>()) }
    }

    /// Reads a value from a map's bytes; `None` if the length differs.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: the length matches, alignment is 1 and every bit pattern is valid.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) })
    }
}

/// Data-plane configuration, written by the agent into the one-entry `CONFIG`
/// array. All zero means "relay nothing".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPlaneConfig {
    /// Bit set of `CONFIG_*` flags.
    pub flags: u8,
    /// Reserved, zero.
    pub reserved: u8,
    /// The TURN listen port (big-endian) that clients send channel data to.
    pub listen_port: [u8; 2],
    /// Lowest allocation (relay) port, big-endian, inclusive.
    pub port_min: [u8; 2],
    /// Highest allocation (relay) port, big-endian, inclusive.
    pub port_max: [u8; 2],
    /// The relay's IPv4 address: traffic to any other address is passed, and
    /// relayed IPv4 datagrams leave from it.
    pub relay_v4: [u8; 4],
    /// The relay's IPv6 address (all zero when it has none).
    pub relay_v6: [u8; 16],
}

impl DataPlaneConfig {
    /// A configuration that relays for one IPv4 address.
    pub fn new(listen_port: u16, ports: (u16, u16), relay_v4: Ipv4Addr) -> Self {
        Self {
            flags: CONFIG_ENABLED,
            reserved: 0,
            listen_port: listen_port.to_be_bytes(),
            port_min: ports.0.to_be_bytes(),
            port_max: ports.1.to_be_bytes(),
            relay_v4: relay_v4.octets(),
            relay_v6: [0; 16],
        }
    }

    /// Whether the data plane should relay at all.
    #[inline(always)]
    pub fn enabled(&self) -> bool {
        self.flags & CONFIG_ENABLED != 0
    }

    /// Whether `port` (host order) lies in the allocation port range.
    #[inline(always)]
    pub fn is_allocation_port(&self, port: u16) -> bool {
        let (min, max) = (
            u16::from_be_bytes(self.port_min),
            u16::from_be_bytes(self.port_max),
        );
        min <= port && port <= max
    }
}

// SAFETY: repr(C), u8 fields only.
unsafe impl Pod for DataPlaneConfig {}

/// Key of `CLIENT_V4`: an IPv4 client's transport address and the channel it
/// sends on, as they appear in its channel-data packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKeyV4 {
    /// Client IPv4 address (the packet's source).
    pub client_ip: [u8; 4],
    /// Client UDP port (the packet's source port).
    pub client_port: [u8; 2],
    /// Channel number, 0x4000-0x4FFF (RFC 8656 section 12).
    pub channel: [u8; 2],
}

// SAFETY: repr(C), u8 fields only.
unsafe impl Pod for ClientKeyV4 {}

/// Value of the client-side maps: where the channel's data goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerTarget {
    /// Peer address; an IPv4 peer uses the first four bytes, the rest zero.
    pub peer_ip: [u8; 16],
    /// Peer UDP port, big-endian.
    pub peer_port: [u8; 2],
    /// The allocation's relay port, big-endian: the datagram's source port.
    pub allocation_port: [u8; 2],
    /// `FAMILY_V4` or `FAMILY_V6`: the peer's address family.
    pub peer_family: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
}

impl PeerTarget {
    /// A target for an IPv4 peer.
    pub fn v4(peer_ip: Ipv4Addr, peer_port: u16, allocation_port: u16) -> Self {
        let mut ip = [0; 16];
        ip[..4].copy_from_slice(&peer_ip.octets());
        Self {
            peer_ip: ip,
            peer_port: peer_port.to_be_bytes(),
            allocation_port: allocation_port.to_be_bytes(),
            peer_family: FAMILY_V4,
            reserved: [0; 3],
        }
    }

    /// The IPv4 peer's address bytes.
    #[inline(always)]
    pub fn peer_v4(&self) -> [u8; 4] {
        [
            self.peer_ip[0],
            self.peer_ip[1],
            self.peer_ip[2],
            self.peer_ip[3],
        ]
    }
}

// SAFETY: repr(C), u8 fields only.
unsafe impl Pod for PeerTarget {}

/// Why the program returned the verdict it did: the index into the per-CPU
/// `STATS` array. Every verdict has exactly one reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Relayed: IPv4 client channel-data became UDP to an IPv4 peer.
    RelayClientToPeerV4V4 = 0,
    /// Passed: the configuration is unset or disabled.
    PassNotConfigured,
    /// Passed: the frame is too short for the headers it claims.
    PassTruncated,
    /// Passed: neither IPv4 nor IPv6 (ARP, VLAN tags, ...).
    PassNotIp,
    /// Passed: IPv6, not handled by this program version.
    PassIpv6,
    /// Passed: not UDP.
    PassNotUdp,
    /// Passed: IPv4 header with options (IHL > 5): rare, left to the stack.
    PassIpOptions,
    /// Passed: an IP fragment; the stack reassembles it.
    PassFragment,
    /// Passed: the TTL would reach zero; the stack answers with ICMP.
    PassTtlExpired,
    /// Passed: not addressed to the relay address and a relayed port.
    PassNotForRelay,
    /// Passed: a STUN message or anything else that is not channel data.
    PassNotChannelData,
    /// Passed: channel data followed by padding or trailing bytes, which the
    /// user-space path strips (RFC 8656 section 12.5 allows padding over UDP).
    PassChannelDataPadded,
    /// Passed: no binding for this client and channel.
    PassUnknownBinding,
    /// Passed: a binding whose address family this program version cannot relay.
    PassUnsupportedFamily,
    /// Passed: growing or shrinking the frame failed.
    PassAdjustFailed,
    /// Dropped: channel data whose length field exceeds the datagram
    /// (RFC 8656 section 12.6: silently discarded).
    DropChannelDataTruncated,
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::RelayClientToPeerV4V4,
        Reason::PassNotConfigured,
        Reason::PassTruncated,
        Reason::PassNotIp,
        Reason::PassIpv6,
        Reason::PassNotUdp,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassTtlExpired,
        Reason::PassNotForRelay,
        Reason::PassNotChannelData,
        Reason::PassChannelDataPadded,
        Reason::PassUnknownBinding,
        Reason::PassUnsupportedFamily,
        Reason::PassAdjustFailed,
        Reason::DropChannelDataTruncated,
    ];

    /// The verdict this reason stands for.
    pub const fn verdict(self) -> Verdict {
        match self {
            Reason::RelayClientToPeerV4V4 => Verdict::Tx,
            Reason::DropChannelDataTruncated => Verdict::Drop,
            _ => Verdict::Pass,
        }
    }

    /// A stable snake_case name for metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::RelayClientToPeerV4V4 => "relay_client_to_peer_v4_v4",
            Reason::PassNotConfigured => "pass_not_configured",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassIpv6 => "pass_ipv6",
            Reason::PassNotUdp => "pass_not_udp",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::PassTtlExpired => "pass_ttl_expired",
            Reason::PassNotForRelay => "pass_not_for_relay",
            Reason::PassNotChannelData => "pass_not_channel_data",
            Reason::PassChannelDataPadded => "pass_channel_data_padded",
            Reason::PassUnknownBinding => "pass_unknown_binding",
            Reason::PassUnsupportedFamily => "pass_unsupported_family",
            Reason::PassAdjustFailed => "pass_adjust_failed",
            Reason::DropChannelDataTruncated => "drop_channel_data_truncated",
        }
    }
}

/// Number of [`Reason`]s: the size of the `STATS` array.
pub const REASON_COUNT: u32 = Reason::DropChannelDataTruncated as u32 + 1;

/// What the program did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Rewritten and sent back out of the interface (`XDP_TX`).
    Tx,
    /// Handed to the kernel's stack (`XDP_PASS`).
    Pass,
    /// Discarded (`XDP_DROP`).
    Drop,
}

/// One per-CPU slot of `STATS`: packets and bytes for one [`Reason`].
///
/// For relay reasons `bytes` counts application data (the channel-data
/// payload), the figure a user-space relay reports for the same traffic; for
/// the others it counts whole frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Frames.
    pub packets: u64,
    /// Bytes, see the type's documentation.
    pub bytes: u64,
}

impl Counter {
    /// Reads a counter from a per-CPU value's bytes (native endian, as the
    /// kernel stores it); `None` if the length differs.
    pub fn from_ne_bytes(bytes: &[u8]) -> Option<Self> {
        let packets = u64::from_ne_bytes(bytes.get(0..8)?.try_into().ok()?);
        let bytes_field = u64::from_ne_bytes(bytes.get(8..16)?.try_into().ok()?);
        (bytes.len() == 16).then_some(Self {
            packets,
            bytes: bytes_field,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn layouts_match_the_kernel_view() {
        assert_eq!(size_of::<DataPlaneConfig>(), 28);
        assert_eq!(offset_of!(DataPlaneConfig, listen_port), 2);
        assert_eq!(offset_of!(DataPlaneConfig, relay_v4), 8);
        assert_eq!(offset_of!(DataPlaneConfig, relay_v6), 12);
        assert_eq!(size_of::<ClientKeyV4>(), 8);
        assert_eq!(offset_of!(ClientKeyV4, channel), 6);
        assert_eq!(size_of::<PeerTarget>(), 24);
        assert_eq!(offset_of!(PeerTarget, peer_port), 16);
        assert_eq!(offset_of!(PeerTarget, allocation_port), 18);
        assert_eq!(offset_of!(PeerTarget, peer_family), 20);
        assert_eq!(size_of::<Counter>(), 16);
        for align in [
            align_of::<DataPlaneConfig>(),
            align_of::<ClientKeyV4>(),
            align_of::<PeerTarget>(),
        ] {
            assert_eq!(align, 1);
        }
    }

    #[test]
    fn fields_are_big_endian_wire_bytes() {
        let config = DataPlaneConfig::new(3478, (49152, 65535), Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(config.listen_port, [0x0d, 0x96]);
        assert_eq!(config.as_bytes()[2..4], [0x0d, 0x96]);
        assert_eq!(config.as_bytes()[8..12], [203, 0, 113, 1]);
        assert!(config.enabled());
        assert!(config.is_allocation_port(49152) && config.is_allocation_port(65535));
        assert!(!config.is_allocation_port(3478));

        let target = PeerTarget::v4(Ipv4Addr::new(198, 51, 100, 7), 9000, 50001);
        assert_eq!(target.as_bytes()[..4], [198, 51, 100, 7]);
        assert_eq!(target.as_bytes()[16..18], 9000u16.to_be_bytes());
        assert_eq!(target.as_bytes()[18..20], 50001u16.to_be_bytes());
        assert_eq!(target.peer_v4(), [198, 51, 100, 7]);
    }

    #[test]
    fn zeroed_configuration_relays_nothing() {
        assert!(!DataPlaneConfig::default().enabled());
    }

    #[test]
    fn bytes_round_trip() {
        let key = ClientKeyV4 {
            client_ip: [192, 0, 2, 10],
            client_port: [0x30, 0x39],
            channel: [0x40, 0x01],
        };
        assert_eq!(ClientKeyV4::from_bytes(key.as_bytes()), Some(key));
        assert_eq!(ClientKeyV4::from_bytes(&[0; 7]), None);
    }

    #[test]
    fn reasons_are_indexed_in_order_with_unique_names() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index);
            for other in &Reason::ALL[index + 1..] {
                assert_ne!(reason.name(), other.name());
            }
        }
        assert_eq!(Reason::RelayClientToPeerV4V4.verdict(), Verdict::Tx);
        assert_eq!(Reason::DropChannelDataTruncated.verdict(), Verdict::Drop);
        assert_eq!(Reason::PassUnknownBinding.verdict(), Verdict::Pass);
    }

    #[test]
    fn counter_reads_native_endian() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&3u64.to_ne_bytes());
        raw[8..].copy_from_slice(&300u64.to_ne_bytes());
        assert_eq!(
            Counter::from_ne_bytes(&raw),
            Some(Counter {
                packets: 3,
                bytes: 300
            })
        );
        assert_eq!(Counter::from_ne_bytes(&raw[..15]), None);
    }
}
