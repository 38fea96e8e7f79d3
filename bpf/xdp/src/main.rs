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
//!
//! A binding lasts as long as turn-control authorises it: each map value
//! carries its `expires_at_ns`, and from then on the program treats the
//! entry as absent (`Reason::PassExpired`), whether or not anyone deleted it.
#![no_std]
#![no_main]
// The target declares no atomic types: the BPF instructions exist
// (atomic add, compare-and-exchange), reached through the intrinsics.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, xdp_md},
    btf_maps::{Array, DevMapHash, HashMap, PerCpuArray, PerfEventArray},
    helpers::generated::{
        bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xadd};

use bpf_common::{
    BindingUsage, ClientKeyV4, ClientKeyV6, ClientTarget, Counter, FAMILY_V4, FAMILY_V6,
    KernelConfig, MAX_BINDINGS, MAX_INTERFACES, Meter, PeerKeyV4, PeerKeyV6, PeerTarget, Pod,
    REASON_COUNT, Reason, RelayEvent, Verdict,
    packet::{
        CHANNEL_HEADER_LEN, ChannelFrame, ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPPROTO_UDP,
        IpBytes, IpHeader, Ipv4Hdr, Ipv6Hdr, Padding, Relay, Translate, UDP_LEN, UdpFrame, UdpHdr,
        relay,
    },
    usage::{CLIENT_TO_PEER, MAX_METERS, PEER_TO_CLIENT, USAGE_SLOTS, gcra},
};

const BINDINGS: usize = MAX_BINDINGS as usize;

/// Whether the program honours a binding's expiry: always, but in
/// `relay_unexpiring` (`src/bin/relay_unexpiring.rs`), this file built again
/// without the check, which only the bench loads, to measure what the check
/// costs per packet beside the program as it runs.
const CHECK_EXPIRY: bool = !same(env!("CARGO_BIN_NAME"), "relay_unexpiring");

/// Whether the program counts and meters bindings: always, but in
/// `relay_uncounted` (`src/bin/relay_uncounted.rs`), this file built again
/// without the usage counters and meters, which only the bench loads, to
/// measure what they cost per packet, the bookkeeping included.
const COUNT_USAGE: bool = !same(env!("CARGO_BIN_NAME"), "relay_uncounted");

/// The data-plane configuration: one entry, written by the agent.
#[btf_map]
static CONFIG: Array<KernelConfig, 1> = Array::new();

/// The binding maps' flags: `BPF_F_NO_PREALLOC`. Their elements are then
/// allocated on update and freed only after every program that may have
/// looked them up has returned (RCU), so the program reads the bindings
/// where they lie: a preallocated element is recycled at once when user
/// space replaces or deletes it, and a reader could see another binding's
/// fields appear in it. Lookups cost the same; the kernel holds memory for
/// the bindings installed, not for all that fit.
const BINDING_FLAGS: usize = 1;

/// IPv4 client (address, port, channel, listener) -> where its channel data goes.
#[btf_map]
static CLIENT_V4: HashMap<ClientKeyV4, PeerTarget, BINDINGS, BINDING_FLAGS> = HashMap::new();

/// IPv6 client (address, port, channel, listener) -> where its channel data goes.
#[btf_map]
static CLIENT_V6: HashMap<ClientKeyV6, PeerTarget, BINDINGS, BINDING_FLAGS> = HashMap::new();

/// IPv4 peer (address, port) and allocation port -> the client and channel.
#[btf_map]
static PEER_V4: HashMap<PeerKeyV4, ClientTarget, BINDINGS, BINDING_FLAGS> = HashMap::new();

/// IPv6 peer (address, port) and allocation port -> the client and channel.
#[btf_map]
static PEER_V6: HashMap<PeerKeyV6, ClientTarget, BINDINGS, BINDING_FLAGS> = HashMap::new();

/// `BPF_F_MMAPABLE`: the agent maps `USAGE` into its memory and reads
/// every binding's counters without a system call.
const MMAPABLE: usize = 1 << 10;

/// Each binding's traffic (`BindingUsage`), by the slot its entries name;
/// slot 0 counts what entries without a slot relay, and nobody reads it.
/// Shared by all CPUs and added to atomically: exact whatever CPU a packet
/// lands on (see `bpf_common::usage`).
#[btf_map]
static USAGE: Array<BindingUsage, { USAGE_SLOTS as usize }, MMAPABLE> = Array::new();

/// Rate limits (`Meter`) by key (`bpf_common::usage::meter_key`): an
/// allocation's `max_bps` and its user's cap, written by the agent; each
/// direction's time is updated here by compare-and-exchange.
#[btf_map]
static METERS: HashMap<u64, Meter, { MAX_METERS as usize }, BINDING_FLAGS> = HashMap::new();

