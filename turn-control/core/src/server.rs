//! The TURN server state machine.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use rtc_stun::attributes::{
    ATTR_CHANNEL_NUMBER, ATTR_DATA, ATTR_DONT_FRAGMENT, ATTR_ERROR_CODE, ATTR_EVEN_PORT,
    ATTR_LIFETIME, ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256, ATTR_NONCE,
    ATTR_PASSWORD_ALGORITHM, ATTR_PASSWORD_ALGORITHMS, ATTR_PRIORITY, ATTR_REALM,
    ATTR_REQUESTED_ADDRESS_FAMILY, ATTR_REQUESTED_TRANSPORT, ATTR_RESERVATION_TOKEN,
    ATTR_USE_CANDIDATE, ATTR_USER_HASH, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS,
    ATTR_XOR_RELAYED_ADDRESS, ATTR_XORMAPPED_ADDRESS, AttrType,
};
use rtc_stun::message::{
    CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE,
    METHOD_BINDING, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_DATA, METHOD_REFRESH,
    METHOD_SEND, Method, TransactionId,
};
use rtc_stun::uattrs::UnknownAttributes;
use rtc_turn::proto::lifetime::Lifetime;

use crate::admission::{RateLimiter, SourceLimiter};
use crate::allocation::{Allocation, Channel, Cooldown, PortUse, Reservation, ReservationToken};
use crate::auth::{Credentials, NonceCheck, NonceKey, SigningKey};
use crate::config::{CHANNEL_COOLDOWN, CHANNEL_LIFETIME, Config, ConfigError, PERMISSION_LIFETIME};
use crate::framing::{ChannelData, FrameKind, frame_kind};
use crate::icmp::{ATTR_ICMP, Icmp, IcmpBudget};
use crate::long_term::{Auth, Malformed, Offer, PASSWORD_ALGORITHMS};
use crate::policy::PeerPolicy;
use crate::redirect::{NO_ALTERNATE, Redirect, TRY_ALTERNATE, alternate, redirect};
use crate::stats::{RequestMethod, Stats};
use crate::stun::{ATTR_ALTERNATE_DOMAIN, ATTR_ALTERNATE_SERVER, Builder, Parsed, parse};
use crate::timers::Timers;
use crate::types::{
    AllocationPort, ChannelBinding, ChannelNumber, ClientAddr, Family, FiveTuple, PeerAddr,
    RelayAddr, Transport,
};
use crate::usage::{Direction, EndReason, RateLimits, UsageRecord};

/// A datagram or stream frame for the daemon to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// To a client, from the listener it used (over its TCP connection when `transport` is
    /// TCP).
    ToClient {
        /// UDP, or TCP for the connection of this 5-tuple.
        transport: Transport,
        /// The listener address to send from.
        server: SocketAddr,
        /// The client.
        client: ClientAddr,
        /// A STUN message or ChannelData (padded on TCP).
        payload: Vec<u8>,
    },
    /// To a peer, as plain UDP from the relay socket of an allocation.
    ToPeer {
        /// The relayed transport address (relay IP of the peer's family and allocation port).
        relay: RelayAddr,
        /// The peer.
        peer: PeerAddr,
        /// The application data.
        payload: Vec<u8>,
    },
}

impl Transmit {
    /// The bytes to send.
    pub fn payload(&self) -> &[u8] {
        match self {
            Transmit::ToClient { payload, .. } | Transmit::ToPeer { payload, .. } => payload,
        }
    }

    /// The local address to send from: the listener or the relayed address.
    pub fn source(&self) -> SocketAddr {
        match self {
            Transmit::ToClient { server, .. } => *server,
            Transmit::ToPeer { relay, .. } => relay.0,
        }
    }

    /// Where to send.
    pub fn destination(&self) -> SocketAddr {
        match self {
            Transmit::ToClient { client, .. } => client.0,
            Transmit::ToPeer { peer, .. } => peer.0,
        }
    }
}

/// A side effect for the daemon to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open a UDP socket bound to `relay`, then answer with [`Server::relay_bound`], or with
    /// [`Server::relay_bind_failed`] if the port is taken: the allocation then moves to
    /// another port, or after [`RELAY_BIND_ATTEMPTS`] ports the client gets 508.
    BindRelayPort {
        /// The relayed transport address.
        relay: RelayAddr,
        /// The Allocate asked for DONT-FRAGMENT (RFC 8656 §7.2, §18.9): datagrams from this
        /// socket carry DF, with path-MTU discovery (Linux: `IP_MTU_DISCOVER` =
        /// `IP_PMTUDISC_DO` for IPv4; `IPV6_DONTFRAG` for IPv6, where routers never fragment
        /// and this stops the host fragmenting at the source). Datagrams larger than the path
        /// MTU then fail to send instead of going out in fragments, and the ICMP errors that
        /// come back are for [`Server::handle_icmp`].
        dont_fragment: bool,
    },
    /// Close the socket of `relay`: its allocation is gone or moved.
    FreeRelayPort {
        /// The relayed transport address.
        relay: RelayAddr,
    },
    /// Open a UDP socket bound to `relay` for a reservation (RFC 8656 §7.2: EVEN-PORT with the
    /// R bit reserves the odd port next to the allocation's even one, so that no other process
    /// takes it while its RESERVATION-TOKEN is out), then answer as for
    /// [`Command::BindRelayPort`]. Nothing may be relayed there before an Allocate brings the
    /// token, so the socket is not read: keep it aside, where the event loop of whichever core
    /// gets that Allocate finds it ([`Command::AdoptReservedPort`]); a token is server-wide.
    ///
    /// The success of the Allocate that reserves waits for both sockets, and a failure of
    /// either moves the pair; once the success is out, the reservation is best effort: a
    /// socket lost later voids the token, and an unused reservation ends with
    /// [`Command::ReleaseReservedPort`] after [`crate::config::RESERVATION_LIFETIME`].
    ReservePort {
        /// The reserved relayed transport address.
        relay: RelayAddr,
        /// As for [`Command::BindRelayPort`]: the reserving Allocate asked for DONT-FRAGMENT.
        dont_fragment: bool,
    },
    /// An Allocate with a RESERVATION-TOKEN took `relay`, reserved by this core or another:
    /// take the socket kept aside for it ([`Command::ReservePort`]) and read it as this core's
    /// relay socket of `relay`, with DONT-FRAGMENT as `dont_fragment` says; if none is kept
    /// (it closed meanwhile), bind `relay` afresh. Then answer as for
    /// [`Command::BindRelayPort`]: the success waits for it, and a failure gets the client 508
    /// (the token names this one address). The socket is this core's from now on, freed with
    /// [`Command::FreeRelayPort`]; the core that reserved it only forgets the port.
    AdoptReservedPort {
        /// The reserved relayed transport address, now an allocation's.
        relay: RelayAddr,
        /// The Allocate that brought the token asked for DONT-FRAGMENT.
        dont_fragment: bool,
    },
    /// Close the socket kept aside for the reservation of `relay`: the reservation ended
    /// unused, or moved with its allocation before its token went out.
    ReleaseReservedPort {
        /// The reserved relayed transport address.
        relay: RelayAddr,
    },
    /// Write `binding` into the data plane (both directions), or overwrite the entry already
    /// there, then report the outcome with [`Server::channel_installed`]. Emitted when a
    /// channel is bound, when its permission comes back, and again whenever `expires` moves
    /// (a ChannelBind, CreatePermission or Refresh changed one of its terms). Only
    /// UDP-transport bindings are ever emitted: TCP clients are relayed in user space.
    InstallChannel {
        /// The binding.
        binding: ChannelBinding,
        /// When the data plane must stop relaying on this binding: the earliest of the
        /// channel's expiry (RFC 8656 §12), the expiry of the permission for the peer's IP
        /// (§9) and the allocation's expiry (§7). The data plane checks neither permissions
        /// nor allocations, so this is how their lifetimes reach it.
        expires: Instant,
        /// The meters the data plane enforces on this binding, by name: the allocation's
        /// `max_bps` and its user's `user_max_bps` (none when unlimited). Every binding of an
        /// allocation names the same allocation meter, every binding of a user the same user
        /// meter, so that they share it; the data plane counts each binding's figures for
        /// [`Server::kernel_usage`] and [`Server::channel_removed`].
        limits: RateLimits,
    },
    /// Remove `binding` from the data plane. Emitted when a channel expires, its allocation
    /// is deleted, the permission for its peer lapses or an install of it failed; removing
    /// an absent entry is fine. Answer with [`Server::channel_removed`] and the binding's
    /// final figures (or `None` when the data plane cannot say, or is not connected): the
    /// stop record of its allocation waits for them, at most
    /// [`crate::config::KERNEL_FINAL_WAIT`].
    RemoveChannel {
        /// The binding.
        binding: ChannelBinding,
    },
    /// Write an accounting record (one JSON object per line): "start" when an Allocate
    /// success goes out, "interim" every [`Config::interim_interval`], "stop" at the end.
    Account {
        /// The record.
        record: UsageRecord,
    },
}

/// Why the data plane did not install a binding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// The install was not sent: no data-plane agent is connected, or no room in the queue
    /// to it.
    #[error("no data plane agent is connected")]
    Unavailable,
    /// The agent refused or failed the request.
    #[error("data plane refused the binding: {0}")]
    Rejected(String),
    /// The install was sent and the link to the agent was lost before its answer: the data
    /// plane may hold the binding (the full sync after the reconnect settles it).
    #[error("data plane unreachable before it answered: {0}")]
    Lost(String),
}

