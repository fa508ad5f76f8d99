//! `xpu-cni`: invoked by the container runtime with the CNI environment and the network
//! configuration on stdin; writes the result (or error) JSON to stdout, logs to stderr.

use std::io::Read;

use xpu_tenant_sync::cni::types::{CNI_VERSION, CniError, code};

/// Network configurations are a few kilobytes; anything past this is not one.
const MAX_STDIN: u64 = 1 << 20;

fn main() -> std::process::ExitCode {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    if env.get("CNI_COMMAND").map(String::as_str) != Some("VERSION") {
        let refused = match std::io::stdin().take(MAX_STDIN + 1).read_to_string(&mut stdin) {
            Err(e) => Some(CniError::new(code::IO, format!("reading stdin: {e}"))),
            Ok(n) if n as u64 > MAX_STDIN => Some(
                CniError::new(code::DECODE, "failed to decode the network configuration")
                    .with_details(format!("stdin exceeds {MAX_STDIN} bytes")),
            ),
            Ok(_) => None,
        };
        if let Some(err) = refused {
            println!("{}", err.to_json(CNI_VERSION));
            return std::process::ExitCode::FAILURE;
        }
    }
    let out = xpu_tenant_sync::cni::run(&env, &stdin);
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    if out.success { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}
