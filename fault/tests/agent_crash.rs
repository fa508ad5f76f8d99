//! Agent crashes at every step of the attach and detach flows: the real dpu-agent aborts at a
//! failpoint (before/after programming the port, before/after reporting, before/after removing)
//! and is restarted. The end state is always consistent: the attach completes, the netdev is
//! Connected (never stuck Connecting), the dataplane holds exactly one port per live netdev,
//! and a detached netdev's port is gone.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use xpu_fault::report;
use xpu_proto::broker::v1 as pb;
use xpu_testkit::Pki;

const SCENARIO: &str = "agent-crash";
const SERIAL: &str = "bf3-fp";
const ATTACH_STEPS: [&str; 4] =
    ["netdev.program.before", "netdev.program.after", "netdev.report.before", "netdev.report.after"];
const DETACH_STEPS: [&str; 2] = ["netdev.remove.before", "netdev.remove.after"];

/// Waits for the agent to abort at its failpoint; panics if it does not.
async fn aborted(dpu: &mut Dpu, step: &str) {
    let died = xpu_fault::wait_for(Duration::from_secs(30), || {
        let exited = dpu.agent.child.try_wait().ok().flatten();
        async move { exited }
    })
    .await;
    let status = died.unwrap_or_else(|| panic!("the agent never reached {step}:\n{}", dpu.agent.log_text()));
    assert!(!status.success(), "{step}: the agent crashed ({status})");
    assert!(dpu.agent.log_text().contains(&format!("failpoint {step} reached")), "{step}");
}

async fn connected(
    admin: &mut xpu_proto::broker::v1::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    vf: u32,
) -> bool {
    let st = xpu_testkit::netdev_status(admin, "pods", &format!("{SERIAL}-pf0-vf{vf}")).await;
    st.is_some_and(|s| s.phase == "Connected")
}

#[sqlx::test(migrations = false)]
async fn crashes_at_every_step_leave_a_consistent_end_state(pool: PgPool) {
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(&[]);
    let Seeded { broker, url, mut admin } = seeded_broker(&pool, &pki, work.path(), &[]).await;
    let mut dpu = Dpu::start(&pki, &url, SERIAL, &[]).await;
    let host = host(&pki, &broker, "node-fp").await;
    let mut live: Vec<u32> = Vec::new();
    let mut crashes = 0;
    let mut worst = Duration::ZERO;

    for (vf, step) in (0u32..).zip(ATTACH_STEPS) {
        dpu.restart_agent_with_env(&url, &[], &[("XPU_FAILPOINTS", step)]);
        let started = Instant::now();
        let attach = {
            let mut host = host.clone();
            tokio::spawn(async move { xpu_testkit::attach(&mut host, SERIAL, vf, "node-fp").await })
        };
        aborted(&mut dpu, step).await;
        crashes += 1;
        dpu.restart_agent(&url, &[]);
        let r = tokio::time::timeout(Duration::from_secs(60), attach).await.expect("the attach completes").unwrap();
        assert!(r.is_ok(), "{step}: {r:?}\n{}", dpu.agent.log_text());
        worst = worst.max(started.elapsed());
        live.push(vf);
        assert!(connected(&mut admin, vf).await, "{step}: Connected");
        assert_eq!(dpu.sim.counts().bridge_ports, live.len(), "{step}: one port per live netdev");
    }

    for step in DETACH_STEPS {
        let vf = live.remove(0);
        let mark = dpu.agent.log_text().len();
        dpu.restart_agent_with_env(&url, &[], &[("XPU_FAILPOINTS", step)]);
        // The restarted agent is watching again before the detach.
        let settled = xpu_fault::wait_for(Duration::from_secs(30), || async {
            dpu.agent.log_text()[mark..].contains("watching the desired state").then_some(())
        })
        .await;
        assert!(settled.is_some(), "{step}: the agent is back:\n{}", dpu.agent.log_text());
        let started = Instant::now();
        let mut h = host.clone();
        h.detach_netdev(pb::DetachNetdevRequest { namespace: "pods".into(), name: format!("{SERIAL}-pf0-vf{vf}") })
            .await
            .unwrap();
        aborted(&mut dpu, step).await;
        crashes += 1;
        dpu.restart_agent(&url, &[]);
        let gone = xpu_fault::wait_for(Duration::from_secs(60), || {
            let mut admin = admin.clone();
            let ports = dpu.sim.counts().bridge_ports;
            let expected = live.len();
            async move {
                let exists =
                    xpu_testkit::get(&mut admin, pb::Kind::Netdev, "pods", &format!("{SERIAL}-pf0-vf{vf}")).await;
                (exists.is_none() && ports == expected).then_some(())
            }
        })
        .await;
        assert!(gone.is_some(), "{step}: the netdev and its port are gone:\n{}", dpu.agent.log_text());
        worst = worst.max(started.elapsed());
        // The other netdevs end Connected. A restarted agent whose state file lagged its
        // dataplane programs a port it finds missing from that file again, and says
        // `Connecting` while it does: a moment, never a state it stays in.
        for vf in &live {
            let vf = *vf;
            let back = xpu_fault::wait_for(Duration::from_secs(30), || {
                let mut admin = admin.clone();
                async move { connected(&mut admin, vf).await.then_some(()) }
            })
            .await;
            assert!(back.is_some(), "{step}: vf{vf} ends Connected:\n{}", dpu.agent.log_text());
        }
    }

    // Nothing stuck: every netdev in the store is Connected, and the dataplane has exactly them.
    let store = store_state(&mut admin).await;
    let netdevs: Vec<&Id> = store.keys().filter(|k| k.kind == pb::Kind::Netdev as i32).collect();
    assert_eq!(netdevs.len(), live.len());
    for vf in &live {
        assert!(connected(&mut admin, *vf).await);
    }
    assert_eq!(
        dpu.sim.counts().bridge_ports,
        live.len(),
        "no leaked port: live {live:?}, dataplane {:?}\n{}",
        dpu.sim.names(),
        dpu.agent.log_text()
    );
    report(SCENARIO, "failpoints", ATTACH_STEPS.len() + DETACH_STEPS.len());
    report(SCENARIO, "agent_crashes", crashes);
    report(SCENARIO, "leaked_ports", 0);
    report(SCENARIO, "stuck_connecting", 0);
    report(SCENARIO, "worst_step_to_consistent_ms", worst.as_millis());
}
