//! Manifest benchmark: what one mirror update spends on the block list of a 4 GiB volume of
//! 64 KiB blocks (65,536 blocks), with 1% of them changed.
//!
//! `cargo bench -p holdfast --bench manifest` prints the median of each step: encode and
//! decode of the stored form, the delta an upstream makes, and its application (with the
//! digest check) on the downstream.

use std::time::Duration;

use holdfast::id::{ChunkId, SnapshotId};
use holdfast::snapshot::{Manifest, ManifestDelta};

mod common;

const BLOCKS: usize = 65_536;
const RUNS: usize = 21;

fn time<T>(f: impl FnMut() -> T) -> Duration {
    common::median_of(RUNS, f)
}

fn main() {
    let id = |i: usize, salt: u8| {
        let mut b = [salt; 32];
        b[..8].copy_from_slice(&(i as u64).to_le_bytes());
        Some(ChunkId(*blake3::hash(&b).as_bytes()))
    };
    // One block in eight is all zeros, as on a typical image.
    let blocks: Vec<_> = (0..BLOCKS)
        .map(|i| if i % 8 == 7 { None } else { id(i, 0) })
        .collect();
    let base = Manifest {
        format: holdfast::snapshot::MANIFEST_FORMAT,
        id: SnapshotId::generate(1),
        volume: "vm1".parse().unwrap(),
        name: "base".parse().unwrap(),
        created_unix_ms: 1,
        size: BLOCKS as u64 * 65536,
        block_size: 65536,
        labels: Default::default(),
        parent: None,
        blocks: blocks.into(),
    };
    let mut next = base.clone();
    next.id = SnapshotId::generate(2);
    next.parent = Some(base.id);
    for i in (0..BLOCKS).step_by(100) {
        next.blocks.set(i, id(i, 1));
    }
    let stored = next.encode().unwrap();
    let delta = next.delta_from(&base);
    let wire = delta.encode().unwrap();
    println!(
        "{BLOCKS} blocks, {} changed: stored manifest {} bytes, delta {} bytes",
        delta.changes.len(),
        stored.len(),
        wire.len()
    );
    let row = |what: &str, d: Duration| println!("{what:<40} {:>8.3} ms", d.as_secs_f64() * 1e3);
    row("encode (stored form)", time(|| next.encode().unwrap()));
    row(
        "decode (stored form)",
        time(|| Manifest::decode(&stored, "b").unwrap()),
    );
    row("digest of the block list", time(|| next.blocks_digest()));
    row(
        "upstream: delta_from + encode",
        time(|| next.delta_from(&base).encode().unwrap()),
    );
    row(
        "downstream: decode + apply (digest check)",
        time(|| {
            ManifestDelta::decode(&wire, "b")
                .unwrap()
                .apply(&base, "b")
                .unwrap()
        }),
    );

    // The same through a local repository (page cache warm): what an update pays to read
    // its base and to commit the new manifest (write + fsync).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = holdfast::repo::Repository::local(dir.path()).unwrap();
    rt.block_on(repo.init()).unwrap();
    let vol: holdfast::id::VolumeName = "vm1".parse().unwrap();
    rt.block_on(repo.put_manifest(&vol, &next.id, stored.clone()))
        .unwrap();
    row(
        "read from a local repository",
        time(|| rt.block_on(repo.read_manifest(&vol, &next.id)).unwrap()),
    );
    let mut ids = (3..).map(SnapshotId::generate);
    row(
        "write to a local repository (fsync)",
        time(|| {
            rt.block_on(repo.put_manifest(&vol, &ids.next().unwrap(), stored.clone()))
                .unwrap()
        }),
    );
}
