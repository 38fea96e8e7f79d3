//! The gRPC contract between turn-control and xdp-agent (`xdp_agent.proto`),
//! the channel binding both hold ([`Binding`]) with its one conversion to and
//! from the wire, and the client side of the unix-socket transport.

#![expect(clippy::allow_attributes, reason = "generated code")]

use std::path::PathBuf;

mod binding;

pub use binding::{
    Binding, BindingError, CHANNEL_RANGE, Lease, MAX_LIFETIME, MAX_METER_NAME, MAX_RATE_LIMITS,
    RateLimit, parse_address,
};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Version 1 of the agent's API.
pub mod v1 {
    tonic::include_proto!("xdpturn.agent.v1");

    /// The encoded file descriptor set, for the server reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("xdp_agent_descriptor");
}

/// A client of the agent's data-plane service.
pub type DataPlaneClient = v1::data_plane_client::DataPlaneClient<Channel>;

/// The largest gRPC message either side sends or accepts: a list of every binding the
/// maps hold (2 x 65 536, IPv6 addresses as text: about 160 bytes each) fits with room
/// to spare, where gRPC's default of 4 MiB holds about 30 000. A Sync comes in parts of
/// [`SYNC_PART_BINDINGS`], whatever the maps' size.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Bindings per part of a Sync's stream: about 1 MiB of IPv6 bindings.
pub const SYNC_PART_BINDINGS: usize = 4096;

/// Connects to the agent's gRPC service on the unix socket at `path`.
pub async fn connect(path: impl Into<PathBuf>) -> Result<DataPlaneClient, tonic::transport::Error> {
    let path = path.into();
    // The URI is required by the API but unused: the connector below ignores it.
    let channel = Endpoint::from_static("http://xdp-agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await?;
    Ok(DataPlaneClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
