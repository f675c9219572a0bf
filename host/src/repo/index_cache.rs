//! A node's cache of its repository's pack indexes, so that a command does not decode every
//! index object (zstd JSON) each time it starts: an incremental snapshot or mirror update then
//! costs time in proportion to what changed, not to the repository's size.
//!
//! The file is a log of binary records, one per pack index, each
//! `length (u32 LE) | BLAKE3 of the body (32 bytes) | body`, where the body is the pack id
//! followed by its entries (`id (32) | offset (u64) | length (u32) | raw length (u32) |
//! encoding (u8)`). New indexes are appended; the file is rewritten only when packs it names are
//! gone (after a gc). It is only a cache: pack indexes never change once written and are named
//! by their pack, so a cached one is true for as long as the repository lists it, and the
//! repository's listing decides ([`crate::repo::Repository::load_index_known`]). A record that
//! is torn or fails its checksum ends the read; what follows is read from the repository again.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};

use cap_std::fs::{Dir, OpenOptions};

use crate::chunk::Encoding;
use crate::id::{ChunkId, PackId};
use crate::repo::pack::{MAX_PACK_ENTRIES, PackEntry, PackIndex};

/// The cache's file name in the state directory.
pub const FILE: &str = "index-cache";
const ENTRY: usize = 32 + 8 + 4 + 4 + 1;