/// The sans-IO TURN server (RFC 8656).
///
/// Feed it with [`handle_client`](Self::handle_client) (bytes from a listener),
/// [`handle_peer`](Self::handle_peer) (bytes arriving at a relay socket),
/// [`handle_icmp`](Self::handle_icmp) (ICMP errors about what a relay socket sent),
/// [`handle_timeout`](Self::handle_timeout) and the answers to its commands
/// ([`relay_bound`](Self::relay_bound) or [`relay_bind_failed`](Self::relay_bind_failed) for
/// [`Command::BindRelayPort`], [`Command::ReservePort`] and [`Command::AdoptReservedPort`],
/// [`channel_installed`](Self::channel_installed) for
/// [`Command::InstallChannel`]); end with [`shutdown`](Self::shutdown). Time is always passed
/// in: `now` is a monotonic [`Instant`]; wall-clock time (REST usernames, nonces) is derived
/// from the (`Instant`, [`SystemTime`]) anchor given to [`Server::new`], which the daemon may
/// re-anchor with [`set_wall_clock`](Self::set_wall_clock) (e.g. once a minute).
///
/// # Outputs, in any order
///
/// After every input, drain [`poll_command`](Self::poll_command),
/// [`poll_transmit`](Self::poll_transmit) and [`poll_timeout`](Self::poll_timeout) (re-arm
/// the single timer with it; when it fires, call [`handle_timeout`](Self::handle_timeout)),
/// in whatever order suits the caller: a response that depends on a side effect is held
/// until the side effect is confirmed. An Allocate success waits for
/// [`relay_bound`](Self::relay_bound) of every relayed address it announces (and of the port
/// it reserves, with EVEN-PORT and the R bit); a ChannelBind
/// success waits for [`channel_installed`](Self::channel_installed) (or the offload
/// timeout), so the client's first ChannelData already meets the kernel's entry. Answers to
/// commands may come at once or later; an answer for an allocation that has gone since is
/// harmless.
///
/// Nothing here blocks, allocates per packet beyond the output payload, or panics on input.
#[derive(Debug)]
pub struct Server {
    config: Config,
    policy: PeerPolicy,
    rng: StdRng,
    nonce_key: NonceKeyDebug,
    wall: WallClock,
    allocations: HashMap<FiveTuple, Allocation>,
    /// Every port in use here: by an allocation (of this core's slice of the range, or one
    /// reserved by another core and taken with its token), or by a reservation this core made.
    by_port: HashMap<AllocationPort, PortUse>,
    /// The reservations this core made (RFC 8656 §7.2) and still holds a port for. Their
    /// tokens and the bounds are in [`Config::reservations`], shared by every core.
    reservations: HashMap<ReservationToken, Reservation>,
    /// When the server started: the time base of the ICMP rate caps.
    started: Instant,
    pending: HashMap<(FiveTuple, ChannelNumber), Pending>,
    /// One deadline per allocation, permission, channel, cooldown, held response and
    /// reservation.
    timers: Timers<Timer>,
    transmits: VecDeque<Transmit>,
    commands: VecDeque<Command>,
    /// The host-wide backstop on answers to unauthenticated requests (this core's share).
    unauthorized: Option<RateLimiter>,
    /// The per-source limit on answers to unauthenticated requests (this core's share).
    sources: Option<SourceLimiter>,
    /// New Allocates are redirected ([`Server::set_draining`]).
    draining: bool,
    /// The daemon's link to the data plane is up ([`Server::set_data_plane_connected`]):
    /// a channel relayed in user space is offered to the kernel again when refreshed.
    data_plane_connected: bool,
    /// The allocations changed since the daemon last journaled them
    /// ([`Server::take_changes`]); `None` while nobody keeps a journal.
    changed: Option<HashSet<FiveTuple>>,
    /// The latest `now` of any input: the time of the inputs that carry none (a TCP
    /// connection closed, a relay socket lost, a shutdown).
    latest: Instant,
    /// Ended allocations whose stop record waits for the kernel's final figures, by id.
    finishing: HashMap<u64, accounting::Finishing>,
    /// The bindings whose final figures those wait for, and whose allocation.
    finishing_bindings: HashMap<ChannelBinding, u64>,
    stats: Stats,
}

/// A ChannelBind success waiting for the data plane.
#[derive(Debug)]
struct Pending {
    deadline: Instant,
    binding: ChannelBinding,
    responses: Vec<Transmit>,
}

/// What a deadline watches. When it comes due the object's current deadline is looked up
/// ([`Server::timer_deadline`]): a refresh since only re-arms it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Timer {
    Allocation(FiveTuple),
    Permission(FiveTuple, IpAddr),
    Channel(FiveTuple, ChannelNumber),
    Cooldown(FiveTuple, ChannelNumber),
    Install(FiveTuple, ChannelNumber),
    Reservation(ReservationToken),
    /// The next interim accounting record of an allocation.
    Interim(FiveTuple),
    /// The latest time for the stop record of an ended allocation (by id).
    Stop(u64),
}

#[derive(Debug, Clone, Copy)]
struct WallClock {
    instant: Instant,
    unix: Duration,
}

impl WallClock {
    fn new(instant: Instant, now: SystemTime) -> Self {
        Self {
            instant,
            unix: now.duration_since(UNIX_EPOCH).unwrap_or_default(),
        }
    }

    fn unix_secs(&self, now: Instant) -> u64 {
        (self.unix + now.saturating_duration_since(self.instant)).as_secs()
    }
}

struct NonceKeyDebug(NonceKey);

impl std::fmt::Debug for NonceKeyDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(..)")
    }
}

/// Ports tried for one allocation before the Allocate is refused with 508.
pub const RELAY_BIND_ATTEMPTS: u8 = 4;

/// How a request handler answers.
enum Reply {
    /// Send this success now.
    Now(Builder),
    /// Send this success when the data plane acknowledges the binding (or on timeout).
    Hold(Builder, (FiveTuple, ChannelNumber)),
    /// The answer is not known yet: an Allocate waits for its relay sockets
    /// ([`Server::relay_bound`] sends the success, [`Server::relay_bind_failed`] moves the
    /// allocation or answers 508), or it is a retransmission of such an Allocate.
    AwaitBind,
}

/// Attributes this server understands in requests; other comprehension-required ones get
/// 420 (RFC 8489 §6.3.1). DONT-FRAGMENT and RESERVATION-TOKEN are here because the server
/// honours them (RFC 8656 §7.2 has a server that cannot treat them as unknown).
const KNOWN_ATTRIBUTES: &[AttrType] = &[
    ATTR_USERNAME,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_PASSWORD_ALGORITHM,
    ATTR_USER_HASH,
    ATTR_ERROR_CODE,
    ATTR_REALM,
    ATTR_NONCE,
    ATTR_XORMAPPED_ADDRESS,
    ATTR_CHANNEL_NUMBER,
    ATTR_LIFETIME,
    ATTR_XOR_PEER_ADDRESS,
    ATTR_DATA,
    ATTR_XOR_RELAYED_ADDRESS,
    ATTR_EVEN_PORT,
    ATTR_DONT_FRAGMENT,
    ATTR_RESERVATION_TOKEN,
    ATTR_REQUESTED_TRANSPORT,
    ATTR_REQUESTED_ADDRESS_FAMILY,
    ATTR_PRIORITY,
    ATTR_USE_CANDIDATE,
];

const PROTO_UDP: u8 = 17;

fn reason(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "Server Error",
    }
}

fn request_method(method: Method) -> Option<RequestMethod> {
    Some(match method {
        METHOD_BINDING => RequestMethod::Binding,
        METHOD_ALLOCATE => RequestMethod::Allocate,
        METHOD_REFRESH => RequestMethod::Refresh,
        METHOD_CREATE_PERMISSION => RequestMethod::CreatePermission,
        METHOD_CHANNEL_BIND => RequestMethod::ChannelBind,
        _ => return None,
    })
}

/// REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY value (RFC 8656 §18.6, §18.11).
fn family_attr(value: &[u8]) -> Option<Family> {
    match value {
        [0x01, _, _, _] => Some(Family::V4),
        [0x02, _, _, _] => Some(Family::V6),
        _ => None,
    }
}

