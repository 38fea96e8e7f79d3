//! A lightweight raw-UDP TURN client for control-plane figures: K allocations from distinct
//! source ports (so that a server with several `SO_REUSEPORT` threads spreads them), each
//! binding many channels with a window of requests in flight; and the time from a
//! ChannelBind request to the first channel-data datagram relayed by XDP.
//!
//! Blocking std sockets on one thread, the STUN messages of [`crate::stun`]: the client
//! costs a few microseconds per request, so on a 2-core machine most of the CPU is left to
//! the server.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::libc;
use nix::sys::socket::{setsockopt, sockopt};

use super::Ns;
use crate::stun::attr::{CHANNEL_NUMBER, NONCE, XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS};
use crate::stun::class::{REQUEST, SUCCESS};
use crate::stun::method::CHANNEL_BIND;
use crate::stun::{self, Answer, Msg};

/// The bench's TURN user.
pub const USER: &str = "test";
/// Its password.
pub const PASSWORD: &str = "testpass";
/// The TTL the client sends with: relayed by XDP (which decrements it) a datagram arrives
/// with 199, relayed by a user-space server with that server's own (64 by default).
pub const CLIENT_TTL: u32 = 200;
/// A datagram at the peer with a TTL above this was relayed by XDP.
pub const XDP_TTL_ABOVE: u8 = 128;

/// One allocation of the raw client.
#[derive(Debug)]
pub struct RawAllocation {
    client: stun::Client,
    /// The client's address (the allocation's 5-tuple).
    pub local: SocketAddr,
    /// The relayed address the server chose.
    pub relayed: SocketAddr,
}

/// Makes `count` UDP allocations on `server` (401, then Allocate), each from its own socket
/// on `local_ip` (an ephemeral port), created in `ns` when given. An Allocate answered with
/// 437 (Allocation Mismatch: the server still holds an allocation on that 5-tuple, from an
/// earlier client of the run) is made again from another port, as RFC 8656 section 7.3 has
/// a client do; the refused port stays bound until the end, so it is not drawn again.
pub fn allocate(
    ns: Option<&Ns>,
    local_ip: Ipv4Addr,
    server: SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<RawAllocation>> {
    /// Other ports tried for one allocation after 437.
    const MISMATCH_RETRIES: usize = 8;
    /// STUN error code 437, Allocation Mismatch (RFC 8656 section 19).
    const ALLOCATION_MISMATCH: u16 = 437;
    let bind = || -> anyhow::Result<UdpSocket> {
        let bind = move || Ok(UdpSocket::bind(SocketAddrV4::new(local_ip, 0))?);
        match ns {
            Some(ns) => ns.enter(bind),
            None => bind(),
        }
    };
    let mut refused_ports = Vec::new();
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        let mut attempt = 0;
        let (client, local, answer) = loop {
            let socket = bind()?;
            let local = socket.local_addr()?;
            let mut client = stun::Client::new(socket, server, USER, PASSWORD, None)?;
            client.txid_tag = 0xA0 | (index as u8 & 0x0F);
            let answer = client.allocate()?;
            if answer.class != SUCCESS
                && answer.error_code() == Some(ALLOCATION_MISMATCH)
                && attempt < MISMATCH_RETRIES
            {
                attempt += 1;
                refused_ports.push(client);
                continue;
            }
            break (client, local, answer);
        };
        ensure!(
            answer.class == SUCCESS,
            "Allocate from {local}: class {} code {:?}",
            answer.class,
            answer.error_code()
        );
        let relayed = answer
            .xor_addr(XOR_RELAYED_ADDRESS)
            .context("no XOR-RELAYED-ADDRESS")?;
        out.push(RawAllocation {
            client,
            local,
            relayed,
        });
    }
    Ok(out)
}

/// What [`bind_channels`] did.
#[derive(Debug, Clone)]
pub struct BindFigures {
    /// Bindings whose success response arrived.
    pub bound: usize,
    /// Bindings asked for.
    pub requested: usize,
    /// From the first request to the last success.
    pub elapsed: Duration,
    /// Requests sent again after a timeout.
    pub retransmits: u64,
    /// Requests answered with an error (other than 401/438, which are followed).
    pub errors: u64,
    /// Requests given up after [`MAX_TRIES`] transmissions without an answer.
    pub unanswered: u64,
    /// The first error or request given up, described.
    pub first_error: Option<String>,
}

