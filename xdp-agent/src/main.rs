//! `xdp-agent`: the relay's only privileged process. It loads the XDP
//! program, attaches it to the relay's interfaces, owns its maps and serves
//! the gRPC API through which turn-control installs channel bindings.

mod binding;
mod dataplane;
mod grpc;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use bpf_common::DataPlaneConfig;
use clap::Parser;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info};

use crate::binding::{Limits, is_relay_candidate};
use crate::dataplane::{DataPlane, XdpMode};

/// Loads the relay's XDP program, attaches it to the given interfaces and
/// serves the channel-binding API on a unix socket.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Interface to attach the XDP program to (repeatable).
    #[arg(long = "iface", value_name = "NAME", required = true)]
    interfaces: Vec<String>,

    /// How to attach: native (driver) mode with a logged fallback to generic
    /// mode, native only, or generic only.
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    xdp_mode: XdpMode,

    /// Path of the gRPC unix socket (created with mode 0660).
    #[arg(
        long = "grpc",
        value_name = "PATH",
        default_value = "/run/xdp-turn/agent.sock"
    )]
    grpc_socket: PathBuf,

    /// Group that owns the gRPC socket (turn-control's group); default: the agent's.
    #[arg(long, value_name = "GROUP")]
    grpc_group: Option<String>,

    /// The UDP port turn-control listens on for clients.
    #[arg(long, default_value_t = 3478, value_name = "PORT")]
    listen_port: u16,

    /// The allocation (relay) port range, inclusive.
    #[arg(long, default_value = "49152-65535", value_name = "LOW-HIGH", value_parser = parse_port_range)]
    ports: (u16, u16),

    /// The relay's address in a family, repeatable (one IPv4, one IPv6);
    /// default: the first global address of each family on the first --iface.
    /// Traffic to other addresses is left to the stack.
    #[arg(long = "relay-ip", value_name = "IP")]
    relay_ips: Vec<IpAddr>,

    /// Make header room by moving the payload and the frame's tail instead of
    /// the head, for drivers without headroom in front of frames (e.g. gVNIC).
    #[arg(long)]
    tail_adjust: bool,

    /// Log filter, e.g. "info" or "xdp_agent=debug,libbpf=debug".
    #[arg(long, env = "RUST_LOG", default_value = "info", value_name = "FILTER")]
    log: String,
}

fn parse_port_range(value: &str) -> Result<(u16, u16), String> {
    let (low, high) = value
        .split_once('-')
        .ok_or("expected LOW-HIGH, e.g. 49152-65535")?;
    let low: u16 = low
        .trim()
        .parse()
        .map_err(|_| format!("{low:?} is not a port"))?;
    let high: u16 = high
        .trim()
        .parse()
        .map_err(|_| format!("{high:?} is not a port"))?;
    if low == 0 || low > high {
        return Err(format!("{low}-{high} is not a range of non-zero ports"));
    }
    Ok((low, high))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(error) = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_default())
        .with_writer(std::io::stderr)
        .try_init()
    {
        eprintln!("xdp-agent: cannot set up logging: {error}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("xdp-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xdp-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.ports.0 <= args.listen_port && args.listen_port <= args.ports.1 {
        bail!(
            "--listen-port {} lies inside --ports {}-{}",
            args.listen_port,
            args.ports.0,
            args.ports.1
        );
    }
    // Resolve every interface before touching the kernel, so that a typo fails
    // with one line and nothing attached.
    for interface in &args.interfaces {
        nix::net::if_::if_nametoindex(interface.as_str())
            .with_context(|| format!("no interface named {interface}"))?;
    }
    let (relay_v4, relay_v6) = relay_addresses(&args.relay_ips, &args.interfaces[0])?;

    let dataplane = Arc::new(DataPlane::load()?);
    let limits = Limits {
        listen_port: args.listen_port,
        ports: args.ports,
        relay_v4,
        relay_v6,
    };
    let config = DataPlaneConfig::new(args.listen_port, args.ports, relay_v4, relay_v6)
        .with_tail_adjust(args.tail_adjust);
    dataplane.set_config(&config)?;
    let links = args
        .interfaces
        .iter()
        .map(|interface| dataplane.attach(interface, args.xdp_mode))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let listener = bind_socket(&args.grpc_socket, args.grpc_group.as_deref())?;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    info!(
        socket = %args.grpc_socket.display(),
        relay_v4 = %relay_v4.map_or("none".into(), |ip| ip.to_string()),
        relay_v6 = %relay_v6.map_or("none".into(), |ip| ip.to_string()),
        tail_adjust = args.tail_adjust,
        listen_port = args.listen_port,
        ports = %format!("{}-{}", args.ports.0, args.ports.1),
        "ready"
    );
    let served = tonic::transport::Server::builder()
        .add_service(proto::v1::data_plane_server::DataPlaneServer::new(
            grpc::Service::new(dataplane, limits),
        ))
        .add_service(reflection)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;

    // Detach before anything else can fail.
    for link in links {
        info!(interface = link.interface, mode = %link.mode, "XDP program detached");
        drop(link);
    }
    let _ = std::fs::remove_file(&args.grpc_socket);
    served.context("the gRPC server failed")
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => info!("SIGINT received, shutting down"),
        _ = terminate.recv() => info!("SIGTERM received, shutting down"),
    }
}

/// Binds the gRPC socket with mode 0660, replacing a stale socket left by a
/// previous run (but never another kind of file).
fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .with_context(|| format!("cannot look up group {group}"))?
            .with_context(|| format!("no group named {group}"))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
    }
    Ok(listener)
}

/// The relay's address in each family: from `--relay-ip`, else the first
/// usable address of that family on `interface`. At least one is required.
fn relay_addresses(
    given: &[IpAddr],
    interface: &str,
) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let (mut v4, mut v6) = (None, None);
    for ip in given {
        match ip.to_canonical() {
            IpAddr::V4(ip) if v4.replace(ip).is_some() => bail!("--relay-ip given twice for IPv4"),
            IpAddr::V6(ip) if v6.replace(ip).is_some() => bail!("--relay-ip given twice for IPv6"),
            ip if !is_relay_candidate(ip) => {
                bail!("--relay-ip {ip} is not a usable unicast address")
            }
            _ => {}
        }
    }
    if given.is_empty() {
        let addresses = nix::ifaddrs::getifaddrs().context("cannot list interface addresses")?;
        for entry in addresses.filter(|entry| entry.interface_name == interface) {
            let Some(address) = entry.address else {
                continue;
            };
            if let Some(sin) = address.as_sockaddr_in()
                && v4.is_none()
                && is_relay_candidate(IpAddr::V4(sin.ip()))
            {
                v4 = Some(sin.ip());
            }
            if let Some(sin6) = address.as_sockaddr_in6()
                && v6.is_none()
                && is_relay_candidate(IpAddr::V6(sin6.ip()))
            {
                v6 = Some(sin6.ip());
            }
        }
    }
    if v4.is_none() && v6.is_none() {
        bail!("{interface} has no usable address; pass --relay-ip");
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn port_ranges_parse_or_explain() {
        assert_eq!(parse_port_range("49152-65535"), Ok((49152, 65535)));
        assert!(parse_port_range("65535-49152").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("49152").unwrap_err().contains("LOW-HIGH"));
    }
}
