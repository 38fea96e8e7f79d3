//! The relay's XDP program: TURN channel data from clients becomes plain UDP
//! to peers, rewritten in place and sent back out with `XDP_TX`; everything
//! else goes to the kernel's stack, where turn-control handles it.
//!
//! `xdp_relay` is a thin entry point: `try_relay` returns the reason for its
//! verdict, every reason maps to exactly one verdict (`Reason::verdict`) and
//! one per-CPU counter.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use bpf_common::{
    ClientKeyV4, Counter, DataPlaneConfig, FAMILY_V4, MAX_BINDINGS, PeerTarget, REASON_COUNT,
    Reason, Verdict,
    packet::{
        CHANNEL_HEADER_LEN, ChannelHdr, ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPPROTO_UDP,
        IPV4_FRAGMENT_MASK, IPV4_LEN, UDP_LEN, V4UdpHeaders,
    },
};

/// The data-plane configuration: one entry, written by the agent.
#[btf_map]
static CONFIG: Array<DataPlaneConfig, 1> = Array::new();

/// IPv4 client (address, port, channel) -> where its channel data goes.
#[btf_map]
static CLIENT_V4: HashMap<ClientKeyV4, PeerTarget, { MAX_BINDINGS as usize }> = HashMap::new();

/// Per-CPU packet and byte counters, indexed by `Reason`.
#[btf_map]
static STATS: PerCpuArray<Counter, { REASON_COUNT as usize }> = PerCpuArray::new();

/// A frame relayed: the reason to count and the application bytes it carried.
struct Relayed {
    reason: Reason,
    bytes: u64,
}

#[xdp]
pub fn xdp_relay(ctx: XdpContext) -> u32 {
    let (reason, bytes) = match try_relay(&ctx) {
        Ok(relayed) => (relayed.reason, relayed.bytes),
        Err(reason) => (reason, (ctx.data_end() - ctx.data()) as u64),
    };
    count(reason, bytes);
    match reason.verdict() {
        Verdict::Tx => xdp_action::XDP_TX,
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn try_relay(ctx: &XdpContext) -> Result<Relayed, Reason> {
    let config = CONFIG.get(0).ok_or(Reason::PassNotConfigured)?;
    if !config.enabled() {
        return Err(Reason::PassNotConfigured);
    }
    // SAFETY: `header` checked the bounds; `EthHdr` is plain bytes.
    let ether_type = unsafe { (*header::<EthHdr>(ctx, 0)?).ether_type };
    match ether_type {
        ETH_P_IPV4 => relay_v4(ctx, config),
        ETH_P_IPV6 => Err(Reason::PassIpv6),
        _ => Err(Reason::PassNotIp),
    }
}

/// IPv4 channel data from a client to the listen port (RFC 8656 section 12.6).
#[inline(always)]
fn relay_v4(ctx: &XdpContext, config: &DataPlaneConfig) -> Result<Relayed, Reason> {
    // SAFETY: `header` checked the bounds; the headers are plain bytes, copied
    // out because adjusting the head below invalidates the frame pointers.
    let mut headers = unsafe { *header::<V4UdpHeaders>(ctx, 0)? };
    let ip = &headers.ip;
    if ip.version_ihl != 0x45 {
        return Err(if ip.version_ihl >> 4 != 4 {
            Reason::PassNotIp
        } else {
            Reason::PassIpOptions
        });
    }
    if ip.protocol != IPPROTO_UDP {
        return Err(Reason::PassNotUdp);
    }
    if u16::from_be_bytes(ip.frag_off) & IPV4_FRAGMENT_MASK != 0 {
        return Err(Reason::PassFragment);
    }
    if ip.daddr != config.relay_v4 || headers.udp.dest != config.listen_port {
        return Err(Reason::PassNotForRelay);
    }
    // Lengths come from the headers, not the frame: Ethernet pads short frames.
    let frame_len = ctx.data_end() - ctx.data();
    let ip_len = u16::from_be_bytes(ip.tot_len) as usize;
    let udp_len = u16::from_be_bytes(headers.udp.len) as usize;
    if ETH_LEN + ip_len > frame_len || udp_len != ip_len - IPV4_LEN || udp_len < UDP_LEN {
        return Err(Reason::PassTruncated);
    }
    let payload_len = udp_len - UDP_LEN;
    if payload_len < CHANNEL_HEADER_LEN {
        return Err(Reason::PassNotChannelData);
    }
    // SAFETY: `header` checked the bounds; `payload_len` says the bytes are UDP payload.
    let channel = unsafe { *header::<ChannelHdr>(ctx, ETH_LEN + IPV4_LEN + UDP_LEN)? };
    if !channel.is_channel_data() {
        return Err(Reason::PassNotChannelData);
    }
    let data_len = u16::from_be_bytes(channel.len) as usize;
    if CHANNEL_HEADER_LEN + data_len > payload_len {
        return Err(Reason::DropChannelDataTruncated);
    }
    if CHANNEL_HEADER_LEN + data_len < payload_len {
        return Err(Reason::PassChannelDataPadded);
    }
    if headers.ip.ttl <= 1 {
        return Err(Reason::PassTtlExpired);
    }

    // SAFETY: the value is only read, before anything else can change the map
    // entry from this program; a concurrent update from user space replaces
    // the element (RCU), leaving this reference valid.
    let target =
        unsafe { CLIENT_V4.get(headers.client_key(&channel)) }.ok_or(Reason::PassUnknownBinding)?;
    if target.peer_family != FAMILY_V4 {
        return Err(Reason::PassUnsupportedFamily);
    }
    headers.client_to_peer_v4(&channel, config.relay_v4, target);

    // Drop the 4-byte channel header: the new headers end where it ended.
    // SAFETY: the helper checks the context and the delta itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, CHANNEL_HEADER_LEN as i32) } != 0 {
        return Err(Reason::PassAdjustFailed);
    }
    let start = header::<V4UdpHeaders>(ctx, 0).map_err(|_| Reason::PassAdjustFailed)?;
    // SAFETY: bounds re-checked against the adjusted frame; no other pointer
    // into the frame is live.
    unsafe { *start = headers };
    Ok(Relayed {
        reason: Reason::RelayClientToPeerV4V4,
        bytes: data_len as u64,
    })
}

#[inline(always)]
fn count(reason: Reason, bytes: u64) {
    if let Some(counter) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot: no other program instance touches it while
        // this one runs (XDP runs with preemption disabled).
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

/// A pointer to a `T` at `offset` in the frame, after checking that the
/// whole `T` lies inside it. Dereferencing it is sound for the `#[repr(C)]`
/// byte-array types of `bpf_common::packet` (alignment 1, any bit pattern
/// valid) until the frame's bounds change (`bpf_xdp_adjust_*`).
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic can be reached from a verified program; loop forever to satisfy the type.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
