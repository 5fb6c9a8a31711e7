//! The containerd runtime: containers from OCI images, through containerd's CRI
//! API (`runtime.v1`, the one kubelet uses) over its unix socket.
//!
//! One pod sandbox per pod (host network: pods share the node's address, ports
//! are host ports), one CRI container per container attempt. containerd pulls and
//! unpacks images itself (registry mirrors, such as the region's image cache,
//! come from its `hosts.toml` configuration), applies cpu/memory limits through
//! cgroups, writes logs in the CRI format to the path the agent chooses (the same
//! place and format as the process runtime), and reports OOM kills. Containers
//! live in containerd's shims, so they survive an agent restart and are found
//! again by id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{
    ContainerHandle, ExecProcess, ExecRequest, Exit, GcReport, ImageGcPolicy, PullPolicy, RunState,
    Runtime, RuntimeError, StartRequest,
};

pub const LABEL_POD_UID: &str = "meridian.io/pod-uid";
pub const LABEL_CONTAINER: &str = "meridian.io/container";
pub const LABEL_ATTEMPT: &str = "meridian.io/attempt";

/// How long one pull may take before it is reported as failed.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ContainerdRuntime {
    socket: PathBuf,
    channel: Channel,
    /// Pod uid → sandbox id.
    sandboxes: Mutex<HashMap<String, String>>,
    /// One pull at a time per image (concurrent pods of one image wait for it).
    pulls: Mutex<HashMap<String, std::sync::Arc<Mutex<()>>>>,
    mirrors: Option<Mirrors>,
    /// Image reference → when a container last started from it (for image GC).
    last_used: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// Pull through the region's image cache: the agent writes containerd's
/// `hosts.toml` for each registry it pulls from, listing the region endpoints as
/// mirrors (containerd falls back to the registry itself when they all fail).
/// containerd must read them: `config_path` in its CRI registry section.
#[derive(Clone, Debug)]
pub struct Mirrors {
    pub hosts_dir: PathBuf,
    pub endpoints: Vec<String>,
    /// CA (PEM file) of regions served over TLS.
    pub ca: Option<PathBuf>,
    /// A node that joined through the center follows its assignment: after a move
    /// the mirror is the new region (read at each pull).
    pub identity: Option<crate::join::IdentityDir>,
}

impl Mirrors {
    /// The region endpoints to pull through now.
    fn current(&self) -> Vec<String> {
        match self.identity.as_ref().and_then(|i| i.saved()) {
            Some(saved) => vec![saved.endpoint],
            None => self.endpoints.clone(),
        }
    }

