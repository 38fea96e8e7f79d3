//! A sans-IO TURN server core (RFC 8656, RFC 6156 dual stack, RFC 8489 STUN).
//!
//! No sockets, no clock, no async runtime: [`Server`] takes bytes and time in and hands
//! datagrams ([`Transmit`]), side effects ([`Command`]) and its next deadline out. The
//! daemon owns the sockets, the timer and the gRPC client of the XDP agent.
//!
//! ```
//! use std::time::{Instant, SystemTime};
//! use turn_control_core::{Config, Credentials, Server, Transport, ClientAddr};
//!
//! let mut config = Config::new("example.org", [0; 32]);
//! config.credentials = Credentials::new("example.org").with_user("alice", "secret");
//! config.relay_ipv4 = Some("198.51.100.7".parse().unwrap());
//! config.listeners = vec!["198.51.100.7:3478".parse().unwrap()];
//! let now = Instant::now();
//! let mut server = Server::new(config, now, SystemTime::now()).unwrap();
//!
//! // A STUN Binding request.
//! let request = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
//! let client = ClientAddr("192.0.2.1:5000".parse().unwrap());
//! server.handle_client(now, Transport::Udp, "198.51.100.7:3478".parse().unwrap(), client, &request);
//! while let Some(_command) = server.poll_command() { /* bind sockets and answer, call the agent */ }
//! while let Some(transmit) = server.poll_transmit() {
//!     assert_eq!(transmit.destination(), client.0);
//! }
//! let _deadline = server.poll_timeout();
//! ```
//!
//! # Decisions the daemon relies on
//!
//! - **Time.** Every input takes `now: Instant`; the core never reads a clock. Wall-clock
//!   seconds (REST username expiry, nonce timestamps) come from the `(Instant, SystemTime)`
//!   pair given to [`Server::new`] plus the monotonic time since; re-anchor with
//!   [`Server::set_wall_clock`] to follow NTP steps.
//! - **Randomness.** A ChaCha `StdRng` seeded from [`Config::rng_seed`] draws allocation ports,
//!   the nonce key, RESERVATION-TOKENs and Data indication transaction ids. Tests use constant seeds; the daemon
//!   seeds from the OS.
//! - **Relay sockets.** The core picks a random free port in [`Config::port_range`] and emits
//!   [`Command::BindRelayPort`]; the Allocate success waits until the daemon answers
//!   [`Server::relay_bound`] for every relayed address. If binding fails (the port may be
//!   another socket's ephemeral port) the daemon calls [`Server::relay_bind_failed`] and
//!   the core moves the allocation to another port; after [`RELAY_BIND_ATTEMPTS`] ports the
//!   client gets 508. A dual-stack allocation uses the same port on both relay addresses.
//!   Outputs may therefore be drained in any order.
//! - **Allocate attributes** (RFC 8656 §7.2, §18). REQUESTED-TRANSPORT must be UDP.
//!   REQUESTED-ADDRESS-FAMILY and ADDITIONAL-ADDRESS-FAMILY pick the relay families (RFC 6156).
//!   EVEN-PORT gives an even port; with its R bit the next (odd) port is reserved as well, its
//!   socket bound at once and kept aside unread ([`Command::ReservePort`]), under a random
//!   8-byte RESERVATION-TOKEN in the success, which waits for both sockets. An Allocate of the
//!   same user with that token, on any 5-tuple and any server sharing
//!   [`Config::reservations`] (the cores of one daemon), gets that port and has the daemon
//!   adopt its socket ([`Command::AdoptReservedPort`]); the token is single use and lapses
//!   [`config::RESERVATION_LIFETIME`] (30 s) after the success, when the socket is released
//!   ([`Command::ReleaseReservedPort`]). Tokens are capped per user
//!   ([`config::RESERVATIONS_PER_USER`]) and in all ([`Config::max_reservations`]), over the
//!   servers sharing the ledger. No free even/odd pair, a cap reached, or an unknown,
//!   expired, used or other user's token gets 508; RESERVATION-TOKEN with EVEN-PORT or a
//!   family attribute, or R with ADDITIONAL-ADDRESS-FAMILY, gets 400. DONT-FRAGMENT sets DF on
//!   the allocation's relay sockets ([`Command::BindRelayPort`]) and data-plane bindings
//!   ([`ChannelBinding::dont_fragment`]). ICMP errors about relayed datagrams
//!   ([`Server::handle_icmp`]) reach clients with a permission for the peer as Data
//!   indications with an ICMP attribute, at most [`ICMP_RATE`] per second and allocation.
//! - **Offload.** A new UDP channel binding emits [`Command::InstallChannel`] and holds the
//!   ChannelBind success until [`Server::channel_installed`] or [`Config::offload_timeout`]
//!   (50 ms). TCP clients are never offloaded. Each install carries the binding's effective
//!   expiry, the earliest of the channel's, its peer permission's and the allocation's
//!   (RFC 8656 §7, §9, §12), past which the kernel stops relaying: the kernel path checks no
//!   permission or allocation of its own. A ChannelBind, CreatePermission or Refresh that
//!   moves that expiry re-installs the binding with the new one (without holding any
//!   answer); one that does not move it sends nothing. When a permission lapses its channels
//!   are removed from the data plane and re-installed if the permission comes back; a failed
//!   install removes the binding (an earlier install may still be there) and leaves the
//!   channel to user space. [`Server::channel_bindings`] lists what the data plane should
//!   hold, with expiries, for a full sync.
//! - **Nonces** are stateless (the RFC 8489 nonce cookie, a timestamp and an HMAC over both
//!   and the client address), valid for [`Config::nonce_lifetime`] (600 s, like coturn).
//!   Unauthenticated requests create no state but an entry in a table of bounded size.
//! - **Unauthenticated answers** (Binding responses, 401 and 438 challenges, errors before
//!   authentication) over UDP are limited per source, an IPv4 address or an IPv6 /64
//!   ([`Config::unauthenticated_per_source`], 20/s with bursts of 40, remembered for at most
//!   [`Config::source_table_capacity`] sources), then host-wide
//!   ([`Config::unauthorized_rate`], 5000/s, a backstop): one host cannot take the others'
//!   budget, and the server is no amplifying reflector. A 438 to a request whose
//!   MESSAGE-INTEGRITY verifies is outside both. What is held back is counted per reason
//!   ([`Stats::unauthenticated_source_limited`], [`Stats::unauthorized_rate_limited`]).
//! - **Per-allocation and per-user caps.** An allocation holds at most
//!   [`Config::max_permissions_per_allocation`] permissions and
//!   [`Config::max_channels_per_allocation`] channels (100 each; 508 beyond, RFC 8656 §10.2,
//!   §12.2). A username holds at most [`Config::user_kernel_bindings`] bindings in the data
//!   plane (1024), over every server sharing [`Config::quotas`]; its further channels are
//!   bound all the same and relayed in user space.
//! - **Bandwidth and accounting** ([`usage`]): an allocation relays at most
//!   [`Config::max_bps`] bytes per second each way, a user's allocations together
//!   [`Config::user_max_bps`] (per-user overrides in [`Config::user_limits`]); the excess is
//!   dropped and counted. [`Config::bps_capacity`] caps the sum of the allocations' `max_bps`
//!   (486 when nothing is left, what is left when less is). The data plane gets the same
//!   limits as named meters with every install, and its figures come back through
//!   [`Server::kernel_usage`] and [`Server::channel_removed`]. Each allocation has start,
//!   interim and stop records ([`Command::Account`]); a stop waits up to
//!   [`config::KERNEL_FINAL_WAIT`] for the kernel's final figures.
//! - **Long-term credentials** follow RFC 8489 §9.2: MESSAGE-INTEGRITY with the MD5 key as
//!   RFC 5389 clients send it, or MESSAGE-INTEGRITY-SHA256 (truncated to no less than 16
//!   bytes) with the key of PASSWORD-ALGORITHM (SHA-256 or MD5), whose PASSWORD-ALGORITHMS
//!   must come back as sent. A response is signed with the integrity attribute and key of
//!   its request. USERHASH finds static users only; username anonymity is announced only
//!   when no REST secret is configured (see [`Credentials`]).
//! - **Timers** are one deadline per object in an ordered set indexed by object: a refresh
//!   that pushes a deadline later touches nothing (the entry is re-armed when it comes due),
//!   one that brings it earlier replaces the entry, a deleted object takes its entries along.
//!   So the queue holds exactly one entry per live object ([`Server::pending_timers`]).
//!
//! # Cost
//!
//! Measured with `cargo bench -p turn-control-core` (criterion, 2-core VM, 160-byte payloads): the
//! client ChannelData to peer decision ~140 ns, peer to client ChannelData ~170 ns, peer to
//! client Data indication ~320 ns, an authenticated CreatePermission or Refresh (nonce check,
//! MD5 key lookup, two HMAC-SHA1, FINGERPRINT) ~1.7 us. Each per-packet path is three hash
//! lookups and one allocation (the output payload).
//!
//! Memory (from `size_of`, hashbrown at 7/8 load and power-of-two growth, so about 1.5x the
//! entry size on average, plus about 0.25 KiB of timer per timed object: a 104-byte entry in
//! the ordered queue and one in its index by object): an allocation is about 1.6 KiB
//! (416-byte table entry, 72-byte port index entry, username, timer, and about 0.4 KiB of
//! boxed usage and meters with the interim record's timer); its first permission
//! and first channel add about 0.5 KiB of per-allocation maps; each further channel about
//! 0.42 KiB (80-byte channel entry, 36-byte reverse index entry, timer) and each further
//! permission about 0.32 KiB, which [`Config::max_permissions_per_allocation`] and
//! [`Config::max_channels_per_allocation`] bound to about 75 KiB per allocation. A
//! reservation is about 0.65 KiB (a 128-byte entry on the core that made it, an 80-byte one
//! in the shared ledger, port index entry, timer) while its token is out. The per-source
//! table of unauthenticated answers takes at most about 0.8 MiB per server (24-byte entries,
//! [`Config::source_table_capacity`]).
//!
//! Modules: [`types`] (role newtypes), [`framing`] (STUN/ChannelData demultiplexing and TCP
//! framing), [`policy`] (which peers may be reached), [`icmp`] (ICMP errors for clients), [`auth`] (long-term and REST
//! credentials, password algorithms, nonces), [`usage`] (usage, meters, accounting records),
//! [`bandwidth`] (bandwidth shared by the cores), [`config`], [`stats`]; the state machine is
//! [`Server`].

