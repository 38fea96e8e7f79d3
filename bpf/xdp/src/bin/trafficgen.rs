//! Benchmark load generator, run by `BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` on a veth: every run rewrites the first
//! `TEMPLATE_LEN` bytes of the frame (Ethernet, IPv4, UDP and channel headers)
//! from `TEMPLATE` and returns `XDP_TX`, so the kernel sends the frame out of
//! the veth to the system under test.
//!
//! The rewrite matters: the kernel does not re-initialise live frames between
//! runs, and pages come back to the test run's page pool after the relay has
//! rewritten them in place (headers, MACs) and the sink has dropped them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::Array,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Bytes of the template written into every frame (frames are at least this long).
const TEMPLATE_LEN: usize = 64;

/// The frame's first bytes, written by the bench before the run.
#[btf_map]
static TEMPLATE: Array<[u64; TEMPLATE_LEN / 8], 1> = Array::new();

#[xdp]
pub fn xdp_trafficgen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + TEMPLATE_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let Some(template) = TEMPLATE.get_ptr(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let frame = start as *mut u64;
    // SAFETY: TEMPLATE_LEN bytes of the frame were bounds-checked above; the
    // template is a map value of that size; unaligned access is allowed.
    unsafe {
        let template = &*template;
        for (i, word) in template.iter().enumerate() {
            frame.add(i).write_unaligned(*word);
        }
    }
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
