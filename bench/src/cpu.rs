//! Where the machine's CPU went during a phase: the broker process, every Postgres process and
//! this benchmark process, from `/proc/<pid>/stat` (user + system time).

use std::{collections::HashMap, fs, time::Instant};

use serde::Serialize;

fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map_or(100.0, |t| t as f64)
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the full line, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn postgres_ticks() -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let is_pg = fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres");
        if is_pg && let Some(t) = proc_ticks(pid) {
            out.insert(pid, t);
        }
    }
    out
}

/// Busy ticks of the whole machine (all but idle and iowait), from `/proc/stat`.
fn machine_busy_ticks() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return 0 };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    [0usize, 1, 2, 5, 6, 7].iter().filter_map(|i| v.get(*i)).sum()
}

pub struct CpuSnap {
    at: Instant,
    machine: u64,
    target: Option<(u32, u64)>,
    postgres: HashMap<u32, u64>,
    me: u64,
}

/// CPU used during a phase, in percent of one core (200 % = both cores of this machine).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuUse {
    pub server_pct: f64,
    pub postgres_pct: f64,
    pub bench_pct: f64,
    /// Everything else on the machine (other users' builds and tests): measurements taken while
    /// this is high are disturbed.
    pub other_pct: f64,
}

impl CpuSnap {
    /// `server`: the process under test (the broker, etcd or the echo server).
    pub fn take(server: Option<u32>) -> CpuSnap {
        CpuSnap {
            at: Instant::now(),
            machine: machine_busy_ticks(),
            target: server.and_then(|p| proc_ticks(p).map(|t| (p, t))),
            postgres: postgres_ticks(),
            me: proc_ticks(std::process::id()).unwrap_or(0),
        }
    }

    pub fn since(&self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let tps = ticks_per_sec();
        let pct = |ticks: u64| ticks as f64 / tps / wall * 100.0;
        let server = self.target.and_then(|(p, t0)| proc_ticks(p).map(|t| t.saturating_sub(t0))).unwrap_or(0);
        let pg: u64 = postgres_ticks()
            .into_iter()
            .map(|(p, t)| t.saturating_sub(self.postgres.get(&p).copied().unwrap_or(0)))
            .sum();
        let me = proc_ticks(std::process::id()).unwrap_or(0).saturating_sub(self.me);
        let machine = machine_busy_ticks().saturating_sub(self.machine);
        let other = (pct(machine) - pct(server) - pct(pg) - pct(me)).max(0.0);
        CpuUse { server_pct: pct(server), postgres_pct: pct(pg), bench_pct: pct(me), other_pct: other }
    }
}

/// Peak and current resident memory of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    pub peak_rss_kib: u64,
    pub rss_kib: u64,
}

pub fn memory(pid: u32) -> Option<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Memory { peak_rss_kib: field("VmHWM:")?, rss_kib: field("VmRSS:")? })
}
