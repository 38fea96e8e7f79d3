//! Benchmark tools: a two-namespace topology that isolates the system under
//! test, an in-kernel load generator and an XDP sink.
//!
//! ```text
//!  gen ns                                          relay ns
//!  rx 203.0.113.1/24 [sink XDP]  ---- veth ----   x0 203.0.113.10/24 [relay XDP,
//!  lo 192.0.2.2 (client), 198.51.100.2 (peer)        floor, floor_fib or XDP_PASS]
//!  trafficgen: BPF_PROG_TEST_RUN, LIVE_FRAMES, ingress rx, XDP_TX --> x0
//! ```
//!
//! The relay namespace is set up as an operator sets up a relay for the
//! XDP program's default next hop (the kernel's FIB): forwarding on `x0` in
//! both families, routes to the client's and the peer's networks through the
//! generator side's gateway 203.0.113.1, whose neighbour entry is static, so
//! that the FIB resolves every relayed frame to `rx`'s MAC address.
//!
//! The generator is an XDP program run by `BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` on `rx`: it returns `XDP_TX`, so each frame
//! leaves `rx` for the relay's `x0` without a socket or a routing hop. What the
//! relay sends back arrives on `rx`, where the sink counts the frames of each
//! configured class, checks their fields and drops them. Everything else (ARP,
//! the real TURN exchange that sets the allocation up) reaches the stack: the
//! client (192.0.2.2) and the peer (198.51.100.2) are local addresses of the
//! generator's namespace.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use libbpf_rs::libbpf_sys as sys;
use libbpf_rs::{MapCore, MapFlags};

use crate::packet::{FrameSpec, channel_data};
use crate::run;

pub mod control;
pub mod expiry;
pub mod plot;
pub mod raw;
pub mod tls;
pub mod turn;
pub mod usage;

/// The client's address (a local address of the generator's namespace).
pub const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
/// The peer's address (a local address of the generator's namespace).
pub const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 2), 9000);
/// The relay's TURN listener.
pub const RELAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 3478);
/// The generator side's gateway address.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The relay's interface.
pub const RELAY_IFACE: &str = "x0";
/// The generator's interface.
pub const GEN_IFACE: &str = "rx";

/// Namespaces share the lab's prefix and pid scheme, so the lab's sweep also
/// removes those of a killed bench.
const PREFIX: &str = "xtlab";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The bench's namespaces are the lab's.
pub use crate::Netns as Ns;

/// A process of the bench, killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// Its name (and log file name).
    pub name: String,
    child: Child,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if it has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{} exited: {status}", self.name),
        }
    }

    /// User plus system CPU time of the process (all threads), in ns.
    pub fn cpu_ns(&self) -> anyhow::Result<u64> {
        process_cpu_ns(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process from /proc/PID/stat, in ns.
pub fn process_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3; utime, stime are fields 14, 15.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok((utime + stime) * 1_000_000_000 / ticks)
}

/// What the sink expects of one class of frames (IPv4, UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Destination of the frames (selects the class).
    pub dst: SocketAddrV4,
    /// Expected source.
    pub src: SocketAddrV4,
    /// Expected UDP length (0: not checked).
    pub udp_len: u16,
    /// Expected channel number in the first two payload bytes (0: not checked).
    pub channel: u16,
}

impl Rule {
    fn bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.dst.ip().octets());
        out[4..8].copy_from_slice(&self.src.ip().octets());
        out[8..10].copy_from_slice(&self.dst.port().to_be_bytes());
        out[10..12].copy_from_slice(&self.src.port().to_be_bytes());
        out[12..14].copy_from_slice(&self.udp_len.to_be_bytes());
        out[14..16].copy_from_slice(&self.channel.to_be_bytes());
        out
    }
}

/// The sink's counters of one rule, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Frames counted.
    pub packets: u64,
    /// Their bytes (Ethernet frames).
    pub bytes: u64,
    /// Frames that failed a check of the rule.
    pub bad: u64,
}

/// Number of sink rules.
pub const RULES: usize = 4;

