//! Server configuration.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::auth::Credentials;
use crate::bandwidth::BandwidthLedger;
use crate::quota::QuotaLedger;
use crate::reservation_ledger::ReservationLedger;

/// Default allocation lifetime (RFC 8656 §7.2: 10 minutes).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Default maximum allocation lifetime (RFC 8656 §7.2 recommends one hour).
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// Permission lifetime, fixed by RFC 8656 §9.
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime, fixed by RFC 8656 §12.
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How long an expired channel number and peer stay reserved for each other
/// (RFC 8656 §12: five minutes).
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
/// How long the port reserved by an Allocate with EVEN-PORT and the R bit is held for its
/// RESERVATION-TOKEN, from the Allocate success (RFC 8656 §7.2: at least 30 seconds).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// RESERVATION-TOKENs one username may hold at once, over every server sharing
/// [`Config::reservations`]; an EVEN-PORT request with the R bit beyond it gets 508
/// (Insufficient Capacity, RFC 8656 §7.2). An RTP/RTCP client needs one per call it sets up
/// within [`RESERVATION_LIFETIME`].
pub const RESERVATIONS_PER_USER: usize = 8;
/// Default [`Config::unauthorized_rate`]: answers to unauthenticated requests per second,
/// host-wide. A backstop above the per-source limit: a reconnect storm of many thousand
/// clients gets its challenges, a flood from many spoofed sources reflects at most about
/// 1 MB/s.
pub const UNAUTHORIZED_RATE: u32 = 5000;
/// Default [`Config::unauthenticated_per_source`]: answers to unauthenticated requests per
/// second and source. A client needs one 401 per allocation (438s with valid integrity are
/// not counted), a Binding now and then; a NAT with many clients needs more, a reflector
/// victim less.
pub const UNAUTHENTICATED_RATE_PER_SOURCE: u32 = 20;
/// Default burst of [`Config::unauthenticated_per_source`]: the clients behind one address
/// starting a call together.
pub const UNAUTHENTICATED_BURST_PER_SOURCE: u32 = 40;
/// Default [`Config::source_table_capacity`]: sources the per-source limit remembers, per
/// server (24 bytes each, about 0.8 MiB at most with the hash tables' slack).
pub const SOURCE_TABLE_CAPACITY: usize = 16_384;
/// Default [`Config::max_permissions_per_allocation`].
pub const MAX_PERMISSIONS_PER_ALLOCATION: usize = 100;
/// Default [`Config::max_channels_per_allocation`].
pub const MAX_CHANNELS_PER_ALLOCATION: usize = 100;
/// Default [`Config::user_kernel_bindings`].
pub const USER_KERNEL_BINDINGS: usize = 1024;
/// The least burst [`SourceRate::share`] gives a core: a client's first exchanges (a
/// Binding, a 401, a retransmission) reach one core, whose share must not starve them.
const MIN_CORE_BURST: f64 = 4.0;

/// A limit on the answers to unauthenticated requests one source gets: `per_second` on
/// average and `burst` at once (a token bucket of `burst` tokens refilled at `per_second`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceRate {
    per_second: f64,
    burst: f64,
}

impl SourceRate {
    /// `per_second` answers a second, `burst` at once; zeros count as one.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
        }
    }

    /// The share of one of `cores` servers among which the kernel spreads a host's clients by
    /// a hash of the 4-tuple (the daemon's event loops): a source varying its ports reaches
    /// every core, so each gets `1/cores` of the rate, and of the burst but no less than a
    /// few answers (or the whole burst, if smaller) so that a client's first exchanges, which
    /// all reach one core, are answered. A source can then get the rate in all, and at most
    /// `cores` times that small floor at once.
    pub fn share(self, cores: usize) -> Self {
        let cores = cores.max(1) as f64;
        Self {
            per_second: self.per_second / cores,
            burst: (self.burst / cores).max(self.burst.min(MIN_CORE_BURST)),
        }
    }

    /// Answers a second, on average.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// Answers at once.
    pub fn burst(&self) -> f64 {
        self.burst
    }
}

