//! The kernel seam: loading the XDP object through its skeleton, attaching it
//! to interfaces, and reading and writing its maps. Everything else in the
//! agent talks to the kernel through [`Maps`].

use std::collections::HashSet;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bpf_common::{
    BindingUsage, ClientTarget, Counter, KernelConfig, PeerTarget, Pod, REASON_COUNT, Reason,
    Verdict,
};
use libbpf_rs::libbpf_sys;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject, PrintLevel};
use tracing::{debug, info, warn};

use crate::binding::{
    Installed, displaced, expired, expiry, fields, from_client_entry, orphans, same_half, terms,
};
use crate::usage::{UsageError, UsageTable};
use bpf_common::MapKey;
use daemon::lock;
use proto::Binding;

use xdp_agent_skel as skel;

/// Why a map operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The binding map has no room left; nothing was evicted.
    #[error("the binding map is full ({capacity} entries)")]
    Full {
        /// The map's capacity.
        capacity: u32,
    },
    /// The kernel refused the operation.
    #[error("map operation failed: {0}")]
    Kernel(#[from] libbpf_rs::Error),
}

impl From<UsageError> for MapError {
    fn from(error: UsageError) -> Self {
        match error {
            UsageError::Full { capacity } => MapError::Full { capacity },
            UsageError::Kernel(error) => MapError::Kernel(error),
        }
    }
}

/// The maps of the relay program, by the names they are pinned under.
const PINNED_MAPS: [&str; 13] = [
    "CONFIG",
    "CLIENT_V4",
    "CLIENT_V6",
    "PEER_V4",
    "PEER_V6",
    "STATS",
    "EVENTS",
    "EGRESS",
    "REDIRECTED",
    "NEXT_HOP",
    "SCRATCH",
    "USAGE",
    "METERS",
];

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Entries one `BPF_MAP_LOOKUP_BATCH` call reads: a full binding map of
/// 65 536 entries takes 16 calls.
const BATCH: usize = 4096;

/// The kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`) in
/// nanoseconds: the clock of every expiry in the binding maps, which the
/// program reads with `bpf_ktime_get_coarse_ns`.
#[expect(
    clippy::expect_used,
    reason = "CLOCK_MONOTONIC_COARSE exists on every Linux since 2.6.32"
)]
pub fn clock_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is readable");
    u64::try_from(Duration::from(now).as_nanos()).unwrap_or(u64::MAX)
}

/// The loaded program and handles on its maps.
#[derive(Debug)]
pub struct Maps {
    program_fd: OwnedFd,
    config: MapHandle,
    client_v4: MapHandle,
    client_v6: MapHandle,
    peer_v4: MapHandle,
    peer_v6: MapHandle,
    stats: MapHandle,
    events: MapHandle,
    egress: MapHandle,
    redirected: MapHandle,
    /// Each binding's counters and the rate limits.
    usage: UsageTable,
    /// Serialises multi-entry writes so that a batch is all-or-nothing.
    write_lock: Mutex<()>,
    /// Held for as long as the maps are: no other agent uses this pin directory.
    _lock: PinDirLock,
    /// Entries of the client-side maps (one per binding), kept in step by
    /// every write under `write_lock`: counting them by walking the maps
    /// would make each AddChannelBinding cost as much as the maps are full.
    installed: AtomicU64,
    /// Bindings whose lifetime ended, deleted by [`Maps::sweep`].
    expired: AtomicU64,
    /// Entries of each binding map ([`Maps::binding_maps`] order) as the
    /// last sweep, which reads them all anyway, counted them.
    entries: [AtomicU64; 4],
}

