//! A small NBD client: the fixed newstyle handshake, structured replies, `NBD_OPT_GO`, meta
//! contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`), pipelined `NBD_CMD_READ`,
//! `NBD_CMD_BLOCK_STATUS`, and for restores `NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES` and
//! `NBD_CMD_FLUSH`. It follows the protocol document of the NBD project
//! (`doc/proto.md`); QEMU, qemu-storage-daemon, nbdkit and the kernel's nbd-server speak it.
//!
//! Why our own: the `nbd` crate has neither structured replies nor block status, and the
//! `libnbd` crate needs a newer libnbd than Debian 12 ships. The client is synchronous: a
//! snapshot reads a segment at a time, sends all of the segment's requests at once (many in
//! flight) and then collects the replies, in whatever order the server sends them.
//!
//! The server is not trusted: every length is bounded before anything is allocated, every
//! reply must answer a request in flight and stay inside it, a read must be covered exactly
//! once, and extents must be contiguous and inside the export. A server that breaks the
//! protocol is reported as corrupt data (exit 6) naming what it sent; one that cannot be
//! reached, drops the connection or stops answering is unavailable (exit 7).

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
const REPLY_ERROR_BIT: u16 = 1 << 15;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag.
pub const STATE_DIRTY: u32 = 1;

/// The largest read or write request sent, whatever the server allows.
const MAX_REQUEST: u32 = 4 << 20;
/// Requests in flight at once.
const MAX_IN_FLIGHT: usize = 16;
/// The largest option reply or error message accepted from a server.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The largest block-status reply accepted (8 bytes per extent).
const MAX_STATUS_REPLY: u32 = 8 << 20;
/// How long a server may take to answer before the connection counts as lost.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Where an NBD export is: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`;
/// `nbds://` and `nbds+unix://` with `tls-ca=PATH` (and `tls-hostname=NAME`) for TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
    /// `nbds://` and `nbds+unix://`: TLS after `NBD_OPT_STARTTLS`, never plaintext.
    pub tls: Option<NbdTls>,
}

/// How to check the server of an `nbds://` export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdTls {
    /// PEM certificates to trust (`tls-ca=PATH`): a CA, or the server's self-signed one.
    pub ca: PathBuf,
    /// The name the certificate must carry (`tls-hostname=NAME`; default: the host).
    pub hostname: String,
    /// A client certificate and key, for servers that ask for one (`tls-cert=` and
    /// `tls-key=`; QEMU's `tls-creds-x509` does unless `verify-peer=off`).
    pub client: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix { socket: PathBuf },
}

/// A file whose contents decide what is trusted (the CA of an `nbds://` export) must not be
/// writable by anyone but its owner, who must be this user or root.
fn check_trusted_file(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let me = rustix::process::getuid().as_raw();
    if meta.mode() & 0o022 != 0 || (meta.uid() != me && meta.uid() != 0) {
        return Err(Error::invalid(format!(
            "{} may be changed by other users (mode {:o}, owner {}): anyone who can write it \
             chooses which servers are trusted; make it owned by you or root and `chmod go-w` it",
            path.display(),
            meta.mode() & 0o7777,
            meta.uid()
        )));
    }
    Ok(())
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.tls.is_some() { "s" } else { "" };
        match &self.addr {
            NbdAddr::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export),
            NbdAddr::Unix { socket } => {
                write!(
                    f,
                    "nbd{s}+unix:///{}?socket={}",
                    self.export,
                    socket.display()
                )
            }
        }
    }
}