/// Per-CPU packet and byte counters, indexed by `Reason`.
#[btf_map]
static STATS: PerCpuArray<Counter, { REASON_COUNT as usize }> = PerCpuArray::new();

/// Each CPU's cumulative traffic of one relay reason (`RelayEvent`), every
/// `1 << event_interval_log2` packets of that reason: cumulative, so a lost
/// event loses no bytes, only time.
#[btf_map]
static EVENTS: PerfEventArray = PerfEventArray::new();

/// The interfaces the program is attached to, by ifindex: where a frame
/// whose route leaves through another interface than it came in on is
/// redirected (`XDP_REDIRECT`). Written by the agent.
#[btf_map]
static EGRESS: DevMapHash<{ MAX_INTERFACES as usize }> = DevMapHash::new();

/// Relayed frames (and their application bytes) that left through another
/// interface than they came in on: a part of the relay reasons' counts.
#[btf_map]
static REDIRECTED: PerCpuArray<Counter, 1> = PerCpuArray::new();

/// What `next_hop` hands its helpers by pointer, in map memory: on the
/// stack, in each of the twelve inlined relay paths, it would not fit the
/// program's 512 bytes. Only the current run uses a CPU's slot (XDP runs
/// with preemption disabled).
#[repr(C)]
struct Scratch {
    /// `next_hop`'s FIB lookup parameters and results.
    params: bpf_fib_lookup,
    /// The IP length `bpf_check_mtu` checks in MAC-swap mode.
    mtu_len: u32,
    /// Reserved, zero.
    reserved: u32,
    /// Non-zero when a binding the packet goes on is counted or metered:
    /// then `bytes` and `terms` describe it, else they are stale and the
    /// rest of the bookkeeping is one load and a branch.
    accounted: u64,
    /// The relayed packet's application bytes.
    bytes: u64,
    /// The bindings it is relayed on, as `next_hop` found them: the sending
    /// client's (client-to-peer traffic, index `CLIENT_TO_PEER`) and the
    /// receiving client's (peer-to-client, `PEER_TO_CLIENT`); a hairpin
    /// has both. Their meters are charged by `look_up_next_hop`, which runs
    /// anyway with every path's locals saved; their counters by `xdp_relay`
    /// once the frame is relayed.
    terms: [Terms; 2],
}

/// A binding's counting and metering terms, as its entry holds them.
#[repr(C)]
#[derive(Clone, Copy)]
struct Terms {
    /// Its allocation's and its user's meter keys (0: none).
    meters: [u64; 2],
    /// Its `USAGE` slot (0: none).
    slot: u64,
}

impl Terms {
    /// No binding on this side.
    const NONE: Self = Self {
        meters: [0; 2],
        slot: 0,
    };

    /// Non-zero when the binding is counted or metered.
    #[inline(always)]
    fn any(&self) -> u64 {
        self.slot | self.meters[0] | self.meters[1]
    }
}

/// The terms of the bindings a packet of `bytes` application bytes is
/// relayed on: the sender's client-side entry and the receiver's
/// peer-side entry.
#[derive(Clone, Copy)]
struct Bindings<'a> {
    sender: Option<&'a PeerTarget>,
    receiver: Option<&'a ClientTarget>,
    bytes: usize,
}

/// This CPU's `Scratch`.
#[btf_map]
static NEXT_HOP: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Tail-adjust mode's copy buffer: a map slot rather than stack, which the
/// inlined paths would each claim for themselves (and which could not hold
/// `MOVE_CHUNK` bytes).
#[btf_map]
static SCRATCH: PerCpuArray<[u8; MOVE_CHUNK], 1> = PerCpuArray::new();

/// A frame relayed: the reason to count, the application bytes it carried
/// and where it leaves.
struct Relayed {
    reason: Reason,
    bytes: u64,
    egress: Egress,
}

/// The interface a relayed frame leaves through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Egress {
    /// The one it came in on (`XDP_TX`).
    Ingress,
    /// Another attached interface, already chosen by `bpf_redirect_map`
    /// (`XDP_REDIRECT`).
    Redirect,
}

