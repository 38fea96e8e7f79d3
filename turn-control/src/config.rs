//! Configuration: one type, [`Settings`]. Each option is one field: a flag with its
//! `TURN_CONTROL_*` environment variable (clap) and a key of the TOML file (serde).
//!
//! Precedence, highest first: command-line flags, `TURN_CONTROL_*` environment variables,
//! the TOML file named by `--config`, then the defaults (with `--dev` changing some of them
//! to a loopback development setup). List options replace rather than extend: `--user` on
//! the command line hides every `users` entry of the file. The layering is
//! [`daemon::CommandLine`]; [`Settings::load`] then fills the defaults that depend on other
//! options and checks that the options fit together.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use clap::ArgAction;
use clap::builder::{BoolValueParser, TypedValueParser as _};
use daemon::{CommandLine, LogFormat, PortRange};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use turn_control_core::config::{
    MAX_CHANNELS_PER_ALLOCATION, MAX_PERMISSIONS_PER_ALLOCATION, UNAUTHENTICATED_BURST_PER_SOURCE,
    UNAUTHENTICATED_RATE_PER_SOURCE, UNAUTHORIZED_RATE, USER_KERNEL_BINDINGS,
};
use turn_control_core::{
    BandwidthLedger, Config, Credentials, QuotaLedger, ReservationLedger, SourceRate, UserLimits,
};

/// The TURN port of RFC 8656 §18 (and RFC 8489 §9.1 for STUN).
pub const DEFAULT_PORT: u16 = 3478;
/// Metrics port (on 127.0.0.1) in `--dev` mode.
pub const DEV_METRICS_PORT: u16 = 9641;
/// Realm when none is configured.
pub const DEFAULT_REALM: &str = "turn-control";
/// SOFTWARE (RFC 8489 §14.14) when none is configured.
pub const DEFAULT_SOFTWARE: &str = concat!("turn-control ", env!("CARGO_PKG_VERSION"));
/// Username of the generated development credential.
pub const DEV_USER: &str = "dev";
/// Default SO_RCVBUF/SO_SNDBUF of listener sockets: every client's traffic goes through them.
pub const DEFAULT_LISTENER_BUFFER: usize = 8 << 20;
/// Default SO_RCVBUF/SO_SNDBUF of relay sockets: one allocation's peer traffic each.
pub const DEFAULT_RELAY_BUFFER: usize = 1 << 20;
/// Most event-loop threads (`--threads`).
pub const MAX_THREADS: usize = 256;
/// Default length of the queue from the event-loop threads to the agent link
/// (`--agent-queue`).
pub const DEFAULT_AGENT_QUEUE: usize = 65536;
/// Default `--default-allocation-lifetime`: RFC 8656 section 7.2's 10 minutes.
pub const DEFAULT_ALLOCATION_LIFETIME: u32 = 600;
/// Default `--max-allocation-lifetime`: RFC 8656 section 7.2's hour.
pub const MAX_ALLOCATION_LIFETIME: u32 = 3600;
/// The longest `--max-allocation-lifetime` accepted: a week.
pub const LONGEST_ALLOCATION_LIFETIME: u32 = 7 * 86_400;
/// Default `--tcp-idle-unallocated-seconds`: long enough for a client's Allocate after a
/// Binding or a 401, short enough that idle connections cannot pile up.
pub const DEFAULT_TCP_IDLE_UNALLOCATED: u32 = 30;
/// Default `--tls-handshake-timeout-seconds`: a handshake is two round trips and some
/// signing; ten seconds cover a lossy mobile path, and a client slower than that is dead or
/// hostile.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: u32 = 10;
/// Default `--tcp-connections-per-source`.
pub const DEFAULT_TCP_CONNECTIONS_PER_SOURCE: u32 = 100;
/// Default `--tcp-connections-max`, unless the open-files limit allows fewer.
pub const DEFAULT_TCP_CONNECTIONS_MAX: u32 = 100_000;
/// Default `--drain-deadline`: an hour, the longest allocation lifetime RFC 8656 §7.2
/// recommends.
pub const DEFAULT_DRAIN_DEADLINE: u32 = 3600;
/// Default `--accounting-interim-seconds`: an interim record a minute, as RADIUS servers
/// commonly ask for.
pub const DEFAULT_ACCOUNTING_INTERIM: u32 = 60;
/// Default `--accounting-webhook-queue`.
pub const DEFAULT_ACCOUNTING_WEBHOOK_QUEUE: usize = 10_000;
/// The admin address `turn-control drain` reaches without `--admin`.
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9643);

/// The command line: [`Settings`] plus what only a command line says. Every option can also
/// come from the environment variable named in `--help`; list variables take
/// comma-separated values.
#[derive(Debug, Clone)]
pub struct Cli {
    /// The TOML file, if any.
    pub config: Option<PathBuf>,
    /// `--print-config`.
    pub print_config: bool,
    /// A subcommand instead of the daemon.
    pub command: Option<Subcommand>,
    settings: CommandLine<Settings>,
}

/// What `turn-control` runs instead of the daemon.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Subcommand {
    /// Start draining a running daemon through its admin server (POST /drain): new Allocates
    /// are redirected, existing allocations live on, the daemon exits when none is left.
    /// The Kubernetes preStop hook.
    Drain(DrainArgs),
}

/// `turn-control drain`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    /// The daemon's admin server.
    #[arg(
        long,
        env = "TURN_CONTROL_ADMIN",
        value_name = "ADDR:PORT",
        default_value_t = DEFAULT_ADMIN
    )]
    pub admin: SocketAddr,
    /// Wait until the daemon has exited or holds no allocation.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "turn-control",
    version,
    about = "TURN relay (RFC 8656) control daemon: signalling, auth, user-space relaying, XDP agent link"
)]
struct Flags {
    /// TOML configuration file; its keys are the options below with `_` for `-` (`users`
    /// for --user, `tcp = false` for --no-tcp). Flags and environment override it.
    #[arg(long, env = "TURN_CONTROL_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Subcommand>,
    #[command(flatten)]
    settings: Settings,
}

