//! Damage in the repository is found by verify and by restore, and named precisely.

use holdfast_tests::{TestNode, mixed_bytes, pack_files};

fn damaged_node() -> (TestNode, Vec<u8>) {
    let n = TestNode::new();
    let data = mixed_bytes(600_000, 11);
    let img = n.image("v.img", &data);
    n.add_volume("v", &img, "4KiB");
    n.snapshot("v", "s");
    (n, data)
}

fn flip_byte(path: &std::path::Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_byte_is_reported_by_verify_with_snapshot_and_block() {
    // verify exits 6 and names the snapshot, the block and the chunk.
    let (n, _) = damaged_node();
    n.ok(&["verify"]);
    let packs = pack_files(&n.state);
    assert_eq!(packs.len(), 1);
    flip_byte(&packs[0], 20); // inside the first chunk, after the 8-byte magic
    let r = n.run(&["verify"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stdout.contains("DAMAGED v@s"), "{}", r.stdout);
    assert!(r.stdout.contains("blocks "), "{}", r.stdout);
    let j = n.run(&["verify", "--json"]).json();
    let damage = j["damage"].as_array().unwrap();
    assert_eq!(damage.len(), 1, "{j}");
    assert_eq!(damage[0]["snapshot"], "v@s");
    assert!(!damage[0]["blocks"].as_array().unwrap().is_empty());
    assert!(damage[0]["chunk"].is_string());
}

#[test]
fn restore_refuses_damaged_data_and_leaves_nothing_behind() {
    // A restore that meets a bad chunk fails (exit 6) and leaves no file at the destination.
    let (n, _) = damaged_node();
    flip_byte(&pack_files(&n.state)[0], 20);
    let out = n.path("out.img");
    let err = n.fails(
        &["snapshot", "restore", "v@s", "--to", out.to_str().unwrap()],
        6,
    );
    assert!(err.contains("v@s block"), "{err}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(n.path(""))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("holdfast-restore"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn a_lost_index_is_reported_and_gc_rebuilds_it_from_the_pack_trailer() {
    // Without its index a pack's chunks are missing; gc restores the index from the pack.
    let (n, data) = damaged_node();
    let index_dir = n.state.join("repo/index");
    let idx = std::fs::read_dir(&index_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&idx).unwrap();
    let r = n.run(&["verify"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stdout.contains("missing from the repository"),
        "{}",
        r.stdout
    );
    n.ok(&["gc"]);
    assert!(idx.exists());
    n.ok(&["verify"]);
    assert_eq!(n.restore("v@s"), data);
}

#[test]
fn a_corrupt_manifest_is_reported_and_gc_refuses_to_guess() {
    // An unreadable manifest is damage for verify; gc stops rather than delete live data.
    let (n, data) = damaged_node();
    let mdir = n.state.join("repo/manifests/v");
    let m = std::fs::read_dir(&mdir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let good = std::fs::read(&m).unwrap();
    std::fs::write(&m, b"not a manifest").unwrap();
    let r = n.run(&["verify"]);
    assert_eq!(r.code, 6);
    assert!(r.stdout.contains("manifest"), "{}", r.stdout);
    let packs_before = pack_files(&n.state);
    let err = n.fails(&["gc"], 6);
    assert!(err.contains("gc stopped before deleting anything"), "{err}");
    assert_eq!(pack_files(&n.state), packs_before);
    std::fs::write(&m, good).unwrap();
    assert_eq!(n.restore("v@s"), data);
}

/// The packs of a state directory or a target directory, largest first.
fn packs_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<std::path::PathBuf> = walk(dir)
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "packs"))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map_or(0, |m| m.len())));
    out
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Random bytes: stored raw (zstd does not pay), so a flipped byte decodes cleanly to wrong
/// content, and only the final hash compare can tell.
fn random_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// Invariant 5 on the mirror's receive path (issue 21, item 1): an upstream whose pack holds a
/// chunk whose bytes decode cleanly to the wrong content serves it; the downstream refuses
/// with exit 6, names the chunk, commits nothing; once the pack is repaired a rerun succeeds.
#[test]
fn a_mirror_refuses_a_chunk_that_decodes_to_the_wrong_bytes() {
    use holdfast_tests::cascade::{Peer, Tls};
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let data = random_bytes(1 << 20);
    let img = a.node.image("vm1.img", &data);
    a.node.add_volume("vm1", &img, "64KiB");
    a.node.snapshot("vm1", "s1");
    let b = Peer::new("b");
    a.serve_to(&tls, &b, "vm1", "");
    a.start();
    let pack = packs_in(&a.node.state).into_iter().next().expect("a pack");
    flip_byte(&pack, 100_000);
    let r = b.mirror_run("vm1");
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("chunk"), "{}", r.stderr);
    assert!(b.ids("vm1").is_empty(), "a damaged snapshot was committed");
    flip_byte(&pack, 100_000);
    b.mirror("vm1");
    assert!(b.node.restore("vm1@s1") == data);
}

/// Invariant 5 on the target copy: a flipped byte in a bucket's pack (decoding cleanly to the
/// wrong bytes) and a truncated manifest stop `mirror pull` with exit 6 and nothing committed;
/// repaired, the pull succeeds.
#[test]
fn a_pull_refuses_damaged_chunks_and_manifests_from_a_target() {
    let a = TestNode::new();
    let data = random_bytes(1 << 20);
    let img = a.image("v.img", &data);
    a.add_volume("v", &img, "64KiB");
    a.snapshot("v", "s1");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    a.ok(&["target", "add", "bucket", "--url", &url]);
    a.ok(&["mirror", "push", "v", "--target", "bucket"]);

    let b = TestNode::new();
    b.ok(&["target", "add", "bucket", "--url", &url]);
    let pack = packs_in(dir.path()).into_iter().next().expect("a pack");
    flip_byte(&pack, 100_000);
    let e = b.fails(&["mirror", "pull", "v", "--target", "bucket"], 6);
    assert!(e.contains("chunk"), "{e}");
    assert!(b.run(&["snapshot", "list", "v", "--json"]).code != 0 || b.snapshots("v").is_empty());
    flip_byte(&pack, 100_000);

    let manifest = walk(&dir.path().join("bucket"))
        .into_iter()
        .find(|p| p.components().any(|c| c.as_os_str() == "manifests"))
        .expect("a manifest");
    let whole = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &whole[..whole.len() / 2]).unwrap();
    let e = b.fails(&["mirror", "pull", "v", "--target", "bucket"], 6);
    assert!(e.contains("manifest"), "{e}");
    std::fs::write(&manifest, &whole).unwrap();

    b.ok(&["mirror", "pull", "v", "--target", "bucket"]);
    assert!(b.restore("v@s1") == data);
}
