//! Allocations that outlive the process: what a core saves of each allocation, the changes it
//! reports for the daemon to journal, and their restoration in a new process.
//!
//! A client must not notice a restart of the daemon (an upgrade, a crash): its allocation
//! keeps its relayed address, permissions and channels, and the channels the data plane
//! relays stay there. The core knows nothing of files or sockets: it hands the daemon a
//! [`SavedAllocation`] whenever an allocation changed ([`Server::take_changes`]), all of them
//! at once for a compaction ([`Server::saved_allocations`]), and takes them back at start
//! ([`Server::restore`]) once the daemon holds their relay sockets again.
//!
//! What is saved is what the protocol state needs (RFC 8656 §6.2: the 5-tuple, the relayed
//! addresses, the username and key, the lifetime, the permissions and channels); what is not
//! is rebuilt or harmless to lose: ICMP budgets start full, cooldowns of expired channels
//! (RFC 8656 §12) are forgotten, an Allocate whose success has not gone out yet is not saved
//! (its client retransmits and gets a fresh allocation), and neither are held ChannelBind
//! successes (the client retransmits, and the refresh of a binding is idempotent).
//! Reservations of EVEN-PORT (30 s, RFC 8656 §7.2) are not saved: a client that brings its
//! token after a restart gets 508 and allocates without it, as RFC 8656 §7.2 allows.
//!
//! Times are saved as Unix milliseconds: a monotonic [`Instant`] means nothing to another
//! process, and an allocation that expired while the daemon was down must stay expired.
//!
//! Usage and accounting are saved too (the allocation's id, start, granted `max_bps`, usage,
//! the kernel's part, the next record's sequence, each channel's last kernel reading), with
//! serde defaults so that files of earlier versions still load. Usage changes per packet, so
//! an allocation is not marked changed for it: it is marked when its interim record goes out,
//! and the journal saves it once per interval (see [`Server::take_changes`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc_stun::message::TransactionId;
use serde::{Deserialize, Serialize};

use super::{Server, Timer};
use crate::allocation::{Account, Allocation, Channel, PortUse};
use crate::auth::{Integrity, LongTermKey, SigningKey};
use crate::icmp::IcmpBudget;
use crate::types::{
    AllocationPort, ChannelNumber, ClientAddr, Family, FiveTuple, PeerAddr, RelayAddr, Transport,
};
use crate::usage::{
    EndReason, RateMeter, RecordKind, Usage, UsageRecord, rfc3339_of_unix_ms, user_of,
};

/// An allocation as it outlives the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAllocation {
    /// The client's transport address.
    pub client: SocketAddr,
    /// The listener it reached.
    pub server: SocketAddr,
    /// UDP or TCP (TLS is TCP here).
    pub transport: Transport,
    /// The allocation port: the relayed addresses' port.
    pub port: u16,
    /// The relayed addresses, as announced in XOR-RELAYED-ADDRESS.
    pub relays: Vec<SocketAddr>,
    /// The family refused in ADDRESS-ERROR-CODE, if any.
    pub refused_family: Option<Family>,
    /// The username (the quota and the kernel share count against it).
    pub username: String,
    /// When the allocation expires, Unix milliseconds.
    pub expires_unix_ms: u64,
    /// The Allocate's transaction id, for a retransmission.
    pub allocate_txid: [u8; 12],
    /// The long-term key of the Allocate (16 bytes: MD5; 32: SHA-256), which signs a
    /// retransmitted Allocate's success.
    pub key: Vec<u8>,
    /// The key signed with MESSAGE-INTEGRITY-SHA256 rather than MESSAGE-INTEGRITY.
    pub integrity_sha256: bool,
    /// EVEN-PORT was asked for.
    pub even_port: bool,
    /// DONT-FRAGMENT was asked for.
    pub dont_fragment: bool,
    /// Permissions: peer IP address and expiry, Unix milliseconds.
    pub permissions: Vec<(IpAddr, u64)>,
    /// Confirmed channel bindings.
    pub channels: Vec<SavedChannel>,
    /// The allocation's id in accounting records and data-plane meters (0 in files of
    /// versions without accounting: a new one is drawn).
    #[serde(default)]
    pub id: u64,
    /// When the allocation was made, Unix milliseconds (0: unknown, taken as the restore).
    #[serde(default)]
    pub started_unix_ms: u64,
    /// The granted `max_bps`, reserved again from `bps_capacity` at restore.
    #[serde(default)]
    pub max_bps: Option<u64>,
    /// Relayed and dropped so far, both paths.
    #[serde(default)]
    pub usage: Usage,
    /// The kernel's part of `usage`.
    #[serde(default)]
    pub kernel: Usage,
    /// The sequence number of the next accounting record (0: no start record went out).
    #[serde(default)]
    pub sequence: u64,
}

