//! A blocking client of a running `xdp-agent`, for lab tests.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::{LISTEN_PORT, RELAY_V4, RELAY_V6};
use proto::v1::{
    ChannelBinding, CountersRequest, CountersResponse, GetChannelBindingRequest, HealthRequest,
    HealthResponse, InstallChannelBindingRequest, ListChannelBindingsRequest, ListUsageRequest,
    RateLimit, RemoveChannelBindingRequest, SyncRequest, SyncResponse, Traffic, Usage,
};

/// The agent's flags that let it relay to the lab's peers, 198.51.100.0/24 and
/// 2001:db8:3::/64: documentation ranges, which its peer policy refuses
/// (as turn-control's does) unless allowed.
pub const LAB_PEERS: [&str; 4] = [
    "--allow-peer",
    "198.51.100.0/24",
    "--allow-peer",
    "2001:db8:3::/64",
];

/// [`LAB_PEERS`] and `args`: the agent's flags of a test that binds the lab's
/// peers.
pub fn with_lab_peers<'a>(args: &[&'a str]) -> Vec<&'a str> {
    LAB_PEERS.iter().chain(args).copied().collect()
}

/// The lifetime [`binding`] and [`binding_via`] give: ten minutes, longer
/// than any test.
pub const LIFETIME: Duration = Duration::from_secs(600);

/// Bytes of the expiry that ends every binding map value (`PeerTarget`,
/// `ClientTarget`).
const EXPIRY_BYTES: usize = size_of::<u64>();

/// An entry of a binding map, its value split into what makes it a
/// binding's half (what the agent compares entries by), its usage slot and
/// meters (which the agent chooses), and its expiry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapEntry {
    /// The key's bytes.
    pub key: Vec<u8>,
    /// The value's bytes without its terms (usage slot, meters, expiry).
    pub value: Vec<u8>,
    /// The usage slot and meter keys, as the value holds them.
    pub accounting: Vec<u8>,
    /// The expiry, on the kernel's coarse monotonic clock.
    pub expires_at_ns: u64,
}

impl MapEntry {
    /// An entry as a map holds it.
    pub fn new(key: &[u8], value: &[u8]) -> anyhow::Result<Self> {
        let terms = value
            .len()
            .checked_sub(bpf_common::TERMS_LEN)
            .context("a value too short for its terms")?;
        let at = value.len() - EXPIRY_BYTES;
        Ok(Self {
            key: key.to_vec(),
            value: value[..terms].to_vec(),
            accounting: value[terms..at].to_vec(),
            expires_at_ns: u64::from_ne_bytes(value[at..].try_into()?),
        })
    }

    /// Key and value without the terms.
    pub fn identity(&self) -> (Vec<u8>, Vec<u8>) {
        (self.key.clone(), self.value.clone())
    }

    /// The usage slot the entry names.
    pub fn usage_slot(&self) -> u32 {
        self.accounting
            .get(..4)
            .and_then(|bytes| bytes.try_into().ok())
            .map_or(0, u32::from_ne_bytes)
    }

    /// The value as the map holds it, terms included.
    pub fn value_bytes(&self) -> Vec<u8> {
        [
            &self.value[..],
            &self.accounting[..],
            &self.expires_at_ns.to_ne_bytes(),
        ]
        .concat()
    }
}

/// The entries of the binding map `name` pinned in `pin_dir`, sorted.
pub fn map_entries(pin_dir: &Path, name: &str) -> anyhow::Result<Vec<MapEntry>> {
    use libbpf_rs::MapCore as _;
    let map = libbpf_rs::MapHandle::from_pinned_path(pin_dir.join(name))
        .with_context(|| format!("no map {name} pinned in {}", pin_dir.display()))?;
    let mut entries = Vec::new();
    for key in map.keys() {
        if let Some(value) = map.lookup(&key, libbpf_rs::MapFlags::ANY)? {
            entries.push(MapEntry::new(&key, &value)?);
        }
    }
    entries.sort();
    Ok(entries)
}