/// The configuration. The options are flags, environment variables and file keys at once;
/// the fields after them are derived by [`Settings::load`].
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Development mode: listen on 127.0.0.1:3478, generate and print a credential, allow
    /// loopback peers, metrics on 127.0.0.1:9641.
    #[arg(long, env = "TURN_CONTROL_DEV")]
    pub dev: bool,
    /// Listener address for UDP and TCP (repeatable) [default: 0.0.0.0:3478 and [::]:3478;
    /// with --dev 127.0.0.1:3478].
    #[arg(
        long = "listen",
        env = "TURN_CONTROL_LISTEN",
        value_name = "ADDR:PORT",
        value_delimiter = ','
    )]
    pub listen: Vec<SocketAddr>,
    /// Do not listen on TCP (TURN over TCP, RFC 8656 §3.1); in the file `tcp = false`.
    #[arg(
        long = "no-tcp",
        env = "TURN_CONTROL_NO_TCP",
        action = ArgAction::SetTrue,
        value_parser = BoolValueParser::new().map(|no_tcp| !no_tcp)
    )]
    pub tcp: bool,
    /// Seconds a TURN-over-TCP connection without an allocation may go without a complete
    /// frame before it is closed; a connection with an allocation lives as long as it does.
    #[arg(
        long = "tcp-idle-unallocated-seconds",
        env = "TURN_CONTROL_TCP_IDLE_UNALLOCATED_SECONDS",
        value_name = "SECONDS",
        default_value_t = DEFAULT_TCP_IDLE_UNALLOCATED
    )]
    pub tcp_idle_unallocated_seconds: u32,
    /// Most TURN-over-TCP connections open at once from one source address (an IPv6 source
    /// counts by its /64); further ones are accepted and closed at once.
    #[arg(
        long = "tcp-connections-per-source",
        env = "TURN_CONTROL_TCP_CONNECTIONS_PER_SOURCE",
        value_name = "N",
        default_value_t = DEFAULT_TCP_CONNECTIONS_PER_SOURCE
    )]
    pub tcp_connections_per_source: u32,
    /// Most TURN-over-TCP connections open at once in all; further ones are accepted and
    /// closed at once [default: 100000, or half the open-files limit (RLIMIT_NOFILE) if that
    /// is less, leaving the rest to relay sockets].
    #[arg(
        long = "tcp-connections-max",
        env = "TURN_CONTROL_TCP_CONNECTIONS_MAX",
        value_name = "N"
    )]
    pub tcp_connections_max: Option<u32>,
    /// PEM certificate chain, leaf first, for TURN over TLS (RFC 8656 §3.1). With it and
    /// --tls-key every TCP listener also takes TLS, told apart by the first byte, so one port
    /// (443) serves UDP, TCP and TLS. Reloaded on SIGHUP and when the file changes.
    #[arg(long = "tls-cert", env = "TURN_CONTROL_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert's leaf (PKCS#8, EC or RSA).
    #[arg(long = "tls-key", env = "TURN_CONTROL_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// TCP listener for TURN over TLS alone, without UDP (repeatable; 5349 by RFC 7350); plain
    /// TURN over TCP is taken on it too. Needs --tls-cert [default: none].
    #[arg(
        long = "tls-listen",
        env = "TURN_CONTROL_TLS_LISTEN",
        value_name = "ADDR:PORT",
        value_delimiter = ','
    )]
    pub tls_listen: Vec<SocketAddr>,
    /// Seconds a TLS handshake may take from the connection's first byte.
    #[arg(
        long = "tls-handshake-timeout-seconds",
        env = "TURN_CONTROL_TLS_HANDSHAKE_TIMEOUT_SECONDS",
        value_name = "SECONDS",
        default_value_t = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    )]
    pub tls_handshake_timeout_seconds: u32,
    /// Address relay sockets bind to, one per family (repeatable) [default: the listeners'
    /// specific addresses].
    #[arg(
        long = "relay-ip",
        env = "TURN_CONTROL_RELAY_IP",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub relay_ip: Vec<IpAddr>,
    /// Address announced in XOR-RELAYED-ADDRESS when behind a 1:1 NAT, one per family.
    #[arg(
        long = "external-ip",
        env = "TURN_CONTROL_EXTERNAL_IP",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub external_ip: Vec<IpAddr>,
    /// Allocation port range.
    #[arg(
        long,
        env = "TURN_CONTROL_PORTS",
        value_name = "LOW-HIGH",
        default_value = "49152-65535"
    )]
    pub ports: PortRange,
    /// REALM of the long-term credentials.
    #[arg(long, env = "TURN_CONTROL_REALM", default_value = DEFAULT_REALM)]
    pub realm: String,
    /// Static user (repeatable).
    #[arg(
        long = "user",
        env = "TURN_CONTROL_USERS",
        value_name = "NAME:PASSWORD",
        value_delimiter = ','
    )]
    pub users: Vec<User>,
    /// Shared secret of TURN REST API credentials (coturn's use-auth-secret).
    #[arg(
        long = "auth-secret",
        env = "TURN_CONTROL_AUTH_SECRET",
        value_name = "SECRET"
    )]
    pub auth_secret: Option<String>,
    /// Peer network to allow even inside the built-in denied ranges (repeatable).
    #[arg(
        long = "allow-peer",
        env = "TURN_CONTROL_ALLOW_PEER",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub allow_peer: Vec<IpNet>,
    /// Peer network to deny; wins over --allow-peer (repeatable).
    #[arg(
        long = "deny-peer",
        env = "TURN_CONTROL_DENY_PEER",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub deny_peer: Vec<IpNet>,
    /// Unix socket of the xdp-agent; without it everything is relayed in user space.
    #[arg(long, env = "TURN_CONTROL_AGENT", value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Prometheus metrics listener [default: none; with --dev 127.0.0.1:9641].
    #[arg(long, env = "TURN_CONTROL_METRICS", value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Log format.
    #[arg(
        long = "log-format",
        env = "TURN_CONTROL_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `turn_control_core=debug`.
    #[arg(
        long = "log-level",
        env = "TURN_CONTROL_LOG_LEVEL",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log_level: String,
    /// Maximum allocations per username.
    #[arg(long = "user-quota", env = "TURN_CONTROL_USER_QUOTA", value_name = "N")]
    pub user_quota: Option<u32>,
    /// Maximum allocations in total.
    #[arg(
        long = "total-quota",
        env = "TURN_CONTROL_TOTAL_QUOTA",
        value_name = "N"
    )]
    pub total_quota: Option<u32>,
    /// Allocation lifetime in seconds when a client asks for none or for less (RFC 8656
    /// section 7.2). A channel bound to an allocation is relayed, in the kernel too, no longer
    /// than the allocation lives unless the client refreshes it.
    #[arg(
        long = "default-allocation-lifetime",
        env = "TURN_CONTROL_DEFAULT_ALLOCATION_LIFETIME",
        value_name = "SECONDS",
        default_value_t = DEFAULT_ALLOCATION_LIFETIME
    )]
    pub default_allocation_lifetime: u32,
    /// Longest allocation lifetime in seconds granted to a client that asks for more (RFC
    /// 8656 section 7.2 recommends an hour; coturn's --max-allocate-lifetime).
    #[arg(
        long = "max-allocation-lifetime",
        env = "TURN_CONTROL_MAX_ALLOCATION_LIFETIME",
        value_name = "SECONDS",
        default_value_t = MAX_ALLOCATION_LIFETIME
    )]
    pub max_allocation_lifetime: u32,
    /// Answers a second to unauthenticated UDP requests (Binding, 401, 438, errors before
    /// authentication) from the whole host: a backstop against floods from many sources,
    /// above what --unauthenticated-rate-per-source lets any one source have.
    #[arg(
        long = "unauthenticated-rate",
        env = "TURN_CONTROL_UNAUTHENTICATED_RATE",
        value_name = "N",
        default_value_t = UNAUTHORIZED_RATE
    )]
    pub unauthenticated_rate: u32,
    /// Answers a second to unauthenticated UDP requests from one source (an IPv4 address or
    /// an IPv6 /64), so that one host can neither take the others' answers nor use the relay
    /// as a reflector. A 438 to a request signed with a valid key is not counted.
    #[arg(
        long = "unauthenticated-rate-per-source",
        env = "TURN_CONTROL_UNAUTHENTICATED_RATE_PER_SOURCE",
        value_name = "N",
        default_value_t = UNAUTHENTICATED_RATE_PER_SOURCE
    )]
    pub unauthenticated_rate_per_source: u32,
    /// Answers to unauthenticated UDP requests one source may have at once (the clients
    /// behind one NAT starting together), refilled at --unauthenticated-rate-per-source.
    #[arg(
        long = "unauthenticated-burst-per-source",
        env = "TURN_CONTROL_UNAUTHENTICATED_BURST_PER_SOURCE",
        value_name = "N",
        default_value_t = UNAUTHENTICATED_BURST_PER_SOURCE
    )]
    pub unauthenticated_burst_per_source: u32,
    /// Permissions (peer IP addresses) one allocation may hold; a CreatePermission or
    /// ChannelBind that needs one more gets 508 (Insufficient Capacity).
    #[arg(
        long = "max-permissions-per-allocation",
        env = "TURN_CONTROL_MAX_PERMISSIONS_PER_ALLOCATION",
        value_name = "N",
        default_value_t = MAX_PERMISSIONS_PER_ALLOCATION
    )]
    pub max_permissions_per_allocation: usize,
    /// Channels one allocation may bind; a ChannelBind for one more gets 508 (Insufficient
    /// Capacity).
    #[arg(
        long = "max-channels-per-allocation",
        env = "TURN_CONTROL_MAX_CHANNELS_PER_ALLOCATION",
        value_name = "N",
        default_value_t = MAX_CHANNELS_PER_ALLOCATION
    )]
    pub max_channels_per_allocation: usize,
    /// Channel bindings one username may hold in the XDP data plane at once, over all
    /// threads: its share of the kernel's maps. Its further channels are relayed in user
    /// space; 0 relays all of them there.
    #[arg(
        long = "user-kernel-bindings",
        env = "TURN_CONTROL_USER_KERNEL_BINDINGS",
        value_name = "N",
        default_value_t = USER_KERNEL_BINDINGS
    )]
    pub user_kernel_bindings: usize,
    /// SO_RCVBUF and SO_SNDBUF of listener sockets, in bytes.
    #[arg(
        long = "listener-buffer-bytes",
        env = "TURN_CONTROL_LISTENER_BUFFER_BYTES",
        value_name = "BYTES",
        default_value_t = DEFAULT_LISTENER_BUFFER
    )]
    pub listener_buffer_bytes: usize,
    /// SO_RCVBUF and SO_SNDBUF of each relay socket, in bytes.
    #[arg(
        long = "relay-buffer-bytes",
        env = "TURN_CONTROL_RELAY_BUFFER_BYTES",
        value_name = "BYTES",
        default_value_t = DEFAULT_RELAY_BUFFER
    )]
    pub relay_buffer_bytes: usize,
    /// Event-loop threads, each with its own SO_REUSEPORT listener sockets, allocations and
    /// share of the port range [default: one per CPU].
    #[arg(
        long,
        env = "TURN_CONTROL_THREADS",
        value_name = "N",
        default_value_t = default_threads(),
        hide_default_value = true
    )]
    pub threads: usize,
    /// SOFTWARE attribute (RFC 8489 §14.14) of every response; empty for none.
    #[arg(
        long,
        env = "TURN_CONTROL_SOFTWARE",
        value_name = "TEXT",
        default_value = DEFAULT_SOFTWARE
    )]
    pub software: String,
    /// Requests the queue from the event-loop threads to the agent link holds; beyond it
    /// installs fall back to user space and removals force a full sync. Hidden: tests make
    /// it small to overflow it on purpose. --print-config shows it only when not the default.
    #[arg(
        long = "agent-queue",
        env = "TURN_CONTROL_AGENT_QUEUE",
        value_name = "N",
        default_value_t = DEFAULT_AGENT_QUEUE,
        hide = true
    )]
    #[serde(
        default = "default_agent_queue",
        skip_serializing_if = "is_default_agent_queue"
    )]
    pub agent_queue: usize,
    /// Directory for state that outlives the process: the nonce key's seed and a journal of
    /// every allocation, restored at the next start. With it SIGTERM hands over (allocations
    /// stay, for the next process) and SIGINT ends them all; under systemd the listener and
    /// relay sockets and plain TCP connections go into the service's file-descriptor store
    /// [default: none; SIGTERM ends every allocation].
    #[arg(
        long = "state-dir",
        env = "TURN_CONTROL_STATE_DIR",
        value_name = "PATH"
    )]
    pub state_dir: Option<PathBuf>,
    /// Admin HTTP listener: GET /healthz (every event-loop thread alive), GET /readyz
    /// (listening and not draining), POST /drain (start draining), GET /drain [default: none].
    #[arg(long, env = "TURN_CONTROL_ADMIN", value_name = "ADDR:PORT")]
    pub admin: Option<SocketAddr>,
    /// Where new Allocates are sent while draining or shedding (repeatable): a 300 (Try
    /// Alternate) names the first of the client's address family in ALTERNATE-SERVER; without
    /// one of its family the client gets 508. Reloaded on SIGHUP.
    #[arg(
        long = "alternate-server",
        env = "TURN_CONTROL_ALTERNATE_SERVER",
        value_name = "ADDR:PORT",
        value_delimiter = ','
    )]
    pub alternate_server: Vec<SocketAddr>,
    /// ALTERNATE-DOMAIN sent with ALTERNATE-SERVER, the name TLS clients check the
    /// alternate's certificate against. Reloaded on SIGHUP.
    #[arg(
        long = "alternate-domain",
        env = "TURN_CONTROL_ALTERNATE_DOMAIN",
        value_name = "NAME"
    )]
    pub alternate_domain: Option<String>,
    /// Redirect new Allocates (as while draining) while the relay holds this many
    /// allocations or more [default: none].
    #[arg(
        long = "shed-allocations",
        env = "TURN_CONTROL_SHED_ALLOCATIONS",
        value_name = "N"
    )]
    pub shed_allocations: Option<u32>,
    /// Seconds after the drain started (POST /drain, SIGUSR1) at which the daemon exits even
    /// with allocations left, deleting them as on SIGTERM.
    #[arg(
        long = "drain-deadline",
        env = "TURN_CONTROL_DRAIN_DEADLINE",
        value_name = "SECONDS",
        default_value_t = DEFAULT_DRAIN_DEADLINE
    )]
    pub drain_deadline: u32,
    /// Bytes per second of application data one allocation may relay, each direction on its
    /// own (coturn's max-bps; 125000 is 1 Mbit/s), in user space and in the kernel alike; the
    /// excess is dropped [default: unlimited].
    #[arg(long = "max-bps", env = "TURN_CONTROL_MAX_BPS", value_name = "BYTES")]
    pub max_bps: Option<u64>,
    /// Bytes per second all of one user's allocations together may relay, each direction on
    /// its own. The user is the username, or for TURN REST credentials (--auth-secret) the part
    /// after the first ':' [default: unlimited].
    #[arg(
        long = "user-max-bps",
        env = "TURN_CONTROL_USER_MAX_BPS",
        value_name = "BYTES"
    )]
    pub user_max_bps: Option<u64>,
    /// Bytes per second the allocations' max-bps may add up to (coturn's bps-capacity): each
    /// allocation reserves its max-bps; with nothing left an Allocate gets 486 (Allocation
    /// Quota Reached), with less left it gets what is left. Needs --max-bps (or a user limit's
    /// max_bps) [default: unlimited].
    #[arg(
        long = "bps-capacity",
        env = "TURN_CONTROL_BPS_CAPACITY",
        value_name = "BYTES"
    )]
    pub bps_capacity: Option<u64>,
    /// One user's max-bps and user-max-bps instead of the server-wide ones (repeatable; the
    /// environment variable takes entries separated by ';'). In the file, a table per user:
    /// `[user_limits.alice]` with `max_bps = 125000`, `user_max_bps = 250000`.
    #[arg(
        long = "user-limit",
        env = "TURN_CONTROL_USER_LIMITS",
        value_name = "USER:max_bps=N[,user_max_bps=M]",
        value_delimiter = ';'
    )]
    #[serde(default, with = "user_limits_table")]
    pub user_limits: Vec<UserLimit>,
    /// File accounting records are appended to, one JSON object per line (start, interim
    /// and stop of each allocation, like RADIUS accounting); `-` for standard output
    /// [default: none].
    #[arg(
        long = "accounting-file",
        env = "TURN_CONTROL_ACCOUNTING_FILE",
        value_name = "PATH"
    )]
    pub accounting_file: Option<PathBuf>,
    /// Seconds between the interim records of a live allocation; 0 for start and stop only.
    #[arg(
        long = "accounting-interim-seconds",
        env = "TURN_CONTROL_ACCOUNTING_INTERIM_SECONDS",
        value_name = "SECONDS",
        default_value_t = DEFAULT_ACCOUNTING_INTERIM
    )]
    pub accounting_interim_seconds: u32,
    /// URL (http:// or https://) each accounting record is POSTed to as JSON [default: none].
    #[arg(
        long = "accounting-webhook",
        env = "TURN_CONTROL_ACCOUNTING_WEBHOOK",
        value_name = "URL"
    )]
    pub accounting_webhook: Option<String>,
    /// Records waiting for the webhook at most, while it is slow or down; records beyond it
    /// are dropped (and counted).
    #[arg(
        long = "accounting-webhook-queue",
        env = "TURN_CONTROL_ACCOUNTING_WEBHOOK_QUEUE",
        value_name = "N",
        default_value_t = DEFAULT_ACCOUNTING_WEBHOOK_QUEUE
    )]
    pub accounting_webhook_queue: usize,

    /// The IPv4 address of `relay_ip` (derived).
    #[arg(skip)]
    #[serde(skip)]
    pub relay_ipv4: Option<Ipv4Addr>,
    /// The IPv6 address of `relay_ip` (derived).
    #[arg(skip)]
    #[serde(skip)]
    pub relay_ipv6: Option<Ipv6Addr>,
    /// The IPv4 address of `external_ip`, announced instead of `relay_ipv4` (derived).
    #[arg(skip)]
    #[serde(skip)]
    pub external_ipv4: Option<Ipv4Addr>,
    /// The IPv6 address of `external_ip`, announced instead of `relay_ipv6` (derived).
    #[arg(skip)]
    #[serde(skip)]
    pub external_ipv6: Option<Ipv6Addr>,
}

