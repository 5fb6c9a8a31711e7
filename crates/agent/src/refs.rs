//! A pod's ConfigMaps and Secrets, as the region ships them with the pod: env
//! values (`valueFrom`, `envFrom`), volume files, and registry credentials from
//! `imagePullSecrets`. Pure functions over the objects' JSON.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Container, EnvVarSource, Pod, Volume};
use serde_json::Value;

/// (kind, name) → the object's JSON. Kinds: `ConfigMap`, `Secret`.
pub type Refs = BTreeMap<(String, String), Value>;

const CONFIG_MAP: &str = "ConfigMap";
const SECRET: &str = "Secret";

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Every key of a ConfigMap (`data` and `binaryData`) or Secret (`data`,
/// base64-decoded) with its bytes.
pub fn data(kind: &str, obj: &Value) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if kind == CONFIG_MAP {
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.as_bytes().to_vec());
            }
        }
        for (k, v) in obj["binaryData"].as_object().into_iter().flatten() {
            if let Some(b) = v.as_str().and_then(b64) {
                out.insert(k.clone(), b);
            }
        }
    } else {
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            if let Some(b) = v.as_str().and_then(b64) {
                out.insert(k.clone(), b);
            }
        }
        // `stringData` is folded into `data` on write; accept it anyway.
        for (k, v) in obj["stringData"].as_object().into_iter().flatten() {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.as_bytes().to_vec());
            }
        }
    }
    out
}

fn get<'a>(refs: &'a Refs, kind: &str, name: &str) -> Option<&'a Value> {
    refs.get(&(kind.to_owned(), name.to_owned()))
}

/// `configmap "name"` / `secret "name"`, as kubelet names them in errors.
fn describe(kind: &str, name: &str) -> String {
    let k = if kind == CONFIG_MAP {
        "configmap"
    } else {
        "secret"
    };
    format!("{k} \"{name}\"")
}

fn missing(kind: &str, name: &str) -> String {
    format!("{} not found", describe(kind, name))
}

/// The value of an env var's `valueFrom` that names a ConfigMap or Secret key.
/// `Ok(None)`: not such a reference, or an optional one that is missing.
pub fn env_value(refs: &Refs, from: &EnvVarSource) -> Result<Option<String>, String> {
    let (kind, name, key, optional) = if let Some(r) = &from.config_map_key_ref {
        (CONFIG_MAP, &r.name, &r.key, r.optional.unwrap_or(false))
    } else if let Some(r) = &from.secret_key_ref {
        (SECRET, &r.name, &r.key, r.optional.unwrap_or(false))
    } else {
        return Ok(None);
    };
    let Some(obj) = get(refs, kind, name) else {
        return if optional {
            Ok(None)
        } else {
            Err(missing(kind, name))
        };
    };
    match data(kind, obj).remove(key) {
        Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
        None if optional => Ok(None),
        None => Err(format!(
            "couldn't find key {key} in {}",
            describe(kind, name)
        )),
    }
}

/// The variables `envFrom` brings in, in order (later sources win, as in Kubernetes).
pub fn env_from(refs: &Refs, c: &Container) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for src in c.env_from.iter().flatten() {
        let prefix = src.prefix.clone().unwrap_or_default();
        let (kind, name, optional) = if let Some(r) = &src.config_map_ref {
            (CONFIG_MAP, &r.name, r.optional.unwrap_or(false))
        } else if let Some(r) = &src.secret_ref {
            (SECRET, &r.name, r.optional.unwrap_or(false))
        } else {
            continue;
        };
        match get(refs, kind, name) {
            Some(obj) => {
                for (k, v) in data(kind, obj) {
                    out.push((
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    ));
                }
            }
            None if optional => {}
            None => return Err(missing(kind, name)),
        }
    }
    Ok(out)
}

/// Writes a ConfigMap or Secret volume's files into `dir`. `Ok(false)`: not such
/// a volume.
pub fn write_volume(refs: &Refs, v: &Volume, dir: &Path) -> Result<bool, String> {
    let (kind, name, items, mode, optional) = if let Some(c) = &v.config_map {
        (
            CONFIG_MAP,
            c.name.clone(),
            c.items.clone(),
            c.default_mode,
            c.optional,
        )
    } else if let Some(s) = &v.secret {
        (
            SECRET,
            s.secret_name.clone().unwrap_or_default(),
            s.items.clone(),
            s.default_mode,
            s.optional,
        )
    } else {
        return Ok(false);
    };
    let io = |e: std::io::Error| format!("writing volume {}: {e}", v.name);
    std::fs::create_dir_all(dir).map_err(io)?;
    let Some(obj) = get(refs, kind, &name) else {
        return if optional.unwrap_or(false) {
            Ok(true)
        } else {
            Err(missing(kind, &name))
        };
    };
    let data = data(kind, obj);
    let files: Vec<(String, Vec<u8>, Option<i32>)> = match items {
        Some(items) => items
            .iter()
            .map(|i| match data.get(&i.key) {
                Some(b) => Ok((i.path.clone(), b.clone(), i.mode)),
                None => Err(format!(
                    "configured key {} not found in {}",
                    i.key,
                    describe(kind, &name)
                )),
            })
            .collect::<Result<_, _>>()?,
        None => data.into_iter().map(|(k, b)| (k, b, None)).collect(),
    };
    for (path, bytes, file_mode) in files {
        if path.starts_with('/') || path.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(format!("volume {}: invalid path {path:?}", v.name));
        }
        let target = dir.join(&path);
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p).map_err(io)?;
        }
        let tmp = target.with_extension("meridian-tmp");
        std::fs::write(&tmp, &bytes).map_err(io)?;
        use std::os::unix::fs::PermissionsExt as _;
        let m = file_mode.or(mode).unwrap_or(0o644) as u32 & 0o777;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m)).map_err(io)?;
        std::fs::rename(&tmp, &target).map_err(io)?;
    }
    Ok(true)
}

