//! Pack objects: many chunks in one object, with their index in a trailer and beside it.
//!
//! A pack is `MAGIC | blob... | trailer | trailer length (u32 LE) | END_MAGIC`, where each blob is
//! one chunk as encoded by [`crate::chunk::encode`] and the trailer is the zstd-compressed JSON
//! [`PackIndex`]. The same index is also written as its own small object, so a node loads the
//! whole repository's index without reading packs; the trailer lets a lost index be rebuilt.
//! A pack is named by the BLAKE3 hash of its entry list (ids, encodings, offsets, lengths):
//! two packs with the same entries hold the same chunks at the same places, so writing one
//! twice is harmless. Hashing the list rather than the bytes saves a pass over every byte;
//! each chunk's bytes are verified against the chunk's own id whenever they are read.
//!
//! A pack written into a mirror target also carries a random **salt**, hashed into its name,
//! so that its name is never written twice: a target's gc deletes by name what it condemned
//! (`host/TARGETS.md`), and a pack with the same chunks stored again later must not share a
//! name with a condemned one.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chunk::Encoding;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};

const MAGIC: &[u8; 8] = b"HFPACK01";
const END_MAGIC: &[u8; 8] = b"HFPKEND1";

/// Target size of a pack: large enough that an object store sees few requests per GiB, small
/// enough to hold a few in memory while uploading.
pub const TARGET_PACK_BYTES: usize = 16 << 20;
/// Most chunks in one pack: keeps every index well inside what readers accept, even for
/// blocks that compress to a few bytes each.
pub const MAX_PACK_ENTRIES: usize = 65_536;

/// Where one chunk lives inside a pack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub length: u32,
    pub raw_length: u32,
    pub encoding: Encoding,
}

/// The list of chunks in one pack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    pub pack: PackId,
    pub entries: Vec<PackEntry>,
    /// 32 hex digits hashed into the pack's name (packs written into targets), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

impl PackIndex {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self).map_err(|e| Error::internal(e.to_string()))?;
        zstd::bulk::compress(&json, 3).map_err(|e| Error::io("compressing a pack index", e))
    }

    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        // Bounded: at most MAX_PACK_ENTRIES entries of about 200 bytes of JSON each.
        let json = zstd::bulk::decompress(bytes, MAX_PACK_ENTRIES * 512)
            .map_err(|e| Error::corrupt(format!("{what} does not decompress: {e}")))?;
        let index: PackIndex = serde_json::from_slice(&json)
            .map_err(|e| Error::corrupt(format!("{what} is malformed: {e}")))?;
        Ok(index)
    }

    /// The pack id implied by a list of entries (and the salt, if the pack has one).
    pub fn id_of(entries: &[PackEntry], salt: Option<&str>) -> Result<PackId> {
        let json = serde_json::to_vec(entries).map_err(|e| Error::internal(e.to_string()))?;
        let mut h = blake3::Hasher::new();
        if let Some(salt) = salt {
            h.update(b"salt:");
            h.update(salt.as_bytes());
            h.update(b"\n");
        }
        h.update(&json);
        Ok(PackId(*h.finalize().as_bytes()))
    }

    /// Total stored bytes of the entries.
    pub fn stored_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.length as u64).sum()
    }
}

