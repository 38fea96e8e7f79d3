//! One shard's event loop (see [`crate::shards`]), on a thread of its own with a
//! current-thread runtime, so a packet is read, decided and sent without leaving the thread:
//! it owns a [`Server`], the shard's UDP sockets (its listener of each SO_REUSEPORT group and
//! one relay socket per allocation port), the single timer re-armed from
//! [`Server::poll_timeout`], its TCP connection tasks, and its ends of the channels to the
//! agent link and the main thread.
//!
//! UDP sockets sit in one edge-triggered `epoll` set (mio) whose descriptor tokio watches;
//! ready sockets are read [`udp::BATCH`] datagrams per `recvmmsg`, the core's transmits are
//! grouped by socket and written with `sendmmsg`. Nothing here blocks.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use ipnet::IpNet;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use turn_core::{
    ClientAddr, Command, Config, Credentials, Family, FiveTuple, OffloadError, PeerAddr,
    QuotaLedger, RelayAddr, Server, Transmit, Transport,
};

use crate::agent::{FromAgent, ToAgent};
use crate::config::{Settings, User};
use crate::metrics::name;
use crate::shards::{Control, Listeners, Report, ReportSlot};
use crate::udp::{self, RecvBatch};

/// Messages from the TCP connection tasks.
#[derive(Debug)]
pub enum TcpEvent {
    /// A client connected; frames for it go to `tx`.
    Opened {
        /// The listener.
        local: SocketAddr,
        /// The client.
        client: SocketAddr,
        /// Frames to write to the client.
        tx: mpsc::Sender<Vec<u8>>,
    },
    /// One STUN or ChannelData frame from a client.
    Frame {
        /// The listener.
        local: SocketAddr,
        /// The client.
        client: SocketAddr,
        /// The frame.
        frame: Vec<u8>,
    },
    /// A client's connection ended.
    Closed {
        /// The listener.
        local: SocketAddr,
        /// The client.
        client: SocketAddr,
    },
}

/// Sockets whose batches are read per round before the loop looks at timers and channels
/// again.
const SOCKETS_PER_ROUND: usize = 64;
/// Events taken from epoll at once.
const EVENTS: usize = 1024;
/// How often the wall clock is re-anchored (REST usernames, nonces follow NTP steps).
const WALL_CLOCK_EVERY: u64 = 60;

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
}

enum Event {
    Control(Control),
    Timer,
    Tick,
    Tcp(TcpEvent),
    Agent(FromAgent),
    Udp { poll: bool },
}

/// What a shard starts with.
#[derive(Debug)]
pub struct Shard {
    /// Its index among the shards.
    pub index: usize,
    /// The daemon's settings.
    pub settings: Settings,
    /// Its core's configuration (its port slice, the shared seed and quota ledger).
    pub core: Config,
    /// Its socket of each listener group.
    pub listeners: Listeners,
    /// Requests to the agent link, if an agent is configured.
    pub agent: Option<mpsc::Sender<ToAgent>>,
    /// Answers and link events from the agent link.
    pub agent_events: mpsc::Receiver<FromAgent>,
    /// Messages from the main thread; closed means terminate.
    pub control: mpsc::UnboundedReceiver<Control>,
    /// Where it reports its counters.
    pub report: ReportSlot,
}

/// The event loop. Build with [`Eventloop::new`] inside the shard's runtime, then
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
    tcp_conns: HashMap<(SocketAddr, SocketAddr), mpsc::Sender<Vec<u8>>>,
    tcp_accept: Vec<JoinHandle<()>>,
    /// The 5-tuple of each allocation port and how many relay sockets it holds (two for a
    /// dual-stack allocation), for the shutdown drain.
    allocations: HashMap<u16, (FiveTuple, u8)>,
    inbox_rx: mpsc::Receiver<TcpEvent>,
    inbox_tx: mpsc::Sender<TcpEvent>,
    agent: Option<mpsc::Sender<ToAgent>>,
    agent_rx: mpsc::Receiver<FromAgent>,
    agent_connected: bool,
    control: mpsc::UnboundedReceiver<Control>,
    report: ReportSlot,
}

