//! TURN over TCP and TLS (RFC 8656 §3.1, §12.5): accept connections, tell TLS from plain TURN
//! by the first byte (every TCP listener takes both once a certificate is configured, so one
//! port serves UDP, TCP and TLS: [`crate::tls`] does the handshake), and split the streams into
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
//! - The first complete frame must arrive within [`FIRST_FRAME_TIMEOUT`] of the accept (over
//!   TLS: of the handshake's end; the handshake has a deadline of its own).
//! - A frame whose first byte arrived must be complete within [`FRAME_TIMEOUT`].
//! - A write to the client must finish within [`WRITE_TIMEOUT`] (a client that never reads
//!   would otherwise park this task, and its reads, for good).
//! - A connection without an allocation is closed once it has sent no complete frame for the
//!   idle time of [`Limits`] (`--tcp-idle-unallocated-seconds`): a client connects to
//!   allocate, and idle connections would otherwise pile up until descriptors and memory run
//!   out, and Allocates fail with 508. The event loop tells the task whether its 5-tuple has
//!   an allocation ([`TcpEvent::Opened`]); a connection with one stays open however idle: how
//!   long an allocation lives is the core's business (RFC 8656 §7; the client refreshes it),
//!   and the event loop removes the allocation when the connection ends (§3.1).
//! - Connections are capped per source address and in all, over every event-loop thread
//!   ([`Limits`]); one beyond a cap is accepted and reset at once.
//!
//! Every close and refusal is counted by reason in [`name::TCP_CLOSED`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use turn_control_core::frame_len;
use turn_control_core::framing::{FrameKind, frame_kind};

use crate::handover::{SocketStore, connection_name};
use crate::metrics::name;
use crate::tls::Tls;

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
        /// Whether the connection's 5-tuple has an allocation: the event loop keeps it
        /// current, the task reads it when the connection has been idle for long.
        allocated: Arc<AtomicBool>,
        /// The connection's socket is in the file-descriptor store: it outlives the process
        /// (plain TCP with `--state-dir`; a TLS session cannot be handed to another process).
        kept: bool,
    },
    /// A kept connection stopped reading for a hand-over ([`Shared::handover`]): its socket
    /// stays in the store, unread bytes of a partial frame are here, for the next process. It
    /// goes on writing what the event loop queues until its queue closes, then says
    /// [`TcpEvent::Stopped`].
    HandedOver {
        /// The listener.
        local: SocketAddr,
        /// The client.
        client: SocketAddr,
        /// What was read of the next frame.
        pending: Vec<u8>,
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
    /// A handed-over connection wrote everything queued for it and left its socket to the
    /// next process.
    Stopped {
        /// The listener.
        local: SocketAddr,
        /// The client.
        client: SocketAddr,
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
/// How long an orderly close may take (a TLS close_notify and the FIN).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// No allocation and no complete frame for the idle time of [`Limits`].
    UnallocatedTimeout,
    /// Refused: the source had [`Limits`]' connections per source open already.
    PerSourceCap,
    /// Refused: [`Limits`]' connections in all were open already.
    TotalCap,
    /// The TLS handshake failed or took too long ([`crate::tls::HandshakeFailure`] says why).
    TlsHandshake,
    /// A TLS handshake on a relay without a certificate.
    TlsNotConfigured,
    /// The process hands over; a kept connection goes on in the next one.
    Handover,
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
            Close::UnallocatedTimeout => "unallocated_timeout",
            Close::PerSourceCap => "per_source_cap",
            Close::TotalCap => "total_cap",
            Close::TlsHandshake => "tls_handshake",
            Close::TlsNotConfigured => "tls_not_configured",
            Close::Handover => "handover",
        }
    }
}

/// The limits on TURN-over-TCP connections, shared by the accept tasks of every event-loop
/// thread (a client's connections are spread over the threads by the kernel): how long a
/// connection without an allocation may idle, and how many may be open from one source and
/// in all.
#[derive(Debug)]
pub struct Limits {
    idle_unallocated: Duration,
    per_source: usize,
    total: usize,
    open: Mutex<Open>,
}

/// The connections open, in all and per source.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Limits {
    /// Connections without an allocation close after `idle_unallocated` without a complete
    /// frame; at most `per_source` are open from one source ([`source_of`]) and `total` in all.
    pub fn new(idle_unallocated: Duration, per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            idle_unallocated,
            per_source,
            total,
            open: Mutex::default(),
        })
    }

    /// A place for a connection from `client`, or the cap that leaves none.
    fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, Close> {
        let source = source_of(client);
        let mut open = daemon::lock(&self.open);
        if open.total >= self.total {
            return Err(Close::TotalCap);
        }
        let from_source = open.by_source.entry(source).or_default();
        if *from_source >= self.per_source {
            return Err(Close::PerSourceCap);
        }
        *from_source += 1;
        open.total += 1;
        Ok(Admitted {
            limits: Arc::clone(self),
            source,
        })
    }
}

