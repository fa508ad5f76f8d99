//! Generates the Rust code for every `.proto` under `proto/` without a system `protoc`: `protox`
//! parses the files into a descriptor set, `tonic-prost-build` emits messages and services, and
//! `pbjson-build` emits proto3-JSON serde impls for the broker API (its JSON is the CRD shape).

use std::{env, fs, path::PathBuf};

use prost::Message;

const BROKER_PROTOS: &[&str] = &["proto/xpu/broker/v1/resources.proto", "proto/xpu/broker/v1/broker.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(BROKER_PROTOS, ["proto"])?;
    let descriptor_bytes = fds.encode_to_vec();
    fs::write(out.join("xpu_broker_descriptor.bin"), &descriptor_bytes)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    pbjson_build::Builder::new().register_descriptors(&descriptor_bytes)?.build(&[".xpu.broker.v1"])?;
    Ok(())
}
