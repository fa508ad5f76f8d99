//! fanout: N agents watching, M objects pre-loaded; delivery latency from the write to every
//! interested stream: a fabric object every agent wants (one write reaches all N streams) and
//! per-DPU Netdev updates (one write reaches one stream).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use xpu_proto::broker::v1::admin_service_client::AdminServiceClient;

use super::{PhaseMeter, connections_for, join_all, open_loop, preload_netdevs, seed, with_broker};
use crate::{
    agents::{self, Fleet, Probe},
    broker_proc::BrokerProc,
    fixtures,
    report::{PhaseUse, Row, ScenarioReport},
    run::Env,
    stats::{Summary, per_sec},
};

pub async fn run(env: &Env) -> ScenarioReport {
    let p = &env.params;
    let mut rep = ScenarioReport::new("fanout");
    let objects = p.objects.max(p.agents);
    rep.setup = format!(
        "{} agents, {} netdevs pre-loaded, fabric {}/s and netdev {}/s for {:.0}s each",
        p.agents,
        objects,
        p.fabric_rate,
        p.rate,
        p.duration.as_secs_f64()
    );
    with_broker(env, &mut rep, &[], async |broker, rep| body(env, broker, rep, objects).await).await;
    rep
}

async fn body(env: &Env, broker: &BrokerProc, rep: &mut ScenarioReport, objects: usize) -> anyhow::Result<()> {
    let p = &env.params;
    let admins = agents::admins(broker.grpc, &env.pki, connections_for(p.concurrency)).await?;
    let mut first = admins[0].clone();
    seed(&mut first).await?;
    let payload = fixtures::payload_labels(p.payload);
    let meter = PhaseMeter::start("preload", Some(broker), None).await;
    let (n, secs) = preload_netdevs(&admins, p.agents, objects, p.concurrency, &payload).await?;
    rep.phases.push(meter.finish(Some(broker)).await);
    rep.push(
        Row::new("fanout.preload", "pre-load netdevs (AdminService.Apply, with IPAM)")
            .count(n as u64)
            .rate(n as f64 / secs.max(1e-9))
            .note(format!("concurrency {}", p.concurrency)),
    );

    // Fresh agents: each starts from revision 0 and gets a snapshot of its DPU's objects.
    let fleet = Fleet::new(p.flush_interval);
    let serials: Vec<String> = (0..p.agents).map(fixtures::serial).collect();
    let meter = PhaseMeter::start("initial sync", Some(broker), None).await;
    let t = Instant::now();
    let setup = agents::start_fleet(broker.grpc, &env.pki, &fleet, serials, true, env.epoch).await?;
    let want = p.agents as u64;
    let deadline = Instant::now() + Duration::from_secs(if p.quick { 30 } else { 180 });
    while fleet.snapshots_done.load(Ordering::Acquire) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sync_secs = t.elapsed().as_secs_f64() - setup.connect_secs - setup.register_secs;
    rep.phases.push(meter.finish(Some(broker)).await);
    let done = fleet.snapshots_done.load(Ordering::Acquire);
    rep.push(
        Row::new("fanout.initial", "initial sync: WatchDesired(0) snapshots complete")
            .count(done)
            .rate(done as f64 / sync_secs.max(1e-9))
            .note(format!(
                "{sync_secs:.2}s for {done}/{want} agents (~{} netdevs each); {} stream errors, {} re-opened; connect \
                 {:.1}s, register {:.1}s",
                objects / p.agents.max(1),
                fleet.stream_errors.load(Ordering::Relaxed),
                fleet.stream_retries.load(Ordering::Relaxed),
                setup.connect_secs,
                setup.register_secs
            )),
    );
    if let Some(m) = broker.memory() {
        rep.notes.push(format!(
            "broker RSS with {} streams and {objects} objects after the initial sync: {:.1} MiB",
            p.agents,
            m.rss_kib as f64 / 1024.0
        ));
    }
    // The delivery phases measure the live path alone: a fresh fleet resumes from the revision
    // it registered at (no snapshots), whatever became of the initial sync.
    let retries_before = fleet.stream_retries.load(Ordering::Relaxed);
    drop(setup);
    let fleet = Fleet::new(p.flush_interval);
    let serials: Vec<String> = (0..p.agents).map(fixtures::serial).collect();
    let setup = agents::start_fleet(broker.grpc, &env.pki, &fleet, serials, false, env.epoch).await?;
    rep.notes.push(format!(
        "initial-sync fleet: {retries_before} streams re-opened after errors; delivery phases use a fresh fleet that \
         resumes from its registration revision"
    ));
    // Every fresh stream has replayed to the head before the first write is timed: the phases
    // measure live delivery, not stream opening.
    rep.notes.push(format!("fresh fleet: {}", agents::wait_at_head(&mut first, &setup.agents).await?));

    let (fabric, phase) = fabric_phase(env, broker, &fleet, &admins).await?;
    rep.phases.push(phase);
    fabric.rows(rep, "fanout.fabric", "fabric update", p.agents);
    let (netdev, phase) = netdev_phase(env, broker, &fleet, &admins, objects, 0).await?;
    rep.phases.push(phase);
    netdev.rows(rep, "fanout.netdev", "Netdev update", 1);
    let m = broker.metrics().await;
    rep.notes.push(format!(
        "streams active {}, cut off as too slow {}; stream errors seen by agents {} (re-opened {})",
        m.sum("xpu_streams_active"),
        m.sum("xpu_streams_lagged_total"),
        fleet.stream_errors.load(Ordering::Relaxed),
        fleet.stream_retries.load(Ordering::Relaxed)
    ));
    if let Some(e) = fleet.first_error() {
        rep.notes.push(format!("first agent error: {e}"));
    }
    drop(setup);
    Ok(())
}

