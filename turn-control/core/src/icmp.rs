//! ICMP errors about datagrams a relay socket sent, relayed to the client (RFC 8656 §11.5,
//! §18.13).

use rtc_stun::attributes::AttrType;

use crate::types::Family;

/// ICMP (RFC 8656 §18.13), comprehension-optional; only servers send it, in Data indications.
pub(crate) const ATTR_ICMP: AttrType = AttrType(0x8004);

/// ICMP errors relayed per allocation and second, and the burst allowed at once. RFC 8656
/// §11.5 sets no rate; the cap keeps a peer network that answers every datagram with an
/// ICMP error (or someone forging them) from turning each into a Data indication.
pub const ICMP_RATE: u8 = 10;

/// The refill step of an [`IcmpBudget`]: one relayed ICMP error per tick at [`ICMP_RATE`].
const ICMP_TICK_MS: u128 = 1000 / ICMP_RATE as u128;

/// An ICMP error about a UDP datagram that a relay socket sent to a peer, as the daemon
/// learns it from the socket's error queue (Linux: `IP_RECVERR` / `IPV6_RECVERR`, whose
/// `sock_extended_err` gives `ee_type`, `ee_code` and `ee_info`). Give it to
/// [`crate::Server::handle_icmp`].
///
/// Type and code are those of ICMPv4 (RFC 792) when the relayed address is IPv4 and of
/// ICMPv6 (RFC 4443) when it is IPv6: the same numbers mean different things in the two
/// (3 is Destination Unreachable in ICMPv4 but Time Exceeded in ICMPv6), so the core reads
/// them by the family of the relayed address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Icmp {
    /// The ICMP type.
    pub icmp_type: u8,
    /// The ICMP code.
    pub code: u8,
    /// The next-hop MTU for ICMPv4 Destination Unreachable / Fragmentation Needed and
    /// ICMPv6 Packet Too Big (`ee_info` on Linux). The core sends zero for every other type,
    /// as RFC 8656 §18.13 requires, whatever is given here.
    pub error_data: u32,
}

impl Icmp {
    /// ICMPv4 Destination Unreachable (RFC 792).
    pub const V4_DESTINATION_UNREACHABLE: u8 = 3;
    /// ICMPv4 Destination Unreachable code "fragmentation needed and DF set" (RFC 1191 §4).
    pub const V4_FRAGMENTATION_NEEDED: u8 = 4;
    /// ICMPv4 Time Exceeded (RFC 792).
    pub const V4_TIME_EXCEEDED: u8 = 11;
    /// ICMPv6 Destination Unreachable (RFC 4443 §3.1).
    pub const V6_DESTINATION_UNREACHABLE: u8 = 1;
    /// ICMPv6 Packet Too Big (RFC 4443 §3.2).
    pub const V6_PACKET_TOO_BIG: u8 = 2;
    /// ICMPv6 Time Exceeded (RFC 4443 §3.3).
    pub const V6_TIME_EXCEEDED: u8 = 3;

    /// Whether RFC 8656 §11.5 lets the server relay this ICMP error when it arrives for a
    /// relayed address of `family`: ICMPv4 types 3 and 11, ICMPv6 types 1, 2 and 3. Other
    /// types (echo, redirects, parameter problems, ...) are dropped.
    pub fn is_relayed(self, family: Family) -> bool {
        match family {
            Family::V4 => matches!(
                self.icmp_type,
                Self::V4_DESTINATION_UNREACHABLE | Self::V4_TIME_EXCEEDED
            ),
            Family::V6 => matches!(
                self.icmp_type,
                Self::V6_DESTINATION_UNREACHABLE | Self::V6_PACKET_TOO_BIG | Self::V6_TIME_EXCEEDED
            ),
        }
    }

    /// The value of the ICMP attribute (RFC 8656 §18.13, Figure 11): two reserved bytes, then
    /// the type in the upper 7 bits and the code in the lower 9 bits of a 16-bit field, then
    /// the error data. Figure 11 draws the fields that wide; since the types relayed are all
    /// below 128 and codes below 256, nothing is lost. (Some implementations read the field
    /// as a type byte and a code byte instead; this follows the figure.) Error data is the
    /// MTU for the two "too big" errors and zero otherwise.
    pub(crate) fn attribute(self, family: Family) -> [u8; 8] {
        let too_big = match family {
            Family::V4 => {
                self.icmp_type == Self::V4_DESTINATION_UNREACHABLE
                    && self.code == Self::V4_FRAGMENTATION_NEEDED
            }
            Family::V6 => self.icmp_type == Self::V6_PACKET_TOO_BIG,
        };
        let data = if too_big { self.error_data } else { 0 };
        let field = (u16::from(self.icmp_type & 0x7F) << 9) | u16::from(self.code);
        let [t, c] = field.to_be_bytes();
        let [d0, d1, d2, d3] = data.to_be_bytes();
        [0, 0, t, c, d0, d1, d2, d3]
    }
}

