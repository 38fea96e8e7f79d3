//! The kernel's per-binding usage as the agent link reads it: which event-loop thread
//! each binding in the kernel belongs to, the figures of the agent's answers in the
//! core's terms, and the rate limits in the agent's.
//!
//! The agent lists bindings with the listener it resolved (a wildcard listener becomes the
//! relay address), so a binding is recognised by what the kernel keys it on besides the
//! listener: its client, channel and allocation port, unique among one relay's bindings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_stream::StreamExt as _;
use turn_control_core::usage::Traffic;
use turn_control_core::{ChannelBinding, RateLimits, Usage};

/// What recognises a binding in the agent's answers.
pub type Key = (SocketAddr, u16, u16);

/// The key of one of the core's bindings.
pub fn key_of(binding: &ChannelBinding) -> Key {
    (
        binding.client.0,
        binding.channel.value(),
        binding.relay.port().0,
    )
}

/// The key of a binding in an answer; `None` for one that does not parse.
fn wire_key(binding: &proto::v1::ChannelBinding) -> Option<Key> {
    let client = proto::parse_address("client", &binding.client).ok()?;
    Some((
        client,
        u16::try_from(binding.channel).ok()?,
        u16::try_from(binding.allocation_port).ok()?,
    ))
}

/// The kernel's figures in the core's terms (absent ones are zero).
pub fn to_usage(usage: Option<&proto::v1::Usage>) -> Usage {
    let Some(usage) = usage else {
        return Usage::default();
    };
    let traffic = |traffic: Option<proto::v1::Traffic>| {
        let traffic = traffic.unwrap_or_default();
        Traffic {
            packets: traffic.packets,
            bytes: traffic.bytes,
        }
    };
    Usage {
        client_to_peer: traffic(usage.client_to_peer),
        peer_to_client: traffic(usage.peer_to_client),
        dropped_client_to_peer: traffic(usage.dropped_client_to_peer),
        dropped_peer_to_client: traffic(usage.dropped_peer_to_client),
    }
}

/// The final figures a RemoveChannelBinding answered, by key.
pub fn finals(removed: &[proto::v1::ChannelBinding]) -> HashMap<Key, Usage> {
    removed
        .iter()
        .filter_map(|binding| Some((wire_key(binding)?, to_usage(binding.usage.as_ref()))))
        .collect()
}

/// A binding's meters as the agent takes them.
pub fn rate_limits(limits: &RateLimits) -> Vec<proto::RateLimit> {
    [&limits.allocation, &limits.user]
        .into_iter()
        .flatten()
        .map(|meter| proto::RateLimit {
            meter: meter.name.clone(),
            bytes_per_second: meter.bytes_per_second,
        })
        .collect()
}

/// Every binding the kernel holds, with its usage: the parts of one ListUsage stream, all
/// within `timeout`.
pub async fn list(
    client: &mut proto::DataPlaneClient,
    timeout: Duration,
) -> Result<Vec<proto::v1::ChannelBinding>, tonic::Status> {
    let read = async {
        let mut parts = client
            .list_usage(proto::v1::ListUsageRequest {})
            .await?
            .into_inner();
        let mut bindings = Vec::new();
        while let Some(part) = parts.next().await {
            bindings.extend(part?.bindings);
        }
        Ok(bindings)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("ListUsage timed out")))
}

/// Which thread holds each binding the link put in the kernel.
#[derive(Debug, Default)]
pub struct Owners {
    bindings: HashMap<Key, (usize, ChannelBinding)>,
}

impl Owners {
    /// The owners of a full sync's bindings.
    pub fn of(bindings: impl Iterator<Item = (usize, ChannelBinding)>) -> Self {
        Self {
            bindings: bindings
                .map(|(thread, binding)| (key_of(&binding), (thread, binding)))
                .collect(),
        }
    }

    /// `thread` holds `binding` in the kernel.
    pub fn hold(&mut self, thread: usize, binding: ChannelBinding) {
        self.bindings.insert(key_of(&binding), (thread, binding));
    }

