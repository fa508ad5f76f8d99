//! Crash points for the fault suite: `XPU_FAILPOINTS=name[,name…]` makes the process abort
//! (as a crash would: no cleanup, no flush) when it reaches a named step. Unset, which is
//! always the case in production, a failpoint is one lookup in an empty set.

use std::{collections::HashSet, sync::OnceLock};

fn armed() -> &'static HashSet<String> {
    static ARMED: OnceLock<HashSet<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("XPU_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// Aborts the process if `name` is armed.
pub fn hit(name: &str) {
    if armed().contains(name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}