/// Accumulates encoded chunks until the pack is full.
#[derive(Debug)]
pub struct PackBuilder {
    /// `buf[start..]` is the pack; `start` puts its first byte on a 4 KiB boundary so a local
    /// repository can write it with direct I/O without copying it first.
    buf: Vec<u8>,
    start: usize,
    entries: Vec<PackEntry>,
    salt: Option<String>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PackBuilder {
    pub fn new() -> Self {
        // Room for a full pack plus the largest block and the trailer, so it never moves.
        let mut buf: Vec<u8> = Vec::with_capacity(TARGET_PACK_BYTES + (6 << 20) + 4096);
        let start = buf.as_ptr().align_offset(4096).min(4096);
        buf.resize(start, 0);
        buf.extend_from_slice(MAGIC);
        PackBuilder {
            buf,
            start,
            entries: Vec::new(),
            salt: None,
        }
    }

    /// A builder whose pack gets a random salt in its name (for mirror targets).
    pub fn salted() -> Self {
        PackBuilder {
            salt: Some(format!("{:032x}", rand::random::<u128>())),
            ..Self::new()
        }
    }

    pub fn add(&mut self, id: ChunkId, encoding: Encoding, stored: &[u8], raw_length: usize) {
        self.entries.push(PackEntry {
            id,
            offset: (self.buf.len() - self.start) as u64,
            length: stored.len() as u32,
            raw_length: raw_length as u32,
            encoding,
        });
        self.buf.extend_from_slice(stored);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.buf.len() - self.start >= TARGET_PACK_BYTES || self.entries.len() >= MAX_PACK_ENTRIES
    }

    /// Seals the pack: appends the trailer and names it by its hash.
    pub fn finish(mut self) -> Result<FinishedPack> {
        // The trailer's index names the pack it lives in, which is not known before hashing;
        // the trailer therefore carries an all-zero pack id, and readers fill it in.
        let trailer = PackIndex {
            pack: PackId([0; 32]),
            entries: self.entries.clone(),
            salt: self.salt.clone(),
        }
        .encode()?;
        self.buf.extend_from_slice(&trailer);
        self.buf
            .extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(END_MAGIC);
        let start = self.start;
        let id = PackIndex::id_of(&self.entries, self.salt.as_deref())?;
        Ok(FinishedPack {
            index: PackIndex {
                pack: id,
                entries: self.entries,
                salt: self.salt,
            },
            bytes: Bytes::from(self.buf).slice(start..),
        })
    }
}

/// A sealed pack, ready to upload.
#[derive(Debug)]
pub struct FinishedPack {
    pub index: PackIndex,
    pub bytes: Bytes,
}

/// Reads the index from a whole pack's bytes, checking the pack's own hash first.
pub fn read_trailer(id: &PackId, bytes: &[u8]) -> Result<PackIndex> {
    let n = bytes.len();
    let what = format!("pack {}", id.short());
    if n < MAGIC.len() + 12 || &bytes[..8] != MAGIC {
        return Err(Error::corrupt(format!("{what} is not a holdfast pack")));
    }
    let tlen = trailer_len(id, n as u64, &bytes[n - 12..])?;
    parse_trailer(id, n as u64, &bytes[n - 12 - tlen as usize..n - 12])
}

/// The trailer's length, from the last 12 bytes of a pack of `pack_len` bytes.
pub fn trailer_len(id: &PackId, pack_len: u64, last12: &[u8]) -> Result<u64> {
    let what = format!("pack {}", id.short());
    if pack_len < MAGIC.len() as u64 + 12 || last12.len() != 12 || &last12[4..] != END_MAGIC {
        return Err(Error::corrupt(format!("{what} is not a holdfast pack")));
    }
    let tlen = u32::from_le_bytes(last12[..4].try_into().expect("4 bytes")) as u64;
    if tlen > pack_len - 12 - MAGIC.len() as u64 {
        return Err(Error::corrupt(format!("{what} has a truncated trailer")));
    }
    Ok(tlen)
}

/// Decodes a trailer read from a pack of `pack_len` bytes and checks it against the pack's
/// name (the hash of its entries and salt) and its size.
pub fn parse_trailer(id: &PackId, pack_len: u64, trailer: &[u8]) -> Result<PackIndex> {
    let what = format!("pack {}", id.short());
    let mut index = PackIndex::decode(trailer, &what)?;
    if PackIndex::id_of(&index.entries, index.salt.as_deref())? != *id {
        return Err(Error::corrupt(format!(
            "{what} is damaged: its trailer does not match its name"
        )));
    }
    let end = pack_len - 12 - trailer.len() as u64;
    if index.entries.iter().any(|e| {
        e.offset < MAGIC.len() as u64
            || e.offset
                .checked_add(u64::from(e.length))
                .is_none_or(|e_end| e_end > end)
    }) {
        return Err(Error::corrupt(format!(
            "{what} lists a chunk outside the pack"
        )));
    }
    index.pack = *id;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk;

    #[test]
    fn the_trailer_reproduces_the_index() {
        // A finished pack's trailer lists exactly the entries of its separate index.
        let mut b = PackBuilder::new();
        for i in 0..10u8 {
            let data = vec![i; 1000 + i as usize];
            let (enc, stored) = chunk::encode(&data).unwrap();
            b.add(chunk::hash(&data), enc, &stored, data.len());
        }
        let p = b.finish().unwrap();
        assert_eq!(read_trailer(&p.index.pack, &p.bytes).unwrap(), p.index);
        for e in &p.index.entries {
            let blob = &p.bytes[e.offset as usize..(e.offset + e.length as u64) as usize];
            chunk::decode(&e.id, e.encoding, blob, e.raw_length as usize).unwrap();
        }
    }

    #[test]
    fn an_entry_whose_end_wraps_past_2_to_the_64_is_outside_the_pack() {
        // A trailer that hashes to its pack's name (anyone can make one) listing a chunk at
        // an offset near 2^64: its end must not wrap round to inside the pack.
        let entries = vec![PackEntry {
            id: chunk::hash(b"x"),
            offset: u64::MAX - 10,
            length: 100,
            raw_length: 1,
            encoding: Encoding::Raw,
        }];
        let id = PackIndex::id_of(&entries, None).unwrap();
        let trailer = PackIndex {
            pack: id,
            entries,
            salt: None,
        }
        .encode()
        .unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[0; 200]);
        bytes.extend_from_slice(&trailer);
        bytes.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        bytes.extend_from_slice(END_MAGIC);
        let e = read_trailer(&id, &bytes).unwrap_err();
        assert!(e.to_string().contains("outside the pack"), "{e}");
    }

