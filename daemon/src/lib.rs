//! What both daemons (`turn-control`, `xdp-agent`) need around their own work: one
//! configuration type per daemon layered from flags, environment, a TOML file and defaults
//! ([`CommandLine`]), logging set-up ([`init_logging`]) and the option types they share
//! ([`PortRange`], [`one_per_family`], [`LogFormat`]), [`lock`] for state shared between
//! threads, the host's addresses followed through rtnetlink ([`addresses`]) and the service
//! manager's file-descriptor store ([`fd_store`]).

pub mod addresses;
mod config;
pub mod fd_store;
mod logging;
mod net;
mod sync;
pub mod value_enum;

pub use config::{CommandLine, FileError, parse, parse_from, to_toml};
pub use logging::{LogFormat, LoggingError, init_logging};
pub use net::{PortRange, PortRangeError, TwoInOneFamily, one_per_family};
pub use sync::{lock, read, write};
