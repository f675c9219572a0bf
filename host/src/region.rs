//! Regions of a volume: named parts of it (a partition of a disk image, or a byte range that
//! holds one LUN or one tenant's data) that a downstream can mirror alone, the block-level
//! counterpart of a qtree.
//!
//! A volume's record holds the region *definitions* (`volume region add`); each snapshot
//! records the region *map* it saw (name → byte extent), read at snapshot time, so a grown
//! partition follows. A downstream that mirrors a region receives, for each snapshot that has
//! it, a manifest of the region's blocks alone ([`slice`]): its replica is a volume of the
//! region's size whose snapshots keep the upstream's ids, so soft locks, retention and
//! incremental transfers work as for whole volumes.
//!
//! # Rules
//! - A region starts on a block of the volume; a byte range also ends on one (or at the
//!   volume's end). A partition may end inside a block (a disk's last partition usually does):
//!   the region's last block is then cut short, and the cut block is a chunk of its own
//!   ([`cut`]), so no byte outside the region leaves the upstream.
//! - Regions of a volume do not overlap, and each lies inside the volume.

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ChunkId, RegionName, VolumeName};
use crate::snapshot::Manifest;

/// Longest partition label accepted (GPT labels are 36 UTF-16 units).
const MAX_LABEL_BYTES: usize = 144;
/// Most regions a volume may have (and a snapshot's map may hold).
pub const MAX_REGIONS: usize = 256;
/// Most partition entries a GPT may claim (a standard GPT has 128), and most bytes and reads
/// a partition table may cost: the table is the guest's, and a hostile one must cost a
/// bounded amount of memory and time, never an allocation it names.
const MAX_GPT_ENTRIES: u64 = 4096;
/// Past the first MiB, the table is read in windows of this size, at most this many.
const TABLE_WINDOW: u64 = 64 << 10;
const MAX_TABLE_WINDOWS: usize = 128;
/// What is read at once from the start of the volume (the MBR, the GPT and its entries).
const TABLE_HEAD: u64 = 1 << 20;

/// How a region is found in a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum RegionDef {
    /// A fixed byte range.
    Range { offset: u64, length: u64 },
    /// Partition `number` of the volume's GPT or MBR (MBR logical partitions count from 5).
    Partition { number: u32 },
    /// The GPT partition with this label.
    PartitionLabel { label: String },
}

impl std::fmt::Display for RegionDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionDef::Range { offset, length } => {
                write!(f, "bytes {offset}..{}", offset.saturating_add(*length))
            }
            RegionDef::Partition { number } => write!(f, "partition {number}"),
            RegionDef::PartitionLabel { label } => write!(f, "partition labelled {label:?}"),
        }
    }
}

/// A named region of a volume, as defined on the volume's own node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Region {
    pub name: RegionName,
    #[serde(flatten)]
    pub def: RegionDef,
}

/// Where a region lay in one snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    /// Where it ends (extents are checked to end inside their volume before they are used;
    /// one that would overflow ends at the top of the address space, inside no volume).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// The volume's blocks that hold the region.
    pub fn blocks(&self, block_size: u32) -> Range<usize> {
        let bs = block_size as u64;
        (self.offset / bs) as usize..self.end().div_ceil(bs) as usize
    }

    /// When the region ends inside a block of a volume of `size` bytes, short of that block's
    /// end: the block's index in the volume and how many of its bytes are the region's.
    pub fn cut_tail(&self, size: u64, block_size: u32) -> Option<(usize, usize)> {
        let bs = block_size as u64;
        if self.length == 0 || self.end().is_multiple_of(bs) {
            return None;
        }
        let last = (self.end() - 1) / bs;
        let keep = (self.end() - last * bs) as usize;
        (keep < crate::snapshot::block_len(size, block_size, last)).then_some((last as usize, keep))
    }
}

/// The region map a snapshot records.
pub type RegionMap = BTreeMap<RegionName, Extent>;

/// A partition of a volume's partition table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    /// GPT only.
    pub label: Option<String>,
    pub offset: u64,
    pub length: u64,
}

