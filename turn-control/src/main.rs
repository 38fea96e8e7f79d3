//! `turn-control`: the TURN relay daemon (RFC 8656). It runs the sans-IO `turn-control-core` in one
//! event loop per thread ([`threads`]) with batched UDP I/O and TURN over TCP; the main thread
//! handles signals, Prometheus metrics and the gRPC link to the xdp-agent.

mod accounting;
mod admin;
mod agent;
#[cfg(test)]
mod agent_properties;
mod config;
mod drain;
mod eventloop;
mod handover;
mod host_addresses;
mod journal;
mod kernel_usage;
mod metrics;
mod privileges;
mod state;
mod tcp;
mod threads;
mod tls;
mod udp;
mod webhook;

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use turn_control_core::{BandwidthLedger, QuotaLedger, ReservationLedger};

use crate::config::{Cli, Settings, Subcommand, User};
use crate::threads::{Control, ReportSlot};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            return match error.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = error.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    eprintln!("turn-control: {} (see --help)", one_line(&error));
                    ExitCode::from(2)
                }
            };
        }
    };
    let result = match &cli.command {
        Some(Subcommand::Drain(args)) => drain::run(args),
        None => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("turn-control: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long the webhook may take at exit to deliver the accounting records still queued
/// (the file has every record).
const ACCOUNTING_DRAIN: Duration = Duration::from_secs(5);

/// How long the shutdown drain waits for the agent to take the last removals.
const AGENT_DRAIN: Duration = Duration::from_secs(3);
/// How long start-up waits for the host's addresses (one netlink dump).
const HOST_ADDRESSES_WAIT: Duration = Duration::from_secs(2);

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(&cli)?;
    if cli.print_config {
        print!("{}", settings.to_toml()?);
        return Ok(());
    }
    init_tracing(&settings)?;
    // Every TCP connection and relay socket is a descriptor.
    match tcp::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
    let threads = settings.threads;
    // The service manager's store and what it passed back: before any thread exists, since
    // taking the passed fds clears their environment variables.
    let notify = daemon::fd_store::FdStore::from_env()
        .context("$NOTIFY_SOCKET")?
        .map(Arc::new);
    let (mut inherited, store) = take_inherited(&settings, notify.as_ref())?;
    // Everything that can fail on bad input fails here, before any thread starts.
    let tls = tls(&settings)?;
    let (listeners, listeners_kept) = threads::bind_listeners(
        (&settings.listen, &settings.tls_listen),
        settings.tcp,
        settings.listener_buffer_bytes,
        threads,
        (&mut inherited, &store),
    )?;
    // Every listener is bound: a capability granted to bind port 443 is not needed again.
    if privileges::drop_bind_capability().context("dropping CAP_NET_BIND_SERVICE")? {
        tracing::info!("listeners bound; CAP_NET_BIND_SERVICE dropped");
    }
    let dev_user = settings.dev.then(dev_credential).transpose()?;
    let seed = config::Seeds {
        random: fresh_seed()?,
        nonce: settings.state_dir.as_deref().map(state::seed).transpose()?,
    };
    let thread_states = thread_states(&settings, &mut inherited)?;
    let accounting = accounting::Sink::configured(&settings)?.map(Arc::new);
    std::mem::take(&mut inherited).close_rest(&store);
    // Shared by every thread's core: quotas and RESERVATION-TOKENs hold daemon-wide.
    let quotas = QuotaLedger::shared();
    let reservations = ReservationLedger::shared();
    // And bps_capacity and each user's user_max_bps.
    let bandwidth = BandwidthLedger::shared();
    for index in 0..threads {
        settings
            .core_config(
                dev_user.as_ref(),
                seed,
                (index, threads),
                &quotas,
                &reservations,
                &bandwidth,
            )
            .validate()
            .context("protocol core configuration")?;
    }
    // The main thread: signals, metrics, the agent link. The event loops have threads
    // of their own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        // The handlers go in before anything announces the relay: a SIGHUP or SIGTERM sent
        // as soon as "relay ready" appears must reach them, not the default action.
        let signals = Signals::install()?;
        if let Some(addr) = settings.metrics {
            metrics::install(addr)?;
        }
        // Counted here: the listeners were bound before the recorder existed.
        ::metrics::counter!(metrics::name::RESTORED, "what" => "listeners_kept")
            .increment(listeners_kept as u64);
        let admin = settings.admin.map(admin::bind).transpose()?;
        ::metrics::gauge!(metrics::name::AGENT_CONNECTED).set(0.0);
        let host_addresses = follow_host_addresses().await;
        let mut supervisor = Supervisor::start(
            cli,
            settings.clone(),
            dev_user.clone(),
            (listeners, host_addresses),
            seed,
            (&quotas, &reservations, &bandwidth),
            Prepared {
                tls,
                thread_states,
                store,
                notify: notify.clone(),
                accounting,
            },
        )?;
        supervisor.serve_admin(admin);
        if let Some(user) = &dev_user {
            print_dev_banner(user, &settings);
        }
        announce_ready(&settings, notify.as_deref());
        supervisor.run(signals).await
    })
}

