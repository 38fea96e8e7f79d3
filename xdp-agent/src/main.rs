//! `xdp-agent`: the relay's only privileged process. It loads the XDP
//! program, attaches it to the relay's interfaces through pinned links, owns
//! its maps, learns the interfaces' addresses, reads the program's perf
//! events, exports Prometheus metrics and serves the gRPC API through which
//! turn-control installs channel bindings, each for its lifetime: every
//! second it deletes those whose lifetime has ended.
//!
//! Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when the agent
//! cannot start or fails (the reason on stderr, one line), 2 for bad flags.

mod addresses;
mod attach;
mod binding;
mod config;
mod events;
mod grpc;
mod health;
mod maps;
mod metrics;
mod peers;
mod settings;
mod socket;
mod state;
mod usage;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::v1::data_plane_server::DataPlaneServer;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tracing::{debug, error, info, warn};

use crate::addresses::{Learned, RelayAddresses};
use crate::attach::Attachment;
use crate::config::{Action, Cli, Config};
use crate::events::Reports;
use crate::maps::Maps;
use crate::settings::{NextHop, Settings};
use crate::socket::Access;
use crate::state::AgentState;

/// How long a stop waits for gRPC clients to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long start-up waits for the interfaces' first addresses.
const FIRST_ADDRESSES: Duration = Duration::from_secs(5);

