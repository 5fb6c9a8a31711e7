//! OCI image archives: a tar of an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/...`), for nodes with no registry access.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use serde_json::json;

use crate::{Descriptor, Image, Index, MEDIA_INDEX, MEDIA_MANIFEST, OciError};

/// containerd's annotation for the full image name in an archive's index.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

fn malformed(why: impl Into<String>) -> OciError {
    OciError::Malformed {
        what: "OCI archive".into(),
        why: why.into(),
    }
}

/// Writes `images` (full name, image) as one archive.
pub fn write(images: &[(String, &Image)]) -> Result<Vec<u8>, OciError> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| -> Result<(), OciError> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, path, data)
            .map_err(|e| malformed(e.to_string()))
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut manifests = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, image) in images {
        let mut d = image.manifest_descriptor();
        let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
        d.annotations = Some(BTreeMap::from([
            (ANNOTATION_IMAGE_NAME.to_owned(), name.clone()),
            (ANNOTATION_REF_NAME.to_owned(), tag.to_owned()),
        ]));
        let blobs =
            std::iter::once((d.digest.clone(), image.manifest.as_slice())).chain(image.blobs());
        for (digest, data) in blobs {
            if seen.insert(digest.clone()) {
                let hex = digest.trim_start_matches("sha256:");
                add(&format!("blobs/sha256/{hex}"), data)?;
            }
        }
        manifests.push(d);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": manifests,
    }))
    .expect("json");
    add("index.json", &index)?;
    tar.into_inner().map_err(|e| malformed(e.to_string()))
}

/// The images of an archive with the names its index gives them (containerd's
/// full-name annotation, else the OCI ref name), each blob checked against its
/// digest. Nested indexes are resolved to this machine's platform.
pub fn read(bytes: &[u8]) -> Result<Vec<(Option<String>, Image)>, OciError> {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut ar = tar::Archive::new(bytes);
    for entry in ar.entries().map_err(|e| malformed(e.to_string()))? {
        let mut entry = entry.map_err(|e| malformed(e.to_string()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| malformed(e.to_string()))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| malformed(e.to_string()))?;
        files.insert(path, data);
    }
    if !files.contains_key("oci-layout") {
        return Err(malformed("no oci-layout file: not an OCI image layout"));
    }
    let blob = |digest: &str| -> Result<&Vec<u8>, OciError> {
        if !crate::valid_digest(digest) {
            return Err(malformed(format!("bad digest {digest:?}")));
        }
        let path = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        let data = files
            .get(&path)
            .ok_or_else(|| malformed(format!("missing blob {digest}")))?;
        let actual = crate::sha256_digest(data);
        if actual != digest {
            return Err(OciError::DigestMismatch {
                digest: digest.into(),
                actual,
            });
        }
        Ok(data)
    };
    let index: Index = serde_json::from_slice(
        files
            .get("index.json")
            .ok_or_else(|| malformed("no index.json"))?,
    )
    .map_err(|e| malformed(format!("index.json: {e}")))?;
    let mut out = Vec::new();
    for d in &index.manifests {
        let name = d.annotations.as_ref().and_then(|a| {
            a.get(ANNOTATION_IMAGE_NAME)
                .or_else(|| a.get(ANNOTATION_REF_NAME))
                .cloned()
        });
        let mut desc: Descriptor = d.clone();
        if desc.media_type.contains("index") || desc.media_type.contains("list") {
            let nested: Index = serde_json::from_slice(blob(&desc.digest)?)
                .map_err(|e| malformed(format!("nested index: {e}")))?;
            desc = nested
                .manifests
                .into_iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_none_or(|p| p.os == "linux" && p.architecture == crate::host_arch())
                })
                .ok_or_else(|| malformed(format!("no linux/{} image", crate::host_arch())))?;
        }
        if !(desc.media_type == MEDIA_MANIFEST || desc.media_type.contains("manifest.v2")) {
            return Err(malformed(format!(
                "unsupported media type {}",
                desc.media_type
            )));
        }
        let manifest = blob(&desc.digest)?.clone();
        let image = Image {
            manifest,
            config: Vec::new(),
            layers: Vec::new(),
        };
        let m = image.parsed_manifest()?;
        let config = blob(&m.config.digest)?.clone();
        let layers = m
            .layers
            .iter()
            .map(|l| blob(&l.digest).cloned())
            .collect::<Result<Vec<_>, _>>()?;
        out.push((
            name,
            Image {
                config,
                layers,
                ..image
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{Entry, ImageConfig, image};

    #[test]
    fn an_archive_reads_back_the_images_it_was_written_with() {
        let img = image(
            &[Entry::File {
                path: "hello".into(),
                mode: 0o644,
                data: b"world".to_vec(),
            }],
            &ImageConfig::default(),
        )
        .unwrap();
        let bytes = write(&[("example.com/demo/hello:v1".into(), &img)]).unwrap();
        let back = read(&bytes).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0.as_deref(), Some("example.com/demo/hello:v1"));
        assert_eq!(back[0].1.manifest, img.manifest);
        assert_eq!(back[0].1.layers, img.layers);
    }

    #[test]
    fn a_corrupted_archive_is_refused() {
        assert!(read(b"not a tar at all").is_err());
        let img = image(&[], &ImageConfig::default()).unwrap();
        let mut bytes = write(&[("x:1".into(), &img)]).unwrap();
        // Flip a byte inside the first blob's content (after the oci-layout entry).
        let pos = bytes.len() / 2;
        bytes[pos] ^= 0xff;
        assert!(read(&bytes).is_err());
    }
}
