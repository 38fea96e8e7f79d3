//! The one definition of every type that crosses the kernel/user boundary.
//!
//! The XDP program (`bpf/xdp`, built for `bpfel-unknown-none`) and `xdp-agent`
//! (built for the host) both use these types, so a key written by the agent is
//! byte for byte the key the program builds from a packet.
//!
//! Every multi-byte field is a big-endian byte array, exactly as it appears on
//! the wire: the program copies header bytes into keys without swapping, and
//! the host never reinterprets a network-order integer as a native one. The
//! one exception is a binding's expiry, a time on the kernel's clock that
//! never touches the wire, held as a native `u64`. No type has implicit
//! padding, so [`Pod::as_bytes`] is the exact image of a map key or value.
#![cfg_attr(not(test), no_std)]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub mod csum;
mod entries;
pub mod packet;
pub mod usage;

pub use entries::{BindingFields, MapKey};
pub use usage::{BindingUsage, Meter};

/// Most channel bindings each direction map holds. 65 536 bindings of
/// `ClientKeyV4 -> PeerTarget` cost about 6.5 MiB of preallocated kernel memory.
pub const MAX_BINDINGS: u32 = 65_536;

/// `KernelConfig::flags`: nothing is relayed unless this bit is set, so a
/// zeroed configuration passes every packet to user space.
pub const CONFIG_ENABLED: u8 = 1 << 0;

/// `KernelConfig::flags`: make header room by growing or shrinking the
/// frame's tail and moving the payload, for drivers that leave no headroom in
/// front of the frame (`bpf_xdp_adjust_head` fails there).
pub const CONFIG_TAIL_ADJUST: u8 = 1 << 1;

/// By default each CPU reports its relayed traffic of a reason every 4096
/// packets of it: a report can wake the reader through an inter-processor
/// interrupt, which costs microseconds (tens of them in a VM); every 64
/// packets, that nearly tripled the program's time per packet in the
/// benchmark.
pub const DEFAULT_EVENT_INTERVAL_LOG2: u8 = 12;

/// `KernelConfig::flags`: send relayed frames back to the MAC address they
/// came from instead of looking up the next hop in the kernel's FIB, for
/// hosts whose every path goes through one gateway. Saves the lookup; wrong
/// for a client or peer on the relay's own segment or behind another router.
pub const CONFIG_MAC_SWAP: u8 = 1 << 2;

/// Most distinct listener ports the kernel recognises client channel data on.
pub const MAX_LISTEN_PORTS: usize = 8;

/// Most interfaces a relayed frame may leave through (`EGRESS` device map).
pub const MAX_INTERFACES: u32 = 64;

/// Address family tag in map values (`AF_INET`).
pub const FAMILY_V4: u8 = 4;
/// Address family tag in map values (`AF_INET6`).
pub const FAMILY_V6: u8 = 6;

/// Plain old data: a `#[repr(C)]` type of byte arrays. Its alignment may be
/// raised (`align(N)`) where its size and fields allow it without padding, so
/// that the BPF backend, which has no misaligned access, moves whole words
/// instead of single bytes; `from_bytes` reads at any alignment.
///
/// # Safety
/// Implementors must be `#[repr(C)]` and contain only `u8`, arrays of `u8`,
/// `u32` and `u64` (and arrays of them) at their natural alignment and other `Pod` types, with no padding (so any bit pattern is valid and every
/// byte is initialised).
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
        // SAFETY: the length matches, the read is unaligned and every bit pattern is valid.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) })
    }
}

/// The kernel's configuration: the image of the program's one-entry `CONFIG`
/// array, written by the agent (not the gRPC `DataPlaneConfig`, which the
/// agent turns into this). All zero means "relay nothing".
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// Bit set of `CONFIG_*` flags.
    pub flags: u8,
    /// Each CPU reports its relayed traffic through the perf-event array
    /// every `1 << event_interval_log2` relayed packets.
    pub event_interval_log2: u8,
    /// Lowest allocation (relay) port, big-endian, inclusive.
    pub port_min: [u8; 2],
    /// Highest allocation (relay) port, big-endian, inclusive.
    pub port_max: [u8; 2],
    /// The ports of turn-control's listeners (big-endian; zero: unused
    /// slot): channel data to one of them is looked up in the client maps,
    /// whose keys hold the listener's address and port.
    pub listen_ports: [[u8; 2]; MAX_LISTEN_PORTS],
    /// Reserved, zero.
    pub reserved: [u8; 2],
    /// The relay's IPv4 address: traffic to any other address is passed, and
    /// relayed IPv4 datagrams leave from it.
    pub relay_ipv4: [u8; 4],
    /// The relay's IPv6 address (all zero when it has none).
    pub relay_ipv6: [u8; 16],
}

