//! Policy exceptions, declared by comments in the manifests:
//!
//! ```yaml
//! # policy: allow <rule> for <subject>: <why, in a sentence>
//! ```
//!
//! `<subject>` is a container name for container rules (`run-as-root`, `privileged`,
//! `capability:<CAP>`, `writable-root-fs`, `exec-probe`) and a workload name for pod rules
//! (`host-network`, `host-path`, `host-pid`, `host-ipc`). A marker that is malformed, has no real
//! reason, names an unknown rule, or excuses nothing that any rendered object does is itself an
//! error, so exceptions cannot rot.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Mutex,
};

use crate::rel;

pub const CONTAINER_RULES: &[&str] = &["run-as-root", "privileged", "writable-root-fs", "exec-probe"];
pub const POD_RULES: &[&str] = &["host-network", "host-path", "host-pid", "host-ipc"];
const MIN_REASON: usize = 40;

/// The declared exceptions, and which of them were used.
#[derive(Debug, Default)]
pub struct Exceptions {
    /// (rule, subject) → where it is declared.
    declared: BTreeMap<(String, String), String>,
    used: Mutex<BTreeSet<(String, String)>>,
}

fn known_rule(rule: &str) -> bool {
    CONTAINER_RULES.contains(&rule)
        || POD_RULES.contains(&rule)
        || rule
            .strip_prefix("capability:")
            .is_some_and(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
}

impl Exceptions {
    /// Parses the markers of the given files.
    pub fn scan(files: &[impl AsRef<Path>]) -> Result<Exceptions, Vec<String>> {
        let mut ex = Exceptions::default();
        let mut errors = Vec::new();
        for f in files {
            let f = f.as_ref();
            let Ok(text) = std::fs::read_to_string(f) else {
                errors.push(format!("{}: unreadable", rel(f)));
                continue;
            };
            for (i, line) in text.lines().enumerate() {
                let at = format!("{}:{}", rel(f), i + 1);
                if let Err(e) = ex.parse_line(line, &at) {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() { Ok(ex) } else { Err(errors) }
    }

    /// Parses one line; lines without a marker are fine.
    pub fn parse_line(&mut self, line: &str, at: &str) -> Result<(), String> {
        let Some(comment) = line.trim_start().strip_prefix('#') else { return Ok(()) };
        let Some(rest) = comment.trim_start().strip_prefix("policy:") else { return Ok(()) };
        let bad = |why: &str| {
            format!(
                "{at}: malformed policy exception ({why}): expected `# policy: allow <rule> for <subject>: <reason>`"
            )
        };
        let rest = rest.trim_start().strip_prefix("allow ").ok_or_else(|| bad("no `allow`"))?;
        let (rule, rest) = rest.split_once(" for ").ok_or_else(|| bad("no `for`"))?;
        let (subject, reason) = rest.split_once(':').ok_or_else(|| bad("no `:` before the reason"))?;
        let (rule, subject, reason) = (rule.trim(), subject.trim(), reason.trim());
        if !known_rule(rule) {
            return Err(format!(
                "{at}: unknown policy rule {rule:?} (known: {}, {}, capability:<CAP>)",
                CONTAINER_RULES.join(", "),
                POD_RULES.join(", ")
            ));
        }
        if subject.is_empty() || subject.contains(char::is_whitespace) {
            return Err(bad("the subject is one container or workload name"));
        }
        if reason.len() < MIN_REASON {
            return Err(format!(
                "{at}: the exception {rule} for {subject} needs a real reason (a sentence), not {reason:?}"
            ));
        }
        if let Some(prev) = self.declared.insert((rule.to_string(), subject.to_string()), at.to_string()) {
            return Err(format!("{at}: the exception {rule} for {subject} is already declared at {prev}"));
        }
        Ok(())
    }

    /// Whether `rule` is excused for `subject`; records the use.
    pub fn allows(&self, rule: &str, subject: &str) -> bool {
        let key = (rule.to_string(), subject.to_string());
        let ok = self.declared.contains_key(&key);
        if ok {
            self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        }
        ok
    }

    /// Declared exceptions no rendered object needed.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        self.declared
            .iter()
            .filter(|(k, _)| !used.contains(*k))
            .map(|((rule, subject), at)| {
                format!(
                    "{at}: the exception `{rule}` for {subject} excuses nothing any rendered object does; remove it"
                )
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.declared.len()
    }

    pub fn is_empty(&self) -> bool {
        self.declared.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse_and_bad_ones_are_refused() {
        let mut ex = Exceptions::default();
        ex.parse_line(
            "          # policy: allow run-as-root for host-agent: the kubelet's sockets are root-owned and 0600.",
            "a:1",
        )
        .unwrap();
        ex.parse_line("# an ordinary comment", "a:2").unwrap();
        ex.parse_line("image: x:1", "a:3").unwrap();
        assert!(ex.allows("run-as-root", "host-agent"));
        assert!(!ex.allows("run-as-root", "device-plugin"));
        assert!(!ex.allows("privileged", "host-agent"));
        for bad in [
            "# policy: run-as-root for x: because the sockets are root-owned and 0600 anyway",
            "# policy: allow run-as-root x: because the sockets are root-owned and 0600 anyway",
            "# policy: allow run-as-root for x because the sockets are root-owned and 0600 anyway",
            "# policy: allow rootly for x: because the sockets are root-owned and 0600 anyway",
            "# policy: allow run-as-root for x: needed",
            "# policy: allow run-as-root for host-agent: the kubelet's sockets are root-owned and 0600.",
        ] {
            assert!(ex.parse_line(bad, "b:1").is_err(), "{bad}");
        }
        ex.parse_line(
            "# policy: allow capability:NET_ADMIN for dpu-agent: netlink operations need CAP_NET_ADMIN, nothing else",
            "c:1",
        )
        .unwrap();
        assert_eq!(ex.unused().len(), 1, "{:?}", ex.unused());
    }
}
