//! Benchmark load generator, run by `BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` on a veth: every run rewrites the first
//! `TEMPLATE_LEN` bytes of the frame (Ethernet, IPv4, UDP and channel headers)
//! from `TEMPLATE` and returns `XDP_TX`, so the kernel sends the frame out of
//! the veth to the system under test.
//!
//! The rewrite matters: the kernel does not re-initialise live frames between
//! runs, and pages come back to the test run's page pool after the relay has
//! rewritten them in place (headers, MACs) and the sink has dropped them.
//!
//! Pacing happens here too: with `PACE[0]` (ns between frames) non-zero, a
//! run that comes before its time returns `XDP_DROP` (nothing is sent), so
//! the frames that are sent are evenly spaced, without syscalls in between
//! (a `BPF_PROG_TEST_RUN` call has a large fixed cost). `SENT[0]` counts the
//! frames sent. A test run stays on one CPU: plain map updates suffice.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::Array,
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Bytes of the template written into every frame (frames are at least this long).
const TEMPLATE_LEN: usize = 64;

/// The frame's first bytes, written by the bench before the run.
#[btf_map]
static TEMPLATE: Array<[u64; TEMPLATE_LEN / 8], 1> = Array::new();

/// Nanoseconds between frames (0: as fast as possible).
#[btf_map]
static PACE: Array<u64, 1> = Array::new();

/// When the next frame is due (ns, `bpf_ktime_get_ns`).
#[btf_map]
static NEXT: Array<u64, 1> = Array::new();

/// Frames sent.
#[btf_map]
static SENT: Array<u64, 1> = Array::new();

/// A late frame does not make the next ones come sooner by more than this.
const MAX_DEBT_NS: u64 = 100_000;

#[xdp]
pub fn xdp_trafficgen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + TEMPLATE_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(pace), Some(next), Some(sent)) =
        (PACE.get_ptr(0), NEXT.get_ptr_mut(0), SENT.get_ptr_mut(0))
    else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: map values from successful lookups; one CPU runs the test.
    let (pace, next, sent) = unsafe { (*pace, &mut *next, &mut *sent) };
    if pace != 0 {
        // SAFETY: a helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        if now < *next {
            return xdp_action::XDP_DROP;
        }
        let base = if now > *next + MAX_DEBT_NS {
            now
        } else {
            *next
        };
        *next = base + pace;
    }
    *sent += 1;
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
