//! Writes racing through the writer keep the meaning of one-at-a-time commits. On Postgres
//! each group commit is decided while the one before it commits, reading past it: a
//! compare-and-swap decided on a view that missed the batch ahead would win twice.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use xpu_proto::broker::v1 as pb;

conformance!(compare_and_swap_races_lose_no_update);
async fn compare_and_swap_races_lose_no_update(b: TestBroker) {
    const WRITERS: u32 = 16;
    const ROUNDS: u32 = 25;
    let ahead_before = xpu_broker::metrics::BATCHES_AHEAD.load(Ordering::Relaxed);
    b.admin().await.apply(apply_req(mk_lb("lb-cas", 1))).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut admin = b.admin().await;
        tasks.push(tokio::spawn(async move {
            let (mut won, mut lost) = (0u32, 0u32);
            while won < ROUNDS {
                let get = pb::GetRequest { key: Some(key(pb::Kind::LogicalBridge, "", "lb-cas")) };
                let generation = lb_generation(&admin.get(get).await.unwrap().into_inner());
                // Every write carries a VLAN no other write uses: each one is a change.
                let next = mk_lb("lb-cas", 2 + w * ROUNDS + won);
                match admin.apply(pb::ApplyRequest { object: Some(next), expected_generation: generation }).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert!(r.changed);
                        assert_eq!(lb_generation(r.object.as_ref().unwrap()), generation + 1);
                        won += 1;
                    }
                    Err(e) => {
                        assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
                        lost += 1;
                    }
                }
            }
            (won, lost)
        }));
    }
    let (mut won, mut lost) = (0, 0);
    for t in tasks {
        let (w, l) = t.await.unwrap();
        won += w;
        lost += l;
    }
    let get = pb::GetRequest { key: Some(key(pb::Kind::LogicalBridge, "", "lb-cas")) };
    let generation = lb_generation(&b.admin().await.get(get).await.unwrap().into_inner());
    assert_eq!(won, WRITERS * ROUNDS);
    // Each win moved the generation by exactly one: no two writers won from the same one.
    assert_eq!(generation, 1 + i64::from(won), "{won} compare-and-swaps won, {lost} lost");
    if b.pipelined {
        // The races went through batches decided while the one before committed.
        assert!(xpu_broker::metrics::BATCHES_AHEAD.load(Ordering::Relaxed) > ahead_before);
    }
    b.stop().await;
}

conformance!(racing_status_reports_keep_the_newest);
async fn racing_status_reports_keep_the_newest(b: TestBroker) {
    const SENDERS: u64 = 16;
    const REPORTS: u64 = 40;
    seed_network(&b, "net-a", "10.7.0.0/16", "10.7.0.1").await;
    register(&b, "dpu-a").await;
    let nd = mk_netdev("pods", "dpu-a", 3, "node-1", "net-a");
    let name = match &nd.kind {
        Some(pb::resource::Kind::Netdev(n)) => n.metadata.as_ref().unwrap().name.clone(),
        _ => unreachable!(),
    };
    b.admin().await.apply(apply_req(nd)).await.unwrap();
    let k = key(pb::Kind::Netdev, "pods", &name);
    let mut tasks = Vec::new();
    for sender in 0..SENDERS {
        let mut agent = b.agent("dpu-a").await;
        let mut admin = b.admin().await;
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0..REPORTS {
                // A read between reports keeps the senders out of step, so reports keep
                // arriving while a batch commits.
                admin.get(pb::GetRequest { key: Some(k.clone()) }).await.unwrap();
                // Sequence numbers arrive out of order: a report older than one committed in
                // the batch before must be refused.
                let seq = 1 + i * 100 + (sender * 37 + i * 11) % 100;
                // Each report says something new: its own address.
                let ip = format!("10.7.{}.{}/16", seq / 200, seq % 200 + 2);
                let req = pb::ReportStatusRequest {
                    serial: "dpu-a".into(),
                    reports: vec![report(k.clone(), 1, seq, netdev_status("Connected", &ip))],
                };
                let r = agent.report_status(req).await.unwrap().into_inner();
                match pb::ReportOutcome::try_from(r.results[0].outcome).unwrap() {
                    pb::ReportOutcome::Accepted => accepted.push((r.results[0].revision, seq, ip)),
                    pb::ReportOutcome::Stale => {}
                    other => panic!("report {seq}: {other:?}"),
                }
            }
            accepted
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        accepted.extend(t.await.unwrap());
    }
    // In commit order, every accepted report is newer than the one before it.
    accepted.sort();
    for pair in accepted.windows(2) {
        assert!(pair[0].1 < pair[1].1, "report {} accepted after report {}: {pair:?}", pair[1].1, pair[0].1);
    }
    let (_, newest, newest_ip) = accepted.last().cloned().unwrap();
    let got = b.admin().await.get(pb::GetRequest { key: Some(k) }).await.unwrap().into_inner();
    let status = match got.kind {
        Some(pb::resource::Kind::Netdev(n)) => n.status.unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(status.ip, newest_ip, "{} reports accepted, the newest {newest}", accepted.len());
    let mut agent = b.agent("dpu-a").await;
    let reg = agent.register(pb::RegisterRequest { serial: "dpu-a".into(), ..Default::default() }).await.unwrap();
    assert_eq!(reg.into_inner().last_status_seq, newest);
    b.stop().await;
}
