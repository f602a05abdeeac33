//! Compiles proto/qreformulate/v1/*.proto into message types, client and server stubs, and
//! the encoded file descriptor set that the reflection service serves. protoc comes from
//! `protoc-bin-vendored`, so no system protoc is needed.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Read by prost-build; set before it runs. Build scripts are single-threaded.
    env::set_var("PROTOC", protoc);

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(out_dir.join("qreformulate_descriptor.bin"))
        .compile_protos(&["proto/qreformulate/v1/reformulate.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