/// How often expired bindings are deleted: the program ignores them from
/// their expiry on, so this bounds only how long they take room.
const SWEEP: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let (cli, matches) = match daemon::parse::<Cli>() {
        Ok(parsed) => parsed,
        Err(error) => error.exit(),
    };
    let result = match cli.action {
        Some(Action::Detach { ref pin_dir }) => {
            init_logging(&cli.run).and_then(|()| detach(pin_dir))
        }
        None => cli.load(&matches).and_then(|config| {
            if cli.print_config {
                print!("{}", config.to_toml()?);
                return Ok(());
            }
            init_logging(&config)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")
                .and_then(|runtime| runtime.block_on(run(config)))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xdp-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    daemon::init_logging(&config.log_level, config.log_format).context("cannot set up logging")
}

fn detach(pin_dir: &Path) -> anyhow::Result<()> {
    // Not under a running agent: it would go on using maps nothing pins.
    let _lock = match std::fs::metadata(pin_dir) {
        Ok(_) => Some(maps::PinDirLock::acquire(pin_dir)?),
        Err(_) => None,
    };
    let links = attach::unpin_links(pin_dir)?;
    Maps::unpin(pin_dir);
    let _ = std::fs::remove_dir(pin_dir);
    println!(
        "removed {links} pinned link(s) and the maps in {}",
        pin_dir.display()
    );
    Ok(())
}

/// Runs the agent until SIGTERM/SIGINT: start-up, serving, teardown.
async fn run(config: Config) -> anyhow::Result<()> {
    // Installed first, so that a SIGTERM sent at any point after start (systemd's stop
    // right after READY, say) runs the orderly shutdown instead of the default action.
    let shutdown = shutdown_signal()?;
    let settings = settings(&config)?;
    // Bind the metrics port and resolve every interface, user and group
    // before touching the kernel, so that a busy port or a typo fails with
    // one line and nothing attached.
    let access = Access::resolve(config.grpc_user.as_deref(), config.grpc_group.as_deref())?;
    if let Some(address) = config.metrics {
        metrics::install(address)?;
    }
    let ifindexes = interface_indexes(&config.iface)?;
    // Served from here on, so that liveness holds during a slow start;
    // readiness waits for `started`.
    let started = health::Started::default();
    let health = match config.health {
        Some(address) => Some(health::spawn(
            health::bind(address).await?,
            Arc::clone(&started),
        )),
        None => None,
    };
    let mut agent = Agent::start(&config, settings, ifindexes).await?;
    agent.health = health;
    let _ = started.set(Arc::clone(&agent.state));
    let served = match socket::bind(&config.grpc, access.group()) {
        Ok(listener) => {
            let incoming = socket::admitted(listener, access);
            agent.serve(&config, incoming, shutdown).await
        }
        Err(error) => Err(error),
    };
    agent.stop(&config);
    served
}

/// The data-plane settings the flags and the configuration file give.
fn settings(config: &Config) -> anyhow::Result<Settings> {
    let (relay_ipv4, relay_ipv6) = config.relay_overrides()?;
    let configured = RelayAddresses {
        relay_ipv4,
        relay_ipv6,
    };
    let ports = (config.ports.low(), config.ports.high());
    let mut settings = Settings::new(
        config.listen.clone(),
        ports,
        configured,
        config.tail_adjust,
        config.next_hop,
    )
    .map_err(|error| anyhow::anyhow!("{error}"))?;
    settings.event_interval_log2 = config.event_interval.trailing_zeros() as u8;
    settings.allow_peers = config.allow_peer.clone();
    Ok(settings)
}

/// The kernel's FIB lookup answers only for an ingress interface that
/// forwards; without it every relayed datagram goes to user space
/// (`pass_forwarding_disabled`). Said once at start, in the operator's terms.
fn warn_where_forwarding_is_off(interfaces: &[String], relay: &RelayAddresses) {
    let families = [
        ("ipv4", relay.relay_ipv4.is_some()),
        ("ipv6", relay.relay_ipv6.is_some()),
    ];
    for interface in interfaces {
        for (family, relayed) in families {
            let path = format!("/proc/sys/net/{family}/conf/{interface}/forwarding");
            let on = std::fs::read_to_string(&path).is_ok_and(|value| value.trim() != "0");
            if relayed && !on {
                warn!(
                    interface,
                    "forwarding is off (sysctl net.{family}.conf.{interface}.forwarding=0): the kernel's \
                     FIB lookup refuses, so {family} datagrams are relayed in user space \
                     (pass_forwarding_disabled) until it is set to 1, or run with --next-hop mac-swap"
                );
            }
        }
    }
}

/// The index of each interface, in order.
fn interface_indexes(interfaces: &[String]) -> anyhow::Result<Vec<u32>> {
    interfaces
        .iter()
        .map(|name| {
            nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("no interface named {name}"))
        })
        .collect()
}

/// A started agent: the program loaded and attached, and what runs beside
/// the gRPC server until it stops.
struct Agent {
    state: Arc<AgentState>,
    attachments: Vec<Attachment>,
    /// What `watcher` learns from the host's addresses.
    addresses: watch::Receiver<Learned>,
    watcher: JoinHandle<()>,
    /// Deletes expired bindings every [`SWEEP`].
    sweeper: JoinHandle<()>,
    /// The perf-event reader thread, and its stop flag.
    reader: std::thread::JoinHandle<()>,
    stop_reader: Arc<AtomicBool>,
    metrics_task: Option<JoinHandle<()>>,
    /// The `--health` endpoint.
    health: Option<JoinHandle<()>>,
}

impl Agent {
    /// Loads (or adopts) the maps, learns the relay addresses, writes the
    /// configuration, attaches the program and starts the perf-event reader
    /// and the metrics refresh.
    async fn start(
        config: &Config,
        mut settings: Settings,
        ifindexes: Vec<u32>,
    ) -> anyhow::Result<Self> {
        let (maps, adopted) = Maps::load(&config.pin_dir, config.replace_incompatible)?;
        let maps = Arc::new(maps);
        if adopted {
            info!(pin_dir = %config.pin_dir.display(), installed = maps.installed(), "adopted the pinned maps of an earlier run");
        }
        let sweeper = sweep_expired(Arc::clone(&maps));
        let (mut addresses, watcher) = follow_addresses(ifindexes.clone());
        match tokio::time::timeout(FIRST_ADDRESSES, addresses.changed()).await {
            Ok(Ok(())) => settings.learned = addresses.borrow_and_update().clone(),
            _ => warn!("no interface addresses learned yet; relying on --relay-ip"),
        }
        if settings.relay() == RelayAddresses::default() {
            bail!(
                "{} has no usable address; pass --relay-ip",
                config.iface.join(", ")
            );
        }
        maps.set_config(&settings.to_map())?;
        let attachments = attach_all(&maps, config)?;
        maps.set_egress(&ifindexes)?;
        if settings.next_hop == NextHop::Fib {
            warn_where_forwarding_is_off(&config.iface, &settings.relay());
        }
        let reports = Arc::new(Reports::default());
        let stop_reader = Arc::new(AtomicBool::new(false));
        let reader = events::spawn_reader(&maps, Arc::clone(&reports), Arc::clone(&stop_reader))?;
        let state = Arc::new(AgentState::new(
            maps,
            settings,
            attachments
                .iter()
                .map(|a| (a.interface.clone(), a.mode))
                .collect(),
            adopted || attachments.iter().any(|a| a.adopted),
            reports,
        ));
        let metrics_task = config
            .metrics
            .map(|_| tokio::spawn(metrics::refresh_forever(Arc::clone(&state))));
        Ok(Self {
            state,
            attachments,
            addresses,
            watcher,
            sweeper,
            reader,
            stop_reader,
            metrics_task,
            health: None,
        })
    }

    /// Serves gRPC and its reflection on the `incoming` connections until
    /// `shutdown` (and the grace period for clients that keep their
    /// connection), applying address changes.
    async fn serve(
        &mut self,
        config: &Config,
        incoming: impl Stream<Item = std::io::Result<UnixStream>>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (stopping, stop_requested) = watch::channel(false);
        let signal = async move {
            shutdown.await;
            let _ = stopping.send(true);
        };
        let router = tonic::transport::Server::builder().add_service(
            DataPlaneServer::new(grpc::Service::new(Arc::clone(&self.state)))
                .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(proto::MAX_MESSAGE_BYTES),
        );
        let server = grpc::with_reflection(router)
            .context("cannot build the reflection services")?
            .serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(server);
        self.report_ready(config);
        let grace = grace_after(stop_requested);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                served = &mut server => return served.context("the gRPC server failed"),
                () = &mut grace => {
                    warn!("gRPC clients still connected after {SHUTDOWN_GRACE:?}; stopping anyway");
                    return Ok(());
                }
                changed = self.addresses.changed() => {
                    if changed.is_err() {
                        // The watcher ended (its error is logged by the task):
                        // keep the last addresses and serve on.
                        warn!("interface address watcher stopped; relay addresses are frozen");
                        return tokio::select! {
                            served = &mut server => served.context("the gRPC server failed"),
                            () = &mut grace => Ok(()),
                        };
                    }
                    self.apply_learned_addresses();
                }
            }
        }
    }

    /// Logs the configuration in force and tells systemd the agent is ready.
    fn report_ready(&self, config: &Config) {
        let settings = self.state.settings();
        let relay = settings.relay();
        info!(
            socket = %config.grpc.display(),
            relay_ipv4 = %relay.relay_ipv4.map_or("none".into(), |ip| ip.to_string()),
            relay_ipv6 = %relay.relay_ipv6.map_or("none".into(), |ip| ip.to_string()),
            listeners = ?settings.listeners,
            next_hop = settings.next_hop.name(),
            ports = %format!("{}-{}", settings.ports.0, settings.ports.1),
            tail_adjust = settings.tail_adjust,
            "ready"
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }

    /// Keeps what the watcher learned last, and writes the relay addresses
    /// to the kernel.
    fn apply_learned_addresses(&mut self) {
        let learned = self.addresses.borrow_and_update().clone();
        let before = self.state.settings().relay();
        match self.state.update_settings(|current| {
            Ok(Settings {
                learned,
                ..current.clone()
            })
        }) {
            Ok(settings) if settings.relay() != before => {
                info!(relay = ?settings.relay(), "relay addresses changed");
            }
            Ok(settings) => debug!(host = ?settings.learned.host, "host addresses changed"),
            Err(error) => {
                error!(error = %format!("{error:#}"), "cannot apply the new relay addresses");
            }
        }
    }

    /// Stops the helpers, then detaches and unpins everything, or with
    /// `--persist` leaves the program attached and the maps pinned.
    fn stop(self, config: &Config) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.watcher.abort();
        self.sweeper.abort();
        for task in [self.metrics_task, self.health].into_iter().flatten() {
            task.abort();
        }
        self.stop_reader.store(true, Ordering::Relaxed);
        let _ = self.reader.join();
        if config.persist {
            self.attachments.into_iter().for_each(Attachment::keep);
            info!(pin_dir = %config.pin_dir.display(), "maps and links left pinned for the next agent");
        } else {
            self.attachments.into_iter().for_each(Attachment::detach);
            Maps::unpin(&config.pin_dir);
            let _ = std::fs::remove_dir(&config.pin_dir);
        }
        // Only the socket: a --grpc path that named another file was refused.
        if std::fs::symlink_metadata(&config.grpc).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&config.grpc);
        }
    }
}

