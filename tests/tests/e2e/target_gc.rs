//! A target's gc against slow, paused and crashed pushes and gcs (`host/TARGETS.md`, "Why it
//! is safe"): a gc that decided long ago, a push that stalls before its manifest, a push
//! killed half-way, and random pauses longer than the grace period. After each, the target
//! verifies and every committed snapshot restores bit for bit.
//!
//! Requests are held with a fault-injecting proxy in front of moto (`holdfast_tests::proxy`),
//! processes are paused with SIGSTOP; the grace period is seconds (`HOLDFAST_TARGET_GRACE`).

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast_tests::proxy::Proxy;
use holdfast_tests::s3::S3Server;
use holdfast_tests::{Paused, Run, TestNode};
use serde_json::Value;

const MIB: usize = 1 << 20;
const PASSPHRASE: &str = "the tests' passphrase";

thread_local! {
    /// Whether this test's targets are encrypted (`target add --encrypt`): every test here
    /// runs twice, on a plain and on an encrypted target (the sealing is below the protocol,
    /// and must change nothing of it).
    static ENCRYPTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `#[test] NAME` runs `NAME()` on plain targets, and `encrypted::NAME` on encrypted ones.
macro_rules! on_plain_and_encrypted {
    ($name:ident) => {
        mod $name {
            #[test]
            fn plain() {
                super::$name()
            }
            #[test]
            fn encrypted() {
                super::ENCRYPTED.set(true);
                super::$name()
            }
        }
    };
}

/// The bytes of the object `key` of the directory target at `root`, opened with the tests'
/// passphrase if the target is encrypted.
fn object_bytes(root: &std::path::Path, key: &str) -> Vec<u8> {
    let raw = std::fs::read(root.join(key)).unwrap();
    if !ENCRYPTED.get() {
        return raw;
    }
    let config: holdfast::repo::RepoConfig =
        serde_json::from_slice(&std::fs::read(root.join("config")).unwrap()).unwrap();
    let secret = holdfast::target::keys::Secret::passphrase(PASSPHRASE);
    let enc = config.encryption.as_ref().expect("an encrypted target");
    let (master, _) = holdfast::target::keys::unlock(enc, &config.id, &secret, "test").unwrap();
    holdfast::repo::sealed::open(&master.object_key(enc.cipher("test").unwrap()), key, &raw)
        .unwrap()
}

/// `target add` arguments after the URL.
fn encrypt_args() -> &'static [&'static str] {
    if ENCRYPTED.get() { &["--encrypt"] } else { &[] }
}
const GRACE: Duration = Duration::from_secs(2);

fn random_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// A node with S3 credentials, a short grace period and a request timeout long enough for a
/// request the proxy holds.
fn node(s3: &S3Server, id: &str) -> TestNode {
    let mut n = TestNode::uninitialised();
    n.env = s3.env();
    n.env.retain(|(k, _)| k != "HOLDFAST_TARGET_TIMEOUT");
    n.env.extend([
        ("HOLDFAST_PASSPHRASE".into(), PASSPHRASE.into()),
        ("HOLDFAST_TARGET_TIMEOUT".into(), "90s".into()),
        (
            "HOLDFAST_TARGET_GRACE".into(),
            format!("{}s", GRACE.as_secs()),
        ),
    ]);
    n.ok(&["init", "--node-id", id]);
    n
}

fn add_target(n: &TestNode, endpoint: &str, bucket: &str) {
    let url = format!("s3://{bucket}/backups");
    let mut args = vec![
        "target",
        "add",
        "bucket",
        "--url",
        &url,
        "--endpoint",
        endpoint,
        "--allow-http",
    ];
    args.extend_from_slice(encrypt_args());
    n.ok(&args);
}

