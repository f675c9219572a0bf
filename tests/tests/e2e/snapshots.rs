//! Round trips: what goes in comes back bit-identical, deduplicated, with diffs that match.

use holdfast_tests::{TestNode, mixed_bytes};

fn round_trip(bytes: &[u8], block_size: &str) {
    let n = TestNode::new();
    let img = n.image("vol.img", bytes);
    n.add_volume("v", &img, block_size);
    n.snapshot("v", "s1");
    assert_eq!(n.restore("v@s1"), bytes, "size {}", bytes.len());
    n.ok(&["verify"]);
}

#[test]
fn sizes_that_are_not_a_multiple_of_the_block_size_round_trip() {
    // A short last block is stored and restored at its true length.
    round_trip(&mixed_bytes(1_000_003, 1), "4KiB");
    round_trip(&mixed_bytes(65_537, 2), "64KiB");
}

#[test]
fn tiny_empty_all_zero_and_sparse_images_round_trip() {
    // Edge sizes, and images that are mostly or entirely zero.
    round_trip(&[7u8], "4KiB");
    round_trip(&[], "4KiB");
    round_trip(&vec![0u8; 300_000], "4KiB");
    let mut sparse = vec![0u8; 2 << 20];
    sparse[1_234_567] = 1;
    sparse[5] = 9;
    round_trip(&sparse, "64KiB");
}

#[test]
fn all_zero_image_stores_no_chunks() {
    // Zero blocks need no chunk: the snapshot adds nothing to the repository.
    let n = TestNode::new();
    let img = n.image("zero.img", &vec![0u8; 1 << 20]);
    n.add_volume("z", &img, "64KiB");
    n.snapshot("z", "s");
    let s = &n.snapshots("z")[0];
    assert_eq!(s["stats"]["new-chunks"], 0);
    assert_eq!(s["stats"]["zero-blocks"], 16);
}

#[test]
fn identical_volumes_deduplicate_completely() {
    // The second volume with the same content stores no new chunks.
    let n = TestNode::new();
    let data = mixed_bytes(3 << 20, 3);
    let a = n.image("a.img", &data);
    let b = n.image("b.img", &data);
    n.add_volume("a", &a, "64KiB");
    n.add_volume("b", &b, "64KiB");
    n.snapshot("a", "s");
    n.snapshot("b", "s");
    assert!(n.snapshots("a")[0]["stats"]["new-chunks"].as_u64().unwrap() > 0);
    assert_eq!(n.snapshots("b")[0]["stats"]["new-chunks"], 0);
    assert_eq!(n.restore("b@s"), data);
}

#[test]
fn incremental_snapshot_stores_only_changed_blocks_and_diff_names_them() {
    // Change three blocks: the next snapshot adds exactly three chunks, diff reports them,
    // and both snapshots restore to their own contents.
    let n = TestNode::new();
    let mut data = mixed_bytes(1 << 20, 4);
    let img = n.image("v.img", &data);
    n.add_volume("v", &img, "4KiB");
    n.snapshot("v", "before");
    let old = data.clone();
    for (k, block) in [3usize, 4, 200].iter().enumerate() {
        for b in &mut data[block * 4096..block * 4096 + 100] {
            *b = 0xA0 + k as u8;
        }
    }
    std::fs::write(&img, &data).unwrap();
    n.snapshot("v", "after");
    let snaps = n.snapshots("v");
    assert_eq!(snaps[1]["stats"]["new-chunks"], 3);
    assert_eq!(snaps[1]["parent"], snaps[0]["id"]);
    let d = n
        .run(&["snapshot", "diff", "v@before", "v@after", "--json"])
        .json();
    assert_eq!(d["changed-blocks"], 3);
    assert_eq!(d["changed-bytes"], 3 * 4096);
    assert_eq!(d["ranges"].as_array().unwrap().len(), 2);
    assert_eq!(d["ranges"][0]["offset"], 3 * 4096);
    assert_eq!(n.restore("v@before"), old);
    assert_eq!(n.restore("v@after"), data);
}

#[test]
fn a_volume_may_grow_and_each_snapshot_keeps_its_size() {
    // Documented choice: a new image size is allowed and recorded per snapshot.
    let n = TestNode::new();
    let small = mixed_bytes(100_000, 5);
    let img = n.image("v.img", &small);
    n.add_volume("v", &img, "4KiB");
    n.snapshot("v", "small");
    let big = mixed_bytes(250_001, 6);
    std::fs::write(&img, &big).unwrap();
    n.snapshot("v", "big");
    let snaps = n.snapshots("v");
    assert_eq!(snaps[0]["size"], 100_000);
    assert_eq!(snaps[1]["size"], 250_001);
    assert_eq!(n.restore("v@small"), small);
    assert_eq!(n.restore("v@big"), big);
    let d = n
        .run(&["snapshot", "diff", "v@small", "v@big", "--json"])
        .json();
    assert_eq!(d["to-size"], 250_001);
}

