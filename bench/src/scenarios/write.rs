//! write: closed-loop spec writes (SyncService.Apply of LogicalBridges by infra-cluster
//! identities) and status writes (ReportStatus batches from many DPU agents), each measured on
//! its own.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use xpu_proto::broker::v1 as pb;

use super::{PhaseMeter, connections_for, preload_netdevs, seed, with_broker};
use crate::{
    agents::{self, Fleet},
    broker_proc::BrokerProc,
    fixtures,
    report::{PhaseUse, Row, ScenarioReport},
    run::Env,
    stats::{SharedLatency, Summary, per_sec},
};

pub async fn run(env: &Env) -> ScenarioReport {
    let p = &env.params;
    let mut rep = ScenarioReport::new("write");
    rep.setup = format!(
        "spec: concurrency {} over {} connections, {} objects; status: {} agents x {} reports per call; {:.0}s each; \
         payload {} B",
        p.concurrency,
        connections_for(p.concurrency),
        p.objects.max(1),
        p.agents,
        p.report_batch,
        p.duration.as_secs_f64(),
        p.payload
    );
    with_broker(env, &mut rep, &[], async |broker, rep| {
        let mut admin = agents::admins(broker.grpc, &env.pki, 1).await?;
        seed(&mut admin[0]).await?;
        let (spec, phase) = spec_phase(env, broker).await?;
        rep.push(spec.row("write.spec", "spec writes (Apply LogicalBridge, closed loop)"));
        rep.phases.push(phase);
        if let Some(e) = spec.first_error {
            rep.notes.push(format!("first spec write error: {e}"));
        }
        status_phase(env, broker, rep).await
    })
    .await;
    rep
}

pub struct PhaseResult {
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    pub latency: Option<Summary>,
    pub first_error: Option<String>,
}

impl PhaseResult {
    pub fn rate(&self) -> f64 {
        per_sec(self.ok, self.elapsed)
    }

    pub fn row(&self, id: &str, metric: &str) -> Row {
        Row::new(id, metric)
            .latency(self.latency)
            .count(self.ok)
            .rate(self.rate())
            .note(format!("{} failed; latency per call", self.failed))
    }
}

fn record_error(slot: &Mutex<Option<String>>, e: String) {
    if let Ok(mut f) = slot.lock()
        && f.is_none()
    {
        *f = Some(e);
    }
}

