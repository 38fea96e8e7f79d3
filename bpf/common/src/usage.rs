//! What the program counts per channel binding and how it meters an
//! allocation's or a user's rate: the layouts of `USAGE` and `METERS`, and
//! the rate arithmetic, unit-tested here on the host.
//!
//! Counters are exact: every relayed or metered-out packet is added with an
//! atomic add to its binding's slot. A flow stays on one CPU under RSS, so the
//! slot's cache line stays in that CPU's cache and the atomic add costs about
//! what a plain one does; when a binding's packets arrive on several CPUs
//! (RSS off, or a client and a peer hashed to different queues) the adds stay
//! exact and the line moves between the CPUs, which costs time, not counts.

use crate::Counter;

/// `USAGE` slots: one per binding the maps can hold in both families, and
/// slot 0, which means "not counted" (an entry written without a slot).
pub const USAGE_SLOTS: u32 = 2 * crate::MAX_BINDINGS + 1;

/// Most meters (`METERS` entries): one per allocation and one per user with a
/// limit, at most one of each per binding.
pub const MAX_METERS: u32 = 2 * crate::MAX_BINDINGS;

/// Index of the client-to-peer direction in [`Meter::tat_ns`] and
/// [`BindingTerms::meters`] users.
pub const CLIENT_TO_PEER: usize = 0;
/// Index of the peer-to-client direction.
pub const PEER_TO_CLIENT: usize = 1;

/// One binding's traffic since its slot was handed out: what the program
/// relayed each way, and what a meter dropped each way. Application bytes,
/// as [`Counter`] counts them for relay reasons. 64 bytes: a cache line, so
/// that two bindings relayed on two CPUs never share one.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindingUsage {
    /// Channel data from the client relayed to the peer (or, hairpin, to
    /// the other allocation's client).
    pub client_to_peer: Counter,
    /// The peer's datagrams relayed to the client (or, hairpin, the other
    /// allocation's channel data delivered to this one's client).
    pub peer_to_client: Counter,
    /// Client-to-peer packets a meter dropped.
    pub dropped_client_to_peer: Counter,
    /// Peer-to-client packets a meter dropped.
    pub dropped_peer_to_client: Counter,
}

impl BindingUsage {
    /// Reads a slot from its bytes (native endian).
    pub fn from_ne_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != size_of::<Self>() {
            return None;
        }
        let counter = |at: usize| Counter::from_ne_bytes(&bytes[at..at + 16]);
        Some(Self {
            client_to_peer: counter(0)?,
            peer_to_client: counter(16)?,
            dropped_client_to_peer: counter(32)?,
            dropped_peer_to_client: counter(48)?,
        })
    }
}

// SAFETY: repr(C), u64 fields at their natural alignment, 64 bytes of
// fields in a 64-byte type: no padding.
unsafe impl crate::Pod for BindingUsage {}

/// A rate limit, as the generic cell rate algorithm (GCRA, the token
/// bucket's single-word form) keeps it: each direction's theoretical
/// arrival time, which a packet of `n` bytes moves `n` times the cost of a
/// byte into the future, and which may run ahead of the clock by at most
/// the burst. One word per direction, so that the program updates it with
/// one compare-and-exchange.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meter {
    /// Nanoseconds per byte, fixed point with 16 fractional bits: 10 Gbit/s
    /// is 52 429 (0.8 ns), 1 Mbit/s 524 288 000 (8 µs).
    pub ns_per_byte_fp16: u64,
    /// How far the theoretical arrival time may run ahead of the clock
    /// before packets are dropped: the burst, in nanoseconds of the rate.
    pub burst_ns: u64,
    /// Each direction's theoretical arrival time (`CLIENT_TO_PEER`,
    /// `PEER_TO_CLIENT`) on the coarse monotonic clock; written by the
    /// program.
    pub tat_ns: [u64; 2],
}

// SAFETY: repr(C), u64 fields only, no padding.
unsafe impl crate::Pod for Meter {}

/// The burst every meter allows: 100 ms of its rate, so that over ten
/// seconds a sender at ten times the rate gets at most 1% more than the
/// rate, but at least this many bytes, so that a full-size datagram always
/// fits.
pub const METER_BURST_NS: u64 = 100_000_000;
/// See [`METER_BURST_NS`].
pub const METER_MIN_BURST_BYTES: u64 = 2_000;

