//! Serving container logs from the CRI-format files the shim writes:
//! `<RFC3339Nano> <stdout|stderr> <F|P> <text>`.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use crate::shim::rotated;

#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    pub follow: bool,
    /// `None`: every line.
    pub tail_lines: Option<usize>,
    pub timestamps: bool,
    /// `None`: unlimited.
    pub limit_bytes: Option<usize>,
}

/// Turns CRI records into what `kubectl logs` prints.
pub fn render(record: &[u8], timestamps: bool, out: &mut Vec<u8>) {
    let mut parts = record.splitn(4, |b| *b == b' ');
    let (Some(ts), Some(_stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        out.extend_from_slice(record);
        out.push(b'\n');
        return;
    };
    let text = parts.next().unwrap_or_default();
    if timestamps {
        out.extend_from_slice(ts);
        out.push(b' ');
    }
    out.extend_from_slice(text);
    if tag != b"P" {
        out.push(b'\n');
    }
}

async fn read_all(path: &Path) -> Vec<u8> {
    tokio::fs::read(path).await.unwrap_or_default()
}

/// Sends the log of one container attempt to `out` in chunks. With `follow`, keeps
/// going until `done()` says the attempt has ended and everything was sent, or
/// until the receiver goes away.
pub async fn stream(
    path: PathBuf,
    opts: LogOptions,
    done: impl Fn() -> bool + Send,
    out: mpsc::Sender<Vec<u8>>,
) -> Result<(), String> {
    let mut sent = 0usize;
    let limit = opts.limit_bytes.unwrap_or(usize::MAX);
    // History: the rotated file, then the current one.
    let mut history = read_all(&rotated(&path)).await;
    let current = read_all(&path).await;
    let mut offset = current.len() as u64;
    history.extend_from_slice(&current);
    // Only whole records count; a trailing partial record is re-read when following.
    let whole = history
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|p| p + 1)
        .unwrap_or(0);
    offset -= (history.len() - whole).min(current.len()) as u64;
    let records: Vec<&[u8]> = history[..whole]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let skip = match opts.tail_lines {
        Some(n) => records.len().saturating_sub(n),
        None => 0,
    };
    let mut buf = Vec::new();
    for r in &records[skip..] {
        render(r, opts.timestamps, &mut buf);
        if buf.len() >= 32 * 1024 {
            sent += buf.len();
            if out.send(std::mem::take(&mut buf)).await.is_err() || sent >= limit {
                return Ok(());
            }
        }
    }
    if !buf.is_empty() {
        sent += buf.len();
        if out.send(std::mem::take(&mut buf)).await.is_err() || sent >= limit {
            return Ok(());
        }
    }
    if !opts.follow {
        return Ok(());
    }
    let mut pending = Vec::new();
    loop {
        let finished = done();
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(_) if finished => return Ok(()),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0; // rotated
            pending.clear();
        }
        if len > offset {
            file.seek(SeekFrom::Start(offset))
                .await
                .map_err(|e| e.to_string())?;
            let mut fresh = Vec::with_capacity((len - offset) as usize);
            file.read_to_end(&mut fresh)
                .await
                .map_err(|e| e.to_string())?;
            offset += fresh.len() as u64;
            pending.extend_from_slice(&fresh);
            if let Some(p) = pending.iter().rposition(|b| *b == b'\n') {
                let rest = pending.split_off(p + 1);
                for r in pending.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    render(r, opts.timestamps, &mut buf);
                }
                pending = rest;
                sent += buf.len();
                if out.send(std::mem::take(&mut buf)).await.is_err() || sent >= limit {
                    return Ok(());
                }
            }
            continue;
        }
        if finished {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = out.closed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_full_and_partial_records_with_and_without_timestamps() {
        let mut out = Vec::new();
        render(
            b"2026-11-27T00:00:00.000000001Z stdout F hello world",
            false,
            &mut out,
        );
        render(
            b"2026-11-27T00:00:00.000000002Z stderr P par",
            false,
            &mut out,
        );
        render(
            b"2026-11-27T00:00:00.000000003Z stderr F tial",
            true,
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "hello world\npar2026-11-27T00:00:00.000000003Z tial\n"
        );
    }

    #[tokio::test]
    async fn tail_returns_the_last_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let text: String = (0..10)
            .map(|i| format!("2026-11-27T00:00:00Z stdout F line {i}\n"))
            .collect();
        std::fs::write(&path, text).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let opts = LogOptions {
            tail_lines: Some(2),
            ..Default::default()
        };
        stream(path, opts, || true, tx).await.unwrap();
        let mut got = Vec::new();
        while let Some(c) = rx.recv().await {
            got.extend(c);
        }
        assert_eq!(String::from_utf8(got).unwrap(), "line 8\nline 9\n");
    }
}
