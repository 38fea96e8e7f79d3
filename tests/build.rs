//! Builds the lab's helper XDP programs from `bpf/xdp` and tells the crate where they are.

fn main() {
    let manifest_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match bpf_build::build(&manifest_dir, &["pass"]) {
        Ok(objects) => println!("cargo:rustc-env=LAB_PASS_OBJECT={}", objects[0].display()),
        Err(error) => {
            println!("cargo:warning={error}");
            std::process::exit(1);
        }
    }
}