/// How long the stop record of an allocation whose bindings were in the data plane waits for
/// the kernel's final figures of each ([`crate::Server::channel_removed`]) before it goes out
/// with what is known and `kernel_final: false`.
pub const KERNEL_FINAL_WAIT: Duration = Duration::from_secs(5);

/// One user's limits, overriding [`Config::max_bps`] and [`Config::user_max_bps`] for the
/// allocations of that user (see [`crate::usage::user_of`]); `None` keeps the server-wide
/// default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserLimits {
    /// `max_bps` of each of the user's allocations.
    pub max_bps: Option<u64>,
    /// `user_max_bps` of all of the user's allocations together.
    pub user_max_bps: Option<u64>,
}

/// Upper bound for configured durations, so that deadline arithmetic cannot overflow.
const MAX_CONFIGURABLE: Duration = Duration::from_secs(7 * 86_400);

/// Everything a [`crate::Server`] needs to know. Build with [`Config::new`] and adjust the
/// public fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// The REALM (RFC 8489 §14.9). Must equal the realm of [`Config::credentials`].
    pub realm: String,
    /// SOFTWARE put in every response, or none.
    pub software: Option<String>,
    /// Static users and REST API secrets; replace at runtime with
    /// [`crate::Server::set_credentials`].
    pub credentials: Credentials,
    /// How long a nonce stays valid before the client gets 438 (Stale Nonce). Default 600 s,
    /// like coturn: a stale nonce costs one extra round trip every ten minutes.
    pub nonce_lifetime: Duration,
    /// The relay's IPv4 address that IPv4 allocations are made on, if any.
    pub relay_ipv4: Option<Ipv4Addr>,
    /// The relay's IPv6 address that IPv6 allocations are made on, if any.
    pub relay_ipv6: Option<Ipv6Addr>,
    /// The listener addresses; peers at these addresses are refused.
    pub listeners: Vec<SocketAddr>,
    /// Further addresses of this host that peers must not reach (e.g. every interface
    /// address the daemon learned).
    pub own_addresses: Vec<IpAddr>,
    /// Allocation ports are drawn at random from this range. Default 49152-65535.
    pub port_range: RangeInclusive<u16>,
    /// Maximum allocations per username (486 beyond), `None` for no limit.
    pub user_quota: Option<u32>,
    /// Maximum allocations in total (486 beyond), `None` for no limit.
    pub total_quota: Option<u32>,
    /// Maximum RESERVATION-TOKENs held at once, over all users and every server sharing
    /// [`Config::reservations`] (RFC 8656 §7.2: EVEN-PORT with
    /// the R bit reserves the next port for a later Allocate). Each holds a relay port and its
    /// socket for [`RESERVATION_LIFETIME`]; EVEN-PORT requests with the R bit beyond the limit
    /// get 508 (Insufficient Capacity), as do those beyond [`RESERVATIONS_PER_USER`]. Zero
    /// refuses every such request. Default 1024.
    pub max_reservations: usize,
    /// Where allocations are counted against the quotas, and each user's data-plane bindings
    /// against [`Config::user_kernel_bindings`]; servers that must share the limits share one
    /// ledger. Default: a ledger of this server's own.
    pub quotas: Arc<QuotaLedger>,
    /// Where RESERVATION-TOKENs are kept (RFC 8656 §7.2: a token is good server-wide); the
    /// servers of one daemon share one ledger, so that a token made on one is good on every
    /// other, and [`Config::max_reservations`] and [`RESERVATIONS_PER_USER`] hold across them.
    /// Default: a ledger of this server's own.
    pub reservations: Arc<ReservationLedger>,
    /// Operator allow list: peers in these networks are allowed even inside the built-in
    /// denied ranges.
    pub allow_peers: Vec<IpNet>,
    /// Operator deny list; wins over the allow list.
    pub deny_peers: Vec<IpNet>,
    /// Development mode: loopback peers allowed (the daemon's `--dev`).
    pub allow_loopback_peers: bool,
    /// Host-wide backstop on answers to unauthenticated requests (Binding responses, 401 and
    /// 438 challenges, errors before authentication) over UDP, per second; requests beyond
    /// it are dropped unanswered. `None` for no cap. A daemon of several cores gives each its
    /// share. Default [`UNAUTHORIZED_RATE`] (5000/s).
    pub unauthorized_rate: Option<u32>,
    /// The limit on answers to unauthenticated UDP requests per source (an IPv4 address or
    /// an IPv6 /64), checked before [`Config::unauthorized_rate`], so that one host cannot
    /// take the budget of all others nor use the server as a reflector. A 438 to a request
    /// whose MESSAGE-INTEGRITY verifies is not counted: its user holds a key, only the nonce
    /// is old. Over TCP nothing is limited: the handshake proves the source and the answer
    /// goes back over its own connection. `None` for no limit. A daemon of several cores gives
    /// each its [`SourceRate::share`]. Default [`UNAUTHENTICATED_RATE_PER_SOURCE`] a second,
    /// bursts of [`UNAUTHENTICATED_BURST_PER_SOURCE`].
    pub unauthenticated_per_source: Option<SourceRate>,
    /// Sources the per-source limit remembers at most; the least recently seen are forgotten
    /// (and start over with a full burst). Bounds its memory whatever the number of sources.
    /// Default [`SOURCE_TABLE_CAPACITY`].
    pub source_table_capacity: usize,
    /// Permissions (peer IP addresses, RFC 8656 §9) one allocation may hold; a
    /// CreatePermission or ChannelBind that needs one more gets 508 (Insufficient Capacity,
    /// RFC 8656 §10.2, §12.2). Default [`MAX_PERMISSIONS_PER_ALLOCATION`].
    pub max_permissions_per_allocation: usize,
    /// Channels one allocation may bind (RFC 8656 §12); a ChannelBind for one more gets 508.
    /// Default [`MAX_CHANNELS_PER_ALLOCATION`].
    pub max_channels_per_allocation: usize,
    /// Channel bindings one username may hold in the data plane at once, over every server
    /// sharing [`Config::quotas`]: its share of the kernel's map. Further channels are bound
    /// all the same and relayed in user space (no [`crate::Command::InstallChannel`]).
    /// Default [`USER_KERNEL_BINDINGS`].
    pub user_kernel_bindings: usize,
    /// How long a ChannelBind success waits for the data plane to acknowledge the binding
    /// before it is sent anyway. Default 50 ms.
    pub offload_timeout: Duration,
    /// Allocation lifetime when the client asks for none or for less. Default 600 s.
    pub default_lifetime: Duration,
    /// Longest allocation lifetime granted. Default 3600 s.
    pub max_lifetime: Duration,
    /// Seed for the random number generator (ports, nonce key, transaction ids, tokens). The
    /// daemon seeds from the OS; tests use a constant.
    pub rng_seed: [u8; 32],
    /// Seed of the nonce key alone, when the key must outlive the process (a daemon that
    /// keeps its allocations across restarts, whose clients' nonces must stay good): the
    /// random streams still come from `rng_seed`, fresh at each start, so that no port
    /// sequence, transaction id or RESERVATION-TOKEN repeats. Default `None`: the key comes
    /// from `rng_seed`.
    pub nonce_seed: Option<[u8; 32]>,
    /// Which of the daemon's cores this is. Cores given the same seed share the nonce key
    /// but draw different random streams. Default 0.
    pub core_index: u32,
    /// Where new Allocates are sent while the server drains ([`crate::Server::set_draining`])
    /// or sheds load ([`Config::shed_allocations`]): a 300 (Try Alternate) names the first of
    /// the client's address family in ALTERNATE-SERVER (RFC 8489 §10, §14.15). Replace at
    /// runtime with [`crate::Server::set_alternates`]. Default none.
    pub alternate_servers: Vec<SocketAddr>,
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16) sent with ALTERNATE-SERVER, for clients over TLS
    /// that check the alternate's certificate against it. Default none.
    pub alternate_domain: Option<String>,
    /// While the allocations counted in [`Config::quotas`] (every core sharing it) are this
    /// many or more, new Allocates are redirected as while draining. `None`: never.
    pub shed_allocations: Option<u32>,
    /// Bytes per second of application data one allocation may relay, each direction on its
    /// own (coturn's `max-bps`; 125000 is 1 Mbit/s); the excess is dropped and counted as
    /// dropped usage. `None`: unlimited. Default `None`.
    pub max_bps: Option<u64>,
    /// The same over all of one user's allocations together, per direction, over every server
    /// sharing [`Config::bandwidth`]. `None`: unlimited. Default `None`.
    pub user_max_bps: Option<u64>,
    /// Server-wide bytes per second the allocations' `max_bps` may add up to (coturn's
    /// `bps-capacity`), over every server sharing [`Config::bandwidth`]: each allocation
    /// reserves its `max_bps` at creation and releases it at its end; with nothing left an
    /// Allocate gets 486 (Allocation Quota Reached, RFC 8656 §7.2), with less left than its
    /// `max_bps` it gets what is left. Needs a `max_bps` (an allocation without one reserves
    /// nothing). Default `None`.
    pub bps_capacity: Option<u64>,
    /// Per-user overrides of `max_bps` and `user_max_bps`, keyed by user
    /// ([`crate::usage::user_of`]). Default empty.
    pub user_limits: Arc<HashMap<String, UserLimits>>,
    /// How often a live allocation gets an interim accounting record
    /// ([`crate::Command::Account`]); `None`: none (start and stop only). Default 60 s.
    pub interim_interval: Option<Duration>,
    /// Where `bps_capacity` is reserved and each user's `user_max_bps` meters are kept; the
    /// servers of one daemon share one ledger. Default: a ledger of this server's own.
    pub bandwidth: Arc<BandwidthLedger>,
}

