//! Batched UDP I/O: `recvmmsg(2)` and `sendmmsg(2)` on non-blocking sockets, so that one
//! system call moves up to [`BATCH`] datagrams. This is the user-space relay's hot path.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

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
    socket.set_nonblocking(true)?;
    // Best effort: a smaller buffer than asked for is not a reason to fail.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Sets what DONT-FRAGMENT asks of an allocation's relay socket (RFC 8656 section 7.2):
/// IPv4 datagrams leave with DF set and are never fragmented here (`IP_PMTUDISC_DO`: one
/// larger than the path MTU fails with `EMSGSIZE` and the peer's ICMP reports the MTU);
/// IPv6 datagrams are not fragmented at the source (`IPV6_DONTFRAG`). Without it, the
/// kernel's default stays: DF while the datagram fits the path MTU, fragments beyond.
pub fn set_dont_fragment(socket: &Socket, ipv6: bool) -> io::Result<()> {
    let (level, name, value) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
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
            _ => {
                // The first message failed on its own (e.g. EHOSTUNREACH): skip it.
                tracing::trace!(%error, "UDP send failed");
                outcome.failed += 1;
                next += 1;
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
}
