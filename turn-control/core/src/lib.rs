//! A sans-IO TURN server core (RFC 8656, RFC 6156 dual stack, RFC 8489 STUN).
//!
//! No sockets, no clock, no async runtime: [`Server`] takes bytes and time in and hands
//! datagrams ([`Transmit`]), side effects ([`Command`]) and its next deadline out. The
//! daemon owns the sockets, the timer and the gRPC client of the XDP agent.
//!
//! ```
//! use std::time::{Instant, SystemTime};
//! use turn_core::{Config, Credentials, Server, Transport, ClientAddr};
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
//! while let Some(_command) = server.poll_command() { /* bind sockets, call the agent */ }
//! while let Some(transmit) = server.poll_transmit() {
//!     assert_eq!(transmit.destination(), client.0);
//! }
//! let _deadline = server.poll_timeout();
//! ```
//!
//! Modules: [`types`] (role newtypes), [`framing`] (STUN/ChannelData demultiplexing and TCP
//! framing), [`policy`] (which peers may be reached), [`auth`] (long-term and REST
//! credentials, nonces), [`config`], [`stats`]; the state machine is [`Server`].

mod allocation;
pub mod auth;
pub mod config;
pub mod framing;
pub mod policy;
mod server;
pub mod stats;
mod stun;
pub mod types;

pub use auth::{Credentials, LongTermKey, long_term_key, rest_password};
pub use config::{Config, ConfigError};
pub use framing::{ChannelData, FrameError, frame_len};
pub use policy::{PeerDenied, PeerPolicy};
pub use server::{Command, OffloadError, Server, Transmit};
pub use stats::{RequestMethod, Stats, Traffic};
pub use types::{
    AllocationPort, ChannelBinding, ChannelNumber, ClientAddr, Family, FiveTuple,
    InvalidChannelNumber, PeerAddr, RelayAddr, Transport,
};