fn json_of(r: &Run) -> Value {
    assert_eq!(r.code, 0, "failed:\n{}", r.stderr);
    r.json()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Runs gc until it condemned something (the packs must first be a grace period old).
fn gc_until_condemned(n: &TestNode) -> Value {
    let t0 = Instant::now();
    loop {
        let r = json_of(&n.run(&["gc", "--target", "bucket", "--json"]));
        if u(&r["packs-condemned"]) > 0 {
            return r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nothing condemned: {r}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Runs gc until it deleted something (the record must first be a grace period old).
fn gc_until_deleted(n: &TestNode) -> Value {
    let t0 = Instant::now();
    loop {
        let r = json_of(&n.run(&["gc", "--target", "bucket", "--json"]));
        if u(&r["packs-deleted"]) > 0 {
            return r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nothing deleted: {r}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn spawn_json(n: &TestNode, args: &[&str]) -> Child {
    n.cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The target verifies, and holds exactly the snapshots `want` names (`vol@name`, contents),
/// each of which restores from it bit for bit, on a node that has only the URL.
fn restores_from_the_bucket(s3: &S3Server, bucket: &str, want: &[(&str, &[u8])]) {
    let fresh = node(s3, "fresh");
    add_target(&fresh, &s3.endpoint(), bucket);
    every_snapshot_restores(&fresh, want);
}

/// `n`'s target `bucket` verifies and holds exactly the snapshots of `want`, which restore.
fn every_snapshot_restores(n: &TestNode, want: &[(&str, &[u8])]) {
    let report = n.run(&["verify", "--target", "bucket", "--json"]).json();
    assert_eq!(report["damage"], serde_json::json!([]), "{report}");
    let mut volumes: Vec<&str> = want
        .iter()
        .map(|(r, _)| r.split('@').next().unwrap())
        .collect();
    volumes.dedup();
    let mut listed = Vec::new();
    for v in volumes {
        let l = n
            .run(&["snapshot", "list", v, "--target", "bucket", "--json"])
            .json();
        for s in l.as_array().unwrap() {
            listed.push(format!("{v}@{}", s["name"].as_str().unwrap()));
        }
    }
    let mut names: Vec<String> = want.iter().map(|(r, _)| r.to_string()).collect();
    names.sort();
    listed.sort();
    assert_eq!(listed, names, "the target's snapshots");
    for (reference, bytes) in want {
        let out = n.path("r.img");
        n.ok(&[
            "snapshot",
            "restore",
            reference,
            "--target",
            "bucket",
            "--to",
            out.to_str().unwrap(),
            "--force",
        ]);
        assert!(
            std::fs::read(&out).unwrap() == *bytes,
            "{reference} differs"
        );
    }
}

on_plain_and_encrypted!(a_gc_stalled_mid_delete_takes_nothing_a_push_committed);
/// Sequence A: a gc decides to delete the packs of a pruned snapshot and stalls in its first
/// delete; meanwhile a push commits a snapshot with exactly that content. The push must not
/// rely on the condemned packs (it stores the chunks again), so when the gc resumes and
/// deletes, the new snapshot is whole. (Before format 3, the push deduplicated against the
/// dead packs once the gc's lease had expired, and the gc deleted them under it.)
fn a_gc_stalled_mid_delete_takes_nothing_a_push_committed() {
    let s3 = S3Server::start();
    s3.create_bucket("gc-stall");
    let proxy = Proxy::start(s3.port);
    let a = node(&s3, "a");
    let b = node(&s3, "b");
    add_target(&a, &s3.endpoint(), "gc-stall");
    add_target(&b, &proxy.endpoint(), "gc-stall");
    let (x, y) = (random_bytes(2 * MIB), random_bytes(2 * MIB));
    let img = a.image("vm1.img", &x);
    a.add_volume("vm1", &img, "64KiB");
    a.snapshot("vm1", "s1");
    json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    std::fs::write(&img, &y).unwrap();
    a.snapshot("vm1", "s2");
    json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    a.ok(&["prune", "vm1", "--target", "bucket", "--keep-last", "1"]);
    gc_until_condemned(&b);
    std::thread::sleep(GRACE + Duration::from_millis(500));

    // b's next gc decides to delete s1's packs, and its first delete stalls.
    // (S3 deletes go as a batch: `POST ?delete` with the keys in its body.)
    let hold = proxy.hold("POST", "<Key>backups/index/");
    let gc = spawn_json(&b, &["gc", "--target", "bucket", "--json"]);
    if !hold.wait_held(Duration::from_secs(60)) {
        let r = Run::of(gc);
        panic!(
            "gc deleted nothing: {}\n{}\nrequests: {:#?}",
            r.stdout,
            r.stderr,
            proxy.requests()
        );
    }

    // Meanwhile a snapshot with s1's content is pushed and committed.
    std::fs::write(&img, &x).unwrap();
    a.snapshot("vm1", "s3");
    let r = json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    assert!(
        u(&r["chunks"]) >= 32,
        "the push relied on condemned packs: {r}"
    );

    hold.release();
    let g = json_of(&Run::of(gc));
    assert!(u(&g["packs-deleted"]) >= 1, "{g}");
    restores_from_the_bucket(&s3, "gc-stall", &[("vm1@s2", &y), ("vm1@s3", &x)]);
}

on_plain_and_encrypted!(a_push_stalled_before_its_manifest_stores_again_what_gc_deleted);
/// Sequence B: a push deduplicates against the packs of a pruned snapshot and stalls before
/// writing its manifest; gcs condemn those packs and, a grace period later, delete them; the
/// push resumes and writes its manifest. Its confirmation finds the packs condemned and
/// stores those chunks again before it reports success.
fn a_push_stalled_before_its_manifest_stores_again_what_gc_deleted() {
    let s3 = S3Server::start();
    s3.create_bucket("push-stall");
    let proxy = Proxy::start(s3.port);
    let a = node(&s3, "a");
    let b = node(&s3, "b");
    add_target(&a, &proxy.endpoint(), "push-stall");
    add_target(&b, &s3.endpoint(), "push-stall");
    let (x, y) = (random_bytes(2 * MIB), random_bytes(2 * MIB));
    let img = a.image("vm1.img", &x);
    a.add_volume("vm1", &img, "64KiB");
    a.snapshot("vm1", "s1");
    json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    std::fs::write(&img, &y).unwrap();
    a.snapshot("vm1", "s2");
    json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    a.ok(&["prune", "vm1", "--target", "bucket", "--keep-last", "1"]);

    std::fs::write(&img, &x).unwrap();
    a.snapshot("vm1", "s3");
    let hold = proxy.hold("PUT", "/push-stall/backups/manifests/");
    let push = spawn_json(
        &a,
        &["mirror", "push", "vm1", "--target", "bucket", "--json"],
    );
    assert!(hold.wait_held(Duration::from_secs(60)), "no manifest write");
    assert!(
        s3.objects("push-stall")
            .iter()
            .any(|o| o.starts_with("backups/pending/vm1/")),
        "no intent before the manifest"
    );

    gc_until_condemned(&b);
    gc_until_deleted(&b);
    hold.release();
    let r = json_of(&Run::of(push));
    assert!(
        u(&r["restored-chunks"]) >= 32,
        "the push did not store again what gc deleted: {r}"
    );
    assert_eq!(r["transferred"].as_array().unwrap().len(), 1, "{r}");
    assert!(
        !s3.objects("push-stall")
            .iter()
            .any(|o| o.starts_with("backups/pending/")),
        "the intent stayed"
    );
    restores_from_the_bucket(&s3, "push-stall", &[("vm1@s2", &y), ("vm1@s3", &x)]);
}

/// A node of a directory target `file://DIR/target`, with a grace period of `GRACE`.
fn dir_node(dir: &std::path::Path, id: &str) -> TestNode {
    let mut n = TestNode::uninitialised();
    n.env.push((
        "HOLDFAST_TARGET_GRACE".into(),
        format!("{}s", GRACE.as_secs()),
    ));
    n.env
        .push(("HOLDFAST_PASSPHRASE".into(), PASSPHRASE.into()));
    n.ok(&["init", "--node-id", id]);
    let url = format!("file://{}/target", dir.display());
    let mut args = vec!["target", "add", "bucket", "--url", &url];
    args.extend_from_slice(encrypt_args());
    n.ok(&args);
    n
}

/// vm1@s1 and vm1@s2 pushed from `a` to its target, and s1 pruned there: s1's packs are
/// unreferenced. Returns the image and the contents of s1 and s2.
fn pushed_and_pruned(a: &TestNode) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let (x, y) = (random_bytes(2 * MIB), random_bytes(2 * MIB));
    let img = a.image("vm1.img", &x);
    a.add_volume("vm1", &img, "64KiB");
    a.snapshot("vm1", "s1");
    json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    std::fs::write(&img, &y).unwrap();
    a.snapshot("vm1", "s2");
    json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    a.ok(&["prune", "vm1", "--target", "bucket", "--keep-last", "1"]);
    (img, x, y)
}

on_plain_and_encrypted!(sequence_a_on_a_directory_target);
/// Sequence A on a directory target: b's gc has decided to delete s1's packs and is held
/// before its first delete (as a SIGSTOP there would); a pushes s3 with s1's content and
/// commits it; the gc goes on and deletes. s3 must not rely on the packs the gc deletes.
fn sequence_a_on_a_directory_target() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir_node(dir.path(), "a"), dir_node(dir.path(), "b"));
    let (img, x, y) = pushed_and_pruned(&a);
    gc_until_condemned(&b);
    std::thread::sleep(GRACE + Duration::from_millis(500));
    let flags = tempfile::tempdir().unwrap();
    let gc = Paused::at(
        &b,
        "target-gc-decided",
        flags.path(),
        &["gc", "--target", "bucket", "--json"],
    );
    std::fs::write(&img, &x).unwrap();
    a.snapshot("vm1", "s3");
    let r = json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    assert!(
        u(&r["chunks"]) >= 32,
        "the push relied on condemned packs: {r}"
    );
    let g = json_of(&gc.resume());
    assert!(
        u(&g["packs-deleted"]) >= 1,
        "the held gc deleted nothing: {g}"
    );
    every_snapshot_restores(&b, &[("vm1@s2", &y), ("vm1@s3", &x)]);
}

on_plain_and_encrypted!(sequence_b_on_a_directory_target);
/// Sequence B on a directory target: a's push of s3 (s1's content) deduplicates against s1's
/// unreferenced packs and is held after its intent, before its manifest; b's gcs condemn and
/// delete those packs; the push goes on: its confirmation stores the chunks again.
fn sequence_b_on_a_directory_target() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir_node(dir.path(), "a"), dir_node(dir.path(), "b"));
    let (img, x, y) = pushed_and_pruned(&a);
    std::fs::write(&img, &x).unwrap();
    a.snapshot("vm1", "s3");
    let flags = tempfile::tempdir().unwrap();
    let push = Paused::at(
        &a,
        "target-push-before-manifest",
        flags.path(),
        &["mirror", "push", "vm1", "--target", "bucket", "--json"],
    );
    gc_until_condemned(&b);
    gc_until_deleted(&b);
    let r = json_of(&push.resume());
    assert_eq!(u(&r["chunks"]), 0, "s3 did not deduplicate: {r}");
    assert!(
        u(&r["restored-chunks"]) >= 32,
        "the push did not store again what gc deleted: {r}"
    );
    every_snapshot_restores(&b, &[("vm1@s2", &y), ("vm1@s3", &x)]);
}

on_plain_and_encrypted!(a_snapshot_is_hidden_until_its_push_confirms_it);
/// A push that deduplicated against s1's unreferenced packs is held before its manifest
/// while a gc condemns them, then held again after its manifest and before its confirmation
/// while the next gc (a grace period later) would delete them: that gc keeps them (the
/// manifest is live), the snapshot stays hidden from other nodes, and the confirmation
/// stores the condemned chunks again before the snapshot is committed.
fn a_snapshot_is_hidden_until_its_push_confirms_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir_node(dir.path(), "a"), dir_node(dir.path(), "b"));
    let (img, x, y) = pushed_and_pruned(&a);
    std::fs::write(&img, &x).unwrap();
    a.snapshot("vm1", "s3");
    let flags = tempfile::tempdir().unwrap();
    let mut push = Paused::at(
        &a,
        "target-push-before-manifest,target-push-before-confirm",
        flags.path(),
        &["mirror", "push", "vm1", "--target", "bucket", "--json"],
    );
    gc_until_condemned(&b);
    std::thread::sleep(GRACE + Duration::from_millis(500));
    push.next(flags.path(), "target-push-before-confirm");
    let listed = b
        .run(&["snapshot", "list", "vm1", "--target", "bucket", "--json"])
        .json();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "s3 is visible: {listed}"
    );
    let g = json_of(&b.run(&["gc", "--target", "bucket", "--json"]));
    assert_eq!(u(&g["packs-deleted"]), 0, "{g}");
    assert!(u(&g["packs-condemned-but-live"]) >= 1, "{g}");
    let r = json_of(&push.resume());
    assert_eq!(u(&r["chunks"]), 0, "s3 did not deduplicate: {r}");
    assert!(u(&r["restored-chunks"]) >= 32, "{r}");
    every_snapshot_restores(&b, &[("vm1@s2", &y), ("vm1@s3", &x)]);
}

