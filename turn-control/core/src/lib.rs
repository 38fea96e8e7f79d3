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
//!   the nonce key and Data indication transaction ids. Tests use constant seeds; the daemon
//!   seeds from the OS.
//! - **Relay sockets.** The core picks a random free port in [`Config::port_range`] and emits
//!   [`Command::BindRelayPort`]; the Allocate success waits until the daemon answers
//!   [`Server::relay_bound`] for every relayed address. If binding fails (the port may be
//!   another socket's ephemeral port) the daemon calls [`Server::relay_bind_failed`] and
//!   the core moves the allocation to another port; after [`RELAY_BIND_ATTEMPTS`] ports the
//!   client gets 508. A dual-stack allocation uses the same port on both relay addresses.
//!   Outputs may therefore be drained in any order.
//! - **Offload.** A new UDP channel binding emits [`Command::InstallChannel`] and holds the
//!   ChannelBind success until [`Server::channel_installed`] or [`Config::offload_timeout`]
//!   (50 ms). Refreshes neither re-install nor wait. TCP clients are never offloaded. When a
//!   permission lapses its channels are removed from the data plane (the kernel path has no
//!   permission check of its own) and re-installed if the permission comes back.
//!   [`Server::channel_bindings`] lists what the data plane should hold, for a full sync.
//! - **Nonces** are stateless (timestamp + HMAC over it and the client address), valid for
//!   [`Config::nonce_lifetime`] (600 s, like coturn). Unauthenticated requests create no
//!   state; 401/438 answers are capped by [`Config::unauthorized_rate`].
//! - **Timers** live in one binary heap with lazy deletion; refreshes that push a deadline
//!   later add no entry, so the heap stays at about one entry per live object.
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
//! entry size on average, plus one 104-byte timer entry per timed object): an allocation is
//! about 0.8 KiB (376-byte table entry, 72-byte port index entry, username); its first
//! permission and first channel add about 0.45 KiB of per-allocation maps; each further
//! channel about 0.25 KiB (64-byte channel entry, 36-byte reverse index entry, timer) and each
//! further permission about 0.17 KiB.
//!
//! Modules: [`types`] (role newtypes), [`framing`] (STUN/ChannelData demultiplexing and TCP
//! framing), [`policy`] (which peers may be reached), [`auth`] (long-term and REST
//! credentials, nonces), [`config`], [`stats`]; the state machine is [`Server`].

mod allocation;
pub mod auth;
pub mod config;
pub mod framing;
pub mod policy;
pub mod quota;
mod server;
pub mod stats;
mod stun;
pub mod types;

pub use auth::{Credentials, LongTermKey, long_term_key, rest_password};
pub use config::{Config, ConfigError};
pub use framing::{ChannelData, FrameError, frame_len};
pub use policy::{PeerDenied, PeerPolicy};
pub use quota::QuotaLedger;
pub use server::{Command, OffloadError, RELAY_BIND_ATTEMPTS, Server, Transmit};
pub use stats::{RequestMethod, Stats, Traffic};
pub use types::{
    AllocationPort, ChannelBinding, ChannelNumber, ClientAddr, Family, FiveTuple,
    InvalidChannelNumber, PeerAddr, RelayAddr, Transport,
};
