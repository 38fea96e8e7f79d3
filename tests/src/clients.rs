//! TURN clients we did not write, with their sockets inside lab namespaces.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use turn::client::{Client, ClientConfig};

use crate::Netns;

/// The runtime a test runs its clients on: two worker threads, so that a client's reader
/// task and the test's own sends make progress side by side.
///
/// # Errors
/// When the runtime cannot be built (no threads left).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// A webrtc-rs TURN client (`turn::client::Client`, listening) whose UDP
/// socket lives in `netns` on `local`, for the server at `server` with the
/// lab's user `test:testpass` in realm `lab.example`. Call from within a
/// tokio runtime.
pub async fn webrtc_client(
    netns: &Netns,
    local: IpAddr,
    server: SocketAddr,
) -> anyhow::Result<Client> {
    let socket = udp_socket(netns, local)?;
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: "test".into(),
        password: "testpass".into(),
        realm: "lab.example".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(socket),
        vnet: None,
    })
    .await
    .context("cannot create the TURN client")?;
    client
        .listen()
        .await
        .context("the TURN client cannot listen")?;
    Ok(client)
}

/// A tokio UDP socket bound in `netns` to `local` on an ephemeral port. Call
/// from within a tokio runtime.
pub fn udp_socket(netns: &Netns, local: IpAddr) -> anyhow::Result<tokio::net::UdpSocket> {
    let socket = netns.enter(move || {
        let socket = std::net::UdpSocket::bind((local, 0))?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })?;
    Ok(tokio::net::UdpSocket::from_std(socket)?)
}

/// `count` round trips through a relayed connection: a numbered message from the
/// client to the peer's socket, which must arrive from the relayed address, and an
/// echo back, each within `timeout`.
pub async fn round_trips(
    relayed: &impl webrtc_util::Conn,
    peer: &tokio::net::UdpSocket,
    count: usize,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let relayed_addr = relayed.local_addr().context("relayed address")?;
    let peer_addr = peer.local_addr().context("peer address")?;
    let mut buffer = vec![0u8; 2048];
    for i in 0..count {
        let message = format!("message {i}");
        relayed
            .send_to(message.as_bytes(), peer_addr)
            .await
            .context("send to the peer")?;
        let (n, from) = tokio::time::timeout(timeout, peer.recv_from(&mut buffer))
            .await
            .with_context(|| format!("the peer got nothing ({message})"))??;
        anyhow::ensure!(
            (&buffer[..n], from) == (message.as_bytes(), relayed_addr),
            "the peer got {:?} from {from}, not {message:?} from {relayed_addr}",
            String::from_utf8_lossy(&buffer[..n])
        );
        peer.send_to(b"echo", relayed_addr).await?;
        let (n, _) = tokio::time::timeout(timeout, relayed.recv_from(&mut buffer))
            .await
            .with_context(|| format!("the client got no echo ({message})"))?
            .context("client receive")?;
        anyhow::ensure!(&buffer[..n] == b"echo", "the client got {:?}", &buffer[..n]);
    }
    Ok(())
}
