//! Usage accounting and bandwidth limits: what each allocation relayed and dropped, the
//! records that report it (like RADIUS accounting start, interim and stop, RFC 2866), and the
//! token buckets that enforce `max_bps` and `user_max_bps` (coturn's names and meanings: BYTES
//! per second of application data, each direction on its own).
//!
//! Bytes are application bytes: the ChannelData or DATA payload, without TURN framing, what
//! the sender's application sent. Hairpin traffic (one allocation relaying to another's
//! relayed address) counts as client to peer of the sending allocation and peer to client of
//! the receiving one.

use std::ops::{Add, AddAssign};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The least burst of a [`RateMeter`]: one full-size datagram always fits.
pub const MIN_BURST: u64 = 2000;

/// Packet and byte counts of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Payload bytes (application data, without TURN framing).
    pub bytes: u64,
}

impl Traffic {
    /// Counts one packet of `bytes`.
    pub(crate) fn count(&mut self, bytes: usize) {
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(bytes as u64);
    }

    /// What `self` counts beyond `earlier`, each count at least zero.
    pub fn saturating_sub(self, earlier: Traffic) -> Traffic {
        Traffic {
            packets: self.packets.saturating_sub(earlier.packets),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }

    /// Whether either count is below `other`'s.
    fn below(self, other: Traffic) -> bool {
        self.packets < other.packets || self.bytes < other.bytes
    }
}

impl Add for Traffic {
    type Output = Traffic;

    fn add(self, other: Traffic) -> Traffic {
        Traffic {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

impl AddAssign for Traffic {
    fn add_assign(&mut self, other: Traffic) {
        *self = *self + other;
    }
}

/// A direction of relaying, as the kernel's reasons `relay_client_to_peer_*` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client (ChannelData, Send indications) to a peer.
    ClientToPeer,
    /// From a peer to the client (ChannelData, Data indications).
    PeerToClient,
}

impl Direction {
    /// 0 for client to peer, 1 for peer to client: the index of per-direction arrays.
    pub fn index(self) -> usize {
        match self {
            Direction::ClientToPeer => 0,
            Direction::PeerToClient => 1,
        }
    }
}

/// What an allocation relayed and what its limits dropped, per direction. Cumulative
/// readings of a counter subtract with [`Usage::saturating_sub`] or [`Usage::since`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Relayed from the client to its peers.
    pub client_to_peer: Traffic,
    /// Relayed from peers to the client.
    pub peer_to_client: Traffic,
    /// Dropped by `max_bps` or `user_max_bps`, client to peer.
    pub dropped_client_to_peer: Traffic,
    /// Dropped by `max_bps` or `user_max_bps`, peer to client.
    pub dropped_peer_to_client: Traffic,
}

impl Usage {
    /// What was relayed in `direction`.
    pub fn relayed(&self, direction: Direction) -> Traffic {
        match direction {
            Direction::ClientToPeer => self.client_to_peer,
            Direction::PeerToClient => self.peer_to_client,
        }
    }

    /// What the limits dropped in `direction`.
    pub fn dropped(&self, direction: Direction) -> Traffic {
        match direction {
            Direction::ClientToPeer => self.dropped_client_to_peer,
            Direction::PeerToClient => self.dropped_peer_to_client,
        }
    }

    /// Counts one relayed packet of `bytes` in `direction`.
    pub(crate) fn count_relayed(&mut self, direction: Direction, bytes: usize) {
        match direction {
            Direction::ClientToPeer => self.client_to_peer.count(bytes),
            Direction::PeerToClient => self.peer_to_client.count(bytes),
        }
    }

    /// Counts one dropped packet of `bytes` in `direction`.
    pub(crate) fn count_dropped(&mut self, direction: Direction, bytes: usize) {
        match direction {
            Direction::ClientToPeer => self.dropped_client_to_peer.count(bytes),
            Direction::PeerToClient => self.dropped_peer_to_client.count(bytes),
        }
    }

    /// The delta of two cumulative readings: each count of `self` beyond `earlier`'s, at least
    /// zero.
    pub fn saturating_sub(self, earlier: Usage) -> Usage {
        Usage {
            client_to_peer: self.client_to_peer.saturating_sub(earlier.client_to_peer),
            peer_to_client: self.peer_to_client.saturating_sub(earlier.peer_to_client),
            dropped_client_to_peer: self
                .dropped_client_to_peer
                .saturating_sub(earlier.dropped_client_to_peer),
            dropped_peer_to_client: self
                .dropped_peer_to_client
                .saturating_sub(earlier.dropped_peer_to_client),
        }
    }

