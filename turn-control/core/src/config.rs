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
    /// Where allocations are counted against the quotas; servers that must share the limits
    /// share one ledger. Default: a ledger of this server's own.
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
    /// Cap on 401 answers per second; requests beyond it are dropped unanswered. `None`
    /// for no cap. Default 500/s.
    pub unauthorized_rate: Option<u32>,
    /// How long a ChannelBind success waits for the data plane to acknowledge the binding
    /// before it is sent anyway. Default 50 ms.
    pub offload_timeout: Duration,
    /// Allocation lifetime when the client asks for none or for less. Default 600 s.
    pub default_lifetime: Duration,
    /// Longest allocation lifetime granted. Default 3600 s.
    pub max_lifetime: Duration,
    /// Seed for the random number generator (ports, nonce key, transaction ids). The daemon
    /// seeds from the OS; tests use a constant.
    pub rng_seed: [u8; 32],
    /// Which of the daemon's cores this is. Cores given the same seed share the nonce key
    /// but draw different random streams. Default 0.
    pub core_index: u32,
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
            unauthorized_rate: Some(500),
            offload_timeout: Duration::from_millis(50),
            default_lifetime: DEFAULT_LIFETIME,
            max_lifetime: MAX_LIFETIME,
            rng_seed,
            core_index: 0,
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
