//! The service manager's file-descriptor store, the daemon's side: handing sockets to systemd
//! so that they outlive the process, and taking them back at the next start.
//!
//! Two halves of one protocol:
//! - [`FdStore`] speaks sd_notify(3) over `$NOTIFY_SOCKET`: `FDSTORE=1` with the fd as
//!   `SCM_RIGHTS` (sd_pid_notify_with_fds(3)), `FDSTOREREMOVE=1`, plain state lines such as
//!   `READY=1`, and `BARRIER=1` (sd_notify_barrier(3)).
//! - [`inherited`] is sd_listen_fds_with_names(3): the fds the manager passes back from fd 3
//!   ([`LISTEN_FDS_START`]) on, described by `$LISTEN_PID`, `$LISTEN_FDS` and
//!   `$LISTEN_FDNAMES`.
//!
//! systemd keeps a stored fd only when the unit sets `FileDescriptorStoreMax=` above zero and
//! accepts the sender's messages (`NotifyAccess=`); it drops what exceeds the maximum with a
//! log line of its own, so the daemon cannot tell from here. See systemd's
//! docs/FILE_DESCRIPTOR_STORE.md for the life cycle (a `systemctl restart` keeps the store, a
//! stop followed by a start does not, unless `FileDescriptorStorePreserve=yes`).

use std::ffi::OsStr;
use std::io::{self, IoSlice, Read as _};
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

/// The first fd a service manager passes (`SD_LISTEN_FDS_START` in sd-daemon.h); the others
/// follow without gaps.
pub const LISTEN_FDS_START: RawFd = 3;

/// The name systemd gives an fd whose `$LISTEN_FDNAMES` entry is missing (sd_listen_fds(3)).
pub const UNKNOWN_NAME: &str = "unknown";

/// The longest fd name systemd accepts (`FDNAME_MAX` in systemd's fd-util.h).
pub const NAME_MAX: usize = 255;

