//! Generates the Rust code for every `.proto` under `proto/` without a system `protoc`: `protox`
//! parses the files into a descriptor set, `tonic-prost-build` emits messages and services, and
//! `pbjson-build` emits proto3-JSON serde impls for the broker API (its JSON is the CRD shape).

use std::{env, fs, path::PathBuf};

use prost::Message;

const BROKER_PROTOS: &[&str] = &["proto/xpu/broker/v1/resources.proto", "proto/xpu/broker/v1/broker.proto"];

/// The OPI EVPN gateway API, wire-compatible with `opi_api.network.evpn_gw.v1alpha1`.
const OPI_PROTOS: &[&str] = &[
    "proto/network/opinetcommon/networktypes.proto",
    "proto/network/evpn-gw/component.proto",
    "proto/network/evpn-gw/l2_xpu_infra_mgr.proto",
    "proto/network/evpn-gw/l3_xpu_infra_mgr.proto",
];

/// The kubelet's device-plugin (v1beta1) and PodResources (v1) APIs, and the host agent's local API.
const HOST_PROTOS: &[&str] = &[
    "proto/kubelet/deviceplugin/v1beta1/api.proto",
    "proto/kubelet/podresources/v1/api.proto",
    "proto/xpu/host/v1/hostagent.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let broker = protox::compile(BROKER_PROTOS, ["proto"])?;
    let descriptor_bytes = broker.encode_to_vec();
    fs::write(out.join("xpu_broker_descriptor.bin"), &descriptor_bytes)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::BrokerCodec")
        .emit_rerun_if_changed(false)
        .compile_fds(broker)?;
    pbjson_build::Builder::new().register_descriptors(&descriptor_bytes)?.build(&[".xpu.broker.v1"])?;

    let opi = protox::compile(OPI_PROTOS, ["proto"])?;
    fs::write(out.join("opi_evpn_gw_descriptor.bin"), opi.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(opi)?;

    let host = protox::compile(HOST_PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(host)?;
    Ok(())
}
