//! Chunks: a block's content addressed by the BLAKE3 hash of its plain bytes, stored
//! zstd-compressed (or raw where compression does not pay).
//!
//! # Invariants
//! - [`decode`] never returns bytes whose hash differs from the expected [`ChunkId`]: every
//!   chunk is verified before it is used or committed anywhere (DESIGN.md invariant 5).

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::ChunkId;

/// zstd level for chunks: level 3 is zstd's default, the best speed/size trade for block data.
pub const ZSTD_LEVEL: i32 = 3;

/// How a chunk's bytes are encoded inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// Stored as-is (compression would not have saved space).
    Raw,
    /// One zstd frame.
    Zstd,
}

/// The id of `data`.
pub fn hash(data: &[u8]) -> ChunkId {
    ChunkId(*blake3::hash(data).as_bytes())
}

/// Whether every byte of `data` is zero (such blocks need no chunk).
pub fn is_zero(data: &[u8]) -> bool {
    // Compare 16-byte words: several times faster than byte by byte, in safe code.
    let mut words = data.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static TRIAL: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Whether `data` looks incompressible (random, already compressed or encrypted), judged
/// from the byte histogram of eight 512-byte samples. Such blocks are stored raw without
/// running zstd on them: it would spend as long as on text and then store them raw anyway.
/// A wrong guess only costs space, never correctness.
pub fn looks_incompressible(data: &[u8]) -> bool {
    const PIECES: usize = 8;
    const PIECE: usize = 512;
    if data.len() < PIECES * PIECE * 2 {
        return false;
    }
    let mut hist = [0u32; 256];
    let step = data.len() / PIECES;
    for k in 0..PIECES {
        for &b in &data[k * step..k * step + PIECE] {
            hist[b as usize] += 1;
        }
    }
    let n = (PIECES * PIECE) as f64;
    let entropy: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    // Uniform bytes give about 7.95 bits from 4096 samples; text is near 4.5.
    entropy > 7.8
}

/// Encodes a block for storage: zstd if that makes it smaller, raw otherwise.
///
/// A block whose byte histogram looks random is tried first on two 4 KiB slices at zstd's
/// fastest level: machine code, tables and packed formats have a flat histogram yet compress
/// well (about two in five such blocks of a system disk halve), while random or encrypted
/// data does not shrink at all. Only blocks that fail the trial are stored raw unread by zstd.
pub fn encode(data: &[u8]) -> Result<(Encoding, Vec<u8>)> {
    if looks_incompressible(data) && !trial_compresses(data)? {
        return Ok((Encoding::Raw, data.to_vec()));
    }
    compress(data)
}

/// Whether two 4 KiB slices of `data` (its start and its middle) shrink by a tenth or more
/// at zstd level 1.
fn trial_compresses(data: &[u8]) -> Result<bool> {
    const SLICE: usize = 4096;
    if data.len() < 2 * SLICE {
        return Ok(true);
    }
    TRIAL.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(
                zstd::bulk::Compressor::new(1)
                    .map_err(|e| Error::io("creating a zstd compressor", e))?,
            );
        }
        let comp = c.as_mut().expect("initialised above");
        let mid = data.len() / 2;
        let mut stored = 0usize;
        for slice in [&data[..SLICE], &data[mid..mid + SLICE]] {
            stored += comp
                .compress(slice)
                .map_err(|e| Error::io("compressing a trial slice", e))?
                .len();
        }
        Ok(stored * 10 < 2 * SLICE * 9)
    })
}

/// Compresses with zstd, falling back to raw when that does not make the block smaller.
pub fn compress(data: &[u8]) -> Result<(Encoding, Vec<u8>)> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(
                zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| Error::io("creating a zstd compressor", e))?,
            );
        }
        let comp = c.as_mut().expect("initialised above");
        let out = comp
            .compress(data)
            .map_err(|e| Error::io("compressing a chunk", e))?;
        if out.len() < data.len() {
            Ok((Encoding::Zstd, out))
        } else {
            Ok((Encoding::Raw, data.to_vec()))
        }
    })
}

