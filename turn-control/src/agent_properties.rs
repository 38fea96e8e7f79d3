//! A property of the link to the agent: whatever the interleaving of installs, refreshes,
//! removals, requests that do not fit the queue, expiries, refused Syncs, agent restarts
//! (keeping or losing its maps) and turn-control restarts, the agent ends up holding exactly
//! the bindings the core holds in the data plane, each until the expiry the core gave it,
//! and at no point holds an entry beyond the latest expiry the core granted it.
//!
//! The link ([`agent::run`]) is the real one; the event-loop thread is a model that does
//! what `eventloop.rs` and the core do with the link's events (an install that does not go
//! out or fails falls back to user space and is removed, a sync round is answered with the
//! thread's bindings); the agent is a fake gRPC server with the agent's map semantics
//! (install replaces a binding and its expiry, a Sync replaces the set, an entry past its
//! expiry is gone).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proto::v1::data_plane_server::{DataPlane, DataPlaneServer};
use proto::v1::*;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use turn_control_core::{
    ChannelBinding, ChannelNumber, ClientAddr, PeerAddr, RelayAddr, Transport,
};

use crate::agent::{self, AgentQueue, FromAgent, Lease, ToAgent};

/// What a lifetime may gain between the core's instant and the agent's: the wire rounds up
/// to whole milliseconds, and the agent adds the lifetime when it receives it, so the time
/// the request spent on its way (queued behind others, a thread not scheduled on a busy
/// machine) is added too. 5 ms proved too tight with the whole test suite on two cores; 50 ms
/// still tells a lifetime that was not recomputed at send time (seconds too long) from
/// transit delay.
const SLACK: Duration = Duration::from_millis(50);
/// How long the link may take to converge after the last step: a refused Sync is retried
/// after up to 2 s here (the backoff doubles from 1 s), an agent restart is noticed by the
/// 2 s probe, reconnects back off up to 5 s.
const CONVERGENCE: Duration = Duration::from_secs(20);

/// A binding's identity on the wire, without its lifetime.
fn identity(b: &proto::v1::ChannelBinding) -> String {
    format!(
        "{} {:#06x} {} {} {}",
        b.client, b.channel, b.peer, b.allocation_port, b.listener
    )
}

/// The fake agent's state: what its maps hold, with each entry's expiry.
#[derive(Default)]
struct Maps {
    entries: HashMap<String, Instant>,
    generation: u64,
}

#[derive(Default, Clone)]
struct FakeAgent {
    maps: Arc<Mutex<Maps>>,
    /// The latest expiry the core granted each binding, shared with the model.
    granted: Arc<Mutex<HashMap<String, Instant>>>,
    /// Entries written beyond what the core granted.
    violations: Arc<Mutex<Vec<String>>>,
    /// Syncs to refuse before accepting again.
    refuse_syncs: Arc<AtomicU32>,
    syncs: Arc<AtomicU64>,
}

impl FakeAgent {
    /// Writes an entry, checking it against what the core granted.
    fn write(&self, maps: &mut Maps, binding: &proto::v1::ChannelBinding, now: Instant) {
        let id = identity(binding);
        let expires = now + Duration::from_millis(u64::from(binding.lifetime_ms));
        let granted = self.granted.lock().unwrap().get(&id).copied();
        if granted.is_none_or(|granted| expires > granted + SLACK) {
            self.violations.lock().unwrap().push(format!(
                "{id}: written until {expires:?}, the core granted {granted:?}"
            ));
        }
        maps.entries.insert(id, expires);
    }

    /// The entries not yet expired.
    fn live(&self) -> HashMap<String, Instant> {
        let now = Instant::now();
        let maps = self.maps.lock().unwrap();
        maps.entries
            .iter()
            .filter(|(_, expires)| **expires > now)
            .map(|(id, expires)| (id.clone(), *expires))
            .collect()
    }

    /// Serves on `path` until the returned sender is dropped.
    fn serve(&self, path: &Path) -> tokio::sync::oneshot::Sender<()> {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let service = DataPlaneServer::new(self.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        stop
    }
}

#[tonic::async_trait]
impl DataPlane for FakeAgent {
    async fn install_channel_binding(
        &self,
        request: Request<InstallChannelBindingRequest>,
    ) -> Result<Response<InstallChannelBindingResponse>, Status> {
        let now = Instant::now();
        let mut maps = self.maps.lock().unwrap();
        for binding in &request.get_ref().bindings {
            if binding.lifetime_ms == 0 {
                return Err(Status::invalid_argument("lifetime_ms 0"));
            }
            self.write(&mut maps, binding, now);
        }
        Ok(Response::new(InstallChannelBindingResponse {
            installed: maps.entries.len() as u64,
        }))
    }

