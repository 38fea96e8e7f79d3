//! Generates the gRPC client, server and the file descriptor set that the
//! agent's reflection service publishes.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("xdp_agent_descriptor.bin"))
        .compile_protos(&["xdp_agent.proto"], &["."])?;
    println!("cargo:rerun-if-changed=xdp_agent.proto");
    Ok(())
}