/// The environment variables of sd_listen_fds(3), unset once read so that no child process
/// mistakes them for its own. `LISTEN_PIDFDID`, the inode of the pidfd that recent systemd sets
/// next to `LISTEN_PID`, goes with the rest; the pid check alone decides here.
const LISTEN_VARIABLES: [&str; 4] = [
    "LISTEN_PID",
    "LISTEN_PIDFDID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// A connection to the service manager's notification socket (`$NOTIFY_SOCKET`).
#[derive(Debug)]
pub struct FdStore {
    /// Unbound and close-on-exec; every message names `address`, as libsystemd's own
    /// sd_pid_notify_with_fds() does, so a manager that re-creates its socket still hears us.
    socket: UnixDatagram,
    address: UnixAddr,
}

impl FdStore {
    /// The service manager named by `$NOTIFY_SOCKET`, or `None` when the variable is unset (not
    /// started by a service manager, or by one that does not listen).
    ///
    /// # Errors
    /// When the variable names no `AF_UNIX` address ([`FdStore::new`]) or the socket cannot be
    /// created.
    pub fn from_env() -> io::Result<Option<FdStore>> {
        std::env::var_os("NOTIFY_SOCKET")
            .map(|address| FdStore::new(&address))
            .transpose()
    }

    /// The service manager listening on `notify_socket`, written as in `$NOTIFY_SOCKET`: an
    /// absolute path, or `@name` for the abstract socket `name`.
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidInput`] for any other address (systemd also accepts `vsock:`
    /// addresses, for services in virtual machines, which this daemon does not need), and
    /// the error of creating the socket.
    pub fn new(notify_socket: &OsStr) -> io::Result<FdStore> {
        let bytes = notify_socket.as_bytes();
        let address = match bytes {
            [b'@', name @ ..] => UnixAddr::new_abstract(name)?,
            [b'/', ..] => UnixAddr::new(Path::new(notify_socket))?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NOTIFY_SOCKET={} is neither an absolute path nor an abstract socket (@name)",
                        notify_socket.display()
                    ),
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        Ok(FdStore { socket, address })
    }

    /// Stores a duplicate of `fd` under `name` (`FDSTORE=1`, `FDNAME=`). The manager passes it
    /// back at the next start ([`inherited`]) until [`FdStore::remove`] drops the name; names
    /// may repeat.
    ///
    /// `FDPOLL=0` keeps the fd stored whatever happens on it: systemd otherwise closes a stored
    /// fd on `POLLHUP` or `POLLERR`, and a relay socket reports `POLLERR` for a queued ICMP
    /// error (when connected or with `IP_RECVERR`), which ends neither the socket nor the
    /// allocation. The daemon decides what to drop, with [`FdStore::remove`].
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidInput`] for a name systemd would refuse ([`validate_name`]),
    /// and the error of sending (`ECONNREFUSED` when the manager is gone). The socket blocks:
    /// while the manager's queue is full (`net.unix.max_dgram_qlen` datagrams, 512 by
    /// default) this waits for it rather than fail, so call it where a short wait is fine.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        validate_name(name)?;
        self.send(
            &format!("FDSTORE=1\nFDNAME={name}\nFDPOLL=0\n"),
            &[fd.as_raw_fd()],
        )
    }

    /// Closes the manager's duplicates of every fd stored under `name` (`FDSTOREREMOVE=1`).
    /// Needed beside closing our own: a stored TCP connection stays open (no FIN for the
    /// peer) while the manager holds a duplicate.
    ///
    /// # Errors
    /// As [`FdStore::store`].
    pub fn remove(&self, name: &str) -> io::Result<()> {
        validate_name(name)?;
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[])
    }

    /// Sends `state`, newline-separated `VARIABLE=value` lines such as `READY=1`,
    /// `STOPPING=1` or `STATUS=...` (sd_notify(3)).
    ///
    /// # Errors
    /// The error of sending.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.send(state, &[])
    }

    /// Waits until the manager has processed every message sent before (sd_notify_barrier(3)):
    /// sends `BARRIER=1` with one end of a fresh socket pair, which the manager closes after
    /// the messages queued ahead of it. A daemon that stores its fds on the way out calls this
    /// before exiting: the manager may otherwise see the process exit first and ignore what
    /// it sent last.
    ///
    /// # Errors
    /// [`io::ErrorKind::TimedOut`] when the manager has not answered within `timeout` (which
    /// must not be zero), and the errors of sending.
    pub fn barrier(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let (mut ours, theirs) = UnixStream::pair()?;
        ours.set_read_timeout(Some(timeout))?;
        self.send("BARRIER=1\n", &[theirs.as_raw_fd()])?;
        drop(theirs);
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the service manager did not confirm BARRIER=1 within {timeout:?}"),
            )
        };
        loop {
            // Nothing is ever written to the pair: end of file means the manager closed its end.
            match ours.read(&mut [0; 1]) {
                Ok(_) => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                    // A signal cuts a read with a timeout short even under SA_RESTART
                    // (signal(7)): wait out the rest.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timed_out());
                    }
                    ours.set_read_timeout(Some(left))?;
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out());
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One datagram: `text` with `fds` as `SCM_RIGHTS`.
    fn send(&self, text: &str, fds: &[RawFd]) -> io::Result<()> {
        let iov = [IoSlice::new(text.as_bytes())];
        let rights = [ControlMessage::ScmRights(fds)];
        let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        let sent = sendmsg(
            self.socket.as_raw_fd(),
            &iov,
            control,
            MsgFlags::MSG_NOSIGNAL,
            Some(&self.address),
        )?;
        // A datagram goes whole or not at all; anything else is a kernel bug worth hearing of.
        if sent != text.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes to the service manager",
                text.len()
            )));
        }
        Ok(())
    }
}

/// Checks `name` against systemd's rule for fd names (`fdname_is_valid()`): 1 to
/// [`NAME_MAX`] printable ASCII characters, no `:` (it separates the names in
/// `$LISTEN_FDNAMES`). The rule also keeps a name from adding lines to the message.
///
/// # Errors
/// [`io::ErrorKind::InvalidInput`] naming the rule `name` breaks.
pub fn validate_name(name: &str) -> io::Result<()> {
    let problem = if name.is_empty() {
        "is empty"
    } else if name.len() > NAME_MAX {
        "is longer than 255 characters"
    } else if !name
        .bytes()
        .all(|byte| byte.is_ascii_graphic() || byte == b' ')
    {
        "has a character that is not printable ASCII"
    } else if name.contains(':') {
        "contains ':'"
    } else {
        return Ok(());
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("the fd name {name:?} {problem}"),
    ))
}