impl FromStr for NbdUri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid(format!(
                "invalid NBD URI {s:?}: {why}; use nbd://HOST[:PORT]/EXPORT or \
                 nbd+unix:///EXPORT?socket=/path/to/socket"
            ))
        };
        let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
            return Err(bad("user names, passwords and fragments are not accepted"));
        }
        let export = percent_decode(url.path().strip_prefix('/').unwrap_or(url.path()))
            .ok_or_else(|| bad("the export name is not UTF-8"))?;
        if export.len() > 4096 || export.chars().any(char::is_control) {
            return Err(bad(
                "the export name is too long or holds control characters",
            ));
        }
        let (mut socket, mut ca, mut tls_host) = (None, None, None);
        let (mut cert, mut key) = (None, None);
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "socket" if socket.is_none() => socket = Some(PathBuf::from(v.as_ref())),
                "tls-ca" if ca.is_none() => ca = Some(PathBuf::from(v.as_ref())),
                "tls-cert" if cert.is_none() => cert = Some(PathBuf::from(v.as_ref())),
                "tls-key" if key.is_none() => key = Some(PathBuf::from(v.as_ref())),
                "tls-hostname" if tls_host.is_none() => tls_host = Some(v.into_owned()),
                other => return Err(bad(&format!("unknown or repeated parameter {other:?}"))),
            }
        }
        let tls_wanted = url.scheme().starts_with("nbds");
        if !tls_wanted && (ca.is_some() || tls_host.is_some() || cert.is_some() || key.is_some()) {
            return Err(bad("tls-* parameters belong to nbds:// and nbds+unix://"));
        }
        let client = match (cert, key) {
            (None, None) => None,
            (Some(c), Some(k)) if c.is_absolute() && k.is_absolute() => Some((c, k)),
            _ => return Err(bad("tls-cert and tls-key go together, as absolute paths")),
        };
        let scheme = url.scheme().replace("nbds", "nbd");
        let addr = match scheme.as_str() {
            "nbd" => {
                if socket.is_some() {
                    return Err(bad("socket= belongs to nbd+unix://"));
                }
                let host = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| bad("no host"))?;
                NbdAddr::Tcp {
                    host: host.trim_matches(['[', ']']).to_string(),
                    port: url.port().unwrap_or(10809),
                }
            }
            "nbd+unix" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) || url.port().is_some() {
                    return Err(bad("nbd+unix:// takes no host; the socket is socket=PATH"));
                }
                let socket = socket.ok_or_else(|| bad("socket=PATH is missing"))?;
                if !socket.is_absolute() {
                    return Err(bad("the socket path must be absolute"));
                }
                NbdAddr::Unix { socket }
            }
            _ => return Err(bad(&format!("unknown scheme {:?}", url.scheme()))),
        };
        let tls = if tls_wanted {
            let ca = ca.ok_or_else(|| {
                bad("nbds:// needs tls-ca=PATH, the PEM certificates to trust for the server")
            })?;
            if !ca.is_absolute() {
                return Err(bad("the tls-ca path must be absolute"));
            }
            let hostname = match (&addr, tls_host) {
                (_, Some(h)) => h,
                (NbdAddr::Tcp { host, .. }, None) => host.clone(),
                (NbdAddr::Unix { .. }, None) => {
                    return Err(bad(
                        "nbds+unix:// needs tls-hostname=NAME, the name in the server's certificate",
                    ));
                }
            };
            Some(NbdTls {
                ca,
                hostname,
                client,
            })
        } else {
            None
        };
        Ok(NbdUri { addr, export, tls })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
}

/// TLS runs over the deadline-checked transport, so that a server trickling a record a byte
/// at a time is bounded too (rustls reads until a whole record is in).
type TlsStream = rustls::StreamOwned<rustls::ClientConnection, Timed>;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// After `NBD_OPT_STARTTLS`: both halves of the connection share the TLS session (the
    /// client does one thing at a time, so the lock is never contended).
    Tls(std::sync::Arc<std::sync::Mutex<TlsStream>>),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.clone()),
        })
    }
}

fn tls_lock(s: &std::sync::Mutex<TlsStream>) -> std::sync::MutexGuard<'_, TlsStream> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => tls_lock(s).read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => tls_lock(s).write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => tls_lock(s).flush(),
        }
    }
}

/// The reading side of a connection: every read fails once the current operation's deadline
/// has passed, so a server that trickles a byte at a time, or floods replies nobody asked for,
/// cannot hold a snapshot forever (the socket's own timeout only bounds each silence).
struct Timed {
    inner: Stream,
    deadline: std::sync::Arc<std::sync::Mutex<std::time::Instant>>,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let deadline = *self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the operation's deadline passed",
            ));
        }
        self.inner.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// How long one operation (the handshake, a batch of reads, a block-status query) may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(600);

/// An extent of a meta context: `len` bytes with `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

impl Extent {
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.len
    }
}

/// A connection to one export, after the handshake.
pub struct Client {
    uri: String,
    reader: BufReader<Timed>,
    writer: BufWriter<Stream>,
    deadline: std::sync::Arc<std::sync::Mutex<std::time::Instant>>,
    /// Over TLS without a client certificate (a server that wants one hangs up later).
    no_client_cert: bool,
    size: u64,
    flags: u16,
    max_request: u32,
    /// Negotiated meta contexts: id → name.
    contexts: HashMap<u32, String>,
    next_cookie: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Status,
    Command,
}

/// What a request in flight expects back.
struct InFlight {
    kind: Kind,
    offset: u64,
    len: u32,
    /// For reads: where the data goes in the caller's buffer.
    at: usize,
    /// For reads: the pieces covered so far (offset within the request, length).
    covered: Vec<(u32, u32)>,
}

