//! Smoke test of the load generator: `xpu-bench --quick` runs every scenario briefly against a
//! real broker process and real Postgres, completes, and prints every scenario's table. It never
//! asserts a speed: the figures belong in BENCHMARKS.md, taken from a release build.

use std::path::PathBuf;
use std::process::Command;

fn broker_binary() -> PathBuf {
    // `cargo test --workspace` builds every binary of the workspace before running tests; the
    // broker sits next to the bench in the same profile directory.
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_xpu-bench"));
    let broker = bench.with_file_name("xpu-broker");
    assert!(
        broker.exists(),
        "{} is missing: run the workspace's tests (`cargo test --workspace`), which build the broker too",
        broker.display()
    );
    broker
}

#[test]
fn quick_runs_every_scenario_and_prints_its_tables() {
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let out = Command::new(env!("CARGO_BIN_EXE_xpu-bench"))
        .arg("--quick")
        .arg("--broker-bin")
        .arg(broker_binary())
        .arg("--database-url")
        .arg(&database_url)
        .output()
        .expect("xpu-bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "xpu-bench --quick failed ({}):\n{stdout}\n{stderr}", out.status);
    for scenario in ["limits", "attach", "write", "fanout", "reconnect", "etcd"] {
        let header = format!("\n== {scenario} (");
        let at = stdout.find(&header).unwrap_or_else(|| panic!("no table for {scenario}:\n{stdout}"));
        let table = &stdout[at + header.len()..];
        let table = &table[..table.find("\n== ").unwrap_or(table.len())];
        assert!(!table.contains("FAILED"), "{scenario} failed:\n{table}");
        assert!(table.contains("\nmetric "), "{scenario} printed no rows:\n{table}");
    }
    assert!(stdout.contains("\n== ratios (this run)"), "no ratios table:\n{stdout}");
}
