//! Added latency of risk control per delete: sequential DELETEs over HTTPS against
//! the embedded store (fsync per write), first with no RiskPolicy, then with
//! `policies` policies in the pods' own namespace (the worst case: every one is
//! looked at) of which `matching` select the pods and charge a budget each.
//! Also times the gate alone (`RiskGate::check`, no HTTP, no store write).

use std::time::Instant;

use anyhow::Result;
use hdrhistogram::Histogram;
use meridian_apiserver::risk::{Action, RiskGate};
use serde_json::json;

use crate::{Backend, client, ms, pod, start};

fn policy(i: usize, matching: bool) -> serde_json::Value {
    // Non-matching policies are realistic ones for other workloads: names,
    // labels, windows and budgets, so nothing is trivially skipped by kind.
    let selector = if matching {
        json!({"kinds": ["Pod"], "labelSelector": {"matchLabels": {"app": "bench"}}})
    } else {
        json!({"kinds": ["Pod", "Deployment"], "names": [format!("other-{i}")],
               "labelSelector": {"matchLabels": {"app": format!("other-{i}")}}})
    };
    json!({"apiVersion": "meridian.io/v1alpha1", "kind": "RiskPolicy",
        "metadata": {"name": format!("policy-{i}"), "namespace": "default"},
        "spec": {"selector": selector, "rules": {
            "denyWindows": [{"schedule": "0 3 1 1 *", "duration": "1h", "timeZone": "Asia/Shanghai"}],
            "maxDeletions": [{"count": 1_000_000, "period": "1h", "per": "Namespace"}]}}})
}

async fn deletes(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    first: usize,
    n: usize,
) -> Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3)?;
    for i in first..first + n {
        let t = Instant::now();
        let r = http
            .delete(format!("{url}/api/v1/namespaces/default/pods/p{i}"))
            .bearer_auth(token)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "delete p{i}: {}", r.status());
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(h)
}

pub async fn run(policies: usize, matching: usize, n: usize) -> Result<()> {
    let r = start(Backend::Embedded).await?;
    let s = &r.server;
    let http = client(s, false)?;
    let token = &s.admin_token;
    println!(
        "creating {} pods and {policies} policies ({matching} select the pods)",
        2 * n
    );
    // Every p{i} is deleted below; the last one stays for timing the gate alone.
    for i in 0..=2 * n {
        let resp = http
            .post(format!("{}/api/v1/namespaces/default/pods", s.url))
            .bearer_auth(token)
            .json(&pod(&format!("p{i}")))
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "create: {}", resp.status());
    }
    // Warm-up, then without policies.
    let _ = deletes(&http, &s.url, token, 0, 20.min(n)).await?;
    let base = deletes(&http, &s.url, token, 20.min(n), n - 20.min(n)).await?;
    for i in 0..policies {
        let resp = http
            .post(format!(
                "{}/apis/meridian.io/v1alpha1/namespaces/default/riskpolicies",
                s.url
            ))
            .bearer_auth(token)
            .json(&policy(i, i < matching))
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "policy: {}", resp.text().await?);
    }
    let _ = deletes(&http, &s.url, token, n, 20.min(n)).await?;
    let with = deletes(&http, &s.url, token, n + 20.min(n), n - 20.min(n)).await?;
    // The gate alone, on the pod that is left.
    let snap = s.state.cache.fresh_snapshot(&s.state.store).await?;
    let pods = meridian_api::Resource::find("", "v1", "pods").expect("pods are served");
    let obj = snap
        .range(&pods.storage_prefix(), None)
        .next()
        .map(|o| o.value())
        .unwrap_or(serde_json::Value::Null);
    let mut gate = Histogram::<u64>::new(3)?;
    for _ in 0..2000 {
        let t = Instant::now();
        let subject = RiskGate::subject(&snap, pods, &obj);
        let permit = s
            .state
            .risk
            .check(
                &s.state.store,
                &snap,
                "admin",
                None,
                Action::Delete,
                &[(subject, None)],
                true,
            )
            .await?;
        gate.record(t.elapsed().as_nanos() as u64)?;
        anyhow::ensure!(
            permit.charges() == matching,
            "{} budgets charged, expected {matching}",
            permit.charges()
        );
    }
    println!(
        "DELETE, no policies:         p50 {:.2} ms  p99 {:.2} ms  ({} deletes)",
        ms(&base, 0.5),
        ms(&base, 0.99),
        base.len()
    );
    println!(
        "DELETE, {policies} policies:      p50 {:.2} ms  p99 {:.2} ms  ({} deletes)",
        ms(&with, 0.5),
        ms(&with, 0.99),
        with.len()
    );
    println!(
        "added: p50 {:+.3} ms  p99 {:+.3} ms",
        ms(&with, 0.5) - ms(&base, 0.5),
        ms(&with, 0.99) - ms(&base, 0.99)
    );
    println!(
        "gate alone ({policies} policies, {matching} matching, budget reads included): p50 {:.3} ms  p99 {:.3} ms",
        gate.value_at_quantile(0.5) as f64 / 1e6,
        gate.value_at_quantile(0.99) as f64 / 1e6
    );
    Ok(())
}
