//! Field ownership for server-side apply: `metadata.managedFields`, in Kubernetes'
//! `FieldsV1` form (`f:<field>`, `k:<merge key as JSON>` for an element of a keyed
//! list, `v:<value as JSON>` for a member of a set, `.` for the element itself).
//!
//! An apply by manager M owns the fields of its configuration. It conflicts where a
//! field it sets is owned by another manager and holds a different value there
//! (unless forced, which takes the field over); fields M applied before and no
//! longer applies are removed from the object unless another manager owns them.
//! Any other write (update, patch) takes ownership of the fields it changes, for
//! the writing manager, and never conflicts. Which lists are keyed and by what
//! comes from the strategic merge patch's table (`smp::list_kind`).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::smp::{List, list_kind};

/// One step of a field path, as its `FieldsV1` key (`f:spec`, `k:{"name":"web"}`,
/// `v:"x"`, `.`).
pub type Path = Vec<String>;

/// A conflict: the field (as `.spec.replicas`) and the manager owning it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
}

/// Why an apply was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError {
    /// Fields other managers own with other values (without `force`).
    Conflicts(Vec<Conflict>),
    /// The configuration cannot be applied (not an object, a keyed list element
    /// without its key, ...).
    Invalid(String),
}

/// Top-level and metadata fields no manager owns.
fn unowned(path: &[String], key: &str) -> bool {
    match path {
        [] => matches!(key, "apiVersion" | "kind" | "status"),
        [m] if m == "metadata" => !matches!(
            key,
            "labels" | "annotations" | "finalizers" | "ownerReferences"
        ),
        _ => false,
    }
}

/// The leaf paths an applied configuration sets.
pub fn fields_of(config: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    walk(config, &mut Vec::new(), &mut Vec::new(), &mut out);
    out
}

/// `names`: field names from the root (list elements add nothing), for `list_kind`.
fn walk(v: &Value, names: &mut Vec<String>, at: &mut Path, out: &mut BTreeSet<Path>) {
    let Some(o) = v.as_object() else {
        return;
    };
    for (k, x) in o {
        if unowned(names, k) {
            continue;
        }
        at.push(format!("f:{k}"));
        match x {
            Value::Object(m) if !m.is_empty() => {
                names.push(k.clone());
                walk(x, names, at, out);
                names.pop();
            }
            Value::Array(items) => match list_kind(names, k) {
                Some(List::Key(key)) => {
                    names.push(k.clone());
                    for e in items {
                        let Some(id) = e.get(key) else { continue };
                        at.push(format!("k:{}", json!({ key: id })));
                        let mut dot = at.clone();
                        dot.push(".".into());
                        out.insert(dot);
                        walk(e, names, at, out);
                        at.pop();
                    }
                    names.pop();
                }
                Some(List::Union) => {
                    for e in items {
                        let mut p = at.clone();
                        p.push(format!("v:{e}"));
                        out.insert(p);
                    }
                }
                None => {
                    out.insert(at.clone());
                }
            },
            _ => {
                out.insert(at.clone());
            }
        }
        at.pop();
    }
}

/// The value at `path` in `obj` (`.` is the element itself).
pub fn get<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for step in path {
        cur = step_into(cur, step)?;
    }
    Some(cur)
}

fn step_into<'a>(cur: &'a Value, step: &str) -> Option<&'a Value> {
    if step == "." {
        return Some(cur);
    }
    if let Some(f) = step.strip_prefix("f:") {
        return cur.get(f);
    }
    let items = cur.as_array()?;
    if let Some(k) = step.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(k).ok()?;
        return items
            .iter()
            .find(|e| key.iter().all(|(kk, kv)| e.get(kk) == Some(kv)));
    }
    let v: Value = serde_json::from_str(step.strip_prefix("v:")?).ok()?;
    items.iter().find(|e| **e == v)
}