/// Transmissions of a ChannelBind before [`bind_channels`] gives it up.
pub const MAX_TRIES: u32 = 10;

impl BindFigures {
    /// Bindings per second.
    pub fn per_second(&self) -> f64 {
        self.bound as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The transaction id of request `index` of allocation `alloc` (the same on a
/// retransmission).
fn txid(alloc: usize, index: u32) -> [u8; 12] {
    let mut t = [0xB1; 12];
    t[1] = alloc as u8;
    t[2..6].copy_from_slice(&index.to_be_bytes());
    t
}

fn channel_bind(
    alloc: &RawAllocation,
    txid: [u8; 12],
    channel: u16,
    peer: SocketAddr,
) -> anyhow::Result<Vec<u8>> {
    let c = &alloc.client;
    let nonce = c.credentials.nonce.as_deref().context("no nonce yet")?;
    let key = c.key().context("no realm yet")?;
    let realm = c.realm().context("no realm yet")?;
    Ok(Msg::new(CHANNEL_BIND, REQUEST, txid)
        .attr(CHANNEL_NUMBER, &stun::channel_number(channel))
        .xor_addr(XOR_PEER_ADDRESS, peer)
        .credentials(USER, realm, nonce)
        .finish(Some(&key), true))
}

/// The ChannelBind of sample `j` in [`first_offload`]: its channel (0x4000 + `first_index` +
/// `j`), transaction id and request, binding `peer_ip`:(`first_port` + `j`).
fn offload_bind(
    alloc: &RawAllocation,
    peer_ip: Ipv4Addr,
    first_port: u16,
    first_index: u16,
    j: usize,
) -> anyhow::Result<(u16, [u8; 12], Vec<u8>)> {
    let index = u32::from(first_index) + j as u32;
    let channel = 0x4000 + index as u16;
    let peer = SocketAddr::V4(SocketAddrV4::new(peer_ip, first_port + j as u16));
    let t = txid(0xFF, index);
    Ok((channel, t, channel_bind(alloc, t, channel, peer)?))
}

/// Whether `datagram` is the success answer to the ChannelBind `txid` (of `channel`); an
/// error for any other answer to it.
fn bind_succeeded(datagram: &[u8], txid: [u8; 12], channel: u16) -> anyhow::Result<bool> {
    let Some(answer) = Answer::parse(datagram).filter(|answer| answer.txid == txid) else {
        return Ok(false);
    };
    ensure!(
        answer.class == SUCCESS,
        "ChannelBind {channel:#06x}: class {} code {:?}",
        answer.class,
        answer.error_code()
    );
    Ok(true)
}

/// Waits until one of `sockets` is readable or `timeout` passes.
fn wait_readable(sockets: &[&UdpSocket], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of pollfd of the given length.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis().max(1) as i32,
        );
    }
}

/// On every allocation, binds channels 0x4000 + i for i in `0..channels` to
/// `peer_ip`:(`first_port` + i), keeping `window` requests in flight per allocation and
/// retransmitting after `rto`. Gives up at `deadline`.
pub fn bind_channels(
    allocs: &mut [RawAllocation],
    peer_ip: Ipv4Addr,
    first_port: u16,
    channels: u16,
    window: usize,
    rto: Duration,
    deadline: Duration,
) -> anyhow::Result<BindFigures> {
    ensure!(
        u32::from(channels) <= 0x4000,
        "at most 16384 channels per allocation"
    );
    ensure!(
        u32::from(first_port) + u32::from(channels) <= 65536,
        "peer ports out of range"
    );
    ensure!(allocs.len() <= 256, "at most 256 allocations");
    for alloc in allocs.iter() {
        alloc.client.socket.set_nonblocking(true)?;
    }
    let peers = PeerPorts {
        ip: peer_ip,
        first_port,
    };
    let mut binder = Binder::new(allocs, peers, channels, window, rto);
    while binder.pending() {
        binder.check_deadline(deadline)?;
        binder.fill_windows()?;
        let got = binder.take_answers()?;
        binder.retransmit_timed_out()?;
        if !got {
            binder.wait();
        }
    }
    Ok(binder.finish())
}

/// The peers [`bind_channels`] binds to: request i binds `ip`:(`first_port` + i).
#[derive(Clone, Copy)]
struct PeerPorts {
    ip: Ipv4Addr,
    first_port: u16,
}

impl PeerPorts {
    /// The peer of request `i`.
    fn peer(self, i: u32) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, self.first_port + i as u16))
    }

    /// Sends request `i` of allocation `a` (channel 0x4000 + `i`); false when the socket
    /// would block.
    fn send(self, alloc: &RawAllocation, a: usize, i: u32) -> anyhow::Result<bool> {
        let request = channel_bind(alloc, txid(a, i), 0x4000 + i as u16, self.peer(i))?;
        match alloc.client.socket.send_to(&request, alloc.client.server) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e).context("send"),
        }
    }
}

