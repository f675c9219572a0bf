//! Manifests: the block list of one snapshot, as stored in a repository, and the delta of one
//! manifest against another that a mirror update sends instead of the whole list.
//!
//! Format 2 (written since the mirror's manifest deltas) is binary and not compressed (chunk
//! ids do not compress, and all-zero blocks already cost one bit):
//! `"HFMNFST2" | header length (u32 LE) | header (JSON, everything but the blocks) |
//! presence bitmap (one bit per block, least significant bit first; clear is an all-zero block)
//! | 32-byte chunk id of each present block, in order | BLAKE3 of everything before (32
//! bytes)`. Decoding it is a copy, so reading a manifest costs little more than reading its
//! bytes. Format 1 (zstd JSON, one hex id per block) is still read; nothing writes it.
//!
//! A delta is `"HFMDLTA1" | base snapshot id (u128 LE) | BLAKE3 of the target's block list
//! (32 bytes) | header length (u32 LE) | the target's header (JSON) | change count (u64 LE) |
//! per change: block index (u64 LE), 0 or 1 (zero block or chunk), and the 32-byte id if 1`,
//! inside zstd. The receiver applies it to its own copy of the base and checks the result
//! against the digest, so a delta can only ever yield the upstream's exact block list.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use super::BlockList;
use crate::catalog::{SnapshotRecord, SnapshotStats};
use crate::error::{Error, Result};
use crate::id::{ChunkId, SnapshotId, SnapshotName, VolumeName};

/// Manifest format version written by this holdfast.
pub const MANIFEST_FORMAT: u32 = 2;
/// The JSON format, still read.
const MANIFEST_FORMAT_JSON: u32 = 1;
/// Largest manifest or delta accepted when reading (decompressed), against hostile input.
const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// Most blocks a manifest may list (2 TiB of 64 KiB blocks; 128 GiB of 4 KiB ones): the
/// block list is held in memory whole, so this bounds what a snapshot, or a peer's claim, can
/// make a node allocate. Snapshot creation refuses a bigger volume before reading it.
pub const MAX_BLOCKS: u64 = 1 << 25;
/// Largest header accepted.
const MAX_HEADER_BYTES: usize = 1 << 20;
const MAGIC: &[u8; 8] = b"HFMNFST2";
const DELTA_MAGIC: &[u8; 8] = b"HFMDLTA1";
/// zstd level for deltas (they are small).
const ZSTD_LEVEL: i32 = 3;

/// The block list of one snapshot, stored in the repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: SnapshotId,
    pub volume: VolumeName,
    pub name: SnapshotName,
    pub created_unix_ms: u64,
    pub size: u64,
    pub block_size: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub parent: Option<SnapshotId>,
    /// One entry per block; `None` is an all-zero block.
    pub blocks: BlockList,
}

/// Everything of a manifest but its blocks (format 2's JSON header).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Header {
    format: u32,
    id: SnapshotId,
    volume: VolumeName,
    name: SnapshotName,
    created_unix_ms: u64,
    size: u64,
    block_size: u32,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    parent: Option<SnapshotId>,
}

impl Header {
    fn of(m: &Manifest) -> Header {
        Header {
            format: MANIFEST_FORMAT,
            id: m.id,
            volume: m.volume.clone(),
            name: m.name.clone(),
            created_unix_ms: m.created_unix_ms,
            size: m.size,
            block_size: m.block_size,
            labels: m.labels.clone(),
            parent: m.parent,
        }
    }

    fn with_blocks(self, blocks: BlockList) -> Manifest {
        Manifest {
            format: self.format,
            id: self.id,
            volume: self.volume,
            name: self.name,
            created_unix_ms: self.created_unix_ms,
            size: self.size,
            block_size: self.block_size,
            labels: self.labels,
            parent: self.parent,
            blocks,
        }
    }
}

/// Length in bytes of block `i` of a volume of `size` bytes (the last one may be short).
pub fn block_len(size: u64, block_size: u32, i: u64) -> usize {
    let start = i * block_size as u64;
    (size - start).min(block_size as u64) as usize
}

