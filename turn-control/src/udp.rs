//! Batched UDP I/O: `recvmmsg(2)` and `sendmmsg(2)` on non-blocking sockets, so that one
//! system call moves up to [`BATCH`] datagrams. This is the user-space relay's hot path.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use turn_control_core::Icmp;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Receive slot size: a full Ethernet jumbo frame. Longer datagrams are truncated and
/// dropped (TURN over UDP stays below the path MTU, RFC 8656 §2.7).
pub const SLOT: usize = 9216;

/// Opens a non-blocking UDP socket bound to `addr`, IPv6 sockets IPv6-only, with `buffer`
/// bytes of SO_RCVBUF and SO_SNDBUF (the kernel caps these at net.core.rmem_max/wmem_max).
pub fn bind(addr: SocketAddr, buffer: usize, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    set_buffers(&socket, buffer)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Makes `socket` non-blocking with `buffer` bytes of SO_RCVBUF and SO_SNDBUF (best effort:
/// a smaller buffer than asked for is not a reason to fail). Also for a socket passed back
/// from the file-descriptor store, whose flags and sizes the configuration may have changed.
pub fn set_buffers(socket: &Socket, buffer: usize) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    Ok(())
}

/// Sets what DONT-FRAGMENT asks of an allocation's relay socket (RFC 8656 section 7.2):
/// IPv4 datagrams leave with DF set and are never fragmented here (`IP_PMTUDISC_DO`: one
/// larger than the path MTU fails with `EMSGSIZE` and the peer's ICMP reports the MTU);
/// IPv6 datagrams are not fragmented at the source (`IPV6_DONTFRAG`). Without it, the
/// kernel's default stays: DF while the datagram fits the path MTU, fragments beyond.
pub fn set_dont_fragment(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(socket, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    } else {
        set_int_option(
            socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    }
}

/// Undoes [`set_dont_fragment`], for a reserved port's socket bound with it and taken by an
/// Allocate that did not ask for it: IPv4 back to `IP_PMTUDISC_WANT` (the kernel's default
/// unless `net.ipv4.ip_no_pmtu_disc` is set), IPv6 fragmenting at the source again.
pub fn clear_dont_fragment(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(socket, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)
    } else {
        set_int_option(
            socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_WANT,
        )
    }
}

/// Has the kernel queue the errors about `socket`'s datagrams on its error queue
/// (`IP_RECVERR` / `IPV6_RECVERR`), each with the destination of the datagram it is about:
/// ICMP errors from the network and local ones (`EMSGSIZE` for a datagram over the path MTU
/// that may not be fragmented). Read them with [`recv_error`]; RFC 8656 §11.5 relays them to
/// the client. Without it, an unconnected socket never learns of them.
///
/// With it, an ICMP error also becomes the socket's pending error, which fails its next call
/// once whatever that call is about; [`send_batch`] retries, and reading the error queue
/// clears it.
pub fn set_recv_errors(socket: &Socket, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_option(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)
    } else {
        set_int_option(socket, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
    }
}

/// An error the kernel queued about a datagram a socket sent (see [`set_recv_errors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedError {
    /// The destination of the datagram the error is about (not the router that reported
    /// it), with port 0 where the kernel does not know it (a local `EMSGSIZE` on an
    /// unconnected IPv4 socket).
    pub destination: SocketAddr,
    /// The error as an ICMP error of the socket's family.
    pub icmp: Icmp,
}

