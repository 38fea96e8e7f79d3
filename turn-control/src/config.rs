//! Configuration: flags, environment, a TOML file and defaults, merged into [`Settings`].
//!
//! Precedence, highest first: command-line flags, `TURN_CONTROL_*` environment variables
//! (clap reads both), the TOML file named by `--config`, then built-in defaults (with
//! `--dev` changing some defaults to a loopback development setup). List options replace
//! rather than extend: `--user` on the command line hides every `users` entry of the file.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

/// The TURN port of RFC 8656 §18 (and RFC 8489 §9.1 for STUN).
pub const DEFAULT_PORT: u16 = 3478;
/// Metrics port (on 127.0.0.1) in `--dev` mode.
pub const DEV_METRICS_PORT: u16 = 9641;
/// Realm when none is configured.
pub const DEFAULT_REALM: &str = "turn-control";
/// Username of the generated development credential.
pub const DEV_USER: &str = "dev";
/// Default SO_RCVBUF/SO_SNDBUF of listener sockets: every client's traffic goes through them.
pub const DEFAULT_LISTENER_BUFFER: usize = 8 << 20;
/// Default SO_RCVBUF/SO_SNDBUF of relay sockets: one allocation's peer traffic each.
pub const DEFAULT_RELAY_BUFFER: usize = 1 << 20;
/// Most event-loop threads (`--threads`).
pub const MAX_THREADS: usize = 256;

/// The command line. Every option can also come from the environment variable named in
/// `--help`; list variables take comma-separated values.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "turn-control",
    version,
    about = "TURN relay (RFC 8656) control daemon: signalling, auth, user-space relaying, XDP agent link"
)]
pub struct Cli {
    /// TOML configuration file (flags and environment override its keys).
    #[arg(long, env = "TURN_CONTROL_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Development mode: listen on 127.0.0.1:3478, generate and print a credential, allow
    /// loopback peers, metrics on 127.0.0.1:9641.
    #[arg(long, env = "TURN_CONTROL_DEV")]
    pub dev: bool,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Listener address for UDP and TCP (repeatable).
    #[arg(
        long = "listen",
        env = "TURN_CONTROL_LISTEN",
        value_name = "ADDR:PORT",
        value_delimiter = ','
    )]
    pub listen: Vec<SocketAddr>,
    /// Address relay sockets bind to, one per family (repeatable).
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
    #[arg(long, env = "TURN_CONTROL_PORTS", value_name = "LOW-HIGH")]
    pub ports: Option<PortRange>,
    /// REALM of the long-term credentials.
    #[arg(long, env = "TURN_CONTROL_REALM")]
    pub realm: Option<String>,
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
    /// Prometheus metrics listener.
    #[arg(long, env = "TURN_CONTROL_METRICS", value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Log format.
    #[arg(long = "log-format", env = "TURN_CONTROL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `turn_core=debug`.
    #[arg(
        long = "log-level",
        env = "TURN_CONTROL_LOG_LEVEL",
        value_name = "FILTER"
    )]
    pub log_level: Option<String>,
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
    /// SO_RCVBUF and SO_SNDBUF of listener sockets, in bytes.
    #[arg(
        long = "listener-buffer-bytes",
        env = "TURN_CONTROL_LISTENER_BUFFER_BYTES",
        value_name = "BYTES"
    )]
    pub listener_buffer_bytes: Option<usize>,
    /// SO_RCVBUF and SO_SNDBUF of each relay socket, in bytes.
    #[arg(
        long = "relay-buffer-bytes",
        env = "TURN_CONTROL_RELAY_BUFFER_BYTES",
        value_name = "BYTES"
    )]
    pub relay_buffer_bytes: Option<usize>,
    /// Do not listen on TCP (TURN over TCP, RFC 8656 §3.1).
    #[arg(long = "no-tcp", env = "TURN_CONTROL_NO_TCP")]
    pub no_tcp: bool,
    /// Event-loop threads, each with its own SO_REUSEPORT listener sockets, allocations and
    /// share of the port range [default: one per CPU].
    #[arg(long, env = "TURN_CONTROL_THREADS", value_name = "N")]
    pub threads: Option<usize>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// An allocation port range `LOW-HIGH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