impl KernelConfig {
    /// An enabled configuration; a family without a relay address is not
    /// relayed in the kernel.
    /// Listener ports beyond [`MAX_LISTEN_PORTS`] and port zero are ignored
    /// (the agent refuses such a configuration before it gets here).
    pub fn new(
        listen_ports: &[u16],
        ports: (u16, u16),
        relay_ipv4: Option<Ipv4Addr>,
        relay_ipv6: Option<Ipv6Addr>,
    ) -> Self {
        let mut slots = [[0; 2]; MAX_LISTEN_PORTS];
        for (slot, port) in slots.iter_mut().zip(listen_ports) {
            *slot = port.to_be_bytes();
        }
        Self {
            flags: CONFIG_ENABLED,
            event_interval_log2: DEFAULT_EVENT_INTERVAL_LOG2,
            port_min: ports.0.to_be_bytes(),
            port_max: ports.1.to_be_bytes(),
            listen_ports: slots,
            reserved: [0; 2],
            relay_ipv4: relay_ipv4.map_or([0; 4], |ip| ip.octets()),
            relay_ipv6: relay_ipv6.map_or([0; 16], |ip| ip.octets()),
        }
    }

    /// The same configuration with next hops found by MAC swap (on) or by
    /// FIB lookup (off, the default).
    pub fn with_mac_swap(mut self, on: bool) -> Self {
        if on {
            self.flags |= CONFIG_MAC_SWAP;
        } else {
            self.flags &= !CONFIG_MAC_SWAP;
        }
        self
    }

    /// Whether next hops come from MAC swap (see [`CONFIG_MAC_SWAP`]).
    #[inline(always)]
    pub fn mac_swap(&self) -> bool {
        self.flags & CONFIG_MAC_SWAP != 0
    }

    /// Whether `port` (big-endian, as in the packet) is a listener's port.
    #[inline(always)]
    pub fn is_listen_port(&self, port: [u8; 2]) -> bool {
        if port == [0, 0] {
            return false;
        }
        let mut i = 0;
        while i < MAX_LISTEN_PORTS {
            if self.listen_ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }

    /// The same configuration with the tail-adjust header-room mode on or off.
    pub fn with_tail_adjust(mut self, on: bool) -> Self {
        if on {
            self.flags |= CONFIG_TAIL_ADJUST;
        } else {
            self.flags &= !CONFIG_TAIL_ADJUST;
        }
        self
    }

    /// Whether header room comes from the tail (see [`CONFIG_TAIL_ADJUST`]).
    #[inline(always)]
    pub fn tail_adjust(&self) -> bool {
        self.flags & CONFIG_TAIL_ADJUST != 0
    }

    /// Whether the data plane should relay at all.
    #[inline(always)]
    pub fn enabled(&self) -> bool {
        self.flags & CONFIG_ENABLED != 0
    }

    /// Whether a CPU that has relayed `packets` packets in all reports now.
    #[inline(always)]
    pub fn event_due(&self, packets: u64) -> bool {
        let mask = (1u64 << (self.event_interval_log2 & 31)) - 1;
        packets & mask == 0
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

// SAFETY: repr(C), u8 fields only, no padding (sizes checked in the tests).
unsafe impl Pod for KernelConfig {}

/// Key of `CLIENT_V4`: an IPv4 client's transport address, the channel it
/// sends on and the listener (server transport address) it sends to, as they
/// appear in its channel-data packet. With the listener in the key, one
/// client socket's allocations on two listeners (a browser shares its UDP
/// socket among TURN servers) are two entries.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKeyV4 {
    /// Client IPv4 address (the packet's source).
    pub client_ip: [u8; 4],
    /// Client UDP port (the packet's source port).
    pub client_port: [u8; 2],
    /// Channel number, 0x4000-0x7FFF (RFC 8656 section 12).
    pub channel: [u8; 2],
    /// The listener's IPv4 address (the packet's destination).
    pub listener_ip: [u8; 4],
    /// The listener's port (the packet's destination port).
    pub listener_port: [u8; 2],
    /// Reserved, zero.
    pub reserved: [u8; 2],
}

/// Key of `CLIENT_V6`: as [`ClientKeyV4`] for an IPv6 client.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKeyV6 {
    /// Client IPv6 address (the packet's source).
    pub client_ip: [u8; 16],
    /// Client UDP port (the packet's source port).
    pub client_port: [u8; 2],
    /// Channel number, 0x4000-0x7FFF.
    pub channel: [u8; 2],
    /// The listener's IPv6 address (the packet's destination).
    pub listener_ip: [u8; 16],
    /// The listener's port (the packet's destination port).
    pub listener_port: [u8; 2],
    /// Reserved, zero.
    pub reserved: [u8; 2],
}

/// Key of `PEER_V4`: an IPv4 peer's transport address and the allocation
/// port it sends to, as they appear in its datagram.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKeyV4 {
    /// Peer IPv4 address (the packet's source).
    pub peer_ip: [u8; 4],
    /// Peer UDP port (the packet's source port).
    pub peer_port: [u8; 2],
    /// The allocation's relay port (the packet's destination port).
    pub allocation_port: [u8; 2],
}

