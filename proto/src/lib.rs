//! Protocol definitions of xpu-broker and the code generated from them.
//!
//! - [`broker::v1`]: the broker API (`xpu.broker.v1`): resource messages, `AgentService`,
//!   `SyncService`, `HostService` and `AdminService`. Messages implement serde with the proto3
//!   JSON mapping, which is also the shape of the Kubernetes objects (`spec`, `status`).
//! - [`opi`]: the OPI EVPN gateway API (`opi_api.network.evpn_gw.v1alpha1` and the
//!   `opinetcommon` types it uses), wire-compatible with OPI's own definitions.

pub mod codec;

pub mod broker {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("xpu.broker.v1");
        include!(concat!(env!("OUT_DIR"), "/xpu.broker.v1.serde.rs"));

        /// Encoded `FileDescriptorSet` of the broker API, for gRPC reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xpu_broker_descriptor.bin"));
    }
}

pub mod opi {
    //! Module paths mirror the proto packages (`opi_api.network.…`) so generated cross-package
    //! references resolve.
    pub mod network {
        pub mod opinetcommon {
            pub mod v1alpha1 {
                #![allow(clippy::all, clippy::pedantic, missing_docs)]
                tonic::include_proto!("opi_api.network.opinetcommon.v1alpha1");
            }
        }

        pub mod evpn_gw {
            pub mod v1alpha1 {
                #![allow(clippy::all, clippy::pedantic, missing_docs)]
                tonic::include_proto!("opi_api.network.evpn_gw.v1alpha1");

                /// Encoded `FileDescriptorSet` of the EVPN gateway API, for gRPC reflection.
                pub const FILE_DESCRIPTOR_SET: &[u8] =
                    include_bytes!(concat!(env!("OUT_DIR"), "/opi_evpn_gw_descriptor.bin"));
            }
        }
    }

    pub use self::network::{evpn_gw::v1alpha1 as evpn_gw, opinetcommon::v1alpha1 as opinetcommon};
}

pub mod kubelet {
    //! The kubelet's device-plugin API (`v1beta1`) and PodResources API (`v1`), wire-compatible.
    pub mod deviceplugin {
        pub mod v1beta1 {
            #![allow(clippy::all, clippy::pedantic, missing_docs)]
            tonic::include_proto!("v1beta1");
        }
    }

    pub mod podresources {
        pub mod v1 {
            #![allow(clippy::all, clippy::pedantic, missing_docs)]
            tonic::include_proto!("v1");
        }
    }
}

pub mod host {
    pub mod v1 {
        //! The host agent's local API (unix socket) for the device plugin and the CNI plugin.
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("xpu.host.v1");
    }
}
