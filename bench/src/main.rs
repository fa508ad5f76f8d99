//! `xpu-bench`: drives a real `xpu-broker serve` process (release build, real Postgres, real
//! mTLS) with simulated DPU and host agents, and prints latency percentiles and rates. See
//! `BENCHMARKS.md` at the repository root for the scenarios and the measured numbers.

mod agents;
mod broker_proc;
mod cli;
mod cpu;
mod echo;
mod etcd;
mod fixtures;
mod perf;
mod pki;
mod report;
mod run;
mod scenarios;
mod stats;

pub mod pb {
    //! The benchmark's own protos: a minimal etcd v3 client and an echo service.
    pub mod etcd {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("etcdserverpb");
    }
    pub mod echo {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("xpu.bench.echo.v1");
    }
}

fn main() -> std::process::ExitCode {
    run::main()
}
