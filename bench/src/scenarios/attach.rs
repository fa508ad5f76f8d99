//! attach: host agents call `AttachNetdev` at a target rate (open loop, timed from the scheduled
//! moment); every simulated DPU agent reports `Connected` for the Netdevs arriving on its
//! `WatchDesired` stream; the host sees the whole round trip.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use xpu_proto::broker::v1 as pb;

use super::{PhaseMeter, join_all, open_loop, seed, with_broker};
use crate::{
    agents::{self, Fleet, Probe},
    fixtures,
    report::{Row, ScenarioReport},
    run::Env,
    stats::{SharedLatency, per_sec},
};

pub async fn run(env: &Env) -> ScenarioReport {
    let p = &env.params;
    let mut rep = ScenarioReport::new("attach");
    rep.setup = format!(
        "{} DPU agents, {} host agents, {}/s for {:.0}s, report flush {} ms",
        p.agents,
        p.hosts,
        p.rate,
        p.duration.as_secs_f64(),
        p.flush_interval.as_millis()
    );
    with_broker(env, &mut rep, &[], async |broker, rep| body(env, broker, rep).await).await;
    rep
}

async fn body(env: &Env, broker: &crate::broker_proc::BrokerProc, rep: &mut ScenarioReport) -> anyhow::Result<()> {
    let p = &env.params;
    let mut admin = agents::admins(broker.grpc, &env.pki, 1).await?;
    seed(&mut admin[0]).await?;
    let fleet = Fleet::new(p.flush_interval);
    fleet.auto_report.store(true, Ordering::Release);
    let serials: Vec<String> = (0..p.agents).map(fixtures::serial).collect();
    let setup = agents::start_fleet(broker.grpc, &env.pki, &fleet, serials, false, env.epoch).await?;
    let agents = setup.agents;
    let hosts = agents::start_hosts(broker.grpc, &env.pki, (0..p.hosts).map(fixtures::node).collect()).await?;
    rep.notes.push(format!(
        "setup: {} agents connected in {:.1}s, registered in {:.1}s, watching in {:.1}s; {} hosts connected",
        agents.len(),
        setup.connect_secs,
        setup.register_secs,
        setup.watch_secs,
        hosts.len()
    ));
    let hosts = Arc::new(hosts);

    // Warm-up (not measured): a second of the same load.
    let warm = Duration::from_secs_f64((p.duration.as_secs_f64() / 5.0).clamp(0.2, 1.0));
    let total = (p.rate * (p.duration + warm).as_secs_f64()).ceil() as usize + 16;
    let probe = Probe::new(total);
    fleet.probe.store(Some(Arc::clone(&probe)));
    let rtt = Arc::new(SharedLatency::default());
    let warm_rtt = Arc::new(SharedLatency::default());
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let n_agents = p.agents;
    let call = |measured: bool, probe: Arc<Probe>| {
        let hosts = Arc::clone(&hosts);
        let hist = Arc::clone(if measured { &rtt } else { &warm_rtt });
        let ok = Arc::clone(&ok);
        let failed = Arc::clone(&failed);
        let first_error = Arc::clone(&first_error);
        move |i: u64, at: Instant| {
            let dpu = usize::try_from(i).unwrap_or(0) % n_agents;
            let vf = usize::try_from(i).unwrap_or(0) / n_agents;
            let host = &hosts[dpu % hosts.len()];
            let mut client = host.client.clone();
            let serial = fixtures::serial(dpu);
            let req = pb::AttachNetdevRequest {
                namespace: fixtures::NAMESPACE.into(),
                labels: [(fixtures::SEQ_LABEL.to_string(), i.to_string())].into(),
                spec: Some(fixtures::netdev_spec(&serial, vf, &host.node)),
                timeout_ms: 30_000,
            };
            let probe = Arc::clone(&probe);
            let hist = Arc::clone(&hist);
            let ok = Arc::clone(&ok);
            let failed = Arc::clone(&failed);
            let first_error = Arc::clone(&first_error);
            async move {
                probe.sent_at(i, at);
                match client.attach_netdev(req).await {
                    Ok(_) => {
                        hist.record(at.elapsed());
                        if measured {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        if measured {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Ok(mut f) = first_error.lock()
                            && f.is_none()
                        {
                            *f = Some(format!("{}: {}", e.code(), e.message()));
                        }
                    }
                }
            }
        }
    };
    let (warm_n, warm_tasks) = open_loop(p.rate, warm, 0, call(false, Arc::clone(&probe))).await;
    join_all(warm_tasks, Duration::from_secs(40)).await;
    // Deliveries of the warm-up do not count.
    let probe_measured = Probe::new(total);
    fleet.probe.store(Some(Arc::clone(&probe_measured)));

    let meter = PhaseMeter::start("attach", Some(broker), None).await;
    let before = broker.metrics().await;
    let started = Instant::now();
    let (n, tasks) = open_loop(p.rate, p.duration, warm_n, call(true, Arc::clone(&probe_measured))).await;
    let late = join_all(tasks, Duration::from_secs(40)).await;
    let elapsed = started.elapsed();
    rep.phases.push(meter.finish(Some(broker)).await);
    let after = broker.metrics().await;

    rep.notes.push(format!(
        "agent streams over the whole run: {} initial snapshots, {} resyncs required, {} stream errors",
        fleet.resync_initial.load(Ordering::Relaxed),
        fleet.resync_required.load(Ordering::Relaxed),
        fleet.stream_errors.load(Ordering::Relaxed)
    ));
    let ok_n = ok.load(Ordering::Relaxed);
    let fail_n = failed.load(Ordering::Relaxed);
    rep.push(
        Row::new("attach.rtt", "AttachNetdev round trip (host, from schedule)")
            .latency(rtt.summary())
            .count(ok_n)
            .rate(per_sec(ok_n, p.duration))
            .note(format!("offered {:.0}/s, {n} scheduled, {fail_n} failed, {late} unfinished", p.rate)),
    );
    rep.push(
        Row::new("attach.delivery", "  of it: Netdev on the DPU's WatchDesired stream")
            .latency(probe_measured.deliveries())
            .note("from the scheduled send to the agent's receipt"),
    );
    let broker_count = after.get("xpu_attach_duration_seconds_count") - before.get("xpu_attach_duration_seconds_count");
    let broker_sum = after.get("xpu_attach_duration_seconds_sum") - before.get("xpu_attach_duration_seconds_sum");
    if broker_count > 0.0 {
        rep.push(
            Row::new("attach.server", "  broker-side AttachNetdev (mean, /metrics)")
                .count(broker_count as u64)
                .note(format!("mean {:.2} ms", broker_sum / broker_count * 1000.0)),
        );
    }
    rep.push(
        Row::new("attach.reports", "ReportStatus calls of the DPU agents")
            .count(fleet.report_calls.load(Ordering::Relaxed))
            .note(format!(
                "{} reports accepted, {} calls failed; {} heartbeats",
                fleet.reports_accepted.load(Ordering::Relaxed),
                fleet.report_errors.load(Ordering::Relaxed),
                fleet.heartbeats.load(Ordering::Relaxed)
            )),
    );
    if let Some(w) = warm_rtt.summary() {
        rep.notes.push(format!("warm-up: {} attaches, p99 {:.2} ms (not counted)", w.count, w.p99_ms));
    }
    if let Some(e) = first_error.lock().ok().and_then(|f| f.clone()) {
        rep.notes.push(format!("first attach error: {e}"));
    }
    if let Some(e) = fleet.first_error() {
        rep.notes.push(format!("first agent error: {e}"));
    }
    rep.notes.push(format!("measured {:.1}s (schedule {:.1}s)", elapsed.as_secs_f64(), p.duration.as_secs_f64()));
    drop(agents);
    if fail_n > 0 && ok_n == 0 {
        anyhow::bail!("every attach failed");
    }
    Ok(())
}
