//! The agent's gRPC service (`proto/xdp_agent.proto`) on a unix socket.

use std::net::SocketAddr;
use std::sync::Arc;

use proto::v1::data_plane_server::DataPlane;
use proto::v1::{
    Attachment, ChannelBinding, CountersRequest, CountersResponse, DataPlaneConfig,
    GetChannelBindingRequest, GetConfigRequest, HealthRequest, HealthResponse,
    InstallChannelBindingRequest, InstallChannelBindingResponse, ListChannelBindingsRequest,
    ListChannelBindingsResponse, RemoveChannelBindingRequest, RemoveChannelBindingResponse,
    SetConfigRequest, SyncRequest, SyncResponse,
};
use proto::{Binding, BindingError, parse_address};
use tonic::{Code, Request, Response, Status};
use tracing::info;

use crate::maps::MapError;
use crate::metrics::name;
use crate::state::AgentState;

/// Serves the data-plane API over the agent's state.
#[derive(Debug, Clone)]
pub struct Service {
    state: Arc<AgentState>,
}

impl Service {
    /// A service over `state`.
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }

    /// Checks bindings to install against the configuration in force.
    fn check(&self, bindings: &[ChannelBinding]) -> Result<Vec<Binding>, Status> {
        let limits = self.state.settings().limits();
        parse_each(bindings, |binding| limits.check(binding))
    }

    /// Reads bindings to remove, their listeners resolved as at install.
    fn parse(&self, bindings: &[ChannelBinding]) -> Result<Vec<Binding>, Status> {
        let limits = self.state.settings().limits();
        parse_each(bindings, |binding| limits.parse(binding))
    }
}

/// Every binding of a request, parsed; the first that does not parse is
/// refused with its index.
fn parse_each(
    bindings: &[ChannelBinding],
    parse: impl Fn(&ChannelBinding) -> Result<Binding, BindingError>,
) -> Result<Vec<Binding>, Status> {
    bindings
        .iter()
        .enumerate()
        .map(|(index, binding)| {
            parse(binding)
                .map_err(|error| Status::invalid_argument(format!("bindings[{index}]: {error}")))
        })
        .collect()
}

fn map_status(error: MapError) -> Status {
    match error {
        MapError::Full { .. } => Status::resource_exhausted(error.to_string()),
        MapError::Kernel(_) => Status::internal(error.to_string()),
    }
}

/// Counts a request by method and outcome.
fn observe<T>(method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    metrics::counter!(name::GRPC_REQUESTS, "method" => method, "code" => format!("{code:?}"))
        .increment(1);
    result
}

/// Matches an address filter: empty, `ip` or `ip:port`.
fn matches(filter: &str, address: SocketAddr) -> Result<bool, Status> {
    if filter.is_empty() {
        return Ok(true);
    }
    if let Ok(ip) = filter.parse::<std::net::IpAddr>() {
        return Ok(ip.to_canonical() == address.ip());
    }
    let wanted =
        parse_address("filter", filter).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(wanted == address)
}

#[tonic::async_trait]
impl DataPlane for Service {
    async fn install_channel_binding(
        &self,
        request: Request<InstallChannelBindingRequest>,
    ) -> Result<Response<InstallChannelBindingResponse>, Status> {
        observe(
            "InstallChannelBinding",
            (|| {
                let bindings = self.check(&request.get_ref().bindings)?;
                let installed = self.state.maps.install(&bindings).map_err(map_status)?;
                info!(count = bindings.len(), installed, "bindings installed");
                Ok(Response::new(InstallChannelBindingResponse { installed }))
            })(),
        )
    }

