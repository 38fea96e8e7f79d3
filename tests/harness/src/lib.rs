//! Test harnesses shared by the lab tests (the `tests` package) and turn-control's own
//! integration tests: the real daemon on loopback ([`daemon`]), a blocking STUN/TURN client
//! ([`stun`]), coturn's client tools ([`coturn`]), certificates and a TURN client for TLS
//! ([`tls`]), and finding the workspace's binaries and tools.
//!
//! Small on purpose: turn-control's tests use it as a dev-dependency, so it must not pull in
//! the lab's BPF build.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test harness: a failure is a test failure"
)]

use std::path::PathBuf;

use anyhow::Context as _;

pub mod coturn;
pub mod daemon;
pub mod scratch;
pub mod service_manager;
pub mod stun;
pub mod tls;

/// Whether this is a CI run (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// The path of the tool `name` on `PATH`, or `None` after a loud SKIPPED line
/// naming `test`; under `CI=true` a missing tool fails the test instead.
pub fn required_tool(name: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(
            !in_ci(),
            "{test}: `{name}` is not installed, and CI=true requires it (make setup)"
        );
        eprintln!("\n*** SKIPPED {test}: `{name}` is not installed (CI=true would fail) ***\n");
    }
    found
}

/// A workspace binary: `$NAME_BIN` (upper case, `-` as `_`) when set, else the one cargo
/// built next to the running test executable (tests live in target/<profile>/deps,
/// binaries in target/<profile>).
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let variable = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&variable) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let exe_dir = exe.parent().context("the executable has no directory")?;
    [Some(exe_dir), exe_dir.parent()]
        .into_iter()
        .flatten()
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .with_context(|| {
            format!(
                "{name} is missing next to {}: build the workspace first (`cargo build --workspace`, as `make test` does) or set {variable}",
                exe.display()
            )
        })
}