/// A volume read for its partition table: its first MiB at once, the rest on demand, within
/// bounds of bytes and reads.
struct TableReader<'a, R> {
    inner: &'a mut R,
    size: u64,
    head: Vec<u8>,
    at: u64,
    /// Windows read past the head, by their start (parsers read a field at a time).
    windows: BTreeMap<u64, Vec<u8>>,
}

impl<'a, R: Read + Seek> TableReader<'a, R> {
    fn new(inner: &'a mut R) -> std::io::Result<Self> {
        let size = inner.seek(std::io::SeekFrom::End(0))?;
        inner.rewind()?;
        let mut head = vec![0u8; size.min(TABLE_HEAD) as usize];
        inner.read_exact(&mut head)?;
        Ok(TableReader {
            inner,
            size,
            head,
            at: 0,
            windows: BTreeMap::new(),
        })
    }

    /// Refuses a GPT header (primary or backup, at either sector size) that claims more
    /// entries than a partition table has, or entries outside the volume, before the parser
    /// sizes or places anything by it.
    fn check_gpt_headers(&mut self) -> std::result::Result<(), String> {
        for ss in [512u64, 4096] {
            let mut headers: Vec<(&str, [u8; 92])> = vec![];
            for (which, at) in [
                ("primary", Some(ss)),
                ("backup", (self.size / ss).checked_sub(1).map(|l| l * ss)),
            ] {
                let Some(at) = at.filter(|a| *a >= ss) else {
                    continue;
                };
                let mut h = [0u8; 92];
                if self.seek(std::io::SeekFrom::Start(at)).is_ok()
                    && self.read_exact(&mut h).is_ok()
                    && &h[..8] == b"EFI PART"
                {
                    headers.push((which, h));
                }
            }
            for (which, h) in headers {
                let u32_at =
                    |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
                let lba = u64::from_le_bytes(h[72..80].try_into().expect("8 bytes"));
                let (entries, entry_size) = (u32_at(80), u32_at(84));
                if entries as u64 > MAX_GPT_ENTRIES || !(128..=4096).contains(&entry_size) {
                    return Err(format!(
                        "has a {which} GPT header that claims {entries} partition entries of \
                         {entry_size} bytes (holdfast reads at most {MAX_GPT_ENTRIES} entries of \
                         128 to 4096 bytes)"
                    ));
                }
                if lba.checked_mul(ss).is_none_or(|b| b >= self.size) {
                    return Err(format!(
                        "has a {which} GPT header whose partition entries lie at sector {lba}, \
                         past the volume's end"
                    ));
                }
            }
        }
        self.rewind().map_err(|e| e.to_string())
    }
}

impl<R: Read + Seek> Read for TableReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.head.len() as u64 {
            let from = &self.head[self.at as usize..];
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            self.at += n as u64;
            return Ok(n);
        }
        if self.at >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let start = self.at / TABLE_WINDOW * TABLE_WINDOW;
        if !self.windows.contains_key(&start) {
            if self.windows.len() >= MAX_TABLE_WINDOWS {
                return Err(std::io::Error::other(format!(
                    "reading the partition table took more than {} MiB",
                    (MAX_TABLE_WINDOWS as u64 * TABLE_WINDOW) >> 20
                )));
            }
            let mut w = vec![0u8; TABLE_WINDOW.min(self.size - start) as usize];
            self.inner.seek(std::io::SeekFrom::Start(start))?;
            self.inner.read_exact(&mut w)?;
            self.windows.insert(start, w);
        }
        let w = &self.windows[&start];
        let from = &w[(self.at - start) as usize..];
        let n = from.len().min(buf.len());
        buf[..n].copy_from_slice(&from[..n]);
        self.at += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for TableReader<'_, R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let to = match pos {
            std::io::SeekFrom::Start(n) => Some(n),
            std::io::SeekFrom::End(d) => self.size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.at.checked_add_signed(d),
        };
        self.at = to.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range")
        })?;
        Ok(self.at)
    }
}

