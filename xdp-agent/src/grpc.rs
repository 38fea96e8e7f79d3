//! The agent's gRPC service (`proto/xdp_agent.proto`) on a unix socket.

use std::sync::Arc;

use bpf_common::Verdict;
use proto::v1::data_plane_server::DataPlane as DataPlaneService;
use proto::v1::{
    AddChannelBindingRequest, AddChannelBindingResponse, CountersRequest, CountersResponse,
    ListChannelBindingsRequest, ListChannelBindingsResponse, RemoveChannelBindingRequest,
    RemoveChannelBindingResponse,
};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::binding::{Binding, Limits};
use crate::dataplane::{DataPlane, MapError};

/// Serves the data-plane API over the loaded program's maps.
#[derive(Debug, Clone)]
pub struct Service {
    dataplane: Arc<DataPlane>,
    limits: Limits,
}

impl Service {
    /// A service over `dataplane`, refusing bindings outside `limits`.
    pub fn new(dataplane: Arc<DataPlane>, limits: Limits) -> Self {
        Self { dataplane, limits }
    }

    fn validate(&self, bindings: &[proto::v1::ChannelBinding]) -> Result<Vec<Binding>, Status> {
        bindings
            .iter()
            .enumerate()
            .map(|(index, binding)| {
                Binding::from_proto(binding, &self.limits).map_err(|error| {
                    Status::invalid_argument(format!("bindings[{index}]: {error}"))
                })
            })
            .collect()
    }
}

fn map_status(error: MapError) -> Status {
    match error {
        MapError::Full { .. } => Status::resource_exhausted(error.to_string()),
        MapError::Kernel(_) => Status::internal(error.to_string()),
    }
}

#[tonic::async_trait]
impl DataPlaneService for Service {
    async fn add_channel_binding(
        &self,
        request: Request<AddChannelBindingRequest>,
    ) -> Result<Response<AddChannelBindingResponse>, Status> {
        let bindings = self.validate(&request.into_inner().bindings)?;
        let installed = self.dataplane.add(&bindings).map_err(map_status)?;
        info!(count = bindings.len(), installed, "bindings added");
        Ok(Response::new(AddChannelBindingResponse { installed }))
    }

    async fn remove_channel_binding(
        &self,
        request: Request<RemoveChannelBindingRequest>,
    ) -> Result<Response<RemoveChannelBindingResponse>, Status> {
        let bindings = self.validate(&request.into_inner().bindings)?;
        let removed = self.dataplane.remove(&bindings).map_err(map_status)?;
        info!(count = bindings.len(), removed, "bindings removed");
        Ok(Response::new(RemoveChannelBindingResponse { removed }))
    }

    async fn list_channel_bindings(
        &self,
        _request: Request<ListChannelBindingsRequest>,
    ) -> Result<Response<ListChannelBindingsResponse>, Status> {
        let bindings = self.dataplane.bindings().map_err(map_status)?;
        Ok(Response::new(ListChannelBindingsResponse {
            bindings: bindings.into_iter().map(Binding::to_proto).collect(),
        }))
    }

    async fn counters(
        &self,
        _request: Request<CountersRequest>,
    ) -> Result<Response<CountersResponse>, Status> {
        let counters = self.dataplane.counters().map_err(map_status)?;
        let relayed = self.dataplane.relayed().map_err(map_status)?;
        Ok(Response::new(CountersResponse {
            relayed_packets: relayed.packets,
            relayed_bytes: relayed.bytes,
            counters: counters
                .into_iter()
                .map(|(reason, counter)| proto::v1::Counter {
                    reason: reason.name().to_owned(),
                    verdict: match reason.verdict() {
                        Verdict::Tx => "tx",
                        Verdict::Pass => "pass",
                        Verdict::Drop => "drop",
                    }
                    .to_owned(),
                    packets: counter.packets,
                    bytes: counter.bytes,
                })
                .collect(),
        }))
    }
}