on_plain_and_encrypted!(a_node_whose_clock_is_hours_fast_judges_nothing_by_it);
/// A node whose clock is three hours fast judges no age by it: its gc (grace one hour) finds
/// s1's packs seconds old by the store's clock and condemns nothing, and `target check` ages
/// an unfinished push by the store's clock too.
fn a_node_whose_clock_is_hours_fast_judges_nothing_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir_node(dir.path(), "a");
    pushed_and_pruned(&a);
    let mut b = dir_node(dir.path(), "b");
    let fast = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + Duration::from_secs(3 * 3600);
    b.env.retain(|(k, _)| k != "HOLDFAST_TARGET_GRACE");
    b.env.extend([
        ("HOLDFAST_TARGET_GRACE".into(), "1h".into()),
        ("HOLDFAST_FAKE_NOW".into(), fast.as_millis().to_string()),
    ]);
    let g = json_of(&b.run(&["gc", "--target", "bucket", "--json"]));
    assert_eq!(u(&g["packs-condemned"]), 0, "{g}");
    assert!(u(&g["packs-too-young"]) >= 1, "{g}");
    let flags = tempfile::tempdir().unwrap();
    a.snapshot("vm1", "s3");
    let push = Paused::at(
        &a,
        "target-push-before-manifest",
        flags.path(),
        &["mirror", "push", "vm1", "--target", "bucket", "--json"],
    );
    let check = json_of(&b.run(&["target", "check", "bucket", "--json"]));
    let ages: Vec<u64> = check["pending-pushes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| u(&p["age-seconds"]))
        .collect();
    assert!(ages.len() == 1 && ages[0] < 600, "{check}");
    json_of(&push.resume());
}

