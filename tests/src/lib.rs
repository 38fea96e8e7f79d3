//! A network-namespace lab for testing the relay with real packets.
//!
//! ```text
//!  client ns            router ns                      relay ns
//!  c0 192.0.2.2 ---- rc 192.0.2.1
//!                     rx 203.0.113.1 [XDP_PASS] ---- x0 203.0.113.10 [relay XDP]
//!  peer ns            rp 198.51.100.1
//!  p0 198.51.100.2 --'
//! ```
//!
//! The router forwards plainly (no NAT). Native XDP_TX out of a veth only
//! delivers when the veth at the other end runs an XDP program, so the router's
//! `rx` gets a trivial XDP_PASS program. IPv6 runs beside IPv4 on every link
//! (2001:db8:1::/64 client, 2001:db8:2::/64 relay, 2001:db8:3::/64 peer).
//!
//! Every lab has its own namespaces with unique names, so tests run in
//! parallel; dropping the [`Lab`] stops its processes, detaches its programs
//! and deletes its namespaces, also when a test panics. Namespaces left by a
//! killed test run are swept at the next start.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

pub mod agent;
pub mod bench;
pub mod clients;
pub mod files;
pub mod hosts;
pub mod packet;
pub mod records;
pub mod stun;
pub mod xdp;

pub use tests_harness::{in_ci, required_tool, workspace_binary};

/// The client's address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The relay's address.
pub const RELAY_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The peer's address.
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The client's IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The relay's IPv6 address.
pub const RELAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 10);
/// The peer's IPv6 address.
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);
/// The port turn-control listens on in the lab.
pub const LISTEN_PORT: u16 = 3478;
/// The relay's interface.
pub const RELAY_IFACE: &str = "x0";
/// turn-control's metrics endpoint inside the relay namespace.
pub const TURN_CONTROL_METRICS: &str = "127.0.0.1:9641";
/// xdp-agent's metrics endpoint inside the relay namespace.
pub const AGENT_METRICS: &str = "127.0.0.1:9642";