/// The signals the main thread answers: SIGINT ends the relay (deleting every allocation),
/// and so does SIGTERM, unless a state directory is configured: then SIGTERM hands over (the
/// allocations stay, for the next process); SIGHUP reloads, SIGUSR1 starts draining.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    user1: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            user1: signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?,
        })
    }
}

/// What start-up prepared for the event-loop threads besides their listeners.
struct Prepared {
    /// TURN over TLS, if a certificate is configured.
    tls: Option<Arc<tls::Tls>>,
    /// Per thread, its journal and what it restores (`--state-dir`).
    thread_states: Vec<Option<eventloop::ThreadState>>,
    /// Where relay sockets go to outlive the process.
    store: Arc<handover::SocketStore>,
    /// The service manager's notification socket.
    notify: Option<Arc<daemon::fd_store::FdStore>>,
    /// Where accounting records go, if anywhere.
    accounting: Option<Arc<accounting::Sink>>,
}

/// The main thread's side of the event-loop threads: their control channels, reports and
/// join handles, and the agent link they share.
struct Supervisor {
    cli: Cli,
    settings: Settings,
    dev_user: Option<User>,
    controls: Vec<mpsc::UnboundedSender<Control>>,
    reports: Vec<ReportSlot>,
    /// One message per event-loop thread when it ends: its index and whether it panicked.
    ended: mpsc::UnboundedReceiver<(usize, bool)>,
    threads: Vec<std::thread::JoinHandle<()>>,
    agent_task: Option<tokio::task::JoinHandle<()>>,
    /// Without an agent: keeps the threads' agent channels open (and silent).
    _no_agent_events: Vec<mpsc::Sender<agent::FromAgent>>,
    /// The reserved ports' sockets the threads keep aside, counted with the relay sockets.
    reserved_sockets: threads::ReservedSockets,
    /// The cores' RESERVATION-TOKENs: how many are out right now.
    reservations: Arc<ReservationLedger>,
    /// The host's addresses, learned and followed ([`host_addresses::watch`]).
    host_addresses: watch::Receiver<host_addresses::Learned>,
    /// What the admin server shows, and its drain requests.
    status: Arc<admin::Status>,
    /// When the drain started (POST /drain, SIGUSR1).
    drain_started: Option<std::time::Instant>,
    /// TURN over TLS, whose certificate SIGHUP reloads.
    tls: Option<Arc<tls::Tls>>,
    /// The service manager's notification socket, if there is one.
    notify: Option<Arc<daemon::fd_store::FdStore>>,
    /// Where accounting records go, flushed once the threads are gone.
    accounting: Option<Arc<accounting::Sink>>,
}

