//! reconnect: every agent drops its connection; while they are away each DPU gets a new Netdev
//! and the fabric object changes; then all reconnect at once (new TLS connection, Register,
//! WatchDesired from the last revision they applied). Time to converge (every agent at the head
//! revision) and the number of full resyncs (must be zero).

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use futures::StreamExt as _;

use super::{PhaseMeter, connections_for, preload_netdevs, seed, with_broker};
use crate::{
    agents::{self, DpuAgent, Fleet},
    broker_proc::BrokerProc,
    fixtures,
    report::{Row, ScenarioReport},
    run::Env,
    stats::{Latency, per_sec},
};

pub async fn run(env: &Env) -> ScenarioReport {
    let p = &env.params;
    let mut rep = ScenarioReport::new("reconnect");
    rep.setup =
        format!("{} agents drop and reconnect at once; 1 new Netdev per DPU + 1 fabric change while away", p.agents);
    with_broker(env, &mut rep, &[], async |broker, rep| body(env, broker, rep).await).await;
    rep
}

async fn body(env: &Env, broker: &BrokerProc, rep: &mut ScenarioReport) -> anyhow::Result<()> {
    let p = &env.params;
    let admins = agents::admins(broker.grpc, &env.pki, connections_for(p.concurrency)).await?;
    let mut admin = admins[0].clone();
    seed(&mut admin).await?;
    let fleet = Fleet::new(p.flush_interval);
    let serials: Vec<String> = (0..p.agents).map(fixtures::serial).collect();
    let setup = agents::start_fleet(broker.grpc, &env.pki, &fleet, serials, false, env.epoch).await?;
    let mut agents = setup.agents;
    // Everyone applies one change, so every agent has a revision to resume from.
    let lb = fixtures::logical_bridge(fixtures::FABRIC_LB, 11, Default::default(), Default::default());
    let rev = admin
        .apply(fixtures::apply(lb))
        .await?
        .into_inner()
        .object
        .as_ref()
        .and_then(fixtures::meta_of)
        .map_or(0, |m| m.revision);
    anyhow::ensure!(
        agents::wait_revision(&agents, rev, Duration::from_secs(60)).await,
        "not every agent received the first fabric change"
    );

    for a in &mut agents {
        a.disconnect();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (n, secs) = preload_netdevs(&admins, p.agents, p.agents, p.concurrency, &Default::default()).await?;
    let lb = fixtures::logical_bridge(fixtures::FABRIC_LB, 12, Default::default(), Default::default());
    let head = admin
        .apply(fixtures::apply(lb))
        .await?
        .into_inner()
        .object
        .as_ref()
        .and_then(fixtures::meta_of)
        .map_or(0, |m| m.revision);
    rep.notes.push(format!(
        "while away: {n} netdevs created in {secs:.1}s, then the fabric object changed at revision {head}"
    ));
    let m = broker.metrics().await;
    rep.notes.push(format!("streams open on the broker before the storm: {}", m.sum("xpu_streams_active")));

    for a in &agents {
        a.state.target.store(head, Ordering::Release);
        a.state.reached_ns.store(0, Ordering::Release);
    }
    let resync_before = fleet.resync_required.load(Ordering::Relaxed) + fleet.resync_initial.load(Ordering::Relaxed);
    let meter = PhaseMeter::start("reconnect storm", Some(broker), None).await;
    let storm = Instant::now();
    let storm_ns = u64::try_from(storm.duration_since(env.epoch).as_nanos()).unwrap_or(0);
    // All at once: no concurrency limit beyond what the machine gives.
    let results: Vec<anyhow::Result<(u32, Duration)>> = futures::stream::iter(agents.iter_mut().map(|a| {
        let fleet = &fleet;
        async move {
            // Like a real agent: the whole sequence is retried with backoff until it succeeds.
            let since = a.revision();
            let mut retries = 0;
            let mut backoff = Duration::from_millis(100);
            loop {
                let attempt = async {
                    let n = a.connect(broker.grpc, &env.pki, 1).await?;
                    let connected = storm.elapsed();
                    a.register().await?;
                    a.watch(since, fleet, env.epoch).await?;
                    anyhow::Ok((n, connected))
                }
                .await;
                match attempt {
                    Ok((n, connected)) => return Ok((retries + n, connected)),
                    Err(e) if retries >= 30 => return Err(e),
                    Err(_) => {
                        retries += 1;
                        a.disconnect();
                        tokio::time::sleep(backoff + Duration::from_millis(rand::random_range(0..100))).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }))
    .buffer_unordered(usize::MAX)
    .collect()
    .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    let retries: u32 = results.iter().filter_map(|r| r.as_ref().ok()).map(|(r, _)| *r).sum();
    let mut connect = Latency::new();
    for (_, d) in results.iter().filter_map(|r| r.as_ref().ok()) {
        connect.record(*d);
    }
    let all_connected = storm.elapsed();
    let converged = agents::wait_revision(&agents, head, Duration::from_secs(120)).await;
    let converge_secs = storm.elapsed().as_secs_f64();
    rep.phases.push(meter.finish(Some(broker)).await);
    let mut per_agent = Latency::new();
    for a in &agents {
        let r = a.state.reached_ns.load(Ordering::Acquire);
        if r > storm_ns {
            per_agent.record(Duration::from_nanos(r - storm_ns));
        }
    }
    let resyncs =
        fleet.resync_required.load(Ordering::Relaxed) + fleet.resync_initial.load(Ordering::Relaxed) - resync_before;
    let caught_up = agents.iter().filter(|a| a.revision() >= head).count();
    rep.push(
        Row::new("reconnect.connect", "TLS reconnect (per agent, from storm start)")
            .latency(connect.summary())
            .rate(per_sec(connect.count(), all_connected))
            .note(format!(
                "{failed} failed, {retries} retries; all connected after {:.2}s",
                all_connected.as_secs_f64()
            )),
    );
    rep.push(
        Row::new("reconnect.agent", "caught up to head (per agent, from storm start)")
            .latency(per_agent.summary())
            .note("connect + Register + replay of missed changes"),
    );
    rep.push(Row::new("reconnect.converge", "storm converged (every agent at head)").count(caught_up as u64).note(
        format!(
            "{converge_secs:.2}s, {caught_up}/{} agents caught up{}; full resyncs: {resyncs}",
            agents.len(),
            if converged { "" } else { " (TIMED OUT)" }
        ),
    ));
    rep.notes.push(format!("full resyncs (Resync events) during the storm: {resyncs} (must be 0)"));
    if let Some(e) = fleet.first_error() {
        rep.notes.push(format!("first agent error: {e}"));
    }
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        rep.notes.push(format!("first reconnect error: {e:#}"));
    }
    drop::<Vec<DpuAgent>>(agents);
    Ok(())
}