/// A direction of relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Channel data from the client becomes UDP to the peer.
    ClientToPeer,
    /// UDP from the peer becomes channel data to the client.
    PeerToClient,
}

impl Direction {
    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientToPeer => "client->peer",
            Self::PeerToClient => "peer->client",
        }
    }
}

/// What the system under test does with the generator's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Relays them as TURN: channel data to the peer, UDP to the client.
    Relay,
    /// Returns them as they are with the MACs swapped (the `floor` program).
    Mirror,
    /// Sends them on as they are to the next hop the FIB gives for their
    /// destination (the `floor_fib` program): the generator addresses them
    /// past the relay, to where the relay would send them (the peer, the
    /// client), as a router receives them.
    Forward,
}

/// The frame the generator sends for a binding and the rule the sink checks
/// the relayed frames with.
pub fn case_frames(
    net: &BenchNet,
    direction: Direction,
    payload: usize,
    channel: u16,
    allocation_port: u16,
    handling: Handling,
) -> (Vec<u8>, Rule) {
    let data = vec![0x5a; payload];
    let relayed = SocketAddrV4::new(*RELAY.ip(), allocation_port);
    let forward = handling == Handling::Forward;
    let (src, dst) = match direction {
        Direction::ClientToPeer => (CLIENT, if forward { PEER } else { RELAY }),
        Direction::PeerToClient => (PEER, if forward { CLIENT } else { relayed }),
    };
    let mut spec = match direction {
        Direction::ClientToPeer => FrameSpec::new(
            SocketAddr::V4(src),
            SocketAddr::V4(dst),
            &channel_data(channel, &data),
        ),
        Direction::PeerToClient => FrameSpec::new(SocketAddr::V4(src), SocketAddr::V4(dst), &data),
    };
    spec.src_mac = net.gen_mac;
    spec.dst_mac = net.relay_mac;
    let frame = spec.build();
    let rule = if handling != Handling::Relay {
        Rule {
            dst,
            src,
            udp_len: (frame.len() - 34) as u16,
            channel: 0,
        }
    } else {
        match direction {
            Direction::ClientToPeer => Rule {
                dst: PEER,
                src: relayed,
                udp_len: (8 + payload) as u16,
                channel: 0,
            },
            Direction::PeerToClient => Rule {
                dst: CLIENT,
                src: RELAY,
                udp_len: (8 + 4 + payload) as u16,
                channel,
            },
        }
    };
    (frame, rule)
}

/// The 12-byte key the floor program looks up (addresses and ports of the frame).
pub fn floor_key(frame: &[u8]) -> anyhow::Result<[u8; 12]> {
    Ok(frame.get(26..38).context("short frame")?.try_into()?)
}

/// Frames offered by one generator run.
#[derive(Debug, Clone, Copy)]
pub struct Offered {
    /// Frames the generator ran on (each returned `XDP_TX`).
    pub frames: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

/// The two namespaces, the generator and the sink.
#[derive(Debug)]
pub struct BenchNet {
    // Drop order: processes, links, objects, namespaces.
    processes: Vec<Proc>,
    links: Vec<std::os::fd::OwnedFd>,
    sink_link: Option<libbpf_rs::Link>,
    generator: libbpf_rs::Object,
    sink: libbpf_rs::Object,
    /// The generator's and sink's namespace (client and peer addresses).
    pub gen_ns: Ns,
    /// The relay's namespace.
    pub relay_ns: Ns,
    /// MAC of `rx`.
    pub gen_mac: [u8; 6],
    /// MAC of `x0`.
    pub relay_mac: [u8; 6],
    gen_ifindex: u32,
    dir: PathBuf,
    id: String,
}

fn load_object(path: &str) -> anyhow::Result<libbpf_rs::Object> {
    libbpf_rs::ObjectBuilder::default()
        .open_file(path)
        .with_context(|| format!("cannot open {path}"))?
        .load()
        .with_context(|| format!("cannot load {path}"))
}

fn map_named<'a>(object: &'a libbpf_rs::Object, name: &str) -> anyhow::Result<libbpf_rs::Map<'a>> {
    object
        .maps()
        .find(|map| map.name() == name)
        .with_context(|| format!("no map {name}"))
}