    /// What a cumulative reading adds to the last one taken into account, `seen`. A reading
    /// with any count below `seen`'s comes from a counter that started over (a fresh kernel
    /// entry for the binding): all of it is new.
    pub fn since(self, seen: Usage) -> Usage {
        let reset = self.client_to_peer.below(seen.client_to_peer)
            || self.peer_to_client.below(seen.peer_to_client)
            || self
                .dropped_client_to_peer
                .below(seen.dropped_client_to_peer)
            || self
                .dropped_peer_to_client
                .below(seen.dropped_peer_to_client);
        if reset {
            self
        } else {
            self.saturating_sub(seen)
        }
    }
}

impl Add for Usage {
    type Output = Usage;

    fn add(self, other: Usage) -> Usage {
        Usage {
            client_to_peer: self.client_to_peer + other.client_to_peer,
            peer_to_client: self.peer_to_client + other.peer_to_client,
            dropped_client_to_peer: self.dropped_client_to_peer + other.dropped_client_to_peer,
            dropped_peer_to_client: self.dropped_peer_to_client + other.dropped_peer_to_client,
        }
    }
}

impl AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        *self = *self + other;
    }
}

/// The user an allocation counts against for `user_max_bps` and per-user limits, and that
/// accounting records name: the USERNAME of a static user; for TURN REST credentials
/// (`EXPIRY:ID`) the part after the first ':' (coturn's convention), the whole name when
/// there is none (or nothing after it). Static usernames cannot hold a ':' (`NAME:PASSWORD`).
pub fn user_of(username: &str) -> &str {
    match username.split_once(':') {
        Some((_, user)) if !user.is_empty() => user,
        _ => username,
    }
}

/// The burst of a limit of `rate` bytes per second: 100 ms of the rate, but at least
/// [`MIN_BURST`] bytes so that one full-size datagram always fits.
pub fn burst_for(rate: u64) -> u64 {
    (rate / 10).max(MIN_BURST)
}

/// A token bucket of `rate` bytes per second holding at most [`burst_for`]`(rate)`: what
/// enforces `max_bps` and `user_max_bps` in user space.
///
/// [`RateMeter::admit`] lets a packet through when the bucket holds its size (or, for a packet
/// larger than the burst, when the bucket is full) and takes it out; [`RateMeter::charge`]
/// takes out what was relayed elsewhere (the kernel's share) without asking. Either may leave
/// the bucket in debt, down to one second of the rate: what the kernel relayed then holds back
/// user space for as long as it took the kernel's share of the rate.
#[derive(Debug, Clone)]
pub struct RateMeter {
    rate: u64,
    burst: u64,
    tokens: i64,
    /// Refill finer than a byte: nanosecond-bytes not yet a whole byte, so that frequent
    /// small refills lose nothing.
    carry: u64,
    last: Instant,
}

const NANOS_PER_SECOND: u128 = 1_000_000_000;

impl RateMeter {
    /// A full bucket for `rate` bytes per second, as of `now`.
    pub fn new(rate: u64, now: Instant) -> Self {
        let burst = burst_for(rate);
        Self {
            rate,
            burst,
            tokens: clamp_i64(burst),
            carry: 0,
            last: now,
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The most the bucket holds.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Whether a packet of `bytes` may pass at `now`; if so, takes it out of the bucket.
    pub fn admit(&mut self, now: Instant, bytes: u64) -> bool {
        self.refill(now);
        if self.tokens < clamp_i64(bytes.min(self.burst)) {
            return false;
        }
        self.take(bytes);
        true
    }

    /// Takes `bytes` relayed elsewhere out of the bucket at `now`, into debt if need be (down
    /// to one second of the rate).
    pub fn charge(&mut self, now: Instant, bytes: u64) {
        self.refill(now);
        self.take(bytes);
    }

    /// Gives back `bytes` taken by [`RateMeter::admit`] for a packet another limit dropped.
    pub(crate) fn refund(&mut self, bytes: u64) {
        self.tokens = self
            .tokens
            .saturating_add(clamp_i64(bytes))
            .min(clamp_i64(self.burst));
    }

    fn take(&mut self, bytes: u64) {
        self.tokens = self
            .tokens
            .saturating_sub(clamp_i64(bytes))
            .max(-clamp_i64(self.rate));
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        let credit = elapsed.as_nanos() * u128::from(self.rate) + u128::from(self.carry);
        let whole = i64::try_from(credit / NANOS_PER_SECOND).unwrap_or(i64::MAX);
        self.carry = (credit % NANOS_PER_SECOND) as u64;
        let burst = clamp_i64(self.burst);
        self.tokens = self.tokens.saturating_add(whole);
        if self.tokens >= burst {
            self.tokens = burst;
            self.carry = 0;
        }
    }
}

fn clamp_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The data plane's meters for one binding ([`crate::Command::InstallChannel`]): the kernel
/// enforces them by name, so that every binding of an allocation shares the allocation's and
/// every binding of a user shares the user's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// The allocation's `max_bps`, named `allocation:<id in hex>`.
    pub allocation: Option<Meter>,
    /// The user's `user_max_bps`, named `user:<user>` (see [`user_of`]).
    pub user: Option<Meter>,
}

/// A named rate for the data plane: bytes per second in each direction separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    /// The meter's name, shared by every binding it limits.
    pub name: String,
    /// Bytes of application data per second, each direction on its own.
    pub bytes_per_second: u64,
}