/// A static user `NAME:PASSWORD`.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// The USERNAME.
    pub name: String,
    /// The password.
    pub password: String,
}

/// One user's limits, `USER:max_bps=N[,user_max_bps=M]` on the command line (either key may
/// be left out, not both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserLimit {
    /// The user (the username, or a REST username's part after the first ':').
    pub user: String,
    /// The user's allocations' max-bps, if not the server-wide one.
    pub max_bps: Option<u64>,
    /// The user's user-max-bps, if not the server-wide one.
    pub user_max_bps: Option<u64>,
}

/// A configuration the daemon cannot run with. Each message names the key (or flag) and
/// the reason, on one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read or holds an unusable key.
    #[error(transparent)]
    File(#[from] daemon::FileError),
    /// The merged settings do not fit together.
    #[error("{key}: {reason}")]
    Invalid {
        /// The setting (flag or key name).
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl Cli {
    /// Parses the process's arguments and environment.
    pub fn try_parse() -> Result<Self, clap::Error> {
        Self::try_parse_from(std::env::args_os())
    }

    /// Parses `args` (the first is the program name) and the environment.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::from_parsed(daemon::parse_from::<Flags, _, _>(args)?)
    }

    fn from_parsed((flags, matches): (Flags, clap::ArgMatches)) -> Result<Self, clap::Error> {
        Ok(Self {
            config: flags.config,
            print_config: flags.print_config,
            command: flags.command,
            settings: CommandLine::new(flags.settings, &matches),
        })
    }
}

impl Settings {
    /// Reads the file named by `cli.config` (if any, again on every call: SIGHUP) under the
    /// flags and environment, then fills the defaults that depend on other options and
    /// checks the result.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        cli.settings.load(cli.config.as_deref())?.resolve()
    }

    /// The mode-dependent defaults (`--dev`, `relay_ip` from the listeners) and the checks
    /// that need more than one option.
    fn resolve(mut self) -> Result<Self, ConfigError> {
        self.resolve_listen()?;

        if self.relay_ip.is_empty() {
            // Without --relay-ip, relay on the listeners' own addresses where they are
            // specific.
            self.relay_ip = self
                .listen
                .iter()
                .map(SocketAddr::ip)
                .filter(|ip| !ip.is_unspecified())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
        }
        (self.relay_ipv4, self.relay_ipv6) = one_per_family("relay_ip", &self.relay_ip)?;
        if self.relay_ipv4.is_none() && self.relay_ipv6.is_none() {
            return Err(invalid(
                "relay_ip",
                "no relay address: set --relay-ip (required when listening on a wildcard address)",
            ));
        }
        if self.relay_ip.iter().any(IpAddr::is_unspecified) {
            return Err(invalid(
                "relay_ip",
                "must be a specific address, not 0.0.0.0 or ::",
            ));
        }
        (self.external_ipv4, self.external_ipv6) =
            one_per_family("external_ip", &self.external_ip)?;
        if (self.external_ipv4.is_some() && self.relay_ipv4.is_none())
            || (self.external_ipv6.is_some() && self.relay_ipv6.is_none())
        {
            return Err(invalid(
                "external_ip",
                "an external address needs a relay address of the same family",
            ));
        }

        if self.realm.is_empty() {
            return Err(invalid("realm", "must not be empty"));
        }
        if self.auth_secret.as_deref() == Some("") {
            return Err(invalid("auth_secret", "must not be empty"));
        }
        if !self.dev && self.users.is_empty() && self.auth_secret.is_none() {
            return Err(invalid(
                "users",
                "no credentials: set --user NAME:PASSWORD or --auth-secret (or use --dev)",
            ));
        }
        if self.threads == 0 {
            return Err(invalid("threads", "must be at least 1"));
        }
        self.check_allocation_lifetimes()?;
        self.check_tcp_limits()?;
        self.check_tls()?;
        self.check_abuse_limits()?;
        if self.agent_queue == 0 {
            return Err(invalid("agent_queue", "must be at least 1"));
        }
        self.check_draining()?;
        // In the order of the file's tables, so that --print-config reads back the same.
        self.user_limits.sort_by(|a, b| a.user.cmp(&b.user));
        self.check_bandwidth()?;
        self.check_accounting()?;
        if self.threads > MAX_THREADS {
            return Err(invalid(
                "threads",
                format!("{} is more than {MAX_THREADS}", self.threads),
            ));
        }
        // Each thread allocates from its own slice of the range (no cross-thread port
        // bookkeeping); a slice must hold at least one port.
        if self.ports.len() < self.threads {
            return Err(invalid(
                "ports",
                format!(
                    "{} port(s) cannot be shared by {} threads (see --threads)",
                    self.ports.len(),
                    self.threads
                ),
            ));
        }
        if self.dev && self.metrics.is_none() {
            self.metrics = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, DEV_METRICS_PORT)));
        }
        Ok(self)
    }

    /// The listeners: `--dev`'s or the wildcard defaults if none are given; distinct, with
    /// ports.
    fn resolve_listen(&mut self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            self.listen = if self.dev {
                vec![SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT))]
            } else {
                vec![
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, DEFAULT_PORT)),
                ]
            };
        }
        let unique: BTreeSet<_> = self.listen.iter().collect();
        if unique.len() != self.listen.len() {
            return Err(invalid("listen", "the same address is given twice"));
        }
        if let Some(zero) = self.listen.iter().find(|a| a.port() == 0) {
            return Err(invalid("listen", format!("{zero}: port 0 is not a port")));
        }
        Ok(())
    }

    /// The default allocation lifetime at least a second and at most the maximum, which is at
    /// most a week.
    fn check_allocation_lifetimes(&self) -> Result<(), ConfigError> {
        if self.default_allocation_lifetime == 0 {
            return Err(invalid("default_allocation_lifetime", "must be at least 1"));
        }
        if self.max_allocation_lifetime > LONGEST_ALLOCATION_LIFETIME {
            return Err(invalid(
                "max_allocation_lifetime",
                format!("must be at most {LONGEST_ALLOCATION_LIFETIME} (a week)"),
            ));
        }
        if self.default_allocation_lifetime > self.max_allocation_lifetime {
            return Err(invalid(
                "default_allocation_lifetime",
                format!(
                    "{} is more than max_allocation_lifetime {}",
                    self.default_allocation_lifetime, self.max_allocation_lifetime
                ),
            ));
        }
        Ok(())
    }

    /// The drain deadline and the shedding threshold are at least one, the alternate domain
    /// is not empty.
    fn check_draining(&self) -> Result<(), ConfigError> {
        if self.drain_deadline == 0 {
            return Err(invalid("drain_deadline", "must be at least 1"));
        }
        if self.shed_allocations == Some(0) {
            return Err(invalid("shed_allocations", "must be at least 1"));
        }
        if self.alternate_domain.as_deref() == Some("") {
            return Err(invalid("alternate_domain", "must not be empty"));
        }
        if let Some(zero) = self
            .alternate_server
            .iter()
            .find(|a| a.port() == 0 || a.ip().is_unspecified())
        {
            return Err(invalid(
                "alternate_server",
                format!("{zero}: must be a specific address and port"),
            ));
        }
        Ok(())
    }

    /// Rates are at least one byte per second, each user is limited once, and bps_capacity
    /// has a max_bps to count.
    fn check_bandwidth(&self) -> Result<(), ConfigError> {
        let rates = [
            ("max_bps", self.max_bps),
            ("user_max_bps", self.user_max_bps),
            ("bps_capacity", self.bps_capacity),
        ];
        if let Some((key, _)) = rates.into_iter().find(|&(_, rate)| rate == Some(0)) {
            return Err(invalid(key, "must be at least 1"));
        }
        let mut users = BTreeSet::new();
        for limit in &self.user_limits {
            if !users.insert(&limit.user) {
                return Err(invalid(
                    "user_limits",
                    format!("{}: limited twice", limit.user),
                ));
            }
            if limit.max_bps == Some(0) || limit.user_max_bps == Some(0) {
                return Err(invalid(
                    "user_limits",
                    format!("{}: rates must be at least 1", limit.user),
                ));
            }
        }
        let any_max_bps =
            self.max_bps.is_some() || self.user_limits.iter().any(|l| l.max_bps.is_some());
        if self.bps_capacity.is_some() && !any_max_bps {
            return Err(invalid(
                "bps_capacity",
                "bps_capacity needs max_bps: an allocation without a limit reserves nothing",
            ));
        }
        Ok(())
    }

    /// The accounting file is named, the webhook is an http:// or https:// URL with a host,
    /// and its queue holds something.
    fn check_accounting(&self) -> Result<(), ConfigError> {
        if self
            .accounting_file
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(invalid("accounting_file", "must not be empty"));
        }
        if let Some(url) = &self.accounting_webhook {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            match rest {
                None => {
                    return Err(invalid(
                        "accounting_webhook",
                        format!("{url}: must start with http:// or https://"),
                    ));
                }
                Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                    return Err(invalid(
                        "accounting_webhook",
                        format!("{url}: names no host"),
                    ));
                }
                Some(_) => {}
            }
        }
        if self.accounting_webhook_queue == 0 {
            return Err(invalid("accounting_webhook_queue", "must be at least 1"));
        }
        Ok(())
    }

    /// Whether accounting records go anywhere.
    pub fn accounting(&self) -> bool {
        self.accounting_file.is_some() || self.accounting_webhook.is_some()
    }

    /// Certificate and key come together; TLS listeners need them, are distinct, and do not
    /// take a TCP address of --listen.
    fn check_tls(&self) -> Result<(), ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(invalid("tls_key", "--tls-cert needs --tls-key")),
            (None, Some(_)) => return Err(invalid("tls_cert", "--tls-key needs --tls-cert")),
            _ => {}
        }
        if !self.tls_listen.is_empty() && self.tls_cert.is_none() {
            return Err(invalid(
                "tls_listen",
                "a TLS listener needs a certificate: set --tls-cert and --tls-key",
            ));
        }
        let unique: BTreeSet<_> = self.tls_listen.iter().collect();
        if unique.len() != self.tls_listen.len() {
            return Err(invalid("tls_listen", "the same address is given twice"));
        }
        if let Some(zero) = self.tls_listen.iter().find(|a| a.port() == 0) {
            return Err(invalid(
                "tls_listen",
                format!("{zero}: port 0 is not a port"),
            ));
        }
        if self.tcp
            && let Some(both) = self.tls_listen.iter().find(|a| self.listen.contains(a))
        {
            return Err(invalid(
                "tls_listen",
                format!("{both} is a --listen address, whose TCP listener takes TLS already"),
            ));
        }
        if self.tls_handshake_timeout_seconds == 0 {
            return Err(invalid(
                "tls_handshake_timeout_seconds",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The TCP connection limits are at least one.
    fn check_tcp_limits(&self) -> Result<(), ConfigError> {
        let idle = self.tcp_idle_unallocated_seconds;
        let per_source = self.tcp_connections_per_source;
        let total = self.tcp_connections_max.unwrap_or(1);
        let limits = [
            ("tcp_idle_unallocated_seconds", idle),
            ("tcp_connections_per_source", per_source),
            ("tcp_connections_max", total),
        ];
        match limits.into_iter().find(|&(_, value)| value == 0) {
            Some((key, _)) => Err(invalid(key, "must be at least 1")),
            None => Ok(()),
        }
    }

    /// The limits on unauthenticated answers and per allocation are at least one.
    fn check_abuse_limits(&self) -> Result<(), ConfigError> {
        let limits = [
            ("unauthenticated_rate", self.unauthenticated_rate as usize),
            (
                "unauthenticated_rate_per_source",
                self.unauthenticated_rate_per_source as usize,
            ),
            (
                "unauthenticated_burst_per_source",
                self.unauthenticated_burst_per_source as usize,
            ),
            (
                "max_permissions_per_allocation",
                self.max_permissions_per_allocation,
            ),
            (
                "max_channels_per_allocation",
                self.max_channels_per_allocation,
            ),
        ];
        match limits.into_iter().find(|&(_, value)| value == 0) {
            Some((key, _)) => Err(invalid(key, "must be at least 1")),
            None => Ok(()),
        }
    }

    /// The effective configuration as TOML, with secrets redacted (`--print-config`). It
    /// reads back as a configuration file.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        const REDACTED: &str = "<redacted>";
        let redacted = Self {
            users: self
                .users
                .iter()
                .map(|user| User {
                    name: user.name.clone(),
                    password: REDACTED.to_owned(),
                })
                .collect(),
            auth_secret: self.auth_secret.as_ref().map(|_| REDACTED.to_owned()),
            ..self.clone()
        };
        Ok(daemon::to_toml(&redacted)?)
    }

    /// Thread `index` of `threads`' core configuration: the shared `seeds` (one nonce key for
    /// all), `quotas`, `reservations` and `bandwidth`, its own slice of the port range;
    /// `dev_user` is the generated `--dev` credential.
    pub fn core_config(
        &self,
        dev_user: Option<&User>,
        seeds: Seeds,
        (index, threads): (usize, usize),
        quotas: &Arc<QuotaLedger>,
        reservations: &Arc<ReservationLedger>,
        bandwidth: &Arc<BandwidthLedger>,
    ) -> Config {
        let mut config = Config::new(self.realm.clone(), seeds.random);
        config.nonce_seed = seeds.nonce;
        config.software = Some(self.software.clone()).filter(|software| !software.is_empty());
        config.credentials = self.credentials(dev_user);
        // Behind a 1:1 NAT the core announces the external address (XOR-RELAYED-ADDRESS); the
        // daemon maps it back to the relay address when binding and reading sockets.
        config.relay_ipv4 = self.external_ipv4.or(self.relay_ipv4);
        config.relay_ipv6 = self.external_ipv6.or(self.relay_ipv6);
        // Every listener, TLS ones too: none is a peer, and allocations restored after a
        // restart may have come through any.
        config.listeners = self
            .listen
            .iter()
            .chain(&self.tls_listen)
            .copied()
            .collect();
        config.own_addresses = self
            .relay_ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.relay_ipv6.map(IpAddr::V6))
            .collect();
        config.port_range = crate::threads::port_slice(&self.ports.range(), index, threads);
        config.default_lifetime =
            std::time::Duration::from_secs(u64::from(self.default_allocation_lifetime));
        config.max_lifetime =
            std::time::Duration::from_secs(u64::from(self.max_allocation_lifetime));
        config.user_quota = self.user_quota;
        config.total_quota = self.total_quota;
        config.quotas = Arc::clone(quotas);
        config.reservations = Arc::clone(reservations);
        config.core_index = index as u32;
        // The limits on unauthenticated answers are the host's: each core gets its share (the
        // kernel spreads a source's ports over the threads).
        config.unauthorized_rate = Some(self.unauthenticated_rate.div_ceil(threads as u32).max(1));
        config.unauthenticated_per_source = Some(
            SourceRate::new(
                self.unauthenticated_rate_per_source,
                self.unauthenticated_burst_per_source,
            )
            .share(threads),
        );
        config.max_permissions_per_allocation = self.max_permissions_per_allocation;
        config.max_channels_per_allocation = self.max_channels_per_allocation;
        // Counted in the shared `quotas` ledger, so the share holds across the threads.
        config.user_kernel_bindings = self.user_kernel_bindings;
        config.allow_peers = self.allow_peer.clone();
        config.deny_peers = self.deny_peer.clone();
        config.allow_loopback_peers = self.dev;
        config.alternate_servers = self.alternate_server.clone();
        config.alternate_domain = self.alternate_domain.clone();
        config.shed_allocations = self.shed_allocations;
        self.limits_config(&mut config, bandwidth);
        config
    }

    /// The bandwidth limits and the interim accounting interval of a core's `config`;
    /// `bandwidth` is shared by every core, so that bps_capacity and user_max_bps hold across
    /// them. Without a place for records, none are made in the interim.
    fn limits_config(&self, config: &mut Config, bandwidth: &Arc<BandwidthLedger>) {
        config.max_bps = self.max_bps;
        config.user_max_bps = self.user_max_bps;
        config.bps_capacity = self.bps_capacity;
        config.user_limits = Arc::new(
            self.user_limits
                .iter()
                .map(|limit| {
                    let limits = UserLimits {
                        max_bps: limit.max_bps,
                        user_max_bps: limit.user_max_bps,
                    };
                    (limit.user.clone(), limits)
                })
                .collect::<HashMap<_, _>>(),
        );
        config.interim_interval = (self.accounting() && self.accounting_interim_seconds > 0)
            .then(|| std::time::Duration::from_secs(u64::from(self.accounting_interim_seconds)));
        config.bandwidth = Arc::clone(bandwidth);
    }

    /// Static users (and the development user) and REST secrets.
    pub fn credentials(&self, dev_user: Option<&User>) -> Credentials {
        let mut credentials = Credentials::new(self.realm.clone());
        for user in self.users.iter().chain(dev_user) {
            credentials = credentials.with_user(user.name.clone(), &user.password);
        }
        if let Some(secret) = &self.auth_secret {
            credentials = credentials.with_rest_secret(secret.as_bytes().to_vec());
        }
        credentials
    }
}

