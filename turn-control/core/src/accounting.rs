//! Usage accounting and bandwidth limits of the allocations ([`crate::usage`]): the meters of
//! the user-space path, the kernel's figures, and the accounting records.
//!
//! - **User space** meters each relayed packet before it goes out: the allocation's meter of
//!   the direction (`max_bps`), then its user's (`user_max_bps`, shared in
//!   [`crate::Config::bandwidth`] by every core); the excess is dropped and counted as dropped
//!   usage.
//! - **The kernel** enforces its own meters of the same names and rates
//!   ([`crate::usage::RateLimits`], sent with every install) and counts each binding's figures,
//!   which the daemon feeds back as cumulative readings ([`Server::kernel_usage`], and the
//!   final ones with [`Server::channel_removed`]). They add to the allocation's usage and
//!   charge its user-space meters, so that an allocation relaying on both paths gets its rate
//!   in all: user space is held back by what the kernel relayed. The kernel does not learn
//!   user space's bytes, so the kernel path alone may reach the full rate while user space
//!   relays too (a channel offloaded next to Send indications or Data indications); the excess
//!   is bounded by the user-space share.
//! - **Records** ([`Command::Account`]): a start when the Allocate success goes out, an interim
//!   every [`crate::Config::interim_interval`], a stop at the end. The stop of an allocation
//!   whose bindings were in the data plane waits for their final figures, at most
//!   [`KERNEL_FINAL_WAIT`].

use std::time::Instant;

use rand::RngExt as _;

use super::{Command, Server, Timer};
use crate::allocation::{Account, Allocation};
use crate::bandwidth::BandwidthLedger;
use crate::config::KERNEL_FINAL_WAIT;
use crate::stats::Stats;
use crate::types::{ChannelBinding, ChannelNumber, FiveTuple};
use crate::usage::{
    Direction, EndReason, Meter, RateLimits, RateMeter, RecordKind, Traffic, Usage, UsageRecord,
    rfc3339_of_unix_ms, user_of,
};

/// An ended allocation whose stop record waits for the kernel's final figures.
#[derive(Debug)]
pub(super) struct Finishing {
    /// When the stop goes out with what is known.
    pub(super) deadline: Instant,
    /// The stop record, figures to come.
    record: UsageRecord,
    account: Box<Account>,
}

impl Server {
    /// The data plane's latest cumulative figures of `binding` (a periodic poll), for the
    /// binding's current life in the kernel. What they add to the last reading taken into
    /// account goes to the allocation's usage (a reading below it comes from a fresh kernel
    /// entry and counts from zero) and is charged to its meters and its user's. Figures of a
    /// binding the core does not know in the data plane are ignored.
    pub fn kernel_usage(&mut self, now: Instant, binding: &ChannelBinding, cumulative: Usage) {
        self.latest = self.latest.max(now);
        if let Some(id) = self.finishing_bindings.get(binding)
            && let Some(finishing) = self.finishing.get_mut(id)
        {
            let delta = take_reading(&mut finishing.account, binding.channel, cumulative);
            self.stats.usage += delta;
            return;
        }
        let tuple = tuple_of(binding);
        let Some(alloc) = self.allocations.get_mut(&tuple) else {
            return;
        };
        let installed = alloc.relay(binding.relay.family()) == Some(binding.relay)
            && alloc
                .channels
                .get(&binding.channel)
                .is_some_and(|ch| ch.peer == binding.peer && ch.kernel_expires.is_some());
        if !installed && !alloc.account.removing.contains(binding) {
            tracing::trace!(%binding, "kernel figures of a binding not in the data plane");
            return;
        }
        let delta = take_reading(&mut alloc.account, binding.channel, cumulative);
        charge_kernel(&mut alloc.account, &self.config.bandwidth, now, &delta);
        self.stats.usage += delta;
    }