/// Key of `PEER_V6`: as [`PeerKeyV4`] for an IPv6 peer.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKeyV6 {
    /// Peer IPv6 address (the packet's source).
    pub peer_ip: [u8; 16],
    /// Peer UDP port (the packet's source port).
    pub peer_port: [u8; 2],
    /// The allocation's relay port (the packet's destination port).
    pub allocation_port: [u8; 2],
}

/// Value of the client-side maps: where the channel's data goes, and until when.
#[repr(C, align(8))]
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
    /// Bit set of `PEER_*` flags.
    pub flags: u8,
    /// Reserved, zero.
    pub reserved: [u8; 2],
    /// See [`ClientTarget::usage_slot`].
    pub usage_slot: u32,
    /// Reserved, zero.
    pub reserved_terms: u32,
    /// See [`ClientTarget::meters`].
    pub meters: [u64; 2],
    /// See [`ClientTarget::expires_at_ns`].
    pub expires_at_ns: u64,
}

/// Bytes at the end of both kinds of binding value that are the binding's
/// terms, not its identity: its `USAGE` slot, its meters and its expiry. A
/// refresh or a new limit rewrites them and leaves the binding as it is.
pub const TERMS_LEN: usize = 32;

/// `PeerTarget::flags`: the allocation asked for DONT-FRAGMENT (RFC 8656
/// section 7.2), so its IPv4 datagrams to the peer leave with DF set. IPv6
/// datagrams need nothing: routers never fragment them, and the program
/// does not fragment at the source. An entry written before the flag
/// existed has it clear (the byte was reserved, zero).
pub const PEER_DONT_FRAGMENT: u8 = 1 << 0;

impl PeerTarget {
    /// A target for a peer at `peer`, relayed to until `expires_at_ns`,
    /// without flags, counted nowhere, unmetered.
    pub fn new(peer: IpAddr, peer_port: u16, allocation_port: u16, expires_at_ns: u64) -> Self {
        let (peer_ip, peer_family) = ip_bytes(peer);
        Self {
            peer_ip,
            peer_port: peer_port.to_be_bytes(),
            allocation_port: allocation_port.to_be_bytes(),
            peer_family,
            flags: 0,
            reserved: [0; 2],
            usage_slot: 0,
            reserved_terms: 0,
            meters: [0; 2],
            expires_at_ns,
        }
    }