impl Eventloop {
    /// Registers the shard's sockets and builds its core.
    pub fn new(shard: Shard) -> anyhow::Result<Self> {
        let Shard {
            index,
            settings,
            core,
            listeners,
            agent,
            agent_events,
            control,
            report,
        } = shard;
        tracing::debug!(shard = index, ports = ?core.port_range, "event loop starting");
        let server = Server::new(core, Instant::now(), SystemTime::now())
            .context("protocol core configuration")?;
        let poll = mio::Poll::new().context("creating epoll instance")?;
        // SAFETY: the Poll owns its epoll descriptor and neither closes nor replaces it while
        // the AsyncFd holds it; dropping the AsyncFd deregisters before closing.
        let poll = unsafe { AsyncFd::register(poll) }.context("registering epoll with tokio")?;
        let (inbox_tx, inbox_rx) = mpsc::channel(4096);
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
            allocations: HashMap::new(),
            inbox_rx,
            inbox_tx,
            agent,
            agent_rx: agent_events,
            agent_connected: false,
            control,
            report,
            settings,
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
            let task = tokio::spawn(crate::tcp::accept(listener, addr, this.inbox_tx.clone()));
            this.tcp_accept.push(task);
        }
        Ok(this)
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
                Event::Control(Control::Reload {
                    credentials,
                    allow_peer,
                    deny_peer,
                }) => self.reload(credentials, allow_peer, deny_peer),
                Event::Timer => self.server.handle_timeout(Instant::now()),
                Event::Tick => {
                    ticks += 1;
                    if ticks.is_multiple_of(WALL_CLOCK_EVERY) {
                        self.server
                            .set_wall_clock(Instant::now(), SystemTime::now());
                    }
                    self.publish();
                }
                Event::Tcp(msg) => self.tcp_event(msg),
                Event::Agent(ev) => self.agent_event(ev),
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
        self.drain();
    }

    fn insert(&mut self, socket: Socket, role: Role) -> std::io::Result<usize> {
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
                if let Some(Some(entry)) = self.sockets.get_mut(event.token().0)
                    && !entry.queued
                {
                    entry.queued = true;
                    self.ready.push_back(event.token().0);
                }
            }
            if count < EVENTS {
                return;
            }
        }
    }

    /// One batch from each of up to [`SOCKETS_PER_ROUND`] ready sockets.
    fn read_sockets(&mut self) {
        let rounds = self.ready.len().min(SOCKETS_PER_ROUND);
        for _ in 0..rounds {
            let Some(slot) = self.ready.pop_front() else {
                break;
            };
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
                    // ICMP errors queued on the socket and the like: read on.
                    tracing::debug!(%error, "UDP receive error");
                    true
                }
            };
            if let Some(Some(entry)) = self.sockets.get_mut(slot) {
                if more {
                    self.ready.push_back(slot);
                } else {
                    entry.queued = false;
                }
            }
        }
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
                    // Drained per input: a BindRelayPort belongs to this client's 5-tuple.
                    let tuple = FiveTuple {
                        client: ClientAddr(from),
                        server: local,
                        transport: Transport::Udp,
                    };
                    self.commands(Some(tuple));
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

    /// Carries out the core's commands, then sends its transmits (the poll order of
    /// [`Server`]).
    fn flush(&mut self) {
        self.commands(None);
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
                    if let Some(tx) = self.tcp_conns.get(&(server, client.0))
                        && let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(payload)
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

    fn commands(&mut self, tuple: Option<FiveTuple>) {
        while let Some(command) = self.server.poll_command() {
            match command {
                Command::BindRelayPort { relay } => self.bind_relay(relay, tuple),
                Command::FreeRelayPort { relay } => self.free_relay(relay),
                Command::InstallChannel { binding } => {
                    let request = ToAgent::Install {
                        shard: self.index,
                        binding,
                    };
                    let sent = self.agent_connected
                        && self
                            .agent
                            .as_ref()
                            .is_some_and(|tx| tx.try_send(request).is_ok());
                    if !sent {
                        // No agent: relay in user space, and release the ChannelBind
                        // success now rather than after the offload timeout.
                        self.server.channel_installed(
                            Instant::now(),
                            &binding,
                            Err(OffloadError::Unavailable),
                        );
                    }
                }
                Command::RemoveChannel { binding } => {
                    if self.agent_connected
                        && let Some(tx) = &self.agent
                        && tx.try_send(ToAgent::Remove(binding)).is_err()
                    {
                        tracing::warn!(%binding, "agent queue full, removal dropped (next full sync repairs it)");
                    }
                }
            }
        }
    }

    fn bind_ip(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.settings.relay_v4.map(IpAddr::V4),
            Family::V6 => self.settings.relay_v6.map(IpAddr::V6),
        }
    }

    /// Opens the relay socket of `relay` on the relay address of its family (which differs
    /// from `relay` behind a 1:1 NAT, where `relay` carries the external address).
    fn bind_relay(&mut self, relay: RelayAddr, tuple: Option<FiveTuple>) {
        let family = relay.family();
        let port = relay.0.port();
        let result = self
            .bind_ip(family)
            .ok_or_else(|| std::io::Error::other("no relay address of this family"))
            .and_then(|ip| {
                udp::bind(
                    SocketAddr::new(ip, port),
                    self.settings.relay_buffer_bytes,
                    false,
                )
            })
            .and_then(|socket| self.insert(socket, Role::Relay(relay)));
        match result {
            Ok(slot) => {
                if let Some(old) = self.relays.insert((family, port), slot) {
                    self.remove(old);
                }
                if let Some(tuple) = tuple {
                    self.allocations.entry(port).or_insert((tuple, 0)).1 += 1;
                }
                tracing::debug!(%relay, "relay socket bound");
            }
            Err(error) => {
                metrics::counter!(name::RELAY_BIND_FAILURES).increment(1);
                tracing::info!(%relay, %error, "relay port bind failed; the allocation moves to another port");
                self.server.relay_bind_failed(Instant::now(), relay);
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
        tracing::debug!(%relay, "relay socket closed");
        if let Some(entry) = self.allocations.get_mut(&port) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                self.allocations.remove(&port);
            }
        }
    }

    fn tcp_event(&mut self, msg: TcpEvent) {
        match msg {
            TcpEvent::Opened { local, client, tx } => {
                self.tcp_conns.insert((local, client), tx);
            }
            TcpEvent::Frame {
                local,
                client,
                frame,
            } => {
                let now = Instant::now();
                self.server
                    .handle_client(now, Transport::Tcp, local, ClientAddr(client), &frame);
                self.commands(Some(FiveTuple {
                    client: ClientAddr(client),
                    server: local,
                    transport: Transport::Tcp,
                }));
            }
            TcpEvent::Closed { local, client } => {
                self.tcp_conns.remove(&(local, client));
                // RFC 8656 §7: the allocation of a TCP 5-tuple ends with its connection.
                self.server
                    .handle_client_closed(Transport::Tcp, local, ClientAddr(client));
            }
        }
    }

    fn agent_event(&mut self, event: FromAgent) {
        match event {
            FromAgent::Installed(binding, result) => {
                self.server
                    .channel_installed(Instant::now(), &binding, result);
            }
            FromAgent::Connected { round } => {
                self.agent_connected = true;
                let bindings: Vec<_> = self
                    .server
                    .channel_bindings()
                    .filter(|b| b.transport == Transport::Udp)
                    .collect();
                let part = ToAgent::Sync {
                    shard: self.index,
                    round,
                    bindings,
                };
                if let Some(tx) = &self.agent
                    && tx.try_send(part).is_err()
                {
                    tracing::warn!("agent queue full, full sync dropped");
                }
            }
            FromAgent::Disconnected => self.agent_connected = false,
        }
    }

    /// SIGHUP (validated by the main thread): users, REST secrets and peer lists.
    fn reload(&mut self, credentials: Credentials, allow_peer: Vec<IpNet>, deny_peer: Vec<IpNet>) {
        if let Err(error) = self.server.set_credentials(credentials) {
            tracing::error!(shard = self.index, %error, "reload refused; keeping the running credentials");
        }
        self.server.set_peer_lists(allow_peer, deny_peer);
    }

    fn publish(&self) {
        let mut report = self
            .report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *report = Report {
            stats: self.server.stats().clone(),
            tcp_connections: self.tcp_conns.len(),
            relay_sockets: self.relays.len(),
        };
    }

    fn drain(&mut self) {
        tracing::debug!(
            shard = self.index,
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
        let tuples: Vec<FiveTuple> = self.allocations.values().map(|(t, _)| *t).collect();
        for tuple in tuples {
            self.server
                .handle_client_closed(tuple.transport, tuple.server, tuple.client);
            self.commands(None);
        }
        self.flush();
        self.tcp_conns.clear();
        self.publish();
        // The agent link ends once every shard dropped its sender.
        self.agent = None;
    }
}