    /// The data plane's answer to [`Command::RemoveChannel`]: the binding's final cumulative
    /// figures (`None`: the data plane could not say). The rest goes to the allocation as with
    /// [`Server::kernel_usage`], and the next life of the binding in the kernel counts from
    /// zero. A stop record waiting for this binding goes out once every binding of its
    /// allocation is answered (`kernel_final` false if one came without figures).
    pub fn channel_removed(
        &mut self,
        now: Instant,
        binding: &ChannelBinding,
        final_cumulative: Option<Usage>,
    ) {
        self.latest = self.latest.max(now);
        if let Some(id) = self.finishing_bindings.remove(binding) {
            let Some(finishing) = self.finishing.get_mut(&id) else {
                return;
            };
            let account = &mut finishing.account;
            match final_cumulative {
                Some(cumulative) => {
                    self.stats.usage += take_reading(account, binding.channel, cumulative);
                }
                None => account.kernel_incomplete = true,
            }
            account.kernel_seen.remove(&binding.channel);
            account.removing.remove(binding);
            if account.removing.is_empty() {
                self.finish(now, id);
            }
            return;
        }
        let Some(alloc) = self.allocations.get_mut(&tuple_of(binding)) else {
            return;
        };
        if !alloc.account.removing.remove(binding) {
            return;
        }
        match final_cumulative {
            Some(cumulative) => {
                let delta = take_reading(&mut alloc.account, binding.channel, cumulative);
                charge_kernel(&mut alloc.account, &self.config.bandwidth, now, &delta);
                self.stats.usage += delta;
            }
            None => alloc.account.kernel_incomplete = true,
        }
        alloc.account.kernel_seen.remove(&binding.channel);
    }

    /// The meters of `binding`'s allocation, as in [`Command::InstallChannel`]: for a full
    /// sync of [`Server::channel_bindings`]. None for a binding of no allocation.
    pub fn channel_limits(&self, binding: &ChannelBinding) -> RateLimits {
        self.allocations
            .get(&tuple_of(binding))
            .map(|alloc| rate_limits(&alloc.account))
            .unwrap_or_default()
    }

    /// The account of a new allocation of `username` granted `max_bps`: a random id, the
    /// start time, its meters; its user's meters joined if the user has a `user_max_bps`.
    pub(super) fn open_account(
        &mut self,
        now: Instant,
        username: &str,
        max_bps: Option<u64>,
    ) -> Account {
        let user = user_of(username);
        let mut account = Account::new(self.rng.random(), self.unix_ms(now), user.into());
        account.max_bps = max_bps;
        account.meters = max_bps.map(|rate| {
            let meter = RateMeter::new(rate, now);
            [meter.clone(), meter]
        });
        account.user_max_bps = self.config.limits_of(user).user_max_bps;
        if let Some(rate) = account.user_max_bps {
            self.config.bandwidth.join(user, rate, now);
        }
        account
    }

    /// The start record of `tuple`'s allocation, unless it went out already (a restored
    /// allocation's did before the restart); arms the interim timer.
    pub(super) fn start_record(&mut self, now: Instant, tuple: &FiveTuple) {
        let Some(alloc) = self.allocations.get(tuple) else {
            return;
        };
        if alloc.account.sequence > 0 {
            self.arm_interim(now, tuple);
            return;
        }
        let record = self.record(RecordKind::Start, tuple, alloc, now);
        if let Some(alloc) = self.allocations.get_mut(tuple) {
            alloc.account.sequence = 1;
        }
        self.commands.push_back(Command::Account { record });
        self.arm_interim(now, tuple);
    }

    /// The interim record of `tuple`'s allocation, due now; arms the next.
    ///
    /// The allocation is marked changed for the journal here, and not per packet: its saved
    /// usage (and record sequence) is then at most one interval old. A crash loses at most
    /// one interval of user-space counts; the kernel's counts lose nothing, as they are
    /// cumulative in the kernel and the saved last readings (`kernel_seen`) go with the saved
    /// usage.
    pub(super) fn interim_record(&mut self, now: Instant, tuple: &FiveTuple) {
        let Some(alloc) = self.allocations.get(tuple) else {
            return;
        };
        let record = self.record(RecordKind::Interim, tuple, alloc, now);
        if let Some(alloc) = self.allocations.get_mut(tuple) {
            alloc.account.sequence += 1;
        }
        self.commands.push_back(Command::Account { record });
        self.mark_changed(tuple);
        self.arm_interim(now, tuple);
    }

