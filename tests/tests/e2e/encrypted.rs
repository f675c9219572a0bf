//! Encrypted targets (`target add --encrypt`): a bucket (moto on 127.0.0.1) and a directory
//! hold nothing readable, open only with the passphrase or key file, and report every change
//! to what they hold.

use std::path::{Path, PathBuf};

use holdfast_tests::TestNode;
use holdfast_tests::s3::S3Server;
use serde_json::Value;

const MIB: usize = 1 << 20;
const BLOCK: usize = 64 << 10;
const PASS: &str = "correct horse battery staple";

/// An image whose every block is random but for a marker string in it, so that a plain target
/// holds the marker literally (zstd keeps it as a literal) and the scan below can find it.
fn marked_image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut img: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for (i, block) in img.chunks_mut(BLOCK).enumerate() {
        let mark = format!("holdfast-secret-text-{i:06}");
        block[100..100 + mark.len()].copy_from_slice(mark.as_bytes());
    }
    img
}

/// The plain BLAKE3 ids of the image's blocks (as bytes and as hex).
fn chunk_ids(img: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    img.chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| {
            let h = blake3::hash(b);
            (h.as_bytes().to_vec(), h.to_hex().as_bytes().to_vec())
        })
        .collect()
}

/// What of `needles` occurs in any of `objects` (name, bytes).
fn leaks(objects: &[(String, Vec<u8>)], needles: &[Vec<u8>]) -> Vec<String> {
    let mut found = Vec::new();
    for (name, bytes) in objects {
        for n in needles {
            if bytes.windows(n.len()).any(|w| w == n.as_slice()) {
                found.push(format!("{name} holds {:?}", String::from_utf8_lossy(n)));
                break;
            }
        }
    }
    found
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn dir_objects(dir: &Path) -> Vec<(String, Vec<u8>)> {
    walk(dir)
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Every object of a bucket with its bytes (hex over the Python helper's stdout).
fn bucket_objects(s3: &S3Server, bucket: &str) -> Vec<(String, Vec<u8>)> {
    let out = s3.python(
        r#"
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[4]):
    for o in page.get("Contents", []):
        body = s3.get_object(Bucket=sys.argv[4], Key=o["Key"])["Body"].read()
        print(o["Key"], body.hex())
"#,
        &[bucket],
    );
    out.lines()
        .map(|l| {
            let (k, h) = l.split_once(' ').unwrap_or((l, ""));
            (k.to_string(), hex_decode(h))
        })
        .collect()
}

fn hex_decode(h: &str) -> Vec<u8> {
    (0..h.len() / 2)
        .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn node_with(env: &[(String, String)], extra: &[(&str, &str)]) -> TestNode {
    let mut n = TestNode::new();
    n.env = env.to_vec();
    for (k, v) in extra {
        n.env.push((k.to_string(), v.to_string()));
    }
    n
}

fn add_bucket(n: &TestNode, s3: &S3Server, bucket: &str, more: &[&str]) -> holdfast_tests::Run {
    let url = format!("s3://{bucket}/enc");
    let endpoint = s3.endpoint();
    let mut args = vec![
        "target",
        "add",
        "bucket",
        "--url",
        &url,
        "--endpoint",
        &endpoint,
        "--allow-http",
        "--json",
    ];
    args.extend_from_slice(more);
    n.run(&args)
}

fn push(n: &TestNode, volume: &str, target: &str) -> Value {
    let r = n.run(&["mirror", "push", volume, "--target", target, "--json"]);
    assert_eq!(r.code, 0, "push failed:\n{}", r.stderr);
    r.json()
}

fn target_ids(n: &TestNode, volume: &str, target: &str) -> Vec<String> {
    n.run(&["snapshot", "list", volume, "--target", target, "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn restore(n: &TestNode, snap: &str, target: &str, to: &Path) -> holdfast_tests::Run {
    n.run(&[
        "snapshot",
        "restore",
        snap,
        "--target",
        target,
        "--to",
        to.to_str().unwrap(),
    ])
}

/// Tests 1 and 5 of the issue, and what works on a plain target works on an encrypted one:
/// baseline and incremental pushes to a bucket (passphrase) and a directory (key file), no
/// object holding the volume's text or any chunk's plain id (where a plain directory target
/// of the same volume holds both), verify, prune with a lock, gc, and on a brand-new node with
/// only the URL, the credentials and the secret: list, restore bit-identical, pull.
#[test]
fn encrypted_targets_hold_nothing_readable_and_restore_anywhere() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-enc");
    let mut env = s3.env();
    env.push(("HOLDFAST_TARGET_GRACE".into(), "0s".into()));
    let a = node_with(&env, &[("HOLDFAST_PASSPHRASE", PASS)]);
    let bytes = marked_image(3 * MIB, 21);
    let img = a.image("vm1.img", &bytes);
    a.add_volume("vm1", &img, "64KiB");
    let r = add_bucket(&a, &s3, "holdfast-enc", &["--encrypt"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["encrypted"], true, "{}", r.stdout);
    // Sealed with the machine's preferred cipher; the directory target below with the other
    // one, so that both are pushed, verified, pruned, pulled and restored here.
    let preferred = r.json()["cipher"].as_str().unwrap().to_string();
    let other = if preferred == "aes-256-gcm" {
        "chacha20-poly1305"
    } else {
        assert_eq!(preferred, "chacha20-poly1305");
        "aes-256-gcm"
    };
    let key = a.path("disk.key");
    a.ok(&["key", "new", key.to_str().unwrap()]);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions())
            & 0o777,
        0o600
    );
    let dir = tempfile::tempdir().unwrap();
    let disk_url = format!("file://{}/enc", dir.path().display());
    let plain_url = format!("file://{}/plain", dir.path().display());
    a.ok(&[
        "target",
        "add",
        "disk",
        "--url",
        &disk_url,
        "--encrypt",
        "--key-file",
        key.to_str().unwrap(),
        "--cipher",
        other,
    ]);
    a.ok(&["target", "add", "plain", "--url", &plain_url]);
    let config = std::fs::read_to_string(dir.path().join("enc/config")).unwrap();
    assert!(
        config.contains(&format!("\"{other}-stream-64k\"")),
        "{config}"
    );
    // A cipher for a plain target, or one holdfast does not know: refused, nothing made.
    for (args, says) in [
        (&["--cipher", other][..], "--encrypt"),
        (
            &["--encrypt", "--cipher", "rot13"][..],
            "aes-256-gcm, chacha20-poly1305",
        ),
    ] {
        let url = format!("file://{}/refused", dir.path().display());
        let r = a.run(&[&["target", "add", "refused", "--url", &url][..], args].concat());
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(says), "{}", r.stderr);
        assert!(!dir.path().join("refused").exists());
    }
    let listed = a.ok(&["target", "list"]);
    assert!(listed.contains("(encrypted)"), "{listed}");

    a.snapshot("vm1", "s1");
    for t in ["bucket", "disk", "plain"] {
        assert_eq!(push(&a, "vm1", t)["kind"], "baseline");
    }
    // Change a few blocks (new marked text) and push incrementally.
    let mut bytes2 = bytes.clone();
    for i in [3usize, 17, 30] {
        let mark = format!("holdfast-changed-text-{i:04}");
        let at = i * BLOCK + 4000;
        bytes2[at..at + mark.len()].copy_from_slice(mark.as_bytes());
    }
    std::fs::write(&img, &bytes2).unwrap();
    a.snapshot("vm1", "s2");
    for t in ["bucket", "disk", "plain"] {
        let r = push(&a, "vm1", t);
        assert_eq!(r["kind"], "incremental", "{r}");
        assert!(r["chunks"].as_u64().unwrap() <= 3, "{r}");
    }
    a.ok(&[
        "lock",
        "add",
        "vm1@s1",
        "--target",
        "bucket",
        "--holder",
        "app:secret-holder-name",
        "--type",
        "application",
        "--value",
        "secret-lock-value",
    ]);

    // Nothing readable: the marked text, the chunks' plain ids (bytes and hex), the lock's
    // value. The plain target holds them, so the scan can find them.
    let mut needles: Vec<Vec<u8>> = vec![
        b"holdfast-secret-text-000007".to_vec(),
        b"holdfast-changed-text-0017".to_vec(),
        b"secret-lock-value".to_vec(),
    ];
    for (raw, hex) in chunk_ids(&bytes).into_iter().chain(chunk_ids(&bytes2)) {
        needles.push(raw);
        needles.push(hex);
    }
    let plain = dir_objects(&dir.path().join("plain"));
    let found = leaks(&plain, &needles);
    assert!(
        found.iter().any(|f| f.contains("secret-text")) && found.len() > 3,
        "the plain target should hold the text and ids: {found:?}"
    );
    let bucket = bucket_objects(&s3, "holdfast-enc");
    assert!(bucket.len() > 5, "{}", bucket.len());
    assert_eq!(leaks(&bucket, &needles), Vec::<String>::new());
    let disk = dir_objects(&dir.path().join("enc"));
    assert_eq!(leaks(&disk, &needles), Vec::<String>::new());
    // Only the config is clear, and it holds wrapped keys, never the passphrase.
    let config = &bucket.iter().find(|(k, _)| k == "enc/config").unwrap().1;
    let config = String::from_utf8_lossy(config);
    assert!(
        config.contains("\"slots\"") && config.contains("argon2id"),
        "{config}"
    );
    assert!(!config.contains(PASS));
    // The state directory holds no secret either (the key file's path, not its bytes).
    let key_text = std::fs::read_to_string(&key).unwrap();
    for f in walk(&a.state) {
        let b = std::fs::read(&f).unwrap();
        for s in [PASS.as_bytes(), key_text.trim().as_bytes()] {
            assert!(
                !b.windows(s.len()).any(|w| w == s),
                "{} holds a secret",
                f.display()
            );
        }
    }

    for t in ["bucket", "disk"] {
        a.ok(&["verify", "--target", t]);
    }
    // Prune honours the lock in the (encrypted) lock record; gc frees space.
    a.snapshot("vm1", "s3");
    push(&a, "vm1", "bucket");
    a.ok(&["prune", "vm1", "--target", "bucket", "--keep-last", "1"]);
    assert_eq!(
        target_ids(&a, "vm1", "bucket").len(),
        2,
        "s1 (locked) and s3 stay"
    );
    a.ok(&["gc", "--target", "bucket"]);
    a.ok(&["gc", "--target", "bucket"]);
    a.ok(&["verify", "--target", "bucket"]);

    // Disaster: brand-new nodes with the URL, the credentials and the secret only.
    let fresh = node_with(&env, &[("HOLDFAST_PASSPHRASE", PASS)]);
    let r = add_bucket(&fresh, &s3, "holdfast-enc", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["encrypted"], true);
    let key_copy = fresh.path("copy.key");
    std::fs::copy(&key, &key_copy).unwrap();
    let add_disk = [
        "target",
        "add",
        "disk",
        "--url",
        &disk_url,
        "--key-file",
        key_copy.to_str().unwrap(),
    ];
    // The cipher of an existing target is its own: another one asked for is refused.
    let r = fresh.run(&[&add_disk[..], &["--encrypt", "--cipher", &preferred]].concat());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("sealed with {other}")),
        "{}",
        r.stderr
    );
    fresh.ok(&add_disk);
    for (t, snap, want) in [("bucket", "vm1@s1", &bytes), ("disk", "vm1@s2", &bytes2)] {
        let out = fresh.path(&format!("restored-{t}.img"));
        let r = restore(&fresh, snap, t, &out);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "{t}: not bit-identical"
        );
    }
    // Seed a node by pulling from the encrypted directory.
    let b = node_with(&env, &[]);
    b.ok(&[
        "target",
        "add",
        "disk",
        "--url",
        &disk_url,
        "--key-file",
        key_copy.to_str().unwrap(),
    ]);
    b.ok(&["mirror", "pull", "vm1", "--target", "disk"]);
    b.ok(&["verify"]);
    assert!(b.restore("vm1@s2") == bytes2);
}