#[xdp]
#[inline(always)]
pub fn xdp_relay(ctx: XdpContext) -> u32 {
    let Some(config) = CONFIG.get(0) else {
        count(&ctx, None, Reason::PassNotConfigured, 0);
        return xdp_action::XDP_PASS;
    };
    let (reason, bytes, egress) = match try_relay(&ctx, config) {
        Ok(relayed) => {
            if COUNT_USAGE {
                count_usage();
            }
            (relayed.reason, relayed.bytes, relayed.egress)
        }
        Err(reason) => (
            reason,
            (ctx.data_end() - ctx.data()) as u64,
            Egress::Ingress,
        ),
    };
    count(&ctx, Some(config), reason, bytes);
    match reason.verdict() {
        Verdict::Tx if egress == Egress::Redirect => {
            if let Some(counter) = REDIRECTED.get_ptr_mut(0) {
                // SAFETY: a per-CPU slot, as in `count`.
                unsafe {
                    (*counter).packets += 1;
                    (*counter).bytes += bytes;
                }
            }
            xdp_action::XDP_REDIRECT
        }
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

/// A UDP datagram to the relay: channel data from a client to a listener
/// port (of any of the host's addresses: the client map's key holds the
/// listener's), or a peer's datagram to an allocation port of the relay address.
#[inline(always)]
fn from_family<In: IpVersion>(ctx: &XdpContext, config: &KernelConfig) -> Result<Relayed, Reason> {
    // SAFETY: `header` checked the bounds (and says why the frame is
    // aligned); the headers are plain bytes. The reference is last used to
    // compute the outgoing headers, before `emit` moves the frame's head and
    // writes them.
    let frame = unsafe { &*header::<UdpFrame<In>>(ctx, 0)? };
    let udp_len = frame.ip.check(&frame.udp)?;
    let to_listener = config.is_listen_port(frame.udp.dest);
    if !to_listener {
        let relay_addr = In::relay_addr(config);
        if relay_addr.is_unset()
            || frame.ip.daddr() != relay_addr
            || !config.is_allocation_port(u16::from_be_bytes(frame.udp.dest))
        {
            return Err(Reason::PassNotForRelay);
        }
    }
    // Lengths come from the headers, not the frame: Ethernet pads short frames.
    if ETH_LEN + In::LEN + udp_len > ctx.data_end() - ctx.data() {
        return Err(Reason::PassTruncated);
    }
    if to_listener {
        from_client(ctx, config, frame, udp_len)
    } else {
        from_peer(ctx, config, frame, udp_len)
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
    let target =
        In::peer_of(&frame.ip, &frame.udp, channel.channel).ok_or(Reason::PassUnknownBinding)?;
    let now = clock();
    if expired(target.expires_at_ns, now) {
        return Err(Reason::PassExpired);
    }
    match target.peer_family {
        FAMILY_V4 => to_peer::<In, Ipv4Hdr>(ctx, config, input, udp_len, target, padding, now),
        FAMILY_V6 => to_peer::<In, Ipv6Hdr>(ctx, config, input, udp_len, target, padding, now),
        _ => Err(Reason::PassUnknownBinding),
    }
}

/// Channel data to a peer as plain UDP from the allocation, or, when the
/// peer is another allocation of this relay, straight to that allocation's
/// client; `now` is the clock as `from_client` read it. The datagram to the
/// peer of an allocation that asked for DONT-FRAGMENT leaves with DF set
/// (RFC 8656 section 7.2): over IPv4, the only family with the bit.
#[inline(always)]
fn to_peer<In, Out>(
    ctx: &XdpContext,
    config: &KernelConfig,
    input: &ChannelFrame<In>,
    udp_len: usize,
    target: &PeerTarget,
    padding: Padding,
    now: u64,
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
        if expired(other.expires_at_ns, now) {
            return Err(Reason::PassExpired);
        }
        return match other.client_family {
            FAMILY_V4 => {
                hairpin::<In, Ipv4Hdr>(ctx, config, input, udp_len, target, other, padding)
            }
            FAMILY_V6 => {
                hairpin::<In, Ipv6Hdr>(ctx, config, input, udp_len, target, other, padding)
            }
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
    let data_len = udp_len - UDP_LEN - CHANNEL_HEADER_LEN - padding.len as usize;
    let terms = Bindings {
        sender: Some(target),
        receiver: None,
        bytes: data_len,
    };
    let egress = next_hop::<Out>(ctx, config, &route, UDP_LEN + data_len, terms)?;
    let (mut out, _) = relay::<In, Out>(&input.udp, udp_len, &route)?;
    // Here, not in `route`: a field there changed the layout of every
    // path's `Relay`, and the hairpin's became a `memmove` call.
    if target.dont_fragment() {
        out.ip.set_dont_fragment();
    }
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
        egress,
    })
}

/// Channel data from one client of this relay to another's channel.
#[inline(always)]
fn hairpin<In, Out>(
    ctx: &XdpContext,
    config: &KernelConfig,
    input: &ChannelFrame<In>,
    udp_len: usize,
    sender: &PeerTarget,
    other: &ClientTarget,
    padding: Padding,
) -> Result<Relayed, Reason>
where
    In: IpVersion + Translate<Out>,
    Out: IpVersion,
{
    // From the listener the other client talks to, as its peer's data would be.
    let route = Relay {
        saddr: Out::addr(&other.listener_ip),
        daddr: Out::addr(&other.client_ip),
        source: other.listener_port,
        dest: other.client_port,
        removed: Some(input.channel),
        added: Some(other.channel),
        padding,
    };
    let data_len = udp_len - UDP_LEN - CHANNEL_HEADER_LEN - padding.len as usize;
    let terms = Bindings {
        sender: Some(sender),
        receiver: Some(other),
        bytes: data_len,
    };
    let udp_out = UDP_LEN + CHANNEL_HEADER_LEN + data_len;
    let egress = next_hop::<Out>(ctx, config, &route, udp_out, terms)?;
    let (udp, added) = relay::<In, Out>(&input.udp, udp_len, &route)?;
    let out = ChannelFrame {
        udp,
        channel: added.unwrap_or_default(),
    };
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
        egress,
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
    if expired(target.expires_at_ns, clock()) {
        return Err(Reason::PassExpired);
    }
    match target.client_family {
        FAMILY_V4 => to_client::<In, Ipv4Hdr>(ctx, config, frame, udp_len, target),
        FAMILY_V6 => to_client::<In, Ipv6Hdr>(ctx, config, frame, udp_len, target),
        _ => Err(Reason::PassUnknownPeer),
    }
}

/// A peer's datagram to the client as channel data from the listener it
/// talks to.
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
    let route = Relay {
        saddr: Out::addr(&target.listener_ip),
        daddr: Out::addr(&target.client_ip),
        source: target.listener_port,
        dest: target.client_port,
        removed: None,
        added: Some(target.channel),
        padding: Padding::default(),
    };
    let data_len = udp_len - UDP_LEN;
    let terms = Bindings {
        sender: None,
        receiver: Some(target),
        bytes: data_len,
    };
    let egress = next_hop::<Out>(ctx, config, &route, udp_len + CHANNEL_HEADER_LEN, terms)?;
    let (udp, added) = relay::<In, Out>(frame, udp_len, &route)?;
    let out = ChannelFrame {
        udp,
        channel: added.unwrap_or_default(),
    };
    emit(ctx, config, size_of::<UdpFrame<In>>(), &out, data_len)?;
    Ok(Relayed {
        reason: In::TO_CLIENT[Out::INDEX],
        bytes: data_len as u64,
        egress,
    })
}

/// `BPF_FIB_LKUP_RET_*` results the program tells apart.
const FIB_SUCCESS: i64 = 0;
const FIB_FORWARDING_DISABLED: i64 = 5;
const FIB_NO_NEIGHBOUR: i64 = 7;
const FIB_FRAGMENTATION_NEEDED: i64 = 8;

/// Where the relayed frame `out` goes, checked before anything of the frame
/// changes, so that every refusal leaves it to the stack as it came. The
/// next hop's MAC addresses stay in `NEXT_HOP` until `emit` writes them.
///
/// By default the kernel's FIB says: the route for the relayed datagram
/// gives the next hop's MAC address (a gateway, or the client or peer
/// itself on the relay's segment), the egress interface and its MTU. The
/// frame goes back out of its ingress interface (`XDP_TX`) or out of another
/// interface the program is attached to (`XDP_REDIRECT` through `EGRESS`).
/// With `CONFIG_MAC_SWAP`, the frame returns to the MAC address it came from
/// (set by `relay`) and only the ingress interface's MTU is checked.
#[inline(always)]
fn next_hop<Out: IpVersion>(
    ctx: &XdpContext,
    config: &KernelConfig,
    route: &Relay<Out::Addr>,
    udp_len: usize,
    bindings: Bindings,
) -> Result<Egress, Reason> {
    let scratch = NEXT_HOP.get_ptr_mut(0).ok_or(Reason::PassNoRoute)?;
    let ip_len = Out::LEN + udp_len;
    // SAFETY: a per-CPU slot that only this run uses until it returns (XDP
    // runs with preemption disabled); all zero is "no flags, no VLAN".
    unsafe {
        if COUNT_USAGE {
            let terms_of = |slot: u32, meters: [u64; 2]| Terms {
                meters,
                slot: u64::from(slot),
            };
            let sending = bindings.sender.map_or(Terms::NONE, |sender| {
                terms_of(sender.usage_slot, sender.meters)
            });
            let receiving = bindings.receiver.map_or(Terms::NONE, |receiver| {
                terms_of(receiver.usage_slot, receiver.meters)
            });
            let accounted = sending.any() | receiving.any();
            (*scratch).accounted = accounted;
            if accounted != 0 {
                (*scratch).bytes = bindings.bytes as u64;
                (*scratch).terms = [sending, receiving];
            }
        }
        if config.mac_swap() {
            (*scratch).mtu_len = ip_len as u32;
        } else {
            // `struct bpf_fib_lookup` as eight words, written whole: field
            // by field from a zeroed struct costs a byte-wise `memset` call
            // at this crate's opt-level. Word 0: family, protocol, ports
            // and the IP length (host order: the kernel compares it with
            // the route's MTU); 1: the ingress ifindex, no flow info; 2-3
            // and 4-5: the addresses; 6-7: no VLAN, room for the MACs.
            let head = u64::from(Out::AF)
                | u64::from(IPPROTO_UDP) << 8
                | u64::from(u16::from_ne_bytes(route.source)) << 16
                | u64::from(u16::from_ne_bytes(route.dest)) << 32
                | (ip_len as u64) << 48;
            let [src_high, src_low] = Out::fib_words(route.saddr);
            let [dst_high, dst_low] = Out::fib_words(route.daddr);
            let words = (&raw mut (*scratch).params).cast::<u64>();
            words.write_volatile(head);
            words
                .add(1)
                .write_volatile(u64::from((*ctx.ctx).ingress_ifindex));
            words.add(2).write_volatile(src_high);
            words.add(3).write_volatile(src_low);
            words.add(4).write_volatile(dst_high);
            words.add(5).write_volatile(dst_low);
            words.add(6).write_volatile(0);
            words.add(7).write_volatile(0);
        }
    }
    match look_up_next_hop(ctx.ctx, config.mac_swap()) {
        EGRESS_INGRESS => Ok(Egress::Ingress),
        EGRESS_REDIRECT => Ok(Egress::Redirect),
        reason => Err(reason_from(reason)),
    }
}

/// `look_up_next_hop`'s answers besides a `Reason` index.
const EGRESS_INGRESS: u32 = u32::MAX;
const EGRESS_REDIRECT: u32 = u32::MAX - 1;

/// The pass reasons `look_up_next_hop` returns, as the `Reason` they index.
#[inline(always)]
fn reason_from(index: u32) -> Reason {
    match index {
        i if i == Reason::PassForwardingDisabled as u32 => Reason::PassForwardingDisabled,
        i if i == Reason::PassNoNeighbour as u32 => Reason::PassNoNeighbour,
        i if i == Reason::PassMtuExceeded as u32 => Reason::PassMtuExceeded,
        i if i == Reason::PassEgressNotAttached as u32 => Reason::PassEgressNotAttached,
        i if i == Reason::DropRateLimited as u32 => Reason::DropRateLimited,
        _ => Reason::PassNoRoute,
    }
}

/// `next_hop`'s helper calls on what it wrote to `NEXT_HOP`, in a function
/// of its own: inlined into each of the twelve relay paths, their locals
/// would not fit the program's stack. Returns a plain `u32` across the call:
/// an `EGRESS_*` answer or the index of the `Reason` to pass the frame for.
#[inline(never)]
fn look_up_next_hop(ctx: *mut xdp_md, mac_swap: bool) -> u32 {
    let Some(scratch) = NEXT_HOP.get_ptr_mut(0) else {
        return Reason::PassNoRoute as u32;
    };
    if mac_swap {
        // SAFETY: the helper reads the context and the slot's `mtu_len`
        // (the IP length to check), and writes it; ifindex 0 is the
        // ingress interface.
        let too_big = unsafe { bpf_check_mtu(ctx.cast(), 0, &mut (*scratch).mtu_len, 0, 0) };
        return if too_big != 0 {
            Reason::PassMtuExceeded as u32
        } else if COUNT_USAGE && over_rate(scratch) {
            Reason::DropRateLimited as u32
        } else {
            EGRESS_INGRESS
        };
    }
    // SAFETY: as in `next_hop`; `ctx` is the program's `xdp_md`.
    let (params, ingress) = unsafe { (&mut (*scratch).params, (*ctx).ingress_ifindex) };
    // SAFETY: `params` is a valid, writable `bpf_fib_lookup` of the size given.
    let result = unsafe { fib_lookup(ctx.cast(), params, size_of::<bpf_fib_lookup>() as i32, 0) };
    match result {
        FIB_SUCCESS => {}
        FIB_FORWARDING_DISABLED => return Reason::PassForwardingDisabled as u32,
        FIB_NO_NEIGHBOUR => return Reason::PassNoNeighbour as u32,
        FIB_FRAGMENTATION_NEEDED => return Reason::PassMtuExceeded as u32,
        _ => return Reason::PassNoRoute as u32,
    }
    let egress = if params.ifindex == ingress {
        EGRESS_INGRESS
    } else {
        // The redirect is recorded now and carried out when the program
        // returns `XDP_REDIRECT` (a drop ignores it); an interface not in
        // `EGRESS` passes the frame.
        match EGRESS.redirect(params.ifindex, u64::from(xdp_action::XDP_PASS)) {
            Ok(_) => EGRESS_REDIRECT,
            Err(_) => return Reason::PassEgressNotAttached as u32,
        }
    };
    // Metered once the packet is known to leave: one the stack gets is
    // metered in user space instead.
    if COUNT_USAGE && over_rate(scratch) {
        return Reason::DropRateLimited as u32;
    }
    egress
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
        if in_len != out_len && !move_data(ctx.ctx, in_len, out_len, data_len) {
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
    if !config.mac_swap()
        && let Some(scratch) = NEXT_HOP.get_ptr(0)
    {
        // The next hop `next_hop` found. SAFETY: `T` starts with an
        // Ethernet header, inside the bounds checked above; the per-CPU
        // slot holds this run's lookup.
        // As 16-bit words: six-byte arrays copy byte by byte at this crate's
        // opt-level. The MACs lie at even offsets of the slot, and the
        // frame at an even address (see `header`).
        unsafe {
            let dmac = (&raw const (*scratch).params.dmac)
                .cast::<[u16; 3]>()
                .read();
            let smac = (&raw const (*scratch).params.smac)
                .cast::<[u16; 3]>()
                .read();
            start.cast::<[[u16; 3]; 2]>().write([dmac, smac]);
        }
    }
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
/// the program's code and the default mode never runs it. One loop for both
/// directions and no closure keep its stack frame small: the verifier counts
/// it on top of the program's.
#[inline(never)]
fn move_data(ctx: *mut xdp_md, from: usize, to: usize, data_len: usize) -> bool {
    let Some(buffer) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let buffer = buffer.cast();
    let grow = to > from;
    // SAFETY: the helper checks the context and the delta itself.
    if grow && unsafe { bpf_xdp_adjust_tail(ctx, (to - from) as i32) } != 0 {
        return false;
    }
    let mut done = 0;
    for _ in 0..MOVE_MAX / MOVE_CHUNK {
        if done >= data_len {
            break;
        }
        let len = (data_len - done).min(MOVE_CHUNK);
        // Growing, copy from the end, so that nothing is overwritten unread.
        let offset = if grow { data_len - done - len } else { done };
        // `len` is 1..=MOVE_CHUNK; the mask makes that range visible to the
        // verifier, which refuses a possibly zero-sized access.
        let masked = (((len - 1) & (MOVE_CHUNK - 1)) + 1) as u32;
        // SAFETY: the helpers bound-check offsets against the frame and
        // `masked` (at most MOVE_CHUNK) against the buffer.
        let moved = unsafe {
            bpf_xdp_load_bytes(ctx, (from + offset) as u32, buffer, masked) == 0
                && bpf_xdp_store_bytes(ctx, (to + offset) as u32, buffer, masked) == 0
        };
        if !moved {
            return false;
        }
        done += len;
    }
    // SAFETY: the helper checks the context and the delta itself.
    grow || unsafe { bpf_xdp_adjust_tail(ctx, -((from - to) as i32)) == 0 }
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

/// Charges the meters (see `charge_rates`) and counts the packet just
/// relayed in the usage slots of the bindings it went on (see
/// `Scratch::terms`). Calls only what the bindings ask for: a binding
/// without meters costs no call to `charge_rates`.
#[inline(always)]
fn count_usage() {
    let Some(scratch) = NEXT_HOP.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's slot, written by `next_hop` in this run (every
    // relay path calls it).
    if unsafe { (*scratch).accounted } == 0 {
        return;
    }
    // SAFETY: as above.
    let (bytes, sender, receiver, metered) = unsafe {
        let terms = &(*scratch).terms;
        (
            (*scratch).bytes,
            terms[CLIENT_TO_PEER].slot,
            terms[PEER_TO_CLIENT].slot,
            terms[0].meters[0] | terms[0].meters[1] | terms[1].meters[0] | terms[1].meters[1],
        )
    };
    if metered != 0 {
        charge_rates();
    }
    if sender != 0 {
        add_usage(sender as u32, CLIENT_TO_PEER as u32, bytes);
    }
    if receiver != 0 {
        add_usage(receiver as u32, PEER_TO_CLIENT as u32, bytes);
    }
}

/// Adds one packet of `bytes` to counter `counter` of slot `slot`
/// (`BindingUsage` as four counters: relayed client-to-peer and
/// peer-to-client, then dropped the same ways). Not inlined: one copy of
/// the atomic adds for every path.
#[inline(never)]
fn add_usage(slot: u32, counter: u32, bytes: u64) -> u32 {
    let Some(usage) = USAGE.get_ptr_mut(slot) else {
        return 0;
    };
    // SAFETY: `usage` points at a whole `BindingUsage` in the map's
    // memory, which lives as long as the program; its u64 fields are
    // 8-aligned, and every writer (this program on every CPU) adds
    // atomically; the agent only reads, and zeroes a slot before it names
    // it in an entry.
    unsafe {
        let counters = usage.cast::<Counter>().add((counter & 3) as usize);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*counters).packets, 1);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*counters).bytes, bytes);
    }
    0
}