impl Supervisor {
    fn start(
        cli: Cli,
        settings: Settings,
        dev_user: Option<User>,
        (listeners, mut host_addresses): (
            Vec<threads::Listeners>,
            watch::Receiver<host_addresses::Learned>,
        ),
        seed: config::Seeds,
        (quotas, reservations, bandwidth): (
            &Arc<QuotaLedger>,
            &Arc<ReservationLedger>,
            &Arc<BandwidthLedger>,
        ),
        Prepared {
            tls,
            thread_states,
            store,
            notify,
            accounting,
        }: Prepared,
    ) -> anyhow::Result<Self> {
        if let Some(tls) = &tls {
            tokio::spawn(tls::watch(Arc::clone(tls)));
        }
        let own_addresses =
            host_addresses::with_configured(&settings, host_addresses.borrow_and_update().as_ref());
        tracing::info!(addresses = ?own_addresses, "the host's addresses are refused as peers");
        let tcp_limits = tcp_limits(&settings);
        let thread_count = listeners.len();
        let mut agent_events = Vec::with_capacity(thread_count);
        let mut agent_receivers = Vec::with_capacity(thread_count);
        for _ in 0..thread_count {
            let (tx, rx) = mpsc::channel(4096);
            agent_events.push(tx);
            agent_receivers.push(rx);
        }
        let mut no_agent_events = Vec::new();
        let (agent_tx, agent_task) = match settings.agent.clone() {
            Some(path) => {
                let (queue, requests) = agent::queue(settings.agent_queue);
                let data_plane = agent::DataPlaneConfig {
                    listeners: settings.listen.clone(),
                    ports: settings.ports.range(),
                    relay_ipv4: settings.relay_ipv4,
                    relay_ipv6: settings.relay_ipv6,
                };
                let task = tokio::spawn(agent::run(path, data_plane, requests, agent_events));
                (Some(queue), Some(task))
            }
            None => {
                no_agent_events = agent_events;
                (None, None)
            }
        };
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let mut this = Self {
            cli,
            settings: settings.clone(),
            dev_user: dev_user.clone(),
            controls: Vec::with_capacity(thread_count),
            reports: Vec::with_capacity(thread_count),
            ended,
            threads: Vec::with_capacity(thread_count),
            agent_task,
            _no_agent_events: no_agent_events,
            reserved_sockets: threads::ReservedSockets::default(),
            reservations: Arc::clone(reservations),
            host_addresses,
            status: Arc::new(admin::Status::new(Vec::new(), Arc::clone(quotas), false)),
            drain_started: None,
            tls: tls.clone(),
            notify,
            accounting: accounting.clone(),
        };
        for (index, ((listeners, agent_events), state)) in listeners
            .into_iter()
            .zip(agent_receivers)
            .zip(thread_states)
            .enumerate()
        {
            let (control_tx, control) = mpsc::unbounded_channel();
            let report = ReportSlot::default();
            let core = (index, thread_count);
            let setup = eventloop::ThreadSetup {
                index,
                core: settings.core_config(
                    dev_user.as_ref(),
                    seed,
                    core,
                    quotas,
                    reservations,
                    bandwidth,
                ),
                reserved_sockets: this.reserved_sockets.clone(),
                settings: settings.clone(),
                listeners,
                own_addresses: own_addresses.clone(),
                tcp_limits: Arc::clone(&tcp_limits),
                tls: tls.clone(),
                state,
                store: Arc::clone(&store),
                agent: agent_tx.clone(),
                accounting: accounting.clone(),
                agent_events,
                control,
                report: report.clone(),
            };
            let ended_tx = ended_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("turn-thread-{index}"))
                .spawn(move || {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_thread(setup);
                    }));
                    let _ = ended_tx.send((index, outcome.is_err()));
                })
                .with_context(|| format!("starting event-loop thread {index}"))?;
            this.controls.push(control_tx);
            this.reports.push(report);
            this.threads.push(thread);
        }
        let agent = settings.agent.is_some();
        this.status = admin::Status::started(this.reports.clone(), Arc::clone(quotas), agent);
        Ok(this)
    }

    /// Until SIGTERM/SIGINT (or a thread's end), then the drain: the threads delete their
    /// allocations, the agent link sends the last removals.
    async fn run(&mut self, mut signals: Signals) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut handover = false;
        let failure = loop {
            tokio::select! {
                _ = signals.terminate.recv() => {
                    // With a state directory SIGTERM is a restart (systemctl restart, an
                    // upgrade): the allocations stay for the next process.
                    handover = self.settings.state_dir.is_some();
                    break None;
                }
                _ = signals.interrupt.recv() => break None,
                _ = signals.hangup.recv() => self.reload(),
                _ = signals.user1.recv() => {
                    if self.status.start_drain() {
                        tracing::info!(allocations = self.status.allocations(), "drain requested (SIGUSR1)");
                    }
                }
                () = self.status.drain_requested() => self.start_drain(),
                Ok(()) = self.host_addresses.changed() => self.own_addresses_changed(),
                _ = tick.tick() => {
                    self.publish();
                    if let Some(why) = self.drain_over() {
                        tracing::info!(why, "drain over");
                        break None;
                    }
                }
                ended = self.ended.recv() => {
                    let (index, panicked) = ended.unwrap_or((0, true));
                    let how = if panicked { "panicked" } else { "stopped" };
                    break Some(anyhow::anyhow!("event-loop thread {index} {how}; shutting down"));
                }
            }
        };
        if handover {
            tracing::info!(
                allocations = self.status.allocations(),
                "handing over: the allocations stay for the next process"
            );
        } else {
            tracing::info!("draining");
        }
        for control in &self.controls {
            let _ = control.send(if handover {
                Control::Handover
            } else {
                Control::Terminate
            });
        }
        for thread in self.threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.publish();
        if let Some(task) = self.agent_task.take()
            && tokio::time::timeout(AGENT_DRAIN, task).await.is_err()
        {
            tracing::warn!("xdp-agent did not take the last removals in time");
        }
        // The threads are gone, their last stop records with them into the sink.
        if let Some(sink) = self.accounting.take().and_then(Arc::into_inner) {
            tracing::info!(counts = ?sink.stats(), "accounting sink flushing");
            let left = tokio::task::spawn_blocking(move || sink.shutdown(ACCOUNTING_DRAIN))
                .await
                .unwrap_or_default();
            if left > 0 {
                tracing::warn!(
                    left,
                    "accounting records not delivered to the webhook before exit"
                );
            }
        }
        if let Some(notify) = &self.notify {
            // The last FDSTORE and FDSTOREREMOVE messages reach the manager before it sees
            // the process exit (sd_notify_barrier(3)).
            if let Err(error) = notify.barrier(Duration::from_secs(5)) {
                tracing::warn!(%error, "the service manager did not confirm the last socket changes");
            }
        }
        tracing::info!("drained, exiting");
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Serves the admin endpoints on `listener` (bound at start), if configured.
    fn serve_admin(&self, listener: Option<std::net::TcpListener>) {
        if let Some(listener) = listener {
            tokio::spawn(admin::serve(listener, Arc::clone(&self.status)));
        }
    }

    /// POST /drain or SIGUSR1 (once): every thread redirects new Allocates from now on.
    fn start_drain(&mut self) {
        if self.drain_started.is_some() {
            return;
        }
        self.drain_started = Some(std::time::Instant::now());
        for control in &self.controls {
            let _ = control.send(Control::Drain);
        }
        ::metrics::gauge!(metrics::name::DRAINING).set(1.0);
        ::metrics::gauge!(metrics::name::READY).set(0.0);
    }

    /// Why the drain is over, if it is: no allocation left, or `--drain-deadline` passed.
    fn drain_over(&self) -> Option<&'static str> {
        let started = self.drain_started?;
        if self.status.allocations() == 0 {
            return Some("no allocation left");
        }
        let deadline = Duration::from_secs(u64::from(self.settings.drain_deadline));
        (started.elapsed() >= deadline).then_some("drain deadline passed")
    }

    fn publish(&self) {
        use metrics::name;
        ::metrics::gauge!(name::THREADS).set(self.reports.len() as f64);
        ::metrics::gauge!(name::DRAINING).set(f64::from(u8::from(self.status.is_draining())));
        ::metrics::gauge!(name::READY).set(f64::from(u8::from(self.status.is_ready())));
        for (thread, slot) in self.reports.iter().enumerate() {
            let allocations = daemon::lock(slot).stats.allocations_active;
            ::metrics::gauge!(name::THREAD_ALLOCATIONS, "thread" => thread.to_string())
                .set(allocations as f64);
        }
        let mut total = threads::total(&self.reports);
        // A core counts a token it made until it learns that another core used it; the
        // shared ledger knows at once.
        total.stats.reservations_active = self.reservations.total() as u64;
        metrics::publish(&total.stats, &self.settings.realm);
        ::metrics::gauge!(metrics::name::TCP_CONNECTIONS).set(total.tcp_connections as f64);
        if let Some(tls) = &self.tls {
            tls.publish();
        }
        let relay_sockets = total.relay_sockets + self.reserved_sockets.count();
        ::metrics::gauge!(metrics::name::RELAY_SOCKETS).set(relay_sockets as f64);
    }

    /// The host's addresses changed: every core refuses the new set.
    fn own_addresses_changed(&mut self) {
        let addresses = host_addresses::with_configured(
            &self.settings,
            self.host_addresses.borrow_and_update().as_ref(),
        );
        tracing::debug!(?addresses, "host addresses changed");
        for control in &self.controls {
            let _ = control.send(Control::OwnAddresses(addresses.clone()));
        }
    }

    /// SIGHUP: the TLS certificate from its files; users, REST secrets and peer lists from the
    /// configuration file (flags and environment still win). Other keys need a restart.
    fn reload(&mut self) {
        use metrics::name;
        if let Some(tls) = &self.tls {
            tls.reload("SIGHUP");
        }
        let new = match Settings::load(&self.cli) {
            Ok(new) => new,
            Err(error) => {
                ::metrics::counter!(name::RELOADS, "result" => "error").increment(1);
                tracing::error!(%error, "reload failed; keeping the running configuration");
                return;
            }
        };
        if new.realm != self.settings.realm {
            tracing::warn!(running = %self.settings.realm, file = %new.realm, "a realm change needs a restart; keeping the running realm");
        }
        let restart_needed = Settings {
            users: self.settings.users.clone(),
            auth_secret: self.settings.auth_secret.clone(),
            allow_peer: self.settings.allow_peer.clone(),
            deny_peer: self.settings.deny_peer.clone(),
            alternate_server: self.settings.alternate_server.clone(),
            alternate_domain: self.settings.alternate_domain.clone(),
            realm: self.settings.realm.clone(),
            ..new.clone()
        } != self.settings;
        if restart_needed {
            tracing::warn!(
                "keys other than users, auth_secret, allow_peer, deny_peer, alternate_server and alternate_domain changed; they take effect on restart"
            );
        }
        self.settings.users = new.users;
        self.settings.auth_secret = new.auth_secret;
        self.settings.allow_peer = new.allow_peer;
        self.settings.deny_peer = new.deny_peer;
        self.settings.alternate_server = new.alternate_server;
        self.settings.alternate_domain = new.alternate_domain;
        let credentials = self.settings.credentials(self.dev_user.as_ref());
        for control in &self.controls {
            let _ = control.send(Control::Reload {
                credentials: credentials.clone(),
                allow_peer: self.settings.allow_peer.clone(),
                deny_peer: self.settings.deny_peer.clone(),
            });
            let _ = control.send(Control::Alternates(
                self.settings.alternate_server.clone(),
                self.settings.alternate_domain.clone(),
            ));
        }
        ::metrics::counter!(name::RELOADS, "result" => "ok").increment(1);
        tracing::info!(
            users = self.settings.users.len(),
            rest_secret = self.settings.auth_secret.is_some(),
            allow_peer = ?self.settings.allow_peer,
            deny_peer = ?self.settings.deny_peer,
            alternate_server = ?self.settings.alternate_server,
            "configuration reloaded"
        );
    }
}