    async fn remove_channel_binding(
        &self,
        request: Request<RemoveChannelBindingRequest>,
    ) -> Result<Response<RemoveChannelBindingResponse>, Status> {
        let mut maps = self.maps.lock().unwrap();
        let mut removed_bindings = Vec::new();
        for binding in &request.get_ref().bindings {
            if maps.entries.remove(&identity(binding)).is_some() {
                removed_bindings.push(binding.clone());
            }
        }
        Ok(Response::new(RemoveChannelBindingResponse {
            removed: removed_bindings.len() as u64,
            removed_bindings,
        }))
    }

    type ListUsageStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<ListUsageResponse, Status>> + Send + 'static>,
    >;

    /// The fake relays nothing: every binding it holds has counted nothing.
    async fn list_usage(
        &self,
        _: Request<ListUsageRequest>,
    ) -> Result<Response<Self::ListUsageStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::iter(Vec::new()))))
    }

    async fn sync(
        &self,
        request: Request<tonic::Streaming<SyncRequest>>,
    ) -> Result<Response<SyncResponse>, Status> {
        let mut stream = request.into_inner();
        let mut parts = Vec::new();
        while let Some(part) = stream.message().await? {
            parts.push(part);
        }
        let refuse = self
            .refuse_syncs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            return Err(Status::resource_exhausted("refused on cue"));
        }
        let generation = parts.first().map_or(0, |p| p.generation);
        let now = Instant::now();
        let mut maps = self.maps.lock().unwrap();
        maps.entries.clear();
        for binding in parts.iter().flat_map(|p| &p.bindings) {
            self.write(&mut maps, binding, now);
        }
        maps.generation = generation;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(SyncResponse {
            generation,
            installed: maps.entries.len() as u64,
            ..SyncResponse::default()
        }))
    }

    async fn list_channel_bindings(
        &self,
        _: Request<ListChannelBindingsRequest>,
    ) -> Result<Response<ListChannelBindingsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_channel_binding(
        &self,
        _: Request<GetChannelBindingRequest>,
    ) -> Result<Response<proto::v1::ChannelBinding>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn set_config(
        &self,
        _: Request<SetConfigRequest>,
    ) -> Result<Response<DataPlaneConfig>, Status> {
        Ok(Response::new(DataPlaneConfig::default()))
    }

    async fn get_config(
        &self,
        _: Request<GetConfigRequest>,
    ) -> Result<Response<DataPlaneConfig>, Status> {
        Ok(Response::new(DataPlaneConfig::default()))
    }

    async fn counters(
        &self,
        _: Request<CountersRequest>,
    ) -> Result<Response<CountersResponse>, Status> {
        Ok(Response::new(CountersResponse::default()))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            generation: self.maps.lock().unwrap().generation,
            ..HealthResponse::default()
        }))
    }
}

/// One step of a run.
#[derive(Debug, Clone)]
enum Step {
    /// A channel bound (or bound again) for binding `which`, alive for `lifetime`.
    Bind { which: usize, lifetime: Duration },
    /// The channel, its permission or its allocation refreshed: a new expiry.
    Refresh { which: usize, lifetime: Duration },
    /// The channel deleted (its allocation deleted, its permission revoked).
    Remove { which: usize },
    /// Time passes.
    Pause(Duration),
    /// The agent refuses its next `n` Syncs.
    RefuseSyncs(u32),
    /// The agent is killed and started again, its pinned maps kept or not.
    RestartAgent { keep_maps: bool },
    /// turn-control is killed and started again: a new process with no allocations.
    RestartTurnControl,
}

fn step() -> impl Strategy<Value = Step> {
    let which = 0..BINDINGS;
    let lifetime = prop_oneof![
        3 => (2_000u64..30_000).prop_map(Duration::from_millis),
        1 => (30u64..400).prop_map(Duration::from_millis),
    ];
    prop_oneof![
        6 => (which.clone(), lifetime.clone()).prop_map(|(which, lifetime)| Step::Bind { which, lifetime }),
        4 => (which.clone(), lifetime).prop_map(|(which, lifetime)| Step::Refresh { which, lifetime }),
        4 => which.prop_map(|which| Step::Remove { which }),
        3 => (0u64..60).prop_map(|ms| Step::Pause(Duration::from_millis(ms))),
        1 => (1u32..3).prop_map(Step::RefuseSyncs),
        1 => any::<bool>().prop_map(|keep_maps| Step::RestartAgent { keep_maps }),
        1 => Just(Step::RestartTurnControl),
    ]
}

/// Bindings the steps choose from, few enough that they collide.
const BINDINGS: usize = 6;