impl Maps {
    /// Loads the embedded object with its maps pinned under `pin_dir`. Maps
    /// already pinned there by an earlier run are adopted with their
    /// contents, so installed bindings survive an agent restart; maps of an
    /// incompatible layout are refused, or replaced (emptied) when
    /// `replace_incompatible` says so. Returns whether maps were adopted.
    ///
    /// A program the verifier rejects fails here, after libbpf printed the
    /// verifier's log through `tracing`.
    pub fn load(pin_dir: &Path, replace_incompatible: bool) -> anyhow::Result<(Self, bool)> {
        route_libbpf_output_to_tracing();
        prepare_pin_dir(pin_dir)?;
        let lock = PinDirLock::acquire(pin_dir)?;
        replace_resized_stats(pin_dir)?;
        let pinned = pin_dir.join("CONFIG").exists();
        match Self::load_pinned(pin_dir, lock) {
            Ok(maps) => Ok((maps, pinned)),
            Err(error) if pinned && replace_incompatible => {
                warn!(
                    pin_dir = %pin_dir.display(),
                    error = %format!("{error:#}"),
                    "replacing the pinned maps of an incompatible version: installed bindings \
                     are dropped until turn-control syncs"
                );
                Self::unpin(pin_dir);
                let lock = PinDirLock::acquire(pin_dir)?;
                Ok((Self::load_pinned(pin_dir, lock)?, false))
            }
            Err(error) if pinned => Err(error.context(format!(
                "the maps pinned in {} do not fit this version; stop the old agent's data plane \
                 (xdp-agent detach) or rerun with --replace-incompatible, which drops the \
                 installed bindings until turn-control syncs",
                pin_dir.display()
            ))),
            Err(error) => Err(error),
        }
    }

