//! The link to the xdp-agent: a task that owns the gRPC client, fed by a channel from the
//! event loop and answering through another, so that no RPC ever runs on the packet path.
//!
//! Every binding goes to the agent as a [`Lease`]: with the instant its authorisation ends,
//! which the kernel enforces on its own (it stops relaying the binding then, and the agent
//! deletes it). Whatever is lost between the daemons, a kernel entry dies when its
//! authorisation would have; the lifetime on the wire is taken when the RPC is sent, so time
//! spent in the queue does not lengthen it.
//!
//! While the agent is unreachable every install is answered as failed at once, so the core
//! relays those channels in user space instead of holding ChannelBind successes for the
//! offload timeout. On every (re)connect each event-loop thread pushes its share of the
//! bindings the data plane should hold ([`ToAgent::Sync`]); the link streams their union as
//! one Sync RPC in parts of [`proto::SYNC_PART_BINDINGS`], holding back installs and removals
//! until it has gone out so that none of them is undone by it.
//!
//! The threads never wait for the link, so the queue between them can be full. An install
//! that does not fit is answered as failed at once (user space relays that channel); a
//! removal that does not fit would leave a binding in the kernel that the daemon no longer
//! holds, so it marks the link as needing a full sync instead, which the link starts within
//! [`CHECK_INTERVAL`]. A thread's sync part waits for room rather than being dropped, so a
//! round always completes. A Sync the agent refuses is tried again after a backoff.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use turn_control_core::{ChannelBinding, OffloadError, RateLimits, Usage};

use crate::kernel_usage::{self, Owners};
use crate::metrics::name;

/// A binding for the data plane, the instant its authorisation ends (the earliest expiry
/// of its channel, permission and allocation, as the core computes it) and the rate limits
/// the kernel holds it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The binding.
    pub binding: ChannelBinding,
    /// When the kernel must stop relaying it.
    pub expires: std::time::Instant,
    /// Its allocation's and its user's meters.
    pub limits: RateLimits,
}

/// Requests from the event-loop threads; `thread` is the sender's index, where answers go.
#[derive(Debug)]
pub enum ToAgent {
    /// Add one binding, or move its expiry; answer with [`FromAgent::Installed`].
    Install {
        /// The sending thread.
        thread: usize,
        /// The binding and its expiry.
        lease: Lease,
    },
    /// Remove one binding; answer with [`FromAgent::Removed`].
    Remove {
        /// The sending thread.
        thread: usize,
        /// The binding.
        binding: ChannelBinding,
    },
    /// One thread's full set of bindings, its answer to [`FromAgent::Connected`]. Once every
    /// thread answered, their union goes out as one Sync RPC; a refused one is retried.
    Sync {
        /// The sending thread.
        thread: usize,
        /// The round of [`FromAgent::Connected`] this answers; parts of an earlier round
        /// (the link was lost and regained meanwhile) are ignored.
        round: u64,
        /// Every binding it holds, with its expiry.
        leases: Vec<Lease>,
    },
}

/// Answers and link events for the event loop.
#[derive(Debug)]
pub enum FromAgent {
    /// The outcome of an [`ToAgent::Install`].
    Installed(ChannelBinding, Result<(), OffloadError>),
    /// The outcome of a [`ToAgent::Remove`]: the binding's final usage in the kernel (zero
    /// if the kernel did not hold it), or `None` when the agent could not say.
    Removed(ChannelBinding, Option<Usage>),
    /// What the kernel has relayed on this thread's bindings so far, cumulative for each
    /// binding's life in the kernel (every [`USAGE_INTERVAL`]).
    Usage(Vec<(ChannelBinding, Usage)>),
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

/// The queue from the event-loop threads to the link, `capacity` requests long: each
/// thread gets a clone of the first end, [`run`] takes the second.
pub fn queue(capacity: usize) -> (AgentQueue, Requests) {
    let (tx, rx) = mpsc::channel(capacity);
    let resync = Arc::new(AtomicBool::new(false));
    let queue = AgentQueue {
        tx,
        resync: Arc::clone(&resync),
    };
    (queue, Requests { rx, resync })
}

/// An event-loop thread's end of the queue to the link. Nothing on the packet path waits
/// for the link, so nothing here blocks; what does not fit is accounted for.
#[derive(Debug, Clone)]
pub struct AgentQueue {
    tx: mpsc::Sender<ToAgent>,
    /// Raised by a removal that did not fit: the agent may still hold that binding, and
    /// only a full Sync takes it out.
    resync: Arc<AtomicBool>,
}

impl AgentQueue {
    /// Queues an install; false when the queue is full (the install is not going to the
    /// agent: the caller relays that channel in user space).
    pub fn install(&self, thread: usize, lease: Lease) -> bool {
        self.tx.try_send(ToAgent::Install { thread, lease }).is_ok()
    }