impl Client {
    /// Connects and negotiates: structured replies, the given meta contexts (all must be
    /// offered by the server), then `NBD_OPT_GO`.
    pub fn connect(uri: &NbdUri, contexts: &[&str]) -> Result<Client> {
        let name = uri.to_string();
        let unreachable = |e: std::io::Error| {
            Error::unavailable_msg(format!(
                "cannot reach the NBD server at {name}: {e}; is it running?"
            ))
        };
        let stream = match &uri.addr {
            NbdAddr::Tcp { host, port } => {
                use std::net::ToSocketAddrs;
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(unreachable)?
                    .collect();
                let mut last = None;
                let mut ok = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                        Ok(s) => {
                            ok = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = ok.ok_or_else(|| {
                    unreachable(last.unwrap_or_else(|| std::io::Error::other("no address")))
                })?;
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(TIMEOUT)).map_err(unreachable)?;
                s.set_write_timeout(Some(TIMEOUT)).map_err(unreachable)?;
                Stream::Tcp(s)
            }
            NbdAddr::Unix { socket } => {
                let s = UnixStream::connect(socket).map_err(unreachable)?;
                s.set_read_timeout(Some(TIMEOUT)).map_err(unreachable)?;
                s.set_write_timeout(Some(TIMEOUT)).map_err(unreachable)?;
                Stream::Unix(s)
            }
        };
        let writer = stream.try_clone().map_err(unreachable)?;
        let deadline = std::sync::Arc::new(std::sync::Mutex::new(
            std::time::Instant::now() + OPERATION_TIMEOUT,
        ));
        let mut c = Client {
            uri: name,
            reader: BufReader::with_capacity(
                256 << 10,
                Timed {
                    inner: stream,
                    deadline: deadline.clone(),
                },
            ),
            writer: BufWriter::with_capacity(64 << 10, writer),
            deadline,
            no_client_cert: false,
            size: 0,
            flags: 0,
            max_request: MAX_REQUEST,
            contexts: HashMap::new(),
            next_cookie: 1,
        };
        c.handshake(&uri.export, contexts, uri.tls.as_ref())?;
        Ok(c)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    /// The id the server gave the meta context `name`.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| *id)
    }

