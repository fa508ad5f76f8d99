//! etcd: the same write + watch fan-out workload against the broker and against etcd 3.4 (the
//! store Kubernetes watches through), side by side: closed-loop writes of LogicalBridge-sized
//! objects, a fabric key every watcher wants, and per-DPU keys each watcher's prefix covers.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;

use super::{
    PhaseMeter, connections_for, fanout, join_all, open_loop, preload_netdevs, seed, with_broker,
    write::{self, PhaseResult},
};
use crate::{
    agents::{self, Fleet, Probe},
    etcd::{self, EtcdProc, WatchCounters},
    fixtures,
    pb::etcd as epb,
    report::ScenarioReport,
    run::Env,
    stats::SharedLatency,
};

pub async fn run(env: &Env) -> ScenarioReport {
    let p = &env.params;
    let mut rep = ScenarioReport::new("etcd");
    rep.setup = format!(
        "both: writes with concurrency {} for {:.0}s; {} watchers (own mTLS connection each); fabric {}/s and per-DPU \
         {}/s for {:.0}s",
        p.concurrency,
        p.duration.as_secs_f64(),
        p.agents,
        p.fabric_rate,
        p.rate,
        p.duration.as_secs_f64()
    );
    with_broker(env, &mut rep, &[], async |broker, rep| {
        let admins = agents::admins(broker.grpc, &env.pki, connections_for(p.concurrency)).await?;
        let mut first = admins[0].clone();
        seed(&mut first).await?;
        preload_netdevs(&admins, p.agents, p.agents, p.concurrency, &Default::default()).await?;
        let fleet = Fleet::new(p.flush_interval);
        let serials: Vec<String> = (0..p.agents).map(fixtures::serial).collect();
        let setup = agents::start_fleet(broker.grpc, &env.pki, &fleet, serials, false, env.epoch).await?;
        // Every stream has replayed to the head before the first timed write, as etcd's
        // watchers are connected before its puts: the phases measure the live path.
        rep.notes.push(format!("broker watchers: {}", agents::wait_at_head(&mut first, &setup.agents).await?));
        let (w, phase) = write::spec_phase(env, broker).await?;
        rep.phases.push(phase);
        rep.push(w.row("etcd.broker.write", "broker: spec writes (Apply LogicalBridge)"));
        let (f, phase) = fanout::fabric_phase(env, broker, &fleet, &admins).await?;
        rep.phases.push(phase);
        f.rows(rep, "etcd.broker.fabric", "broker: fabric update", p.agents);
        let (n, phase) = fanout::netdev_phase(env, broker, &fleet, &admins, p.agents, 0).await?;
        rep.phases.push(phase);
        n.rows(rep, "etcd.broker.netdev", "broker: Netdev update", 1);
        if let Some(m) = broker.memory() {
            rep.notes.push(format!("broker peak RSS {:.1} MiB", m.peak_rss_kib as f64 / 1024.0));
        }
        drop(setup);
        Ok(())
    })
    .await;
    if rep.error.is_some() {
        return rep;
    }
    if let Err(e) = etcd_side(env, &mut rep).await {
        rep.error = Some(format!("etcd: {e:#}"));
    }
    rep
}

fn lb_body(name: &str, vlan: u32, payload: &HashMap<String, String>) -> Vec<u8> {
    let selector: HashMap<String, String> = [("bench-none".to_string(), "x".to_string())].into();
    serde_json::to_vec(&fixtures::logical_bridge(name, vlan, selector, payload.clone())).unwrap_or_default()
}

async fn etcd_side(env: &Env, rep: &mut ScenarioReport) -> anyhow::Result<()> {
    let p = &env.params;
    let bin = etcd::ensure_installed().await?;
    rep.notes.push(format!("etcd: {} ({})", etcd::version(&bin).await, bin.display()));
    let proc = EtcdProc::start(&bin, &env.pki).await?;
    let result = etcd_workload(env, rep, &proc).await;
    if let Some(m) = crate::cpu::memory(proc.pid) {
        rep.notes.push(format!("etcd peak RSS {:.1} MiB", m.peak_rss_kib as f64 / 1024.0));
    }
    proc.stop().await;
    let _ = p;
    result
}

