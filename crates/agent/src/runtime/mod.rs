//! How the agent runs containers. The pod manager drives a [`Runtime`]; this crate
//! ships the process runtime (and a fake one for hollow nodes), the containerd
//! runtime plugs in behind the same trait.

pub mod containerd;
pub mod fake;
pub mod private;
pub mod process;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container spec cannot run on this runtime (Kubernetes reason
    /// `CreateContainerConfigError`).
    #[error("{0}")]
    Config(String),
    /// Starting failed (reason `RunContainerError`).
    #[error("{0}")]
    Start(String),
    /// The runtime could not answer (containerd down, ...).
    #[error("{0}")]
    Unavailable(String),
    /// The image could not be had: `reason` is the Kubernetes waiting reason
    /// (`ErrImagePull`, `InvalidImageName`, `ErrImageNeverPull`).
    #[error("{message}")]
    Image {
        reason: &'static str,
        message: String,
    },
    #[error("runtime i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything a runtime needs to start one container attempt.
#[derive(Clone, Debug)]
pub struct StartRequest {
    pub pod_uid: String,
    pub container: String,
    pub attempt: u32,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// Where the container's stdout/stderr go (CRI log format).
    pub log_path: PathBuf,
    /// Working state directory of this attempt.
    pub state_dir: PathBuf,
    pub cpu_limit_millis: Option<i64>,
    pub memory_limit_bytes: Option<i64>,
    /// What image-based runtimes need (the process runtime uses `argv` instead).
    pub image: ImageRequest,
    pub mounts: Vec<Mount>,
}

/// The container's image and the command as Kubernetes splits it: `command`
/// replaces the image's entrypoint, `args` its cmd (both already expanded).
#[derive(Clone, Debug, Default)]
pub struct ImageRequest {
    pub pod_name: String,
    pub pod_namespace: String,
    pub image: String,
    pub pull_policy: PullPolicy,
    /// Registry credentials (from the pod's imagePullSecrets, when the region
    /// resolves them).
    pub credentials: Option<(String, String)>,
    pub command: Vec<String>,
    pub args: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// Kubernetes' default: `Always` for `:latest` or untagged images.
    pub fn resolve(policy: Option<&str>, image: &str) -> Self {
        match policy {
            Some("Always") => Self::Always,
            Some("Never") => Self::Never,
            Some("IfNotPresent") => Self::IfNotPresent,
            _ => {
                let last = image.rsplit('/').next().unwrap_or(image);
                if image.contains('@') {
                    Self::IfNotPresent
                } else if !last.contains(':') || last.ends_with(":latest") {
                    Self::Always
                } else {
                    Self::IfNotPresent
                }
            }
        }
    }
}

/// When the agent removes unused images (kubelet's image GC thresholds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageGcPolicy {
    pub high_percent: f64,
    pub low_percent: f64,
    pub interval: Duration,
}

impl Default for ImageGcPolicy {
    fn default() -> Self {
        Self {
            high_percent: 85.0,
            low_percent: 80.0,
            interval: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GcReport {
    /// Image filesystem usage when the run began, percent.
    pub used_percent: f64,
    pub removed: Vec<String>,
    pub freed_bytes: u64,
}

/// A host path bind-mounted into the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// A started container, persisted so a restarted agent can find it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerHandle {
    pub id: String,
    pub pid: u32,
    /// Kernel start time of `pid` (clock ticks since boot), so a recycled pid is
    /// never mistaken for our process.
    pub start_ticks: u64,
    pub state_dir: PathBuf,
    pub started_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub exit_code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
    pub finished_at: Timestamp,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Exited(Exit),
}

/// A command to run in a running container (`kubectl exec`).
#[derive(Clone, Debug, Default)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// The container's environment.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub stdin: bool,
    /// A terminal was asked for: stderr goes to stdout, as on a terminal.
    pub tty: bool,
}

/// A command started by [`Runtime::exec_stream`]; dropping it kills the command.
pub struct ExecProcess {
    pub stdin: Option<std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>>,
    pub stdout: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
    pub stderr: Option<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
    /// Resolves to the exit code once the command has ended.
    pub exit: futures::future::BoxFuture<'static, Result<i32, RuntimeError>>,
    /// Sets the terminal's size (columns, rows), when the command has one.
    pub resize: Option<Box<dyn Fn(u16, u16) + Send>>,
}

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// `process`, `containerd`, `fake`.
    fn name(&self) -> &'static str;

    /// Why cpu/memory limits are not enforced, when they are not.
    fn limits_not_enforced(&self) -> Option<String>;

    async fn start(&self, req: StartRequest) -> Result<ContainerHandle, RuntimeError>;

    /// The state of a container started by this or an earlier agent process.
    async fn inspect(&self, handle: &ContainerHandle) -> RunState;

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns once it has exited.
    async fn stop(&self, handle: &ContainerHandle, grace: Duration);

    /// Runs `argv` beside the container (exec probes); returns the exit code.
    async fn exec(
        &self,
        handle: &ContainerHandle,
        argv: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<i32, RuntimeError>;

    /// Starts `req` in the container with its standard streams connected
    /// (`kubectl exec`).
    async fn exec_stream(
        &self,
        _handle: &ContainerHandle,
        _req: ExecRequest,
    ) -> Result<ExecProcess, RuntimeError> {
        Err(RuntimeError::Config(format!(
            "the {} runtime cannot run commands in containers",
            self.name()
        )))
    }

    /// Cumulative cpu time (nanoseconds) and resident memory (bytes).
    async fn usage(&self, handle: &ContainerHandle) -> Option<(u64, u64)>;

    /// Whether `image` is on the node (`None`: this runtime does not use images).
    async fn image_present(&self, _image: &str) -> Option<bool> {
        None
    }

    /// Pulls `image` onto the node ahead of use (ImagePrePull).
    async fn pull_image(
        &self,
        image: &str,
        _credentials: Option<(String, String)>,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError::Config(format!(
            "the {} runtime does not use images ({image})",
            self.name()
        )))
    }

    /// The pod is gone from this node: release what the runtime holds for it
    /// (containerd: the pod sandbox and its exited containers).
    async fn remove_pod(&self, _pod_uid: &str) {}

    /// Removes unused images when the image filesystem is fuller than
    /// `policy.high_percent`, oldest-used first, down to `policy.low_percent`.
    /// `None`: this runtime keeps no images.
    async fn gc_images(&self, _policy: &ImageGcPolicy) -> Option<Result<GcReport, RuntimeError>> {
        None
    }

    /// The container id shown in `status.containerStatuses[].containerID`.
    fn container_id(&self, handle: &ContainerHandle) -> Option<String> {
        (handle.pid != 0).then(|| format!("{}://{}", self.name(), handle.pid))
    }
}