/// A channel binding as it outlives the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedChannel {
    /// The channel number.
    pub number: u16,
    /// The peer.
    pub peer: SocketAddr,
    /// When the binding expires, Unix milliseconds.
    pub expires_unix_ms: u64,
    /// The data plane holds it (the new process's first sync carries it again, so the kernel
    /// goes on relaying it throughout).
    pub in_kernel: bool,
    /// The kernel's last cumulative figures of the binding taken into account: its entry
    /// lives on through the restart, and counts on from there.
    #[serde(default)]
    pub kernel_seen: Usage,
}

impl SavedAllocation {
    /// The allocation's 5-tuple.
    pub fn tuple(&self) -> FiveTuple {
        FiveTuple {
            client: ClientAddr(self.client),
            server: self.server,
            transport: self.transport,
        }
    }
}

/// What changed in an allocation since the last [`Server::take_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "made once per journaled allocation and interval, never per packet"
)]
pub enum Change {
    /// The allocation as it stands now (new, refreshed, a permission or channel more or less).
    Saved(SavedAllocation),
    /// The allocation of this 5-tuple is gone (deleted, expired, its connection closed).
    Deleted(FiveTuple),
}

/// Why a saved allocation was not restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RestoreRefusal {
    /// It expired while the daemon was down.
    #[error("expired")]
    Expired,
    /// Its port is outside the configured port range (the range shrank).
    #[error("port outside the configured range")]
    PortOutOfRange,
    /// A relayed address is not the configured relay address of its family.
    #[error("relay address no longer configured")]
    RelayAddressChanged,
    /// Its listener is not configured any more.
    #[error("listener no longer configured")]
    ListenerRemoved,
    /// Its port is in use by another restored allocation.
    #[error("port already restored")]
    PortTaken,
    /// The saved key is not a long-term key.
    #[error("malformed key")]
    MalformedKey,
}

/// What a [`Server::restore`] brought back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Permissions restored (expired ones are dropped).
    pub permissions: usize,
    /// Channels restored.
    pub channels: usize,
    /// Of them, held by the data plane.
    pub in_kernel: usize,
}