fn binding(which: usize) -> ChannelBinding {
    let peer = if which.is_multiple_of(2) {
        "198.51.100.1:9000"
    } else {
        "[2001:db8::7]:9000"
    };
    let relay = if which.is_multiple_of(2) {
        "203.0.113.1:50000"
    } else {
        "[2001:db8::1]:50000"
    };
    ChannelBinding {
        client: ClientAddr("192.0.2.1:5000".parse().unwrap()),
        server: "203.0.113.1:3478".parse().unwrap(),
        transport: Transport::Udp,
        relay: RelayAddr(relay.parse().unwrap()),
        peer: PeerAddr(peer.parse().unwrap()),
        channel: ChannelNumber::new(0x4000 + which as u16).unwrap(),
        dont_fragment: false,
    }
}

fn wire_identity(binding: &ChannelBinding) -> String {
    let wire = proto::v1::ChannelBinding::from(&proto::Binding {
        client: binding.client.0,
        channel: binding.channel.value(),
        peer: binding.peer.0,
        allocation_port: binding.relay.port().0,
        listener: binding.server,
        dont_fragment: binding.dont_fragment,
    });
    identity(&wire)
}

/// A channel as the core holds it.
#[derive(Debug, Clone, Copy)]
struct Channel {
    expires: Instant,
    in_kernel: bool,
}

/// The event-loop thread and its core, as far as the link sees them; and the link task.
struct Daemon {
    queue: AgentQueue,
    events: mpsc::Receiver<FromAgent>,
    link: tokio::task::JoinHandle<()>,
    connected: bool,
    /// A sync round owed to the link.
    sync_part: Option<u64>,
    channels: HashMap<usize, Channel>,
    granted: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Daemon {
    /// A new turn-control process: no allocations, a new link.
    fn start(path: &Path, capacity: usize, granted: Arc<Mutex<HashMap<String, Instant>>>) -> Self {
        let (queue, requests) = agent::queue(capacity);
        let (tx, events) = mpsc::channel(64);
        let config = agent::DataPlaneConfig {
            listeners: vec!["203.0.113.1:3478".parse().unwrap()],
            ports: 49152..=65535,
            relay_ipv4: None,
            relay_ipv6: None,
        };
        let link = tokio::spawn(agent::run(path.to_path_buf(), config, requests, vec![tx]));
        Self {
            queue,
            events,
            link,
            connected: false,
            sync_part: None,
            channels: HashMap::new(),
            granted,
        }
    }

    /// `Command::InstallChannel`, as the event loop carries it out.
    fn install(&mut self, which: usize) {
        let Some(channel) = self.channels.get(&which).copied() else {
            return;
        };
        let binding = binding(which);
        let mut granted = self.granted.lock().unwrap();
        let latest = granted
            .entry(wire_identity(&binding))
            .or_insert(channel.expires);
        *latest = (*latest).max(channel.expires);
        drop(granted);
        let lease = Lease {
            binding,
            expires: channel.expires,
            limits: Default::default(),
        };
        if !(self.connected && self.queue.install(0, lease)) {
            self.install_failed(which);
        }
    }

    /// The core's answer to a failed install: user space relays the channel, and a removal
    /// takes out whatever an earlier install left in the kernel.
    fn install_failed(&mut self, which: usize) {
        if let Some(channel) = self.channels.get_mut(&which)
            && channel.in_kernel
        {
            channel.in_kernel = false;
            self.remove_from_kernel(which);
        }
    }

    /// `Command::RemoveChannel`, as the event loop carries it out.
    fn remove_from_kernel(&self, which: usize) {
        if self.connected {
            self.queue.remove(0, binding(which));
        }
    }

    fn step(&mut self, step: &Step) {
        let now = Instant::now();
        match *step {
            Step::Bind { which, lifetime } => {
                if let Some(old) = self.channels.remove(&which)
                    && old.in_kernel
                {
                    self.remove_from_kernel(which);
                }
                self.channels.insert(
                    which,
                    Channel {
                        expires: now + lifetime,
                        in_kernel: true,
                    },
                );
                self.install(which);
            }
            Step::Refresh { which, lifetime } => {
                if let Some(channel) = self.channels.get_mut(&which) {
                    channel.expires = now + lifetime;
                    if channel.in_kernel {
                        self.install(which);
                    }
                }
            }
            Step::Remove { which } => {
                if self.channels.remove(&which).is_some_and(|c| c.in_kernel) {
                    self.remove_from_kernel(which);
                }
            }
            Step::Pause(_) | Step::RefuseSyncs(_) | Step::RestartAgent { .. } => {}
            Step::RestartTurnControl => unreachable!("the run restarts the daemon"),
        }
    }

    /// The core's timers: channels past their expiry end.
    fn expire(&mut self) {
        let now = Instant::now();
        let ended: Vec<usize> = self
            .channels
            .iter()
            .filter(|(_, c)| c.expires <= now)
            .map(|(which, _)| *which)
            .collect();
        for which in ended {
            self.step(&Step::Remove { which });
        }
    }

    /// The link's events, as the event loop handles them.
    fn handle_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            match event {
                FromAgent::Installed(failed, Err(_)) => {
                    if let Some(which) = (0..BINDINGS).find(|w| binding(*w) == failed) {
                        self.install_failed(which);
                    }
                }
                // Figures: nothing here depends on them.
                FromAgent::Installed(_, Ok(())) | FromAgent::Removed(..) | FromAgent::Usage(_) => {}
                FromAgent::Connected { round } => {
                    self.connected = true;
                    self.sync_part = Some(round);
                }
                FromAgent::Disconnected => {
                    self.connected = false;
                    self.sync_part = None;
                }
            }
        }
        if let Some(round) = self.sync_part
            && let Some(permit) = self.queue.try_slot()
        {
            self.sync_part = None;
            let leases = self
                .channels
                .iter()
                .filter(|(_, c)| c.in_kernel)
                .map(|(which, c)| Lease {
                    binding: binding(*which),
                    expires: c.expires,
                    limits: Default::default(),
                })
                .collect();
            permit.send(ToAgent::Sync {
                thread: 0,
                round,
                leases,
            });
        }
    }

    /// What the kernel should hold: the channels in the data plane, by identity.
    fn expected(&self) -> HashMap<String, Instant> {
        let now = Instant::now();
        self.channels
            .iter()
            .filter(|(_, c)| c.in_kernel && c.expires > now)
            .map(|(which, c)| (wire_identity(&binding(*which)), c.expires))
            .collect()
    }
}