fn encode(pi: &PackIndex, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(32 + pi.entries.len() * ENTRY);
    body.extend_from_slice(&pi.pack.0);
    for e in &pi.entries {
        body.extend_from_slice(&e.id.0);
        body.extend_from_slice(&e.offset.to_le_bytes());
        body.extend_from_slice(&e.length.to_le_bytes());
        body.extend_from_slice(&e.raw_length.to_le_bytes());
        body.push(match e.encoding {
            Encoding::Raw => 0,
            Encoding::Zstd => 1,
        });
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
}

fn decode_body(body: &[u8]) -> Option<PackIndex> {
    if body.len() < 32
        || !(body.len() - 32).is_multiple_of(ENTRY)
        || (body.len() - 32) / ENTRY > MAX_PACK_ENTRIES
    {
        return None;
    }
    let pack = PackId(body[..32].try_into().ok()?);
    let entries = body[32..]
        .chunks_exact(ENTRY)
        .map(|e| {
            Some(PackEntry {
                id: ChunkId(e[..32].try_into().ok()?),
                offset: u64::from_le_bytes(e[32..40].try_into().ok()?),
                length: u32::from_le_bytes(e[40..44].try_into().ok()?),
                raw_length: u32::from_le_bytes(e[44..48].try_into().ok()?),
                encoding: match e[48] {
                    0 => Encoding::Raw,
                    1 => Encoding::Zstd,
                    _ => return None,
                },
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(PackIndex {
        pack,
        entries,
        salt: None,
    })
}

/// Walks the cache's checksummed records, handing each body to `each` until it returns `false`
/// (a body it cannot use). Returns whether the walk stopped short of the end: a torn or
/// damaged record, or a file that exists but cannot be read.
fn scan(dir: &Dir, mut each: impl FnMut(&[u8]) -> bool) -> bool {
    let mut raw = Vec::new();
    match dir.open(FILE) {
        Ok(mut f) => {
            if let Err(e) = f.read_to_end(&mut raw) {
                tracing::debug!("index cache unreadable ({e}); reading the repository's indexes");
                return true;
            }
        }
        Err(_) => return false,
    }
    let mut at = 0usize;
    while raw.len() - at >= 36 {
        let len = u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes")) as usize;
        let sum = &raw[at + 4..at + 36];
        let Some(body) = raw.get(at + 36..at + 36 + len) else {
            break;
        };
        if blake3::hash(body).as_bytes() != sum || !each(body) {
            break;
        }
        at += 36 + len;
    }
    at != raw.len()
}

/// Every pack index in the cache (none if it is missing or unreadable), and whether a torn or
/// damaged record cut the read short (then the caller rewrites it, or appends would be lost
/// behind the tear).
pub fn load(dir: &Dir) -> (HashMap<PackId, PackIndex>, bool) {
    let mut out = HashMap::new();
    let torn = scan(dir, |body| match decode_body(body) {
        Some(pi) => {
            out.insert(pi.pack, pi);
            true
        }
        None => false,
    });
    (out, torn)
}

/// What [`load_matching`] found.
#[derive(Debug, Default)]
pub struct Matches {
    /// Every pack the cache names.
    pub packs: HashSet<PackId>,
    /// The entries of `wanted` chunks, by pack.
    pub found: Vec<PackIndex>,
    /// A torn or damaged record cut the read short.
    pub torn: bool,
}

/// Looks for the `wanted` chunks in the cache without building an index of everything in it:
/// a sequential scan of the records that keeps only the entries asked for, so a mirror update
/// that needs a few hundred chunks does not hash the whole repository's chunk ids into a map.
pub fn load_matching(dir: &Dir, wanted: &HashSet<ChunkId>) -> Matches {
    let mut out = Matches::default();
    out.torn = scan(dir, |body| {
        if body.len() < 32 || !(body.len() - 32).is_multiple_of(ENTRY) {
            return false;
        }
        let pack = PackId(body[..32].try_into().expect("32 bytes"));
        let hits: Vec<&[u8]> = body[32..]
            .chunks_exact(ENTRY)
            .filter(|e| wanted.contains(&ChunkId(e[..32].try_into().expect("32 bytes"))))
            .collect();
        if !hits.is_empty() {
            // Decode only the records that hold a hit (a damaged one ends the read, as in
            // `load`).
            let mut one = pack.0.to_vec();
            for e in hits {
                one.extend_from_slice(e);
            }
            let Some(pi) = decode_body(&one) else {
                return false;
            };
            out.found.push(pi);
        }
        out.packs.insert(pack);
        true
    });
    out
}

/// Appends pack indexes read since.
pub fn append(dir: &Dir, new: &[PackIndex]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for pi in new {
        encode(pi, &mut buf);
    }
    let mut f = dir.open_with(FILE, OpenOptions::new().append(true).create(true))?;
    // One write: concurrent appenders do not interleave records (and a torn one only ends
    // the next read early).
    f.write_all(&buf)
}

/// Replaces the cache with exactly `all` (after packs were deleted).
pub fn rewrite<'a>(dir: &Dir, all: impl Iterator<Item = &'a PackIndex>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for pi in all {
        encode(pi, &mut buf);
    }
    let tmp = format!("{FILE}.tmp-{:016x}", rand::random::<u64>());
    let mut f = dir.create(&tmp)?;
    f.write_all(&buf)?;
    drop(f);
    dir.rename(&tmp, dir, FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pi(seed: u8, n: usize) -> PackIndex {
        PackIndex {
            pack: PackId([seed; 32]),
            entries: (0..n)
                .map(|i| PackEntry {
                    id: ChunkId([seed.wrapping_add(i as u8); 32]),
                    offset: i as u64 * 100,
                    length: 100,
                    raw_length: 65536,
                    encoding: if i % 2 == 0 {
                        Encoding::Zstd
                    } else {
                        Encoding::Raw
                    },
                })
                .collect(),
            salt: None,
        }
    }

    #[test]
    fn matching_keeps_only_the_wanted_chunks_and_names_every_pack() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority()).unwrap();
        append(&dir, &[pi(1, 3), pi(10, 4), pi(20, 0)]).unwrap();
        // Chunks 2 (in pack 1) and 12 (in pack 10, its third entry), and one nobody has.
        let wanted = [ChunkId([2; 32]), ChunkId([12; 32]), ChunkId([99; 32])].into();
        let m = load_matching(&dir, &wanted);
        assert!(!m.torn);
        assert_eq!(m.packs.len(), 3);
        let mut found: Vec<_> = m
            .found
            .iter()
            .flat_map(|p| {
                p.entries
                    .iter()
                    .map(move |e| (p.pack.0[0], e.id.0[0], e.offset))
            })
            .collect();
        found.sort();
        assert_eq!(found, vec![(1, 2, 100), (10, 12, 200)]);
        // A damaged tail is reported, and what came before it still counts.
        let path = tmp.path().join(FILE);
        let mut raw = std::fs::read(&path).unwrap();
        let n = raw.len();
        raw.truncate(n - 5);
        std::fs::write(&path, &raw).unwrap();
        let m = load_matching(&dir, &wanted);
        assert!(m.torn);
        assert_eq!(m.packs.len(), 2);
    }

    #[test]
    fn appends_rewrites_and_stops_at_a_torn_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority()).unwrap();
        assert!(load(&dir).0.is_empty());
        append(&dir, &[pi(1, 3), pi(2, 0)]).unwrap();
        append(&dir, &[pi(3, 5)]).unwrap();
        let (got, torn) = load(&dir);
        assert_eq!(got.len(), 3);
        assert!(!torn);
        assert_eq!(got[&PackId([3; 32])], pi(3, 5));
        rewrite(&dir, [pi(2, 0)].iter()).unwrap();
        assert_eq!(load(&dir).0.len(), 1);

        // A torn tail or a flipped byte: the good records before it still count.
        append(&dir, &[pi(4, 2), pi(5, 2)]).unwrap();
        let path = tmp.path().join(FILE);
        let mut raw = std::fs::read(&path).unwrap();
        let n = raw.len();
        raw[n - 3] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        let (got, torn) = load(&dir);
        assert!(torn);
        assert_eq!(got.len(), 2, "{:?}", got.keys());
        assert!(got.contains_key(&PackId([4; 32])));
        std::fs::write(&path, &raw[..n - 10]).unwrap();
        assert!(load(&dir).1);
        assert_eq!(load(&dir).0.len(), 2);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load(&dir).0.is_empty());
    }
}
