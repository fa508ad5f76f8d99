//! The run: environment (limits, certificates, broker binary, database), the selected
//! scenarios in order, and the output.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::Context as _;
use clap::Parser as _;
use serde::Serialize;

use crate::{
    broker_proc::BrokerProc,
    cli::{self, Args, Internal, Output, Params},
    cpu, echo,
    pki::Pki,
    report::{self, ScenarioReport},
    scenarios,
};

pub fn main() -> ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(Internal::EchoServer { dir }) = &args.internal {
        return echo::serve_main(dir);
    }
    let nofile = raise_nofile();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, nofile)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the open-files soft limit to the hard limit (10,000 streams need it); the broker and
/// etcd inherit it. Returns the limit in force.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// What every scenario shares.
pub struct Env {
    pub params: Params,
    pub pki: Pki,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub broker_bin: PathBuf,
    pub admin_url: String,
    /// The throw-away database: `xpu_bench_<pid>`.
    pub db: String,
    pub broker_log: String,
    /// The scenario whose broker `--keep` leaves running (the last one run).
    pub keep_for: Option<&'static str>,
    pub epoch: Instant,
}

impl Env {
    pub async fn broker(&self, extra: &[&str]) -> anyhow::Result<BrokerProc> {
        BrokerProc::start(&self.broker_bin, &self.pki, &self.admin_url, &self.db, &self.broker_log, extra).await
    }
}

fn find_broker(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        anyhow::ensure!(p.exists(), "--broker-bin {} does not exist", p.display());
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the bench binary has no directory")?;
    // The release broker next to a release bench, or in ../release beside a debug one.
    let mut candidates = Vec::new();
    if dir.file_name().is_some_and(|n| n == "release") {
        candidates.push(dir.join("xpu-broker"));
    }
    if let Some(target) = dir.parent() {
        candidates.push(target.join("release").join("xpu-broker"));
    }
    if let Some(found) = candidates.iter().find(|p| p.exists()) {
        return Ok(found.clone());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("no workspace root")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("no release xpu-broker found; running `cargo build --release -p xpu-broker` in {}", root.display());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "xpu-broker"])
        .current_dir(root)
        .status()
        .context("running cargo")?;
    anyhow::ensure!(status.success(), "cargo build --release -p xpu-broker failed");
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), PathBuf::from);
    let built = target.join("release").join("xpu-broker");
    anyhow::ensure!(built.exists(), "{} missing after the build", built.display());
    Ok(built)
}

fn env_quick(a: &Args) -> bool {
    a.quick
}

#[derive(Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub cpu_model: String,
    pub kernel: String,
    pub open_files_limit: u64,
}

pub fn machine(nofile: u64) -> Machine {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        cpu_model,
        kernel,
        open_files_limit: nofile,
    }
}

#[derive(Serialize)]
struct JsonOut<'a> {
    machine: Machine,
    params: &'a Params,
    scenarios: &'a [ScenarioReport],
    ratios: Vec<report::Comparison>,
}

async fn run(args: Args, nofile: u64) -> anyhow::Result<ExitCode> {
    let params = Params::from_args(&args);
    let selected = cli::selected(&args)?;
    let m = machine(nofile);
    if args.output == Output::Table {
        println!(
            "xpu-bench: {} cores ({}), {:.1} GiB, kernel {}, open files {}{}",
            m.cores,
            m.cpu_model,
            m.memory_gib,
            m.kernel,
            m.open_files_limit,
            if cfg!(debug_assertions) { " — DEBUG build of the bench: numbers are not representative" } else { "" }
        );
        println!(
            "params: agents {} hosts {} rate {}/s duration {:.1}s objects {} payload {}B concurrency {} fabric {}/s \
             flush {}ms{}",
            params.agents,
            params.hosts,
            params.rate,
            params.duration.as_secs_f64(),
            params.objects,
            params.payload,
            params.concurrency,
            params.fabric_rate,
            params.flush_interval.as_millis(),
            if params.quick { " (quick)" } else { "" }
        );
    }
    let needed = (params.agents + params.hosts) as u64 + 256;
    if needed > nofile {
        eprintln!(
            "warning: {} agents + {} hosts need about {needed} open files, the limit is {nofile}; lower --agents/--hosts",
            params.agents, params.hosts
        );
    }
    let tmp = tempfile::Builder::new().prefix("xpu-bench-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let pki = Pki::new(&dir)?;
    let broker_bin = find_broker(args.broker_bin.as_deref())?;
    scenarios::QUICK.store(env_quick(&args), std::sync::atomic::Ordering::Relaxed);
    if args.perf {
        crate::perf::enable(dir.clone());
    }
    eprintln!("broker: {}; work dir {}", broker_bin.display(), dir.display());
    let env = Env {
        params,
        pki,
        dir,
        _tmp: if args.keep {
            // Left in place for inspection.
            let _ = tmp.keep();
            None
        } else {
            Some(tmp)
        },
        broker_bin,
        admin_url: args.database_url.clone(),
        db: format!("xpu_bench_{}", std::process::id()),
        broker_log: args.broker_log.clone(),
        keep_for: if args.keep { selected.last().copied() } else { None },
        epoch: Instant::now(),
    };
    let mut reports = Vec::new();
    for name in selected {
        eprintln!("-- scenario {name}");
        let started = Instant::now();
        let mut rep = match name {
            "limits" => scenarios::limits::run(&env).await,
            "attach" => scenarios::attach::run(&env).await,
            "write" => scenarios::write::run(&env).await,
            "fanout" => scenarios::fanout::run(&env).await,
            "reconnect" => scenarios::reconnect::run(&env).await,
            "etcd" => scenarios::etcd::run(&env).await,
            other => {
                let mut r = ScenarioReport::new(other);
                r.error = Some("unknown scenario".into());
                r
            }
        };
        rep.seconds = started.elapsed().as_secs_f64();
        rep.bench_memory = cpu::memory(std::process::id());
        if args.output == Output::Table {
            print!("{}", report::table(&rep));
        }
        if let Some(e) = &rep.error {
            eprintln!("scenario {name} failed: {e}");
        }
        reports.push(rep);
    }
    let ratios = report::comparisons(&reports);
    match args.output {
        Output::Table => print!("{}", report::comparisons_table(&ratios)),
        Output::Json => {
            let out = JsonOut { machine: m, params: &env.params, scenarios: &reports, ratios };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    let failed = reports.iter().filter(|r| r.error.is_some()).count();
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
