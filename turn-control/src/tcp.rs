//! TURN over TCP (RFC 8656 §3.1, §12.5): accept connections and split their streams into
//! STUN and ChannelData frames with [`turn_control_core::frame_len`]. Connection tasks only frame
//! bytes and enforce stream hygiene (what a connection must send, and how fast); every
//! TURN decision is the event loop's.
//!
//! Hygiene. A stream is framed by the lengths it announces, so without deadlines a client
//! can hold a connection, and a buffer of up to [`MAX_FRAME`] bytes, forever: by sending
//! nothing, by announcing a long frame and never finishing it, or by trickling it a byte at
//! a time (slowloris). Text protocols are the common accident: "GET / HTTP/1.1" starts with
//! the bits `01` and a valid channel number (0x4745), so it frames as ChannelData claiming
//! 21 KB. The rules:
//!
//! - The first frame must be STUN (closed as `not_turn` otherwise). ChannelData
//!   only flows on a channel bound by a ChannelBind request on this same connection's
//!   allocation (RFC 8656 §12; over TCP the 5-tuple is the connection, §3.1), so ChannelData
//!   before any request cannot belong to anything.
//! - The first complete frame must arrive within [`FIRST_FRAME_TIMEOUT`] of the accept.
//! - A frame whose first byte arrived must be complete within [`FRAME_TIMEOUT`].
//! - A write to the client must finish within [`WRITE_TIMEOUT`] (a client that never reads
//!   would otherwise park this task, and its reads, for good).
//!
//! A connection idle between complete frames stays open: how long an allocation lives is the
//! core's business (RFC 8656 §7; the client refreshes it), and the event loop removes the
//! allocation when the connection ends (§3.1). Every close is counted by reason in
//! [`name::TCP_CLOSED`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use turn_control_core::frame_len;
use turn_control_core::framing::{FrameKind, frame_kind};

use crate::metrics::name;

/// What the connection tasks report to their event loop.
#[derive(Debug)]
pub enum TcpEvent {
    /// A client connected; frames for it go to `tx`.
    Opened {
        /// The listener.
        local: SocketAddr,
        /// The client.
        client: SocketAddr,
        /// Frames to write to the client.
        tx: mpsc::Sender<Vec<u8>>,
    },
    /// One STUN or ChannelData frame from a client.
    Frame {
        /// The listener.
        local: SocketAddr,
        /// The client.
        client: SocketAddr,
        /// The frame.
        frame: Vec<u8>,
    },
    /// A client's connection ended.
    Closed {
        /// The listener.
        local: SocketAddr,
        /// The client.
        client: SocketAddr,
    },
}

/// Frames queued towards one client before further ones are dropped (a client that does
/// not read its stream loses relayed data, as it would over UDP).
const OUT_QUEUE: usize = 1024;
/// The largest frame: a STUN header plus the largest STUN length (RFC 8489 §5).
const MAX_FRAME: usize = 20 + 65535;
/// The read buffer a connection starts with, and returns to when it is idle after a large
/// frame (idle connections should cost little; media frames fit in this).
const READ_BUF: usize = 4096;
/// How long a new connection may take to send its first complete frame. A TURN client
/// connects to send a request (RFC 8656 §3.1), so it has no reason to wait; ten seconds
/// leave room for a lossy path's retransmissions.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a frame may take from its first byte to its last. Frames are at most
/// [`MAX_FRAME`] bytes; a client slower than that is dead or hostile (slowloris).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write to the client may block (its receive window closed).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection ended: the `reason` label of [`name::TCP_CLOSED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// The client closed its side (EOF).
    Client,
    /// A read or write failed (reset, ...).
    Error,
    /// The event loop dropped the connection's queue.
    Server,
    /// The event loop is gone (the daemon is stopping).
    Shutdown,
    /// The stream is not TURN: an unknown first byte, an unaligned STUN length, an invalid
    /// channel number, or ChannelData as the first frame.
    NotTurn,
    /// No complete frame within [`FIRST_FRAME_TIMEOUT`] of the accept.
    FirstFrameTimeout,
    /// A frame not completed within [`FRAME_TIMEOUT`] of its first byte.
    FrameTimeout,
    /// A frame announcing more than [`MAX_FRAME`] bytes.
    FrameTooLong,
    /// A write blocked for [`WRITE_TIMEOUT`].
    WriteTimeout,
}

impl Close {
    /// The metric label.
    fn label(self) -> &'static str {
        match self {
            Close::Client => "client",
            Close::Error => "error",
            Close::Server => "server",
            Close::Shutdown => "shutdown",
            Close::NotTurn => "not_turn",
            Close::FirstFrameTimeout => "first_frame_timeout",
            Close::FrameTimeout => "frame_timeout",
            Close::FrameTooLong => "frame_too_long",
            Close::WriteTimeout => "write_timeout",
        }
    }
}

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
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The deadlines a connection is under.
#[derive(Debug)]
struct Deadlines {
    /// Until the first complete frame: when it must have arrived.
    first_frame: Option<Instant>,
    /// While part of a frame is buffered: when its first byte arrived.
    partial_since: Option<Instant>,
}