/// `lba * sector`, and the bytes of `sectors` sectors, when they fit in a u64.
fn bytes_of(first: u64, sectors: u64, sector_size: u64) -> Option<(u64, u64)> {
    let offset = first.checked_mul(sector_size)?;
    let length = sectors.checked_mul(sector_size)?;
    offset.checked_add(length)?;
    Some((offset, length))
}

/// Reads the GPT (512- or 4096-byte sectors), or else the MBR (512-byte sectors), of a
/// volume, at a bounded cost whatever the table says.
pub fn partitions<R: Read + Seek>(r: &mut R) -> std::result::Result<Vec<Partition>, String> {
    let mut r = TableReader::new(r).map_err(|e| format!("cannot be read: {e}"))?;
    r.check_gpt_headers()?;
    // The parsers do some arithmetic unchecked on the table's numbers: a table that makes
    // them panic is a table that cannot be read, not a crash.
    let parse_gpt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gptman::GPT::find_from(&mut r)
    }))
    .map_err(|_| "has a GPT its parser could not make sense of".to_string())?;
    let gpt_error = match parse_gpt {
        Ok(gpt) => {
            let ss = gpt.sector_size;
            let mut out = Vec::new();
            for (n, p) in gpt.iter().filter(|(_, p)| p.is_used()) {
                let range = p
                    .range()
                    .map_err(|e| format!("has a damaged GPT partition {n}: {e}"))?;
                let (offset, length) = (range.end() - range.start())
                    .checked_add(1)
                    .and_then(|sectors| bytes_of(*range.start(), sectors, ss))
                    .ok_or_else(|| format!("has a GPT partition {n} beyond any disk's size"))?;
                out.push(Partition {
                    number: n,
                    label: Some(p.partition_name.as_str().trim_end_matches('\0').to_string())
                        .filter(|l| !l.is_empty()),
                    offset,
                    length,
                });
            }
            return Ok(out);
        }
        Err(e) => e,
    };
    r.rewind().map_err(|e| e.to_string())?;
    let parse_mbr = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        mbrman::MBR::read_from(&mut r, 512)
    }))
    .map_err(|_| "has an MBR its parser could not make sense of".to_string())?;
    let mbr = match parse_mbr {
        Ok(m) => m,
        Err(mbrman::Error::InvalidSignature) => {
            return Err("it has no partition table (neither a GPT nor an MBR)".into());
        }
        Err(e) => return Err(format!("its MBR cannot be read: {e}")),
    };
    if mbr.iter().any(|(_, p)| p.sys == 0xee) {
        return Err(format!(
            "it has a protective MBR, but its GPT cannot be read: {gpt_error}"
        ));
    }
    Ok(mbr
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(n, p)| Partition {
            number: n as u32,
            label: None,
            offset: p.starting_lba as u64 * 512,
            length: p.sectors as u64 * 512,
        })
        .collect())
}

/// At `volume region add`: a byte range ends on a block, or at the volume's end. (At snapshot
/// time a range that no longer does, because the volume grew, is cut like a partition.)
pub fn check_range_end(def: &RegionDef, size: u64, block_size: u32) -> Result<()> {
    if let RegionDef::Range { offset, length } = def
        && !length.is_multiple_of(block_size as u64)
        && offset.saturating_add(*length) != size
    {
        return Err(Error::invalid(format!(
            "--length {length} is not a multiple of the volume's block size ({block_size}) and \
             the range does not end at the volume's end ({size} bytes)"
        )));
    }
    Ok(())
}

/// Checks a region definition on its own (before any volume is read).
pub fn check_def(def: &RegionDef, block_size: u32) -> Result<()> {
    let bs = block_size as u64;
    match def {
        RegionDef::Range { offset, length } => {
            if *length == 0 {
                return Err(Error::invalid("a region's --length must be more than 0"));
            }
            if !offset.is_multiple_of(bs) {
                return Err(Error::invalid(format!(
                    "--offset {offset} is not a multiple of the volume's block size ({bs}); a \
                     region starts on a block"
                )));
            }
            if offset.checked_add(*length).is_none() {
                return Err(Error::invalid("--offset plus --length overflows"));
            }
        }
        RegionDef::Partition { number } => {
            if *number == 0 {
                return Err(Error::invalid("partitions are numbered from 1"));
            }
        }
        RegionDef::PartitionLabel { label } => {
            crate::id::validate_text("partition label", label, MAX_LABEL_BYTES)?;
            if label.is_empty() {
                return Err(Error::invalid("a partition label cannot be empty"));
            }
        }
    }
    Ok(())
}