impl Config {
    /// Defaults for `realm`, with no users, no relay addresses and the given RNG seed.
    pub fn new(realm: impl Into<String>, rng_seed: [u8; 32]) -> Self {
        let realm = realm.into();
        Self {
            credentials: Credentials::new(realm.clone()),
            realm,
            software: Some(concat!("turn-control-core ", env!("CARGO_PKG_VERSION")).to_owned()),
            nonce_lifetime: Duration::from_secs(600),
            relay_ipv4: None,
            relay_ipv6: None,
            listeners: Vec::new(),
            own_addresses: Vec::new(),
            port_range: 49152..=65535,
            user_quota: None,
            total_quota: None,
            max_reservations: 1024,
            quotas: QuotaLedger::shared(),
            reservations: ReservationLedger::shared(),
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            allow_loopback_peers: false,
            unauthorized_rate: Some(UNAUTHORIZED_RATE),
            unauthenticated_per_source: Some(SourceRate::new(
                UNAUTHENTICATED_RATE_PER_SOURCE,
                UNAUTHENTICATED_BURST_PER_SOURCE,
            )),
            source_table_capacity: SOURCE_TABLE_CAPACITY,
            max_permissions_per_allocation: MAX_PERMISSIONS_PER_ALLOCATION,
            max_channels_per_allocation: MAX_CHANNELS_PER_ALLOCATION,
            user_kernel_bindings: USER_KERNEL_BINDINGS,
            offload_timeout: Duration::from_millis(50),
            default_lifetime: DEFAULT_LIFETIME,
            max_lifetime: MAX_LIFETIME,
            rng_seed,
            nonce_seed: None,
            core_index: 0,
            alternate_servers: Vec::new(),
            alternate_domain: None,
            shed_allocations: None,
            max_bps: None,
            user_max_bps: None,
            bps_capacity: None,
            user_limits: Arc::new(HashMap::new()),
            interim_interval: Some(Duration::from_secs(60)),
            bandwidth: BandwidthLedger::shared(),
        }
    }