    fn load_pinned(pin_dir: &Path, lock: PinDirLock) -> anyhow::Result<Self> {
        // The skeleton borrows its object storage for as long as it lives;
        // the agent loads once per process, so the storage lives as long.
        let storage: &'static mut MaybeUninit<OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = skel::RelaySkelBuilder::default()
            .open(storage)
            .context("cannot open the embedded XDP object")?;
        let maps = &mut open.maps;
        for map in [
            &mut maps.CONFIG,
            &mut maps.CLIENT_V4,
            &mut maps.CLIENT_V6,
            &mut maps.PEER_V4,
            &mut maps.PEER_V6,
            &mut maps.STATS,
            &mut maps.EVENTS,
            &mut maps.EGRESS,
            &mut maps.REDIRECTED,
            &mut maps.NEXT_HOP,
            &mut maps.SCRATCH,
            &mut maps.USAGE,
            &mut maps.METERS,
        ] {
            let name = map.name();
            debug_assert!(PINNED_MAPS.iter().any(|pinned| name == *pinned));
            map.set_pin_path(pin_dir.join(name))
                .with_context(|| format!("cannot set the pin path of {}", name.display()))?;
        }
        let skel = open.load().context(
            "cannot load the XDP program and its maps (the verifier's log, if any, is above)",
        )?;
        let handle = |map: &libbpf_rs::MapMut<'_>| {
            MapHandle::try_from(map)
                .with_context(|| format!("cannot duplicate the {} map", map.name().display()))
        };
        let program_fd = skel
            .progs
            .xdp_relay
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate the program descriptor")?;
        let client_v4 = handle(&skel.maps.CLIENT_V4)?;
        let client_v6 = handle(&skel.maps.CLIENT_V6)?;
        // The slots the adopted bindings hold stay theirs, with their counts.
        let mut held = Vec::new();
        for map in [&client_v4, &client_v6] {
            let entries = entries(map).context("cannot read the adopted bindings")?;
            held.extend(
                entries
                    .iter()
                    .filter_map(|(_, value)| terms(value))
                    .map(|(slot, _)| slot),
            );
        }
        let usage = UsageTable::new(&handle(&skel.maps.USAGE)?, handle(&skel.maps.METERS)?, held)?;
        let this = Self {
            program_fd,
            config: handle(&skel.maps.CONFIG)?,
            client_v4,
            client_v6,
            peer_v4: handle(&skel.maps.PEER_V4)?,
            peer_v6: handle(&skel.maps.PEER_V6)?,
            stats: handle(&skel.maps.STATS)?,
            events: handle(&skel.maps.EVENTS)?,
            egress: handle(&skel.maps.EGRESS)?,
            redirected: handle(&skel.maps.REDIRECTED)?,
            usage,
            write_lock: Mutex::new(()),
            _lock: lock,
            installed: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            entries: Default::default(),
        };
        // Adopted maps come with their entries.
        let installed = this
            .count_installed()
            .context("cannot count the adopted bindings")?;
        this.installed.store(installed, Ordering::Relaxed);
        Ok(this)
    }

    /// The loaded program's descriptor, for attaching.
    pub fn program_fd(&self) -> BorrowedFd<'_> {
        self.program_fd.as_fd()
    }

    /// The perf-event array the program reports relayed traffic through.
    pub fn events(&self) -> &MapHandle {
        &self.events
    }

    /// Removes the pinned maps: the kernel frees them once nothing holds them.
    pub fn unpin(pin_dir: &Path) {
        for name in PINNED_MAPS {
            let _ = std::fs::remove_file(pin_dir.join(name));
        }
    }

    /// Writes the data-plane configuration.
    pub fn set_config(&self, config: &KernelConfig) -> anyhow::Result<()> {
        self.config
            .update(&0u32.to_ne_bytes(), config.as_bytes(), MapFlags::ANY)
            .context("cannot write the data-plane configuration")
    }

    /// Checks that the maps answer: the configuration written at start is
    /// still there to read.
    pub fn probe(&self) -> anyhow::Result<()> {
        self.config
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .context("cannot read the data-plane configuration")?
            .context("the data-plane configuration is missing")?;
        Ok(())
    }

    /// Makes `interfaces` (the attached ones, by ifindex) the set a relayed
    /// frame may be redirected to, and no other.
    pub fn set_egress(&self, interfaces: &[u32]) -> anyhow::Result<()> {
        let stale: Vec<Vec<u8>> = self
            .egress
            .keys()
            .filter(|key| {
                let index = key.as_slice().try_into().map(u32::from_ne_bytes);
                index.is_ok_and(|index| !interfaces.contains(&index))
            })
            .collect();
        for key in stale {
            let _ = self.egress.delete(&key);
        }
        for ifindex in interfaces {
            // `struct bpf_devmap_val`: the ifindex, and no program to run on it.
            let value = [ifindex.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
            self.egress
                .update(&ifindex.to_ne_bytes(), &value, MapFlags::ANY)
                .with_context(|| format!("cannot add ifindex {ifindex} to the egress map"))?;
        }
        Ok(())
    }

    /// Relayed frames that left through another interface, summed over CPUs.
    pub fn redirected(&self) -> Result<Counter, MapError> {
        let per_cpu = self
            .redirected
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)?;
        Ok(per_cpu
            .unwrap_or_default()
            .iter()
            .map(|raw| Counter::from_ne_bytes(raw).unwrap_or_default())
            .sum())
    }

    /// Replaces every binding with `wanted`, both directions of every
    /// family, and gives each wanted binding its expiry: removes the bindings
    /// not wanted, deletes every peer-side entry that is not a wanted
    /// binding's (an orphan, whatever left it), then writes every wanted
    /// binding. One that no longer fits the maps is left out (none of it
    /// stays) and returned in [`Synced::refused`]; the others are written
    /// all the same. Runs under the write lock throughout, so that no
    /// install in between is mistaken for an orphan.
    pub fn sync(&self, wanted: &[Installed]) -> Result<Synced, MapError> {
        let _guard = lock(&self.write_lock);
        let wanted_set: HashSet<Binding> = wanted.iter().map(|w| w.binding).collect();
        let stale: Vec<Binding> = self
            .bindings()?
            .into_iter()
            .map(|installed| installed.binding)
            .filter(|binding| !wanted_set.contains(binding))
            .collect();
        // Remove first: a stale binding may hold the peer-side key a wanted
        // one needs, an orphan the room it needs, and its usage slot the
        // slot it needs (handed back once no program run can count on it).
        let stale = self.remove_locked(&stale)?;
        let removed = stale.len() as u64;
        if !stale.is_empty() {
            self.usage.wait_for_readers()?;
            self.usage.release(stale.into_iter().map(|(_, slot)| slot));
        }
        let orphans = self.delete_orphans(&wanted_set)?;
        let mut synced = Synced {
            removed,
            orphans,
            ..Synced::default()
        };
        // In the caller's order, so that of two wanted bindings that displace
        // each other the later one wins, as in one InstallChannelBinding.
        for (index, installed) in wanted.iter().enumerate() {
            let mut journal = Journal::default();
            match self.install_one(&mut journal, installed) {
                Ok(held) => {
                    journal.commit(&self.installed);
                    synced.added += u64::from(!held);
                }
                Err(error @ MapError::Full { .. }) => {
                    journal.roll_back(self);
                    // A half it had before goes too: nothing relays one way.
                    self.remove_locked(&[installed.binding])?;
                    synced.refused.push((index, error));
                }
                Err(error) => {
                    journal.roll_back(self);
                    return Err(error);
                }
            }
        }
        Ok(synced)
    }

    /// Deletes the peer-side entries that are not a `wanted` binding's;
    /// returns how many. Called with the write lock held.
    fn delete_orphans(&self, wanted: &HashSet<Binding>) -> Result<u64, MapError> {
        let mut deleted = 0;
        for map in [&self.peer_v4, &self.peer_v6] {
            for key in orphans(wanted, entries(map)?.iter()) {
                match map.delete(&key) {
                    Ok(()) => deleted += 1,
                    Err(error) if error.kind() == libbpf_rs::ErrorKind::NotFound => {}
                    Err(error) => return Err(MapError::Kernel(error)),
                }
            }
        }
        if deleted > 0 {
            warn!(deleted, "orphaned peer-side entries deleted");
        }
        Ok(deleted)
    }

    /// Deletes every entry of the four binding maps whose expiry has passed
    /// at `now_ns` (the program already ignores them); returns how many
    /// bindings (client-side entries) went. The maps are read in batches
    /// without the write lock; each entry found expired is deleted under
    /// it, only if it still holds an expired value, so that a refresh in
    /// between keeps its binding.
    pub fn sweep(&self, now_ns: u64) -> Result<u64, MapError> {
        let mut candidates = Vec::new();
        let (mut slots, mut meters) = (HashSet::new(), HashSet::new());
        for ((_, map), count) in self.binding_maps().into_iter().zip(&self.entries) {
            let entries = entries(map)?;
            count.store(entries.len() as u64, Ordering::Relaxed);
            for (slot, keys) in entries.iter().filter_map(|(_, value)| terms(value)) {
                slots.insert(slot);
                meters.extend(keys.into_iter().filter(|key| *key != 0));
            }
            candidates.push((map, expired(entries.iter(), now_ns)));
        }
        // Expired entries still name their slots: taken back two sweeps
        // after they went.
        let (released, unused) = self.usage.collect(&slots, &meters);
        if released + unused > 0 {
            debug!(released, unused, "usage slots and meters taken back");
        }
        if candidates.iter().all(|(_, keys)| keys.is_empty()) {
            return Ok(0);
        }
        let _guard = lock(&self.write_lock);
        let mut deleted = [0u64; 4];
        for ((map, keys), deleted) in candidates.into_iter().zip(&mut deleted) {
            for key in keys {
                let still_expired = |held: &[u8]| expiry(held).is_some_and(|at| now_ns >= at);
                if self.delete_if(map, &key, still_expired)?.is_some() {
                    *deleted += 1;
                }
            }
        }
        let [client_v4, client_v6, peer_v4, peer_v6] = deleted;
        let bindings = client_v4 + client_v6;
        self.installed.fetch_sub(bindings, Ordering::Relaxed);
        self.expired.fetch_add(bindings, Ordering::Relaxed);
        debug!(
            client_v4,
            client_v6, peer_v4, peer_v6, "expired binding entries deleted"
        );
        Ok(bindings)
    }

    /// Bindings deleted by sweeps since the agent started.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// The most bindings each map holds.
    pub fn capacity(&self) -> u32 {
        self.client_v4.max_entries()
    }

    /// The most bindings the maps hold: [`Maps::capacity`] in each family.
    pub fn most_bindings(&self) -> u64 {
        2 * u64::from(self.capacity())
    }

    /// Entries in each binding map, by name, as the last sweep counted
    /// them (at most a second ago).
    pub fn map_entries(&self) -> [(&'static str, u64); 4] {
        let names = self.binding_maps().map(|(name, _)| name);
        std::array::from_fn(|map| (names[map], self.entries[map].load(Ordering::Relaxed)))
    }

    /// The four binding maps, by name.
    fn binding_maps(&self) -> [(&'static str, &MapHandle); 4] {
        [
            ("CLIENT_V4", &self.client_v4),
            ("CLIENT_V6", &self.client_v6),
            ("PEER_V4", &self.peer_v4),
            ("PEER_V6", &self.peer_v6),
        ]
    }

    /// Per-CPU counters of `reason`, one entry per possible CPU.
    pub fn per_cpu(&self, reason: Reason) -> Result<Vec<Counter>, MapError> {
        let per_cpu = self
            .stats
            .lookup_percpu(&(reason as u32).to_ne_bytes(), MapFlags::ANY)?;
        Ok(per_cpu
            .unwrap_or_default()
            .iter()
            .map(|raw| Counter::from_ne_bytes(raw).unwrap_or_default())
            .collect())
    }

    /// Installs bindings, both directions of each, each until its expiry,
    /// all or none: on failure every entry already written or deleted is
    /// restored to what it was. Installing a binding that is there rewrites
    /// its expiry (a refresh). A binding that replaces another's client-side
    /// or peer-side key takes the other half of the replaced binding with
    /// it ([`displaced`]), so that nothing is left relaying one way. Returns
    /// how many bindings the maps hold after.
    pub fn install(&self, bindings: &[Installed]) -> Result<u64, MapError> {
        let _guard = lock(&self.write_lock);
        let mut journal = Journal::default();
        let result = bindings
            .iter()
            .try_for_each(|binding| self.install_one(&mut journal, binding).map(drop));
        match result {
            Ok(()) => {
                journal.commit(&self.installed);
                Ok(self.installed())
            }
            Err(error) => {
                journal.roll_back(self);
                Err(error)
            }
        }
    }

    /// Writes both halves of `installed` and deletes what they displace,
    /// each change in `journal`; returns whether both halves were there
    /// already (whatever their expiry).
    fn install_one(&self, journal: &mut Journal, installed: &Installed) -> Result<bool, MapError> {
        let binding = &installed.binding;
        let (client_key, _) = installed.fields().client_entry();
        let (peer_key, _) = installed.fields().peer_entry();
        let at_client = self
            .map(&client_key)
            .lookup(client_key.bytes(), MapFlags::ANY)?;
        let at_peer = self
            .map(&peer_key)
            .lookup(peer_key.bytes(), MapFlags::ANY)?;
        let holds = |held: &Option<Vec<u8>>, value: &[u8]| {
            held.as_deref().is_some_and(|held| same_half(held, value))
        };
        let (_, wanted_target) = installed.fields().client_entry();
        // The binding keeps counting where it counted: a refresh or a new
        // limit must not start its figures again.
        let kept_slot = at_client
            .as_deref()
            .filter(|held| same_half(held, wanted_target.as_bytes()))
            .and_then(terms)
            .map(|(slot, _)| slot)
            .filter(|slot| *slot != 0);
        let usage_slot = match kept_slot {
            Some(slot) => slot,
            None => self.usage.allocate()?,
        };
        for meter in installed.meters {
            self.usage.ensure_meter(meter)?;
        }
        let installed = &Installed {
            usage_slot,
            ..*installed
        };
        let (_, peer_target) = installed.fields().client_entry();
        let (_, client_target) = installed.fields().peer_entry();
        let held =
            holds(&at_client, peer_target.as_bytes()) && holds(&at_peer, client_target.as_bytes());
        let old_target = at_client.as_deref().and_then(PeerTarget::from_bytes);
        let old_client = at_peer.as_deref().and_then(ClientTarget::from_bytes);
        for stale in displaced(binding, old_target.as_ref(), old_client.as_ref()) {
            if journal
                .delete_if_holds(self, stale.key, &stale.value)?
                .is_some()
            {
                debug!(%binding, map = stale.key.map_name(), "displaced half binding deleted");
            }
        }
        // A displaced key is never one of this binding's own: they still
        // hold what was read above.
        journal.write(self, client_key, peer_target.as_bytes(), at_client)?;
        journal.write(self, peer_key, client_target.as_bytes(), at_peer)?;
        debug!(%binding, expires_at_ns = installed.expires_at_ns, "binding installed");
        Ok(held)
    }

    /// Removes bindings, both directions; returns each one that was present
    /// with its final usage, read once no program run can count on it any
    /// more. A half that holds another binding's value is that binding's
    /// and stays.
    pub fn remove(&self, bindings: &[Binding]) -> Result<Vec<(Binding, BindingUsage)>, MapError> {
        let removed = {
            let _guard = lock(&self.write_lock);
            self.remove_locked(bindings)?
        };
        if removed.is_empty() {
            return Ok(Vec::new());
        }
        // A run that found an entry before it went may still be counting:
        // its slot is read once every such run has ended, and then handed
        // back.
        self.usage.wait_for_readers()?;
        let finals = removed
            .iter()
            .map(|(binding, slot)| (*binding, self.usage.read(*slot)))
            .collect();
        self.usage
            .release(removed.into_iter().map(|(_, slot)| slot));
        Ok(finals)
    }

    /// [`Maps::remove`], with the write lock held: the bindings removed and
    /// their usage slots.
    fn remove_locked(&self, bindings: &[Binding]) -> Result<Vec<(Binding, u32)>, MapError> {
        // A journal only for its count of client-side entries: a removal is
        // not undone when a later one fails.
        let mut journal = Journal::default();
        let mut removed = Vec::new();
        let result = bindings.iter().try_for_each(|binding| {
            // Any terms: the comparison leaves them out.
            let (client_key, peer_target) = fields(binding, 0).client_entry();
            let (peer_key, client_target) = fields(binding, 0).peer_entry();
            let client = journal.delete_if_holds(self, client_key, peer_target.as_bytes())?;
            let peer = journal.delete_if_holds(self, peer_key, client_target.as_bytes())?;
            let slot = client
                .or(peer)
                .as_deref()
                .and_then(terms)
                .map(|(slot, _)| slot);
            if let Some(slot) = slot {
                removed.push((*binding, slot));
                debug!(%binding, "binding removed");
            }
            Ok(())
        });
        journal.commit(&self.installed);
        result.map(|()| removed)
    }

    /// Deletes `key` from `map` if what it holds passes `condition`;
    /// returns what it held if so.
    fn delete_if(
        &self,
        map: &MapHandle,
        key: &[u8],
        condition: impl FnOnce(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>, MapError> {
        let Some(held) = map.lookup(key, MapFlags::ANY)? else {
            return Ok(None);
        };
        if !condition(&held) {
            return Ok(None);
        }
        map.delete(key)?;
        Ok(Some(held))
    }

    /// Every installed binding and its expiry, read from the client-side
    /// maps in batches.
    pub fn bindings(&self) -> Result<Vec<Installed>, MapError> {
        let mut bindings = Vec::new();
        for map in [&self.client_v4, &self.client_v6] {
            for (key, value) in entries(map)?.iter() {
                if let Some(target) = PeerTarget::from_bytes(value)
                    && let Some(installed) = from_client_entry(key, &target)
                {
                    bindings.push(installed);
                }
            }
        }
        bindings.sort_by_key(|installed| installed.binding);
        Ok(bindings)
    }

    /// What `slot` counted.
    pub fn usage(&self, slot: u32) -> BindingUsage {
        self.usage.read(slot)
    }

    /// The rate of meter `key` (0: none).
    pub fn meter_rate(&self, key: u64) -> u64 {
        self.usage.meter_rate(key)
    }

    /// How many bindings the client-side maps hold.
    pub fn installed(&self) -> u64 {
        self.installed.load(Ordering::Relaxed)
    }

    /// The same, counted by reading the maps.
    fn count_installed(&self) -> Result<u64, MapError> {
        Ok((entries(&self.client_v4)?.len() + entries(&self.client_v6)?.len()) as u64)
    }

    fn map(&self, key: &MapKey) -> &MapHandle {
        match key {
            MapKey::ClientV4(_) => &self.client_v4,
            MapKey::ClientV6(_) => &self.client_v6,
            MapKey::PeerV4(_) => &self.peer_v4,
            MapKey::PeerV6(_) => &self.peer_v6,
        }
    }

    /// The per-reason counters, summed over CPUs, in `Reason` order.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, MapError> {
        Reason::ALL
            .iter()
            .map(|&reason| Ok((reason, self.per_cpu(reason)?.into_iter().sum())))
            .collect()
    }

    /// Relayed traffic of all paths, summed over CPUs.
    pub fn relayed(&self) -> Result<Counter, MapError> {
        Ok(self
            .counters()?
            .into_iter()
            .filter(|(reason, _)| reason.verdict() == Verdict::Tx)
            .map(|(_, counter)| counter)
            .sum())
    }
}

/// What [`Maps::sync`] changed.
#[derive(Debug, Default)]
pub struct Synced {
    /// Wanted bindings that were missing, or had a half missing or
    /// different (every wanted binding is written, for its expiry).
    pub added: u64,
    /// Bindings removed because they were not wanted.
    pub removed: u64,
    /// Peer-side entries deleted because no wanted binding had them.
    pub orphans: u64,
    /// Wanted bindings left out, by index, and why (the maps are full).
    pub refused: Vec<(usize, MapError)>,
}

/// Every entry of a binding map, as one pass of batch reads found them.
#[derive(Debug)]
struct Entries {
    key_size: usize,
    value_size: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl Entries {
    /// Key and value of each entry.
    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.keys
            .chunks_exact(self.key_size.max(1))
            .zip(self.values.chunks_exact(self.value_size.max(1)))
    }

    fn len(&self) -> usize {
        self.keys.len() / self.key_size.max(1)
    }
}

/// Every entry of the hash map `map`, [`BATCH`] per system call
/// (`BPF_MAP_LOOKUP_BATCH`), where walking its keys takes two calls per
/// entry: a sweep of 2 x 2 x 65 536 entries every second stays cheap.
/// Unlike `MapCore::lookup_batch`, a failure is an error, not the end of
/// the entries.
fn entries(map: &MapHandle) -> Result<Entries, MapError> {
    let key_size = map.key_size() as usize;
    let value_size = map.value_size() as usize;
    let mut entries = Entries {
        key_size,
        value_size,
        keys: Vec::new(),
        values: Vec::new(),
    };
    let mut keys = vec![0u8; BATCH * key_size];
    let mut values = vec![0u8; BATCH * value_size];
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        ..Default::default()
    };
    // Where the next batch starts, a hash map's bucket index; the first
    // call starts at the beginning (no position).
    let mut position = 0u32;
    let mut first = true;
    loop {
        let mut next = 0u32;
        let mut count = BATCH as u32;
        let from = if first {
            std::ptr::null_mut()
        } else {
            (&raw mut position).cast()
        };
        // SAFETY: `keys` and `values` have room for `count` keys and values
        // of the map's sizes (a hash map's values are not per-CPU, so not
        // rounded up) and the kernel writes at most `count`; `position` and
        // `next` are the `u32` bucket positions a hash map reads and writes;
        // all of them, and `opts`, outlive the call.
        let result = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                from,
                (&raw mut next).cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        // ENOENT: the last entries, if any, are in this batch.
        let last = result == -nix::libc::ENOENT;
        if result != 0 && !last {
            let error = std::io::Error::from_raw_os_error(-result);
            return Err(MapError::Kernel(error.into()));
        }
        let count = (count as usize).min(BATCH);
        entries.keys.extend_from_slice(&keys[..count * key_size]);
        entries
            .values
            .extend_from_slice(&values[..count * value_size]);
        if last {
            return Ok(entries);
        }
        position = next;
        first = false;
    }
}

/// The entries a batch changed, each with what it held before, so that a
/// failed batch of installs puts every one back; and the net change in
/// client-side entries, applied to the count once the batch is done.
#[derive(Debug, Default)]
struct Journal {
    changes: Vec<(MapKey, Option<Vec<u8>>)>,
    clients: i64,
}

impl Journal {
    /// Writes `value` at `key`, which holds `previous`.
    fn write(
        &mut self,
        maps: &Maps,
        key: MapKey,
        value: &[u8],
        previous: Option<Vec<u8>>,
    ) -> Result<(), MapError> {
        let map = maps.map(&key);
        map.update(key.bytes(), value, MapFlags::ANY)
            .map_err(|error| match error.kind() {
                libbpf_rs::ErrorKind::TooBig => MapError::Full {
                    capacity: map.max_entries(),
                },
                _ => MapError::Kernel(error),
            })?;
        if previous.is_none() && key.is_client() {
            self.clients += 1;
        }
        self.changes.push((key, previous));
        Ok(())
    }

    /// Deletes `key` if it holds `value`, whatever the terms of either;
    /// returns what it held if it did.
    fn delete_if_holds(
        &mut self,
        maps: &Maps,
        key: MapKey,
        value: &[u8],
    ) -> Result<Option<Vec<u8>>, MapError> {
        let condition = |held: &[u8]| same_half(held, value);
        let Some(previous) = maps.delete_if(maps.map(&key), key.bytes(), condition)? else {
            return Ok(None);
        };
        if key.is_client() {
            self.clients -= 1;
        }
        self.changes.push((key, Some(previous.clone())));
        Ok(Some(previous))
    }

    /// The batch succeeded: counts its client-side entries.
    fn commit(self, installed: &AtomicU64) {
        if self.clients >= 0 {
            installed.fetch_add(self.clients.unsigned_abs(), Ordering::Relaxed);
        } else {
            installed.fetch_sub(self.clients.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// The batch failed: every entry goes back to what it held, newest first.
    fn roll_back(self, maps: &Maps) {
        for (key, previous) in self.changes.into_iter().rev() {
            let map = maps.map(&key);
            let _ = match previous {
                Some(value) => map.update(key.bytes(), &value, MapFlags::ANY),
                None => map.delete(key.bytes()),
            };
        }
    }
}

/// A version that adds a verdict reason has a longer per-reason `STATS`
/// array. A pinned one of another length (and the same kind and value) is
/// unpinned, so that the agent creates its own and the counters start again
/// from zero, instead of refusing every pinned map: an upgrade keeps the
/// installed bindings.
fn replace_resized_stats(pin_dir: &Path) -> anyhow::Result<()> {
    let path = pin_dir.join("STATS");
    let Ok(pinned) = MapHandle::from_pinned_path(&path) else {
        return Ok(());
    };
    let same_kind = pinned.map_type() == libbpf_rs::MapType::PercpuArray
        && pinned.key_size() == 4
        && pinned.value_size() as usize == size_of::<Counter>();
    if !same_kind || pinned.max_entries() == REASON_COUNT {
        return Ok(());
    }
    warn!(
        pinned = pinned.max_entries(),
        reasons = REASON_COUNT,
        "the pinned per-reason counters are of a version with another set of reasons; \
         they start again from zero"
    );
    std::fs::remove_file(&path).with_context(|| format!("cannot unpin {}", path.display()))
}

/// An exclusive `flock` on a pin directory, held by the agent that uses its
/// maps and links: a second agent on the same directory would share the
/// first one's maps, and its configuration would silently change the first
/// one's data plane. Released when the process ends, however it ends, so
/// the next agent adopts what the first one pinned.
#[derive(Debug)]
pub struct PinDirLock(
    #[expect(dead_code, reason = "held for its lock")] nix::fcntl::Flock<std::fs::File>,
);

impl PinDirLock {
    /// Takes the lock of `pin_dir`, or explains who holds it.
    pub fn acquire(pin_dir: &Path) -> anyhow::Result<Self> {
        let dir = std::fs::File::open(pin_dir)
            .with_context(|| format!("cannot open the pin directory {}", pin_dir.display()))?;
        match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "another xdp-agent is using the pin directory {} (it holds its lock): stop it \
                 first, or give this one its own --pin-dir",
                pin_dir.display()
            ),
            Err((_, errno)) => {
                Err(errno).with_context(|| format!("cannot lock {}", pin_dir.display()))
            }
        }
    }
}

/// Creates `pin_dir` on a BPF filesystem, or explains why it cannot.
fn prepare_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("cannot create the pin directory {}", pin_dir.display()))?;
    let stat = nix::sys::statfs::statfs(pin_dir)
        .with_context(|| format!("cannot inspect {}", pin_dir.display()))?;
    if stat.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a BPF filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) or pass --pin-dir",
            pin_dir.display()
        );
    }
    Ok(())
}

/// libbpf reports through a print callback; the verifier's log arrives there
/// at WARN level when a program is rejected. Never silence it.
fn route_libbpf_output_to_tracing() {
    fn print(level: PrintLevel, message: String) {
        let message = message.trim_end();
        match level {
            PrintLevel::Warn => warn!(target: "libbpf", "{message}"),
            PrintLevel::Info => info!(target: "libbpf", "{message}"),
            PrintLevel::Debug => debug!(target: "libbpf", "{message}"),
        }
    }
    libbpf_rs::set_print(Some((PrintLevel::Debug, print)));
}