/// Whether the agent holds what the daemon expects, expiries within [`SLACK`].
fn converged(agent: &HashMap<String, Instant>, expected: &HashMap<String, Instant>) -> bool {
    agent.len() == expected.len()
        && expected.iter().all(|(id, expires)| {
            agent.get(id).is_some_and(|held| {
                held.saturating_duration_since(*expires) <= SLACK
                    && expires.saturating_duration_since(*held) <= SLACK
            })
        })
}

async fn run_case(steps: Vec<Step>, capacity: usize, path: PathBuf) -> Result<(), String> {
    let fake = FakeAgent::default();
    let mut stop = Some(fake.serve(&path));
    let mut daemon = Daemon::start(&path, capacity, Arc::clone(&fake.granted));
    // Connected and synced before the steps, as a daemon is shortly after its start.
    let deadline = Instant::now() + CONVERGENCE;
    while fake.syncs.load(Ordering::SeqCst) == 0 {
        daemon.handle_events();
        assert!(Instant::now() < deadline, "no first sync");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for step in &steps {
        match step {
            Step::Pause(pause) => tokio::time::sleep(*pause).await,
            Step::RefuseSyncs(n) => fake.refuse_syncs.store(*n, Ordering::SeqCst),
            Step::RestartAgent { keep_maps } => {
                drop(stop.take());
                if !keep_maps {
                    *fake.maps.lock().unwrap() = Maps::default();
                }
                tokio::task::yield_now().await;
                stop = Some(fake.serve(&path));
            }
            Step::RestartTurnControl => {
                daemon.link.abort();
                daemon = Daemon::start(&path, capacity, Arc::clone(&fake.granted));
            }
            step => daemon.step(step),
        }
        daemon.handle_events();
        daemon.expire();
        tokio::task::yield_now().await;
    }
    fake.refuse_syncs.store(0, Ordering::SeqCst);
    let deadline = Instant::now() + CONVERGENCE;
    let outcome = loop {
        daemon.handle_events();
        daemon.expire();
        let (held, expected) = (fake.live(), daemon.expected());
        if converged(&held, &expected) {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(format!(
                "not converged within {CONVERGENCE:?}: agent holds {held:?}, core expects {expected:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    daemon.link.abort();
    drop(stop);
    let violations = fake.violations.lock().unwrap().clone();
    outcome?;
    if violations.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "entries beyond their granted expiry: {violations:?}"
        ))
    }
}

static CASE: AtomicU64 = AtomicU64::new(0);

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        // Each case runs in real time against the link's real timers.
        max_shrink_iters: 8,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_agent_converges_on_the_cores_bindings_and_never_outlives_them(
        steps in proptest::collection::vec(step(), 1..40),
        capacity in 1usize..6,
    ) {
        let dir = std::env::temp_dir().join(format!(
            "turn-control-link-{}-{}",
            std::process::id(),
            CASE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let outcome = runtime.block_on(run_case(steps, capacity, path));
        runtime.shutdown_timeout(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&dir);
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}
