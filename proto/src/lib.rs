//! The gRPC contract between turn-control and xdp-agent (`xdp_agent.proto`).

#![expect(clippy::allow_attributes, reason = "generated code")]

/// Version 1 of the agent's API.
pub mod v1 {
    tonic::include_proto!("xdpturn.agent.v1");

    /// The encoded file descriptor set, for the server reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("xdp_agent_descriptor");
}