    /// Queues a removal or, when it does not fit, marks the link as needing a full sync:
    /// the threads' parts of the next round no longer hold the binding, so the Sync takes
    /// it out of the data plane.
    pub fn remove(&self, thread: usize, binding: ChannelBinding) {
        if self
            .tx
            .try_send(ToAgent::Remove { thread, binding })
            .is_err()
        {
            if self.resync.swap(true, Ordering::AcqRel) {
                tracing::debug!(%binding, "agent queue full, removal dropped");
            } else {
                tracing::warn!(%binding, "agent queue full, removal dropped; a full sync follows");
            }
        }
    }

    /// Room for one request (a sync part), if the queue has it now.
    pub fn try_slot(&self) -> Option<mpsc::OwnedPermit<ToAgent>> {
        self.tx.clone().try_reserve_owned().ok()
    }

    /// Room for one request once the link has taken some; never ready when the link is gone.
    pub async fn slot(&self) -> mpsc::OwnedPermit<ToAgent> {
        match self.tx.clone().reserve_owned().await {
            Ok(permit) => permit,
            Err(_) => std::future::pending().await,
        }
    }
}

/// The link's end of the queue from the event-loop threads.
#[derive(Debug)]
pub struct Requests {
    rx: mpsc::Receiver<ToAgent>,
    /// Shared with every [`AgentQueue`].
    resync: Arc<AtomicBool>,
}

/// Runs the link until `requests` closes (after every thread's shutdown drain), then
/// returns once what was queued has been sent or dropped. `events[i]` reaches thread `i`.
pub async fn run(
    path: PathBuf,
    config: DataPlaneConfig,
    requests: Requests,
    events: Vec<mpsc::Sender<FromAgent>>,
) {
    let Requests { mut rx, resync } = requests;
    let mut link = Link::new(path, config, events, resync);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        link.connect_when_due().await;
        // Also between requests: a busy queue (when removals get dropped) must not put
        // the forced sync off.
        link.maintain().await;
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    return link.finish().await;
                }
                link.handle_requests(batch.drain(..)).await;
            }
            () = tokio::time::sleep_until(link.wake()) => {}
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
/// What a Sync may take beyond [`RPC_TIMEOUT`] per binding it carries: the agent writes
/// about 100 000 bindings a second, so 130 000 get 2 s + 6.5 s.
const SYNC_TIME_PER_BINDING: Duration = Duration::from_micros(50);
/// How often the link looks for dropped removals, and the least time between two syncs
/// they force: the full sync follows a drop within a second, and a queue that keeps
/// overflowing does not turn into back-to-back full syncs.
const CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// First and longest wait before a refused Sync is tried again.
const SYNC_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// Bindings per RPC.
const MAX_BATCH: usize = 256;
/// How often the link reads every binding's usage from the agent (one streaming ListUsage)
/// and hands each thread its share: how stale the kernel's part of an interim record can be,
/// and how late the user-space meters learn what the kernel relayed.
pub const USAGE_INTERVAL: Duration = Duration::from_secs(2);

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
    /// Raised by the threads when a removal did not fit in the queue ([`AgentQueue`]).
    resync: Arc<AtomicBool>,
    /// The earliest time a full sync forced by dropped removals may start.
    next_forced: Instant,
    /// When to send the next Health probe.
    next_probe: Instant,
    /// When to try again a Sync the agent refused.
    retry_at: Option<Instant>,
    /// The wait before the next retry of a refused Sync.
    sync_backoff: Duration,
    /// Which thread each binding in the kernel belongs to.
    owners: Owners,
    /// When to read the kernel's usage next.
    next_usage: Instant,
}

