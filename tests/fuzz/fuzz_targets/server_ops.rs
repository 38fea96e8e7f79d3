//! Sequences of operations on the TURN core with simulated time: clients allocate, refresh,
//! create permissions, bind channels and send data (authenticated, following 401 and 438
//! answers for the nonce); peers answer; the data plane acknowledges or refuses channel
//! installs; relay binds fail; TCP connections close; time advances.
//!
//! A model of what the daemon holds (bound relay sockets, installed channel bindings) follows
//! the commands. Invariants, after every operation: no panic; no relay bound twice or freed
//! unbound; a binding installed again only to move its expiry; the bindings the core says the
//! data plane should hold (`channel_bindings`) are exactly those installed and not removed,
//! each with the expiry it was last installed with, none past it; each installed binding
//! uses a bound relay; the allocation count matches the bound relay ports; after
//! `handle_timeout(now)` nothing is due at `now`. At the end, after a final long timeout:
//! no allocation, relay socket, installed binding or timer is left, so every InstallChannel
//! was paired with a RemoveChannel.
#![no_main]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tests_fuzz::{
    LISTEN, LISTEN6, PASSWORD, REST_USER, USER, rest_key, sa, server, sign, user_key,
};
use tests_stun::{Answer, Msg, attr, class, method};
use turn_control_core::{
    ChannelBinding, ClientAddr, Command, OffloadError, PeerAddr, RelayAddr, Server, Transmit,
    Transport,
};

#[derive(Debug, Arbitrary)]
enum Op {
    Allocate {
        client: u8,
        lifetime: Option<u16>,
        family: u8,
        rest: bool,
    },
    Refresh {
        client: u8,
        lifetime: Option<u16>,
    },
    CreatePermission {
        client: u8,
        peers: [u8; 2],
    },
    ChannelBind {
        client: u8,
        channel: u16,
        peer: u8,
    },
    Send {
        client: u8,
        peer: u8,
        len: u8,
    },
    ChannelData {
        client: u8,
        channel: u16,
        len: u8,
    },
    FromPeer {
        relay: u8,
        peer: u8,
        len: u8,
    },
    Advance {
        millis: u32,
    },
    Installed {
        index: u8,
        ok: bool,
    },
    BindFailed {
        relay: u8,
    },
    /// The next `count` relay binds fail, as when other sockets hold the ports.
    FailNextBinds {
        count: u8,
    },
    Closed {
        client: u8,
    },
    Raw {
        client: u8,
        bytes: Vec<u8>,
    },
    /// The daemon's link to the data plane comes up (user-space channels offered to it
    /// again) or goes down.
    DataPlane {
        connected: bool,
    },
}

/// Clients: UDP over IPv4 (three), UDP over IPv6, TCP over IPv4 and IPv6.
const CLIENTS: [(&str, &str, Transport); 6] = [
    ("192.0.2.1:5000", LISTEN, Transport::Udp),
    ("192.0.2.2:5000", LISTEN, Transport::Udp),
    ("192.0.2.2:5001", LISTEN, Transport::Udp),
    ("[2001:db8:1::1]:5000", LISTEN6, Transport::Udp),
    ("192.0.2.3:6000", LISTEN, Transport::Tcp),
    ("[2001:db8:1::3]:6000", LISTEN6, Transport::Tcp),
];

/// Peers: allowed ones of both families and a few the policy refuses.
const PEERS: [&str; 8] = [
    "8.8.8.8:5000",
    "1.1.1.1:6000",
    "8.8.8.8:5001",
    "[2a00:1450::1]:7000",
    "[2606:4700::1]:53",
    "10.0.0.1:1000",
    "127.0.0.1:3478",
    "198.51.100.7:50001",
];

struct Client {
    addr: ClientAddr,
    local: SocketAddr,
    transport: Transport,
    nonce: Option<Vec<u8>>,
    rest: bool,
    txid: u32,
}

struct Harness {
    server: Server,
    now: Instant,
    clients: Vec<Client>,
    relays: HashSet<RelayAddr>,
    /// Sockets of reserved ports, bound and kept aside (EVEN-PORT with the R bit).
    reserved: HashSet<RelayAddr>,
    /// Installed bindings and the expiry each was last installed with.
    installed: HashMap<ChannelBinding, Instant>,
    pending: Vec<ChannelBinding>,
    installs: u64,
    removes: u64,
    /// Relay binds still to fail (`Op::FailNextBinds`).
    failing_binds: u8,
    /// `FUZZ_TRACE=1`: print operations and commands (to read a reproducer).
    trace: bool,
}

