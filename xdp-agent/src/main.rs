//! `xdp-agent`: the relay's only privileged process. It loads the XDP
//! program, attaches it to the relay's interfaces through pinned links, owns
//! its maps, learns the interfaces' addresses, reads the program's perf
//! events, exports Prometheus metrics and serves the gRPC API through which
//! turn-control installs channel bindings.
//!
//! Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when the agent
//! cannot start or fails (the reason on stderr, one line), 2 for bad flags.

mod addresses;
mod attach;
mod binding;
mod dataplane;
mod events;
mod grpc;
mod metrics;
mod settings;
mod state;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bpf_common::DEFAULT_EVENT_INTERVAL_LOG2;
use clap::{Parser, Subcommand};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info, warn};

use crate::addresses::RelayAddresses;
use crate::attach::{Attachment, XdpMode};
use crate::binding::is_relay_candidate;
use crate::dataplane::DataPlane;
use crate::events::Reports;
use crate::settings::Settings;
use crate::state::AgentState;

/// Loads the relay's XDP program, attaches it to the given interfaces and
/// serves the channel-binding API on a unix socket.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Detaches the program and removes its pinned links and maps (what a
    /// stop with --persist leaves behind), then exits.
    Detach {
        /// The bpffs directory the agent pinned into.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdp-turn";

/// How long a stop waits for gRPC clients to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
struct RunArgs {
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

    /// Group that owns the gRPC socket (turn-control's); default: the agent's.
    #[arg(long, value_name = "GROUP")]
    grpc_group: Option<String>,

    /// The UDP port turn-control listens on for clients (turn-control may change it).
    #[arg(long, default_value_t = 3478, value_name = "PORT")]
    listen_port: u16,

    /// The allocation (relay) port range, inclusive (turn-control may change it).
    #[arg(long, default_value = "49152-65535", value_name = "LOW-HIGH", value_parser = parse_port_range)]
    ports: (u16, u16),

    /// The relay's address in a family, repeatable (one IPv4, one IPv6); it
    /// overrides what the agent learns from the interfaces. Traffic to other
    /// addresses is left to the stack.
    #[arg(long = "relay-ip", value_name = "IP")]
    relay_ips: Vec<IpAddr>,

    /// Make header room by moving the payload and the frame's tail instead of
    /// the head, for drivers without headroom in front of frames (e.g. gVNIC).
    #[arg(long)]
    tail_adjust: bool,

    /// Each CPU reports its cumulative traffic of a relay reason through the
    /// perf-event array every PACKETS packets of it (a power of two, at most
    /// 2^30). A report can wake the reader, which costs microseconds (more in
    /// a VM), so a small interval slows the data plane; the exact per-CPU
    /// counters are read at every refresh regardless.
    #[arg(long, value_name = "PACKETS", default_value_t = 1 << DEFAULT_EVENT_INTERVAL_LOG2, value_parser = parse_event_interval)]
    event_interval: u32,

    /// bpffs directory for the pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,

    /// On SIGTERM/SIGINT leave the program attached and the maps pinned, so
    /// that the next agent adopts them without interrupting traffic
    /// (upgrades). Without it a stop detaches and unpins everything.
    #[arg(long)]
    persist: bool,

    /// Replace pinned maps whose layout does not fit this version (their
    /// bindings are dropped until turn-control syncs) instead of refusing to start.
    #[arg(long)]
    replace_incompatible: bool,

    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9642.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,

    /// Log filter, e.g. "info" or "xdp_agent=debug,libbpf=debug".
    #[arg(long, env = "RUST_LOG", default_value = "info", value_name = "FILTER")]
    log: String,

    /// Log format.
    #[arg(long, value_enum, default_value = "text", value_name = "FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A packet count that is a power of two from 1 to 2^30.
fn parse_event_interval(value: &str) -> Result<u32, String> {
    let packets: u32 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a packet count"))?;
    if !packets.is_power_of_two() || packets > 1 << 30 {
        return Err(format!(
            "{packets} is not a power of two from 1 to 1073741824"
        ));
    }
    Ok(packets)
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
    let cli = Cli::parse();
    if let Err(error) = init_logging(&cli.run) {
        eprintln!("xdp-agent: cannot set up logging: {error}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Some(Command::Detach { pin_dir }) => detach(&pin_dir),
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")
            .and_then(|runtime| runtime.block_on(run(cli.run))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xdp-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(args: &RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("bad log filter {:?}", args.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|error| anyhow::anyhow!(error))
}

fn detach(pin_dir: &Path) -> anyhow::Result<()> {
    let links = attach::unpin_links(pin_dir)?;
    DataPlane::unpin(pin_dir);
    let _ = std::fs::remove_dir(pin_dir);
    println!(
        "removed {links} pinned link(s) and the maps in {}",
        pin_dir.display()
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Installed first, so that a SIGTERM sent at any point after start (systemd's stop
    // right after READY, say) runs the orderly shutdown instead of the default action.
    let shutdown = shutdown_signal()?;
    let overrides = relay_overrides(&args.relay_ips)?;
    let mut settings = Settings::new(args.listen_port, args.ports, overrides, args.tail_adjust)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    settings.event_interval_log2 = args.event_interval.trailing_zeros() as u8;
    // Bind the metrics port and resolve every interface before touching the
    // kernel, so that a busy port or a typo fails with one line and nothing
    // attached.
    if let Some(address) = args.metrics {
        metrics::install(address)?;
    }
    let ifindexes = args
        .interfaces
        .iter()
        .map(|name| {
            nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("no interface named {name}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let (dataplane, adopted) = DataPlane::load(&args.pin_dir, args.replace_incompatible)?;
    let dataplane = Arc::new(dataplane);
    if adopted {
        info!(pin_dir = %args.pin_dir.display(), installed = dataplane.installed(), "adopted the pinned maps of an earlier run");
    }

    let (address_updates, mut addresses) = tokio::sync::watch::channel(RelayAddresses::default());
    let watcher = tokio::spawn(async move {
        if let Err(error) = addresses::watch(ifindexes, address_updates).await {
            error!(error = %format!("{error:#}"), "cannot follow the interfaces' addresses");
        }
    });
    match tokio::time::timeout(Duration::from_secs(5), addresses.changed()).await {
        Ok(Ok(())) => settings.learned = *addresses.borrow_and_update(),
        _ => warn!("no interface addresses learned yet; relying on --relay-ip"),
    }
    if settings.relay() == (None, None) {
        bail!(
            "{} has no usable address; pass --relay-ip",
            args.interfaces.join(", ")
        );
    }
    dataplane.set_config(&settings.to_map())?;

    let attachments = args
        .interfaces
        .iter()
        .map(|interface| {
            Attachment::attach(
                dataplane.program_fd(),
                interface,
                args.xdp_mode,
                &args.pin_dir,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let reports = Arc::new(Reports::default());
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = events::spawn_reader(&dataplane, Arc::clone(&reports), Arc::clone(&stop_reader))?;
    let state = Arc::new(AgentState::new(
        Arc::clone(&dataplane),
        settings,
        attachments
            .iter()
            .map(|a| (a.interface.clone(), a.mode))
            .collect(),
        adopted || attachments.iter().any(|a| a.adopted),
        reports,
    ));
    let metrics_task = args
        .metrics
        .map(|_| tokio::spawn(metrics::refresh_forever(Arc::clone(&state))));

    let listener = bind_socket(&args.grpc_socket, args.grpc_group.as_deref())?;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let (stopping, mut stop_requested) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    let server = tonic::transport::Server::builder()
        .add_service(proto::v1::data_plane_server::DataPlaneServer::new(
            grpc::Service::new(Arc::clone(&state)),
        ))
        .add_service(reflection)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    tokio::pin!(server);

    let (relay_v4, relay_v6) = settings.relay();
    info!(
        socket = %args.grpc_socket.display(),
        relay_v4 = %relay_v4.map_or("none".into(), |ip| ip.to_string()),
        relay_v6 = %relay_v6.map_or("none".into(), |ip| ip.to_string()),
        listen_port = settings.listen_port,
        ports = %format!("{}-{}", settings.ports.0, settings.ports.1),
        tail_adjust = settings.tail_adjust,
        "ready"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    // A client that keeps its connection open must not hold the stop up.
    let grace = async move {
        let _ = stop_requested.wait_for(|stop| *stop).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::pin!(grace);
    let served = loop {
        tokio::select! {
            served = &mut server => break served,
            () = &mut grace => {
                warn!("gRPC clients still connected after {SHUTDOWN_GRACE:?}; stopping anyway");
                break Ok(());
            }
            changed = addresses.changed() => {
                if changed.is_err() {
                    // The watcher ended (its error is logged by the task):
                    // keep the last addresses and serve on.
                    warn!("interface address watcher stopped; relay addresses are frozen");
                    break tokio::select! {
                        served = &mut server => served,
                        () = &mut grace => Ok(()),
                    };
                }
                let learned = *addresses.borrow_and_update();
                match state.update_settings(|current| Ok(Settings { learned, ..*current })) {
                    Ok(settings) => info!(relay = ?settings.relay(), "relay addresses changed"),
                    Err(error) => error!(error = %format!("{error:#}"), "cannot apply the new relay addresses"),
                }
            }
        }
    };

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    watcher.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    stop_reader.store(true, Ordering::Relaxed);
    let _ = reader.join();
    if args.persist {
        attachments.into_iter().for_each(Attachment::keep);
        info!(pin_dir = %args.pin_dir.display(), "maps and links left pinned for the next agent");
    } else {
        attachments.into_iter().for_each(Attachment::detach);
        DataPlane::unpin(&args.pin_dir);
        let _ = std::fs::remove_dir(&args.pin_dir);
    }
    let _ = std::fs::remove_file(&args.grpc_socket);
    served.context("the gRPC server failed")
}

/// At most one `--relay-ip` per family, each a usable unicast address.
fn relay_overrides(given: &[IpAddr]) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let (mut v4, mut v6) = (None, None);
    for ip in given {
        let ip = ip.to_canonical();
        if !is_relay_candidate(ip) {
            bail!("--relay-ip {ip} is not a usable unicast address");
        }
        let duplicate = match ip {
            IpAddr::V4(ip) => v4.replace(ip).is_some(),
            IpAddr::V6(ip) => v6.replace(ip).is_some(),
        };
        if duplicate {
            bail!("--relay-ip is given twice for the family of {ip}");
        }
    }
    Ok((v4, v6))
}

/// Installs the SIGINT and SIGTERM handlers at once; the future resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => info!("SIGINT received, shutting down"),
            _ = terminate.recv() => info!("SIGTERM received, shutting down"),
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
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
        assert_eq!(parse_port_range("49152-65535"), Ok((49152, 65535)));
        assert!(parse_port_range("65535-49152").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("49152").unwrap_err().contains("LOW-HIGH"));
    }

    #[test]
    fn relay_overrides_take_one_usable_address_per_family() {
        let v4: IpAddr = "203.0.113.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        assert_eq!(
            relay_overrides(&[v4, v6]).unwrap(),
            (
                Some(Ipv4Addr::new(203, 0, 113, 10)),
                Some("2001:db8::10".parse().unwrap())
            )
        );
        assert!(
            relay_overrides(&[v4, v4])
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(relay_overrides(&["127.0.0.1".parse().unwrap()]).is_err());
        assert!(relay_overrides(&["ff02::1".parse().unwrap()]).is_err());
    }
}
