//! Protocol definitions of xpu-broker and the code generated from them.
//!
//! - [`broker::v1`]: the broker API (`xpu.broker.v1`): resource messages, `AgentService`,
//!   `SyncService`, `HostService` and `AdminService`. Messages implement serde with the proto3
//!   JSON mapping, which is also the shape of the Kubernetes objects (`spec`, `status`).

pub mod broker {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("xpu.broker.v1");
        include!(concat!(env!("OUT_DIR"), "/xpu.broker.v1.serde.rs"));

        /// Encoded `FileDescriptorSet` of the broker API, for gRPC reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xpu_broker_descriptor.bin"));
    }
}