    /// The `hosts.toml` for `registry`.
    pub fn hosts_toml(&self, registry: &str) -> String {
        let endpoints = self.current();
        let loopback = registry.starts_with("127.")
            || registry.starts_with("localhost")
            || registry.starts_with("[::1]");
        let server = match registry {
            "docker.io" => "https://registry-1.docker.io".to_owned(),
            // Served by the region itself: there is no upstream to fall back to.
            meridian_oci::LOCAL_REGISTRY => endpoints.first().cloned().unwrap_or_default(),
            r if loopback => format!("http://{r}"),
            r => format!("https://{r}"),
        };
        let mut out = format!(
            "# written by the meridian agent: pulls go through the region\nserver = \"{server}\"\n"
        );
        for e in &endpoints {
            out.push_str(&format!(
                "\n[host.\"{e}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ));
            if let Some(ca) = self.ca.as_ref().filter(|_| e.starts_with("https://")) {
                out.push_str(&format!("  ca = \"{}\"\n", ca.display()));
            }
        }
        out
    }

    /// Writes `registry`'s `hosts.toml` when it differs from what is there.
    pub fn configure(&self, registry: &str) -> std::io::Result<()> {
        if registry.contains(['/', '\\']) || registry.starts_with('.') {
            return Ok(());
        }
        let dir = self.hosts_dir.join(registry);
        let path = dir.join("hosts.toml");
        let want = self.hosts_toml(registry);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(want.as_str()) {
            return Ok(());
        }
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(".hosts.toml.tmp");
        std::fs::write(&tmp, want)?;
        std::fs::rename(tmp, path)
    }
}

/// A containerd configuration for a private containerd in `dir` (own root, state
/// and socket), with the CRI plugin set up as these machines need
/// (`restrict_oom_score_adj`, a sandbox image that is reachable, registry hosts
/// from `hosts_dir`). What `meridian up --runtime containerd` and the tests run.
pub fn private_config(dir: &Path, sandbox_image: &str, hosts_dir: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  enable_cdi = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = private_socket(dir).display(),
        hosts = hosts_dir.display(),
    )
}

/// The exit code in the `Status` a streaming server sends when a command ends
/// (`Success`, or `NonZeroExitCode` with the code as a cause).
fn exit_code(status: &[u8]) -> i32 {
    let v: serde_json::Value = serde_json::from_slice(status).unwrap_or_default();
    if v["status"] == "Success" {
        return 0;
    }
    v["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["reason"] == "ExitCode")
        .and_then(|c| c["message"].as_str()?.parse().ok())
        .unwrap_or(1)
}

/// The socket of the private containerd in `dir`.
pub fn private_socket(dir: &Path) -> PathBuf {
    dir.join("containerd.sock")
}

/// Kills what a private containerd in `dir` left behind once it is stopped:
/// its shims and their containers (shims outlive containerd by design; ours name
/// its socket on their command line), then unmounts anything under `dir`.
pub fn kill_private_leftovers(dir: &Path) -> usize {
    let sock = private_socket(dir).to_string_lossy().into_owned();
    let mut killed = 0;
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("containerd-shim") && cmd.contains(sock.as_str()) {
                // The shim's children (the containers) first, then the shim.
                for child in children(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed += 1;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    // Strictly below `dir`: `dir` itself may be a mount of the caller's.
    let prefix = format!("{}/", dir.to_string_lossy());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| m.starts_with(prefix.as_str()))
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in ours {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    killed
}

/// Pids whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.to_owned();
                    after.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn status_err(what: &str, s: tonic::Status) -> String {
    format!("{what}: {}", s.message())
}

fn ns_options() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

impl ContainerdRuntime {
    /// A runtime on containerd's socket. Connects lazily: containerd may start
    /// after the agent; [`ContainerdRuntime::check`] says whether it answers.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        let socket = socket.into();
        let path = socket.clone();
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }));
        Self {
            socket,
            channel,
            sandboxes: Mutex::new(HashMap::new()),
            pulls: Mutex::new(HashMap::new()),
            mirrors: None,
            last_used: Default::default(),
        }
    }

    /// Pull images (and the sandbox image, `meridian.local/...`) through these
    /// mirrors.
    pub fn with_mirrors(mut self, mirrors: Mirrors) -> Self {
        if let Err(e) = mirrors.configure(meridian_oci::LOCAL_REGISTRY) {
            tracing::warn!(dir = %mirrors.hosts_dir.display(), "cannot write hosts.toml: {e}");
        }
        self.mirrors = Some(mirrors);
        self
    }

