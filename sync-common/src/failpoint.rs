//! Crash points for the fault suite: `XPU_FAILPOINTS=name[,name…]` makes the process abort
//! (as a crash would: no cleanup, no flush) when it reaches a named step. Unset, which is
//! always the case in production, a failpoint is one lookup in an empty set.
//!
//! A step taken for many objects (a syncer's steps, taken for every kind it syncs) can be armed
//! for one subject only: `name@Subject` aborts when the step is reached for that subject (e.g.
//! `sync.carry.apply.after@Netdev`), plain `name` at the first object to reach it.

use std::{collections::HashSet, sync::OnceLock};

fn armed() -> &'static HashSet<String> {
    static ARMED: OnceLock<HashSet<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("XPU_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    })
}

fn abort(name: &str, subject: Option<&str>) -> ! {
    match subject {
        Some(subject) => {
            tracing::error!(failpoint = name, subject, "failpoint reached: aborting");
            eprintln!("failpoint {name} reached for {subject}: aborting");
        }
        None => {
            tracing::error!(failpoint = name, "failpoint reached: aborting");
            eprintln!("failpoint {name} reached: aborting");
        }
    }
    std::process::abort();
}

/// Aborts the process if `name` is armed.
pub fn hit(name: &str) {
    if armed().contains(name) {
        abort(name, None);
    }
}

/// Aborts the process if `name` is armed, or `name@subject`.
pub fn hit_for(name: &str, subject: &str) {
    let armed = armed();
    if !armed.is_empty() && armed_for(armed, name, subject) {
        abort(name, Some(subject));
    }
}

fn armed_for(armed: &HashSet<String>, name: &str, subject: &str) -> bool {
    armed.contains(name)
        || armed.iter().any(|a| a.strip_prefix(name).and_then(|r| r.strip_prefix('@')) == Some(subject))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failpoint_is_armed_for_every_subject_or_one() {
        let armed: HashSet<String> = ["a.b".to_string(), "c.d@Netdev".to_string()].into();
        assert!(armed_for(&armed, "a.b", "Netdev"));
        assert!(armed_for(&armed, "a.b", "Vrf"));
        assert!(armed_for(&armed, "c.d", "Netdev"));
        assert!(!armed_for(&armed, "c.d", "Vrf"));
        assert!(!armed_for(&armed, "c", "Netdev"));
        assert!(!armed_for(&armed, "c.d@Net", "dev"));
    }
}
