//! Build a one-layer image from files, reproducibly (fixed mtimes and owners):
//! what tests and the demo use instead of pulling from the internet.

use std::io::Write as _;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;

use crate::{Descriptor, Image, MEDIA_CONFIG, MEDIA_LAYER_GZIP, MEDIA_MANIFEST, OciError};

pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

/// What the image's config says a container runs (Kubernetes' `command` replaces
/// `entrypoint`, `args` replaces `cmd`).
#[derive(Clone, Debug, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

/// The busybox applets the test image links, enough for shells, probes and a web
/// server.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "ls", "env", "true", "false", "head", "dd", "httpd", "nc",
    "wget", "mkdir", "rm", "seq", "yes", "tail", "date", "hostname", "id", "ps", "kill", "touch",
    "grep", "wc", "printf", "test", "[",
];

fn io(what: &str, e: std::io::Error) -> OciError {
    OciError::Malformed {
        what: what.into(),
        why: e.to_string(),
    }
}

/// A gzip layer and its diff id (the digest of the uncompressed tar).
pub fn layer(entries: &[Entry]) -> Result<(Vec<u8>, String), OciError> {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                tar.append_data(
                    &mut h,
                    format!("{}/", path.trim_matches('/')),
                    std::io::empty(),
                )
                .map_err(|e| io("layer", e))?;
            }
            Entry::File { path, mode, data } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, path.trim_start_matches('/'), data.as_slice())
                    .map_err(|e| io("layer", e))?;
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path.trim_start_matches('/'), target)
                    .map_err(|e| io("layer", e))?;
            }
        }
    }
    let raw = tar.into_inner().map_err(|e| io("layer", e))?;
    let diff_id = crate::sha256_digest(&raw);
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&raw).map_err(|e| io("layer", e))?;
    Ok((gz.finish().map_err(|e| io("layer", e))?, diff_id))
}

/// A one-layer image of `entries` for this machine's architecture.
pub fn image(entries: &[Entry], cfg: &ImageConfig) -> Result<Image, OciError> {
    let (layer, diff_id) = layer(entries)?;
    let mut c = serde_json::Map::new();
    if !cfg.entrypoint.is_empty() {
        c.insert("Entrypoint".into(), json!(cfg.entrypoint));
    }
    if !cfg.cmd.is_empty() {
        c.insert("Cmd".into(), json!(cfg.cmd));
    }
    let mut env = cfg.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, "PATH=/usr/local/bin:/usr/bin:/bin".into());
    }
    c.insert("Env".into(), json!(env));
    if let Some(w) = &cfg.working_dir {
        c.insert("WorkingDir".into(), json!(w));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": crate::host_arch(),
        "os": "linux",
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "meridian-oci", "created": "1970-01-01T00:00:00Z"}],
        "created": "1970-01-01T00:00:00Z",
    }))
    .expect("json");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": Descriptor::of(MEDIA_CONFIG, &config),
        "layers": [Descriptor::of(MEDIA_LAYER_GZIP, &layer)],
    }))
    .expect("json");
    Ok(Image {
        manifest,
        config,
        layers: vec![layer],
    })
}

/// A busybox image from a static busybox binary (Debian's `busybox-static`):
/// `/bin/busybox`, its applets as symlinks, `/tmp`, `/etc/passwd`, and `extra`
/// files. `cmd` is the default command (`sh` when empty).
pub fn busybox(busybox: &Path, cmd: &[&str], extra: Vec<Entry>) -> Result<Image, OciError> {
    let bin = std::fs::read(busybox).map_err(|e| OciError::Malformed {
        what: format!("busybox binary {}", busybox.display()),
        why: e.to_string(),
    })?;
    let mut entries = vec![
        Entry::Dir {
            path: "bin".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "etc".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        },
        Entry::Dir {
            path: "www".into(),
            mode: 0o755,
        },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: bin,
        },
        Entry::File {
            path: "etc/passwd".into(),
            mode: 0o644,
            data: b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                .to_vec(),
        },
        Entry::File {
            path: "etc/group".into(),
            mode: 0o644,
            data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        },
    ];
    for a in BUSYBOX_APPLETS {
        entries.push(Entry::Symlink {
            path: format!("bin/{a}"),
            target: "busybox".into(),
        });
    }
    entries.extend(extra);
    let cmd: Vec<String> = if cmd.is_empty() {
        vec!["sh".into()]
    } else {
        cmd.iter().map(|s| s.to_string()).collect()
    };
    image(
        &entries,
        &ImageConfig {
            cmd,
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        },
    )
}

/// Where Debian's `busybox-static` puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The images a region serves itself for demos and sandboxes, built from a
/// static busybox: `meridian.local/busybox:1` (default command `sh`) and
/// `meridian.local/pause:1` (the pod sandbox image: sleeps until killed).
pub fn builtin_images(busybox_bin: &Path) -> Result<Vec<(String, Image)>, OciError> {
    Ok(vec![
        (
            format!("{}/busybox:1", crate::LOCAL_REGISTRY),
            busybox(busybox_bin, &[], Vec::new())?,
        ),
        (
            format!("{}/pause:1", crate::LOCAL_REGISTRY),
            busybox(busybox_bin, &["sleep", "2147483647"], Vec::new())?,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_are_reproducible_and_the_manifest_names_every_blob() {
        let entries = || {
            vec![
                Entry::Dir {
                    path: "bin".into(),
                    mode: 0o755,
                },
                Entry::File {
                    path: "bin/x".into(),
                    mode: 0o755,
                    data: b"hi".to_vec(),
                },
                Entry::Symlink {
                    path: "bin/y".into(),
                    target: "x".into(),
                },
            ]
        };
        let cfg = ImageConfig {
            cmd: vec!["x".into()],
            ..Default::default()
        };
        let a = image(&entries(), &cfg).unwrap();
        let b = image(&entries(), &cfg).unwrap();
        assert_eq!(a.manifest, b.manifest);
        let m = a.parsed_manifest().unwrap();
        assert_eq!(m.config.digest, crate::sha256_digest(&a.config));
        assert_eq!(m.layers[0].digest, crate::sha256_digest(&a.layers[0]));
        let config: serde_json::Value = serde_json::from_slice(&a.config).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["x"]));
        assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    }
}
