//! Strategic merge patch (`application/strategic-merge-patch+json`), what `kubectl
//! apply`, `edit`, `label` and `set image` send. Like a JSON merge patch, except
//! that lists with a merge key (containers by `name`, container ports by
//! `containerPort`, volume mounts by `mountPath`, ...) are merged element by
//! element instead of replaced, lists with the merge strategy and no key
//! (`finalizers`) are unioned, and the directives `$patch` (`replace`, `delete`,
//! `merge`), `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>` and
//! `$retainKeys` are obeyed. The merge keys are Kubernetes' own (the
//! `patchMergeKey` tags of its types) for the kinds Meridian serves; lists without
//! one are replaced, as Kubernetes does (e.g. `tolerations`, `args`).

use serde_json::{Map, Value};

/// How a list field merges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum List {
    /// Objects merged by this key.
    Key(&'static str),
    /// Primitives, unioned.
    Union,
}

/// The merge behaviour of list `field` inside the object at `path` (field names
/// from the root; list elements add nothing).
pub(crate) fn list_kind(path: &[String], field: &str) -> Option<List> {
    let parent = path.last().map(String::as_str).unwrap_or("");
    Some(match field {
        "containers" | "initContainers" | "ephemeralContainers" => List::Key("name"),
        "volumes" | "env" | "imagePullSecrets" => List::Key("name"),
        "volumeMounts" => List::Key("mountPath"),
        "volumeDevices" => List::Key("devicePath"),
        "ports"
            if matches!(
                parent,
                "containers" | "initContainers" | "ephemeralContainers"
            ) =>
        {
            List::Key("containerPort")
        }
        // A Service's ports.
        "ports" if path.len() == 1 && parent == "spec" => List::Key("port"),
        "hostAliases" => List::Key("ip"),
        "topologySpreadConstraints" => List::Key("topologyKey"),
        "readinessGates" => List::Key("conditionType"),
        "ownerReferences" => List::Key("uid"),
        "conditions" => List::Key("type"),
        "finalizers" if parent == "metadata" => List::Union,
        _ => return None,
    })
}

/// Applies `patch` to `target` (both JSON objects at the top).
pub fn apply(target: &mut Value, patch: &Value) -> Result<(), String> {
    if !patch.is_object() {
        return Err("a strategic merge patch must be a JSON object".into());
    }
    merge_object(target, patch, &mut Vec::new())
}

fn merge_object(target: &mut Value, patch: &Value, path: &mut Vec<String>) -> Result<(), String> {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut v = p.clone();
            v.remove("$patch");
            *target = Value::Object(strip_directives(v));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown $patch directive {other:?}")),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, pv) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(list) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = pv.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = t.get_mut(list) {
                items.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if pv.is_null() {
            t.remove(k);
            continue;
        }
        match (pv, list_kind(path, k)) {
            (Value::Array(items), Some(kind)) => {
                let cur = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if !cur.is_array() {
                    *cur = Value::Array(Vec::new());
                }
                path.push(k.clone());
                let r = merge_list(cur, items, kind, path);
                path.pop();
                r?;
            }
            (Value::Object(_), _) => {
                let cur = t.entry(k.clone()).or_insert(Value::Null);
                path.push(k.clone());
                let r = merge_object(cur, pv, path);
                path.pop();
                r?;
                if cur.is_null() {
                    t.remove(k);
                }
            }
            (Value::Array(items), None) => {
                t.insert(
                    k.clone(),
                    Value::Array(items.iter().map(|i| clean(i.clone())).collect()),
                );
            }
            _ => {
                t.insert(k.clone(), pv.clone());
            }
        }
    }
    // `$setElementOrder/<list>`: the order the client wants the merged list in.
    for (k, order) in p {
        if let (Some(list), Some(order)) = (k.strip_prefix("$setElementOrder/"), order.as_array())
            && let Some(Value::Array(items)) = t.get_mut(list)
        {
            reorder(items, order, list_kind(path, list));
        }
    }
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        t.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(())
}

