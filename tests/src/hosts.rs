//! Topologies beyond [`crate::Lab`]'s routed star, for the agent's FIB next
//! hop: hosts on the relay's own L2 segment, and a relay with two interfaces.
//!
//! ```text
//!  Segment: a bridge in its own namespace is the relay's L2 segment.
//!
//!  relay ns x0 203.0.113.10 --- sr [XDP_PASS] \
//!  near ns  n0 203.0.113.20 --- sn             br0 (switch ns)
//!  router ns r0 203.0.113.1 --- sg            /
//!            rp 198.51.100.1 ---- p0 198.51.100.2 far ns
//!
//!  TwoLegs: the relay reaches clients on x0 and peers on x1.
//!
//!  client ns c0 192.0.2.2 [XDP_PASS] ---- x0 192.0.2.10    relay ns
//!  peer ns  p0 198.51.100.2 [XDP_PASS] -- x1 198.51.100.10
//! ```
//!
//! IPv6 runs beside IPv4 on every link. Neighbours are static, as in the lab.
//! A [`Hosts`] owns its namespaces, its processes, its XDP_PASS programs and
//! the agent's pin directory; dropping it removes them all, also when a test
//! panics. Names come from [`crate::unique_name`], so tests run in parallel.
//!
//! [`Session`] is a blocking TURN client over [`crate::stun::Client`]:
//! Allocate, ChannelBind, then ChannelData.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use proto::v1::{CountersRequest, CountersResponse};

use crate::stun::{self, Answer, attr, class, method};
use crate::{Lab, Netns, Process, enable_forwarding, sample, unique_name, wait_for};

/// Where bpffs is mounted on the host.
const BPFFS: &str = "/sys/fs/bpf";

/// turn-control's metrics endpoint inside its namespace.
pub const TURN_CONTROL_METRICS: &str = "127.0.0.1:9641";

/// The relay's address on the segment ([`Hosts::segment`]).
pub const SEGMENT_RELAY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The relay's IPv6 address on the segment.
pub const SEGMENT_RELAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
/// The host beside the relay on its segment.
pub const SEGMENT_NEAR_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The IPv6 address of the host beside the relay.
pub const SEGMENT_NEAR_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);
/// The segment's gateway (the router's side on the segment).
pub const SEGMENT_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The segment's IPv6 gateway.
pub const SEGMENT_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// The host behind the gateway.
pub const SEGMENT_FAR_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The IPv6 address of the host behind the gateway.
pub const SEGMENT_FAR_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);

/// The two-legged relay's address facing its clients (x0, [`Hosts::two_legs`]).
pub const LEGS_LISTEN_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Its IPv6 address facing its clients.
pub const LEGS_LISTEN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
/// Its address facing the peers (x1): the allocations' relayed address.
pub const LEGS_RELAY_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// Its IPv6 address facing the peers.
pub const LEGS_RELAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x10);
/// The client of the two-legged relay.
pub const LEGS_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The client's IPv6 address.
pub const LEGS_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The peer of the two-legged relay.
pub const LEGS_PEER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The peer's IPv6 address.
pub const LEGS_PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);

/// Namespaces, processes and programs of one topology, removed on drop.
#[derive(Debug)]
pub struct Hosts {
    // Drop order (see `Drop`): processes, the XDP_PASS links, the pins,
    // then the namespaces.
    processes: Vec<Process>,
    pass_links: Vec<libbpf_rs::Link>,
    pass_object: Option<libbpf_rs::Object>,
    namespaces: Vec<(String, Netns)>,
    dir: PathBuf,
    id: String,
}

impl Hosts {
    /// An empty topology with a unique id, its log directory and bpffs.
    pub fn new(what: &str) -> anyhow::Result<Self> {
        let id = unique_name(what);
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        mount_bpffs()?;
        Ok(Self {
            processes: Vec::new(),
            pass_links: Vec::new(),
            pass_object: None,
            namespaces: Vec::new(),
            dir,
            id,
        })
    }

