//! Just enough SPDY/3.1 to serve `kubectl port-forward`: kubectl (1.31+) opens a
//! WebSocket with the subprotocol `SPDY/3.1+portforward.k8s.io` and speaks SPDY
//! inside it. Frames, the header block (zlib with the SPDY/3 dictionary, one
//! compression context per direction for the whole session) and the control
//! frames a port-forward session uses: SYN_STREAM (answered with SYN_REPLY),
//! RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS and WINDOW_UPDATE. Every input is
//! checked; a malformed frame is an error, never a panic.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// Largest frame accepted (SPDY's length field allows 16 MiB).
pub const MAX_FRAME: usize = 1 << 24;

pub const SYN_STREAM: u16 = 1;
pub const SYN_REPLY: u16 = 2;
pub const RST_STREAM: u16 = 3;
pub const PING: u16 = 6;
pub const GOAWAY: u16 = 7;
pub const HEADERS: u16 = 8;
pub const FLAG_FIN: u8 = 1;

/// A parsed frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Control {
        kind: u16,
        flags: u8,
        data: Vec<u8>,
    },
    Data {
        stream: u32,
        flags: u8,
        data: Vec<u8>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("header block: {0}")]
    Headers(String),
}

/// Takes one whole frame off the front of `buf`, if there is one.
pub fn parse(buf: &mut Vec<u8>) -> Result<Option<Frame>, SpdyError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
    if len > MAX_FRAME {
        return Err(SpdyError::TooLarge(len));
    }
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let flags = buf[4];
    let head = [buf[0], buf[1], buf[2], buf[3]];
    let data = buf[8..8 + len].to_vec();
    buf.drain(..8 + len);
    if head[0] & 0x80 != 0 {
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != 3 {
            return Err(SpdyError::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        Ok(Some(Frame::Control { kind, flags, data }))
    } else {
        let stream = u32::from_be_bytes(head) & 0x7fff_ffff;
        Ok(Some(Frame::Data {
            stream,
            flags,
            data,
        }))
    }
}

fn control(kind: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(0x8003u16).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

/// A data frame (`fin`: the sender's last).
pub fn data(stream: u32, data: &[u8], fin: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.push(if fin { FLAG_FIN } else { 0 });
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

/// RST_STREAM with a status (1 PROTOCOL_ERROR, 5 CANCEL, 6 INTERNAL_ERROR, ...).
pub fn rst(stream: u32, status: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&stream.to_be_bytes());
    d.extend_from_slice(&status.to_be_bytes());
    control(RST_STREAM, 0, &d)
}

/// PING answered with the same id.
pub fn ping(data: &[u8]) -> Vec<u8> {
    control(PING, 0, data)
}

/// The stream id a SYN_STREAM, SYN_REPLY, RST_STREAM or HEADERS frame is about.
pub fn stream_of(data: &[u8]) -> Result<u32, SpdyError> {
    let b: [u8; 4] = data
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(SpdyError::Malformed("control frame without a stream id"))?;
    Ok(u32::from_be_bytes(b) & 0x7fff_ffff)
}

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00,
/// 2.6.10.1): length-prefixed header names and values, then a run of common
/// strings.
fn dictionary() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
        "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
        "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
        "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
        "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut d = Vec::with_capacity(1424);
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
}

/// The two header compression contexts of a session.
pub struct HeaderCodec {
    inflate: Decompress,
    deflate: Compress,
    dict: Vec<u8>,
    dict_set_out: bool,
}

impl Default for HeaderCodec {
    fn default() -> Self {
        Self {
            inflate: Decompress::new(true),
            deflate: Compress::new(Compression::default(), true),
            dict: dictionary(),
            dict_set_out: false,
        }
    }
}

impl HeaderCodec {
    /// Decodes a header block (name, value pairs; values may hold several
    /// NUL-separated parts, kept as one string here).
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let err = |e: &dyn std::fmt::Display| SpdyError::Headers(e.to_string());
        let mut out = Vec::new();
        let mut input = block;
        loop {
            out.reserve(4096);
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let r = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - in0) as usize;
            let produced = self.inflate.total_out() - out0;
            input = input.get(used..).unwrap_or_default();
            match r {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&self.dict)
                        .map_err(|e| err(&e))?;
                    continue;
                }
                Err(e) => return Err(err(&e)),
            }
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            if used == 0 && produced == 0 {
                return Err(SpdyError::Headers("no progress decoding".into()));
            }
            if out.len() > MAX_FRAME {
                return Err(SpdyError::Headers("header block too large".into()));
            }
        }
        let mut r = Reader(&out);
        let n = r.u32()? as usize;
        if n > 1024 {
            return Err(SpdyError::Malformed("header count"));
        }
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.string()?;
            let v = r.string()?;
            headers.push((k.to_ascii_lowercase(), v));
        }
        Ok(headers)
    }

    /// Encodes a header block.
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Result<Vec<u8>, SpdyError> {
        let err = |e: &dyn std::fmt::Display| SpdyError::Headers(e.to_string());
        if !self.dict_set_out {
            self.deflate
                .set_dictionary(&self.dict)
                .map_err(|e| err(&e))?;
            self.dict_set_out = true;
        }
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (k, v) in headers {
            for s in [k, v] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| err(&e))?;
            let used = (self.deflate.total_in() - before) as usize;
            input = &input[used..];
            if input.is_empty() && out.capacity() > out.len() {
                break;
            }
        }
        Ok(out)
    }

    /// A SYN_REPLY for `stream` with no headers.
    pub fn syn_reply(&mut self, stream: u32) -> Result<Vec<u8>, SpdyError> {
        let mut d = stream.to_be_bytes().to_vec();
        d.extend(self.encode(&[])?);
        Ok(control(SYN_REPLY, 0, &d))
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, SpdyError> {
        let b: [u8; 4] = self
            .0
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(SpdyError::Malformed("header block"))?;
        self.0 = &self.0[4..];
        Ok(u32::from_be_bytes(b))
    }

    fn string(&mut self) -> Result<String, SpdyError> {
        let n = self.u32()? as usize;
        let s = self
            .0
            .get(..n)
            .ok_or(SpdyError::Malformed("header block"))?;
        self.0 = &self.0[n..];
        Ok(String::from_utf8_lossy(s).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert!(d.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(d.ends_with(b"utf-,*,enq=0."));
    }

    #[test]
    fn header_blocks_round_trip_across_one_session_context() {
        let mut client = HeaderCodec::default();
        let mut server = HeaderCodec::default();
        for i in 0..3 {
            let port = format!("{}", 8080 + i);
            let block = client
                .encode(&[("streamtype", "data"), ("port", &port), ("requestid", "0")])
                .unwrap();
            let h = server.decode(&block).unwrap();
            assert_eq!(h[1], ("port".into(), port));
        }
    }

    #[test]
    fn frames_parse_split_and_garbage_is_an_error() {
        let mut buf = data(3, b"hello", true);
        buf.extend(ping(&[0, 0, 0, 1]));
        let tail = buf.split_off(10);
        let mut b = buf;
        assert_eq!(parse(&mut b).unwrap(), None, "incomplete");
        b.extend(tail);
        assert_eq!(
            parse(&mut b).unwrap(),
            Some(Frame::Data {
                stream: 3,
                flags: FLAG_FIN,
                data: b"hello".to_vec()
            })
        );
        assert!(matches!(
            parse(&mut b).unwrap(),
            Some(Frame::Control { kind: PING, .. })
        ));
        assert!(b.is_empty());
        let mut bad = vec![0x80, 0x02, 0, 1, 0, 0, 0, 0];
        assert!(parse(&mut bad).is_err(), "SPDY/2");
        let mut huge = vec![0, 0, 0, 1, 0, 0xff, 0xff, 0xff];
        huge.resize(8, 0);
        assert!(
            parse(&mut huge).is_ok(),
            "16 MiB - 1 is allowed, waits for data"
        );
        let mut codec = HeaderCodec::default();
        assert!(codec.decode(b"\x78\x9c garbage").is_err());
        assert!(stream_of(&[1, 2]).is_err());
    }
}