/// Number of blocks of a volume of `size` bytes.
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(block_size as u64)
}

fn decompress(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    decompress_at_most(bytes, what, MAX_MANIFEST_BYTES)
}

/// Decompresses at most `max` bytes: more is an error, never a bigger allocation (a few KiB
/// of zstd can claim gigabytes).
fn decompress_at_most(bytes: &[u8], what: &str, max: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    zstd::stream::Decoder::new(bytes)
        .and_then(|d| d.take(max + 1).read_to_end(&mut out))
        .map_err(|e| Error::corrupt(format!("{what} does not decompress: {e}")))?;
    if out.len() as u64 > max {
        return Err(Error::corrupt(format!(
            "{what} decompresses to more than the {max} bytes it may hold"
        )));
    }
    Ok(out)
}

/// The exact length of a format-2 manifest from its first bytes, as soon as they hold its
/// header and presence bitmap (`None`: more bytes are needed), so that a peer's answer is
/// refused, or its buffer sized exactly, long before it has all arrived. `expect` is the
/// (size, block size) the listing gave: a header that says otherwise is refused at once.
pub fn format_2_len(prefix: &[u8], expect: (u64, u32), what: &str) -> Result<Option<usize>> {
    Format2Length::default().feed(prefix, expect, what)
}

/// [`format_2_len`] for a prefix that grows as a body streams in: the header is parsed once
/// and the bitmap counted once, whatever the number of pieces it arrives in (an upstream
/// sending a byte at a time must not make this node parse a large header for each byte).
#[derive(Debug, Default)]
pub struct Format2Length {
    /// Where the bitmap starts and how long it is, once the header was read.
    bitmap: Option<(usize, usize)>,
}

impl Format2Length {
    pub fn feed(&mut self, prefix: &[u8], expect: (u64, u32), what: &str) -> Result<Option<usize>> {
        if self.bitmap.is_none() {
            let n = MAGIC.len().min(prefix.len());
            if prefix[..n] != MAGIC[..n] {
                return Err(Error::corrupt(format!(
                    "{what} is not a manifest in format 2"
                )));
            }
            let Some(len) = prefix.get(8..12) else {
                return Ok(None);
            };
            let header_len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
            if header_len > MAX_HEADER_BYTES {
                return Err(Error::corrupt(format!(
                    "{what} has a {header_len}-byte header"
                )));
            }
            let Some(json) = prefix.get(12..12 + header_len) else {
                return Ok(None);
            };
            let h: Header = serde_json::from_slice(json)
                .map_err(|e| Error::corrupt(format!("{what} has a malformed header: {e}")))?;
            if (h.size, h.block_size) != expect {
                return Err(Error::corrupt(format!(
                    "{what} is of {} bytes in {}-byte blocks, not the {} in {}-byte blocks \
                     listed",
                    h.size, h.block_size, expect.0, expect.1
                )));
            }
            check_geometry(&h, what)?;
            let n = block_count(h.size, h.block_size) as usize;
            self.bitmap = Some((12 + header_len, n.div_ceil(8)));
        }
        let (start, len) = self.bitmap.expect("read above");
        let Some(bitmap) = prefix.get(start..start + len) else {
            return Ok(None);
        };
        let present: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
        Ok(Some(start + len + present * 32 + 32))
    }
}

/// Whether `bytes` is a manifest in format 2 (what peers ask for; format 1 is zstd JSON).
pub fn is_format_2(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

fn compress(raw: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(raw, ZSTD_LEVEL).map_err(|e| Error::io("compressing a manifest", e))
}

/// A little reader over a byte slice that names what ran short.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::corrupt(format!("{} is truncated", self.what)));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn header(&mut self) -> Result<Header> {
        let len = self.u32()? as usize;
        if len > MAX_HEADER_BYTES {
            return Err(Error::corrupt(format!(
                "{} has a {len}-byte header",
                self.what
            )));
        }
        let json = self.take(len)?;
        serde_json::from_slice(json)
            .map_err(|e| Error::corrupt(format!("{} has a malformed header: {e}", self.what)))
    }
}