/// Starts following the host's addresses, and waits for the first set a little: without
/// it the peer policy knows the configured addresses only, until it comes.
async fn follow_host_addresses() -> watch::Receiver<host_addresses::Learned> {
    let (updates, mut learned) = watch::channel(None);
    tokio::spawn(host_addresses::watch(updates));
    let first = tokio::time::timeout(HOST_ADDRESSES_WAIT, learned.wait_for(Option::is_some));
    if !matches!(first.await, Ok(Ok(_))) {
        tracing::warn!(
            "the host's addresses are not known yet; refusing the configured ones until they are"
        );
    }
    learned
}

/// The TCP connection limits of `settings`, shared by every thread.
/// Says that the relay is ready: in the log, and to the service manager (READY=1).
fn announce_ready(settings: &Settings, notify: Option<&daemon::fd_store::FdStore>) {
    tracing::info!(
        listen = ?settings.listen,
        tcp = settings.tcp,
        tls = settings.tls_cert.is_some(),
        tls_listen = ?settings.tls_listen,
        relay_ipv4 = ?settings.relay_ipv4,
        relay_ipv6 = ?settings.relay_ipv6,
        external_ipv4 = ?settings.external_ipv4,
        external_ipv6 = ?settings.external_ipv6,
        ports = %settings.ports,
        realm = %settings.realm,
        metrics = ?settings.metrics,
        admin = ?settings.admin,
        agent = ?settings.agent,
        threads = settings.threads,
        "relay ready"
    );
    if let Some(notify) = notify
        && let Err(error) = notify.notify("READY=1")
    {
        tracing::warn!(%error, "cannot tell the service manager that the relay is ready");
    }
}