    fn arm_interim(&mut self, now: Instant, tuple: &FiveTuple) {
        let (Some(interval), Some(alloc)) = (
            self.config.interim_interval,
            self.allocations.get_mut(tuple),
        ) else {
            return;
        };
        let next = now + interval;
        alloc.account.next_interim = Some(next);
        self.timers.schedule(Timer::Interim(*tuple), next);
    }

    /// The end of the account of `tuple`'s allocation `alloc`, deleted at `now` for `reason`:
    /// its bandwidth and user meters are released, and its stop record goes out, or waits
    /// (with `wait`) for the final figures of the bindings being removed from the data plane.
    /// An allocation whose start never went out gets no stop.
    pub(super) fn close_account(
        &mut self,
        now: Instant,
        tuple: &FiveTuple,
        alloc: Allocation,
        reason: EndReason,
        wait: bool,
    ) {
        self.config.bandwidth.release(alloc.account.max_bps);
        if alloc.account.user_max_bps.is_some() {
            self.config.bandwidth.leave(&alloc.account.user);
        }
        if alloc.account.sequence == 0 {
            return;
        }
        let mut record = self.record(RecordKind::Stop, tuple, &alloc, now);
        record.ended = Some(record.time.clone());
        record.end_reason = Some(reason);
        let finishing = Finishing {
            deadline: now + KERNEL_FINAL_WAIT,
            record,
            account: alloc.account,
        };
        if !wait || finishing.account.removing.is_empty() {
            self.emit_stop(now, finishing);
            return;
        }
        let id = finishing.account.id;
        for binding in &finishing.account.removing {
            self.finishing_bindings.insert(*binding, id);
        }
        self.timers.schedule(Timer::Stop(id), finishing.deadline);
        self.finishing.insert(id, finishing);
    }

    /// The stop of ended allocation `id` goes out with what is known: every final figure came
    /// in, or its time is up.
    pub(super) fn finish(&mut self, now: Instant, id: u64) {
        let Some(finishing) = self.finishing.remove(&id) else {
            return;
        };
        self.timers.cancel(Timer::Stop(id));
        for binding in &finishing.account.removing {
            self.finishing_bindings.remove(binding);
        }
        self.emit_stop(now, finishing);
    }

    /// Every waiting stop goes out now (a shutdown).
    pub(super) fn finish_all(&mut self, now: Instant) {
        let ids: Vec<u64> = self.finishing.keys().copied().collect();
        for id in ids {
            self.finish(now, id);
        }
    }

    fn emit_stop(&mut self, now: Instant, finishing: Finishing) {
        let Finishing {
            mut record,
            account,
            ..
        } = finishing;
        record.time = rfc3339_of_unix_ms(self.unix_ms(now));
        record.sequence = account.sequence;
        record.set_figures(&account.usage, &account.kernel);
        record.kernel_final = Some(account.removing.is_empty() && !account.kernel_incomplete);
        tracing::debug!(allocation = %record.allocation, "accounting stop");
        self.commands.push_back(Command::Account { record });
    }

