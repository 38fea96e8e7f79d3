//! A blocking client of a running `xdp-agent`, for lab tests.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use proto::v1::{
    AddChannelBindingRequest, ChannelBinding, CountersRequest, ListChannelBindingsRequest,
    RemoveChannelBindingRequest,
};

/// The agent's gRPC API, called synchronously.
#[derive(Debug)]
pub struct Agent {
    runtime: tokio::runtime::Runtime,
    client: proto::DataPlaneClient,
}

/// A channel binding as the tests name it.
pub fn binding(client: SocketAddr, channel: u16, peer: SocketAddr, port: u16) -> ChannelBinding {
    ChannelBinding {
        client: client.to_string(),
        channel: u32::from(channel),
        peer: peer.to_string(),
        allocation_port: u32::from(port),
    }
}

impl Agent {
    /// Connects to the agent's socket.
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime
            .block_on(proto::connect(socket.to_path_buf()))
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        Ok(Self { runtime, client })
    }

    /// AddChannelBinding; the number of bindings installed after.
    pub fn add(&mut self, bindings: Vec<ChannelBinding>) -> Result<u64, tonic::Status> {
        let request = AddChannelBindingRequest { bindings };
        Ok(self
            .runtime
            .block_on(self.client.add_channel_binding(request))?
            .into_inner()
            .installed)
    }

    /// RemoveChannelBinding; the number removed.
    pub fn remove(&mut self, bindings: Vec<ChannelBinding>) -> Result<u64, tonic::Status> {
        let request = RemoveChannelBindingRequest { bindings };
        Ok(self
            .runtime
            .block_on(self.client.remove_channel_binding(request))?
            .into_inner()
            .removed)
    }

    /// ListChannelBindings.
    pub fn list(&mut self) -> Result<Vec<ChannelBinding>, tonic::Status> {
        let request = ListChannelBindingsRequest::default();
        Ok(self
            .runtime
            .block_on(self.client.list_channel_bindings(request))?
            .into_inner()
            .bindings)
    }

    /// (packets, bytes) of the counter named `reason`.
    pub fn counter(&mut self, reason: &str) -> anyhow::Result<(u64, u64)> {
        let counters = self
            .runtime
            .block_on(self.client.counters(CountersRequest {}))?
            .into_inner();
        let counter = counters
            .counters
            .iter()
            .find(|c| c.reason == reason)
            .with_context(|| format!("no counter named {reason}"))?;
        Ok((counter.packets, counter.bytes))
    }
}
