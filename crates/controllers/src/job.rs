//! The Job controller: runs pods until `completions` succeed, at most `parallelism`
//! at once; fails the Job after `backoffLimit` failed pods or past
//! `activeDeadlineSeconds`. Its pods are placed by the scheduler like any other.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::index::PodView;
use crate::{Stores, is_active};

fn phase(p: &PodView) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn finished(j: &Job) -> bool {
    j.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True")
        })
}

pub async fn reconcile_all(client: &kube::Client, s: &Stores) {
    for job in s.jobs.state() {
        if job.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let pods = s.pods.controlled_by(&uid);
        reconcile(client, s, &job, &uid, pods).await;
    }
}

async fn reconcile(
    client: &kube::Client,
    s: &Stores,
    job: &Job,
    uid: &str,
    pods: Vec<Arc<PodView>>,
) {
    let ns = job.metadata.namespace.clone().unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    let Some(spec) = job.spec.as_ref() else {
        return;
    };
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let active: Vec<&Arc<PodView>> = pods.iter().filter(|p| is_active(p)).collect();
    let succeeded = pods.iter().filter(|p| phase(p) == "Succeeded").count() as i32;
    let failed = pods.iter().filter(|p| phase(p) == "Failed").count() as i32;
    let completions = spec.completions.unwrap_or(1).max(1);
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(6).max(0);
    let now = Timestamp::now();
    let start = job
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .unwrap_or(Time(now));
    let mut conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut completion_time = job.status.as_ref().and_then(|s| s.completion_time.clone());
    let done = finished(job);
    let mut end = |type_: &str, reason: &str, message: String| {
        conditions.push(JobCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_probe_time: Some(Time(now)),
            last_transition_time: Some(Time(now)),
        });
    };
    let mut stop_active = false;
    if !done {
        let deadline = spec
            .active_deadline_seconds
            .is_some_and(|d| start.0.duration_until(now).as_secs() > d);
        if succeeded >= completions {
            end(
                "Complete",
                "Completed",
                format!("{succeeded} of {completions} completions succeeded"),
            );
            completion_time = Some(Time(now));
            stop_active = true;
        } else if failed > backoff_limit {
            end(
                "Failed",
                "BackoffLimitExceeded",
                format!("Job has reached the specified backoff limit ({backoff_limit})"),
            );
            stop_active = true;
        } else if deadline {
            end(
                "Failed",
                "DeadlineExceeded",
                "Job was active longer than specified deadline".into(),
            );
            stop_active = true;
        } else {
            let want = parallelism.min(completions - succeeded).max(0) as usize;
            let waiting = s
                .expectations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(uid)
                .is_some_and(|&(target, _, t)| {
                    t.elapsed() < crate::EXPECTATION_TTL && active.len() < target
                });
            if active.len() < want && !waiting {
                let n = want - active.len();
                s.expectations
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        uid.to_owned(),
                        (active.len() + n, true, std::time::Instant::now()),
                    );
                let template = spec.template.clone();
                let mut meta: ObjectMeta = template.metadata.clone().unwrap_or_default();
                meta.namespace = Some(ns.clone());
                meta.owner_references = Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        api_version: "batch/v1".into(),
                        ..crate::owner_ref("Job", &job.metadata)
                    },
                ]);
                let labels = meta.labels.get_or_insert_with(Default::default);
                labels.insert("job-name".into(), name.clone());
                labels.insert("controller-uid".into(), uid.to_owned());
                for _ in 0..n {
                    let pod = Pod {
                        metadata: ObjectMeta {
                            name: Some(format!("{name}-{}", crate::replicaset::suffix())),
                            ..meta.clone()
                        },
                        spec: template.spec.clone(),
                        status: None,
                    };
                    if let Err(e) = pod_api.create(&PostParams::default(), &pod).await {
                        tracing::warn!(job = %name, "cannot create pod: {e}");
                        break;
                    }
                }
            }
        }
    }
    let key = format!("Job/{ns}/{name}");
    if stop_active && !s.denials.blocked(&key) {
        for p in &active {
            if let Err(e) = pod_api
                .delete(
                    p.metadata.name.as_deref().unwrap_or_default(),
                    &Default::default(),
                )
                .await
                && let Some(msg) = s.denials.note(&key, &e)
            {
                crate::risk::report(client, "Job", &ns, &name, job.metadata.uid.as_deref(), &msg)
                    .await;
                break;
            }
        }
    }
    let status = JobStatus {
        active: Some(if stop_active { 0 } else { active.len() as i32 }),
        succeeded: Some(succeeded),
        failed: Some(failed),
        start_time: Some(start),
        completion_time,
        conditions: (!conditions.is_empty()).then_some(conditions),
        ..Default::default()
    };
    let cur = job.status.clone().unwrap_or_default();
    if cur.active != status.active
        || cur.succeeded != status.succeeded
        || cur.failed != status.failed
        || cur.start_time.is_none()
        || cur.conditions.as_ref().map(Vec::len) != status.conditions.as_ref().map(Vec::len)
    {
        let api: Api<Job> = Api::namespaced(client.clone(), &ns);
        let patch = json!({"status": status});
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            tracing::debug!(job = %name, "status: {e}");
        }
    }
}
