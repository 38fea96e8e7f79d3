//! Which answers to unauthenticated requests leave: Binding responses, 401 and 438 challenges
//! and the errors sent before a request is authenticated. Each can be sent to a spoofed UDP
//! source (a reflection, RFC 8489 §16.1.2 and RFC 8656 §21.1 warn about amplification) and
//! costs a nonce HMAC, so they are limited twice: per source ([`SourceLimiter`]: an IPv4 address
//! or an IPv6 /64), so that one host cannot take the budget of every other, and host-wide
//! ([`RateLimiter`], a backstop against floods from many sources).
//!
//! Both are per core. The kernel spreads a host's clients over the cores by a hash of the
//! 4-tuple, so a source that varies its ports reaches every core: the daemon gives each core
//! its share of both limits ([`SourceRate::share`], and `unauthorized_rate` divided by the
//! cores), which bounds what the host sends without a lock on the path a flood drives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::config::SourceRate;

/// A token bucket limiting how many answers leave per second, host-wide: `per_second` tokens
/// a second, as many at most in the bucket.
#[derive(Debug, Clone)]
pub(crate) struct RateLimiter {
    per_second: u32,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            per_second,
            tokens: f64::from(per_second),
            last: None,
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.per_second);
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where an unauthenticated request comes from, as the per-source limit counts it: an IPv4
/// address, or the /64 an IPv6 address is in (one host or one subscriber line usually holds a
/// whole /64, RFC 7421, so counting addresses would give it 2^64 budgets). An IPv4-mapped IPv6
/// address counts as its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// An IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(ip) => Self::V4(ip.octets()),
            IpAddr::V6(ip) => {
                let mut prefix = [0; 8];
                prefix.copy_from_slice(&ip.octets()[..8]);
                Self::V6(prefix)
            }
        }
    }
}

/// Per-source answer budgets in a table of bounded size.
///
/// Each source has a GCRA bucket (equivalent to a token bucket of [`SourceRate::burst`]
/// tokens refilled at [`SourceRate::per_second`]) held as one number, its theoretical arrival
/// time. The table is two generations of at most `capacity / 2` entries each: a source is
/// looked up in both and moved to the current one, and when the current one is full the
/// older is dropped and the current one takes its place. So the table never holds more than
/// `capacity` entries (24 bytes each, in hash tables that grow to at most twice that), however
/// many sources there are, and a source that keeps sending stays in it. A source dropped by
/// the churn of others comes back with a full bucket: a flood of many spoofed sources is left
/// to the host-wide backstop.
#[derive(Debug)]
pub(crate) struct SourceLimiter {
    /// Microseconds between answers, on average.
    interval: u64,
    /// How far ahead of now a source's theoretical arrival time may run: the burst.
    tolerance: u64,
    /// The time base of the theoretical arrival times.
    epoch: Instant,
    /// Entries per generation.
    half: usize,
    current: HashMap<Source, u64>,
    previous: HashMap<Source, u64>,
}

impl SourceLimiter {
    /// A limiter for `rate` that remembers at most `capacity` sources (at least two).
    pub(crate) fn new(rate: SourceRate, capacity: usize, epoch: Instant) -> Self {
        // Whole microseconds: 1/s gives 10^6, a million a second 1; never zero.
        let interval = (1e6 / rate.per_second()).round().max(1.0);
        let tolerance = interval * (rate.burst() - 1.0).max(0.0);
        Self {
            interval: interval as u64,
            tolerance: tolerance.round() as u64,
            epoch,
            half: (capacity / 2).max(1),
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    /// Whether `ip`'s source may have one more answer at `now`; counts it if so.
    pub(crate) fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        let source = Source::of(ip);
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX);
        let (interval, tolerance) = (self.interval, self.tolerance);
        let arrival = self.entry(source);
        let due = (*arrival).max(now);
        if due - now > tolerance {
            return false;
        }
        *arrival = due.saturating_add(interval);
        true
    }

    /// Sources held, over both generations.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// The theoretical arrival time of `source`, zero (a full bucket) for a source not held.
    fn entry(&mut self, source: Source) -> &mut u64 {
        if self.current.contains_key(&source) {
            return self.current.entry(source).or_default();
        }
        let held = self.previous.remove(&source).unwrap_or(0);
        if self.current.len() >= self.half {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        }
        self.current.entry(source).or_insert(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rate_limiter_refills() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(2);
        assert!(limiter.allow(start));
        assert!(limiter.allow(start));
        assert!(!limiter.allow(start));
        assert!(limiter.allow(start + Duration::from_millis(500)));
        assert!(!limiter.allow(start + Duration::from_millis(500)));
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(Source::of(ip("192.0.2.1")), Source::V4([192, 0, 2, 1]));
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.1")),
            Source::of(ip("192.0.2.1"))
        );
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
    }

    /// The entry size the memory bound in the docs is computed with.
    #[test]
    fn a_table_entry_is_24_bytes() {
        assert_eq!(std::mem::size_of::<(Source, u64)>(), 24);
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut limiter = SourceLimiter::new(SourceRate::new(10, 3), 16, t0);
        let a = ip("192.0.2.1");
        assert!((0..3).all(|_| limiter.allow(t0, a)));
        assert!(!limiter.allow(t0, a));
        assert!(limiter.allow(t0, ip("192.0.2.2")), "another source");
        assert!(!limiter.allow(t0 + Duration::from_millis(99), a));
        assert!(limiter.allow(t0 + Duration::from_millis(100), a));
        assert!(!limiter.allow(t0 + Duration::from_millis(100), a));
        // Idle for a while: the burst is back, no more.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| limiter.allow(later, a)));
        assert!(!limiter.allow(later, a));
    }

    #[test]
    fn the_table_holds_at_most_its_capacity_and_keeps_busy_sources() {
        let t0 = Instant::now();
        let capacity = 1024;
        let mut limiter = SourceLimiter::new(SourceRate::new(20, 1), capacity, t0);
        let busy = ip("198.51.100.1");
        assert!(limiter.allow(t0, busy));
        for i in 0..1_000_000u32 {
            let source = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(i))
            } else {
                IpAddr::V6(Ipv6Addr::from(u128::from(i) << 64))
            };
            assert!(limiter.allow(t0, source));
            assert!(limiter.len() <= capacity, "{}", limiter.len());
            if i % 100 == 0 {
                // Still remembered, so still out of budget.
                assert!(!limiter.allow(t0, busy), "after {i}");
            }
        }
        assert!(limiter.current.capacity() <= 2 * capacity);
    }
}
