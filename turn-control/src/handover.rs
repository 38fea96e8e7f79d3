//! Sockets that outlive the process (`--state-dir` under a service manager with a
//! file-descriptor store: systemd's `FileDescriptorStoreMax=`, see sd_notify(3) FDSTORE=1).
//!
//! Every listener socket, relay socket and plain TCP client connection goes into the store
//! when it is bound (accepted) and leaves it when it closes, so the store always holds what the process holds: after a
//! SIGTERM, and after a crash just as well, the service manager passes them to the next
//! process (`LISTEN_FDS`), which reads them again. No port is free for a moment, so no other
//! socket takes it, and a datagram that arrives meanwhile waits in the socket's queue instead
//! of meeting a closed port (the store asks the manager not to poll them: FDPOLL=0).
//!
//! Names: `listener-udp-<thread>` and `listener-tcp-<thread>` (one per listener address,
//! told apart by their bound address), `relay-v4-<port>` and `relay-v6-<port>` (one relay
//! address per family, so the port names the socket), `tcp-<listener>-<client>` for plain
//! TURN-over-TCP connections ([`connection_name`]; a TLS session's keys cannot
//! be handed to another process, so TLS connections end with it). systemd allows neither ':' nor more
//! than 255 characters in a name, which rules out addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::sync::Arc;

use daemon::fd_store::{FdStore, InheritedFds};
use socket2::Socket;
use turn_control_core::Family;

/// A listener's transport, as named in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// A UDP listener.
    Udp,
    /// A TCP listener (TURN over TCP and TLS).
    Tcp,
}

/// The store name of thread `thread`'s listeners of `kind`.
pub fn listener_name(kind: ListenerKind, thread: usize) -> String {
    match kind {
        ListenerKind::Udp => format!("listener-udp-{thread}"),
        ListenerKind::Tcp => format!("listener-tcp-{thread}"),
    }
}

/// The store name of the relay socket on `port` of `family`.
pub fn relay_name(family: Family, port: u16) -> String {
    match family {
        Family::V4 => format!("relay-v4-{port}"),
        Family::V6 => format!("relay-v6-{port}"),
    }
}

/// The store name of the TCP connection from `client` to the listener `local`: unique among
/// the open connections, without the ':' that the store does not allow.
pub fn connection_name(local: SocketAddr, client: SocketAddr) -> String {
    let plain = |addr: SocketAddr| format!("{}-{}", addr.ip(), addr.port()).replace(':', "_");
    format!("tcp-{}-{}", plain(local), plain(client))
}

/// The relay socket a store name names, if it names one.
fn parse_relay_name(name: &str) -> Option<(Family, u16)> {
    let (family, port) = if let Some(port) = name.strip_prefix("relay-v4-") {
        (Family::V4, port)
    } else {
        (Family::V6, name.strip_prefix("relay-v6-")?)
    };
    Some((family, port.parse().ok()?))
}

/// The service manager's file-descriptor store, when sockets are to outlive the process.
#[derive(Debug, Default)]
pub struct SocketStore {
    store: Option<Arc<FdStore>>,
}

impl SocketStore {
    /// The store of `$NOTIFY_SOCKET`, or none (sockets then close with the process, and the
    /// next one binds their ports again).
    pub fn new(store: Option<Arc<FdStore>>) -> Self {
        Self { store }
    }

    /// Whether there is a store.
    pub fn is_some(&self) -> bool {
        self.store.is_some()
    }

    /// Puts `socket` into the store under `name`. A failure costs only the socket's survival
    /// of a restart: logged, not fatal.
    pub fn keep(&self, name: &str, socket: &Socket) {
        if let Some(store) = &self.store
            && let Err(error) = store.store(name, socket.as_fd())
        {
            tracing::warn!(name, %error, "cannot put a socket into the file-descriptor store");
        }
    }

    /// Takes every socket named `name` out of the store.
    pub fn forget(&self, name: &str) {
        if let Some(store) = &self.store
            && let Err(error) = store.remove(name)
        {
            tracing::warn!(name, %error, "cannot take a socket out of the file-descriptor store");
        }
    }
}

/// The sockets the previous process left in the store, sorted by use.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Listener sockets by store name, with their bound addresses.
    listeners: HashMap<String, Vec<(SocketAddr, Socket)>>,
    /// Relay sockets by family and port.
    relays: HashMap<(Family, u16), Socket>,
    /// Plain TCP client connections by store name ([`connection_name`]).
    connections: HashMap<String, Socket>,
}

