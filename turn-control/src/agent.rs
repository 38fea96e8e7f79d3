//! The link to the xdp-agent: a task that owns the gRPC client, fed by a channel from the
//! event loop and answering through another, so that no RPC ever runs on the packet path.
//!
//! While the agent is unreachable every install is answered as failed at once, so the core
//! relays those channels in user space instead of holding ChannelBind successes for the
//! offload timeout. On every (re)connect the event loop pushes the full set of bindings the
//! data plane should hold ([`ToAgent::Sync`]).

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use turn_core::{ChannelBinding, OffloadError};

/// Requests from the event loop.
#[derive(Debug)]
pub enum ToAgent {
    /// Add one binding; answer with [`FromAgent::Installed`].
    Install(ChannelBinding),
    /// Remove one binding; no answer.
    Remove(ChannelBinding),
    /// The full set of bindings after a (re)connect (the Sync RPC); failures are logged.
    Sync(Vec<ChannelBinding>),
}

/// Answers and link events for the event loop.
#[derive(Debug)]
pub enum FromAgent {
    /// The outcome of an [`ToAgent::Install`].
    Installed(ChannelBinding, Result<(), OffloadError>),
    /// The agent is reachable (again): the loop should send [`ToAgent::Sync`].
    Connected,
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

/// Runs the link until `requests` closes (after the loop's shutdown drain), then returns
/// once what was queued has been sent or dropped.
pub async fn run(
    path: PathBuf,
    data_plane: DataPlane,
    mut requests: mpsc::Receiver<ToAgent>,
    events: mpsc::Sender<FromAgent>,
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
    loop {
        if client.is_none() && tokio::time::Instant::now() >= next_attempt {
            match tokio::time::timeout(RPC_TIMEOUT, proto::connect(path.clone())).await {
                Ok(Ok(mut c)) => {
                    tracing::info!(agent = %path.display(), "connected to xdp-agent");
                    if let Err(error) = set_config(&mut c, &data_plane).await {
                        metrics::counter!("agent_rpc_errors_total").increment(1);
                        tracing::warn!(%error, "xdp-agent SetConfig failed");
                    }
                    client = Some(c);
                    synced = None;
                    backoff = BACKOFF.0;
                    let _ = events.send(FromAgent::Connected).await;
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
                            next_attempt = tokio::time::Instant::now();
                        }
                        // The gRPC channel reconnects by itself, so an agent restart
                        // between two probes shows only as a generation that is not ours:
                        // push the full state again.
                        Ok(Some(agent_generation)) if synced.is_some_and(|g| g != agent_generation) => {
                            tracing::info!(agent_generation, ours = ?synced, "xdp-agent lost our state (restarted?); resyncing");
                            synced = None;
                            let _ = events.send(FromAgent::Connected).await;
                        }
                        Ok(_) => {}
                    }
                }
                continue;
            }
        }
        let (mut installs, mut removes, mut syncs) = (Vec::new(), Vec::new(), None);
        for request in buf.drain(..) {
            match request {
                ToAgent::Install(b) => installs.push(b),
                ToAgent::Remove(b) => removes.push(b),
                // A later full state replaces an earlier one.
                ToAgent::Sync(all) => syncs = Some(all),
            }
        }
        let Some(c) = &mut client else {
            // RFC 8656 §12 leaves relaying to the server; without an agent it is ours.
            for b in installs {
                let _ = events
                    .send(FromAgent::Installed(b, Err(OffloadError::Unavailable)))
                    .await;
            }
            if !removes.is_empty() {
                tracing::debug!(
                    count = removes.len(),
                    "xdp-agent unreachable; removals dropped (the full sync on reconnect replaces its state)"
                );
            }
            continue;
        };
        let mut failure = None;
        if !removes.is_empty()
            && let Err(error) = call(c, Call::Remove, &removes).await
        {
            failure = Some(error);
        }
        if failure.is_none()
            && let Some(all) = syncs
        {
            generation += 1;
            match sync(c, generation, &all).await {
                Ok(SyncKind::Generation) => {
                    synced = Some(generation);
                    tracing::info!(
                        bindings = all.len(),
                        generation,
                        "full sync sent to xdp-agent"
                    );
                }
                Ok(SyncKind::AddOnly) => {
                    tracing::info!(
                        bindings = all.len(),
                        "full state added to xdp-agent (no Sync RPC)"
                    );
                }
                Err(error) => failure = Some(error),
            }
        }
        let install_result = if let Some(error) = &failure {
            Err(error.clone())
        } else if installs.is_empty() {
            Ok(())
        } else {
            call(c, Call::Add, &installs).await
        };
        for b in installs {
            let result = match &install_result {
                Ok(()) => Ok(()),
                Err(RpcError::Rejected(reason)) => Err(OffloadError::Rejected(reason.clone())),
                Err(RpcError::Gone(_)) => Err(OffloadError::Unavailable),
            };
            let _ = events.send(FromAgent::Installed(b, result)).await;
        }
        if let Err(error) = install_result {
            failure.get_or_insert(error);
        }
        match failure {
            Some(error @ RpcError::Gone(_)) => {
                lost(&mut client, &events, &path, &error).await;
                next_attempt = tokio::time::Instant::now();
            }
            Some(RpcError::Rejected(reason)) => {
                metrics::counter!("agent_rpc_errors_total").increment(1);
                tracing::warn!(%reason, "xdp-agent refused a request");
            }
            None => {}
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
    events: &mpsc::Sender<FromAgent>,
    path: &std::path::Path,
    error: &RpcError,
) {
    metrics::counter!("agent_rpc_errors_total").increment(1);
    tracing::warn!(agent = %path.display(), %error, "lost the xdp-agent; relaying in user space until it is back");
    *client = None;
    let _ = events.send(FromAgent::Disconnected).await;
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
