//! The real `turn-control` on loopback, without root or a namespace: spawned on free
//! 127.0.0.1 ports, awaited with deadlines (failing with its output), its metrics scraped,
//! and killed on drop (also when a test panics).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::ops::RangeInclusive;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::workspace_binary;

/// How long start-up and the waits without a timeout of their own last at the most.
pub const READY: Duration = Duration::from_secs(20);

/// The log level [`Daemon::start`] runs with.
pub const LOG_LEVEL: &str = "info,turn_control_core=debug";

/// A running daemon, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// The TURN listener (UDP and TCP).
    pub listen: SocketAddr,
    /// The metrics endpoint on 127.0.0.1.
    pub metrics: SocketAddr,
    /// The `--ports` range it was started with.
    pub ports: RangeInclusive<u16>,
    /// The stdout lines read so far by [`Daemon::wait_for_log`] and [`Daemon::wait_exit`].
    pub stdout: Vec<String>,
    /// The stdout and stderr lines read so far by [`Daemon::wait_for_log`] and
    /// [`Daemon::wait_exit`].
    pub log: Vec<String>,
    lines: mpsc::Receiver<String>,
    /// Everything printed so far, for failure messages (also from `&self`).
    output: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts the daemon with `args` plus a free `--listen` on `ip`, a free `--metrics`,
    /// 201 free `--ports` and `--log-level` [`LOG_LEVEL`]; waits for its "relay ready" line.
    pub fn start(ip: &str, args: &[&str]) -> Daemon {
        Daemon::start_with_ports(ip, port_range(200, &["127.0.0.1"]), args)
    }

    /// [`Daemon::start`] with `--ports` `ports`.
    pub fn start_with_ports(ip: &str, ports: RangeInclusive<u16>, args: &[&str]) -> Daemon {
        Daemon::spawn(ip, ports, LOG_LEVEL, args)
    }

    /// Starts the daemon with a free `--listen` on `ip`, a free `--metrics`, `--ports`
    /// `ports`, `--log-level log_level` and then `args`; waits for its "relay ready" line.
    pub fn spawn(ip: &str, ports: RangeInclusive<u16>, log_level: &str, args: &[&str]) -> Daemon {
        let listen = SocketAddr::new(ip.parse().unwrap(), free_port(ip));
        let metrics = SocketAddr::new([127, 0, 0, 1].into(), free_port("127.0.0.1"));
        let mut command = Command::new(workspace_binary("turn-control").unwrap());
        command
            .args(["--listen", &listen.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(["--ports", &format!("{}-{}", ports.start(), ports.end())])
            .args(["--log-level", log_level])
            .args(args)
            .env_remove("RUST_LOG");
        Daemon::spawn_command(command, listen, metrics, ports)
    }

    /// Spawns `command`, a turn-control command line the test built in full (to start it
    /// through [`ServiceManager::command`](crate::service_manager::ServiceManager::command),
    /// say), whose arguments include `--listen listen`, `--metrics metrics` and `--ports ports`;
    /// reads its output and waits for its "relay ready" line.
    pub fn spawn_command(
        mut command: Command,
        listen: SocketAddr,
        metrics: SocketAddr,
        ports: RangeInclusive<u16>,
    ) -> Daemon {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning turn-control");
        let (tx, lines) = mpsc::channel();
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>;
        let stderr = Box::new(child.stderr.take().unwrap());
        for (tag, pipe) in [("O ", stdout), ("E ", stderr)] {
            let (tx, output) = (tx.clone(), output.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                    let _ = tx.send(format!("{tag}{line}"));
                }
            });
        }
        let mut daemon = Daemon {
            child,
            listen,
            metrics,
            ports,
            stdout: Vec::new(),
            log: Vec::new(),
            lines,
            output,
        };
        daemon.wait_for_log("relay ready", READY);
        daemon
    }

    /// Waits until a log line containing `needle` appears and returns it.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "no \"{needle}\" within {timeout:?} (exit status {status:?}); output:\n{}",
                    self.output()
                );
            };
            let text = self.record(&line);
            if text.contains(needle) {
                return text;
            }
        }
    }

    /// Files a line from the readers in [`Daemon::log`] (and [`Daemon::stdout`]).
    fn record(&mut self, line: &str) -> String {
        let (tag, text) = line.split_at(2);
        if tag == "O " {
            self.stdout.push(text.to_owned());
        }
        self.log.push(text.to_owned());
        text.to_owned()
    }

    /// Waits for `condition` with [`READY`], failing with the daemon's output (also when
    /// the daemon exits meanwhile). An error from `condition` is printed and retried.
    pub fn wait<T>(
        &mut self,
        what: &str,
        mut condition: impl FnMut(&mut Daemon) -> anyhow::Result<Option<T>>,
    ) -> T {
        let start = Instant::now();
        loop {
            self.alive();
            match condition(self) {
                Ok(Some(value)) => return value,
                Ok(None) => {}
                Err(error) => eprintln!("waiting for {what}: {error:#}"),
            }
            assert!(
                start.elapsed() < READY,
                "timed out waiting for {what}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the daemon printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Fails with the output if the daemon has exited.
    pub fn alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("turn-control exited ({status}):\n{}", self.output());
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a name for kill(1), e.g. "HUP") to the daemon.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the daemon to exit within `timeout`, then reads the rest of its output.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Every line up to the end of its output: the reader thread hangs up at EOF
                // (a loaded machine may not have run it for a while).
                let rest = Instant::now() + Duration::from_secs(5);
                while let Ok(line) = self
                    .lines
                    .recv_timeout(rest.saturating_duration_since(Instant::now()))
                {
                    self.record(&line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The body of `/metrics`.
    pub fn scrape(&self) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.metrics
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (_headers, body) = response
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP body in {response:?}"))?;
        Ok(body.to_owned())
    }

    /// The value of metric `series` (name with labels, as printed), or 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.scrape()
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    /// Waits until `check(metric(series))` holds (metrics are published once a second).
    pub fn wait_metric(&self, series: &str, check: impl Fn(f64) -> bool, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(series);
            if check(value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "metric {series} = {value} after {timeout:?}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The development password printed on stdout (`--dev`).
    pub fn dev_password(&mut self) -> String {
        let line = self.wait_for_log("  password: ", READY);
        line.trim().strip_prefix("password: ").unwrap().to_owned()
    }

    /// A TCP connection to the TURN listener, with `TCP_NODELAY`.
    pub fn connect(&self) -> TcpStream {
        let tcp = TcpStream::connect(self.listen).unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free for both UDP and TCP on `ip` right now.
pub fn free_port(ip: &str) -> u16 {
    free_port_on(&[ip])
}

/// A port free for both UDP and TCP on each of `ips` right now.
fn free_port_on(ips: &[&str]) -> u16 {
    loop {
        let udp = UdpSocket::bind((ips[0], 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if ips.iter().all(|&ip| {
            TcpListener::bind((ip, port)).is_ok()
                && (ip == ips[0] || UdpSocket::bind((ip, port)).is_ok())
        }) {
            return port;
        }
    }
}

/// `len + 1` allocation ports starting at a port free on each of `ips` right now.
pub fn port_range(len: u16, ips: &[&str]) -> RangeInclusive<u16> {
    let base = free_port_on(ips).min(65535 - len);
    base..=base + len
}

/// A range of `len + 1` allocation ports below the kernel's ephemeral range, each free for
/// UDP on 127.0.0.1 right now: no socket bound to port 0 (a test's clients and peers, or
/// anyone else's) can take one of them before the daemon binds it, which would make it
/// delete that allocation after its success (the client's next request gets 437).
pub fn quiet_port_range(len: u16) -> RangeInclusive<u16> {
    const FLOOR: u16 = 10_000;
    static N: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let span = ephemeral_low
        .checked_sub(FLOOR + len)
        .filter(|&s| s > 0)
        .expect("no room below the ephemeral port range");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ u64::from(std::process::id()) << 32
        ^ u64::from(N.fetch_add(1, Ordering::Relaxed)) << 20;
    loop {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let base = FLOOR + ((seed >> 33) % u64::from(span)) as u16;
        let range = base..=base + len;
        if range
            .clone()
            .all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
        {
            return range;
        }
    }
}