/// Per request: when last sent (None: not in flight) and how often.
#[derive(Clone, Copy)]
struct Slot {
    sent: Option<Instant>,
    tries: u32,
    done: bool,
}

/// The requests of one allocation.
struct Requests {
    slots: Vec<Slot>,
    /// The next request to send for the first time.
    next: u32,
    in_flight: usize,
}

/// The state of [`bind_channels`], shared by its steps.
struct Binder<'a> {
    allocs: &'a mut [RawAllocation],
    /// One per allocation.
    requests: Vec<Requests>,
    peers: PeerPorts,
    /// Requests per allocation.
    channels: u32,
    window: usize,
    rto: Duration,
    /// The counts so far; `elapsed` is set by [`Binder::finish`].
    figures: BindFigures,
    started: Instant,
    last_success: Instant,
    last_scan: Instant,
    buf: [u8; 2048],
}

impl<'a> Binder<'a> {
    fn new(
        allocs: &'a mut [RawAllocation],
        peers: PeerPorts,
        channels: u16,
        window: usize,
        rto: Duration,
    ) -> Self {
        let requests = allocs
            .iter()
            .map(|_| Requests {
                slots: vec![
                    Slot {
                        sent: None,
                        tries: 0,
                        done: false,
                    };
                    usize::from(channels)
                ],
                next: 0,
                in_flight: 0,
            })
            .collect();
        let figures = BindFigures {
            bound: 0,
            requested: allocs.len() * usize::from(channels),
            elapsed: Duration::ZERO,
            retransmits: 0,
            errors: 0,
            unanswered: 0,
            first_error: None,
        };
        let started = Instant::now();
        Self {
            allocs,
            requests,
            peers,
            channels: u32::from(channels),
            window,
            rto,
            figures,
            started,
            last_success: started,
            last_scan: started,
            buf: [0u8; 2048],
        }
    }

    /// Whether some request is neither bound, refused nor given up.
    fn pending(&self) -> bool {
        let f = &self.figures;
        f.bound + ((f.errors + f.unanswered) as usize) < f.requested
    }

    /// An error once `deadline` has passed since the first request.
    fn check_deadline(&self, deadline: Duration) -> anyhow::Result<()> {
        if self.started.elapsed() <= deadline {
            return Ok(());
        }
        let BindFigures {
            bound,
            requested,
            retransmits,
            errors,
            unanswered,
            first_error,
            ..
        } = &self.figures;
        bail!(
            "{bound} of {requested} bindings in {deadline:?} ({retransmits} retransmits, {errors} errors, {unanswered} unanswered{})",
            first_error
                .as_ref()
                .map_or(String::new(), |e| format!(", first: {e}"))
        );
    }

    /// Sends new requests until every allocation has `window` in flight.
    fn fill_windows(&mut self) -> anyhow::Result<()> {
        for (a, (alloc, state)) in self.allocs.iter().zip(&mut self.requests).enumerate() {
            while state.in_flight < self.window && state.next < self.channels {
                let i = state.next;
                if !self.peers.send(alloc, a, i)? {
                    break;
                }
                let slot = &mut state.slots[i as usize];
                slot.sent = Some(Instant::now());
                slot.tries = 1;
                state.next += 1;
                state.in_flight += 1;
            }
        }
        Ok(())
    }