impl Server {
    /// Creates a server. `now` and `unix_time` anchor the wall clock (see the type docs).
    pub fn new(config: Config, now: Instant, unix_time: SystemTime) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut rng = StdRng::from_seed(config.rng_seed);
        let mut nonce_key = [0u8; 32];
        rng.fill(&mut nonce_key);
        if let Some(seed) = config.nonce_seed {
            StdRng::from_seed(seed).fill(&mut nonce_key);
        }
        // Cores of one daemon share the seed, hence the nonce key (a nonce one core issued is
        // good at every other), but each draws its own stream of ports and transaction ids.
        let mut stream_seed = [0u8; 32];
        rng.fill(&mut stream_seed);
        for (byte, core) in stream_seed.iter_mut().zip(config.core_index.to_le_bytes()) {
            *byte ^= core;
        }
        let rng = StdRng::from_seed(stream_seed);
        let policy = Self::build_policy(&config);
        let unauthorized = config.unauthorized_rate.map(RateLimiter::new);
        let sources = config
            .unauthenticated_per_source
            .map(|rate| SourceLimiter::new(rate, config.source_table_capacity, now));
        Ok(Self {
            config,
            policy,
            rng,
            nonce_key: NonceKeyDebug(NonceKey::new(nonce_key)),
            wall: WallClock::new(now, unix_time),
            allocations: HashMap::new(),
            by_port: HashMap::new(),
            reservations: HashMap::new(),
            started: now,
            pending: HashMap::new(),
            timers: Timers::new(),
            transmits: VecDeque::new(),
            commands: VecDeque::new(),
            unauthorized,
            sources,
            draining: false,
            data_plane_connected: false,
            changed: None,
            latest: now,
            finishing: HashMap::new(),
            finishing_bindings: HashMap::new(),
            stats: Stats::default(),
        })
    }

    fn build_policy(config: &Config) -> PeerPolicy {
        let own = config
            .relay_ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(config.relay_ipv6.map(IpAddr::V6))
            .chain(config.listeners.iter().map(|l| l.ip()))
            .chain(config.own_addresses.iter().copied());
        PeerPolicy::new(own, config.listeners.iter().copied())
            .with_lists(config.allow_peers.clone(), config.deny_peers.clone())
            .with_relay_ports(config.port_range.clone())
            .with_loopback(config.allow_loopback_peers)
    }

    /// Replaces users and REST secrets (SIGHUP reload). Allocations stay; later requests are
    /// checked against the new credentials.
    pub fn set_credentials(&mut self, credentials: Credentials) -> Result<(), ConfigError> {
        if credentials.realm() != self.config.realm {
            return Err(ConfigError::RealmMismatch);
        }
        self.config.credentials = credentials;
        Ok(())
    }

    /// Replaces the operator's peer allow and deny lists. Permissions for addresses the new
    /// lists refuse are revoked at once (their channels leave the data plane, as when a
    /// permission expires); the rest stay.
    pub fn set_peer_lists(&mut self, allow: Vec<ipnet::IpNet>, deny: Vec<ipnet::IpNet>) {
        self.policy = std::mem::take(&mut self.policy).with_lists(allow.clone(), deny.clone());
        self.config.allow_peers = allow;
        self.config.deny_peers = deny;
        self.revoke_denied_permissions();
    }

    /// Replaces the addresses of this host that peers must not reach
    /// ([`Config::own_addresses`]; the daemon follows its interfaces' addresses) and the ports
    /// such an address is open on where the operator allows it: the allocation ports of every
    /// server of the daemon, so that their allocations reach each other (the hairpin;
    /// [`Config::port_range`] until this is called). Permissions for addresses now refused
    /// are revoked, as by [`Server::set_peer_lists`].
    pub fn set_own_addresses(
        &mut self,
        addresses: Vec<IpAddr>,
        relay_ports: std::ops::RangeInclusive<u16>,
    ) {
        self.config.own_addresses = addresses;
        self.policy = Self::build_policy(&self.config).with_relay_ports(relay_ports);
        self.revoke_denied_permissions();
    }

    /// Whether the 5-tuple has an allocation (the daemon closes idle TCP connections
    /// without one).
    pub fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.allocations.contains_key(tuple)
    }

    /// Ends the permissions (and with them the channels) of addresses the policy now refuses.
    fn revoke_denied_permissions(&mut self) {
        let revoked: Vec<(FiveTuple, IpAddr)> = self
            .allocations
            .iter()
            .flat_map(|(tuple, alloc)| alloc.permissions.keys().map(move |ip| (*tuple, *ip)))
            .filter(|(_, ip)| self.policy.check_ip(*ip).is_err())
            .collect();
        for (tuple, ip) in revoked {
            tracing::debug!(client = %tuple.client, %ip, "permission revoked by the peer policy");
            self.expire_permission(&tuple, ip);
        }
    }

    /// Re-anchors the wall clock used for REST usernames and nonces.
    pub fn set_wall_clock(&mut self, now: Instant, unix_time: SystemTime) {
        self.wall = WallClock::new(now, unix_time);
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every binding the data plane should hold right now, with its effective expiry (as in
    /// [`Command::InstallChannel`]): the full state to push after the agent (re)connects.
    pub fn channel_bindings(&self) -> impl Iterator<Item = (ChannelBinding, Instant)> + '_ {
        self.allocations.iter().flat_map(|(tuple, alloc)| {
            alloc.channels.iter().filter_map(|(number, ch)| {
                Some((alloc.binding(tuple, *number, ch.peer)?, ch.kernel_expires?))
            })
        })
    }

    /// The daemon's link to the data plane came up (`true`: first connected, or connected
    /// again after it was lost) or went down. Coming up, every UDP channel that user space
    /// relays although the kernel could (bound while the link was down, or its install
    /// refused or lost) is offered to the data plane again ([`Command::InstallChannel`]),
    /// after the full state of [`Server::channel_bindings`]. Without this, a channel bound
    /// while the agent restarted would stay in user space for as long as its client kept
    /// refreshing it: a refresh only moves the expiry of what the kernel holds.
    pub fn set_data_plane_connected(&mut self, now: Instant, connected: bool) {
        self.latest = self.latest.max(now);
        self.data_plane_connected = connected;
        if !connected {
            return;
        }
        let tuples: Vec<FiveTuple> = self.allocations.keys().copied().collect();
        for tuple in tuples {
            self.offer_user_space_channels(now, &tuple, None);
        }
    }

    /// Whether the daemon's link to the data plane is up ([`Server::set_data_plane_connected`]).
    pub fn data_plane_connected(&self) -> bool {
        self.data_plane_connected
    }

    /// Starts (or stops) draining: new Allocates are redirected ([`crate::redirect`]) while
    /// existing allocations live on as before.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Whether the server drains.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Replaces [`Config::alternate_servers`] and [`Config::alternate_domain`] (a reload).
    pub fn set_alternates(&mut self, servers: Vec<SocketAddr>, domain: Option<String>) {
        self.config.alternate_servers = servers;
        self.config.alternate_domain = domain;
    }

    /// The number of allocations alive.
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// Bytes from a client: a STUN message or a ChannelData message (one datagram, or one
    /// frame of a TCP stream as delimited by [`crate::frame_len`]), received on listener
    /// `local`.
    pub fn handle_client(
        &mut self,
        now: Instant,
        transport: Transport,
        local: SocketAddr,
        from: ClientAddr,
        packet: &[u8],
    ) {
        self.latest = self.latest.max(now);
        let tuple = FiveTuple {
            client: from,
            server: local,
            transport,
        };
        let Some(&first) = packet.first() else {
            self.stats.dropped += 1;
            return;
        };
        match frame_kind(first) {
            Ok(FrameKind::ChannelData) => self.client_channel_data(now, &tuple, packet),
            Ok(FrameKind::Stun) => self.client_stun(now, &tuple, packet),
            Err(_) => {
                tracing::trace!(client = %from, "neither STUN nor ChannelData");
                self.stats.dropped += 1;
            }
        }
    }

    /// A UDP datagram from `from` arriving at relay socket `relay` (RFC 8656 §11.3, §12.7).
    /// Goes to the client as ChannelData when a channel is bound to `from`, as a Data
    /// indication when only a permission exists, and nowhere otherwise.
    pub fn handle_peer(&mut self, now: Instant, relay: RelayAddr, from: PeerAddr, packet: &[u8]) {
        self.latest = self.latest.max(now);
        let Some(&PortUse::Allocation(tuple)) = self.by_port.get(&relay.port()) else {
            tracing::trace!(%relay, peer = %from, "no allocation on relay port");
            self.stats.dropped += 1;
            return;
        };
        let Some(alloc) = self.allocations.get_mut(&tuple) else {
            self.stats.dropped += 1;
            return;
        };
        if alloc.relay(relay.family()) != Some(relay) || !alloc.has_permission(from.0.ip(), now) {
            tracing::trace!(%relay, peer = %from, "no permission");
            self.stats.dropped += 1;
            return;
        }
        let (ledger, stats) = (&self.config.bandwidth, &mut self.stats);
        if !accounting::meter(
            alloc,
            ledger,
            stats,
            now,
            Direction::PeerToClient,
            packet.len(),
        ) {
            return;
        }
        let channel = alloc
            .peers
            .get(&from)
            .and_then(|n| alloc.channels.get(n).map(|ch| (*n, ch)))
            .filter(|(_, ch)| ch.confirmed && ch.expires > now)
            .map(|(n, _)| n);
        let payload = match channel {
            Some(channel) => ChannelData {
                channel,
                payload: packet,
            }
            .encode(tuple.transport),
            None => {
                // RFC 8656 §11.3: a Data indication with XOR-PEER-ADDRESS and DATA.
                let mut txid = [0u8; 12];
                self.rng.fill(&mut txid);
                let mut b = Builder::new(METHOD_DATA, CLASS_INDICATION, TransactionId(txid));
                b.xor_address(ATTR_XOR_PEER_ADDRESS, from.0)
                    .raw(ATTR_DATA, packet);
                b.finish(None, None, false)
            }
        };
        tracing::trace!(peer = %from, client = %tuple.client, ?channel, len = packet.len(), "relay to client");
        self.stats.relayed_to_client.count(packet.len());
        self.transmits.push_back(Transmit::ToClient {
            transport: tuple.transport,
            server: tuple.server,
            client: tuple.client,
            payload,
        });
    }

    /// An ICMP error about a datagram that relay socket `relay` sent to `peer` (RFC 8656
    /// §11.5): `peer` is the destination of the datagram the error quotes, with port 0 when the
    /// daemon cannot read it. If the allocation of `relay` has a permission for the peer's IP
    /// (the quoted destination, not the router that sent the error), the client gets a Data
    /// indication with XOR-PEER-ADDRESS and ICMP, and no DATA. Only the types §11.5 names are
    /// relayed ([`Icmp::is_relayed`], read as ICMPv4 or ICMPv6 by the family of `relay`), at
    /// most [`crate::ICMP_RATE`] per second and allocation; the rest is dropped silently. The
    /// daemon passes only errors about its UDP relay sockets' datagrams, which is what §11.5
    /// asks for (an encapsulated UDP header).
    pub fn handle_icmp(&mut self, now: Instant, relay: RelayAddr, peer: PeerAddr, icmp: Icmp) {
        self.latest = self.latest.max(now);
        let family = relay.family();
        if Family::of(peer.0.ip()) != family || !icmp.is_relayed(family) {
            tracing::trace!(%relay, %peer, ?icmp, "ICMP not relayed");
            self.stats.dropped += 1;
            return;
        }
        let tick = self.icmp_tick(now);
        let Some(&PortUse::Allocation(tuple)) = self.by_port.get(&relay.port()) else {
            tracing::trace!(%relay, %peer, "ICMP for a port without allocation");
            self.stats.dropped += 1;
            return;
        };
        let Some(alloc) = self
            .allocations
            .get_mut(&tuple)
            .filter(|a| a.relay(family) == Some(relay) && a.has_permission(peer.0.ip(), now))
        else {
            tracing::trace!(%relay, %peer, "ICMP without permission");
            self.stats.dropped += 1;
            return;
        };
        if !alloc.icmp.take(tick) {
            self.stats.icmp_rate_limited += 1;
            return;
        }
        let mut txid = [0u8; 12];
        self.rng.fill(&mut txid);
        let mut b = Builder::new(METHOD_DATA, CLASS_INDICATION, TransactionId(txid));
        b.xor_address(ATTR_XOR_PEER_ADDRESS, peer.0)
            .raw(ATTR_ICMP, &icmp.attribute(family));
        tracing::trace!(%peer, client = %tuple.client, ?icmp, "ICMP to client");
        self.stats.icmp_relayed += 1;
        self.transmits.push_back(Transmit::ToClient {
            transport: tuple.transport,
            server: tuple.server,
            client: tuple.client,
            payload: b.finish(None, None, false),
        });
    }

    /// The tick of `now` for the ICMP rate caps ([`IcmpBudget`]).
    fn icmp_tick(&self, now: Instant) -> u32 {
        IcmpBudget::tick(now.saturating_duration_since(self.started))
    }

    /// The TCP connection of a client closed: its allocation goes with it (RFC 8656 §7: an
    /// allocation is bound to its 5-tuple, and a TCP 5-tuple ends with its connection).
    pub fn handle_client_closed(
        &mut self,
        transport: Transport,
        local: SocketAddr,
        from: ClientAddr,
    ) {
        let tuple = FiveTuple {
            client: from,
            server: local,
            transport,
        };
        self.delete_allocation(self.latest, &tuple, EndReason::ClientClosed);
    }

    /// The daemon's answer to [`Command::BindRelayPort`]: the socket of `relay` is bound.
    /// Once every relayed address of an allocation is bound, its Allocate success goes out
    /// (RFC 8656 §7.2: the success announces XOR-RELAYED-ADDRESS, which must then receive).
    /// A socket nobody needs any more (its allocation was deleted or moved to another port
    /// meanwhile) is handed back with [`Command::FreeRelayPort`].
    pub fn relay_bound(&mut self, now: Instant, relay: RelayAddr) {
        self.latest = self.latest.max(now);
        if let Some(&PortUse::Reserved(token)) = self.by_port.get(&relay.port()) {
            self.reservation_bound(now, token, relay);
            return;
        }
        let Some(tuple) = self.holder(relay) else {
            self.commands.push_back(Command::FreeRelayPort { relay });
            return;
        };
        let Some(alloc) = self.allocations.get_mut(&tuple) else {
            return;
        };
        if !alloc.is_unbound(relay) {
            return;
        }
        alloc.unbound[relay.family().index()] = false;
        if self.is_announced(&tuple) {
            self.announce_allocation(now, &tuple);
        }
    }

    /// The daemon could not bind `relay` (another socket on the host holds the port: the
    /// allocation range may overlap the ephemeral ports). The allocation moves to another
    /// port and its success waits for the new sockets (RFC 8656 §7.2 leaves the port to the
    /// server); after [`RELAY_BIND_ATTEMPTS`] ports it is deleted and the client gets 508
    /// (Insufficient Capacity). If its success already went out (a daemon that lost a bound
    /// socket), the allocation is deleted and the client learns on its next request (437).
    ///
    /// An allocation that reserved the next port (EVEN-PORT with the R bit) moves with its
    /// reservation to another free even/odd pair when either socket fails before its success
    /// went out. A reserved socket lost after that voids its token (RFC 8656 §7.2 makes the
    /// reservation best effort).
    pub fn relay_bind_failed(&mut self, relay: RelayAddr) {
        let tuple = match self.by_port.get(&relay.port()) {
            Some(&PortUse::Reserved(token)) => {
                let Some(tuple) = self.reserved_bind_failed(token, relay) else {
                    return;
                };
                tuple
            }
            _ => {
                let Some(tuple) = self.holder(relay) else {
                    return;
                };
                tuple
            }
        };
        if self.is_announced(&tuple) {
            tracing::debug!(%relay, "relay port lost after the allocation was announced; deleting it");
            self.delete_allocation(self.latest, &tuple, EndReason::Lost);
            return;
        }
        let Some(alloc) = self.allocations.get_mut(&tuple) else {
            return;
        };
        let (txid, key, even) = (alloc.allocate_txid, *alloc.key, alloc.even_port);
        let (dont_fragment, reservation) = (alloc.dont_fragment, alloc.reservation);
        alloc.bind_attempts = alloc.bind_attempts.saturating_add(1);
        let attempts = alloc.bind_attempts;
        let old_port = alloc.port;
        // What was bound is freed; what was not is never bound (a queued bind is dropped, an
        // answer still under way finds no allocation on the old port and frees its socket).
        for bound in alloc
            .relays()
            .filter(|r| !alloc.is_unbound(*r) && *r != relay)
        {
            self.commands
                .push_back(Command::FreeRelayPort { relay: bound });
        }
        alloc.unbound = [false; 2];
        self.commands.retain(
            |c| !matches!(c, Command::BindRelayPort { relay, .. } if relay.port() == old_port),
        );
        // Not announced, so its token has not gone out: the reservation is still there, and
        // its port goes along to stay next to the allocation's.
        let reservation = reservation.filter(|token| self.reservations.contains_key(token));
        if let Some(token) = reservation {
            self.release_reserved_port(token);
        }
        let new_port = if attempts >= RELAY_BIND_ATTEMPTS {
            None
        } else if reservation.is_some() {
            self.pick_pair()
        } else {
            self.pick_port(even)
        };
        let Some(port) = new_port.filter(|p| *p != old_port) else {
            tracing::debug!(%relay, attempts, "no relay port could be bound; allocation refused");
            if let Some(token) = reservation {
                self.end_reservation(token);
            }
            if let Some(alloc) = self.allocations.get_mut(&tuple) {
                // Freed above or never bound: nothing is left for the deletion to free.
                alloc.relay_v4 = None;
                alloc.relay_v6 = None;
            }
            // Never announced: no accounting record, only its bandwidth to release.
            self.delete_allocation(self.latest, &tuple, EndReason::Lost);
            self.stats.response(RequestMethod::Allocate, 508);
            let mut b = Builder::new(METHOD_ALLOCATE, CLASS_ERROR_RESPONSE, txid);
            b.error(508, reason(508));
            let payload = b.finish(self.config.software.as_deref(), Some(&key), true);
            self.reply(&tuple, payload);
            return;
        };
        tracing::debug!(%relay, new_port = %port, "relay port unavailable, moving the allocation");
        self.by_port.remove(&old_port);
        self.by_port.insert(port, PortUse::Allocation(tuple));
        let Some(alloc) = self.allocations.get_mut(&tuple) else {
            return;
        };
        alloc.port = port;
        for relay in [&mut alloc.relay_v4, &mut alloc.relay_v6]
            .into_iter()
            .flatten()
        {
            relay.0.set_port(port.0);
        }
        alloc.await_binds();
        for relay in alloc.relays() {
            self.commands.push_back(Command::BindRelayPort {
                relay,
                dont_fragment,
            });
        }
        if let Some(token) = reservation {
            self.move_reservation(token, port);
        }
    }

    /// The allocation that holds relayed address `relay`, if any.
    fn holder(&self, relay: RelayAddr) -> Option<FiveTuple> {
        let Some(&PortUse::Allocation(tuple)) = self.by_port.get(&relay.port()) else {
            return None;
        };
        let alloc = self.allocations.get(&tuple)?;
        alloc.relays().any(|r| r == relay).then_some(tuple)
    }

    /// Ends every allocation and reservation, as a stop of the daemon does: each channel in
    /// the data plane gets a [`Command::RemoveChannel`], each relay socket a
    /// [`Command::FreeRelayPort`], each reserved socket a [`Command::ReleaseReservedPort`];
    /// held responses are dropped and no timer is left. The server stays usable.
    ///
    /// The reservations this core made leave the shared ledger here, in the same step that
    /// releases their sockets: a stopped core ends nothing, so a token it left there would
    /// count against the bounds for good, and another core could still take it after its
    /// socket closed. A token another core took already is that core's, and so is its socket.
    ///
    /// Every allocation gets its stop record ([`Command::Account`], end reason "shutdown") at
    /// once, with what is known: the kernel's final figures cannot be waited for, so a stop
    /// of an allocation with bindings in the data plane says `kernel_final: false`, as do the
    /// stops still waiting for them.
    pub fn shutdown(&mut self) {
        let now = self.latest;
        let tuples: Vec<FiveTuple> = self.allocations.keys().copied().collect();
        for tuple in tuples {
            self.delete_allocation(now, &tuple, EndReason::Shutdown);
        }
        self.finish_all(now);
        let tokens: Vec<ReservationToken> = self.reservations.keys().copied().collect();
        for token in tokens {
            self.end_reservation(token);
        }
        self.pending.clear();
        self.timers.clear();
    }

    /// The data plane's answer to [`Command::InstallChannel`]. Releases a held ChannelBind
    /// success; a failure removes the binding from the data plane
    /// ([`Command::RemoveChannel`]) and leaves the channel to user-space relaying.
    pub fn channel_installed(
        &mut self,
        now: Instant,
        binding: &ChannelBinding,
        result: Result<(), OffloadError>,
    ) {
        self.latest = self.latest.max(now);
        let tuple = FiveTuple {
            client: binding.client,
            server: binding.server,
            transport: binding.transport,
        };
        let key = (tuple, binding.channel);
        self.mark_changed(&tuple);
        // The whole binding must match, relay address included: a late answer
        // for a deleted allocation's binding must not touch the channel a new
        // allocation of the same 5-tuple bound since.
        let current = self
            .allocations
            .get_mut(&tuple)
            .filter(|a| a.binding(&tuple, binding.channel, binding.peer) == Some(*binding))
            .and_then(|a| {
                let username = a.username.clone();
                let ch = a.channels.get_mut(&binding.channel)?;
                (ch.peer == binding.peer).then_some((username, ch, &mut a.account.removing))
            });
        match result {
            Ok(()) => {
                self.stats.offload_installed += 1;
                tracing::debug!(%binding, "channel offloaded");
                if let Some((_, ch, _)) = current {
                    ch.maybe_in_kernel = true;
                }
            }
            Err(error) => {
                self.stats.offload_failed += 1;
                tracing::debug!(%binding, %error, "channel offload failed, relaying in user space");
                // The data plane may still hold an earlier install of this binding (this was a
                // re-install for a new expiry) with the older expiry. Once the channel is not
                // marked as in the data plane, nothing else would remove that entry, not even
                // an early deletion of the allocation; so it goes now. Answers to installs
                // sent before the remove cannot bring it back: the daemon carries commands out
                // in order. Nothing goes when no install since the last removal can have got
                // there (the daemon sent none: no agent connected), so that the allocation's
                // figures do not wait for, or miss, final figures of a binding the kernel
                // never held.
                if let Some((username, ch, removing)) = current
                    && ch.kernel_expires.take().is_some()
                {
                    self.config.quotas.remove_kernel_bindings(&username, 1);
                    if error != OffloadError::Unavailable || ch.maybe_in_kernel {
                        ch.maybe_in_kernel = false;
                        removing.insert(*binding);
                        self.commands
                            .push_back(Command::RemoveChannel { binding: *binding });
                    }
                }
            }
        }
        if self
            .pending
            .get(&key)
            .is_some_and(|p| p.binding == *binding)
        {
            tracing::trace!(%binding, ?now, "releasing held ChannelBind success");
            self.release_pending(key);
        }
    }

    /// Expires whatever is due at `now`, emitting the matching remove commands and releasing
    /// held ChannelBind successes whose offload timeout passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.latest = self.latest.max(now);
        while let Some((deadline, timer)) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            match self.timer_deadline(timer) {
                Some(actual) if actual <= now => self.fire(now, timer),
                // Refreshed since: wait for the new deadline.
                Some(actual) => self.timers.schedule(timer, actual),
                None => {}
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some((deadline, timer)) = self.timers.peek() {
            match self.timer_deadline(timer) {
                Some(actual) if actual <= deadline => return Some(deadline),
                Some(actual) => {
                    self.timers.pop();
                    self.timers.schedule(timer, actual);
                }
                None => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    /// Deadlines queued: one per allocation, permission, channel, cooldown, held response and
    /// reservation, however often and however clients refresh.
    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next side effect to carry out.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    // ---- per-packet paths -------------------------------------------------------------

    /// RFC 8656 §12.6: ChannelData from a client goes to the bound peer, if a permission
    /// exists; otherwise it is silently discarded.
    fn client_channel_data(&mut self, now: Instant, tuple: &FiveTuple, packet: &[u8]) {
        let Ok(data) = ChannelData::parse(packet) else {
            self.stats.dropped += 1;
            return;
        };
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            tracing::trace!(client = %tuple.client, "ChannelData without allocation");
            self.stats.dropped += 1;
            return;
        };
        let Some(ch) = alloc
            .channels
            .get(&data.channel)
            .filter(|ch| ch.expires > now)
        else {
            tracing::trace!(client = %tuple.client, channel = %data.channel, "unbound channel");
            self.stats.dropped += 1;
            return;
        };
        let peer = ch.peer;
        let (true, Some(relay)) = (
            alloc.has_permission(peer.0.ip(), now),
            alloc.relay(Family::of(peer.0.ip())),
        ) else {
            self.stats.dropped += 1;
            return;
        };
        let (ledger, stats, len) = (&self.config.bandwidth, &mut self.stats, data.payload.len());
        if !accounting::meter(alloc, ledger, stats, now, Direction::ClientToPeer, len) {
            return;
        }
        tracing::trace!(client = %tuple.client, %peer, len = data.payload.len(), "relay to peer");
        self.stats.relayed_to_peer.count(data.payload.len());
        self.transmits.push_back(Transmit::ToPeer {
            relay,
            peer,
            payload: data.payload.to_vec(),
        });
    }

    fn client_stun(&mut self, now: Instant, tuple: &FiveTuple, packet: &[u8]) {
        // Expire what is due first, so that no request sees a lapsed entry as alive.
        self.handle_timeout(now);
        let req = match parse(packet) {
            Ok(req) => req,
            Err(error) => {
                tracing::trace!(client = %tuple.client, %error, "dropped");
                self.stats.dropped += 1;
                return;
            }
        };
        // A request may change the allocation of its 5-tuple (a Send indication, relayed data,
        // never does: the journal must stay off the data path).
        if req.class() == CLASS_REQUEST && self.allocations.contains_key(tuple) {
            self.mark_changed(tuple);
        }
        match (req.class(), req.method()) {
            (CLASS_INDICATION, METHOD_SEND) => self.send_indication(now, tuple, &req),
            (CLASS_REQUEST, METHOD_BINDING) => self.binding(now, tuple, &req),
            (CLASS_REQUEST, method) => match request_method(method) {
                Some(method) => self.turn_request(now, tuple, &req, method),
                None => {
                    // RFC 8489 §6.3.1: an unknown method in a request gets 400.
                    if self.admit_unauthenticated(now, tuple) {
                        self.error(tuple, &req, 400, None);
                    }
                }
            },
            _ => self.stats.dropped += 1,
        }
    }

    // ---- requests -----------------------------------------------------------------------

    /// RFC 8489 §7.3.1: answered without authentication, so under the limits on such answers
    /// ([`Server::admit_unauthenticated`]): the success is larger than the request, which a
    /// spoofed source would otherwise turn into an amplified reflection.
    fn binding(&mut self, now: Instant, tuple: &FiveTuple, req: &Parsed<'_>) {
        if !self.admit_unauthenticated(now, tuple) {
            return;
        }
        let unknown = req.unknown_required(KNOWN_ATTRIBUTES);
        if !unknown.is_empty() {
            self.stats.response(RequestMethod::Binding, 420);
            self.unknown_attributes(tuple, req, unknown, None);
            return;
        }
        // RFC 8489 §7.3.1: XOR-MAPPED-ADDRESS is the source of the request.
        let mut b = Builder::new(METHOD_BINDING, CLASS_SUCCESS_RESPONSE, req.transaction_id());
        b.xor_address(ATTR_XORMAPPED_ADDRESS, tuple.client.0);
        self.stats.response(RequestMethod::Binding, 200);
        let payload = b.finish(self.config.software.as_deref(), None, true);
        self.reply(tuple, payload);
    }

    fn turn_request(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        req: &Parsed<'_>,
        method: RequestMethod,
    ) {
        let Some(auth) = self.authenticate(now, tuple, req, method) else {
            return;
        };
        let unknown = req.unknown_required(KNOWN_ATTRIBUTES);
        if !unknown.is_empty() {
            self.stats.response(method, 420);
            self.unknown_attributes(tuple, req, unknown, Some(&auth.key));
            return;
        }
        if method != RequestMethod::Allocate {
            // RFC 8656 §5: other requests need an allocation on this 5-tuple, made by the same
            // user.
            let Some(alloc) = self.allocations.get(tuple) else {
                self.stats.response(method, 437);
                self.error(tuple, req, 437, Some(&auth.key));
                return;
            };
            if *alloc.username != *auth.username {
                self.stats.response(method, 441);
                self.error(tuple, req, 441, Some(&auth.key));
                return;
            }
        }
        // A retransmitted Allocate of an allocation made before still gets its success.
        if method == RequestMethod::Allocate
            && !self.allocations.contains_key(tuple)
            && let Some(why) = redirect(&self.config, self.draining)
        {
            self.redirect(tuple, req, &auth.key, why);
            return;
        }
        let result = match method {
            RequestMethod::Allocate => self.allocate(now, tuple, req, &auth),
            RequestMethod::Refresh => self.refresh(now, tuple, req),
            RequestMethod::CreatePermission => self.create_permission(now, tuple, req),
            RequestMethod::ChannelBind => self.channel_bind(now, tuple, req),
            RequestMethod::Binding => return,
        };
        match result {
            Ok(Reply::AwaitBind) => {}
            Ok(reply) => {
                self.stats.response(method, 200);
                let software = self.config.software.as_deref();
                let (builder, hold) = match reply {
                    Reply::Now(b) => (b, None),
                    Reply::Hold(b, key) => (b, Some(key)),
                    Reply::AwaitBind => return,
                };
                let transmit = Transmit::ToClient {
                    transport: tuple.transport,
                    server: tuple.server,
                    client: tuple.client,
                    payload: builder.finish(software, Some(&auth.key), true),
                };
                match hold.and_then(|key| self.pending.get_mut(&key)) {
                    Some(pending) => pending.responses.push(transmit),
                    None => self.transmits.push_back(transmit),
                }
            }
            Err(code) => {
                self.stats.response(method, code);
                self.error(tuple, req, code, Some(&auth.key));
            }
        }
    }

    /// Answers an authenticated Allocate with 300 (Try Alternate) naming the alternate of
    /// the client's family, or 508 without one (see [`crate::redirect`]).
    fn redirect(&mut self, tuple: &FiveTuple, req: &Parsed<'_>, key: &SigningKey, why: Redirect) {
        match why {
            Redirect::Drain => self.stats.redirected_drain += 1,
            Redirect::Load => self.stats.redirected_load += 1,
        }
        let Some(alternate) = alternate(&self.config, tuple.client.0) else {
            tracing::debug!(client = %tuple.client, ?why, "allocate refused, no alternate of its family");
            self.stats.response(RequestMethod::Allocate, NO_ALTERNATE);
            self.error(tuple, req, NO_ALTERNATE, Some(key));
            return;
        };
        tracing::debug!(client = %tuple.client, %alternate, ?why, "allocate redirected");
        self.stats.response(RequestMethod::Allocate, TRY_ALTERNATE);
        let mut b = Builder::new(req.method(), CLASS_ERROR_RESPONSE, req.transaction_id());
        b.error(TRY_ALTERNATE, reason(TRY_ALTERNATE));
        b.plain_address(ATTR_ALTERNATE_SERVER, alternate);
        if let Some(domain) = &self.config.alternate_domain {
            b.raw(ATTR_ALTERNATE_DOMAIN, domain.as_bytes());
        }
        let payload = b.finish(self.config.software.as_deref(), Some(key), true);
        self.reply(tuple, payload);
    }

    /// RFC 8489 §9.2.4 long-term credential checks. Answers the request itself (401, 438,
    /// 400) when they fail, within the limits on unauthenticated answers. The nonce is
    /// checked before the user and key, where the RFC checks it last: a forged request then
    /// costs one HMAC, and a client with both a stale nonce and wrong credentials gets 438,
    /// then 401, instead of 401. A request with a stale nonce has its integrity checked too,
    /// to tell a real user (whose 438 is never held back) from a flood.
    fn authenticate(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        req: &Parsed<'_>,
        method: RequestMethod,
    ) -> Option<Auth> {
        let offer = match Offer::read(req) {
            Ok(Some(offer)) => offer,
            Ok(None) => {
                if self.admit_unauthenticated(now, tuple) {
                    self.challenge(now, tuple, req, method, 401);
                }
                return None;
            }
            Err(error) => {
                tracing::debug!(client = %tuple.client, %error, "malformed credentials");
                if error == Malformed::IntegrityLength {
                    self.stats.auth_failures += 1;
                }
                if self.admit_unauthenticated(now, tuple) {
                    self.stats.response(method, 400);
                    self.error(tuple, req, 400, None);
                }
                return None;
            }
        };
        let unix = self.wall.unix_secs(now);
        let lifetime = self.config.nonce_lifetime.as_secs();
        if self
            .nonce_key
            .0
            .check(offer.nonce, tuple.client.0, unix, lifetime)
            != NonceCheck::Valid
        {
            // A request whose integrity verifies comes from someone who holds the user's key
            // and only brought an old nonce (or moved to another address): its 438 is sent
            // outside the limits on unauthenticated answers, so that a flood cannot keep real
            // users from refreshing their allocations.
            let verified = offer.authenticate(&self.config.credentials, unix).is_ok();
            if verified {
                self.stats.stale_nonce_verified += 1;
            } else if !self.admit_unauthenticated(now, tuple) {
                return None;
            }
            self.challenge(now, tuple, req, method, 438);
            return None;
        }
        match offer.authenticate(&self.config.credentials, unix) {
            Ok(auth) => Some(auth),
            Err(error) => {
                tracing::debug!(client = %tuple.client, %error, "authentication failed");
                self.stats.auth_failures += 1;
                if self.admit_unauthenticated(now, tuple) {
                    self.challenge(now, tuple, req, method, 401);
                }
                None
            }
        }
    }

    /// Whether an answer to a request that is not authenticated (a Binding, a 401 or 438
    /// challenge, an error before authentication) may go to the client of `tuple`: within
    /// its source's share ([`Config::unauthenticated_per_source`]), then within the
    /// host-wide backstop ([`Config::unauthorized_rate`]). Counts what it refuses. Answers over
    /// TCP are always admitted: the handshake proved the source, so nothing is reflected,
    /// and they go back over the client's own connection.
    fn admit_unauthenticated(&mut self, now: Instant, tuple: &FiveTuple) -> bool {
        if tuple.transport != Transport::Udp {
            return true;
        }
        if let Some(sources) = &mut self.sources
            && !sources.allow(now, tuple.client.0.ip())
        {
            tracing::trace!(client = %tuple.client, "source over its unauthenticated rate");
            self.stats.unauthenticated_source_limited += 1;
            return false;
        }
        if let Some(limiter) = &mut self.unauthorized
            && !limiter.allow(now)
        {
            tracing::trace!(client = %tuple.client, "host-wide unauthenticated rate reached");
            self.stats.unauthorized_rate_limited += 1;
            return false;
        }
        true
    }

    /// 401 or 438 with REALM, a fresh NONCE with the nonce cookie and PASSWORD-ALGORITHMS
    /// (RFC 8489 §9.2.4). The caller has admitted the answer
    /// ([`Server::admit_unauthenticated`]) unless it is a 438 to a request whose integrity
    /// verified.
    fn challenge(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        req: &Parsed<'_>,
        method: RequestMethod,
        code: u16,
    ) {
        self.stats.response(method, code);
        let nonce = self.nonce_key.0.issue(
            self.config.credentials.security_features(),
            self.wall.unix_secs(now),
            tuple.client.0,
        );
        let mut b = Builder::new(req.method(), CLASS_ERROR_RESPONSE, req.transaction_id());
        b.error(code, reason(code))
            .raw(ATTR_REALM, self.config.realm.as_bytes())
            .raw(ATTR_NONCE, nonce.as_bytes())
            .raw(ATTR_PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS);
        let payload = b.finish(self.config.software.as_deref(), None, true);
        self.reply(tuple, payload);
    }

    /// RFC 8656 §7.2.
    fn allocate(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        req: &Parsed<'_>,
        auth: &Auth,
    ) -> Result<Reply, u16> {
        if let Some(alloc) = self.allocations.get(tuple) {
            // A retransmitted Allocate gets the original success; anything else is a
            // mismatch.
            if alloc.allocate_txid == req.transaction_id() && *alloc.username == *auth.username {
                if !self.is_announced(tuple) {
                    // The success follows once the relay sockets are bound.
                    return Ok(Reply::AwaitBind);
                }
                return Ok(Reply::Now(self.allocate_success(
                    now,
                    tuple,
                    req.transaction_id(),
                )));
            }
            return Err(437);
        }
        let dont_fragment = allocate_transport_and_fragmentation(req)?;
        if let Some(token) = req.attr(ATTR_RESERVATION_TOKEN) {
            return self.allocate_reserved(now, tuple, req, auth, token, dont_fragment);
        }
        // EVEN-PORT (RFC 8656 §18.7): one byte, the R bit at the top, the rest ignored.
        let (even_port, reserve) = match req.attr(ATTR_EVEN_PORT) {
            None => (false, false),
            Some(&[flags]) => (true, flags & 0x80 != 0),
            Some(_) => return Err(400),
        };
        let (primary, extra) = requested_families(req)?;
        let relay_ip = |f: Family| match f {
            Family::V4 => self.config.relay_ipv4.map(IpAddr::V4),
            Family::V6 => self.config.relay_ipv6.map(IpAddr::V6),
        };
        let Some(primary_ip) = relay_ip(primary) else {
            return Err(440);
        };
        // RFC 8656 §7.2: a reservation is one relayed address, so not for two families.
        if reserve && extra.is_some() {
            return Err(400);
        }
        let extra_ip = extra.and_then(relay_ip);
        let refused_family = extra.filter(|_| extra_ip.is_none());
        let lifetime = self
            .desired_lifetime(req)?
            .max(self.config.default_lifetime);
        let username: Arc<str> = Arc::from(auth.username.as_str());
        // RFC 8656 §7.2: 508 when no even port, or no even/odd pair (or no further
        // reservation) can be had.
        let port = if reserve {
            self.pick_pair()
        } else {
            self.pick_port(even_port)
        };
        let port = port.ok_or(508u16)?;
        // pick_pair leaves port + 1 free and in range.
        let reserved =
            reserve.then(|| RelayAddr(SocketAddr::new(primary_ip, port.0.saturating_add(1))));
        let (token, max_bps) = self.admit(&username, reserved)?;
        let account = self.open_account(now, &username, max_bps);
        let mut alloc = Allocation::new(
            port,
            username.clone(),
            now + lifetime,
            req.transaction_id(),
            auth.key,
            IcmpBudget::new(self.icmp_tick(now)),
            account,
        );
        alloc.refused_family = refused_family;
        alloc.even_port = even_port;
        alloc.dont_fragment = dont_fragment;
        for ip in std::iter::once(primary_ip).chain(extra_ip) {
            alloc.set_relay(RelayAddr(SocketAddr::new(ip, port.0)));
        }
        alloc.await_binds();
        for relay in alloc.relays() {
            self.commands.push_back(Command::BindRelayPort {
                relay,
                dont_fragment,
            });
        }
        if let (Some(token), Some(reserved)) = (token, reserved) {
            alloc.reservation = Some(token);
            self.hold_reservation(now, tuple, token, reserved, dont_fragment);
        }
        self.insert_allocation(tuple, alloc, lifetime);
        Ok(Reply::AwaitBind)
    }

    /// Enters a new allocation in the tables.
    fn insert_allocation(&mut self, tuple: &FiveTuple, alloc: Allocation, lifetime: Duration) {
        tracing::debug!(client = %tuple.client, port = %alloc.port, username = %alloc.username, ?lifetime, "allocation created");
        self.by_port.insert(alloc.port, PortUse::Allocation(*tuple));
        self.timers
            .schedule(Timer::Allocation(*tuple), alloc.expires);
        self.allocations.insert(*tuple, alloc);
        self.stats.allocations_created += 1;
        self.stats.allocations_active += 1;
    }

    /// Sends the success of an allocation whose relay sockets are all bound.
    fn announce_allocation(&mut self, now: Instant, tuple: &FiveTuple) {
        let Some(alloc) = self.allocations.get(tuple) else {
            return;
        };
        // Known to its client from now on: worth saving.
        if let Some(changed) = &mut self.changed {
            changed.insert(*tuple);
        }
        let (txid, key, reservation) = (alloc.allocate_txid, *alloc.key, alloc.reservation);
        if let Some(token) = reservation {
            self.publish_reservation(now, tuple, token);
        }
        self.stats.response(RequestMethod::Allocate, 200);
        let payload = self.allocate_success(now, tuple, txid).finish(
            self.config.software.as_deref(),
            Some(&key),
            true,
        );
        self.reply(tuple, payload);
        self.start_record(now, tuple);
    }

    fn allocate_success(&self, now: Instant, tuple: &FiveTuple, txid: TransactionId) -> Builder {
        let mut b = Builder::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE, txid);
        if let Some(alloc) = self.allocations.get(tuple) {
            for relay in alloc.relays() {
                b.xor_address(ATTR_XOR_RELAYED_ADDRESS, relay.0);
            }
            b.attr(&Lifetime(remaining(alloc.expires, now)));
            if let Some(token) = alloc.reservation {
                b.raw(ATTR_RESERVATION_TOKEN, &token);
            }
            if let Some(family) = alloc.refused_family {
                // RFC 8656 §7.2: the additional family could not be allocated.
                b.address_error(family.wire(), 440, reason(440));
            }
        }
        b.xor_address(ATTR_XORMAPPED_ADDRESS, tuple.client.0);
        b
    }

    /// LIFETIME (RFC 8656 §7.2, §8): absent means the default, otherwise capped at the
    /// maximum; zero is kept (Refresh deletes with it).
    fn desired_lifetime(&self, req: &Parsed<'_>) -> Result<Duration, u16> {
        match req.attr(ATTR_LIFETIME) {
            None => Ok(self.config.default_lifetime),
            Some(&[a, b, c, d]) => {
                let secs = Duration::from_secs(u64::from(u32::from_be_bytes([a, b, c, d])));
                if secs.is_zero() {
                    Ok(Duration::ZERO)
                } else {
                    Ok(secs.clamp(self.config.default_lifetime, self.config.max_lifetime))
                }
            }
            Some(_) => Err(400),
        }
    }

    /// Draws a free allocation port at random from the range (RFC 8656 §7.2 asks for
    /// unpredictable ports), falling back to a scan from a random start when the range is
    /// crowded.
    fn pick_port(&mut self, even: bool) -> Option<AllocationPort> {
        let (lo, hi) = (
            *self.config.port_range.start(),
            *self.config.port_range.end(),
        );
        let free = |p: u16, by_port: &HashMap<AllocationPort, PortUse>| {
            (!even || p.is_multiple_of(2)) && !by_port.contains_key(&AllocationPort(p))
        };
        for _ in 0..16 {
            let p = self.rng.random_range(lo..=hi);
            if free(p, &self.by_port) {
                return Some(AllocationPort(p));
            }
        }
        let span = u32::from(hi - lo) + 1;
        let start = self.rng.random_range(0..span);
        (0..span)
            .map(|i| lo + ((start + i) % span) as u16)
            .find(|p| free(*p, &self.by_port))
            .map(AllocationPort)
    }

    /// RFC 8656 §8.2 (Receiving a Refresh Request).
    fn refresh(&mut self, now: Instant, tuple: &FiveTuple, req: &Parsed<'_>) -> Result<Reply, u16> {
        let lifetime = self.desired_lifetime(req)?;
        let family = match req.attr(ATTR_REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(v) => Some(family_attr(v).ok_or(400u16)?),
        };
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            return Err(437);
        };
        if let Some(family) = family
            && alloc.relay(family).is_none()
        {
            return Err(443);
        }
        let mut b = Builder::new(METHOD_REFRESH, CLASS_SUCCESS_RESPONSE, req.transaction_id());
        if lifetime.is_zero() {
            let dual = alloc.relay_v4.is_some() && alloc.relay_v6.is_some();
            match family {
                // Deleting one family of a dual-stack allocation.
                Some(family) if dual => self.drop_family(tuple, family),
                _ => self.delete_allocation(now, tuple, EndReason::Deleted),
            }
        } else {
            let expires = now + lifetime;
            // A later deadline reuses the queued timer entry; an earlier one supersedes it.
            self.timers.schedule(Timer::Allocation(*tuple), expires);
            alloc.expires = expires;
            // Up or down: a shorter lifetime can make the allocation the earliest term of a
            // binding's effective expiry.
            self.sync_kernel_expiries(tuple);
        }
        b.attr(&Lifetime(lifetime));
        Ok(Reply::Now(b))
    }

    /// The peers named in a request, checked for family (443) and policy (403).
    fn checked_peer(
        &mut self,
        tuple: &FiveTuple,
        value: &[u8],
        req: &Parsed<'_>,
    ) -> Result<PeerAddr, u16> {
        let peer = req.xor_address(value).ok_or(400u16)?;
        let Some(alloc) = self.allocations.get(tuple) else {
            return Err(437);
        };
        if alloc.relay(Family::of(peer.ip())).is_none() {
            return Err(443);
        }
        if let Err(denied) = self.policy.check(peer) {
            tracing::debug!(client = %tuple.client, %peer, %denied, "peer denied");
            self.stats.peers_denied += 1;
            return Err(403);
        }
        Ok(PeerAddr(peer))
    }

    /// RFC 8656 §10.2: all peers are checked before any permission is installed.
    fn create_permission(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        req: &Parsed<'_>,
    ) -> Result<Reply, u16> {
        let mut peers = Vec::new();
        for value in req.attrs(ATTR_XOR_PEER_ADDRESS) {
            peers.push(self.checked_peer(tuple, value, req)?);
        }
        if peers.is_empty() {
            return Err(400);
        }
        // RFC 8656 §10.2: all or none, so the cap is checked for the request as a whole.
        let Some(alloc) = self.allocations.get(tuple) else {
            return Err(437);
        };
        let mut new: Vec<IpAddr> = peers
            .iter()
            .map(|peer| peer.0.ip())
            .filter(|ip| !alloc.permissions.contains_key(ip))
            .collect();
        new.sort_unstable();
        new.dedup();
        if alloc.permissions.len() + new.len() > self.config.max_permissions_per_allocation {
            tracing::debug!(client = %tuple.client, held = alloc.permissions.len(), asked = new.len(), "permission cap reached");
            self.stats.permission_cap_reached += 1;
            return Err(508);
        }
        for peer in peers {
            self.install_permission(now, tuple, peer.0.ip());
        }
        self.sync_kernel_expiries(tuple);
        Ok(Reply::Now(Builder::new(
            METHOD_CREATE_PERMISSION,
            CLASS_SUCCESS_RESPONSE,
            req.transaction_id(),
        )))
    }

    /// RFC 8656 §12.2.
    fn channel_bind(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        req: &Parsed<'_>,
    ) -> Result<Reply, u16> {
        let (Some(&[hi, lo, _, _]), Some(peer_value)) = (
            req.attr(ATTR_CHANNEL_NUMBER),
            req.attr(ATTR_XOR_PEER_ADDRESS),
        ) else {
            return Err(400);
        };
        let number = ChannelNumber::new(u16::from_be_bytes([hi, lo])).map_err(|_| 400u16)?;
        let peer = self.checked_peer(tuple, peer_value, req)?;
        let Some(alloc) = self.allocations.get(tuple) else {
            return Err(437);
        };
        // The rebinding rules: a number stays with its peer and a peer with its number while
        // bound and for five minutes after.
        let existing = alloc
            .channels
            .get(&number)
            .filter(|ch| ch.expires > now)
            .copied();
        if existing.is_some_and(|ch| ch.peer != peer)
            || alloc.peers.get(&peer).is_some_and(|n| *n != number)
            || alloc.cooldown_conflict(number, peer, now)
        {
            return Err(400);
        }
        // RFC 8656 §12.2: 508 when the server cannot fulfil the request; a refresh of what the
        // allocation holds always can.
        if !alloc.channels.contains_key(&number)
            && alloc.channels.len() >= self.config.max_channels_per_allocation
        {
            tracing::debug!(client = %tuple.client, channel = %number, "channel cap reached");
            self.stats.channel_cap_reached += 1;
            return Err(508);
        }
        if !alloc.permissions.contains_key(&peer.0.ip())
            && alloc.permissions.len() >= self.config.max_permissions_per_allocation
        {
            tracing::debug!(client = %tuple.client, %peer, "permission cap reached");
            self.stats.permission_cap_reached += 1;
            return Err(508);
        }
        let key = (*tuple, number);
        let builder = Builder::new(
            METHOD_CHANNEL_BIND,
            CLASS_SUCCESS_RESPONSE,
            req.transaction_id(),
        );
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            return Err(437);
        };
        let expires = now + CHANNEL_LIFETIME;
        let refresh = match alloc.channels.get_mut(&number) {
            Some(ch) => {
                ch.expires = expires;
                true
            }
            None => false,
        };
        // RFC 8656 §12.2: the bind also installs or refreshes the permission for the peer's
        // IP. The channel's new lifetime is set first, so a permission coming back installs
        // with the final expiry; then every binding whose effective expiry moved (this one,
        // others to the same IP) is re-installed.
        self.install_permission(now, tuple, peer.0.ip());
        self.sync_kernel_expiries(tuple);
        if refresh && self.data_plane_connected {
            // A channel relayed in user space (its install refused, or lost with the link
            // to the data plane) gets another chance with each refresh.
            self.offer_user_space_channels(now, tuple, Some(peer));
        }
        if refresh {
            // Answered at once unless the first answer is still held.
            if self.pending.contains_key(&key) {
                return Ok(Reply::Hold(builder, key));
            }
            return Ok(Reply::Now(builder));
        }
        self.bind_new_channel(now, tuple, (number, peer, expires), builder)
    }

    /// A ChannelBind's new channel `number` to `peer` until `expires`: entered in the
    /// tables and, for UDP clients, sent to the data plane, the success (`builder`) held
    /// until it answers.
    fn bind_new_channel(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        (number, peer, expires): (ChannelNumber, PeerAddr, Instant),
        builder: Builder,
    ) -> Result<Reply, u16> {
        let key = (*tuple, number);
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            return Err(437);
        };
        if alloc.cooldowns.remove(&number).is_some() {
            self.timers.cancel(Timer::Cooldown(*tuple, number));
        }
        self.timers
            .schedule(Timer::Channel(*tuple, number), expires);
        // TCP clients are never offloaded; nor is a user past its share of the data plane.
        let offload = tuple.transport == Transport::Udp
            && take_kernel_share(&self.config, &mut self.stats, &alloc.username);
        let channel = Channel {
            peer,
            expires,
            kernel_expires: None,
            confirmed: !offload,
            maybe_in_kernel: false,
        };
        let kernel_expires = alloc.effective_expiry(&channel);
        alloc.channels.insert(
            number,
            Channel {
                kernel_expires: offload.then_some(kernel_expires),
                ..channel
            },
        );
        alloc.peers.insert(peer, number);
        self.stats.channels_active += 1;
        let Some(binding) = alloc.binding(tuple, number, peer) else {
            return Err(443);
        };
        tracing::debug!(%binding, "channel bound");
        if !offload {
            return Ok(Reply::Now(builder));
        }
        // The offload handshake: the success waits for the data plane (or the timeout), so
        // the client's first ChannelData already meets the kernel entry.
        self.commands.push_back(Command::InstallChannel {
            binding,
            expires: kernel_expires,
            limits: accounting::rate_limits(&alloc.account),
        });
        let deadline = now + self.config.offload_timeout;
        self.pending.insert(
            key,
            Pending {
                deadline,
                binding,
                responses: Vec::new(),
            },
        );
        self.timers
            .schedule(Timer::Install(*tuple, number), deadline);
        Ok(Reply::Hold(builder, key))
    }

    /// RFC 8656 §11.2: a Send indication relays DATA to XOR-PEER-ADDRESS if a permission
    /// exists. Indications are never answered; every failure is a silent drop.
    fn send_indication(&mut self, now: Instant, tuple: &FiveTuple, req: &Parsed<'_>) {
        let (Some(peer_value), Some(data)) = (req.attr(ATTR_XOR_PEER_ADDRESS), req.attr(ATTR_DATA))
        else {
            self.stats.dropped += 1;
            return;
        };
        let Some(peer) = req.xor_address(peer_value) else {
            self.stats.dropped += 1;
            return;
        };
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            self.stats.dropped += 1;
            return;
        };
        let Some(relay) = alloc.relay(Family::of(peer.ip())) else {
            self.stats.dropped += 1;
            return;
        };
        if let Err(denied) = self.policy.check(peer) {
            tracing::debug!(client = %tuple.client, %peer, %denied, "Send to denied peer");
            self.stats.peers_denied += 1;
            return;
        }
        if !alloc.has_permission(peer.ip(), now) {
            self.stats.dropped += 1;
            return;
        }
        let (ledger, stats) = (&self.config.bandwidth, &mut self.stats);
        if !accounting::meter(
            alloc,
            ledger,
            stats,
            now,
            Direction::ClientToPeer,
            data.len(),
        ) {
            return;
        }
        self.stats.relayed_to_peer.count(data.len());
        self.transmits.push_back(Transmit::ToPeer {
            relay,
            peer: PeerAddr(peer),
            payload: data.to_vec(),
        });
    }

    // ---- table maintenance --------------------------------------------------------------

    /// Installs or refreshes the permission for `ip` (RFC 8656 §9). A permission that comes
    /// back after lapsing brings its channels back into the data plane.
    fn install_permission(&mut self, now: Instant, tuple: &FiveTuple, ip: IpAddr) {
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            return;
        };
        let expires = now + PERMISSION_LIFETIME;
        if alloc.permissions.insert(ip, expires).is_some() {
            return;
        }
        self.timers.schedule(Timer::Permission(*tuple, ip), expires);
        self.stats.permissions_active += 1;
        if tuple.transport != Transport::Udp {
            return;
        }
        self.install_channels(tuple, |_, ch| {
            ch.peer.0.ip() == ip && ch.confirmed && ch.kernel_expires.is_none()
        });
    }

    /// Re-installs every binding of `tuple` in the data plane whose effective expiry moved
    /// since it was last sent: after a ChannelBind (RFC 8656 §12.2, which refreshes the
    /// permission too), a CreatePermission (§10.2) or a Refresh (§8.2). Nothing is sent
    /// when no expiry moved.
    fn sync_kernel_expiries(&mut self, tuple: &FiveTuple) {
        self.install_channels(tuple, |_, ch| ch.kernel_expires.is_some());
    }

    /// Offers the data plane the channels of `tuple` (those to `peer`, if given) that user
    /// space relays although the kernel could: a UDP client's confirmed channel whose
    /// permission is live, not on its way out of the data plane (a removal not yet answered
    /// would end the reading its figures continue), of a user with room in its share.
    fn offer_user_space_channels(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        peer: Option<PeerAddr>,
    ) {
        let Some(alloc) = self.allocations.get(tuple) else {
            return;
        };
        if tuple.transport != Transport::Udp
            || self.config.quotas.kernel_bindings(&alloc.username)
                >= self.config.user_kernel_bindings
        {
            return;
        }
        let permitted: HashSet<IpAddr> = alloc
            .permissions
            .keys()
            .copied()
            .filter(|ip| alloc.has_permission(*ip, now))
            .collect();
        let leaving: HashSet<ChannelNumber> =
            alloc.account.removing.iter().map(|b| b.channel).collect();
        let offered: Vec<ChannelNumber> = alloc
            .channels
            .iter()
            .filter(|(number, ch)| {
                ch.confirmed
                    && ch.kernel_expires.is_none()
                    && ch.expires > now
                    && peer.is_none_or(|peer| peer == ch.peer)
                    && permitted.contains(&ch.peer.0.ip())
                    && !leaving.contains(number)
            })
            .map(|(number, _)| *number)
            .collect();
        if offered.is_empty() {
            return;
        }
        tracing::debug!(client = %tuple.client, channels = offered.len(), "offering user-space channels to the data plane");
        self.install_channels(tuple, |number, _| offered.contains(&number));
    }

    /// Emits [`Command::InstallChannel`] for the channels of `tuple` that `select` picks and
    /// whose effective expiry is not the one the data plane was last told, and records it.
    fn install_channels(
        &mut self,
        tuple: &FiveTuple,
        select: impl Fn(ChannelNumber, &Channel) -> bool,
    ) {
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            return;
        };
        let due: Vec<(ChannelNumber, PeerAddr, Instant, bool)> = alloc
            .channels
            .iter()
            .filter(|(number, ch)| select(**number, ch))
            .filter_map(|(number, ch)| {
                let expires = alloc.effective_expiry(ch);
                let entering = ch.kernel_expires.is_none();
                (ch.kernel_expires != Some(expires))
                    .then_some((*number, ch.peer, expires, entering))
            })
            .collect();
        for (number, peer, expires, entering) in due {
            let Some(binding) = alloc.binding(tuple, number, peer) else {
                continue;
            };
            if entering && !take_kernel_share(&self.config, &mut self.stats, &alloc.username) {
                continue;
            }
            if let Some(ch) = alloc.channels.get_mut(&number) {
                ch.kernel_expires = Some(expires);
            }
            self.commands.push_back(Command::InstallChannel {
                binding,
                expires,
                limits: accounting::rate_limits(&alloc.account),
            });
        }
    }

    /// The current deadline of what `timer` watches, `None` if it is gone.
    ///
    /// Refreshes that only push a deadline later add no entry: the queued one, when it comes
    /// due, is put back at the new deadline; one that brings it earlier supersedes the queued
    /// entry ([`Timers`]). So each live allocation, permission, channel, cooldown, held response
    /// and reservation has one entry, however often and however clients refresh.
    fn timer_deadline(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::Allocation(t) => self.allocations.get(&t).map(|a| a.expires),
            Timer::Permission(t, ip) => self
                .allocations
                .get(&t)
                .and_then(|a| a.permissions.get(&ip))
                .copied(),
            Timer::Channel(t, n) => self
                .allocations
                .get(&t)
                .and_then(|a| a.channels.get(&n))
                .map(|c| c.expires),
            Timer::Cooldown(t, n) => self
                .allocations
                .get(&t)
                .and_then(|a| a.cooldowns.get(&n))
                .map(|c| c.until),
            Timer::Install(t, n) => self.pending.get(&(t, n)).map(|p| p.deadline),
            Timer::Reservation(token) => self.reservations.get(&token).map(|r| r.expires),
            Timer::Interim(t) => self
                .allocations
                .get(&t)
                .and_then(|a| a.account.next_interim),
            Timer::Stop(id) => self.finishing.get(&id).map(|f| f.deadline),
        }
    }

    fn fire(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::Allocation(tuple)
            | Timer::Permission(tuple, _)
            | Timer::Channel(tuple, _)
            | Timer::Install(tuple, _) => self.mark_changed(&tuple),
            Timer::Cooldown(..) | Timer::Reservation(_) | Timer::Interim(_) | Timer::Stop(_) => {}
        }
        match timer {
            Timer::Allocation(tuple) => {
                tracing::debug!(client = %tuple.client, "allocation expired");
                self.delete_allocation(now, &tuple, EndReason::Expired);
            }
            Timer::Interim(tuple) => self.interim_record(now, &tuple),
            Timer::Stop(id) => self.finish(now, id),
            Timer::Permission(tuple, ip) => self.expire_permission(&tuple, ip),
            Timer::Channel(tuple, number) => self.expire_channel(now, &tuple, number),
            Timer::Cooldown(tuple, number) => {
                if let Some(alloc) = self.allocations.get_mut(&tuple) {
                    alloc.cooldowns.remove(&number);
                }
            }
            Timer::Install(tuple, number) => {
                tracing::debug!(client = %tuple.client, channel = %number, "offload timed out");
                self.stats.offload_timed_out += 1;
                self.release_pending((tuple, number));
            }
            Timer::Reservation(token) => {
                tracing::debug!("reservation's time is up");
                self.end_reservation(token);
            }
        }
    }

    /// A permission lapsed: its channels leave the data plane (permissions are enforced there
    /// by presence of the entry) and user space stops relaying for the address.
    fn expire_permission(&mut self, tuple: &FiveTuple, ip: IpAddr) {
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            return;
        };
        alloc.permissions.remove(&ip);
        // Revoked early by the peer policy, its deadline is moot.
        self.timers.cancel(Timer::Permission(*tuple, ip));
        self.stats.permissions_active = self.stats.permissions_active.saturating_sub(1);
        let gone: Vec<(ChannelNumber, PeerAddr)> = alloc
            .channels
            .iter_mut()
            .filter(|(_, ch)| ch.peer.0.ip() == ip)
            .filter_map(|(number, ch)| {
                ch.kernel_expires.take()?;
                // The removal below takes out whatever an install left.
                ch.maybe_in_kernel = false;
                Some((*number, ch.peer))
            })
            .collect();
        self.config
            .quotas
            .remove_kernel_bindings(&alloc.username, gone.len());
        for (number, peer) in gone {
            if let Some(binding) = alloc.binding(tuple, number, peer) {
                alloc.account.removing.insert(binding);
                self.commands.push_back(Command::RemoveChannel { binding });
            }
        }
    }

    /// A channel lapsed: remove it, and keep number and peer reserved for the cooldown.
    fn expire_channel(&mut self, now: Instant, tuple: &FiveTuple, number: ChannelNumber) {
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            return;
        };
        let Some(ch) = alloc.channels.remove(&number) else {
            return;
        };
        alloc.peers.remove(&ch.peer);
        let until = now + CHANNEL_COOLDOWN;
        alloc.cooldowns.insert(
            number,
            Cooldown {
                peer: ch.peer,
                until,
            },
        );
        self.timers.schedule(Timer::Cooldown(*tuple, number), until);
        self.stats.channels_active = self.stats.channels_active.saturating_sub(1);
        if ch.kernel_expires.is_some() {
            self.config
                .quotas
                .remove_kernel_bindings(&alloc.username, 1);
            if let Some(binding) = alloc.binding(tuple, number, ch.peer) {
                alloc.account.removing.insert(binding);
                self.commands.push_back(Command::RemoveChannel { binding });
            }
        }
        self.pending.remove(&(*tuple, number));
        self.timers.cancel(Timer::Install(*tuple, number));
        tracing::debug!(client = %tuple.client, channel = %number, "channel expired");
    }

    fn release_pending(&mut self, key: (FiveTuple, ChannelNumber)) {
        let Some(pending) = self.pending.remove(&key) else {
            return;
        };
        self.timers.cancel(Timer::Install(key.0, key.1));
        if let Some(ch) = self
            .allocations
            .get_mut(&key.0)
            .and_then(|a| a.channels.get_mut(&key.1))
        {
            ch.confirmed = true;
        }
        self.transmits.extend(pending.responses);
    }

    /// Deletes one family of a dual-stack allocation (Refresh with lifetime 0 and
    /// REQUESTED-ADDRESS-FAMILY, RFC 8656 §8.2).
    fn drop_family(&mut self, tuple: &FiveTuple, family: Family) {
        let Some(alloc) = self.allocations.get_mut(tuple) else {
            return;
        };
        let Some(relay) = alloc.relay(family) else {
            return;
        };
        let gone: Vec<ChannelNumber> = alloc
            .channels
            .iter()
            .filter(|(_, ch)| Family::of(ch.peer.0.ip()) == family)
            .map(|(n, _)| *n)
            .collect();
        for number in gone {
            // The binding is taken while the relay of its family is still there.
            if let Some(ch) = alloc.channels.get(&number).copied()
                && ch.kernel_expires.is_some()
            {
                self.config
                    .quotas
                    .remove_kernel_bindings(&alloc.username, 1);
                if let Some(binding) = alloc.binding(tuple, number, ch.peer) {
                    alloc.account.removing.insert(binding);
                    self.commands.push_back(Command::RemoveChannel { binding });
                }
            }
            if let Some(ch) = alloc.channels.remove(&number) {
                alloc.peers.remove(&ch.peer);
                self.stats.channels_active = self.stats.channels_active.saturating_sub(1);
                self.pending.remove(&(*tuple, number));
                self.timers.cancel(Timer::Channel(*tuple, number));
                self.timers.cancel(Timer::Install(*tuple, number));
            }
        }
        match family {
            Family::V4 => alloc.relay_v4 = None,
            Family::V6 => alloc.relay_v6 = None,
        }
        let timers = &mut self.timers;
        let before = alloc.permissions.len();
        alloc.permissions.retain(|ip, _| {
            let keep = Family::of(*ip) != family;
            if !keep {
                timers.cancel(Timer::Permission(*tuple, *ip));
            }
            keep
        });
        let removed = (before - alloc.permissions.len()) as u64;
        self.stats.permissions_active = self.stats.permissions_active.saturating_sub(removed);
        self.commands.push_back(Command::FreeRelayPort { relay });
    }

    /// Ends the allocation of `tuple` at `now` for `reason`: its data-plane entries, sockets,
    /// timers, quota and bandwidth go, and its stop record goes out (or waits for the kernel's
    /// final figures).
    fn delete_allocation(&mut self, now: Instant, tuple: &FiveTuple, reason: EndReason) {
        self.mark_changed(tuple);
        let unannounced = self.unannounced_reservation(tuple);
        let Some(mut alloc) = self.allocations.remove(tuple) else {
            return;
        };
        if let Some(token) = unannounced {
            self.end_reservation(token);
        }
        self.by_port.remove(&alloc.port);
        self.config.quotas.release(&alloc.username);
        self.cancel_timers(tuple, &alloc);
        let in_kernel = alloc
            .channels
            .values()
            .filter(|ch| ch.kernel_expires.is_some())
            .count();
        self.config
            .quotas
            .remove_kernel_bindings(&alloc.username, in_kernel);
        for (number, ch) in &alloc.channels {
            self.pending.remove(&(*tuple, *number));
            if ch.kernel_expires.is_some()
                && let Some(binding) = alloc.binding(tuple, *number, ch.peer)
            {
                alloc.account.removing.insert(binding);
                self.commands.push_back(Command::RemoveChannel { binding });
            }
        }
        for relay in alloc.relays() {
            self.commands.push_back(Command::FreeRelayPort { relay });
        }
        let s = &mut self.stats;
        s.channels_active = s
            .channels_active
            .saturating_sub(alloc.channels.len() as u64);
        s.permissions_active = s
            .permissions_active
            .saturating_sub(alloc.permissions.len() as u64);
        s.allocations_active = s.allocations_active.saturating_sub(1);
        tracing::debug!(client = %tuple.client, port = %alloc.port, ?reason, "allocation deleted");
        let wait = reason != EndReason::Shutdown;
        self.close_account(now, tuple, alloc, reason, wait);
    }

    /// Forgets the deadlines of the deleted allocation `alloc` of `tuple` and of everything it
    /// held, which would otherwise wait in the queue until they came due.
    fn cancel_timers(&mut self, tuple: &FiveTuple, alloc: &Allocation) {
        self.timers.cancel(Timer::Allocation(*tuple));
        for ip in alloc.permissions.keys() {
            self.timers.cancel(Timer::Permission(*tuple, *ip));
        }
        for number in alloc.channels.keys() {
            self.timers.cancel(Timer::Channel(*tuple, *number));
            self.timers.cancel(Timer::Install(*tuple, *number));
        }
        for number in alloc.cooldowns.keys() {
            self.timers.cancel(Timer::Cooldown(*tuple, *number));
        }
        self.timers.cancel(Timer::Interim(*tuple));
    }

    // ---- responses ----------------------------------------------------------------------

    fn reply(&mut self, tuple: &FiveTuple, payload: Vec<u8>) {
        self.transmits.push_back(Transmit::ToClient {
            transport: tuple.transport,
            server: tuple.server,
            client: tuple.client,
            payload,
        });
    }

    fn error(&mut self, tuple: &FiveTuple, req: &Parsed<'_>, code: u16, key: Option<&SigningKey>) {
        let mut b = Builder::new(req.method(), CLASS_ERROR_RESPONSE, req.transaction_id());
        b.error(code, reason(code));
        let payload = b.finish(self.config.software.as_deref(), key, true);
        self.reply(tuple, payload);
    }

    fn unknown_attributes(
        &mut self,
        tuple: &FiveTuple,
        req: &Parsed<'_>,
        unknown: Vec<AttrType>,
        key: Option<&SigningKey>,
    ) {
        let mut b = Builder::new(req.method(), CLASS_ERROR_RESPONSE, req.transaction_id());
        b.error(420, reason(420)).attr(&UnknownAttributes(unknown));
        let payload = b.finish(self.config.software.as_deref(), key, true);
        self.reply(tuple, payload);
    }
}