/// A token bucket of [`ICMP_RATE`] relayed ICMP errors per second per allocation, in eight
/// bytes (the allocation table entry stays small): time is counted in ticks of
/// `1 / ICMP_RATE` s since the server started, one token per tick.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IcmpBudget {
    tokens: u8,
    tick: u32,
}

impl IcmpBudget {
    /// A full bucket at `tick`.
    pub(crate) fn new(tick: u32) -> Self {
        Self {
            tokens: ICMP_RATE,
            tick,
        }
    }

    /// The tick of `since_start` (time since the server started), saturating.
    pub(crate) fn tick(since_start: std::time::Duration) -> u32 {
        u32::try_from(since_start.as_millis() / ICMP_TICK_MS).unwrap_or(u32::MAX)
    }

    /// Takes one token at `tick` if there is one.
    pub(crate) fn take(&mut self, tick: u32) -> bool {
        let refill = tick.saturating_sub(self.tick);
        let refill = u8::try_from(refill).unwrap_or(u8::MAX);
        self.tokens = self.tokens.saturating_add(refill).min(ICMP_RATE);
        self.tick = self.tick.max(tick);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn attribute_follows_figure_11() {
        let frag = Icmp {
            icmp_type: 3,
            code: 4,
            error_data: 1400,
        };
        assert_eq!(
            frag.attribute(Family::V4),
            [0, 0, 3 << 1, 4, 0, 0, 0x05, 0x78]
        );
        // The same numbers over IPv6 are Time Exceeded: no MTU.
        assert_eq!(frag.attribute(Family::V6), [0, 0, 6, 4, 0, 0, 0, 0]);
        let too_big = Icmp {
            icmp_type: 2,
            code: 0,
            error_data: 1280,
        };
        assert_eq!(too_big.attribute(Family::V6), [0, 0, 4, 0, 0, 0, 5, 0]);
        let port_unreachable = Icmp {
            icmp_type: 3,
            code: 3,
            error_data: 77,
        };
        assert_eq!(
            port_unreachable.attribute(Family::V4),
            [0, 0, 6, 3, 0, 0, 0, 0]
        );
    }

    #[test]
    fn relayed_types_depend_on_the_family() {
        let of = |icmp_type| Icmp {
            icmp_type,
            code: 0,
            error_data: 0,
        };
        let v4: Vec<u8> = (0..=255)
            .filter(|t| of(*t).is_relayed(Family::V4))
            .collect();
        let v6: Vec<u8> = (0..=255)
            .filter(|t| of(*t).is_relayed(Family::V6))
            .collect();
        assert_eq!(v4, vec![3, 11]);
        assert_eq!(v6, vec![1, 2, 3]);
    }

    #[test]
    fn budget_allows_a_burst_then_the_rate() {
        let mut budget = IcmpBudget::new(IcmpBudget::tick(Duration::from_secs(5)));
        let at = |ms: u64| IcmpBudget::tick(Duration::from_millis(5000 + ms));
        assert_eq!((0..20).filter(|_| budget.take(at(0))).count(), 10);
        assert!(!budget.take(at(50)));
        assert!(budget.take(at(100)));
        assert!(!budget.take(at(150)));
        // A long pause refills to the burst, no more.
        assert_eq!((0..20).filter(|_| budget.take(at(60_000))).count(), 10);
        // Time going backwards (it cannot, but) takes nothing extra.
        assert!(!budget.take(at(0)));
    }

    proptest! {
        #[test]
        fn budget_never_exceeds_burst_plus_rate(steps in prop::collection::vec(0u64..400, 1..200)) {
            let mut ms = 0u64;
            let mut budget = IcmpBudget::new(0);
            let mut taken = 0u64;
            for step in steps {
                ms += step;
                if budget.take(IcmpBudget::tick(Duration::from_millis(ms))) {
                    taken += 1;
                }
            }
            prop_assert!(taken <= u64::from(ICMP_RATE) + ms / 100);
        }
    }
}