    /// Takes every answer queued on the sockets; whether there was any datagram.
    fn take_answers(&mut self) -> anyhow::Result<bool> {
        let mut got = false;
        for a in 0..self.allocs.len() {
            loop {
                let len = match self.allocs[a].client.socket.recv(&mut self.buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("recv"),
                };
                got = true;
                let Some(answer) = Answer::parse(&self.buf[..len]) else {
                    continue;
                };
                self.on_answer(a, &answer)?;
            }
        }
        Ok(got)
    }

    /// Counts `answer` on allocation `a`, or follows a new nonce (401/438) by sending the
    /// request again.
    fn on_answer(&mut self, a: usize, answer: &Answer) -> anyhow::Result<()> {
        let t = answer.txid;
        if t[0] != 0xB1 || usize::from(t[1]) != a || answer.method != CHANNEL_BIND {
            return Ok(());
        }
        let i = u32::from_be_bytes([t[2], t[3], t[4], t[5]]);
        let alloc = &mut self.allocs[a];
        let state = &mut self.requests[a];
        let Some(slot) = state.slots.get_mut(i as usize) else {
            return Ok(());
        };
        if slot.done || slot.sent.is_none() {
            return Ok(());
        }
        match (answer.class, answer.error_code(), answer.attr(NONCE)) {
            (SUCCESS, _, _) => {
                slot.done = true;
                slot.sent = None;
                state.in_flight -= 1;
                self.figures.bound += 1;
                self.last_success = Instant::now();
            }
            (_, Some(401 | 438), Some(nonce)) => {
                // A new nonce: send again with it (a new transmission).
                alloc.client.credentials.nonce = Some(nonce.to_vec());
                slot.sent = Some(Instant::now());
                self.peers.send(alloc, a, i)?;
            }
            (class, code, _) => {
                slot.done = true;
                slot.sent = None;
                state.in_flight -= 1;
                self.figures.errors += 1;
                self.figures.first_error.get_or_insert_with(|| {
                    format!("channel {:#06x}: class {class} code {code:?}", 0x4000 + i)
                });
            }
        }
        Ok(())
    }

    /// Retransmits what timed out, or gives it up after [`MAX_TRIES`] (scanned every few
    /// milliseconds).
    fn retransmit_timed_out(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        if now.duration_since(self.last_scan) < Duration::from_millis(5) {
            return Ok(());
        }
        self.last_scan = now;
        let figures = &mut self.figures;
        for (a, (alloc, state)) in self.allocs.iter().zip(&mut self.requests).enumerate() {
            for i in 0..state.next {
                let slot = &mut state.slots[i as usize];
                let Some(sent) = slot.sent else { continue };
                if now.duration_since(sent) < self.rto {
                    continue;
                }
                if slot.tries >= MAX_TRIES {
                    // Given up: counted, and the window moves on.
                    slot.done = true;
                    slot.sent = None;
                    state.in_flight -= 1;
                    figures.unanswered += 1;
                    figures.first_error.get_or_insert_with(|| {
                        format!(
                            "channel {:#06x} of allocation {a}: no answer after {MAX_TRIES} tries",
                            0x4000 + i
                        )
                    });
                    continue;
                }
                if self.peers.send(alloc, a, i)? {
                    slot.sent = Some(now);
                    slot.tries += 1;
                    figures.retransmits += 1;
                }
            }
        }
        Ok(())
    }

    /// Waits briefly for an answer on any socket.
    fn wait(&self) {
        let sockets: Vec<&UdpSocket> = self.allocs.iter().map(|a| &a.client.socket).collect();
        wait_readable(&sockets, Duration::from_millis(1));
    }

    /// The figures, timed from the first request to the last success.
    fn finish(self) -> BindFigures {
        BindFigures {
            elapsed: self.last_success.duration_since(self.started),
            ..self.figures
        }
    }
}

