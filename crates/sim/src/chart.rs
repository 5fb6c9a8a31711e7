//! `docs/scale.md` and its chart, generated from sim reports of several fleet sizes.

use std::fmt::Write;

use crate::Report;

fn phase<'a>(r: &'a Report, name: &str) -> Option<&'a crate::Phase> {
    r.phases.iter().find(|p| p.name == name)
}

fn nodes(r: &Report) -> f64 {
    r.config["nodes"].as_f64().unwrap_or(0.0)
}

/// Worst p99 over the phases of the mutating calls, in ms.
fn mutating_p99(r: &Report) -> f64 {
    r.phases
        .iter()
        .flat_map(|p| p.api.iter())
        .filter(|l| crate::metrics::is_single_object_mutation(l))
        .map(|l| l.p99_ms)
        .fold(0.0, f64::max)
}

struct Series {
    name: &'static str,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

/// One panel: x is the fleet size (log scale), y linear from 0.
fn panel(out: &mut String, x0: f64, title: &str, unit: &str, series: &[Series]) {
    let (w, h, left, top) = (360.0, 220.0, x0 + 50.0, 40.0);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let lx = |x: f64| {
        if xmax <= xmin {
            left + w / 2.0
        } else {
            left + (x.ln() - xmin.ln()) / (xmax.ln() - xmin.ln()) * w
        }
    };
    let ly = |y: f64| top + h - y / ymax * h;
    let _ = writeln!(
        out,
        r##"<text x="{}" y="22" font-size="14" font-weight="bold">{title}</text>"##,
        left
    );
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#444"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="#444"/>"##,
        top + h,
        left + w,
        top + h,
        top + h
    );
    for k in 0..=4 {
        let y = ymax / 1.15 * k as f64 / 4.0;
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{:.1}" font-size="10" text-anchor="end">{} {unit}</text><line x1="{left}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#ddd"/>"##,
            left - 4.0,
            ly(y) + 3.0,
            trim(y),
            ly(y),
            left + w,
            ly(y)
        );
    }
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{}" font-size="10" text-anchor="middle">{}k nodes</text>"##,
            lx(x),
            top + h + 14.0,
            trim(x / 1000.0)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", lx(x), ly(y)))
            .collect();
        let _ = writeln!(
            out,
            r##"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"##,
            s.color,
            pts.join(" ")
        );
        for &(x, y) in &s.points {
            let _ = writeln!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"##,
                lx(x),
                ly(y),
                s.color
            );
        }
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" font-size="11" fill="{}">{}</text>"##,
            left + 8.0,
            top + 12.0 + 14.0 * i as f64,
            s.color,
            s.name
        );
    }
}

