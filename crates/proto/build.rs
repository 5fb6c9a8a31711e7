//! Compiles `proto/agent.proto` with protox (a protobuf compiler written in Rust), so
//! building Meridian never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let fds = protox::compile(["proto/agent.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::SmallCodec")
        .compile_fds(fds)?;
    Ok(())
}