    /// The `max_bps` and `user_max_bps` of `user`'s allocations: its overrides, else the
    /// server-wide defaults.
    pub fn limits_of(&self, user: &str) -> UserLimits {
        let own = self.user_limits.get(user).copied().unwrap_or_default();
        UserLimits {
            max_bps: own.max_bps.or(self.max_bps),
            user_max_bps: own.user_max_bps.or(self.user_max_bps),
        }
    }

    /// Whether a [`crate::Server`] can run with this configuration, without building one
    /// ([`crate::Server::new`] checks the same).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.relay_ipv4.is_none() && self.relay_ipv6.is_none() {
            return Err(ConfigError::NoRelayAddress);
        }
        if self.port_range.is_empty() {
            return Err(ConfigError::EmptyPortRange);
        }
        if self.default_lifetime.is_zero()
            || self.default_lifetime > self.max_lifetime
            || self.max_lifetime > MAX_CONFIGURABLE
            || self.offload_timeout > MAX_CONFIGURABLE
        {
            return Err(ConfigError::Lifetimes);
        }
        if self.nonce_lifetime.as_secs() == 0 {
            return Err(ConfigError::NonceLifetime);
        }
        if self.credentials.realm() != self.realm {
            return Err(ConfigError::RealmMismatch);
        }
        self.validate_limits()
    }

    /// Rates are at least one byte per second; bps_capacity needs some max_bps; the interim
    /// interval is at least a second.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let overrides = self
            .user_limits
            .values()
            .flat_map(|limits| [limits.max_bps, limits.user_max_bps]);
        let rates = [self.max_bps, self.user_max_bps, self.bps_capacity];
        if rates
            .into_iter()
            .chain(overrides)
            .any(|rate| rate == Some(0))
        {
            return Err(ConfigError::ZeroRate);
        }
        let any_max_bps =
            self.max_bps.is_some() || self.user_limits.values().any(|l| l.max_bps.is_some());
        if self.bps_capacity.is_some() && !any_max_bps {
            return Err(ConfigError::CapacityWithoutMaxBps);
        }
        if self
            .interim_interval
            .is_some_and(|interval| interval.as_secs() == 0 || interval > MAX_CONFIGURABLE)
        {
            return Err(ConfigError::InterimInterval);
        }
        Ok(())
    }
}

