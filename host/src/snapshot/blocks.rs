//! The block list of a snapshot in memory: one presence bit per block and the ids of the blocks
//! that hold data, in order. An all-zero block (a hole of a sparse image) costs a bit and a
//! quarter, whatever the volume's size: a 1 TiB sparse volume of 64 KiB blocks is 16 M blocks,
//! about 5 MiB, plus 32 bytes per block of data. This is also the layout of manifest format 2,
//! so encoding and decoding are copies.

use std::ops::Range;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::id::ChunkId;

/// Blocks per presence word.
const W: usize = 64;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct BlockList {
    /// Number of blocks.
    len: usize,
    /// Bit `i % 64` of word `i / 64` is set when block `i` holds data; bits past `len` are
    /// clear.
    words: Vec<u64>,
    /// Number of present blocks before word `w` (rank index: `get` is constant time).
    before: Vec<usize>,
    /// The ids of the present blocks, in block order.
    ids: Vec<ChunkId>,
}

impl BlockList {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty list with room for `blocks` blocks' presence bits.
    pub fn with_capacity(blocks: usize) -> Self {
        let words = blocks.div_ceil(W);
        BlockList {
            len: 0,
            words: Vec::with_capacity(words),
            before: Vec::with_capacity(words),
            ids: Vec::new(),
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of blocks that hold data.
    pub fn data_blocks(&self) -> usize {
        self.ids.len()
    }

    /// Number of all-zero blocks.
    pub fn zero_blocks(&self) -> usize {
        self.len - self.ids.len()
    }

    /// The ids of the blocks that hold data, in block order (repeats included).
    pub fn ids(&self) -> &[ChunkId] {
        &self.ids
    }

    /// Appends one block.
    pub fn push(&mut self, block: Option<ChunkId>) {
        if self.len.is_multiple_of(W) {
            self.words.push(0);
            self.before.push(self.ids.len());
        }
        if let Some(id) = block {
            *self.words.last_mut().expect("pushed above") |= 1 << (self.len % W);
            self.ids.push(id);
        }
        self.len += 1;
    }

    /// Appends `n` all-zero blocks, a word at a time.
    pub fn push_zeros(&mut self, n: usize) {
        let len = self.len + n;
        let words = len.div_ceil(W);
        self.before.resize(words, self.ids.len());
        self.words.resize(words, 0);
        self.len = len;
    }

    /// Block `i`: `None` past the end, `Some(None)` for an all-zero block.
    pub fn get(&self, i: usize) -> Option<Option<ChunkId>> {
        if i >= self.len {
            return None;
        }
        Some(self.present(i).then(|| self.ids[self.rank(i)]))
    }

    fn present(&self, i: usize) -> bool {
        self.words[i / W] & (1 << (i % W)) != 0
    }

    /// Present blocks before block `i`.
    fn rank(&self, i: usize) -> usize {
        let mask = (1u64 << (i % W)) - 1;
        self.before[i / W] + (self.words[i / W] & mask).count_ones() as usize
    }

    /// Every block in order: `None` is an all-zero block.
    pub fn iter(&self) -> Iter<'_> {
        self.iter_range(0..self.len)
    }

    /// The blocks of `range` (clipped to the list), in order.
    pub fn iter_range(&self, range: Range<usize>) -> Iter<'_> {
        let end = range.end.min(self.len);
        let at = range.start.min(end);
        Iter {
            list: self,
            at,
            end,
            rank: if at < self.len {
                self.rank(at)
            } else {
                self.ids.len()
            },
        }
    }

