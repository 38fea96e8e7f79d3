//! Builds the XDP programs of `bpf/xdp` with the nightly toolchain for
//! `bpfel-unknown-none`, for the build scripts of the crates that load them.
//!
//! The BPF crate has its own workspace, toolchain file and `.cargo/config.toml`
//! (target, `build-std`, `bpf-linker`, `--btf`), so it is built by running
//! cargo inside its directory with the outer build's variables removed: they
//! name the stable compiler and flags, and an empty `CARGO_ENCODED_RUSTFLAGS`
//! alone would silently drop `--btf` (libbpf then refuses the object).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fmt, io};

/// Variables of the outer cargo that must not reach the nested build.
const INHERITED_VARIABLES: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTUP_TOOLCHAIN",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_MAKEFLAGS",
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_PKG_NAME",
    "RUSTC_LINKER",
    "TARGET",
    "HOST",
    "PROFILE",
    "OUT_DIR",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
];

/// Why the BPF programs could not be built.
#[derive(Debug)]
pub enum Error {
    /// `rustup` or the nightly cargo could not be started.
    Spawn(io::Error),
    /// The nested cargo build failed; its output is above in the build log.
    Build(std::process::ExitStatus),
    /// The build succeeded but an expected object is missing.
    MissingObject(PathBuf),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn(e) => write!(
                f,
                "cannot run `rustup run nightly cargo` ({e}); run `make setup` to install the BPF toolchain"
            ),
            Error::Build(status) => write!(
                f,
                "building the XDP programs failed ({status}); if bpf-linker is missing, run `make setup`"
            ),
            Error::MissingObject(path) => write!(f, "the XDP build produced no {}", path.display()),
        }
    }
}

impl std::error::Error for Error {}

/// The `bpf/xdp` crate directory, found from a workspace member's manifest dir.
pub fn bpf_crate_dir(manifest_dir: &Path) -> PathBuf {
    let mut dir = manifest_dir.to_path_buf();
    loop {
        let candidate = dir.join("bpf").join("xdp");
        if candidate.join("Cargo.toml").is_file() {
            return candidate;
        }
        if !dir.pop() {
            return manifest_dir.join("../bpf/xdp");
        }
    }
}

/// Builds every program in `bpf/xdp` (release) and returns the object of each
/// binary named in `programs`, in order. Prints `cargo:rerun-if-changed` lines
/// for the BPF sources.
pub fn build(manifest_dir: &Path, programs: &[&str]) -> Result<Vec<PathBuf>, Error> {
    let crate_dir = bpf_crate_dir(manifest_dir);
    let common_dir = crate_dir.join("../common");
    for path in [
        crate_dir.join("src"),
        crate_dir.join("Cargo.toml"),
        crate_dir.join(".cargo/config.toml"),
        crate_dir.join("rust-toolchain.toml"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--release", "--bins"])
        .current_dir(&crate_dir);
    for name in INHERITED_VARIABLES {
        cargo.env_remove(name);
    }
    // Cargo also exports CARGO_CFG_*, CARGO_FEATURE_* and DEP_* to build scripts.
    for (name, _) in env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_CFG_")
            || name.starts_with("CARGO_FEATURE_")
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("DEP_")
        {
            cargo.env_remove(name.as_ref());
        }
    }
    let status = cargo.status().map_err(Error::Spawn)?;
    if !status.success() {
        return Err(Error::Build(status));
    }

    let release = crate_dir.join("target/bpfel-unknown-none/release");
    programs
        .iter()
        .map(|name| {
            let object = release.join(name);
            if object.is_file() {
                Ok(object)
            } else {
                Err(Error::MissingObject(object))
            }
        })
        .collect()
}