/// Closed-loop spec writes for the configured duration.
pub async fn spec_phase(env: &Env, broker: &BrokerProc) -> anyhow::Result<(PhaseResult, PhaseUse)> {
    let p = &env.params;
    let clients = agents::syncers(broker.grpc, &env.pki, connections_for(p.concurrency)).await?;
    let payload = fixtures::payload_labels(p.payload);
    let objects = p.objects.max(1) as u64;
    let counter = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(SharedLatency::default());
    let first_error = Arc::new(Mutex::new(None));
    let meter = PhaseMeter::start("spec writes", Some(broker), None).await;
    let started = Instant::now();
    let deadline = started + p.duration;
    let mut tasks = Vec::new();
    for w in 0..p.concurrency {
        let mut client = clients[w % clients.len()].clone();
        let (counter, ok, failed, lat, first_error, payload) = (
            Arc::clone(&counter),
            Arc::clone(&ok),
            Arc::clone(&failed),
            Arc::clone(&lat),
            Arc::clone(&first_error),
            payload.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let vlan = u32::try_from(n % 4094).unwrap_or(0) + 1;
                let mut labels = payload.clone();
                labels.insert("bench-n".into(), n.to_string());
                // Matches no DPU: this phase measures the write path, not the fan-out.
                let selector: HashMap<String, String> = [("bench-none".to_string(), "x".to_string())].into();
                let lb = fixtures::logical_bridge(&format!("lb-w-{:06}", n % objects), vlan, selector, labels);
                let t = Instant::now();
                match client.apply(fixtures::apply(lb)).await {
                    Ok(_) => {
                        lat.record(t.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        record_error(&first_error, format!("{}: {}", e.code(), e.message()));
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    let phase = meter.finish(Some(broker)).await;
    let first_error = first_error.lock().ok().and_then(|f| f.clone());
    Ok((
        PhaseResult {
            ok: ok.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            elapsed,
            latency: lat.summary(),
            first_error,
        },
        phase,
    ))
}

/// Closed-loop status writes: every agent reports on its own Netdevs, one call in flight each.
async fn status_phase(env: &Env, broker: &BrokerProc, rep: &mut ScenarioReport) -> anyhow::Result<()> {
    let p = &env.params;
    let per_agent = p.report_batch;
    let admins = agents::admins(broker.grpc, &env.pki, connections_for(p.concurrency)).await?;
    let (n, secs) =
        preload_netdevs(&admins, p.agents, p.agents * per_agent, p.concurrency, &Default::default()).await?;
    rep.notes.push(format!("status phase: {n} netdevs created in {secs:.1}s ({:.0}/s)", n as f64 / secs.max(1e-9)));
    let fleet = Fleet::new(p.flush_interval);
    let serials: Vec<String> = (0..p.agents).map(fixtures::serial).collect();
    let setup = agents::start_fleet(broker.grpc, &env.pki, &fleet, serials, false, env.epoch).await?;
    let accepted = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(SharedLatency::default());
    let first_error = Arc::new(Mutex::new(None));
    let meter = PhaseMeter::start("status writes", Some(broker), None).await;
    let started = Instant::now();
    let deadline = started + p.duration;
    let mut tasks = Vec::new();
    for a in &setup.agents {
        let mut client = a.status_client()?;
        let serial = a.serial.clone();
        let state = Arc::clone(&a.state);
        let (accepted, other, calls, failed, lat, first_error) = (
            Arc::clone(&accepted),
            Arc::clone(&other),
            Arc::clone(&calls),
            Arc::clone(&failed),
            Arc::clone(&lat),
            Arc::clone(&first_error),
        );
        tasks.push(tokio::spawn(async move {
            let mut iteration = 0u64;
            while Instant::now() < deadline {
                iteration += 1;
                let reports = (0..per_agent)
                    .map(|vf| pb::StatusReport {
                        key: Some(fixtures::netdev_key(&fixtures::netdev_id(&serial, vf))),
                        observed_generation: 1,
                        seq: state.seq.fetch_add(1, Ordering::AcqRel),
                        status: Some(pb::status_report::Status::Netdev(fixtures::netdev_status(
                            "Connected",
                            "",
                            "",
                            &format!("report {iteration}"),
                        ))),
                        removed: false,
                    })
                    .collect();
                let t = Instant::now();
                calls.fetch_add(1, Ordering::Relaxed);
                match client.report_status(pb::ReportStatusRequest { serial: serial.clone(), reports }).await {
                    Ok(resp) => {
                        lat.record(t.elapsed());
                        for r in resp.into_inner().results {
                            if r.outcome == pb::ReportOutcome::Accepted as i32 {
                                accepted.fetch_add(1, Ordering::Relaxed);
                            } else {
                                other.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        record_error(&first_error, format!("{}: {}", e.code(), e.message()));
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    rep.phases.push(meter.finish(Some(broker)).await);
    let acc = accepted.load(Ordering::Relaxed);
    rep.push(
        Row::new("write.status", "status writes (ReportStatus, closed loop)")
            .latency(lat.summary())
            .count(acc)
            .rate(per_sec(acc, elapsed))
            .note(format!(
                "{} calls ({:.0}/s), {} not accepted, {} calls failed; latency per call",
                calls.load(Ordering::Relaxed),
                per_sec(calls.load(Ordering::Relaxed), elapsed),
                other.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed)
            )),
    );
    let c = calls.load(Ordering::Relaxed);
    rep.push(
        Row::new("write.status_calls", "  ReportStatus calls")
            .count(c)
            .rate(per_sec(c, elapsed))
            .note(format!("{per_agent} reports per call, one call in flight per agent")),
    );
    if let Some(e) = first_error.lock().ok().and_then(|f| f.clone()) {
        rep.notes.push(format!("first status write error: {e}"));
    }
    drop(setup);
    Ok(())
}
