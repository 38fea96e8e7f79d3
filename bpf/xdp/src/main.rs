//! The relay's XDP program: TURN channel data from clients becomes plain UDP
//! to peers, UDP from peers becomes channel data to clients, and channel data
//! between two allocations of this relay goes straight across (hairpin), in
//! IPv4, IPv6 and across the two; everything else goes to the kernel's stack,
//! where turn-control handles it.
//!
//! `xdp_relay` is a thin entry point: `try_relay` returns the reason for its
//! verdict, every reason maps to exactly one verdict (`Reason::verdict`) and
//! one per-CPU counter. The header arithmetic lives in `bpf_common::packet`,
//! where it is unit-tested on the host; this file parses, looks up and moves
//! bytes. Everything is `#[inline(always)]`: one function, no BPF-to-BPF
//! calls, and a stack well under the 512-byte limit: the incoming headers
//! are read where they lie, and the largest local is the outgoing headers
//! (at most 70 bytes).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, PerCpuArray, PerfEventArray},
    helpers::generated::{
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use bpf_common::{
    ClientKeyV4, ClientKeyV6, ClientTarget, Counter, FAMILY_V4, FAMILY_V6, KernelConfig,
    MAX_BINDINGS, PeerKeyV4, PeerKeyV6, PeerTarget, Pod, REASON_COUNT, Reason, RelayEvent, Verdict,
    packet::{
        CHANNEL_HEADER_LEN, ChannelFrame, ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IpBytes,
        IpHeader, Ipv4Hdr, Ipv6Hdr, Padding, Relay, Translate, UDP_LEN, UdpFrame, relay,
    },
};

const BINDINGS: usize = MAX_BINDINGS as usize;

/// The data-plane configuration: one entry, written by the agent.
#[btf_map]
static CONFIG: Array<KernelConfig, 1> = Array::new();

/// IPv4 client (address, port, channel) -> where its channel data goes.
#[btf_map]
static CLIENT_V4: HashMap<ClientKeyV4, PeerTarget, BINDINGS> = HashMap::new();

/// IPv6 client (address, port, channel) -> where its channel data goes.
#[btf_map]
static CLIENT_V6: HashMap<ClientKeyV6, PeerTarget, BINDINGS> = HashMap::new();

/// IPv4 peer (address, port) and allocation port -> the client and channel.
#[btf_map]
static PEER_V4: HashMap<PeerKeyV4, ClientTarget, BINDINGS> = HashMap::new();

/// IPv6 peer (address, port) and allocation port -> the client and channel.
#[btf_map]
static PEER_V6: HashMap<PeerKeyV6, ClientTarget, BINDINGS> = HashMap::new();

/// Per-CPU packet and byte counters, indexed by `Reason`.
#[btf_map]
static STATS: PerCpuArray<Counter, { REASON_COUNT as usize }> = PerCpuArray::new();

/// Each CPU's cumulative traffic of one relay reason (`RelayEvent`), every
/// `1 << event_interval_log2` packets of that reason: cumulative, so a lost
/// event loses no bytes, only time.
#[btf_map]
static EVENTS: PerfEventArray = PerfEventArray::new();

/// Tail-adjust mode's copy buffer: a map slot rather than stack, which the
/// inlined paths would each claim for themselves (and which could not hold
/// `MOVE_CHUNK` bytes).
#[btf_map]
static SCRATCH: PerCpuArray<[u8; MOVE_CHUNK], 1> = PerCpuArray::new();

/// A frame relayed: the reason to count and the application bytes it carried.
struct Relayed {
    reason: Reason,
    bytes: u64,
}

#[xdp]
#[inline(always)]
pub fn xdp_relay(ctx: XdpContext) -> u32 {
    let Some(config) = CONFIG.get(0) else {
        count(&ctx, None, Reason::PassNotConfigured, 0);
        return xdp_action::XDP_PASS;
    };
    let (reason, bytes) = match try_relay(&ctx, config) {
        Ok(relayed) => (relayed.reason, relayed.bytes),
        Err(reason) => (reason, (ctx.data_end() - ctx.data()) as u64),
    };
    count(&ctx, Some(config), reason, bytes);
    match reason.verdict() {
        Verdict::Tx => xdp_action::XDP_TX,
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn try_relay(ctx: &XdpContext, config: &KernelConfig) -> Result<Relayed, Reason> {
    if !config.enabled() {
        return Err(Reason::PassNotConfigured);
    }
    // SAFETY: `header` checked the bounds; `EthHdr` is plain bytes.
    let ether_type = unsafe { (*header::<EthHdr>(ctx, 0)?).ether_type };
    match ether_type {
        ETH_P_IPV4 => from_family::<Ipv4Hdr>(ctx, config),
        ETH_P_IPV6 => from_family::<Ipv6Hdr>(ctx, config),
        _ => Err(Reason::PassNotIp),
    }
}

/// A UDP datagram to one of the relay's addresses: channel data from a
/// client to the listen port, or a peer's datagram to an allocation port.
#[inline(always)]
fn from_family<In: IpVersion>(ctx: &XdpContext, config: &KernelConfig) -> Result<Relayed, Reason> {
    // SAFETY: `header` checked the bounds (and says why the frame is
    // aligned); the headers are plain bytes. The reference is last used to
    // compute the outgoing headers, before `emit` moves the frame's head and
    // writes them.
    let frame = unsafe { &*header::<UdpFrame<In>>(ctx, 0)? };
    let udp_len = frame.ip.check(&frame.udp)?;
    let relay_addr = In::relay_addr(config);
    if relay_addr.is_unset() || frame.ip.daddr() != relay_addr {
        return Err(Reason::PassNotForRelay);
    }
    // Lengths come from the headers, not the frame: Ethernet pads short frames.
    if ETH_LEN + In::LEN + udp_len > ctx.data_end() - ctx.data() {
        return Err(Reason::PassTruncated);
    }
    if frame.udp.dest == config.listen_port {
        from_client(ctx, config, frame, udp_len)
    } else if config.is_allocation_port(u16::from_be_bytes(frame.udp.dest)) {
        from_peer(ctx, config, frame, udp_len)
    } else {
        Err(Reason::PassNotForRelay)
    }
}

/// Channel data from a client (RFC 8656 section 12.6).
#[inline(always)]
fn from_client<In: IpVersion>(
    ctx: &XdpContext,
    config: &KernelConfig,
    frame: &UdpFrame<In>,
    udp_len: usize,
) -> Result<Relayed, Reason> {
    let payload_len = udp_len - UDP_LEN;
    if payload_len < CHANNEL_HEADER_LEN {
        return Err(Reason::PassNotChannelData);
    }
    // SAFETY: as for `frame` in `from_family`; `payload_len` says the
    // ChannelData header's bytes are UDP payload.
    let input = unsafe { &*header::<ChannelFrame<In>>(ctx, 0)? };
    let channel = input.channel;
    if !channel.is_channel_data() {
        return Err(Reason::PassNotChannelData);
    }
    let data_len = u16::from_be_bytes(channel.len) as usize;
    if CHANNEL_HEADER_LEN + data_len > payload_len {
        return Err(Reason::DropChannelDataTruncated);
    }
    let padding = padding(
        ctx,
        ETH_LEN + In::LEN + udp_len,
        payload_len - CHANNEL_HEADER_LEN - data_len,
    )?;
    let target = In::peer_of(frame.ip.saddr(), frame.udp.source, channel.channel)
        .ok_or(Reason::PassUnknownBinding)?;
    match target.peer_family {
        FAMILY_V4 => to_peer::<In, Ipv4Hdr>(ctx, config, input, udp_len, &target, padding),
        FAMILY_V6 => to_peer::<In, Ipv6Hdr>(ctx, config, input, udp_len, &target, padding),
        _ => Err(Reason::PassUnknownBinding),
    }
}

/// Channel data to a peer as plain UDP from the allocation, or, when the
/// peer is another allocation of this relay, straight to that allocation's client.
#[inline(always)]
fn to_peer<In, Out>(
    ctx: &XdpContext,
    config: &KernelConfig,
    input: &ChannelFrame<In>,
    udp_len: usize,
    target: &PeerTarget,
    padding: Padding,
) -> Result<Relayed, Reason>
where
    In: IpVersion + Translate<Out>,
    Out: IpVersion,
{
    let relay_addr = Out::relay_addr(config);
    if relay_addr.is_unset() {
        return Err(Reason::PassNoRelayAddress);
    }
    let peer = Out::addr(&target.peer_ip);
    if peer == relay_addr && config.is_allocation_port(u16::from_be_bytes(target.peer_port)) {
        // The peer is the relayed address of another allocation here: its
        // datagram would come straight back in. Deliver it as that
        // allocation's peer datagram, from this allocation's relayed address.
        let other = Out::client_of(relay_addr, target.allocation_port, target.peer_port)
            .ok_or(Reason::PassHairpinUnbound)?;
        return match other.client_family {
            FAMILY_V4 => hairpin::<In, Ipv4Hdr>(ctx, config, input, udp_len, &other, padding),
            FAMILY_V6 => hairpin::<In, Ipv6Hdr>(ctx, config, input, udp_len, &other, padding),
            _ => Err(Reason::PassHairpinUnbound),
        };
    }
    let route = Relay {
        saddr: relay_addr,
        daddr: peer,
        source: target.allocation_port,
        dest: target.peer_port,
        removed: Some(input.channel),
        added: None,
        padding,
    };
    let (out, _) = relay::<In, Out>(&input.udp, udp_len, &route)?;
    let data_len = udp_len - UDP_LEN - CHANNEL_HEADER_LEN - padding.len as usize;
    emit(
        ctx,
        config,
        size_of::<ChannelFrame<In>>(),
        &out,
        data_len + padding.len as usize,
    )?;
    Ok(Relayed {
        reason: In::TO_PEER[Out::INDEX],
        bytes: data_len as u64,
    })
}

/// Channel data from one client of this relay to another's channel.
#[inline(always)]
fn hairpin<In, Out>(
    ctx: &XdpContext,
    config: &KernelConfig,
    input: &ChannelFrame<In>,
    udp_len: usize,
    other: &ClientTarget,
    padding: Padding,
) -> Result<Relayed, Reason>
where
    In: IpVersion + Translate<Out>,
    Out: IpVersion,
{
    let relay_addr = Out::relay_addr(config);
    if relay_addr.is_unset() {
        return Err(Reason::PassNoRelayAddress);
    }
    let route = Relay {
        saddr: relay_addr,
        daddr: Out::addr(&other.client_ip),
        source: config.listen_port,
        dest: other.client_port,
        removed: Some(input.channel),
        added: Some(other.channel),
        padding,
    };
    let (udp, added) = relay::<In, Out>(&input.udp, udp_len, &route)?;
    let out = ChannelFrame {
        udp,
        channel: added.unwrap_or_default(),
    };
    let data_len = udp_len - UDP_LEN - CHANNEL_HEADER_LEN - padding.len as usize;
    emit(
        ctx,
        config,
        size_of::<ChannelFrame<In>>(),
        &out,
        data_len + padding.len as usize,
    )?;
    Ok(Relayed {
        reason: In::HAIRPIN[Out::INDEX],
        bytes: data_len as u64,
    })
}

/// The padding behind a ChannelData message's `pad` bytes of surplus, the
/// last of the UDP payload ending at `payload_end`: up to three bytes that
/// round the message up to a multiple of four (RFC 8656 section 12.5).
/// Anything longer is not padding: user space decides.
#[inline(always)]
fn padding(ctx: &XdpContext, payload_end: usize, pad: usize) -> Result<Padding, Reason> {
    if pad == 0 {
        return Ok(Padding::default());
    }
    if pad > 3 {
        return Err(Reason::PassChannelDataTrailing);
    }
    let mut tail = [0u8; 4];
    // SAFETY: the helper bound-checks the offset against the frame and
    // writes 4 bytes into `tail`; the payload holds the 4-byte ChannelData
    // header and `pad` more bytes, so it ends at least 5 bytes after its start.
    let failed = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            (payload_end - 4) as u32,
            tail.as_mut_ptr().cast(),
            4,
        ) != 0
    };
    if failed {
        return Err(Reason::PassTruncated);
    }
    // Constant indexes: nothing here may be able to panic.
    let bytes = match pad {
        1 => [tail[3], 0, 0],
        2 => [tail[2], tail[3], 0],
        _ => [tail[1], tail[2], tail[3]],
    };
    Ok(Padding {
        bytes,
        len: pad as u8,
    })
}

/// A peer's datagram to an allocation port (RFC 8656 section 12.7).
#[inline(always)]
fn from_peer<In: IpVersion>(
    ctx: &XdpContext,
    config: &KernelConfig,
    frame: &UdpFrame<In>,
    udp_len: usize,
) -> Result<Relayed, Reason> {
    let target = In::client_of(frame.ip.saddr(), frame.udp.source, frame.udp.dest)
        .ok_or(Reason::PassUnknownPeer)?;
    match target.client_family {
        FAMILY_V4 => to_client::<In, Ipv4Hdr>(ctx, config, frame, udp_len, &target),
        FAMILY_V6 => to_client::<In, Ipv6Hdr>(ctx, config, frame, udp_len, &target),
        _ => Err(Reason::PassUnknownPeer),
    }
}

/// A peer's datagram to the client as channel data from the listen port.
#[inline(always)]
fn to_client<In, Out>(
    ctx: &XdpContext,
    config: &KernelConfig,
    frame: &UdpFrame<In>,
    udp_len: usize,
    target: &ClientTarget,
) -> Result<Relayed, Reason>
where
    In: IpVersion + Translate<Out>,
    Out: IpVersion,
{
    let relay_addr = Out::relay_addr(config);
    if relay_addr.is_unset() {
        return Err(Reason::PassNoRelayAddress);
    }
    let route = Relay {
        saddr: relay_addr,
        daddr: Out::addr(&target.client_ip),
        source: config.listen_port,
        dest: target.client_port,
        removed: None,
        added: Some(target.channel),
        padding: Padding::default(),
    };
    let (udp, added) = relay::<In, Out>(frame, udp_len, &route)?;
    let out = ChannelFrame {
        udp,
        channel: added.unwrap_or_default(),
    };
    let data_len = udp_len - UDP_LEN;
    emit(ctx, config, size_of::<UdpFrame<In>>(), &out, data_len)?;
    Ok(Relayed {
        reason: In::TO_CLIENT[Out::INDEX],
        bytes: data_len as u64,
    })
}

/// Replaces the frame's first `in_len` bytes (headers) by `out`, keeping the
/// `data_len` bytes behind them (application data, and any padding, which
/// stays behind the relayed datagram as a trailer in both modes): by moving the frame's
/// head (`bpf_xdp_adjust_head`) or, in tail-adjust mode, by moving the data
/// and the tail.
#[inline(always)]
fn emit<T: Pod>(
    ctx: &XdpContext,
    config: &KernelConfig,
    in_len: usize,
    out: &T,
    data_len: usize,
) -> Result<(), Reason> {
    let out_len = size_of::<T>();
    if config.tail_adjust() {
        if data_len > MOVE_MAX {
            return Err(Reason::PassTooLarge);
        }
        if in_len != out_len && !move_data(ctx, in_len, out_len, data_len) {
            return Err(Reason::PassAdjustFailed);
        }
    } else if in_len != out_len {
        // SAFETY: the helper checks the context and the delta itself.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, in_len as i32 - out_len as i32) } != 0 {
            return Err(Reason::PassAdjustFailed);
        }
    }
    let start = header::<T>(ctx, 0).map_err(|_| Reason::PassAdjustFailed)?;
    // SAFETY: bounds re-checked against the adjusted frame; no other pointer
    // into the frame is live.
    unsafe { *start = *out };
    Ok(())
}

