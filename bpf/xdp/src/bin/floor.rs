//! Benchmark reference: the least any XDP TURN relay must do per packet. One
//! hash-map lookup on a 12-byte key taken from the packet (IPv4 source and
//! destination address, UDP source and destination port), a MAC swap and
//! `XDP_TX`. The relay's paths are measured against it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::HashMap,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Offset of the IPv4 source address in an untagged frame.
const FLOW_OFFSET: usize = 14 + 12;

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
pub fn xdp_floor(ctx: XdpContext) -> u32 {
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
    // SAFETY: the MACs lie within the checked range, at the start; the frame
    // starts at an even address. Swapped as six 16-bit words in registers.
    let macs = unsafe { &mut *(start as *mut [u16; 6]) };
    let [d0, d1, d2, s0, s1, s2] = *macs;
    *macs = [s0, s1, s2, d0, d1, d2];
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