/// Takes the fds the service manager passed to this process (sd_listen_fds_with_names(3) with
/// `unset_environment`): `$LISTEN_FDS` of them from fd [`LISTEN_FDS_START`] on, named by
/// `$LISTEN_FDNAMES`, when `$LISTEN_PID` is this process. Each becomes close-on-exec, and the
/// `LISTEN_*` variables leave the environment whatever the outcome, as libsystemd does.
///
/// Unlike libsystemd, a `$LISTEN_FDNAMES` with fewer names than fds does not fail the call:
/// the fds without a name are [`UNKNOWN_NAME`], and surplus names are ignored, so that every
/// passed fd still gets an owner who closes it.
///
/// # Safety
/// Call it once, first thing in `main`, before any thread starts:
/// - it unsets environment variables, which is undefined behaviour while another thread reads
///   or writes the environment ([`std::env::remove_var`]);
/// - it takes ownership of fds 3 and up, which is sound only while nothing else in the
///   process owns them: nothing may have closed or claimed them before (another
///   sd_listen_fds() implementation, say). Opening files before the call is fine: the
///   kernel hands out the lowest free numbers, and the passed fds are not free.
///
/// # Errors
/// [`io::ErrorKind::InvalidData`] when the variables do not parse ([`ListenEnv::names`]) or
/// name an fd that is not open; the fds taken until then are closed, those after it left as
/// they are.
pub unsafe fn inherited() -> io::Result<InheritedFds> {
    let listen = ListenEnv::from_env();
    for variable in LISTEN_VARIABLES {
        // SAFETY: the caller guarantees that no other thread touches the environment.
        unsafe { std::env::remove_var(variable) };
    }
    let names = listen.names(std::process::id())?;
    let mut fds = Vec::new();
    for (fd, name) in (LISTEN_FDS_START..).zip(names) {
        // Close-on-exec first: fcntl on a number that is not open fails with EBADF and
        // changes nothing, so the fd is known to be open before anything owns it.
        // SAFETY: fcntl(F_SETFD) reads no memory; any integer is a valid argument.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("LISTEN_FDS passes fd {fd} ({name:?}), which is not usable: {error}"),
            ));
        }
        // SAFETY: the fd is open (above), the service manager passed it to this process for
        // it to own, and the caller guarantees that nothing else in the process owns it.
        fds.push((name, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    Ok(InheritedFds { fds })
}

/// The fds the service manager passed, by name, in the order it passed them.
#[derive(Debug, Default)]
pub struct InheritedFds {
    fds: Vec<(String, OwnedFd)>,
}

impl InheritedFds {
    /// Takes every fd passed under `name`, in the order passed (empty when there is none).
    pub fn take(&mut self, name: &str) -> Vec<OwnedFd> {
        self.fds
            .extract_if(.., |(fd_name, _)| fd_name == name)
            .map(|(_, fd)| fd)
            .collect()
    }

    /// Whether every fd has been taken.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// How many fds are left.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// The names left, in the order passed (with repeats).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fds.iter().map(|(name, _)| name.as_str())
    }

    /// What nobody took, for the caller to log and close (and to [`FdStore::remove`], so that
    /// the manager stops passing fds this version does not know).
    pub fn into_rest(self) -> Vec<(String, OwnedFd)> {
        self.fds
    }
}

/// The values of sd_listen_fds(3)'s environment variables, parsed without touching the
/// process ([`ListenEnv::names`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenEnv {
    /// `$LISTEN_PID`: the process the fds are for.
    pub pid: Option<String>,
    /// `$LISTEN_FDS`: how many fds there are.
    pub fds: Option<String>,
    /// `$LISTEN_FDNAMES`: their names, separated by `:`.
    pub fdnames: Option<String>,
}