    fn lost(&self, e: std::io::Error) -> Error {
        let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "closed the connection".to_string()
        } else if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            format!(
                "did not answer in time ({} s of silence, or {} s for one operation)",
                TIMEOUT.as_secs(),
                OPERATION_TIMEOUT.as_secs()
            )
        } else {
            format!("connection failed: {e}")
        };
        let hint = if self.no_client_cert {
            " (if the server requires a client certificate, give tls-cert and tls-key)"
        } else {
            ""
        };
        Error::unavailable_msg(format!(
            "the NBD server at {} {what}{hint}; nothing was committed",
            self.uri
        ))
    }

    fn protocol(&self, what: impl std::fmt::Display) -> Error {
        Error::corrupt(format!(
            "the NBD server at {} broke the protocol: {what}; nothing was committed",
            self.uri
        ))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.reader.read_exact(buf).map_err(|e| self.lost(e))
    }

    fn u16(&mut self) -> Result<u16> {
        let mut b = [0; 2];
        self.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        let mut buf = [0u8; 4096];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes).map_err(|e| self.lost(e))
    }

    fn flush_out(&mut self) -> Result<()> {
        self.writer.flush().map_err(|e| self.lost(e))
    }

    fn handshake(&mut self, export: &str, contexts: &[&str], tls: Option<&NbdTls>) -> Result<()> {
        if self.u64()? != NBDMAGIC {
            return Err(self.protocol("its greeting is not NBD's (is this an NBD server?)"));
        }
        let second = self.u64()?;
        if second != IHAVEOPT {
            return Err(self.protocol(
                "it speaks the old-style handshake only, which has no export names or block \
                 status; use a newer server",
            ));
        }
        let hflags = self.u16()?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("it does not offer the fixed newstyle handshake"));
        }
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = (FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 }) as u32;
        self.send(&cflags.to_be_bytes())?;
        if let Some(tls) = tls {
            self.start_tls(tls)?;
        }

        // Structured replies: needed for block status and for reads that tell holes.
        self.option(OPT_STRUCTURED_REPLY, &[])?;
        match self.option_reply(OPT_STRUCTURED_REPLY)? {
            (REP_ACK, _) => {}
            (REP_ERR_TLS_REQD, _) => return Err(self.tls_required()),
            (t, _) => {
                return Err(Error::unavailable_msg(format!(
                    "the NBD server at {} does not offer structured replies (reply {t:#x}), \
                         which holdfast needs to tell holes; use a newer server",
                    self.uri
                )));
            }
        }

        if !contexts.is_empty() {
            let mut data = Vec::new();
            data.extend_from_slice(&(export.len() as u32).to_be_bytes());
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                data.extend_from_slice(&(q.len() as u32).to_be_bytes());
                data.extend_from_slice(q.as_bytes());
            }
            self.option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                match self.option_reply(OPT_SET_META_CONTEXT)? {
                    (REP_META_CONTEXT, d) => {
                        if d.len() < 5 {
                            return Err(self.protocol("a meta context reply shorter than 5 bytes"));
                        }
                        let id = u32::from_be_bytes(d[..4].try_into().expect("4 bytes"));
                        let name = String::from_utf8_lossy(&d[4..]).into_owned();
                        if !contexts.contains(&name.as_str()) {
                            return Err(self.protocol(format!(
                                "a meta context {name:?} that was not asked for"
                            )));
                        }
                        if self.contexts.insert(id, name).is_some() {
                            return Err(self.protocol("two meta contexts with one id"));
                        }
                    }
                    (REP_ACK, _) => break,
                    (REP_ERR_UNKNOWN, _) => return Err(self.no_export(export)),
                    (REP_ERR_TLS_REQD, _) => return Err(self.tls_required()),
                    (t, d) => {
                        return Err(Error::unavailable_msg(format!(
                            "the NBD server at {} refused the meta contexts {contexts:?} \
                                 (reply {t:#x}: {})",
                            self.uri,
                            String::from_utf8_lossy(&d)
                        )));
                    }
                }
            }
            for q in contexts {
                if self.context_id(q).is_none() {
                    return Err(Error::not_found(format!(
                        "the NBD server at {} has no meta context {q:?} for export {export:?}{}",
                        self.uri,
                        if q.starts_with("qemu:dirty-bitmap:") {
                            " (the bitmap does not exist or is not exported)"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }

        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.option(OPT_GO, &data)?;
        let mut have_export = false;
        loop {
            match self.option_reply(OPT_GO)? {
                (REP_INFO, d) => {
                    if d.len() < 2 {
                        return Err(self.protocol("an info reply shorter than 2 bytes"));
                    }
                    let kind = u16::from_be_bytes([d[0], d[1]]);
                    match kind {
                        INFO_EXPORT if d.len() == 12 => {
                            self.size = u64::from_be_bytes(d[2..10].try_into().expect("8"));
                            self.flags = u16::from_be_bytes([d[10], d[11]]);
                            have_export = true;
                        }
                        INFO_BLOCK_SIZE if d.len() == 14 => {
                            let max = u32::from_be_bytes(d[10..14].try_into().expect("4"));
                            if max >= 4096 {
                                self.max_request = max.min(MAX_REQUEST) & !4095;
                            }
                        }
                        INFO_EXPORT | INFO_BLOCK_SIZE => {
                            return Err(self.protocol(format!(
                                "an info reply of type {kind} with {} bytes",
                                d.len()
                            )));
                        }
                        _ => {}
                    }
                }
                (REP_ACK, _) => break,
                (REP_ERR_UNKNOWN, _) => return Err(self.no_export(export)),
                (REP_ERR_TLS_REQD, _) => return Err(self.tls_required()),
                (REP_ERR_UNSUP, _) => {
                    return Err(Error::unavailable_msg(format!(
                        "the NBD server at {} does not support NBD_OPT_GO; use a newer server",
                        self.uri
                    )));
                }
                (t, d) => {
                    return Err(Error::unavailable_msg(format!(
                        "the NBD server at {} refused export {export:?} (reply {t:#x}: {})",
                        self.uri,
                        String::from_utf8_lossy(&d)
                    )));
                }
            }
        }
        if !have_export {
            return Err(self.protocol("NBD_OPT_GO ended without the export's size"));
        }
        Ok(())
    }

    /// `NBD_OPT_STARTTLS`, then a TLS session on the same connection, checked against the
    /// trusted certificates. A server that does not offer TLS is refused: no plaintext
    /// fallback for an `nbds://` export.
    fn start_tls(&mut self, tls: &NbdTls) -> Result<()> {
        self.option(OPT_STARTTLS, &[])?;
        match self.option_reply(OPT_STARTTLS)? {
            (REP_ACK, _) => {}
            (t, d) => {
                return Err(Error::unavailable_msg(format!(
                    "the NBD server at {} does not offer TLS (reply {t:#x}: {}); holdfast does \
                     not fall back to plaintext for nbds://",
                    self.uri,
                    String::from_utf8_lossy(&d)
                )));
            }
        }
        if !self.reader.buffer().is_empty() {
            return Err(self.protocol("data before the TLS handshake"));
        }
        check_trusted_file(&tls.ca)?;
        let certs: Vec<rustls_pki_types::CertificateDer<'static>> = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::pem_file_iter(&tls.ca)
                .and_then(|it| it.collect())
                .map_err(|e| {
                    Error::invalid(format!(
                        "reading certificates from {}: {e}",
                        tls.ca.display()
                    ))
                })?
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots.add(c).map_err(|e| {
                Error::invalid(format!("a certificate in {}: {e}", tls.ca.display()))
            })?;
        }
        if roots.is_empty() {
            return Err(Error::invalid(format!(
                "{} holds no PEM certificate",
                tls.ca.display()
            )));
        }
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
        let cfg = match &tls.client {
            None => cfg.with_no_client_auth(),
            Some((cert, key)) => {
                use rustls_pki_types::pem::PemObject;
                let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
                    rustls_pki_types::CertificateDer::pem_file_iter(cert)
                        .and_then(|it| it.collect())
                        .map_err(|e| Error::invalid(format!("reading {}: {e}", cert.display())))?;
                crate::state::check_private(key, "the NBD client's TLS key")?;
                let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    Error::invalid(format!("reading the key {}: {e}", key.display()))
                })?;
                cfg.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::invalid(format!("the client certificate {}: {e}", cert.display()))
                })?
            }
        };
        let name = rustls_pki_types::ServerName::try_from(tls.hostname.clone())
            .map_err(|e| Error::invalid(format!("tls-hostname {:?}: {e}", tls.hostname)))?;
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name)
            .map_err(|e| Error::internal(format!("TLS setup: {e}")))?;
        self.flush_out()?;
        let transport = Timed {
            inner: self
                .writer
                .get_ref()
                .try_clone()
                .map_err(|e| self.lost(e))?,
            deadline: self.deadline.clone(),
        };
        let mut session = rustls::StreamOwned::new(conn, transport);
        // Completes the handshake now, so that a certificate problem is named as one.
        while session.conn.is_handshaking() {
            session.conn.complete_io(&mut session.sock).map_err(|e| {
                Error::unavailable_msg(format!(
                    "TLS with the NBD server at {} failed: {e}",
                    self.uri
                ))
            })?;
        }
        self.no_client_cert = tls.client.is_none();
        let shared = std::sync::Arc::new(std::sync::Mutex::new(session));
        self.writer = BufWriter::with_capacity(64 << 10, Stream::Tls(shared.clone()));
        self.reader = BufReader::with_capacity(
            256 << 10,
            Timed {
                inner: Stream::Tls(shared),
                deadline: self.deadline.clone(),
            },
        );
        Ok(())
    }

    fn no_export(&self, export: &str) -> Error {
        Error::not_found(format!(
            "the NBD server at {} has no export named {export:?}",
            self.uri
        ))
    }

    fn tls_required(&self) -> Error {
        Error::unavailable_msg(format!(
            "the NBD server at {} requires TLS; use nbds:// (or nbds+unix://) with \
             tls-ca=PATH",
            self.uri
        ))
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)?;
        self.flush_out()
    }

    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        if self.u64()? != REPLY_MAGIC {
            return Err(self.protocol("an option reply without its magic"));
        }
        let got = self.u32()?;
        if got != opt {
            return Err(self.protocol(format!("a reply to option {got} when {opt} was asked")));
        }
        let kind = self.u32()?;
        let len = self.u32()?;
        if len > MAX_OPTION_REPLY {
            return Err(self.protocol(format!("an option reply of {len} bytes")));
        }
        let mut d = vec![0; len as usize];
        self.read_exact(&mut d)?;
        Ok((kind, d))
    }

    fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Result<()> {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        self.send(&b)
    }

    /// Starts the clock of one operation.
    fn start(&self) {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) =
            std::time::Instant::now() + OPERATION_TIMEOUT;
    }

    fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::internal(format!(
                "an NBD request past the end of {} ({offset}+{len} > {})",
                self.uri, self.size
            )));
        }
        Ok(())
    }

    /// Reads `ranges` (absolute offsets, inside `base .. base + buf.len()`) into the matching
    /// parts of `buf`, many requests in flight. Parts of `buf` outside `ranges` are left as
    /// they are; holes the server reports read as zeros.
    pub fn read_ranges(&mut self, base: u64, buf: &mut [u8], ranges: &[Range<u64>]) -> Result<()> {
        let mut pieces = Vec::new();
        for r in ranges {
            if r.start < base || r.end > base + buf.len() as u64 || r.start > r.end {
                return Err(Error::internal("an NBD read outside its buffer"));
            }
            self.pieces(r, (r.start - base) as usize, &mut pieces)?;
        }
        self.read_pieces(&pieces, buf)
    }

    /// Reads `ranges` one after the other into `buf` (as long as they are together).
    pub fn read_gather(&mut self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<()> {
        let mut pieces = Vec::new();
        let mut at = 0usize;
        for r in ranges {
            self.pieces(r, at, &mut pieces)?;
            at += (r.end - r.start) as usize;
        }
        if at != buf.len() {
            return Err(Error::internal(
                "an NBD gather read into a buffer of another size",
            ));
        }
        self.read_pieces(&pieces, buf)
    }

    /// Splits a read of `r` into requests the server takes; the data goes to `buf[at..]`.
    fn pieces(&self, r: &Range<u64>, at: usize, out: &mut Vec<(u64, u32, usize)>) -> Result<()> {
        if r.start > r.end {
            return Err(Error::internal("an NBD read of a reversed range"));
        }
        self.check_range(r.start, r.end - r.start)?;
        let mut off = r.start;
        while off < r.end {
            let len = (r.end - off).min(self.max_request as u64);
            out.push((off, len as u32, at + (off - r.start) as usize));
            off += len;
        }
        Ok(())
    }

    /// Sends the reads `(offset, length, position in buf)`, many in flight, and places what
    /// comes back.
    fn read_pieces(&mut self, pieces: &[(u64, u32, usize)], buf: &mut [u8]) -> Result<()> {
        self.start();
        self.pipeline(pieces, Some(buf), |c, &(offset, len, at)| {
            let cookie = c.cookie();
            c.request(CMD_READ, 0, cookie, offset, len)?;
            Ok((
                cookie,
                InFlight {
                    kind: Kind::Read,
                    offset,
                    len,
                    at,
                    covered: Vec::new(),
                },
            ))
        })
    }

    /// Sends one request per item (with `send`, which returns its cookie and what it expects),
    /// at most [`MAX_IN_FLIGHT`] waiting at once, and reads the replies as they come.
    fn pipeline<T>(
        &mut self,
        items: &[T],
        mut buf: Option<&mut [u8]>,
        mut send: impl FnMut(&mut Self, &T) -> Result<(u64, InFlight)>,
    ) -> Result<()> {
        let mut next = 0;
        let mut flight: HashMap<u64, InFlight> = HashMap::new();
        while next < items.len() || !flight.is_empty() {
            let mut sent = false;
            while next < items.len() && flight.len() < MAX_IN_FLIGHT {
                let (cookie, expect) = send(self, &items[next])?;
                flight.insert(cookie, expect);
                next += 1;
                sent = true;
            }
            if sent {
                self.flush_out()?;
            }
            self.read_reply(&mut flight, buf.as_deref_mut(), None)?;
        }
        Ok(())
    }

    /// The extents of every negotiated meta context over `range`, from one
    /// `NBD_CMD_BLOCK_STATUS` (the server may describe less than the range, never less than
    /// one extent per context, and never past the end of the export).
    pub fn block_status(&mut self, range: Range<u64>) -> Result<HashMap<u32, Vec<Extent>>> {
        self.start();
        if self.contexts.is_empty() {
            return Err(Error::internal("block status without a meta context"));
        }
        let len = (range.end - range.start).min(u32::MAX as u64 & !0xffff) as u32;
        self.check_range(range.start, len as u64)?;
        let cookie = self.cookie();
        self.request(CMD_BLOCK_STATUS, 0, cookie, range.start, len)?;
        self.flush_out()?;
        let mut flight = HashMap::from([(
            cookie,
            InFlight {
                kind: Kind::Status,
                offset: range.start,
                len,
                at: 0,
                covered: Vec::new(),
            },
        )]);
        let mut out = HashMap::new();
        while !flight.is_empty() {
            self.read_reply(&mut flight, None, Some(&mut out))?;
        }
        for id in self.contexts.keys() {
            if !out.contains_key(id) {
                return Err(self.protocol(format!(
                    "block status without extents for {:?}",
                    self.contexts[id]
                )));
            }
        }
        Ok(out)
    }

    /// Reads one reply chunk and applies it to the request it answers.
    fn read_reply(
        &mut self,
        flight: &mut HashMap<u64, InFlight>,
        buf: Option<&mut [u8]>,
        status: Option<&mut HashMap<u32, Vec<Extent>>>,
    ) -> Result<()> {
        let magic = self.u32()?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let err = self.u32()?;
                let cookie = self.u64()?;
                let Some(req) = flight.remove(&cookie) else {
                    return Err(self.protocol(format!("a reply to request {cookie} not in flight")));
                };
                if err != 0 {
                    return Err(self.server_error(err, "", req.offset));
                }
                match (req.kind, buf) {
                    (Kind::Read, Some(buf)) => {
                        let at = req.at;
                        self.read_exact(&mut buf[at..at + req.len as usize])?;
                    }
                    (Kind::Command, _) => {}
                    _ => {
                        return Err(self.protocol(
                            "a simple reply to block status, which needs a structured one",
                        ));
                    }
                }
                Ok(())
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.u16()?;
                let kind = self.u16()?;
                let cookie = self.u64()?;
                let len = self.u32()?;
                let Some(req) = flight.get_mut(&cookie) else {
                    return Err(self.protocol(format!("a reply to request {cookie} not in flight")));
                };
                let (req_off, req_len, req_kind) = (req.offset, req.len, req.kind);
                match kind {
                    REPLY_NONE => {
                        if len != 0 {
                            return Err(self.protocol("a NONE reply with a payload"));
                        }
                    }
                    REPLY_OFFSET_DATA | REPLY_OFFSET_HOLE => {
                        let (Kind::Read, Some(buf)) = (req_kind, buf) else {
                            return Err(self.protocol("data in answer to something not a read"));
                        };
                        let (off, n) = if kind == REPLY_OFFSET_DATA {
                            if !(8..=req_len as u64 + 8).contains(&(len as u64)) {
                                return Err(self.protocol(format!("a data chunk of {len} bytes")));
                            }
                            (self.u64()?, len - 8)
                        } else {
                            if len != 12 {
                                return Err(self.protocol("a hole chunk that is not 12 bytes"));
                            }
                            (self.u64()?, self.u32()?)
                        };
                        // (An offset near 2^64 must not wrap past the check.)
                        if n == 0
                            || off < req_off
                            || off
                                .checked_add(u64::from(n))
                                .is_none_or(|end| end > req_off + req_len as u64)
                        {
                            return Err(self.protocol(format!(
                                "a chunk at {off}+{n} outside the request {req_off}+{req_len}"
                            )));
                        }
                        let rel = (off - req_off) as u32;
                        let req = flight.get_mut(&cookie).expect("present");
                        req.covered.push((rel, n));
                        let at = req.at + rel as usize;
                        let dst = &mut buf[at..at + n as usize];
                        if kind == REPLY_OFFSET_DATA {
                            self.read_exact(dst)?;
                        } else {
                            dst.fill(0);
                        }
                    }
                    REPLY_BLOCK_STATUS => {
                        let (Kind::Status, Some(status)) = (req_kind, status) else {
                            return Err(self.protocol("block status in answer to another request"));
                        };
                        if !(12..=MAX_STATUS_REPLY).contains(&len) || !(len - 4).is_multiple_of(8) {
                            return Err(self.protocol(format!("a block status of {len} bytes")));
                        }
                        let id = self.u32()?;
                        if !self.contexts.contains_key(&id) {
                            return Err(self.protocol(format!("block status for context {id}")));
                        }
                        let mut at = req_off;
                        let mut extents = Vec::with_capacity(((len - 4) / 8) as usize);
                        for _ in 0..(len - 4) / 8 {
                            let n = self.u32()? as u64;
                            let flags = self.u32()?;
                            if n == 0 || at + n > self.size {
                                return Err(self.protocol(format!(
                                    "an extent at {at}+{n} (empty, or past the end at {})",
                                    self.size
                                )));
                            }
                            extents.push(Extent {
                                offset: at,
                                len: n,
                                flags,
                            });
                            at += n;
                        }
                        if status.insert(id, extents).is_some() {
                            return Err(self.protocol("two block status chunks for one context"));
                        }
                    }
                    k if k & REPLY_ERROR_BIT != 0 => {
                        if !(6..=MAX_OPTION_REPLY).contains(&len) {
                            return Err(self.protocol(format!("an error chunk of {len} bytes")));
                        }
                        let err = self.u32()?;
                        let mlen = self.u16()? as u32;
                        if 6 + mlen > len {
                            return Err(self.protocol("an error message longer than its chunk"));
                        }
                        let mut m = vec![0; mlen as usize];
                        self.read_exact(&mut m)?;
                        self.skip((len - 6 - mlen) as u64)?;
                        return Err(self.server_error(err, &String::from_utf8_lossy(&m), req_off));
                    }
                    k => {
                        // Unknown non-error chunk types must be ignored, says the protocol.
                        if len > MAX_STATUS_REPLY {
                            return Err(self.protocol(format!("a chunk of type {k}, {len} bytes")));
                        }
                        self.skip(len as u64)?;
                    }
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    let req = flight.remove(&cookie).expect("present");
                    if req.kind == Kind::Read {
                        let mut c = req.covered;
                        c.sort_unstable();
                        let mut end = 0u32;
                        for (o, n) in c {
                            if o != end {
                                return Err(self.protocol(format!(
                                    "a read of {req_off}+{req_len} not covered exactly once"
                                )));
                            }
                            end = o + n;
                        }
                        if end != req.len {
                            return Err(self.protocol(format!(
                                "a read of {req_off}+{req_len} answered with {end} bytes"
                            )));
                        }
                    }
                }
                Ok(())
            }
            other => Err(self.protocol(format!("a reply with magic {other:#x}"))),
        }
    }

    fn server_error(&self, err: u32, msg: &str, offset: u64) -> Error {
        let name = match err {
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "error",
        };
        Error::unavailable_msg(format!(
            "the NBD server at {} failed a request at offset {offset}: {name} ({err}){}{msg}",
            self.uri,
            if msg.is_empty() { "" } else { ": " }
        ))
    }

    /// Writes `data` at `offset` (pipelined in pieces).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.start();
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let step = self.max_request as usize;
        let pieces: Vec<usize> = (0..data.len()).step_by(step.max(1)).collect();
        self.pipeline(&pieces, None, |c, &at| {
            let len = (data.len() - at).min(step);
            let cookie = c.cookie();
            c.request(CMD_WRITE, 0, cookie, offset + at as u64, len as u32)?;
            c.send(&data[at..at + len])?;
            Ok((cookie, command(offset + at as u64)))
        })
    }

    /// Makes `len` bytes at `offset` read as zeros (holes where the server can).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.start();
        self.check_writable()?;
        self.check_range(offset, len)?;
        if self.flags & TF_SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; (self.max_request as u64).min(len) as usize];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(zeros.len() as u64) as usize;
                self.write_at(offset + at, &zeros[..n])?;
                at += n as u64;
            }
            return Ok(());
        }
        let pieces: Vec<u64> = (0..len).step_by(1 << 30).collect();
        self.pipeline(&pieces, None, |c, &at| {
            let n = (len - at).min(1 << 30);
            let cookie = c.cookie();
            c.request(CMD_WRITE_ZEROES, 0, cookie, offset + at, n as u32)?;
            Ok((cookie, command(offset + at)))
        })
    }

    /// Asks the server to make every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        self.start();
        if self.flags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        let cookie = self.cookie();
        self.request(CMD_FLUSH, 0, cookie, 0, 0)?;
        self.flush_out()?;
        let mut flight = HashMap::from([(cookie, command(0))]);
        while !flight.is_empty() {
            self.read_reply(&mut flight, None, None)?;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only() {
            return Err(Error::denied(format!(
                "the NBD export at {} is read-only",
                self.uri
            )));
        }
        Ok(())
    }
}