/// Counts one more data-plane binding of `username` against its share
/// ([`Config::user_kernel_bindings`], over every server sharing [`Config::quotas`]). A user
/// past it is relayed in user space: refused, the binding is counted and never installed.
fn take_kernel_share(config: &Config, stats: &mut Stats, username: &Arc<str>) -> bool {
    if config
        .quotas
        .try_add_kernel_binding(username, config.user_kernel_bindings)
    {
        return true;
    }
    tracing::debug!(%username, "user holds its share of the data plane; relaying in user space");
    stats.kernel_share_exceeded += 1;
    false
}

/// An Allocate's REQUESTED-TRANSPORT (UDP only: 442 otherwise, RFC 8656 §7.2) and whether it
/// carries DONT-FRAGMENT (§18.9, which has no value).
fn allocate_transport_and_fragmentation(req: &Parsed<'_>) -> Result<bool, u16> {
    match req.attr(ATTR_REQUESTED_TRANSPORT) {
        None => return Err(400),
        Some([PROTO_UDP, 0, 0, 0]) => {}
        Some([_, _, _, _]) => return Err(442),
        Some(_) => return Err(400),
    }
    match req.attr(ATTR_DONT_FRAGMENT) {
        None => Ok(false),
        Some([]) => Ok(true),
        Some(_) => Err(400),
    }
}