/// A static user `NAME:PASSWORD`.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// The USERNAME.
    pub name: String,
    /// The password.
    pub password: String,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Development mode.
    pub dev: bool,
    /// Listener addresses (UDP, and TCP unless `tcp` is false).
    pub listen: Vec<SocketAddr>,
    /// Whether to listen on TCP too.
    pub tcp: bool,
    /// IPv4 address relay sockets bind to.
    pub relay_v4: Option<Ipv4Addr>,
    /// IPv6 address relay sockets bind to.
    pub relay_v6: Option<Ipv6Addr>,
    /// IPv4 address announced instead of `relay_v4`.
    pub external_v4: Option<Ipv4Addr>,
    /// IPv6 address announced instead of `relay_v6`.
    pub external_v6: Option<Ipv6Addr>,
    /// Allocation ports.
    pub ports: RangeInclusive<u16>,
    /// REALM.
    pub realm: String,
    /// Static users.
    pub users: Vec<User>,
    /// REST API shared secret.
    pub auth_secret: Option<String>,
    /// Operator allow list.
    pub allow_peer: Vec<IpNet>,
    /// Operator deny list.
    pub deny_peer: Vec<IpNet>,
    /// xdp-agent socket.
    pub agent: Option<PathBuf>,
    /// Metrics listener.
    pub metrics: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Allocations per user.
    pub user_quota: Option<u32>,
    /// Allocations in total.
    pub total_quota: Option<u32>,
    /// Listener socket buffers.
    pub listener_buffer_bytes: usize,
    /// Relay socket buffers.
    pub relay_buffer_bytes: usize,
    /// Event-loop threads.
    pub threads: usize,
}