/// What [`first_offload`] measured, in microseconds.
#[derive(Debug, Clone)]
pub struct OffloadLatency {
    /// Samples measured.
    pub samples: usize,
    /// ChannelBind request -> first datagram relayed by XDP at the peer, per sample.
    pub first_xdp_us: Vec<f64>,
    /// ChannelBind request -> its success response, per sample (channel data flowing).
    pub bind_success_us: Vec<f64>,
    /// ChannelBind request -> its success response with no channel data sent, one request
    /// at a time, per sample (fresh channels after the others).
    pub bind_only_us: Vec<f64>,
    /// Datagrams that reached the peer relayed in user space before the first one relayed
    /// by XDP, summed over the samples.
    pub userspace_before: u64,
    /// Channel-data datagrams sent per sample (median).
    pub sent_median: f64,
    /// Samples whose first XDP datagram was sent before the success response arrived.
    pub before_success: usize,
}

/// A percentile (0..=1) of `values`, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Receives one datagram without blocking: (its first 4 payload bytes as a sequence number,
/// its TTL), `None` when none is queued.
fn recv_ttl(socket: &UdpSocket) -> anyhow::Result<Option<(u32, u8)>> {
    let mut data = [0u8; 2048];
    // Room for one cmsghdr with an int (IP_TTL), aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iov, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers of the stated sizes.
    let len = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    if len < 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(error).context("recvmsg");
    }
    let mut ttl = 0u8;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled in, bounded by
    // msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_TTL {
                ttl = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>()) as u8;
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    let seq = match data.get(..4.min(len as usize)) {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
        _ => u32::MAX,
    };
    Ok(Some((seq, ttl)))
}

/// For `samples` fresh channels 0x4000 + `first_index` + j of `alloc` (peer
/// `peer_ip`:`first_port` + j, a socket in `ns` with IP_RECVTTL): sends ChannelBind and,
/// without waiting for its answer, channel data on that channel every `interval` (a busy
/// loop), until the peer receives a datagram relayed by XDP, told by its TTL (the client
/// sends with [`CLIENT_TTL`]; XDP relays it with one less, a user-space relay with its own).
/// Then `samples` more fresh channels (j from `samples`) bound one at a time with no data.
pub fn first_offload(
    ns: &Ns,
    alloc: &mut RawAllocation,
    peer_ip: Ipv4Addr,
    first_port: u16,
    first_index: u16,
    samples: usize,
    interval: Duration,
) -> anyhow::Result<OffloadLatency> {
    ensure!(
        usize::from(first_index) + 2 * samples <= 0x4000,
        "channel numbers out of range"
    );
    let peers = offload_peers(ns, peer_ip, first_port, samples)?;
    let socket = &alloc.client.socket;
    socket.set_nonblocking(true)?;
    socket.set_ttl(CLIENT_TTL)?;
    let mut run = OffloadRun::new(alloc, peer_ip, first_port, first_index, samples, interval);
    for (j, peer_socket) in peers.iter().enumerate() {
        run.sample_with_data(j, peer_socket)?;
    }
    run.out.sent_median = percentile(&run.sent_counts, 0.5);
    // The same ChannelBind with no channel data: only the request and its answer.
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    for j in samples..2 * samples {
        run.sample_bind_only(j)?;
    }
    Ok(run.out)
}

/// The peer sockets of [`first_offload`], one per sample: `peer_ip`:(`first_port` + j) in
/// `ns`, non-blocking, with IP_RECVTTL.
fn offload_peers(
    ns: &Ns,
    peer_ip: Ipv4Addr,
    first_port: u16,
    samples: usize,
) -> anyhow::Result<Vec<UdpSocket>> {
    ns.enter(|| {
        (0..samples)
            .map(|j| {
                let socket = UdpSocket::bind(SocketAddrV4::new(peer_ip, first_port + j as u16))?;
                socket.set_nonblocking(true)?;
                setsockopt(&socket, sockopt::Ipv4RecvTtl, &true)?;
                Ok(socket)
            })
            .collect()
    })
}