/// Which record of an allocation an [`UsageRecord`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// The Allocate success went out.
    Start,
    /// The allocation lives on; sent every interim interval.
    Interim,
    /// The allocation ended.
    Stop,
}

/// Why an allocation ended, in its stop record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Its lifetime ran out (RFC 8656 §7).
    Expired,
    /// The client deleted it (a Refresh with LIFETIME 0, RFC 8656 §8).
    Deleted,
    /// Its TCP connection closed (RFC 8656 §7: the 5-tuple ends with it).
    ClientClosed,
    /// The server stopped and ended every allocation.
    Shutdown,
    /// turn-control went on without it: a restart did not restore it, or its relay socket was
    /// lost.
    Lost,
}

/// One accounting record, one JSON object per line: start, interim every interval, stop.
/// Totals (`client_to_peer`, `peer_to_client`) include the kernel's part, which
/// `kernel_client_to_peer` and `kernel_peer_to_client` report alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// "start", "interim" or "stop".
    pub record: RecordKind,
    /// The allocation's records counted from 0 (its start).
    pub sequence: u64,
    /// The allocation's random 64-bit id, 16 hex digits.
    pub allocation: String,
    /// When the record was made, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The USERNAME the allocation was made with.
    pub username: String,
    /// The user ([`user_of`]).
    pub user: String,
    /// The realm.
    pub realm: String,
    /// The client's transport address.
    pub client: std::net::SocketAddr,
    /// "udp" or "tcp".
    pub transport: crate::types::Transport,
    /// The listener the client reached.
    pub server: std::net::SocketAddr,
    /// The relayed transport addresses.
    pub relay: Vec<std::net::SocketAddr>,
    /// When the allocation was made, RFC 3339 UTC with milliseconds.
    pub started: String,
    /// When it ended (stop records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// Why it ended (stop records only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
    /// The allocation's granted `max_bps`, null when unlimited.
    pub max_bps: Option<u64>,
    /// Relayed client to peer, both paths.
    pub client_to_peer: Traffic,
    /// Relayed peer to client, both paths.
    pub peer_to_client: Traffic,
    /// Dropped by the limits, client to peer.
    pub dropped_client_to_peer: Traffic,
    /// Dropped by the limits, peer to client.
    pub dropped_peer_to_client: Traffic,
    /// The kernel's part of `client_to_peer`.
    pub kernel_client_to_peer: Traffic,
    /// The kernel's part of `peer_to_client`.
    pub kernel_peer_to_client: Traffic,
    /// Stop records only: whether the kernel's final figures of every binding came in (false
    /// when the agent could not say, or did not answer in time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_final: Option<bool>,
}

impl UsageRecord {
    /// Sets the figures of `usage` (both paths) and `kernel` (the kernel's part).
    pub(crate) fn set_figures(&mut self, usage: &Usage, kernel: &Usage) {
        self.client_to_peer = usage.client_to_peer;
        self.peer_to_client = usage.peer_to_client;
        self.dropped_client_to_peer = usage.dropped_client_to_peer;
        self.dropped_peer_to_client = usage.dropped_peer_to_client;
        self.kernel_client_to_peer = kernel.client_to_peer;
        self.kernel_peer_to_client = kernel.peer_to_client;
    }
}