    /// The same target with DONT-FRAGMENT on or off (see [`PEER_DONT_FRAGMENT`]).
    pub fn with_dont_fragment(mut self, on: bool) -> Self {
        if on {
            self.flags |= PEER_DONT_FRAGMENT;
        } else {
            self.flags &= !PEER_DONT_FRAGMENT;
        }
        self
    }

    /// Whether datagrams to the peer leave with DF set (see [`PEER_DONT_FRAGMENT`]).
    #[inline(always)]
    pub fn dont_fragment(&self) -> bool {
        self.flags & PEER_DONT_FRAGMENT != 0
    }

    /// The peer's address.
    pub fn peer(&self) -> Option<IpAddr> {
        bytes_ip(self.peer_family, &self.peer_ip)
    }
}

/// Value of the peer-side maps: which client, on which channel, a peer's
/// datagrams go to, and the listener they leave from: the server transport
/// address the client talks to (RFC 8656 section 12.7), which the client
/// (or its NAT) checks.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientTarget {
    /// Client address; an IPv4 client uses the first four bytes, the rest zero.
    pub client_ip: [u8; 16],
    /// Listener address, of the client's family, laid out as `client_ip`.
    pub listener_ip: [u8; 16],
    /// Client UDP port, big-endian.
    pub client_port: [u8; 2],
    /// Listener UDP port, big-endian.
    pub listener_port: [u8; 2],
    /// Channel number, big-endian.
    pub channel: [u8; 2],
    /// `FAMILY_V4` or `FAMILY_V6`: the client's (and listener's) address family.
    pub client_family: u8,
    /// Reserved, zero.
    pub reserved: u8,
    /// The binding's slot in `USAGE`, the same in both of its entries
    /// (0: not counted), in host byte order.
    pub usage_slot: u32,
    /// Reserved, zero.
    pub reserved_terms: u32,
    /// The `METERS` keys of its allocation's and its user's rate limits
    /// (0: none), the same in both entries; each direction has its own
    /// time in a meter.
    pub meters: [u64; 2],
    /// When the binding's authorisation ends, on the kernel's coarse
    /// monotonic clock (`bpf_ktime_get_coarse_ns`, `CLOCK_MONOTONIC_COARSE`),
    /// in nanoseconds, in host byte order: from then on the program treats
    /// the entry as absent, whether or not anyone deleted it.
    pub expires_at_ns: u64,
}

impl ClientTarget {
    /// A target for a client at `client` that talks to `listener` (of the
    /// same family; the agent checks it), relayed to until `expires_at_ns`.
    pub fn new(client: SocketAddr, listener: SocketAddr, channel: u16, expires_at_ns: u64) -> Self {
        let (client_ip, client_family) = ip_bytes(client.ip());
        let (listener_ip, _) = ip_bytes(listener.ip());
        Self {
            client_ip,
            listener_ip,
            client_port: client.port().to_be_bytes(),
            listener_port: listener.port().to_be_bytes(),
            channel: channel.to_be_bytes(),
            client_family,
            reserved: 0,
            usage_slot: 0,
            reserved_terms: 0,
            meters: [0; 2],
            expires_at_ns,
        }
    }

    /// The client's transport address.
    pub fn client(&self) -> Option<SocketAddr> {
        let ip = bytes_ip(self.client_family, &self.client_ip)?;
        Some(SocketAddr::new(ip, u16::from_be_bytes(self.client_port)))
    }

    /// The listener's transport address.
    pub fn listener(&self) -> Option<SocketAddr> {
        let ip = bytes_ip(self.client_family, &self.listener_ip)?;
        Some(SocketAddr::new(ip, u16::from_be_bytes(self.listener_port)))
    }
}

/// An address as the 16 bytes and family tag of a map value.
fn ip_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

