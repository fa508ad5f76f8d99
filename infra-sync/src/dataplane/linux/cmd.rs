//! Running iproute2 and nft, and reading their JSON output.
//!
//! The agent drives the kernel through the `ip` and `nft` commands rather than raw netlink:
//! their JSON output and `nft -f` atomic batches are stable, documented interfaces that match
//! what an operator types when debugging a DPU, and the agent is not on any per-packet path, so a
//! few milliseconds per command do not matter.

use serde_json::Value;
use tokio::{io::AsyncWriteExt, process::Command};

use crate::dataplane::{DataplaneError, DpResult};

/// Runs a command; a non-zero exit becomes an error carrying its stderr.
pub async fn run(program: &str, args: &[&str]) -> DpResult<String> {
    let out = Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| DataplaneError::permanent(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DataplaneError::retry(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs a command with `input` on stdin.
pub async fn run_stdin(program: &str, args: &[&str], input: &str) -> DpResult<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DataplaneError::permanent(format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|e| DataplaneError::retry(format!("{program}: writing stdin: {e}")))?;
    }
    let out = child.wait_with_output().await.map_err(|e| DataplaneError::retry(format!("{program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DataplaneError::retry(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `ip <args>`.
pub async fn ip(args: &[&str]) -> DpResult<String> {
    run("ip", args).await
}

/// `ip -j <args>` parsed; empty output is an empty list.
pub async fn ip_json(args: &[&str]) -> DpResult<Vec<Value>> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run("ip", &full).await?;
    if out.trim().is_empty() {
        return Ok(vec![]);
    }
    match serde_json::from_str::<Value>(&out) {
        Ok(Value::Array(items)) => Ok(items),
        Ok(other) => Ok(vec![other]),
        Err(e) => Err(DataplaneError::retry(format!("ip {}: unreadable JSON: {e}", args.join(" ")))),
    }
}

/// One link as `ip -j link show` describes it, or None when it does not exist.
pub async fn link(name: &str) -> DpResult<Option<Value>> {
    match ip_json(&["link", "show", "dev", name]).await {
        Ok(mut v) => Ok(v.pop()),
        Err(e) if e.message.contains("does not exist") || e.message.contains("Cannot find device") => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn link_up(link: &Value) -> bool {
    link.get("flags").and_then(Value::as_array).is_some_and(|f| f.iter().any(|x| x == "UP"))
}

pub fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// `nft -j <args>` parsed into its `nftables` array.
pub async fn nft_json(args: &[&str]) -> DpResult<Vec<Value>> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run("nft", &full).await?;
    let v: Value = serde_json::from_str(&out)
        .map_err(|e| DataplaneError::retry(format!("nft {}: unreadable JSON: {e}", args.join(" "))))?;
    Ok(v.get("nftables").and_then(Value::as_array).cloned().unwrap_or_default())
}

/// Whether an error means "already gone" (deleting twice is fine).
pub fn is_missing(e: &DataplaneError) -> bool {
    let m = e.message.as_str();
    m.contains("Cannot find device")
        || m.contains("does not exist")
        || m.contains("No such file or directory")
        || m.contains("No such device")
        || m.contains("No such process")
        || m.contains("Cannot assign requested address")
}