/// Whether the packet `scratch` describes exceeds a rate of the bindings it
/// would go on: their allocations' and users' meters, each for its
/// direction. A dropped packet is counted in the usage of the binding whose
/// meter dropped it. Nothing is charged here: a packet that passes is
/// charged by `charge_rates` once it is relayed (a frame that cannot be
/// rewritten after all goes to the stack, where user space meters it), so
/// that it costs every meter or none.
#[inline(always)]
fn over_rate(scratch: *mut Scratch) -> bool {
    // SAFETY: this CPU's slot, just written by `next_hop`.
    if unsafe { (*scratch).accounted } == 0 {
        return false;
    }
    // SAFETY: as above.
    let terms = unsafe { &(*scratch).terms };
    if terms[0].meters[0] | terms[0].meters[1] | terms[1].meters[0] | terms[1].meters[1] == 0 {
        return false;
    }
    // SAFETY: as above; the helper takes no arguments and only reads the clock.
    let (bytes, now) = unsafe { ((*scratch).bytes, bpf_ktime_get_coarse_ns()) };
    let (sending, receiving) = (&terms[CLIENT_TO_PEER], &terms[PEER_TO_CLIENT]);
    if !side_admits(sending, CLIENT_TO_PEER, bytes, now, false) {
        add_usage(sending.slot as u32, (CLIENT_TO_PEER + 2) as u32, bytes);
        return true;
    }
    if !side_admits(receiving, PEER_TO_CLIENT, bytes, now, false) {
        add_usage(receiving.slot as u32, (PEER_TO_CLIENT + 2) as u32, bytes);
        return true;
    }
    false
}