/// Attaches the program to every interface, in order.
fn attach_all(maps: &Maps, config: &Config) -> anyhow::Result<Vec<Attachment>> {
    config
        .iface
        .iter()
        .map(|interface| {
            Attachment::attach(
                maps.program_fd(),
                interface,
                config.xdp_mode,
                &config.pin_dir,
            )
        })
        .collect()
}

/// Follows the host's addresses in a task (its error is logged).
fn follow_addresses(ifindexes: Vec<u32>) -> (watch::Receiver<Learned>, JoinHandle<()>) {
    let (updates, addresses) = watch::channel(Learned::default());
    let watcher = tokio::spawn(async move {
        if let Err(error) = addresses::watch(ifindexes, updates).await {
            error!(error = %format!("{error:#}"), "cannot follow the interfaces' addresses");
        }
    });
    (addresses, watcher)
}

/// Deletes the expired bindings every [`SWEEP`] in a task, each sweep on
/// the blocking pool (it reads every entry of the binding maps); errors are
/// logged and the next sweep tries again.
fn sweep_expired(maps: Arc<Maps>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let maps = Arc::clone(&maps);
            let swept = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                maps.sweep(maps::clock_ns())
                    .map(|expired| (expired, started.elapsed()))
            })
            .await;
            match swept {
                Ok(Ok((expired, took))) => {
                    debug!(
                        expired,
                        took_us = took.as_micros(),
                        "expired bindings swept"
                    );
                    if expired > 0 {
                        info!(expired, "expired bindings deleted");
                    }
                }
                Ok(Err(error)) => warn!(%error, "cannot delete the expired bindings"),
                Err(error) => error!(%error, "the sweep of expired bindings failed"),
            }
        }
    })
}

/// Resolves [`SHUTDOWN_GRACE`] after a stop is requested: a client that
/// keeps its connection open must not hold the stop up.
async fn grace_after(mut stop_requested: watch::Receiver<bool>) {
    let _ = stop_requested.wait_for(|stop| *stop).await;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
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