/// With a state directory: the sockets the service manager passed back (sorted by use) and
/// the store to keep sockets in; without, neither.
fn take_inherited(
    settings: &Settings,
    notify: Option<&Arc<daemon::fd_store::FdStore>>,
) -> anyhow::Result<(handover::Inherited, Arc<handover::SocketStore>)> {
    let Some(dir) = &settings.state_dir else {
        return Ok(Default::default());
    };
    state::prepare(dir)?;
    // SAFETY: no other thread exists yet (the runtime starts later), so nothing else reads or
    // writes the environment, and nothing else owns the passed fds.
    let fds = unsafe { daemon::fd_store::inherited() }.context("$LISTEN_FDS")?;
    let store = handover::SocketStore::new(notify.cloned());
    let inherited = handover::Inherited::new(fds, &store);
    if inherited.len() > 0 {
        tracing::info!(
            sockets = inherited.len(),
            "sockets passed back by the service manager"
        );
    }
    Ok((inherited, Arc::new(store)))
}

/// A seed from the OS.
fn fresh_seed() -> anyhow::Result<[u8; 32]> {
    use rand::TryRng as _;
    let mut seed = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut seed)
        .context("seeding the random number generator from the OS")?;
    Ok(seed)
}

/// Per thread, with a state directory: its journal, what it held, and the relay sockets and
/// TCP connections of those allocations that the previous process left.
fn thread_states(
    settings: &Settings,
    inherited: &mut handover::Inherited,
) -> anyhow::Result<Vec<Option<eventloop::ThreadState>>> {
    let threads = settings.threads;
    let Some(dir) = &settings.state_dir else {
        return Ok((0..threads).map(|_| None).collect());
    };
    let mut states = Vec::with_capacity(threads);
    for index in 0..threads {
        let (journal, loaded) = state::ThreadJournal::open(dir, index, threads)?;
        let relays = inherited.take_relays(
            loaded
                .allocations
                .iter()
                .flat_map(|saved| saved.relays.iter().copied()),
        );
        let connections = inherited.take_connections(
            loaded
                .allocations
                .iter()
                .map(|saved| (saved.server, saved.client)),
        );
        states.push(Some(eventloop::ThreadState {
            journal,
            loaded,
            relays,
            connections,
        }));
    }
    Ok(states)
}