/// A configuration the server cannot run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Neither an IPv4 nor an IPv6 relay address is configured.
    #[error("no relay address configured")]
    NoRelayAddress,
    /// The allocation port range holds no port.
    #[error("empty allocation port range")]
    EmptyPortRange,
    /// The default lifetime is zero or above the maximum, or a duration exceeds a week.
    #[error(
        "default lifetime must be non-zero and at most the maximum lifetime; durations at most a week"
    )]
    Lifetimes,
    /// The nonce lifetime is under one second.
    #[error("nonce lifetime must be at least one second")]
    NonceLifetime,
    /// The credentials were built for another realm, so their keys cannot match.
    #[error("credentials were built for a different realm")]
    RealmMismatch,
    /// A `max_bps`, `user_max_bps` or `bps_capacity` of zero, which would relay nothing.
    #[error("max_bps, user_max_bps and bps_capacity must be at least 1")]
    ZeroRate,
    /// `bps_capacity` without any `max_bps`.
    #[error("bps_capacity needs max_bps: an allocation without a limit reserves nothing")]
    CapacityWithoutMaxBps,
    /// The interim interval is under a second or above a week.
    #[error("the interim accounting interval must be at least one second and at most a week")]
    InterimInterval,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut config = Config::new("example.org", [0; 32]);
        config.relay_ipv4 = Some(Ipv4Addr::new(192, 0, 2, 1));
        config
    }

    #[test]
    fn limits_are_checked_and_overridden_per_user() {
        let mut config = valid();
        config.bps_capacity = Some(1_000_000);
        assert_eq!(config.validate(), Err(ConfigError::CapacityWithoutMaxBps));
        let carol = UserLimits {
            max_bps: Some(50_000),
            user_max_bps: None,
        };
        config.user_limits = Arc::new(HashMap::from([("carol".to_owned(), carol)]));
        assert_eq!(config.validate(), Ok(()), "a user's max_bps is a max_bps");
        config.user_max_bps = Some(200_000);
        assert_eq!(
            config.limits_of("carol"),
            UserLimits {
                max_bps: Some(50_000),
                user_max_bps: Some(200_000),
            }
        );
        assert_eq!(config.limits_of("alice").max_bps, None);
        config.max_bps = Some(0);
        assert_eq!(config.validate(), Err(ConfigError::ZeroRate));
        config.max_bps = Some(1);
        config.interim_interval = Some(Duration::from_millis(500));
        assert_eq!(config.validate(), Err(ConfigError::InterimInterval));
    }
}