/// The seeds of a daemon's cores: the random streams' (fresh at each start), and the nonce
/// key's when it must outlive the process (`--state-dir`).
#[derive(Debug, Clone, Copy)]
pub struct Seeds {
    /// Ports, transaction ids, tokens; and the nonce key without `nonce`.
    pub random: [u8; 32],
    /// The nonce key's, kept in the state directory.
    pub nonce: Option<[u8; 32]>,
}

impl From<[u8; 32]> for Seeds {
    fn from(random: [u8; 32]) -> Self {
        Seeds {
            random,
            nonce: None,
        }
    }
}

impl FromStr for User {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((name, password)) if !name.is_empty() && !password.is_empty() => Ok(User {
                name: name.to_owned(),
                password: password.to_owned(),
            }),
            _ => Err("expected NAME:PASSWORD with both parts non-empty".to_owned()),
        }
    }
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Passwords stay out of logs and debug output.
        f.debug_struct("User")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `NAME:PASSWORD`, as on the command line. Only [`Settings::to_toml`] writes users for
/// people to read, and it redacts the passwords first.
impl Serialize for User {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{}:{}", self.name, self.password))
    }
}

impl<'de> Deserialize<'de> for User {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(de::Error::custom)
    }
}

impl FromStr for UserLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const EXPECTED: &str = "expected USER:max_bps=N[,user_max_bps=M]";
        // The rates hold no ':', a user may (a REST username's part after the first one).
        let Some((user, rates)) = s.rsplit_once(':').filter(|(user, _)| !user.is_empty()) else {
            return Err(EXPECTED.to_owned());
        };
        let mut limit = UserLimit {
            user: user.to_owned(),
            max_bps: None,
            user_max_bps: None,
        };
        for rate in rates.split(',') {
            let (key, value) = rate.split_once('=').ok_or_else(|| EXPECTED.to_owned())?;
            let value: u64 = value
                .parse()
                .map_err(|_| format!("{key}: {value:?} is not a number of bytes per second"))?;
            match key {
                "max_bps" => limit.max_bps = Some(value),
                "user_max_bps" => limit.user_max_bps = Some(value),
                _ => return Err(format!("{key}: unknown; {EXPECTED}")),
            }
        }
        Ok(limit)
    }
}

