//! Interface operations on the host and inside a pod's network namespace, with iproute2 (and
//! `nsenter` for a namespace given by path, as the runtime passes `CNI_NETNS`).

use std::process::Command;

use serde_json::Value;

use super::types::{CniError, code};

fn run(program: &str, args: &[&str]) -> Result<String, CniError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| CniError::new(code::INTERNAL, format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CniError::new(code::INTERNAL, format!("{program} {} failed", args.join(" ")))
            .with_details(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// `ip <args>` on the host (netns None) or inside the namespace at `netns`.
pub fn ip(netns: Option<&str>, args: &[&str]) -> Result<String, CniError> {
    match netns {
        None => run("ip", args),
        Some(path) => {
            let mut full = vec!["--net=".to_string() + path, "ip".to_string()];
            full.extend(args.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = full.iter().map(String::as_str).collect();
            run("nsenter", &refs)
        }
    }
}

/// The link as `ip -j link show` describes it, or None when absent.
pub fn link(netns: Option<&str>, name: &str) -> Result<Option<Value>, CniError> {
    match ip(netns, &["-j", "link", "show", "dev", name]) {
        Ok(out) => Ok(serde_json::from_str::<Value>(&out).ok().and_then(|v| v.as_array()?.first().cloned())),
        Err(e) if e.details.contains("does not exist") || e.details.contains("Cannot find device") => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn field(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// Addresses (CIDR) configured on a link.
pub fn addresses(netns: Option<&str>, name: &str) -> Result<Vec<String>, CniError> {
    let out = ip(netns, &["-j", "addr", "show", "dev", name])?;
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let mut addrs = Vec::new();
    for l in v.as_array().into_iter().flatten() {
        for a in l.get("addr_info").and_then(Value::as_array).into_iter().flatten() {
            addrs.push(format!("{}/{}", field(a, "local"), field(a, "prefixlen")));
        }
    }
    Ok(addrs)
}

/// Whether the namespace path still exists (a DEL may come after the sandbox is gone).
pub fn netns_exists(path: &str) -> bool {
    !path.is_empty() && std::path::Path::new(path).exists()
}
