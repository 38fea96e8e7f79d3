//! The daemon runs one event loop per thread, each a complete TURN server for the clients
//! the kernel steers to it, so that user-space relaying uses every core with no locks on the
//! packet path:
//!
//! - every listener address is a SO_REUSEPORT group of one UDP (and one TCP) socket per
//!   thread; the kernel picks the socket by a hash of the 4-tuple, so all of a client's
//!   requests and ChannelData reach the same thread (its allocation's home);
//! - each thread owns its allocations' relay sockets, drawn from its own slice of the port
//!   range, so peer traffic lands on the thread that holds the allocation;
//! - the threads share one nonce key (a nonce from one is good at all), one quota ledger
//!   (`user_quota`/`total_quota` hold across them) and one link to the xdp-agent;
//! - and one reservation ledger with the sockets of the reserved ports ([`ReservedSockets`]):
//!   a RESERVATION-TOKEN is server-wide (RFC 8656 §7.2), and the Allocate that brings it comes
//!   from another client socket than the one that reserved, so usually to another thread. That
//!   thread's core takes the token out of the ledger and its event loop adopts the socket.
//!
//! This module binds the sockets before any thread starts (so a busy port is reported at
//! once), carves the port range, and carries the messages between the main thread and the
//! event-loop threads.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use ipnet::IpNet;
use socket2::{Domain, Protocol, Socket, Type};
use turn_control_core::{Credentials, RelayAddr, Stats};

use crate::handover::{Inherited, ListenerKind, SocketStore, listener_name};
use crate::udp;

/// What the main thread tells an event-loop thread.
#[derive(Debug)]
pub enum Control {
    /// SIGHUP: new credentials and peer lists.
    Reload {
        /// Users and REST secrets.
        credentials: Credentials,
        /// Operator allow list.
        allow_peer: Vec<IpNet>,
        /// Operator deny list.
        deny_peer: Vec<IpNet>,
    },
    /// SIGHUP: where new Allocates are redirected while draining or shedding, and the
    /// ALTERNATE-DOMAIN sent with them.
    Alternates(Vec<SocketAddr>, Option<String>),
    /// POST /drain or SIGUSR1: redirect new Allocates, keep the allocations there are.
    Drain,
    /// The host's addresses changed (or were learned at start): every address of every
    /// interface, and the configured relay addresses, all refused as peers.
    OwnAddresses(Vec<IpAddr>),
    /// SIGTERM or SIGINT: delete every allocation and stop.
    Terminate,
    /// SIGTERM with a state directory: stop, leaving the allocations (journaled, their
    /// sockets in the store, their channels in the kernel) to the next process.
    Handover,
}

/// What an event-loop thread shows the metrics, refreshed once a second.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The core's counters.
    pub stats: Stats,
    /// TURN-over-TCP connections open.
    pub tcp_connections: usize,
    /// Relay sockets open.
    pub relay_sockets: usize,
    /// When the thread last published: GET /healthz finds a stuck thread by it.
    pub published: Option<Instant>,
    /// Whether the thread is linked to the xdp-agent.
    pub agent_connected: bool,
}

/// Where an event-loop thread writes its [`Report`] and the main thread reads it.
pub type ReportSlot = Arc<Mutex<Report>>;

/// The sum of every thread's report.
pub fn total(slots: &[ReportSlot]) -> Report {
    let mut sum = Report::default();
    for slot in slots {
        let report = daemon::lock(slot);
        sum.stats.accumulate(&report.stats);
        sum.tcp_connections += report.tcp_connections;
        sum.relay_sockets += report.relay_sockets;
        sum.agent_connected |= report.agent_connected;
    }
    sum
}

/// The sockets of reserved relay ports (RFC 8656 §7.2: EVEN-PORT with the R bit), shared by
/// every event-loop thread. The thread whose core makes a reservation binds its socket and
/// keeps it here ([`turn_control_core::Command::ReservePort`]), unread: no permission can exist
/// for a port no allocation holds. The thread whose core gets the Allocate with the token takes
/// it out and reads it as that allocation's relay socket
/// ([`turn_control_core::Command::AdoptReservedPort`]); an unused one is closed when its
/// reservation ends ([`turn_control_core::Command::ReleaseReservedPort`]). What is left closes
/// with the process. The cores' shared ledger decides which of these happens to a socket, so
/// no two threads ask for the same one.
#[derive(Debug, Clone, Default)]
pub struct ReservedSockets(Arc<Mutex<HashMap<RelayAddr, ReservedSocket>>>);