fn trim(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The chart (SVG) of latency and memory against fleet size.
/// Only runs with ten pods per node are plotted (a bring-up-only run is not
/// comparable); the tables list every run.
pub fn render_chart(reports: &[Report]) -> String {
    let mut rs: Vec<&Report> = reports
        .iter()
        .filter(|r| phase(r, "density").is_some())
        .collect();
    rs.sort_by(|a, b| nodes(a).total_cmp(&nodes(b)));
    let pts = |f: &dyn Fn(&Report) -> Option<f64>| -> Vec<(f64, f64)> {
        rs.iter()
            .filter_map(|r| f(r).map(|y| (nodes(r), y)))
            .collect()
    };
    let latency = [
        Series {
            name: "pod startup p99 (density)",
            color: "#c0392b",
            points: pts(&|r| {
                phase(r, "density")
                    .and_then(|p| p.pod_startup.as_ref())
                    .map(|q| q.p99_ms / 1000.0)
            }),
        },
        Series {
            name: "mutating API call p99 (worst)",
            color: "#2c7fb8",
            points: pts(&|r| Some(mutating_p99(r) / 1000.0)),
        },
        Series {
            name: "watch lag p99 (density)",
            color: "#27ae60",
            points: pts(&|r| {
                phase(r, "density")
                    .and_then(|p| p.watch_lag.as_ref())
                    .map(|q| q.p99_ms / 1000.0)
            }),
        },
    ];
    let memory = [
        Series {
            name: "all processes (peak)",
            color: "#8e44ad",
            points: pts(&|r| Some(r.total_rss_peak_mib / 1024.0)),
        },
        Series {
            name: "global API server (peak)",
            color: "#d35400",
            points: pts(&|r| {
                r.processes
                    .iter()
                    .find(|p| p.name == "server")
                    .map(|p| p.rss_peak_mib / 1024.0)
            }),
        },
    ];
    let mut svg = String::from(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="300" font-family="sans-serif">
<rect width="900" height="300" fill="white"/>
"##,
    );
    panel(&mut svg, 0.0, "Latency against fleet size", "s", &latency);
    panel(
        &mut svg,
        450.0,
        "Resident memory against fleet size",
        "GiB",
        &memory,
    );
    svg.push_str("</svg>\n");
    svg
}

/// The pods a run created: its configured count if density ran, else none (a
/// bring-up-only run).
fn pods_run(r: &Report) -> String {
    if phase(r, "density").is_some() {
        r.config["pods"].to_string()
    } else {
        "0 (bring-up only)".into()
    }
}

/// `docs/scale.md`: a table per fleet size and the chart (`scale.svg` beside it).
pub fn render_scale_doc(reports: &[Report]) -> (String, String) {
    let mut rs: Vec<&Report> = reports.iter().collect();
    rs.sort_by(|a, b| nodes(a).total_cmp(&nodes(b)));
    let mut md = String::new();
    let _ = writeln!(md, "# Scale: measured fleet sizes\n");
    let _ = writeln!(
        md,
        "Generated by `meridian sim chart` from the JSON reports of `meridian sim` runs \
         (one per fleet size; the reports are in `docs/scale/`). Every process — the global \
         API server with its scheduler and controllers, one process per region, and the \
         simulator holding the hollow nodes — ran on the one machine named in each row. \
         Latencies follow the Kubernetes SIG-Scalability definitions: pod startup is a \
         pod's first appearance in a watch until the watch shows it Running; API call \
         latency is the server's own histogram by verb and scope (watches excluded); \
         watch lag is a change to a probe object until a watcher sees it. The chart \
         plots the runs that created pods; bring-up-only runs are in the tables.\n"
    );
    let _ = writeln!(md, "![latency and memory against fleet size](scale.svg)\n");
    let _ = writeln!(
        md,
        "| nodes | pods | machine | bring-up to all Ready | density run | pods/s | pod startup p50 / p99 | mutating API p99 (worst) | watch lag p99 | list all pods | memory, all processes | store | checks |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rs {
        let bring = phase(r, "bringup")
            .and_then(|p| p.details["ready_s"].as_f64())
            .map_or("—".into(), |s| format!("{s:.0} s"));
        let dens = phase(r, "density");
        let run = dens.map_or("—".into(), |p| format!("{:.0} s", p.seconds));
        let rate = dens
            .and_then(|p| p.details["pods_per_s"].as_f64())
            .map_or("—".into(), |v| format!("{v:.0}"));
        let startup = dens
            .and_then(|p| p.pod_startup.as_ref())
            .map_or("—".into(), |q| {
                format!("{:.2} / {:.2} s", q.p50_ms / 1000.0, q.p99_ms / 1000.0)
            });
        let lag = dens
            .and_then(|p| p.watch_lag.as_ref())
            .map_or("—".into(), |q| format!("{:.0} ms", q.p99_ms));
        let list = dens
            .and_then(|p| p.details["list_all_pods_s"].as_f64())
            .map_or("—".into(), |v| format!("{v:.1} s"));
        let ok = r.checks.iter().filter(|c| c.ok).count();
        let _ = writeln!(
            md,
            "| {} | {} | {} cpus, {:.0} GiB | {bring} | {run} | {rate} | {startup} | {:.0} ms | {lag} | {list} | {:.1} GiB | {:.0} MiB | {ok}/{} |",
            r.config["nodes"],
            pods_run(r),
            r.machine.cpus,
            r.machine.memory_gib,
            mutating_p99(r),
            r.total_rss_peak_mib / 1024.0,
            r.store_bytes as f64 / 1048576.0,
            r.checks.len()
        );
    }
    for r in &rs {
        let _ = writeln!(
            md,
            "\n## {} nodes, {} pods ({})\n",
            r.config["nodes"],
            pods_run(r),
            r.date
        );
        let _ = writeln!(md, "| goal | target | measured | |\n|---|---|---|---|");
        for g in &r.goals {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                g.name,
                g.goal,
                g.measured,
                if g.met { "met" } else { "**missed**" }
            );
        }
        let _ = writeln!(
            md,
            "\n| process | cpu (average cores) | peak resident |\n|---|---|---|"
        );
        for p in &r.processes {
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.0} MiB |",
                p.name, p.cpu_cores, p.rss_peak_mib
            );
        }
    }
    (md, render_chart(reports))
}