/// Bytes moved per step of the tail-adjust mode (a power of two).
const MOVE_CHUNK: usize = 512;
/// The most data the tail-adjust mode moves: 8 chunks, beyond any MTU a
/// driver without headroom offers. Few steps keep verification short.
const MOVE_MAX: usize = 8 * MOVE_CHUNK;

/// Tail-adjust mode: moves `data_len` bytes of data from `from` to `to` and
/// the frame's tail with them, leaving the head where it is; `false` if a
/// helper refused (nothing has changed yet when the frame cannot grow). Not
/// inlined, and returning a plain `bool` across the call: it is the bulk of
/// the program's code and the default mode never runs it.
#[inline(never)]
fn move_data(ctx: &XdpContext, from: usize, to: usize, data_len: usize) -> bool {
    let Some(buffer) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let buffer = buffer.cast();
    let step = |offset: usize, len: usize| -> bool {
        // `len` is 1..=MOVE_CHUNK; the mask makes that range visible to the
        // verifier, which refuses a possibly zero-sized access.
        let len = (((len - 1) & (MOVE_CHUNK - 1)) + 1) as u32;
        // SAFETY: the helpers bound-check offsets against the frame and
        // `len` (at most MOVE_CHUNK) against the buffer.
        unsafe {
            bpf_xdp_load_bytes(ctx.ctx, (from + offset) as u32, buffer, len) == 0
                && bpf_xdp_store_bytes(ctx.ctx, (to + offset) as u32, buffer, len) == 0
        }
    };
    if to > from {
        // Grow first, then copy from the end so nothing is overwritten unread.
        // SAFETY: the helper checks the context and the delta itself.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, (to - from) as i32) } != 0 {
            return false;
        }
        let mut remaining = data_len;
        for _ in 0..MOVE_MAX / MOVE_CHUNK {
            if remaining == 0 {
                break;
            }
            let len = remaining.min(MOVE_CHUNK);
            remaining -= len;
            if !step(remaining, len) {
                return false;
            }
        }
        true
    } else {
        let mut done = 0;
        for _ in 0..MOVE_MAX / MOVE_CHUNK {
            if done >= data_len {
                break;
            }
            let len = (data_len - done).min(MOVE_CHUNK);
            if !step(done, len) {
                return false;
            }
            done += len;
        }
        // SAFETY: the helper checks the context and the delta itself.
        unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((from - to) as i32)) == 0 }
    }
}