fn first_prog(object: &libbpf_rs::Object) -> anyhow::Result<libbpf_rs::ProgramMut<'_>> {
    object
        .progs_mut()
        .next()
        .context("the object has no program")
}

impl BenchNet {
    /// Builds the topology, loads the generator and attaches the sink to `rx`.
    pub fn new() -> anyhow::Result<Self> {
        let id = format!(
            "{PREFIX}{}xb{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let gen_ns = Ns::create(format!("{id}-gen"))?;
        let relay_ns = Ns::create(format!("{id}-relay"))?;
        gen_ns.ip([
            "link",
            "add",
            GEN_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            RELAY_IFACE,
            "netns",
            relay_ns.name(),
        ])?;
        gen_ns.ip(["addr", "add", "203.0.113.1/24", "dev", GEN_IFACE])?;
        gen_ns.ip(["addr", "add", "192.0.2.2/32", "dev", "lo"])?;
        gen_ns.ip(["addr", "add", "198.51.100.2/32", "dev", "lo"])?;
        gen_ns.ip(["link", "set", GEN_IFACE, "up"])?;
        // Locally sent UDP (the TURN exchange) leaves with complete checksums:
        // an XDP relay rewrites them incrementally.
        run(
            "ip",
            [
                "netns",
                "exec",
                gen_ns.name(),
                "ethtool",
                "-K",
                GEN_IFACE,
                "tx",
                "off",
            ],
        )?;
        relay_ns.ip(["addr", "add", "203.0.113.10/24", "dev", RELAY_IFACE])?;
        relay_ns.ip(["link", "set", RELAY_IFACE, "up"])?;
        relay_ns.ip(["route", "add", "default", "via", "203.0.113.1"])?;
        // The relay's next hop by the FIB (its default): forwarding on x0,
        // and the client's and the peer's networks behind the gateway.
        crate::enable_forwarding(&relay_ns, RELAY_IFACE)?;
        for network in ["192.0.2.0/24", "198.51.100.0/24"] {
            relay_ns.ip([
                "route",
                "add",
                network,
                "via",
                "203.0.113.1",
                "dev",
                RELAY_IFACE,
            ])?;
        }
        let gen_mac = gen_ns.mac(GEN_IFACE)?;
        let relay_mac = relay_ns.mac(RELAY_IFACE)?;
        // Static neighbours: no ARP in the middle of a measurement, and the
        // FIB's next hop resolved (else the relay passes every frame).
        relay_ns.add_static_neighbour(GATEWAY.into(), gen_mac, RELAY_IFACE)?;
        gen_ns.add_static_neighbour(Ipv4Addr::new(203, 0, 113, 10).into(), relay_mac, GEN_IFACE)?;
        let generator = load_object(env!("LAB_TRAFFICGEN_OBJECT"))?;
        let sink = load_object(env!("LAB_SINK_OBJECT"))?;
        let mut net = Self {
            processes: Vec::new(),
            links: Vec::new(),
            sink_link: None,
            generator,
            sink,
            gen_ns,
            relay_ns,
            gen_mac,
            relay_mac,
            gen_ifindex: 0,
            dir,
            id,
        };
        let (ifindex, link) = net.gen_ns.enter(|| {
            let ifindex = nix::net::if_::if_nametoindex(GEN_IFACE)?;
            let link = first_prog(&net.sink)?
                .attach_xdp(ifindex as i32)
                .context("cannot attach the sink to rx")?;
            Ok((ifindex, link))
        })?;
        net.gen_ifindex = ifindex;
        net.sink_link = Some(link);
        Ok(net)
    }

    /// Runs `frame` once through the XDP program `prog_id` as if it arrived
    /// on `x0` (`BPF_PROG_TEST_RUN` in the relay's namespace, so that a FIB
    /// lookup sees its routes and neighbours): the verdict and the frame after.
    pub fn run_on_relay(&self, prog_id: u32, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        // SAFETY: plain syscall wrapper; the fd is owned below.
        let fd = unsafe { sys::bpf_prog_get_fd_by_id(prog_id) };
        ensure!(fd >= 0, "bpf_prog_get_fd_by_id({prog_id}) failed: {fd}");
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        self.relay_ns.enter(|| {
            let ifindex = nix::net::if_::if_nametoindex(RELAY_IFACE)?;
            let ctx = sys::xdp_md {
                data_end: frame.len() as u32,
                ingress_ifindex: ifindex,
                ..Default::default()
            };
            let mut out = vec![0u8; frame.len() + 256];
            let mut opts = sys::bpf_test_run_opts {
                sz: size_of::<sys::bpf_test_run_opts>() as _,
                data_in: frame.as_ptr().cast(),
                data_size_in: frame.len() as u32,
                data_out: out.as_mut_ptr().cast(),
                data_size_out: out.len() as u32,
                ctx_in: (&raw const ctx).cast(),
                ctx_size_in: size_of::<sys::xdp_md>() as u32,
                repeat: 1,
                ..Default::default()
            };
            // SAFETY: opts points at live buffers of the stated sizes.
            let ret = unsafe { sys::bpf_prog_test_run_opts(raw, &mut opts) };
            ensure!(ret == 0, "BPF_PROG_TEST_RUN failed: {ret}");
            out.truncate(opts.data_size_out as usize);
            Ok((opts.retval, out))
        })
    }

    /// Checks that the program `prog_id` on `x0` sends `frame` back out of
    /// `x0` (`XDP_TX`) to `rx`'s MAC address from `x0`'s, which the sink
    /// needs to see it as `rx` would: with the FIB, the next hop the relay
    /// namespace's routes and neighbours give.
    pub fn check_next_hop(&self, prog_id: u32, frame: &[u8]) -> anyhow::Result<()> {
        const XDP_TX: u32 = 3;
        let (verdict, out) = self.run_on_relay(prog_id, frame)?;
        ensure!(
            verdict == XDP_TX,
            "the program on x0 returned {verdict}, not XDP_TX, for the generator's frame"
        );
        let (dst, src) = (out.get(0..6), out.get(6..12));
        ensure!(
            dst == Some(&self.gen_mac[..]) && src == Some(&self.relay_mac[..]),
            "the program on x0 sends to {dst:02x?} from {src:02x?}, not to rx {:02x?} from x0 {:02x?}",
            self.gen_mac,
            self.relay_mac
        );
        Ok(())
    }

    /// A directory for logs and sockets, removed with the topology.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A bpffs directory for an agent's pins, removed with the topology.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.id)
    }

