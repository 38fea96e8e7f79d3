//! Builds the XDP program from Rust (`bpf/xdp`, nightly, bpf-linker) and
//! generates its libbpf skeleton.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    if let Err(error) = run() {
        // One clear line in the build log instead of a panic backtrace.
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        println!("cargo:warning={message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let objects = bpf_build::build(&manifest_dir, &["relay"])?;
    // The skeleton is named after the object file up to its first dot.
    let object = out_dir.join("relay.bpf.o");
    fs::copy(&objects[0], &object)?;
    libbpf_cargo::SkeletonBuilder::new()
        .source(&object)
        .obj(&object)
        .generate(out_dir.join("relay.skel.rs"))?;
    Ok(())
}