on_plain_and_encrypted!(a_gc_killed_between_an_index_and_its_pack_leaks_nothing);
/// A gc killed between deleting a pack's index and the pack (the order it deletes them in)
/// leaves a condemned pack without an index: the next gc reads what it holds from the pack's
/// trailer and deletes it, so nothing leaks; the snapshot that is left restores.
fn a_gc_killed_between_an_index_and_its_pack_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir_node(dir.path(), "a"), dir_node(dir.path(), "b"));
    let (_, _, y) = pushed_and_pruned(&a);
    gc_until_condemned(&b);
    let root = dir.path().join("target");
    let mut orphaned = 0;
    for record in std::fs::read_dir(root.join("gc/condemned")).unwrap() {
        let name = record.unwrap().file_name().into_string().unwrap();
        let rec: Value =
            serde_json::from_slice(&object_bytes(&root, &format!("gc/condemned/{name}"))).unwrap();
        for pack in rec["packs"].as_array().unwrap() {
            std::fs::remove_file(root.join("index").join(pack.as_str().unwrap())).unwrap();
            orphaned += 1;
        }
    }
    assert!(orphaned >= 1);
    let packs_before = std::fs::read_dir(root.join("packs"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .count();
    let g = gc_until_deleted(&b);
    assert_eq!(u(&g["packs-deleted"]), orphaned, "{g}");
    let packs_after = std::fs::read_dir(root.join("packs"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .count();
    assert_eq!(packs_after, packs_before - orphaned as usize);
    every_snapshot_restores(&b, &[("vm1@s2", &y)]);
}

on_plain_and_encrypted!(a_killed_push_is_completed_by_the_next_and_a_fenced_snapshot_is_skipped);
/// A push killed after its intent and before its manifest: the node's next push completes it
/// (the snapshot is still on the node: its manifest is written, create-only, and confirmed),
/// and the snapshot restores. Another node's push of the same snapshot id (the same volume
/// mirrored to both), after an operator gave up a push of it, finds the key fenced: it skips
/// that snapshot, says why, and writes nothing over the fence.
fn a_killed_push_is_completed_by_the_next_and_a_fenced_snapshot_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir_node(dir.path(), "a");
    let x = random_bytes(MIB);
    let img = a.image("vm1.img", &x);
    a.add_volume("vm1", &img, "64KiB");
    a.snapshot("vm1", "s1");
    let flags = tempfile::tempdir().unwrap();
    let kill_at_manifest = |n: &TestNode| {
        let push = Paused::at(
            n,
            "target-push-before-manifest",
            flags.path(),
            &["mirror", "push", "vm1", "--target", "bucket"],
        );
        push.kill();
    };
    kill_at_manifest(&a);
    let r = json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    let s1 = a.snapshot_id("vm1@s1");
    assert_eq!(
        r["finished-pending"],
        serde_json::json!([format!("vm1@{s1} committed")]),
        "{r}"
    );
    every_snapshot_restores(&a, &[("vm1@s1", &x)]);

    // s2's push is killed, and node a is "gone": b clears its pending push (fencing s2).
    let y = random_bytes(MIB);
    std::fs::write(&img, &y).unwrap();
    let s2 = a.snapshot("vm1", "s2");
    kill_at_manifest(&a);
    let b = dir_node(dir.path(), "b");
    let cleared = json_of(&b.run(&[
        "target",
        "clear-pending",
        "bucket",
        "--node",
        "a",
        "--yes",
        "--json",
    ]));
    assert_eq!(cleared[0]["outcome"], "no-manifest", "{cleared}");
    // a comes back: s2's key is fenced, so s2 is skipped; s3 is pushed.
    let z = random_bytes(MIB);
    std::fs::write(&img, &z).unwrap();
    a.snapshot("vm1", "s3");
    let r = json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    assert_eq!(r["transferred"], serde_json::json!(["vm1@s3"]), "{r}");
    let skipped = r["skipped"].as_array().unwrap();
    assert!(
        skipped.len() == 1 && skipped[0].as_str().unwrap().contains("fenced"),
        "{r}"
    );
    let fence = object_bytes(&dir.path().join("target"), &format!("manifests/vm1/{s2}"));
    assert!(fence.is_empty(), "the fence was overwritten");
    every_snapshot_restores(&a, &[("vm1@s1", &x), ("vm1@s3", &z)]);
}

on_plain_and_encrypted!(a_push_of_the_same_snapshot_leaves_the_other_nodes_intent_alone);
/// Two nodes push the same snapshot (the same volume mirrored to both; here one node's state
/// copied). The first is held after its manifest write, before its confirmation; the second
/// finds the same manifest (the conflict path), confirms it, and must not remove the first
/// one's intent (were it removed, a write of the first still on its way could land after a
/// prune, unconfirmed): the snapshot stays hidden and the push says which node it waits for;
/// once the first push goes on, it confirms the manifest and the snapshot is committed.
fn a_push_of_the_same_snapshot_leaves_the_other_nodes_intent_alone() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir_node(dir.path(), "a");
    let x = random_bytes(MIB);
    let img = a.image("vm1.img", &x);
    a.add_volume("vm1", &img, "64KiB");
    a.snapshot("vm1", "s1");
    // The twin has a's volume, snapshots and target, under its own node id.
    let twin = dir_node(dir.path(), "twin");
    let identity = std::fs::read(twin.state.join("node.json")).unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", a.state.display()))
        .arg(&twin.state)
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::write(twin.state.join("node.json"), identity).unwrap();
    let flags = tempfile::tempdir().unwrap();
    let held = Paused::at(
        &a,
        "target-push-before-confirm",
        flags.path(),
        &["mirror", "push", "vm1", "--target", "bucket", "--json"],
    );
    let r = json_of(&twin.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    assert_eq!(r["transferred"], serde_json::json!([]), "{r}");
    assert!(
        r["skipped"][0]
            .as_str()
            .is_some_and(|w| w.contains("visible once node a finishes")),
        "{r}"
    );
    let listed = twin
        .run(&["snapshot", "list", "vm1", "--target", "bucket", "--json"])
        .json();
    assert_eq!(listed, serde_json::json!([]), "visible before a finished");
    let r = json_of(&held.resume());
    assert_eq!(r["transferred"], serde_json::json!(["vm1@s1"]), "{r}");
    every_snapshot_restores(&twin, &[("vm1@s1", &x)]);
}

on_plain_and_encrypted!(a_manifest_write_that_outlives_its_push_commits_nothing);
/// A push whose process ended while its manifest write was held (a proxy, a retried request):
/// the node's next push finishes its intent, and by then gc has deleted the packs that
/// manifest names. When the held write lands at last, it must not bring up a snapshot that
/// nobody confirmed: finishing fenced the manifest's key, so the create-only write fails.
fn a_manifest_write_that_outlives_its_push_commits_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("late");
    let proxy = Proxy::start(s3.port);
    let a = node(&s3, "a");
    let b = node(&s3, "b");
    add_target(&a, &proxy.endpoint(), "late");
    add_target(&b, &s3.endpoint(), "late");
    let (x, y, z) = (random_bytes(MIB), random_bytes(MIB), random_bytes(MIB));
    let img = a.image("vm1.img", &x);
    a.add_volume("vm1", &img, "64KiB");
    a.snapshot("vm1", "s1");
    json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));

    // s2's push is killed while its manifest write is held.
    std::fs::write(&img, &y).unwrap();
    let s2 = a.snapshot("vm1", "s2");
    let hold = proxy.hold_times("PUT", &format!("/late/backups/manifests/vm1/{s2}"), 1);
    let mut push = spawn_json(&a, &["mirror", "push", "vm1", "--target", "bucket"]);
    assert!(hold.wait_held(Duration::from_secs(60)), "no manifest write");
    push.kill().unwrap();
    push.wait().unwrap();

    // s2 is gone from a; a's next push (of s3) finishes the intent without a manifest.
    a.ok(&["snapshot", "delete", "vm1@s2"]);
    std::fs::write(&img, &z).unwrap();
    a.snapshot("vm1", "s3");
    let r = json_of(&a.run(&["mirror", "push", "vm1", "--target", "bucket", "--json"]));
    assert_eq!(r["finished-pending"].as_array().unwrap().len(), 1, "{r}");
    assert!(
        r["finished-pending"][0]
            .as_str()
            .unwrap()
            .ends_with("dropped"),
        "{r}"
    );
    // s2's packs are unreferenced: gc condemns and deletes them.
    gc_until_condemned(&b);
    gc_until_deleted(&b);

    // The held write is let through now: the store refuses it (412: the key is fenced).
    let to_s2 = |p: &Proxy| -> Vec<String> {
        let key = format!("PUT /late/backups/manifests/vm1/{s2}");
        p.answered()
            .into_iter()
            .filter(|r| r.starts_with(&key))
            .collect()
    };
    let before = to_s2(&proxy).len();
    hold.release();
    let t0 = Instant::now();
    while to_s2(&proxy).len() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the held write was never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    restores_from_the_bucket(&s3, "late", &[("vm1@s1", &x), ("vm1@s3", &z)]);
    let answers = to_s2(&proxy);
    assert!(
        answers.last().unwrap().ends_with(" 412"),
        "the late write was not refused: {answers:?}"
    );
}

