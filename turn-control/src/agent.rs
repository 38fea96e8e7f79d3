//! The link to the xdp-agent: a task that owns the gRPC client, fed by a channel from the
//! event loop and answering through another, so that no RPC ever runs on the packet path.
//!
//! While the agent is unreachable every install is answered as failed at once, so the core
//! relays those channels in user space instead of holding ChannelBind successes for the
//! offload timeout. On every (re)connect each event-loop thread pushes its share of the
//! bindings the data plane should hold ([`ToAgent::Sync`]); the link sends their union as one
//! Sync RPC, holding back installs and removals until it has gone out so that none of them is
//! undone by it.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use turn_core::{ChannelBinding, OffloadError};

/// Requests from the event-loop threads; `shard` is the sender's index, where answers go.
#[derive(Debug)]
pub enum ToAgent {
    /// Add one binding; answer with [`FromAgent::Installed`].
    Install {
        /// The sending thread.
        shard: usize,
        /// The binding.
        binding: ChannelBinding,
    },
    /// Remove one binding; no answer.
    Remove(ChannelBinding),
    /// One thread's full set of bindings, its answer to [`FromAgent::Connected`]. Once every
    /// thread answered, their union goes out as one Sync RPC; failures are logged.
    Sync {
        /// The sending thread.
        shard: usize,
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

/// First and longest wait between connection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How often an idle connection is probed, so that an agent restart is noticed (and the
/// full sync sent) even when no binding changes.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest time one RPC may take before the agent counts as gone.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Bindings per RPC.
const MAX_BATCH: usize = 256;

/// What the data plane must know besides the bindings, sent with SetConfig on every
/// connect (explicit relay addresses override the agent's interface discovery).
#[derive(Debug, Clone)]
pub struct DataPlane {
    /// The TURN port clients send ChannelData to.
    pub listen_port: u16,
    /// The allocation port range.
    pub ports: std::ops::RangeInclusive<u16>,
    /// The local IPv4 relay address.
    pub relay_v4: Option<std::net::Ipv4Addr>,
    /// The local IPv6 relay address.
    pub relay_v6: Option<std::net::Ipv6Addr>,
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
    /// A new round of `shards` parts; requests held for an unfinished earlier round stay
    /// held (the new parts reflect them, and they are answered after the new Sync).
    fn start(earlier: Option<PendingSync>, round: u64, shards: usize) -> Self {
        Self {
            round,
            parts: (0..shards).map(|_| None).collect(),
            held: earlier.map(|p| p.held).unwrap_or_default(),
        }
    }

    /// The connection is gone: what was held is abandoned (see [`Ops::abandon`]).
    async fn abandon(pending: &mut Option<PendingSync>, events: &[mpsc::Sender<FromAgent>]) {
        if let Some(p) = pending.take() {
            let mut ops = Ops::default();
            for request in p.held {
                ops.request(request);
            }
            ops.abandon(events, &OffloadError::Unavailable).await;
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

/// Sends `event` to every event-loop thread.
async fn broadcast(events: &[mpsc::Sender<FromAgent>], event: impl Fn() -> FromAgent) {
    for tx in events {
        let _ = tx.send(event()).await;
    }
}

/// Runs the link until `requests` closes (after every thread's shutdown drain), then
/// returns once what was queued has been sent or dropped. `events[i]` reaches thread `i`.
pub async fn run(
    path: PathBuf,
    data_plane: DataPlane,
    mut requests: mpsc::Receiver<ToAgent>,
    events: Vec<mpsc::Sender<FromAgent>>,
) {
    // Sync generations grow across restarts of this daemon too.
    let mut generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    // The generation of our last successful Sync, compared with the agent's Health.
    let mut synced: Option<u64> = None;
    let mut backoff = BACKOFF.0;
    let mut client: Option<proto::DataPlaneClient> = None;
    let mut next_attempt = tokio::time::Instant::now();
    let mut buf = Vec::with_capacity(MAX_BATCH);
    let mut pending: Option<PendingSync> = None;
    let mut round: u64 = 0;
    loop {
        if client.is_none() && tokio::time::Instant::now() >= next_attempt {
            match tokio::time::timeout(RPC_TIMEOUT, proto::connect(path.clone())).await {
                Ok(Ok(mut c)) => {
                    tracing::info!(agent = %path.display(), "connected to xdp-agent");
                    if let Err(error) = set_config(&mut c, &data_plane).await {
                        metrics::counter!(crate::metrics::name::AGENT_RPC_ERRORS).increment(1);
                        tracing::warn!(%error, "xdp-agent SetConfig failed");
                    }
                    client = Some(c);
                    synced = None;
                    backoff = BACKOFF.0;
                    metrics::gauge!(crate::metrics::name::AGENT_CONNECTED).set(1.0);
                    round += 1;
                    pending = Some(PendingSync::start(pending.take(), round, events.len()));
                    broadcast(&events, || FromAgent::Connected { round }).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(agent = %path.display(), error = %error_chain(&error), "xdp-agent unreachable");
                }
                Err(_) => tracing::debug!(agent = %path.display(), "xdp-agent connect timed out"),
            }
            if client.is_none() {
                next_attempt = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
        let wake = if client.is_some() {
            tokio::time::Instant::now() + PROBE_INTERVAL
        } else {
            next_attempt
        };
        buf.clear();
        tokio::select! {
            n = requests.recv_many(&mut buf, MAX_BATCH) => {
                if n == 0 {
                    return;
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if let Some(c) = &mut client {
                    match probe(c).await {
                        Err(error) => {
                            lost(&mut client, &events, &path, &error).await;
                            PendingSync::abandon(&mut pending, &events).await;
                            next_attempt = tokio::time::Instant::now();
                        }
                        // The gRPC channel reconnects by itself, so an agent restart
                        // between two probes shows only as a generation that is not ours:
                        // push the full state again.
                        Ok(Some(agent_generation)) if synced.is_some_and(|g| g != agent_generation) => {
                            tracing::info!(agent_generation, ours = ?synced, "xdp-agent lost our state (restarted?); resyncing");
                            synced = None;
                            round += 1;
                            pending = Some(PendingSync::start(pending.take(), round, events.len()));
                            broadcast(&events, || FromAgent::Connected { round }).await;
                        }
                        Ok(_) => {}
                    }
                }
                continue;
            }
        }
        let ops = plan(buf.drain(..), &mut pending);
        let Some(c) = &mut client else {
            // RFC 8656 §12 leaves relaying to the server; without an agent it is ours.
            ops.abandon(&events, &OffloadError::Unavailable).await;
            continue;
        };
        let mut failure = None;
        let mut ops = ops.0.into_iter();
        // In arrival order: an Install followed by the Remove of the same binding (a
        // ChannelBind, then at once a Refresh with lifetime 0) must not leave it installed.
        for op in ops.by_ref() {
            let result = match op {
                Op::Remove(bindings) => call(c, Call::Remove, &bindings).await,
                Op::Sync(all) => {
                    generation += 1;
                    match sync(c, generation, &all).await {
                        Ok(SyncKind::Generation) => {
                            synced = Some(generation);
                            tracing::info!(
                                bindings = all.len(),
                                generation,
                                "full sync sent to xdp-agent"
                            );
                            Ok(())
                        }
                        Ok(SyncKind::AddOnly) => {
                            tracing::info!(
                                bindings = all.len(),
                                "full state added to xdp-agent (no Sync RPC)"
                            );
                            Ok(())
                        }
                        Err(error) => Err(error),
                    }
                }
                Op::Add(installs) => {
                    let bindings: Vec<ChannelBinding> = installs.iter().map(|(_, b)| *b).collect();
                    let result = call(c, Call::Add, &bindings).await;
                    let answer_with = match &result {
                        Ok(()) => Ok(()),
                        Err(RpcError::Rejected(reason)) => {
                            Err(OffloadError::Rejected(reason.clone()))
                        }
                        Err(RpcError::Gone(_)) => Err(OffloadError::Unavailable),
                    };
                    for (shard, b) in installs {
                        answer(&events, shard, b, answer_with.clone()).await;
                    }
                    result
                }
            };
            match result {
                Ok(()) => {}
                Err(error @ RpcError::Gone(_)) => {
                    failure = Some(error);
                    break;
                }
                // A refused request (a full map, say) fails alone.
                Err(RpcError::Rejected(reason)) => {
                    metrics::counter!(crate::metrics::name::AGENT_RPC_ERRORS).increment(1);
                    tracing::warn!(%reason, "xdp-agent refused a request");
                }
            }
        }
        if failure.is_some() {
            Ops(ops.collect())
                .abandon(&events, &OffloadError::Unavailable)
                .await;
        }
        if let Some(error) = failure {
            lost(&mut client, &events, &path, &error).await;
            PendingSync::abandon(&mut pending, &events).await;
            next_attempt = tokio::time::Instant::now();
        }
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
                    shard,
                    round,
                    bindings,
                },
                Some(p),
            ) if round == p.round => {
                if let Some(part) = p.parts.get_mut(shard) {
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
    /// AddChannelBinding, answered to each binding's thread.
    Add(Vec<(usize, ChannelBinding)>),
    /// RemoveChannelBinding.
    Remove(Vec<ChannelBinding>),
    /// Sync with every thread's bindings.
    Sync(Vec<ChannelBinding>),
}

/// The RPCs a batch of requests comes to, in arrival order: consecutive installs share one
/// AddChannelBinding, consecutive removals one RemoveChannelBinding.
#[derive(Debug, Default)]
struct Ops(Vec<Op>);

impl Ops {
    fn push(&mut self, op: Op) {
        self.0.push(op);
    }

    fn request(&mut self, request: ToAgent) {
        match (request, self.0.last_mut()) {
            (ToAgent::Install { shard, binding }, Some(Op::Add(installs)))
                if installs.len() < MAX_BATCH =>
            {
                installs.push((shard, binding));
            }
            (ToAgent::Install { shard, binding }, _) => {
                self.0.push(Op::Add(vec![(shard, binding)]))
            }
            (ToAgent::Remove(binding), Some(Op::Remove(removes))) if removes.len() < MAX_BATCH => {
                removes.push(binding);
            }
            (ToAgent::Remove(binding), _) => self.0.push(Op::Remove(vec![binding])),
            (ToAgent::Sync { .. }, _) => {}
        }
    }

    /// Nothing more goes to the agent: installs are answered with `error` (user space
    /// relays those channels); removals are dropped, since the full sync on reconnect
    /// replaces the agent's state.
    async fn abandon(self, events: &[mpsc::Sender<FromAgent>], error: &OffloadError) {
        let mut dropped = 0;
        for op in self.0 {
            match op {
                Op::Add(installs) => {
                    for (shard, b) in installs {
                        answer(events, shard, b, Err(error.clone())).await;
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

#[derive(Debug, Clone, Copy)]
enum Call {
    Add,
    Remove,
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

async fn call(
    client: &mut proto::DataPlaneClient,
    call: Call,
    bindings: &[ChannelBinding],
) -> Result<(), RpcError> {
    let bindings: Vec<proto::v1::ChannelBinding> = bindings.iter().map(to_proto).collect();
    let result = match call {
        Call::Add => {
            let request = proto::v1::AddChannelBindingRequest { bindings };
            tokio::time::timeout(RPC_TIMEOUT, client.add_channel_binding(request))
                .await
                .map(|r| r.map(drop))
        }
        Call::Remove => {
            let request = proto::v1::RemoveChannelBindingRequest { bindings };
            tokio::time::timeout(RPC_TIMEOUT, client.remove_channel_binding(request))
                .await
                .map(|r| r.map(drop))
        }
    };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(status)) => Err(classify(&status)),
        Err(_) => Err(RpcError::Gone("timed out".to_owned())),
    }
}

/// Health: `Some(generation)` the agent holds, `None` when it cannot say.
async fn probe(client: &mut proto::DataPlaneClient) -> Result<Option<u64>, RpcError> {
    match tokio::time::timeout(RPC_TIMEOUT, client.health(proto::v1::HealthRequest {})).await {
        Ok(Ok(health)) => Ok(Some(health.into_inner().generation)),
        // Any answer, even an error status, shows the agent is there.
        Ok(Err(status)) => match classify(&status) {
            RpcError::Rejected(_) => Ok(None),
            gone => Err(gone),
        },
        Err(_) => Err(RpcError::Gone("timed out".to_owned())),
    }
}

/// How the full state went over.
#[derive(Debug, Clone, Copy)]
enum SyncKind {
    /// Sync: the agent holds exactly this state under our generation.
    Generation,
    /// AddChannelBinding: an agent without Sync; stale entries may remain.
    AddOnly,
}

/// The full state (Sync replaces everything under a new generation, so entries of a previous
/// run of either daemon do not linger); AddChannelBinding when the agent predates Sync.
async fn sync(
    client: &mut proto::DataPlaneClient,
    generation: u64,
    bindings: &[ChannelBinding],
) -> Result<SyncKind, RpcError> {
    let request = proto::v1::SyncRequest {
        generation,
        bindings: bindings.iter().map(to_proto).collect(),
    };
    match tokio::time::timeout(RPC_TIMEOUT, client.sync(request)).await {
        Ok(Ok(_)) => Ok(SyncKind::Generation),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            if !bindings.is_empty() {
                call(client, Call::Add, bindings).await?;
            }
            Ok(SyncKind::AddOnly)
        }
        Ok(Err(status)) => Err(classify(&status)),
        Err(_) => Err(RpcError::Gone("timed out".to_owned())),
    }
}

async fn set_config(client: &mut proto::DataPlaneClient, dp: &DataPlane) -> Result<(), RpcError> {
    let request = proto::v1::SetConfigRequest {
        listen_port: Some(u32::from(dp.listen_port)),
        port_min: Some(u32::from(*dp.ports.start())),
        port_max: Some(u32::from(*dp.ports.end())),
        relay_ipv4: dp.relay_v4.map(|ip| ip.to_string()),
        relay_ipv6: dp.relay_v6.map(|ip| ip.to_string()),
        tail_adjust: None,
    };
    match tokio::time::timeout(RPC_TIMEOUT, client.set_config(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(classify(&status)),
        Err(_) => Err(RpcError::Gone("timed out".to_owned())),
    }
}

fn classify(status: &tonic::Status) -> RpcError {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            RpcError::Gone(status.message().to_owned())
        }
        _ => RpcError::Rejected(format!("{}: {}", status.code(), status.message())),
    }
}

async fn lost(
    client: &mut Option<proto::DataPlaneClient>,
    events: &[mpsc::Sender<FromAgent>],
    path: &std::path::Path,
    error: &RpcError,
) {
    metrics::counter!(crate::metrics::name::AGENT_RPC_ERRORS).increment(1);
    metrics::gauge!(crate::metrics::name::AGENT_CONNECTED).set(0.0);
    tracing::warn!(agent = %path.display(), %error, "lost the xdp-agent; relaying in user space until it is back");
    *client = None;
    broadcast(events, || FromAgent::Disconnected).await;
}

/// The outcome of an install, to the thread that asked.
async fn answer(
    events: &[mpsc::Sender<FromAgent>],
    shard: usize,
    binding: ChannelBinding,
    result: Result<(), OffloadError>,
) {
    if let Some(tx) = events.get(shard) {
        let _ = tx.send(FromAgent::Installed(binding, result)).await;
    }
}

/// The wire form of a binding (proto/xdp_agent.proto).
pub fn to_proto(b: &ChannelBinding) -> proto::v1::ChannelBinding {
    proto::v1::ChannelBinding {
        client: b.client.0.to_string(),
        channel: u32::from(b.channel.value()),
        peer: b.peer.0.to_string(),
        allocation_port: u32::from(b.relay.port().0),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use turn_core::{ChannelNumber, ClientAddr, PeerAddr, RelayAddr, Transport};

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
                Op::Add(v) => ("add", v.iter().map(|(_, b)| b.channel.value()).collect()),
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
                shard: 0,
                binding: binding(0x4000),
            },
            ToAgent::Install {
                shard: 1,
                binding: binding(0x4001),
            },
            ToAgent::Remove(binding(0x4000)),
            ToAgent::Remove(binding(0x4001)),
            ToAgent::Install {
                shard: 0,
                binding: binding(0x4000),
            },
        ] {
            ops.request(request);
        }
        assert_eq!(
            shape(&ops),
            vec![
                ("add", vec![0x4000, 0x4001]),
                ("remove", vec![0x4000, 0x4001]),
                ("add", vec![0x4000]),
            ]
        );
    }

    #[test]
    fn a_batch_never_exceeds_the_rpc_size() {
        let mut ops = Ops::default();
        for i in 0..(MAX_BATCH as u16 + 1) {
            ops.request(ToAgent::Install {
                shard: 0,
                binding: binding(0x4000 + i),
            });
        }
        let sizes: Vec<usize> = shape(&ops).iter().map(|(_, v)| v.len()).collect();
        assert_eq!(sizes, vec![MAX_BATCH, 1]);
    }

    fn install(shard: usize, channel: u16) -> ToAgent {
        ToAgent::Install {
            shard,
            binding: binding(channel),
        }
    }

    fn part(shard: usize, round: u64, channels: &[u16]) -> ToAgent {
        ToAgent::Sync {
            shard,
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
        assert_eq!(shape(&ops), vec![("add", vec![0x4000])]);
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
                ("add", vec![0x4001]),
                ("remove", vec![0x4000]),
                ("add", vec![0x4003]),
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
