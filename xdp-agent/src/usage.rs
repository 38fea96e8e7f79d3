//! Each binding's usage counters (`USAGE`) and the rate limits (`METERS`)
//! the program enforces: handing out and taking back slots, reading them,
//! keeping meters at the rates turn-control asks for, and waiting until no
//! program run can still count on a removed binding.
//!
//! A slot is handed out (zeroed) when a binding is first written, kept by
//! every rewrite of that binding (a refresh, a new limit), and taken back by
//! [`UsageTable::collect`] once two sweeps in a row (at least a second apart)
//! found no entry naming it: whatever path removed the binding (a removal, a
//! sweep of an expired entry, a displacement, a sync, a rolled-back batch),
//! nothing leaks and nothing is reused while a reader may still look at it.
//! Meters go the same way.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bpf_common::usage::{USAGE_SLOTS, meter_key};
use bpf_common::{BindingUsage, Counter, Meter, Pod};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};
use nix::sys::mman::{MapFlags as MmapFlags, ProtFlags, mmap, munmap};
use proto::RateLimit;
use tracing::debug;

use daemon::lock;

/// Why a slot or a meter could not be had.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// Every usage slot is held, or the meter map is full.
    #[error("no room left for usage counters or meters ({capacity})")]
    Full {
        /// How many the table holds.
        capacity: u32,
    },
    /// The kernel refused the operation.
    #[error("map operation failed: {0}")]
    Kernel(#[from] libbpf_rs::Error),
}

/// A meter a binding is counted against: its key in `METERS` and the rate
/// turn-control gave it (0 when read back from an entry, which holds the
/// key alone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeterRef {
    /// `bpf_common::usage::meter_key` of its name; 0: none.
    pub key: u64,
    /// Application bytes per second, each direction.
    pub bytes_per_second: u64,
}

impl MeterRef {
    /// The meter a rate limit names.
    pub fn of(limit: &RateLimit) -> Self {
        Self {
            key: meter_key(&limit.meter),
            bytes_per_second: limit.bytes_per_second,
        }
    }
}

/// The usage slots and meters, and the agent's bookkeeping of them.
#[derive(Debug)]
pub struct UsageTable {
    meters: MapHandle,
    view: MappedUsage,
    grace: GracePeriod,
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    /// Slots nobody holds, to hand out.
    free: Vec<u32>,
    /// Whether each slot is in `free`: a slot is never handed out twice.
    is_free: Vec<bool>,
    /// Slots handed out that the last sweep found no entry naming.
    unreferenced: HashSet<u32>,
    /// Meters the last sweep found no entry naming.
    unused_meters: HashSet<u64>,
    /// Every meter in `METERS` and its rate, so that neither an install nor
    /// a listing nor a sweep reads the map to learn them.
    rates: HashMap<u64, u64>,
}

impl UsageTable {
    /// The table over the program's `USAGE` and `METERS` maps; the slots
    /// that the (adopted) binding entries name, `held`, stay theirs.
    pub fn new(
        usage: &MapHandle,
        meters: MapHandle,
        held: impl IntoIterator<Item = u32>,
    ) -> anyhow::Result<Self> {
        let view = MappedUsage::new(usage)?;
        let held: HashSet<u32> = held.into_iter().collect();
        // Highest first, so that `pop` hands out low slots first.
        let free: Vec<u32> = (1..USAGE_SLOTS)
            .rev()
            .filter(|slot| !held.contains(slot))
            .collect();
        let mut is_free = vec![false; USAGE_SLOTS as usize];
        for slot in &free {
            is_free[*slot as usize] = true;
        }
        // Adopted meters, read once.
        let rates = meters
            .keys()
            .filter_map(|key| {
                let value = meters.lookup(&key, MapFlags::ANY).ok()??;
                let rate = Meter::from_bytes(&value)?.bytes_per_second();
                Some((u64::from_ne_bytes(key.as_slice().try_into().ok()?), rate))
            })
            .collect();
        Ok(Self {
            meters,
            view,
            grace: GracePeriod::new()?,
            slots: Mutex::new(Slots {
                free,
                is_free,
                rates,
                ..Slots::default()
            }),
        })
    }

    /// A zeroed slot for a new binding.
    pub fn allocate(&self) -> Result<u32, UsageError> {
        let mut slots = lock(&self.slots);
        let slot = slots.free.pop().ok_or(UsageError::Full {
            capacity: USAGE_SLOTS - 1,
        })?;
        slots.is_free[slot as usize] = false;
        slots.unreferenced.remove(&slot);
        self.view.zero(slot);
        Ok(slot)
    }

