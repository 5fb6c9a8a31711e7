//! Image references as Kubernetes users write them (`busybox`, `nginx:1.27`,
//! `127.0.0.1:5000/demo/app@sha256:...`), normalised the way containerd does.

use std::fmt;

use crate::OciError;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`; `docker.io` when the reference names none.
    pub registry: String,
    /// `library/busybox`, `demo/app`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let bad = |why: &str| OciError::Reference {
            reference: s.to_owned(),
            why: why.to_owned(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > 4096 {
            return Err(bad("longer than 4096 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !crate::valid_digest(d) {
                    return Err(bad("the digest after @ must be sha256:<64 hex digits>"));
                }
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path.to_owned())
            }
            _ => ("docker.io".to_owned(), rest.to_owned()),
        };
        // A tag is after the last ':' of the last path component.
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p.to_owned(), Some(t.to_owned())),
            _ => (path, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad(&format!("invalid tag {t:?}")));
            }
        }
        if path.is_empty() {
            return Err(bad("no repository name"));
        }
        for comp in path.split('/') {
            let ok = !comp.is_empty()
                && comp
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && comp.as_bytes()[0].is_ascii_alphanumeric();
            if !ok {
                return Err(bad(&format!(
                    "repository component {comp:?} must be lowercase letters, digits and \
                     . _ - (starting with a letter or digit)"
                )));
            }
        }
        let repository = if host == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry: host,
            repository,
            tag,
            digest,
        })
    }

    /// The digest if pinned, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_normalise_to_docker_hub_library_latest() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r = Reference::parse("127.0.0.1:5000/demo/app:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "demo/app");
        assert_eq!(r.object(), "v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/x@{d}")).unwrap();
        assert_eq!(r.object(), d);
        assert_eq!(r.tag, None);
    }

    #[test]
    fn malformed_references_are_refused_with_the_reason() {
        for bad in [
            "",
            "UPPER/case",
            "a//b",
            "x:",
            "x@sha256:zz",
            "x:-tag",
            "/x",
        ] {
            let e = Reference::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid image reference"), "{bad}: {e}");
        }
    }
}