/// A configuration the daemon cannot run with. Each message names the key (or flag) and
/// the reason, on one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {}: line {line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A key of the file holds an unusable value.
    #[error("config file {}: key \"{key}\": {reason}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why the value is refused.
        reason: String,
    },
    /// The file has a key this daemon does not know (a typo, most likely).
    #[error("config file {}: unknown key \"{key}\"", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// The merged settings do not fit together.
    #[error("{key}: {reason}")]
    Invalid {
        /// The setting (flag or key name).
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl Settings {
    /// Reads the file named by `cli.config` (if any) and merges it under the flags and
    /// environment already in `cli`.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                FileConfig::parse(path, &text)?
            }
            None => FileConfig::default(),
        };
        Self::merge(cli, file)
    }

    /// Merges flags/environment (`cli`) over `file` over defaults.
    pub fn merge(cli: &Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let dev = cli.dev;
        let listen = pick_list(&cli.listen, file.listen).unwrap_or_else(|| {
            if dev {
                vec![SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT))]
            } else {
                vec![
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, DEFAULT_PORT)),
                ]
            }
        });
        let unique: BTreeSet<_> = listen.iter().collect();
        if unique.len() != listen.len() {
            return Err(invalid("listen", "the same address is given twice"));
        }
        if let Some(zero) = listen.iter().find(|a| a.port() == 0) {
            return Err(invalid("listen", format!("{zero}: port 0 is not a port")));
        }

        let relay_ips = pick_list(&cli.relay_ip, file.relay_ip).unwrap_or_else(|| {
            // Without --relay-ip, relay on the listeners' own addresses where they are
            // specific.
            listen
                .iter()
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified())
                .collect()
        });
        let (relay_v4, relay_v6) = one_per_family("relay_ip", &relay_ips)?;
        if relay_v4.is_none() && relay_v6.is_none() {
            return Err(invalid(
                "relay_ip",
                "no relay address: set --relay-ip (required when listening on a wildcard address)",
            ));
        }
        if relay_ips.iter().any(|ip| ip.is_unspecified()) {
            return Err(invalid(
                "relay_ip",
                "must be a specific address, not 0.0.0.0 or ::",
            ));
        }
        let external = pick_list(&cli.external_ip, file.external_ip).unwrap_or_default();
        let (external_v4, external_v6) = one_per_family("external_ip", &external)?;
        if (external_v4.is_some() && relay_v4.is_none())
            || (external_v6.is_some() && relay_v6.is_none())
        {
            return Err(invalid(
                "external_ip",
                "an external address needs a relay address of the same family",
            ));
        }

        let ports = cli
            .ports
            .clone()
            .or(file.ports)
            .map_or(49152..=65535, |p| p.0);
        let realm = cli
            .realm
            .clone()
            .or(file.realm)
            .unwrap_or_else(|| DEFAULT_REALM.to_owned());
        if realm.is_empty() {
            return Err(invalid("realm", "must not be empty"));
        }
        let users = pick_list(&cli.users, file.users).unwrap_or_default();
        let auth_secret = cli.auth_secret.clone().or(file.auth_secret);
        if auth_secret.as_deref() == Some("") {
            return Err(invalid("auth_secret", "must not be empty"));
        }
        if !dev && users.is_empty() && auth_secret.is_none() {
            return Err(invalid(
                "users",
                "no credentials: set --user NAME:PASSWORD or --auth-secret (or use --dev)",
            ));
        }
        let threads = match cli.threads.or(file.threads) {
            Some(0) => return Err(invalid("threads", "must be at least 1")),
            Some(n) if n > MAX_THREADS => {
                return Err(invalid(
                    "threads",
                    format!("{n} is more than {MAX_THREADS}"),
                ));
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS)),
        };
        // Each thread allocates from its own slice of the range (no cross-thread port
        // bookkeeping); a slice must hold at least one port.
        let ports_in_range = usize::from(ports.end() - ports.start()) + 1;
        if ports_in_range < threads {
            return Err(invalid(
                "ports",
                format!(
                    "{ports_in_range} port(s) cannot be shared by {threads} threads (see --threads)"
                ),
            ));
        }
        let metrics = cli
            .metrics
            .or(file.metrics)
            .or_else(|| dev.then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, DEV_METRICS_PORT))));
        let settings = Settings {
            dev,
            tcp: !cli.no_tcp && file.tcp.unwrap_or(true),
            listen,
            relay_v4,
            relay_v6,
            external_v4,
            external_v6,
            ports,
            realm,
            users,
            auth_secret,
            allow_peer: pick_list(&cli.allow_peer, file.allow_peer).unwrap_or_default(),
            deny_peer: pick_list(&cli.deny_peer, file.deny_peer).unwrap_or_default(),
            agent: cli.agent.clone().or(file.agent),
            metrics,
            log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
            log_level: cli
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".to_owned()),
            user_quota: cli.user_quota.or(file.user_quota),
            total_quota: cli.total_quota.or(file.total_quota),
            listener_buffer_bytes: cli
                .listener_buffer_bytes
                .or(file.listener_buffer_bytes)
                .unwrap_or(DEFAULT_LISTENER_BUFFER),
            relay_buffer_bytes: cli
                .relay_buffer_bytes
                .or(file.relay_buffer_bytes)
                .unwrap_or(DEFAULT_RELAY_BUFFER),
            threads,
        };
        Ok(settings)
    }

    /// The effective configuration as TOML, with secrets redacted (`--print-config`).
    pub fn to_toml(&self) -> String {
        use std::fmt::Write as _;
        fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
            let items: Vec<String> = items.into_iter().map(|i| format!("\"{i}\"")).collect();
            format!("[{}]", items.join(", "))
        }
        let mut out = String::new();
        let relay = self
            .relay_v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.relay_v6.map(IpAddr::V6));
        let external = self
            .external_v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.external_v6.map(IpAddr::V6));
        let _ = writeln!(out, "dev = {}", self.dev);
        let _ = writeln!(out, "listen = {}", list(&self.listen));
        let _ = writeln!(out, "tcp = {}", self.tcp);
        let _ = writeln!(out, "relay_ip = {}", list(relay));
        let _ = writeln!(out, "external_ip = {}", list(external));
        let _ = writeln!(
            out,
            "ports = \"{}-{}\"",
            self.ports.start(),
            self.ports.end()
        );
        let _ = writeln!(out, "realm = {:?}", self.realm);
        let _ = writeln!(
            out,
            "users = {}",
            list(self.users.iter().map(|u| format!("{}:<redacted>", u.name)))
        );
        if self.auth_secret.is_some() {
            let _ = writeln!(out, "auth_secret = \"<redacted>\"");
        }
        let _ = writeln!(out, "allow_peer = {}", list(&self.allow_peer));
        let _ = writeln!(out, "deny_peer = {}", list(&self.deny_peer));
        if let Some(agent) = &self.agent {
            let _ = writeln!(out, "agent = {:?}", agent.display().to_string());
        }
        if let Some(metrics) = self.metrics {
            let _ = writeln!(out, "metrics = \"{metrics}\"");
        }
        let format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let _ = writeln!(out, "log_format = \"{format}\"");
        let _ = writeln!(out, "log_level = {:?}", self.log_level);
        if let Some(q) = self.user_quota {
            let _ = writeln!(out, "user_quota = {q}");
        }
        if let Some(q) = self.total_quota {
            let _ = writeln!(out, "total_quota = {q}");
        }
        let _ = writeln!(
            out,
            "listener_buffer_bytes = {}",
            self.listener_buffer_bytes
        );
        let _ = writeln!(out, "relay_buffer_bytes = {}", self.relay_buffer_bytes);
        let _ = writeln!(out, "threads = {}", self.threads);
        out
    }
}