/// Charges the meters of the packet just relayed (see `over_rate`). Not
/// inlined, and without arguments: the entry point's stack is full, and
/// most bindings have no meter.
#[inline(never)]
fn charge_rates() -> u32 {
    let Some(scratch) = NEXT_HOP.get_ptr(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, written by `next_hop` in this run.
    let terms = unsafe { &(*scratch).terms };
    // SAFETY: as above; the helper takes no arguments and only reads the clock.
    let (bytes, now) = unsafe { ((*scratch).bytes, bpf_ktime_get_coarse_ns()) };
    side_admits(&terms[CLIENT_TO_PEER], CLIENT_TO_PEER, bytes, now, true);
    side_admits(&terms[PEER_TO_CLIENT], PEER_TO_CLIENT, bytes, now, true);
    0
}

/// Whether both meters of one binding admit the packet (see
/// `charge_meter`); with `commit`, charges them.
#[inline(always)]
fn side_admits(side: &Terms, direction: usize, bytes: u64, now: u64, commit: bool) -> bool {
    (side.meters[0] == 0 || charge_meter(side.meters[0], direction, bytes, now, commit))
        && (side.meters[1] == 0 || charge_meter(side.meters[1], direction, bytes, now, commit))
}

/// Whether meter `key` admits a packet of `bytes` going `direction` at
/// `now` (an absent meter admits everything); with `commit`, charges it
/// instead, whatever its time (the packet was admitted, and relayed). A
/// compare-and-exchange that loses a race with another CPU's charge is made
/// again as an add: the cost is never lost, at worst counted from a time
/// already past.
#[inline(always)]
fn charge_meter(key: u64, direction: usize, bytes: u64, now: u64, commit: bool) -> bool {
    let Some(meter) = METERS.get_ptr_mut(key) else {
        return true;
    };
    // SAFETY: `meter` points at a whole `Meter`, in memory that outlives
    // this run (see `BINDING_FLAGS`); its times are 8-aligned u64s that the
    // program only changes atomically, and an aligned 8-byte load is atomic.
    unsafe {
        let time = if direction == CLIENT_TO_PEER {
            &raw mut (*meter).tat_ns[CLIENT_TO_PEER]
        } else {
            &raw mut (*meter).tat_ns[PEER_TO_CLIENT]
        };
        let held = time.read_volatile();
        let cost = (*meter).cost_ns(bytes);
        if !commit {
            return gcra(held, now, cost, (*meter).burst_ns).is_some();
        }
        let next = held.max(now).saturating_add(cost);
        let (_, exchanged) = atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(time, held, next);
        if !exchanged {
            atomic_xadd::<u64, u64, { Relaxed }>(time, cost);
        }
    }
    true
}

/// The kernel's coarse monotonic clock, the one bindings expire on: read
/// once per packet, and only for a packet whose binding was found (the
/// coarse clock is a load of the last tick's time, no clock source read).
#[inline(always)]
fn clock() -> u64 {
    if !CHECK_EXPIRY {
        return 0;
    }
    // SAFETY: the helper takes no arguments and only reads the clock.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Whether a binding whose authorisation ends at `expires_at_ns` has
/// expired at `now`: its entry then counts as absent.
#[inline(always)]
fn expired(expires_at_ns: u64, now: u64) -> bool {
    CHECK_EXPIRY && now >= expires_at_ns
}

/// Whether two strings are equal, at compile time.
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
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
    /// `AF_INET` or `AF_INET6`, for the FIB lookup.
    const AF: u8;
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
    /// Where a client's channel goes: the key is the datagram's source,
    /// its destination (the listener) and the channel.
    fn peer_of(ip: &Self, udp: &UdpHdr, channel: [u8; 2]) -> Option<&'static PeerTarget>;
    /// An address as the two native-order words of its place in FIB
    /// lookup parameters (an IPv4 address in the first four bytes).
    fn fib_words(addr: Self::Addr) -> [u64; 2];
    /// Which client and channel a peer's datagrams to an allocation go to.
    fn client_of(
        peer: Self::Addr,
        port: [u8; 2],
        allocation_port: [u8; 2],
    ) -> Option<&'static ClientTarget>;
}

impl IpVersion for Ipv4Hdr {
    const INDEX: usize = 0;
    const AF: u8 = 2;
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
    fn peer_of(ip: &Self, udp: &UdpHdr, channel: [u8; 2]) -> Option<&'static PeerTarget> {
        let key = ClientKeyV4 {
            client_ip: ip.saddr,
            client_port: udp.source,
            channel,
            listener_ip: ip.daddr,
            listener_port: udp.dest,
            reserved: [0; 2],
        };
        // SAFETY: see `BINDING_FLAGS`: the element stays as it is until the
        // program returns, whatever user space does to the map meanwhile.
        unsafe { CLIENT_V4.get(key) }
    }

    #[inline(always)]
    fn fib_words(addr: [u8; 4]) -> [u64; 2] {
        [u64::from(u32::from_ne_bytes(addr)), 0]
    }

    #[inline(always)]
    fn client_of(
        peer_ip: [u8; 4],
        peer_port: [u8; 2],
        allocation_port: [u8; 2],
    ) -> Option<&'static ClientTarget> {
        let key = PeerKeyV4 {
            peer_ip,
            peer_port,
            allocation_port,
        };
        // SAFETY: as in `peer_of`.
        unsafe { PEER_V4.get(key) }
    }
}