impl Limits {
    /// A place for a connection from `client` whatever the caps (a connection the previous
    /// process had admitted).
    fn count(self: &Arc<Self>, client: IpAddr) -> Admitted {
        let source = source_of(client);
        let mut open = daemon::lock(&self.open);
        *open.by_source.entry(source).or_default() += 1;
        open.total += 1;
        Admitted {
            limits: Arc::clone(self),
            source,
        }
    }
}

/// A connection's place in [`Limits`], given back when the connection ends.
#[derive(Debug)]
struct Admitted {
    limits: Arc<Limits>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = daemon::lock(&self.limits.open);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_source.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

/// The source a connection counts against: its address, but the /64 of an IPv6 address
/// (RFC 4291 §2.5.1 interface identifiers: one host, or one subscriber, picks freely within
/// its /64, so a cap per address would cap nothing).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
        v4 => v4,
    }
}

/// The default `--tcp-connections-max`: `max`, or half the soft open-files limit if that is
/// less, so that relay sockets keep the other half (one TCP allocation needs one or two).
pub fn default_connections_max(max: usize) -> usize {
    let open_files = open_files_limit().map_or(1024, |limit| limit.rlim_cur);
    max.min(usize::try_from(open_files / 2).unwrap_or(usize::MAX))
        .max(1)
}

/// Raises the soft open-files limit (RLIMIT_NOFILE) to the hard one, as systemd advises
/// services that need many descriptors (the soft default of 1024 is for select(2) users);
/// the limit in force afterwards.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let limit = open_files_limit()?;
    if limit.rlim_cur >= limit.rlim_max {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the valid `raised`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(raised.rlim_cur)
}

/// The open-files limits, soft and hard.
fn open_files_limit() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit)
}

/// What every connection task of an event loop shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The event loop's inbox.
    pub inbox: mpsc::Sender<TcpEvent>,
    /// The connection caps and the idle time.
    pub limits: Arc<Limits>,
    /// TURN over TLS, with a certificate.
    pub tls: Option<Arc<Tls>>,
    /// Where plain connections go to outlive the process (with `--state-dir` under a
    /// service manager).
    pub store: Option<Arc<SocketStore>>,
    /// Becomes true when the event loop hands over: kept connections stop where they are,
    /// leaving their sockets to the next process ([`TcpEvent::HandedOver`]).
    pub handover: watch::Receiver<bool>,
}

/// Accepts connections on `listener` until the task is aborted, within `shared`'s limits;
/// with a certificate, connections that open with a TLS handshake are TURN over TLS.
pub async fn accept(listener: TcpListener, local: SocketAddr, shared: Shared) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => match shared.limits.admit(client.ip()) {
                Ok(admitted) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    tokio::spawn(connection(stream, local, client, admitted, shared));
                }
                Err(cap) => refuse(stream, local, client, cap),
            },
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%local, %error, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Goes on with a connection the previous process kept in the store, whose allocation was
/// restored: `pending` is what that process had read of the next frame.
pub fn resume(
    stream: std::net::TcpStream,
    local: SocketAddr,
    client: SocketAddr,
    pending: Vec<u8>,
    shared: Shared,
) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    let stream = TcpStream::from_std(stream)?;
    let _ = stream.set_nodelay(true);
    // It was admitted by the process before; counted again, it may exceed a cap lowered
    // since, which is no reason to end a call.
    let admitted = shared.limits.count(client.ip());
    let name = connection_name(local, client);
    tokio::spawn(serve(
        stream,
        (local, client),
        admitted,
        shared,
        Resume {
            kept: Some(name),
            pending: Some(pending),
        },
    ));
    Ok(())
}

/// Closes a connection beyond a cap of [`Limits`] at once, with a reset: nothing was said on
/// it, and the relay keeps no TIME_WAIT state for it.
fn refuse(stream: TcpStream, local: SocketAddr, client: SocketAddr, cap: Close) {
    let _ = stream.set_zero_linger();
    drop(stream);
    metrics::counter!(name::TCP_CLOSED, "reason" => cap.label()).increment(1);
    tracing::debug!(%client, %local, reason = cap.label(), "TCP connection refused");
}