/// The families an Allocate asks for (RFC 8656 §7.2, RFC 6156): REQUESTED-ADDRESS-FAMILY
/// alone, or IPv4 plus the IPv6 of ADDITIONAL-ADDRESS-FAMILY; IPv4 when neither is there.
fn requested_families(req: &Parsed<'_>) -> Result<(Family, Option<Family>), u16> {
    let requested = req.attr(ATTR_REQUESTED_ADDRESS_FAMILY);
    let additional = req.additional_address_family();
    match (requested, additional) {
        (Some(_), Some(_)) => Err(400),
        (Some(v), None) => Ok((family_attr(v).ok_or(440u16)?, None)),
        // ADDITIONAL-ADDRESS-FAMILY may only ask for IPv6, on top of IPv4.
        (None, Some(v)) => match family_attr(v) {
            Some(Family::V6) => Ok((Family::V4, Some(Family::V6))),
            _ => Err(400),
        },
        (None, None) => Ok((Family::V4, None)),
    }
}

fn remaining(expires: Instant, now: Instant) -> Duration {
    Duration::from_secs(expires.saturating_duration_since(now).as_secs())
}

#[path = "reservation.rs"]
mod reservation;

#[path = "persist.rs"]
pub(crate) mod persist;

#[path = "accounting.rs"]
mod accounting;

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
