//! The infrastructure side of xpu-broker.
//!
//! - [`agent`]: the per-DPU agent (`dpu-agent`): registers with the broker, pulls the desired
//!   state of its DPU, programs it through a [`dataplane`] backend and reports what it observed;
//! - [`dataplane`]: the backends: `linux` (the DPU's own kernel) and `opi` (an OPI EVPN gateway);
//! - [`opisim`]: an OPI EVPN gateway server that behaves as OPI's reference bridge does, for tests
//!   and demos (`opi-sim`).

pub mod agent;
pub mod dataplane;
pub mod opisim;