    /// CRI `Exec` through containerd's streaming server (see `exec_stream`).
    async fn exec_streaming(
        &self,
        handle: &ContainerHandle,
        req: ExecRequest,
    ) -> Result<ExecProcess, RuntimeError> {
        use futures::{SinkExt, StreamExt};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            RuntimeError::Start(format!("exec: {what}: {e}"))
        };
        let url = self
            .rt()
            .exec(req_(cri::ExecRequest {
                container_id: handle.id.clone(),
                cmd: req.argv,
                tty: req.tty,
                stdin: true,
                stdout: true,
                stderr: !req.tty,
            }))
            .await
            .map_err(|e| RuntimeError::Start(status_err("exec", e)))?
            .into_inner()
            .url;
        let authority = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .ok_or_else(|| fail("streaming URL", &url))?
            .to_owned();
        let mut request = url
            .replacen("http://", "ws://", 1)
            .into_client_request()
            .map_err(|e| fail("streaming URL", &e))?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tokio_tungstenite::tungstenite::http::HeaderValue::from_static("v4.channel.k8s.io"),
        );
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| fail("streaming server", &e))?;
        let (ws, _) = tokio_tungstenite::client_async(request, tcp)
            .await
            .map_err(|e| fail("streaming server", &e))?;
        let (mut ws_tx, mut ws_rx) = ws.split();
        let (stdin_w, mut stdin_r) = tokio::io::duplex(64 * 1024);
        let (mut out_w, out_r) = tokio::io::duplex(64 * 1024);
        let (mut err_w, err_r) = tokio::io::duplex(64 * 1024);
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<i32>();
        let (size_tx, mut size_rx) = tokio::sync::mpsc::unbounded_channel::<(u16, u16)>();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            let mut stdin_open = true;
            let mut code = 0;
            loop {
                tokio::select! {
                    n = stdin_r.read(&mut buf), if stdin_open => match n {
                        Ok(0) | Err(_) => stdin_open = false,
                        Ok(n) => {
                            let mut f = Vec::with_capacity(n + 1);
                            f.push(0);
                            f.extend_from_slice(&buf[..n]);
                            if ws_tx.send(Message::Binary(f.into())).await.is_err() {
                                break;
                            }
                        }
                    },
                    Some((cols, rows)) = size_rx.recv() => {
                        let mut f = vec![4];
                        f.extend_from_slice(
                            serde_json::json!({"Width": cols, "Height": rows}).to_string().as_bytes(),
                        );
                        if ws_tx.send(Message::Binary(f.into())).await.is_err() {
                            break;
                        }
                    }
                    m = ws_rx.next() => match m {
                        Some(Ok(Message::Binary(b))) => match b.first() {
                            Some(1) => { let _ = out_w.write_all(&b[1..]).await; }
                            Some(2) => { let _ = err_w.write_all(&b[1..]).await; }
                            Some(3) if b.len() > 1 => code = exit_code(&b[1..]),
                            _ => {}
                        },
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        Some(Ok(_)) => {}
                    },
                }
            }
            drop(out_w);
            drop(err_w);
            let _ = exit_tx.send(code);
        });
        Ok(ExecProcess {
            stdin: Some(Box::pin(stdin_w)),
            stdout: Box::pin(out_r),
            stderr: Some(Box::pin(err_r)),
            exit: Box::pin(async move {
                exit_rx
                    .await
                    .map_err(|_| RuntimeError::Start("exec session ended".into()))
            }),
            resize: req.tty.then(|| {
                Box::new(move |cols, rows| {
                    let _ = size_tx.send((cols, rows));
                }) as Box<dyn Fn(u16, u16) + Send>
            }),
        })
    }

    fn rt(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// containerd's name and version, or why it cannot be reached.
    pub async fn check(&self) -> Result<String, RuntimeError> {
        let v = self
            .rt()
            .version(call(cri::VersionRequest::default(), CALL_TIMEOUT))
            .await
            .map_err(|e| {
                RuntimeError::Start(format!(
                    "containerd at {} does not answer: {}",
                    self.socket.display(),
                    e.message()
                ))
            })?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    fn sandbox_config(req: &StartRequest) -> cri::PodSandboxConfig {
        // Logs live under <data>/pods/<uid>/<container>/<attempt>.log: the sandbox's
        // log directory is the pod's directory.
        let log_dir = req
            .log_path
            .parent()
            .and_then(Path::parent)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: req.image.pod_name.clone(),
                uid: req.pod_uid.clone(),
                namespace: req.image.pod_namespace.clone(),
                attempt: 0,
            }),
            // Host network: runc refuses a hostname without a UTS namespace.
            hostname: String::new(),
            log_directory: log_dir,
            labels: HashMap::from([(LABEL_POD_UID.to_owned(), req.pod_uid.clone())]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: "/meridian".into(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The pod's ready sandbox, created when it has none.
    async fn sandbox(&self, req: &StartRequest) -> Result<String, RuntimeError> {
        let mut map = self.sandboxes.lock().await;
        if let Some(id) = map.get(&req.pod_uid) {
            return Ok(id.clone());
        }
        let found = self
            .rt()
            .list_pod_sandbox(req_(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxReady as i32,
                    }),
                    label_selector: HashMap::from([(
                        LABEL_POD_UID.to_owned(),
                        req.pod_uid.clone(),
                    )]),
                    ..Default::default()
                }),
            }))
            .await
            .map_err(|e| RuntimeError::Start(status_err("listing pod sandboxes", e)))?
            .into_inner()
            .items;
        let id = match found.into_iter().next() {
            Some(s) => s.id,
            None => {
                let _ = std::fs::create_dir_all(Self::sandbox_config(req).log_directory);
                self.rt()
                    .run_pod_sandbox(call(
                        cri::RunPodSandboxRequest {
                            config: Some(Self::sandbox_config(req)),
                            runtime_handler: String::new(),
                        },
                        PULL_TIMEOUT,
                    ))
                    .await
                    .map_err(|e| RuntimeError::Start(status_err("creating the pod sandbox", e)))?
                    .into_inner()
                    .pod_sandbox_id
            }
        };
        map.insert(req.pod_uid.clone(), id.clone());
        Ok(id)
    }

    /// Makes the image present as its pull policy says.
    async fn ensure_image(
        &self,
        image_req: &super::ImageRequest,
        sandbox: Option<cri::PodSandboxConfig>,
    ) -> Result<(), RuntimeError> {
        let image = &image_req.image;
        let parsed = meridian_oci::Reference::parse(image).map_err(|e| RuntimeError::Image {
            reason: "InvalidImageName",
            message: e.to_string(),
        })?;
        if let Some(m) = &self.mirrors
            && let Err(e) = m.configure(&parsed.registry)
        {
            tracing::warn!(registry = %parsed.registry, "cannot write hosts.toml: {e}");
        }
        let lock = self
            .pulls
            .lock()
            .await
            .entry(image.clone())
            .or_default()
            .clone();
        let _one_pull = lock.lock().await;
        let present = || async {
            self.images()
                .image_status(req_(cri::ImageStatusRequest {
                    image: Some(spec(image)),
                    verbose: false,
                }))
                .await
                .map(|r| r.into_inner().image.is_some())
        };
        match image_req.pull_policy {
            PullPolicy::Never | PullPolicy::IfNotPresent => {
                let here = present()
                    .await
                    .map_err(|e| RuntimeError::Start(status_err("image status", e)))?;
                if here {
                    return Ok(());
                }
                if image_req.pull_policy == PullPolicy::Never {
                    return Err(RuntimeError::Image {
                        reason: "ErrImageNeverPull",
                        message: format!(
                            "container image {image:?} is not present with pull policy of Never"
                        ),
                    });
                }
            }
            PullPolicy::Always => {}
        }
        let auth = image_req
            .credentials
            .as_ref()
            .map(|(u, p)| cri::AuthConfig {
                username: u.clone(),
                password: p.clone(),
                ..Default::default()
            });
        self.images()
            .pull_image(call(
                cri::PullImageRequest {
                    image: Some(spec(image)),
                    auth,
                    sandbox_config: sandbox,
                },
                PULL_TIMEOUT,
            ))
            .await
            .map_err(|e| RuntimeError::Image {
                reason: "ErrImagePull",
                message: format!("failed to pull image {image:?}: {}", e.message()),
            })?;
        Ok(())
    }

    /// The image filesystem's mount point and its usage in percent.
    async fn image_fs_usage(&self) -> Result<f64, RuntimeError> {
        let info = self
            .images()
            .image_fs_info(req_(cri::ImageFsInfoRequest {}))
            .await
            .map_err(|e| RuntimeError::Unavailable(status_err("image filesystem info", e)))?
            .into_inner();
        let mount = info
            .image_filesystems
            .first()
            .and_then(|f| f.fs_id.as_ref())
            .map(|id| id.mountpoint.clone())
            .ok_or_else(|| RuntimeError::Unavailable("no image filesystem reported".into()))?;
        let st = nix::sys::statvfs::statvfs(mount.as_str())
            .map_err(|e| RuntimeError::Unavailable(format!("statvfs {mount}: {e}")))?;
        let total = st.blocks() as f64 * st.fragment_size() as f64;
        let avail = st.blocks_available() as f64 * st.fragment_size() as f64;
        if total <= 0.0 {
            return Ok(0.0);
        }
        Ok(100.0 * (total - avail) / total)
    }

    /// The sandbox image containerd's CRI plugin is configured with.
    async fn sandbox_image(&self) -> Option<String> {
        let status = self
            .rt()
            .status(req_(cri::StatusRequest { verbose: true }))
            .await
            .ok()?
            .into_inner();
        let config: serde_json::Value = serde_json::from_str(status.info.get("config")?).ok()?;
        config["sandboxImage"].as_str().map(String::from)
    }

    /// Removes exited containers of this pod container older than `keep_from`.
    async fn prune(&self, pod_uid: &str, container: &str, keep_from: u32) {
        let Ok(list) = self
            .rt()
            .list_containers(req_(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    label_selector: HashMap::from([
                        (LABEL_POD_UID.to_owned(), pod_uid.to_owned()),
                        (LABEL_CONTAINER.to_owned(), container.to_owned()),
                    ]),
                    ..Default::default()
                }),
            }))
            .await
        else {
            return;
        };
        for c in list.into_inner().containers {
            let attempt = c.metadata.as_ref().map(|m| m.attempt).unwrap_or(0);
            if c.state == cri::ContainerState::ContainerExited as i32 && attempt < keep_from {
                let _ = self
                    .rt()
                    .remove_container(req_(cri::RemoveContainerRequest { container_id: c.id }))
                    .await;
            }
        }
    }

    async fn status(&self, id: &str) -> Result<cri::ContainerStatusResponse, tonic::Status> {
        self.rt()
            .container_status(req_(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: true,
            }))
            .await
            .map(|r| r.into_inner())
    }
}