fn merge_list(
    target: &mut Value,
    patch: &[Value],
    kind: List,
    path: &mut Vec<String>,
) -> Result<(), String> {
    let items = target.as_array_mut().expect("made an array");
    // `[{"$patch": "replace"}, ...]`: the list as given.
    if patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *items = patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .cloned()
            .map(clean)
            .collect();
        return Ok(());
    }
    match kind {
        List::Union => {
            for e in patch {
                if !items.contains(e) {
                    items.push(e.clone());
                }
            }
        }
        List::Key(key) => {
            for e in patch {
                let Some(id) = e.get(key) else {
                    return Err(format!(
                        "an element of {} has no merge key {key:?}",
                        path.join(".")
                    ));
                };
                let pos = items.iter().position(|x| x.get(key) == Some(id));
                let delete = e.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        items.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => merge_object(&mut items[i], e, path)?,
                    (None, false) => items.push(clean(e.clone())),
                }
            }
        }
    }
    Ok(())
}

/// Puts `items` in the order of `order` (merge keys or primitives); items not
/// named keep their relative order after those that are.
fn reorder(items: &mut [Value], order: &[Value], kind: Option<List>) {
    let rank = |x: &Value| {
        let id = match kind {
            Some(List::Key(k)) => x.get(k).cloned(),
            _ => Some(x.clone()),
        };
        order
            .iter()
            .position(|o| match kind {
                Some(List::Key(k)) => o.get(k).cloned() == id,
                _ => Some(o) == id.as_ref(),
            })
            .unwrap_or(usize::MAX)
    };
    items.sort_by_key(rank);
}

/// A value from a patch, without directives.
fn clean(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip_directives(m)),
        other => other,
    }
}

fn strip_directives(m: Map<String, Value>) -> Map<String, Value> {
    m.into_iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k, clean(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patched(target: Value, patch: Value) -> Value {
        let mut t = target;
        apply(&mut t, &patch).unwrap();
        t
    }

    fn deployment() -> Value {
        json!({"spec": {"replicas": 2, "template": {"spec": {
            "containers": [
                {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80}],
                 "env": [{"name": "A", "value": "1"}], "args": ["-v"]},
                {"name": "sidecar", "image": "envoy"}],
            "tolerations": [{"key": "x", "operator": "Exists"}]}}}})
    }

    #[test]
    fn containers_merge_by_name_and_keep_what_the_patch_does_not_mention() {
        let out = patched(
            deployment(),
            json!({"spec": {"template": {"spec": {"containers": [
                {"name": "web", "image": "nginx:2", "env": [{"name": "B", "value": "2"}]}]}}}}),
        );
        let c = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 2, "the sidecar stays");
        assert_eq!(c[0]["image"], "nginx:2");
        assert_eq!(c[0]["ports"], json!([{"containerPort": 80}]), "ports kept");
        assert_eq!(
            c[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        assert_eq!(c[1]["image"], "envoy");
    }

    #[test]
    fn directives_delete_replace_order_and_primitive_deletes() {
        let out = patched(
            deployment(),
            json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "web"}],
                "containers": [{"name": "web", "$patch": "delete"}, {"name": "cache", "image": "redis"}],
                "tolerations": [{"key": "y", "operator": "Exists"}]}}}}),
        );
        let spec = &out["spec"]["template"]["spec"];
        let names: Vec<&str> = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["sidecar", "cache"]);
        assert_eq!(
            spec["tolerations"],
            json!([{"key": "y", "operator": "Exists"}]),
            "no merge key: replaced, as in Kubernetes"
        );
        let out = patched(
            json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}}}),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "finalizers": ["c"],
                "labels": {"x": null}}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["b", "c"]));
        assert_eq!(out["metadata"]["labels"], json!({"y": "2"}));
        let out = patched(
            deployment(),
            json!({"spec": {"template": {"spec": {"$patch": "replace", "containers": [{"name": "only"}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"],
            json!({"containers": [{"name": "only"}]})
        );
    }

    #[test]
    fn service_ports_merge_by_port() {
        let out = patched(
            json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}}),
            json!({"spec": {"ports": [{"port": 443, "targetPort": 8443}]}}),
        );
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "name": "http"}, {"port": 443, "name": "https", "targetPort": 8443}])
        );
    }

    #[test]
    fn bad_patches_are_errors_not_panics() {
        let mut t = deployment();
        assert!(apply(&mut t, &json!([1])).is_err());
        assert!(apply(&mut t, &json!({"spec": {"$patch": "explode"}})).is_err());
        assert!(
            apply(
                &mut t,
                &json!({"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}})
            )
            .is_err(),
            "a container without its merge key"
        );
    }
}