    /// The `kind` record of `tuple`'s allocation `alloc` at `now`, with its figures so far.
    fn record(
        &self,
        kind: RecordKind,
        tuple: &FiveTuple,
        alloc: &Allocation,
        now: Instant,
    ) -> UsageRecord {
        let account = &alloc.account;
        let mut record = UsageRecord {
            record: kind,
            sequence: account.sequence,
            allocation: format!("{:016x}", account.id),
            time: rfc3339_of_unix_ms(self.unix_ms(now)),
            username: alloc.username.to_string(),
            user: account.user.to_string(),
            realm: self.config.realm.clone(),
            client: tuple.client.0,
            transport: tuple.transport,
            server: tuple.server,
            relay: alloc.relays().map(|relay| relay.0).collect(),
            started: rfc3339_of_unix_ms(account.started_unix_ms),
            ended: None,
            end_reason: None,
            max_bps: account.max_bps,
            client_to_peer: Traffic::default(),
            peer_to_client: Traffic::default(),
            dropped_client_to_peer: Traffic::default(),
            dropped_peer_to_client: Traffic::default(),
            kernel_client_to_peer: Traffic::default(),
            kernel_peer_to_client: Traffic::default(),
            kernel_final: None,
        };
        record.set_figures(&account.usage, &account.kernel);
        record
    }
}

/// Whether a packet of `len` application bytes of `alloc` may be relayed in `direction` at
/// `now` under its `max_bps` and its user's `user_max_bps`; counts it in the usage as
/// relayed or dropped.
pub(super) fn meter(
    alloc: &mut Allocation,
    ledger: &BandwidthLedger,
    stats: &mut Stats,
    now: Instant,
    direction: Direction,
    len: usize,
) -> bool {
    let account = &mut alloc.account;
    let bytes = len as u64;
    let mut admitted = account
        .meters
        .as_mut()
        .is_none_or(|meters| meters[direction.index()].admit(now, bytes));
    if admitted
        && account.user_max_bps.is_some()
        && !ledger.admit(&account.user, direction, now, bytes)
    {
        // The allocation's share is not spent on what the user's limit drops.
        if let Some(meters) = account.meters.as_mut() {
            meters[direction.index()].refund(bytes);
        }
        admitted = false;
    }
    if admitted {
        account.usage.count_relayed(direction, len);
        stats.usage.count_relayed(direction, len);
    } else {
        tracing::trace!(?direction, len, "over the bandwidth limit, dropped");
        account.usage.count_dropped(direction, len);
        stats.usage.count_dropped(direction, len);
    }
    admitted
}

/// The data plane's meters of an allocation's bindings: `allocation:<id>` at its `max_bps`,
/// `user:<user>` at its user's `user_max_bps`.
pub(super) fn rate_limits(account: &Account) -> RateLimits {
    RateLimits {
        allocation: account.max_bps.map(|rate| Meter {
            name: format!("allocation:{:016x}", account.id),
            bytes_per_second: rate,
        }),
        user: account.user_max_bps.map(|rate| Meter {
            name: format!("user:{}", account.user),
            bytes_per_second: rate,
        }),
    }
}

/// The 5-tuple of `binding`'s allocation.
fn tuple_of(binding: &ChannelBinding) -> FiveTuple {
    FiveTuple {
        client: binding.client,
        server: binding.server,
        transport: binding.transport,
    }
}

/// Takes the kernel's cumulative reading of `channel` into `account`: what it adds to the last
/// one, added to the usage and the kernel's part.
fn take_reading(account: &mut Account, channel: ChannelNumber, cumulative: Usage) -> Usage {
    let seen = account.kernel_seen.entry(channel).or_default();
    let delta = cumulative.since(*seen);
    *seen = cumulative;
    account.usage += delta;
    account.kernel += delta;
    delta
}

/// Charges what the kernel relayed (`delta`) to the allocation's meters and its user's.
fn charge_kernel(account: &mut Account, ledger: &BandwidthLedger, now: Instant, delta: &Usage) {
    for direction in [Direction::ClientToPeer, Direction::PeerToClient] {
        let bytes = delta.relayed(direction).bytes;
        if bytes == 0 {
            continue;
        }
        if let Some(meters) = account.meters.as_mut() {
            meters[direction.index()].charge(now, bytes);
        }
        if account.user_max_bps.is_some() {
            ledger.charge(&account.user, direction, now, bytes);
        }
    }
}
