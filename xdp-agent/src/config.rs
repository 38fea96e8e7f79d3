//! The agent's configuration: one type, [`Config`], read from flags, `XDP_AGENT_*`
//! environment variables and an optional TOML file (`--config`), in that precedence over
//! the defaults. A file key is the field's name (`iface = ["eth0"]`); a list from a
//! flag or the environment replaces the file's list.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::bail;
use bpf_common::DEFAULT_EVENT_INTERVAL_LOG2;
use clap::{Parser, Subcommand};
use daemon::{CommandLine, LogFormat, PortRange};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::attach::XdpMode;
use crate::binding::is_relay_candidate;
use crate::settings::NextHop;

/// Where the agent pins its maps and links unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdp-turn";

/// Loads the relay's XDP program, attaches it to the given interfaces and
/// serves the channel-binding API on a unix socket.
#[derive(Debug, Parser)]
#[command(
    name = "xdp-agent",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// TOML configuration file; its keys are the long flags below with `_` for `-`.
    /// Flags and environment override it.
    #[arg(long, env = "XDP_AGENT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    #[command(flatten)]
    pub run: Config,

    #[command(subcommand)]
    pub action: Option<Action>,
}

/// What to do instead of running the agent (the subcommand).
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Detaches the program and removes its pinned links and maps (what a
    /// stop with --persist leaves behind), then exits.
    Detach {
        /// The bpffs directory the agent pinned into.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Every option of a running agent. Each is a flag, an `XDP_AGENT_*` variable and a key of
/// the `--config` file.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interface to attach the XDP program to (repeatable; at least one).
    #[arg(
        long = "iface",
        env = "XDP_AGENT_IFACE",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub iface: Vec<String>,

    /// How to attach: native (driver) mode with a logged fallback to generic
    /// mode, native only, or generic only.
    #[arg(
        long,
        env = "XDP_AGENT_XDP_MODE",
        value_enum,
        default_value = "auto",
        value_name = "MODE"
    )]
    #[serde(with = "daemon::value_enum")]
    pub xdp_mode: XdpMode,

    /// Path of the gRPC unix socket (created with mode 0660).
    #[arg(
        long = "grpc",
        env = "XDP_AGENT_GRPC",
        value_name = "PATH",
        default_value = "/run/xdp-turn/agent.sock"
    )]
    pub grpc: PathBuf,

    /// Group (name or gid) that owns the gRPC socket (turn-control's); default: the
    /// agent's. Without --grpc-user, a connection is served only if its peer is root, the
    /// agent's user, or of this group as its primary group: the kernel's peer credentials
    /// (SO_PEERCRED) carry no supplementary groups.
    #[arg(long, env = "XDP_AGENT_GRPC_GROUP", value_name = "GROUP")]
    pub grpc_group: Option<String>,

    /// The user (name or uid) whose gRPC connections are served besides root and the
    /// agent's own user (turn-control's); other users, of the socket's group or not, are
    /// refused. The socket's mode and group still decide who may open it.
    #[arg(long, env = "XDP_AGENT_GRPC_USER", value_name = "USER")]
    pub grpc_user: Option<String>,

    /// turn-control's UDP listeners, as it binds them (repeatable), and the most it may
    /// set: a listener it sends must be one of these, or on the port of a wildcard one of
    /// its family. Channel data to any listener in force is relayed in the kernel; a
    /// wildcard address stands for the relay address of its family.
    #[arg(
        long,
        env = "XDP_AGENT_LISTEN",
        value_name = "ADDR:PORT",
        value_delimiter = ',',
        default_value = "0.0.0.0:3478,[::]:3478"
    )]
    pub listen: Vec<SocketAddr>,

    /// How relayed frames find their next hop: fib looks up the route and neighbour of
    /// each relayed datagram (a client or peer on the relay's own segment, several
    /// interfaces; needs forwarding enabled on the attached interfaces); mac-swap sends
    /// each frame back to the MAC address it came from, right only when every client and
    /// peer is reached through the one gateway that delivers the relay's traffic.
    #[arg(
        long,
        env = "XDP_AGENT_NEXT_HOP",
        value_enum,
        default_value = "fib",
        value_name = "MODE"
    )]
    #[serde(with = "daemon::value_enum")]
    pub next_hop: NextHop,

    /// The allocation (relay) port range, inclusive; turn-control may narrow it, never
    /// reach outside it.
    #[arg(
        long,
        env = "XDP_AGENT_PORTS",
        default_value = "49152-65535",
        value_name = "LOW-HIGH"
    )]
    pub ports: PortRange,

    /// The relay's address in a family, repeatable (one IPv4, one IPv6); it
    /// overrides what the agent learns from the interfaces. Traffic to other
    /// addresses is left to the stack. turn-control may set a relay address too, but
    /// only an address of the attached interfaces or this one.
    #[arg(
        long = "relay-ip",
        env = "XDP_AGENT_RELAY_IP",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub relay_ip: Vec<IpAddr>,

    /// Peer network the kernel may relay to inside the built-in denied ranges
    /// (repeatable): loopback, private (RFC 1918, fc00::/7), shared (100.64.0.0/10),
    /// link-local, multicast, reserved, documentation and benchmarking ranges, as
    /// turn-control's --allow-peer. A binding to a denied peer, or to an address of
    /// this host (never allowed), is refused; turn-control relays it in user space.
    #[arg(
        long = "allow-peer",
        env = "XDP_AGENT_ALLOW_PEER",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub allow_peer: Vec<IpNet>,

    /// Make header room by moving the payload and the frame's tail instead of
    /// the head, for drivers without headroom in front of frames (e.g. gVNIC).
    #[arg(long, env = "XDP_AGENT_TAIL_ADJUST")]
    pub tail_adjust: bool,

    /// Each CPU reports its cumulative traffic of a relay reason through the
    /// perf-event array every PACKETS packets of it (a power of two, at most
    /// 2^30). A report can wake the reader, which costs microseconds (more in
    /// a VM), so a small interval slows the data plane; the exact per-CPU
    /// counters are read at every refresh regardless.
    #[arg(
        long,
        env = "XDP_AGENT_EVENT_INTERVAL",
        value_name = "PACKETS",
        default_value_t = 1 << DEFAULT_EVENT_INTERVAL_LOG2,
        value_parser = parse_event_interval
    )]
    pub event_interval: u32,

    /// bpffs directory for the pinned maps and links.
    #[arg(
        long,
        env = "XDP_AGENT_PIN_DIR",
        value_name = "DIR",
        default_value = DEFAULT_PIN_DIR
    )]
    pub pin_dir: PathBuf,

    /// On SIGTERM/SIGINT leave the program attached and the maps pinned, so
    /// that the next agent adopts them without interrupting traffic
    /// (upgrades). Without it a stop detaches and unpins everything.
    #[arg(long, env = "XDP_AGENT_PERSIST")]
    pub persist: bool,

    /// Replace pinned maps whose layout does not fit this version (their
    /// bindings are dropped until turn-control syncs) instead of refusing to start.
    #[arg(long, env = "XDP_AGENT_REPLACE_INCOMPATIBLE")]
    pub replace_incompatible: bool,

    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9642.
    #[arg(long, env = "XDP_AGENT_METRICS", value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,

    /// Serve health checks over HTTP on this address, e.g. 127.0.0.1:9644: GET /healthz
    /// answers 200 while the agent runs (liveness); GET /readyz answers 200 while the
    /// program is attached to every --iface and its maps answer, else 503 with the reason.
    #[arg(long, env = "XDP_AGENT_HEALTH", value_name = "ADDR:PORT")]
    pub health: Option<SocketAddr>,

    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. "info" or
    /// "xdp_agent=debug,libbpf=debug" (`--log` is an older name of the flag).
    #[arg(
        long,
        alias = "log",
        env = "XDP_AGENT_LOG_LEVEL",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log_level: String,

    /// Log format.
    #[arg(
        long,
        env = "XDP_AGENT_LOG_FORMAT",
        value_enum,
        default_value_t,
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