    /// `binding` left the kernel.
    pub fn forget(&mut self, binding: &ChannelBinding) {
        let key = key_of(binding);
        if self
            .bindings
            .get(&key)
            .is_some_and(|(_, held)| held == binding)
        {
            self.bindings.remove(&key);
        }
    }

    /// A ListUsage answer as each thread's share: its bindings with their figures.
    /// Bindings nobody here holds (another daemon's, or gone meanwhile) are left out.
    pub fn by_thread(
        &self,
        listed: Vec<proto::v1::ChannelBinding>,
    ) -> Vec<(usize, Vec<(ChannelBinding, Usage)>)> {
        let mut shares: HashMap<usize, Vec<(ChannelBinding, Usage)>> = HashMap::new();
        for wire in &listed {
            let Some((thread, binding)) = wire_key(wire).and_then(|key| self.bindings.get(&key))
            else {
                continue;
            };
            shares
                .entry(*thread)
                .or_default()
                .push((*binding, to_usage(wire.usage.as_ref())));
        }
        shares.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use turn_control_core::{ChannelNumber, ClientAddr, PeerAddr, RelayAddr, Transport};

    use super::*;

    fn binding(client: &str, channel: u16, port: u16) -> ChannelBinding {
        ChannelBinding {
            client: ClientAddr(client.parse().unwrap()),
            server: "0.0.0.0:3478".parse().unwrap(),
            transport: Transport::Udp,
            relay: RelayAddr(SocketAddr::new("203.0.113.1".parse().unwrap(), port)),
            peer: PeerAddr("198.51.100.7:9000".parse().unwrap()),
            channel: ChannelNumber::new(channel).unwrap(),
            dont_fragment: false,
        }
    }

    fn listed(binding: &ChannelBinding, bytes: u64) -> proto::v1::ChannelBinding {
        proto::v1::ChannelBinding {
            client: binding.client.0.to_string(),
            channel: u32::from(binding.channel.value()),
            peer: binding.peer.0.to_string(),
            allocation_port: u32::from(binding.relay.port().0),
            // As the agent lists it: resolved.
            listener: "203.0.113.1:3478".to_owned(),
            usage: Some(proto::v1::Usage {
                client_to_peer: Some(proto::v1::Traffic { packets: 1, bytes }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn listed_usage_goes_to_the_threads_that_hold_the_bindings() {
        let (a, b, stranger) = (
            binding("192.0.2.1:1000", 0x4001, 50000),
            binding("192.0.2.2:1000", 0x4001, 50002),
            binding("192.0.2.3:1000", 0x4001, 50004),
        );
        let mut owners = Owners::of([(0, a), (1, b)].into_iter());
        let mut shares =
            owners.by_thread(vec![listed(&a, 10), listed(&b, 20), listed(&stranger, 30)]);
        shares.sort_by_key(|(thread, _)| *thread);
        assert_eq!(shares.len(), 2);
        assert_eq!(shares[0].0, 0);
        assert_eq!(shares[0].1[0].0, a);
        assert_eq!(shares[0].1[0].1.client_to_peer.bytes, 10);
        assert_eq!(shares[1].1[0].1.client_to_peer.bytes, 20);
        owners.forget(&a);
        assert_eq!(owners.by_thread(vec![listed(&a, 10)]), Vec::new());
        let finals = finals(&[listed(&b, 20)]);
        assert_eq!(finals[&key_of(&b)].client_to_peer.bytes, 20);
    }

    #[test]
    fn both_meters_go_on_the_wire() {
        let limits = RateLimits {
            allocation: Some(turn_control_core::usage::Meter {
                name: "allocation:00ff".into(),
                bytes_per_second: 125_000,
            }),
            user: None,
        };
        let wire = rate_limits(&limits);
        assert_eq!(wire.len(), 1);
        assert_eq!(wire[0].meter, "allocation:00ff");
        assert_eq!(wire[0].bytes_per_second, 125_000);
    }
}