/// The value of the first sample of `name` whose labels contain `labels`
/// (`""`: any), in a Prometheus text body.
pub fn sample(body: &str, name: &str, labels: &str) -> Option<f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            line.starts_with(name)
                && line[name.len()..].starts_with([' ', '{'])
                && line.contains(labels)
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Runs `promtool check metrics` (Debian's prometheus package) on a scraped
/// body. Without promtool it prints SKIPPED, or fails under `CI=true`.
pub fn promtool_check_metrics(body: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = spawned else {
        ensure!(
            std::env::var("CI").is_err(),
            "promtool is missing (make setup installs it)"
        );
        eprintln!("SKIPPED: promtool check metrics (promtool not installed)");
        return Ok(());
    };
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(body.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The sum of every sample of `name` (all label sets).
pub fn sample_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Prefix of every namespace this crate creates.
const NETNS_PREFIX: &str = "xtlab";

/// A name for a namespace (or pin directory) no other test uses, which the
/// next lab sweeps if this process dies without deleting it: `xtlab<pid>x<n>-<what>`.
pub fn unique_name(what: &str) -> String {
    sweep_stale_namespaces();
    format!(
        "{NETNS_PREFIX}{}x{}-{what}",
        std::process::id(),
        LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`) in
/// nanoseconds: the clock a binding's `expires_at_ns` is on, which the XDP
/// program reads with `bpf_ktime_get_coarse_ns`.
#[expect(
    clippy::expect_used,
    reason = "clock_gettime fails only for a clock the kernel lacks, and every kernel has this one"
)]
pub fn kernel_clock_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always readable");
    u64::try_from(std::time::Duration::from(now).as_nanos()).unwrap_or(u64::MAX)
}

/// Whether privileged lab tests can run here. Under `CI=true` they must: a
/// machine that cannot run them fails the test instead of skipping it.
pub fn privileged() -> bool {
    let reason = if !nix::unistd::Uid::effective().is_root() {
        Some("not root")
    } else if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        Some("iproute2 missing")
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("CI=true but the privileged lab tests cannot run: {reason}")
        }
        Some(reason) => {
            eprintln!("SKIPPED: privileged lab test needs root ({reason}); CI runs it");
            false
        }
    }
}

/// Waits until `condition` yields a value, polling every 10 ms, or fails
/// after `deadline` with `what` in the message.
pub fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = condition()? {
            return Ok(value);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command to completion, failing with its stderr.
pub fn run<I, S>(program: &str, args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let output = Command::new(program)
        .args(&args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed: {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// VmRSS of a process in KiB (/proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` with its loopback up. Names that start
    /// with [`unique_name`]'s prefix are swept when their test process is gone.
    pub fn create(name: String) -> anyhow::Result<Self> {
        run("ip", ["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["-n".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        run("ip", all)
    }

    /// The hardware address of `iface`.
    pub fn mac(&self, iface: &str) -> anyhow::Result<[u8; 6]> {
        let text = self.ip(["-br", "link", "show", iface])?;
        let mac = text
            .split_whitespace()
            .find(|word| word.len() == 17 && word.matches(':').count() == 5)
            .with_context(|| format!("no MAC in {text:?}"))?;
        let mut out = [0u8; 6];
        for (byte, part) in out.iter_mut().zip(mac.split(':')) {
            *byte = u8::from_str_radix(part, 16)?;
        }
        Ok(out)
    }

    /// Makes `ip` resolve to `mac` on `iface` for good: no ARP or neighbour
    /// discovery, and so no packets queued or dropped while it runs.
    pub fn add_static_neighbour(
        &self,
        ip: IpAddr,
        mac: [u8; 6],
        iface: &str,
    ) -> anyhow::Result<()> {
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        self.ip([
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            iface,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// Runs a command inside the namespace to completion.
    pub fn exec<I, S>(&self, program: &str, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec![
            "netns".into(),
            "exec".into(),
            self.name.clone().into(),
            program.into(),
        ];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        run("ip", all)
    }

    /// Datagrams the namespace's UDP sockets dropped for want of room in their receive
    /// buffers (`RcvbufErrors` of /proc/net/snmp, which is per namespace), IPv4 and IPv6.
    pub fn udp_receive_buffer_errors(&self) -> anyhow::Result<u64> {
        // IPv4: a line of names, then a line of values, both starting with "Udp:".
        let snmp = self.exec("cat", ["/proc/net/snmp"])?;
        let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            bail!("no Udp table in /proc/net/snmp");
        };
        let v4: u64 = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "RcvbufErrors")
            .context("no RcvbufErrors in /proc/net/snmp")?
            .1
            .parse()?;
        // IPv6: a line per counter, its name and its value.
        let snmp6 = self.exec("cat", ["/proc/net/snmp6"])?;
        let v6: u64 = snmp6
            .lines()
            .find_map(|line| line.strip_prefix("Udp6RcvbufErrors"))
            .context("no Udp6RcvbufErrors in /proc/net/snmp6")?
            .trim()
            .parse()?;
        Ok(v4 + v6)
    }

    /// A command that will run inside the namespace. Only the network
    /// namespace is entered (`nsenter --net`), so the host's bpffs stays
    /// visible and pins made inside outlive the process.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        command
    }

    /// Enters the namespace on the calling thread.
    pub fn enter_this_thread(&self) -> anyhow::Result<()> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("cannot enter {path}"))
    }

    /// Runs `work` on a thread that has entered this namespace: sockets it
    /// creates belong to the namespace for their whole life.
    pub fn enter<T: Send>(
        &self,
        work: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    self.enter_this_thread()?;
                    work()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veths with it.
        if let Err(error) = run("ip", ["netns", "del", &self.name]) {
            eprintln!("lab: cannot delete namespace {}: {error:#}", self.name);
        }
    }
}

/// A process started in the lab, killed on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    /// Starts `command` with its output captured to a log file under `dir`.
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// Fails if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{} exited: {status}", self.name),
        }
    }

    /// Sends `signal` and waits for the exit status.
    pub fn stop(
        mut self,
        signal: nix::sys::signal::Signal,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "{} ignored {signal}", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The four-namespace lab.
#[derive(Debug)]
pub struct Lab {
    // Drop order: processes, then the pass program's link, then namespaces.
    processes: Vec<Process>,
    _pass_link: Option<libbpf_rs::Link>,
    _pass_object: Option<libbpf_rs::Object>,
    _pass_link_b: Option<libbpf_rs::Link>,
    /// A second relay (`Site::B`), after [`Lab::add_second_relay`].
    pub relay_b: Option<Netns>,
    /// Holds the client.
    pub client: Netns,
    /// Forwards between the others.
    pub router: Netns,
    /// Runs the relay.
    pub relay: Netns,
    /// Holds the peer.
    pub peer: Netns,
    dir: PathBuf,
    id: String,
}

/// One of the lab's relays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// The relay every lab has: 203.0.113.10, 2001:db8:2::a.
    A,
    /// The second relay of [`Lab::add_second_relay`]: 198.18.0.10, 2001:db8:4::a.
    B,
}

impl Site {
    /// The relay's IPv4 address.
    pub fn v4(self) -> Ipv4Addr {
        match self {
            Site::A => RELAY_V4,
            Site::B => Ipv4Addr::new(198, 18, 0, 10),
        }
    }

    /// The relay's IPv6 address.
    pub fn v6(self) -> Ipv6Addr {
        match self {
            Site::A => RELAY_V6,
            Site::B => Ipv6Addr::new(0x2001, 0xdb8, 4, 0, 0, 0, 0, 10),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Site::A => "",
            Site::B => "-b",
        }
    }
}

/// Where bpffs is mounted on the host.
const BPFFS: &str = "/sys/fs/bpf";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Builds the lab.
    pub fn new() -> anyhow::Result<Self> {
        sweep_stale_namespaces();
        let id = format!(
            "{NETNS_PREFIX}{}x{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        mount_bpffs()?;
        let mut lab = Self {
            processes: Vec::new(),
            _pass_link: None,
            _pass_object: None,
            _pass_link_b: None,
            relay_b: None,
            client: Netns::create(format!("{id}-client"))?,
            router: Netns::create(format!("{id}-router"))?,
            relay: Netns::create(format!("{id}-relay"))?,
            peer: Netns::create(format!("{id}-peer"))?,
            dir,
            id,
        };
        lab.wire()?;
        lab.attach_pass_program()?;
        Ok(lab)
    }

    /// A directory for this lab's sockets and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a process that lives as long as the lab.
    pub fn spawn(&mut self, name: &str, command: Command) -> anyhow::Result<&mut Process> {
        let process = Process::spawn(name, command, &self.dir)?;
        let index = self.processes.len();
        self.processes.push(process);
        Ok(&mut self.processes[index])
    }

    /// Starts the real `xdp-agent` in the relay namespace, attached to the
    /// relay's interface, with `args` added; returns its gRPC socket once it
    /// accepts connections.
    pub fn start_xdp_agent(&mut self, args: &[&str]) -> anyhow::Result<PathBuf> {
        self.start_xdp_agent_at(Site::A, args)
    }

    /// As [`Lab::start_xdp_agent`], on the relay at `site`.
    pub fn start_xdp_agent_at(&mut self, site: Site, args: &[&str]) -> anyhow::Result<PathBuf> {
        let name = format!("xdp-agent{}", site.suffix());
        let socket = self.dir.join(format!("agent{}.sock", site.suffix()));
        let mut command = self.relay_at(site)?.command(workspace_binary("xdp-agent")?);
        // The agent's own peer policy, as turn-control's in the lab: the peer
        // networks are test nets, which both deny by default.
        command
            .args(["--iface", RELAY_IFACE, "--grpc"])
            .arg(&socket)
            .arg("--pin-dir")
            .arg(self.pin_dir_at(site))
            .args([
                "--allow-peer",
                "198.51.100.0/24",
                "--allow-peer",
                "2001:db8:3::/64",
            ])
            .args(args);
        self.spawn(&name, command)?;
        self.wait_for_unix_socket(&name, &socket, Duration::from_secs(20))?;
        Ok(socket)
    }

    /// This lab's bpffs directory for the agent's pinned maps and links; it
    /// is removed with the lab.
    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir_at(Site::A)
    }

    fn pin_dir_at(&self, site: Site) -> PathBuf {
        PathBuf::from(BPFFS).join(format!("{}{}", self.id, site.suffix()))
    }

    /// The namespace of the relay at `site`.
    pub fn relay_at(&self, site: Site) -> anyhow::Result<&Netns> {
        match site {
            Site::A => Ok(&self.relay),
            Site::B => self
                .relay_b
                .as_ref()
                .context("no second relay: call add_second_relay"),
        }
    }

    /// Starts the real `turn-control` in the relay namespace, relaying for the
    /// lab's addresses with user `test:testpass`, allowing the peer networks,
    /// with metrics on 127.0.0.1:9641 there, connected to the agent at
    /// `agent` if given; `args` are added. Returns once it is ready.
    pub fn start_turn_control(
        &mut self,
        agent: Option<&Path>,
        args: &[&str],
    ) -> anyhow::Result<()> {
        self.start_turn_control_at(Site::A, agent, args)
    }

    /// As [`Lab::start_turn_control`], on the relay at `site`.
    pub fn start_turn_control_at(
        &mut self,
        site: Site,
        agent: Option<&Path>,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let name = format!("turn-control{}", site.suffix());
        let (v4, v6) = (site.v4(), site.v6());
        let mut command = self
            .relay_at(site)?
            .command(workspace_binary("turn-control")?);
        command
            .args([
                "--listen",
                &format!("{v4}:3478"),
                "--listen",
                &format!("[{v6}]:3478"),
            ])
            .args(["--relay-ip", &v4.to_string(), "--relay-ip", &v6.to_string()])
            .args([
                "--ports",
                "49152-65535",
                "--realm",
                "lab.example",
                "--user",
                "test:testpass",
            ])
            .args([
                "--allow-peer",
                "198.51.100.0/24",
                "--allow-peer",
                "2001:db8:3::/64",
            ])
            .args(["--metrics", TURN_CONTROL_METRICS]);
        if let Some(agent) = agent {
            command.arg("--agent").arg(agent);
        }
        command.args(args);
        self.spawn(&name, command)?;
        let result = wait_for(
            &format!("{name} to be ready"),
            Duration::from_secs(20),
            || {
                self.process_mut(&name)?.ensure_running()?;
                Ok(self.log(&name).contains("relay ready").then_some(()))
            },
        );
        result.with_context(|| format!("{name}'s log:\n{}", self.log(&name)))
    }

    /// coturn's `turnutils_uclient` in the client namespace, logged in as the lab's user
    /// `test:testpass`, echoing through `turnutils_peer` at `peer` port 3480; the caller adds
    /// the load, the transport and the server.
    pub fn uclient(&self, peer: &str) -> Command {
        let mut command = self.client.command("turnutils_uclient");
        command.args(["-u", "test", "-w", "testpass", "-e", peer, "-r", "3480"]);
        command
    }

    /// Gives the relay host the network 10.9.0.0/24 (its address 10.9.0.1) behind `d0`, one
    /// end of a veth pair (`d1` the other; not every kernel has dummy links) that the XDP
    /// program is not attached to.
    pub fn add_unattached_network(&self) -> anyhow::Result<()> {
        self.relay
            .ip(["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
        self.relay.ip(["addr", "add", "10.9.0.1/24", "dev", "d0"])?;
        self.relay.ip(["link", "set", "d0", "up"])?;
        self.relay.ip(["link", "set", "d1", "up"])?;
        Ok(())
    }

    /// Waits until turn-control at `site` reports `turn_agent_connected 1`.
    pub fn wait_agent_connected(&self, site: Site) -> anyhow::Result<()> {
        wait_for(
            "turn-control to connect to its agent",
            Duration::from_secs(15),
            || {
                let body = Lab::scrape(self.relay_at(site)?, TURN_CONTROL_METRICS)?;
                Ok((sample(&body, "turn_agent_connected", "") == Some(1.0)).then_some(()))
            },
        )
    }

    /// Adds a second relay namespace (`Site::B`) behind the router: its `x0`
    /// at 198.18.0.10/24 and 2001:db8:4::a/64, the router's side `ry`
    /// running XDP_PASS like `rx`.
    pub fn add_second_relay(&mut self) -> anyhow::Result<()> {
        let relay_b = Netns::create(format!("{}-relayb", self.id))?;
        self.link_to_router(&HostLink {
            host: &relay_b,
            host_iface: RELAY_IFACE,
            router_iface: "ry",
            v4_net: "198.18.0",
            v6_net: "2001:db8:4::",
            host_id: 10,
        })?;
        enable_forwarding(&relay_b, RELAY_IFACE)?;
        self.relay_b = Some(relay_b);
        let object = self
            ._pass_object
            .as_ref()
            .context("the XDP_PASS object is not loaded")?;
        let link = self.router.enter(|| {
            let ifindex = nix::net::if_::if_nametoindex("ry")?;
            let program = object
                .progs_mut()
                .next()
                .context("the XDP_PASS object has no program")?;
            program
                .attach_xdp(ifindex as i32)
                .context("cannot attach XDP_PASS to ry")
        })?;
        self._pass_link_b = Some(link);
        Ok(())
    }

    /// Scrapes a Prometheus endpoint at `address` inside `netns`; the body.
    pub fn scrape(netns: &Netns, address: &str) -> anyhow::Result<String> {
        let address = address.to_owned();
        netns.enter(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(&address)?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: lab\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let (_, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
            Ok(body.to_owned())
        })
    }

    /// Waits until the process `name` accepts connections on the unix socket
    /// at `path`; fails with its log if it exits first.
    pub fn wait_for_unix_socket(
        &mut self,
        name: &str,
        path: &Path,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let result = wait_for(
            &format!("{name} to serve {}", path.display()),
            deadline,
            || {
                self.process_mut(name)?.ensure_running()?;
                Ok(std::os::unix::net::UnixStream::connect(path)
                    .ok()
                    .map(|_| ()))
            },
        );
        result.with_context(|| format!("{name}'s log:\n{}", self.log(name)))
    }

    /// A process the lab started.
    pub fn process_mut(&mut self, name: &str) -> anyhow::Result<&mut Process> {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process named {name}"))
    }

    /// Takes a process out of the lab, e.g. to stop it with a signal.
    pub fn take_process(&mut self, name: &str) -> Option<Process> {
        let index = self.processes.iter().position(|p| p.name == name)?;
        Some(self.processes.remove(index))
    }

    /// The log a process wrote.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn wire(&self) -> anyhow::Result<()> {
        self.router
            .exec("sysctl", ["-qw", "net.ipv4.ip_forward=1"])?;
        self.router
            .exec("sysctl", ["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        let hosts = [
            HostLink {
                host: &self.client,
                host_iface: "c0",
                router_iface: "rc",
                v4_net: "192.0.2",
                v6_net: "2001:db8:1::",
                host_id: 2,
            },
            HostLink {
                host: &self.relay,
                host_iface: RELAY_IFACE,
                router_iface: "rx",
                v4_net: "203.0.113",
                v6_net: "2001:db8:2::",
                host_id: 10,
            },
            HostLink {
                host: &self.peer,
                host_iface: "p0",
                router_iface: "rp",
                v4_net: "198.51.100",
                v6_net: "2001:db8:3::",
                host_id: 2,
            },
        ];
        for link in &hosts {
            self.link_to_router(link)?;
        }
        enable_forwarding(&self.relay, RELAY_IFACE)?;
        // Packets the client sends carry complete checksums, so what the relay
        // computes incrementally can be checked against them.
        self.client.exec("ethtool", ["-K", "c0", "tx", "off"])?;
        self.peer.exec("ethtool", ["-K", "p0", "tx", "off"])?;
        Ok(())
    }

    /// Wires `link.host` to the router: a veth pair, the router at `.1` and
    /// `::1` of the host's networks, the host at `host_id`, a default route
    /// each way.
    ///
    /// Neighbours are static on both ends. While the router resolves an
    /// address it queues at most 101 packets (`unres_qlen`) and drops the
    /// rest, and a client that catches up on its schedule (turnutils_uclient
    /// does) sends that many at once; the lab measures the relay, not
    /// neighbour discovery.
    fn link_to_router(&self, link: &HostLink<'_>) -> anyhow::Result<()> {
        let HostLink {
            host,
            host_iface,
            router_iface,
            v4_net,
            v6_net,
            host_id,
        } = *link;
        self.router.ip([
            "link",
            "add",
            router_iface,
            "type",
            "veth",
            "peer",
            "name",
            host_iface,
            "netns",
            host.name(),
        ])?;
        let router_v4: IpAddr = format!("{v4_net}.1").parse()?;
        let router_v6: IpAddr = format!("{v6_net}1").parse()?;
        let host_v4: IpAddr = format!("{v4_net}.{host_id}").parse()?;
        let host_v6: IpAddr = format!("{v6_net}{host_id:x}").parse()?;
        for (netns, iface, v4, v6) in [
            (&self.router, router_iface, router_v4, router_v6),
            (host, host_iface, host_v4, host_v6),
        ] {
            netns.ip(["addr", "add", &format!("{v4}/24"), "dev", iface])?;
            netns.ip(["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
            netns.ip(["link", "set", iface, "up"])?;
        }
        let router_mac = self.router.mac(router_iface)?;
        let host_mac = host.mac(host_iface)?;
        for address in [host_v4, host_v6] {
            self.router
                .add_static_neighbour(address, host_mac, router_iface)?;
        }
        for address in [router_v4, router_v6] {
            host.add_static_neighbour(address, router_mac, host_iface)?;
        }
        host.ip(["route", "add", "default", "via", &router_v4.to_string()])?;
        host.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &router_v6.to_string(),
        ])?;
        Ok(())
    }

    fn attach_pass_program(&mut self) -> anyhow::Result<()> {
        let object = libbpf_rs::ObjectBuilder::default()
            .open_file(env!("LAB_PASS_OBJECT"))
            .context("cannot open the XDP_PASS object")?
            .load()
            .context("cannot load the XDP_PASS program")?;
        let link = self.router.enter(|| {
            let ifindex = nix::net::if_::if_nametoindex("rx")?;
            let program = object
                .progs_mut()
                .next()
                .context("the XDP_PASS object has no program")?;
            program
                .attach_xdp(ifindex as i32)
                .context("cannot attach XDP_PASS to rx")
        })?;
        self._pass_link = Some(link);
        self._pass_object = Some(object);
        Ok(())
    }
}

/// One host's link to the lab's router.
#[derive(Clone, Copy)]
struct HostLink<'a> {
    host: &'a Netns,
    host_iface: &'a str,
    router_iface: &'a str,
    /// The first three octets of the host's IPv4 /24.
    v4_net: &'a str,
    /// The host's IPv6 /64, up to and including `::`.
    v6_net: &'a str,
    /// The host's last octet (IPv4) and last group (IPv6, in hex).
    host_id: u8,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.processes.clear();
        self._pass_link = None;
        self._pass_link_b = None;
        // Pinned links and maps outlive the agent by design; not the lab.
        for site in [Site::A, Site::B] {
            let pins = self.pin_dir_at(site);
            if let Err(error) = std::fs::remove_dir_all(&pins)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("lab: cannot remove {}: {error}", pins.display());
            }
        }
        if std::thread::panicking() {
            eprintln!("lab: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Sets up a relay's interface as the README tells operators to for the
/// agent's default next-hop mode: the kernel's FIB lookup answers only for
/// an ingress interface that forwards, in each family.
pub fn enable_forwarding(netns: &Netns, iface: &str) -> anyhow::Result<()> {
    netns.exec(
        "sysctl",
        [
            "-qw",
            &format!("net.ipv4.conf.{iface}.forwarding=1"),
            &format!("net.ipv6.conf.{iface}.forwarding=1"),
        ],
    )?;
    Ok(())
}

/// Mounts bpffs on the host's /sys/fs/bpf unless it is there already.
fn mount_bpffs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(BPFFS) && line.contains(" bpf "));
    if !mounted {
        run("mount", ["-t", "bpf", "bpf", BPFFS])?;
    }
    Ok(())
}

/// Deletes namespaces and pin directories left by lab runs whose process no
/// longer exists.
fn sweep_stale_namespaces() {
    if let Ok(entries) = std::fs::read_dir(BPFFS) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale_lab_pid(&name).is_some() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(list) = run("ip", ["netns", "list"]) else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        if stale_lab_pid(name).is_some() {
            let _ = run("ip", ["netns", "del", name]);
        }
    }
}

/// The pid in a lab resource's name (`xtlab<pid>x<n>...`) if that process is gone.
fn stale_lab_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let pid = rest.split('x').next()?.parse::<i32>().ok()?;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    (!alive).then_some(pid)
}

/// The address family of an IP, as a short label for messages.
pub fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}
