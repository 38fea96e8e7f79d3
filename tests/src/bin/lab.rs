//! `make lab`: the whole relay in the namespace lab, live. Builds the lab,
//! starts xdp-agent (XDP attached in native mode) and turn-control connected
//! to it, an echo peer (`turnutils_peer`) and a stream of TURN clients
//! (`turnutils_uclient`, channel data), and prints every two seconds where
//! the traffic goes: relayed by XDP or in user space. Ctrl-C stops the
//! clients and the daemons and deletes the lab.

use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tests::agent::Agent;
use tests::{AGENT_METRICS, Lab, Site, TURN_CONTROL_METRICS, sample, sample_sum};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: i32) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lab: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the lab needs root (network namespaces, XDP)");
    }
    stop_on_signals()?;
    let mut live = Live::start()?;
    while !STOP.load(Ordering::Relaxed) {
        live.keep_client_running()?;
        live.print_row()?;
        wait_a_tick();
    }
    live.stop();
    Ok(())
}

/// Sets [`STOP`] on SIGINT and SIGTERM.
fn stop_on_signals() -> anyhow::Result<()> {
    let handler = nix::sys::signal::SigHandler::Handler(request_stop);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, handler)?;
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGTERM, handler)?;
    }
    Ok(())
}

/// Two seconds, or less when asked to stop.
fn wait_a_tick() {
    let tick = Instant::now();
    while tick.elapsed() < Duration::from_secs(2) && !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The running lab. Fields drop in order: the client, the agent connection, then the lab
/// (its daemons, namespaces and pins).
struct Live {
    /// The current `turnutils_uclient`, started again whenever it exits.
    client: Option<Child>,
    agent: Agent,
    lab: Lab,
    started: Instant,
}

impl Live {
    /// Builds the lab, starts the daemons and the echo peer, and prints the table's header.
    fn start() -> anyhow::Result<Self> {
        println!(
            "building the lab: client 192.0.2.2 -- router -- relay 203.0.113.10 (x0, XDP) -- peer 198.51.100.2"
        );
        let mut lab = Lab::new()?;
        let socket = lab.start_xdp_agent(&["--xdp-mode", "native", "--metrics", AGENT_METRICS])?;
        lab.start_turn_control(Some(&socket), &[])?;
        lab.wait_agent_connected(Site::A)?;
        let mut peer = lab.peer.command("turnutils_peer");
        peer.args(["-L", "198.51.100.2", "-p", "3480"]);
        lab.spawn("turnutils_peer", peer)
            .context("is coturn installed? (make setup)")?;
        let agent = Agent::connect(&socket)?;
        println!(
            "xdp-agent and turn-control are up; logs in {}",
            lab.dir().display()
        );
        println!(
            "clients: turnutils_uclient -u test -w testpass -e 198.51.100.2 -m 4 -n 2000 -l 100 -z 5 203.0.113.10"
        );
        println!("Ctrl-C to stop and tear the lab down\n");
        println!(
            "{:>6}  {:>12} {:>12}  {:>12} {:>12}  {:>10}  {:>8} {:>8}",
            "time",
            "xdp c->p",
            "xdp p->c",
            "xdp bytes",
            "user bytes",
            "bindings",
            "allocs",
            "channels"
        );
        Ok(Self {
            client: None,
            agent,
            lab,
            started: Instant::now(),
        })
    }

    /// Starts a client when there is none or the last one has exited.
    fn keep_client_running(&mut self) -> anyhow::Result<()> {
        if self
            .client
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
        {
            return Ok(());
        }
        let mut command = self.lab.uclient("198.51.100.2");
        command
            .args([
                "-m",
                "4",
                "-n",
                "2000",
                "-l",
                "100",
                "-z",
                "5",
                "-c",
                "203.0.113.10",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.client = Some(command.spawn().context("cannot start turnutils_uclient")?);
        Ok(())
    }

    /// Prints one row: packets relayed by XDP each way, bytes relayed by XDP and in user
    /// space, and the bindings, allocations and channels in place.
    fn print_row(&mut self) -> anyhow::Result<()> {
        let to_peer =
            self.counters(&["relay_client_to_peer_v4_v4", "relay_client_to_peer_v4_v6"])?;
        let to_client =
            self.counters(&["relay_peer_to_client_v4_v4", "relay_peer_to_client_v6_v4"])?;
        let agent_metrics = Lab::scrape(&self.lab.relay, AGENT_METRICS)?;
        let control = Lab::scrape(&self.lab.relay, TURN_CONTROL_METRICS)?;
        println!(
            "{:>5}s  {:>12} {:>12}  {:>12} {:>12}  {:>10}  {:>8} {:>8}",
            self.started.elapsed().as_secs(),
            to_peer,
            to_client,
            sample(&agent_metrics, "data_relayed_ebpf_bytes_total", "").unwrap_or(0.0),
            sample_sum(&control, "data_relayed_userspace_bytes_total"),
            sample(&agent_metrics, "xdp_bindings_installed", "").unwrap_or(0.0),
            sample(&control, "turn_allocations_active", "").unwrap_or(0.0),
            sample(&control, "turn_channel_bindings_active", "").unwrap_or(0.0),
        );
        Ok(())
    }

    /// The sum of the agent's packet counters for `reasons`.
    fn counters(&mut self, reasons: &[&str]) -> anyhow::Result<u64> {
        reasons
            .iter()
            .map(|r| self.agent.counter(r).map(|c| c.0))
            .sum()
    }

    /// Stops the client, then tears the lab down.
    fn stop(self) {
        let Self {
            client, agent, lab, ..
        } = self;
        if let Some(mut client) = client {
            let _ = client.kill();
            let _ = client.wait();
        }
        println!("\nstopping: daemons, namespaces and pins go with the lab");
        drop(lab);
        drop(agent);
    }
}