/// `time` as RFC 3339 UTC with milliseconds (`2026-12-05T19:00:10.123Z`); times before 1970
/// read as 1970.
pub fn rfc3339_millis(time: SystemTime) -> String {
    let ms = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    rfc3339_of_unix_ms(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Unix milliseconds `ms` as RFC 3339 UTC with milliseconds.
pub(crate) fn rfc3339_of_unix_ms(ms: u64) -> String {
    let (days, in_day) = (ms / 86_400_000, ms % 86_400_000);
    let (year, month, day) = civil_from_days(days);
    let (h, m, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ten_times_the_rate_for_ten_seconds_passes_the_rate_and_one_burst() {
        let start = Instant::now();
        for (rate, size) in [(125_000u64, 1000u64), (1_000_000, 1200), (10_000, 160)] {
            let mut meter = RateMeter::new(rate, start);
            // Packets every `gap`, ten times the rate in all.
            let gap = Duration::from_nanos(size * 1_000_000_000 / (10 * rate));
            let (mut now, mut passed) = (start, 0u64);
            while now < start + Duration::from_secs(10) {
                if meter.admit(now, size) {
                    passed += size;
                }
                now += gap;
            }
            let expected = (rate * 10 + burst_for(rate)) as f64;
            let error = (passed as f64 - expected).abs() / expected;
            assert!(
                error < 0.01,
                "rate {rate}: passed {passed}, expected {expected}"
            );
        }
    }

    #[test]
    fn the_burst_is_100_ms_of_the_rate_and_at_least_2000_bytes() {
        assert_eq!(burst_for(125_000), 12_500);
        assert_eq!(burst_for(1_000), 2000);
        assert_eq!(burst_for(19_999), 2000);
        let now = Instant::now();
        let mut meter = RateMeter::new(1_000, now);
        assert!(meter.admit(now, 1500), "a full-size datagram fits");
        assert!(!meter.admit(now, 1500), "the burst is spent");
        // A datagram larger than the burst passes on a full bucket.
        let mut meter = RateMeter::new(1_000, now);
        assert!(meter.admit(now, 9000));
        assert!(!meter.admit(now + Duration::from_secs(1), 100), "in debt");
    }

    #[test]
    fn charges_go_into_debt_of_at_most_one_second() {
        let now = Instant::now();
        let mut meter = RateMeter::new(10_000, now);
        meter.charge(now, 1_000_000);
        // Burst 2000 gone and 10_000 of debt: a second to get out, 0.2 s more to 2000.
        assert!(!meter.admit(now + Duration::from_millis(1100), 2000));
        assert!(meter.admit(now + Duration::from_millis(1200), 2000));
    }

    #[test]
    fn small_frequent_refills_lose_nothing() {
        let start = Instant::now();
        let mut meter = RateMeter::new(1_000, start);
        meter.charge(start, 2000);
        // A microsecond is a thousandth of a byte; a second of them is 1000 bytes.
        let mut now = start;
        for _ in 0..1_000_000 {
            now += Duration::from_micros(1);
            meter.charge(now, 0);
        }
        assert!(meter.admit(now, 1000));
        assert!(!meter.admit(now, 1));
    }

    #[test]
    fn usage_adds_and_subtracts_readings_with_resets() {
        let t = |packets, bytes| Traffic { packets, bytes };
        let seen = Usage {
            client_to_peer: t(10, 1000),
            peer_to_client: t(5, 500),
            ..Usage::default()
        };
        let later = Usage {
            client_to_peer: t(12, 1300),
            peer_to_client: t(5, 500),
            dropped_peer_to_client: t(1, 100),
            ..Usage::default()
        };
        let delta = later.since(seen);
        assert_eq!(delta.client_to_peer, t(2, 300));
        assert_eq!(delta.peer_to_client, t(0, 0));
        assert_eq!(delta.dropped_peer_to_client, t(1, 100));
        assert_eq!(seen + delta, later);
        // A fresh kernel entry counts from zero.
        let fresh = Usage {
            client_to_peer: t(3, 300),
            ..Usage::default()
        };
        assert_eq!(fresh.since(later), fresh);
        assert_eq!(fresh.saturating_sub(later).client_to_peer, t(0, 0));
        let mut sum = Usage::default();
        sum += later;
        sum += later;
        assert_eq!(sum.client_to_peer, t(24, 2600));
    }

    #[test]
    fn users_of_static_and_rest_usernames() {
        assert_eq!(user_of("alice"), "alice");
        assert_eq!(user_of("1767225600:alice"), "alice");
        assert_eq!(user_of("1767225600:a:b"), "a:b");
        assert_eq!(user_of("1767225600"), "1767225600");
        assert_eq!(user_of("1767225600:"), "1767225600:");
    }

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(rfc3339_millis(at(0)), "1970-01-01T00:00:00.000Z");
        // 2026-12-05T19:00:10.123Z
        assert_eq!(
            rfc3339_millis(at(1_796_497_210_123)),
            "2026-12-05T19:00:10.123Z"
        );
        assert_eq!(
            rfc3339_millis(at(951_782_400_000)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(at(4_107_542_399_999)),
            "2100-02-28T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_millis(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