impl IpVersion for Ipv6Hdr {
    const INDEX: usize = 1;
    const AF: u8 = 10;
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
    fn peer_of(ip: &Self, udp: &UdpHdr, channel: [u8; 2]) -> Option<&'static PeerTarget> {
        let key = ClientKeyV6 {
            client_ip: ip.saddr,
            client_port: udp.source,
            channel,
            listener_ip: ip.daddr,
            listener_port: udp.dest,
            reserved: [0; 2],
        };
        // SAFETY: as for IPv4.
        unsafe { CLIENT_V6.get(key) }
    }

    #[inline(always)]
    fn fib_words(addr: [u8; 16]) -> [u64; 2] {
        let [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p] = addr;
        [
            u64::from_ne_bytes([a, b, c, d, e, f, g, h]),
            u64::from_ne_bytes([i, j, k, l, m, n, o, p]),
        ]
    }

    #[inline(always)]
    fn client_of(
        peer_ip: [u8; 16],
        peer_port: [u8; 2],
        allocation_port: [u8; 2],
    ) -> Option<&'static ClientTarget> {
        let key = PeerKeyV6 {
            peer_ip,
            peer_port,
            allocation_port,
        };
        // SAFETY: as for IPv4.
        unsafe { PEER_V6.get(key) }
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