    /// The relay on a bridged segment with the `near` host and the `router`,
    /// which forwards to the `far` host. Every host routes through the
    /// router by default; the relay's agent is not started.
    pub fn segment() -> anyhow::Result<Self> {
        let mut hosts = Self::new("seg")?;
        for role in ["switch", "relay", "near", "router", "far"] {
            hosts.add(role)?;
        }
        hosts
            .ns("switch")?
            .ip(["link", "add", "br0", "type", "bridge"])?;
        for (role, iface, port) in [
            ("relay", "x0", "sr"),
            ("near", "n0", "sn"),
            ("router", "r0", "sg"),
        ] {
            hosts.veth(("switch", port), (role, iface))?;
            let switch = hosts.ns("switch")?;
            switch.ip(["link", "set", port, "master", "br0"])?;
            switch.ip(["link", "set", port, "up"])?;
        }
        hosts.ns("switch")?.ip(["link", "set", "br0", "up"])?;
        hosts.veth(("router", "rp"), ("far", "p0"))?;
        let segment = [
            ("relay", "x0", SEGMENT_RELAY_V4, SEGMENT_RELAY_V6),
            ("near", "n0", SEGMENT_NEAR_V4, SEGMENT_NEAR_V6),
            ("router", "r0", SEGMENT_GATEWAY_V4, SEGMENT_GATEWAY_V6),
        ];
        let behind = [
            ("router", "rp", Ipv4Addr::new(198, 51, 100, 1), ipv6(3, 1)),
            ("far", "p0", SEGMENT_FAR_V4, SEGMENT_FAR_V6),
        ];
        for (role, iface, v4, v6) in segment.iter().chain(&behind) {
            hosts.address(role, iface, (*v4).into(), *v6)?;
        }
        hosts.all_neighbours(&segment)?;
        hosts.all_neighbours(&behind)?;
        for role in ["relay", "near"] {
            hosts.default_routes(role, SEGMENT_GATEWAY_V4, SEGMENT_GATEWAY_V6)?;
        }
        hosts.default_routes("far", Ipv4Addr::new(198, 51, 100, 1), ipv6(3, 1))?;
        let router = hosts.ns("router")?;
        router.exec("sysctl", ["-qw", "net.ipv4.ip_forward=1"])?;
        router.exec("sysctl", ["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        enable_forwarding(hosts.ns("relay")?, "x0")?;
        hosts.complete_checksums(&[("near", "n0"), ("far", "p0")])?;
        // Frames the relay sends back out of x0 with XDP_TX arrive at sr.
        hosts.attach_pass("switch", "sr")?;
        Ok(hosts)
    }

    /// The relay reaching the `client` on x0 and the `peer` on x1, each on
    /// a link of its own; the agent is not started.
    pub fn two_legs() -> anyhow::Result<Self> {
        let mut hosts = Self::new("legs")?;
        for role in ["relay", "client", "peer"] {
            hosts.add(role)?;
        }
        hosts.veth(("relay", "x0"), ("client", "c0"))?;
        hosts.veth(("relay", "x1"), ("peer", "p0"))?;
        let clients = [
            ("relay", "x0", LEGS_LISTEN_V4, LEGS_LISTEN_V6),
            ("client", "c0", LEGS_CLIENT_V4, LEGS_CLIENT_V6),
        ];
        let peers = [
            ("relay", "x1", LEGS_RELAY_V4, LEGS_RELAY_V6),
            ("peer", "p0", LEGS_PEER_V4, LEGS_PEER_V6),
        ];
        for (role, iface, v4, v6) in clients.iter().chain(&peers) {
            hosts.address(role, iface, (*v4).into(), *v6)?;
        }
        hosts.all_neighbours(&clients)?;
        hosts.all_neighbours(&peers)?;
        hosts.default_routes("client", LEGS_LISTEN_V4, LEGS_LISTEN_V6)?;
        hosts.default_routes("peer", LEGS_RELAY_V4, LEGS_RELAY_V6)?;
        for iface in ["x0", "x1"] {
            enable_forwarding(hosts.ns("relay")?, iface)?;
        }
        hosts.complete_checksums(&[("client", "c0"), ("peer", "p0")])?;
        // Frames redirected out of x1 arrive at p0, and out of x0 at c0.
        hosts.attach_pass("client", "c0")?;
        hosts.attach_pass("peer", "p0")?;
        Ok(hosts)
    }

    /// Creates the namespace of `role`.
    pub fn add(&mut self, role: &str) -> anyhow::Result<()> {
        let netns = Netns::create(format!("{}-{role}", self.id))?;
        self.namespaces.push((role.to_owned(), netns));
        Ok(())
    }

    /// The namespace of `role`.
    pub fn ns(&self, role: &str) -> anyhow::Result<&Netns> {
        self.namespaces
            .iter()
            .find(|(name, _)| name == role)
            .map(|(_, netns)| netns)
            .with_context(|| format!("no namespace for {role}"))
    }

    /// A veth pair between `(role, iface)` ends.
    pub fn veth(&self, a: (&str, &str), b: (&str, &str)) -> anyhow::Result<()> {
        let far = self.ns(b.0)?.name().to_owned();
        self.ns(a.0)?.ip([
            "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", &far,
        ])?;
        Ok(())
    }

    /// Gives `iface` of `role` a /24 and a /64 (no DAD) and brings it up.
    pub fn address(&self, role: &str, iface: &str, v4: IpAddr, v6: Ipv6Addr) -> anyhow::Result<()> {
        let netns = self.ns(role)?;
        netns.ip(["addr", "add", &format!("{v4}/24"), "dev", iface])?;
        netns.ip(["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
        netns.ip(["link", "set", iface, "up"])?;
        Ok(())
    }

    /// Static neighbours between every two hosts `(role, iface, v4, v6)`
    /// of one link.
    fn all_neighbours(&self, link: &[(&str, &str, Ipv4Addr, Ipv6Addr)]) -> anyhow::Result<()> {
        for (role, iface, _, _) in link {
            for (other, other_iface, v4, v6) in link {
                if other == role {
                    continue;
                }
                let mac = self.ns(other)?.mac(other_iface)?;
                let netns = self.ns(role)?;
                netns.add_static_neighbour((*v4).into(), mac, iface)?;
                netns.add_static_neighbour((*v6).into(), mac, iface)?;
            }
        }
        Ok(())
    }

    fn default_routes(&self, role: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> anyhow::Result<()> {
        let netns = self.ns(role)?;
        netns.ip(["route", "add", "default", "via", &v4.to_string()])?;
        netns.ip(["-6", "route", "add", "default", "via", &v6.to_string()])?;
        Ok(())
    }

    /// Turns transmit checksum offload off on the end hosts' interfaces, as
    /// the lab does: a veth would otherwise hand the relay datagrams whose
    /// UDP checksum is only the pseudo-header's, which no real NIC sends
    /// and which the relay's incremental update cannot complete.
    fn complete_checksums(&self, ends: &[(&str, &str)]) -> anyhow::Result<()> {
        for (role, iface) in ends {
            self.ns(role)?.exec("ethtool", ["-K", iface, "tx", "off"])?;
        }
        Ok(())
    }

    /// Every namespace's `ip -s link` and the `ethtool -S` of its veths:
    /// where frames went or were dropped, for a failure's message.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (role, netns) in &self.namespaces {
            let links = netns
                .ip(["-s", "link"])
                .unwrap_or_else(|e| format!("{e:#}"));
            out.push_str(&format!("--- {role}: ip -s link\n{links}"));
            if let Ok(snmp) = netns.exec("nstat", ["-asz", "Udp*Errors"]) {
                out.push_str(&format!("--- {role}: nstat\n{snmp}"));
            }
            let names = netns.ip(["-br", "link"]).unwrap_or_default();
            for iface in names.lines().filter_map(|l| l.split_whitespace().next()) {
                let Some(iface) = iface.split('@').next() else {
                    continue;
                };
                if iface == "lo" || iface == "br0" {
                    continue;
                }
                if let Ok(stats) = netns.exec("ethtool", ["-S", iface]) {
                    let nonzero: Vec<&str> = stats
                        .lines()
                        .filter(|l| l.rsplit(':').next().is_some_and(|v| v.trim() != "0"))
                        .collect();
                    out.push_str(&format!(
                        "--- {role}: ethtool -S {iface}\n{}\n",
                        nonzero.join("\n")
                    ));
                }
            }
        }
        out
    }

    /// Attaches the lab's XDP_PASS program to `iface` of `role` (native
    /// XDP_TX and XDP_REDIRECT into a veth deliver only when the other end
    /// runs a program).
    pub fn attach_pass(&mut self, role: &str, iface: &str) -> anyhow::Result<()> {
        if self.pass_object.is_none() {
            let object = libbpf_rs::ObjectBuilder::default()
                .open_file(env!("LAB_PASS_OBJECT"))
                .context("cannot open the XDP_PASS object")?
                .load()
                .context("cannot load the XDP_PASS program")?;
            self.pass_object = Some(object);
        }
        let object = self
            .pass_object
            .as_ref()
            .context("the XDP_PASS object is not loaded")?;
        let link = self.ns(role)?.enter(|| {
            let ifindex = nix::net::if_::if_nametoindex(iface)?;
            let program = object
                .progs_mut()
                .next()
                .context("the XDP_PASS object has no program")?;
            program
                .attach_xdp(ifindex as i32)
                .with_context(|| format!("cannot attach XDP_PASS to {iface}"))
        })?;
        self.pass_links.push(link);
        Ok(())
    }

    /// A directory for sockets and logs, removed on drop unless a test failed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The agent's bpffs directory, removed on drop.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(BPFFS).join(&self.id)
    }

    /// Starts a process that lives as long as the topology.
    pub fn spawn(&mut self, name: &str, command: Command) -> anyhow::Result<()> {
        let process = Process::spawn(name, command, &self.dir)?;
        self.processes.push(process);
        Ok(())
    }

    /// The log a process wrote.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn ensure_running(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self
            .processes
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process named {name}"))?;
        process.ensure_running()
    }

    /// Starts the real `xdp-agent` in `role`'s namespace in native mode,
    /// attached to `ifaces`, with `args` added; its gRPC socket once it
    /// accepts connections.
    pub fn start_agent(
        &mut self,
        role: &str,
        ifaces: &[&str],
        args: &[&str],
    ) -> anyhow::Result<PathBuf> {
        let socket = self.dir.join("agent.sock");
        let mut command = self
            .ns(role)?
            .command(crate::workspace_binary("xdp-agent")?);
        for iface in ifaces {
            command.args(["--iface", iface]);
        }
        command
            .args(["--xdp-mode", "native", "--grpc"])
            .arg(&socket)
            .arg("--pin-dir")
            .arg(self.pin_dir())
            .args(args);
        self.spawn("xdp-agent", command)?;
        let result = wait_for("xdp-agent's socket", Duration::from_secs(20), || {
            self.ensure_running("xdp-agent")?;
            Ok(std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ()))
        });
        result.with_context(|| format!("xdp-agent's log:\n{}", self.log("xdp-agent")))?;
        Ok(socket)
    }