    async fn remove_channel_binding(
        &self,
        request: Request<RemoveChannelBindingRequest>,
    ) -> Result<Response<RemoveChannelBindingResponse>, Status> {
        observe(
            "RemoveChannelBinding",
            (|| {
                let bindings = self.parse(&request.get_ref().bindings)?;
                let removed = self.state.maps.remove(&bindings).map_err(map_status)?;
                info!(count = bindings.len(), removed, "bindings removed");
                Ok(Response::new(RemoveChannelBindingResponse { removed }))
            })(),
        )
    }

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        observe(
            "Sync",
            (|| {
                let request = request.get_ref();
                let bindings = self.check(&request.bindings)?;
                let synced = self.state.maps.sync(&bindings).map_err(map_status)?;
                self.state.set_generation(request.generation);
                let installed = self.state.maps.installed();
                info!(
                    generation = request.generation,
                    added = synced.added,
                    removed = synced.removed,
                    orphans = synced.orphans,
                    installed,
                    "bindings synced"
                );
                // An orphan is half of a binding that is not in the set: it
                // counts as removed, the response having no figure of its own.
                Ok(Response::new(SyncResponse {
                    generation: request.generation,
                    added: synced.added,
                    removed: synced.removed + synced.orphans,
                    installed,
                }))
            })(),
        )
    }

    async fn list_channel_bindings(
        &self,
        request: Request<ListChannelBindingsRequest>,
    ) -> Result<Response<ListChannelBindingsResponse>, Status> {
        observe(
            "ListChannelBindings",
            (|| {
                let filter = request.get_ref();
                let mut bindings = Vec::new();
                for binding in self.state.maps.bindings().map_err(map_status)? {
                    if matches(&filter.client, binding.client)?
                        && matches(&filter.peer, binding.peer)?
                        && (filter.allocation_port == 0
                            || filter.allocation_port == u32::from(binding.allocation_port))
                    {
                        bindings.push(ChannelBinding::from(&binding));
                    }
                }
                Ok(Response::new(ListChannelBindingsResponse { bindings }))
            })(),
        )
    }

    async fn get_channel_binding(
        &self,
        request: Request<GetChannelBindingRequest>,
    ) -> Result<Response<ChannelBinding>, Status> {
        observe(
            "GetChannelBinding",
            (|| {
                let request = request.get_ref();
                let invalid = |error: BindingError| Status::invalid_argument(error.to_string());
                let client = parse_address("client", &request.client).map_err(invalid)?;
                let listener = match request.listener.as_str() {
                    "" => None,
                    text => {
                        let listener = parse_address("listener", text).map_err(invalid)?;
                        let limits = self.state.settings().limits();
                        Some(limits.resolve_listener(listener).map_err(invalid)?)
                    }
                };
                let found: Vec<Binding> = self
                    .state
                    .maps
                    .bindings()
                    .map_err(map_status)?
                    .into_iter()
                    .filter(|b| {
                        b.client == client
                            && u32::from(b.channel) == request.channel
                            && listener.is_none_or(|listener| b.listener == listener)
                    })
                    .collect();
                match found.as_slice() {
                    [] => Err(Status::not_found(format!(
                        "no binding for {client} on channel {:#06x}",
                        request.channel
                    ))),
                    [binding] => Ok(Response::new(ChannelBinding::from(binding))),
                    several => Err(Status::failed_precondition(format!(
                        "{} bindings for {client} on channel {:#06x}, one per listener ({}); \
                         give the listener",
                        several.len(),
                        request.channel,
                        several
                            .iter()
                            .map(|b| b.listener.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            })(),
        )
    }

    async fn set_config(
        &self,
        request: Request<SetConfigRequest>,
    ) -> Result<Response<DataPlaneConfig>, Status> {
        observe(
            "SetConfig",
            (|| {
                let mut refused = None;
                let settings = self
                    .state
                    .update_settings(|current| {
                        current.with_request(request.get_ref()).map_err(|error| {
                            refused = Some(error.to_string());
                            anyhow::anyhow!("refused")
                        })
                    })
                    .map_err(|error| match refused.take() {
                        Some(reason) => Status::invalid_argument(reason),
                        None => Status::internal(format!("{error:#}")),
                    })?;
                info!(config = ?settings.to_proto(), "data-plane configuration set");
                Ok(Response::new(settings.to_proto()))
            })(),
        )
    }

    async fn get_config(
        &self,
        _request: Request<GetConfigRequest>,
    ) -> Result<Response<DataPlaneConfig>, Status> {
        observe(
            "GetConfig",
            Ok(Response::new(self.state.settings().to_proto())),
        )
    }

    async fn counters(
        &self,
        _request: Request<CountersRequest>,
    ) -> Result<Response<CountersResponse>, Status> {
        observe(
            "Counters",
            (|| {
                let maps = &self.state.maps;
                let counters = maps.counters().map_err(map_status)?;
                let relayed = maps.relayed().map_err(map_status)?;
                let redirected = maps.redirected().map_err(map_status)?;
                let (_, lost_events) = self.state.reports.events_and_lost();
                Ok(Response::new(CountersResponse {
                    relayed_packets: relayed.packets,
                    relayed_bytes: relayed.bytes,
                    reported_bytes: self.state.reports.reported().bytes,
                    lost_events,
                    redirected_packets: redirected.packets,
                    redirected_bytes: redirected.bytes,
                    counters: counters
                        .into_iter()
                        .map(|(reason, counter)| proto::v1::Counter {
                            reason: reason.name().to_owned(),
                            verdict: reason.verdict().name().to_owned(),
                            packets: counter.packets,
                            bytes: counter.bytes,
                        })
                        .collect(),
                }))
            })(),
        )
    }

    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let state = &self.state;
        observe(
            "Health",
            Ok(Response::new(HealthResponse {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                attachments: state
                    .attachments
                    .iter()
                    .map(|(interface, mode)| Attachment {
                        interface: interface.clone(),
                        mode: mode.to_string(),
                    })
                    .collect(),
                generation: state.generation(),
                installed: state.maps.installed(),
                capacity: u64::from(state.maps.capacity()),
                uptime_seconds: state.started.elapsed().as_secs(),
                adopted: state.adopted,
            })),
        )
    }
}
