//! A stand-in for systemd's side of sd_notify(3) and of the file-descriptor store, for tests
//! of a daemon that must survive its own restarts: no systemd runs as PID 1 on the test
//! machines, and a test could not drive it if one did.
//!
//! [`ServiceManager`] listens on a notification socket, keeps the fds sent with `FDSTORE=1`
//! under their `FDNAME=`, drops them on `FDSTOREREMOVE=1`, answers `BARRIER=1` and records
//! every other line (`READY=1`, ...). [`ServiceManager::command`] starts the next instance
//! with the stored fds from fd 3 on and `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` set,
//! as systemd does at a restart; the fds stay stored, so the same manager restarts a daemon
//! again and again.
//!
//! Where it follows systemd (src/core/service.c, `service_notify_message()`): a missing or
//! invalid `FDNAME=` stores under "stored"; a socket already stored is not stored twice; fds
//! sent without `FDSTORE=1` are closed; a stored fd without `FDPOLL=0` is dropped once it
//! reports `POLLHUP` or `POLLERR` (checked whenever the store is read, where systemd watches
//! continuously). Where it does not: any sender is heard (no `NotifyAccess=`), there is no
//! `FileDescriptorStoreMax=`, and nothing happens on `READY=1` but its recording.

use std::ffi::OsStr;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::bail;
use nix::errno::Errno;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use nix::sys::stat::fstat;

/// The first fd a service manager passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The name of an fd stored without a (valid) `FDNAME=`, as systemd names it.
pub const DEFAULT_NAME: &str = "stored";

/// The longest notification systemd reads (`NOTIFY_BUFFER_MAX`, `PIPE_BUF`); longer ones are
/// ignored.
const NOTIFY_BUFFER_MAX: usize = 4096;

/// The most fds one datagram carries (the kernel's `SCM_MAX_FD`), so that room for this many
/// never truncates the fds of a message.
const SCM_MAX_FD: usize = 253;

/// A service manager for the daemons a test starts ([module docs](self)).
#[derive(Debug)]
pub struct ServiceManager {
    notify_socket: PathBuf,
    shared: Arc<Shared>,
    /// The receiving socket, shut down on drop to end `receiver`.
    socket: UnixDatagram,
    receiver: Option<JoinHandle<()>>,
}

impl ServiceManager {
    /// Listens on a new notification socket `notify` in `dir`.
    ///
    /// # Errors
    /// When the socket cannot be bound (the path exists, or is longer than `sun_path`).
    pub fn new(dir: &Path) -> io::Result<ServiceManager> {
        let notify_socket = dir.join("notify");
        let socket = UnixDatagram::bind(&notify_socket)?;
        let shared = Arc::new(Shared::default());
        let receiver = {
            let (socket, shared) = (socket.try_clone()?, shared.clone());
            std::thread::Builder::new()
                .name("service-manager".to_owned())
                .spawn(move || receive_messages(&socket, &shared))?
        };
        Ok(ServiceManager {
            notify_socket,
            shared,
            socket,
            receiver: Some(receiver),
        })
    }

    /// The path to put in a daemon's `NOTIFY_SOCKET` ([`ServiceManager::command`] does).
    pub fn notify_socket(&self) -> &Path {
        &self.notify_socket
    }

    /// The names of the stored fds, sorted, one per fd.
    pub fn names(&self) -> Vec<String> {
        let mut state = self.shared.state();
        state.drop_hung_up();
        let mut names: Vec<String> = state.stored.iter().map(|fd| fd.name.clone()).collect();
        names.sort();
        names
    }

    /// How many fds are stored.
    pub fn count(&self) -> usize {
        let mut state = self.shared.state();
        state.drop_hung_up();
        state.stored.len()
    }

    /// Duplicates of the fds stored under `name`, in the order stored, to look at (the
    /// address of a stored socket, say). They stay stored.
    ///
    /// # Errors
    /// When an fd cannot be duplicated.
    pub fn fds(&self, name: &str) -> io::Result<Vec<OwnedFd>> {
        let mut state = self.shared.state();
        state.drop_hung_up();
        state
            .stored
            .iter()
            .filter(|stored| stored.name == name)
            .map(|stored| stored.fd.try_clone())
            .collect()
    }

    /// Every line received so far, in order, the fd-store ones included.
    pub fn lines(&self) -> Vec<String> {
        self.shared.state().lines.clone()
    }

