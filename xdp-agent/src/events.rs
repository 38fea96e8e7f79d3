//! The perf-event reader: the program reports each CPU's cumulative traffic
//! of a relay reason every `1 << event_interval_log2` packets of it. Events
//! carry totals, not increments, so a lost event delays the figure but loses
//! no bytes; lost events are counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use bpf_common::{Counter, Reason, RelayEvent, Verdict};
use libbpf_rs::PerfBufferBuilder;
use tracing::{trace, warn};

use crate::maps::Maps;
use daemon::lock;

/// What the program reported, shared between the reader thread and readers.
#[derive(Debug, Default)]
pub struct Reports {
    inner: Mutex<ReportsInner>,
}

#[derive(Debug, Default)]
struct ReportsInner {
    /// The latest cumulative counter per (CPU, reason).
    latest: HashMap<(u32, u32), Counter>,
    events: u64,
    lost: u64,
}

impl Reports {
    fn record(&self, cpu: u32, event: RelayEvent) {
        let mut inner = lock(&self.inner);
        inner.events += 1;
        let slot = inner.latest.entry((cpu, event.reason)).or_default();
        // Events of one CPU arrive in order, but keep the larger total anyway.
        if event.total.packets >= slot.packets {
            *slot = event.total;
        }
    }

    fn lose(&self, count: u64) {
        let mut inner = lock(&self.inner);
        inner.lost += count;
    }

    /// Relayed traffic as reported through events, summed over CPUs and reasons.
    pub fn reported(&self) -> Counter {
        let inner = lock(&self.inner);
        inner.latest.values().copied().sum()
    }

    /// Events received and events the kernel could not deliver.
    pub fn events_and_lost(&self) -> (u64, u64) {
        let inner = lock(&self.inner);
        (inner.events, inner.lost)
    }

    /// The relayed total brought up to date: per CPU and reason, the larger of
    /// the last reported total and the exact per-CPU counter read now (the
    /// program reports every few packets, so the counter may be ahead).
    pub fn relayed_total(&self, maps: &Maps) -> Counter {
        let inner = lock(&self.inner);
        let mut total = Counter::default();
        for &reason in Reason::ALL.iter().filter(|r| r.verdict() == Verdict::Tx) {
            let exact = maps.per_cpu(reason).unwrap_or_default();
            let cpus = exact.len().max(
                inner
                    .latest
                    .keys()
                    .map(|(cpu, _)| *cpu as usize + 1)
                    .max()
                    .unwrap_or(0),
            );
            for cpu in 0..cpus {
                let reported = inner
                    .latest
                    .get(&(cpu as u32, reason as u32))
                    .copied()
                    .unwrap_or_default();
                let now = exact.get(cpu).copied().unwrap_or_default();
                let best = if now.packets >= reported.packets {
                    now
                } else {
                    reported
                };
                total = total + best;
            }
        }
        total
    }
}

/// Reads the program's events on a thread until `stop` is set.
pub fn spawn_reader(
    maps: &Maps,
    reports: Arc<Reports>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let samples = Arc::clone(&reports);
    let perf = PerfBufferBuilder::new(maps.events())
        .sample_cb(
            move |cpu: i32, data: &[u8]| match RelayEvent::from_ne_bytes(data) {
                Some(event) => {
                    trace!(
                        cpu,
                        reason = event.reason,
                        bytes = event.total.bytes,
                        "relay event"
                    );
                    samples.record(cpu as u32, event);
                }
                None => warn!(cpu, len = data.len(), "malformed relay event"),
            },
        )
        .lost_cb(move |cpu: i32, count: u64| {
            warn!(cpu, count, "relay events lost");
            reports.lose(count);
        })
        .build()
        .context("cannot open the perf-event buffers")?;
    std::thread::Builder::new()
        .name("perf-events".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Err(error) = perf.poll(Duration::from_millis(200)) {
                    warn!(%error, "polling the perf-event buffers failed");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
        .context("cannot start the perf-event reader")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: Reason, packets: u64, bytes: u64) -> RelayEvent {
        RelayEvent {
            reason: reason as u32,
            reserved: 0,
            total: Counter { packets, bytes },
        }
    }

    #[test]
    fn cumulative_events_survive_losses_and_reordering() {
        let reports = Reports::default();
        reports.record(0, event(Reason::RelayClientToPeerV4V4, 64, 6400));
        reports.record(1, event(Reason::RelayClientToPeerV4V4, 64, 640));
        // A later total replaces an earlier one; an older one arriving late does not.
        reports.record(0, event(Reason::RelayClientToPeerV4V4, 192, 19200));
        reports.record(0, event(Reason::RelayClientToPeerV4V4, 128, 12800));
        reports.record(0, event(Reason::RelayPeerToClientV6V6, 64, 100));
        reports.lose(3);
        assert_eq!(
            reports.reported(),
            Counter {
                packets: 192 + 64 + 64,
                bytes: 19200 + 640 + 100
            }
        );
        assert_eq!(reports.events_and_lost(), (5, 3));
    }
}
