//! The agent's gRPC service (`proto/xdp_agent.proto`) on a unix socket, and
//! the server reflection beside it.
//!
//! Status codes of refusals: INVALID_ARGUMENT for a malformed request or one
//! that does not fit the configuration in force; PERMISSION_DENIED for what
//! the agent's own limits forbid whatever turn-control says: a binding whose
//! peer or client the peer policy refuses, a SetConfig reaching beyond the
//! agent's flags or naming a relay address its interfaces do not have. Each
//! message names the field.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use proto::v1::data_plane_server::DataPlane;
use proto::v1::{
    Attachment, ChannelBinding, CountersRequest, CountersResponse, DataPlaneConfig,
    GetChannelBindingRequest, GetConfigRequest, HealthRequest, HealthResponse,
    InstallChannelBindingRequest, InstallChannelBindingResponse, ListChannelBindingsRequest,
    ListChannelBindingsResponse, ListUsageRequest, ListUsageResponse, RateLimit,
    RemoveChannelBindingRequest, RemoveChannelBindingResponse, SetConfigRequest, SyncRequest,
    SyncResponse,
};
use proto::{Binding, BindingError, Lease, parse_address};
use tonic::transport::server::Router;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::binding::{Installed, Refused};
use crate::maps::{self, MapError};
use crate::metrics::name;
use crate::state::AgentState;
use crate::usage;

/// Bindings per part of a ListUsage answer: a part of a full map's stream
/// stays far below gRPC's 4 MiB message limit.
const USAGE_PART: usize = 4096;

/// Reasons a SyncResponse gives, for the first of the bindings it refused.
const MAX_REFUSALS: usize = 8;

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

    /// Checks bindings to install against the configuration in force;
    /// their lifetimes start at `now_ns`.
    fn check(&self, bindings: &[ChannelBinding], now_ns: u64) -> Result<Vec<Installed>, Status> {
        let limits = self.state.settings().limits();
        parse_each(bindings, |binding| {
            limits
                .check(binding)
                .map(|lease| Installed::new(&lease, now_ns))
        })
    }

    /// Reads bindings to remove, their listeners resolved as at install.
    fn parse(&self, bindings: &[ChannelBinding]) -> Result<Vec<Binding>, Status> {
        let limits = self.state.settings().limits();
        parse_each(bindings, |binding| {
            limits.parse(binding).map_err(Refused::from)
        })
    }

    /// Reads a Sync's parts: their one generation, and each binding checked
    /// (against the configuration in force when the stream began, its
    /// lifetime starting when its part arrived), in stream order. A stream
    /// of parts with different generations, or of more bindings than twice
    /// what the maps hold, is refused.
    async fn receive_sync(&self, mut parts: Streaming<SyncRequest>) -> Result<SyncSet, Status> {
        let limits = self.state.settings().limits();
        let most = 2 * self.state.maps.most_bindings();
        let mut set: Option<SyncSet> = None;
        while let Some(part) = parts.message().await? {
            let now_ns = maps::clock_ns();
            let set = set.get_or_insert_with(|| SyncSet {
                generation: part.generation,
                checked: Vec::new(),
            });
            if part.generation != set.generation {
                return Err(Status::invalid_argument(format!(
                    "the parts of a Sync carry generations {} and {}: all must carry the same",
                    set.generation, part.generation
                )));
            }
            if (set.checked.len() + part.bindings.len()) as u64 > most {
                return Err(Status::invalid_argument(format!(
                    "a Sync of more than {most} bindings (twice what the maps hold) is refused"
                )));
            }
            set.checked.extend(part.bindings.iter().map(|binding| {
                limits
                    .check(binding)
                    .map(|lease| Installed::new(&lease, now_ns))
            }));
        }
        set.ok_or_else(|| {
            Status::invalid_argument("a Sync needs at least one part, which carries its generation")
        })
    }

    /// Applies a received Sync: every valid binding that fits the maps,
    /// the others refused.
    async fn apply_sync(&self, set: SyncSet) -> Result<SyncResponse, Status> {
        let mut refusals = Refusals::default();
        let mut valid = Vec::with_capacity(set.checked.len());
        let mut positions = Vec::with_capacity(set.checked.len());
        for (index, checked) in set.checked.into_iter().enumerate() {
            match checked {
                Ok(installed) => {
                    valid.push(installed);
                    positions.push(index);
                }
                Err(error) => refusals.add(index, error),
            }
        }
        // Off the runtime's thread: 130 000 bindings take a while, and the
        // other RPCs (Health) go on meanwhile.
        let maps = Arc::clone(&self.state.maps);
        let synced = tokio::task::spawn_blocking(move || maps.sync(&valid))
            .await
            .map_err(|error| Status::internal(format!("the sync did not finish: {error}")))?
            .map_err(map_status)?;
        for (index, error) in synced.refused {
            refusals.add(positions[index], error);
        }
        self.state.set_generation(set.generation);
        let installed = self.state.maps.installed();
        info!(
            generation = set.generation,
            added = synced.added,
            removed = synced.removed,
            orphans = synced.orphans,
            refused = refusals.count,
            installed,
            "bindings synced"
        );
        if refusals.count > 0 {
            metrics::counter!(name::SYNC_REFUSED).increment(refusals.count);
            warn!(
                generation = set.generation,
                refused = refusals.count,
                first = refusals.reasons.first().map(|(_, reason)| reason.as_str()),
                "bindings left out of a sync: their traffic goes to turn-control"
            );
        }
        // An orphan is half of a binding that is not in the set: it counts
        // as removed, the response having no figure of its own.
        Ok(SyncResponse {
            generation: set.generation,
            added: synced.added,
            removed: synced.removed + synced.orphans,
            installed,
            refused: refusals.count,
            refusals: refusals
                .reasons
                .into_iter()
                .map(|(_, reason)| reason)
                .collect(),
        })
    }
}