/// The keys of the TOML file, each optional. Names are the long flags with `_` for `-`
/// (`users` for `--user`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileConfig {
    listen: Option<Vec<SocketAddr>>,
    tcp: Option<bool>,
    relay_ip: Option<Vec<IpAddr>>,
    external_ip: Option<Vec<IpAddr>>,
    ports: Option<PortRange>,
    realm: Option<String>,
    users: Option<Vec<User>>,
    auth_secret: Option<String>,
    allow_peer: Option<Vec<IpNet>>,
    deny_peer: Option<Vec<IpNet>>,
    agent: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    user_quota: Option<u32>,
    total_quota: Option<u32>,
    listener_buffer_bytes: Option<usize>,
    relay_buffer_bytes: Option<usize>,
    threads: Option<usize>,
}

impl FileConfig {
    /// Parses the TOML text of `path`. Every error names the key and why.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e.span().map_or(1, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            });
            ConfigError::Syntax {
                path: path.to_owned(),
                line,
                message: e.message().trim().to_owned(),
            }
        })?;
        let mut keys = Keys { path, table };
        let file = FileConfig {
            listen: keys.list("listen")?,
            tcp: keys.boolean("tcp")?,
            relay_ip: keys.list("relay_ip")?,
            external_ip: keys.list("external_ip")?,
            ports: keys.parsed("ports")?,
            realm: keys.string("realm")?,
            users: keys.list("users")?,
            auth_secret: keys.string("auth_secret")?,
            allow_peer: keys.list("allow_peer")?,
            deny_peer: keys.list("deny_peer")?,
            agent: keys.string("agent")?.map(PathBuf::from),
            metrics: keys.parsed("metrics")?,
            log_format: keys.log_format("log_format")?,
            log_level: keys.string("log_level")?,
            user_quota: keys.integer("user_quota")?,
            total_quota: keys.integer("total_quota")?,
            listener_buffer_bytes: keys.integer("listener_buffer_bytes")?,
            relay_buffer_bytes: keys.integer("relay_buffer_bytes")?,
            threads: keys.integer("threads")?,
        };
        if let Some(key) = keys.table.keys().next() {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
            });
        }
        Ok(file)
    }
}