pub struct FanoutResult {
    pub writes: u64,
    pub write_failed: u64,
    pub elapsed: Duration,
    pub delivered: u64,
    pub deliveries: Option<Summary>,
    pub completion: Option<Summary>,
    pub complete: u64,
    pub incomplete: u64,
}

impl FanoutResult {
    pub fn rows(&self, rep: &mut ScenarioReport, id: &str, what: &str, streams: usize) {
        rep.push(
            Row::new(id, format!("{what} -> every interested stream (per delivery)"))
                .latency(self.deliveries)
                .count(self.delivered)
                .rate(per_sec(self.delivered, self.elapsed))
                .note(format!(
                    "{} writes ({} failed) x {streams} stream(s); from send to receipt",
                    self.writes, self.write_failed
                )),
        );
        if streams > 1 {
            rep.push(
                Row::new(&format!("{id}.all"), format!("{what} -> last of {streams} streams (per write)"))
                    .latency(self.completion)
                    .count(self.complete)
                    .note(format!("{} writes did not reach every stream in time", self.incomplete)),
            );
        }
    }
}

async fn finish_probe(probe: &Probe, writes: u64, expected: u32, elapsed: Duration, failed: u64) -> FanoutResult {
    probe.wait_complete(writes, expected, Duration::from_secs(15)).await;
    let (completion, complete, incomplete) = probe.completion(expected);
    FanoutResult {
        writes,
        write_failed: failed,
        elapsed,
        delivered: probe.delivered(),
        deliveries: probe.deliveries(),
        completion: completion.summary(),
        complete,
        incomplete,
    }
}

/// Updates the fabric LogicalBridge (its selector matches every DPU) at the fabric rate.
pub async fn fabric_phase(
    env: &Env,
    broker: &BrokerProc,
    fleet: &Arc<Fleet>,
    admins: &[AdminServiceClient<Channel>],
) -> anyhow::Result<(FanoutResult, PhaseUse)> {
    let p = &env.params;
    let total = (p.fabric_rate * p.duration.as_secs_f64()).ceil() as usize + 2;
    let probe = Probe::new(total);
    fleet.probe.store(Some(Arc::clone(&probe)));
    let failed = Arc::new(AtomicU64::new(0));
    let payload = fixtures::payload_labels(p.payload);
    let meter = PhaseMeter::start("fabric fan-out", Some(broker), None).await;
    let started = Instant::now();
    let (n, tasks) = open_loop(p.fabric_rate, p.duration, 0, |i, at| {
        let mut admin = admins[usize::try_from(i).unwrap_or(0) % admins.len()].clone();
        let probe = Arc::clone(&probe);
        let failed = Arc::clone(&failed);
        let lb =
            fixtures::logical_bridge(fixtures::FABRIC_LB, 10, Default::default(), fixtures::labels(&payload, Some(i)));
        async move {
            probe.sent_at(i, at);
            if admin.apply(fixtures::apply(lb)).await.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await;
    join_all(tasks, Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    let expected = u32::try_from(env.params.agents).unwrap_or(u32::MAX);
    let result = finish_probe(&probe, n, expected, elapsed, failed.load(Ordering::Relaxed)).await;
    Ok((result, meter.finish(Some(broker)).await))
}

/// Updates pre-loaded Netdevs (labels only) round-robin over the DPUs at `--rate`.
pub async fn netdev_phase(
    env: &Env,
    broker: &BrokerProc,
    fleet: &Arc<Fleet>,
    admins: &[AdminServiceClient<Channel>],
    objects: usize,
    first_seq: u64,
) -> anyhow::Result<(FanoutResult, PhaseUse)> {
    let p = &env.params;
    let total = (p.rate * p.duration.as_secs_f64()).ceil() as usize + 2 + usize::try_from(first_seq).unwrap_or(0);
    let probe = Probe::new(total);
    fleet.probe.store(Some(Arc::clone(&probe)));
    let failed = Arc::new(AtomicU64::new(0));
    let payload = fixtures::payload_labels(p.payload);
    let agents = p.agents.max(1);
    let objects = objects.max(1);
    let meter = PhaseMeter::start("netdev delivery", Some(broker), None).await;
    let started = Instant::now();
    let (n, tasks) = open_loop(p.rate, p.duration, first_seq, |i, at| {
        let k = usize::try_from(i - first_seq).unwrap_or(0) % objects;
        let dpu = k % agents;
        let mut admin = admins[k % admins.len()].clone();
        let res = fixtures::netdev(
            &fixtures::serial(dpu),
            k / agents,
            &fixtures::node(dpu),
            fixtures::labels(&payload, Some(i)),
        );
        let probe = Arc::clone(&probe);
        let failed = Arc::clone(&failed);
        async move {
            probe.sent_at(i, at);
            if admin.apply(fixtures::apply(res)).await.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await;
    join_all(tasks, Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    let result = finish_probe(&probe, n + first_seq, 1, elapsed, failed.load(Ordering::Relaxed)).await;
    Ok((result, meter.finish(Some(broker)).await))
}