/// Registry credentials for `image` from the pod's `imagePullSecrets`
/// (`kubernetes.io/dockerconfigjson` or the older `kubernetes.io/dockercfg`).
pub fn pull_credentials(refs: &Refs, pod: &Pod, registry: &str) -> Option<(String, String)> {
    let secrets = pod.spec.as_ref()?.image_pull_secrets.as_ref()?;
    for s in secrets {
        let Some(obj) = get(refs, SECRET, &s.name) else {
            continue;
        };
        let d = data(SECRET, obj);
        let auths: Value = if let Some(j) = d.get(".dockerconfigjson") {
            serde_json::from_slice::<Value>(j).ok()?["auths"].clone()
        } else if let Some(j) = d.get(".dockercfg") {
            serde_json::from_slice(j).ok()?
        } else {
            continue;
        };
        for (server, entry) in auths.as_object().into_iter().flatten() {
            let host = server
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default();
            let matches = host == registry
                || (registry == "docker.io"
                    && matches!(host, "index.docker.io" | "registry-1.docker.io"));
            if !matches {
                continue;
            }
            if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
                return Some((u.to_owned(), p.to_owned()));
            }
            if let Some(decoded) = entry["auth"].as_str().and_then(b64)
                && let Some((u, p)) = String::from_utf8_lossy(&decoded).split_once(':')
            {
                return Some((u.to_owned(), p.to_owned()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refs() -> Refs {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        let dockercfg = json!({"auths": {"https://registry.example:5000": {"auth": auth}}});
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        Refs::from([
            (
                (CONFIG_MAP.into(), "cm".into()),
                json!({"data": {"greeting": "hello", "nested.conf": "a=1"}}),
            ),
            (
                (SECRET.into(), "sec".into()),
                json!({"data": {"token": enc("t0k3n")}}),
            ),
            (
                (SECRET.into(), "pull".into()),
                json!({"type": "kubernetes.io/dockerconfigjson",
                       "data": {".dockerconfigjson": enc(&dockercfg.to_string())}}),
            ),
        ])
    }

    #[test]
    fn env_values_come_from_keys_and_missing_ones_are_errors_unless_optional() {
        let r = refs();
        let src: EnvVarSource =
            serde_json::from_value(json!({"configMapKeyRef": {"name": "cm", "key": "greeting"}}))
                .unwrap();
        assert_eq!(env_value(&r, &src).unwrap().as_deref(), Some("hello"));
        let src: EnvVarSource =
            serde_json::from_value(json!({"secretKeyRef": {"name": "sec", "key": "token"}}))
                .unwrap();
        assert_eq!(env_value(&r, &src).unwrap().as_deref(), Some("t0k3n"));
        let src: EnvVarSource =
            serde_json::from_value(json!({"configMapKeyRef": {"name": "nope", "key": "k"}}))
                .unwrap();
        assert_eq!(
            env_value(&r, &src).unwrap_err(),
            "configmap \"nope\" not found"
        );
        let src: EnvVarSource = serde_json::from_value(
            json!({"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}),
        )
        .unwrap();
        assert_eq!(env_value(&r, &src).unwrap(), None);
    }

    #[test]
    fn volumes_become_files_and_paths_cannot_escape() {
        let r = refs();
        let dir = tempfile::tempdir().unwrap();
        let v: Volume =
            serde_json::from_value(json!({"name": "cfg", "configMap": {"name": "cm"}})).unwrap();
        assert!(write_volume(&r, &v, dir.path()).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("nested.conf")).unwrap(),
            "a=1"
        );
        let v: Volume = serde_json::from_value(json!({"name": "s", "secret": {"secretName": "sec",
            "items": [{"key": "token", "path": "dir/tok"}]}}))
        .unwrap();
        assert!(write_volume(&r, &v, dir.path()).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("dir/tok")).unwrap(),
            "t0k3n"
        );
        let v: Volume = serde_json::from_value(json!({"name": "s", "secret": {"secretName": "sec",
            "items": [{"key": "token", "path": "../escape"}]}}))
        .unwrap();
        assert!(write_volume(&r, &v, dir.path()).is_err());
        let v: Volume = serde_json::from_value(json!({"name": "e", "emptyDir": {}})).unwrap();
        assert!(!write_volume(&r, &v, dir.path()).unwrap());
    }

    #[test]
    fn pull_credentials_match_the_registry_host() {
        let r = refs();
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
            "spec": {"imagePullSecrets": [{"name": "pull"}], "containers": []}}))
        .unwrap();
        assert_eq!(
            pull_credentials(&r, &pod, "registry.example:5000"),
            Some(("bob".into(), "s3cret".into()))
        );
        assert_eq!(pull_credentials(&r, &pod, "other.example"), None);
    }
}
