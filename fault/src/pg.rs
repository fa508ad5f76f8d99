//! A throwaway PostgreSQL cluster of the test's own (initdb into a temporary directory, own
//! port), so a test can restart or stall its database without touching anyone else's.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

pub struct TempPostgres {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
    }
}

/// The newest installed server's bin directory (Debian layout).
fn bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    dirs.pop()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().next() == Some("0")))
        .unwrap_or(false)
}

impl TempPostgres {
    /// A fresh cluster, started; `None` when no PostgreSQL server binaries are installed.
    pub fn start() -> Option<TempPostgres> {
        let bin = bindir()?;
        let dir = tempfile::Builder::new().prefix("xpu-fault-pg").tempdir().ok()?;
        if is_root() {
            // initdb refuses to run as root: the cluster belongs to the postgres user.
            let ok = Command::new("chown").arg("postgres").arg(dir.path()).status().is_ok_and(|s| s.success());
            assert!(ok, "chown postgres {}", dir.path().display());
        }
        let pg = TempPostgres { port: crate::free_port(), bin, dir };
        let data = pg.dir.path().join("data");
        let initdb = format!("'{}' -D '{}' -U postgres -A trust", pg.bin.join("initdb").display(), data.display());
        assert!(pg.run(&initdb), "initdb failed");
        assert!(pg.pg_ctl(&["-w", "start"]), "the throwaway cluster does not start");
        Some(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Restarts the server (fast shutdown: connections are terminated).
    pub fn restart(&self) -> bool {
        self.pg_ctl(&["-w", "-m", "fast", "restart"])
    }

    pub fn stop(&self) -> bool {
        self.pg_ctl(&["-w", "-m", "fast", "stop"])
    }

    pub fn start_again(&self) -> bool {
        self.pg_ctl(&["-w", "start"])
    }

    fn pg_ctl(&self, args: &[&str]) -> bool {
        let data = self.dir.path().join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        let cmd = format!(
            "'{}' -D '{}' -o '{}' -l '{}' {}",
            self.bin.join("pg_ctl").display(),
            data.display(),
            opts,
            self.dir.path().join("log").display(),
            args.join(" ")
        );
        self.run(&cmd)
    }

    fn run(&self, cmd: &str) -> bool {
        let mut c = if is_root() {
            let mut c = Command::new("su");
            c.args(["postgres", "-s", "/bin/sh", "-c", cmd]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", cmd]);
            c
        };
        c.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }
}
