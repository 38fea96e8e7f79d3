//! The event loop of one event-loop thread (see [`crate::threads`]), with a current-thread
//! runtime of its own, so a packet is read, decided and sent without leaving the thread:
//! it owns a [`Server`], the thread's UDP sockets (its listener of each SO_REUSEPORT group and
//! one relay socket per allocation port), the single timer re-armed from
//! [`Server::poll_timeout`], its TCP connection tasks, and its ends of the channels to the
//! agent link and the main thread.
//!
//! UDP sockets sit in one edge-triggered `epoll` set (mio) whose descriptor tokio watches;
//! ready sockets are read [`udp::BATCH`] datagrams per `recvmmsg`, the core's transmits are
//! grouped by socket and written with `sendmmsg`. A relay socket that epoll reports in error
//! has its error queue read first: ICMP errors about what it sent, for its client. Nothing
//! here blocks.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use ipnet::IpNet;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use turn_control_core::{
    ClientAddr, Command, Config, Credentials, Family, FiveTuple, OffloadError, PeerAddr, RelayAddr,
    RestoreRefusal, Restored, SavedAllocation, Server, Transmit, Transport,
};

use crate::accounting::Sink;
use crate::agent::{AgentQueue, FromAgent, Lease, ToAgent};
use crate::config::Settings;
use crate::handover::{SocketStore, connection_name, relay_name};
use crate::metrics::name;
use crate::state::{Loaded, ThreadJournal};
use crate::tcp::{self, TcpEvent};
use crate::threads::{Control, Listeners, Report, ReportSlot, ReservedSocket, ReservedSockets};
use crate::tls::Tls;
use crate::udp::{self, RecvBatch};
use tokio::sync::watch;

/// Sockets whose batches are read per round before the loop looks at timers and channels
/// again.
const SOCKETS_PER_ROUND: usize = 64;
/// Events taken from epoll at once.
const EVENTS: usize = 1024;
/// Messages read from a relay socket's error queue per round, so that ICMP errors that keep
/// coming cannot hold the loop (the rest waits for the socket's next turn).
const ERRORS_PER_ROUND: usize = 32;
/// How often the wall clock is re-anchored (REST usernames, nonces follow NTP steps).
const WALL_CLOCK_EVERY: u64 = 60;
/// How long a hand-over waits for its kept TCP connections to stop and report.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum Role {
    Listener(SocketAddr),
    Relay(RelayAddr),
}

#[derive(Debug)]
struct UdpEntry {
    socket: Socket,
    role: Role,
    /// In [`Eventloop::ready`] already.
    queued: bool,
    /// epoll reported an error condition: a relay socket's error queue holds ICMP errors
    /// for [`Eventloop::read_errors`].
    errors: bool,
}

/// A TURN-over-TCP connection, by listener and client.
#[derive(Debug)]
struct TcpConn {
    /// Frames to write to the client.
    tx: mpsc::Sender<Vec<u8>>,
    /// Its socket is in the file-descriptor store: it outlives the process.
    kept: bool,
    /// Whether its 5-tuple has an allocation, for the connection's task (see
    /// [`TcpEvent::Opened`]).
    allocated: Arc<AtomicBool>,
}

enum Event {
    Control(Control),
    Timer,
    Tick,
    Tcp(TcpEvent),
    Agent(FromAgent),
    AgentSlot(mpsc::OwnedPermit<ToAgent>),
    Udp { poll: bool },
}

/// What an event-loop thread starts with.
#[derive(Debug)]
pub struct ThreadSetup {
    /// Its index among the threads.
    pub index: usize,
    /// The daemon's settings.
    pub settings: Settings,
    /// Its core's configuration (its port slice, the shared seed, quota ledger and
    /// reservation ledger).
    pub core: Config,
    /// The reserved ports' sockets, shared by every thread.
    pub reserved_sockets: ReservedSockets,
    /// Its socket of each listener group.
    pub listeners: Listeners,
    /// The host's addresses as learned at start ([`Control::OwnAddresses`] brings changes).
    pub own_addresses: Vec<IpAddr>,
    /// The TCP connection limits, shared by every thread.
    pub tcp_limits: Arc<tcp::Limits>,
    /// TURN over TLS on the TCP listeners, if a certificate is configured.
    pub tls: Option<Arc<Tls>>,
    /// The thread's journal and what it restores (`--state-dir`).
    pub state: Option<ThreadState>,
    /// The service manager's file-descriptor store for relay sockets (may be none).
    pub store: Arc<SocketStore>,
    /// Requests to the agent link, if an agent is configured.
    pub agent: Option<AgentQueue>,
    /// Where accounting records go (`--accounting-file`, `--accounting-webhook`), shared
    /// by every thread.
    pub accounting: Option<Arc<Sink>>,
    /// Answers and link events from the agent link.
    pub agent_events: mpsc::Receiver<FromAgent>,
    /// Messages from the main thread; closed means terminate.
    pub control: mpsc::UnboundedReceiver<Control>,
    /// Where it reports its counters.
    pub report: ReportSlot,
}

/// What a thread restores at start and journals afterwards (`--state-dir`).
#[derive(Debug)]
pub struct ThreadState {
    /// The thread's journal.
    pub journal: ThreadJournal,
    /// What it held.
    pub loaded: Loaded,
    /// The relay sockets of the thread's allocations that the previous process left in the
    /// store, by family and port.
    pub relays: HashMap<(Family, u16), Socket>,
    /// The TCP connections of the thread's allocations that the previous process left in
    /// the store, by listener and client.
    pub connections: HashMap<(SocketAddr, SocketAddr), Socket>,
}