impl ContainerdRuntime {
    async fn collect_images(&self, policy: &ImageGcPolicy) -> Result<GcReport, RuntimeError> {
        let used_percent = self.image_fs_usage().await?;
        let mut report = GcReport {
            used_percent,
            ..Default::default()
        };
        if used_percent < policy.high_percent {
            return Ok(report);
        }
        let unavailable =
            |what: &str, e: tonic::Status| RuntimeError::Unavailable(status_err(what, e));
        let images = self
            .images()
            .list_images(req_(cri::ListImagesRequest { filter: None }))
            .await
            .map_err(|e| unavailable("listing images", e))?
            .into_inner()
            .images;
        // Images of any container (running or not) and the sandbox image stay.
        let containers = self
            .rt()
            .list_containers(req_(cri::ListContainersRequest { filter: None }))
            .await
            .map_err(|e| unavailable("listing containers", e))?
            .into_inner()
            .containers;
        let mut keep: std::collections::HashSet<String> = containers
            .iter()
            .flat_map(|c| {
                [c.image_ref.clone()]
                    .into_iter()
                    .chain(c.image.as_ref().map(|i| i.image.clone()))
            })
            .collect();
        if let Some(s) = self.sandbox_image().await {
            keep.insert(s);
        }
        let last_used = self
            .last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut candidates: Vec<(Option<std::time::Instant>, cri::Image)> = images
            .into_iter()
            .filter(|i| {
                !keep.contains(&i.id)
                    && !i
                        .repo_tags
                        .iter()
                        .chain(&i.repo_digests)
                        .any(|t| keep.contains(t))
            })
            .map(|i| {
                let used = i
                    .repo_tags
                    .iter()
                    .filter_map(|t| last_used.get(t).copied())
                    .max();
                (used, i)
            })
            .collect();
        // Never used by this agent first, then the least recently used.
        candidates.sort_by_key(|(used, _)| *used);
        for (_, image) in candidates {
            if self.image_fs_usage().await? < policy.low_percent {
                break;
            }
            let name = image
                .repo_tags
                .first()
                .cloned()
                .unwrap_or_else(|| image.id.clone());
            match self
                .images()
                .remove_image(req_(cri::RemoveImageRequest {
                    image: Some(spec(&image.id)),
                }))
                .await
            {
                Ok(_) => {
                    tracing::info!(image = %name, bytes = image.size, "image garbage-collected");
                    report.freed_bytes += image.size;
                    report.removed.push(name);
                }
                Err(e) => tracing::warn!(image = %name, "cannot remove image: {}", e.message()),
            }
        }
        Ok(report)
    }
}

