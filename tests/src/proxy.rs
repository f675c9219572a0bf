//! A fault-injecting HTTP proxy for the S3-compatible test server, on 127.0.0.1: it forwards
//! each request on a new connection to the server, and can hold matching requests until the
//! test releases them (a slow or paused writer, without pausing the whole process), cut a
//! response body short, or reset the connection while a request body is being sent. It keeps
//! a log of the requests it saw.
//!
//! Plain HTTP/1.1 only (the tests reach moto with `--allow-http`), path-style keys
//! (`/BUCKET/KEY?QUERY`), bodies framed by `Content-Length` or chunked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What to do with a matching request.
#[derive(Clone, Debug)]
enum Action {
    /// Wait until the gate opens, then forward.
    Hold(Arc<Gate>),
    /// Forward, then send only the response head and this many body bytes, and close.
    CutResponse(usize),
    /// Forward, then answer with only this many bytes of the body, as a complete answer (a
    /// valid response whose content is cut: a listing whose XML stops half-way).
    TruncateBody(usize),
    /// Read this many bytes of the request body, then reset the connection.
    ResetDuringBody(usize),
}

#[derive(Debug)]
struct Rule {
    method: String,
    path_contains: String,
    action: Action,
    /// How many more requests it applies to.
    times: usize,
}

/// A held request's gate.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<(usize, bool)>, // (requests waiting, open)
    cv: Condvar,
}

/// A handle on requests held by [`Proxy::hold`].
#[derive(Clone, Debug)]
pub struct Hold(Arc<Gate>);

impl Hold {
    /// Waits until a matching request is being held (false after `timeout`).
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        let mut st = self.0.state.lock().unwrap();
        while st.0 == 0 {
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return false;
            }
            st = self.0.cv.wait_timeout(st, left).unwrap().0;
        }
        true
    }

    /// Lets every held request (and later matching ones) through.
    pub fn release(&self) {
        let mut st = self.0.state.lock().unwrap();
        st.1 = true;
        self.0.cv.notify_all();
    }
}

#[derive(Debug, Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<String>>,
    answered: Mutex<Vec<String>>,
}

/// The proxy; it stops accepting when dropped (held requests are released).
#[derive(Debug)]
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    holds: Mutex<Vec<Hold>>,
}

impl Proxy {
    /// Starts a proxy in front of the server on 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &s);
                });
            }
        });
        Proxy {
            port,
            shared,
            holds: Mutex::new(Vec::new()),
        }
    }

    /// The endpoint to give holdfast instead of the server's.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn add(&self, method: &str, path_contains: &str, action: Action, times: usize) {
        self.shared.rules.lock().unwrap().push(Rule {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            action,
            times,
        });
    }

    /// Holds every `method` request whose path (or small body) contains `path_contains` until
    /// released.
    pub fn hold(&self, method: &str, path_contains: &str) -> Hold {
        self.hold_times(method, path_contains, usize::MAX)
    }

    /// Holds the next `times` such requests until released (later ones go through).
    pub fn hold_times(&self, method: &str, path_contains: &str, times: usize) -> Hold {
        let gate = Arc::new(Gate::default());
        self.add(method, path_contains, Action::Hold(gate.clone()), times);
        let h = Hold(gate);
        self.holds.lock().unwrap().push(h.clone());
        h
    }

    /// The next `times` matching requests get only `bytes` bytes of their response body.
    pub fn cut_response(&self, method: &str, path_contains: &str, bytes: usize, times: usize) {
        self.add(method, path_contains, Action::CutResponse(bytes), times);
    }

    /// The next `times` matching requests get a complete answer of only `bytes` bytes of
    /// their body (well-formed HTTP, malformed content).
    pub fn truncate_body(&self, method: &str, path_contains: &str, bytes: usize, times: usize) {
        self.add(method, path_contains, Action::TruncateBody(bytes), times);
    }

    /// The next `times` matching requests are reset after `bytes` bytes of their body.
    pub fn reset_during_body(&self, method: &str, path_contains: &str, bytes: usize, times: usize) {
        self.add(method, path_contains, Action::ResetDuringBody(bytes), times);
    }

    /// Every request seen so far, as "METHOD PATH".
    pub fn requests(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The requests the upstream answered, as "METHOD PATH STATUS" (a held request appears
    /// once it was let through and answered, whether or not its client is still there).
    pub fn answered(&self) -> Vec<String> {
        self.shared.answered.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for h in self.holds.lock().unwrap().iter() {
            h.release();
        }
    }
}

/// One request or response head: the first line and the headers.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn read(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
        let mut first = String::new();
        if r.read_line(&mut first)? == 0 {
            return Ok(None);
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ok(Some(Head {
            first: first.trim_end().to_string(),
            headers,
        }))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }

    fn encode(&self, connection_close: bool) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first);
        for (k, v) in &self.headers {
            if k.eq_ignore_ascii_case("connection") {
                continue;
            }
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if connection_close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Reads a body framed by `head` (the whole of it).
fn read_body(r: &mut impl BufRead, head: &Head, limit: Option<usize>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.chunked() {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            chunk.truncate(size);
            body.extend_from_slice(&chunk);
            if limit.is_some_and(|l| body.len() >= l) {
                return Ok(body);
            }
        }
        // Re-framed with a length for the server.
        return Ok(body);
    }
    let len: usize = head
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let want = limit.map_or(len, |l| l.min(len));
    body.resize(want, 0);
    r.read_exact(&mut body)?;
    Ok(body)
}