impl Cli {
    /// The run options: the file named by `--config` under the flags and environment
    /// (`matches` tells which of those were given), checked.
    pub fn load(&self, matches: &clap::ArgMatches) -> anyhow::Result<Config> {
        let config = CommandLine::new(self.run.clone(), matches).load(self.config.as_deref())?;
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// What the file may set beyond clap's checks of the flags.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.iface.is_empty() {
            bail!("iface: none given; pass --iface NAME (or set iface in --config)");
        }
        if let Err(reason) = check_event_interval(self.event_interval) {
            bail!("event_interval: {reason}");
        }
        self.relay_overrides()?;
        Ok(())
    }

    /// At most one `--relay-ip` per family, each a usable unicast address.
    pub fn relay_overrides(&self) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
        let ips: Vec<IpAddr> = self.relay_ip.iter().map(IpAddr::to_canonical).collect();
        if let Some(ip) = ips.iter().find(|ip| !is_relay_candidate(**ip)) {
            bail!("--relay-ip {ip} is not a usable unicast address");
        }
        daemon::one_per_family(&ips).map_err(|error| {
            anyhow::anyhow!(
                "--relay-ip is given twice for the family of {} ({error})",
                error.second
            )
        })
    }

    /// The configuration as TOML (`--print-config`); it holds no secret.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        Ok(daemon::to_toml(self)?)
    }
}

