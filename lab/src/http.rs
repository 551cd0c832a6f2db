//! A minimal HTTP/1.1 client over std sockets, created inside lab namespaces: enough for
//! etcd's v3 JSON gateway and tracer's agent API, with keep-alive so a "startup" can make many
//! sequential requests on one connection, as calico-node's datastore client does.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::netns::Netns;
use crate::LabError;

/// Largest response the client accepts (agent answers with up to a few hundred flows).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, LabError> {
        serde_json::from_str(&self.body).map_err(|e| {
            LabError::Unexpected(format!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                truncate(&self.body, 300)
            ))
        })
    }
}

/// A keep-alive HTTP/1.1 connection. The socket is created inside a namespace and stays there.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    addr: SocketAddr,
    /// Bytes read past the end of the previous response.
    pending: Vec<u8>,
}

impl Connection {
    /// Connects from inside `ns` to `addr`; `timeout` bounds the connect and every later read
    /// and write.
    pub fn open(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<Connection, LabError> {
        let ctx = format!("connecting to {addr} from {}", ns.name());
        let stream = ns
            .run(move || -> std::io::Result<TcpStream> {
                let s = TcpStream::connect_timeout(&addr, timeout)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                // Requests are one write each; don't let Nagle hold them back.
                s.set_nodelay(true)?;
                Ok(s)
            })?
            .map_err(|e| LabError::io(ctx, e))?;
        Ok(Connection {
            stream,
            addr,
            pending: Vec::new(),
        })
    }

    /// Sends one request and reads its response. `body` is sent as `application/json`.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, LabError> {
        let (status, body) = self.exchange(method, path, body, &[])?;
        Ok(Response {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Like [`Connection::request`], with extra header lines (`Name: value`), the body as
    /// received.
    pub fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[&str],
    ) -> Result<(u16, Vec<u8>), LabError> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tracer-lab\r\nAccept: */*\r\n",
            self.addr
        );
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        let addr = self.addr;
        let ctx = |what: &str| format!("{what} {method} {path} to {addr}");
        self.stream
            .write_all(req.as_bytes())
            .map_err(|e| LabError::io(ctx("sending"), e))?;
        self.read_response()
            .map_err(|e| LabError::io(ctx("reading the response to"), e))
    }

    fn read_response(&mut self) -> std::io::Result<(u16, Vec<u8>)> {
        let mut buf = std::mem::take(&mut self.pending);
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            if buf.len() > 64 * 1024 {
                return Err(invalid("response header too large"));
            }
            self.fill(&mut buf)?;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut rest = buf.split_off(head_end + 4);
        let parsed = parse_head(&head)?;
        let body = match parsed.framing {
            Framing::Length(n) => {
                if n > MAX_BODY {
                    return Err(invalid("response body too large"));
                }
                while rest.len() < n {
                    self.fill(&mut rest)?;
                }
                self.pending = rest.split_off(n);
                rest
            }
            Framing::Chunked => {
                let mut body = Vec::new();
                loop {
                    let line_end = loop {
                        if let Some(i) = find(&rest, b"\r\n") {
                            break i;
                        }
                        self.fill(&mut rest)?;
                    };
                    let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
                    let size =
                        usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                            .map_err(|_| invalid("bad chunk size"))?;
                    if body.len() + size > MAX_BODY {
                        return Err(invalid("response body too large"));
                    }
                    // Chunk data plus its trailing CRLF.
                    while rest.len() < line_end + 2 + size + 2 {
                        self.fill(&mut rest)?;
                    }
                    body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
                    rest.drain(..line_end + 2 + size + 2);
                    if size == 0 {
                        // (Trailers are not used by the servers the lab talks to.)
                        break;
                    }
                }
                self.pending = rest;
                body
            }
            Framing::UntilClose => {
                loop {
                    match self.stream.read_to_end(&mut rest) {
                        Ok(_) => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
                rest
            }
        };
        Ok((parsed.status, body))
    }

    fn fill(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "connection closed mid-response",
                    ))
                }
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// One-shot GET from inside `ns`.
pub fn get(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Response, LabError> {
    Connection::open(ns, addr, timeout)?.request("GET", path, None)
}

/// One-shot POST of a JSON body from inside `ns`.
pub fn post(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<Response, LabError> {
    Connection::open(ns, addr, timeout)?.request("POST", path, Some(body))
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug)]
struct Head {
    status: u16,
    framing: Framing,
}

fn parse_head(head: &str) -> std::io::Result<Head> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(invalid("not an HTTP/1.x response"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status code"))?;
    let mut framing = Framing::UntilClose;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            framing = Framing::Chunked;
        } else if name == "content-length" && framing != Framing::Chunked {
            framing = Framing::Length(value.parse().map_err(|_| invalid("bad Content-Length"))?);
        }
    }
    // 1xx, 204 and 304 have no body whatever the headers say.
    if status / 100 == 1 || status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    Ok(Head { status, framing })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, msg.to_string())
}

/// `s` cut to at most `max` bytes (on a character boundary), `...` marking a cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Standard base64 with padding (etcd's JSON gateway encodes keys and values with it).
pub fn base64_encode(bytes: &[u8]) -> String {
    base64(
        bytes,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        true,
    )
}

/// Base64 with the given alphabet, `=`-padded or not.
pub fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` on invalid input.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u8> = s.trim().trim_end_matches('=').bytes().collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            (
                "/calico/v1/host/ce-demo-1",
                "L2NhbGljby92MS9ob3N0L2NlLWRlbW8tMQ==",
            ),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
            assert_eq!(base64_decode(enc).as_deref(), Some(plain.as_bytes()));
        }
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("Zm9*"), None);
    }

    #[test]
    fn parses_heads() -> std::io::Result<()> {
        let h =
            parse_head("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12")?;
        assert_eq!((h.status, h.framing), (200, Framing::Length(12)));
        let h = parse_head("HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked")?;
        assert_eq!((h.status, h.framing), (404, Framing::Chunked));
        let h = parse_head("HTTP/1.0 204 No Content\r\nContent-Length: 5")?;
        assert_eq!(h.framing, Framing::Length(0));
        assert!(parse_head("SSH-2.0-OpenSSH").is_err());
        Ok(())
    }
}
