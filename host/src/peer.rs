//! The peer protocol: HTTP/2 over rustls TLS (plaintext only on loopback, when configured).
//!
//! A downstream authenticates with `Authorization: Bearer TOKEN` and names itself with
//! `X-Holdfast-Peer: NODE`; the upstream knows each downstream's token and the volumes it may
//! read. Routes (all under `/v1`, JSON unless said otherwise):
//!
//! | route | what |
//! |---|---|
//! | `GET  /v1/volumes/{volume}/snapshots` | the volume's snapshots, oldest first |
//! | `GET  /v1/volumes/{volume}/snapshots/{id}/manifest?format=2[&base=ID]` | the stored manifest, or with `base` a delta against that snapshot's (header `x-holdfast-manifest: full` or `delta`); without `format`, format 1 (zstd JSON), for older peers |
//! | `POST /v1/volumes/{volume}/snapshots/{id}/chunks` | `{"chunks": [hex, …]}` → chunk frames |
//! | `PUT  /v1/volumes/{volume}/locks` | the peer's whole lock set for the volume ([`LockSetUpdate`]) |
//! | `GET  /v1/status` | the daemon's status (admin token from the state directory) |
//! | `GET  /metrics` | Prometheus text exposition |
//!
//! Chunk frames are binary: per chunk `id (32 bytes) | encoding (1: 0 raw, 1 zstd) | plain
//! length (u32 LE) | stored length (u32 LE) | stored bytes`, exactly as held in the sender's
//! packs; the receiver verifies every chunk against its id before writing it anywhere.
//! Errors are `{"kind": "...", "message": "..."}` with a matching HTTP status.

pub mod client;
pub mod server;
pub mod tls;

use serde::{Deserialize, Serialize};

use crate::catalog::SnapshotRecord;
use crate::chunk::Encoding;
use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, VolumeName};

/// The header a peer names itself with.
pub const PEER_HEADER: &str = "x-holdfast-peer";
/// The nodes a cascade-view request (`/v1/cascade`) came through, comma-separated, the one
/// that asked first first: a node that finds itself there answers without asking further up
/// (two nodes that mirror from each other end there).
pub const PATH_HEADER: &str = "x-holdfast-path";
/// The header that says whether a manifest answer is `full` or a `delta`.
pub const MANIFEST_KIND_HEADER: &str = "x-holdfast-manifest";
/// Most chunks one request may ask for.
pub const MAX_CHUNKS_PER_REQUEST: usize = 1024;
/// Largest plain chunk accepted (the largest block size).
pub const MAX_CHUNK_BYTES: usize = crate::volume::MAX_BLOCK_SIZE as usize;
/// HTTP/2 flow-control window of a stream (a connection's is twice that): one chunk answer
/// (up to 16 MiB) flows without waiting for window updates.
pub const H2_WINDOW: u32 = 16 << 20;
/// Bytes of a frame before its stored bytes.
pub const FRAME_HEADER: usize = 32 + 1 + 4 + 4;

/// `GET /v1/volumes/{volume}/snapshots`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotList {
    pub node: NodeId,
    pub volume: VolumeName,
    pub snapshots: Vec<SnapshotRecord>,
    /// Set when the volume listed is itself a replica of one region of a volume: that
    /// region's name (a downstream's lock on it is then a qtree-name lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<crate::id::RegionName>,
}

/// `POST …/chunks`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRequest {
    pub chunks: Vec<ChunkId>,
}

/// An error on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub message: String,
}

impl WireError {
    pub fn from_error(e: &Error) -> (u16, WireError) {
        let (status, kind) = match e {
            Error::NotFound(_) => (404, "not-found"),
            Error::InvalidInput(_) => (400, "invalid"),
            Error::Conflict(_) => (409, "conflict"),
            Error::Locked(_) => (423, "locked"),
            Error::Corrupt(_) => (500, "corrupt"),
            Error::Unavailable { .. } | Error::Io { .. } => (503, "unavailable"),
            Error::Policy(_) => (500, "policy"),
            Error::Denied(_) => (403, "denied"),
            Error::Internal(_) => (500, "internal"),
        };
        (
            status,
            WireError {
                kind: kind.into(),
                message: e.to_string(),
            },
        )
    }