/// A packet count that is a power of two from 1 to 2^30.
fn parse_event_interval(value: &str) -> Result<u32, String> {
    let packets: u32 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a packet count"))?;
    check_event_interval(packets)?;
    Ok(packets)
}

fn check_event_interval(packets: u32) -> Result<(), String> {
    if !packets.is_power_of_two() || packets > 1 << 30 {
        return Err(format!(
            "{packets} is not a power of two from 1 to 1073741824"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::CommandFactory;

    use super::*;

    fn load(args: &[&str], file: &str) -> anyhow::Result<Config> {
        let (cli, matches) = daemon::parse_from::<Cli, _, _>(
            std::iter::once("xdp-agent").chain(args.iter().copied()),
        )?;
        let config = CommandLine::new(cli.run, &matches).merge(Path::new("agent.toml"), file)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_keep_their_defaults() {
        let config = load(&["--iface", "eth0"], "").unwrap();
        assert_eq!(config.iface, ["eth0"]);
        assert_eq!(config.xdp_mode, XdpMode::Auto);
        assert_eq!(config.grpc, Path::new("/run/xdp-turn/agent.sock"));
        assert_eq!(
            config.listen,
            [
                "0.0.0.0:3478".parse::<SocketAddr>().unwrap(),
                "[::]:3478".parse().unwrap()
            ]
        );
        assert_eq!(config.next_hop, NextHop::Fib);
        assert_eq!(config.ports.range(), 49152..=65535);
        assert_eq!(config.event_interval, 1 << DEFAULT_EVENT_INTERVAL_LOG2);
        assert_eq!(config.pin_dir, Path::new(DEFAULT_PIN_DIR));
        assert_eq!(config.log_level, "info");
        assert_eq!(config.log_format, LogFormat::Text);
        assert!(!config.persist && !config.tail_adjust && !config.replace_incompatible);
        assert!(config.allow_peer.is_empty());
        assert_eq!((config.grpc_user, config.grpc_group), (None, None));
        assert_eq!((config.metrics, config.health), (None, None));
    }

    #[test]
    fn peer_networks_and_the_socket_s_user_come_from_flags_or_the_file() {
        let config = load(
            &[
                "--iface",
                "eth0",
                "--allow-peer",
                "198.51.100.0/24,2001:db8:3::/64",
                "--allow-peer",
                "10.0.0.0/8",
                "--grpc-user",
                "turn-control",
            ],
            "",
        )
        .unwrap();
        let nets: Vec<String> = config.allow_peer.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["198.51.100.0/24", "2001:db8:3::/64", "10.0.0.0/8"]);
        assert_eq!(config.grpc_user.as_deref(), Some("turn-control"));
        let printed = config.to_toml().unwrap();
        assert_eq!(load(&[], &printed).unwrap(), config);
        let file = "iface = [\"eth0\"]\nallow_peer = [\"192.168.0.0/16\"]\ngrpc_user = \"1000\"\n";
        let config = load(&[], file).unwrap();
        assert_eq!(
            config.allow_peer,
            ["192.168.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert!(load(&["--iface", "eth0", "--allow-peer", "10.0.0.1"], "").is_err());
    }

    #[test]
    fn the_file_sits_under_the_flags() {
        let file = "iface = [\"eth1\", \"eth2\"]\nxdp_mode = \"generic\"\nports = \"40000-40100\"\npersist = true\nlog_format = \"json\"\nnext_hop = \"mac-swap\"\nlisten = [\"203.0.113.1:443\"]\n";
        let config = load(&[], file).unwrap();
        assert_eq!(config.iface, ["eth1", "eth2"]);
        assert_eq!(config.xdp_mode, XdpMode::Generic);
        assert_eq!(config.ports.range(), 40000..=40100);
        assert!(config.persist);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.next_hop, NextHop::MacSwap);
        assert_eq!(config.listen, ["203.0.113.1:443".parse().unwrap()]);

        let config = load(&["--iface", "eth0", "--xdp-mode", "native"], file).unwrap();
        assert_eq!(config.iface, ["eth0"]);
        assert_eq!(config.xdp_mode, XdpMode::Native);
        assert_eq!(config.ports.range(), 40000..=40100);

        let printed = config.to_toml().unwrap();
        assert_eq!(load(&[], &printed).unwrap(), config);
    }

    #[test]
    fn the_health_endpoint_comes_from_a_flag_or_the_file() {
        let address: SocketAddr = "127.0.0.1:9644".parse().unwrap();
        let config = load(&["--iface", "eth0", "--health", "127.0.0.1:9644"], "").unwrap();
        assert_eq!(config.health, Some(address));
        let printed = config.to_toml().unwrap();
        assert!(printed.contains("health = \"127.0.0.1:9644\""), "{printed}");
        assert_eq!(load(&[], &printed).unwrap(), config);
        assert!(load(&["--iface", "eth0", "--health", "9643"], "").is_err());
    }

    #[test]
    fn file_errors_name_the_key() {
        let error = |file: &str| load(&[], file).unwrap_err().to_string();
        assert_eq!(
            error("ifaces = [\"eth0\"]"),
            "config file agent.toml: unknown key \"ifaces\""
        );
        assert_eq!(
            error("iface = [\"eth0\"]\nxdp_mode = \"fast\""),
            "config file agent.toml: key \"xdp_mode\": \"fast\" is not one of \"auto\", \"native\", \"generic\""
        );
        assert_eq!(
            error("iface = [\"eth0\"]\nevent_interval = 100"),
            "event_interval: 100 is not a power of two from 1 to 1073741824"
        );
        assert!(error("").starts_with("iface: none given"));
    }

    #[test]
    fn event_intervals_are_powers_of_two() {
        assert_eq!(parse_event_interval("4096"), Ok(4096));
        assert_eq!(parse_event_interval("1"), Ok(1));
        assert_eq!(parse_event_interval("1073741824"), Ok(1 << 30));
        assert!(
            parse_event_interval("100")
                .unwrap_err()
                .contains("power of two")
        );
        assert!(parse_event_interval("0").is_err());
        assert!(parse_event_interval("2147483648").is_err());
        assert!(parse_event_interval("many").is_err());
    }

    #[test]
    fn port_ranges_parse_or_explain() {
        let ports = |args: &[&str]| load(&[&["--iface", "eth0"], args].concat(), "");
        assert_eq!(
            ports(&["--ports", "49152-65535"]).unwrap().ports.range(),
            49152..=65535
        );
        assert!(ports(&["--ports", "65535-49152"]).is_err());
        assert!(ports(&["--ports", "0-10"]).is_err());
        assert!(
            ports(&["--ports", "49152"])
                .unwrap_err()
                .to_string()
                .contains("LOW-HIGH")
        );
    }

    #[test]
    fn relay_overrides_take_one_usable_address_per_family() {
        let overrides = |ips: &[&str]| {
            let mut args = vec!["--iface", "eth0"];
            for ip in ips {
                args.extend(["--relay-ip", ip]);
            }
            load(&args, "").and_then(|config| config.relay_overrides())
        };
        assert_eq!(
            overrides(&["203.0.113.10", "2001:db8::10"]).unwrap(),
            (
                Some(Ipv4Addr::new(203, 0, 113, 10)),
                Some("2001:db8::10".parse().unwrap())
            )
        );
        assert!(
            overrides(&["203.0.113.10", "203.0.113.11"])
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(overrides(&["127.0.0.1"]).is_err());
        assert!(overrides(&["ff02::1"]).is_err());
    }
}