/// A Sync's set as its stream brought it.
#[derive(Debug)]
struct SyncSet {
    generation: u64,
    /// Every binding of every part, in stream order, checked.
    checked: Vec<Result<Installed, Refused>>,
}

/// The bindings a Sync left out: how many, and why for the first
/// [`MAX_REFUSALS`] of them in stream order.
#[derive(Debug, Default)]
struct Refusals {
    count: u64,
    reasons: Vec<(usize, String)>,
}

impl Refusals {
    /// The binding at `index` of the stream is left out for `reason`.
    fn add(&mut self, index: usize, reason: impl fmt::Display) {
        self.count += 1;
        let later = self.reasons.last().is_some_and(|(last, _)| *last < index);
        if self.reasons.len() == MAX_REFUSALS && later {
            return;
        }
        let at = self.reasons.partition_point(|(other, _)| *other < index);
        self.reasons
            .insert(at, (index, format!("bindings[{index}]: {reason}")));
        self.reasons.truncate(MAX_REFUSALS);
    }
}

/// A binding as a listing shows it: with what is left of its lifetime at
/// `now_ns` (0 once it has passed), its usage and its meters (named by
/// their keys: the kernel keeps no names).
fn listed(installed: &Installed, now_ns: u64, maps: &maps::Maps) -> ChannelBinding {
    let mut wire = ChannelBinding::from(&Lease {
        binding: installed.binding,
        lifetime: installed.remaining(now_ns),
        rate_limits: Vec::new(),
    });
    wire.usage = Some(usage::to_wire(&maps.usage(installed.usage_slot)));
    wire.rate_limits = installed
        .meters
        .iter()
        .filter(|meter| meter.key != 0)
        .map(|meter| RateLimit {
            meter: format!("#{:016x}", meter.key),
            bytes_per_second: maps.meter_rate(meter.key),
        })
        .collect();
    wire
}

/// Every binding of a request, parsed; the first that does not parse is
/// refused with its index.
fn parse_each<T>(
    bindings: &[ChannelBinding],
    parse: impl Fn(&ChannelBinding) -> Result<T, Refused>,
) -> Result<Vec<T>, Status> {
    bindings
        .iter()
        .enumerate()
        .map(|(index, binding)| {
            parse(binding)
                .map_err(|error| Status::new(error.code(), format!("bindings[{index}]: {error}")))
        })
        .collect()
}

