//! Leader election with a `coordination.k8s.io/v1` Lease: one replica syncs, the others wait.
//! Writes use the Lease's resourceVersion, so two replicas can never both take it.

use std::{future::Future, sync::Arc, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use super::{Metrics, SyncConfig};

fn expired(lease: &Lease, duration: Duration) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let Some(renewed) = &spec.renew_time else { return true };
    let secs = spec.lease_duration_seconds.map_or(duration.as_secs() as i64, i64::from);
    renewed.0.as_second() + secs < Timestamp::now().as_second()
}

/// Takes or renews the lease; Ok(true) when this replica holds it afterwards.
async fn acquire(api: &Api<Lease>, config: &SyncConfig) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let duration = i32::try_from(config.lease_duration.as_secs()).unwrap_or(15);
    match api.get_opt(&config.lease_name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(config.lease_name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.holder.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default();
            let mine = holder == config.holder;
            if !mine && !expired(&lease, config.lease_duration) {
                return Ok(false);
            }
            let spec = lease.spec.get_or_insert_with(Default::default);
            if !mine {
                spec.holder_identity = Some(config.holder.clone());
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(now);
            spec.lease_duration_seconds = Some(duration);
            match api.replace(&config.lease_name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Runs `work` while this replica holds the lease; stops it when the lease is lost.
pub async fn lead<F, Fut>(config: Arc<SyncConfig>, client: Client, metrics: Arc<Metrics>, work: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    use std::sync::atomic::Ordering;
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let renew_every = config.lease_duration / 3;
    loop {
        match acquire(&api, &config).await {
            Ok(true) => {
                tracing::info!(holder = %config.holder, lease = %config.lease_name, "leading");
                metrics.leader.store(true, Ordering::Release);
                let task = tokio::spawn(work());
                loop {
                    tokio::time::sleep(renew_every).await;
                    match acquire(&api, &config).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!("another replica took the lease");
                            break;
                        }
                        Err(e) => {
                            // Stop writing before the lease can expire under us.
                            tracing::warn!(error = %e, "cannot renew the lease; stepping down");
                            break;
                        }
                    }
                }
                task.abort();
                metrics.leader.store(false, Ordering::Release);
                metrics.ready.store(false, Ordering::Release);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the lease; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