/// The two entries `bound` is installed as until `expires_at_ns`: the
/// client-side one and the peer-side one.
pub fn entries_of(bound: &ChannelBinding, expires_at_ns: u64) -> anyhow::Result<[MapEntry; 2]> {
    use bpf_common::Pod as _;
    let binding = proto::Binding::try_from(bound)?;
    let fields = bpf_common::BindingFields {
        client: binding.client,
        listener: binding.listener,
        channel: binding.channel,
        peer: binding.peer,
        allocation_port: binding.allocation_port,
        dont_fragment: binding.dont_fragment,
        usage_slot: 0,
        meters: [0; 2],
        expires_at_ns,
    };
    let (client_key, peer_target) = fields.client_entry();
    let (peer_key, client_target) = fields.peer_entry();
    Ok([
        MapEntry::new(client_key.bytes(), peer_target.as_bytes())?,
        MapEntry::new(peer_key.bytes(), client_target.as_bytes())?,
    ])
}

/// The agent's gRPC API, called synchronously.
#[derive(Debug)]
pub struct Agent {
    runtime: tokio::runtime::Runtime,
    client: proto::DataPlaneClient,
}

/// A channel binding as the tests name it, for a client of the lab's relay
/// listener of its family ([`LISTEN_PORT`] on [`RELAY_V4`] or [`RELAY_V6`]),
/// to install for [`LIFETIME`].
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

/// A channel binding of a client that sends to `listener`, to install for
/// [`LIFETIME`], of an allocation without DONT-FRAGMENT (set
/// `dont_fragment` on the result for one with it).
pub fn binding_via(
    listener: SocketAddr,
    client: SocketAddr,
    channel: u16,
    peer: SocketAddr,
    port: u16,
) -> ChannelBinding {
    let binding = proto::Binding {
        client,
        channel,
        peer,
        allocation_port: port,
        listener,
        dont_fragment: false,
    };
    ChannelBinding::from(&proto::Lease {
        binding,
        lifetime: LIFETIME,
        rate_limits: Vec::new(),
    })
}

/// `binding` to install for `lifetime` instead.
pub fn lasting(binding: &ChannelBinding, lifetime: Duration) -> ChannelBinding {
    ChannelBinding {
        lifetime_ms: u32::try_from(lifetime.as_millis()).unwrap_or(u32::MAX),
        ..binding.clone()
    }
}

/// Bindings without their lifetimes, usage and limits, sorted: what identifies them, to
/// compare what the agent lists (with what is left of each lifetime) with
/// what was installed.
pub fn bare(bindings: impl IntoIterator<Item = ChannelBinding>) -> Vec<ChannelBinding> {
    let mut bare: Vec<ChannelBinding> = bindings
        .into_iter()
        .map(|binding| ChannelBinding {
            lifetime_ms: 0,
            usage: None,
            rate_limits: Vec::new(),
            ..binding
        })
        .collect();
    bare.sort_by(|a, b| {
        (&a.client, &a.listener, a.channel).cmp(&(&b.client, &b.listener, b.channel))
    });
    bare
}

/// `binding` held to the rate limit of meter `meter`, `bytes_per_second`
/// each way, as an install or a sync carries it (added to any it names).
pub fn limited(binding: &ChannelBinding, meter: &str, bytes_per_second: u64) -> ChannelBinding {
    let mut limited = binding.clone();
    limited.rate_limits.push(RateLimit {
        meter: meter.to_owned(),
        bytes_per_second,
    });
    limited
}

/// A usage as the agent answers it: (packets, bytes) relayed client to
/// peer and peer to client, then dropped the same ways.
pub fn usage(
    client_to_peer: (u64, u64),
    peer_to_client: (u64, u64),
    dropped_client_to_peer: (u64, u64),
    dropped_peer_to_client: (u64, u64),
) -> Usage {
    let traffic = |(packets, bytes)| Some(Traffic { packets, bytes });
    Usage {
        client_to_peer: traffic(client_to_peer),
        peer_to_client: traffic(peer_to_client),
        dropped_client_to_peer: traffic(dropped_client_to_peer),
        dropped_peer_to_client: traffic(dropped_peer_to_client),
    }
}

