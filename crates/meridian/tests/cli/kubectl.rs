//! The kubectl suite: the real `kubectl` against `meridian up`, as two tenants and
//! as the admin, command by command, checking what kubectl prints and what the
//! cluster then holds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{LogOnPanic, Reaper, example, get_json, kubectl, up, wait_for};

/// kubectl that must succeed; its output.
fn ok(kubeconfig: &Path, args: &[&str]) -> String {
    let (ok, out) = kubectl(kubeconfig, args);
    assert!(ok, "kubectl {args:?} failed: {out}");
    out
}

/// kubectl that must fail; its output.
fn fails(kubeconfig: &Path, args: &[&str]) -> String {
    let (ok, out) = kubectl(kubeconfig, args);
    assert!(!ok, "kubectl {args:?} should have failed: {out}");
    out
}

/// `meridian tenant create NAME`: the new tenant's kubeconfig.
fn tenant(dir: &Path, name: &str) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["tenant", "create", name, "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join(format!("tenants/{name}.kubeconfig"))
}

fn names(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out.split_whitespace().map(str::to_owned).collect();
    v.sort();
    v
}

/// Pods of `app=web` that are Running: (name, node).
fn running_web(kubeconfig: &Path) -> Vec<(String, String)> {
    let pods = get_json(kubeconfig, &["pods", "-l", "app=web"]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
        })
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_for_two_tenants_and_the_admin() {
    let dir = tempfile::tempdir().unwrap();
    let _reaper = Reaper(dir.path());
    let _log = LogOnPanic(dir.path().join("up.log"));
    let (_up, demo) = up(dir.path()).await;
    let admin = dir.path().join("admin.kubeconfig");
    let acme = tenant(dir.path(), "acme");
    // A container that fails at once: restarted, so `logs --previous` has
    // something to show by the end of the suite.
    let crash = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crash"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36",
            "command": ["sh", "-c", "echo attempt at $(date +%s%N); exit 1"]}]}}"#;
    let crash_path = dir.path().join("crash.json");
    std::fs::write(&crash_path, crash).unwrap();
    ok(&demo, &["apply", "-f", crash_path.to_str().unwrap()]);

    // Discovery: short names, groups, our kinds.
    let out = ok(&demo, &["api-resources"]);
    for row in [
        ["pods", "po", "v1", "true", "Pod"],
        ["deployments", "deploy", "apps/v1", "true", "Deployment"],
        ["daemonsets", "ds", "apps/v1", "true", "DaemonSet"],
        [
            "placementpolicies",
            "pp",
            "meridian.io/v1alpha1",
            "true",
            "PlacementPolicy",
        ],
    ] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == row),
            "api-resources lacks {row:?}: {out}"
        );
    }
    // kubectl explain from the OpenAPI v3 schemas: Kubernetes' kinds and ours.
    let out = ok(&demo, &["explain", "pods.spec.containers"]);
    assert!(out.contains("FIELD: containers <[]Container>"), "{out}");
    assert!(
        out.contains("List of containers belonging to the pod"),
        "{out}"
    );
    let out = ok(&demo, &["explain", "deploy.spec.strategy.rollingUpdate"]);
    assert!(out.contains("maxSurge"), "{out}");
    let out = ok(&demo, &["explain", "pp.spec.locations.include.countries"]);
    assert!(
        out.contains("<[]string>") && out.contains("ISO 3166"),
        "{out}"
    );
    let out = fails(&demo, &["explain", "pods.spec.nope"]);
    assert!(out.contains("nope"), "{out}");

    // Two tenants apply the same manifest and never see each other's objects;
    // both see every edge node.
    let web = example("web-deployment.yaml");
    for t in [&demo, &acme] {
        let out = ok(t, &["apply", "-f", &web]);
        assert!(out.contains("deployment.apps/web created"), "{out}");
    }
    let demo_nodes = ok(&demo, &["get", "nodes", "-o", "name"]);
    assert_eq!(demo_nodes, ok(&acme, &["get", "nodes", "-o", "name"]));
    assert_eq!(
        demo_nodes.lines().count(),
        5 + super::SIMULATED,
        "{demo_nodes}"
    );
    for t in [&demo, &acme] {
        wait_for("3 web pods running", 60, || {
            let n = running_web(t).len();
            if n == 3 {
                Ok(())
            } else {
                Err(format!("{n} running"))
            }
        })
        .await;
    }
    let demo_pods: Vec<String> = running_web(&demo).into_iter().map(|p| p.0).collect();
    let acme_pods: Vec<String> = running_web(&acme).into_iter().map(|p| p.0).collect();
    assert!(
        demo_pods.iter().all(|p| !acme_pods.contains(p)),
        "{demo_pods:?} {acme_pods:?}"
    );
    let out = ok(&acme, &["get", "pods", "-A", "-o", "name"]);
    assert_eq!(out.lines().count(), 3, "acme sees only its own pods: {out}");
    let out = fails(&acme, &["get", "pod", &demo_pods[0]]);
    assert!(
        out.contains("NotFound") && out.contains("not found"),
        "{out}"
    );
    // The admin sees both tenants' workloads.
    let out = ok(&admin, &["get", "deployments", "-A", "-o", "name"]);
    assert_eq!(out.lines().count(), 2, "{out}");

    // get: columns, selectors, -L, -o wide, field selectors.
    let out = ok(&demo, &["get", "pods", "-o", "wide", "-l", "app=web"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(&header[..3], ["NAME", "READY", "STATUS"], "{out}");
    assert!(
        header.contains(&"NODE") && header.contains(&"CITY"),
        "{out}"
    );
    let node = running_web(&demo)[0].1.clone();
    let web_where = |field: String| {
        let args = ["get", "pods", "-l", "app=web", "--field-selector", &field];
        ok(&demo, &[&args[..], &["-o", "name"]].concat())
    };
    let out = web_where(format!("spec.nodeName={node}"));
    assert_eq!(out.lines().count(), 1, "one web pod per city: {out}");
    // The derived field: pods of one region's nodes.
    let nodes = get_json(&demo, &["nodes"]);
    let region_of = |node: &str| -> String {
        nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["metadata"]["name"] == node)
            .and_then(|n| n["metadata"]["labels"]["meridian.io/region"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let region = region_of(&node);
    assert!(!region.is_empty(), "{node} has a region label");
    let mut expected: Vec<String> = running_web(&demo)
        .into_iter()
        .filter(|(_, n)| region_of(n) == region)
        .map(|(p, _)| format!("pod/{p}"))
        .collect();
    expected.sort();
    let out = web_where(format!("meridian.io/region={region}"));
    assert_eq!(names(&out), expected, "web pods in region {region}");
    let out = ok(&demo, &["get", "pods", "-l", "app=nothing"]);
    assert!(
        out.contains("No resources found in default namespace."),
        "{out}"
    );
    ok(&demo, &["label", "deployment", "web", "tier=front"]);
    ok(&demo, &["annotate", "deployment", "web", "owner=team-a"]);
    let out = ok(&demo, &["get", "deployment", "web", "-L", "tier"]);
    assert!(out.lines().next().unwrap().ends_with("TIER"), "{out}");
    assert!(out.lines().nth(1).unwrap().ends_with("front"), "{out}");
    let d = get_json(&demo, &["deployment", "web"]);
    assert_eq!(d["metadata"]["annotations"]["owner"], "team-a");
    assert!(get_json(&acme, &["deployment", "web"])["metadata"]["labels"]["tier"].is_null());

    // Server-side apply: field ownership, conflicts, --force-conflicts, removal of
    // fields a manager stops applying.
    let cm = |data: &str| {
        let path = dir.path().join("settings.yaml");
        std::fs::write(
            &path,
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n{data}"),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    };
    let managers = |t: &Path| -> Vec<(String, String)> {
        let (ok, out) = kubectl(
            t,
            &[
                "get",
                "cm",
                "settings",
                "-o",
                "json",
                "--show-managed-fields",
            ],
        );
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut m: Vec<(String, String)> = v["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["manager"].as_str().unwrap().to_owned(),
                    e["operation"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        m.sort();
        m
    };
    let data = |t: &Path| get_json(t, &["cm", "settings"])["data"].clone();
    let both = cm("  mode: edge\n  level: \"3\"\n");
    let out = ok(&demo, &["apply", "--server-side", "-f", &both]);
    assert!(
        out.contains("configmap/settings serverside-applied"),
        "{out}"
    );
    assert_eq!(
        managers(&demo),
        [("kubectl".to_owned(), "Apply".to_owned())]
    );
    ok(
        &demo,
        &["patch", "cm", "settings", "-p", r#"{"data":{"level":"4"}}"#],
    );
    let out = fails(&demo, &["apply", "--server-side", "-f", &both]);
    assert!(
        out.contains(r#"Apply failed with 1 conflict: conflict with "kubectl-patch": .data.level"#),
        "{out}"
    );
    assert_eq!(data(&demo)["level"], "4", "a refused apply changes nothing");
    ok(
        &demo,
        &["apply", "--server-side", "--force-conflicts", "-f", &both],
    );
    assert_eq!(data(&demo)["level"], "3");
    assert_eq!(
        managers(&demo),
        [("kubectl".to_owned(), "Apply".to_owned())]
    );
    ok(
        &demo,
        &[
            "apply",
            "--server-side",
            "--field-manager=team-b",
            "-f",
            &cm("  extra: x\n"),
        ],
    );
    ok(
        &demo,
        &["apply", "--server-side", "-f", &cm("  level: \"3\"\n")],
    );
    assert_eq!(
        data(&demo),
        serde_json::json!({"level": "3", "extra": "x"}),
        "mode is dropped (no longer applied, no other owner); team-b's field stays"
    );
    let out = fails(&acme, &["get", "cm", "settings"]);
    assert!(out.contains("not found"), "{out}");

    // describe: workload status, pod events from the agent.
    let out = ok(&demo, &["describe", "deployment", "web"]);
    assert!(
        out.contains("Replicas:") && out.contains("3 desired"),
        "{out}"
    );
    assert!(
        out.contains("ScalingReplicaSet") && out.contains("Scaled up replica set web-"),
        "the Deployment's events: {out}"
    );
    let out = ok(&demo, &["describe", "pod", &running_web(&demo)[0].0]);
    assert!(out.contains("Events:") && out.contains("Started"), "{out}");
    let out = ok(&demo, &["get", "events"]);
    assert!(out.contains("Started container web"), "{out}");

    // logs: -c, --tail.
    let pod = running_web(&demo)[0].0.clone();
    wait_for("web logs", 30, || {
        let (_, out) = kubectl(&demo, &["logs", &pod, "-c", "web", "--tail", "20"]);
        if out.contains("serving from") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    let out = fails(&demo, &["logs", &pod, "-c", "nope"]);
    assert!(out.contains("container nope is not valid"), "{out}");

    // exec: output, error stream, exit code, standard input (process runtime: the
    // command runs on the node with the container's environment); another tenant
    // cannot reach the pod.
    let run = |t: &Path, args: &[&str], input: &[u8]| {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(t)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(
        &demo,
        &[
            "exec",
            &pod,
            "--",
            "sh",
            "-c",
            "echo $POD_NAME; echo oops >&2; exit 3",
        ],
        b"",
    );
    assert_eq!(code, Some(3), "the command's exit code: {out} {err}");
    assert_eq!(out.trim(), pod, "{err}");
    assert!(err.contains("oops"), "{err}");
    let input: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let (code, out, err) = run(
        &demo,
        &["exec", "-i", &pod, "--", "wc", "-l"],
        input.as_bytes(),
    );
    assert_eq!((code, out.trim()), (Some(0), "20000"), "{err}");
    // A pod on a simulated node: logs and exec say at once that nothing runs there.
    let ghost = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ghost"},
        "spec": {"nodeName": "sim-seoul-gpu", "containers": [{"name": "c", "image": "busybox:1.36",
            "command": ["sleep", "3600"]}]}}"#;
    let ghost_path = dir.path().join("ghost.json");
    std::fs::write(&ghost_path, ghost).unwrap();
    ok(&demo, &["apply", "-f", ghost_path.to_str().unwrap()]);
    wait_for("the ghost pod is Running", 30, || {
        let p = get_json(&demo, &["pod", "ghost"]);
        if p["status"]["phase"] == "Running" {
            Ok(())
        } else {
            Err(p["status"].to_string())
        }
    })
    .await;
    let (code, _, err) = run(&demo, &["exec", "ghost", "--", "true"], b"");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("simulated node"), "{err}");
    let out = fails(&demo, &["logs", "ghost"]);
    assert!(out.contains("simulated node"), "{out}");
    ok(&demo, &["delete", "pod", "ghost", "--wait=false"]);

    // -t: the command gets a terminal (kubectl needs one too: `script` gives it).
    let kc = demo.to_str().unwrap();
    let (code, out, err) = {
        use std::io::Write;
        let mut child = Command::new("script")
            .args([
                "-qec",
                &format!("stty cols 100 rows 30; kubectl --kubeconfig {kc} exec -it {pod} -- sh"),
                "/dev/null",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"tty; stty size; exit 7\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(7), "{out} {err}");
    assert!(
        out.contains("/dev/pts/"),
        "the shell runs on a terminal: {out}"
    );
    assert!(
        out.contains("30 100"),
        "kubectl's terminal size reaches it: {out}"
    );
    let (code, _, err) = run(&demo, &["exec", &pod, "-c", "nope", "--", "true"], b"");
    assert_ne!(code, Some(0));
    assert!(err.contains("container nope is not valid"), "{err}");
    let (code, _, err) = run(&acme, &["exec", &pod, "--", "true"], b"");
    assert_ne!(code, Some(0));
    assert!(err.contains("not found"), "{err}");

    // port-forward: kubectl's local port reaches a port of the pod through the
    // API server, the region and the node's agent; a port nothing listens on is
    // reported as kubectl reports it.
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let page: String = (0..20_000).map(|i| format!("row {i}\n")).collect();
    std::fs::write(www.join("page.txt"), &page).unwrap();
    let pod_port = super::free_port();
    let manifest = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "files"},
        "spec": {"containers": [{"name": "httpd", "image": "busybox:1.36",
            "command": ["busybox", "httpd", "-f", "-p", pod_port.to_string(), "-h", www.to_str().unwrap()]}]}});
    let path = dir.path().join("files.json");
    std::fs::write(&path, manifest.to_string()).unwrap();
    ok(&demo, &["apply", "-f", path.to_str().unwrap()]);
    wait_for("the files pod runs", 60, || {
        let p = get_json(&demo, &["pod", "files"]);
        if p["status"]["phase"] == "Running" {
            Ok(())
        } else {
            Err(p["status"].to_string())
        }
    })
    .await;
    let forward = |to: u16| {
        let local = super::free_port();
        let child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&demo)
            .args(["port-forward", "pod/files", &format!("{local}:{to}")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        (super::Proc(child), local)
    };
    let get = |port: u16, path: &str| -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let (pf, local) = forward(pod_port);
    let mut body = None;
    wait_for("the forwarded port answers", 30, || {
        match get(local, "/page.txt") {
            Some(r) if r.contains("200 OK") => {
                body = Some(r);
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let body = body.unwrap();
    assert!(
        body.ends_with(&page),
        "the whole page came through ({} bytes)",
        body.len()
    );
    drop(pf);
    let (mut pf, local) = forward(1);
    // A connection held open until kubectl gives up on it.
    wait_for("kubectl listens and tries the port", 30, || {
        use std::io::Read;
        let mut c =
            std::net::TcpStream::connect(("127.0.0.1", local)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let _ = c.read(&mut [0u8; 16]);
        Ok(())
    })
    .await;
    // The connection made it try: kubectl reports the failure and gives up.
    let mut stderr = pf.0.stderr.take().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while pf.0.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = pf.0.kill();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    assert!(
        err.contains("error forwarding port 1 to pod files") && err.contains("refused"),
        "{err}"
    );

    // logs -f follows: the last line, then a new one the container writes later.
    let (_follow, lines) = lines_of(&demo, &["logs", "-f", &pod, "--tail=1"]);
    let first = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("a first line");
    let next = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("a followed line");
    assert!(next.contains("alive"), "{first} / {next}");

    // scale, watched with get -w, and the rollout commands.
    let (_watch, watched) = lines_of(&demo, &["get", "pods", "-l", "app=web", "-w", "-o", "name"]);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 3 {
        seen.insert(
            watched
                .recv_timeout(Duration::from_secs(20))
                .expect("the listed pods"),
        );
    }
    let out = ok(&demo, &["scale", "deployment", "web", "--replicas=4"]);
    assert!(out.contains("scaled"), "{out}");
    while seen.len() < 4 {
        let line = watched
            .recv_timeout(Duration::from_secs(30))
            .expect("the watch shows the new pod");
        seen.insert(line);
    }
    ok(
        &demo,
        &["rollout", "status", "deployment", "web", "--timeout=90s"],
    );
    ok(&demo, &["rollout", "restart", "deployment", "web"]);
    ok(
        &demo,
        &["rollout", "status", "deployment", "web", "--timeout=90s"],
    );
    let revisions = |t: &Path| -> Vec<String> {
        ok(t, &["rollout", "history", "deployment", "web"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.parse::<u32>().is_ok())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(revisions(&demo), ["1", "2"]);
    ok(&demo, &["rollout", "undo", "deployment", "web"]);
    ok(
        &demo,
        &["rollout", "status", "deployment", "web", "--timeout=90s"],
    );
    wait_for("the rolled-back revision is 3", 30, || {
        let r = revisions(&demo);
        if r == ["2", "3"] {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    let d = get_json(&demo, &["deployment", "web"]);
    assert!(
        d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .is_null(),
        "undo brings back revision 1's template: {d}"
    );
    assert_eq!(revisions(&acme), ["1"], "acme's Deployment is untouched");

    // Admin node operations: a tenant may not cordon; drain evicts through risk
    // control (a protected workload's pods stay), and the evicted pods come back
    // on other nodes.
    // (kubectl cordon prints the refusal but exits 0.)
    let (_, out) = kubectl(&demo, &["cordon", &node]);
    assert!(out.contains("forbidden"), "{out}");
    let n = get_json(&admin, &["node", &node]);
    assert!(n["spec"]["unschedulable"].is_null(), "{n}");
    let out = ok(&admin, &["cordon", &node]);
    assert!(out.contains("cordoned"), "{out}");
    let out = ok(&admin, &["get", "node", &node]);
    assert!(out.contains("SchedulingDisabled"), "{out}");
    ok(&admin, &["uncordon", &node]);
    let protect = r#"{"apiVersion": "meridian.io/v1alpha1", "kind": "RiskPolicy",
        "metadata": {"name": "keep-web"},
        "spec": {"selector": {"kinds": ["Deployment"], "names": ["web"]}, "rules": {"protect": true}}}"#;
    let path = dir.path().join("keep-web.json");
    std::fs::write(&path, protect).unwrap();
    ok(&demo, &["apply", "-f", path.to_str().unwrap()]);
    let node = running_web(&demo)[0].1.clone();
    let out = fails(
        &admin,
        &[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--pod-selector=app=web",
            "--timeout=20s",
        ],
    );
    assert!(
        out.contains("protected"),
        "risk control refuses the eviction: {out}"
    );
    assert!(
        running_web(&demo).iter().any(|p| p.1 == node),
        "nothing was evicted"
    );
    ok(&demo, &["delete", "riskpolicy", "keep-web"]);
    let out = ok(
        &admin,
        &[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--pod-selector=app=web",
            "--timeout=60s",
        ],
    );
    assert!(out.contains("evicted") && out.contains("drained"), "{out}");
    wait_for("web pods back to 4, none on the drained node", 90, || {
        let (d, a) = (running_web(&demo), running_web(&acme));
        let on_node = d.iter().chain(&a).filter(|p| p.1 == node).count();
        if d.len() == 4 && a.len() == 3 && on_node == 0 {
            Ok(())
        } else {
            Err(format!("demo {d:?} acme {a:?}"))
        }
    })
    .await;
    ok(&admin, &["uncordon", &node]);

    // delete --cascade: orphan leaves the ReplicaSets; background takes the pods.
    let out = ok(&acme, &["delete", "deployment", "web", "--cascade=orphan"]);
    assert!(out.contains("deleted"), "{out}");
    wait_for("the orphaned ReplicaSet is released", 30, || {
        let rs = get_json(&acme, &["replicasets"]);
        let items = rs["items"].as_array().unwrap();
        if !items.is_empty()
            && items
                .iter()
                .all(|r| r["metadata"]["ownerReferences"].is_null())
        {
            Ok(())
        } else {
            Err(rs.to_string())
        }
    })
    .await;
    assert_eq!(running_web(&acme).len(), 3, "orphaned pods keep running");
    ok(
        &acme,
        &[
            "delete",
            "replicasets",
            "--all",
            "--cascade=foreground",
            "--wait=true",
            "--timeout=60s",
        ],
    );
    wait_for("acme's pods are gone", 60, || {
        let out = ok(&acme, &["get", "pods", "-o", "name"]);
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    assert_eq!(running_web(&demo).len(), 4, "demo's pods are untouched");
    let out = names(&ok(&demo, &["get", "replicasets", "-o", "name"]));
    assert_eq!(out.len(), 2, "demo keeps its two revisions: {out:?}");

    // describe works for every kind, for tenants and the admin.
    for kind in [
        "pods",
        "deployments",
        "replicasets",
        "daemonsets",
        "jobs",
        "services",
        "configmaps",
        "secrets",
        "events",
        "leases",
        "namespaces",
        "nodes",
        "placementpolicies",
        "riskpolicies",
        "imageprepulls",
    ] {
        ok(&demo, &["describe", kind]);
    }
    for kind in ["tenants", "edgeclusters", "nodes"] {
        let out = ok(&admin, &["describe", kind]);
        assert!(out.contains("Name:"), "describe {kind}: {out}");
    }
    ok(&admin, &["describe", "clusterriskpolicies"]);
    let out = ok(&admin, &["describe", "edgecluster", "eu-west"]);
    assert!(out.contains("Endpoint"), "{out}");

    // logs --previous: the crashed container's last attempt.
    let out = ok(&demo, &["logs", "crash", "--previous"]);
    assert!(out.contains("attempt at"), "{out}");
    let restarts =
        &get_json(&demo, &["pod", "crash"])["status"]["containerStatuses"][0]["restartCount"];
    assert!(restarts.as_i64().unwrap_or(0) >= 1, "{restarts}");
}

/// Starts kubectl and hands its output line by line (the process ends on drop).
fn lines_of(kubeconfig: &Path, args: &[&str]) -> (super::Proc, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (super::Proc(child), rx)
}