fn read_blocks(c: &mut Cursor<'_>, n: u64) -> Result<BlockList> {
    let n = usize::try_from(n).map_err(|_| Error::corrupt(format!("{} is too big", c.what)))?;
    let bitmap = c.take(n.div_ceil(8))?;
    if n % 8 != 0 && bitmap[n / 8] >> (n % 8) != 0 {
        return Err(Error::corrupt(format!(
            "{} marks blocks past its end ({n} blocks)",
            c.what
        )));
    }
    let present: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
    let ids = c.take(c.buf.len())?;
    BlockList::from_parts(n, bitmap, ids).ok_or_else(|| {
        Error::corrupt(format!(
            "{} marks {present} blocks present but holds {} bytes of ids",
            c.what,
            ids.len()
        ))
    })
}

impl Manifest {
    /// Length in bytes of block `i` (the last one may be short).
    pub fn block_len(&self, i: u64) -> usize {
        block_len(self.size, self.block_size, i)
    }

    /// The stored form (format 2).
    pub fn encode(&self) -> Result<Vec<u8>> {
        check_block_count(self.size, self.block_size, &format!("snapshot {}", self.id))?;
        let header =
            serde_json::to_vec(&Header::of(self)).map_err(|e| Error::internal(e.to_string()))?;
        let mut raw = Vec::with_capacity(44 + header.len());
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&(header.len() as u32).to_le_bytes());
        raw.extend_from_slice(&header);
        self.blocks.write_to(&mut raw);
        let sum = blake3::hash(&raw);
        raw.extend_from_slice(sum.as_bytes());
        Ok(raw)
    }

    /// Format 1 (zstd JSON), for peers from before format 2.
    pub fn encode_format_1(&self) -> Result<Vec<u8>> {
        let mut m = self.clone();
        m.format = MANIFEST_FORMAT_JSON;
        let json = serde_json::to_vec(&m).map_err(|e| Error::internal(e.to_string()))?;
        zstd::bulk::compress(&json, 3).map_err(|e| Error::io("compressing a manifest", e))
    }

    /// Parses and checks a manifest read from a repository or a peer (format 2 or 1).
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let what = format!("manifest of {what}");
        let m = if let Some(rest) = bytes.strip_prefix(MAGIC) {
            let Some((body, sum)) = rest.split_last_chunk::<32>() else {
                return Err(Error::corrupt(format!("{what} is truncated")));
            };
            if blake3::hash(&bytes[..bytes.len() - 32]).as_bytes() != sum {
                return Err(Error::corrupt(format!(
                    "{what} does not match its checksum (damaged)"
                )));
            }
            let mut c = Cursor {
                buf: body,
                what: &what,
            };
            let h = c.header()?;
            if h.format != MANIFEST_FORMAT {
                return Err(Error::invalid(format!(
                    "{what} has format {}; this holdfast reads {MANIFEST_FORMAT_JSON} and \
                     {MANIFEST_FORMAT}",
                    h.format
                )));
            }
            check_geometry(&h, &what)?;
            let blocks = read_blocks(&mut c, block_count(h.size, h.block_size))?;
            h.with_blocks(blocks)
        } else {
            let raw = decompress(bytes, &what)?;
            let m: Manifest = serde_json::from_slice(&raw)
                .map_err(|e| Error::corrupt(format!("{what} is malformed: {e}")))?;
            if m.format != MANIFEST_FORMAT_JSON {
                return Err(Error::invalid(format!(
                    "{what} has format {}; this holdfast reads {MANIFEST_FORMAT_JSON} and \
                     {MANIFEST_FORMAT}",
                    m.format
                )));
            }
            m
        };
        crate::volume::validate_block_size(m.block_size as u64)
            .map_err(|e| Error::corrupt(format!("{what}: {e}")))?;
        if m.blocks.len() as u64 != block_count(m.size, m.block_size) {
            return Err(Error::corrupt(format!(
                "{what} lists {} blocks for {} bytes of {}-byte blocks",
                m.blocks.len(),
                m.size,
                m.block_size
            )));
        }
        Ok(m)
    }

    /// A digest of the block list alone (not the header or the format it was stored in).
    pub fn blocks_digest(&self) -> [u8; 32] {
        let mut raw = Vec::new();
        self.blocks.write_to(&mut raw);
        let mut h = blake3::Hasher::new();
        h.update(&(self.blocks.len() as u64).to_le_bytes());
        h.update(&raw);
        *h.finalize().as_bytes()
    }

    /// What turns `base`'s block list into this one.
    pub fn delta_from(&self, base: &Manifest) -> ManifestDelta {
        let changes = self
            .blocks
            .differing(&base.blocks)
            .filter(|&i| i < self.blocks.len())
            .map(|i| (i as u64, self.blocks.get(i).expect("within the list")))
            .collect();
        ManifestDelta {
            base: base.id,
            digest: self.blocks_digest(),
            header: Header::of(self),
            changes,
        }
    }

    pub fn record(&self, stats: SnapshotStats) -> SnapshotRecord {
        SnapshotRecord {
            id: self.id,
            volume: self.volume.clone(),
            name: self.name.clone(),
            created_unix_ms: self.created_unix_ms,
            size: self.size,
            block_size: self.block_size,
            labels: self.labels.clone(),
            parent: self.parent,
            stats,
            regions: Default::default(),
        }
    }
}