/// Where each of `regions` lies in a volume of `size` bytes now, reading its partition table
/// from `reader` when a region is a partition. The error says which region is wrong and why.
pub fn resolve<R: Read + Seek>(
    volume: &VolumeName,
    regions: &[Region],
    reader: &mut R,
    size: u64,
    block_size: u32,
) -> std::result::Result<RegionMap, String> {
    let bs = block_size as u64;
    let mut table: Option<Vec<Partition>> = None;
    let mut map = RegionMap::new();
    for r in regions {
        let it = format!("region {} of volume {volume} ({})", r.name, r.def);
        let extent = match &r.def {
            RegionDef::Range { offset, length } => Extent {
                offset: *offset,
                length: *length,
            },
            RegionDef::Partition { .. } | RegionDef::PartitionLabel { .. } => {
                if table.is_none() {
                    table = Some(partitions(reader).map_err(|e| format!("{it}: the volume {e}"))?);
                }
                let parts = table.as_ref().expect("read above");
                let mut found = parts.iter().filter(|p| match &r.def {
                    RegionDef::Partition { number } => p.number == *number,
                    RegionDef::PartitionLabel { label } => p.label.as_ref() == Some(label),
                    RegionDef::Range { .. } => false,
                });
                let (first, second) = (found.next(), found.next());
                if let (Some(a), Some(b)) = (first, second) {
                    return Err(format!(
                        "{it}: partitions {} and {} both carry that label; name the region by \
                         --partition instead",
                        a.number, b.number
                    ));
                }
                let Some(p) = first else {
                    let have: Vec<String> = parts
                        .iter()
                        .map(|p| match &p.label {
                            Some(l) => format!("{} ({l:?})", p.number),
                            None => p.number.to_string(),
                        })
                        .collect();
                    return Err(format!(
                        "{it}: the volume's partition table has no such partition (it has {})",
                        if have.is_empty() {
                            "none".to_string()
                        } else {
                            have.join(", ")
                        }
                    ));
                };
                if !p.offset.is_multiple_of(bs) {
                    return Err(format!(
                        "{it} starts at byte {}, which is not a multiple of the volume's block \
                         size ({bs}); a region starts on a block (a volume with a smaller block \
                         size can hold it)",
                        p.offset
                    ));
                }
                Extent {
                    offset: p.offset,
                    length: p.length,
                }
            }
        };
        if extent.length == 0 {
            return Err(format!("{it} is empty"));
        }
        if extent
            .offset
            .checked_add(extent.length)
            .is_none_or(|end| end > size)
        {
            return Err(format!(
                "{it} ends at byte {}, past the end of the volume ({size} bytes); did the volume \
                 shrink?",
                extent.end()
            ));
        }
        map.insert(r.name.clone(), extent);
    }
    let mut by_offset: Vec<(&RegionName, &Extent)> = map.iter().collect();
    by_offset.sort_by_key(|(_, e)| e.offset);
    for w in by_offset.windows(2) {
        if w[0].1.end() > w[1].1.offset {
            return Err(format!(
                "regions {} (bytes {}..{}) and {} (bytes {}..{}) of volume {volume} overlap; \
                 regions of a volume do not overlap",
                w[0].0,
                w[0].1.offset,
                w[0].1.end(),
                w[1].0,
                w[1].1.offset,
                w[1].1.end()
            ));
        }
    }
    Ok(map)
}

/// The chunk of a cut last block: its first `keep` bytes (`None` when they are all zeros).
pub fn cut(full: &[u8], keep: usize) -> Option<ChunkId> {
    let part = &full[..keep.min(full.len())];
    (!crate::chunk::is_zero(part)).then(|| crate::chunk::hash(part))
}

