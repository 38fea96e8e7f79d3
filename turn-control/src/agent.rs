//! The link to the xdp-agent: a task that owns the gRPC client, fed by a channel from the
//! event loop and answering through another, so that no RPC ever runs on the packet path.
//!
//! While the agent is unreachable every install is answered as failed at once, so the core
//! relays those channels in user space instead of holding ChannelBind successes for the
//! offload timeout. On every (re)connect each event-loop thread pushes its share of the
//! bindings the data plane should hold ([`ToAgent::Sync`]); the link sends their union as one
//! Sync RPC, holding back installs and removals until it has gone out so that none of them is
//! undone by it.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use turn_control_core::{ChannelBinding, OffloadError};

use crate::metrics::name;

/// Requests from the event-loop threads; `thread` is the sender's index, where answers go.
#[derive(Debug)]
pub enum ToAgent {
    /// Add one binding; answer with [`FromAgent::Installed`].
    Install {
        /// The sending thread.
        thread: usize,
        /// The binding.
        binding: ChannelBinding,
    },
    /// Remove one binding; no answer.
    Remove(ChannelBinding),
    /// One thread's full set of bindings, its answer to [`FromAgent::Connected`]. Once every
    /// thread answered, their union goes out as one Sync RPC; failures are logged.
    Sync {
        /// The sending thread.
        thread: usize,
        /// The round of [`FromAgent::Connected`] this answers; parts of an earlier round
        /// (the link was lost and regained meanwhile) are ignored.
        round: u64,
        /// Every binding it holds.
        bindings: Vec<ChannelBinding>,
    },
}

/// Answers and link events for the event loop.
#[derive(Debug)]
pub enum FromAgent {
    /// The outcome of an [`ToAgent::Install`].
    Installed(ChannelBinding, Result<(), OffloadError>),
    /// The agent is reachable (again), or lost our state: the thread answers with
    /// [`ToAgent::Sync`] of this round.
    Connected {
        /// Which sync round this starts.
        round: u64,
    },
    /// The agent went away.
    Disconnected,
}

/// What the data plane must know besides the bindings, sent with SetConfig on every
/// connect (explicit relay addresses override the agent's interface discovery). The domain
/// twin of the wire message `DataPlaneConfig`.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// The UDP listeners clients send ChannelData to, as bound (wildcards included).
    pub listeners: Vec<std::net::SocketAddr>,
    /// The allocation port range.
    pub ports: std::ops::RangeInclusive<u16>,
    /// The local IPv4 relay address.
    pub relay_ipv4: Option<std::net::Ipv4Addr>,
    /// The local IPv6 relay address.
    pub relay_ipv6: Option<std::net::Ipv6Addr>,
}

/// Runs the link until `requests` closes (after every thread's shutdown drain), then
/// returns once what was queued has been sent or dropped. `events[i]` reaches thread `i`.
pub async fn run(
    path: PathBuf,
    config: DataPlaneConfig,
    mut requests: mpsc::Receiver<ToAgent>,
    events: Vec<mpsc::Sender<FromAgent>>,
) {
    let mut link = Link::new(path, config, events);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        link.connect_when_due().await;
        tokio::select! {
            n = requests.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    return;
                }
                link.handle_requests(batch.drain(..)).await;
            }
            () = tokio::time::sleep_until(link.wake()) => link.probe().await,
        }
    }
}

/// First and longest wait between connection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How often an idle connection is probed, so that an agent restart is noticed (and the
/// full sync sent) even when no binding changes.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest time one RPC may take before the agent counts as gone.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Bindings per RPC.
const MAX_BATCH: usize = 256;