    /// Back into an [`Error`], prefixed with who said it. The peer's message is text from
    /// outside: it enters the error escaped and cut short ([`peer_text`]). The peer's `kind`
    /// chooses the category only where it is a peer's to say: a volume or snapshot it does not
    /// have (not found, exit 3), a request it refuses (denied or invalid: exit 9, as every
    /// refusal by a peer); anything else it reports (its own corrupt data, its own policy, an
    /// internal error, a kind this node does not know) is the peer failing to answer
    /// (unavailable, exit 7), never this node's input, data or policy failing.
    pub fn into_error(self, who: &str) -> Error {
        let m = format!("{who}: {}", peer_text(&self.message));
        match self.kind.as_str() {
            "not-found" => Error::NotFound(m),
            "denied" | "invalid" => Error::Denied(m),
            _ => Error::Unavailable {
                message: m,
                source: None,
            },
        }
    }
}

/// Most bytes of a peer's own text (an error message) kept in an error here.
pub const MAX_PEER_TEXT: usize = 1024;

/// Text a peer sent, as it may enter an error, a log or `status`: terminal escapes, bidi
/// marks and line breaks escaped, at most [`MAX_PEER_TEXT`] bytes.
pub fn peer_text(s: &str) -> String {
    crate::id::shorten_to(&crate::id::escape_hazards(s), MAX_PEER_TEXT)
}

/// One chunk in a frame stream, borrowed from the buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    pub id: ChunkId,
    pub encoding: Encoding,
    pub raw_len: usize,
    pub stored: &'a [u8],
    /// Where `stored` starts in the buffer.
    pub offset: usize,
}

/// Appends one frame.
pub fn write_frame(
    out: &mut Vec<u8>,
    id: &ChunkId,
    encoding: Encoding,
    raw_len: u32,
    stored: &[u8],
) {
    out.extend_from_slice(&id.0);
    out.push(match encoding {
        Encoding::Raw => 0,
        Encoding::Zstd => 1,
    });
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    out.extend_from_slice(stored);
}

/// Splits a frame stream; anything malformed is an error naming the offset.
pub fn parse_frames(buf: &[u8]) -> Result<Vec<Frame<'_>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let bad = |why: &str| {
            Error::corrupt(format!(
                "chunk stream from the upstream: {why} at byte {pos}"
            ))
        };
        if buf.len() - pos < FRAME_HEADER {
            return Err(bad("truncated frame header"));
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&buf[pos..pos + 32]);
        let encoding = match buf[pos + 32] {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            _ => return Err(bad("unknown chunk encoding")),
        };
        let raw_len =
            u32::from_le_bytes(buf[pos + 33..pos + 37].try_into().expect("4 bytes")) as usize;
        let stored_len =
            u32::from_le_bytes(buf[pos + 37..pos + 41].try_into().expect("4 bytes")) as usize;
        if raw_len == 0 || raw_len > MAX_CHUNK_BYTES || stored_len > MAX_CHUNK_BYTES + 1024 {
            return Err(bad("chunk length out of range"));
        }
        let start = pos + FRAME_HEADER;
        if buf.len() - start < stored_len {
            return Err(bad("truncated chunk"));
        }
        out.push(Frame {
            id: ChunkId(id),
            encoding,
            raw_len,
            stored: &buf[start..start + stored_len],
            offset: start,
        });
        pos = start + stored_len;
    }
    Ok(out)
}

/// Compares two secrets without leaking where they differ (BLAKE3 hashes compare in
/// constant time).
pub fn same_secret(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

/// A fresh random token (32 bytes, hex).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let a = crate::chunk::hash(b"a");
        let mut buf = Vec::new();
        write_frame(&mut buf, &a, Encoding::Raw, 1, b"a");
        write_frame(&mut buf, &a, Encoding::Zstd, 5, b"xyz");
        let f = parse_frames(&buf).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!((f[1].raw_len, f[1].stored), (5, &b"xyz"[..]));
        assert!(parse_frames(&buf[..buf.len() - 1]).is_err());
        assert!(parse_frames(&buf[..10]).is_err());
        let mut bad = buf.clone();
        bad[32] = 7;
        assert!(parse_frames(&bad).is_err());
        let mut huge = Vec::new();
        write_frame(&mut huge, &a, Encoding::Raw, u32::MAX, b"a");
        assert!(parse_frames(&huge).is_err());
    }

    #[test]
    fn errors_keep_their_kind_over_the_wire() {
        let (status, w) = WireError::from_error(&Error::denied("no"));
        assert_eq!(status, 403);
        assert!(matches!(w.into_error("a"), Error::Denied(m) if m == "a: no"));
    }
}