impl Meter {
    /// A meter of `bytes_per_second` (at least 1), its bucket full.
    pub fn new(bytes_per_second: u64) -> Self {
        let rate = bytes_per_second.max(1);
        let ns_per_byte_fp16 = ((1_000_000_000u128 << 16) / u128::from(rate)) as u64;
        let min_burst = (u128::from(METER_MIN_BURST_BYTES) * u128::from(ns_per_byte_fp16)) >> 16;
        Self {
            ns_per_byte_fp16,
            burst_ns: METER_BURST_NS.max(min_burst as u64),
            tat_ns: [0; 2],
        }
    }

    /// The rate it enforces, bytes per second (rounded).
    pub fn bytes_per_second(&self) -> u64 {
        if self.ns_per_byte_fp16 == 0 {
            return 0;
        }
        ((1_000_000_000u128 << 16) / u128::from(self.ns_per_byte_fp16)) as u64
    }

    /// What `bytes` (a datagram's, at most 65 535) cost, in nanoseconds of
    /// the rate. A 64-bit product: the BPF target has no wider one, and at
    /// the slowest rate (1 byte/s, 2^45.9 fixed-point ns per byte) a largest
    /// datagram's cost still fits.
    #[inline(always)]
    pub fn cost_ns(&self, bytes: u64) -> u64 {
        if bytes > u64::from(u16::MAX) {
            return u64::MAX >> 16;
        }
        bytes.wrapping_mul(self.ns_per_byte_fp16) >> 16
    }
}

/// The GCRA decision for a packet that costs `cost_ns`, given a
/// direction's theoretical arrival time `tat` at `now`: `Some(new tat)` if
/// it passes, `None` if it exceeds the rate and must be dropped (the time is
/// left as it was: a dropped packet costs nothing).
#[inline(always)]
pub fn gcra(tat: u64, now: u64, cost_ns: u64, burst_ns: u64) -> Option<u64> {
    let start = if tat > now { tat } else { now };
    if start - now > burst_ns {
        return None;
    }
    Some(start.saturating_add(cost_ns))
}

/// The `METERS` key of a meter name: FNV-1a, 64 bits, never 0 (which means
/// "no meter" in a binding's entries). turn-control names meters
/// (`allocation:<id>`, `user:<name>`); the agent keys them by this hash, so
/// that it needs no table of names to find them again after a restart.
pub fn meter_key(name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_at_ten_times_the_rate_gets_the_rate_plus_the_burst() {
        let meter = Meter::new(125_000); // 1 Mbit/s
        assert_eq!(meter.bytes_per_second(), 125_000);
        let (mut tat, mut passed) = (0u64, 0u64);
        // 1 000-byte packets at 1 250 000 bytes/s for ten seconds.
        let gap = 800_000u64;
        let start = 1_000_000_000u64;
        for packet in 0..12_500u64 {
            let now = start + packet * gap;
            if let Some(next) = gcra(tat, now, meter.cost_ns(1_000), meter.burst_ns) {
                tat = next;
                passed += 1_000;
            }
        }
        let expected = 125_000 * 10;
        let burst = 125_000 / 10;
        assert!(passed >= expected, "{passed} < {expected}");
        assert!(passed <= expected + burst + 1_000, "{passed}");
    }

    #[test]
    fn a_low_rate_still_passes_a_full_size_datagram() {
        let meter = Meter::new(1_000);
        assert!(meter.burst_ns >= meter.cost_ns(METER_MIN_BURST_BYTES));
        assert!(gcra(0, 5, meter.cost_ns(1_500), meter.burst_ns).is_some());
    }

    #[test]
    fn a_dropped_packet_leaves_the_time_alone() {
        let meter = Meter::new(1_000_000);
        let tat = 10 + meter.burst_ns + 1;
        assert_eq!(gcra(tat, 10, meter.cost_ns(100), meter.burst_ns), None);
        assert_eq!(gcra(5, 10, 7, 100), Some(17));
        assert_eq!(gcra(50, 10, 7, 100), Some(57));
    }

    #[test]
    fn meter_keys_are_stable_and_never_zero() {
        assert_eq!(meter_key(""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(meter_key("allocation:1"), meter_key("allocation:2"));
        assert_ne!(meter_key("user:alice"), 0);
    }

    #[test]
    fn usage_is_one_cache_line_and_reads_back() {
        assert_eq!(size_of::<BindingUsage>(), 64);
        assert_eq!(size_of::<Meter>(), 32);
        let usage = BindingUsage {
            client_to_peer: Counter {
                packets: 1,
                bytes: 2,
            },
            dropped_peer_to_client: Counter {
                packets: 3,
                bytes: 4,
            },
            ..BindingUsage::default()
        };
        use crate::Pod;
        assert_eq!(BindingUsage::from_ne_bytes(usage.as_bytes()), Some(usage));
    }
}