    /// Starts the real `turn-control` in `role`'s namespace with the user
    /// `test:testpass` in realm `lab.example`, metrics on
    /// [`TURN_CONTROL_METRICS`], connected to the agent at `agent`; `args`
    /// give its listeners, relay addresses and allowed peers. Returns once
    /// it is ready and connected to the agent.
    pub fn start_turn_control(
        &mut self,
        role: &str,
        agent: &Path,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let mut command = self
            .ns(role)?
            .command(crate::workspace_binary("turn-control")?);
        command
            .args(["--ports", "49152-65535", "--realm", "lab.example"])
            .args(["--user", "test:testpass", "--metrics", TURN_CONTROL_METRICS])
            .arg("--agent")
            .arg(agent)
            .args(args);
        self.spawn("turn-control", command)?;
        let ready = wait_for("turn-control to be ready", Duration::from_secs(20), || {
            self.ensure_running("turn-control")?;
            Ok(self
                .log("turn-control")
                .contains("relay ready")
                .then_some(()))
        });
        ready.with_context(|| format!("turn-control's log:\n{}", self.log("turn-control")))?;
        let netns = self.ns(role)?;
        let connected = wait_for(
            "turn-control to connect to its agent",
            Duration::from_secs(15),
            || {
                let body = Lab::scrape(netns, TURN_CONTROL_METRICS)?;
                Ok((sample(&body, "turn_agent_connected", "") == Some(1.0)).then_some(()))
            },
        );
        connected.with_context(|| format!("turn-control's log:\n{}", self.log("turn-control")))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.processes.clear();
        self.pass_links.clear();
        self.pass_object = None;
        // Pinned links and maps outlive the agent by design; not the hosts.
        let pins = self.pin_dir();
        if let Err(error) = std::fs::remove_dir_all(&pins)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("hosts: cannot remove {}: {error}", pins.display());
        }
        // Deleting the namespaces deletes their veths and the bridge.
        self.namespaces.clear();
        if std::thread::panicking() {
            eprintln!("hosts: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ipv6(net: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, host)
}

/// Mounts bpffs on the host's /sys/fs/bpf unless it is there already.
fn mount_bpffs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(BPFFS) && line.contains(" bpf "));
    if !mounted {
        crate::run("mount", ["-t", "bpf", "bpf", BPFFS])?;
    }
    Ok(())
}