/// Decodes a stored chunk and verifies it against `id`; `raw_len` is its plain length.
pub fn decode(id: &ChunkId, encoding: Encoding, stored: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    let mut plain = Vec::new();
    decode_into(id, encoding, stored, raw_len, &mut plain)?;
    Ok(plain)
}

/// [`decode`], appending the plain bytes to `out` (whose capacity a caller decoding many
/// chunks reuses, rather than asking the allocator for fresh pages each time). On an error
/// `out` is as it was.
pub fn decode_into(
    id: &ChunkId,
    encoding: Encoding,
    stored: &[u8],
    raw_len: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    // No chunk is longer than a block: a length from a damaged or hostile index must not
    // make room for gigabytes before anything is checked.
    if raw_len > crate::volume::MAX_BLOCK_SIZE as usize {
        return Err(Error::corrupt(format!(
            "chunk {id} is said to be {raw_len} bytes long, more than any block"
        )));
    }
    let at = out.len();
    let decoded = match encoding {
        Encoding::Raw => {
            out.extend_from_slice(stored);
            Ok(stored.len())
        }
        Encoding::Zstd => DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| Error::io("creating a zstd decompressor", e))?,
                );
            }
            out.resize(at + raw_len, 0);
            d.as_mut()
                .expect("initialised above")
                .decompress_to_buffer(stored, &mut out[at..])
                .map_err(|e| Error::corrupt(format!("chunk {id} does not decompress: {e}")))
        }),
    };
    let checked = decoded.and_then(|n| {
        if n != raw_len {
            return Err(Error::corrupt(format!(
                "chunk {id} has {n} bytes, expected {raw_len}"
            )));
        }
        let actual = hash(&out[at..at + n]);
        if actual != *id {
            return Err(Error::corrupt(format!(
                "chunk {id} is damaged: its content hashes to {}",
                actual.short()
            )));
        }
        Ok(())
    });
    if checked.is_err() {
        out.truncate(at);
    }
    checked
}