#[test]
fn snapshots_resolve_by_name_id_and_id_prefix() {
    // VOLUME@SNAPSHOT accepts a name, the full id, or a unique prefix of the id.
    let n = TestNode::new();
    let img = n.image("v.img", &mixed_bytes(50_000, 7));
    n.add_volume("v", &img, "4KiB");
    let id = n.snapshot("v", "first");
    let by_name = n.run(&["snapshot", "show", "v@first", "--json"]).json();
    let by_id = n
        .run(&["snapshot", "show", &format!("v@{id}"), "--json"])
        .json();
    let by_prefix = n
        .run(&["snapshot", "show", &format!("v@{}", &id[..14]), "--json"])
        .json();
    assert_eq!(by_name["id"], id.as_str());
    assert_eq!(by_id, by_name);
    assert_eq!(by_prefix, by_name);
}

#[test]
fn delete_then_gc_reclaims_space_and_keeps_what_others_use() {
    // Deleting one of two snapshots and collecting frees its unique chunks only.
    let n = TestNode::new();
    let a = mixed_bytes(2 << 20, 8);
    let img = n.image("v.img", &a);
    n.add_volume("v", &img, "64KiB");
    n.snapshot("v", "a");
    let b = mixed_bytes(2 << 20, 9);
    std::fs::write(&img, &b).unwrap();
    n.snapshot("v", "b");
    n.ok(&["snapshot", "delete", "v@a"]);
    let gc = n.run(&["gc", "--json"]).json();
    assert!(gc["bytes-freed"].as_u64().unwrap() > 0, "{gc}");
    assert_eq!(n.restore("v@b"), b);
    n.ok(&["verify"]);
    // Nothing left to collect the second time.
    let again = n.run(&["gc", "--json"]).json();
    assert_eq!(again["bytes-freed"], 0, "{again}");
    // With every snapshot gone, gc empties the repository of packs.
    n.ok(&["snapshot", "delete", "v@b"]);
    n.ok(&["gc"]);
    assert!(holdfast_tests::pack_files(&n.state).is_empty());
    n.ok(&["volume", "remove", "v"]);
}

/// With a `frozen` hook, a snapshot loads its chunk index while its source opens, before it
/// holds the repository lock: a gc that runs meanwhile and removes every pack the index names
/// leaves the snapshot storing its blocks again (the index is checked under the lock and
/// loaded anew), never naming chunks that are gone.
#[test]
fn a_gc_while_a_snapshot_loads_its_index_leaves_the_snapshot_whole() {
    let n = TestNode::new();
    let bytes = mixed_bytes(2 << 20, 12);
    let img = n.image("v.img", &bytes);
    n.add_volume("v", &img, "64KiB");
    n.snapshot("v", "a");
    let flags = tempfile::tempdir().unwrap();
    let paused = holdfast_tests::Paused::at(
        &n,
        "snapshot-index-loaded",
        flags.path(),
        &["snapshot", "create", "v", "--name", "b", "--frozen", "true"],
    );
    n.ok(&["snapshot", "delete", "v@a"]);
    n.ok(&["gc"]);
    assert!(holdfast_tests::pack_files(&n.state).is_empty());
    let r = paused.resume();
    assert_eq!(r.code, 0, "{}", r.stderr);
    n.ok(&["verify"]);
    assert_eq!(n.restore("v@b"), bytes);
}

/// The `frozen` hook runs before the snapshot takes the repository lock, so it may run
/// `holdfast gc` (which waits for every holder of the lock) without waiting for itself.
#[test]
fn a_frozen_hook_may_run_gc() {
    let n = TestNode::new();
    let img = n.image("v.img", &mixed_bytes(1 << 20, 13));
    n.add_volume("v", &img, "64KiB");
    n.snapshot("v", "a");
    n.ok(&["snapshot", "delete", "v@a"]);
    let done = n.path("gc-done");
    // `timeout`: a gc waiting for this snapshot's lock would otherwise hold the test for the
    // hook's ten minutes.
    let hook = format!(
        "timeout 60 {} gc && touch {}",
        holdfast_tests::holdfast_bin().display(),
        done.display()
    );
    n.ok(&["snapshot", "create", "v", "--name", "b", "--frozen", &hook]);
    assert!(done.exists(), "the hook's gc did not finish");
    n.ok(&["verify"]);
    assert_eq!(n.restore("v@b"), std::fs::read(&img).unwrap());
}