/// The deadlines a connection is under.
#[derive(Debug)]
struct Deadlines {
    /// Until the first complete frame: when it must have arrived.
    first_frame: Option<Instant>,
    /// While part of a frame is buffered: when its first byte arrived.
    partial_since: Option<Instant>,
    /// When the last complete frame arrived (at first: the accept).
    last_frame: Instant,
    /// When to look whether the connection idles without an allocation: `last_frame` plus
    /// the idle time as of the last look. Frames move only `last_frame`, so that a busy
    /// connection does not re-arm its timer per frame.
    idle_check: Instant,
    /// The idle time of [`Limits`].
    idle_unallocated: Duration,
}

impl Deadlines {
    fn new(accepted: Instant, idle_unallocated: Duration) -> Self {
        Deadlines {
            first_frame: Some(accepted + FIRST_FRAME_TIMEOUT),
            partial_since: None,
            last_frame: accepted,
            idle_check: accepted + idle_unallocated,
            idle_unallocated,
        }
    }

    /// The earliest deadline and the close it may cause.
    fn next(&self) -> (Instant, Close) {
        let first = self.first_frame.map(|at| (at, Close::FirstFrameTimeout));
        let frame = self
            .partial_since
            .map(|since| (since + FRAME_TIMEOUT, Close::FrameTimeout));
        [first, frame].into_iter().flatten().fold(
            (self.idle_check, Close::UnallocatedTimeout),
            |a, b| {
                if b.0 < a.0 { b } else { a }
            },
        )
    }

    /// The timer fired at `now`: the close if a deadline has passed. The idle deadline
    /// closes only a connection without an allocation that sent nothing since; otherwise it
    /// moves on.
    fn expired(&mut self, now: Instant, allocated: bool) -> Option<Close> {
        let (at, close) = self.next();
        if at > now {
            return None;
        }
        if close != Close::UnallocatedTimeout {
            return Some(close);
        }
        let due = self.last_frame + self.idle_unallocated;
        if due > now {
            self.idle_check = due;
            None
        } else if allocated {
            self.idle_check = now + self.idle_unallocated;
            None
        } else {
            Some(close)
        }
    }
}

/// The first byte of a TLS connection: a handshake record (RFC 8446 §5.1, content type 22).
/// A STUN message starts with 0x00 or 0x01 (RFC 8489 §5: the two top bits are zero and no
/// method reaches 0x1000), so one byte tells them apart (RFC 7983 §7 demultiplexes the same
/// way).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// One accepted connection: TLS or plain TURN by its first byte, then [`serve`]. Its place in
/// [`Limits`] goes with it.
async fn connection(
    stream: TcpStream,
    local: SocketAddr,
    client: SocketAddr,
    admitted: Admitted,
    shared: Shared,
) {
    let accepted = Instant::now();
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout_at(accepted + FIRST_FRAME_TIMEOUT, stream.peek(&mut first));
    let ended = |reason: Close, detail: &str| count_end((local, client), reason, detail);
    match peeked.await {
        Err(_) => return ended(Close::FirstFrameTimeout, "nothing sent"),
        Ok(Ok(0)) => return ended(Close::Client, ""),
        Ok(Err(error)) => return ended(Close::Error, &error.to_string()),
        Ok(Ok(_)) => {}
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        // A plain connection can outlive the process: its socket goes into the store.
        let kept = shared.store.as_ref().map(|store| {
            let name = connection_name(local, client);
            store.keep(&name, &socket2::SockRef::from(&stream));
            name
        });
        let resume = Resume {
            kept,
            pending: None,
        };
        return serve(stream, (local, client), admitted, shared, resume).await;
    }
    let Some(tls) = shared.tls.clone() else {
        return ended(Close::TlsNotConfigured, "no --tls-cert");
    };
    match tls.handshake(stream).await {
        Ok(stream) => serve(stream, (local, client), admitted, shared, Resume::default()).await,
        Err(failure) => ended(Close::TlsHandshake, failure.label()),
    }
}

/// How a connection's stream starts and whether it outlives the process.
#[derive(Debug, Default)]
struct Resume {
    /// Its name in the file-descriptor store, if it is kept there.
    kept: Option<String>,
    /// Resumed from the previous process, with what it had read of the next frame.
    pending: Option<Vec<u8>>,
}