/// Removes the value at `path` (an element, for `.` and `v:` steps).
pub fn remove(obj: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let (target, step) = if last == "." {
        match parent.split_last() {
            Some((elem, list)) => (list, elem.as_str()),
            None => return,
        }
    } else {
        (parent, last.as_str())
    };
    let mut cur = obj;
    for s in target {
        let next = match s.strip_prefix("f:") {
            Some(f) => cur.get_mut(f),
            None => {
                let idx = index_of(cur, s);
                match (idx, cur.as_array_mut()) {
                    (Some(i), Some(a)) => a.get_mut(i),
                    _ => None,
                }
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = step.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(i) = index_of(cur, step)
        && let Some(a) = cur.as_array_mut()
    {
        a.remove(i);
    }
}

fn index_of(list: &Value, step: &str) -> Option<usize> {
    let found = step_into(list, step)?;
    list.as_array()?.iter().position(|e| std::ptr::eq(e, found))
}

/// `FieldsV1` JSON of a set of paths.
pub fn to_fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for step in p {
            cur = cur
                .entry(step.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("only objects are inserted");
        }
    }
    Value::Object(root)
}

/// The leaf paths of a `FieldsV1` value.
pub fn from_fields_v1(v: &Value) -> BTreeSet<Path> {
    fn go(v: &Value, at: &mut Path, out: &mut BTreeSet<Path>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, x) in m {
                    at.push(k.clone());
                    go(x, at, out);
                    at.pop();
                }
            }
            _ => {
                if !at.is_empty() {
                    out.insert(at.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

/// `.spec.template.spec.containers[name="web"].image`, as Kubernetes prints paths.
pub fn render(path: &[String]) -> String {
    let mut s = String::new();
    for step in path {
        if let Some(f) = step.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = step.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = step.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

/// One `managedFields` entry, decoded.
#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: String,
    subresource: String,
    api_version: String,
    time: String,
    fields: BTreeSet<Path>,
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| Entry {
                    manager: e["manager"].as_str().unwrap_or_default().to_owned(),
                    operation: e["operation"].as_str().unwrap_or_default().to_owned(),
                    subresource: e["subresource"].as_str().unwrap_or_default().to_owned(),
                    api_version: e["apiVersion"].as_str().unwrap_or_default().to_owned(),
                    time: e["time"].as_str().unwrap_or_default().to_owned(),
                    fields: from_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn store(obj: &mut Value, list: Vec<Entry>) {
    let list: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({"manager": e.manager, "operation": e.operation,
                "apiVersion": e.api_version, "time": e.time, "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields)});
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Does `p` lie inside (or equal) `q`?
fn within(p: &[String], q: &[String]) -> bool {
    let q = match q.last().map(String::as_str) {
        Some(".") => &q[..q.len() - 1],
        _ => q,
    };
    p.starts_with(q)
}

/// What an apply asks: who, and whether conflicts are overridden.
pub struct Apply<'a> {
    pub manager: &'a str,
    pub force: bool,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// Server-side apply of `config` onto `live` (the stored object, with its
/// managedFields; `Value::Null` when absent): the object to store, or the conflicts.
pub fn apply(live: &Value, config: &Value, how: &Apply<'_>) -> Result<Value, ApplyError> {
    if !config.is_object() {
        return Err(ApplyError::Invalid(
            "an apply configuration must be an object".into(),
        ));
    }
    let applied = fields_of(config);
    let mut list = entries(live);
    let mut conflicts = Vec::new();
    let mut taken: Vec<(usize, Path)> = Vec::new();
    for (i, e) in list.iter().enumerate() {
        if e.manager == how.manager && e.operation == "Apply" {
            continue;
        }
        for p in &e.fields {
            if p.last().is_some_and(|s| s == ".") || !applied.contains(p) {
                continue;
            }
            if get(live, p) != get(config, p) {
                conflicts.push(Conflict {
                    manager: e.manager.clone(),
                    field: render(p),
                });
                taken.push((i, p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !how.force {
        return Err(ApplyError::Conflicts(conflicts));
    }
    for (i, p) in taken {
        list[i].fields.remove(&p);
    }
    let mut next = if live.is_object() {
        live.clone()
    } else {
        json!({})
    };
    let mut patch = config.clone();
    if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
    }
    crate::smp::apply(&mut next, &patch).map_err(ApplyError::Invalid)?;
    // Fields this manager applied before and no longer applies go, unless someone
    // else owns them (or something inside them).
    let mine = list
        .iter()
        .position(|e| e.manager == how.manager && e.operation == "Apply");
    let before = mine.map(|i| list[i].fields.clone()).unwrap_or_default();
    let others: Vec<&Path> = list
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != mine)
        .flat_map(|(_, e)| e.fields.iter())
        .collect();
    let mut dropped: Vec<&Path> = before
        .iter()
        .filter(|p| !applied.contains(*p))
        .filter(|p| !others.iter().any(|o| within(o, p) || within(p, o)))
        .collect();
    // Deepest first, so an element's fields go before the element.
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in dropped {
        remove(&mut next, p);
    }
    let entry = Entry {
        manager: how.manager.to_owned(),
        operation: "Apply".into(),
        subresource: String::new(),
        api_version: how.api_version.to_owned(),
        time: how.now.to_owned(),
        fields: applied,
    };
    match mine {
        Some(i) => list[i] = entry,
        None => list.push(entry),
    }
    store(&mut next, list);
    Ok(next)
}

/// The leaf paths that differ between `old` and `new` (set or changed in `new`),
/// and those present only in `old` (removed).
fn diff(old: &Value, new: &Value) -> (BTreeSet<Path>, BTreeSet<Path>) {
    let (o, n) = (fields_of(old), fields_of(new));
    let changed = n
        .iter()
        .filter(|p| p.last().is_some_and(|s| s != ".") && get(old, p) != get(new, p))
        .cloned()
        .chain(n.difference(&o).cloned())
        .collect();
    let removed = o.difference(&n).cloned().collect();
    (changed, removed)
}

/// Records a non-apply write by `manager`: it owns what it changed (taken from
/// anyone else); fields it removed are nobody's. Only objects that already carry
/// managedFields are tracked (see ARCHITECTURE.md).
pub fn update(old: &Value, next: &mut Value, manager: &str, subresource: &str, now: &str) {
    let mut list = entries(old);
    if list.is_empty() {
        if let Some(m) = next.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
        return;
    }
    let mut old_cmp = old.clone();
    let mut new_cmp = next.clone();
    for v in [&mut old_cmp, &mut new_cmp] {
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
    }
    let (changed, removed) = diff(&old_cmp, &new_cmp);
    for e in &mut list {
        e.fields
            .retain(|p| !changed.contains(p) && !removed.iter().any(|r| within(p, r)));
    }
    if !changed.is_empty() {
        let api_version = next["apiVersion"].as_str().unwrap_or_default().to_owned();
        match list.iter_mut().find(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource == subresource
        }) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.to_owned();
            }
            None => list.push(Entry {
                manager: manager.to_owned(),
                operation: "Update".into(),
                subresource: subresource.to_owned(),
                api_version,
                time: now.to_owned(),
                fields: changed,
            }),
        }
    }
    store(next, list);
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-27T00:00:00Z";

    fn how(manager: &str, force: bool) -> Apply<'_> {
        Apply {
            manager,
            force,
            api_version: "apps/v1",
            now: NOW,
        }
    }

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                {"name": "web", "image": image, "args": ["a", "b"]}]}}}})
    }

    #[test]
    fn fields_are_keyed_like_kubernetes() {
        let f = to_fields_v1(&fields_of(&deployment(2, "x")));
        let c = &f["f:spec"]["f:template"]["f:spec"]["f:containers"][r#"k:{"name":"web"}"#];
        assert!(
            c["."].is_object() && c["f:image"].is_object() && c["f:args"].is_object(),
            "{f}"
        );
        assert!(f["f:metadata"]["f:labels"]["f:app"].is_object(), "{f}");
        assert!(f["f:metadata"].get("f:name").is_none(), "{f}");
        assert_eq!(from_fields_v1(&f), fields_of(&deployment(2, "x")));
    }

    #[test]
    fn a_field_changed_by_another_manager_conflicts_unless_forced() {
        let live = apply(&Value::Null, &deployment(2, "x"), &how("ci", false)).unwrap();
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(5);
        update(&live, &mut scaled, "kubectl-scale", "", NOW);
        // Same value: shared, no conflict; different: conflict naming the owner.
        assert!(apply(&scaled, &deployment(5, "x"), &how("ci", false)).is_ok());
        let err = apply(&scaled, &deployment(2, "x"), &how("ci", false)).unwrap_err();
        assert_eq!(
            err,
            ApplyError::Conflicts(vec![Conflict {
                manager: "kubectl-scale".into(),
                field: ".spec.replicas".into()
            }])
        );
        let forced = apply(&scaled, &deployment(2, "x"), &how("ci", true)).unwrap();
        assert_eq!(forced["spec"]["replicas"], 2);
        let owners: Vec<&str> = forced["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(owners, ["ci"], "the scaler lost its only field");
    }

    #[test]
    fn fields_no_longer_applied_are_removed_unless_someone_else_owns_them() {
        let mut cfg = deployment(2, "x");
        cfg["metadata"]["labels"]["tier"] = json!("front");
        let live = apply(&Value::Null, &cfg, &how("ci", false)).unwrap();
        let mut labelled = live.clone();
        labelled["metadata"]["labels"]["team"] = json!("a");
        update(&live, &mut labelled, "kubectl-label", "", NOW);
        let next = apply(&labelled, &deployment(2, "x"), &how("ci", false)).unwrap();
        assert!(next["metadata"]["labels"]["tier"].is_null(), "{next}");
        assert_eq!(next["metadata"]["labels"]["team"], "a", "another manager's");
        // A container dropped from the config goes with its fields.
        let mut two = deployment(2, "x");
        two["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "side", "image": "y"}));
        let live = apply(&Value::Null, &two, &how("ci", false)).unwrap();
        let next = apply(&live, &deployment(2, "x"), &how("ci", false)).unwrap();
        let names: Vec<&str> = next["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web"], "{next}");
    }

    #[test]
    fn paths_render_and_resolve() {
        let p: Path = vec![
            "f:spec".into(),
            "f:containers".into(),
            r#"k:{"name":"web"}"#.into(),
            "f:image".into(),
        ];
        assert_eq!(render(&p), r#".spec.containers[name="web"].image"#);
        let obj = json!({"spec": {"containers": [{"name": "a"}, {"name": "web", "image": "i"}]}});
        assert_eq!(get(&obj, &p), Some(&json!("i")));
        let mut o = obj.clone();
        let mut elem = p.clone();
        elem.pop();
        elem.push(".".into());
        remove(&mut o, &elem);
        assert_eq!(o, json!({"spec": {"containers": [{"name": "a"}]}}));
        assert_eq!(get(&obj, &["f:nope".into(), "k:garbage".into()]), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn key() -> impl Strategy<Value = String> {
            prop::sample::select(vec![
                "metadata",
                "labels",
                "spec",
                "containers",
                "name",
                "image",
                "finalizers",
                "managedFields",
                "fieldsV1",
                "manager",
                "operation",
                "f:spec",
                "k:{",
                ".",
                "v:1",
                "ports",
                "containerPort",
                "status",
            ])
            .prop_map(str::to_owned)
        }

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                (0i64..4).prop_map(Value::from),
                key().prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(key(), inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            /// Whatever a client sends and whatever is stored (managedFields
            /// included), apply and update return without panicking, and a
            /// successful apply gives an object.
            #[test]
            fn apply_and_update_never_panic(live in json(), config in json(), force in any::<bool>()) {
                let how = Apply { manager: "m", force, api_version: "v1", now: NOW };
                if let Ok(next) = apply(&live, &config, &how) {
                    prop_assert!(next.is_object());
                }
                if live.is_object() && config.is_object() {
                    let mut next = config.clone();
                    update(&live, &mut next, "u", "", NOW);
                }
            }
        }
    }
}
