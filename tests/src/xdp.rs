//! The relay's XDP program loaded on its own (no agent, no interface), for
//! packet tests through `BPF_PROG_TEST_RUN`: the test writes the maps with
//! the shared `bpf_common` types and runs frames through the program.

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use bpf_common::{BindingFields, BindingUsage, Counter, KernelConfig, MapKey, Meter, Pod, Reason};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, OpenObject};

/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`.
pub const XDP_TX: u32 = 3;
/// `XDP_REDIRECT`.
pub const XDP_REDIRECT: u32 = 4;

/// A loaded, unattached instance of the relay program with its own maps.
pub struct LoadedRelay {
    skel: xdp_agent_skel::RelaySkel<'static>,
}

impl std::fmt::Debug for LoadedRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedRelay").finish_non_exhaustive()
    }
}

impl LoadedRelay {
    /// Loads a fresh instance (the verifier runs).
    pub fn load() -> anyhow::Result<Self> {
        Self::load_with_flags(0)
    }

    /// Loads a fresh instance that the verifier checks with
    /// `BPF_F_STRICT_ALIGNMENT`: every packet, stack and map access must be
    /// aligned to its size, frames taken to start `NET_IP_ALIGN` (2) past an
    /// aligned address, as on architectures without misaligned access.
    pub fn load_with_strict_alignment() -> anyhow::Result<Self> {
        Self::load_with_flags(libbpf_rs::libbpf_sys::BPF_F_STRICT_ALIGNMENT)
    }

    fn load_with_flags(flags: u32) -> anyhow::Result<Self> {
        // Each instance lives for the rest of the test process.
        let storage: &'static mut MaybeUninit<OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = xdp_agent_skel::RelaySkelBuilder::default()
            .open(storage)
            .context("open")?;
        open.progs.xdp_relay.set_flags(flags);
        let skel = open
            .load()
            .context("load: the verifier refused the program")?;
        Ok(Self { skel })
    }

    /// Writes the configuration.
    pub fn configure(&self, config: &KernelConfig) -> anyhow::Result<()> {
        self.skel
            .maps
            .CONFIG
            .update(&0u32.to_ne_bytes(), config.as_bytes(), MapFlags::ANY)?;
        Ok(())
    }

    /// Installs a channel binding, both directions, for a client of the
    /// first listener port of the configuration written last, on the relay
    /// address of the client's family; it never expires ([`NEVER`]).
    pub fn bind(
        &self,
        client: SocketAddr,
        channel: u16,
        peer: SocketAddr,
        allocation_port: u16,
    ) -> anyhow::Result<()> {
        self.bind_until(client, channel, peer, allocation_port, NEVER)
    }

    /// [`LoadedRelay::bind`], relayed until `expires_at_ns` on the kernel's
    /// coarse monotonic clock ([`crate::kernel_clock_ns`]).
    pub fn bind_until(
        &self,
        client: SocketAddr,
        channel: u16,
        peer: SocketAddr,
        allocation_port: u16,
        expires_at_ns: u64,
    ) -> anyhow::Result<()> {
        let config = self.config()?;
        self.install(&BindingFields {
            client,
            listener: listener_of(&config, client),
            channel,
            peer,
            allocation_port,
            dont_fragment: false,
            usage_slot: 0,
            meters: [0; 2],
            expires_at_ns,
        })
    }

    /// Installs a channel binding, both directions, as the agent lays it out.
    pub fn install(&self, binding: &BindingFields) -> anyhow::Result<()> {
        install_with(binding, |key, value| {
            Ok(self.map(key).update(key.bytes(), value, MapFlags::ANY)?)
        })
    }

    fn map(&self, key: &MapKey) -> &libbpf_rs::MapMut<'static> {
        let maps = &self.skel.maps;
        match key {
            MapKey::ClientV4(_) => &maps.CLIENT_V4,
            MapKey::ClientV6(_) => &maps.CLIENT_V6,
            MapKey::PeerV4(_) => &maps.PEER_V4,
            MapKey::PeerV6(_) => &maps.PEER_V6,
        }
    }

    /// The configuration written last.
    pub fn config(&self) -> anyhow::Result<KernelConfig> {
        let bytes = self
            .skel
            .maps
            .CONFIG
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .context("no configuration")?;
        KernelConfig::from_bytes(&bytes).context("a configuration of another size")
    }

    /// Lets relayed frames leave through the interface `ifindex` (the
    /// agent does this for each interface it attaches to).
    pub fn allow_egress(&self, ifindex: u32) -> anyhow::Result<()> {
        let value = [ifindex.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
        self.skel
            .maps
            .EGRESS
            .update(&ifindex.to_ne_bytes(), &value, MapFlags::ANY)?;
        Ok(())
    }

    /// Runs one frame through the program as if it arrived on the interface
    /// `ifindex` (of the calling thread's network namespace): the verdict
    /// and the frame after.
    pub fn run_on(&self, ifindex: u32, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut context = libbpf_rs::libbpf_sys::xdp_md {
            data_end: frame.len() as u32,
            ingress_ifindex: ifindex,
            ..Default::default()
        };
        // SAFETY: `xdp_md` is plain old data.
        let context_bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&raw mut context).cast::<u8>(),
                size_of::<libbpf_rs::libbpf_sys::xdp_md>(),
            )
        };
        self.run_with(frame, Some(context_bytes))
    }

    /// One run of the program on `frame`, with the context `context` if given
    /// (the kernel's default otherwise: ingress on the loopback interface).
    fn run_with(&self, frame: &[u8], context: Option<&mut [u8]>) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let input = libbpf_rs::ProgramInput {
            data_in: Some(frame),
            data_out: Some(&mut out),
            context_in: context,
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

    /// Runs one frame through the program: the verdict and the frame after.
    pub fn run(&self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        self.run_with(frame, None)
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

    /// The program, e.g. for `test_run` or its run statistics.
    pub fn program(&self) -> &libbpf_rs::ProgramMut<'static> {
        &self.skel.progs.xdp_relay
    }

    /// One reason's counter, summed over CPUs.
    pub fn counter(&self, reason: Reason) -> anyhow::Result<Counter> {
        reason_total(&self.skel.maps.STATS, reason)
    }
}

/// The expiry of a binding that never expires: beyond any reading of the
/// kernel's clock.
pub const NEVER: u64 = u64::MAX;

/// The listener a client of the configuration `config` talks to: the first
/// listener port on the relay address of the client's family.
fn listener_of(config: &KernelConfig, client: SocketAddr) -> SocketAddr {
    let port = u16::from_be_bytes(config.listen_ports[0]);
    match client.ip() {
        IpAddr::V4(_) => SocketAddr::from((config.relay_ipv4, port)),
        IpAddr::V6(_) => SocketAddr::from((config.relay_ipv6, port)),
    }
}

/// Writes a binding's two entries, each through `update(key, value)`.
fn install_with(
    binding: &BindingFields,
    mut update: impl FnMut(&MapKey, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (client_key, peer_target) = binding.client_entry();
    let (peer_key, client_target) = binding.peer_entry();
    update(&client_key, peer_target.as_bytes())?;
    update(&peer_key, client_target.as_bytes())
}

/// The relay program loaded from an object file without the skeleton, for
/// the bench, which compares the program the agent loads with its variant
/// without the expiry check (`relay_unexpiring`), both loaded the same way,
/// and times it with its binding counted and metered or not.
#[derive(Debug)]
pub struct RelayObject {
    object: libbpf_rs::Object,
}

impl RelayObject {
    /// The program the agent loads (`xdp_agent_skel::OBJECT`).
    pub fn relay() -> anyhow::Result<Self> {
        let object = libbpf_rs::ObjectBuilder::default()
            .open_memory(xdp_agent_skel::OBJECT)
            .context("cannot open the relay object")?
            .load()
            .context("cannot load the relay object")?;
        Ok(Self { object })
    }

    /// The same program built without the expiry check: bench only.
    pub fn unexpiring() -> anyhow::Result<Self> {
        // `bpf/xdp` builds all its programs into one directory; the build
        // script names the floor's.
        let path =
            std::path::Path::new(env!("LAB_FLOOR_OBJECT")).with_file_name("relay_unexpiring");
        let object = libbpf_rs::ObjectBuilder::default()
            .open_file(&path)
            .with_context(|| format!("cannot open {}", path.display()))?
            .load()
            .with_context(|| format!("cannot load {}", path.display()))?;
        Ok(Self { object })
    }

    /// The same program built without the usage counters and meters
    /// (`relay_uncounted`: no terms copied, no meter checked, nothing
    /// counted): bench only.
    pub fn uncounted() -> anyhow::Result<Self> {
        // Beside the floor's, as `relay_unexpiring`.
        let path = std::path::Path::new(env!("LAB_FLOOR_OBJECT")).with_file_name("relay_uncounted");
        let object = libbpf_rs::ObjectBuilder::default()
            .open_file(&path)
            .with_context(|| format!("cannot open {}", path.display()))?
            .load()
            .with_context(|| format!("cannot load {}", path.display()))?;
        Ok(Self { object })
    }

    /// Writes the configuration.
    pub fn configure(&self, config: &KernelConfig) -> anyhow::Result<()> {
        self.map("CONFIG")?
            .update(&0u32.to_ne_bytes(), config.as_bytes(), MapFlags::ANY)?;
        Ok(())
    }

    /// [`LoadedRelay::bind`] for a relay configured with `config`.
    pub fn bind(
        &self,
        config: &KernelConfig,
        client: SocketAddr,
        channel: u16,
        peer: SocketAddr,
        allocation_port: u16,
    ) -> anyhow::Result<()> {
        self.bind_with(config, client, channel, peer, allocation_port, 0, [0; 2])
    }

    /// [`RelayObject::bind`], the binding counted in `USAGE` slot
    /// `usage_slot` (0: not counted) and metered by the `METERS` keys
    /// `meters` (0: none). Writing a binding again replaces its two
    /// entries, as the agent does for a refresh or a new limit.
    #[expect(
        clippy::too_many_arguments,
        reason = "a binding's fields as the agent writes them"
    )]
    pub fn bind_with(
        &self,
        config: &KernelConfig,
        client: SocketAddr,
        channel: u16,
        peer: SocketAddr,
        allocation_port: u16,
        usage_slot: u32,
        meters: [u64; 2],
    ) -> anyhow::Result<()> {
        let binding = BindingFields {
            client,
            listener: listener_of(config, client),
            channel,
            peer,
            allocation_port,
            dont_fragment: false,
            usage_slot,
            meters,
            expires_at_ns: NEVER,
        };
        install_with(&binding, |key, value| {
            Ok(self
                .map(key.map_name())?
                .update(key.bytes(), value, MapFlags::ANY)?)
        })
    }

    /// Sets the `METERS` entry `key` (`bpf_common::usage::meter_key`) to a
    /// rate of `bytes_per_second`, its bucket full, as the agent creates a
    /// meter.
    pub fn set_meter(&self, key: u64, bytes_per_second: u64) -> anyhow::Result<()> {
        self.map("METERS")?.update(
            &key.to_ne_bytes(),
            Meter::new(bytes_per_second).as_bytes(),
            MapFlags::ANY,
        )?;
        Ok(())
    }

    /// What `USAGE` slot `slot` has counted.
    pub fn usage(&self, slot: u32) -> anyhow::Result<BindingUsage> {
        let bytes = self
            .map("USAGE")?
            .lookup(&slot.to_ne_bytes(), MapFlags::ANY)?
            .with_context(|| format!("no USAGE slot {slot}"))?;
        BindingUsage::from_ne_bytes(&bytes).context("a USAGE slot of another size")
    }

    /// One reason's counter (`STATS`), summed over CPUs.
    pub fn counter(&self, reason: Reason) -> anyhow::Result<Counter> {
        reason_total(&self.map("STATS")?, reason)
    }

    fn map(&self, name: &str) -> anyhow::Result<libbpf_rs::Map<'_>> {
        self.object
            .maps()
            .find(|map| map.name() == name)
            .with_context(|| format!("the relay object has no map {name}"))
    }

    /// The program.
    pub fn program(&self) -> anyhow::Result<libbpf_rs::ProgramMut<'_>> {
        self.object
            .progs_mut()
            .next()
            .context("the relay object has no program")
    }
}

/// A reference program of `bpf/xdp` (`trivial` or `floor`), loaded unattached.
#[derive(Debug)]
pub struct Reference {
    object: libbpf_rs::Object,
}

impl Reference {
    /// The program that only returns `XDP_TX`.
    pub fn trivial() -> anyhow::Result<Self> {
        Self::load(env!("LAB_TRIVIAL_OBJECT"))
    }

    /// The floor: one 12-byte-key hash lookup, a MAC swap, `XDP_TX`. Frames
    /// whose addresses and ports are in `flows` are "relayed".
    pub fn floor(flows: &[[u8; 12]]) -> anyhow::Result<Self> {
        Self::with_flows(env!("LAB_FLOOR_OBJECT"), flows)
    }

    /// The floor of the FIB next hop: one 12-byte-key hash lookup, a
    /// `bpf_fib_lookup` for the frame's destination (as if forwarding from
    /// the ingress interface), the next hop's MACs written, `XDP_TX`. Frames
    /// whose addresses and ports are in `flows` are "relayed" to their
    /// destination; the others, and those the FIB has no next hop for, pass.
    pub fn floor_fib(flows: &[[u8; 12]]) -> anyhow::Result<Self> {
        Self::with_flows(env!("LAB_FLOOR_FIB_OBJECT"), flows)
    }

    /// A floor program at `path` with `flows` in its one map.
    fn with_flows(path: &str, flows: &[[u8; 12]]) -> anyhow::Result<Self> {
        let reference = Self::load(path)?;
        let map = reference
            .object
            .maps()
            .next()
            .with_context(|| format!("{path} has no map"))?;
        for flow in flows {
            map.update(flow, &1u32.to_ne_bytes(), MapFlags::ANY)?;
        }
        Ok(reference)
    }

    fn load(path: &str) -> anyhow::Result<Self> {
        let object = libbpf_rs::ObjectBuilder::default()
            .open_file(path)
            .with_context(|| format!("cannot open {path}"))?
            .load()
            .with_context(|| format!("cannot load {path}"))?;
        Ok(Self { object })
    }

    /// The program.
    pub fn program(&self) -> anyhow::Result<libbpf_rs::ProgramMut<'_>> {
        self.object
            .progs_mut()
            .next()
            .context("the object has no program")
    }
}

/// Runs `frame` through `program` once; the verdict.
pub fn run_once(program: &libbpf_rs::ProgramMut<'_>, frame: &[u8]) -> anyhow::Result<u32> {
    let mut out = vec![0u8; frame.len() + 256];
    let input = libbpf_rs::ProgramInput {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    };
    Ok(program.test_run(input)?.return_value)
}

/// The kernel's run statistics of a program (`kernel.bpf_stats_enabled`):
/// total run time in nanoseconds and number of runs.
pub fn run_stats(program: &libbpf_rs::ProgramMut<'_>) -> anyhow::Result<(u64, u64)> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut info = libbpf_rs::libbpf_sys::bpf_prog_info::default();
    let mut len = size_of::<libbpf_rs::libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: `info` and `len` describe a valid, writable bpf_prog_info.
    let ret = unsafe {
        libbpf_rs::libbpf_sys::bpf_prog_get_info_by_fd(
            program.as_fd().as_raw_fd(),
            &mut info,
            &mut len,
        )
    };
    anyhow::ensure!(ret == 0, "bpf_prog_get_info_by_fd failed: {ret}");
    Ok((info.run_time_ns, info.run_cnt))
}

impl LoadedRelay {
    /// The `REDIRECTED` counter (relayed frames that left through another
    /// interface than they came in on), summed over CPUs.
    pub fn redirected(&self) -> anyhow::Result<Counter> {
        let per_cpu = self
            .skel
            .maps
            .REDIRECTED
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)?
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

/// An address literal of a test.
///
/// # Panics
/// If `text` is not `ip:port`: a test's own mistake.
#[expect(clippy::unwrap_used, reason = "a test's literal")]
pub fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// The relay's IPv4 address in the program tests' configuration.
pub const RELAY4: &str = "203.0.113.10";
/// The relay's IPv6 address in the program tests' configuration.
pub const RELAY6: &str = "2001:db8:2::10";

/// The program tests' relay address ([`RELAY4`], [`RELAY6`]) in the family of
/// `family_of`.
#[expect(clippy::unwrap_used, reason = "constant literals")]
pub fn relay_ip(family_of: SocketAddr) -> IpAddr {
    if family_of.is_ipv4() {
        RELAY4.parse().unwrap()
    } else {
        RELAY6.parse().unwrap()
    }
}

/// A payload of `len` bytes in which a shifted or reordered byte shows.
pub fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 + 7) as u8).collect()
}

/// A `STATS` map's counter of `reason`, summed over CPUs.
fn reason_total(stats: &impl MapCore, reason: Reason) -> anyhow::Result<Counter> {
    let per_cpu = stats
        .lookup_percpu(&(reason as u32).to_ne_bytes(), MapFlags::ANY)?
        .unwrap_or_default();
    Ok(per_cpu
        .iter()
        .filter_map(|raw| Counter::from_ne_bytes(raw))
        .sum())
}