fn check_geometry(h: &Header, what: &str) -> Result<()> {
    crate::volume::validate_block_size(h.block_size as u64)
        .map_err(|e| Error::corrupt(format!("{what}: {e}")))?;
    check_block_count(h.size, h.block_size, what).map_err(|e| Error::corrupt(e.to_string()))
}

/// Refuses a volume of more than [`MAX_BLOCKS`] blocks, saying what to do instead.
pub fn check_block_count(size: u64, block_size: u32, what: &str) -> Result<()> {
    let n = block_count(size, block_size);
    if n > MAX_BLOCKS {
        let need = size.div_ceil(MAX_BLOCKS).next_power_of_two();
        let advice = if need <= crate::volume::MAX_BLOCK_SIZE as u64 {
            format!("use a block size of at least {need} for this volume")
        } else {
            format!(
                "it is too large for any block size holdfast takes (up to {}); is the size \
                 right?",
                crate::volume::MAX_BLOCK_SIZE
            )
        };
        return Err(Error::invalid(format!(
            "{what}: {size} bytes in {block_size}-byte blocks is {n} blocks; a snapshot lists at \
             most {MAX_BLOCKS} ({advice})"
        )));
    }
    Ok(())
}

/// One manifest expressed against another (its base), for the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestDelta {
    /// The snapshot whose block list this applies to.
    pub base: SnapshotId,
    digest: [u8; 32],
    header: Header,
    /// Blocks that differ from the base (or lie past its end), by index, ascending.
    pub changes: Vec<(u64, Option<ChunkId>)>,
}