/// A reserved relay port's socket, bound and not read.
#[derive(Debug)]
pub struct ReservedSocket {
    /// The socket, bound to the relay address of the reserved port.
    pub socket: Socket,
    /// Bound with DONT-FRAGMENT ([`udp::set_dont_fragment`]).
    pub dont_fragment: bool,
}

impl ReservedSockets {
    /// Keeps the socket of the reserved port `relay`.
    pub fn keep(&self, relay: RelayAddr, socket: ReservedSocket) {
        daemon::lock(&self.0).insert(relay, socket);
    }

    /// Takes the socket of `relay` out, if kept.
    pub fn take(&self, relay: RelayAddr) -> Option<ReservedSocket> {
        daemon::lock(&self.0).remove(&relay)
    }

    /// Sockets kept.
    pub fn count(&self) -> usize {
        daemon::lock(&self.0).len()
    }
}

/// One thread's listener sockets.
#[derive(Debug, Default)]
pub struct Listeners {
    /// UDP listeners by address.
    pub udp: Vec<(SocketAddr, Socket)>,
    /// TCP listeners by address, `--listen`'s (unless --no-tcp) and `--tls-listen`'s.
    pub tcp: Vec<(SocketAddr, std::net::TcpListener)>,
}

/// Binds every address of `listen` as a SO_REUSEPORT group of `threads` UDP sockets (of
/// `buffer_bytes` each) and, with `tcp`, `threads` TCP listeners, and every address of
/// `tls_listen` as a group of `threads` TCP listeners; `result[i]` belongs to thread `i`.
/// A socket the previous process left in the store ([`Inherited`]) is taken instead of a
/// fresh one, so the group, and with it the kernel's choice of thread for each client, stays
/// as it was; every listener is (again) in the store afterwards. Also says how many were
/// inherited. Errors name the address.
pub fn bind_listeners(
    (listen, tls_listen): (&[SocketAddr], &[SocketAddr]),
    tcp: bool,
    buffer_bytes: usize,
    threads: usize,
    (inherited, store): (&mut Inherited, &SocketStore),
) -> anyhow::Result<(Vec<Listeners>, usize)> {
    let mut out: Vec<Listeners> = (0..threads).map(|_| Listeners::default()).collect();
    let mut kept = 0;
    for &addr in listen {
        // SO_REUSEPORT would let this daemon join a group that another process of the same
        // user holds, silently splitting its clients; a plain bind first finds it busy.
        // Sockets passed back from the store hold the address themselves.
        if !inherited.has_listener(addr) {
            exclusive_probe(addr, Type::DGRAM).with_context(|| format!("listen udp {addr}"))?;
        }
        for (thread, listeners) in out.iter_mut().enumerate() {
            let socket = match inherited.take_listener(ListenerKind::Udp, thread, addr) {
                Some(socket) => {
                    kept += 1;
                    udp::set_buffers(&socket, buffer_bytes)
                        .with_context(|| format!("listen udp {addr}"))?;
                    socket
                }
                None => udp::bind(addr, buffer_bytes, true)
                    .with_context(|| format!("listen udp {addr}"))?,
            };
            listeners.udp.push((addr, socket));
        }
        if tcp {
            kept += bind_tcp(addr, &mut out, inherited)?;
        }
    }
    for &addr in tls_listen {
        kept += bind_tcp(addr, &mut out, inherited)?;
    }
    if store.is_some() {
        for (thread, listeners) in out.iter().enumerate() {
            // Replaced as a whole: a listener of a removed address leaves the store with it.
            let (udp, tcp) = (
                listener_name(ListenerKind::Udp, thread),
                listener_name(ListenerKind::Tcp, thread),
            );
            store.forget(&udp);
            store.forget(&tcp);
            for (_, socket) in &listeners.udp {
                store.keep(&udp, socket);
            }
            for (_, listener) in &listeners.tcp {
                store.keep(&tcp, &Socket::from(listener.try_clone()?));
            }
        }
    }
    if kept > 0 {
        tracing::info!(
            sockets = kept,
            "listener sockets kept from the previous process"
        );
    }
    Ok((out, kept))
}