/// Takes one message off the error queue of `fd` without blocking. `Ok(None)` when it holds
/// no error to relay (another origin, such as transmit timestamps, or a local error other
/// than `EMSGSIZE`); `WouldBlock` when the queue is empty.
pub fn recv_error(fd: BorrowedFd<'_>) -> io::Result<Option<QueuedError>> {
    // SAFETY: sockaddr_storage and msghdr are plain old data; zeroes are valid (the null
    // pointers are replaced or paired with zero lengths before the kernel sees them).
    let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
    // SAFETY: as above.
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    let mut control = Control([0; CONTROL_LEN]);
    hdr.msg_name = (&raw mut name).cast();
    hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    hdr.msg_control = control.0.as_mut_ptr().cast();
    hdr.msg_controllen = CONTROL_LEN as _;
    // No payload buffer: the quoted datagram is not needed (the kernel flags it truncated).
    // SAFETY: the header points at an address and a control buffer of the stated sizes on
    // this frame, which outlive the call; no iovecs.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &raw mut hdr,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // size_t with glibc, socklen_t with musl.
    let control_len: usize = hdr.msg_controllen as _;
    let control = &control.0[..control_len.min(CONTROL_LEN)];
    Ok(from_sockaddr(&name, hdr.msg_namelen)
        .zip(queued_icmp(control))
        .map(|(destination, icmp)| QueuedError { destination, icmp }))
}

/// Receive buffers for one `recvmmsg` call.
pub struct RecvBatch {
    buf: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage]>,
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").finish_non_exhaustive()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            buf: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            addrs: vec![unsafe { mem::zeroed::<libc::sockaddr_storage>() }; BATCH]
                .into_boxed_slice(),
            lens: [0; BATCH],
            truncated: [false; BATCH],
            addr_lens: [0; BATCH],
        }
    }
}

impl RecvBatch {
    /// Receives up to [`BATCH`] datagrams without blocking. Returns how many arrived;
    /// `WouldBlock` when none is queued.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are plain old data; zeroes are valid (null pointers are
        // replaced below before the kernel sees them).
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        let base = self.buf.as_mut_ptr();
        for (i, (iov, hdr)) in iovs.iter_mut().zip(hdrs.iter_mut()).enumerate() {
            // SAFETY: i * SLOT + SLOT <= buf.len() = BATCH * SLOT.
            iov.iov_base = unsafe { base.add(i * SLOT) }.cast();
            iov.iov_len = SLOT;
            hdr.msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
            hdr.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live iovec and address buffer of the stated
        // sizes, all owned by `self` or this frame, which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, hdr) in hdrs.iter().take(n).enumerate() {
            self.lens[i] = (hdr.msg_len as usize).min(SLOT);
            self.truncated[i] = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.addr_lens[i] = hdr.msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    /// Datagram `i` of the last [`recv`](Self::recv): sender and bytes. `None` when it was
    /// truncated or its sender is not an IP address.
    pub fn datagram(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= BATCH || self.truncated[i] {
            return None;
        }
        let from = from_sockaddr(&self.addrs[i], self.addr_lens[i])?;
        let start = i * SLOT;
        Some((from, &self.buf[start..start + self.lens[i]]))
    }
}

/// The outcome of [`send_batch`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendOutcome {
    /// Datagrams the kernel took.
    pub sent: usize,
    /// Datagrams dropped because the socket buffer was full.
    pub dropped: usize,
    /// Datagrams refused with another error (unreachable, wrong family, ...).
    pub failed: usize,
}