fn spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

fn call<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

fn req_<T>(msg: T) -> tonic::Request<T> {
    call(msg, CALL_TIMEOUT)
}

fn ts(nanos: i64) -> Timestamp {
    Timestamp::from_nanosecond(nanos as i128).unwrap_or_else(|_| Timestamp::now())
}

#[async_trait]
impl Runtime for ContainerdRuntime {
    fn name(&self) -> &'static str {
        "containerd"
    }

    fn limits_not_enforced(&self) -> Option<String> {
        None
    }

    async fn start(&self, req: StartRequest) -> Result<ContainerHandle, RuntimeError> {
        if req.image.image.is_empty() {
            return Err(RuntimeError::Image {
                reason: "InvalidImageName",
                message: "the container names no image".into(),
            });
        }
        self.ensure_image(&req.image, Some(Self::sandbox_config(&req)))
            .await?;
        self.last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.image.image.clone(), std::time::Instant::now());
        let sandbox = self.sandbox(&req).await?;
        if req.attempt >= 2 {
            self.prune(&req.pod_uid, &req.container, req.attempt - 1)
                .await;
        }
        let log_path = req
            .log_path
            .strip_prefix(Self::sandbox_config(&req).log_directory)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let resources = cri::LinuxContainerResources {
            cpu_period: if req.cpu_limit_millis.is_some() {
                100_000
            } else {
                0
            },
            cpu_quota: req.cpu_limit_millis.map(|m| m * 100).unwrap_or(0),
            memory_limit_in_bytes: req.memory_limit_bytes.unwrap_or(0),
            ..Default::default()
        };
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: req.container.clone(),
                attempt: req.attempt,
            }),
            image: Some(spec(&req.image.image)),
            command: req.image.command.clone(),
            args: req.image.args.clone(),
            working_dir: req.working_dir.clone().unwrap_or_default(),
            envs: req
                .env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts: req
                .mounts
                .iter()
                .map(|m| cri::Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.to_string_lossy().into_owned(),
                    readonly: m.read_only,
                    ..Default::default()
                })
                .collect(),
            labels: HashMap::from([
                (LABEL_POD_UID.to_owned(), req.pod_uid.clone()),
                (LABEL_CONTAINER.to_owned(), req.container.clone()),
                (LABEL_ATTEMPT.to_owned(), req.attempt.to_string()),
            ]),
            log_path,
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(resources),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(ns_options()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let id = self
            .rt()
            .create_container(req_(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox,
                config: Some(config),
                sandbox_config: Some(Self::sandbox_config(&req)),
            }))
            .await
            .map_err(|e| {
                let msg = status_err("creating the container", e);
                RuntimeError::Config(msg)
            })?
            .into_inner()
            .container_id;
        if let Err(e) = self
            .rt()
            .start_container(req_(cri::StartContainerRequest {
                container_id: id.clone(),
            }))
            .await
        {
            let _ = self
                .rt()
                .remove_container(req_(cri::RemoveContainerRequest {
                    container_id: id.clone(),
                }))
                .await;
            return Err(RuntimeError::Start(status_err("starting the container", e)));
        }
        let (pid, started_at) = match self.status(&id).await {
            Ok(s) => {
                let pid = s
                    .info
                    .get("info")
                    .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
                    .and_then(|v| v["pid"].as_u64())
                    .unwrap_or(0) as u32;
                let started = s
                    .status
                    .map(|s| ts(s.started_at))
                    .unwrap_or_else(Timestamp::now);
                (pid, started)
            }
            Err(_) => (0, Timestamp::now()),
        };
        Ok(ContainerHandle {
            id,
            pid,
            start_ticks: 0,
            state_dir: req.state_dir,
            started_at,
        })
    }

    async fn inspect(&self, handle: &ContainerHandle) -> RunState {
        match self.status(&handle.id).await {
            Ok(resp) => {
                let Some(s) = resp.status else {
                    return RunState::Running;
                };
                if s.state != cri::ContainerState::ContainerExited as i32 {
                    return RunState::Running;
                }
                RunState::Exited(Exit {
                    exit_code: s.exit_code,
                    signal: None,
                    finished_at: ts(s.finished_at),
                    reason: (!s.reason.is_empty()).then_some(s.reason),
                    message: (!s.message.is_empty()).then_some(s.message),
                })
            }
            Err(e) if e.code() == tonic::Code::NotFound => RunState::Exited(Exit {
                exit_code: 137,
                signal: None,
                finished_at: Timestamp::now(),
                reason: Some("ContainerMissing".into()),
                message: Some("containerd no longer knows this container".into()),
            }),
            // containerd unreachable: say nothing changed rather than restart everything.
            Err(e) => {
                tracing::warn!(id = %handle.id, "containerd status: {}", e.message());
                RunState::Running
            }
        }
    }

    async fn stop(&self, handle: &ContainerHandle, grace: Duration) {
        let r = self
            .rt()
            .stop_container(call(
                cri::StopContainerRequest {
                    container_id: handle.id.clone(),
                    timeout: grace.as_secs() as i64,
                },
                grace + CALL_TIMEOUT,
            ))
            .await;
        if let Err(e) = r
            && e.code() != tonic::Code::NotFound
        {
            tracing::warn!(id = %handle.id, "stopping container: {}", e.message());
        }
    }

    async fn exec(
        &self,
        handle: &ContainerHandle,
        argv: &[String],
        _env: &[(String, String)],
        timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        let r = self
            .rt()
            .exec_sync(call(
                cri::ExecSyncRequest {
                    container_id: handle.id.clone(),
                    cmd: argv.to_vec(),
                    timeout: timeout.as_secs().max(1) as i64,
                },
                timeout + Duration::from_secs(5),
            ))
            .await
            .map_err(|e| RuntimeError::Start(status_err("exec", e)))?;
        Ok(r.into_inner().exit_code)
    }

    /// Runs the command in the container (inside its namespaces, as the image's
    /// user). Without standard input: CRI `ExecSync`, output when the command ends.
    /// With it (`kubectl exec -i/-t`): CRI `Exec`, whose streaming URL on
    /// containerd's loopback streaming server is opened as a WebSocket in the
    /// `v4.channel.k8s.io` protocol; with `-t` containerd gives the command a
    /// terminal. (v4 has no way to close standard input alone: a command that
    /// reads to EOF, rather than a shell told `exit`, waits until the session ends.)
    async fn exec_stream(
        &self,
        handle: &ContainerHandle,
        req: ExecRequest,
    ) -> Result<ExecProcess, RuntimeError> {
        if req.stdin || req.tty {
            return self.exec_streaming(handle, req).await;
        }
        const EXEC_TIMEOUT: Duration = Duration::from_secs(600);
        let r = self
            .rt()
            .exec_sync(call(
                cri::ExecSyncRequest {
                    container_id: handle.id.clone(),
                    cmd: req.argv,
                    timeout: EXEC_TIMEOUT.as_secs() as i64,
                },
                EXEC_TIMEOUT + Duration::from_secs(5),
            ))
            .await
            .map_err(|e| RuntimeError::Start(status_err("exec", e)))?
            .into_inner();
        let code = r.exit_code;
        Ok(ExecProcess {
            stdin: None,
            stdout: Box::pin(std::io::Cursor::new(r.stdout)),
            stderr: Some(Box::pin(std::io::Cursor::new(r.stderr))),
            exit: Box::pin(async move { Ok(code) }),
            resize: None,
        })
    }

    async fn usage(&self, handle: &ContainerHandle) -> Option<(u64, u64)> {
        let s = self
            .rt()
            .container_stats(req_(cri::ContainerStatsRequest {
                container_id: handle.id.clone(),
            }))
            .await
            .ok()?
            .into_inner()
            .stats?;
        let cpu = s
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .map(|v| v.value);
        let mem = s.memory.and_then(|m| m.working_set_bytes).map(|v| v.value);
        Some((cpu.unwrap_or(0), mem.unwrap_or(0)))
    }

    async fn image_present(&self, image: &str) -> Option<bool> {
        self.images()
            .image_status(req_(cri::ImageStatusRequest {
                image: Some(spec(image)),
                verbose: false,
            }))
            .await
            .ok()
            .map(|r| r.into_inner().image.is_some())
    }

    async fn pull_image(
        &self,
        image: &str,
        credentials: Option<(String, String)>,
    ) -> Result<(), RuntimeError> {
        let req = super::ImageRequest {
            image: image.to_owned(),
            pull_policy: PullPolicy::IfNotPresent,
            credentials,
            ..Default::default()
        };
        self.ensure_image(&req, None).await
    }

    async fn gc_images(&self, policy: &ImageGcPolicy) -> Option<Result<GcReport, RuntimeError>> {
        Some(self.collect_images(policy).await)
    }

    async fn remove_pod(&self, pod_uid: &str) {
        self.sandboxes.lock().await.remove(pod_uid);
        let Ok(list) = self
            .rt()
            .list_pod_sandbox(req_(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    label_selector: HashMap::from([(LABEL_POD_UID.to_owned(), pod_uid.to_owned())]),
                    ..Default::default()
                }),
            }))
            .await
        else {
            return;
        };
        for s in list.into_inner().items {
            let _ = self
                .rt()
                .stop_pod_sandbox(req_(cri::StopPodSandboxRequest {
                    pod_sandbox_id: s.id.clone(),
                }))
                .await;
            if let Err(e) = self
                .rt()
                .remove_pod_sandbox(req_(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: s.id,
                }))
                .await
            {
                tracing::warn!(pod = pod_uid, "removing the pod sandbox: {}", e.message());
            }
        }
    }

    fn container_id(&self, handle: &ContainerHandle) -> Option<String> {
        (!handle.id.is_empty()).then(|| format!("containerd://{}", handle.id))
    }
}