/// Counts a verdict; a relayed packet's cumulative counter is also reported
/// through `EVENTS` when due.
#[inline(always)]
fn count(ctx: &XdpContext, config: Option<&KernelConfig>, reason: Reason, bytes: u64) {
    let Some(counter) = STATS.get_ptr_mut(reason as u32) else {
        return;
    };
    // SAFETY: a per-CPU slot: no other program instance touches it while
    // this one runs (XDP runs with preemption disabled).
    let total = unsafe {
        (*counter).packets += 1;
        (*counter).bytes += bytes;
        *counter
    };
    if reason.verdict() == Verdict::Tx
        && let Some(config) = config
        && config.event_due(total.packets)
    {
        EVENTS.output(
            ctx,
            &RelayEvent {
                reason: reason as u32,
                reserved: 0,
                total,
            },
            0,
        );
    }
}

/// A pointer to a `T` at `offset` in the frame, after checking that the
/// whole `T` lies inside it. Dereferencing it is sound for the `#[repr(C)]`
/// byte-array types of `bpf_common::packet` (any bit pattern valid, alignment
/// 2) at an even `offset`, until the frame's bounds change
/// (`bpf_xdp_adjust_*`). A program cannot see a frame's address (the verifier
/// refuses arithmetic on packet pointers); the kernel's BPF model has frames
/// start at `NET_IP_ALIGN` (0 or 2) past an aligned address, which is what its
/// strict alignment check assumes, and this program only moves the head by even
/// amounts.
#[inline(always)]
fn header<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Reason> {
    let start = ctx.data() + offset;
    // Compared in the form the verifier tracks: packet pointer + constant
    // against `data_end`.
    if start + size_of::<T>() > ctx.data_end() {
        return Err(Reason::PassTruncated);
    }
    Ok(start as *mut T)
}

