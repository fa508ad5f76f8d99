//! The real `kube::Client` (and `kubectl`) against the fake API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod controller;
mod crud;
mod finalizers;
mod kubectl;
mod list;
mod misc;
mod ssa;
mod watch;