/// Whether `a` and `b` name the same binding (client, listener, channel),
/// whatever their lifetimes, usage and limits.
pub fn same_binding(a: &ChannelBinding, b: &ChannelBinding) -> bool {
    bare([a.clone()]) == bare([b.clone()])
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

    /// Sync of `bindings` under `generation`, streamed in parts of
    /// [`proto::SYNC_PART_BINDINGS`] as turn-control sends it.
    pub fn sync(
        &mut self,
        generation: u64,
        bindings: &[ChannelBinding],
    ) -> Result<SyncResponse, tonic::Status> {
        let mut parts: Vec<SyncRequest> = bindings
            .chunks(proto::SYNC_PART_BINDINGS)
            .map(|part| SyncRequest {
                generation,
                bindings: part.to_vec(),
            })
            .collect();
        if parts.is_empty() {
            // The empty set: one part, for its generation.
            parts.push(SyncRequest {
                generation,
                bindings: Vec::new(),
            });
        }
        self.sync_parts(parts)
    }

    /// Sync, streamed as exactly these parts.
    pub fn sync_parts(&mut self, parts: Vec<SyncRequest>) -> Result<SyncResponse, tonic::Status> {
        let stream = tonic::codegen::tokio_stream::iter(parts);
        Ok(self
            .runtime
            .block_on(self.client.sync(stream))?
            .into_inner())
    }

    /// Health.
    pub fn health(&mut self) -> Result<HealthResponse, tonic::Status> {
        Ok(self
            .runtime
            .block_on(self.client.health(HealthRequest {}))?
            .into_inner())
    }

    /// Counters.
    pub fn counters(&mut self) -> Result<CountersResponse, tonic::Status> {
        Ok(self
            .runtime
            .block_on(self.client.counters(CountersRequest {}))?
            .into_inner())
    }

    /// ListChannelBindings: every binding, with what is left of its lifetime.
    pub fn list(&mut self) -> Result<Vec<ChannelBinding>, tonic::Status> {
        let request = ListChannelBindingsRequest::default();
        Ok(self
            .runtime
            .block_on(self.client.list_channel_bindings(request))?
            .into_inner()
            .bindings)
    }

    /// RemoveChannelBinding; the bindings removed, each with its final usage.
    pub fn remove_with_usage(
        &mut self,
        bindings: Vec<ChannelBinding>,
    ) -> Result<Vec<ChannelBinding>, tonic::Status> {
        let request = RemoveChannelBindingRequest { bindings };
        Ok(self
            .runtime
            .block_on(self.client.remove_channel_binding(request))?
            .into_inner()
            .removed_bindings)
    }

    /// GetChannelBinding of `binding`'s client, channel and listener: the
    /// binding as installed, with its usage.
    pub fn get(&mut self, binding: &ChannelBinding) -> Result<ChannelBinding, tonic::Status> {
        let request = GetChannelBindingRequest {
            client: binding.client.clone(),
            channel: binding.channel,
            listener: binding.listener.clone(),
        };
        Ok(self
            .runtime
            .block_on(self.client.get_channel_binding(request))?
            .into_inner())
    }

    /// ListUsage: every binding with its usage, all parts of the stream.
    pub fn usage(&mut self) -> Result<Vec<ChannelBinding>, tonic::Status> {
        let client = &mut self.client;
        self.runtime.block_on(async {
            let mut stream = client.list_usage(ListUsageRequest {}).await?.into_inner();
            let mut bindings = Vec::new();
            while let Some(part) = stream.message().await? {
                bindings.extend(part.bindings);
            }
            Ok(bindings)
        })
    }

    /// The usage ListUsage reports for `binding`, `None` if it is not installed.
    pub fn usage_of(&mut self, binding: &ChannelBinding) -> Result<Option<Usage>, tonic::Status> {
        Ok(self
            .usage()?
            .into_iter()
            .find(|listed| same_binding(listed, binding))
            .and_then(|listed| listed.usage))
    }

    /// (packets, bytes) of the counter named `reason`.
    pub fn counter(&mut self, reason: &str) -> anyhow::Result<(u64, u64)> {
        let counters = self.counters()?;
        let counter = counters
            .counters
            .iter()
            .find(|c| c.reason == reason)
            .with_context(|| format!("no counter named {reason}"))?;
        Ok((counter.packets, counter.bytes))
    }

    /// Channel data the kernel relayed, in either direction, on every path (the eight family
    /// pairs of client to peer and of the hairpin).
    pub fn relayed_in_kernel(&mut self) -> anyhow::Result<u64> {
        let mut sum = 0;
        for reason in [
            "relay_client_to_peer_v4_v4",
            "relay_client_to_peer_v4_v6",
            "relay_client_to_peer_v6_v4",
            "relay_client_to_peer_v6_v6",
            "relay_hairpin_v4_v4",
            "relay_hairpin_v4_v6",
            "relay_hairpin_v6_v4",
            "relay_hairpin_v6_v6",
        ] {
            sum += self.counter(reason)?.0;
        }
        Ok(sum)
    }
}