    /// Attaches `program` to the relay's `x0` (a BPF link, native mode); it
    /// stays attached as long as the topology.
    pub fn attach_relay(&mut self, program: &libbpf_rs::ProgramMut<'_>) -> anyhow::Result<()> {
        use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
        let prog_fd = program.as_fd().as_raw_fd();
        let link_fd = self.relay_ns.enter(move || {
            let ifindex = nix::net::if_::if_nametoindex(RELAY_IFACE)?;
            // SAFETY: plain syscall wrapper; no options.
            let fd = unsafe {
                sys::bpf_link_create(prog_fd, ifindex as i32, sys::BPF_XDP, std::ptr::null())
            };
            ensure!(fd >= 0, "cannot attach to x0: {fd}");
            Ok(fd)
        })?;
        // SAFETY: a new link fd that nothing else owns.
        self.links.push(unsafe { OwnedFd::from_raw_fd(link_fd) });
        Ok(())
    }

    /// Replaces the program on `x0` by `program` in place (`BPF_LINK_UPDATE`
    /// of the link [`BenchNet::attach_relay`] made last): no moment without
    /// a program, which veth needs to deliver the generator's frames.
    pub fn replace_relay(&self, program: &libbpf_rs::ProgramMut<'_>) -> anyhow::Result<()> {
        use std::os::fd::{AsFd, AsRawFd};
        let link = self.links.last().context("nothing is attached to x0")?;
        // SAFETY: plain syscall wrapper on two live fds; no options.
        let ret = unsafe {
            sys::bpf_link_update(
                link.as_raw_fd(),
                program.as_fd().as_raw_fd(),
                std::ptr::null(),
            )
        };
        ensure!(ret == 0, "cannot replace the program on x0: {ret}");
        Ok(())
    }