/// `user_limits` in the file: a table per user, `[user_limits.alice]` with `max_bps` and
/// `user_max_bps`.
mod user_limits_table {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Rates {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bps: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_max_bps: Option<u64>,
    }

    pub(super) fn serialize<S: Serializer>(
        limits: &[UserLimit],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let table: BTreeMap<&str, Rates> = limits
            .iter()
            .map(|limit| {
                let rates = Rates {
                    max_bps: limit.max_bps,
                    user_max_bps: limit.user_max_bps,
                };
                (limit.user.as_str(), rates)
            })
            .collect();
        table.serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<UserLimit>, D::Error> {
        let table = BTreeMap::<String, Rates>::deserialize(deserializer)?;
        Ok(table
            .into_iter()
            .map(|(user, rates)| UserLimit {
                user,
                max_bps: rates.max_bps,
                user_max_bps: rates.user_max_bps,
            })
            .collect())
    }
}

fn default_agent_queue() -> usize {
    DEFAULT_AGENT_QUEUE
}

fn is_default_agent_queue(len: &usize) -> bool {
    *len == DEFAULT_AGENT_QUEUE
}

/// One event loop per CPU, at most [`MAX_THREADS`].
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

fn one_per_family(
    key: &'static str,
    ips: &[IpAddr],
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), ConfigError> {
    daemon::one_per_family(ips).map_err(|error| invalid(key, error.to_string()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("turn-control").chain(args.iter().copied())).unwrap()
    }

    /// Flags over the file text over defaults, resolved and checked as [`Settings::load`] does.
    fn merge(args: &[&str], text: &str) -> Result<Settings, ConfigError> {
        cli(args)
            .settings
            .merge(Path::new("x.toml"), text)?
            .resolve()
    }

    /// Flags over defaults, without a file.
    fn flags(args: &[&str]) -> Result<Settings, ConfigError> {
        Settings::load(&cli(args))
    }

    /// A file under `--dev` (which needs no other option).
    fn file(text: &str) -> Result<Settings, ConfigError> {
        merge(&["--dev"], text)
    }

    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory as _;
        Flags::command().debug_assert();
    }