/// The link's state between steps of [`run`].
struct Link {
    path: PathBuf,
    config: DataPlaneConfig,
    /// `events[i]` reaches thread `i`.
    events: Vec<mpsc::Sender<FromAgent>>,
    client: Option<proto::DataPlaneClient>,
    /// When to try connecting again, while there is no client.
    next_attempt: Instant,
    backoff: Duration,
    /// The generation of the next Sync.
    generation: u64,
    /// The generation of our last successful Sync, compared with the agent's Health.
    synced: Option<u64>,
    /// The latest sync round announced to the threads.
    round: u64,
    pending: Option<PendingSync>,
}

impl Link {
    fn new(path: PathBuf, config: DataPlaneConfig, events: Vec<mpsc::Sender<FromAgent>>) -> Self {
        // Sync generations grow across restarts of this daemon too.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs());
        Self {
            path,
            config,
            events,
            client: None,
            next_attempt: Instant::now(),
            backoff: BACKOFF.0,
            generation,
            synced: None,
            round: 0,
            pending: None,
        }
    }

    /// When [`run`] wakes without requests: to probe the agent, or to connect again.
    fn wake(&self) -> Instant {
        if self.client.is_some() {
            Instant::now() + PROBE_INTERVAL
        } else {
            self.next_attempt
        }
    }

