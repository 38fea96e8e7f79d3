//! Server configuration.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::auth::Credentials;
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
}