/// One connection's TURN stream, plain or TLS: frames from the client go to the event loop,
/// frames from the event loop to the client, until either side ends it, a deadline of
/// [`Deadlines`] passes, or the process hands it over. Deadlines count from here: after the
/// TLS handshake, which has its own.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    (local, client): (SocketAddr, SocketAddr),
    admitted: Admitted,
    mut shared: Shared,
    resume: Resume,
) {
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
    let resumed = resume.pending.is_some();
    // A resumed connection comes with its allocation.
    let allocated = Arc::new(AtomicBool::new(resumed));
    let opened = TcpEvent::Opened {
        local,
        client,
        tx,
        allocated: Arc::clone(&allocated),
        kept: resume.kept.is_some(),
    };
    let inbox = shared.inbox.clone();
    if inbox.send(opened).await.is_err() {
        return;
    }
    tracing::debug!(%client, %local, resumed, "TCP connection");
    let mut buf: Vec<u8> = resume.pending.unwrap_or_default();
    buf.reserve(READ_BUF);
    let mut deadlines = Deadlines::new(started, admitted.limits.idle_unallocated);
    if resumed {
        deadlines.first_frame = None;
    }
    // One timer for the connection, re-armed only when the deadline changes: most reads of
    // a healthy connection carry whole frames and leave it as it is.
    let mut armed = deadlines.next();
    let timer = tokio::time::sleep_until(armed.0);
    tokio::pin!(timer);
    // Whole frames the previous process had read but not yet passed on.
    let carried = if buf.is_empty() {
        Ok(())
    } else {
        forward_frames(&mut buf, &mut deadlines, &inbox, local, client).await
    };
    let (reason, detail): (Close, String) = match carried {
        Err(close) => close,
        Ok(()) => loop {
            let next = deadlines.next();
            if next != armed {
                timer.as_mut().reset(next.0);
                armed = next;
            }
            tokio::select! {
                () = &mut timer => {
                    let now = Instant::now();
                    if let Some(close) = deadlines.expired(now, allocated.load(Ordering::Relaxed)) {
                        break (close, format!("{} bytes buffered", buf.len()));
                    }
                    if deadlines.next() == armed {
                        // Fired early by the timer's granularity: wait for the rest.
                        timer.as_mut().reset(armed.0);
                    }
                }
                read = stream.read_buf(&mut buf) => {
                    if let Err(close) = read_outcome(read) {
                        break close;
                    }
                    let forwarded = forward_frames(&mut buf, &mut deadlines, &inbox, local, client);
                    if let Err(close) = forwarded.await {
                        break close;
                    }
                }
                out = rx.recv() => {
                    let Some(frame) = out else {
                        break (Close::Server, String::new());
                    };
                    if let Err(close) = write_frame(&mut stream, &frame).await {
                        break close;
                    }
                }
                true = handed_over(&mut shared.handover), if resume.kept.is_some() => {
                    break (Close::Handover, String::new());
                }
            }
        },
    };
    if reason == Close::Handover {
        return stay_for_the_next_process(stream, rx, &inbox, buf, (local, client)).await;
    }
    if let (Some(name), Some(store)) = (&resume.kept, &shared.store) {
        store.forget(name);
    }
    if matches!(reason, Close::Client | Close::Server) {
        // An orderly end: over TLS a close_notify answers the client's (RFC 8446 §6.1) before
        // the FIN. Bounded: a peer that stopped reading gets no more time than this.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
    }
    drop(admitted);
    count_end((local, client), reason, &detail);
    let _ = inbox.send(TcpEvent::Closed { local, client }).await;
}

/// Counts and logs the end of the connection from `client` to `local`.
fn count_end((local, client): (SocketAddr, SocketAddr), reason: Close, detail: &str) {
    metrics::counter!(name::TCP_CLOSED, "reason" => reason.label()).increment(1);
    tracing::debug!(%client, %local, reason = reason.label(), detail, "TCP connection ended");
}

/// A kept connection stops for a hand-over: it tells the event loop what it had read of the
/// next frame, writes out what the event loop still queues for it until the queue closes,
/// and leaves the socket open (the store holds it) for the next process to read on from.
async fn stay_for_the_next_process<S: AsyncWrite + Unpin>(
    mut stream: S,
    mut rx: mpsc::Receiver<Vec<u8>>,
    inbox: &mpsc::Sender<TcpEvent>,
    pending: Vec<u8>,
    (local, client): (SocketAddr, SocketAddr),
) {
    tracing::debug!(%client, %local, pending = pending.len(), "TCP connection handed over");
    let _ = inbox
        .send(TcpEvent::HandedOver {
            local,
            client,
            pending,
        })
        .await;
    while let Some(frame) = rx.recv().await {
        if write_frame(&mut stream, &frame).await.is_err() {
            break;
        }
    }
    let _ = inbox.send(TcpEvent::Stopped { local, client }).await;
}