/// The agent's counters (CountersResponse) through its gRPC socket.
pub fn counters(socket: &Path) -> anyhow::Result<CountersResponse> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = proto::connect(socket.to_path_buf())
            .await
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        Ok(client.counters(CountersRequest {}).await?.into_inner())
    })
}

/// (packets, bytes) of the counter `reason` in `counters` ((0, 0) when absent).
pub fn counter(counters: &CountersResponse, reason: &str) -> (u64, u64) {
    counters
        .counters
        .iter()
        .find(|c| c.reason == reason)
        .map_or((0, 0), |c| (c.packets, c.bytes))
}

/// The counters that grew from `before` to `after`, one `reason +packets` each,
/// and the redirected packets: what a failed assertion shows.
pub fn growth(before: &CountersResponse, after: &CountersResponse) -> String {
    let mut out: Vec<String> = after
        .counters
        .iter()
        .filter_map(|c| {
            let grown = c.packets - counter(before, &c.reason).0.min(c.packets);
            (grown > 0).then(|| format!("{} +{grown}", c.reason))
        })
        .collect();
    out.push(format!(
        "redirected +{}",
        after.redirected_packets - before.redirected_packets.min(after.redirected_packets)
    ));
    out.join(", ")
}

/// A blocking TURN client with a UDP allocation: Allocate, ChannelBind,
/// ChannelData both ways.
#[derive(Debug)]
pub struct Session {
    /// The STUN client (its socket lives in the client's namespace).
    pub client: stun::Client,
    /// The allocation's relayed transport address.
    pub relayed: SocketAddr,
}