/// The manifest of `region` of a snapshot: its blocks alone, the size of the region, the same
/// id and header otherwise. `tail` replaces a cut last block (see [`Extent::cut_tail`]); without
/// it, the cut block keeps the whole block's chunk (a local restore truncates it).
pub fn slice(m: &Manifest, extent: Extent, tail: Option<Option<ChunkId>>) -> Manifest {
    // (Extents are checked to lie inside the volume; one that does not gives what lies inside.)
    let range = extent.blocks(m.block_size);
    let range = range.start.min(m.blocks.len())..range.end.min(m.blocks.len());
    let mut blocks = crate::snapshot::BlockList::with_capacity(range.len());
    blocks.extend_from(&m.blocks, range.clone());
    if let (Some(t), Some(_), false) = (
        tail,
        extent.cut_tail(m.size, m.block_size),
        range.is_empty(),
    ) {
        blocks.set(range.len() - 1, t);
    }
    Manifest {
        format: m.format,
        id: m.id,
        volume: m.volume.clone(),
        name: m.name.clone(),
        created_unix_ms: m.created_unix_ms,
        size: extent.length,
        block_size: m.block_size,
        labels: m.labels.clone(),
        parent: m.parent,
        blocks,
    }
}

/// A region's last block when the region ends inside it.
#[derive(Clone, Copy, Debug)]
pub struct CutTail {
    /// The chunk of the region's bytes of the block (`None`: they are zeros).
    pub id: Option<ChunkId>,
    /// The whole block's chunk, and how many of its bytes are the region's.
    pub full: ChunkId,
    pub keep: usize,
}

/// The plain bytes of one chunk of this node's repository, checked against its id (the
/// caller holds the repository's lock).
pub async fn read_plain(node: &crate::state::Node, id: ChunkId) -> Result<Vec<u8>> {
    let (index, _) = node
        .find_chunks(&std::collections::HashSet::from([id]))
        .await?;
    let (loc, stored) = node
        .repo
        .read_chunks(&index, &[id])
        .await?
        .pop()
        .ok_or_else(|| Error::internal("a chunk read returned nothing"))?;
    tokio::task::spawn_blocking(move || {
        crate::chunk::decode(&id, loc.encoding, &stored, loc.raw_length as usize)
    })
    .await
    .map_err(|e| Error::internal(format!("chunk decoder failed: {e}")))?
}

/// The cut last block of `extent` in a snapshot of this node, if the region ends inside a
/// block that holds data.
pub async fn cut_tail_of(
    node: &crate::state::Node,
    m: &Manifest,
    extent: Extent,
) -> Result<Option<CutTail>> {
    let Some((i, keep)) = extent.cut_tail(m.size, m.block_size) else {
        return Ok(None);
    };
    let Some(full) = m.blocks.get(i).flatten() else {
        return Ok(None);
    };
    let plain = read_plain(node, full).await?;
    Ok(Some(CutTail {
        id: cut(&plain, keep),
        full,
        keep,
    }))
}

/// [`slice`] of a snapshot of this node, with a cut last block as a region replica holds it.
pub async fn local_view(
    node: &crate::state::Node,
    m: &Manifest,
    extent: Extent,
) -> Result<Manifest> {
    let tail = cut_tail_of(node, m, extent).await?;
    Ok(slice(m, extent, tail.map(|t| t.id)))
}