    /// Takes back the slots of bindings just deleted from the maps, once
    /// [`UsageTable::wait_for_readers`] has returned after their deletion
    /// (and their final figures were read): no program run counts on them
    /// any more. Churn then reuses slots at once instead of two sweeps later.
    pub fn release(&self, released: impl IntoIterator<Item = u32>) {
        let mut slots = lock(&self.slots);
        for slot in released {
            if (1..USAGE_SLOTS).contains(&slot) && !slots.is_free[slot as usize] {
                slots.is_free[slot as usize] = true;
                slots.unreferenced.remove(&slot);
                slots.free.push(slot);
            }
        }
    }

    /// What slot `slot` counted (zero for slot 0 or one out of range).
    pub fn read(&self, slot: u32) -> BindingUsage {
        self.view.read(slot)
    }

    /// Makes `meter` exist at its rate; a meter whose rate changes keeps
    /// its times (no fresh burst).
    pub fn ensure_meter(&self, meter: MeterRef) -> Result<(), UsageError> {
        if meter.key == 0 || meter.bytes_per_second == 0 {
            return Ok(());
        }
        let mut table = lock(&self.slots);
        // Named again: not a meter for the next sweep to take back.
        table.unused_meters.remove(&meter.key);
        if table.rates.get(&meter.key) == Some(&meter.bytes_per_second) {
            return Ok(());
        }
        let key = meter.key.to_ne_bytes();
        let held = self.meters.lookup(&key, MapFlags::ANY)?;
        let held = held.as_deref().and_then(Meter::from_bytes);
        let mut wanted = Meter::new(meter.bytes_per_second);
        if let Some(held) = held {
            if held.ns_per_byte_fp16 == wanted.ns_per_byte_fp16 {
                return Ok(());
            }
            wanted.tat_ns = held.tat_ns;
        }
        self.meters
            .update(&key, wanted.as_bytes(), MapFlags::ANY)
            .map_err(|error| match error.kind() {
                libbpf_rs::ErrorKind::TooBig => UsageError::Full {
                    capacity: self.meters.max_entries(),
                },
                _ => UsageError::Kernel(error),
            })?;
        table.rates.insert(meter.key, meter.bytes_per_second);
        debug!(
            meter = meter.key,
            rate = meter.bytes_per_second,
            "meter set"
        );
        Ok(())
    }

    /// The rate of meter `key` (0 if it does not exist).
    pub fn meter_rate(&self, key: u64) -> u64 {
        lock(&self.slots).rates.get(&key).copied().unwrap_or(0)
    }

    /// Takes back the slots and meters that no entry named in this sweep
    /// nor the one before (`slots`, `meters`: what the entries name now).
    /// Returns how many slots and meters went.
    pub fn collect(&self, slots: &HashSet<u32>, meters: &HashSet<u64>) -> (usize, usize) {
        let mut table = lock(&self.slots);
        let unreferenced: HashSet<u32> = (1..USAGE_SLOTS)
            .filter(|slot| !slots.contains(slot) && !table.is_free[*slot as usize])
            .collect();
        let released: Vec<u32> = unreferenced
            .intersection(&table.unreferenced)
            .copied()
            .collect();
        table.unreferenced = unreferenced;
        for slot in &released {
            table.unreferenced.remove(slot);
            table.is_free[*slot as usize] = true;
        }
        table.free.extend(&released);
        let unused: HashSet<u64> = table
            .rates
            .keys()
            .filter(|key| !meters.contains(key))
            .copied()
            .collect();
        let stale: Vec<u64> = unused.intersection(&table.unused_meters).copied().collect();
        for key in &stale {
            // Gone already or not, the agent no longer counts it.
            let _ = self.meters.delete(&key.to_ne_bytes());
            table.rates.remove(key);
        }
        table.unused_meters = unused;
        (released.len(), stale.len())
    }

    /// Returns once every program run that started before the call has
    /// ended: from then on nothing counts on a binding deleted before it,
    /// and its slot holds its final figures.
    pub fn wait_for_readers(&self) -> Result<(), UsageError> {
        self.grace.wait()
    }
}

/// `USAGE`, mapped into the agent's memory: reading every binding's
/// counters costs no system call.
#[derive(Debug)]
struct MappedUsage {
    base: NonNull<BindingUsage>,
    len: NonZeroUsize,
}