/// Sends every `(destination, payload)` from `fd` with as few `sendmmsg` calls as possible.
/// Never blocks: a full socket buffer drops the rest (UDP may lose datagrams; the caller
/// counts them).
pub fn send_batch<'a>(
    fd: BorrowedFd<'_>,
    messages: impl ExactSizeIterator<Item = (SocketAddr, &'a [u8])>,
) -> SendOutcome {
    let mut outcome = SendOutcome::default();
    let mut addrs: Vec<SockAddr> = Vec::with_capacity(messages.len());
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(messages.len());
    for (dst, payload) in messages {
        addrs.push(SockAddr::from(dst));
        iovs.push(libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        });
    }
    let mut hdrs: Vec<libc::mmsghdr> = addrs
        .iter()
        .zip(iovs.iter_mut())
        .map(|(addr, iov)| {
            // SAFETY: mmsghdr is plain old data; zeroes are valid.
            let mut hdr: libc::mmsghdr = unsafe { mem::zeroed() };
            // sendmmsg only reads the address.
            hdr.msg_hdr.msg_name = addr.as_ptr().cast_mut().cast();
            hdr.msg_hdr.msg_namelen = addr.len();
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr
        })
        .collect();
    let mut next = 0;
    // Whether the message at `next` failed once already.
    let mut retried = false;
    while next < hdrs.len() {
        let rest = &mut hdrs[next..];
        let count = rest.len().min(1024) as libc::c_uint;
        // SAFETY: each header points at an address and an iovec in `addrs`/`iovs`, whose
        // iovecs point at payloads borrowed for 'a; none move during the call. The kernel
        // only reads them (and writes msg_len).
        let n =
            unsafe { libc::sendmmsg(fd.as_raw_fd(), rest.as_mut_ptr(), count, libc::MSG_DONTWAIT) };
        if n > 0 {
            outcome.sent += n as usize;
            next += n as usize;
            retried = false;
            continue;
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                outcome.dropped += hdrs.len() - next;
                break;
            }
            _ if error.raw_os_error() == Some(libc::ENOBUFS) => {
                outcome.dropped += hdrs.len() - next;
                break;
            }
            _ if !retried => {
                // Maybe not this message's error: an ICMP error about an earlier datagram
                // (with IP_RECVERR, see `set_recv_errors`) fails the socket's next call once,
                // whatever its destination, and is cleared by doing so. Try once more.
                retried = true;
            }
            _ => {
                // The message failed on its own (e.g. EHOSTUNREACH, EMSGSIZE): skip it.
                tracing::trace!(%error, "UDP send failed");
                outcome.failed += 1;
                next += 1;
                retried = false;
            }
        }
    }
    outcome
}

fn from_sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len as usize >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which fits in
            // sockaddr_storage with compatible alignment.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Room for the control messages of an error-queue message: the `sock_extended_err` and
/// the sockaddr of the ICMP error's sender behind it, with headers and padding.
const CONTROL_LEN: usize = 128;

/// A control buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// Where a control message's data starts, after its header (`CMSG_LEN(0)`).
// SAFETY: CMSG_LEN is arithmetic on its argument.
const CMSG_DATA_OFFSET: usize = unsafe { libc::CMSG_LEN(0) } as usize;

