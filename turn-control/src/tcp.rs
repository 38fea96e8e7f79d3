//! TURN over TCP (RFC 8656 §3.1, §12.5): accept connections and split their streams into
//! STUN and ChannelData frames with [`turn_core::frame_len`]. Connection tasks only frame
//! bytes; every decision is the event loop's.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use turn_core::frame_len;

use crate::eventloop::TcpEvent;

/// Frames queued towards one client before further ones are dropped (a client that does
/// not read its stream loses relayed data, as it would over UDP).
const OUT_QUEUE: usize = 1024;
/// The largest frame: a STUN header plus the largest STUN length (RFC 8489 §5).
const MAX_FRAME: usize = 20 + 65535;

/// Accepts connections on `listener` until the task is aborted.
pub async fn accept(listener: TcpListener, local: SocketAddr, inbox: mpsc::Sender<TcpEvent>) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, local, client, inbox.clone()));
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%local, %error, "TCP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    local: SocketAddr,
    client: SocketAddr,
    inbox: mpsc::Sender<TcpEvent>,
) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
    if inbox
        .send(TcpEvent::Opened { local, client, tx })
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(%client, %local, "TCP connection");
    let (mut reader, mut writer) = stream.into_split();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let reason = 'conn: loop {
        tokio::select! {
            read = reader.read_buf(&mut buf) => {
                match read {
                    Ok(0) => break 'conn "closed by client".to_owned(),
                    Ok(_) => {}
                    Err(error) => break 'conn error.to_string(),
                }
                loop {
                    let len = match frame_len(&buf) {
                        Ok(Some(len)) => len,
                        Ok(None) => break,
                        Err(error) => break 'conn format!("not TURN: {error}"),
                    };
                    if len > MAX_FRAME {
                        break 'conn "frame too long".to_owned();
                    }
                    if buf.len() < len {
                        buf.reserve(len - buf.len());
                        break;
                    }
                    let frame = buf[..len].to_vec();
                    buf.drain(..len);
                    if inbox.send(TcpEvent::Frame { local, client, frame }).await.is_err() {
                        break 'conn "shutting down".to_owned();
                    }
                }
            }
            out = rx.recv() => {
                let Some(frame) = out else {
                    break 'conn "closed by server".to_owned();
                };
                if let Err(error) = writer.write_all(&frame).await {
                    break 'conn error.to_string();
                }
            }
        }
    };
    tracing::debug!(%client, %local, %reason, "TCP connection ended");
    let _ = inbox.send(TcpEvent::Closed { local, client }).await;
}
