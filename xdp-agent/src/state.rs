//! What the agent's gRPC service, metrics and event loop share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use daemon::lock;

use crate::attach::{self, AttachedMode};
use crate::events::Reports;
use crate::maps::Maps;
use crate::settings::Settings;

/// The agent's shared state.
#[derive(Debug)]
pub struct AgentState {
    /// The loaded program and its maps.
    pub maps: Arc<Maps>,
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
        maps: Arc<Maps>,
        settings: Settings,
        attachments: Vec<(String, AttachedMode)>,
        adopted: bool,
        reports: Arc<Reports>,
    ) -> Self {
        Self {
            maps,
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
        lock(&self.settings).clone()
    }

    /// Writes `change(settings)` to the kernel and keeps it; a failed write
    /// keeps the old settings.
    pub fn update_settings(
        &self,
        change: impl FnOnce(&Settings) -> anyhow::Result<Settings>,
    ) -> anyhow::Result<Settings> {
        let mut settings = lock(&self.settings);
        let next = change(&settings)?;
        if next != *settings {
            self.maps.set_config(&next.to_map())?;
            *settings = next.clone();
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

    /// Whether the data plane works now, as the kernel says: the program
    /// attached to every interface it was attached to at start, and the maps
    /// answering. `Err` holds the first reason it does not, in one line.
    pub fn readiness(&self) -> Result<(), String> {
        let program = self.maps.program_fd();
        for (interface, _) in &self.attachments {
            attach::verify_attached(program, interface).map_err(|error| format!("{error:#}"))?;
        }
        self.maps
            .probe()
            .map_err(|error| format!("maps: {error:#}"))
    }
}