/// A request in flight that expects no data back.
fn command(offset: u64) -> InFlight {
    InFlight {
        kind: Kind::Command,
        offset,
        len: 0,
        at: 0,
        covered: Vec::new(),
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // A polite goodbye; the server closes its side.
        let cookie = self.cookie();
        if self.request(CMD_DISC, 0, cookie, 0, 0).is_ok() {
            let _ = self.writer.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_bad_ones_say_why() {
        let u: NbdUri = "nbd://127.0.0.1:10810/disk0".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "disk0");
        let u: NbdUri = "nbd://host/".parse().unwrap();
        assert_eq!(u.export, "");
        assert!(matches!(u.addr, NbdAddr::Tcp { port: 10809, .. }));
        let u: NbdUri = "nbd+unix:///vm%201?socket=/run/q.sock".parse().unwrap();
        assert_eq!(u.export, "vm 1");
        assert_eq!(
            u.addr,
            NbdAddr::Unix {
                socket: "/run/q.sock".into()
            }
        );
        assert_eq!(u.to_string(), "nbd+unix:///vm 1?socket=/run/q.sock");
        let u: NbdUri = "nbds://h:1/x?tls-ca=/etc/ca.pem".parse().unwrap();
        assert_eq!(
            u.tls,
            Some(NbdTls {
                ca: "/etc/ca.pem".into(),
                hostname: "h".into(),
                client: None,
            })
        );
        let u: NbdUri = "nbds+unix:///x?socket=/s&tls-ca=/c&tls-hostname=n"
            .parse()
            .unwrap();
        assert_eq!(u.tls.unwrap().hostname, "n");
        for bad in [
            "nbd+unix:///x",
            "nbd+unix:///x?socket=rel.sock",
            "nbd://h/x?socket=/s",
            "nbds://h/x",
            "nbds+unix:///x?socket=/s&tls-ca=/c",
            "nbds://h/x?tls-ca=rel.pem",
            "nbd://h/x?tls-ca=/c",
            "http://h/x",
            "nbd:///x",
            "nbd://u:p@h/x",
            "nbd+unix:///x?socket=/a&socket=/b",
        ] {
            let e = bad.parse::<NbdUri>().unwrap_err();
            assert!(matches!(e, Error::InvalidInput(_)), "{bad}: {e}");
        }
    }
}