    #[test]
    fn a_damaged_trailer_or_magic_is_refused() {
        // The trailer must match the pack's name; the framing must be intact.
        let mut b = PackBuilder::new();
        b.add(chunk::hash(b"x"), Encoding::Raw, b"x", 1);
        let p = b.finish().unwrap();
        let n = p.bytes.len();
        for at in [0, n - 13, n - 1] {
            let mut bytes = p.bytes.to_vec();
            bytes[at] ^= 1;
            assert!(
                matches!(read_trailer(&p.index.pack, &bytes), Err(Error::Corrupt(_))),
                "byte {at}"
            );
        }
        let other = PackBuilder::new().finish().unwrap();
        assert!(matches!(
            read_trailer(&other.index.pack, &p.bytes),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn salted_packs_of_the_same_chunks_have_different_names() {
        // Two salted packs of identical chunks get different names, and each trailer still
        // proves its own name (the salt travels in the trailer and the index).
        let build = |b: PackBuilder| {
            let mut b = b;
            b.add(chunk::hash(b"x"), Encoding::Raw, b"x", 1);
            b.finish().unwrap()
        };
        let (a, b) = (build(PackBuilder::salted()), build(PackBuilder::salted()));
        let plain = build(PackBuilder::new());
        assert_ne!(a.index.pack, b.index.pack);
        assert_ne!(a.index.pack, plain.index.pack);
        assert_eq!(plain.index.pack, build(PackBuilder::new()).index.pack);
        assert_eq!(read_trailer(&a.index.pack, &a.bytes).unwrap(), a.index);
        assert!(read_trailer(&b.index.pack, &a.bytes).is_err());
        let decoded = PackIndex::decode(&a.index.encode().unwrap(), "index").unwrap();
        assert_eq!(decoded, a.index);
    }
}
