//! Builds the lab's helper XDP programs from `bpf/xdp` and tells the crate where they are.

fn main() {
    let manifest_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match bpf_build::build(
        &manifest_dir,
        &[
            "pass",
            "trivial",
            "floor",
            "floor_fib",
            "trafficgen",
            "sink",
        ],
    ) {
        Ok(objects) => {
            for (name, object) in [
                "LAB_PASS_OBJECT",
                "LAB_TRIVIAL_OBJECT",
                "LAB_FLOOR_OBJECT",
                "LAB_FLOOR_FIB_OBJECT",
                "LAB_TRAFFICGEN_OBJECT",
                "LAB_SINK_OBJECT",
            ]
            .iter()
            .zip(&objects)
            {
                println!("cargo:rustc-env={name}={}", object.display());
            }
        }
        Err(error) => {
            println!("cargo:warning={error}");
            std::process::exit(1);
        }
    }
}
