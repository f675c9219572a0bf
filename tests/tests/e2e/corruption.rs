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