/// Binds `addr` as a SO_REUSEPORT group of TCP listeners, one for each of `out`, or takes
/// them from `inherited`; how many were inherited.
fn bind_tcp(
    addr: SocketAddr,
    out: &mut [Listeners],
    inherited: &mut Inherited,
) -> anyhow::Result<usize> {
    if !inherited.has_listener(addr) {
        exclusive_probe(addr, Type::STREAM).with_context(|| format!("listen tcp {addr}"))?;
    }
    let mut kept = 0;
    for (thread, listeners) in out.iter_mut().enumerate() {
        let listener = match inherited.take_listener(ListenerKind::Tcp, thread, addr) {
            Some(socket) => {
                kept += 1;
                socket.set_nonblocking(true)?;
                socket.into()
            }
            None => tcp_listener(addr).with_context(|| format!("listen tcp {addr}"))?,
        };
        listeners.tcp.push((addr, listener));
    }
    Ok(kept)
}

/// Binds `addr` without SO_REUSEPORT and lets it go: fails if anyone holds the address.
fn exclusive_probe(addr: SocketAddr, kind: Type) -> std::io::Result<()> {
    let protocol = if kind == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if kind == Type::STREAM {
        // Connections of an earlier run in TIME_WAIT do not make the port busy.
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Thread `index` of `threads`' slice of `ports`: contiguous, disjoint, together the whole
/// range, sizes differing by at most one. Needs `threads` <= the range's length (the
/// configuration checks it).
pub fn port_slice(
    ports: &RangeInclusive<u16>,
    index: usize,
    threads: usize,
) -> RangeInclusive<u16> {
    let low = usize::from(*ports.start());
    let len = usize::from(*ports.end()) - low + 1;
    let start = low + index * len / threads;
    let end = low + (index + 1) * len / threads - 1;
    // Both lie within `ports`, so they fit in a u16.
    (start as u16)..=(end as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_slices_cover_the_range_once() {
        for (range, threads) in [
            (49152..=65535u16, 2),
            (49152..=65535, 3),
            (1000..=1006, 7),
            (1000..=1009, 3),
            (5..=5, 1),
            (1..=65535, 256),
        ] {
            let mut next = *range.start();
            for i in 0..threads {
                let slice = port_slice(&range, i, threads);
                assert_eq!(*slice.start(), next, "{range:?}/{threads} slice {i}");
                assert!(!slice.is_empty());
                next = slice.end().wrapping_add(1);
                if i == threads - 1 {
                    assert_eq!(slice.end(), range.end());
                }
            }
        }
    }

    #[test]
    fn a_reserved_socket_adopted_by_another_thread_keeps_its_port_from_a_fresh_bind() {
        let socket = udp::bind("127.0.0.1:0".parse().unwrap(), 4096, false).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let relay = RelayAddr(addr);
        let maker = ReservedSockets::default();
        let adopter = maker.clone();
        maker.keep(
            relay,
            ReservedSocket {
                socket,
                dont_fragment: false,
            },
        );
        assert_eq!(adopter.count(), 1);
        let adopted = adopter.take(relay).unwrap();
        assert!(maker.take(relay).is_none());
        assert_eq!(maker.count(), 0);
        // The maker's core, having forgotten the port, picks it again: the bind fails and its
        // allocation moves on (relay sockets never share a port).
        let error = udp::bind(addr, 4096, false).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        drop(adopted);
        udp::bind(addr, 4096, false).unwrap();
    }

    #[test]
    fn a_taken_address_is_busy_even_for_a_reuseport_group() {
        let holder = udp::bind("127.0.0.1:0".parse().unwrap(), 4096, true).unwrap();
        let addr = holder.local_addr().unwrap().as_socket().unwrap();
        let error = exclusive_probe(addr, Type::DGRAM).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        drop(holder);
        exclusive_probe(addr, Type::DGRAM).unwrap();
    }
}