    /// Waits until a line equal to `line` (`READY=1`, say) arrives, and consumes it: the next
    /// call waits for the next one, so that a test sees each instance of a restarted daemon
    /// report in.
    ///
    /// # Errors
    /// When none arrives within `timeout`, with every line received so far.
    pub fn wait_for(&self, line: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state();
        loop {
            if let Some(index) = state
                .unclaimed
                .iter()
                .position(|unclaimed| unclaimed == line)
            {
                state.unclaimed.remove(index);
                return Ok(());
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                bail!(
                    "no {line:?} from the service within {timeout:?}; received: {:?}",
                    state.lines
                );
            };
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// A command that runs `program` as systemd starts a service with a file-descriptor
    /// store: `NOTIFY_SOCKET` names this manager and, when fds are stored, they are fds 3 and
    /// up in the order stored, described by `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`.
    /// Add arguments, environment and stdio, then spawn it; the fds are those stored when
    /// this is called.
    ///
    /// `LISTEN_PID` must be the pid of the process that execs `program`, which is only known
    /// after the fork; systemd sets it in the child. The code between fork and exec may only
    /// make async-signal-safe calls, which rules out setting the environment there, so
    /// `program` runs through `/bin/sh -c 'export LISTEN_PID=$$ && exec "$0" "$@"'`: the shell
    /// writes its own pid, and `exec` keeps that pid for `program`. The fds are moved into
    /// place before the shell runs (`pre_exec`, with `fcntl` and `dup2` alone) without
    /// close-on-exec, so they survive both execs.
    ///
    /// # Errors
    /// When a stored fd cannot be duplicated.
    pub fn command(&self, program: impl AsRef<OsStr>) -> io::Result<Command> {
        let (names, fds): (Vec<String>, Vec<OwnedFd>) = {
            let mut state = self.shared.state();
            state.drop_hung_up();
            state
                .stored
                .iter()
                .map(|stored| Ok((stored.name.clone(), stored.fd.try_clone()?)))
                .collect::<io::Result<Vec<_>>>()?
                .into_iter()
                .unzip()
        };
        let mut command = Command::new("/bin/sh");
        command.env("NOTIFY_SOCKET", &self.notify_socket);
        // Not the test's own, if it has any.
        for variable in [
            "LISTEN_PID",
            "LISTEN_PIDFDID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
        ] {
            command.env_remove(variable);
        }
        if fds.is_empty() {
            // systemd sets none of the variables when it passes no fds.
            command.args(["-c", r#"exec "$0" "$@""#]).arg(program);
            return Ok(command);
        }
        command
            .args(["-c", r#"export LISTEN_PID=$$ && exec "$0" "$@""#])
            .arg(program)
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let first_free = LISTEN_FDS_START
            + RawFd::try_from(fds.len()).map_err(|_| io::Error::other("too many stored fds"))?;
        // Allocated here: the child may not allocate.
        let mut moved: Vec<RawFd> = vec![-1; fds.len()];
        let place_fds = move || {
            // Two steps, because a stored fd's number may be one of the targets 3..first_free:
            // first every fd above the targets (close-on-exec, so these copies vanish at
            // exec), then each onto its target.
            for (fd, moved) in fds.iter().zip(moved.iter_mut()) {
                // SAFETY: fcntl is async-signal-safe and reads no memory; `fd` is open (the
                // closure owns it).
                *moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, first_free) };
                if *moved == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (target, &moved) in (LISTEN_FDS_START..).zip(moved.iter()) {
                // SAFETY: dup2 is async-signal-safe and reads no memory. The target is left
                // without FD_CLOEXEC, as dup2 always leaves it. Whatever the target held is
                // closed: fds of the test, which the child must not see anyway.
                if unsafe { libc::dup2(moved, target) } == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: `place_fds` makes async-signal-safe calls only (fcntl, dup2) and neither
        // allocates nor takes locks, as code between fork and exec must not.
        unsafe { command.pre_exec(place_fds) };
        Ok(command)
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.shared.state().stopping = true;
        // Wakes the receiver from recvmsg, which then returns an empty message.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
        let _ = std::fs::remove_file(&self.notify_socket);
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled after every message.
    changed: Condvar,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct State {
    /// In the order stored.
    stored: Vec<StoredFd>,
    /// Every line received.
    lines: Vec<String>,
    /// The lines [`ServiceManager::wait_for`] has not consumed yet.
    unclaimed: Vec<String>,
    stopping: bool,
}

#[derive(Debug)]
struct StoredFd {
    name: String,
    fd: OwnedFd,
    /// Stored without `FDPOLL=0`: dropped once it reports `POLLHUP` or `POLLERR`.
    poll: bool,
}

impl State {
    /// Applies one notification: removals first, then stores, as systemd orders them.
    fn apply(&mut self, text: &str, fds: Vec<OwnedFd>) {
        let lines: Vec<&str> = text.split('\n').filter(|line| !line.is_empty()).collect();
        let has = |wanted: &str| lines.contains(&wanted);
        let name = lines.iter().find_map(|line| line.strip_prefix("FDNAME="));
        let valid_name = name.filter(|name| is_valid_name(name));
        if has("FDSTOREREMOVE=1") {
            match valid_name {
                Some(name) => self.stored.retain(|stored| stored.name != name),
                None => eprintln!(
                    "service manager: FDSTOREREMOVE=1 without a valid FDNAME= ({name:?}), ignored"
                ),
            }
        }
        if has("FDSTORE=1") {
            if name.is_some() && valid_name.is_none() {
                eprintln!("service manager: invalid FDNAME= {name:?}, storing as {DEFAULT_NAME:?}");
            }
            let name = valid_name.unwrap_or(DEFAULT_NAME);
            let poll = !has("FDPOLL=0");
            for fd in fds {
                if !self.holds(&fd) {
                    self.stored.push(StoredFd {
                        name: name.to_owned(),
                        fd,
                        poll,
                    });
                }
            }
        } else if !fds.is_empty() && !has("BARRIER=1") {
            eprintln!(
                "service manager: {} fds without FDSTORE=1, closed",
                fds.len()
            );
        }
        // The fds not stored close here; for BARRIER=1 that is the answer the sender waits for,
        // given after every message sent before it.
        let lines: Vec<String> = lines.into_iter().map(str::to_owned).collect();
        self.lines.extend(lines.iter().cloned());
        self.unclaimed.extend(lines);
    }

    /// Whether the socket `fd` is already stored (under any name). systemd compares open
    /// file descriptions; for a socket the inode says the same, as a socket cannot be opened
    /// twice. Other files count as new: equal inodes may be different opens of one file.
    fn holds(&self, fd: &OwnedFd) -> bool {
        let Some(new) = socket_inode(fd) else {
            return false;
        };
        self.stored
            .iter()
            .any(|stored| socket_inode(&stored.fd) == Some(new))
    }

    /// Drops what systemd would have dropped on `POLLHUP` or `POLLERR`.
    fn drop_hung_up(&mut self) {
        self.stored
            .retain(|stored| !stored.poll || !hung_up(&stored.fd));
    }
}

/// systemd's rule for fd names (`fdname_is_valid()`): 1 to 255 printable ASCII characters
/// without ':'.
fn is_valid_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|byte| (byte.is_ascii_graphic() || byte == b' ') && byte != b':')
}

fn socket_inode(fd: &OwnedFd) -> Option<(u64, u64)> {
    let stat = fstat(fd.as_fd()).ok()?;
    (stat.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some((stat.st_dev, stat.st_ino))
}

fn hung_up(fd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and a zero timeout: poll only reports.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// The receiver thread: applies each message until [`ServiceManager`] is dropped.
fn receive_messages(socket: &UnixDatagram, shared: &Shared) {
    let mut buffer = vec![0; NOTIFY_BUFFER_MAX];
    let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    loop {
        let message = receive(socket, &mut buffer, &mut control);
        let mut state = shared.state();
        if state.stopping {
            return;
        }
        match message {
            Ok(Some((text, fds))) => state.apply(&text, fds),
            Ok(None) | Err(Errno::EINTR) => {}
            Err(error) => {
                eprintln!("service manager: receiving stopped: {error}");
                return;
            }
        }
        drop(state);
        shared.changed.notify_all();
    }
}

/// One message, its fds close-on-exec (the test spawns other children meanwhile); `None` for
/// one systemd would ignore (too long, or not UTF-8), whose fds are closed.
fn receive(
    socket: &UnixDatagram,
    buffer: &mut [u8],
    control: &mut [u8],
) -> nix::Result<Option<(String, Vec<OwnedFd>)>> {
    let mut iov = [IoSliceMut::new(buffer)];
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for control in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = control {
            // SAFETY: the kernel has just installed these fds in this process, for us.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let (length, truncated) = (message.bytes, message.flags.contains(MsgFlags::MSG_TRUNC));
    if truncated {
        eprintln!("service manager: a notification longer than {NOTIFY_BUFFER_MAX} bytes, ignored");
        return Ok(None);
    }
    let Ok(text) = std::str::from_utf8(&buffer[..length]) else {
        eprintln!("service manager: a notification that is not UTF-8, ignored");
        return Ok(None);
    };
    Ok(Some((text.to_owned(), fds)))
}

#[cfg(test)]
mod tests {
    use std::io::{IoSlice, Read as _, Write as _};
    use std::net::UdpSocket;
    use std::os::fd::BorrowedFd;
    use std::os::unix::net::UnixStream;
    use std::process::Stdio;

    use daemon::fd_store::FdStore;
    use nix::sys::socket::{ControlMessage, UnixAddr, sendmsg};

    use super::*;
    use crate::scratch::TempDir;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn manager(dir: &TempDir) -> (ServiceManager, FdStore) {
        let manager = ServiceManager::new(&dir.0).unwrap();
        let store = FdStore::new(manager.notify_socket().as_os_str()).unwrap();
        (manager, store)
    }

    /// Sends `text` with `fds` as a daemon that does not use [`FdStore`] might.
    fn send_raw(manager: &ServiceManager, text: &str, fds: &[BorrowedFd<'_>]) {
        let socket = UnixDatagram::unbound().unwrap();
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let address = UnixAddr::new(manager.notify_socket()).unwrap();
        sendmsg(
            socket.as_raw_fd(),
            &[IoSlice::new(text.as_bytes())],
            control,
            MsgFlags::empty(),
            Some(&address),
        )
        .unwrap();
    }

    /// Waits until everything sent before has been applied.
    fn settle(store: &FdStore) {
        store.barrier(TIMEOUT).unwrap();
    }

    #[test]
    fn stores_by_name_with_repeats_and_removes_every_fd_of_a_name() {
        let dir = TempDir::new("names");
        let (manager, store) = manager(&dir);
        let sockets: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();

        store.store("relay", sockets[0].as_fd()).unwrap();
        store.store("listen", sockets[1].as_fd()).unwrap();
        store.store("relay", sockets[2].as_fd()).unwrap();
        settle(&store);
        assert_eq!(manager.names(), ["listen", "relay", "relay"]);
        assert_eq!(manager.count(), 3);
        let relays = manager.fds("relay").unwrap();
        let relay = UdpSocket::from(relays.into_iter().next().unwrap());
        assert_eq!(
            relay.local_addr().unwrap(),
            sockets[0].local_addr().unwrap()
        );

        store.remove("relay").unwrap();
        settle(&store);
        assert_eq!(manager.names(), ["listen"]);
    }

    #[test]
    fn a_socket_stored_twice_is_kept_once() {
        let dir = TempDir::new("twice");
        let (manager, store) = manager(&dir);
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let duplicate = socket.try_clone().unwrap();

        store.store("relay", socket.as_fd()).unwrap();
        store.store("relay", duplicate.as_fd()).unwrap();
        store.store("other", socket.as_fd()).unwrap();
        settle(&store);

        assert_eq!(manager.names(), ["relay"]);
    }

    #[test]
    fn an_fd_without_a_valid_name_is_stored_as_stored() {
        let dir = TempDir::new("default-name");
        let (manager, store) = manager(&dir);
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();

        send_raw(&manager, "FDSTORE=1\nFDPOLL=0\n", &[socket.as_fd()]);
        send_raw(&manager, "FDSTORE=1\nFDNAME=a:b\n", &[other.as_fd()]);
        settle(&store);

        assert_eq!(manager.names(), [DEFAULT_NAME, DEFAULT_NAME]);
    }

    #[test]
    fn fds_without_fdstore_are_closed() {
        let dir = TempDir::new("no-fdstore");
        let (manager, store) = manager(&dir);
        let (ours, theirs) = UnixStream::pair().unwrap();

        send_raw(&manager, "FDNAME=x\n", &[theirs.as_fd()]);
        drop(theirs);
        settle(&store);

        assert_eq!(manager.count(), 0);
        // The manager's copy was the last: our end sees the hang-up.
        assert_eq!((&ours).read(&mut [0; 1]).unwrap(), 0);
    }

    #[test]
    fn an_fd_that_hangs_up_is_dropped_unless_stored_with_fdpoll_0() {
        let dir = TempDir::new("fdpoll");
        let (manager, store) = manager(&dir);
        let (polled, polled_peer) = UnixStream::pair().unwrap();
        let (kept, kept_peer) = UnixStream::pair().unwrap();

        send_raw(&manager, "FDSTORE=1\nFDNAME=polled\n", &[polled.as_fd()]);
        store.store("kept", kept.as_fd()).unwrap();
        settle(&store);
        assert_eq!(manager.names(), ["kept", "polled"]);

        drop((polled, polled_peer, kept, kept_peer));
        assert_eq!(manager.names(), ["kept"]);
    }

    #[test]
    fn wait_for_consumes_each_line_once() {
        let dir = TempDir::new("ready");
        let (manager, store) = manager(&dir);

        store.notify("READY=1\nSTATUS=up\n").unwrap();
        manager.wait_for("READY=1", TIMEOUT).unwrap();
        assert!(
            manager
                .wait_for("READY=1", Duration::from_millis(50))
                .is_err()
        );

        store.notify("READY=1\n").unwrap();
        manager.wait_for("READY=1", TIMEOUT).unwrap();
        assert_eq!(manager.lines(), ["READY=1", "STATUS=up", "READY=1"]);
    }

    #[test]
    fn the_child_gets_the_stored_fds_at_3_with_names_and_its_own_pid() {
        let dir = TempDir::new("child");
        let (manager, store) = manager(&dir);
        let (first_reader, mut first_writer) = std::io::pipe().unwrap();
        let (second_reader, mut second_writer) = std::io::pipe().unwrap();
        store.store("first", first_reader.as_fd()).unwrap();
        store.store("second", second_reader.as_fd()).unwrap();
        settle(&store);
        // The test's copies close: only the manager's keep the pipes readable.
        drop((first_reader, second_reader));
        first_writer.write_all(b"one\n").unwrap();
        second_writer.write_all(b"two\n").unwrap();
        drop((first_writer, second_writer));

        for run in 0..2 {
            let output = manager
                .command("/bin/sh")
                .unwrap()
                .args([
                    "-c",
                    r#"echo "$LISTEN_FDS $LISTEN_FDNAMES $NOTIFY_SOCKET"
                       [ "$LISTEN_PID" = "$$" ] && echo "LISTEN_PID is mine"
                       cat <&3; cat <&4"#,
                ])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(output.status.success(), "run {run}: {output:?}");
            let stdout = String::from_utf8(output.stdout).unwrap();
            let expected = format!(
                "2 first:second {}\nLISTEN_PID is mine\n{}",
                manager.notify_socket().display(),
                // The pipes are drained by the first run and hold their writer's EOF after.
                if run == 0 { "one\ntwo\n" } else { "" }
            );
            assert_eq!(stdout, expected, "run {run}");
        }
        // Stored still, for the next restart.
        assert_eq!(manager.names(), ["first", "second"]);
    }

    #[test]
    fn without_stored_fds_the_child_gets_no_listen_variables() {
        let dir = TempDir::new("no-fds");
        let (manager, _store) = manager(&dir);

        let output = manager
            .command("/bin/sh")
            .unwrap()
            .args([
                "-c",
                r#"echo "[${LISTEN_PID-unset}] [${LISTEN_FDS-unset}]""#,
            ])
            .output()
            .unwrap();

        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            "[unset] [unset]\n"
        );
    }

    #[test]
    fn stored_fds_numbered_like_the_targets_still_land_in_order() {
        let dir = TempDir::new("collide");
        let (manager, store) = manager(&dir);
        // Many fds, so that the manager's own duplicates take numbers among 3..3+n.
        let pipes: Vec<_> = (0..24).map(|_| std::io::pipe().unwrap()).collect();
        for (index, (reader, _)) in pipes.iter().enumerate() {
            store
                .store(&format!("pipe{index}"), reader.as_fd())
                .unwrap();
        }
        settle(&store);
        let mut writers = Vec::new();
        for (index, (reader, mut writer)) in pipes.into_iter().enumerate() {
            drop(reader);
            writer.write_all(format!("{index}\n").as_bytes()).unwrap();
            writers.push(writer);
        }
        drop(writers);

        let output = manager
            .command("/bin/sh")
            .unwrap()
            .args([
                "-c",
                // Through /proc: dash redirects single-digit fds only.
                r#"fd=3; while [ $fd -lt 27 ]; do cat /proc/self/fd/$fd; fd=$((fd + 1)); done"#,
            ])
            .output()
            .unwrap();

        assert!(output.status.success(), "{output:?}");
        let expected: String = (0..24).map(|index| format!("{index}\n")).collect();
        assert_eq!(String::from_utf8(output.stdout).unwrap(), expected);
    }
}