    /// The blocks that hold data, with their indexes, skipping holes a word at a time.
    pub fn data(&self) -> impl Iterator<Item = (usize, ChunkId)> + '_ {
        self.words.iter().enumerate().flat_map(move |(w, &word)| {
            let mut bits = word;
            let mut rank = self.before[w];
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let id = self.ids[rank];
                rank += 1;
                Some((w * W + b, id))
            })
        })
    }

    /// Runs of all-zero blocks, as ranges of block indexes, ascending.
    pub fn zero_runs(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            // Find the next zero block, then the next present one after it.
            let start = self.next(at, false)?;
            let end = self.next(start, true).unwrap_or(self.len);
            at = end;
            Some(start..end)
        })
    }

    /// The first block at or after `from` whose presence is `present`.
    fn next(&self, from: usize, present: bool) -> Option<usize> {
        let mut w = from / W;
        let mut word = self.word_as(w, present)? & (!0u64 << (from % W));
        loop {
            if word != 0 {
                let i = w * W + word.trailing_zeros() as usize;
                return (i < self.len).then_some(i);
            }
            w += 1;
            word = self.word_as(w, present)?;
        }
    }

    /// Word `w`, or its complement when looking for zero blocks.
    fn word_as(&self, w: usize, present: bool) -> Option<u64> {
        let word = *self.words.get(w)?;
        Some(if present { word } else { !word })
    }

    /// Indexes of the blocks where `self` and `other` differ, including the blocks that only
    /// one of them has; words where both lists are all zero are skipped whole.
    pub fn differing<'a>(&'a self, other: &'a BlockList) -> impl Iterator<Item = usize> + 'a {
        let n = self.len.max(other.len);
        let common = self.len.min(other.len);
        let mut a = self.iter();
        let mut b = other.iter();
        let mut i = 0;
        std::iter::from_fn(move || {
            while i < n {
                if i.is_multiple_of(W) && i + W <= common {
                    let w = i / W;
                    if self.words[w] == 0 && other.words[w] == 0 {
                        // Keep the iterators in step (constant time for a zero word).
                        a.skip_zero_word();
                        b.skip_zero_word();
                        i += W;
                        continue;
                    }
                }
                let (x, y) = (a.next(), b.next());
                i += 1;
                if x != y {
                    return Some(i - 1);
                }
            }
            None
        })
    }

    /// Appends the blocks of `src` in `range` (zeros for the part past its end), a word at a
    /// time where `src` has none.
    pub fn extend_from(&mut self, src: &BlockList, range: Range<usize>) {
        let mut i = range.start;
        let mut it = src.iter_range(range.clone());
        while i < range.end {
            if i >= src.len {
                self.push_zeros(range.end - i);
                return;
            }
            if i.is_multiple_of(W) && i + W <= range.end.min(src.len) && src.words[i / W] == 0 {
                self.push_zeros(W);
                it.skip_zero_word();
                i += W;
                continue;
            }
            self.push(it.next().expect("within the source"));
            i += 1;
        }
    }

    /// Sets block `i` (which must exist). Changing whether a block holds data moves every id
    /// after it: for tests and small edits, not for hot paths.
    pub fn set(&mut self, i: usize, block: Option<ChunkId>) {
        assert!(i < self.len, "block {i} of {}", self.len);
        let r = self.rank(i);
        match (self.present(i), block) {
            (true, Some(id)) => self.ids[r] = id,
            (false, None) => {}
            (true, None) => {
                self.ids.remove(r);
                self.words[i / W] &= !(1 << (i % W));
                self.before[i / W + 1..].iter_mut().for_each(|b| *b -= 1);
            }
            (false, Some(id)) => {
                self.ids.insert(r, id);
                self.words[i / W] |= 1 << (i % W);
                self.before[i / W + 1..].iter_mut().for_each(|b| *b += 1);
            }
        }
    }

    /// Appends manifest format 2's block list: the presence bitmap (least significant bit
    /// first, `len / 8` bytes rounded up), then the id of each present block.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let bitmap = self.len.div_ceil(8);
        out.reserve(bitmap + 32 * self.ids.len());
        let start = out.len();
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(start + bitmap);
        for id in &self.ids {
            out.extend_from_slice(&id.0);
        }
    }

    /// Reads a list of `n` blocks from format 2's presence bitmap and ids (exactly as many as
    /// the bitmap marks); `None` when they do not fit together.
    pub fn from_parts(n: usize, bitmap: &[u8], ids: &[u8]) -> Option<Self> {
        if bitmap.len() != n.div_ceil(8) || (!n.is_multiple_of(8) && bitmap[n / 8] >> (n % 8) != 0)
        {
            return None;
        }
        let mut list = BlockList::with_capacity(n);
        let mut rank = 0;
        for eight in bitmap.chunks(8) {
            let mut bytes = [0u8; 8];
            bytes[..eight.len()].copy_from_slice(eight);
            let word = u64::from_le_bytes(bytes);
            list.before.push(rank);
            list.words.push(word);
            rank += word.count_ones() as usize;
        }
        if ids.len() != rank * 32 {
            return None;
        }
        list.ids = ids
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32 bytes")))
            .collect();
        list.len = n;
        Some(list)
    }
}

