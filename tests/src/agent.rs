//! A blocking client of a running `xdp-agent`, for lab tests.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::Context;

use crate::{LISTEN_PORT, RELAY_V4, RELAY_V6};
use proto::v1::{
    ChannelBinding, CountersRequest, InstallChannelBindingRequest, ListChannelBindingsRequest,
    RemoveChannelBindingRequest,
};

/// The agent's gRPC API, called synchronously.
#[derive(Debug)]
pub struct Agent {
    runtime: tokio::runtime::Runtime,
    client: proto::DataPlaneClient,
}

/// A channel binding as the tests name it, for a client of the lab's relay
/// listener of its family ([`LISTEN_PORT`] on [`RELAY_V4`] or [`RELAY_V6`]).
pub fn binding(client: SocketAddr, channel: u16, peer: SocketAddr, port: u16) -> ChannelBinding {
    let relay = match client.ip() {
        IpAddr::V4(_) => IpAddr::V4(RELAY_V4),
        IpAddr::V6(_) => IpAddr::V6(RELAY_V6),
    };
    binding_via(
        SocketAddr::new(relay, LISTEN_PORT),
        client,
        channel,
        peer,
        port,
    )
}

/// A channel binding of a client that sends to `listener`.
pub fn binding_via(
    listener: SocketAddr,
    client: SocketAddr,
    channel: u16,
    peer: SocketAddr,
    port: u16,
) -> ChannelBinding {
    ChannelBinding::from(&proto::Binding {
        client,
        channel,
        peer,
        allocation_port: port,
        listener,
    })
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

    /// InstallChannelBinding; the number of bindings installed after.
    pub fn install(&mut self, bindings: Vec<ChannelBinding>) -> Result<u64, tonic::Status> {
        let request = InstallChannelBindingRequest { bindings };
        Ok(self
            .runtime
            .block_on(self.client.install_channel_binding(request))?
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