impl Session {
    /// Allocates from the server at `server` with a socket in `netns` on
    /// `local`, relaying over IPv6 when `relay_v6`, as `test:testpass`.
    pub fn allocate(
        netns: &Netns,
        local: IpAddr,
        server: SocketAddr,
        relay_v6: bool,
    ) -> anyhow::Result<Self> {
        let socket = netns.enter(move || Ok(UdpSocket::bind((local, 0))?))?;
        let mut client = stun::Client::new(socket, server, "test", "testpass", None)?;
        let family = if relay_v6 { 2 } else { 1 };
        let answer = client.request(method::ALLOCATE, |m| {
            m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::REQUESTED_ADDRESS_FAMILY, &[family, 0, 0, 0])
        })?;
        ensure_success(&answer, "Allocate")?;
        let relayed = answer
            .xor_addr(attr::XOR_RELAYED_ADDRESS)
            .context("Allocate's answer has no XOR-RELAYED-ADDRESS")?;
        Ok(Self { client, relayed })
    }

    /// The client's transport address.
    pub fn local(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.client.socket.local_addr()?)
    }

    /// Binds `channel` to `peer` (which permits it), then waits until the
    /// agent at `agent` holds the binding: from then on the kernel may relay.
    pub fn channel_bind(
        &mut self,
        channel: u16,
        peer: SocketAddr,
        agent: &Path,
    ) -> anyhow::Result<()> {
        let answer = self.client.request(method::CHANNEL_BIND, |m| {
            m.attr(attr::CHANNEL_NUMBER, &stun::channel_number(channel))
                .xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })?;
        ensure_success(&answer, "ChannelBind")?;
        let local = self.local()?;
        let mut agent = crate::agent::Agent::connect(agent)?;
        wait_for(
            "the agent to hold the binding",
            Duration::from_secs(5),
            || {
                let bindings = agent.list()?;
                Ok(bindings
                    .iter()
                    .any(|b| {
                        b.channel == u32::from(channel)
                            && b.client.parse::<SocketAddr>().ok() == Some(local)
                            && b.peer.parse::<SocketAddr>().ok() == Some(peer)
                    })
                    .then_some(()))
            },
        )
    }

    /// Sends `data` on `channel` to the server.
    pub fn send(&self, channel: u16, data: &[u8]) -> anyhow::Result<()> {
        self.client
            .socket
            .send_to(&stun::channel_data(channel, data), self.client.server)?;
        Ok(())
    }

    /// Whether ChannelData of `channel` carrying `expected` arrives from the
    /// server within `deadline`; other datagrams are skipped.
    pub fn receive(
        &self,
        channel: u16,
        expected: &[u8],
        deadline: Duration,
    ) -> anyhow::Result<bool> {
        let start = Instant::now();
        let mut buffer = vec![0u8; 65536];
        while start.elapsed() < deadline {
            match self.client.socket.recv_from(&mut buffer) {
                Ok((n, from)) => {
                    let datagram = &buffer[..n];
                    if from == self.client.server
                        && datagram.len() >= 4
                        && datagram[..2] == channel.to_be_bytes()
                        && usize::from(u16::from_be_bytes([datagram[2], datagram[3]]))
                            == expected.len()
                        && &datagram[4..4 + expected.len().min(n - 4)] == expected
                    {
                        return Ok(true);
                    }
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e).context("client receive"),
            }
        }
        Ok(false)
    }
}