    /// Starts a process; its output goes to `dir()/NAME.log`.
    pub fn spawn(&mut self, name: &str, mut command: Command) -> anyhow::Result<&mut Proc> {
        let log = self.dir.join(format!("{name}.log"));
        let file = File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let index = self.processes.len();
        self.processes.push(Proc {
            name: name.to_owned(),
            child,
        });
        Ok(&mut self.processes[index])
    }

    /// A process started with [`BenchNet::spawn`].
    pub fn process(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process {name}"))
    }

    /// A process's log.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The id of the XDP program attached to `x0` (whoever attached it).
    pub fn relay_prog_id(&self) -> anyhow::Result<u32> {
        let text = self.relay_ns.ip(["-j", "link", "show", RELAY_IFACE])?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let id = json
            .get(0)
            .and_then(|link| link.get("xdp"))
            .and_then(|xdp| xdp.get("prog"))
            .and_then(|prog| prog.get("id"))
            .and_then(serde_json::Value::as_u64)
            .context("no XDP program on x0")?;
        Ok(id as u32)
    }

    /// Sets the sink's rules (at most [`RULES`]; the rest are cleared) and zeroes nothing.
    pub fn set_rules(&self, rules: &[Rule]) -> anyhow::Result<()> {
        ensure!(rules.len() <= RULES, "at most {RULES} rules");
        let map = map_named(&self.sink, "RULES")?;
        for index in 0..RULES {
            let value = rules.get(index).map_or([0u8; 16], Rule::bytes);
            map.update(&(index as u32).to_ne_bytes(), &value, MapFlags::ANY)?;
        }
        Ok(())
    }

    /// The sink's counters per rule, summed over CPUs.
    pub fn counts(&self) -> anyhow::Result<[Count; RULES]> {
        let map = map_named(&self.sink, "COUNTS")?;
        let mut out = [Count::default(); RULES];
        for (index, count) in out.iter_mut().enumerate() {
            let per_cpu = map
                .lookup_percpu(&(index as u32).to_ne_bytes(), MapFlags::ANY)?
                .unwrap_or_default();
            for raw in per_cpu {
                let word = |i: usize| -> u64 {
                    raw.get(i * 8..i * 8 + 8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_ne_bytes)
                };
                count.packets += word(0);
                count.bytes += word(1);
                count.bad += word(2);
            }
        }
        Ok(out)
    }