/// Test 2: a wrong passphrase or key file is a clear error (exit 2) and changes nothing.
#[test]
fn a_wrong_secret_is_refused_and_changes_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-wrong");
    let env = s3.env();
    let mut a = node_with(&env, &[("HOLDFAST_PASSPHRASE", PASS)]);
    let img = a.image("vm1.img", &marked_image(MIB, 3));
    a.add_volume("vm1", &img, "64KiB");
    assert_eq!(
        add_bucket(&a, &s3, "holdfast-wrong", &["--encrypt"]).code,
        0
    );
    a.snapshot("vm1", "s1");
    push(&a, "vm1", "bucket");
    let before = bucket_objects(&s3, "holdfast-wrong");

    // The node that made it, run with a wrong passphrase: a push (which reads the target while
    // the key is being opened) and a restore are refused as such, and change nothing in the
    // bucket or among the node's locks.
    a.snapshot("vm1", "s2");
    let locks = a.ok(&["lock", "list", "--json"]);
    let mut wrong = a.env.clone();
    for (k, v) in a.env.iter_mut() {
        if k == "HOLDFAST_PASSPHRASE" {
            *v = "not the passphrase".into();
        }
    }
    let out = a.path("wrong.img");
    for args in [
        &["mirror", "push", "vm1", "--target", "bucket"][..],
        &[
            "snapshot",
            "restore",
            "vm1@s1",
            "--target",
            "bucket",
            "--to",
            out.to_str().unwrap(),
        ],
    ] {
        let r = a.run(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("no key slot"), "{}", r.stderr);
    }
    assert!(!out.exists());
    std::mem::swap(&mut a.env, &mut wrong);
    assert_eq!(a.ok(&["lock", "list", "--json"]), locks);
    assert_eq!(bucket_objects(&s3, "holdfast-wrong"), before);

    let b = node_with(&env, &[("HOLDFAST_PASSPHRASE", "not the passphrase")]);
    let r = add_bucket(&b, &s3, "holdfast-wrong", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("no key slot") && r.stderr.contains("passphrase"),
        "{}",
        r.stderr
    );
    let key = b.path("k");
    b.ok(&["key", "new", key.to_str().unwrap()]);
    let r = add_bucket(
        &b,
        &s3,
        "holdfast-wrong",
        &["--key-file", key.to_str().unwrap()],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("key file"), "{}", r.stderr);
    // No passphrase at all (and no terminal): told how to give one.
    let mut c = node_with(&env, &[]);
    c.env.retain(|(k, _)| k != "HOLDFAST_PASSPHRASE");
    let r = add_bucket(&c, &s3, "holdfast-wrong", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("HOLDFAST_PASSPHRASE"), "{}", r.stderr);
    // --encrypt on a plain target is refused too.
    s3.create_bucket("holdfast-plain");
    let url = "s3://holdfast-plain/p".to_string();
    let endpoint = s3.endpoint();
    c.ok(&[
        "target",
        "add",
        "p",
        "--url",
        &url,
        "--endpoint",
        &endpoint,
        "--allow-http",
    ]);
    let d = node_with(&env, &[("HOLDFAST_PASSPHRASE", PASS)]);
    let r = d.run(&[
        "target",
        "add",
        "p",
        "--url",
        &url,
        "--endpoint",
        &endpoint,
        "--allow-http",
        "--encrypt",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("unencrypted"), "{}", r.stderr);
    assert_eq!(bucket_objects(&s3, "holdfast-wrong"), before);
    // The node that was refused registered nothing.
    assert!(!b.ok(&["target", "list"]).contains("bucket"));
}