/// The event loop. Build with [`Eventloop::new`] inside the thread's runtime, then
/// [`Eventloop::run`].
#[derive(Debug)]
pub struct Eventloop {
    index: usize,
    server: Server,
    settings: Settings,
    /// The epoll set of every UDP socket; tokio watches its descriptor.
    poll: AsyncFd<mio::Poll>,
    events: mio::Events,
    sockets: Vec<Option<UdpEntry>>,
    free_slots: Vec<usize>,
    listeners: HashMap<SocketAddr, usize>,
    relays: HashMap<(Family, u16), usize>,
    ready: VecDeque<usize>,
    recv: RecvBatch,
    out: Vec<(usize, SocketAddr, Vec<u8>)>,
    tcp_conns: HashMap<(SocketAddr, SocketAddr), TcpConn>,
    tcp_accept: Vec<JoinHandle<()>>,
    inbox_rx: mpsc::Receiver<TcpEvent>,
    agent: Option<AgentQueue>,
    accounting: Option<Arc<Sink>>,
    agent_rx: mpsc::Receiver<FromAgent>,
    /// The sync round whose part this thread owes the link, while the queue has no room
    /// for it: dropping it would leave the round incomplete and the agent unsynced.
    sync_part: Option<u64>,
    control: mpsc::UnboundedReceiver<Control>,
    report: ReportSlot,
    /// The reserved ports' sockets of every thread, kept unread until an allocation adopts
    /// them.
    reserved_sockets: ReservedSockets,
    /// The journal of this thread's allocations (`--state-dir`).
    journal: Option<ThreadJournal>,
    /// What the TCP connection tasks share.
    tcp: tcp::Shared,
    /// Tells kept TCP connections to stop for a hand-over.
    handover_tx: watch::Sender<bool>,
    /// Where relay sockets go to outlive the process.
    store: Arc<SocketStore>,
}

impl Eventloop {
    /// Registers the thread's sockets and builds its core.
    pub fn new(setup: ThreadSetup) -> anyhow::Result<Self> {
        let ThreadSetup {
            index,
            settings,
            core,
            listeners,
            own_addresses,
            tcp_limits,
            tls,
            state,
            store,
            agent,
            accounting,
            agent_events,
            control,
            report,
            reserved_sockets,
        } = setup;
        tracing::debug!(thread = index, ports = ?core.port_range, "event loop starting");
        let mut server = Server::new(core, Instant::now(), SystemTime::now())
            .context("protocol core configuration")?;
        server.set_own_addresses(own_addresses, settings.ports.range());
        let poll = mio::Poll::new().context("creating epoll instance")?;
        // SAFETY: the Poll owns its epoll descriptor and neither closes nor replaces it while
        // the AsyncFd holds it; dropping the AsyncFd deregisters before closing.
        let poll = unsafe { AsyncFd::register(poll) }.context("registering epoll with tokio")?;
        let (inbox_tx, inbox_rx) = mpsc::channel(4096);
        let (handover_tx, handover) = watch::channel(false);
        let tcp = tcp::Shared {
            inbox: inbox_tx.clone(),
            limits: Arc::clone(&tcp_limits),
            tls,
            // Without a journal nothing restores their allocations: no point keeping them.
            store: state
                .as_ref()
                .and(store.is_some().then(|| Arc::clone(&store))),
            handover,
        };
        let mut this = Self {
            index,
            server,
            poll,
            events: mio::Events::with_capacity(EVENTS),
            sockets: Vec::new(),
            free_slots: Vec::new(),
            listeners: HashMap::new(),
            relays: HashMap::new(),
            ready: VecDeque::new(),
            recv: RecvBatch::default(),
            out: Vec::new(),
            tcp_conns: HashMap::new(),
            tcp_accept: Vec::new(),
            inbox_rx,
            agent,
            accounting,
            agent_rx: agent_events,
            sync_part: None,
            control,
            report,
            reserved_sockets,
            settings,
            journal: None,
            store,
            tcp,
            handover_tx,
        };
        for (addr, socket) in listeners.udp {
            let slot = this
                .insert(socket, Role::Listener(addr))
                .with_context(|| format!("listen udp {addr}"))?;
            this.listeners.insert(addr, slot);
        }
        for (addr, listener) in listeners.tcp {
            let listener = tokio::net::TcpListener::from_std(listener)
                .with_context(|| format!("listen tcp {addr}"))?;
            let task = tokio::spawn(tcp::accept(listener, addr, this.tcp.clone()));
            this.tcp_accept.push(task);
        }
        if let Some(state) = state {
            this.restore(state);
        }
        Ok(this)
    }

    /// Brings back the allocations of the thread's journal whose relay sockets it holds again
    /// (passed back by the store, or bound anew on the same port), then rewrites the journal
    /// as what was restored. What cannot be restored ends as if it had expired: its channels
    /// are not in the first sync, so they leave the kernel too.
    fn restore(&mut self, state: ThreadState) {
        let ThreadState {
            mut journal,
            loaded,
            mut relays,
            mut connections,
        } = state;
        if let Some((reason, why)) = &loaded.discarded {
            tracing::warn!(thread = self.index, why, "the journal is not restored");
            metrics::counter!(name::RESTORE_DROPPED, "reason" => *reason).increment(1);
        }
        if loaded.torn_bytes > 0 {
            tracing::warn!(
                thread = self.index,
                bytes = loaded.torn_bytes,
                "the journal had a torn or damaged tail; restoring what came before it"
            );
        }
        let mut pending = loaded.pending;
        let mut tally = RestoreTally::default();
        for saved in &loaded.allocations {
            let key = (saved.server, saved.client);
            // A UDP allocation of the same addresses is no claim on a TCP connection.
            let connection = (saved.tuple().transport == Transport::Tcp)
                .then(|| connections.remove(&key))
                .flatten();
            let restored =
                self.restore_one(saved, &mut relays, connection, &mut pending, &mut tally);
            if let Err(reason) = restored {
                tracing::info!(client = %saved.client, reason, "saved allocation not restored");
                metrics::counter!(name::RESTORE_DROPPED, "reason" => reason).increment(1);
                // Its accounting ends here, with what was counted (the core does the same
                // for the allocations it refuses).
                if !refused_by_core(reason) {
                    self.server.saved_allocation_lost(Instant::now(), saved);
                }
            }
        }
        // Relay sockets and connections of allocations that were not restored.
        for (family, port) in relays.into_keys() {
            self.store.forget(&relay_name(family, port));
        }
        for (key, connection) in connections {
            self.forget_connection(key, Some(connection));
        }
        let log = !loaded.allocations.is_empty() || loaded.discarded.is_some();
        tally.publish(self.index, loaded.allocations.len(), log);
        self.server.track_changes();
        journal.compact(self.server.saved_allocations());
        self.journal = Some(journal);
    }