/// TURN over TLS if a certificate is configured: the certificate is loaded and checked here,
/// before anything starts, so that a fault stops the daemon with one line.
fn tls(settings: &Settings) -> anyhow::Result<Option<Arc<tls::Tls>>> {
    let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
        return Ok(None);
    };
    let files = tls::CertificateFiles {
        cert: cert.clone(),
        key: key.clone(),
    };
    let timeout = Duration::from_secs(u64::from(settings.tls_handshake_timeout_seconds));
    Ok(Some(
        tls::Tls::new(files, timeout).context("TLS certificate")?,
    ))
}

fn tcp_limits(settings: &Settings) -> Arc<tcp::Limits> {
    let total = settings.tcp_connections_max.map_or_else(
        || tcp::default_connections_max(config::DEFAULT_TCP_CONNECTIONS_MAX as usize),
        |max| max as usize,
    );
    tracing::info!(
        idle_unallocated_seconds = settings.tcp_idle_unallocated_seconds,
        per_source = settings.tcp_connections_per_source,
        total,
        "TCP connection limits"
    );
    tcp::Limits::new(
        Duration::from_secs(u64::from(settings.tcp_idle_unallocated_seconds)),
        settings.tcp_connections_per_source as usize,
        total,
    )
}

/// An event-loop thread: its own current-thread runtime running its event loop.
fn run_thread(setup: eventloop::ThreadSetup) {
    let index = setup.index;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(thread = index, %error, "starting the event loop's runtime");
            return;
        }
    };
    runtime.block_on(async move {
        match eventloop::Eventloop::new(setup) {
            Ok(eventloop) => eventloop.run().await,
            Err(error) => tracing::error!(thread = index, error = %format!("{error:#}"), "event loop failed to start"),
        }
    });
}

