//! `meridian sim` at 1% of the full size (1,000 hollow nodes in 5 regions, 10,000
//! pods through Deployments of 20 tenants in 400 namespaces, churn with flapping
//! nodes, region loss): the CI smoke test of the scale simulation. It asserts
//! correctness from the run's JSON report, never timings.

use std::process::Command;

use serde_json::Value;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("sim")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run meridian sim")
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(name)))
        })
        .unwrap_or_else(|| panic!("no check {name:?} in {:#}", report["checks"]))
}

fn phase<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["phases"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no phase {name}"))
}

#[test]
fn a_one_percent_fleet_comes_up_runs_its_pods_survives_churn_and_region_loss() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let work = dir.path().join("work");
    let out = sim(&[
        "--scale",
        "0.01",
        // Short timings so the whole run fits in a few minutes of a debug build.
        "--heartbeat",
        "2s",
        "--lease-timeout",
        "6s",
        "--eviction-grace",
        "17s",
        "--eviction-rate",
        "2",
        "--churn",
        "15s",
        "--churn-rate",
        "2",
        "--loss-window",
        "5s",
        "--latency-pods",
        "30",
        "--step-timeout",
        "5m",
        "--work-dir",
        work.to_str().unwrap(),
        "--report",
        report_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "meridian sim failed:\n{stdout}\n{stderr}"
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    // Every correctness check the simulator makes held.
    for c in report["checks"].as_array().unwrap() {
        assert_eq!(c["ok"], true, "{c:#}");
    }
    assert!(
        stdout.contains("checks:") && stdout.contains("goals:"),
        "{stdout}"
    );

    let bring = phase(&report, "bringup");
    assert_eq!(bring["details"]["nodes"], 1000);
    assert_eq!(bring["details"]["min_ready_during_hold"], 1000);
    assert_eq!(bring["details"]["stream_errors"], 0);

    let density = phase(&report, "density");
    assert_eq!(density["details"]["pods"], 10_000);
    assert_eq!(density["details"]["deployments"], 2000);
    // Startup is measured for every pod the watch saw Pending first (a watch that
    // had to relist meanwhile would miss a few).
    let measured = density["pod_startup"]["count"].as_u64().unwrap();
    assert!((9_500..=10_000).contains(&measured), "{measured}");
    // The server's histograms saw the Deployments and their ReplicaSets created
    // (namespace scope), and the pods created in bulk (`bulkpods`, cluster scope:
    // up to 500 pods a request).
    let creates = |scope: &str| -> u64 {
        density["api"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["verb"] == "create" && l["scope"] == scope)
            .map(|l| l["count"].as_u64().unwrap())
            .sum()
    };
    assert!(creates("namespace") >= 2 * 2000, "{:#}", density["api"]);
    assert!(creates("cluster") >= 10_000 / 500, "{:#}", density["api"]);
    assert!(density["watch_lag"]["count"].as_u64().unwrap() > 0);

    // The SLO's pod startup: pods created at a steady rate into the full cluster.
    let latency = phase(&report, "latency");
    assert_eq!(latency["details"]["pods"], 30);
    assert_eq!(latency["pod_startup"]["count"], 30, "{latency:#}");
    // Its stages: create -> bound for each, and a timeline of every pod (created
    // at, ms to bound, ms to Running), bound never after Running.
    assert_eq!(latency["pod_scheduling"]["count"], 30, "{latency:#}");
    let timeline = latency["details"]["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 30, "{latency:#}");
    for row in timeline {
        let (bound, running) = (row[1].as_f64().unwrap(), row[2].as_f64().unwrap());
        assert!(0.0 <= bound && bound <= running, "{row}");
    }

    let churn = phase(&report, "churn");
    assert!(churn["details"]["ops"]["create"].as_u64().unwrap() > 0);
    assert!(churn["details"]["ops"]["delete"].as_u64().unwrap() > 0);
    assert!(churn["details"]["ops"]["patch"].as_u64().unwrap() > 0);
    assert_eq!(churn["details"]["flapping_nodes"], 10);
    assert_eq!(churn["details"]["pods_marked"], 0);

    let loss = phase(&report, "loss");
    assert_eq!(loss["details"]["region"]["nodes"], 200);
    assert_eq!(loss["details"]["region"]["pods_marked"], 0);
    assert_eq!(loss["details"]["scattered"]["nodes"], 200);
    assert!(
        loss["details"]["scattered"]["pods_marked"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        check(&report, "loss: no pod marked before the grace")["ok"] == true
            && check(&report, "loss: every workload back to full strength")["ok"] == true
    );

    // Resources of every process are reported: the server, five regions, the simulator.
    assert_eq!(report["processes"].as_array().unwrap().len(), 7);
    assert!(report["store_bytes"].as_u64().unwrap() > 0);
    assert!(report["total_rss_peak_mib"].as_f64().unwrap() > 0.0);

    // The chart of docs/scale.md is generated from such reports.
    let docs = dir.path().join("docs");
    let chart = sim(&[
        "chart",
        report_path.to_str().unwrap(),
        "--out",
        docs.to_str().unwrap(),
    ]);
    assert!(chart.status.success(), "{chart:?}");
    let md = std::fs::read_to_string(docs.join("scale.md")).unwrap();
    assert!(md.contains("| 1000 | 10000 |"), "{md}");
    let svg = std::fs::read_to_string(docs.join("scale.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
}

#[test]
fn impossible_settings_are_refused_before_anything_starts() {
    let cases: [(&[&str], &str); 4] = [
        (&["--scale", "0"], "--scale must be within"),
        (
            &["--heartbeat", "10s", "--lease-timeout", "5s"],
            "must be longer than the heartbeat",
        ),
        (
            &["--lease-timeout", "40s", "--eviction-grace", "45s"],
            "must exceed the lease timeout",
        ),
        (&["--regions", "17"], "regions must be 1..=16"),
    ];
    for (args, want) in cases {
        let out = sim(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let out = sim(&["chart", "/nonexistent/report.json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading /nonexistent/report.json"));
}
