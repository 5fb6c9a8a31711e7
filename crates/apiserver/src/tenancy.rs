//! Tenants as virtual clusters. Objects are stored under a physical namespace
//! `{tenant}.{namespace}` (a dot never appears in a namespace name, so this is
//! unambiguous); a tenant sees and writes plain namespace names, the global view
//! (admins, platform components) sees the physical ones. The platform's own
//! namespaces (`default`, `kube-system`) have no tenant part.

use bytes::Bytes;
use meridian_api::Resource;

/// How a caller sees the world: through one tenant's eyes, or globally.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub tenant: Option<&'a str>,
}

/// Splits a physical namespace into its tenant and the tenant-local name.
pub fn split_physical(ns: &str) -> (Option<&str>, &str) {
    match ns.split_once('.') {
        Some((t, local)) => (Some(t), local),
        None => (None, ns),
    }
}

pub fn is_namespaces(r: &Resource) -> bool {
    r.plural == "namespaces" && r.group.is_empty()
}

impl View<'_> {
    /// The stored namespace for a namespace name in this view.
    pub fn physical(&self, ns: &str) -> String {
        match self.tenant {
            Some(t) => format!("{t}.{ns}"),
            None => ns.to_owned(),
        }
    }

    /// The stored name of an object (differs from `name` only for Namespaces).
    pub fn physical_name(&self, r: &Resource, name: &str) -> String {
        if is_namespaces(r) {
            self.physical(name)
        } else {
            name.to_owned()
        }
    }

    pub fn key(&self, r: &Resource, ns: Option<&str>, name: &str) -> String {
        let ns = ns.map(|n| self.physical(n));
        r.storage_key(ns.as_deref(), &self.physical_name(r, name))
    }

    /// The store prefix a list or watch covers.
    pub fn prefix(&self, r: &Resource, ns: Option<&str>) -> String {
        let base = r.storage_prefix();
        match (ns, self.tenant) {
            (Some(ns), _) if r.namespaced() => format!("{base}{}/", self.physical(ns)),
            (_, Some(t)) if r.namespaced() || is_namespaces(r) => format!("{base}{t}."),
            _ => base,
        }
    }

    /// Renders a stored object's JSON for this view.
    pub fn render(&self, r: &Resource, json: &Bytes) -> Bytes {
        let Some(t) = self.tenant else {
            return json.clone();
        };
        let mut out = replace(
            json,
            format!("\"namespace\":\"{t}.").as_bytes(),
            b"\"namespace\":\"",
        );
        if is_namespaces(r) {
            out = replace(&out, format!("\"name\":\"{t}.").as_bytes(), b"\"name\":\"");
        }
        out
    }
}

fn replace(src: &Bytes, from: &[u8], to: &[u8]) -> Bytes {
    let finder = memchr::memmem::Finder::new(from);
    let mut out: Option<Vec<u8>> = None;
    let mut last = 0;
    for at in finder.find_iter(src) {
        let buf = out.get_or_insert_with(|| Vec::with_capacity(src.len()));
        buf.extend_from_slice(&src[last..at]);
        buf.extend_from_slice(to);
        last = at + from.len();
    }
    match out {
        None => src.clone(),
        Some(mut buf) => {
            buf.extend_from_slice(&src[last..]);
            Bytes::from(buf)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_view_maps_namespaces_both_ways() {
        let pods = Resource::find("", "v1", "pods").unwrap();
        let nss = Resource::find("", "v1", "namespaces").unwrap();
        let v = View {
            tenant: Some("acme"),
        };
        assert_eq!(
            v.key(pods, Some("default"), "web"),
            "/registry/core/pods/acme.default/web"
        );
        assert_eq!(v.prefix(pods, None), "/registry/core/pods/acme.");
        assert_eq!(
            v.key(nss, None, "default"),
            "/registry/core/namespaces/acme.default"
        );
        let stored = Bytes::from_static(
            br#"{"metadata":{"name":"acme.default","namespace":"acme.default"}}"#,
        );
        assert_eq!(
            &v.render(nss, &stored)[..],
            br#"{"metadata":{"name":"default","namespace":"default"}}"#
        );
        let g = View { tenant: None };
        assert_eq!(g.prefix(pods, None), "/registry/core/pods/");
        assert_eq!(&g.render(pods, &stored)[..], &stored[..]);
        assert_eq!(split_physical("acme.default"), (Some("acme"), "default"));
        assert_eq!(split_physical("kube-system"), (None, "kube-system"));
    }
}