async fn etcd_workload(env: &Env, rep: &mut ScenarioReport, proc: &EtcdProc) -> anyhow::Result<()> {
    let p = &env.params;
    let payload = fixtures::payload_labels(p.payload);

    // Writes: closed loop, like write::spec_phase.
    let mut clients = Vec::new();
    for _ in 0..connections_for(p.concurrency) {
        clients.push(etcd::kv(proc.addr, &env.pki).await?);
    }
    let objects = p.objects.max(1) as u64;
    let counter = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(SharedLatency::default());
    let first_error = Arc::new(Mutex::new(None::<String>));
    let meter = PhaseMeter::start("etcd puts", None, Some(proc.pid)).await;
    let started = Instant::now();
    let deadline = started + p.duration;
    let mut tasks = Vec::new();
    for w in 0..p.concurrency {
        let mut c = clients[w % clients.len()].clone();
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
                let name = format!("lb-w-{:06}", n % objects);
                let mut labels = payload.clone();
                labels.insert("bench-n".into(), n.to_string());
                let body = lb_body(&name, u32::try_from(n % 4094).unwrap_or(0) + 1, &labels);
                let req = epb::PutRequest {
                    key: format!("/xpu/LogicalBridge/{name}").into_bytes(),
                    value: etcd::value(n, &body),
                    ..Default::default()
                };
                let t = Instant::now();
                match c.put(req).await {
                    Ok(_) => {
                        lat.record(t.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = first_error.lock()
                            && f.is_none()
                        {
                            *f = Some(format!("{}: {}", e.code(), e.message()));
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let w = PhaseResult {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency: lat.summary(),
        first_error: first_error.lock().ok().and_then(|f| f.clone()),
    };
    rep.phases.push(meter.finish(None).await);
    rep.push(w.row("etcd.etcd.write", "etcd: puts (LogicalBridge JSON)"));
    if let Some(e) = &w.first_error {
        rep.notes.push(format!("first etcd put error: {e}"));
    }

    // Watchers: each watches the fabric key and its own DPU's prefix, on its own connection.
    let counters =
        Arc::new(WatchCounters { probe: ArcSwapOption::empty(), events: AtomicU64::new(0), errors: AtomicU64::new(0) });
    let fabric_key = format!("/xpu/LogicalBridge/{}", fixtures::FABRIC_LB).into_bytes();
    let specs: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (0..p.agents)
        .map(|i| {
            let prefix = format!("/xpu/Netdev/{}/", fixtures::serial(i)).into_bytes();
            vec![(fabric_key.clone(), Vec::new()), (prefix.clone(), etcd::prefix_end(&prefix))]
        })
        .collect();
    let t = Instant::now();
    let watchers = etcd::watchers(proc.addr, &env.pki, specs, &counters).await?;
    rep.notes.push(format!("etcd: {} watchers connected in {:.1}s", watchers.len(), t.elapsed().as_secs_f64()));
    let kv = clients[0].clone();

    // Fabric key every watcher wants.
    let total = (p.fabric_rate * p.duration.as_secs_f64()).ceil() as usize + 2;
    let probe = Probe::new(total);
    counters.probe.store(Some(Arc::clone(&probe)));
    let failed = Arc::new(AtomicU64::new(0));
    let meter = PhaseMeter::start("etcd fabric fan-out", None, Some(proc.pid)).await;
    let started = Instant::now();
    let (n, tasks) = open_loop(p.fabric_rate, p.duration, 0, |i, at| {
        let mut kv = kv.clone();
        let probe = Arc::clone(&probe);
        let failed = Arc::clone(&failed);
        let body = lb_body(fixtures::FABRIC_LB, 10, &fixtures::labels(&payload, Some(i)));
        let key = fabric_key.clone();
        async move {
            probe.sent_at(i, at);
            if kv.put(epb::PutRequest { key, value: etcd::value(i, &body), ..Default::default() }).await.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await;
    join_all(tasks, Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    let expected = u32::try_from(p.agents).unwrap_or(u32::MAX);
    probe.wait_complete(n, expected, Duration::from_secs(15)).await;
    let (completion, complete, incomplete) = probe.completion(expected);
    rep.phases.push(meter.finish(None).await);
    fanout::FanoutResult {
        writes: n,
        write_failed: failed.load(Ordering::Relaxed),
        elapsed,
        delivered: probe.delivered(),
        deliveries: probe.deliveries(),
        completion: completion.summary(),
        complete,
        incomplete,
    }
    .rows(rep, "etcd.etcd.fabric", "etcd: fabric key", p.agents);

    // Per-DPU keys.
    let total = (p.rate * p.duration.as_secs_f64()).ceil() as usize + 2;
    let probe = Probe::new(total);
    counters.probe.store(Some(Arc::clone(&probe)));
    let failed = Arc::new(AtomicU64::new(0));
    let agents_n = p.agents.max(1);
    let meter = PhaseMeter::start("etcd per-DPU delivery", None, Some(proc.pid)).await;
    let started = Instant::now();
    let (n, tasks) = open_loop(p.rate, p.duration, 0, |i, at| {
        let mut kv = clients[usize::try_from(i).unwrap_or(0) % clients.len()].clone();
        let probe = Arc::clone(&probe);
        let failed = Arc::clone(&failed);
        let dpu = usize::try_from(i).unwrap_or(0) % agents_n;
        let serial = fixtures::serial(dpu);
        let res = fixtures::netdev(&serial, 0, &fixtures::node(dpu), fixtures::labels(&payload, Some(i)));
        let body = serde_json::to_vec(&res).unwrap_or_default();
        let key = format!("/xpu/Netdev/{serial}/{}", fixtures::netdev_id(&serial, 0)).into_bytes();
        async move {
            probe.sent_at(i, at);
            if kv.put(epb::PutRequest { key, value: etcd::value(i, &body), ..Default::default() }).await.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await;
    join_all(tasks, Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    probe.wait_complete(n, 1, Duration::from_secs(15)).await;
    let (completion, complete, incomplete) = probe.completion(1);
    rep.phases.push(meter.finish(None).await);
    fanout::FanoutResult {
        writes: n,
        write_failed: failed.load(Ordering::Relaxed),
        elapsed,
        delivered: probe.delivered(),
        deliveries: probe.deliveries(),
        completion: completion.summary(),
        complete,
        incomplete,
    }
    .rows(rep, "etcd.etcd.netdev", "etcd: per-DPU key", 1);
    rep.notes.push(format!(
        "etcd watch events received {}, watch stream errors {}",
        counters.events.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed)
    ));
    drop(watchers);
    Ok(())
}
