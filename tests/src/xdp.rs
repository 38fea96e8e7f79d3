//! The relay's XDP program loaded on its own (no agent, no interface), for
//! packet tests through `BPF_PROG_TEST_RUN`: the test writes the maps with
//! the shared `bpf_common` types and runs frames through the program.

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use bpf_common::{
    ClientKeyV4, ClientKeyV6, ClientTarget, Counter, DataPlaneConfig, PeerKeyV4, PeerKeyV6,
    PeerTarget, Pod, Reason,
};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, OpenObject};

/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`.
pub const XDP_TX: u32 = 3;

/// A loaded, unattached instance of the relay program with its own maps.
pub struct LoadedRelay {
    skel: relay_skel::RelaySkel<'static>,
}

impl std::fmt::Debug for LoadedRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedRelay").finish_non_exhaustive()
    }
}

impl LoadedRelay {
    /// Loads a fresh instance (the verifier runs).
    pub fn load() -> anyhow::Result<Self> {
        // Each instance lives for the rest of the test process.
        let storage: &'static mut MaybeUninit<OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let skel = relay_skel::RelaySkelBuilder::default()
            .open(storage)
            .context("open")?
            .load()
            .context("load: the verifier refused the program")?;
        Ok(Self { skel })
    }

    /// Writes the configuration.
    pub fn configure(&self, config: &DataPlaneConfig) -> anyhow::Result<()> {
        self.skel
            .maps
            .CONFIG
            .update(&0u32.to_ne_bytes(), config.as_bytes(), MapFlags::ANY)?;
        Ok(())
    }

    /// Installs a channel binding, both directions.
    pub fn bind(
        &self,
        client: SocketAddr,
        channel: u16,
        peer: SocketAddr,
        allocation_port: u16,
    ) -> anyhow::Result<()> {
        let maps = &self.skel.maps;
        let target = PeerTarget::new(peer.ip(), peer.port(), allocation_port);
        let client_port = client.port().to_be_bytes();
        let channel_bytes = channel.to_be_bytes();
        match client.ip() {
            IpAddr::V4(ip) => maps.CLIENT_V4.update(
                ClientKeyV4 {
                    client_ip: ip.octets(),
                    client_port,
                    channel: channel_bytes,
                }
                .as_bytes(),
                target.as_bytes(),
                MapFlags::ANY,
            )?,
            IpAddr::V6(ip) => maps.CLIENT_V6.update(
                ClientKeyV6 {
                    client_ip: ip.octets(),
                    client_port,
                    channel: channel_bytes,
                }
                .as_bytes(),
                target.as_bytes(),
                MapFlags::ANY,
            )?,
        }
        let back = ClientTarget::new(client.ip(), client.port(), channel);
        let peer_port = peer.port().to_be_bytes();
        let allocation_port = allocation_port.to_be_bytes();
        match peer.ip() {
            IpAddr::V4(ip) => maps.PEER_V4.update(
                PeerKeyV4 {
                    peer_ip: ip.octets(),
                    peer_port,
                    allocation_port,
                }
                .as_bytes(),
                back.as_bytes(),
                MapFlags::ANY,
            )?,
            IpAddr::V6(ip) => maps.PEER_V6.update(
                PeerKeyV6 {
                    peer_ip: ip.octets(),
                    peer_port,
                    allocation_port,
                }
                .as_bytes(),
                back.as_bytes(),
                MapFlags::ANY,
            )?,
        }
        Ok(())
    }

    /// Runs one frame through the program: the verdict and the frame after.
    pub fn run(&self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let input = libbpf_rs::ProgramInput {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let output = self
            .skel
            .progs
            .xdp_relay
            .test_run(input)
            .context("test_run")?;
        let len = output.data.map_or(0, |data| data.len());
        let verdict = output.return_value;
        out.truncate(len);
        Ok((verdict, out))
    }

    /// Runs `frame` `repeat` times in the kernel; the mean time per run.
    pub fn time(&self, frame: &[u8], repeat: u32) -> anyhow::Result<std::time::Duration> {
        let mut out = vec![0u8; frame.len() + 256];
        let input = libbpf_rs::ProgramInput {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        Ok(self.skel.progs.xdp_relay.test_run(input)?.duration)
    }

    /// One reason's counter, summed over CPUs.
    pub fn counter(&self, reason: Reason) -> anyhow::Result<Counter> {
        let per_cpu = self
            .skel
            .maps
            .STATS
            .lookup_percpu(&(reason as u32).to_ne_bytes(), MapFlags::ANY)?
            .unwrap_or_default();
        Ok(per_cpu
            .iter()
            .filter_map(|raw| Counter::from_ne_bytes(raw))
            .fold(Counter::default(), |sum, cpu| Counter {
                packets: sum.packets + cpu.packets,
                bytes: sum.bytes + cpu.bytes,
            }))
    }
}