/// What differs between IPv4 and IPv6 beyond the header: the version's maps,
/// its relay address and its counters. A trait over header types, resolved at
/// compile time, so that each path is inlined once per version.
trait IpVersion: IpHeader + Translate<Ipv4Hdr> + Translate<Ipv6Hdr> {
    /// Index of this family in the `*_V4`, `*_V6` reason pairs.
    const INDEX: usize;
    /// Client-to-peer reasons, by the peer's family.
    const TO_PEER: [Reason; 2];
    /// Peer-to-client reasons, by the client's family.
    const TO_CLIENT: [Reason; 2];
    /// Hairpin reasons, by the receiving client's family.
    const HAIRPIN: [Reason; 2];

    /// The relay's address in this family (all zero: none).
    fn relay_addr(config: &KernelConfig) -> Self::Addr;
    /// This family's address in a map value's 16 bytes.
    fn addr(bytes: &[u8; 16]) -> Self::Addr;
    /// Where a client's channel goes.
    fn peer_of(client: Self::Addr, port: [u8; 2], channel: [u8; 2]) -> Option<PeerTarget>;
    /// Which client and channel a peer's datagrams to an allocation go to.
    fn client_of(peer: Self::Addr, port: [u8; 2], allocation_port: [u8; 2])
    -> Option<ClientTarget>;
}