// SAFETY: the mapping is shared memory the agent only touches through
// atomic operations; the pointer does not depend on the thread.
unsafe impl Send for MappedUsage {}
// SAFETY: as above.
unsafe impl Sync for MappedUsage {}

impl MappedUsage {
    fn new(usage: &MapHandle) -> anyhow::Result<Self> {
        anyhow::ensure!(
            usage.map_type() == MapType::Array
                && usage.value_size() as usize == size_of::<BindingUsage>()
                && usage.max_entries() == USAGE_SLOTS,
            "the USAGE map is not an array of {USAGE_SLOTS} usage slots"
        );
        let page = 4096;
        let bytes = (USAGE_SLOTS as usize * size_of::<BindingUsage>()).div_ceil(page) * page;
        let len = NonZeroUsize::new(bytes).context("empty USAGE map")?;
        // SAFETY: a fresh shared mapping of the map's descriptor (an
        // mmapable array), of its whole size; nothing else in this process
        // maps it.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MmapFlags::MAP_SHARED,
                usage.as_fd(),
                0,
            )
        }
        .context("cannot map the USAGE map into memory")?;
        Ok(Self {
            base: base.cast(),
            len,
        })
    }

    /// The 8 counters words of `slot`, or `None` out of range.
    fn words(&self, slot: u32) -> Option<&[AtomicU64; 8]> {
        if slot == 0 || slot >= USAGE_SLOTS {
            return None;
        }
        // SAFETY: `slot` is within the mapping, which lives as long as
        // `self`; a slot is 64 aligned bytes of u64 counters the program
        // changes only atomically.
        Some(unsafe {
            &*self
                .base
                .as_ptr()
                .add(slot as usize)
                .cast::<[AtomicU64; 8]>()
        })
    }

    fn read(&self, slot: u32) -> BindingUsage {
        let Some(words) = self.words(slot) else {
            return BindingUsage::default();
        };
        let counter = |at: usize| Counter {
            packets: words[at].load(Ordering::Relaxed),
            bytes: words[at + 1].load(Ordering::Relaxed),
        };
        BindingUsage {
            client_to_peer: counter(0),
            peer_to_client: counter(2),
            dropped_client_to_peer: counter(4),
            dropped_peer_to_client: counter(6),
        }
    }

    fn zero(&self, slot: u32) {
        if let Some(words) = self.words(slot) {
            for word in words {
                word.store(0, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for MappedUsage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length, unused from now on.
        let _ = unsafe { munmap(self.base.cast(), self.len.get()) };
    }
}

/// A way to wait for an RCU grace period from user space: an update of a
/// map-in-map makes the kernel wait (`synchronize_rcu`) for every running
/// BPF program to end before the system call returns, so that its caller
/// knows no program still uses the old inner map. The agent keeps a
/// one-slot array of maps for that alone.
#[derive(Debug)]
struct GracePeriod {
    outer: MapHandle,
    inner: MapHandle,
}

impl GracePeriod {
    fn new() -> anyhow::Result<Self> {
        let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
            sz: size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        let inner = MapHandle::create(MapType::Array, Some("grace_inner"), 4, 4, 1, &opts)
            .context("cannot create the grace-period inner map")?;
        let outer_opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
            inner_map_fd: inner.as_fd().as_raw_fd() as u32,
            ..opts
        };
        let outer = MapHandle::create(MapType::ArrayOfMaps, Some("grace"), 4, 4, 1, &outer_opts)
            .context("cannot create the grace-period map")?;
        Ok(Self { outer, inner })
    }

    fn wait(&self) -> Result<(), UsageError> {
        let fd = self.inner.as_fd().as_raw_fd() as u32;
        self.outer
            .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)?;
        Ok(())
    }
}

/// A binding's usage on the wire.
pub fn to_wire(usage: &BindingUsage) -> proto::v1::Usage {
    let traffic = |counter: &Counter| {
        Some(proto::v1::Traffic {
            packets: counter.packets,
            bytes: counter.bytes,
        })
    };
    proto::v1::Usage {
        client_to_peer: traffic(&usage.client_to_peer),
        peer_to_client: traffic(&usage.peer_to_client),
        dropped_client_to_peer: traffic(&usage.dropped_client_to_peer),
        dropped_peer_to_client: traffic(&usage.dropped_peer_to_client),
    }
}