on_plain_and_encrypted!(unfinished_pushes_are_finished_by_their_node_or_cleared_for_a_gone_node);
/// A push killed after its intent: its snapshot stays hidden, `target check` names it, and
/// the same node's next push finishes it at once (no waiting for any lease). Another node's
/// unfinished push is finished by `target clear-pending`, refused for this node's own.
fn unfinished_pushes_are_finished_by_their_node_or_cleared_for_a_gone_node() {
    let s3 = S3Server::start();
    s3.create_bucket("pending");
    let proxy = Proxy::start(s3.port);
    let a = node(&s3, "a");
    let b = node(&s3, "b");
    add_target(&a, &proxy.endpoint(), "pending");
    add_target(&b, &proxy.endpoint(), "pending");
    for (n, vol) in [(&a, "va"), (&b, "vb")] {
        let img = n.image("v.img", &random_bytes(MIB));
        n.add_volume(vol, &img, "64KiB");
        n.snapshot(vol, "s1");
    }

    // Each push is killed while its manifest write is held; the write lands afterwards.
    let hold = proxy.hold("PUT", "/pending/backups/manifests/");
    for (n, vol) in [(&a, "va"), (&b, "vb")] {
        let mut child = spawn_json(n, &["mirror", "push", vol, "--target", "bucket"]);
        let t0 = Instant::now();
        while !proxy
            .requests()
            .iter()
            .any(|r| r.starts_with("PUT") && r.contains(&format!("manifests/{vol}/")))
        {
            assert!(t0.elapsed() < Duration::from_secs(60), "no manifest write");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    hold.release();
    let t0 = Instant::now();
    while s3
        .objects("pending")
        .iter()
        .filter(|o| o.starts_with("backups/manifests/"))
        .count()
        < 2
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the held writes never landed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let listed = |n: &TestNode, vol: &str| {
        n.run(&["snapshot", "list", vol, "--target", "bucket", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(listed(&a, "va"), 0, "an unconfirmed snapshot is visible");
    let check = json_of(&a.run(&["target", "check", "bucket", "--json"]));
    let pending = check["pending-pushes"].as_array().unwrap();
    assert_eq!(pending.len(), 2, "{check}");
    let text = a.ok(&["target", "check", "bucket"]);
    assert!(text.contains("clear-pending bucket --node b"), "{text}");

    // a's next push finishes its own at once.
    let t0 = Instant::now();
    let r = json_of(&a.run(&["mirror", "push", "va", "--target", "bucket", "--json"]));
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_eq!(r["finished-pending"].as_array().unwrap().len(), 1, "{r}");
    assert!(
        r["finished-pending"][0]
            .as_str()
            .unwrap()
            .ends_with("committed"),
        "{r}"
    );
    assert_eq!(r["kind"], "up-to-date", "{r}");
    assert_eq!(listed(&a, "va"), 1);

    // b is gone for good: a finishes b's push for it.
    let own = a.run(&["target", "clear-pending", "bucket", "--node", "a", "--yes"]);
    assert_eq!(own.code, 2, "{}", own.stderr);
    let no_yes = a.run(&["target", "clear-pending", "bucket", "--node", "b"]);
    assert_eq!(no_yes.code, 2, "{}", no_yes.stderr);
    let cleared = json_of(&a.run(&[
        "target",
        "clear-pending",
        "bucket",
        "--node",
        "b",
        "--yes",
        "--json",
    ]));
    assert_eq!(cleared.as_array().unwrap().len(), 1, "{cleared}");
    assert_eq!(cleared[0]["outcome"], "committed", "{cleared}");
    assert_eq!(listed(&a, "vb"), 1);
    assert!(
        json_of(&a.run(&["target", "check", "bucket", "--json"]))["pending-pushes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let report = a.run(&["verify", "--target", "bucket", "--json"]).json();
    assert_eq!(report["damage"], serde_json::json!([]), "{report}");
}

/// Processes that a chaos thread pauses (SIGSTOP) at random for longer than the grace period.
#[derive(Default)]
struct Chaos {
    pids: Mutex<Vec<u32>>,
    stop: AtomicBool,
    pauses: Mutex<usize>,
    /// Pushes killed at a pause point (their failure is expected).
    killed: Mutex<std::collections::HashSet<u32>>,
}

impl Chaos {
    fn run(&self, n: &TestNode, args: &[&str]) -> Run {
        let child = n
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.pids.lock().unwrap().push(pid);
        let r = Run::of(child);
        self.pids.lock().unwrap().retain(|p| *p != pid);
        if r.code != 0 && self.killed.lock().unwrap().contains(&pid) {
            return Run { code: 0, ..r };
        }
        r
    }

    fn pause_at_random(&self, grace: Duration) {
        while !self.stop.load(Ordering::Relaxed) {
            // Until the first pause lands, look often: a run of short commands must not leave
            // the test without any pause at all.
            let first = *self.pauses.lock().unwrap() == 0;
            let wait = if first {
                5
            } else {
                100 + rand::random::<u64>() % 400
            };
            std::thread::sleep(Duration::from_millis(wait));
            let pids = self.pids.lock().unwrap().clone();
            if pids.is_empty() {
                continue;
            }
            let pid = pids[rand::random::<u32>() as usize % pids.len()].to_string();
            // A process that has exited but is not yet reaped would take the signal and
            // count as a pause that paused nothing.
            let running = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|t| !t.trim_start().starts_with('Z'))
            });
            if !running {
                continue;
            }
            let stopped = std::process::Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .is_ok_and(|s| s.success());
            if !stopped {
                continue; // it ended meanwhile
            }
            *self.pauses.lock().unwrap() += 1;
            let longer = grace + Duration::from_millis(rand::random::<u64>() % 1500);
            std::thread::sleep(longer);
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid])
                .status();
        }
    }
}

/// Removes every pause flag that appears in `dir` after `grace` and up to 1.5 s more (each in
/// its own thread, so pauses overlap), counting them by pause point, until `stop`. A push
/// held at a pause point is killed instead, one time in four (recorded in `chaos.killed`):
/// the node's next push must complete what it left.
fn release_pauses(
    dir: &std::path::Path,
    grace: Duration,
    stop: &AtomicBool,
    chaos: &Chaos,
) -> BTreeMap<String, usize> {
    let mut seen = std::collections::HashSet::new();
    let mut landed = BTreeMap::new();
    std::thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !seen.insert(name.clone()) {
                    continue;
                }
                let (point, pid) = name.split_once('.').unwrap();
                let (point, pid) = (point.to_string(), pid.parse::<u32>().unwrap());
                if point.starts_with("target-push") && rand::random::<u32>().is_multiple_of(4) {
                    chaos.killed.lock().unwrap().insert(pid);
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                    *landed.entry(format!("{point} (killed)")).or_insert(0) += 1;
                }
                *landed.entry(point).or_insert(0) += 1;
                let longer = grace + Duration::from_millis(rand::random::<u64>() % 1500);
                scope.spawn(move || {
                    std::thread::sleep(longer);
                    let _ = std::fs::remove_file(e.path());
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    landed
}

/// Two nodes, each pushing two volumes, with overlapping data, to one directory target, while
/// both prune and gc it, all at once. Pushes and gcs are held at random at the steps whose
/// windows matter (a gc that has decided; a push before its manifest, and before its
/// confirmation) for longer than the grace period (1 s), or killed there, and any process is
/// also paused at random (SIGSTOP): every command not killed succeeds, after every round the
/// target verifies and every committed snapshot restores bit for bit, and at the end each
/// node's next push has completed every push that was killed.
#[test]
fn pushes_and_gcs_paused_at_random_lose_nothing() {
    paused_at_random_on(false);
}

/// The same on an encrypted directory target.
#[test]
fn pushes_and_gcs_paused_at_random_lose_nothing_when_encrypted() {
    paused_at_random_on(true);
}

fn paused_at_random_on(encrypted: bool) {
    const ROUNDS: usize = 6;
    const BLOCK: usize = 64 << 10;
    const GRACE_HERE: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let flags = tempfile::tempdir().unwrap();
    let url = format!("file://{}/target", dir.path().display());
    let mut nodes: Vec<TestNode> = (0..2)
        .map(|i| {
            let mut n = TestNode::uninitialised();
            n.env.extend([
                ("HOLDFAST_TARGET_GRACE".into(), "1s".into()),
                (
                    "HOLDFAST_PAUSE_AT".into(),
                    "target-gc-decided@50,target-push-before-manifest@50,\
                     target-push-before-confirm@50"
                        .into(),
                ),
                (
                    "HOLDFAST_PAUSE_DIR".into(),
                    flags.path().display().to_string(),
                ),
            ]);
            n.ok(&["init", "--node-id", &format!("n{i}")]);
            if encrypted {
                n.env
                    .push(("HOLDFAST_PASSPHRASE".into(), "the tests' passphrase".into()));
                n.ok(&["target", "add", "bucket", "--url", &url, "--encrypt"]);
            } else {
                n.ok(&["target", "add", "bucket", "--url", &url]);
            }
            n
        })
        .collect();
    let volumes = |i: usize| [format!("v{i}a"), format!("v{i}b")];
    // Each snapshot holds new blocks, or (half the time, from the third round on) the content
    // of a snapshot of any volume at least two rounds old, which keep-last 1 has pruned:
    // pushes keep meeting the packs that gcs are condemning and deleting (sequence A and B).
    let history: Mutex<Vec<(usize, Vec<u8>)>> = Mutex::new(Vec::new());
    let content_for = |round: usize| -> Vec<u8> {
        let h = history.lock().unwrap();
        let old: Vec<&Vec<u8>> = h
            .iter()
            .filter(|(r, _)| r + 2 <= round)
            .map(|(_, b)| b)
            .collect();
        if !old.is_empty() && rand::random::<bool>() {
            old[rand::random::<u32>() as usize % old.len()].clone()
        } else {
            random_bytes(16 * BLOCK)
        }
    };
    let chaos = Arc::new(Chaos::default());
    let pauser = {
        let c = chaos.clone();
        std::thread::spawn(move || c.pause_at_random(GRACE_HERE))
    };
    let stop = Arc::new(AtomicBool::new(false));
    let releaser = {
        let (stop, dir, chaos) = (stop.clone(), flags.path().to_path_buf(), chaos.clone());
        std::thread::spawn(move || release_pauses(&dir, GRACE_HERE, &stop, &chaos))
    };
    let content: Mutex<BTreeMap<String, Vec<u8>>> = Mutex::new(BTreeMap::new());
    for round in 0..ROUNDS {
        std::thread::scope(|scope| {
            for (i, n) in nodes.iter().enumerate() {
                let (chaos, content, history, content_for) =
                    (&chaos, &content, &history, &content_for);
                for vol in volumes(i) {
                    scope.spawn(move || {
                        let img = n.path(&format!("{vol}.img"));
                        let bytes = content_for(round);
                        history.lock().unwrap().push((round, bytes.clone()));
                        std::fs::write(&img, &bytes).unwrap();
                        if round == 0 {
                            n.add_volume(&vol, &img, "64KiB");
                        }
                        let name = format!("r{round}");
                        n.snapshot(&vol, &name);
                        content
                            .lock()
                            .unwrap()
                            .insert(format!("{vol}@{name}"), bytes);
                        let r = chaos.run(n, &["mirror", "push", &vol, "--target", "bucket"]);
                        assert_eq!(r.code, 0, "push {vol}: {}", r.stderr);
                    });
                }
                scope.spawn(move || {
                    for vol in volumes(i) {
                        let args = ["prune", &vol, "--target", "bucket", "--keep-last", "1"];
                        let r = chaos.run(n, &args);
                        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
                    }
                    let r = chaos.run(n, &["gc", "--target", "bucket"]);
                    assert_eq!(r.code, 0, "gc: {}", r.stderr);
                });
            }
        });
        // Every committed snapshot of every volume restores bit for bit.
        let n = &nodes[0];
        let report = n.run(&["verify", "--target", "bucket", "--json"]).json();
        assert_eq!(
            report["damage"],
            serde_json::json!([]),
            "round {round}: {report}"
        );
        for vol in (0..2).flat_map(volumes) {
            let listed = n
                .run(&["snapshot", "list", &vol, "--target", "bucket", "--json"])
                .json();
            for s in listed.as_array().unwrap() {
                let reference = format!("{vol}@{}", s["name"].as_str().unwrap());
                let out = n.path("restored.img");
                n.ok(&[
                    "snapshot",
                    "restore",
                    &reference,
                    "--target",
                    "bucket",
                    "--to",
                    out.to_str().unwrap(),
                    "--force",
                ]);
                let want = content.lock().unwrap()[&reference].clone();
                assert!(
                    std::fs::read(&out).unwrap() == want,
                    "round {round}: {reference} differs"
                );
            }
        }
    }
    chaos.stop.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    pauser.join().unwrap();
    let landed = releaser.join().unwrap();
    assert!(*chaos.pauses.lock().unwrap() > 0, "nothing was paused");
    for point in [
        "target-gc-decided",
        "target-push-before-manifest",
        "target-push-before-confirm",
    ] {
        assert!(
            landed.get(point).is_some_and(|n| *n > 0),
            "no pause at {point}: {landed:?}"
        );
    }
    assert!(
        landed.keys().any(|k| k.ends_with("(killed)")),
        "no push was killed: {landed:?}"
    );
    eprintln!("pauses at protocol steps: {landed:?}");
    // Each node's next push completes what its killed pushes left.
    let mut want = Vec::new();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.env.retain(|(k, _)| k != "HOLDFAST_PAUSE_AT");
        for vol in volumes(i) {
            n.ok(&["mirror", "push", &vol, "--target", "bucket"]);
            let listed = n
                .run(&["snapshot", "list", &vol, "--target", "bucket", "--json"])
                .json();
            for s in listed.as_array().unwrap() {
                want.push(format!("{vol}@{}", s["name"].as_str().unwrap()));
            }
        }
    }
    let check = json_of(&nodes[0].run(&["target", "check", "bucket", "--json"]));
    assert_eq!(check["pending-pushes"], serde_json::json!([]), "{check}");
    let content = content.into_inner().unwrap();
    let want: Vec<(&str, &[u8])> = want
        .iter()
        .map(|r| (r.as_str(), content[r].as_slice()))
        .collect();
    every_snapshot_restores(&nodes[0], &want);
}