    #[test]
    fn defaults_need_relay_and_credentials() {
        let err = flags(&[]).unwrap_err();
        assert!(
            err.to_string().starts_with("relay_ip: no relay address"),
            "{err}"
        );
        let err = flags(&["--relay-ip", "192.0.2.1"]).unwrap_err();
        assert!(err.to_string().contains("no credentials"), "{err}");
        let s = flags(&["--relay-ip", "192.0.2.1", "--user", "a:b"]).unwrap();
        assert_eq!(
            s.listen,
            vec![
                "0.0.0.0:3478".parse().unwrap(),
                "[::]:3478".parse().unwrap()
            ]
        );
        assert_eq!(s.ports.range(), 49152..=65535);
        assert_eq!(s.realm, DEFAULT_REALM);
        assert_eq!(s.metrics, None);
        assert!(s.tcp);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.log_level, "info");
        assert_eq!(s.listener_buffer_bytes, DEFAULT_LISTENER_BUFFER);
        assert_eq!(s.relay_buffer_bytes, DEFAULT_RELAY_BUFFER);
    }

    #[test]
    fn dev_defaults() {
        let s = flags(&["--dev"]).unwrap();
        assert_eq!(s.listen, vec!["127.0.0.1:3478".parse().unwrap()]);
        assert_eq!(s.relay_ipv4, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(s.metrics, Some("127.0.0.1:9641".parse().unwrap()));
    }

    #[test]
    fn relay_defaults_to_specific_listeners() {
        let s = flags(&[
            "--listen",
            "192.0.2.1:3478",
            "--listen",
            "[2001:db8::1]:3478",
            "--user",
            "a:b",
        ])
        .unwrap();
        assert_eq!(s.relay_ipv4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(s.relay_ipv6, Some("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let f = r#"
            listen = ["192.0.2.1:3478"]
            realm = "file.example"
            ports = "40000-40100"
            users = ["alice:one", "bob:two"]
            metrics = "127.0.0.1:9000"
            log_format = "json"
            user_quota = 5
            tcp = false
            "#;
        let s = merge(&[], f).unwrap();
        assert_eq!(s.realm, "file.example");
        assert_eq!(s.ports.range(), 40000..=40100);
        assert_eq!(s.users.len(), 2);
        assert_eq!(s.metrics, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.user_quota, Some(5));
        assert_eq!(s.relay_ipv4, Some("192.0.2.1".parse().unwrap()));
        assert!(!s.tcp);

        let s = merge(
            &[
                "--realm",
                "flag.example",
                "--ports",
                "1000-2000",
                "--user",
                "carol:three",
                "--log-format",
                "text",
            ],
            f,
        )
        .unwrap();
        assert_eq!(s.realm, "flag.example");
        assert_eq!(s.ports.range(), 1000..=2000);
        // Lists from flags replace the file's list.
        assert_eq!(
            s.users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
            ["carol"]
        );
        assert_eq!(s.log_format, LogFormat::Text);
        // Untouched keys still come from the file.
        assert_eq!(s.user_quota, Some(5));
        assert!(!s.tcp);
        assert!(
            !merge(
                &["--no-tcp"],
                "listen = [\"192.0.2.1:3478\"]\nusers = [\"a:b\"]"
            )
            .unwrap()
            .tcp
        );
    }

    #[test]
    fn file_errors_name_the_key() {
        let e = file("ports = \"1000-70000\"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file x.toml: key \"ports\": 70000 is not a port"
        );
        let e = file("listen = [\"nonsense\"]").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file x.toml: key \"listen\": "),
            "{e}"
        );
        let e = file("realm = 5").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file x.toml: key \"realm\": invalid type: integer `5`, expected a string"
        );
        let e = file("user_quota = -1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file x.toml: key \"user_quota\": invalid value: integer `-1`, expected u32"
        );
        let e = file("relam = \"x\"").unwrap_err();
        assert_eq!(e.to_string(), "config file x.toml: unknown key \"relam\"");
        let e = file("realm = \"a\"\nports = ").unwrap_err();
        assert!(
            e.to_string().starts_with("config file x.toml: line 2: "),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'), "{e}");
        let e = file("users = [\"nopassword\"]").unwrap_err();
        assert!(e.to_string().contains("NAME:PASSWORD"), "{e}");
        let e = file("log_format = \"xml\"").unwrap_err();
        assert!(e.to_string().contains("\"xml\" is neither"), "{e}");
    }

    #[test]
    fn port_ranges() {
        assert_eq!("1-2".parse::<PortRange>().unwrap().range(), 1..=2);
        assert!(
            "0-10"
                .parse::<PortRange>()
                .unwrap_err()
                .to_string()
                .contains("0 is not a port")
        );
        assert!(
            "20-10"
                .parse::<PortRange>()
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!("20".parse::<PortRange>().is_err());
    }

    #[test]
    fn threads_are_checked_against_the_port_range() {
        assert_eq!(
            merge(&["--dev", "--threads", "0"], "")
                .unwrap_err()
                .to_string(),
            "threads: must be at least 1"
        );
        assert_eq!(
            merge(&["--dev", "--threads", "4", "--ports", "50000-50002"], "")
                .unwrap_err()
                .to_string(),
            "ports: 3 port(s) cannot be shared by 4 threads (see --threads)"
        );
        assert_eq!(
            merge(&["--dev"], "threads = 257").unwrap_err().to_string(),
            "threads: 257 is more than 256"
        );
        let from_file = merge(&["--dev"], "threads = 3").unwrap();
        assert_eq!(from_file.threads, 3);
        let flag_wins = merge(&["--dev", "--threads", "2"], "threads = 3").unwrap();
        assert_eq!(flag_wins.threads, 2);
        assert!(merge(&["--dev"], "").unwrap().threads >= 1);
    }

    #[test]
    fn family_rules() {
        let e = flags(&[
            "--dev",
            "--relay-ip",
            "192.0.2.1",
            "--relay-ip",
            "192.0.2.2",
        ])
        .unwrap_err();
        assert_eq!(e.to_string(), "relay_ip: at most one address per family");
        let e = flags(&["--dev", "--external-ip", "2001:db8::1"]).unwrap_err();
        assert!(e.to_string().starts_with("external_ip:"), "{e}");
        let s = flags(&["--dev", "--external-ip", "198.51.100.1"]).unwrap();
        assert_eq!(s.external_ipv4, Some("198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn print_config_redacts_secrets() {
        let s = flags(&[
            "--dev",
            "--user",
            "alice:hunter2",
            "--auth-secret",
            "s3cret",
        ])
        .unwrap();
        let text = s.to_toml().unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
        // The printed configuration is itself a valid file, and reads back as what it shows.
        let text = text.replace("<redacted>", "x");
        let read_back = merge(&[], &text).unwrap();
        assert_eq!(
            read_back,
            merge(&["--user", "alice:x", "--auth-secret", "x"], &text).unwrap()
        );
        assert_eq!(read_back.users[0].password, "x");
        assert_eq!(read_back.auth_secret.as_deref(), Some("x"));
        assert_eq!(read_back.listen, s.listen);
        assert_eq!(read_back.threads, s.threads);
    }

    #[test]
    fn software_is_one_option() {
        let (quotas, reservations) = (QuotaLedger::shared(), ReservationLedger::shared());
        let software = |s: &Settings| {
            s.core_config(
                None,
                [0; 32].into(),
                (0, 1),
                &quotas,
                &reservations,
                &BandwidthLedger::shared(),
            )
            .software
        };
        let s = flags(&["--dev"]).unwrap();
        assert_eq!(s.software, DEFAULT_SOFTWARE);
        assert_eq!(software(&s).as_deref(), Some(DEFAULT_SOFTWARE));
        let s = merge(&["--dev"], "software = \"file relay\"").unwrap();
        assert_eq!(software(&s).as_deref(), Some("file relay"));
        let s = merge(
            &["--dev", "--software", "flag relay"],
            "software = \"file relay\"",
        )
        .unwrap();
        assert_eq!(software(&s).as_deref(), Some("flag relay"));
        assert!(s.to_toml().unwrap().contains("software = \"flag relay\""));
        let s = merge(&["--dev"], "software = \"\"").unwrap();
        assert_eq!(software(&s), None);
    }

    #[test]
    fn allocation_lifetimes_reach_the_core_and_are_checked() {
        let (quotas, reservations) = (QuotaLedger::shared(), ReservationLedger::shared());
        let core = |s: &Settings| {
            s.core_config(
                None,
                [0; 32].into(),
                (0, 1),
                &quotas,
                &reservations,
                &BandwidthLedger::shared(),
            )
        };
        let s = flags(&["--dev"]).unwrap();
        assert_eq!(core(&s).default_lifetime, Duration::from_secs(600));
        assert_eq!(core(&s).max_lifetime, Duration::from_secs(3600));
        let s = merge(
            &["--dev", "--default-allocation-lifetime", "30"],
            "max_allocation_lifetime = 60",
        )
        .unwrap();
        assert_eq!(core(&s).default_lifetime, Duration::from_secs(30));
        assert_eq!(core(&s).max_lifetime, Duration::from_secs(60));
        for (args, error) in [
            (
                &["--dev", "--default-allocation-lifetime", "0"][..],
                "default_allocation_lifetime: must be at least 1",
            ),
            (
                &[
                    "--dev",
                    "--default-allocation-lifetime",
                    "700",
                    "--max-allocation-lifetime",
                    "600",
                ][..],
                "default_allocation_lifetime: 700 is more than max_allocation_lifetime 600",
            ),
            (
                &["--dev", "--max-allocation-lifetime", "604801"][..],
                "max_allocation_lifetime: must be at most 604800 (a week)",
            ),
        ] {
            assert_eq!(flags(args).unwrap_err().to_string(), error, "{args:?}");
        }
    }

    #[test]
    fn agent_queue_is_hidden_checked_and_printed_only_when_set() {
        use clap::CommandFactory as _;
        let help = Flags::command().render_long_help().to_string();
        assert!(!help.contains("agent-queue"), "{help}");
        let s = flags(&["--dev"]).unwrap();
        assert_eq!(s.agent_queue, DEFAULT_AGENT_QUEUE);
        assert!(!s.to_toml().unwrap().contains("agent_queue"));
        let s = flags(&["--dev", "--agent-queue", "1"]).unwrap();
        assert_eq!(s.agent_queue, 1);
        let text = s.to_toml().unwrap();
        assert!(text.contains("agent_queue = 1"), "{text}");
        assert_eq!(merge(&[], &text).unwrap().agent_queue, 1);
        assert_eq!(merge(&["--dev"], "agent_queue = 8").unwrap().agent_queue, 8);
        assert_eq!(
            flags(&["--dev", "--agent-queue", "0"])
                .unwrap_err()
                .to_string(),
            "agent_queue: must be at least 1"
        );
    }

    #[test]
    fn abuse_limits_reach_the_cores_shared_out() {
        let (quotas, reservations) = (QuotaLedger::shared(), ReservationLedger::shared());
        let s = flags(&["--dev", "--threads", "4"]).unwrap();
        let core = s.core_config(
            None,
            [0; 32].into(),
            (1, 4),
            &quotas,
            &reservations,
            &BandwidthLedger::shared(),
        );
        assert_eq!(core.unauthorized_rate, Some(1250));
        assert_eq!(
            core.unauthenticated_per_source,
            Some(SourceRate::new(20, 40).share(4))
        );
        assert_eq!(
            (
                core.max_permissions_per_allocation,
                core.max_channels_per_allocation,
                core.user_kernel_bindings
            ),
            (100, 100, 1024)
        );
        let s = merge(
            &[
                "--dev",
                "--threads",
                "2",
                "--unauthenticated-rate-per-source",
                "10",
            ],
            "unauthenticated_rate = 100
unauthenticated_burst_per_source = 4
\
             max_permissions_per_allocation = 7
max_channels_per_allocation = 8
\
             user_kernel_bindings = 0",
        )
        .unwrap();
        assert_eq!(merge(&[], &s.to_toml().unwrap()).unwrap(), s);
        let core = s.core_config(
            None,
            [0; 32].into(),
            (0, 2),
            &quotas,
            &reservations,
            &BandwidthLedger::shared(),
        );
        assert_eq!(core.unauthorized_rate, Some(50));
        assert_eq!(
            core.unauthenticated_per_source,
            Some(SourceRate::new(10, 4).share(2))
        );
        assert_eq!(
            (
                core.max_permissions_per_allocation,
                core.max_channels_per_allocation,
                core.user_kernel_bindings
            ),
            (7, 8, 0)
        );
        for flag in [
            "--unauthenticated-rate",
            "--unauthenticated-rate-per-source",
            "--unauthenticated-burst-per-source",
            "--max-permissions-per-allocation",
            "--max-channels-per-allocation",
        ] {
            let key = flag.trim_start_matches("--").replace('-', "_");
            assert_eq!(
                flags(&["--dev", flag, "0"]).unwrap_err().to_string(),
                format!("{key}: must be at least 1")
            );
        }
    }

    #[test]
    fn tls_options_are_checked_together() {
        let error = |args: &[&str]| flags(args).unwrap_err().to_string();
        assert_eq!(
            error(&["--dev", "--tls-cert", "c.pem"]),
            "tls_key: --tls-cert needs --tls-key"
        );
        assert_eq!(
            error(&["--dev", "--tls-key", "k.pem"]),
            "tls_cert: --tls-key needs --tls-cert"
        );
        assert_eq!(
            error(&["--dev", "--tls-listen", "127.0.0.1:5349"]),
            "tls_listen: a TLS listener needs a certificate: set --tls-cert and --tls-key"
        );
        let tls = ["--dev", "--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let with = |extra: &[&'static str]| [&tls[..], extra].concat();
        assert_eq!(
            error(&with(&["--tls-listen", "127.0.0.1:5349,127.0.0.1:5349"])),
            "tls_listen: the same address is given twice"
        );
        assert_eq!(
            error(&with(&["--tls-listen", "127.0.0.1:3478"])),
            "tls_listen: 127.0.0.1:3478 is a --listen address, whose TCP listener takes TLS already"
        );
        assert_eq!(
            error(&with(&["--tls-handshake-timeout-seconds", "0"])),
            "tls_handshake_timeout_seconds: must be at least 1"
        );
        // Without TCP on --listen, its address is free for a TLS listener.
        let s = flags(&with(&["--no-tcp", "--tls-listen", "127.0.0.1:3478"])).unwrap();
        assert_eq!(s.tls_listen, ["127.0.0.1:3478".parse().unwrap()]);
        let s = file("tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_listen = [\"[::1]:5349\"]")
            .unwrap();
        assert_eq!(s.tls_cert.as_deref(), Some(Path::new("c.pem")));
        assert_eq!(
            s.tls_handshake_timeout_seconds,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT
        );
    }

    #[test]
    fn core_configs_validate() {
        let s = flags(&["--dev", "--threads", "2"]).unwrap();
        let (quotas, reservations) = (QuotaLedger::shared(), ReservationLedger::shared());
        for index in 0..2 {
            s.core_config(
                None,
                [0; 32].into(),
                (index, 2),
                &quotas,
                &reservations,
                &BandwidthLedger::shared(),
            )
            .validate()
            .unwrap();
        }
    }

    #[test]
    fn draining_options_reach_the_core_and_are_checked() {
        let (quotas, reservations) = (QuotaLedger::shared(), ReservationLedger::shared());
        let s = flags(&["--dev"]).unwrap();
        assert_eq!(
            (s.admin, s.drain_deadline, s.shed_allocations),
            (None, DEFAULT_DRAIN_DEADLINE, None)
        );
        let s = merge(
            &[
                "--dev",
                "--alternate-server",
                "192.0.2.9:3478",
                "--admin",
                "127.0.0.1:9643",
            ],
            "alternate_server = [\"192.0.2.8:3478\"]\nalternate_domain = \"turn.example.org\"\n\
             shed_allocations = 5\ndrain_deadline = 60",
        )
        .unwrap();
        assert_eq!(
            s.alternate_server,
            vec!["192.0.2.9:3478".parse().unwrap()],
            "the flag wins"
        );
        assert_eq!(s.admin, Some("127.0.0.1:9643".parse().unwrap()));
        assert_eq!(merge(&[], &s.to_toml().unwrap()).unwrap(), s);
        let core = s.core_config(
            None,
            [0; 32].into(),
            (0, 1),
            &quotas,
            &reservations,
            &BandwidthLedger::shared(),
        );
        assert_eq!(core.alternate_servers, s.alternate_server);
        assert_eq!(core.alternate_domain.as_deref(), Some("turn.example.org"));
        assert_eq!((core.shed_allocations, s.drain_deadline), (Some(5), 60));
        for (args, error) in [
            (
                &["--dev", "--drain-deadline", "0"][..],
                "drain_deadline: must be at least 1",
            ),
            (
                &["--dev", "--shed-allocations", "0"][..],
                "shed_allocations: must be at least 1",
            ),
            (
                &["--dev", "--alternate-server", "0.0.0.0:3478"][..],
                "alternate_server: 0.0.0.0:3478: must be a specific address and port",
            ),
        ] {
            assert_eq!(flags(args).unwrap_err().to_string(), error, "{args:?}");
        }
    }

    #[test]
    fn the_drain_subcommand_has_its_own_options() {
        let c = cli(&["drain", "--wait"]);
        let Some(Subcommand::Drain(args)) = c.command else {
            panic!("no subcommand");
        };
        assert!(args.wait);
        assert_eq!(args.admin, DEFAULT_ADMIN);
        let c = cli(&["drain", "--admin", "127.0.0.1:1"]);
        let Some(Subcommand::Drain(args)) = c.command else {
            panic!("no subcommand");
        };
        assert_eq!((args.admin.port(), args.wait), (1, false));
    }

    #[test]
    fn tcp_limits_have_defaults_and_are_checked() {
        let s = flags(&["--dev"]).unwrap();
        assert_eq!(s.tcp_idle_unallocated_seconds, DEFAULT_TCP_IDLE_UNALLOCATED);
        assert_eq!(
            s.tcp_connections_per_source,
            DEFAULT_TCP_CONNECTIONS_PER_SOURCE
        );
        assert_eq!(s.tcp_connections_max, None);
        let s = merge(
            &["--dev", "--tcp-connections-per-source", "5"],
            "tcp_idle_unallocated_seconds = 2\ntcp_connections_per_source = 7\ntcp_connections_max = 50",
        )
        .unwrap();
        assert_eq!(s.tcp_idle_unallocated_seconds, 2);
        assert_eq!(s.tcp_connections_per_source, 5, "the flag wins");
        assert_eq!(s.tcp_connections_max, Some(50));
        assert_eq!(merge(&[], &s.to_toml().unwrap()).unwrap(), s);
        for (flag, key) in [
            (
                "--tcp-idle-unallocated-seconds",
                "tcp_idle_unallocated_seconds",
            ),
            ("--tcp-connections-per-source", "tcp_connections_per_source"),
            ("--tcp-connections-max", "tcp_connections_max"),
        ] {
            assert_eq!(
                flags(&["--dev", flag, "0"]).unwrap_err().to_string(),
                format!("{key}: must be at least 1")
            );
        }
    }

    #[test]
    fn bandwidth_limits_reach_the_core() {
        let s = flags(&[
            "--dev",
            "--max-bps",
            "125000",
            "--bps-capacity",
            "1000000",
            "--user-limit",
            "alice:max_bps=50000,user_max_bps=100000",
            "--user-limit",
            "1767225600:bob:user_max_bps=7",
        ])
        .unwrap();
        assert_eq!(s.user_limits[0].user, "1767225600:bob", "sorted by user");
        let core = s.core_config(
            None,
            [0; 32].into(),
            (0, 1),
            &QuotaLedger::shared(),
            &ReservationLedger::shared(),
            &BandwidthLedger::shared(),
        );
        assert_eq!(
            (core.max_bps, core.user_max_bps, core.bps_capacity),
            (Some(125_000), None, Some(1_000_000))
        );
        assert_eq!(
            core.user_limits.get("alice"),
            Some(&UserLimits {
                max_bps: Some(50_000),
                user_max_bps: Some(100_000),
            })
        );
        assert_eq!(core.interim_interval, None, "records go nowhere");
        assert_eq!(merge(&[], &s.to_toml().unwrap()).unwrap(), s);
        // The file's table per user.
        let s = file("max_bps = 1000\n[user_limits.carol]\nuser_max_bps = 5\n").unwrap();
        assert_eq!(
            s.user_limits,
            [UserLimit {
                user: "carol".to_owned(),
                max_bps: None,
                user_max_bps: Some(5),
            }]
        );
        assert!(file("[user_limits.carol]\nmax = 5\n").is_err());
        for args in [
            &["--user-limit", "alice"][..],
            &["--user-limit", "alice:max_bps=x"],
        ] {
            let args = std::iter::once("turn-control").chain(args.iter().copied());
            assert!(Cli::try_parse_from(args).is_err());
        }
    }

    #[test]
    fn bandwidth_and_accounting_settings_are_checked() {
        for (args, error) in [
            (&["--max-bps", "0"][..], "max_bps: must be at least 1"),
            (
                &["--bps-capacity", "10"],
                "bps_capacity: bps_capacity needs max_bps: an allocation without a limit \
                 reserves nothing",
            ),
            (
                &["--user-limit", "a:max_bps=0"],
                "user_limits: a: rates must be at least 1",
            ),
            (
                &["--accounting-webhook", "ftp://x"],
                "accounting_webhook: ftp://x: must start with http:// or https://",
            ),
            (
                &["--accounting-webhook", "https:///x"],
                "accounting_webhook: https:///x: names no host",
            ),
            (
                &["--accounting-webhook-queue", "0"],
                "accounting_webhook_queue: must be at least 1",
            ),
        ] {
            let args: Vec<&str> = std::iter::once("--dev")
                .chain(args.iter().copied())
                .collect();
            assert_eq!(flags(&args).unwrap_err().to_string(), error);
        }
        let s = flags(&["--dev", "--accounting-file", "-"]).unwrap();
        assert_eq!(s.accounting_interim_seconds, DEFAULT_ACCOUNTING_INTERIM);
        assert_eq!(s.accounting_webhook_queue, DEFAULT_ACCOUNTING_WEBHOOK_QUEUE);
        let core = |s: &Settings| {
            s.core_config(
                None,
                [0; 32].into(),
                (0, 1),
                &QuotaLedger::shared(),
                &ReservationLedger::shared(),
                &BandwidthLedger::shared(),
            )
        };
        assert_eq!(core(&s).interim_interval, Some(Duration::from_secs(60)));
        let s = merge(
            &["--dev", "--accounting-interim-seconds", "0"],
            "accounting_webhook = \"https://billing.example.org/turn\"",
        )
        .unwrap();
        assert!(s.accounting());
        assert_eq!(core(&s).interim_interval, None);
        // A limit for a user nobody knows (yet) is fine.
        assert!(flags(&["--dev", "--user-limit", "nobody:max_bps=1"]).is_ok());
    }
}