/// Shard `index` of `shards`' core configuration from the daemon's settings: the shared
/// `seed` (one nonce key for all) and `quotas`, its own slice of the port range.
pub fn core_config(
    settings: &Settings,
    dev_user: Option<&User>,
    seed: [u8; 32],
    (index, shards): (usize, usize),
    quotas: &Arc<QuotaLedger>,
) -> Config {
    let mut config = Config::new(settings.realm.clone(), seed);
    config.software = Some(concat!("turn-control ", env!("CARGO_PKG_VERSION")).to_owned());
    config.credentials = credentials(settings, dev_user);
    // Behind a 1:1 NAT the core announces the external address (XOR-RELAYED-ADDRESS); the
    // daemon maps it back to the relay address when binding and reading sockets.
    config.relay_ipv4 = settings.external_v4.or(settings.relay_v4);
    config.relay_ipv6 = settings.external_v6.or(settings.relay_v6);
    config.listeners = settings.listen.clone();
    config.own_addresses = settings
        .relay_v4
        .map(IpAddr::V4)
        .into_iter()
        .chain(settings.relay_v6.map(IpAddr::V6))
        .collect();
    config.port_range = crate::shards::port_slice(&settings.ports, index, shards);
    config.user_quota = settings.user_quota;
    config.total_quota = settings.total_quota;
    config.quotas = Arc::clone(quotas);
    config.core_index = index as u32;
    // The 401 cap is per core; split it so that the host-wide cap stays as documented.
    config.unauthorized_rate = config
        .unauthorized_rate
        .map(|rate| rate.div_ceil(shards as u32).max(1));
    config.allow_peers = settings.allow_peer.clone();
    config.deny_peers = settings.deny_peer.clone();
    config.allow_loopback_peers = settings.dev;
    config
}

/// Static users (and the development user) and REST secrets of `settings`.
pub fn credentials(settings: &Settings, dev_user: Option<&User>) -> Credentials {
    let mut credentials = Credentials::new(settings.realm.clone());
    for user in settings.users.iter().chain(dev_user) {
        credentials = credentials.with_user(user.name.clone(), &user.password);
    }
    if let Some(secret) = &settings.auth_secret {
        credentials = credentials.with_rest_secret(secret.as_bytes().to_vec());
    }
    credentials
}