impl Inherited {
    /// Sorts the fds passed at start; fds of a name this version does not know are closed and
    /// taken out of the store.
    pub fn new(fds: InheritedFds, store: &SocketStore) -> Self {
        let mut this = Self::default();
        for (name, fd) in fds.into_rest() {
            let socket = Socket::from(fd);
            if let Some(key) = parse_relay_name(&name) {
                this.relays.insert(key, socket);
            } else if name.starts_with("tcp-") {
                this.connections.insert(name, socket);
            } else if name.starts_with("listener-")
                && let Ok(Some(addr)) = socket.local_addr().map(|a| a.as_socket())
            {
                this.listeners.entry(name).or_default().push((addr, socket));
            } else {
                tracing::info!(
                    name,
                    "closing an inherited socket this version does not use"
                );
                store.forget(&name);
            }
        }
        this
    }

    /// How many sockets were passed.
    pub fn len(&self) -> usize {
        self.relays.len()
            + self.connections.len()
            + self.listeners.values().map(Vec::len).sum::<usize>()
    }

    /// The listener of `kind` of `thread` bound to `addr`, if the previous process had it.
    pub fn take_listener(
        &mut self,
        kind: ListenerKind,
        thread: usize,
        addr: SocketAddr,
    ) -> Option<Socket> {
        let sockets = self.listeners.get_mut(&listener_name(kind, thread))?;
        let index = sockets.iter().position(|(bound, _)| *bound == addr)?;
        Some(sockets.swap_remove(index).1)
    }

    /// Whether any listener for `addr` was passed (then its address is ours, not busy).
    pub fn has_listener(&self, addr: SocketAddr) -> bool {
        self.listeners
            .values()
            .any(|sockets| sockets.iter().any(|(bound, _)| *bound == addr))
    }

    /// The relay sockets of `relays` (relayed addresses of the allocations a thread restores)
    /// that the previous process left, by family and port.
    pub fn take_relays(
        &mut self,
        relays: impl Iterator<Item = SocketAddr>,
    ) -> HashMap<(Family, u16), Socket> {
        relays
            .filter_map(|relay| {
                let key = (Family::of(relay.ip()), relay.port());
                Some((key, self.relays.remove(&key)?))
            })
            .collect()
    }

    /// The TCP connections of `connections` (listener and client of the TCP allocations a
    /// thread restores) that the previous process left, by listener and client.
    pub fn take_connections(
        &mut self,
        connections: impl Iterator<Item = (SocketAddr, SocketAddr)>,
    ) -> HashMap<(SocketAddr, SocketAddr), Socket> {
        connections
            .filter_map(|(local, client)| {
                let name = connection_name(local, client);
                Some(((local, client), self.connections.remove(&name)?))
            })
            .collect()
    }

    /// Closes what nobody took (listeners no longer configured, relay sockets of allocations
    /// no journal holds) and takes them out of the store.
    pub fn close_rest(self, store: &SocketStore) {
        let mut closed = 0;
        for (name, sockets) in self.listeners {
            if !sockets.is_empty() {
                tracing::info!(
                    name,
                    count = sockets.len(),
                    "closing inherited listener sockets no longer configured"
                );
                closed += sockets.len();
            }
        }
        for name in self.connections.into_keys() {
            tracing::info!(
                name,
                "closing an inherited TCP connection whose allocation is not saved"
            );
            store.forget(&name);
            closed += 1;
        }
        for (family, port) in self.relays.into_keys() {
            tracing::info!(
                ?family,
                port,
                "closing an inherited relay socket outside the port range"
            );
            store.forget(&relay_name(family, port));
            closed += 1;
        }
        if closed > 0 {
            tracing::info!(
                sockets = closed,
                "inherited sockets closed: not of this configuration"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_store_and_read_back() {
        for (family, port) in [(Family::V4, 49152), (Family::V6, 65535)] {
            let name = relay_name(family, port);
            daemon::fd_store::validate_name(&name).unwrap();
            assert_eq!(parse_relay_name(&name), Some((family, port)));
        }
        daemon::fd_store::validate_name(&listener_name(ListenerKind::Udp, 255)).unwrap();
        daemon::fd_store::validate_name(&listener_name(ListenerKind::Tcp, 0)).unwrap();
        assert_eq!(parse_relay_name("relay-v4-x"), None);
        assert_eq!(parse_relay_name("listener-udp-0"), None);
    }
}
