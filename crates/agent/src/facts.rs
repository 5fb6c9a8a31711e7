//! What the node is: capacity, architecture, OS, kernel, GPUs; and how busy it is.

use std::path::Path;

use meridian_proto::{NodeFacts, NodeUsage};

/// Kubernetes architecture names (`kubernetes.io/arch`).
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

fn meminfo(field: &str) -> Option<i64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// (total, used) bytes of the filesystem holding `dir`.
pub fn disk(dir: &Path) -> Option<(i64, i64)> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    let frag = s.fragment_size() as i64;
    let total = s.blocks() as i64 * frag;
    let free = s.blocks_available() as i64 * frag;
    Some((total, total - free))
}

/// GPUs as `nvidia-smi` reports them (count, model), when it is installed.
fn gpus() -> (i32, String) {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let names: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            (
                names.len() as i32,
                names
                    .first()
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default(),
            )
        }
        _ => (0, String::new()),
    }
}

/// What a joining node tells the center about its machine.
pub fn machine(
    source: &str,
    machine_type: &str,
    coordinates: Option<(f64, f64)>,
) -> meridian_api::onboarding::MachineFacts {
    meridian_api::onboarding::MachineFacts {
        source: source.to_owned(),
        machine_type: machine_type.to_owned(),
        arch: arch().into(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: meminfo("MemTotal:").unwrap_or(0).max(0) as u64,
        gpus: gpus().0.max(0) as u32,
        latitude: coordinates.map(|c| c.0),
        longitude: coordinates.map(|c| c.1),
    }
}

pub fn detect(data_dir: &Path, max_pods: i64, addresses: Vec<String>) -> NodeFacts {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as i64;
    let (gpus, gpu_model) = gpus();
    NodeFacts {
        cpu_millis: cpus * 1000,
        memory_bytes: meminfo("MemTotal:").unwrap_or(0),
        ephemeral_storage_bytes: disk(data_dir).map(|d| d.0).unwrap_or(0),
        max_pods,
        arch: arch().into(),
        os: std::env::consts::OS.into(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        gpus,
        gpu_model,
        addresses,
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// Samples node cpu (from /proc/stat deltas), memory and disk use.
#[derive(Default)]
pub struct UsageSampler {
    last: Option<(u64, u64, std::time::Instant)>,
}

impl UsageSampler {
    pub fn sample(&mut self, data_dir: &Path) -> NodeUsage {
        let now = std::time::Instant::now();
        let mut cpu_millis = 0;
        if let Some((busy, _total)) = cpu_ticks() {
            if let Some((lb, _, lt)) = self.last {
                let secs = now.duration_since(lt).as_secs_f64().max(0.001);
                // Ticks are 1/100 s: busy ticks per second * 10 = millicores.
                cpu_millis = ((busy.saturating_sub(lb)) as f64 / secs * 10.0) as i64;
            }
            self.last = Some((busy, 0, now));
        }
        let memory_bytes = match (meminfo("MemTotal:"), meminfo("MemAvailable:")) {
            (Some(t), Some(a)) => t - a,
            _ => 0,
        };
        NodeUsage {
            cpu_millis,
            memory_bytes,
            disk_bytes: disk(data_dir).map(|d| d.1).unwrap_or(0),
        }
    }
}

fn cpu_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}