fn ensure_success(answer: &Answer, what: &str) -> anyhow::Result<()> {
    ensure!(
        answer.class == class::SUCCESS,
        "{what} failed: class {}, error {:?}",
        answer.class,
        answer.error_code()
    );
    Ok(())
}

fn would_block(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A peer: a UDP socket in its namespace.
#[derive(Debug)]
pub struct Peer {
    /// The peer's socket.
    pub socket: UdpSocket,
}

impl Peer {
    /// Binds a socket in `netns` on `ip`, port chosen by the kernel.
    pub fn bind(netns: &Netns, ip: IpAddr) -> anyhow::Result<Self> {
        let socket = netns.enter(move || Ok(UdpSocket::bind((ip, 0))?))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Self { socket })
    }

    /// The peer's transport address.
    pub fn address(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Whether a datagram equal to `expected` arrives from `from` within
    /// `deadline`; other datagrams are skipped.
    pub fn receive(
        &self,
        from: SocketAddr,
        expected: &[u8],
        deadline: Duration,
    ) -> anyhow::Result<bool> {
        let start = Instant::now();
        let mut buffer = vec![0u8; 65536];
        while start.elapsed() < deadline {
            match self.socket.recv_from(&mut buffer) {
                Ok((n, source)) if source == from && &buffer[..n] == expected => return Ok(true),
                Ok(_) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e).context("peer receive"),
            }
        }
        Ok(false)
    }
}

/// What [`echoes`] delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echoes {
    /// Messages the client sent.
    pub sent: u64,
    /// Messages the peer received.
    pub to_peer: u64,
    /// Echoes the client received.
    pub to_client: u64,
}

/// `count` numbered messages of `size` bytes from the client over `channel`
/// to `peer`, each echoed back to the allocation; each waits `deadline`.
/// Gives up after five losses in a row (the rest would be lost too).
pub fn echoes(
    session: &Session,
    channel: u16,
    peer: &Peer,
    count: u64,
    size: usize,
    deadline: Duration,
) -> anyhow::Result<Echoes> {
    let mut tally = Echoes {
        sent: 0,
        to_peer: 0,
        to_client: 0,
    };
    let mut lost_in_a_row = 0;
    for i in 0..count {
        let mut message = format!("message {i} ").into_bytes();
        message.resize(size.max(message.len()), b'.');
        session.send(channel, &message)?;
        tally.sent += 1;
        let mut delivered = false;
        if peer.receive(session.relayed, &message, deadline)? {
            tally.to_peer += 1;
            let mut echo = format!("echo {i} ").into_bytes();
            echo.resize(size.max(echo.len()), b'-');
            peer.socket.send_to(&echo, session.relayed)?;
            if session.receive(channel, &echo, deadline)? {
                tally.to_client += 1;
                delivered = true;
            }
        }
        lost_in_a_row = if delivered { 0 } else { lost_in_a_row + 1 };
        if lost_in_a_row == 5 {
            break;
        }
    }
    Ok(tally)
}