fn serve(client: TcpStream, upstream: u16, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client_w = client;
    loop {
        let Some(mut head) = Head::read(&mut reader)? else {
            return Ok(());
        };
        let mut parts = head.first.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        shared.log.lock().unwrap().push(format!("{method} {path}"));
        // A rule matches the path, or the body of a small request (S3's batch delete names
        // its keys in an XML body).
        let take = |body: Option<&[u8]>, reset: bool| {
            let text = body.map(String::from_utf8_lossy).unwrap_or_default();
            let mut rules = shared.rules.lock().unwrap();
            rules
                .iter_mut()
                .find(|r| {
                    r.times > 0
                        && r.method == method
                        && matches!(r.action, Action::ResetDuringBody(_)) == reset
                        && (path.contains(&r.path_contains) || text.contains(&r.path_contains))
                })
                .map(|r| {
                    r.times -= 1;
                    r.action.clone()
                })
        };
        if let Some(Action::ResetDuringBody(n)) = take(None, true) {
            let _ = read_body(&mut reader, &head, Some(n));
            let _ = client_w.shutdown(Shutdown::Both);
            return Ok(());
        }
        let body = read_body(&mut reader, &head, None)?;
        let action = take((body.len() < 1 << 20).then_some(&body[..]), false);
        if head.chunked() {
            head.headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case("transfer-encoding"));
            head.headers
                .push(("Content-Length".into(), body.len().to_string()));
        }
        if let Some(Action::Hold(gate)) = &action {
            let mut st = gate.state.lock().unwrap();
            st.0 += 1;
            gate.cv.notify_all();
            while !st.1 {
                st = gate.cv.wait(st).unwrap();
            }
        }
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        up.write_all(&head.encode(true))?;
        up.write_all(&body)?;
        let mut up_r = BufReader::new(up);
        let Some(resp) = Head::read(&mut up_r)? else {
            return Ok(());
        };
        let status: u16 = resp
            .first
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        shared
            .answered
            .lock()
            .unwrap()
            .push(format!("{method} {path} {status}"));
        let no_body = method == "HEAD" || status == 204 || status == 304 || status < 200;
        let framed = resp.chunked() || resp.get("content-length").is_some();
        let resp_body = if no_body {
            Vec::new()
        } else if framed {
            read_body(&mut up_r, &resp, None)?
        } else {
            let mut b = Vec::new();
            up_r.read_to_end(&mut b)?;
            b
        };
        let mut resp = resp;
        if resp.chunked() {
            resp.headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case("transfer-encoding"));
            resp.headers
                .push(("Content-Length".into(), resp_body.len().to_string()));
        } else if !framed && !no_body {
            resp.headers
                .push(("Content-Length".into(), resp_body.len().to_string()));
        }
        if let Some(Action::TruncateBody(n)) = action {
            let n = n.min(resp_body.len());
            resp.headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case("content-length"));
            resp.headers.push(("Content-Length".into(), n.to_string()));
            client_w.write_all(&resp.encode(false))?;
            client_w.write_all(&resp_body[..n])?;
            continue;
        }
        if let Some(Action::CutResponse(n)) = action {
            client_w.write_all(&resp.encode(true))?;
            client_w.write_all(&resp_body[..n.min(resp_body.len())])?;
            let _ = client_w.shutdown(Shutdown::Both);
            return Ok(());
        }
        client_w.write_all(&resp.encode(false))?;
        client_w.write_all(&resp_body)?;
    }
}
