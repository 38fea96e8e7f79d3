//! The repository's own files, and commands run on them, for the tests of what it ships
//! (`deploy/`: the systemd units, the Prometheus and Grafana files, the Kubernetes
//! manifests).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, ensure};

/// The repository's root.
#[expect(
    clippy::unwrap_used,
    reason = "this crate lives one level below the root"
)]
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `path` under `deploy/`.
pub fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

/// The text of a file the test needs.
///
/// # Panics
/// When it cannot be read: the test cannot go on.
#[expect(clippy::unwrap_used, reason = "a test's input")]
pub fn read(path: &Path) -> String {
    fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))
        .unwrap()
}

/// Runs `command`, failing with its output unless it exits 0.
pub fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

pub use tests_harness::scratch::TempDir;
