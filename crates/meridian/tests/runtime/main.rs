//! The runtime conformance suite: the same checks against the process runtime and
//! the containerd runtime (a private containerd, images from a loopback registry),
//! plus what only an image runtime has (pull errors, OOM kills, limits).

mod fixtures;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fixtures::{Containerd, Registry};
use meridian_agent::runtime::containerd::ContainerdRuntime;
use meridian_agent::runtime::process::ProcessRuntime;
use meridian_agent::runtime::{
    ContainerHandle, Exit, ImageGcPolicy, ImageRequest, PullPolicy, RunState, Runtime,
    RuntimeError, StartRequest,
};
use tempfile::TempDir;

struct Env {
    dir: TempDir,
    image: String,
}

fn request(env: &Env, pod: &str, container: &str, script: &str) -> StartRequest {
    let pod_dir = env.dir.path().join("pods").join(pod);
    let dir = pod_dir.join(container);
    std::fs::create_dir_all(dir.join("0")).unwrap();
    let argv: Vec<String> = ["sh", "-c", script].map(String::from).to_vec();
    StartRequest {
        pod_uid: pod.into(),
        container: container.into(),
        attempt: 0,
        argv: argv.clone(),
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("GREETING".into(), "hello from env".into()),
        ],
        working_dir: None,
        log_path: dir.join("0.log"),
        state_dir: dir.join("0"),
        cpu_limit_millis: None,
        memory_limit_bytes: None,
        image: ImageRequest {
            pod_name: pod.into(),
            pod_namespace: "conformance".into(),
            image: env.image.clone(),
            pull_policy: PullPolicy::IfNotPresent,
            credentials: None,
            command: argv,
            args: Vec::new(),
        },
        mounts: Vec::new(),
    }
}