    /// Without a connection and once the backoff has passed, one connection attempt: on
    /// success the agent gets our configuration and the threads are asked for a sync round,
    /// otherwise the next attempt backs off.
    async fn connect_when_due(&mut self) {
        if self.client.is_some() || Instant::now() < self.next_attempt {
            return;
        }
        let mut client = match tokio::time::timeout(RPC_TIMEOUT, proto::connect(&self.path)).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                let error = anyhow::Error::new(error);
                tracing::debug!(
                    agent = %self.path.display(),
                    error = format!("{error:#}"),
                    "xdp-agent unreachable"
                );
                return self.retry_later();
            }
            Err(_) => {
                tracing::debug!(agent = %self.path.display(), "xdp-agent connect timed out");
                return self.retry_later();
            }
        };
        tracing::info!(agent = %self.path.display(), "connected to xdp-agent");
        let request = proto::v1::SetConfigRequest::from(&self.config);
        if let Err(error) = rpc(client.set_config(request)).await {
            metrics::counter!(name::AGENT_RPC_ERRORS).increment(1);
            tracing::warn!(%error, "xdp-agent SetConfig failed");
        }
        self.client = Some(client);
        self.synced = None;
        self.backoff = BACKOFF.0;
        metrics::gauge!(name::AGENT_CONNECTED).set(1.0);
        self.start_round().await;
    }

    fn retry_later(&mut self) {
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF.1);
    }

    /// Asks every thread for its part of a new full sync.
    async fn start_round(&mut self) {
        self.round += 1;
        let round = self.round;
        self.pending = Some(PendingSync::start(
            self.pending.take(),
            round,
            self.events.len(),
        ));
        broadcast(&self.events, || FromAgent::Connected { round }).await;
    }

    /// Health, when connected. The gRPC channel reconnects by itself, so an agent restart
    /// between two probes shows only as a generation that is not ours: push the full state
    /// again.
    async fn probe(&mut self) {
        let Some(client) = &mut self.client else {
            return;
        };
        let health = rpc(client.health(proto::v1::HealthRequest {})).await;
        match health {
            Ok(health) if self.synced.is_some_and(|g| g != health.generation) => {
                tracing::info!(
                    agent_generation = health.generation,
                    ours = ?self.synced,
                    "xdp-agent lost our state (restarted?); resyncing"
                );
                self.synced = None;
                self.start_round().await;
            }
            // Any answer, even an error status, shows the agent is there.
            Ok(_) | Err(RpcError::Rejected(_)) => {}
            Err(error @ RpcError::Gone(_)) => self.lost(&error).await,
        }
    }

    /// One batch of requests from the threads, as few RPCs as keep their order; without an
    /// agent, or once it is lost midway, what is left is abandoned.
    async fn handle_requests(&mut self, batch: impl Iterator<Item = ToAgent>) {
        let ops = plan(batch, &mut self.pending);
        if self.client.is_none() {
            // RFC 8656 §12 leaves relaying to the server; without an agent it is ours.
            return ops.abandon(&self.events).await;
        }
        let mut ops = ops.0.into_iter();
        // In arrival order: an Install followed by the Remove of the same binding (a
        // ChannelBind, then at once a Refresh with lifetime 0) must not leave it installed.
        for op in ops.by_ref() {
            match self.send(op).await {
                Ok(()) => {}
                Err(error @ RpcError::Gone(_)) => {
                    Ops(ops.collect()).abandon(&self.events).await;
                    return self.lost(&error).await;
                }
                // A refused request (a full map, say) fails alone.
                Err(RpcError::Rejected(reason)) => {
                    metrics::counter!(name::AGENT_RPC_ERRORS).increment(1);
                    tracing::warn!(%reason, "xdp-agent refused a request");
                }
            }
        }
    }

    /// One RPC; installs are answered to their threads.
    async fn send(&mut self, op: Op) -> Result<(), RpcError> {
        let Some(client) = &mut self.client else {
            return Err(RpcError::Gone("not connected".to_owned()));
        };
        match op {
            Op::Remove(bindings) => {
                let request = proto::v1::RemoveChannelBindingRequest {
                    bindings: wire(bindings.iter()),
                };
                rpc(client.remove_channel_binding(request)).await.map(drop)
            }
            Op::Install(installs) => {
                let request = proto::v1::InstallChannelBindingRequest {
                    bindings: wire(installs.iter().map(|(_, b)| b)),
                };
                let result = rpc(client.install_channel_binding(request)).await.map(drop);
                let answer_with = result.clone().map_err(OffloadError::from);
                for (thread, b) in installs {
                    answer(&self.events, thread, b, answer_with.clone()).await;
                }
                result
            }
            // Sync replaces everything under a new generation, so entries of a previous run
            // of either daemon do not linger.
            Op::Sync(all) => {
                self.generation += 1;
                let generation = self.generation;
                let request = proto::v1::SyncRequest {
                    generation,
                    bindings: wire(all.iter()),
                };
                rpc(client.sync(request)).await?;
                self.synced = Some(generation);
                tracing::info!(
                    bindings = all.len(),
                    generation,
                    "full sync sent to xdp-agent"
                );
                Ok(())
            }
        }
    }

    /// The agent is gone: the threads relay in user space, what was held for a sync round
    /// is abandoned, and the next connection attempt starts at once.
    async fn lost(&mut self, error: &RpcError) {
        metrics::counter!(name::AGENT_RPC_ERRORS).increment(1);
        metrics::gauge!(name::AGENT_CONNECTED).set(0.0);
        tracing::warn!(
            agent = %self.path.display(),
            %error,
            "lost the xdp-agent; relaying in user space until it is back"
        );
        self.client = None;
        broadcast(&self.events, || FromAgent::Disconnected).await;
        if let Some(p) = self.pending.take() {
            let mut ops = Ops::default();
            for request in p.held {
                ops.request(request);
            }
            ops.abandon(&self.events).await;
        }
        self.next_attempt = Instant::now();
    }
}

/// The [`ToAgent::Sync`] parts collected after a (re)connect, one per thread, and what the
/// threads asked for meanwhile.
#[derive(Debug)]
struct PendingSync {
    round: u64,
    parts: Vec<Option<Vec<ChannelBinding>>>,
    /// Installs and removals that arrived after some thread's part: sending them before the
    /// Sync would let the Sync undo them, so they follow it.
    held: Vec<ToAgent>,
}

impl PendingSync {
    /// A new round of `threads` parts; requests held for an unfinished earlier round stay
    /// held (the new parts reflect them, and they are answered after the new Sync).
    fn start(earlier: Option<PendingSync>, round: u64, threads: usize) -> Self {
        Self {
            round,
            parts: (0..threads).map(|_| None).collect(),
            held: earlier.map(|p| p.held).unwrap_or_default(),
        }
    }