/// The state of [`first_offload`], shared by its samples.
struct OffloadRun<'a> {
    alloc: &'a RawAllocation,
    peer_ip: Ipv4Addr,
    first_port: u16,
    first_index: u16,
    /// Between two channel-data datagrams of a sample.
    interval: Duration,
    /// The figures so far.
    out: OffloadLatency,
    /// Channel-data datagrams sent, per sample.
    sent_counts: Vec<f64>,
    buf: [u8; 2048],
}

/// One sample of [`first_offload`] with channel data flowing, while it runs.
struct DataSample {
    channel: u16,
    txid: [u8; 12],
    request: Vec<u8>,
    started: Instant,
    /// Channel-data datagrams sent so far (the next one's sequence number).
    sent: u32,
    next_send: Instant,
    retransmitted: Instant,
    /// When the success response arrived.
    success: Option<Instant>,
    /// `sent` when the success response arrived.
    success_seq: u32,
    /// When the first datagram relayed by XDP arrived at the peer, and its sequence number.
    first: Option<(Instant, u32)>,
}

impl<'a> OffloadRun<'a> {
    fn new(
        alloc: &'a RawAllocation,
        peer_ip: Ipv4Addr,
        first_port: u16,
        first_index: u16,
        samples: usize,
        interval: Duration,
    ) -> Self {
        Self {
            alloc,
            peer_ip,
            first_port,
            first_index,
            interval,
            out: OffloadLatency {
                samples: 0,
                first_xdp_us: Vec::with_capacity(samples),
                bind_success_us: Vec::with_capacity(samples),
                bind_only_us: Vec::with_capacity(samples),
                userspace_before: 0,
                sent_median: 0.0,
                before_success: 0,
            },
            sent_counts: Vec::with_capacity(samples),
            buf: [0u8; 2048],
        }
    }