impl Link {
    fn new(
        path: PathBuf,
        config: DataPlaneConfig,
        events: Vec<mpsc::Sender<FromAgent>>,
        resync: Arc<AtomicBool>,
    ) -> Self {
        // Sync generations grow across restarts of this daemon too.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs());
        // Exported from the start, so that a rate over them has a series before the first.
        metrics::counter!(name::AGENT_SYNCS_FORCED).increment(0);
        metrics::counter!(name::AGENT_SYNC_RETRIES).increment(0);
        metrics::counter!(name::AGENT_SYNC_REFUSED_BINDINGS).increment(0);
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
            resync,
            next_forced: Instant::now(),
            next_probe: Instant::now(),
            retry_at: None,
            sync_backoff: SYNC_BACKOFF.0,
            owners: Owners::default(),
            next_usage: Instant::now() + USAGE_INTERVAL,
        }
    }

    /// When [`run`] wakes without requests: to look for dropped removals, retry a refused
    /// Sync or probe the agent ([`Link::maintain`]), or to connect again.
    fn wake(&self) -> Instant {
        if self.client.is_none() {
            return self.next_attempt;
        }
        let check = Instant::now() + CHECK_INTERVAL;
        self.retry_at
            .map_or(check, |at| at.min(check))
            .min(self.next_probe)
            .min(self.next_usage)
    }

    /// While connected: a full sync when removals were dropped (once the round under way,
    /// if any, is done: its parts may predate the drop), the retry of a refused Sync when
    /// due, and the Health probe every [`PROBE_INTERVAL`].
    async fn maintain(&mut self) {
        if self.client.is_none() {
            return;
        }
        let now = Instant::now();
        if self.pending.is_none() && now >= self.next_forced && self.resync.load(Ordering::Acquire)
        {
            self.next_forced = now + CHECK_INTERVAL;
            metrics::counter!(name::AGENT_SYNCS_FORCED).increment(1);
            tracing::info!("removals did not fit in the queue to the xdp-agent; full sync");
            return self.start_round().await;
        }
        if self.retry_at.is_some_and(|at| now >= at) {
            metrics::counter!(name::AGENT_SYNC_RETRIES).increment(1);
            tracing::info!("retrying the full sync the xdp-agent refused");
            return self.start_round().await;
        }
        if now >= self.next_probe {
            self.next_probe = now + PROBE_INTERVAL;
            self.probe().await;
        }
        if now >= self.next_usage {
            self.next_usage = now + USAGE_INTERVAL;
            self.read_usage().await;
        }
    }

    /// Every binding's usage, to the threads that hold them.
    async fn read_usage(&mut self) {
        let Some(client) = &mut self.client else {
            return;
        };
        match kernel_usage::list(client, RPC_TIMEOUT).await {
            Ok(bindings) => {
                for (thread, usage) in self.owners.by_thread(bindings) {
                    if let Some(tx) = self.events.get(thread) {
                        let _ = tx.send(FromAgent::Usage(usage)).await;
                    }
                }
            }
            Err(status) => {
                metrics::counter!(name::AGENT_RPC_ERRORS).increment(1);
                tracing::warn!(%status, "xdp-agent ListUsage failed");
            }
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
        self.next_probe = Instant::now() + PROBE_INTERVAL;
        metrics::gauge!(name::AGENT_CONNECTED).set(1.0);
        self.start_round().await;
    }

    fn retry_later(&mut self) {
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF.1);
    }

    /// Asks every thread for its part of a new full sync. Whatever else asked for one (a
    /// dropped removal, a refused Sync) is covered by it: the parts are taken after this
    /// point, so they reflect every removal dropped before it.
    async fn start_round(&mut self) {
        self.resync.store(false, Ordering::Release);
        self.retry_at = None;
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
            let sync = matches!(op, Op::Sync(_));
            match self.send(op).await {
                Ok(()) => {}
                Err(error @ RpcError::Gone(_)) => {
                    Ops(ops.collect()).abandon(&self.events).await;
                    return self.lost(&error).await;
                }
                Err(RpcError::Rejected(reason)) if sync => self.sync_refused(&reason),
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
            Op::Remove(removals) => {
                let request = proto::v1::RemoveChannelBindingRequest {
                    bindings: wire_removals(removals.iter().map(|(_, binding)| binding)),
                };
                let response = rpc(client.remove_channel_binding(request)).await;
                let finals = match &response {
                    Ok(response) => kernel_usage::finals(&response.removed_bindings),
                    Err(_) => Default::default(),
                };
                for (thread, binding) in removals {
                    self.owners.forget(&binding);
                    // Not among the removed: the kernel did not hold it, nothing to add.
                    let usage = match &response {
                        Ok(_) => Some(
                            finals
                                .get(&kernel_usage::key_of(&binding))
                                .copied()
                                .unwrap_or_default(),
                        ),
                        Err(_) => None,
                    };
                    removed(&self.events, thread, binding, usage).await;
                }
                response.map(drop)
            }
            Op::Install(installs) => {
                // A lease that ran out in the queue is no longer the kernel's to relay: the
                // core removes its binding when its timer fires.
                let now = std::time::Instant::now();
                let (live, ended): (Vec<_>, Vec<_>) = installs
                    .into_iter()
                    .partition(|(_, lease)| lease.expires > now);
                for (thread, lease) in ended {
                    let ended = OffloadError::Rejected("its lifetime ended in the queue".into());
                    answer(&self.events, thread, lease.binding, Err(ended)).await;
                }
                if live.is_empty() {
                    return Ok(());
                }
                let request = proto::v1::InstallChannelBindingRequest {
                    bindings: wire(live.iter().map(|(_, lease)| lease), now).collect(),
                };
                let result = rpc(client.install_channel_binding(request)).await.map(drop);
                let answer_with = result.clone().map_err(OffloadError::from);
                for (thread, lease) in live {
                    if answer_with.is_ok() {
                        self.owners.hold(thread, lease.binding);
                    }
                    answer(&self.events, thread, lease.binding, answer_with.clone()).await;
                }
                result
            }
            // Sync replaces everything under a new generation, so entries of a previous run
            // of either daemon do not linger. Leases that ran out are left out: the agent
            // would refuse them, and their traffic is user space's to decide.
            Op::Sync(all) => {
                self.generation += 1;
                let generation = self.generation;
                let now = std::time::Instant::now();
                let bindings: Vec<_> = wire(all.iter().map(|(_, lease)| lease), now).collect();
                let count = bindings.len();
                let parts = sync_parts(generation, bindings);
                let timeout = RPC_TIMEOUT + SYNC_TIME_PER_BINDING * count as u32;
                let response = rpc_within(timeout, client.sync(tokio_stream::iter(parts))).await?;
                self.owners =
                    Owners::of(all.iter().map(|(thread, lease)| (*thread, lease.binding)));
                self.synced = Some(generation);
                self.sync_backoff = SYNC_BACKOFF.0;
                if response.refused > 0 {
                    metrics::counter!(name::AGENT_SYNC_REFUSED_BINDINGS)
                        .increment(response.refused);
                    tracing::warn!(
                        refused = response.refused,
                        reasons = ?response.refusals,
                        "xdp-agent left bindings of the full sync out; they are relayed in \
                         user space"
                    );
                }
                tracing::info!(
                    bindings = count,
                    added = response.added,
                    removed = response.removed,
                    generation,
                    "full sync sent to xdp-agent"
                );
                Ok(())
            }
        }
    }

    /// The agent refused a Sync (a map too small for every binding, or a binding it found
    /// invalid): its state is not ours, so a new round follows after a backoff, for as long
    /// as it stays connected. The requests held for the round go out regardless.
    fn sync_refused(&mut self, reason: &str) {
        metrics::counter!(name::AGENT_RPC_ERRORS).increment(1);
        let delay = self.sync_backoff;
        self.retry_at = Some(Instant::now() + delay);
        self.sync_backoff = (delay * 2).min(SYNC_BACKOFF.1);
        tracing::warn!(%reason, retry_in = ?delay, "xdp-agent refused the full sync; retrying");
    }

    /// Every thread has ended, each having removed all its bindings. If a removal did not
    /// fit in the queue, or the agent's state was waiting for a Sync (a round under way, a
    /// refused Sync), an empty Sync takes out what the agent may still hold.
    async fn finish(&mut self) {
        let unfinished = self.pending.take().is_some();
        let refused = self.retry_at.take().is_some();
        let dropped = self.resync.swap(false, Ordering::AcqRel);
        if self.client.is_none() || !(unfinished || refused || dropped) {
            return;
        }
        if let Err(error) = self.send(Op::Sync(Vec::new())).await {
            metrics::counter!(name::AGENT_RPC_ERRORS).increment(1);
            tracing::warn!(%error, "xdp-agent's last full sync failed; it may keep stale bindings");
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
        // The round after the reconnect replaces the one a refused Sync was waiting for.
        self.retry_at = None;
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
    parts: Vec<Option<Vec<Lease>>>,
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

    /// The union of every thread's part, once all have answered, each lease with its
    /// thread.
    fn take_union(&mut self) -> Option<Vec<(usize, Lease)>> {
        if self.parts.iter().any(Option::is_none) {
            return None;
        }
        Some(
            self.parts
                .iter_mut()
                .enumerate()
                .flat_map(|(thread, p)| {
                    p.take()
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |lease| (thread, lease))
                })
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
                    leases,
                },
                Some(p),
            ) if round == p.round => {
                if let Some(part) = p.parts.get_mut(thread) {
                    *part = Some(leases);
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
    Install(Vec<(usize, Lease)>),
    /// RemoveChannelBinding, answered to each binding's thread.
    Remove(Vec<(usize, ChannelBinding)>),
    /// Sync with every thread's bindings.
    Sync(Vec<(usize, Lease)>),
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
            (ToAgent::Install { thread, lease }, Some(Op::Install(installs)))
                if installs.len() < MAX_BATCH =>
            {
                installs.push((thread, lease));
            }
            (ToAgent::Install { thread, lease }, _) => {
                self.0.push(Op::Install(vec![(thread, lease)]))
            }
            (ToAgent::Remove { thread, binding }, Some(Op::Remove(removes)))
                if removes.len() < MAX_BATCH =>
            {
                removes.push((thread, binding));
            }
            (ToAgent::Remove { thread, binding }, _) => {
                self.0.push(Op::Remove(vec![(thread, binding)]))
            }
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
                    for (thread, lease) in installs {
                        let unavailable = Err(OffloadError::Unavailable);
                        answer(events, thread, lease.binding, unavailable).await;
                    }
                }
                Op::Remove(removes) => {
                    dropped += removes.len();
                    for (thread, binding) in removes {
                        removed(events, thread, binding, None).await;
                    }
                }
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

/// What a thread hears of an install that was sent and failed. Gone is not "unavailable":
/// the agent may have applied the install before the link broke.
impl From<RpcError> for OffloadError {
    fn from(error: RpcError) -> Self {
        match error {
            RpcError::Rejected(reason) => OffloadError::Rejected(reason),
            RpcError::Gone(reason) => OffloadError::Lost(reason),
        }
    }
}

/// One RPC under [`RPC_TIMEOUT`]; a timeout counts as the agent gone.
async fn rpc<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, RpcError> {
    rpc_within(RPC_TIMEOUT, call).await
}

/// One RPC under `timeout`; a timeout counts as the agent gone.
async fn rpc_within<T>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(timeout, call).await {
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
/// allocation's port, the listener the client talks to (`server`, as bound), and whether
/// the allocation asked for DONT-FRAGMENT (the same on install and removal: the agent
/// matches the whole binding).
fn kernel_binding(binding: &ChannelBinding) -> proto::Binding {
    proto::Binding {
        client: binding.client.0,
        channel: binding.channel.value(),
        peer: binding.peer.0,
        allocation_port: binding.relay.port().0,
        listener: binding.server,
        dont_fragment: binding.dont_fragment,
    }
}

/// The wire form of leases at `now` (proto/xdp_agent.proto): each with what is left of its
/// lifetime, capped at [`proto::MAX_LIFETIME`]; those already ended are left out.
fn wire<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    now: std::time::Instant,
) -> impl Iterator<Item = proto::v1::ChannelBinding> {
    leases.filter_map(move |lease| {
        let lifetime = lease.expires.checked_duration_since(now)?;
        (!lifetime.is_zero()).then(|| {
            proto::v1::ChannelBinding::from(&proto::Lease {
                binding: kernel_binding(&lease.binding),
                lifetime: lifetime.min(proto::MAX_LIFETIME),
                rate_limits: kernel_usage::rate_limits(&lease.limits),
            })
        })
    })
}

/// A Sync's stream: `bindings` in parts of [`proto::SYNC_PART_BINDINGS`], each with the
/// generation; at least one part, so that an empty set still says its generation.
fn sync_parts(
    generation: u64,
    bindings: Vec<proto::v1::ChannelBinding>,
) -> Vec<proto::v1::SyncRequest> {
    let mut parts = Vec::with_capacity(bindings.len().div_ceil(proto::SYNC_PART_BINDINGS));
    let mut bindings = bindings.into_iter().peekable();
    loop {
        parts.push(proto::v1::SyncRequest {
            generation,
            bindings: bindings.by_ref().take(proto::SYNC_PART_BINDINGS).collect(),
        });
        if bindings.peek().is_none() {
            return parts;
        }
    }
}

/// The wire form of bindings to remove, without a lifetime.
fn wire_removals<'a>(
    bindings: impl Iterator<Item = &'a ChannelBinding>,
) -> Vec<proto::v1::ChannelBinding> {
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

/// The outcome of a removal, to the thread that asked.
async fn removed(
    events: &[mpsc::Sender<FromAgent>],
    thread: usize,
    binding: ChannelBinding,
    usage: Option<Usage>,
) {
    if let Some(tx) = events.get(thread) {
        let _ = tx.send(FromAgent::Removed(binding, usage)).await;
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
            dont_fragment: false,
        }
    }

    fn lease(channel: u16) -> Lease {
        Lease {
            binding: binding(channel),
            expires: std::time::Instant::now() + Duration::from_secs(300),
            limits: RateLimits::default(),
        }
    }

    /// The ops as (kind, channels) for comparison.
    fn shape(ops: &Ops) -> Vec<(&'static str, Vec<u16>)> {
        ops.0
            .iter()
            .map(|op| match op {
                Op::Install(v) => (
                    "install",
                    v.iter().map(|(_, l)| l.binding.channel.value()).collect(),
                ),
                Op::Remove(v) => ("remove", v.iter().map(|(_, b)| b.channel.value()).collect()),
                Op::Sync(v) => (
                    "sync",
                    v.iter().map(|(_, l)| l.binding.channel.value()).collect(),
                ),
            })
            .collect()
    }

    #[test]
    fn requests_keep_their_order_across_kinds() {
        let mut ops = Ops::default();
        for request in [
            install(0, 0x4000),
            install(1, 0x4001),
            ToAgent::Remove {
                thread: 0,
                binding: binding(0x4000),
            },
            ToAgent::Remove {
                thread: 0,
                binding: binding(0x4001),
            },
            install(0, 0x4000),
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
            ops.request(install(0, 0x4000 + i));
        }
        let sizes: Vec<usize> = shape(&ops).iter().map(|(_, v)| v.len()).collect();
        assert_eq!(sizes, vec![MAX_BATCH, 1]);
    }

    fn install(thread: usize, channel: u16) -> ToAgent {
        ToAgent::Install {
            thread,
            lease: lease(channel),
        }
    }

    fn part(thread: usize, round: u64, channels: &[u16]) -> ToAgent {
        ToAgent::Sync {
            thread,
            round,
            leases: channels.iter().map(|&c| lease(c)).collect(),
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
                ToAgent::Remove {
                    thread: 0,
                    binding: binding(0x4000),
                },
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
        pending.parts[1] = Some(vec![lease(0x4001)]);
        assert!(pending.take_union().is_none(), "thread 0 has not answered");
        pending.held.push(ToAgent::Remove {
            thread: 0,
            binding: binding(0x4001),
        });
        // The agent restarts before thread 0 answers: a new round keeps the held removal.
        let mut pending = PendingSync::start(Some(pending), 2, 2);
        assert_eq!(pending.held.len(), 1);
        pending.parts[0] = Some(vec![lease(0x4000)]);
        pending.parts[1] = Some(vec![lease(0x4002), lease(0x4003)]);
        let union: Vec<u16> = pending
            .take_union()
            .unwrap()
            .iter()
            .map(|(_, l)| l.binding.channel.value())
            .collect();
        assert_eq!(union, vec![0x4000, 0x4002, 0x4003]);
    }

    fn link(events: Vec<mpsc::Sender<FromAgent>>, resync: Arc<AtomicBool>) -> Link {
        let config = DataPlaneConfig {
            listeners: Vec::new(),
            ports: 49152..=65535,
            relay_ipv4: None,
            relay_ipv6: None,
        };
        Link::new(PathBuf::from("/nonexistent"), config, events, resync)
    }

    #[test]
    fn what_does_not_fit_the_queue_is_accounted_for() {
        let (queue, requests) = super::queue(1);
        queue.remove(0, binding(0x4000));
        assert!(!requests.resync.load(Ordering::Acquire), "it fitted");
        assert!(
            !queue.install(0, lease(0x4001)),
            "no room: user space relays it"
        );
        assert!(
            !requests.resync.load(Ordering::Acquire),
            "a failed install leaves no trace"
        );
        queue.remove(0, binding(0x4002));
        assert!(
            requests.resync.load(Ordering::Acquire),
            "a dropped removal needs a sync"
        );
        assert!(queue.try_slot().is_none());
    }

    #[test]
    fn leases_go_out_with_what_is_left_of_their_lifetime() {
        let now = std::time::Instant::now();
        let at = |offset: Duration, channel: u16| Lease {
            expires: now + offset,
            ..lease(channel)
        };
        let leases = [
            at(Duration::from_millis(299_999), 0x4000),
            // Ended: left out.
            at(Duration::ZERO, 0x4001),
            at(Duration::from_micros(1), 0x4002),
            // Beyond what the agent takes: capped.
            at(Duration::from_secs(7200), 0x4003),
        ];
        let wire: Vec<(u32, u32)> = wire(leases.iter(), now)
            .map(|b| (b.channel, b.lifetime_ms))
            .collect();
        assert_eq!(
            wire,
            vec![(0x4000, 299_999), (0x4002, 1), (0x4003, 3_600_000)]
        );
        let ended = Lease {
            expires: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
            ..lease(0x4004)
        };
        assert_eq!(wire_removals([ended.binding].iter())[0].lifetime_ms, 0);
    }

    #[test]
    fn dont_fragment_reaches_the_wire_on_install_and_removal() {
        let now = std::time::Instant::now();
        for dont_fragment in [false, true] {
            let lease = Lease {
                binding: ChannelBinding {
                    dont_fragment,
                    ..binding(0x4000)
                },
                ..lease(0x4000)
            };
            let installed: Vec<_> = wire([lease.clone()].iter(), now).collect();
            assert_eq!(installed[0].dont_fragment, dont_fragment);
            let removed = wire_removals([lease.binding].iter());
            assert_eq!(removed[0].dont_fragment, dont_fragment);
            // The agent removes what it installed: the same binding.
            assert_eq!(
                proto::Binding::try_from(&removed[0]).unwrap(),
                proto::Binding::try_from(&installed[0]).unwrap()
            );
        }
    }

    #[test]
    fn a_sync_streams_in_parts_under_one_generation() {
        let now = std::time::Instant::now();
        let leases: Vec<Lease> = (0..(2 * proto::SYNC_PART_BINDINGS + 1))
            .map(|i| lease(0x4000 + (i % 0x3fff) as u16))
            .collect();
        let parts = sync_parts(7, wire(leases.iter(), now).collect());
        let sizes: Vec<usize> = parts.iter().map(|p| p.bindings.len()).collect();
        assert_eq!(
            sizes,
            vec![proto::SYNC_PART_BINDINGS, proto::SYNC_PART_BINDINGS, 1]
        );
        assert!(parts.iter().all(|p| p.generation == 7));
        let empty = sync_parts(8, Vec::new());
        assert_eq!(empty.len(), 1, "an empty set still carries its generation");
        assert!(empty[0].bindings.is_empty() && empty[0].generation == 8);
    }

    #[test]
    fn refused_syncs_back_off_from_one_second_to_thirty() {
        let mut link = link(Vec::new(), Arc::default());
        let mut delays = Vec::new();
        for _ in 0..7 {
            delays.push(link.sync_backoff.as_secs());
            link.sync_refused("RESOURCE_EXHAUSTED: map full");
            assert!(link.retry_at.is_some());
        }
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30]);
    }

    #[tokio::test]
    async fn a_new_round_covers_dropped_removals_and_a_pending_retry() {
        let (tx, mut rx) = mpsc::channel(4);
        let resync = Arc::new(AtomicBool::new(true));
        let mut link = link(vec![tx], Arc::clone(&resync));
        link.sync_refused("INVALID_ARGUMENT: bad binding");
        link.start_round().await;
        assert!(!resync.load(Ordering::Acquire));
        assert!(link.retry_at.is_none());
        assert!(matches!(
            rx.try_recv(),
            Ok(FromAgent::Connected { round: 1 })
        ));
        assert_eq!(
            link.sync_backoff,
            Duration::from_secs(2),
            "only a success resets it"
        );
    }
}