    /// The union of every thread's part, once all have answered.
    fn take_union(&mut self) -> Option<Vec<ChannelBinding>> {
        if self.parts.iter().any(Option::is_none) {
            return None;
        }
        Some(
            self.parts
                .iter_mut()
                .flat_map(|p| p.take().unwrap_or_default())
                .collect(),
        )
    }
}

/// The RPCs for a batch of requests, in arrival order, with a sync round's parts gathered
/// into `pending` and, once every thread's part of the current round is in, one Sync
/// followed by what was held back for it.
fn plan(requests: impl Iterator<Item = ToAgent>, pending: &mut Option<PendingSync>) -> Ops {
    let mut ops = Ops::default();
    for request in requests {
        match (request, pending.as_mut()) {
            (
                ToAgent::Sync {
                    thread,
                    round,
                    bindings,
                },
                Some(p),
            ) if round == p.round => {
                if let Some(part) = p.parts.get_mut(thread) {
                    *part = Some(bindings);
                }
                if let Some(all) = p.take_union() {
                    ops.push(Op::Sync(all));
                    for held in std::mem::take(&mut p.held) {
                        ops.request(held);
                    }
                    *pending = None;
                }
            }
            // A part of a round that a lost connection abandoned or a later round replaced.
            (ToAgent::Sync { .. }, _) => {}
            (request, Some(p)) if p.parts.iter().any(Option::is_some) => p.held.push(request),
            (request, _) => ops.request(request),
        }
    }
    ops
}

/// One RPC's worth of requests.
#[derive(Debug)]
enum Op {
    /// InstallChannelBinding, answered to each binding's thread.
    Install(Vec<(usize, ChannelBinding)>),
    /// RemoveChannelBinding.
    Remove(Vec<ChannelBinding>),
    /// Sync with every thread's bindings.
    Sync(Vec<ChannelBinding>),
}

/// The RPCs a batch of requests comes to, in arrival order: consecutive installs share one
/// InstallChannelBinding, consecutive removals one RemoveChannelBinding.
#[derive(Debug, Default)]
struct Ops(Vec<Op>);

impl Ops {
    fn push(&mut self, op: Op) {
        self.0.push(op);
    }

    fn request(&mut self, request: ToAgent) {
        match (request, self.0.last_mut()) {
            (ToAgent::Install { thread, binding }, Some(Op::Install(installs)))
                if installs.len() < MAX_BATCH =>
            {
                installs.push((thread, binding));
            }
            (ToAgent::Install { thread, binding }, _) => {
                self.0.push(Op::Install(vec![(thread, binding)]))
            }
            (ToAgent::Remove(binding), Some(Op::Remove(removes))) if removes.len() < MAX_BATCH => {
                removes.push(binding);
            }
            (ToAgent::Remove(binding), _) => self.0.push(Op::Remove(vec![binding])),
            (ToAgent::Sync { .. }, _) => {}
        }
    }

    /// Nothing more goes to the agent: installs are answered as unavailable (user space
    /// relays those channels); removals are dropped, since the full sync on reconnect
    /// replaces the agent's state.
    async fn abandon(self, events: &[mpsc::Sender<FromAgent>]) {
        let mut dropped = 0;
        for op in self.0 {
            match op {
                Op::Install(installs) => {
                    for (thread, b) in installs {
                        answer(events, thread, b, Err(OffloadError::Unavailable)).await;
                    }
                }
                Op::Remove(removes) => dropped += removes.len(),
                Op::Sync(_) => {}
            }
        }
        if dropped > 0 {
            tracing::debug!(
                count = dropped,
                "xdp-agent unreachable; removals dropped (the full sync on reconnect replaces its state)"
            );
        }
    }
}