/// Pseudo-random bytes (xorshift), `len` of them from `seed`: data that does not compress,
/// for tests.
#[cfg(test)]
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        // A block is zero only if every byte is; check each position including the tail.
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        for i in [0, 15, 16, 4095, 4096, 4098] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    /// Bytes no compressor can shrink.
    fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        blake3::Hasher::new()
            .update(b"random test bytes")
            .finalize_xof()
            .fill(&mut v);
        v
    }

    #[test]
    fn the_incompressibility_guess_is_pinned_where_it_decides() {
        // The guess and the trial only ever cost space or time, never correctness (decode
        // takes either encoding); these pin what they decide, so a change is a decision.
        // Blocks from 8 KiB up are judged, from eight samples spread over the whole block.
        assert!(looks_incompressible(&random(65536)));
        assert!(looks_incompressible(&random(8192)));
        assert!(!looks_incompressible(&random(8191)));
        assert!(!looks_incompressible(&random(4096)));
        assert!(!looks_incompressible(&b"holdfast ".repeat(7000)));
        // Only the samples are read: random data with zeros where the samples are taken is
        // judged by the zeros.
        let mut spotty = random(65536);
        for k in 0..8 {
            spotty[k * 8192..k * 8192 + 512].fill(0);
        }
        assert!(!looks_incompressible(&spotty));
        // Random bytes folded into 240 values (7.88 bits of entropy) still look random, though
        // 16 byte values never occur.
        let uneven: Vec<u8> = random(65536).iter().map(|b| b % 240).collect();
        assert!(looks_incompressible(&uneven));
        assert_eq!(encode(&random(65536)).unwrap().0, Encoding::Raw);
        // The trial reads two 4 KiB slices (start and middle), not the block: a block that is
        // a 6,000-byte random tile repeated looks random there, so it is stored raw unread by
        // zstd, although zstd would find the repeats. That is the price of not reading random
        // blocks twice.
        let tiled: Vec<u8> = random(6000).iter().copied().cycle().take(65536).collect();
        assert!(looks_incompressible(&tiled));
        assert!(compress(&tiled).unwrap().1.len() < tiled.len() / 5);
        assert_eq!(encode(&tiled).unwrap().0, Encoding::Raw);
    }

    #[test]
    fn random_data_is_stored_raw_and_text_compressed() {
        // Incompressible data is not inflated; compressible data is compressed.
        let random: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let text = b"holdfast ".repeat(7000);
        let (enc, out) = encode(&text).unwrap();
        assert_eq!(enc, Encoding::Zstd);
        assert!(out.len() < text.len() / 10);
        let (_, out2) = encode(&random).unwrap();
        assert!(out2.len() <= random.len());
    }

    #[test]
    fn random_blocks_are_recognised_without_compressing_them() {
        // Random bytes are judged incompressible; text, zeros-with-noise and tables are not.
        let mut random = vec![0u8; 65536];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert!(looks_incompressible(&random));
        assert!(!looks_incompressible(
            &b"log line: status=200 ".repeat(4000)
        ));
        let table: Vec<u8> = (0..65536u32).map(|i| (i % 16) as u8).collect();
        assert!(!looks_incompressible(&table));
        assert!(!looks_incompressible(&random[..1000]));
    }

    #[test]
    fn a_flat_histogram_that_repeats_is_still_compressed() {
        // A block whose bytes are evenly spread (so the histogram calls it random) but which
        // repeats every 3,000 bytes, like a table or machine code, goes through zstd; truly
        // random bytes are stored raw.
        let unit = pseudo_random(3000, 1);
        let repeating: Vec<u8> = unit.iter().copied().cycle().take(65536).collect();
        assert!(looks_incompressible(&repeating));
        let (enc, out) = encode(&repeating).unwrap();
        assert_eq!(enc, Encoding::Zstd);
        assert!(out.len() < repeating.len() / 4, "{}", out.len());
        let random = pseudo_random(65536, 2);
        assert_eq!(encode(&random).unwrap().0, Encoding::Raw);
    }

    #[test]
    fn decode_refuses_a_damaged_chunk() {
        // Flipping one stored byte is detected as corruption, never returned as data.
        let data = b"some block content".repeat(100);
        let id = hash(&data);
        let (enc, mut stored) = encode(&data).unwrap();
        assert_eq!(decode(&id, enc, &stored, data.len()).unwrap(), data);
        let last = stored.len() - 1;
        stored[last / 2] ^= 0x40;
        let err = decode(&id, enc, &stored, data.len()).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err}");
    }

    #[test]
    fn decode_into_appends_and_leaves_the_buffer_as_it_was_on_damage() {
        let (a, b) = (b"first".repeat(300), pseudo_random(5000, 3));
        let mut out = b"kept".to_vec();
        for data in [&a, &b] {
            let (enc, stored) = encode(data).unwrap();
            decode_into(&hash(data), enc, &stored, data.len(), &mut out).unwrap();
        }
        assert_eq!(out, [&b"kept"[..], &a, &b].concat());
        let before = out.clone();
        let (enc, stored) = encode(&a).unwrap();
        let huge = crate::volume::MAX_BLOCK_SIZE as usize + 1;
        assert!(decode_into(&hash(&a), enc, &stored, huge, &mut out).is_err());
        assert!(
            out.capacity() < huge,
            "room was made for a length never checked"
        );
        for data in [&a, &b] {
            let (enc, mut stored) = encode(data).unwrap();
            // A wrong length (either way), then a damaged byte: each refused, nothing kept.
            for len in [data.len() - 1, data.len() + 1] {
                assert!(decode_into(&hash(data), enc, &stored, len, &mut out).is_err());
                assert_eq!(out, before);
            }
            let mid = stored.len() / 2;
            stored[mid] ^= 0x40;
            let err = decode_into(&hash(data), enc, &stored, data.len(), &mut out).unwrap_err();
            assert!(matches!(err, Error::Corrupt(_)), "{err}");
            assert_eq!(out, before);
        }
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            // Whatever the bytes, decode(encode(x)) == x.
            let id = hash(&data);
            let (enc, stored) = encode(&data).unwrap();
            prop_assert_eq!(decode(&id, enc, &stored, data.len()).unwrap(), data);
        }
    }
}