async fn wait_exit(rt: &dyn Runtime, h: &ContainerHandle, timeout: Duration) -> Exit {
    let deadline = Instant::now() + timeout;
    loop {
        if let RunState::Exited(e) = rt.inspect(h).await {
            return e;
        }
        assert!(Instant::now() < deadline, "container {} did not exit", h.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Checks every runtime must pass.
async fn conformance(rt: Arc<dyn Runtime>, env: &Env) {
    // Output goes to the log path in the CRI format, the exit code comes back.
    let req = request(
        env,
        "p1",
        "c",
        "echo out; echo $GREETING; echo err >&2; exit 3",
    );
    let log = req.log_path.clone();
    let h = rt.start(req).await.expect("start");
    let exit = wait_exit(&*rt, &h, Duration::from_secs(30)).await;
    assert_eq!(exit.exit_code, 3, "{}: {exit:?}", rt.name());
    let lines = log_lines(&log);
    let find = |stream: &str, text: &str| {
        lines.iter().any(|l| {
            let parts: Vec<&str> = l.splitn(4, ' ').collect();
            parts.len() == 4 && parts[1] == stream && parts[2] == "F" && parts[3] == text
        })
    };
    assert!(find("stdout", "out"), "{}: {lines:?}", rt.name());
    assert!(find("stdout", "hello from env"), "{}: {lines:?}", rt.name());
    assert!(find("stderr", "err"), "{}: {lines:?}", rt.name());
    rt.remove_pod("p1").await;

    // A running container: exec sees it, usage is reported, stop is graceful.
    let req = request(
        env,
        "p2",
        "c",
        "trap 'echo got TERM; exit 0' TERM; touch /tmp/ready-$$; while true; do sleep 0.1; done",
    );
    let log = req.log_path.clone();
    let h = rt.start(req).await.expect("start");
    assert_eq!(rt.inspect(&h).await, RunState::Running);
    let ok = ["sh", "-c", "exit 0"].map(String::from);
    let bad = ["sh", "-c", "exit 7"].map(String::from);
    assert_eq!(
        rt.exec(&h, &ok, &[], Duration::from_secs(10))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        rt.exec(&h, &bad, &[], Duration::from_secs(10))
            .await
            .unwrap(),
        7
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((_, mem)) = rt.usage(&h).await
            && mem > 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no usage reported",
            rt.name()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t = Instant::now();
    rt.stop(&h, Duration::from_secs(10)).await;
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "TERM was not delivered"
    );
    let exit = wait_exit(&*rt, &h, Duration::from_secs(10)).await;
    assert_eq!(exit.exit_code, 0, "{}: {exit:?}", rt.name());
    assert!(
        log_lines(&log).iter().any(|l| l.ends_with("got TERM")),
        "{}",
        rt.name()
    );

    // A container that ignores TERM is killed when the grace period ends.
    let req = request(
        env,
        "p2",
        "stubborn",
        "trap '' TERM; echo armed; while true; do sleep 0.1; done",
    );
    let log = req.log_path.clone();
    let h = rt.start(req).await.expect("start");
    // Stop only once the trap is set: a TERM that lands before it (a busy machine
    // starts the shell late) ends the shell at once, which is not what is tested.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log_lines(&log).iter().any(|l| l.ends_with(" armed")) {
        assert!(
            Instant::now() < deadline,
            "{}: the trap was never set",
            rt.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    rt.stop(&h, Duration::from_secs(1)).await;
    let exit = wait_exit(&*rt, &h, Duration::from_secs(15)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "killed before the grace period"
    );
    assert_ne!(exit.exit_code, 0, "{}: {exit:?}", rt.name());
    rt.remove_pod("p2").await;
}

#[tokio::test]
async fn process_runtime_passes_the_conformance_suite() {
    let env = Env {
        dir: TempDir::new().unwrap(),
        image: "unused".into(),
    };
    let rt: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(env!("CARGO_BIN_EXE_meridian").into()));
    conformance(rt, &env).await;
}

struct ContainerdEnv {
    env: Env,
    registry: Registry,
    containerd: Containerd,
}

async fn containerd_env() -> ContainerdEnv {
    let dir = TempDir::new().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = registry.push("test/busybox:1", &fixtures::busybox()).await;
    let containerd = Containerd::start(&dir.path().join("containerd"), &registry).await;
    ContainerdEnv {
        env: Env { dir, image },
        registry,
        containerd,
    }
}

#[tokio::test]
async fn containerd_runtime_passes_the_conformance_suite() {
    let ce = containerd_env().await;
    let rt: Arc<dyn Runtime> = Arc::new(ContainerdRuntime::new(&ce.containerd.socket));
    conformance(rt, &ce.env).await;
}

#[tokio::test]
async fn containerd_enforces_memory_limits_and_reports_oom_kills() {
    let ce = containerd_env().await;
    let rt = ContainerdRuntime::new(&ce.containerd.socket);
    assert_eq!(rt.limits_not_enforced(), None);
    let mut req = request(
        &ce.env,
        "oom",
        "hog",
        // Keeps doubling a shell variable until the 32 MiB limit kills it.
        "x=0123456789abcdef; while true; do x=$x$x; done",
    );
    req.memory_limit_bytes = Some(32 * 1024 * 1024);
    let h = rt.start(req).await.expect("start");
    let exit = wait_exit(&rt, &h, Duration::from_secs(60)).await;
    assert_eq!(exit.reason.as_deref(), Some("OOMKilled"), "{exit:?}");
    assert_eq!(exit.exit_code, 137, "{exit:?}");
    rt.remove_pod("oom").await;
}

#[tokio::test]
async fn containerd_merges_the_command_with_the_image_config_as_kubernetes_does() {
    let ce = containerd_env().await;
    let rt = ContainerdRuntime::new(&ce.containerd.socket);
    // An image whose default command prints its arguments.
    let img = meridian_oci::build::busybox(
        Path::new("/bin/busybox"),
        &["echo", "image", "default"],
        Vec::new(),
    )
    .unwrap();
    let image = ce.registry.push("test/echo:1", &img).await;
    for (pod, command, args, want) in [
        ("m1", vec![], vec![], "image default"),
        ("m2", vec![], vec!["echo", "args", "only"], "args only"),
        (
            "m3",
            vec!["echo", "cmd"],
            vec!["and", "args"],
            "cmd and args",
        ),
    ] {
        let mut req = request(&ce.env, pod, "c", "unused");
        req.image.image = image.clone();
        req.image.command = command.into_iter().map(String::from).collect();
        req.image.args = args.into_iter().map(String::from).collect();
        let log = req.log_path.clone();
        let h = rt.start(req).await.expect("start");
        let exit = wait_exit(&rt, &h, Duration::from_secs(30)).await;
        assert_eq!(exit.exit_code, 0, "{pod}: {exit:?}");
        let lines = log_lines(&log);
        assert!(
            lines.iter().any(|l| l.ends_with(&format!("F {want}"))),
            "{pod}: {lines:?}"
        );
        rt.remove_pod(pod).await;
    }
}

#[tokio::test]
async fn containerd_reports_image_problems_with_kubernetes_reasons() {
    let mut ce = containerd_env().await;
    let rt = ContainerdRuntime::new(&ce.containerd.socket);
    let reason = |r: Result<ContainerHandle, RuntimeError>| match r {
        Err(RuntimeError::Image { reason, message }) => (reason, message),
        other => panic!("expected an image error, got {other:?}"),
    };
    let mut req = request(&ce.env, "img", "c", "true");
    req.image.image = "Not A Valid/Name".into();
    let (r, m) = reason(rt.start(req.clone()).await);
    assert_eq!(r, "InvalidImageName", "{m}");

    req.image.image = format!("{}/test/missing:1", ce.registry.addr);
    let (r, m) = reason(rt.start(req.clone()).await);
    assert_eq!(r, "ErrImagePull", "{m}");
    assert!(m.contains("test/missing"), "{m}");

    req.image.pull_policy = PullPolicy::Never;
    let (r, _) = reason(rt.start(req.clone()).await);
    assert_eq!(r, "ErrImageNeverPull");

    // With the image present and IfNotPresent, a dead registry does not matter.
    req.image.image = ce.env.image.clone();
    req.image.pull_policy = PullPolicy::IfNotPresent;
    let h = rt
        .start(req.clone())
        .await
        .expect("start with the image present");
    wait_exit(&rt, &h, Duration::from_secs(30)).await;
    ce.registry.stop();
    let mut again = req.clone();
    again.attempt = 1;
    let h = rt
        .start(again)
        .await
        .expect("IfNotPresent needs no registry");
    wait_exit(&rt, &h, Duration::from_secs(30)).await;
    // Always must reach the registry, which is down.
    req.image.pull_policy = PullPolicy::Always;
    req.attempt = 2;
    let (r, m) = reason(rt.start(req).await);
    assert_eq!(r, "ErrImagePull", "{m}");
    rt.remove_pod("img").await;
}

#[tokio::test]
async fn containerd_containers_outlive_the_agent_and_are_found_again() {
    let ce = containerd_env().await;
    let h = {
        let rt = ContainerdRuntime::new(&ce.containerd.socket);
        rt.start(request(
            &ce.env,
            "keep",
            "c",
            "while true; do sleep 0.1; done",
        ))
        .await
        .expect("start")
    };
    // A new runtime instance, as after an agent restart, finds the same container.
    let rt = ContainerdRuntime::new(&ce.containerd.socket);
    assert_eq!(rt.inspect(&h).await, RunState::Running);
    rt.stop(&h, Duration::from_secs(1)).await;
    assert!(matches!(rt.inspect(&h).await, RunState::Exited(_)));
    rt.remove_pod("keep").await;
    // Once the pod is removed its containers are gone.
    let gone = rt.inspect(&h).await;
    assert!(
        matches!(&gone, RunState::Exited(e) if e.reason.as_deref() == Some("ContainerMissing")),
        "{gone:?}"
    );
}

#[tokio::test]
async fn containerd_image_gc_removes_unused_images_and_keeps_those_in_use() {
    let ce = containerd_env().await;
    let rt = ContainerdRuntime::new(&ce.containerd.socket);
    let other =
        meridian_oci::build::busybox(Path::new("/bin/busybox"), &["true"], Vec::new()).unwrap();
    let unused = ce.registry.push("test/unused:1", &other).await;
    // Pull the unused image by running (and removing) a pod from it.
    let mut req = request(&ce.env, "gc-a", "c", "true");
    req.image.image = unused.clone();
    let h = rt.start(req).await.expect("start");
    wait_exit(&rt, &h, Duration::from_secs(30)).await;
    rt.remove_pod("gc-a").await;
    // A running container keeps its image.
    let h = rt
        .start(request(
            &ce.env,
            "gc-b",
            "c",
            "while true; do sleep 0.1; done",
        ))
        .await
        .expect("start");
    let never = ImageGcPolicy {
        high_percent: 100.0,
        low_percent: 100.0,
        ..Default::default()
    };
    let r = rt.gc_images(&never).await.unwrap().unwrap();
    assert!(
        r.removed.is_empty(),
        "below the high threshold nothing goes: {r:?}"
    );
    let always = ImageGcPolicy {
        high_percent: 0.0,
        low_percent: 0.0,
        ..Default::default()
    };
    let r = rt.gc_images(&always).await.unwrap().unwrap();
    assert_eq!(r.removed, vec![unused.clone()], "{r:?}");
    assert!(r.freed_bytes > 0);
    // The image in use and the sandbox image are still there: a new container
    // starts without a registry.
    let mut again = request(&ce.env, "gc-b", "d", "true");
    again.image.pull_policy = PullPolicy::Never;
    let h2 = rt.start(again).await.expect("the image in use was kept");
    wait_exit(&rt, &h2, Duration::from_secs(30)).await;
    let mut gone = request(&ce.env, "gc-c", "c", "true");
    gone.image.image = unused;
    gone.image.pull_policy = PullPolicy::Never;
    assert!(matches!(
        rt.start(gone).await,
        Err(RuntimeError::Image {
            reason: "ErrImageNeverPull",
            ..
        })
    ));
    rt.stop(&h, Duration::from_secs(1)).await;
    rt.remove_pod("gc-b").await;
}

#[tokio::test]
async fn containerd_pulls_from_a_registry_that_wants_credentials() {
    let ce = containerd_env().await;
    let private = Registry::start_with_auth(&ce.env.dir.path().join("private"), "bob", "s3cret");
    let image = private
        .push_as("team/app:1", &fixtures::busybox(), Some(("bob", "s3cret")))
        .await;
    fixtures::write_hosts(
        &ce.containerd.hosts_dir,
        &private.addr,
        &format!("http://{}", private.addr),
    );
    let rt = ContainerdRuntime::new(&ce.containerd.socket);
    let mut req = request(&ce.env, "auth", "c", "true");
    req.image.image = image;
    match rt.start(req.clone()).await {
        Err(RuntimeError::Image { reason, message }) => {
            assert_eq!(reason, "ErrImagePull");
            assert!(
                message.contains("401") || message.to_lowercase().contains("unauthorized"),
                "{message}"
            );
        }
        other => panic!("pulled without credentials: {other:?}"),
    }
    req.image.credentials = Some(("bob".into(), "wrong".into()));
    assert!(matches!(
        rt.start(req.clone()).await,
        Err(RuntimeError::Image { .. })
    ));
    req.image.credentials = Some(("bob".into(), "s3cret".into()));
    let h = rt
        .start(req)
        .await
        .expect("pull with the right credentials");
    let exit = wait_exit(&rt, &h, Duration::from_secs(30)).await;
    assert_eq!(exit.exit_code, 0);
    rt.remove_pod("auth").await;
}

/// Unmounts the tmpfs a test mounted, even when it panics.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_is_a_clear_pull_error_and_running_containers_carry_on() {
    // Declared first, dropped last: after containerd and the tmpfs are gone.
    let mut env = Env {
        dir: TempDir::new().unwrap(),
        image: String::new(),
    };
    let registry = Registry::start(&env.dir.path().join("registry"));
    env.image = registry.push("test/busybox:1", &fixtures::busybox()).await;
    // 24 MiB that do not compress, in an image too big for containerd's 20 MiB disk.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..24 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let big = meridian_oci::build::image(
        &[meridian_oci::build::Entry::File {
            path: "noise".into(),
            mode: 0o644,
            data: noise,
        }],
        &Default::default(),
    )
    .unwrap();
    let big = registry.push("test/big:1", &big).await;
    let disk = env.dir.path().join("containerd");
    std::fs::create_dir_all(&disk).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=20m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "mounting a tmpfs needs root (the test command runs as root)"
    );
    let _unmount = Tmpfs(disk.clone());
    let containerd = fixtures::Containerd::start(&disk, &registry).await;
    let rt = ContainerdRuntime::new(&containerd.socket);
    let h = rt
        .start(request(
            &env,
            "small",
            "c",
            "while true; do sleep 0.1; done",
        ))
        .await
        .expect("a small image fits");
    let mut req = request(&env, "big", "c", "true");
    req.image.image = big;
    match rt.start(req).await {
        Err(RuntimeError::Image { reason, message }) => {
            assert_eq!(reason, "ErrImagePull");
            assert!(message.contains("no space left on device"), "{message}");
        }
        other => panic!("a 24 MiB image fitted on a 20 MiB disk: {other:?}"),
    }
    assert_eq!(rt.inspect(&h).await, RunState::Running);
    rt.stop(&h, Duration::from_secs(1)).await;
    rt.remove_pod("small").await;
    rt.remove_pod("big").await;
}
