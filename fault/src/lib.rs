//! The fault harness: the real `xpu-broker` binary as a process that can be killed and
//! restarted, a throwaway Postgres cluster that can be restarted, a TCP proxy that drops,
//! delays, blackholes and resets connections, and small helpers for the scenarios in `tests/`.
//!
//! Test code: it panics with the reason on any setup failure. Each scenario prints its figures
//! as `FAULT <scenario> <key>=<value>` lines (see `RELIABILITY.md`); the long form of every
//! scenario is the same test with `XPU_FAULT_LONG=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod broker;
pub mod http;
pub mod pg;
pub mod proxy;

use std::time::Duration;

/// Whether the long form was asked for (`XPU_FAULT_LONG=1`).
pub fn long() -> bool {
    std::env::var("XPU_FAULT_LONG").is_ok_and(|v| v == "1")
}

/// `short` in CI, `long` with `XPU_FAULT_LONG=1`.
pub fn scale<T>(short: T, long_form: T) -> T {
    if long() { long_form } else { short }
}

/// A figure for RELIABILITY.md.
pub fn report(scenario: &str, key: &str, value: impl std::fmt::Display) {
    println!("FAULT {scenario} {key}={value}");
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` every 100 ms until it returns `Some`, or `None` after `within`.
pub async fn wait_for<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