fn flip_byte(path: &Path, at_from_end: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let at = len.saturating_sub(at_from_end);
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

/// Test 3: a flipped byte in a pack, an index, a manifest or a lock record, and an object
/// replaced by another of the same target, are each detected: verify names it, restore exits 6
/// and leaves no file, a lock record that does not open stops prune (never read as absent).
#[test]
fn tampering_with_an_encrypted_target_is_detected() {
    let mut a = TestNode::new();
    let key = a.path("t.key");
    a.ok(&["key", "new", key.to_str().unwrap()]);
    a.env.push(("HOLDFAST_TARGET_GRACE".into(), "0s".into()));
    let bytes = marked_image(2 * MIB, 5);
    let img = a.image("vm1.img", &bytes);
    a.add_volume("vm1", &img, "64KiB");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("t");
    let url = format!("file://{}", root.display());
    a.ok(&[
        "target",
        "add",
        "t",
        "--url",
        &url,
        "--encrypt",
        "--key-file",
        key.to_str().unwrap(),
    ]);
    a.snapshot("vm1", "s1");
    push(&a, "vm1", "t");
    std::fs::write(&img, marked_image(2 * MIB, 6)).unwrap();
    a.snapshot("vm1", "s2");
    push(&a, "vm1", "t");
    a.ok(&[
        "lock",
        "add",
        "vm1@s1",
        "--target",
        "t",
        "--holder",
        "app:keep",
        "--type",
        "application",
        "--value",
        "v",
    ]);
    a.ok(&["verify", "--target", "t"]);
    let files = walk(&root);
    let under = |p: &str| -> Vec<PathBuf> {
        files
            .iter()
            .filter(|f| f.strip_prefix(&root).unwrap().starts_with(p))
            .cloned()
            .collect()
    };
    let manifests = under("manifests");
    let s1 = a.snapshot_id("vm1@s1");
    let s2 = a.snapshot_id("vm1@s2");
    let m1 = manifests.iter().find(|m| m.ends_with(&s1)).unwrap().clone();
    let m2 = manifests.iter().find(|m| m.ends_with(&s2)).unwrap().clone();

    // An object replaced by another object of the same target: s2's manifest by s1's.
    let saved = std::fs::read(&m2).unwrap();
    std::fs::copy(&m1, &m2).unwrap();
    let out = a.path("r.img");
    let r = restore(&a, "vm1@s2", "t", &out);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("does not open"), "{}", r.stderr);
    assert!(!out.exists());
    let r = a.run(&["verify", "--target", "t"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(&s2) || r.stdout.contains(&s2),
        "{}{}",
        r.stdout,
        r.stderr
    );
    std::fs::write(&m2, &saved).unwrap();

    // A flipped byte in a manifest.
    flip_byte(&m2, 20);
    let r = restore(&a, "vm1@s2", "t", &out);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(!out.exists());
    std::fs::write(&m2, &saved).unwrap();

    // A flipped byte in a pack (a chunk's bytes, not the trailer): verify names the damage,
    // restore exits 6 and leaves no file.
    let packs = under("packs");
    let biggest = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
        .clone();
    let saved_pack = std::fs::read(&biggest).unwrap();
    flip_byte(&biggest, std::fs::metadata(&biggest).unwrap().len() / 2);
    let r = a.run(&["verify", "--target", "t"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(
        said.contains("damage") || said.contains("does not open"),
        "{said}"
    );
    let r1 = restore(&a, "vm1@s1", "t", &out);
    let r2 = restore(&a, "vm1@s2", "t", &a.path("r2.img"));
    assert!(r1.code == 6 || r2.code == 6, "{}\n{}", r1.stderr, r2.stderr);
    assert!(!out.exists() || r1.code == 0);
    std::fs::write(&biggest, &saved_pack).unwrap();
    a.ok(&["verify", "--target", "t"]);

    // A flipped byte in an index: reported, never trusted.
    let index = under("index")[0].clone();
    let saved_index = std::fs::read(&index).unwrap();
    flip_byte(&index, 5);
    let r = a.run(&["verify", "--target", "t"]);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(said.contains("does not open"), "code {}: {said}", r.code);
    std::fs::write(&index, &saved_index).unwrap();

    // A flipped byte in a lock record: prune refuses (it does not read it as no lock).
    let record = under("locks")
        .into_iter()
        .find(|l| l.to_string_lossy().contains(&hex("app:keep")))
        .unwrap();
    let saved_record = std::fs::read(&record).unwrap();
    flip_byte(&record, 3);
    let r = a.run(&["prune", "vm1", "--target", "t", "--keep-last", "1"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("does not open"), "{}", r.stderr);
    assert_eq!(target_ids(&a, "vm1", "t").len(), 2, "nothing pruned");
    std::fs::write(&record, &saved_record).unwrap();

    // An empty object, or 48 bytes of junk (the size of a sealed empty one), at a manifest's
    // key is not a fence that hides the snapshot from gc: gc stops on it.
    for junk in [vec![], vec![0x5a; 48]] {
        std::fs::write(&m2, &junk).unwrap();
        let r = a.run(&["gc", "--target", "t"]);
        assert_eq!(r.code, 6, "{} bytes: {}", junk.len(), r.stderr);
    }
    std::fs::write(&m2, &saved).unwrap();
    a.ok(&["verify", "--target", "t"]);

    // A pack cut short is damage (exit 6), not an outage.
    let saved_pack = std::fs::read(&biggest).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&biggest)
        .unwrap();
    f.set_len(32 + (64 << 10) + 16).unwrap();
    drop(f);
    let r = restore(&a, "vm1@s1", "t", &out);
    let r2 = restore(&a, "vm1@s2", "t", &a.path("r3.img"));
    assert!(r.code == 6 || r2.code == 6, "{}\n{}", r.stderr, r2.stderr);
    assert!(r.code != 7 && r2.code != 7, "{}\n{}", r.stderr, r2.stderr);
    std::fs::write(&biggest, &saved_pack).unwrap();

    // The whole repository replaced by another one the same key opens: refused.
    let other = dir.path().join("other");
    let other_url = format!("file://{}", other.display());
    a.ok(&[
        "target",
        "add",
        "o",
        "--url",
        &other_url,
        "--encrypt",
        "--key-file",
        key.to_str().unwrap(),
    ]);
    push(&a, "vm1", "o");
    std::fs::rename(&root, dir.path().join("t-saved")).unwrap();
    std::fs::rename(&other, &root).unwrap();
    let r = a.run(&["snapshot", "list", "vm1", "--target", "t"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("another repository"), "{}", r.stderr);
    // Emptied: not made again.
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::create_dir(&root).unwrap();
    let r = a.run(&["target", "check", "t"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        std::fs::read_dir(&root).unwrap().next().is_none(),
        "nothing written"
    );
    // A new node given a key file for an empty directory is told to pass --encrypt.
    let n = TestNode::new();
    let r = n.run(&[
        "target",
        "add",
        "t",
        "--url",
        &url,
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("--encrypt"), "{}", r.stderr);
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Test 4: a second passphrase is added and used, the first removed; the first then opens
/// nothing, the last slot cannot be removed, and a key-file slot works beside passphrases.
#[test]
fn key_slots_are_added_used_and_removed() {
    let mut a = TestNode::new();
    a.env.push(("HOLDFAST_PASSPHRASE".into(), PASS.into()));
    let bytes = marked_image(MIB, 8);
    let img = a.image("vm1.img", &bytes);
    a.add_volume("vm1", &img, "64KiB");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/t", dir.path().display());
    a.ok(&["target", "add", "t", "--url", &url, "--encrypt"]);
    a.snapshot("vm1", "s1");
    push(&a, "vm1", "t");
    let slots = |n: &TestNode| -> Vec<Value> {
        n.run(&["target", "key", "list", "t", "--json"])
            .json()
            .as_array()
            .unwrap()
            .clone()
    };
    let first = slots(&a)[0]["id"].as_str().unwrap().to_string();
    assert_eq!(slots(&a)[0]["kind"], "passphrase");
    let r = a.run(&["target", "key", "remove", "t", &first]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("last key slot"), "{}", r.stderr);

    // A second passphrase, from a file, used by this node from now on.
    let second = a.path("second.pass");
    std::fs::write(&second, "another passphrase entirely\n").unwrap();
    a.ok(&[
        "target",
        "key",
        "add",
        "t",
        "--new-passphrase-file",
        second.to_str().unwrap(),
        "--use",
    ]);
    // And a key file.
    let key = a.path("k");
    a.ok(&["key", "new", key.to_str().unwrap()]);
    a.ok(&[
        "target",
        "key",
        "add",
        "t",
        "--new-key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(slots(&a).len(), 3);
    let out = a.path("r.img");
    let mut with_second = TestNode::new();
    with_second.env.push((
        "HOLDFAST_PASSPHRASE".into(),
        "another passphrase entirely".into(),
    ));
    with_second.ok(&["target", "add", "t", "--url", &url]);
    let r = restore(&with_second, "vm1@s1", "t", &out);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(std::fs::read(&out).unwrap() == bytes);

    a.ok(&["target", "key", "remove", "t", &first]);
    assert_eq!(slots(&a).len(), 2);
    // The node still opens the target (with the second passphrase, recorded by --use)...
    a.env.retain(|(k, _)| k != "HOLDFAST_PASSPHRASE");
    a.ok(&["verify", "--target", "t"]);
    // ...and the slot it uses cannot be removed.
    let used = slots(&a)
        .iter()
        .find(|s| s["kind"] == "passphrase")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = a.run(&["target", "key", "remove", "t", &used]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // The first passphrase opens nothing any more.
    let mut old = TestNode::new();
    old.env.push(("HOLDFAST_PASSPHRASE".into(), PASS.into()));
    let r = old.run(&["target", "add", "t", "--url", &url]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no key slot"), "{}", r.stderr);
    // The key file does.
    let k = TestNode::new();
    k.ok(&[
        "target",
        "add",
        "t",
        "--url",
        &url,
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(target_ids(&k, "vm1", "t").len(), 1);
}
