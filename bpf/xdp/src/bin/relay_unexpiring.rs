//! The relay program without its expiry check: `src/main.rs` built again as
//! the binary `relay_unexpiring`, which its `CHECK_EXPIRY` turns off. Only the
//! bench loads it, beside the program the agent loads, to measure what the
//! check costs per packet; nothing else differs between the two objects.
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