impl Harness {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            server: server(now),
            now,
            clients: CLIENTS
                .iter()
                .map(|&(addr, local, transport)| Client {
                    addr: ClientAddr(sa(addr)),
                    local: sa(local),
                    transport,
                    nonce: None,
                    rest: false,
                    txid: 0,
                })
                .collect(),
            relays: HashSet::new(),
            reserved: HashSet::new(),
            installed: HashMap::new(),
            pending: Vec::new(),
            installs: 0,
            removes: 0,
            failing_binds: 0,
            trace: std::env::var_os("FUZZ_TRACE").is_some(),
        }
    }

    /// Applies the commands to the model of the daemon and returns the answers to `to`.
    fn drain(&mut self, to: Option<ClientAddr>) -> Vec<Vec<u8>> {
        while let Some(command) = self.server.poll_command() {
            if self.trace {
                eprintln!("  {command:?}");
            }
            match command {
                Command::BindRelayPort { relay, .. } => {
                    // As the daemon does: answer every bind while draining.
                    if self.failing_binds > 0 {
                        self.failing_binds -= 1;
                        self.server.relay_bind_failed(relay);
                    } else {
                        assert!(self.relays.insert(relay), "{relay:?} bound twice");
                        self.server.relay_bound(self.now, relay);
                    }
                }
                Command::FreeRelayPort { relay } => {
                    assert!(self.relays.remove(&relay), "{relay:?} freed but not bound");
                }
                Command::ReservePort { relay, .. } => {
                    assert!(self.reserved.insert(relay), "{relay:?} reserved twice");
                    self.server.relay_bound(self.now, relay);
                }
                Command::AdoptReservedPort { relay, .. } => {
                    assert!(self.reserved.remove(&relay), "{relay:?} adopted unreserved");
                    assert!(self.relays.insert(relay), "{relay:?} adopted while bound");
                    self.server.relay_bound(self.now, relay);
                }
                Command::ReleaseReservedPort { relay } => {
                    assert!(
                        self.reserved.remove(&relay),
                        "{relay:?} released unreserved"
                    );
                }
                Command::InstallChannel {
                    binding, expires, ..
                } => {
                    assert_eq!(binding.transport, Transport::Udp, "TCP binding offloaded");
                    assert!(
                        self.relays.contains(&binding.relay),
                        "binding on unbound relay"
                    );
                    assert!(expires > self.now, "{binding} installed already expired");
                    let before = self.installed.insert(binding, expires);
                    assert_ne!(before, Some(expires), "{binding} installed twice unchanged");
                    self.pending.push(binding);
                    self.installs += 1;
                }
                Command::RemoveChannel { binding } => {
                    self.installed.remove(&binding);
                    self.removes += 1;
                    // The data plane took it out, having counted nothing.
                    self.server.channel_removed(self.now, &binding, Some(Default::default()));
                }
                Command::Account { record } => {
                    let client_to_peer = record.client_to_peer;
                    assert!(
                        client_to_peer.bytes >= record.kernel_client_to_peer.bytes,
                        "{record:?}: the kernel's part exceeds the total"
                    );
                }
            }
        }
        let mut answers = Vec::new();
        while let Some(transmit) = self.server.poll_transmit() {
            match transmit {
                Transmit::ToClient {
                    client, payload, ..
                } => {
                    if Some(client) == to {
                        answers.push(payload);
                    }
                }
                Transmit::ToPeer { relay, .. } => {
                    assert!(self.relays.contains(&relay), "sent from unbound {relay:?}");
                }
            }
        }
        answers
    }

    fn check(&mut self) {
        let held: HashMap<ChannelBinding, Instant> = self.server.channel_bindings().collect();
        assert_eq!(held, self.installed, "data plane and core disagree");
        if let Some((binding, expires)) = held.iter().find(|(_, expires)| **expires <= self.now) {
            panic!("{binding} held past its expiry {expires:?} at {:?}", self.now);
        }
        let ports: BTreeSet<u16> = self.relays.iter().map(|r| r.0.port()).collect();
        assert_eq!(
            self.server.allocation_count(),
            ports.len(),
            "allocations vs relay ports"
        );
    }

    fn client_input(&mut self, index: usize, bytes: &[u8]) -> Vec<Vec<u8>> {
        let c = &self.clients[index];
        let (transport, local, addr) = (c.transport, c.local, c.addr);
        self.server
            .handle_client(self.now, transport, local, addr, bytes);
        self.drain(Some(addr))
    }

    /// Sends an authenticated request, learning the nonce from a 401 or 438 when needed.
    fn request(&mut self, index: usize, m: u16, build: impl Fn(&mut Msg)) -> Option<u16> {
        for _ in 0..3 {
            let c = &mut self.clients[index];
            c.txid += 1;
            let mut txid = [0u8; 12];
            txid[..4].copy_from_slice(&c.txid.to_be_bytes());
            txid[4] = index as u8;
            let mut msg = Msg::new(m, class::REQUEST, txid);
            build(&mut msg);
            let unsigned = msg.finish(None, false);
            let bytes = match &c.nonce {
                Some(nonce) if c.rest => sign(&unsigned, REST_USER, &rest_key(), nonce, true),
                Some(nonce) => sign(&unsigned, USER, &user_key(USER, PASSWORD), nonce, false),
                None => unsigned,
            };
            let answers = self.client_input(index, &bytes);
            let Some(answer) = answers
                .iter()
                .filter_map(|a| Answer::parse_exact(a))
                .find(|d| d.txid == txid)
            else {
                // Rate-limited 401s and held ChannelBind successes give no answer (yet).
                return None;
            };
            assert_eq!(answer.method, m);
            assert_eq!(
                answers
                    .iter()
                    .filter_map(|a| Answer::parse_exact(a))
                    .filter(|d| d.txid == txid)
                    .count(),
                1,
                "one answer per request"
            );
            if m == method::ALLOCATE
                && answer.class == class::SUCCESS
                && let Some([_, _, hi, lo, ..]) = answer.attr(attr::XOR_RELAYED_ADDRESS)
            {
                // The announced port is one the daemon bound (RFC 8656 §7.2: the relayed
                // address is in use once the success is sent).
                let port = u16::from_be_bytes([*hi, *lo]) ^ 0x2112;
                assert!(
                    self.relays.iter().any(|r| r.0.port() == port),
                    "announced relay port {port} is not bound"
                );
            }
            let code = answer.error_code();
            if answer.class == class::ERROR {
                assert!(code.is_some(), "error response without ERROR-CODE");
            }
            match code {
                Some(401 | 438) if let Some(nonce) = answer.attr(attr::NONCE) => {
                    self.clients[index].nonce = Some(nonce.to_vec());
                }
                other => return other,
            }
        }
        None
    }

    /// Advances time, firing every deadline on the way as the daemon's timer would.
    fn advance(&mut self, to: Instant) {
        let mut steps = 0;
        while let Some(deadline) = self.server.poll_timeout()
            && deadline <= to
        {
            steps += 1;
            assert!(steps < 100_000, "timers do not converge");
            let at = deadline.max(self.now);
            self.now = at;
            self.server.handle_timeout(at);
            self.drain(None);
        }
        self.now = to.max(self.now);
        self.server.handle_timeout(self.now);
        self.drain(None);
        if let Some(deadline) = self.server.poll_timeout() {
            assert!(
                deadline > self.now,
                "a deadline at or before now survived handle_timeout"
            );
        }
    }

    fn apply(&mut self, op: Op) {
        let pick = |i: u8| usize::from(i) % CLIENTS.len();
        let peer = |i: u8| sa(PEERS[usize::from(i) % PEERS.len()]);
        let channel = |n: u16| {
            if n & 0x8000 != 0 {
                n & 0x7FFF
            } else {
                0x4000 + n % 8
            }
        };
        match op {
            Op::Allocate {
                client,
                lifetime,
                family,
                rest,
            } => {
                let i = pick(client);
                if self.clients[i].rest != rest {
                    self.clients[i].rest = rest;
                }
                self.request(i, method::ALLOCATE, |m| {
                    m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
                    match family % 4 {
                        1 => {
                            m.attr(attr::REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0]);
                        }
                        2 => {
                            m.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
                        }
                        3 => {
                            m.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
                        }
                        _ => {}
                    }
                    if let Some(l) = lifetime {
                        m.attr(attr::LIFETIME, &u32::from(l).to_be_bytes());
                    }
                });
            }
            Op::Refresh { client, lifetime } => {
                self.request(pick(client), method::REFRESH, |m| {
                    if let Some(l) = lifetime {
                        m.attr(attr::LIFETIME, &u32::from(l).to_be_bytes());
                    }
                });
            }
            Op::CreatePermission { client, peers } => {
                self.request(pick(client), method::CREATE_PERMISSION, |m| {
                    for p in peers {
                        m.xor_addr(attr::XOR_PEER_ADDRESS, peer(p));
                    }
                });
            }
            Op::ChannelBind {
                client,
                channel: n,
                peer: p,
            } => {
                self.request(pick(client), method::CHANNEL_BIND, |m| {
                    m.attr(
                        attr::CHANNEL_NUMBER,
                        &[(channel(n) >> 8) as u8, channel(n) as u8, 0, 0],
                    );
                    m.xor_addr(attr::XOR_PEER_ADDRESS, peer(p));
                });
            }
            Op::Send {
                client,
                peer: p,
                len,
            } => {
                let i = pick(client);
                let mut m = Msg::new(method::SEND, class::INDICATION, [9; 12]);
                m.xor_addr(attr::XOR_PEER_ADDRESS, peer(p))
                    .attr(attr::DATA, &vec![0xAB; usize::from(len)]);
                let bytes = m.finish(None, false);
                self.client_input(i, &bytes);
            }
            Op::ChannelData {
                client,
                channel: n,
                len,
            } => {
                let i = pick(client);
                let mut bytes = channel(n).to_be_bytes().to_vec();
                bytes.extend_from_slice(&u16::from(len).to_be_bytes());
                bytes.resize(4 + usize::from(len), 0xCD);
                if self.clients[i].transport == Transport::Tcp {
                    bytes.resize(bytes.len().next_multiple_of(4), 0);
                }
                self.client_input(i, &bytes);
            }
            Op::FromPeer {
                relay,
                peer: p,
                len,
            } => {
                let mut relays: Vec<RelayAddr> = self.relays.iter().copied().collect();
                relays.sort();
                let Some(&relay) = relays.get(usize::from(relay) % relays.len().max(1)) else {
                    return;
                };
                let from = peer(p);
                if from.is_ipv4() != relay.0.is_ipv4() {
                    return;
                }
                self.server.handle_peer(
                    self.now,
                    relay,
                    PeerAddr(from),
                    &vec![0xEF; usize::from(len)],
                );
                self.drain(None);
            }
            Op::Advance { millis } => {
                let to = self.now + Duration::from_millis(u64::from(millis % 7_200_000));
                self.advance(to);
            }
            Op::Installed { index, ok } => {
                if self.pending.is_empty() {
                    return;
                }
                let binding = self.pending.remove(usize::from(index) % self.pending.len());
                let result = if ok {
                    Ok(())
                } else {
                    // The daemon relays a refused binding in user space: it is not installed.
                    self.installed.remove(&binding);
                    Err(OffloadError::Rejected("fuzz".to_owned()))
                };
                self.server.channel_installed(self.now, &binding, result);
                self.drain(None);
            }
            Op::FailNextBinds { count } => self.failing_binds = count % 8,
            Op::BindFailed { relay } => {
                let mut relays: Vec<RelayAddr> = self.relays.iter().copied().collect();
                relays.sort();
                let Some(&relay) = relays.get(usize::from(relay) % relays.len().max(1)) else {
                    return;
                };
                self.server.relay_bind_failed(relay);
                self.drain(None);
                assert!(
                    !self.relays.contains(&relay),
                    "allocation kept after its bind failed"
                );
            }
            Op::Closed { client } => {
                let c = &self.clients[pick(client)];
                if c.transport == Transport::Tcp {
                    let (transport, local, addr) = (c.transport, c.local, c.addr);
                    self.server.handle_client_closed(transport, local, addr);
                    self.drain(None);
                }
            }
            Op::Raw { client, bytes } => {
                self.client_input(pick(client), &bytes);
            }
            Op::DataPlane { connected } => {
                self.server.set_data_plane_connected(self.now, connected);
                self.drain(None);
            }
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut h = Harness::new();
    for op in ops.into_iter().take(256) {
        if h.trace {
            eprintln!("{op:?}");
        }
        h.apply(op);
        h.check();
    }
    // Every allocation, permission, channel and cooldown lapses within this.
    let end = h.now + Duration::from_secs(8 * 86_400);
    h.advance(end);
    h.check();
    assert_eq!(h.server.allocation_count(), 0, "allocations left");
    assert!(h.relays.is_empty(), "relay sockets left: {:?}", h.relays);
    assert!(
        h.installed.is_empty(),
        "bindings left in the data plane: {:?}",
        h.installed
    );
    assert!(h.server.poll_timeout().is_none(), "timers left");
});