impl ManifestDelta {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let header =
            serde_json::to_vec(&self.header).map_err(|e| Error::internal(e.to_string()))?;
        let mut raw = Vec::with_capacity(64 + header.len() + self.changes.len() * 41);
        raw.extend_from_slice(DELTA_MAGIC);
        raw.extend_from_slice(&self.base.as_u128().to_le_bytes());
        raw.extend_from_slice(&self.digest);
        raw.extend_from_slice(&(header.len() as u32).to_le_bytes());
        raw.extend_from_slice(&header);
        raw.extend_from_slice(&(self.changes.len() as u64).to_le_bytes());
        for (i, b) in &self.changes {
            raw.extend_from_slice(&i.to_le_bytes());
            match b {
                None => raw.push(0),
                Some(id) => {
                    raw.push(1);
                    raw.extend_from_slice(&id.0);
                }
            }
        }
        compress(&raw)
    }

    /// Parses a delta from a peer; [`ManifestDelta::apply`] checks it against its base.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        Self::decode_at_most(bytes, what, MAX_MANIFEST_BYTES)
    }

    /// [`ManifestDelta::decode`], refusing a delta that decompresses to more than `max`
    /// bytes (what a delta of the listed snapshot can take). The delta is parsed as it
    /// decompresses, never held whole: its changes are the only allocation, made once at the
    /// count it declares (at most one per block of the snapshot it names), so a few KiB of
    /// zstd cannot make this node buffer (and double) what they inflate to.
    pub fn decode_at_most(bytes: &[u8], what: &str, max: u64) -> Result<Self> {
        let what = format!("manifest delta of {what}");
        let decoder = zstd::stream::Decoder::new(bytes)
            .map_err(|e| Error::corrupt(format!("{what} does not decompress: {e}")))?;
        let mut r = std::io::BufReader::with_capacity(64 << 10, decoder.take(max + 1));
        let mut read = |buf: &mut [u8]| -> Result<()> {
            r.read_exact(buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::corrupt(format!(
                    "{what} is truncated (or decompresses to more than the {max} bytes it may \
                     hold)"
                )),
                _ => Error::corrupt(format!("{what} does not decompress: {e}")),
            })
        };
        let mut fixed = [0u8; 8 + 16 + 32 + 4];
        read(&mut fixed)?;
        if &fixed[..8] != DELTA_MAGIC {
            return Err(Error::corrupt(format!("{what} is not a manifest delta")));
        }
        let base = SnapshotId::from_u128(u128::from_le_bytes(
            fixed[8..24].try_into().expect("16 bytes"),
        ));
        let digest: [u8; 32] = fixed[24..56].try_into().expect("32 bytes");
        let header_len = u32::from_le_bytes(fixed[56..60].try_into().expect("4 bytes")) as usize;
        if header_len > MAX_HEADER_BYTES {
            return Err(Error::corrupt(format!(
                "{what} has a {header_len}-byte header"
            )));
        }
        let mut json = vec![0u8; header_len];
        read(&mut json)?;
        let header: Header = serde_json::from_slice(&json)
            .map_err(|e| Error::corrupt(format!("{what} has a malformed header: {e}")))?;
        if header.format != MANIFEST_FORMAT {
            return Err(Error::invalid(format!(
                "{what} has format {}; this holdfast reads {MANIFEST_FORMAT}",
                header.format
            )));
        }
        check_geometry(&header, &what)?;
        let n = block_count(header.size, header.block_size);
        let mut word = [0u8; 8];
        read(&mut word)?;
        let count = u64::from_le_bytes(word);
        if count > n || 8 + 16 + 32 + 4 + header_len as u64 + 8 + count * 9 > max {
            return Err(Error::corrupt(format!(
                "{what} changes {count} of {n} blocks, more than it may hold"
            )));
        }
        // Grown as changes arrive, not reserved for the count a header claims.
        let mut changes = Vec::with_capacity((count as usize).min(1 << 16));
        let mut next = 0u64;
        let mut change = [0u8; 9];
        for _ in 0..count {
            read(&mut change)?;
            let i = u64::from_le_bytes(change[..8].try_into().expect("8 bytes"));
            if i < next || i >= n {
                return Err(Error::corrupt(format!(
                    "{what} changes block {i} out of order or past the end ({n} blocks)"
                )));
            }
            next = i + 1;
            let b = match change[8] {
                0 => None,
                1 => {
                    let mut id = [0u8; 32];
                    read(&mut id)?;
                    Some(ChunkId(id))
                }
                t => return Err(Error::corrupt(format!("{what} has block tag {t}"))),
            };
            changes.push((i, b));
        }
        let mut more = [0u8; 1];
        if r.read(&mut more)
            .map_err(|e| Error::corrupt(format!("{what} does not decompress: {e}")))?
            > 0
        {
            return Err(Error::corrupt(format!("{what} has bytes after its end")));
        }
        Ok(ManifestDelta {
            base,
            digest,
            header,
            changes,
        })
    }

    /// The snapshot this delta describes.
    pub fn id(&self) -> SnapshotId {
        self.header.id
    }

    /// The manifest this delta describes, built from `base`, which must be the manifest the
    /// delta was made against: a result whose blocks do not match the sender's digest is an
    /// error, never a manifest.
    pub fn apply(&self, base: &Manifest, what: &str) -> Result<Manifest> {
        if base.id != self.base {
            return Err(Error::invalid(format!(
                "the manifest delta of {what} applies to snapshot {}, not {}",
                self.base, base.id
            )));
        }
        let n = block_count(self.header.size, self.header.block_size) as usize;
        // The base's blocks between changes (zeros past its end), then each change.
        let mut blocks = BlockList::with_capacity(n);
        for (i, b) in &self.changes {
            blocks.extend_from(&base.blocks, blocks.len()..*i as usize);
            blocks.push(*b);
        }
        blocks.extend_from(&base.blocks, blocks.len()..n);
        let m = self.header.clone().with_blocks(blocks);
        if m.blocks_digest() != self.digest {
            return Err(Error::corrupt(format!(
                "the manifest delta of {what}, applied to {}, does not give the sender's block \
                 list",
                base.id
            )));
        }
        Ok(m)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A manifest of `blocks` (shared with the snapshot module's tests).
    pub(crate) fn manifest(size: u64, bs: u32, blocks: Vec<Option<ChunkId>>) -> Manifest {
        let blocks = BlockList::from(blocks);
        Manifest {
            format: MANIFEST_FORMAT,
            id: SnapshotId::generate(1),
            volume: "v".parse().unwrap(),
            name: "s".parse().unwrap(),
            created_unix_ms: 1,
            size,
            block_size: bs,
            labels: [("k".to_string(), "v".to_string())].into(),
            parent: None,
            blocks,
        }
    }

    pub(crate) fn c(n: u8) -> Option<ChunkId> {
        Some(ChunkId([n; 32]))
    }

    #[test]
    fn manifest_round_trips_and_rejects_a_wrong_block_count() {
        // encode/decode is identity; a block list that does not fit the size is corrupt.
        let m = manifest(3 * 4096 + 1, 4096, vec![c(1), None, c(2), c(3)]);
        assert_eq!(Manifest::decode(&m.encode().unwrap(), "t").unwrap(), m);
        let bad = manifest(4096, 4096, vec![c(1), c(2)]);
        assert!(matches!(
            Manifest::decode(&bad.encode().unwrap(), "t"),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            Manifest::decode(b"garbage", "t"),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn format_1_json_is_still_read() {
        // Repositories written before format 2 hold zstd JSON manifests.
        let mut m = manifest(2 * 4096, 4096, vec![c(1), None]);
        let json = m.encode_format_1().unwrap();
        m.format = MANIFEST_FORMAT_JSON;
        assert_eq!(Manifest::decode(&json, "t").unwrap(), m);
        // And re-encoding it writes format 2 with the same blocks.
        let again = Manifest::decode(&m.encode().unwrap(), "t").unwrap();
        assert_eq!((again.format, &again.blocks), (MANIFEST_FORMAT, &m.blocks));
    }

    #[test]
    fn damaged_format_2_is_corrupt_not_a_panic() {
        let m = manifest(9 * 4096, 4096, vec![c(1); 9]);
        let raw = m.encode().unwrap();
        // Cut short, one byte more, one bit flipped: each is damage (the checksum), and a
        // body that passes its checksum but lies about its layout is damage too.
        for cut in [0, 8, 11, 20, 43, raw.len() - 1] {
            let r = Manifest::decode(&raw[..cut], "t");
            assert!(matches!(r, Err(Error::Corrupt(_))), "cut at {cut}: {r:?}");
        }
        let mut extra = raw.clone();
        extra.push(0);
        assert!(matches!(
            Manifest::decode(&extra, "t"),
            Err(Error::Corrupt(_))
        ));
        let mut flipped = raw.clone();
        flipped[raw.len() - 40] ^= 1;
        assert!(matches!(
            Manifest::decode(&flipped, "t"),
            Err(Error::Corrupt(_))
        ));
        let body = &raw[..raw.len() - 32 - 32];
        let mut lying = body.to_vec();
        lying.extend_from_slice(blake3::hash(body).as_bytes());
        let r = Manifest::decode(&lying, "t");
        assert!(matches!(r, Err(Error::Corrupt(_))), "{r:?}");
    }

    #[test]
    fn a_volume_with_too_many_blocks_is_refused_with_the_block_size_to_use() {
        // 4 TiB of 64 KiB blocks is 2^26 blocks: refused, naming 128 KiB.
        let e = check_block_count(4 << 40, 64 << 10, "volume v").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("at least 131072")),
            "{e}"
        );
        check_block_count(2 << 40, 64 << 10, "volume v").unwrap();
        // A delta claiming a huge count with no bytes behind it allocates nothing big.
        let a = manifest(4096, 4096, vec![c(1)]);
        let mut raw = DELTA_MAGIC.to_vec();
        raw.extend_from_slice(&a.id.as_u128().to_le_bytes());
        raw.extend_from_slice(&[0; 32]);
        let mut h = Header::of(&a);
        h.size = MAX_BLOCKS * 4096;
        let hj = serde_json::to_vec(&h).unwrap();
        raw.extend_from_slice(&(hj.len() as u32).to_le_bytes());
        raw.extend_from_slice(&hj);
        raw.extend_from_slice(&MAX_BLOCKS.to_le_bytes());
        let r = ManifestDelta::decode(&compress(&raw).unwrap(), "t");
        assert!(matches!(r, Err(Error::Corrupt(_))), "{r:?}");
    }

    #[test]
    fn a_delta_applied_to_another_base_is_refused() {
        let a = manifest(3 * 4096, 4096, vec![c(1), c(2), c(3)]);
        let b = manifest(3 * 4096, 4096, vec![c(1), c(9), c(3)]);
        let d = b.delta_from(&a);
        assert_eq!(d.changes, vec![(1, c(9))]);
        // Another snapshot as the base: refused by id.
        assert!(d.apply(&b, "t").is_err());
        // Same id but other blocks (a diverged copy): refused by the digest.
        let mut forged = a.clone();
        forged.blocks.set(0, c(7));
        assert!(matches!(d.apply(&forged, "t"), Err(Error::Corrupt(_))));
    }

    proptest! {
        #[test]
        fn a_delta_rebuilds_the_manifest_exactly(
            old in proptest::collection::vec(proptest::option::of(0u8..6), 0..80),
            new in proptest::collection::vec(proptest::option::of(0u8..6), 0..80),
        ) {
            // Any base, any target (grown, shrunk, zeroed): encode, decode, apply is identity,
            // and only the blocks that differ travel.
            let ids = |v: &[Option<u8>]| v.iter().map(|o| o.map(|n| ChunkId([n; 32]))).collect::<Vec<_>>();
            let a = manifest(old.len() as u64 * 4096, 4096, ids(&old));
            let mut b = manifest(new.len() as u64 * 4096, 4096, ids(&new));
            b.parent = Some(a.id);
            let d = b.delta_from(&a);
            let differ = (0..new.len()).filter(|&i| old.get(i) != Some(&new[i])).count();
            prop_assert_eq!(d.changes.len(), differ);
            let wire = ManifestDelta::decode(&d.encode().unwrap(), "t").unwrap();
            prop_assert_eq!(&wire, &d);
            prop_assert_eq!(wire.apply(&a, "t").unwrap(), b.clone());
            prop_assert_eq!(Manifest::decode(&b.encode().unwrap(), "t").unwrap(), b);
        }
    }
}