/// Takes keys out of the parsed table, so that what is left at the end is unknown.
struct Keys<'a> {
    path: &'a Path,
    table: toml::Table,
}

impl Keys<'_> {
    fn error(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            path: self.path.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(
                key,
                format!("expected a string, found {}", other.type_str()),
            )),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(b)),
            Some(other) => Err(self.error(
                key,
                format!("expected true or false, found {}", other.type_str()),
            )),
        }
    }

    fn integer<T: TryFrom<i64>>(&mut self, key: &str) -> Result<Option<T>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => T::try_from(i)
                .map(Some)
                .map_err(|_| self.error(key, format!("{i} is out of range"))),
            Some(other) => Err(self.error(
                key,
                format!("expected an integer, found {}", other.type_str()),
            )),
        }
    }

    fn parsed<T>(&mut self, key: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        s.parse()
            .map(Some)
            .map_err(|e| self.error(key, format!("{e}")))
    }

    fn list<T>(&mut self, key: &str) -> Result<Option<Vec<T>>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let items = match self.table.remove(key) {
            None => return Ok(None),
            // A single string is accepted as a list of one.
            Some(toml::Value::String(s)) => vec![toml::Value::String(s)],
            Some(toml::Value::Array(items)) => items,
            Some(other) => {
                return Err(self.error(
                    key,
                    format!("expected an array of strings, found {}", other.type_str()),
                ));
            }
        };
        items
            .into_iter()
            .map(|item| match item {
                toml::Value::String(s) => s.parse().map_err(|e| self.error(key, format!("{e}"))),
                other => Err(self.error(
                    key,
                    format!(
                        "expected an array of strings, found an element of type {}",
                        other.type_str()
                    ),
                )),
            })
            .collect::<Result<Vec<T>, _>>()
            .map(Some)
    }

    fn log_format(&mut self, key: &str) -> Result<Option<LogFormat>, ConfigError> {
        match self.string(key)?.as_deref() {
            None => Ok(None),
            Some("text") => Ok(Some(LogFormat::Text)),
            Some("json") => Ok(Some(LogFormat::Json)),
            Some(other) => {
                Err(self.error(key, format!("\"{other}\" is neither \"text\" nor \"json\"")))
            }
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (low, high) = s
            .split_once('-')
            .ok_or_else(|| format!("\"{s}\" is not LOW-HIGH"))?;
        let port = |p: &str| -> Result<u16, String> {
            let p = p.trim();
            match p.parse::<u64>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                Ok(n) => Err(format!("{n} is not a port")),
                Err(_) => Err(format!("\"{p}\" is not a port")),
            }
        };
        let (low, high) = (port(low)?, port(high)?);
        if low > high {
            return Err(format!("{low}-{high} is empty (LOW above HIGH)"));
        }
        Ok(PortRange(low..=high))
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

fn pick_list<T: Clone>(cli: &[T], file: Option<Vec<T>>) -> Option<Vec<T>> {
    if cli.is_empty() {
        file
    } else {
        Some(cli.to_vec())
    }
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
    let (mut v4, mut v6) = (None, None);
    for ip in ips {
        match ip {
            IpAddr::V4(ip) if v4.is_none_or(|old| old == *ip) => v4 = Some(*ip),
            IpAddr::V6(ip) if v6.is_none_or(|old| old == *ip) => v6 = Some(*ip),
            _ => return Err(invalid(key, "at most one address per family")),
        }
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["turn-control"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap()
    }

    fn file(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("x.toml"), text)
    }

    #[test]
    fn defaults_need_relay_and_credentials() {
        let err = Settings::merge(&cli(&[]), FileConfig::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("relay_ip: no relay address"),
            "{err}"
        );
        let err =
            Settings::merge(&cli(&["--relay-ip", "192.0.2.1"]), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("no credentials"), "{err}");
        let s = Settings::merge(
            &cli(&["--relay-ip", "192.0.2.1", "--user", "a:b"]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(
            s.listen,
            vec![
                "0.0.0.0:3478".parse().unwrap(),
                "[::]:3478".parse().unwrap()
            ]
        );
        assert_eq!(s.ports, 49152..=65535);
        assert_eq!(s.realm, DEFAULT_REALM);
        assert_eq!(s.metrics, None);
        assert!(s.tcp);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn dev_defaults() {
        let s = Settings::merge(&cli(&["--dev"]), FileConfig::default()).unwrap();
        assert_eq!(s.listen, vec!["127.0.0.1:3478".parse().unwrap()]);
        assert_eq!(s.relay_v4, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(s.metrics, Some("127.0.0.1:9641".parse().unwrap()));
    }

    #[test]
    fn relay_defaults_to_specific_listeners() {
        let s = Settings::merge(
            &cli(&[
                "--listen",
                "192.0.2.1:3478",
                "--listen",
                "[2001:db8::1]:3478",
                "--user",
                "a:b",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(s.relay_v4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(s.relay_v6, Some("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn flags_override_file_override_defaults() {
        let f = file(
            r#"
            listen = ["192.0.2.1:3478"]
            realm = "file.example"
            ports = "40000-40100"
            users = ["alice:one", "bob:two"]
            metrics = "127.0.0.1:9000"
            log_format = "json"
            user_quota = 5
            "#,
        )
        .unwrap();
        let s = Settings::merge(&cli(&[]), f.clone()).unwrap();
        assert_eq!(s.realm, "file.example");
        assert_eq!(s.ports, 40000..=40100);
        assert_eq!(s.users.len(), 2);
        assert_eq!(s.metrics, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.user_quota, Some(5));
        assert_eq!(s.relay_v4, Some("192.0.2.1".parse().unwrap()));

        let s = Settings::merge(
            &cli(&[
                "--realm",
                "flag.example",
                "--ports",
                "1000-2000",
                "--user",
                "carol:three",
                "--log-format",
                "text",
            ]),
            f,
        )
        .unwrap();
        assert_eq!(s.realm, "flag.example");
        assert_eq!(s.ports, 1000..=2000);
        // Lists from flags replace the file's list.
        assert_eq!(
            s.users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
            ["carol"]
        );
        assert_eq!(s.log_format, LogFormat::Text);
        // Untouched keys still come from the file.
        assert_eq!(s.user_quota, Some(5));
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
            "config file x.toml: key \"realm\": expected a string, found integer"
        );
        let e = file("user_quota = -1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file x.toml: key \"user_quota\": -1 is out of range"
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
        assert_eq!("1-2".parse::<PortRange>().unwrap().0, 1..=2);
        assert!(
            "0-10"
                .parse::<PortRange>()
                .unwrap_err()
                .contains("0 is not a port")
        );
        assert!("20-10".parse::<PortRange>().unwrap_err().contains("empty"));
        assert!("20".parse::<PortRange>().is_err());
    }

    #[test]
    fn threads_are_checked_against_the_port_range() {
        let merge = |args: &[&str], text: &str| Settings::merge(&cli(args), file(text).unwrap());
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
        let e = Settings::merge(
            &cli(&[
                "--dev",
                "--relay-ip",
                "192.0.2.1",
                "--relay-ip",
                "192.0.2.2",
            ]),
            FileConfig::default(),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "relay_ip: at most one address per family");
        let e = Settings::merge(
            &cli(&["--dev", "--external-ip", "2001:db8::1"]),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("external_ip:"), "{e}");
        let s = Settings::merge(
            &cli(&["--dev", "--external-ip", "198.51.100.1"]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(s.external_v4, Some("198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn print_config_redacts_secrets() {
        let s = Settings::merge(
            &cli(&[
                "--dev",
                "--user",
                "alice:hunter2",
                "--auth-secret",
                "s3cret",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        let text = s.to_toml();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
        // The printed configuration is itself a valid file (minus `dev`).
        let text = text.replace("dev = true\n", "");
        let text = text.replace("<redacted>", "x");
        file(&text).unwrap();
    }
}