impl Deadlines {
    fn new(accepted: Instant) -> Self {
        Deadlines {
            first_frame: Some(accepted + FIRST_FRAME_TIMEOUT),
            partial_since: None,
        }
    }

    /// The earliest deadline and the close it causes; `None` for an idle connection
    /// between complete frames.
    fn next(&self) -> Option<(Instant, Close)> {
        let first = self.first_frame.map(|at| (at, Close::FirstFrameTimeout));
        let frame = self
            .partial_since
            .map(|since| (since + FRAME_TIMEOUT, Close::FrameTimeout));
        match (first, frame) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// One connection: frames from the client go to the event loop, frames from the event loop
/// to the client, until either side ends it or a deadline of [`Deadlines`] passes.
async fn connection(
    stream: TcpStream,
    local: SocketAddr,
    client: SocketAddr,
    inbox: mpsc::Sender<TcpEvent>,
) {
    let accepted = Instant::now();
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
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
    let mut deadlines = Deadlines::new(accepted);
    // One timer for the connection, re-armed only when the deadline changes: most reads of
    // a healthy connection carry whole frames and leave it disarmed.
    let mut armed = deadlines.next();
    let timer = tokio::time::sleep_until(armed.map_or(accepted, |(at, _)| at));
    tokio::pin!(timer);
    let (reason, detail): (Close, String) = loop {
        tokio::select! {
            () = &mut timer, if armed.is_some() => {
                let close = armed.map_or(Close::FrameTimeout, |(_, close)| close);
                break (close, format!("{} bytes buffered", buf.len()));
            }
            read = reader.read_buf(&mut buf) => {
                match read {
                    Ok(0) => break (Close::Client, String::new()),
                    Ok(_) => {}
                    Err(error) => break (Close::Error, error.to_string()),
                }
                let forwarded = forward_frames(&mut buf, &mut deadlines, &inbox, local, client);
                if let Err(close) = forwarded.await {
                    break close;
                }
                let next = deadlines.next();
                if next != armed {
                    if let Some((at, _)) = next {
                        timer.as_mut().reset(at);
                    }
                    armed = next;
                }
            }
            out = rx.recv() => {
                let Some(frame) = out else {
                    break (Close::Server, String::new());
                };
                match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&frame)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => break (Close::Error, error.to_string()),
                    Err(_) => break (Close::WriteTimeout, String::new()),
                }
            }
        }
    };
    metrics::counter!(name::TCP_CLOSED, "reason" => reason.label()).increment(1);
    tracing::debug!(%client, %local, reason = reason.label(), %detail, "TCP connection ended");
    let _ = inbox.send(TcpEvent::Closed { local, client }).await;
}

/// Sends every complete frame in `buf` to the event loop and starts the clock of a partial
/// one; the close and its detail when the stream breaks a rule of the module doc.
async fn forward_frames(
    buf: &mut Vec<u8>,
    deadlines: &mut Deadlines,
    inbox: &mpsc::Sender<TcpEvent>,
    local: SocketAddr,
    client: SocketAddr,
) -> Result<(), (Close, String)> {
    loop {
        let len = match frame_len(buf) {
            Ok(Some(len)) => len,
            Ok(None) => break,
            Err(error) => return Err((Close::NotTurn, error.to_string())),
        };
        if deadlines.first_frame.is_some() && frame_kind(buf[0]) == Ok(FrameKind::ChannelData) {
            return Err((Close::NotTurn, "ChannelData before any request".to_owned()));
        }
        if len > MAX_FRAME {
            return Err((Close::FrameTooLong, format!("{len} bytes")));
        }
        if buf.len() < len {
            buf.reserve(len - buf.len());
            break;
        }
        let frame = buf[..len].to_vec();
        buf.drain(..len);
        deadlines.first_frame = None;
        // The bytes left, if any, start the next frame: they arrived with this read, so
        // its clock starts now.
        deadlines.partial_since = None;
        if inbox
            .send(TcpEvent::Frame {
                local,
                client,
                frame,
            })
            .await
            .is_err()
        {
            return Err((Close::Shutdown, String::new()));
        }
    }
    if buf.is_empty() {
        deadlines.partial_since = None;
        if buf.capacity() > READ_BUF {
            *buf = Vec::with_capacity(READ_BUF);
        }
    } else if deadlines.partial_since.is_none() {
        deadlines.partial_since = Some(Instant::now());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_deadline_wins() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0);
        assert_eq!(
            d.next(),
            Some((t0 + FIRST_FRAME_TIMEOUT, Close::FirstFrameTimeout))
        );
        d.partial_since = Some(t0 + Duration::from_secs(1));
        let frame = (
            t0 + Duration::from_secs(1) + FRAME_TIMEOUT,
            Close::FrameTimeout,
        );
        let first = (t0 + FIRST_FRAME_TIMEOUT, Close::FirstFrameTimeout);
        assert_eq!(
            d.next(),
            Some(if frame.0 < first.0 { frame } else { first })
        );
        d.first_frame = None;
        assert_eq!(d.next(), Some(frame));
        d.partial_since = None;
        assert_eq!(d.next(), None);
    }
}