impl ListenEnv {
    /// The variables of this process. A value that is not UTF-8 reads as absent for
    /// `LISTEN_FDNAMES` (every fd is then [`UNKNOWN_NAME`]) and fails [`ListenEnv::names`]
    /// for the numbers.
    pub fn from_env() -> ListenEnv {
        let read =
            |variable| std::env::var_os(variable).map(|value| value.to_string_lossy().into_owned());
        ListenEnv {
            pid: read("LISTEN_PID"),
            fds: read("LISTEN_FDS"),
            fdnames: std::env::var("LISTEN_FDNAMES").ok(),
        }
    }

    /// The names of the fds passed to the process `own_pid`, one per fd, fd
    /// [`LISTEN_FDS_START`] first: none when `LISTEN_PID` or `LISTEN_FDS` is unset or
    /// `LISTEN_PID` is another process (the variables were inherited from a parent they were
    /// meant for). Missing names are [`UNKNOWN_NAME`].
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidData`] when `LISTEN_PID` or `LISTEN_FDS` is not a number, or
    /// `LISTEN_FDS` counts past the largest fd number.
    pub fn names(&self, own_pid: u32) -> io::Result<ListenNames> {
        let Some(pid) = &self.pid else {
            return Ok(ListenNames::default());
        };
        if parse_number("LISTEN_PID", pid)? != own_pid {
            return Ok(ListenNames::default());
        }
        let Some(count) = &self.fds else {
            return Ok(ListenNames::default());
        };
        let count = parse_number("LISTEN_FDS", count)?;
        if count > (RawFd::MAX - LISTEN_FDS_START).unsigned_abs() {
            return Err(invalid_data(format!(
                "LISTEN_FDS={count} counts past the largest fd"
            )));
        }
        let given = self.fdnames.as_deref().filter(|names| !names.is_empty());
        let given: Vec<String> = given
            .into_iter()
            .flat_map(|names| names.split(':'))
            .take(count as usize)
            .map(str::to_owned)
            .collect();
        Ok(ListenNames {
            unknown: count as usize - given.len(),
            given: given.into_iter(),
        })
    }
}

/// The names of passed fds in fd order ([`ListenEnv::names`]): the named ones, then
/// [`UNKNOWN_NAME`] for the rest, made one at a time so that a nonsensical `LISTEN_FDS` costs
/// nothing ([`inherited`] stops at the first fd that is not open).
#[derive(Debug, Clone, Default)]
pub struct ListenNames {
    given: std::vec::IntoIter<String>,
    unknown: usize,
}

impl Iterator for ListenNames {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        self.given.next().or_else(|| {
            self.unknown = self.unknown.checked_sub(1)?;
            Some(UNKNOWN_NAME.to_owned())
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let count = self.given.len() + self.unknown;
        (count, Some(count))
    }
}

impl ExactSizeIterator for ListenNames {}

fn parse_number(variable: &str, value: &str) -> io::Result<u32> {
    value
        .parse()
        .map_err(|error| invalid_data(format!("{variable}={value:?} is not a number: {error}")))
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use std::io::IoSliceMut;
    use std::net::UdpSocket;
    use std::os::fd::AsFd as _;
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::SocketAddr;

    use nix::sys::socket::{ControlMessageOwned, recvmsg};
    use nix::sys::stat::fstat;
    use tests_harness::scratch::TempDir;

    use super::*;

    /// A bound stand-in for the manager's socket and an [`FdStore`] talking to it.
    fn manager_and_store(dir: &TempDir) -> (UnixDatagram, FdStore) {
        let path = dir.0.join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let store = FdStore::new(path.as_os_str()).unwrap();
        (manager, store)
    }

    /// One datagram's text and fds, received as the manager does (close-on-exec).
    fn receive(socket: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        let mut buffer = [0; 4096];
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let mut control = nix::cmsg_space!([RawFd; 4]);
        let message = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let mut fds = Vec::new();
        for control in message.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(received) = control {
                // SAFETY: the kernel has just installed these fds in this process for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let length = message.bytes;
        (String::from_utf8(buffer[..length].to_vec()).unwrap(), fds)
    }

    fn inode(fd: BorrowedFd<'_>) -> (u64, u64) {
        let stat = fstat(fd).unwrap();
        (stat.st_dev, stat.st_ino)
    }

    #[test]
    fn store_sends_the_fd_with_its_name_and_no_polling() {
        let dir = TempDir::new("store");
        let (manager, store) = manager_and_store(&dir);
        let relay = UdpSocket::bind("127.0.0.1:0").unwrap();

        store.store("relay-udp", relay.as_fd()).unwrap();

        let (text, fds) = receive(&manager);
        assert_eq!(text, "FDSTORE=1\nFDNAME=relay-udp\nFDPOLL=0\n");
        assert_eq!(fds.len(), 1);
        assert_eq!(
            inode(fds[0].as_fd()),
            inode(relay.as_fd()),
            "the same socket"
        );
        // And usable as that socket: it has the same address.
        let received = UdpSocket::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), relay.local_addr().unwrap());
    }

    #[test]
    fn remove_and_notify_send_text_alone() {
        let dir = TempDir::new("remove");
        let (manager, store) = manager_and_store(&dir);

        store.remove("relay-udp").unwrap();
        store.notify("READY=1\nSTATUS=relaying\n").unwrap();

        let (text, fds) = receive(&manager);
        assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=relay-udp\n");
        assert!(fds.is_empty());
        let (text, fds) = receive(&manager);
        assert_eq!(text, "READY=1\nSTATUS=relaying\n");
        assert!(fds.is_empty());
    }

    #[test]
    fn an_abstract_notify_socket_works_too() {
        let name = format!("fd-store-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&address).unwrap();
        let store = FdStore::new(OsStr::new(&format!("@{name}"))).unwrap();

        store.notify("READY=1\n").unwrap();

        assert_eq!(receive(&manager).0, "READY=1\n");
    }

    #[test]
    fn a_relative_or_vsock_notify_socket_is_refused() {
        for address in ["notify", "", "vsock:2:1234"] {
            let error = FdStore::new(OsStr::new(address)).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{address:?}");
        }
    }

    #[test]
    fn a_gone_manager_is_an_error() {
        let dir = TempDir::new("gone");
        let store = FdStore::new(dir.0.join("nobody").as_os_str()).unwrap();
        assert!(store.notify("READY=1\n").is_err());
    }

    #[test]
    fn barrier_returns_once_the_manager_closes_the_fd() {
        let dir = TempDir::new("barrier");
        let (manager, store) = manager_and_store(&dir);
        let manager = std::thread::spawn(move || {
            let (text, fds) = receive(&manager);
            assert_eq!(text, "BARRIER=1\n");
            assert_eq!(fds.len(), 1);
            drop(fds);
            manager
        });

        store.barrier(Duration::from_secs(10)).unwrap();
        drop(manager.join().unwrap());
    }

    #[test]
    fn barrier_times_out_while_the_manager_holds_the_fd() {
        let dir = TempDir::new("barrier-timeout");
        // Bound but never read: the queued fd stays open.
        let (_manager, store) = manager_and_store(&dir);

        let error = store.barrier(Duration::from_millis(50)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn names_follow_systemds_rule() {
        let longest = "n".repeat(NAME_MAX);
        for name in [
            "relay-udp",
            "tcp 10.0.0.1 3478",
            "a",
            "~!@#$%^&*()_+",
            longest.as_str(),
        ] {
            assert!(validate_name(name).is_ok(), "{name:?}");
        }
        let too_long = "n".repeat(NAME_MAX + 1);
        for name in [
            "",
            too_long.as_str(),
            "listen:udp",
            "two\nlines",
            "FDNAME=x\nFDSTOREREMOVE=1",
            "tab\there",
            "del\u{7f}",
            "é",
        ] {
            let error = validate_name(name).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }

    #[test]
    fn an_invalid_name_sends_nothing() {
        let dir = TempDir::new("invalid");
        let (manager, store) = manager_and_store(&dir);
        manager.set_nonblocking(true).unwrap();
        let relay = UdpSocket::bind("127.0.0.1:0").unwrap();

        assert!(
            store
                .store("relay\nFDSTOREREMOVE=1", relay.as_fd())
                .is_err()
        );
        assert!(store.remove("a:b").is_err());

        let error = manager.recv(&mut [0; 64]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
    }

    fn listen(pid: &str, fds: &str, fdnames: Option<&str>) -> ListenEnv {
        ListenEnv {
            pid: Some(pid.to_owned()),
            fds: Some(fds.to_owned()),
            fdnames: fdnames.map(str::to_owned),
        }
    }

    #[test]
    fn listen_names_are_split_on_colons_in_fd_order() {
        let names: Vec<String> = listen("42", "4", Some("listen-udp:relay:relay:tcp 1"))
            .names(42)
            .unwrap()
            .collect();
        assert_eq!(names, ["listen-udp", "relay", "relay", "tcp 1"]);
    }

    #[test]
    fn listen_names_missing_are_unknown_and_surplus_ignored() {
        assert_eq!(
            listen("42", "2", None)
                .names(42)
                .unwrap()
                .collect::<Vec<_>>(),
            ["unknown", "unknown"]
        );
        assert_eq!(
            listen("42", "2", Some(""))
                .names(42)
                .unwrap()
                .collect::<Vec<_>>(),
            ["unknown", "unknown"]
        );
        assert_eq!(
            listen("42", "3", Some("a"))
                .names(42)
                .unwrap()
                .collect::<Vec<_>>(),
            ["a", "unknown", "unknown"]
        );
        assert_eq!(
            listen("42", "1", Some("a:b"))
                .names(42)
                .unwrap()
                .collect::<Vec<_>>(),
            ["a"]
        );
        // An empty entry is an empty name, as systemd splits it.
        assert_eq!(
            listen("42", "2", Some(":b"))
                .names(42)
                .unwrap()
                .collect::<Vec<_>>(),
            ["", "b"]
        );
    }

    #[test]
    fn listen_fds_for_another_process_or_absent_are_none() {
        assert!(
            listen("41", "2", Some("a:b"))
                .names(42)
                .unwrap()
                .collect::<Vec<_>>()
                .is_empty()
        );
        assert!(
            ListenEnv::default()
                .names(42)
                .unwrap()
                .collect::<Vec<_>>()
                .is_empty()
        );
        let no_count = ListenEnv {
            pid: Some("42".to_owned()),
            ..ListenEnv::default()
        };
        assert!(no_count.names(42).unwrap().collect::<Vec<_>>().is_empty());
        assert!(
            listen("42", "0", None)
                .names(42)
                .unwrap()
                .collect::<Vec<_>>()
                .is_empty()
        );
        // Another process's garbage count is not ours to judge.
        assert!(
            listen("41", "many", None)
                .names(42)
                .unwrap()
                .collect::<Vec<_>>()
                .is_empty()
        );
    }

    #[test]
    fn listen_numbers_that_do_not_parse_are_errors() {
        for env in [
            listen("forty-two", "1", None),
            listen("42", "one", None),
            listen("42", "-1", None),
            listen("42", "4294967296", None),
            listen("42", &(RawFd::MAX as u32).to_string(), None),
        ] {
            let error = env.names(42).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{env:?}");
        }
    }

    #[test]
    fn inherited_fds_are_taken_by_name_and_the_rest_listed() {
        let owned = |fd: &UdpSocket| OwnedFd::from(fd.try_clone().unwrap());
        let sockets: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut inherited = InheritedFds {
            fds: vec![
                ("relay".to_owned(), owned(&sockets[0])),
                ("listen".to_owned(), owned(&sockets[1])),
                ("relay".to_owned(), owned(&sockets[2])),
            ],
        };

        let relays = inherited.take("relay");
        assert_eq!(relays.len(), 2);
        assert_eq!(inode(relays[0].as_fd()), inode(sockets[0].as_fd()));
        assert_eq!(inode(relays[1].as_fd()), inode(sockets[2].as_fd()));
        assert!(inherited.take("relay").is_empty());
        assert!(inherited.take("nothing").is_empty());
        assert_eq!(inherited.len(), 1);
        assert_eq!(inherited.names().collect::<Vec<_>>(), ["listen"]);
        let rest = inherited.into_rest();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].0, "listen");
    }
}