/// Sets an int socket option.
fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid descriptor, and an int option value of the size passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The error in the control messages of an error-queue message (the first `IP_RECVERR` or
/// `IPV6_RECVERR` one), as ICMP. Walks the messages as `CMSG_NXTHDR` does, within `control`
/// (the kernel's `msg_controllen`): nothing outside it is read, whatever the lengths say.
fn queued_icmp(control: &[u8]) -> Option<Icmp> {
    let mut rest = control;
    while rest.len() >= CMSG_DATA_OFFSET {
        // SAFETY: `rest` holds at least a cmsghdr (CMSG_LEN(0) >= its size), plain old data
        // read without alignment.
        let cmsg = unsafe { rest.as_ptr().cast::<libc::cmsghdr>().read_unaligned() };
        // size_t with glibc, socklen_t with musl.
        let len: usize = cmsg.cmsg_len as _;
        let data = rest.get(CMSG_DATA_OFFSET..len)?;
        if let Some(icmp) = extended_error(cmsg.cmsg_level, cmsg.cmsg_type, data) {
            return Some(icmp);
        }
        let data_len = libc::c_uint::try_from(data.len()).ok()?;
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        rest = rest.get(space..)?;
    }
    None
}

/// The `sock_extended_err` of one control message, as ICMP: `None` when the message is no
/// `IP_RECVERR` / `IPV6_RECVERR`, or holds no error to relay.
///
/// An error from the network maps one-to-one when its origin matches the level (ICMPv4 for
/// `IP_RECVERR`, ICMPv6 for `IPV6_RECVERR`: the core reads the numbers by family). A local
/// `EMSGSIZE` (a datagram over the path MTU that must not be fragmented, RFC 8656 §7.2
/// DONT-FRAGMENT) becomes what a router would have said, with the MTU from `ee_info`:
/// ICMPv4 Destination Unreachable / Fragmentation Needed (RFC 1191), ICMPv6 Packet Too Big
/// (RFC 4443 §3.2).
fn extended_error(level: libc::c_int, kind: libc::c_int, data: &[u8]) -> Option<Icmp> {
    let ipv6 = match (level, kind) {
        (libc::IPPROTO_IP, libc::IP_RECVERR) => false,
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR) => true,
        _ => return None,
    };
    if data.len() < mem::size_of::<libc::sock_extended_err>() {
        return None;
    }
    // SAFETY: `data` holds a whole sock_extended_err, plain old data read without alignment.
    let err = unsafe {
        data.as_ptr()
            .cast::<libc::sock_extended_err>()
            .read_unaligned()
    };
    let icmp = |icmp_type, code| Icmp {
        icmp_type,
        code,
        error_data: err.ee_info,
    };
    let too_big = err.ee_errno == libc::EMSGSIZE as u32;
    match (err.ee_origin, ipv6) {
        (libc::SO_EE_ORIGIN_ICMP, false) | (libc::SO_EE_ORIGIN_ICMP6, true) => {
            Some(icmp(err.ee_type, err.ee_code))
        }
        (libc::SO_EE_ORIGIN_LOCAL, false) if too_big => Some(icmp(
            Icmp::V4_DESTINATION_UNREACHABLE,
            Icmp::V4_FRAGMENTATION_NEEDED,
        )),
        (libc::SO_EE_ORIGIN_LOCAL, true) if too_big => Some(icmp(Icmp::V6_PACKET_TOO_BIG, 0)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn sockaddr_round_trip() {
        for a in [
            "192.0.2.1:3478",
            "[2001:db8::1]:65535",
            "[::ffff:1.2.3.4]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let s = SockAddr::from(a);
            // SAFETY: a SockAddr holds a whole sockaddr_storage.
            let storage = unsafe { s.as_ptr().cast::<libc::sockaddr_storage>().read() };
            assert_eq!(from_sockaddr(&storage, s.len()), Some(a));
        }
    }

    #[test]
    fn batch_round_trip() {
        let rx = bind("127.0.0.1:0".parse().unwrap(), 1 << 20, false).unwrap();
        let tx = bind("127.0.0.1:0".parse().unwrap(), 1 << 20, false).unwrap();
        let to = rx.local_addr().unwrap().as_socket().unwrap();
        let from = tx.local_addr().unwrap().as_socket().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; usize::from(i) + 1]).collect();
        let out = send_batch(tx.as_fd(), payloads.iter().map(|p| (to, p.as_slice())));
        assert_eq!(out.sent, 40);
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        while got.len() < 40 {
            match batch.recv(rx.as_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let (src, data) = batch.datagram(i).unwrap();
                        assert_eq!(src, from);
                        got.push(data.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(
            batch.recv(rx.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    /// A control message as the kernel lays it out: header, `data`, padding to the next one.
    fn cmsg(level: libc::c_int, kind: libc::c_int, data: &[u8]) -> Vec<u8> {
        // SAFETY: cmsghdr is plain old data; zeroes are valid.
        let mut header: libc::cmsghdr = unsafe { mem::zeroed() };
        header.cmsg_len = (CMSG_DATA_OFFSET + data.len()) as _;
        header.cmsg_level = level;
        header.cmsg_type = kind;
        let mut out = vec![0u8; CMSG_DATA_OFFSET];
        // SAFETY: `out` has room for a cmsghdr (CMSG_LEN(0) >= its size).
        unsafe {
            out.as_mut_ptr()
                .cast::<libc::cmsghdr>()
                .write_unaligned(header)
        };
        out.extend_from_slice(data);
        // SAFETY: arithmetic.
        let space = unsafe { libc::CMSG_SPACE(data.len() as libc::c_uint) } as usize;
        out.resize(space, 0);
        out
    }

    /// A `sock_extended_err` byte by byte (linux/errqueue.h), then the offender's address
    /// (SO_EE_OFFENDER: the router that sent the error) as a zeroed sockaddr_in.
    fn extended(errno: i32, origin: u8, ee_type: u8, code: u8, info: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(errno as u32).to_ne_bytes());
        v.extend_from_slice(&[origin, ee_type, code, 0]);
        v.extend_from_slice(&info.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&[0; 16]);
        v
    }

    fn icmp(icmp_type: u8, code: u8, error_data: u32) -> Option<Icmp> {
        Some(Icmp {
            icmp_type,
            code,
            error_data,
        })
    }

    const V4: (libc::c_int, libc::c_int) = (libc::IPPROTO_IP, libc::IP_RECVERR);
    const V6: (libc::c_int, libc::c_int) = (libc::IPPROTO_IPV6, libc::IPV6_RECVERR);

    fn parse(level: (libc::c_int, libc::c_int), data: &[u8]) -> Option<Icmp> {
        queued_icmp(&cmsg(level.0, level.1, data))
    }

    #[test]
    fn network_errors_map_one_to_one() {
        let refused = libc::ECONNREFUSED;
        let unreachable = extended(refused, libc::SO_EE_ORIGIN_ICMP, 3, 3, 0);
        assert_eq!(parse(V4, &unreachable), icmp(3, 3, 0));
        let frag = extended(libc::EMSGSIZE, libc::SO_EE_ORIGIN_ICMP, 3, 4, 1400);
        assert_eq!(parse(V4, &frag), icmp(3, 4, 1400));
        let ttl = extended(libc::EHOSTUNREACH, libc::SO_EE_ORIGIN_ICMP, 11, 0, 0);
        assert_eq!(parse(V4, &ttl), icmp(11, 0, 0));
        let v6 = extended(refused, libc::SO_EE_ORIGIN_ICMP6, 1, 4, 0);
        assert_eq!(parse(V6, &v6), icmp(1, 4, 0));
        let too_big = extended(libc::EMSGSIZE, libc::SO_EE_ORIGIN_ICMP6, 2, 0, 1280);
        assert_eq!(parse(V6, &too_big), icmp(2, 0, 1280));
    }

    #[test]
    fn local_emsgsize_is_what_a_router_would_say() {
        let local = extended(libc::EMSGSIZE, libc::SO_EE_ORIGIN_LOCAL, 0, 0, 1500);
        assert_eq!(parse(V4, &local), icmp(3, 4, 1500));
        assert_eq!(parse(V6, &local), icmp(2, 0, 1500));
    }

    #[test]
    fn other_errors_are_not_relayed() {
        for (level, data) in [
            // The origin of the other family.
            (
                V4,
                extended(libc::ECONNREFUSED, libc::SO_EE_ORIGIN_ICMP6, 1, 4, 0),
            ),
            (
                V6,
                extended(libc::ECONNREFUSED, libc::SO_EE_ORIGIN_ICMP, 3, 3, 0),
            ),
            // A local error other than EMSGSIZE, timestamps, no origin.
            (
                V4,
                extended(libc::ENOBUFS, libc::SO_EE_ORIGIN_LOCAL, 0, 0, 0),
            ),
            (
                V4,
                extended(libc::ENOMSG, libc::SO_EE_ORIGIN_TXSTATUS, 0, 0, 0),
            ),
            (V6, extended(0, libc::SO_EE_ORIGIN_NONE, 1, 4, 0)),
            // Not an error message at all.
            (
                (libc::IPPROTO_IP, libc::IP_TTL),
                extended(libc::ECONNREFUSED, libc::SO_EE_ORIGIN_ICMP, 3, 3, 0),
            ),
        ] {
            assert_eq!(parse(level, &data), None, "{level:?} {data:?}");
        }
    }

    #[test]
    fn the_error_may_follow_other_control_messages() {
        let mut control = cmsg(libc::IPPROTO_IP, libc::IP_TTL, &64i32.to_ne_bytes());
        control.extend(cmsg(
            V4.0,
            V4.1,
            &extended(libc::ECONNREFUSED, libc::SO_EE_ORIGIN_ICMP, 3, 3, 0),
        ));
        assert_eq!(queued_icmp(&control), icmp(3, 3, 0));
    }

    #[test]
    fn malformed_control_reads_nothing_outside_itself() {
        let error = extended(libc::ECONNREFUSED, libc::SO_EE_ORIGIN_ICMP, 3, 3, 0);
        let whole = cmsg(V4.0, V4.1, &error);
        assert_eq!(queued_icmp(&whole), icmp(3, 3, 0));
        // Cut anywhere: inside the header, inside the error, inside the offender.
        for cut in 0..CMSG_DATA_OFFSET + 16 {
            assert_eq!(queued_icmp(&whole[..cut]), None, "cut at {cut}");
        }
        // A length beyond the buffer, shorter than the header, or too short for the error.
        for len in [
            whole.len() + 1,
            CMSG_DATA_OFFSET - 1,
            0,
            CMSG_DATA_OFFSET + 15,
        ] {
            let mut bad = whole.clone();
            // SAFETY: `bad` starts with a cmsghdr.
            unsafe {
                let header = bad.as_mut_ptr().cast::<libc::cmsghdr>();
                let mut h = header.read_unaligned();
                h.cmsg_len = len as _;
                header.write_unaligned(h);
            }
            assert_eq!(queued_icmp(&bad), None, "cmsg_len {len}");
        }
        // An empty control message before the error: walked over.
        let mut empty_first = cmsg(libc::IPPROTO_IP, libc::IP_TTL, &[]);
        empty_first.extend(whole);
        assert_eq!(queued_icmp(&empty_first), icmp(3, 3, 0));
    }

    /// An int socket option read back.
    fn option(socket: &Socket, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid descriptor, an int buffer and its size.
        let result = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        assert_eq!(result, 0, "{}", io::Error::last_os_error());
        value
    }

    #[test]
    fn options_read_back() {
        let v4 = bind("127.0.0.1:0".parse().unwrap(), 1 << 16, false).unwrap();
        assert_ne!(
            option(&v4, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
            libc::IP_PMTUDISC_DO
        );
        assert_eq!(option(&v4, libc::IPPROTO_IP, libc::IP_RECVERR), 0);
        set_dont_fragment(&v4, false).unwrap();
        set_recv_errors(&v4, false).unwrap();
        assert_eq!(
            option(&v4, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
            libc::IP_PMTUDISC_DO
        );
        assert_eq!(option(&v4, libc::IPPROTO_IP, libc::IP_RECVERR), 1);

        let v6 = bind("[::1]:0".parse().unwrap(), 1 << 16, false).unwrap();
        assert_eq!(option(&v6, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG), 0);
        set_dont_fragment(&v6, true).unwrap();
        set_recv_errors(&v6, true).unwrap();
        assert_eq!(option(&v6, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG), 1);
        assert_eq!(option(&v6, libc::IPPROTO_IPV6, libc::IPV6_RECVERR), 1);
    }

    #[test]
    fn dont_fragment_clears_back_to_the_default() {
        let v4 = (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER);
        let v6 = (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG);
        for (addr, ipv6, (level, name)) in [("127.0.0.1:0", false, v4), ("[::1]:0", true, v6)] {
            let socket = bind(addr.parse().unwrap(), 1 << 16, false).unwrap();
            let default = option(&socket, level, name);
            set_dont_fragment(&socket, ipv6).unwrap();
            assert_ne!(option(&socket, level, name), default, "{addr}");
            clear_dont_fragment(&socket, ipv6).unwrap();
            assert_eq!(option(&socket, level, name), default, "{addr}");
        }
    }

    /// A bound socket with IP_RECVERR / IPV6_RECVERR, and a port on its loopback address
    /// that nobody listens on (a socket bound there for a moment).
    fn erring(ip: &str) -> (Socket, SocketAddr) {
        let any: SocketAddr = format!("{ip}:0").parse().unwrap();
        let socket = bind(any, 1 << 16, false).unwrap();
        set_recv_errors(&socket, any.is_ipv6()).unwrap();
        let closed = bind(any, 1 << 16, false).unwrap();
        let closed = closed.local_addr().unwrap().as_socket().unwrap();
        (socket, closed)
    }

    /// Waits up to 2 s for `socket` to poll POLLERR (an error queued or pending), which
    /// reads neither.
    fn wait_for_error(socket: &Socket) {
        let mut fd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut fd, 1, 2000) };
        assert!(n == 1 && fd.revents & libc::POLLERR != 0, "no error queued");
    }

    /// The next message of the error queue, waiting up to 2 s for it.
    fn next_error(socket: &Socket) -> Option<QueuedError> {
        wait_for_error(socket);
        recv_error(socket.as_fd()).unwrap()
    }

    #[test]
    fn port_unreachable_reaches_the_error_queue() {
        for (ip, expected) in [("127.0.0.1", icmp(3, 3, 0)), ("[::1]", icmp(1, 4, 0))] {
            let (socket, closed) = erring(ip);
            let out = send_batch(socket.as_fd(), [(closed, &b"anyone?"[..])].into_iter());
            assert_eq!(out.sent, 1);
            let error = next_error(&socket);
            assert_eq!(error.map(|e| e.destination), Some(closed), "{ip}");
            assert_eq!(error.map(|e| e.icmp), expected, "{ip}");
            assert_eq!(
                recv_error(socket.as_fd()).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
        }
    }

    /// A datagram over the path MTU with DONT-FRAGMENT fails locally. Loopback's MTU (65536)
    /// is above any UDP datagram, so the socket's own IPV6_MTU (unprivileged) lowers it.
    #[test]
    fn a_datagram_over_the_mtu_is_too_big_locally() {
        let (socket, peer) = erring("[::1]");
        set_dont_fragment(&socket, true).unwrap();
        let mtu: libc::c_int = 1280;
        set_int_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_MTU, mtu).unwrap();
        let big = vec![0u8; 1400];
        let out = send_batch(socket.as_fd(), [(peer, big.as_slice())].into_iter());
        assert_eq!((out.sent, out.failed), (0, 1));
        let error = next_error(&socket).unwrap();
        assert_eq!(error.destination, peer);
        assert_eq!(error.icmp, icmp(2, 0, mtu as u32).unwrap());
    }

    /// With IP_RECVERR, the ICMP error about one datagram fails the socket's next send once,
    /// whatever its destination: the datagram to a live peer still goes out.
    #[test]
    fn a_pending_icmp_error_does_not_cost_the_next_datagram() {
        let (socket, closed) = erring("127.0.0.1");
        let live = bind("127.0.0.1:0".parse().unwrap(), 1 << 16, false).unwrap();
        let to = live.local_addr().unwrap().as_socket().unwrap();
        send_batch(socket.as_fd(), [(closed, &b"anyone?"[..])].into_iter());
        wait_for_error(&socket);
        let out = send_batch(socket.as_fd(), [(to, &b"hello"[..])].into_iter());
        assert_eq!((out.sent, out.failed), (1, 0));
        let mut batch = RecvBatch::default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match batch.recv(live.as_fd()) {
                Ok(n) => {
                    assert_eq!(n, 1);
                    assert_eq!(batch.datagram(0).map(|(_, d)| d), Some(&b"hello"[..]));
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "nothing arrived");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