mod admission;
mod allocation;
pub mod auth;
pub mod bandwidth;
pub mod config;
pub mod framing;
pub mod icmp;
mod long_term;
pub mod policy;
pub mod quota;
mod redirect;
pub mod reservation_ledger;
mod server;
pub mod stats;
mod stun;
mod timers;
pub mod types;
pub mod usage;

pub use auth::{
    Credentials, LongTermKey, PasswordAlgorithm, long_term_key, rest_password, userhash,
};
pub use bandwidth::BandwidthLedger;
pub use config::{Config, ConfigError, SourceRate, UserLimits};
pub use framing::{ChannelData, FrameError, frame_len};
pub use icmp::{ICMP_RATE, Icmp};
pub use policy::{PeerDenied, PeerPolicy};
pub use quota::QuotaLedger;
pub use reservation_ledger::ReservationLedger;
pub use server::persist::{Change, RestoreRefusal, Restored, SavedAllocation, SavedChannel};
pub use server::{Command, OffloadError, RELAY_BIND_ATTEMPTS, Server, Transmit};
pub use stats::{RequestMethod, Stats, Traffic};
pub use types::{
    AllocationPort, ChannelBinding, ChannelNumber, ClientAddr, Family, FiveTuple,
    InvalidChannelNumber, PeerAddr, RelayAddr, Transport,
};
pub use usage::{
    Direction, EndReason, Meter, RateLimits, RateMeter, RecordKind, Usage, UsageRecord,
};