impl IpVersion for Ipv4Hdr {
    const INDEX: usize = 0;
    const TO_PEER: [Reason; 2] = [Reason::RelayClientToPeerV4V4, Reason::RelayClientToPeerV4V6];
    const TO_CLIENT: [Reason; 2] = [Reason::RelayPeerToClientV4V4, Reason::RelayPeerToClientV4V6];
    const HAIRPIN: [Reason; 2] = [Reason::RelayHairpinV4V4, Reason::RelayHairpinV4V6];

    #[inline(always)]
    fn relay_addr(config: &KernelConfig) -> [u8; 4] {
        config.relay_ipv4
    }

    #[inline(always)]
    fn addr(bytes: &[u8; 16]) -> [u8; 4] {
        [bytes[0], bytes[1], bytes[2], bytes[3]]
    }

    #[inline(always)]
    fn peer_of(client_ip: [u8; 4], client_port: [u8; 2], channel: [u8; 2]) -> Option<PeerTarget> {
        let key = ClientKeyV4 {
            client_ip,
            client_port,
            channel,
        };
        // SAFETY: copied out at once; a concurrent update from user space
        // replaces the element under RCU, leaving this read valid.
        unsafe { CLIENT_V4.get(key).copied() }
    }

    #[inline(always)]
    fn client_of(
        peer_ip: [u8; 4],
        peer_port: [u8; 2],
        allocation_port: [u8; 2],
    ) -> Option<ClientTarget> {
        let key = PeerKeyV4 {
            peer_ip,
            peer_port,
            allocation_port,
        };
        // SAFETY: as in `peer_of`.
        unsafe { PEER_V4.get(key).copied() }
    }
}