fn bytes_ip(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

// SAFETY: repr(C), u8 fields only, no padding (sizes checked in the tests).
unsafe impl Pod for ClientKeyV4 {}
// SAFETY: repr(C), u8 fields only, no padding (sizes checked in the tests).
unsafe impl Pod for ClientKeyV6 {}
// SAFETY: repr(C), u8 fields only, no padding (sizes checked in the tests).
unsafe impl Pod for PeerKeyV4 {}
// SAFETY: repr(C), u8 fields only, no padding (sizes checked in the tests).
unsafe impl Pod for PeerKeyV6 {}
// SAFETY: repr(C), u8 fields and u32/u64 fields at their natural alignment,
// no padding (sizes and offsets checked in the tests).
unsafe impl Pod for PeerTarget {}
// SAFETY: as for `PeerTarget`.
unsafe impl Pod for ClientTarget {}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, $verdict:ident; )+) => {
        /// Why the program returned the verdict it did: the index into the
        /// per-CPU `STATS` array. Every verdict has exactly one reason.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[$doc])* $variant, )+
        }

        impl Reason {
            /// Every reason, in index order.
            pub const ALL: &'static [Reason] = &[$( Reason::$variant, )+];

            /// The verdict this reason stands for.
            #[inline(always)]
            pub const fn verdict(self) -> Verdict {
                match self {
                    $( Reason::$variant => Verdict::$verdict, )+
                }
            }

            /// A stable snake_case name for metrics and the CLI.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Reason::$variant => $name, )+
                }
            }
        }
    };
}