fn init_tracing(settings: &Settings) -> anyhow::Result<()> {
    daemon::init_logging(&settings.log_level, settings.log_format).context("log_level")
}

/// A random password for the development user.
fn dev_credential() -> anyhow::Result<User> {
    use rand::TryRng as _;
    let mut bytes = [0u8; 12];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .context("generating the development password")?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(User {
        name: config::DEV_USER.to_owned(),
        password,
    })
}

fn print_dev_banner(user: &User, settings: &Settings) {
    let listen = settings
        .listen
        .first()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let host = settings
        .listen
        .first()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let port = settings
        .listen
        .first()
        .map_or(config::DEFAULT_PORT, |a| a.port());
    let transports = match (settings.tcp, settings.tls_cert.is_some()) {
        (true, true) => "UDP, TCP and TLS",
        (true, false) => "UDP and TCP",
        (false, _) => "UDP",
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "turn-control development relay on {listen} ({transports}); loopback peers allowed"
    );
    let _ = writeln!(out, "  username: {}", user.name);
    let _ = writeln!(out, "  password: {}", user.password);
    let _ = writeln!(out, "  realm:    {}", settings.realm);
    if let Some(metrics) = settings.metrics {
        let _ = writeln!(out, "  metrics:  http://{metrics}/metrics");
    }
    let _ = writeln!(
        out,
        "  try:      turnutils_uclient -u {} -w {} -p {port} -y {host}",
        user.name, user.password
    );
    let _ = out.flush();
    tracing::info!(username = %user.name, password = %user.password, realm = %settings.realm, "development credential");
}

/// The first line of a clap error without its `error: ` prefix.
fn one_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}
