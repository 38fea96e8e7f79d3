//! The relay program without its usage counters and meters: `src/main.rs` built again as
//! the binary `relay_uncounted`, which its `COUNT_USAGE` turns off. Only the
//! bench loads it, beside the program the agent loads, to measure what they
//! cost per packet, their bookkeeping included; nothing else differs.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

#[expect(
    unused_attributes,
    reason = "main.rs is a crate root elsewhere: its #![no_std] and #![no_main] are this file's"
)]
#[path = "../main.rs"]
mod relay;