/// The extent of `region` in a snapshot's map, or an error that names what there is.
pub fn extent_of(what: &str, map: &RegionMap, region: &RegionName) -> Result<Extent> {
    map.get(region).copied().ok_or_else(|| {
        Error::not_found(format!(
            "{what} has no region {region} (it has {}); regions are recorded at snapshot time",
            if map.is_empty() {
                "none".to_string()
            } else {
                map.keys()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(name: &str, offset: u64, length: u64) -> Region {
        Region {
            name: name.parse().unwrap(),
            def: RegionDef::Range { offset, length },
        }
    }

    #[test]
    fn ranges_resolve_and_bad_ones_are_refused() {
        let v: VolumeName = "v".parse().unwrap();
        let mut none = std::io::Cursor::new(vec![0u8; 0]);
        let bs = 4096;
        let ok = resolve(
            &v,
            &[range("a", 0, 8192), range("b", 8192, 4096)],
            &mut none,
            1 << 20,
            bs,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let overlap = resolve(
            &v,
            &[range("a", 0, 8192), range("b", 4096, 4096)],
            &mut none,
            1 << 20,
            bs,
        );
        assert!(overlap.unwrap_err().contains("overlap"));
        let past = resolve(&v, &[range("a", 0, 2 << 20)], &mut none, 1 << 20, bs);
        assert!(past.unwrap_err().contains("past the end"));
        let ragged = RegionDef::Range {
            offset: 0,
            length: 100,
        };
        assert!(check_range_end(&ragged, 1 << 20, bs).is_err());
        // Ending at the volume's end is fine whatever the length.
        assert!(check_range_end(&ragged, 100, bs).is_ok());
        let overflow = resolve(
            &v,
            &[range("a", u64::MAX - 4095, 8192)],
            &mut none,
            1 << 20,
            bs,
        );
        assert!(overflow.unwrap_err().contains("past the end"));
        let no_table = resolve(
            &v,
            &[Region {
                name: "p".parse().unwrap(),
                def: RegionDef::Partition { number: 1 },
            }],
            &mut std::io::Cursor::new(vec![0u8; 1 << 20]),
            1 << 20,
            bs,
        );
        assert!(
            no_table.clone().unwrap_err().contains("no partition table"),
            "{no_table:?}"
        );
        assert!(
            check_def(
                &RegionDef::Range {
                    offset: 100,
                    length: 4096
                },
                bs
            )
            .is_err()
        );
        assert!(check_def(&RegionDef::Partition { number: 0 }, bs).is_err());
    }

    #[test]
    fn a_gpt_header_that_claims_too_much_is_refused_before_it_is_parsed() {
        let mut disk = vec![0u8; 1 << 20];
        disk[512..520].copy_from_slice(b"EFI PART");
        disk[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = partitions(&mut std::io::Cursor::new(disk)).unwrap_err();
        assert!(e.contains("claims 4294967295 partition entries"), "{e}");
    }

    #[test]
    fn an_mbr_with_many_logical_partitions_far_out_is_read() {
        let size = 256u64 << 20;
        let mut disk = std::io::Cursor::new(vec![0u8; size as usize]);
        let mut mbr = mbrman::MBR::new_from(&mut disk, 512, [1, 2, 3, 4]).unwrap();
        mbr.align = 2048;
        mbr.header.partition_1.sys = 0x05;
        mbr.header.partition_1.starting_lba = 16384;
        mbr.header.partition_1.sectors = (size / 512) as u32 - 16384;
        for i in 0..20u32 {
            mbr.push(0x83, 16384 + i * 16384, 16384).unwrap();
        }
        mbr.write_into(&mut disk).unwrap();
        let parts = partitions(&mut disk).unwrap();
        assert_eq!(parts.len(), 21, "{parts:?}");
        let last = parts.iter().find(|p| p.number == 24).unwrap();
        assert_eq!(last.offset, (16384 + 19 * 16384 + 2048) * 512);
    }

    #[test]
    fn cut_tails_are_found_only_inside_a_block() {
        let e = Extent {
            offset: 8192,
            length: 5000,
        };
        assert_eq!(e.blocks(4096), 2..4);
        assert_eq!(e.cut_tail(1 << 20, 4096), Some((3, 904)));
        // The volume ends where the region does: its last block is already that short.
        assert_eq!(e.cut_tail(13192, 4096), None);
        let aligned = Extent {
            offset: 0,
            length: 8192,
        };
        assert_eq!(aligned.cut_tail(1 << 20, 4096), None);
        assert_eq!(cut(&[0u8; 4096], 100), None);
        let mut b = vec![0u8; 4096];
        b[4000] = 1;
        assert_eq!(cut(&b, 100), None, "what lies past the cut does not count");
        assert_eq!(cut(&b, 4001), Some(crate::chunk::hash(&b[..4001])));
    }
}