/// What a read means for the connection: go on, or end it (and why).
fn read_outcome(read: std::io::Result<usize>) -> Result<(), (Close, String)> {
    match read {
        Ok(0) => Err((Close::Client, String::new())),
        Ok(_) => Ok(()),
        // A TLS client that closes without close_notify (RFC 8446 §6.1): most do, and nothing
        // of a frame is lost to it that framing would not see.
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err((Close::Client, error.to_string()))
        }
        Err(error) => Err((Close::Error, error.to_string())),
    }
}

/// Writes one frame to the client within [`WRITE_TIMEOUT`]. A TLS stream holds written
/// records until flushed; a TCP flush is free.
async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frame: &[u8],
) -> Result<(), (Close, String)> {
    let write = async {
        stream.write_all(frame).await?;
        stream.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err((Close::Error, error.to_string())),
        Err(_) => Err((Close::WriteTimeout, String::new())),
    }
}

/// Once the event loop hands over: true (false if it is gone without).
async fn handed_over(handover: &mut watch::Receiver<bool>) -> bool {
    handover.wait_for(|handover| *handover).await.is_ok()
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
        deadlines.last_frame = Instant::now();
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

    const IDLE: Duration = Duration::from_secs(30);

    #[test]
    fn the_earliest_deadline_wins() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, IDLE);
        let first = (t0 + FIRST_FRAME_TIMEOUT, Close::FirstFrameTimeout);
        assert_eq!(d.next(), first);
        d.partial_since = Some(t0 + Duration::from_secs(1));
        let frame = (
            t0 + Duration::from_secs(1) + FRAME_TIMEOUT,
            Close::FrameTimeout,
        );
        assert_eq!(d.next(), if frame.0 < first.0 { frame } else { first });
        d.first_frame = None;
        assert_eq!(d.next(), frame);
        d.partial_since = None;
        assert_eq!(d.next(), (t0 + IDLE, Close::UnallocatedTimeout));
        // A short idle time comes before the first-frame deadline.
        let d = Deadlines::new(t0, Duration::from_secs(2));
        assert_eq!(
            d.next(),
            (t0 + Duration::from_secs(2), Close::UnallocatedTimeout)
        );
    }

    #[test]
    fn only_an_idle_connection_without_allocation_is_closed() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, IDLE);
        d.first_frame = None;
        // Frames came: the look at the idle deadline moves on to the last one's.
        d.last_frame = t0 + Duration::from_secs(20);
        assert_eq!(d.expired(t0 + IDLE, false), None);
        assert_eq!(
            d.next(),
            (
                t0 + Duration::from_secs(20) + IDLE,
                Close::UnallocatedTimeout
            )
        );
        // Idle for the whole time with an allocation: it stays, and is looked at again.
        let later = t0 + Duration::from_secs(20) + IDLE;
        assert_eq!(d.expired(later, true), None);
        assert_eq!(d.next(), (later + IDLE, Close::UnallocatedTimeout));
        // The allocation is gone: the next look closes it.
        assert_eq!(
            d.expired(later + IDLE, false),
            Some(Close::UnallocatedTimeout)
        );
        // Not yet due: nothing happens.
        let mut d = Deadlines::new(t0, IDLE);
        assert_eq!(d.expired(t0, false), None);
        // The other deadlines close whatever the allocation.
        assert_eq!(
            d.expired(t0 + FIRST_FRAME_TIMEOUT, true),
            Some(Close::FirstFrameTimeout)
        );
    }

    #[test]
    fn connections_are_capped_per_source_and_in_all() {
        let limits = Limits::new(IDLE, 2, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        // Another address of the same /64 is the same source.
        let b2: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Close::PerSourceCap);
        let _third = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b2).unwrap_err(), Close::TotalCap);
        assert_eq!(daemon::lock(&limits.open).total, 3);
        drop(first);
        assert_eq!(daemon::lock(&limits.open).total, 2);
        let _fourth = limits.admit(b2).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Close::TotalCap);
        assert_eq!(daemon::lock(&limits.open).by_source.len(), 2);
    }

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        let source = |ip: &str| source_of(ip.parse().unwrap()).to_string();
        assert_eq!(source("192.0.2.1"), "192.0.2.1");
        assert_eq!(source("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(source("::ffff:192.0.2.1"), "192.0.2.1");
    }

    #[test]
    fn the_default_total_leaves_descriptors_for_relay_sockets() {
        let limit = raise_open_files_limit().unwrap();
        let max = default_connections_max(usize::MAX);
        assert_eq!(max as u64, (limit / 2).max(1));
        assert_eq!(default_connections_max(10), 10.min(max));
    }
}
