//! TURN clients we did not write, with their sockets inside lab namespaces.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use turn::client::{Client, ClientConfig};

use crate::Netns;

/// A webrtc-rs TURN client (`turn::client::Client`, listening) whose UDP
/// socket lives in `netns` on `local`, for the server at `server` with the
/// lab's user `test:testpass` in realm `lab.example`. Call from within a
/// tokio runtime.
pub async fn webrtc_client(
    netns: &Netns,
    local: IpAddr,
    server: SocketAddr,
) -> anyhow::Result<Client> {
    let socket = netns.enter(move || {
        let socket = std::net::UdpSocket::bind((local, 0))?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })?;
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: "test".into(),
        password: "testpass".into(),
        realm: "lab.example".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(tokio::net::UdpSocket::from_std(socket)?),
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