#[derive(Debug, Clone)]
enum RpcError {
    /// The agent answered with an error status about the request itself.
    Rejected(String),
    /// The transport failed or timed out: the agent is gone.
    Gone(String),
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::Rejected(r) => write!(f, "rejected: {r}"),
            RpcError::Gone(r) => write!(f, "unreachable: {r}"),
        }
    }
}

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
                RpcError::Gone(status.message().to_owned())
            }
            _ => RpcError::Rejected(format!("{}: {}", status.code(), status.message())),
        }
    }
}

/// What a thread hears of an install that failed.
impl From<RpcError> for OffloadError {
    fn from(error: RpcError) -> Self {
        match error {
            RpcError::Rejected(reason) => OffloadError::Rejected(reason),
            RpcError::Gone(_) => OffloadError::Unavailable,
        }
    }
}

/// One RPC under [`RPC_TIMEOUT`]; a timeout counts as the agent gone.
async fn rpc<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.into()),
        Err(_) => Err(RpcError::Gone("timed out".to_owned())),
    }
}

impl From<&DataPlaneConfig> for proto::v1::SetConfigRequest {
    fn from(config: &DataPlaneConfig) -> Self {
        Self {
            listeners: Some(proto::v1::Listeners {
                addresses: config.listeners.iter().map(ToString::to_string).collect(),
            }),
            port_min: Some(u32::from(*config.ports.start())),
            port_max: Some(u32::from(*config.ports.end())),
            relay_ipv4: config.relay_ipv4.map(|ip| ip.to_string()),
            relay_ipv6: config.relay_ipv6.map(|ip| ip.to_string()),
            tail_adjust: None,
        }
    }
}

/// The data plane's form of a binding: the client's channel to its peer through the
/// allocation's port, and the listener the client talks to (`server`, as bound).
fn kernel_binding(binding: &ChannelBinding) -> proto::Binding {
    proto::Binding {
        client: binding.client.0,
        channel: binding.channel.value(),
        peer: binding.peer.0,
        allocation_port: binding.relay.port().0,
        listener: binding.server,
    }
}

/// The wire form of bindings (proto/xdp_agent.proto).
fn wire<'a>(bindings: impl Iterator<Item = &'a ChannelBinding>) -> Vec<proto::v1::ChannelBinding> {
    bindings
        .map(|b| proto::v1::ChannelBinding::from(&kernel_binding(b)))
        .collect()
}

/// Sends `event` to every event-loop thread.
async fn broadcast(events: &[mpsc::Sender<FromAgent>], event: impl Fn() -> FromAgent) {
    for tx in events {
        let _ = tx.send(event()).await;
    }
}

/// The outcome of an install, to the thread that asked.
async fn answer(
    events: &[mpsc::Sender<FromAgent>],
    thread: usize,
    binding: ChannelBinding,
    result: Result<(), OffloadError>,
) {
    if let Some(tx) = events.get(thread) {
        let _ = tx.send(FromAgent::Installed(binding, result)).await;
    }
}

#[cfg(test)]
mod tests {
    use turn_control_core::{ChannelNumber, ClientAddr, PeerAddr, RelayAddr, Transport};

    use super::*;

    fn binding(channel: u16) -> ChannelBinding {
        ChannelBinding {
            client: ClientAddr("192.0.2.1:5000".parse().unwrap()),
            server: "203.0.113.1:3478".parse().unwrap(),
            transport: Transport::Udp,
            relay: RelayAddr("203.0.113.1:50000".parse().unwrap()),
            peer: PeerAddr("198.51.100.1:9000".parse().unwrap()),
            channel: ChannelNumber::new(channel).unwrap(),
        }
    }

    /// The ops as (kind, channels) for comparison.
    fn shape(ops: &Ops) -> Vec<(&'static str, Vec<u16>)> {
        ops.0
            .iter()
            .map(|op| match op {
                Op::Install(v) => (
                    "install",
                    v.iter().map(|(_, b)| b.channel.value()).collect(),
                ),
                Op::Remove(v) => ("remove", v.iter().map(|b| b.channel.value()).collect()),
                Op::Sync(v) => ("sync", v.iter().map(|b| b.channel.value()).collect()),
            })
            .collect()
    }