/// The blocks of a [`BlockList`] in order.
pub struct Iter<'a> {
    list: &'a BlockList,
    at: usize,
    end: usize,
    /// Present blocks before `at`.
    rank: usize,
}

impl Iter<'_> {
    /// Skips the 64 blocks of a word that holds no data (the iterator is at its start).
    fn skip_zero_word(&mut self) {
        debug_assert!(self.at.is_multiple_of(W) && self.list.words[self.at / W] == 0);
        self.at += W;
    }
}

impl Iterator for Iter<'_> {
    type Item = Option<ChunkId>;

    fn next(&mut self) -> Option<Option<ChunkId>> {
        if self.at >= self.end {
            return None;
        }
        let block = self.list.present(self.at).then(|| {
            self.rank += 1;
            self.list.ids[self.rank - 1]
        });
        self.at += 1;
        Some(block)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end.saturating_sub(self.at);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a BlockList {
    type Item = Option<ChunkId>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl FromIterator<Option<ChunkId>> for BlockList {
    fn from_iter<I: IntoIterator<Item = Option<ChunkId>>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut list = BlockList::with_capacity(iter.size_hint().0);
        for b in iter {
            list.push(b);
        }
        list
    }
}

impl From<Vec<Option<ChunkId>>> for BlockList {
    fn from(v: Vec<Option<ChunkId>>) -> Self {
        v.into_iter().collect()
    }
}

impl std::fmt::Debug for BlockList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 64;
        let mut l = f.debug_list();
        l.entries(self.iter().take(SHOWN));
        if self.len > SHOWN {
            l.entry(&format_args!(
                "… {} blocks, {} with data",
                self.len,
                self.ids.len()
            ));
        }
        l.finish()
    }
}