    /// Restores one saved allocation with its relay sockets (from `relays`, or bound anew)
    /// and, for TCP, its kept `connection` (with what was `pending` of its next frame); the
    /// `turn_restart_dropped_total` reason when it cannot be.
    fn restore_one(
        &mut self,
        saved: &SavedAllocation,
        relays: &mut HashMap<(Family, u16), Socket>,
        connection: Option<Socket>,
        pending: &mut HashMap<(SocketAddr, SocketAddr), Vec<u8>>,
        tally: &mut RestoreTally,
    ) -> Result<(), &'static str> {
        let key = (saved.server, saved.client);
        if saved.tuple().transport == Transport::Tcp && connection.is_none() {
            // Its connection closed with the previous process (a TLS one, or no store): the
            // client knows it gone.
            return Err("tcp_connection_closed");
        }
        let Some(sockets) = self.saved_relay_sockets(saved, relays, tally) else {
            self.forget_connection(key, connection);
            return Err("relay_port_unavailable");
        };
        let ports = self.settings.ports.range();
        let restored = match self.server.restore(Instant::now(), saved, &ports) {
            Ok(restored) => restored,
            Err(refusal) => {
                self.forget_relays(sockets.iter().map(|(relay, _)| *relay));
                self.forget_connection(key, connection);
                return Err(refusal_label(refusal));
            }
        };
        tally.add(restored);
        for (relay, (socket, in_store)) in sockets {
            if let Err(error) = self.read_relay_socket(relay, socket, in_store) {
                tracing::warn!(%relay, %error, "cannot read a restored relay socket");
            }
        }
        if let Some(connection) = connection {
            let bytes = pending.remove(&key).unwrap_or_default();
            let (local, client) = key;
            match tcp::resume(connection.into(), local, client, bytes, self.tcp.clone()) {
                Ok(()) => tally.tcp_kept += 1,
                Err(error) => {
                    tracing::warn!(%client, %error, "cannot resume a kept TCP connection");
                }
            }
        }
        Ok(())
    }

    /// The relay sockets of `saved`, each taken from `relays` (and marked as in the store) or
    /// bound anew on its port; `None`, with what was taken closed, if one cannot be had.
    fn saved_relay_sockets(
        &mut self,
        saved: &SavedAllocation,
        relays: &mut HashMap<(Family, u16), Socket>,
        tally: &mut RestoreTally,
    ) -> Option<Vec<(RelayAddr, (Socket, bool))>> {
        let mut sockets = Vec::with_capacity(saved.relays.len());
        for &relay in &saved.relays {
            let relay = RelayAddr(relay);
            let socket = match relays.remove(&(relay.family(), relay.0.port())) {
                Some(socket) => {
                    tally.kept += 1;
                    Ok((socket, true))
                }
                None => self
                    .open_relay_socket(relay, saved.dont_fragment)
                    .map(|socket| {
                        tally.rebound += 1;
                        (socket, false)
                    }),
            };
            match socket {
                Ok(socket) => sockets.push((relay, socket)),
                Err(error) => {
                    tracing::info!(%relay, %error, "relay port of a saved allocation unavailable");
                    self.forget_relays(sockets.iter().map(|(relay, _)| *relay));
                    return None;
                }
            }
        }
        Some(sockets)
    }

    /// Takes a kept TCP connection whose allocation is not restored out of the store; it
    /// closes with `connection`, and its client learns that its allocation is gone.
    fn forget_connection(
        &self,
        (local, client): (SocketAddr, SocketAddr),
        connection: Option<Socket>,
    ) {
        if connection.is_some() {
            self.store.forget(&connection_name(local, client));
        }
    }

    /// Takes the relay sockets of `relays` out of the store (they close with their values).
    fn forget_relays(&self, relays: impl Iterator<Item = RelayAddr>) {
        for relay in relays {
            self.store
                .forget(&relay_name(relay.family(), relay.0.port()));
        }
    }

    /// Journals what changed in the allocations since the last call; compacts the journal
    /// when it has grown enough.
    fn journal_changes(&mut self) {
        let Some(journal) = &mut self.journal else {
            return;
        };
        journal.append(self.server.take_changes());
        if journal.should_compact() {
            journal.compact(self.server.saved_allocations());
        }
    }

    /// Runs until the main thread says [`Control::Terminate`] (or goes away), then drains:
    /// stops listening, deletes every allocation (their channel removals reach the agent)
    /// and returns.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut ticks: u64 = 0;
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        // Sockets may have become readable before tokio watched the epoll descriptor.
        let mut first = true;

        let mut handover = false;
        loop {
            self.flush();
            let deadline = self.server.poll_timeout();
            if deadline != armed {
                if let Some(d) = deadline {
                    sleep.as_mut().reset(tokio::time::Instant::from_std(d));
                }
                armed = deadline;
            }
            let busy = !self.ready.is_empty() || first;
            first = false;
            let event = tokio::select! {
                control = self.control.recv() => Event::Control(control.unwrap_or(Control::Terminate)),
                () = &mut sleep, if armed.is_some() => Event::Timer,
                _ = tick.tick() => Event::Tick,
                Some(msg) = self.inbox_rx.recv() => Event::Tcp(msg),
                Some(ev) = self.agent_rx.recv() => Event::Agent(ev),
                permit = agent_slot(self.agent.as_ref()), if self.sync_part.is_some() => Event::AgentSlot(permit),
                guard = self.poll.readable() => {
                    if let Ok(mut guard) = guard {
                        // Cleared before draining: events after this point wake us again.
                        guard.clear_ready();
                    }
                    Event::Udp { poll: true }
                }
                () = std::future::ready(()), if busy => Event::Udp { poll: true },
            };
            match event {
                Event::Control(Control::Terminate) => break,
                Event::Control(Control::Handover) => {
                    handover = true;
                    break;
                }
                Event::Control(Control::Reload {
                    credentials,
                    allow_peer,
                    deny_peer,
                }) => self.reload(credentials, allow_peer, deny_peer),
                Event::Control(Control::Alternates(servers, domain)) => {
                    self.server.set_alternates(servers, domain);
                }
                Event::Control(Control::Drain) => {
                    tracing::debug!(
                        thread = self.index,
                        "draining: new allocations are redirected"
                    );
                    self.server.set_draining(true);
                }
                Event::Control(Control::OwnAddresses(addresses)) => self
                    .server
                    .set_own_addresses(addresses, self.settings.ports.range()),
                Event::Timer => self.server.handle_timeout(Instant::now()),
                Event::Tick => {
                    ticks += 1;
                    if ticks.is_multiple_of(WALL_CLOCK_EVERY) {
                        self.server
                            .set_wall_clock(Instant::now(), SystemTime::now());
                    }
                    self.refresh_tcp_allocations();
                    self.publish();
                }
                Event::Tcp(msg) => self.tcp_event(msg),
                Event::Agent(ev) => self.agent_event(ev),
                Event::AgentSlot(permit) => self.send_sync_part(permit),
                Event::Udp { poll } => {
                    if poll {
                        self.poll_sockets();
                    }
                    self.read_sockets();
                    // Let the runtime's other work in when we never wait.
                    tokio::task::consume_budget().await;
                }
            }
        }
        if handover {
            self.hand_over().await;
        } else {
            self.drain();
        }
    }

    fn insert(&mut self, socket: Socket, role: Role) -> std::io::Result<usize> {
        if let Role::Relay(relay) = role {
            // RFC 8656 §11.5: ICMP errors about what the relay sends go to its client. epoll
            // reports the error condition (EPOLLERR) whatever the interest registered.
            udp::set_recv_errors(&socket, relay.family() == Family::V6)?;
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.sockets.push(None);
            self.sockets.len() - 1
        });
        let fd = socket.as_raw_fd();
        if let Err(error) = self.poll.get_ref().registry().register(
            &mut SourceFd(&fd),
            Token(slot),
            Interest::READABLE,
        ) {
            self.free_slots.push(slot);
            return Err(error);
        }
        self.sockets[slot] = Some(UdpEntry {
            socket,
            role,
            queued: false,
            errors: false,
        });
        // Edge-triggered: anything that arrived before registration is read on this round.
        if let Some(Some(entry)) = self.sockets.get_mut(slot) {
            entry.queued = true;
            self.ready.push_back(slot);
        }
        Ok(slot)
    }

    fn remove(&mut self, slot: usize) {
        if let Some(entry) = self.sockets.get_mut(slot).and_then(Option::take) {
            let fd = entry.socket.as_raw_fd();
            let _ = self
                .poll
                .get_ref()
                .registry()
                .deregister(&mut SourceFd(&fd));
            self.free_slots.push(slot);
            // A stale entry in `ready` finds the slot empty (or reused: a spurious read).
        }
    }

    fn poll_sockets(&mut self) {
        loop {
            if let Err(error) = self
                .poll
                .get_mut()
                .poll(&mut self.events, Some(Duration::ZERO))
            {
                if error.kind() != std::io::ErrorKind::Interrupted {
                    tracing::warn!(%error, "epoll_wait failed");
                    return;
                }
                continue;
            }
            let mut count = 0;
            for event in &self.events {
                count += 1;
                if let Some(Some(entry)) = self.sockets.get_mut(event.token().0) {
                    entry.errors |= event.is_error();
                    if !entry.queued {
                        entry.queued = true;
                        self.ready.push_back(event.token().0);
                    }
                }
            }
            if count < EVENTS {
                return;
            }
        }
    }

    /// One batch from each of up to [`SOCKETS_PER_ROUND`] ready sockets, after the errors
    /// queued on it.
    fn read_sockets(&mut self) {
        let rounds = self.ready.len().min(SOCKETS_PER_ROUND);
        for _ in 0..rounds {
            let Some(slot) = self.ready.pop_front() else {
                break;
            };
            let errors_left = self.read_errors(slot);
            let Some(Some(entry)) = self.sockets.get(slot) else {
                continue;
            };
            let result = self.recv.recv(entry.socket.as_fd());
            let more = match result {
                Ok(n) => {
                    self.handle_batch(slot, n);
                    n == udp::BATCH
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => true,
                Err(error) => {
                    // The socket's pending error (an ICMP error, see `udp::set_recv_errors`),
                    // reported once: read on.
                    tracing::trace!(%error, "UDP receive error");
                    true
                }
            };
            if let Some(Some(entry)) = self.sockets.get_mut(slot) {
                if more || errors_left {
                    self.ready.push_back(slot);
                } else {
                    entry.queued = false;
                }
            }
        }
    }

    /// Hands the core the ICMP errors queued on the relay socket in `slot` (RFC 8656 §11.5),
    /// at most [`ERRORS_PER_ROUND`]; whether some may be left. Reading the queue also clears
    /// the socket's pending error (see [`udp::set_recv_errors`]).
    fn read_errors(&mut self, slot: usize) -> bool {
        let Some(Some(entry)) = self.sockets.get_mut(slot) else {
            return false;
        };
        // The core's view of the relayed address (the external one behind a 1:1 NAT).
        let Role::Relay(relay) = entry.role else {
            // A listener's error is pending only: its next read reports it.
            entry.errors = false;
            return false;
        };
        if !entry.errors {
            return false;
        }
        let now = Instant::now();
        let mut left = true;
        for _ in 0..ERRORS_PER_ROUND {
            match udp::recv_error(entry.socket.as_fd()) {
                Ok(Some(error)) => {
                    let peer = PeerAddr(error.destination);
                    self.server.handle_icmp(now, relay, peer, error.icmp);
                }
                Ok(None) => {}
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    if error.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::debug!(%relay, %error, "reading the error queue failed");
                    }
                    left = false;
                    break;
                }
            }
        }
        entry.errors = left;
        left
    }

    fn handle_batch(&mut self, slot: usize, n: usize) {
        let Some(Some(entry)) = self.sockets.get(slot) else {
            return;
        };
        let now = Instant::now();
        match entry.role {
            Role::Listener(local) => {
                for i in 0..n {
                    let Some((from, data)) = self.recv.datagram(i) else {
                        metrics::counter!(name::UDP_TRUNCATED).increment(1);
                        continue;
                    };
                    self.server
                        .handle_client(now, Transport::Udp, local, ClientAddr(from), data);
                }
            }
            Role::Relay(relay) => {
                for i in 0..n {
                    let Some((from, data)) = self.recv.datagram(i) else {
                        metrics::counter!(name::UDP_TRUNCATED).increment(1);
                        continue;
                    };
                    self.server.handle_peer(now, relay, PeerAddr(from), data);
                }
            }
        }
    }

    /// Carries out the core's commands and sends its transmits (the core holds back any
    /// response whose side effect is not confirmed, so the order does not matter).
    fn flush(&mut self) {
        self.commands();
        // Before any answer goes out: a client told of a change (an Allocate, a ChannelBind
        // success) must find it after a crash that comes right after.
        self.journal_changes();
        while let Some(transmit) = self.server.poll_transmit() {
            match transmit {
                Transmit::ToClient {
                    transport: Transport::Udp,
                    server,
                    client,
                    payload,
                } => match self.listeners.get(&server) {
                    Some(&slot) => self.out.push((slot, client.0, payload)),
                    None => tracing::trace!(%server, %client, "listener gone, dropping"),
                },
                Transmit::ToClient {
                    transport: Transport::Tcp,
                    server,
                    client,
                    payload,
                } => {
                    if let Some(conn) = self.tcp_conns.get(&(server, client.0))
                        && let Err(mpsc::error::TrySendError::Full(_)) = conn.tx.try_send(payload)
                    {
                        metrics::counter!(name::TCP_SEND_DROPS).increment(1);
                    }
                }
                Transmit::ToPeer {
                    relay,
                    peer,
                    payload,
                } => match self.relays.get(&(relay.family(), relay.0.port())) {
                    Some(&slot) => self.out.push((slot, peer.0, payload)),
                    None => tracing::trace!(%relay, %peer, "relay socket gone, dropping"),
                },
            }
        }
        self.send_out();
    }

    fn send_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        // Stable: datagrams of one socket keep their order.
        self.out.sort_by_key(|(slot, _, _)| *slot);
        let mut start = 0;
        while start < self.out.len() {
            let slot = self.out[start].0;
            let end = start
                + self.out[start..]
                    .iter()
                    .take_while(|(s, _, _)| *s == slot)
                    .count();
            if let Some(Some(entry)) = self.sockets.get(slot) {
                let batch = self.out[start..end]
                    .iter()
                    .map(|(_, dst, p)| (*dst, p.as_slice()));
                let outcome = udp::send_batch(entry.socket.as_fd(), batch);
                if outcome.dropped > 0 {
                    metrics::counter!(name::UDP_SEND_DROPS, "reason" => "buffer_full")
                        .increment(outcome.dropped as u64);
                }
                if outcome.failed > 0 {
                    metrics::counter!(name::UDP_SEND_DROPS, "reason" => "error")
                        .increment(outcome.failed as u64);
                }
            }
            start = end;
        }
        self.out.clear();
    }

    fn commands(&mut self) {
        while let Some(command) = self.server.poll_command() {
            match command {
                Command::BindRelayPort {
                    relay,
                    dont_fragment,
                } => self.bind_relay(relay, dont_fragment),
                Command::FreeRelayPort { relay } => self.free_relay(relay),
                Command::ReservePort {
                    relay,
                    dont_fragment,
                } => self.reserve_port(relay, dont_fragment),
                Command::AdoptReservedPort {
                    relay,
                    dont_fragment,
                } => self.adopt_reserved_port(relay, dont_fragment),
                Command::ReleaseReservedPort { relay } => self.release_reserved_port(relay),
                Command::InstallChannel {
                    binding,
                    expires,
                    limits,
                } => {
                    let lease = Lease {
                        binding,
                        expires,
                        limits,
                    };
                    let sent = self.server.data_plane_connected()
                        && self
                            .agent
                            .as_ref()
                            .is_some_and(|queue| queue.install(self.index, lease));
                    if !sent {
                        // No agent, or no room in the queue to it: relay in user space, and
                        // release the ChannelBind success now rather than after the offload
                        // timeout.
                        self.server.channel_installed(
                            Instant::now(),
                            &binding,
                            Err(OffloadError::Unavailable),
                        );
                    }
                }
                Command::RemoveChannel { binding } => {
                    let now = Instant::now();
                    match &self.agent {
                        Some(queue) if self.server.data_plane_connected() => {
                            queue.remove(self.index, binding)
                        }
                        // Not connected: the full sync on reconnect leaves the binding out,
                        // and its last figures in the kernel are out of reach.
                        Some(_) => self.server.channel_removed(now, &binding, None),
                        // No data plane at all: nothing was ever counted in a kernel.
                        None => {
                            self.server
                                .channel_removed(now, &binding, Some(Default::default()))
                        }
                    }
                }
                Command::Account { record } => {
                    if let Some(sink) = &self.accounting {
                        sink.submit(&record);
                    }
                }
            }
        }
    }

    fn bind_ip(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.settings.relay_ipv4.map(IpAddr::V4),
            Family::V6 => self.settings.relay_ipv6.map(IpAddr::V6),
        }
    }

    /// Opens the relay socket of `relay` and reads it on this thread. Answers the core either
    /// way: [`Server::relay_bound`] releases the Allocate success.
    fn bind_relay(&mut self, relay: RelayAddr, dont_fragment: bool) {
        let result = self
            .open_relay_socket(relay, dont_fragment)
            .and_then(|socket| self.read_relay_socket(relay, socket, false));
        self.answer_bind(relay, result);
    }

    /// Opens the socket of the reserved port `relay` and keeps it aside, unread, for whichever
    /// thread gets the Allocate with its token. Answers the core as for a relay socket.
    fn reserve_port(&mut self, relay: RelayAddr, dont_fragment: bool) {
        let result = self.open_relay_socket(relay, dont_fragment).map(|socket| {
            let socket = ReservedSocket {
                socket,
                dont_fragment,
            };
            self.reserved_sockets.keep(relay, socket);
        });
        self.answer_bind(relay, result);
    }

    /// An allocation of this thread's core took the reserved port `relay` (reserved by any
    /// thread's core): reads the socket kept for it, with DONT-FRAGMENT set or cleared as the
    /// allocation asks. If none is kept (its reservation ended and closed it meanwhile), the
    /// port is bound afresh; if that fails too, the core answers the client 508.
    fn adopt_reserved_port(&mut self, relay: RelayAddr, dont_fragment: bool) {
        let ipv6 = relay.family() == Family::V6;
        let socket = match self.reserved_sockets.take(relay) {
            Some(kept) if kept.dont_fragment == dont_fragment => Ok(kept.socket),
            Some(kept) => if dont_fragment {
                udp::set_dont_fragment(&kept.socket, ipv6)
            } else {
                udp::clear_dont_fragment(&kept.socket, ipv6)
            }
            .map(|()| kept.socket),
            None => {
                tracing::debug!(%relay, "reserved socket gone; binding the port afresh");
                self.open_relay_socket(relay, dont_fragment)
            }
        };
        let result = socket.and_then(|socket| self.read_relay_socket(relay, socket, false));
        self.answer_bind(relay, result);
    }

    /// The reservation of `relay` ended unused, or moved: its kept socket closes.
    fn release_reserved_port(&mut self, relay: RelayAddr) {
        if self.reserved_sockets.take(relay).is_some() {
            tracing::debug!(%relay, "reserved socket closed");
        }
    }

    /// Opens a socket on the relay address of `relay`'s family and its port (the address
    /// differs from `relay` behind a 1:1 NAT, where `relay` carries the external address).
    /// With `dont_fragment`, its datagrams to peers are never fragmented
    /// ([`udp::set_dont_fragment`]). A port that any other socket holds (another thread's
    /// allocation on a port reserved here before, or another process) fails with EADDRINUSE:
    /// relay sockets never share a port (no SO_REUSEPORT).
    fn open_relay_socket(&self, relay: RelayAddr, dont_fragment: bool) -> std::io::Result<Socket> {
        let ip = self
            .bind_ip(relay.family())
            .ok_or_else(|| std::io::Error::other("no relay address of this family"))?;
        let socket = udp::bind(
            SocketAddr::new(ip, relay.0.port()),
            self.settings.relay_buffer_bytes,
            false,
        )?;
        if dont_fragment {
            udp::set_dont_fragment(&socket, ip.is_ipv6())?;
        }
        Ok(socket)
    }

    /// Reads `socket` on this thread as the relay socket of `relay`, and puts it into the
    /// store unless it is there already (`in_store`: passed back by it).
    fn read_relay_socket(
        &mut self,
        relay: RelayAddr,
        socket: Socket,
        in_store: bool,
    ) -> std::io::Result<()> {
        if !in_store {
            self.store
                .keep(&relay_name(relay.family(), relay.0.port()), &socket);
        }
        let slot = self.insert(socket, Role::Relay(relay))?;
        if let Some(old) = self.relays.insert((relay.family(), relay.0.port()), slot) {
            self.remove(old);
        }
        Ok(())
    }

    /// Tells the core whether the socket of `relay` is ready: the allocation's success goes
    /// out, or it moves to another port.
    fn answer_bind(&mut self, relay: RelayAddr, result: std::io::Result<()>) {
        match result {
            Ok(()) => {
                tracing::debug!(%relay, "relay socket bound");
                self.server.relay_bound(Instant::now(), relay);
            }
            Err(error) => {
                metrics::counter!(name::RELAY_BIND_FAILURES).increment(1);
                tracing::info!(%relay, %error, "relay port bind failed; the allocation moves to another port or is refused");
                self.server.relay_bind_failed(relay);
            }
        }
    }

    fn free_relay(&mut self, relay: RelayAddr) {
        let port = relay.0.port();
        let Some(slot) = self.relays.remove(&(relay.family(), port)) else {
            // Never bound (its bind failed): nothing was counted for it either.
            return;
        };
        self.remove(slot);
        self.store.forget(&relay_name(relay.family(), port));
        tracing::debug!(%relay, "relay socket closed");
    }

    fn tcp_event(&mut self, msg: TcpEvent) {
        match msg {
            TcpEvent::Opened {
                local,
                client,
                tx,
                allocated,
                kept,
            } => {
                self.tcp_conns.insert(
                    (local, client),
                    TcpConn {
                        tx,
                        kept,
                        allocated,
                    },
                );
            }
            // Only while handing over, which waits for these itself.
            TcpEvent::HandedOver { .. } | TcpEvent::Stopped { .. } => {}
            TcpEvent::Frame {
                local,
                client,
                frame,
            } => {
                let now = Instant::now();
                self.server
                    .handle_client(now, Transport::Tcp, local, ClientAddr(client), &frame);
                // An Allocate or a Refresh may have changed what the connection holds.
                if let Some(conn) = self.tcp_conns.get(&(local, client)) {
                    let allocated = self.server.has_allocation(&tcp_tuple(local, client));
                    conn.allocated.store(allocated, Ordering::Relaxed);
                }
            }
            TcpEvent::Closed { local, client } => {
                self.tcp_conns.remove(&(local, client));
                // RFC 8656 §7: the allocation of a TCP 5-tuple ends with its connection.
                self.server
                    .handle_client_closed(Transport::Tcp, local, ClientAddr(client));
            }
        }
    }

    /// Allocations of TCP connections also end without a frame (they expire, or their relay
    /// socket could not be bound): the connections that had one learn it within a tick.
    fn refresh_tcp_allocations(&self) {
        for (&(local, client), conn) in &self.tcp_conns {
            if conn.allocated.load(Ordering::Relaxed)
                && !self.server.has_allocation(&tcp_tuple(local, client))
            {
                conn.allocated.store(false, Ordering::Relaxed);
            }
        }
    }

    fn agent_event(&mut self, event: FromAgent) {
        match event {
            FromAgent::Installed(binding, result) => {
                self.server
                    .channel_installed(Instant::now(), &binding, result);
            }
            FromAgent::Removed(binding, usage) => {
                self.server.channel_removed(Instant::now(), &binding, usage);
            }
            FromAgent::Usage(bindings) => {
                let now = Instant::now();
                for (binding, usage) in bindings {
                    self.server.kernel_usage(now, &binding, usage);
                }
            }
            FromAgent::Connected { round } => {
                self.sync_part = Some(round);
                match self.agent.as_ref().and_then(AgentQueue::try_slot) {
                    Some(permit) => self.send_sync_part(permit),
                    None => tracing::debug!(
                        thread = self.index,
                        round,
                        "agent queue full; the sync part waits for room"
                    ),
                }
                // Channels bound while the link was down go to the kernel now, as installs
                // that the link sends once this round's Sync is through.
                self.server.set_data_plane_connected(Instant::now(), true);
            }
            FromAgent::Disconnected => {
                // The round after the reconnect asks again.
                self.sync_part = None;
                self.server.set_data_plane_connected(Instant::now(), false);
            }
        }
    }

    /// The part this thread owes for a sync round: its bindings as they are now (so also
    /// without any whose removal was dropped meanwhile), through `permit`.
    fn send_sync_part(&mut self, permit: mpsc::OwnedPermit<ToAgent>) {
        let Some(round) = self.sync_part.take() else {
            return;
        };
        let leases: Vec<_> = self
            .server
            .channel_bindings()
            .filter(|(binding, _)| binding.transport == Transport::Udp)
            .map(|(binding, expires)| Lease {
                binding,
                expires,
                limits: self.server.channel_limits(&binding),
            })
            .collect();
        permit.send(ToAgent::Sync {
            thread: self.index,
            round,
            leases,
        });
    }

    /// SIGHUP (validated by the main thread): users, REST secrets and peer lists.
    fn reload(&mut self, credentials: Credentials, allow_peer: Vec<IpNet>, deny_peer: Vec<IpNet>) {
        if let Err(error) = self.server.set_credentials(credentials) {
            tracing::error!(thread = self.index, %error, "reload refused; keeping the running credentials");
        }
        self.server.set_peer_lists(allow_peer, deny_peer);
    }

    fn publish(&self) {
        let mut report = daemon::lock(&self.report);
        *report = Report {
            stats: self.server.stats().clone(),
            tcp_connections: self.tcp_conns.len(),
            relay_sockets: self.relays.len(),
            published: Some(Instant::now()),
            agent_connected: self.server.data_plane_connected(),
        };
    }

    /// Stops for a restart: the allocations stay as journaled, their relay sockets in the
    /// store and their channels in the kernel, for the next process. Kept TCP connections
    /// stop where they are and report what they had read of their next frame, which the
    /// journal carries over; the allocations of the other TCP connections (TLS, or without a
    /// store) end, as their connections do.
    async fn hand_over(&mut self) {
        for task in self.tcp_accept.drain(..) {
            task.abort();
        }
        let (kept, ended): (Vec<_>, Vec<_>) = self
            .tcp_conns
            .iter()
            .map(|(&key, conn)| (key, conn.kept))
            .partition(|(_, kept)| *kept);
        for ((local, client), _) in ended {
            self.server
                .handle_client_closed(Transport::Tcp, local, ClientAddr(client));
        }
        let _ = self.handover_tx.send(true);
        // First every kept connection stops reading (its frames read until then are handled
        // here, their answers queued to it); then its queue closes, and it writes what is
        // queued before it stops.
        let kept: std::collections::HashSet<(SocketAddr, SocketAddr)> =
            kept.into_iter().map(|(key, _)| key).collect();
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        let mut reading = kept.clone();
        let mut pending = Vec::new();
        while !reading.is_empty() {
            match tokio::time::timeout_at(deadline, self.inbox_rx.recv()).await {
                Ok(Some(TcpEvent::HandedOver {
                    local,
                    client,
                    pending: bytes,
                })) => {
                    reading.remove(&(local, client));
                    pending.push(((local, client), bytes));
                }
                Ok(Some(TcpEvent::Closed { local, client })) => {
                    reading.remove(&(local, client));
                    self.tcp_event(TcpEvent::Closed { local, client });
                }
                Ok(Some(event)) => self.tcp_event(event),
                Ok(None) | Err(_) => break,
            }
            self.flush();
        }
        self.flush();
        let writing = kept.len() - reading.len();
        self.tcp_conns.clear();
        let mut stopped = 0;
        while stopped < writing {
            match tokio::time::timeout_at(deadline, self.inbox_rx.recv()).await {
                Ok(Some(TcpEvent::Stopped { local, client })) => {
                    tracing::trace!(%local, %client, "TCP connection left to the next process");
                    stopped += 1;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if !reading.is_empty() || stopped < writing {
            tracing::warn!(
                thread = self.index,
                connections = kept.len() - stopped,
                "TCP connections did not stop in time; part of their streams may be lost"
            );
        }
        self.flush();
        if let Some(journal) = &mut self.journal {
            journal.append_pending(pending);
        }
        tracing::debug!(
            thread = self.index,
            allocations = self.server.allocation_count(),
            "handed over"
        );
        self.publish();
        self.agent = None;
    }

    fn drain(&mut self) {
        tracing::debug!(
            thread = self.index,
            allocations = self.server.allocation_count(),
            "draining"
        );
        for task in self.tcp_accept.drain(..) {
            task.abort();
        }
        let listeners: Vec<usize> = self.listeners.drain().map(|(_, slot)| slot).collect();
        for slot in listeners {
            self.remove(slot);
        }
        // Kept connections leave the store now: their tasks do not run again once the loop
        // returns, and the clients must see their connections end with the relay.
        for (&(local, client), conn) in &self.tcp_conns {
            if conn.kept {
                self.store.forget(&connection_name(local, client));
            }
        }
        // Every allocation ends: its channels leave the kernel, its sockets close.
        self.server.shutdown();
        self.flush();
        self.tcp_conns.clear();
        self.publish();
        // The agent link ends once every thread dropped its sender.
        self.agent = None;
    }
}

/// The 5-tuple of the TCP connection from `client` to the listener `local`.
fn tcp_tuple(local: SocketAddr, client: SocketAddr) -> FiveTuple {
    FiveTuple {
        client: ClientAddr(client),
        server: local,
        transport: Transport::Tcp,
    }
}

/// Room in the queue to the agent link; never ready without an agent.
async fn agent_slot(agent: Option<&AgentQueue>) -> mpsc::OwnedPermit<ToAgent> {
    match agent {
        Some(queue) => queue.slot().await,
        None => std::future::pending().await,
    }
}

/// What a thread's start restored, for [`name::RESTORED`] and the log.
#[derive(Debug, Default)]
struct RestoreTally {
    allocations: u64,
    core: Restored,
    kept: u64,
    rebound: u64,
    tcp_kept: u64,
}

impl RestoreTally {
    fn add(&mut self, restored: Restored) {
        self.allocations += 1;
        self.core.permissions += restored.permissions;
        self.core.channels += restored.channels;
        self.core.in_kernel += restored.in_kernel;
    }

    /// Counts it, and logs it if `log`; `saved` allocations were in the journal.
    fn publish(&self, thread: usize, saved: usize, log: bool) {
        for (what, count) in [
            ("allocations", self.allocations),
            ("permissions", self.core.permissions as u64),
            ("channels", self.core.channels as u64),
            ("kernel_channels", self.core.in_kernel as u64),
            ("relay_sockets_kept", self.kept),
            ("relay_sockets_rebound", self.rebound),
            ("tcp_connections_kept", self.tcp_kept),
        ] {
            metrics::counter!(name::RESTORED, "what" => what).increment(count);
        }
        if !log {
            return;
        }
        tracing::info!(
            thread,
            saved,
            allocations = self.allocations,
            permissions = self.core.permissions,
            channels = self.core.channels,
            kernel_channels = self.core.in_kernel,
            relay_sockets_kept = self.kept,
            relay_sockets_rebound = self.rebound,
            tcp_connections_kept = self.tcp_kept,
            "allocations restored"
        );
    }
}

/// Whether a restore's `reason` is the core's refusal, which has ended the allocation's
/// accounting already, rather than the daemon's (a socket or connection that is gone).
fn refused_by_core(reason: &str) -> bool {
    !matches!(reason, "tcp_connection_closed" | "relay_port_unavailable")
}

/// The `reason` label of [`name::RESTORE_DROPPED`] for a refusal of the core.
fn refusal_label(refusal: RestoreRefusal) -> &'static str {
    match refusal {
        RestoreRefusal::Expired => "expired",
        RestoreRefusal::PortOutOfRange => "port_out_of_range",
        RestoreRefusal::RelayAddressChanged => "relay_address_changed",
        RestoreRefusal::ListenerRemoved => "listener_removed",
        RestoreRefusal::PortTaken => "port_taken",
        RestoreRefusal::MalformedKey => "malformed_key",
    }
}
