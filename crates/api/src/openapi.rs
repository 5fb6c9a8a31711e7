//! Schemas of every served kind for the OpenAPI documents (`kubectl explain`),
//! generated from the types the server decodes into: Kubernetes' own from
//! k8s-openapi (with their upstream descriptions), ours from `meridian`'s doc
//! comments.

use serde_json::{Map, Value, json};

use crate::resources::{RESOURCES, Resource};

/// Where the definitions live: OpenAPI v3 (`components.schemas`) or v2 (`definitions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    V2,
    V3,
}

/// Every definition (by name) and, for each served resource, the name of its kind's
/// definition. Each kind's definition carries `x-kubernetes-group-version-kind`,
/// which is how kubectl finds it; a `$ref` with a description beside it is written
/// as `allOf: [$ref]`, as Kubernetes does.
pub fn definitions(flavor: Flavor) -> (Map<String, Value>, Vec<(&'static Resource, String)>) {
    let path = match flavor {
        Flavor::V2 => "#/definitions",
        Flavor::V3 => "#/components/schemas",
    };
    let mut generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| s.definitions_path = path.into())
        .into_generator();
    let mut inline = Vec::new();
    let mut roots = Vec::new();
    for r in RESOURCES {
        let schema = (r.schema)(&mut generator);
        let name = match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => reference.rsplit('/').next().unwrap_or(reference).to_owned(),
            None => {
                let name = format!("{}.{}.{}", reverse_domain(r.group), r.version, r.kind);
                inline.push((name.clone(), schema.to_value()));
                name
            }
        };
        roots.push((r, name));
    }
    let mut defs = generator.take_definitions(true);
    for (name, schema) in inline {
        defs.insert(name, schema);
    }
    for (r, name) in &roots {
        if let Some(Value::Object(def)) = defs.get_mut(name) {
            let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
            match def.get_mut("x-kubernetes-group-version-kind") {
                Some(Value::Array(list)) => list.push(gvk),
                _ => {
                    def.insert("x-kubernetes-group-version-kind".into(), json!([gvk]));
                }
            }
        }
    }
    // Our types get names in Kubernetes' style (io.meridian.v1alpha1.PlacementPolicy).
    let ours = |n: &str| !n.starts_with("io.");
    let rename = |n: &str| format!("io.meridian.{}.{n}", crate::meridian::VERSION);
    let defs: Map<String, Value> = defs
        .into_iter()
        .map(|(n, mut d)| {
            tidy(&mut d, path, &|r: &str| {
                if ours(r) { rename(r) } else { r.to_owned() }
            });
            (if ours(&n) { rename(&n) } else { n }, d)
        })
        .collect();
    let roots = roots
        .into_iter()
        .map(|(r, n)| (r, if ours(&n) { rename(&n) } else { n }))
        .collect();
    (defs, roots)
}

/// `meridian.io` → `io.meridian`; the core group → `io.k8s.api.core`.
fn reverse_domain(group: &str) -> String {
    if group.is_empty() {
        return "io.k8s.api.core".into();
    }
    let mut parts: Vec<&str> = group.split('.').collect();
    parts.reverse();
    parts.join(".")
}

/// Writes schemas as Kubernetes' documents have them: an optional field is its type
/// (no `anyOf [T, null]`, no `nullable`, no empty defaults); `{"$ref": R,
/// "description": D}` becomes `{"allOf": [{"$ref": R}], "description": D}` (siblings
/// of `$ref` are ignored by OpenAPI 3.0 tools); references renamed by `rename`.
fn tidy(v: &mut Value, path: &str, rename: &dyn Fn(&str) -> String) {
    match v {
        Value::Object(o) => {
            if let Some(Value::Array(any)) = o.get("anyOf")
                && any.len() == 2
                && any[1].get("enum") == Some(&json!([null]))
            {
                let first = any[0].clone();
                o.remove("anyOf");
                if let Value::Object(f) = first {
                    o.extend(f);
                }
            }
            o.remove("nullable");
            if o.get("default").is_some_and(|d| {
                d == &json!("") || d == &json!({}) || d == &json!([]) || d.is_null()
            }) {
                o.remove("default");
            }
            if let Some(Value::String(r)) = o.get("$ref") {
                let name = r.rsplit('/').next().unwrap_or(r);
                let r = Value::String(format!("{path}/{}", rename(name)));
                if o.len() > 1 {
                    o.remove("$ref");
                    o.insert("allOf".into(), json!([{"$ref": r}]));
                } else {
                    o.insert("$ref".into(), r);
                }
            }
            for x in o.values_mut() {
                tidy(x, path, rename);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| tidy(x, path, rename)),
        _ => {}
    }
}

/// Names of the definitions `root` refers to, directly or not (itself included).
pub fn reachable(defs: &Map<String, Value>, roots: &[&str]) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut todo: Vec<String> = roots.iter().map(|r| (*r).to_owned()).collect();
    while let Some(name) = todo.pop() {
        if seen.contains(&name) {
            continue;
        }
        if let Some(def) = defs.get(&name) {
            refs(def, &mut todo);
        }
        seen.push(name);
    }
    seen.sort();
    seen
}

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            if let Some(r) = o.get("$ref").and_then(Value::as_str) {
                out.push(r.rsplit('/').next().unwrap_or(r).to_owned());
            }
            o.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_definition_with_its_group_version_kind_and_every_ref_resolves() {
        for flavor in [Flavor::V2, Flavor::V3] {
            let (defs, roots) = definitions(flavor);
            assert_eq!(roots.len(), RESOURCES.len());
            for (r, name) in &roots {
                let def = &defs[name.as_str()];
                let gvks = def["x-kubernetes-group-version-kind"].as_array().unwrap();
                assert!(
                    gvks.iter()
                        .any(|g| g["kind"] == r.kind && g["group"] == r.group),
                    "{name}: {gvks:?}"
                );
            }
            let all: Vec<&str> = defs.keys().map(String::as_str).collect();
            for name in reachable(&defs, &all) {
                assert!(defs.contains_key(&name), "dangling $ref to {name}");
            }
        }
        let (defs, _) = definitions(Flavor::V3);
        let pod = &defs["io.k8s.api.core.v1.Pod"];
        assert!(
            pod["description"]
                .as_str()
                .unwrap()
                .contains("collection of containers")
        );
        assert_eq!(
            pod["properties"]["spec"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.PodSpec"
        );
        let pp = &defs["io.meridian.v1alpha1.PlacementPolicy"];
        assert!(pp["description"].is_string(), "{pp}");
        assert_eq!(
            pp["properties"]["status"]["allOf"][0]["$ref"],
            "#/components/schemas/io.meridian.v1alpha1.PlacementPolicyStatus",
            "optional fields are their type: {pp}"
        );
        assert!(!pp.to_string().contains("nullable"), "{pp}");
    }
}
