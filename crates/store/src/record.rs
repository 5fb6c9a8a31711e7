//! On-disk record formats. Every stored record starts with a format version byte so
//! later releases can migrate old records instead of misreading them.

use bytes::{Buf, BufMut, Bytes};

use crate::{Event, EventType, KeyValue, Revision, StoreError};

/// The format version written by this release.
pub const FORMAT_VERSION: u8 = 1;

fn corrupt(key: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// A value as stored in a backend that tracks revisions itself (etcd).
pub fn encode_value(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + value.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(value);
    out
}

pub fn decode_value(key: &str, raw: &[u8]) -> Result<Bytes, StoreError> {
    match raw.first() {
        Some(&FORMAT_VERSION) => Ok(Bytes::copy_from_slice(&raw[1..])),
        Some(v) => Err(corrupt(key, format!("unknown record format version {v}"))),
        None => Err(corrupt(key, "empty record")),
    }
}

/// A key-value record of the embedded backend: version, create and mod revision, value.
pub fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + kv.value.len());
    out.push(FORMAT_VERSION);
    out.put_i64_le(kv.create_revision);
    out.put_i64_le(kv.mod_revision);
    out.extend_from_slice(&kv.value);
    out
}

pub fn decode_kv(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < 17 {
        return Err(corrupt(key, "record shorter than its header"));
    }
    if raw[0] != FORMAT_VERSION {
        return Err(corrupt(
            key,
            format!("unknown record format version {}", raw[0]),
        ));
    }
    let mut header = &raw[1..17];
    let create_revision = header.get_i64_le();
    let mod_revision = header.get_i64_le();
    Ok(KeyValue {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(&raw[17..]),
        create_revision,
        mod_revision,
    })
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.extend_from_slice(b);
}

fn put_kv(out: &mut Vec<u8>, kv: &KeyValue) {
    put_bytes(out, kv.key.as_bytes());
    put_bytes(out, &kv.value);
    out.put_i64_le(kv.create_revision);
    out.put_i64_le(kv.mod_revision);
}

/// The events of one revision, as kept in the embedded backend's history log.
pub fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.put_u32_le(events.len() as u32);
    for e in events {
        out.push(match e.kind {
            EventType::Put => 0,
            EventType::Delete => 1,
        });
        put_kv(&mut out, &e.kv);
        match &e.prev {
            Some(p) => {
                out.push(1);
                put_kv(&mut out, p);
            }
            None => out.push(0),
        }
    }
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    what: String,
}

impl Reader<'_> {
    fn need(&self, n: usize) -> Result<(), StoreError> {
        if self.buf.remaining() < n {
            Err(corrupt(&self.what, "truncated history record"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn i64(&mut self) -> Result<i64, StoreError> {
        self.need(8)?;
        Ok(self.buf.get_i64_le())
    }
    fn bytes(&mut self) -> Result<&[u8], StoreError> {
        self.need(4)?;
        let n = self.buf.get_u32_le() as usize;
        self.need(n)?;
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn kv(&mut self) -> Result<KeyValue, StoreError> {
        let key = String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| corrupt(&self.what, "key is not UTF-8"))?;
        let value = Bytes::copy_from_slice(self.bytes()?);
        Ok(KeyValue {
            key,
            value,
            create_revision: self.i64()?,
            mod_revision: self.i64()?,
        })
    }
}

pub fn decode_events(revision: Revision, raw: &[u8]) -> Result<Vec<Event>, StoreError> {
    let mut r = Reader {
        buf: raw,
        what: format!("history@{revision}"),
    };
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(corrupt(
            &r.what,
            format!("unknown record format version {version}"),
        ));
    }
    r.need(4)?;
    let n = r.buf.get_u32_le() as usize;
    let mut events = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let kind = match r.u8()? {
            0 => EventType::Put,
            1 => EventType::Delete,
            other => return Err(corrupt(&r.what, format!("unknown event type {other}"))),
        };
        let kv = r.kv()?;
        let prev = match r.u8()? {
            0 => None,
            _ => Some(r.kv()?),
        };
        events.push(Event { kind, kv, prev });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_unknown_versions_are_rejected() {
        let kv = KeyValue {
            key: "/a".into(),
            value: Bytes::from_static(b"v"),
            create_revision: 2,
            mod_revision: 3,
        };
        let events = vec![
            Event {
                kind: EventType::Put,
                kv: kv.clone(),
                prev: None,
            },
            Event {
                kind: EventType::Delete,
                kv: kv.clone(),
                prev: Some(kv.clone()),
            },
        ];
        let raw = encode_events(&events);
        assert_eq!(decode_events(3, &raw).unwrap(), events);
        let mut bad = raw.clone();
        bad[0] = 9;
        assert!(matches!(
            decode_events(3, &bad),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(decode_events(3, &raw[..raw.len() - 2]).is_err());
        assert_eq!(decode_kv("/a", &encode_kv(&kv)).unwrap(), kv);
        assert!(decode_kv("/a", &[2; 20]).is_err());
    }
}