reasons! {
    /// Relayed: IPv4 client channel data became UDP to an IPv4 peer.
    RelayClientToPeerV4V4 => "relay_client_to_peer_v4_v4", Tx;
    /// Relayed: IPv4 client channel data became UDP to an IPv6 peer.
    RelayClientToPeerV4V6 => "relay_client_to_peer_v4_v6", Tx;
    /// Relayed: IPv6 client channel data became UDP to an IPv4 peer.
    RelayClientToPeerV6V4 => "relay_client_to_peer_v6_v4", Tx;
    /// Relayed: IPv6 client channel data became UDP to an IPv6 peer.
    RelayClientToPeerV6V6 => "relay_client_to_peer_v6_v6", Tx;
    /// Relayed: UDP from an IPv4 peer became channel data to an IPv4 client.
    RelayPeerToClientV4V4 => "relay_peer_to_client_v4_v4", Tx;
    /// Relayed: UDP from an IPv4 peer became channel data to an IPv6 client.
    RelayPeerToClientV4V6 => "relay_peer_to_client_v4_v6", Tx;
    /// Relayed: UDP from an IPv6 peer became channel data to an IPv4 client.
    RelayPeerToClientV6V4 => "relay_peer_to_client_v6_v4", Tx;
    /// Relayed: UDP from an IPv6 peer became channel data to an IPv6 client.
    RelayPeerToClientV6V6 => "relay_peer_to_client_v6_v6", Tx;
    /// Relayed: channel data between two allocations of this relay, IPv4
    /// client to IPv4 client, without a detour through the stack.
    RelayHairpinV4V4 => "relay_hairpin_v4_v4", Tx;
    /// Relayed: hairpin, IPv4 client to IPv6 client.
    RelayHairpinV4V6 => "relay_hairpin_v4_v6", Tx;
    /// Relayed: hairpin, IPv6 client to IPv4 client.
    RelayHairpinV6V4 => "relay_hairpin_v6_v4", Tx;
    /// Relayed: hairpin, IPv6 client to IPv6 client.
    RelayHairpinV6V6 => "relay_hairpin_v6_v6", Tx;
    /// Passed: the configuration is unset or disabled.
    PassNotConfigured => "pass_not_configured", Pass;
    /// Passed: the frame is too short for the headers it claims.
    PassTruncated => "pass_truncated", Pass;
    /// Passed: neither IPv4 nor IPv6 (ARP, VLAN tags, ...).
    PassNotIp => "pass_not_ip", Pass;
    /// Passed: not UDP.
    PassNotUdp => "pass_not_udp", Pass;
    /// Passed: IPv4 header with options (IHL > 5): rare, left to the stack.
    PassIpOptions => "pass_ip_options", Pass;
    /// Passed: an IP fragment (IPv4 MF/offset, IPv6 fragment header); the
    /// stack reassembles it.
    PassFragment => "pass_fragment", Pass;
    /// Passed: IPv6 extension headers before UDP; the stack parses them.
    PassIpv6ExtensionHeaders => "pass_ipv6_extension_headers", Pass;
    /// Passed: the TTL or hop limit would reach zero; the stack answers with ICMP.
    PassTtlExpired => "pass_ttl_expired", Pass;
    /// Passed: not addressed to a relay address and a relayed port.
    PassNotForRelay => "pass_not_for_relay", Pass;
    /// Passed: a STUN message or anything else that is not channel data.
    PassNotChannelData => "pass_not_channel_data", Pass;
    /// Passed: channel data followed by more than its padding to a multiple
    /// of four (RFC 8656 section 12.5); the user-space path decides.
    PassChannelDataTrailing => "pass_channel_data_trailing", Pass;
    /// Passed: no binding for this client and channel.
    PassUnknownBinding => "pass_unknown_binding", Pass;
    /// Passed: no channel bound for this peer and allocation port (user
    /// space sends a Data indication or drops it).
    PassUnknownPeer => "pass_unknown_peer", Pass;
    /// Passed: hairpin to an allocation of this relay whose client has no
    /// channel to the sender; user space relays it.
    PassHairpinUnbound => "pass_hairpin_unbound", Pass;
    /// Passed: the binding's lifetime has ended (turn-control neither
    /// refreshed nor removed it in time); user space decides.
    PassExpired => "pass_expired", Pass;
    /// Passed: the other family's relay address is not configured.
    PassNoRelayAddress => "pass_no_relay_address", Pass;
    /// Passed: an IPv4 datagram without UDP checksum bound for IPv6, where a
    /// checksum is mandatory and would need the whole payload summed.
    PassZeroChecksumToIpv6 => "pass_zero_checksum_to_ipv6", Pass;
    /// Passed: IPv6 UDP without a checksum, which RFC 8200 forbids; the
    /// stack discards it.
    PassZeroChecksumIpv6 => "pass_zero_checksum_ipv6", Pass;
    /// Passed: an IPv4 header with a wrong checksum bound for IPv6, where
    /// the rebuilt header would hide the error; the stack discards it.
    PassBadHeaderChecksum => "pass_bad_header_checksum", Pass;
    /// Passed: the relayed datagram would exceed the largest UDP length.
    PassTooLarge => "pass_too_large", Pass;
    /// Passed: no route to the relayed datagram's destination, or one the
    /// kernel does not forward along (blackhole, unreachable, prohibited,
    /// local, tunnel encapsulation): the stack decides.
    PassNoRoute => "pass_no_route", Pass;
    /// Passed: the FIB lookup refused because forwarding is off on the
    /// ingress interface (`net.ipv4.conf.IF.forwarding`,
    /// `net.ipv6.conf.IF.forwarding`), which the kernel requires of it.
    PassForwardingDisabled => "pass_forwarding_disabled", Pass;
    /// Passed: the next hop's link-layer address is not resolved yet; the
    /// stack resolves it while user space relays.
    PassNoNeighbour => "pass_no_neighbour", Pass;
    /// Passed: the route leaves through an interface the program is not
    /// attached to, which XDP cannot transmit on.
    PassEgressNotAttached => "pass_egress_not_attached", Pass;
    /// Passed: the relayed frame would exceed the egress MTU; user space
    /// relays it (fragmenting it, or honouring DONT-FRAGMENT).
    PassMtuExceeded => "pass_mtu_exceeded", Pass;
    /// Passed: growing or shrinking the frame failed; it is untouched.
    PassAdjustFailed => "pass_adjust_failed", Pass;
    /// Dropped: channel data whose length field exceeds the datagram
    /// (RFC 8656 section 12.6: silently discarded).
    DropChannelDataTruncated => "drop_channel_data_truncated", Drop;
    /// Dropped: over its allocation's or its user's rate limit (`max_bps`,
    /// `user_max_bps`). Dropped, not passed: user space would drop it too,
    /// after the flood had cost the stack and a copy to user space; its
    /// binding's usage counts it.
    DropRateLimited => "drop_rate_limited", Drop;
}

/// Number of [`Reason`]s: the size of the `STATS` array.
pub const REASON_COUNT: u32 = Reason::DropRateLimited as u32 + 1;

/// A report through the `EVENTS` perf-event array: the reporting CPU's
/// cumulative counter of one relay reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayEvent {
    /// The `Reason` (a relay reason).
    pub reason: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Packets and bytes of that reason on that CPU since the program loaded.
    pub total: Counter,
}