/// `router` with server reflection in both versions: v1, and v1alpha, the
/// only one Python's grpcio-reflection and several GUI clients speak. Both
/// describe the agent's API.
pub fn with_reflection(router: Router) -> Result<Router, tonic_reflection::server::Error> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::v1::FILE_DESCRIPTOR_SET)
    };
    Ok(router
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
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
                let bindings = self.check(&request.get_ref().bindings, maps::clock_ns())?;
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
        let result = match self.parse(&request.get_ref().bindings) {
            Ok(bindings) => {
                let state = Arc::clone(&self.state);
                // Blocking: the final figures wait for the program's runs
                // in flight (a grace period, milliseconds).
                let count = bindings.len();
                tokio::task::spawn_blocking(move || state.maps.remove(&bindings))
                    .await
                    .map_err(|error| Status::internal(error.to_string()))
                    .and_then(|removed| removed.map_err(map_status))
                    .map(|removed| {
                        info!(count, removed = removed.len(), "bindings removed");
                        let removed_bindings = removed
                            .iter()
                            .map(|(binding, final_usage)| ChannelBinding {
                                usage: Some(usage::to_wire(final_usage)),
                                ..ChannelBinding::from(binding)
                            })
                            .collect();
                        Response::new(RemoveChannelBindingResponse {
                            removed: removed.len() as u64,
                            removed_bindings,
                        })
                    })
            }
            Err(status) => Err(status),
        };
        observe("RemoveChannelBinding", result)
    }

    type ListUsageStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<ListUsageResponse, Status>> + Send + 'static>,
    >;

    async fn list_usage(
        &self,
        _request: Request<ListUsageRequest>,
    ) -> Result<Response<Self::ListUsageStream>, Status> {
        let result = self
            .state
            .maps
            .bindings()
            .map_err(map_status)
            .map(|installed| {
                let now_ns = maps::clock_ns();
                let parts: Vec<Result<ListUsageResponse, Status>> = installed
                    .chunks(USAGE_PART)
                    .map(|part| {
                        Ok(ListUsageResponse {
                            bindings: part
                                .iter()
                                .map(|installed| listed(installed, now_ns, &self.state.maps))
                                .collect(),
                        })
                    })
                    .collect();
                let stream: Self::ListUsageStream = Box::pin(tokio_stream::iter(parts));
                Response::new(stream)
            });
        observe("ListUsage", result)
    }

    async fn sync(
        &self,
        request: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<SyncResponse>, Status> {
        let result = match self.receive_sync(request.into_inner()).await {
            Ok(set) => self.apply_sync(set).await.map(Response::new),
            Err(status) => Err(status),
        };
        observe("Sync", result)
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
                let installed = self.state.maps.bindings().map_err(map_status)?;
                let now_ns = maps::clock_ns();
                for installed in installed {
                    let binding = &installed.binding;
                    if matches(&filter.client, binding.client)?
                        && matches(&filter.peer, binding.peer)?
                        && (filter.allocation_port == 0
                            || filter.allocation_port == u32::from(binding.allocation_port))
                    {
                        bindings.push(listed(&installed, now_ns, &self.state.maps));
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
                let found: Vec<Installed> = self
                    .state
                    .maps
                    .bindings()
                    .map_err(map_status)?
                    .into_iter()
                    .filter(|Installed { binding: b, .. }| {
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
                    [installed] => Ok(Response::new(listed(
                        installed,
                        maps::clock_ns(),
                        &self.state.maps,
                    ))),
                    several => Err(Status::failed_precondition(format!(
                        "{} bindings for {client} on channel {:#06x}, one per listener ({}); \
                         give the listener",
                        several.len(),
                        request.channel,
                        several
                            .iter()
                            .map(|installed| installed.binding.listener.to_string())
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
                            refused = Some(error);
                            anyhow::anyhow!("refused")
                        })
                    })
                    .map_err(|error| match refused.take() {
                        Some(reason) if reason.is_beyond_bounds() => {
                            warn!(%reason, "SetConfig reaches beyond the agent's flags: refused");
                            Status::permission_denied(reason.to_string())
                        }
                        Some(reason) => Status::invalid_argument(reason.to_string()),
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
                    expired_bindings: maps.expired(),
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

#[cfg(test)]
mod tests {
    use proto::v1::data_plane_server::DataPlaneServer;
    use tokio_stream::StreamExt as _;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Channel, Endpoint, Server};
    use tonic_reflection::pb::{v1, v1alpha};

    use super::*;

    const DATA_PLANE: &str = "xdpturn.agent.v1.DataPlane";

    /// The reflection services as the agent serves them, on a loopback TCP port.
    async fn reflection() -> Channel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = Server::builder().add_optional_service(None::<DataPlaneServer<Service>>);
        let router = with_reflection(router).unwrap();
        tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
        Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn v1alpha_reflection_lists_and_describes_the_data_plane() {
        use v1alpha::server_reflection_request::MessageRequest;
        use v1alpha::server_reflection_response::MessageResponse;
        let mut client =
            v1alpha::server_reflection_client::ServerReflectionClient::new(reflection().await);
        let requests = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol(DATA_PLANE.to_owned()),
        ]
        .map(|request| v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        });
        let mut responses = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let listed = responses.next().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::ListServicesResponse(listed)) = listed else {
            panic!("{listed:?}");
        };
        let names: Vec<&str> = listed.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&DATA_PLANE), "{names:?}");
        let described = responses.next().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::FileDescriptorResponse(files)) = described else {
            panic!("{described:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }

    #[tokio::test]
    async fn v1_reflection_lists_the_data_plane() {
        use v1::server_reflection_request::MessageRequest;
        use v1::server_reflection_response::MessageResponse;
        let mut client =
            v1::server_reflection_client::ServerReflectionClient::new(reflection().await);
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let listed = responses.next().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::ListServicesResponse(listed)) = listed else {
            panic!("{listed:?}");
        };
        let names: Vec<&str> = listed.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&DATA_PLANE), "{names:?}");
    }
}
