//! `xpu-cni`: invoked by the container runtime with the CNI environment and the network
//! configuration on stdin; writes the result (or error) JSON to stdout, logs to stderr.

use std::io::Read;

fn main() -> std::process::ExitCode {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    if env.get("CNI_COMMAND").map(String::as_str) != Some("VERSION")
        && let Err(e) = std::io::stdin().read_to_string(&mut stdin)
    {
        let err = xpu_tenant_sync::cni::types::CniError::new(
            xpu_tenant_sync::cni::types::code::IO,
            format!("reading stdin: {e}"),
        );
        println!("{}", err.to_json(xpu_tenant_sync::cni::types::CNI_VERSION));
        return std::process::ExitCode::FAILURE;
    }
    let out = xpu_tenant_sync::cni::run(&env, &stdin);
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    if out.success { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}