    #[test]
    fn requests_keep_their_order_across_kinds() {
        let mut ops = Ops::default();
        for request in [
            ToAgent::Install {
                thread: 0,
                binding: binding(0x4000),
            },
            ToAgent::Install {
                thread: 1,
                binding: binding(0x4001),
            },
            ToAgent::Remove(binding(0x4000)),
            ToAgent::Remove(binding(0x4001)),
            ToAgent::Install {
                thread: 0,
                binding: binding(0x4000),
            },
        ] {
            ops.request(request);
        }
        assert_eq!(
            shape(&ops),
            vec![
                ("install", vec![0x4000, 0x4001]),
                ("remove", vec![0x4000, 0x4001]),
                ("install", vec![0x4000]),
            ]
        );
    }

    #[test]
    fn a_batch_never_exceeds_the_rpc_size() {
        let mut ops = Ops::default();
        for i in 0..(MAX_BATCH as u16 + 1) {
            ops.request(ToAgent::Install {
                thread: 0,
                binding: binding(0x4000 + i),
            });
        }
        let sizes: Vec<usize> = shape(&ops).iter().map(|(_, v)| v.len()).collect();
        assert_eq!(sizes, vec![MAX_BATCH, 1]);
    }

    fn install(thread: usize, channel: u16) -> ToAgent {
        ToAgent::Install {
            thread,
            binding: binding(channel),
        }
    }

    fn part(thread: usize, round: u64, channels: &[u16]) -> ToAgent {
        ToAgent::Sync {
            thread,
            round,
            bindings: channels.iter().map(|&c| binding(c)).collect(),
        }
    }

    #[test]
    fn requests_after_a_first_part_follow_the_sync_and_stale_parts_are_ignored() {
        let mut pending = Some(PendingSync::start(None, 2, 2));
        let ops = plan(
            [
                // Before any part: already reflected in the parts to come.
                install(0, 0x4000),
                // A late part of round 1: ignored.
                part(1, 1, &[0x4abc]),
                part(0, 2, &[0x4000]),
                // After thread 0's part: must not be undone by the Sync.
                install(0, 0x4001),
                ToAgent::Remove(binding(0x4000)),
            ]
            .into_iter(),
            &mut pending,
        );
        assert_eq!(shape(&ops), vec![("install", vec![0x4000])]);
        assert!(pending.as_ref().is_some_and(|p| p.held.len() == 2));
        let ops = plan(
            [part(1, 2, &[0x4002]), install(1, 0x4003)].into_iter(),
            &mut pending,
        );
        assert!(pending.is_none());
        assert_eq!(
            shape(&ops),
            vec![
                ("sync", vec![0x4000, 0x4002]),
                ("install", vec![0x4001]),
                ("remove", vec![0x4000]),
                ("install", vec![0x4003]),
            ]
        );
    }

    #[test]
    fn a_sync_waits_for_every_thread_and_held_requests_survive_a_new_round() {
        let mut pending = PendingSync::start(None, 1, 2);
        pending.parts[1] = Some(vec![binding(0x4001)]);
        assert!(pending.take_union().is_none(), "thread 0 has not answered");
        pending.held.push(ToAgent::Remove(binding(0x4001)));
        // The agent restarts before thread 0 answers: a new round keeps the held removal.
        let mut pending = PendingSync::start(Some(pending), 2, 2);
        assert_eq!(pending.held.len(), 1);
        pending.parts[0] = Some(vec![binding(0x4000)]);
        pending.parts[1] = Some(vec![binding(0x4002), binding(0x4003)]);
        let union: Vec<u16> = pending
            .take_union()
            .unwrap()
            .iter()
            .map(|b| b.channel.value())
            .collect();
        assert_eq!(union, vec![0x4000, 0x4002, 0x4003]);
    }
}