impl RelayEvent {
    /// Reads an event from a perf sample's bytes (native endian).
    pub fn from_ne_bytes(bytes: &[u8]) -> Option<Self> {
        let reason = u32::from_ne_bytes(bytes.get(0..4)?.try_into().ok()?);
        let total = Counter::from_ne_bytes(bytes.get(8..24)?)?;
        Some(Self {
            reason,
            reserved: 0,
            total,
        })
    }
}

/// What the program did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Rewritten and transmitted: back out of the interface it came in on
    /// (`XDP_TX`), or out of another interface the program is attached to
    /// (`XDP_REDIRECT`, counted apart in `REDIRECTED`).
    Tx,
    /// Handed to the kernel's stack (`XDP_PASS`).
    Pass,
    /// Discarded (`XDP_DROP`).
    Drop,
}

impl Verdict {
    /// A stable lower-case name for metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Tx => "tx",
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
        }
    }
}

/// One per-CPU slot of `STATS`: packets and bytes for one [`Reason`]; also
/// the cumulative relayed traffic of one CPU, in `RELAYED` and in the events
/// of the `EVENTS` perf-event array.
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

impl core::ops::Add for Counter {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }
}

impl core::iter::Sum for Counter {
    fn sum<I: Iterator<Item = Self>>(counters: I) -> Self {
        counters.fold(Self::default(), core::ops::Add::add)
    }
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
        assert_eq!(size_of::<KernelConfig>(), 44);
        assert_eq!(offset_of!(KernelConfig, port_min), 2);
        assert_eq!(offset_of!(KernelConfig, listen_ports), 6);
        assert_eq!(offset_of!(KernelConfig, relay_ipv4), 24);
        assert_eq!(offset_of!(KernelConfig, relay_ipv6), 28);
        assert_eq!(size_of::<ClientKeyV4>(), 16);
        assert_eq!(offset_of!(ClientKeyV4, channel), 6);
        assert_eq!(offset_of!(ClientKeyV4, listener_ip), 8);
        assert_eq!(size_of::<ClientKeyV6>(), 40);
        assert_eq!(offset_of!(ClientKeyV6, channel), 18);
        assert_eq!(offset_of!(ClientKeyV6, listener_ip), 20);
        assert_eq!(size_of::<PeerKeyV4>(), 8);
        assert_eq!(offset_of!(PeerKeyV4, allocation_port), 6);
        assert_eq!(size_of::<PeerKeyV6>(), 20);
        assert_eq!(offset_of!(PeerKeyV6, allocation_port), 18);
        assert_eq!(size_of::<PeerTarget>(), 56);
        assert_eq!(offset_of!(PeerTarget, usage_slot), 24);
        assert_eq!(offset_of!(PeerTarget, meters), 32);
        assert_eq!(offset_of!(PeerTarget, expires_at_ns), 48);
        assert_eq!(
            size_of::<PeerTarget>() - TERMS_LEN,
            offset_of!(PeerTarget, usage_slot)
        );
        assert_eq!(offset_of!(PeerTarget, peer_port), 16);
        assert_eq!(offset_of!(PeerTarget, allocation_port), 18);
        assert_eq!(offset_of!(PeerTarget, peer_family), 20);
        assert_eq!(offset_of!(PeerTarget, flags), 21);
        assert_eq!(size_of::<ClientTarget>(), 72);
        assert_eq!(offset_of!(ClientTarget, usage_slot), 40);
        assert_eq!(offset_of!(ClientTarget, meters), 48);
        assert_eq!(offset_of!(ClientTarget, expires_at_ns), 64);
        assert_eq!(
            size_of::<ClientTarget>() - TERMS_LEN,
            offset_of!(ClientTarget, usage_slot)
        );
        assert_eq!(offset_of!(ClientTarget, listener_ip), 16);
        assert_eq!(offset_of!(ClientTarget, client_port), 32);
        assert_eq!(offset_of!(ClientTarget, listener_port), 34);
        assert_eq!(offset_of!(ClientTarget, channel), 36);
        assert_eq!(offset_of!(ClientTarget, client_family), 38);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<RelayEvent>(), 24);
        assert_eq!(offset_of!(RelayEvent, total), 8);
        // Word-aligned for the program's loads, with the sizes above: the
        // alignment added no padding.
        for align in [
            align_of::<KernelConfig>(),
            align_of::<ClientKeyV4>(),
            align_of::<ClientKeyV6>(),
            align_of::<PeerKeyV4>(),
            align_of::<PeerKeyV6>(),
        ] {
            assert_eq!(align, 4);
        }
        // The expiry is a `u64` the program loads in one instruction.
        assert_eq!(align_of::<PeerTarget>(), 8);
        assert_eq!(align_of::<ClientTarget>(), 8);
    }

    #[test]
    fn fields_are_big_endian_wire_bytes() {
        let config = KernelConfig::new(
            &[3478, 443],
            (49152, 65535),
            Some(Ipv4Addr::new(203, 0, 113, 1)),
            Some("2001:db8::1".parse().unwrap()),
        );
        assert_eq!(config.listen_ports[0], [0x0d, 0x96]);
        assert_eq!(config.as_bytes()[6..10], [0x0d, 0x96, 0x01, 0xbb]);
        assert_eq!(config.as_bytes()[24..28], [203, 0, 113, 1]);
        assert!(config.enabled());
        assert!(config.is_listen_port([0x01, 0xbb]) && config.is_listen_port([0x0d, 0x96]));
        assert!(!config.is_listen_port([0, 0]) && !config.is_listen_port([0x0d, 0x97]));
        assert!(config.is_allocation_port(49152) && config.is_allocation_port(65535));
        assert!(!config.is_allocation_port(3478));
        assert_eq!(config.as_bytes()[28..30], [0x20, 0x01]);
        assert!(!config.tail_adjust() && config.with_tail_adjust(true).tail_adjust());
        assert!(!config.mac_swap() && config.with_mac_swap(true).mac_swap());

        let target = PeerTarget::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 9000, 50001, 7);
        assert_eq!(target.as_bytes()[48..], 7u64.to_ne_bytes());
        assert_eq!(target.as_bytes()[..4], [198, 51, 100, 7]);
        assert_eq!(target.as_bytes()[16..18], 9000u16.to_be_bytes());
        assert_eq!(target.as_bytes()[18..20], 50001u16.to_be_bytes());
        assert_eq!(
            target.peer(),
            Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)))
        );
        assert_eq!(target.as_bytes()[20..24], [FAMILY_V4, 0, 0, 0]);
        assert!(!target.dont_fragment());
        let dont_fragment = target.with_dont_fragment(true);
        assert!(dont_fragment.dont_fragment());
        assert_eq!(dont_fragment.as_bytes()[21], PEER_DONT_FRAGMENT);
        assert_eq!(dont_fragment.with_dont_fragment(false), target);
        let v6: SocketAddr = "[2001:db8:3::2]:40000".parse().unwrap();
        let listener: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let client = ClientTarget::new(v6, listener, 0x4001, u64::MAX);
        assert_eq!(client.as_bytes()[64..], u64::MAX.to_ne_bytes());
        assert_eq!(client.client_family, FAMILY_V6);
        assert_eq!(client.channel, [0x40, 0x01]);
        assert_eq!(client.client(), Some(v6));
        assert_eq!(client.listener(), Some(listener));
    }

    #[test]
    fn zeroed_configuration_relays_nothing() {
        assert!(!KernelConfig::default().enabled());
    }

    #[test]
    fn bytes_round_trip() {
        let key = ClientKeyV4 {
            client_ip: [192, 0, 2, 10],
            client_port: [0x30, 0x39],
            channel: [0x40, 0x01],
            listener_ip: [203, 0, 113, 1],
            listener_port: [0x0d, 0x96],
            reserved: [0; 2],
        };
        assert_eq!(ClientKeyV4::from_bytes(key.as_bytes()), Some(key));
        assert_eq!(ClientKeyV4::from_bytes(&[0; 15]), None);
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
        assert_eq!(Reason::DropRateLimited.verdict(), Verdict::Drop);
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