impl Server {
    /// Starts recording which allocations change, for [`Server::take_changes`]. Off by
    /// default: a daemon that keeps no journal pays nothing.
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(HashSet::new);
    }

    /// Notes that the allocation of `tuple` may have changed.
    pub(super) fn mark_changed(&mut self, tuple: &FiveTuple) {
        if let Some(changed) = &mut self.changed {
            changed.insert(*tuple);
        }
    }

    /// The allocations changed since the last call, as they stand now (or as deleted). An
    /// allocation whose success has not gone out is reported when it has.
    pub fn take_changes(&mut self) -> Vec<Change> {
        let Some(changed) = self.changed.as_mut() else {
            return Vec::new();
        };
        if changed.is_empty() {
            return Vec::new();
        }
        let tuples: Vec<FiveTuple> = changed.drain().collect();
        let mut out = Vec::with_capacity(tuples.len());
        for tuple in tuples {
            match self.allocations.get(&tuple) {
                Some(alloc) if self.is_announced(&tuple) => {
                    out.push(Change::Saved(self.save(&tuple, alloc)));
                }
                // Still waiting for its sockets: saved once announced (relay_bound marks it).
                Some(_) => {}
                None => out.push(Change::Deleted(tuple)),
            }
        }
        out
    }

    /// Every announced allocation as saved: a snapshot, to compact the journal with.
    pub fn saved_allocations(&self) -> Vec<SavedAllocation> {
        self.allocations
            .iter()
            .filter(|(tuple, _)| self.is_announced(tuple))
            .map(|(tuple, alloc)| self.save(tuple, alloc))
            .collect()
    }

    fn save(&self, tuple: &FiveTuple, alloc: &Allocation) -> SavedAllocation {
        let unix_ms = |at: Instant| self.unix_ms(at);
        let mut channels: Vec<SavedChannel> = alloc
            .channels
            .iter()
            .filter(|(_, ch)| ch.confirmed)
            .map(|(number, ch)| SavedChannel {
                number: number.value(),
                peer: ch.peer.0,
                expires_unix_ms: unix_ms(ch.expires),
                in_kernel: ch.kernel_expires.is_some(),
                kernel_seen: alloc
                    .account
                    .kernel_seen
                    .get(number)
                    .copied()
                    .unwrap_or_default(),
            })
            .collect();
        channels.sort_by_key(|ch| ch.number);
        let mut permissions: Vec<(IpAddr, u64)> = alloc
            .permissions
            .iter()
            .map(|(ip, expires)| (*ip, unix_ms(*expires)))
            .collect();
        permissions.sort();
        let (key, integrity_sha256) = (&alloc.key.key, alloc.key.integrity == Integrity::Sha256);
        SavedAllocation {
            client: tuple.client.0,
            server: tuple.server,
            transport: tuple.transport,
            port: alloc.port.0,
            relays: alloc.relays().map(|relay| relay.0).collect(),
            refused_family: alloc.refused_family,
            username: alloc.username.to_string(),
            expires_unix_ms: unix_ms(alloc.expires),
            allocate_txid: alloc.allocate_txid.0,
            key: match key {
                LongTermKey::Md5(bytes) => bytes.to_vec(),
                LongTermKey::Sha256(bytes) => bytes.to_vec(),
            },
            integrity_sha256,
            even_port: alloc.even_port,
            dont_fragment: alloc.dont_fragment,
            permissions,
            channels,
            id: alloc.account.id,
            started_unix_ms: alloc.account.started_unix_ms,
            max_bps: alloc.account.max_bps,
            usage: alloc.account.usage,
            kernel: alloc.account.kernel,
            sequence: alloc.account.sequence,
        }
    }

    /// Brings back a saved allocation whose relay sockets the daemon holds again (from the
    /// previous process, or bound anew). Permissions and channels that expired meanwhile stay
    /// out; the channels the data plane held are marked as held, so that the first sync after
    /// the restart carries them and the kernel never drops them. Counts against the quotas and
    /// `bps_capacity` as the allocation did (without refusing: it exists already).
    ///
    /// Its accounting goes on: same id, usage and record sequence; an allocation saved before
    /// any record went out gets its start now. One that cannot be restored gets its stop
    /// record, end reason "lost", with its saved figures ([`Server::saved_allocation_lost`]).
    ///
    /// `ports` is the daemon's whole port range, not only this core's slice: an allocation
    /// that took a port reserved by another core (RFC 8656 §7.2, a RESERVATION-TOKEN) lives
    /// outside the slice, as it did before the restart.
    pub fn restore(
        &mut self,
        now: Instant,
        saved: &SavedAllocation,
        ports: &std::ops::RangeInclusive<u16>,
    ) -> Result<Restored, RestoreRefusal> {
        let (expires, key) = match self.check_restorable(now, saved, ports) {
            Ok(checked) => checked,
            Err(refusal) => {
                self.saved_allocation_lost(now, saved);
                return Err(refusal);
            }
        };
        let tuple = saved.tuple();
        let port = AllocationPort(saved.port);
        let username: Arc<str> = Arc::from(saved.username.as_str());
        let account = self.restore_account(now, saved);
        let mut alloc = Allocation::new(
            port,
            Arc::clone(&username),
            expires,
            TransactionId(saved.allocate_txid),
            key,
            IcmpBudget::new(self.icmp_tick(now)),
            account,
        );
        alloc.refused_family = saved.refused_family;
        alloc.even_port = saved.even_port;
        alloc.dont_fragment = saved.dont_fragment;
        for relay in &saved.relays {
            alloc.set_relay(RelayAddr(*relay));
        }
        let mut restored = Restored::default();
        for &(ip, expires_ms) in &saved.permissions {
            let expires = self.instant_of(expires_ms, now);
            if expires > now {
                alloc.permissions.insert(ip, expires);
                self.timers.schedule(Timer::Permission(tuple, ip), expires);
                restored.permissions += 1;
            }
        }
        // Counted as at its Allocate, whatever the quotas are now: it exists already.
        self.config.quotas.try_reserve(&username, None, None);
        self.restore_channels(now, &tuple, &mut alloc, &saved.channels, &mut restored);
        self.by_port.insert(port, PortUse::Allocation(tuple));
        self.timers.schedule(Timer::Allocation(tuple), expires);
        self.allocations.insert(tuple, alloc);
        let s = &mut self.stats;
        s.allocations_active += 1;
        s.permissions_active += restored.permissions as u64;
        s.channels_active += restored.channels as u64;
        self.start_record(now, &tuple);
        Ok(restored)
    }

    /// The account of `saved` as it goes on: its bandwidth reserved again (without refusing)
    /// and its user's meters joined.
    fn restore_account(&mut self, now: Instant, saved: &SavedAllocation) -> Account {
        let user = user_of(&saved.username);
        let id = match saved.id {
            0 => rand::RngExt::random(&mut self.rng),
            id => id,
        };
        let started = match saved.started_unix_ms {
            0 => self.unix_ms(now),
            started => started,
        };
        let mut account = Account::new(id, started, user.into());
        account.max_bps = saved.max_bps;
        account.meters = saved.max_bps.map(|rate| {
            let meter = RateMeter::new(rate, now);
            [meter.clone(), meter]
        });
        self.config.bandwidth.reserve_anyway(saved.max_bps);
        account.user_max_bps = self.config.limits_of(user).user_max_bps;
        if let Some(rate) = account.user_max_bps {
            self.config.bandwidth.join(user, rate, now);
        }
        account.usage = saved.usage;
        account.kernel = saved.kernel;
        account.sequence = saved.sequence;
        account
    }

    /// A saved allocation that this process goes on without (the core refused to restore it,
    /// or the daemon could not have its relay socket or TCP connection back): its stop
    /// record, end reason "lost", with the figures saved, ended at its expiry if that has
    /// passed, else now. The kernel's figures since the save are gone with its entries, so
    /// `kernel_final` is false if it had any. Nothing if no record of it ever went out.
    pub fn saved_allocation_lost(&mut self, now: Instant, saved: &SavedAllocation) {
        if saved.sequence == 0 {
            return;
        }
        let now_ms = self.unix_ms(now);
        let mut record = UsageRecord {
            record: RecordKind::Stop,
            sequence: saved.sequence,
            allocation: format!("{:016x}", saved.id),
            time: rfc3339_of_unix_ms(now_ms),
            username: saved.username.clone(),
            user: user_of(&saved.username).to_owned(),
            realm: self.config.realm.clone(),
            client: saved.client,
            transport: saved.transport,
            server: saved.server,
            relay: saved.relays.clone(),
            started: rfc3339_of_unix_ms(saved.started_unix_ms),
            ended: Some(rfc3339_of_unix_ms(now_ms.min(saved.expires_unix_ms))),
            end_reason: Some(EndReason::Lost),
            max_bps: saved.max_bps,
            client_to_peer: Default::default(),
            peer_to_client: Default::default(),
            dropped_client_to_peer: Default::default(),
            dropped_peer_to_client: Default::default(),
            kernel_client_to_peer: Default::default(),
            kernel_peer_to_client: Default::default(),
            kernel_final: Some(!saved.channels.iter().any(|ch| ch.in_kernel)),
        };
        record.set_figures(&saved.usage, &saved.kernel);
        self.commands.push_back(super::Command::Account { record });
    }

    /// Whether `saved` fits this server as it is configured now: its expiry and its key if it
    /// does, why not otherwise.
    fn check_restorable(
        &self,
        now: Instant,
        saved: &SavedAllocation,
        ports: &std::ops::RangeInclusive<u16>,
    ) -> Result<(Instant, SigningKey), RestoreRefusal> {
        let server = saved.server;
        let expires = self.instant_of(saved.expires_unix_ms, now);
        if expires <= now {
            return Err(RestoreRefusal::Expired);
        }
        if !ports.contains(&saved.port) {
            return Err(RestoreRefusal::PortOutOfRange);
        }
        if self.by_port.contains_key(&AllocationPort(saved.port)) {
            return Err(RestoreRefusal::PortTaken);
        }
        if !self.config.listeners.iter().any(|listener| {
            *listener == server
                || (listener.ip().is_unspecified()
                    && listener.port() == server.port()
                    && listener.is_ipv4() == server.is_ipv4())
        }) {
            return Err(RestoreRefusal::ListenerRemoved);
        }
        let configured = |family: Family| match family {
            Family::V4 => self.config.relay_ipv4.map(IpAddr::V4),
            Family::V6 => self.config.relay_ipv6.map(IpAddr::V6),
        };
        if saved.relays.is_empty()
            || saved.relays.iter().any(|relay| {
                relay.port() != saved.port || configured(Family::of(relay.ip())) != Some(relay.ip())
            })
        {
            return Err(RestoreRefusal::RelayAddressChanged);
        }
        let key = match saved.key.len() {
            16 => LongTermKey::Md5(
                saved
                    .key
                    .as_slice()
                    .try_into()
                    .map_err(|_| RestoreRefusal::MalformedKey)?,
            ),
            32 => LongTermKey::Sha256(
                saved
                    .key
                    .as_slice()
                    .try_into()
                    .map_err(|_| RestoreRefusal::MalformedKey)?,
            ),
            _ => return Err(RestoreRefusal::MalformedKey),
        };
        let integrity = if saved.integrity_sha256 {
            Integrity::Sha256
        } else {
            Integrity::Sha1
        };
        Ok((expires, SigningKey { key, integrity }))
    }

    /// Restores the channels of `saved` that have not expired into `alloc`, those the data
    /// plane held marked as held (within the user's kernel share, as counted again).
    fn restore_channels(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        alloc: &mut Allocation,
        saved: &[SavedChannel],
        restored: &mut Restored,
    ) {
        for ch in saved {
            let expires = self.instant_of(ch.expires_unix_ms, now);
            let (Ok(number), true) = (ChannelNumber::new(ch.number), expires > now) else {
                continue;
            };
            let peer = PeerAddr(ch.peer);
            let mut channel = Channel {
                peer,
                expires,
                kernel_expires: None,
                confirmed: true,
                // The kernel kept what the previous process installed.
                maybe_in_kernel: ch.in_kernel,
            };
            if ch.kernel_seen != Usage::default() {
                alloc.account.kernel_seen.insert(number, ch.kernel_seen);
            }
            if ch.in_kernel
                && alloc.permissions.contains_key(&peer.0.ip())
                && self
                    .config
                    .quotas
                    .try_add_kernel_binding(&alloc.username, usize::MAX)
            {
                channel.kernel_expires = Some(alloc.effective_expiry(&channel));
                restored.in_kernel += 1;
            }
            alloc.channels.insert(number, channel);
            alloc.peers.insert(peer, number);
            self.timers
                .schedule(Timer::Channel(*tuple, number), expires);
            restored.channels += 1;
        }
    }

    /// `at` as Unix milliseconds, by the wall clock the server was given.
    pub(super) fn unix_ms(&self, at: Instant) -> u64 {
        let unix = if at >= self.wall.instant {
            self.wall.unix + (at - self.wall.instant)
        } else {
            self.wall.unix.saturating_sub(self.wall.instant - at)
        };
        u64::try_from(unix.as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant of Unix milliseconds `ms` (in the past: at most `now`, which is expired).
    fn instant_of(&self, ms: u64, now: Instant) -> Instant {
        let unix = Duration::from_millis(ms);
        if unix >= self.wall.unix {
            self.wall.instant + (unix - self.wall.unix)
        } else {
            self.wall
                .instant
                .checked_sub(self.wall.unix - unix)
                .unwrap_or(now)
                .min(now)
        }
    }
}