#[test]
fn listings_have_json_and_the_demo_runs() {
    // Every listing speaks JSON; `demo` runs end to end in a scratch directory.
    let n = TestNode::new();
    let img = n.image("v.img", &mixed_bytes(10_000, 10));
    n.add_volume("v", &img, "4KiB");
    n.snapshot("v", "s");
    assert_eq!(n.run(&["volume", "list", "--json"]).json()[0]["name"], "v");
    assert_eq!(
        n.run(&["snapshot", "list", "v", "--json"]).json()[0]["name"],
        "s"
    );
    assert_eq!(n.run(&["verify", "--json"]).json()["snapshots"], 1);
    let demo = n.path("demo");
    let r = n.run(&["demo", "--dir", demo.to_str().unwrap(), "--size-mib", "4"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("bit-identical"), "{}", r.stderr);
    // What it says is what it did: the restored image is the sample's bytes.
    let (sample, restored) = (
        std::fs::read(demo.join("sample.img")).unwrap(),
        std::fs::read(demo.join("restored.img")).unwrap(),
    );
    assert_eq!(sample.len(), 4 << 20);
    assert!(
        sample == restored,
        "the demo's restore differs from its sample"
    );
    // Running it again replaces its own directory.
    n.ok(&["demo", "--dir", demo.to_str().unwrap(), "--size-mib", "2"]);
}

#[test]
fn two_gcs_never_run_together() {
    // gc runs alone: while another gc (or a snapshot writer) holds the repository, a gc waits
    // and changes nothing; then it runs. Two gcs started together both finish, one after the
    // other, and leave a repository that verifies.
    let n = TestNode::new();
    let img = n.image("v.img", &mixed_bytes(2 << 20, 10));
    n.add_volume("v", &img, "64KiB");
    n.snapshot("v", "a");
    std::fs::write(&img, mixed_bytes(2 << 20, 11)).unwrap();
    n.snapshot("v", "b");
    n.ok(&["snapshot", "delete", "v@a"]);
    let packs = holdfast_tests::pack_files(&n.state);

    // "Another gc": the repository lock held exclusively.
    let lock = n.state.join("repo.lock");
    let mut other = holdfast_tests::KillOnDrop(
        // -o: the lock is flock's own, not its child's, so killing flock releases it.
        std::process::Command::new("flock")
            .args(["-o", "-x"])
            .arg(&lock)
            // `cat` ends when the test's end of its stdin closes, whatever happens.
            .arg("cat")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("flock (util-linux)"),
    );
    let held = || {
        std::process::Command::new("flock")
            .args(["-n", "-s"])
            .arg(&lock)
            .arg("true")
            .status()
            .is_ok_and(|s| !s.success())
    };
    let t0 = std::time::Instant::now();
    while !held() {
        assert!(t0.elapsed().as_secs() < 10, "the lock was never taken");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // (If the test fails, the gc ends by itself once the holder above is killed.)
    let mut gc = n
        .cmd(&["gc", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("gc");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        gc.try_wait().expect("try_wait").is_none(),
        "gc ran while another held the repository"
    );
    assert_eq!(
        holdfast_tests::pack_files(&n.state),
        packs,
        "gc changed packs while another held the repository"
    );
    let _ = other.0.kill();
    let _ = other.0.wait();
    let out = gc.wait_with_output().expect("gc output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("gc --json");
    assert!(report["bytes-freed"].as_u64().unwrap() > 0, "{report}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waiting"),
        "gc said why it waited: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Two at once: both succeed, the repository verifies and restores.
    std::fs::write(&img, mixed_bytes(2 << 20, 12)).unwrap();
    n.snapshot("v", "c");
    n.ok(&["snapshot", "delete", "v@b"]);
    let both: Vec<_> = (0..2)
        .map(|_| {
            n.cmd(&["gc"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("gc")
        })
        .collect();
    for c in both {
        let out = c.wait_with_output().expect("gc");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    n.ok(&["verify"]);
    assert_eq!(n.restore("v@c"), mixed_bytes(2 << 20, 12));
}

/// A loop device, detached when dropped.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// A restore onto a block device writes every block, zeros included, over what the device
/// held (written through the device's page cache, writeback started and waited for as it
/// goes), and what lies past the snapshot's end is left alone.
#[test]
fn a_restore_onto_a_block_device_overwrites_it_zeros_included() {
    let n = TestNode::new();
    let mut bytes = mixed_bytes(8 << 20, 3);
    bytes[..1 << 20].fill(0);
    bytes[5 << 20..(5 << 20) + 300_000].fill(0);
    let img = n.image("vol.img", &bytes);
    n.add_volume("v", &img, "64KiB");
    n.snapshot("v", "s");
    let extra = 64 * 1024;
    let backing = n.path("device.img");
    std::fs::write(&backing, vec![0xAAu8; bytes.len() + extra]).unwrap();
    let attached = std::process::Command::new("losetup")
        .args(["--find", "--show", backing.to_str().unwrap()])
        .output();
    let dev = match attached {
        Ok(o) if o.status.success() => {
            LoopDevice(String::from_utf8_lossy(&o.stdout).trim().to_string())
        }
        other => {
            holdfast_tests::skipped(
                "a_restore_onto_a_block_device_overwrites_it_zeros_included",
                &format!("no loop device could be attached: {other:?}"),
            );
            return;
        }
    };
    n.ok(&["snapshot", "restore", "v@s", "--to", &dev.0, "--force"]);
    drop(dev);
    let got = std::fs::read(&backing).unwrap();
    assert!(
        got[..bytes.len()] == bytes[..],
        "the device differs from the snapshot"
    );
    assert!(
        got[bytes.len()..].iter().all(|&b| b == 0xAA),
        "the restore wrote past the snapshot's end"
    );
}
