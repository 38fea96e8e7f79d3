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

/// Flows the floor program "relays": key = addresses and ports as on the wire.
#[btf_map]
static FLOWS: HashMap<[u8; 12], u32, 65536> = HashMap::new();

#[xdp]
pub fn xdp_floor(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + FLOW_OFFSET + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: bounds checked above; [u8; 12] has alignment 1.
    let key = unsafe { *((start + FLOW_OFFSET) as *const [u8; 12]) };
    if FLOWS.get_ptr(key).is_none() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet header lies within the checked range.
    let eth = unsafe { &mut *(start as *mut [[u8; 6]; 2]) };
    let [dst, src] = eth;
    core::mem::swap(dst, src);
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
