//! What turn-control's integration tests share beyond the loopback daemon harness (which is
//! `tests-harness`'s, shared with the lab tests): running the binary to exit, temporary
//! configuration files, the daemon's port slices per thread and the webrtc-rs TURN client.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failure is a test failure"
)]
#![allow(
    dead_code,
    unused_imports,
    reason = "each test file uses part of the harness"
)]

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

pub use tests_harness::daemon::{Daemon, free_port, quiet_port_range};
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

pub const BIN: &str = env!("CARGO_BIN_EXE_turn-control");

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

/// The thread whose slice of `ports` holds `port`: the daemon's `threads::port_slice`
/// (contiguous, disjoint slices in index order).
pub fn thread_of(ports: &RangeInclusive<u16>, threads: usize, port: u16) -> Option<usize> {
    let low = usize::from(*ports.start());
    let len = usize::from(*ports.end()) - low + 1;
    (0..threads).find(|&i| {
        let start = low + i * len / threads;
        let end = low + (i + 1) * len / threads - 1;
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