    fn socket(&self) -> &'a UdpSocket {
        &self.alloc.client.socket
    }

    fn server(&self) -> SocketAddr {
        self.alloc.client.server
    }

    /// Sample `j` with channel data: ChannelBind, then channel data every `interval` until
    /// the peer socket `peer` receives a datagram relayed by XDP and the success response
    /// has arrived.
    fn sample_with_data(&mut self, j: usize, peer: &UdpSocket) -> anyhow::Result<()> {
        let (channel, txid, request) = offload_bind(
            self.alloc,
            self.peer_ip,
            self.first_port,
            self.first_index,
            j,
        )?;
        let started = Instant::now();
        self.socket().send_to(&request, self.server())?;
        let mut sample = DataSample {
            channel,
            txid,
            request,
            started,
            sent: 0,
            next_send: started,
            retransmitted: started,
            success: None,
            success_seq: u32::MAX,
            first: None,
        };
        while sample.first.is_none() || sample.success.is_none() {
            let now = Instant::now();
            ensure!(
                now.duration_since(started) < Duration::from_secs(5),
                "channel {channel:#06x}: no datagram relayed by XDP within 5 s ({} sent, success {})",
                sample.sent,
                sample.success.is_some()
            );
            if sample.first.is_none() && now >= sample.next_send {
                self.send_data(&mut sample, now)?;
            }
            if sample.success.is_none()
                && now.duration_since(sample.retransmitted) > Duration::from_millis(500)
            {
                sample.retransmitted = now;
                self.socket().send_to(&sample.request, self.server())?;
            }
            self.take_bind_answer(&mut sample, now)?;
            if sample.first.is_none() {
                self.watch_peer(&mut sample, peer)?;
            }
        }
        self.record(&sample);
        // Drain what else arrives, so that the next sample starts clean.
        while recv_ttl(peer)?.is_some() {}
        Ok(())
    }

    /// Sends the next channel-data datagram of `sample` (its sequence number in the first 4
    /// bytes) and schedules the one after.
    fn send_data(&self, sample: &mut DataSample, now: Instant) -> anyhow::Result<()> {
        let mut data = [0u8; 64];
        data[..4].copy_from_slice(&sample.sent.to_be_bytes());
        let frame = stun::channel_data(sample.channel, &data);
        match self.socket().send_to(&frame, self.server()) {
            Ok(_) => sample.sent += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("send channel data"),
        }
        sample.next_send += self.interval;
        if sample.next_send < now {
            sample.next_send = now + self.interval;
        }
        Ok(())
    }

    /// Takes one datagram from the client socket, if one is queued: the success response
    /// of `sample`'s ChannelBind is noted at `now`.
    fn take_bind_answer(&mut self, sample: &mut DataSample, now: Instant) -> anyhow::Result<()> {
        match self.socket().recv(&mut self.buf) {
            Ok(len) => {
                if bind_succeeded(&self.buf[..len], sample.txid, sample.channel)? {
                    sample.success.get_or_insert(now);
                    sample.success_seq = sample.sent;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("recv"),
        }
        Ok(())
    }

    /// Reads what the peer socket `peer` received, up to the first datagram relayed by XDP;
    /// those relayed in user space are counted.
    fn watch_peer(&mut self, sample: &mut DataSample, peer: &UdpSocket) -> anyhow::Result<()> {
        while let Some((seq, ttl)) = recv_ttl(peer)? {
            if ttl > XDP_TTL_ABOVE {
                sample.first = Some((Instant::now(), seq));
                break;
            }
            self.out.userspace_before += 1;
        }
        Ok(())
    }

    /// Adds the figures of the finished `sample`.
    fn record(&mut self, sample: &DataSample) {
        let (Some(success), Some((first_at, seq))) = (sample.success, sample.first) else {
            unreachable!("the loop ends with both")
        };
        if seq < sample.success_seq {
            self.out.before_success += 1;
        }
        self.out
            .first_xdp_us
            .push(first_at.duration_since(sample.started).as_secs_f64() * 1e6);
        self.out
            .bind_success_us
            .push(success.duration_since(sample.started).as_secs_f64() * 1e6);
        self.sent_counts.push(f64::from(sample.sent));
        self.out.samples += 1;
    }

    /// Sample `j` without channel data: ChannelBind and its success response, waited for
    /// with a blocking receive.
    fn sample_bind_only(&mut self, j: usize) -> anyhow::Result<()> {
        let (channel, t, request) = offload_bind(
            self.alloc,
            self.peer_ip,
            self.first_port,
            self.first_index,
            j,
        )?;
        let started = Instant::now();
        self.socket().send_to(&request, self.server())?;
        let mut retransmitted = started;
        let success = loop {
            let now = Instant::now();
            ensure!(
                now.duration_since(started) < Duration::from_secs(5),
                "ChannelBind {channel:#06x}: no answer within 5 s"
            );
            if now.duration_since(retransmitted) > Duration::from_millis(500) {
                retransmitted = now;
                self.socket().send_to(&request, self.server())?;
            }
            // A blocking receive, as a real client waits: the CPU stays with the server.
            match self.socket().recv(&mut self.buf) {
                Ok(len) => {
                    let now = Instant::now();
                    if bind_succeeded(&self.buf[..len], t, channel)? {
                        break now;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("recv"),
            }
        };
        self.out
            .bind_only_us
            .push(success.duration_since(started).as_secs_f64() * 1e6);
        Ok(())
    }
}

/// Raised scheduling priority (a lower nice value) for some threads, restored on drop: the
/// latency samples are about the relay's path, not about waiting behind unrelated work on a
/// shared machine's two cores.
#[derive(Debug)]
pub struct Boost {
    saved: Vec<(u32, i32)>,
}

impl Boost {
    /// Sets `nice` on every thread of `pids` and on the calling thread.
    pub fn new(pids: &[u32], nice: i32) -> Self {
        let mut tids: Vec<u32> = pids
            .iter()
            .flat_map(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/task"))
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            })
            .collect();
        tids.push(nix::unistd::gettid().as_raw() as u32);
        let mut saved = Vec::new();
        for tid in tids {
            // SAFETY: plain syscalls on a thread id; a vanished thread only fails.
            unsafe {
                let before = libc::getpriority(libc::PRIO_PROCESS, tid);
                if libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0 {
                    saved.push((tid, before));
                }
            }
        }
        Self { saved }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        for &(tid, nice) in &self.saved {
            // SAFETY: as above.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, tid, nice);
            }
        }
    }
}