/// Format 1 (JSON) lists one entry per block: a chunk id, or null for a zero block.
impl Serialize for BlockList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for BlockList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Option<ChunkId>>::deserialize(d).map(BlockList::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(v: &[Option<u8>]) -> Vec<Option<ChunkId>> {
        v.iter().map(|o| o.map(|n| ChunkId([n; 32]))).collect()
    }

    /// Lists with long zero stretches (so whole zero words occur) and short data runs.
    fn blocks() -> impl Strategy<Value = Vec<Option<u8>>> {
        proptest::collection::vec(
            prop_oneof![
                (0usize..200).prop_map(|n| vec![None; n]),
                proptest::collection::vec(proptest::option::of(0u8..4), 0..10),
            ],
            0..8,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn behaves_as_a_vector_of_options(a in blocks(), b in blocks(), lo in 0usize..300, hi in 0usize..300) {
            // Every operation gives what the plain vector gives, whatever the mix of holes.
            let (va, vb) = (ids(&a), ids(&b));
            let la = BlockList::from(va.clone());
            let lb = BlockList::from(vb.clone());
            prop_assert_eq!(la.len(), va.len());
            prop_assert_eq!(la.iter().collect::<Vec<_>>(), va.clone());
            for i in 0..va.len() + 2 {
                prop_assert_eq!(la.get(i), va.get(i).copied());
            }
            let range = lo.min(hi)..lo.max(hi);
            let clipped = range.start.min(va.len())..range.end.min(va.len());
            prop_assert_eq!(la.iter_range(range.clone()).collect::<Vec<_>>(), va[clipped].to_vec());
            let data: Vec<_> = va.iter().enumerate().filter_map(|(i, b)| b.map(|id| (i, id))).collect();
            prop_assert_eq!(la.data().collect::<Vec<_>>(), data);
            prop_assert_eq!(la.zero_blocks(), va.iter().filter(|b| b.is_none()).count());
            let mut runs: Vec<Range<usize>> = Vec::new();
            for (i, b) in va.iter().enumerate() {
                if b.is_none() {
                    match runs.last_mut() {
                        Some(r) if r.end == i => r.end = i + 1,
                        _ => runs.push(i..i + 1),
                    }
                }
            }
            prop_assert_eq!(la.zero_runs().collect::<Vec<_>>(), runs);
            let differ: Vec<usize> = (0..va.len().max(vb.len())).filter(|&i| va.get(i) != vb.get(i)).collect();
            prop_assert_eq!(la.differing(&lb).collect::<Vec<_>>(), differ);
            // Built by pieces (zeros a word at a time, copies of another list) or by pushes:
            // the same list, equal as values.
            let mut built = BlockList::new();
            built.extend_from(&la, 0..range.start.min(va.len()));
            built.extend_from(&lb, range.clone());
            let mut want = va[..range.start.min(va.len())].to_vec();
            want.extend((range.clone()).map(|i| vb.get(i).copied().flatten()));
            prop_assert_eq!(&built, &BlockList::from(want.clone()));
            let mut z = BlockList::from(va.clone());
            z.push_zeros(lo);
            let mut vz = va.clone();
            vz.resize(va.len() + lo, None);
            prop_assert_eq!(&z, &BlockList::from(vz));
            // Edits in place.
            if !va.is_empty() {
                let mut e = la.clone();
                let mut ve = va.clone();
                for (k, v) in vb.iter().enumerate() {
                    let i = (k * 7 + lo) % va.len();
                    e.set(i, *v);
                    ve[i] = *v;
                }
                prop_assert_eq!(&e, &BlockList::from(ve));
            }
            // Format 2's bytes round-trip.
            let mut raw = Vec::new();
            la.write_to(&mut raw);
            let (bitmap, rest) = raw.split_at(va.len().div_ceil(8));
            prop_assert_eq!(BlockList::from_parts(va.len(), bitmap, rest), Some(la.clone()));
        }
    }

    #[test]
    fn a_bitmap_that_disagrees_with_its_ids_or_length_is_refused() {
        let l = BlockList::from(ids(&[Some(1), None, Some(2)]));
        let mut raw = Vec::new();
        l.write_to(&mut raw);
        assert_eq!(raw[0], 0b101);
        assert!(BlockList::from_parts(3, &raw[..1], &raw[1..]).is_some());
        // A bit past the end, an id too many or too few, a bitmap of the wrong length.
        assert!(BlockList::from_parts(3, &[0b1101], &raw[1..]).is_none());
        assert!(BlockList::from_parts(3, &raw[..1], &raw[1..33]).is_none());
        assert!(BlockList::from_parts(3, &raw[..1], &[&raw[1..], &[0; 32][..]].concat()).is_none());
        assert!(BlockList::from_parts(9, &raw[..1], &raw[1..]).is_none());
    }

    #[test]
    fn a_terabyte_of_holes_costs_bits() {
        // 16 M blocks of 64 KiB (1 TiB), 1,024 of them data: a few MiB, not 33 bytes a block.
        let mut l = BlockList::with_capacity(1 << 24);
        for i in 0..1024u32 {
            l.push_zeros((1 << 14) - 1);
            l.push(Some(ChunkId([i as u8; 32])));
        }
        assert_eq!((l.len(), l.data_blocks()), (1 << 24, 1024));
        let bytes = l.words.capacity() * 8 + l.before.capacity() * 8 + l.ids.capacity() * 32;
        assert!(bytes < 5 << 20, "{bytes} bytes");
        assert_eq!(l.get((1 << 14) - 1), Some(Some(ChunkId([0; 32]))));
        assert_eq!(l.zero_runs().count(), 1024);
    }
}
