//! xpu-broker: the central control plane that carries DPU networking intent between a tenant
//! cluster and an infrastructure cluster.
//!
//! - [`store`]: Postgres as the source of truth, the revision log, group commit (only module
//!   that speaks SQL);
//! - [`hub`]: in-process fan-out of committed changes to every watch stream;
//! - [`service`]: every RPC as a function of the caller's identity (transport-agnostic);
//! - [`grpc`]: the mTLS gRPC adapter; [`rest`]: health, readiness, metrics;
//! - [`app`]: startup and shutdown; [`cli`]: the `xpu-broker` command line.

pub mod app;
pub mod ca;
pub mod cli;
pub mod ctl;
pub mod error;
pub mod grpc;
pub mod hub;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod rest;
pub mod service;
pub mod store;
pub mod tls;
pub mod token;

pub use app::{App, Config};
pub use error::{Error, Result};
