//! Benchmark sink: counts and drops the frames the system under test sends
//! back, per rule (destination IPv4 address and UDP port), and checks each
//! one's source address and port, UDP length and, for channel data, channel
//! number. Everything else (ARP, the TURN control exchange) goes to the stack.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Number of rules.
const RULES_LEN: usize = 4;

/// What a class of frames looks like, all fields in network byte order. A
/// rule with `dst_port == 0` is unused; a zero `udp_len` or `channel` is not
/// checked.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Rule {
    pub dst_ip: [u8; 4],
    pub src_ip: [u8; 4],
    pub dst_port: [u8; 2],
    pub src_port: [u8; 2],
    pub udp_len: [u8; 2],
    pub channel: [u8; 2],
}

/// Per rule: frames, bytes, frames that failed a check.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
    pub bad: u64,
}

#[btf_map]
static RULES: Array<Rule, RULES_LEN> = Array::new();

#[btf_map]
static COUNTS: PerCpuArray<Count, RULES_LEN> = PerCpuArray::new();

/// Ethernet + IPv4 (no options) + UDP + 2 bytes of payload.
const CHECKED_LEN: usize = 14 + 20 + 8 + 2;

#[xdp]
pub fn xdp_sink(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + CHECKED_LEN > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: CHECKED_LEN bytes were bounds-checked above.
    let frame = unsafe { &*(start as *const [u8; CHECKED_LEN]) };
    if frame[12] != 0x08 || frame[13] != 0x00 || frame[14] != 0x45 || frame[23] != 17 {
        return xdp_action::XDP_PASS;
    }
    let dst_ip = [frame[30], frame[31], frame[32], frame[33]];
    let dst_port = [frame[36], frame[37]];
    for index in 0..RULES_LEN as u32 {
        let Some(rule) = RULES.get_ptr(index) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: a map value pointer from a successful lookup.
        let rule = unsafe { &*rule };
        if rule.dst_port == [0, 0] {
            continue;
        }
        if rule.dst_ip != dst_ip || rule.dst_port != dst_port {
            continue;
        }
        let ok = rule.src_ip == [frame[26], frame[27], frame[28], frame[29]]
            && rule.src_port == [frame[34], frame[35]]
            && (rule.udp_len == [0, 0] || rule.udp_len == [frame[38], frame[39]])
            && (rule.channel == [0, 0] || rule.channel == [frame[42], frame[43]]);
        if let Some(count) = COUNTS.get_ptr_mut(index) {
            // SAFETY: this CPU's slot of a per-CPU map; XDP does not nest.
            let count = unsafe { &mut *count };
            count.packets += 1;
            count.bytes += (end - start) as u64;
            if !ok {
                count.bad += 1;
            }
        }
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