    /// Runs the generator with `frame` for `duration`: at full speed, or
    /// paced to `rate` frames per second by the generator program itself
    /// (evenly spaced frames; see `trafficgen.rs`).
    pub fn generate(
        &self,
        frame: &[u8],
        duration: Duration,
        rate: Option<f64>,
    ) -> anyhow::Result<Offered> {
        ensure!(frame.len() >= 64, "frames must be at least 64 bytes");
        let mut template = [0u8; 64];
        template.copy_from_slice(&frame[..64]);
        let key = 0u32.to_ne_bytes();
        map_named(&self.generator, "TEMPLATE")?.update(&key, &template, MapFlags::ANY)?;
        let pace_ns = rate.map_or(0u64, |rate| (1e9 / rate.max(1.0)) as u64);
        map_named(&self.generator, "PACE")?.update(&key, &pace_ns.to_ne_bytes(), MapFlags::ANY)?;
        map_named(&self.generator, "NEXT")?.update(&key, &0u64.to_ne_bytes(), MapFlags::ANY)?;
        let sent = || -> anyhow::Result<u64> {
            let value = map_named(&self.generator, "SENT")?
                .lookup(&key, MapFlags::ANY)?
                .context("no SENT value")?;
            Ok(u64::from_ne_bytes(value.as_slice().try_into()?))
        };
        let sent_before = sent()?;
        let fd = {
            use std::os::fd::{AsFd, AsRawFd};
            first_prog(&self.generator)?.as_fd().as_raw_fd()
        };
        let ifindex = self.gen_ifindex;
        let elapsed = self.gen_ns.enter(move || {
            // A call has a large fixed cost (page pool set-up and tear-down,
            // about 17 ms on a busy 2-core machine): each call runs about a
            // quarter of the duration (at most 250 ms), sized from the
            // previous call's time per frame (paced runs mostly drop).
            let target_ns = (duration.as_nanos() as f64 / 4.0).min(250e6);
            let mut chunk: u32 = 65536;
            let ctx = sys::xdp_md {
                data: 0,
                data_end: frame.len() as u32,
                ingress_ifindex: ifindex,
                ..Default::default()
            };
            let start = Instant::now();
            let mut calls = 0u32;
            loop {
                calls += 1;
                let mut opts = sys::bpf_test_run_opts {
                    sz: size_of::<sys::bpf_test_run_opts>() as _,
                    data_in: frame.as_ptr().cast(),
                    data_size_in: frame.len() as u32,
                    ctx_in: (&raw const ctx).cast(),
                    ctx_size_in: size_of::<sys::xdp_md>() as u32,
                    repeat: chunk as i32,
                    flags: sys::BPF_F_TEST_XDP_LIVE_FRAMES,
                    batch_size: 64,
                    ..Default::default()
                };
                // SAFETY: opts points at live buffers of the stated sizes.
                let ret = unsafe { sys::bpf_prog_test_run_opts(fd, &mut opts) };
                ensure!(ret == 0, "BPF_PROG_TEST_RUN (live frames) failed: {ret}");
                let per_frame = f64::from(opts.duration.max(1));
                chunk = (target_ns / per_frame).clamp(4096.0, 16e6) as u32;
                let elapsed = start.elapsed();
                if elapsed >= duration {
                    if std::env::var_os("BENCH_DEBUG").is_some() {
                        eprintln!(
                            "bench: generator: {calls} calls in {elapsed:?}, last call {} ns/frame",
                            opts.duration
                        );
                    }
                    return Ok(elapsed);
                }
            }
        })?;
        Ok(Offered {
            frames: sent()? - sent_before,
            elapsed,
        })
    }
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        self.processes.clear();
        self.links.clear();
        self.sink_link = None;
        let _ = std::fs::remove_dir_all(self.pin_dir());
        if std::thread::panicking() {
            eprintln!("bench: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Cumulative (run time ns, run count) of a loaded program by id
/// (`kernel.bpf_stats_enabled` must be on for the time to grow).
pub fn prog_stats(id: u32) -> anyhow::Result<(u64, u64)> {
    // SAFETY: plain syscall wrappers; the fd is closed below.
    let fd = unsafe { sys::bpf_prog_get_fd_by_id(id) };
    ensure!(fd >= 0, "bpf_prog_get_fd_by_id({id}) failed: {fd}");
    let mut info = sys::bpf_prog_info::default();
    let mut len = size_of::<sys::bpf_prog_info>() as u32;
    // SAFETY: `info` and `len` describe a valid, writable bpf_prog_info.
    let ret = unsafe { sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
    // SAFETY: fd is ours.
    unsafe { nix::libc::close(fd) };
    ensure!(ret == 0, "bpf_prog_get_info_by_fd failed: {ret}");
    Ok((info.run_time_ns, info.run_cnt))
}

/// Turns `kernel.bpf_stats_enabled` on and restores it on drop.
#[derive(Debug)]
pub struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    /// Enables the statistics.
    pub fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(Self::PATH).context("read bpf_stats_enabled")?;
        std::fs::write(Self::PATH, "1").context("enable bpf_stats_enabled (needs root)")?;
        Ok(Self(previous))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}
