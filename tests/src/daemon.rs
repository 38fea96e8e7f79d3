//! The real `turn-control` on loopback, without root or a namespace: started on free
//! 127.0.0.1 ports, awaited with deadlines (failing with its log), its metrics scraped, and
//! killed on drop (also when a test panics).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test harness: a failure is a test failure"
)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long every wait lasts at the most (start-up, metrics, conditions).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The real daemon on loopback, killed on drop (also when a test panics).
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// The TURN listener (UDP and TCP) on 127.0.0.1.
    pub listen: SocketAddr,
    /// The metrics endpoint on 127.0.0.1.
    pub metrics: SocketAddr,
    log: Arc<Mutex<String>>,
}

/// A port free for UDP and TCP on 127.0.0.1 right now, and for UDP on ::1 too with
/// `dual_stack`.
fn free_port(dual_stack: bool) -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && (!dual_stack || UdpSocket::bind(("::1", port)).is_ok())
        {
            return port;
        }
    }
}

impl Daemon {
    /// Starts the daemon on free loopback ports with `--realm realm --user credentials`
    /// (`user:password`), `--log-level info` and then `args`, relaying on its default
    /// addresses and ports; waits for "relay ready".
    pub fn start(realm: &str, credentials: &str, args: &[&str]) -> Daemon {
        Daemon::spawn(false, realm, credentials, args)
    }

    /// [`Daemon::start`] relaying on 127.0.0.1 and ::1 (`--relay-ip` both), from 65 ports
    /// (`--ports`) starting at one free on both.
    pub fn start_dual_stack(realm: &str, credentials: &str, args: &[&str]) -> Daemon {
        Daemon::spawn(true, realm, credentials, args)
    }

    fn spawn(dual_stack: bool, realm: &str, credentials: &str, args: &[&str]) -> Daemon {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port(dual_stack))
            .parse()
            .unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port(dual_stack))
            .parse()
            .unwrap();
        let mut command = Command::new(crate::workspace_binary("turn-control").unwrap());
        command
            .args(["--listen", &listen.to_string()])
            .args(["--metrics", &metrics.to_string()]);
        if dual_stack {
            let base = free_port(true).min(65535 - 64);
            command
                .args(["--relay-ip", "127.0.0.1", "--relay-ip", "::1"])
                .args(["--ports", &format!("{base}-{}", base + 64)]);
        }
        let mut child = command
            .args(["--realm", realm, "--user", credentials])
            .args(["--log-level", "info"])
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning turn-control");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut daemon = Daemon {
            child,
            listen,
            metrics,
            log,
        };
        daemon.wait("relay ready", |d| {
            Ok(d.log().contains("relay ready").then_some(()))
        });
        daemon
    }

    /// Waits for `condition` with [`DEADLINE`], failing with the daemon's log (also when
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
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the daemon printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Fails with the log if the daemon has exited.
    pub fn alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("turn-control exited ({status}):\n{}", self.log());
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The body of `/metrics`.
    pub fn scrape(&self) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(self.metrics)?;
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
            .ok_or_else(|| anyhow::anyhow!("no HTTP body in {response:?}"))?;
        Ok(body.to_owned())
    }

    /// The value of a metric series (name with labels as printed), 0 when absent.
    pub fn metric(&self, series: &str) -> anyhow::Result<f64> {
        Ok(self
            .scrape()?
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok()).flatten()
            })
            .unwrap_or(0.0))
    }

    /// Waits until a metric satisfies `check` (published about once a second).
    pub fn wait_metric(&mut self, series: &str, check: impl Fn(f64) -> bool) -> f64 {
        self.wait(&format!("metric {series}"), |d| {
            let value = d.metric(series)?;
            Ok(check(value).then_some(value))
        })
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