impl IpVersion for Ipv6Hdr {
    const INDEX: usize = 1;
    const TO_PEER: [Reason; 2] = [Reason::RelayClientToPeerV6V4, Reason::RelayClientToPeerV6V6];
    const TO_CLIENT: [Reason; 2] = [Reason::RelayPeerToClientV6V4, Reason::RelayPeerToClientV6V6];
    const HAIRPIN: [Reason; 2] = [Reason::RelayHairpinV6V4, Reason::RelayHairpinV6V6];

    #[inline(always)]
    fn relay_addr(config: &KernelConfig) -> [u8; 16] {
        config.relay_ipv6
    }

    #[inline(always)]
    fn addr(bytes: &[u8; 16]) -> [u8; 16] {
        *bytes
    }

    #[inline(always)]
    fn peer_of(client_ip: [u8; 16], client_port: [u8; 2], channel: [u8; 2]) -> Option<PeerTarget> {
        let key = ClientKeyV6 {
            client_ip,
            client_port,
            channel,
        };
        // SAFETY: as for IPv4.
        unsafe { CLIENT_V6.get(key).copied() }
    }

    #[inline(always)]
    fn client_of(
        peer_ip: [u8; 16],
        peer_port: [u8; 2],
        allocation_port: [u8; 2],
    ) -> Option<ClientTarget> {
        let key = PeerKeyV6 {
            peer_ip,
            peer_port,
            allocation_port,
        };
        // SAFETY: as for IPv4.
        unsafe { PEER_V6.get(key).copied() }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic can be reached from a verified program; loop forever to satisfy the type.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
