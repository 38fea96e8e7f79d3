//! Benchmark reference: the least any XDP TURN relay must do per packet when
//! the kernel's FIB picks the next hop (the relay's default, xdp-agent
//! `--next-hop fib`). One hash-map lookup on a 12-byte key taken from the
//! packet (IPv4 source and destination address, UDP source and destination
//! port), a `bpf_fib_lookup` for the frame's destination, the next hop's MAC
//! addresses written into the frame and `XDP_TX`. The relay's FIB mode is
//! measured against it, as its MAC-swap mode is against `floor`.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    btf_maps::HashMap,
    helpers::generated::bpf_fib_lookup as fib_lookup,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Offset of the IPv4 header in an untagged frame.
const IP_OFFSET: usize = 14;
/// Offset of the IPv4 source address in an untagged frame.
const FLOW_OFFSET: usize = IP_OFFSET + 12;

/// `AF_INET`, for the FIB lookup.
const AF_INET: u8 = 2;
/// `IPPROTO_UDP`.
const IPPROTO_UDP: u8 = 17;
/// `BPF_FIB_LKUP_RET_SUCCESS`.
const FIB_SUCCESS: i64 = 0;

/// The flow key as on the wire: IPv4 source and destination address, UDP
/// source and destination port. At alignment 2, like the relay's header
/// types, so that both programs move 16-bit words rather than bytes.
#[repr(C, align(2))]
#[derive(Clone, Copy)]
struct FlowKey([u8; 12]);

/// Flows the floor program "relays".
#[btf_map]
static FLOWS: HashMap<FlowKey, u32, 65536> = HashMap::new();

#[xdp]
pub fn xdp_floor_fib(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + FLOW_OFFSET + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: bounds checked above; the key lies at an even offset of a frame
    // that starts at an even address (see the relay's `header`).
    let key = unsafe { *((start + FLOW_OFFSET) as *const FlowKey) };
    if FLOWS.get_ptr(key).is_none() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the IP header's total length (offset 2) lies within the
    // checked range, at an even offset.
    let tot_len = u16::from_be(unsafe { *((start + IP_OFFSET + 2) as *const u16) });
    // The key's six 16-bit words: addresses and ports as on the wire,
    // combined in registers (`bpfel`: the first word is the low half).
    // SAFETY: `FlowKey` is 12 plain bytes at alignment 2.
    let [s0, s1, d0, d1, sport, dport] = unsafe { core::mem::transmute::<FlowKey, [u16; 6]>(key) };
    // SAFETY: the context is the program's `xdp_md`.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // On the stack (64 bytes, well within this small program's 512) as
    // eight 64-bit words built in registers: no flags, no VLAN, TOS 0, as
    // the relay asks. Word by word, volatile: as a struct, the zeroed
    // fields become calls of a byte-wise `memset` at opt-level "z".
    let (saddr, daddr) = (
        u64::from(s0) | u64::from(s1) << 16,
        u64::from(d0) | u64::from(d1) << 16,
    );
    // family, l4_protocol, sport, dport, tot_len (host order: the kernel
    // compares it with the route's MTU)
    let head = u64::from(AF_INET)
        | u64::from(IPPROTO_UDP) << 8
        | u64::from(sport) << 16
        | u64::from(dport) << 32
        | u64::from(tot_len) << 48;
    let mut params = MaybeUninit::<bpf_fib_lookup>::uninit();
    let slots = params.as_mut_ptr().cast::<u64>();
    // SAFETY: eight words fill the 64-byte, 8-aligned struct.
    unsafe {
        slots.write_volatile(head);
        // ifindex, tos
        slots.add(1).write_volatile(u64::from(ingress));
        // ipv4_src, ipv4_dst (each the first word of an IPv6-sized union)
        slots.add(2).write_volatile(saddr);
        slots.add(3).write_volatile(0);
        slots.add(4).write_volatile(daddr);
        slots.add(5).write_volatile(0);
        // VLAN / tbid, smac, dmac: outputs
        slots.add(6).write_volatile(0);
        slots.add(7).write_volatile(0);
    }
    // SAFETY: `params` is a valid, writable `bpf_fib_lookup` of the size
    // given; flags 0: the main table, as if forwarding from `ingress`.
    let result = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            params.as_mut_ptr(),
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // The floor has one interface: a route out of another one is not its case
    // (the relay redirects it through a devmap).
    // SAFETY: every byte was written above.
    let params = unsafe { params.assume_init() };
    if result != FIB_SUCCESS || params.ifindex != ingress {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the MACs lie within the checked range, at the start; the frame
    // starts at an even address. Written as six 16-bit words.
    let macs = unsafe { &mut *(start as *mut [u16; 6]) };
    let [d0, d1, d2] = words(params.dmac);
    let [s0, s1, s2] = words(params.smac);
    *macs = [d0, d1, d2, s0, s1, s2];
    xdp_action::XDP_TX
}

/// A MAC address as three 16-bit words in memory order.
#[inline(always)]
fn words(mac: [u8; 6]) -> [u16; 3] {
    [
        u16::from_ne_bytes([mac[0], mac[1]]),
        u16::from_ne_bytes([mac[2], mac[3]]),
        u16::from_ne_bytes([mac[4], mac[5]]),
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
