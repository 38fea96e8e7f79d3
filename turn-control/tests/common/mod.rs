//! The real `turn-control` binary on loopback: spawned on free ports, awaited with
//! deadlines, killed on drop (also when a test panics).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failure is a test failure"
)]
#![allow(dead_code, reason = "each test file uses part of the harness")]

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

pub const BIN: &str = env!("CARGO_BIN_EXE_turn-control");
pub const READY: Duration = Duration::from_secs(20);

/// A running daemon.
pub struct Daemon {
    child: Child,
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    /// The `--ports` range it was started with.
    pub ports: RangeInclusive<u16>,
    pub stdout: Vec<String>,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

/// A port free for both UDP and TCP on `ip` right now.
pub fn free_port(ip: &str) -> u16 {
    loop {
        let udp = UdpSocket::bind((ip, 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// A range of `len` allocation ports starting at a free UDP port.
pub fn port_range(len: u16) -> String {
    let base = free_port("127.0.0.1").min(65535 - len);
    format!("{base}-{}", base + len)
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

impl Daemon {
    /// Starts the daemon with `args` plus a free `--listen` on `ip` and free `--metrics`,
    /// waiting for its "relay ready" log line.
    pub fn start(ip: &str, args: &[&str]) -> Daemon {
        let (low, high) = port_range(200)
            .split_once('-')
            .map(|(l, h)| (l.parse().unwrap(), h.parse().unwrap()))
            .unwrap();
        Daemon::start_with_ports(ip, low..=high, args)
    }

    /// [`Daemon::start`] with `--ports` `ports`.
    pub fn start_with_ports(ip: &str, ports: RangeInclusive<u16>, args: &[&str]) -> Daemon {
        let port = free_port(ip);
        let listen: SocketAddr = SocketAddr::new(ip.parse().unwrap(), port);
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
            .parse()
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--listen")
            .arg(listen.to_string())
            .arg("--metrics")
            .arg(metrics.to_string())
            .arg("--ports")
            .arg(format!("{}-{}", ports.start(), ports.end()))
            .arg("--log-level")
            .arg("info,turn_core=debug")
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning turn-control");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("E {line}"));
            }
        });
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(format!("O {line}"));
            }
        });
        let mut daemon = Daemon {
            child,
            listen,
            metrics,
            ports,
            stdout: Vec::new(),
            lines,
            log: Vec::new(),
        };
        daemon.wait_for_log("relay ready", READY);
        daemon
    }

    /// Waits until a log line containing `needle` appears.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let (kind, text) = line.split_at(2);
                    let text = text.to_owned();
                    if kind == "O " {
                        self.stdout.push(text.clone());
                    }
                    self.log.push(text.clone());
                    if text.contains(needle) {
                        return text;
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "no \"{needle}\" within {timeout:?} (exit status {status:?}); output:\n{}",
                        self.log.join("\n")
                    );
                }
            }
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the daemon to exit within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect the remaining output.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(line[2..].to_owned());
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

    /// The value of metric `series` (name with labels, as printed), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        scrape(self.metrics)
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
                "metric {series} = {value} after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The development password printed on stdout (`--dev`).
    pub fn dev_password(&mut self) -> String {
        let line = self.wait_for_log("  password: ", READY);
        line.trim().strip_prefix("password: ").unwrap().to_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET /metrics.
pub fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// Runs the binary with `args` to completion (for configuration errors).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for key in [
        "TURN_CONTROL_REALM",
        "TURN_CONTROL_CONFIG",
        "TURN_CONTROL_LISTEN",
        "TURN_CONTROL_USERS",
    ] {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the binary did not exit within 20 s")
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file in the temporary directory, removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(contents: &str) -> TempFile {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "turn-control-test-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The thread whose slice of `ports` holds `port`: the daemon's `shards::port_slice`
/// (contiguous, disjoint slices in index order).
pub fn shard_of(ports: &RangeInclusive<u16>, shards: usize, port: u16) -> Option<usize> {
    let low = usize::from(*ports.start());
    let len = usize::from(*ports.end()) - low + 1;
    (0..shards).find(|&i| {
        let start = low + i * len / shards;
        let end = low + (i + 1) * len / shards - 1;
        (start..=end).contains(&usize::from(port))
    })
}

// ---- the webrtc-rs TURN client ----------------------------------------------------------

/// A listening webrtc-rs TURN client of `server` (in the daemon's default realm) on its
/// own local port on 127.0.0.1.
pub async fn turn_client(server: SocketAddr, user: &str, password: &str) -> Client {
    let conn = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    turn_client_on(Arc::new(conn), server, user, password).await
}

/// [`turn_client`] on the socket `conn`.
pub async fn turn_client_on(
    conn: Arc<tokio::net::UdpSocket>,
    server: SocketAddr,
    user: &str,
    password: &str,
) -> Client {
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: user.to_owned(),
        password: password.to_owned(),
        realm: "turn-control".to_owned(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    client
}

/// Receives one datagram on `sock` within `timeout`.
pub async fn recv(sock: &tokio::net::UdpSocket, timeout: Duration) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(timeout, sock.recv_from(&mut buf))
        .await
        .expect("peer got nothing in time")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// `rounds` messages each way between `relay` (an allocation of the client `label`) and a
/// peer of its own on 127.0.0.1, each awaited within `timeout` and checked: content, the
/// relayed address the peer sees and the peer's address the client sees. The first send
/// creates the permission (as a Send indication while the client binds a channel in the
/// background); later sends go as ChannelData.
pub async fn echo(relay: &(dyn Conn + Send + Sync), label: &str, rounds: u32, timeout: Duration) {
    let relayed = relay.local_addr().unwrap();
    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut buf = vec![0u8; 2048];
    for i in 0..rounds {
        let msg = format!("{label} to peer {i}");
        relay.send_to(msg.as_bytes(), peer_addr).await.unwrap();
        let (got, from) = recv(&peer, timeout).await;
        assert_eq!(got, msg.as_bytes());
        assert_eq!(from, relayed, "the peer sees the relayed address");

        let reply = format!("peer to {label} {i}");
        peer.send_to(reply.as_bytes(), relayed).await.unwrap();
        let (n, from) = tokio::time::timeout(timeout, relay.recv_from(&mut buf))
            .await
            .expect("client got nothing in time")
            .unwrap();
        assert_eq!(&buf[..n], reply.as_bytes(), "{label}");
        assert_eq!(from, peer_addr);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
