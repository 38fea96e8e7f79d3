//! What the agent's gRPC service, metrics and event loop share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::attach::AttachedMode;
use crate::dataplane::DataPlane;
use crate::events::Reports;
use crate::settings::Settings;

/// The agent's shared state.
#[derive(Debug)]
pub struct AgentState {
    /// The loaded program and its maps.
    pub dataplane: Arc<DataPlane>,
    /// The interfaces the program is attached to, and how.
    pub attachments: Vec<(String, AttachedMode)>,
    /// Whether maps were adopted from an earlier run.
    pub adopted: bool,
    /// When the agent started.
    pub started: Instant,
    /// What the program reported through perf events.
    pub reports: Arc<Reports>,
    settings: Mutex<Settings>,
    generation: AtomicU64,
}

impl AgentState {
    /// Shared state around a loaded data plane whose `CONFIG` map holds `settings`.
    pub fn new(
        dataplane: Arc<DataPlane>,
        settings: Settings,
        attachments: Vec<(String, AttachedMode)>,
        adopted: bool,
        reports: Arc<Reports>,
    ) -> Self {
        Self {
            dataplane,
            attachments,
            adopted,
            started: Instant::now(),
            reports,
            settings: Mutex::new(settings),
            generation: AtomicU64::new(0),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        *self
            .settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes `change(settings)` to the kernel and keeps it; a failed write
    /// keeps the old settings.
    pub fn update_settings(
        &self,
        change: impl FnOnce(&Settings) -> anyhow::Result<Settings>,
    ) -> anyhow::Result<Settings> {
        let mut settings = self
            .settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = change(&settings)?;
        if next != *settings {
            self.dataplane.set_config(&next.to_map())?;
            *settings = next;
        }
        Ok(next)
    }

    /// The generation of the last Sync.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Records a Sync's generation.
    pub fn set_generation(&self, generation: u64) {
        self.generation.store(generation, Ordering::Relaxed);
    }
}
