//! Parses Kubernetes REST paths into the resource, namespace, name and subresource.

use meridian_api::{ApiError, Reason, Resource};

/// Where a request goes.
#[derive(Debug)]
pub enum Route {
    /// `/api`, `/apis`, `/api/v1`, `/apis/{group}[/{version}]`.
    Discovery(Vec<String>),
    /// A resource path.
    Resource(Target),
}

#[derive(Debug)]
pub struct Target {
    pub resource: &'static Resource,
    /// The namespace in the caller's view, for namespaced requests.
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

fn not_found() -> ApiError {
    ApiError::new(
        Reason::NotFound,
        "the server could not find the requested resource",
    )
}

pub fn parse(path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api"] | ["apis"] | ["api", _] | ["apis", _] | ["apis", _, _] => {
            return Ok(Route::Discovery(
                segs.iter().map(|s| s.to_string()).collect(),
            ));
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found()),
    };
    let find = |plural: &str| Resource::find(group, version, plural).ok_or_else(not_found);
    let target = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if !(group.is_empty()
                && matches!(*plural, "status" | "finalize")
                && tail.is_empty()) =>
        {
            let resource = find(plural)?;
            if !resource.namespaced() {
                return Err(not_found());
            }
            let (name, subresource) = match tail {
                [] => (None, None),
                [name] => (Some(name.to_string()), None),
                [name, sub] => (Some(name.to_string()), Some(sub.to_string())),
                _ => return Err(not_found()),
            };
            Target {
                resource,
                namespace: Some(ns.to_string()),
                name,
                subresource,
            }
        }
        [plural, tail @ ..] => {
            let resource = find(plural)?;
            let (name, subresource) = match tail {
                [] => (None, None),
                [name] => (Some(name.to_string()), None),
                [name, sub] => (Some(name.to_string()), Some(sub.to_string())),
                _ => return Err(not_found()),
            };
            // A namespaced resource is only addressed by name inside a namespace.
            if resource.namespaced() && name.is_some() {
                return Err(not_found());
            }
            Target {
                resource,
                namespace: None,
                name,
                subresource,
            }
        }
        [] => return Err(not_found()),
    };
    if let Some(sub) = &target.subresource {
        let ok = match sub.as_str() {
            "status" => target.resource.has_status,
            "scale" => target.resource.has_scale,
            "binding" | "log" | "eviction" | "exec" | "portforward" => {
                target.resource.plural == "pods"
            }
            "token" => target.resource.plural == "tenants",
            "finalize" => target.resource.plural == "namespaces",
            _ => false,
        };
        if !ok {
            return Err(not_found());
        }
    }
    Ok(Route::Resource(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(p: &str) -> Target {
        match parse(p).unwrap() {
            Route::Resource(t) => t,
            Route::Discovery(_) => panic!("{p} is not a resource path"),
        }
    }

    #[test]
    fn parses_core_group_namespaced_and_cluster_paths() {
        let t = target("/api/v1/namespaces/default/pods/web/status");
        assert_eq!(
            (
                t.resource.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.subresource.as_deref()
            ),
            ("pods", Some("default"), Some("web"), Some("status"))
        );
        let t = target("/api/v1/namespaces/default");
        assert_eq!(
            (t.resource.plural, t.name.as_deref()),
            ("namespaces", Some("default"))
        );
        let t = target("/api/v1/namespaces/default/status");
        assert_eq!(
            (t.resource.plural, t.subresource.as_deref()),
            ("namespaces", Some("status"))
        );
        let t = target("/apis/apps/v1/deployments");
        assert_eq!((t.resource.plural, t.namespace), ("deployments", None));
        let t = target("/apis/meridian.io/v1alpha1/tenants/acme/token");
        assert_eq!(t.subresource.as_deref(), Some("token"));
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for p in [
            "/api/v1/widgets",
            "/apis/apps/v1/pods",
            "/api/v1/pods/x",
            "/api/v1/namespaces/a/pods/x/bogus",
            "/foo",
            "/api/v1/nodes/a/scale",
        ] {
            assert_eq!(parse(p).unwrap_err().code(), 404, "{p}");
        }
    }
}
