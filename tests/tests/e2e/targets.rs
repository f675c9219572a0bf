//! Mirror targets: a directory and a real S3-compatible server (moto) on 127.0.0.1.

use std::os::unix::fs::FileExt;

use holdfast_tests::cascade::{Peer, Relations, Tls};
use holdfast_tests::s3::S3Server;
use holdfast_tests::{TestNode, mixed_bytes};
use serde_json::Value;

const MIB: usize = 1 << 20;
const BLOCK: usize = 64 << 10;

fn change(img: &std::path::Path, blocks: usize, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let n = (f.metadata().unwrap().len() as usize) / BLOCK;
    for i in 0..blocks {
        let at = ((i * 7919 + seed as usize * 104_729) % n) * BLOCK;
        let bytes: Vec<u8> = (0..BLOCK).map(|_| rand::random::<u8>()).collect();
        f.write_all_at(&bytes, at as u64).unwrap();
    }
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = rand::random::<u64>() | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// A node with S3 credentials in its environment.
fn node_for(s3: &S3Server) -> TestNode {
    let mut n = TestNode::new();
    n.env = s3.env();
    n
}

fn add_s3_target(n: &TestNode, s3: &S3Server, name: &str, bucket: &str) -> String {
    add_s3_target_with(n, s3, name, bucket, false)
}

/// `encrypted`: with `--encrypt` (the node's HOLDFAST_PASSPHRASE opens it; see
/// [`encrypting`]).
fn add_s3_target_with(
    n: &TestNode,
    s3: &S3Server,
    name: &str,
    bucket: &str,
    encrypted: bool,
) -> String {
    let url = format!("s3://{bucket}/backups");
    let endpoint = s3.endpoint();
    let mut args = vec![
        "target",
        "add",
        name,
        "--url",
        &url,
        "--endpoint",
        &endpoint,
        "--allow-http",
    ];
    if encrypted {
        args.push("--encrypt");
    }
    n.ok(&args);
    url
}

/// A node's environment with the passphrase of the tests' encrypted targets.
fn encrypting(n: &mut TestNode) {
    n.env
        .push(("HOLDFAST_PASSPHRASE".into(), "the tests' passphrase".into()));
}

fn push(n: &TestNode, volume: &str, target: &str) -> Value {
    let r = n.run(&["mirror", "push", volume, "--target", target, "--json"]);
    assert_eq!(r.code, 0, "push failed:\n{}", r.stderr);
    r.json()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
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

/// Baseline and increments to a bucket and to a directory; restore from each on a brand-new
/// node that has only the URL and credentials; seed a node by pulling, then mirror on.
#[test]
fn push_then_recover_on_a_new_node() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-dr");
    let a = node_for(&s3);
    let img = a.image("vm1.img", &mixed_bytes(4 * MIB, 11));
    a.add_volume("vm1", &img, "64KiB");
    let dir = tempfile::tempdir().unwrap();
    let dir_url = format!("file://{}/target", dir.path().display());
    let url = add_s3_target(&a, &s3, "bucket", "holdfast-dr");
    a.ok(&["target", "add", "disk", "--url", &dir_url]);
    let check = a.run(&["target", "check", "bucket", "--json"]).json();
    assert_eq!(check["format-version"], 3);
    assert_eq!(check["writable"], true);

    a.snapshot("vm1", "s1");
    for t in ["bucket", "disk"] {
        let r = push(&a, "vm1", t);
        assert_eq!(r["kind"], "baseline", "{r}");
    }
    change(&img, 3, 1);
    a.snapshot("vm1", "s2");
    for t in ["bucket", "disk"] {
        let r = push(&a, "vm1", t);
        assert_eq!(r["kind"], "incremental", "{r}");
        assert!(u(&r["chunks"]) <= 3, "{r}");
        let r = push(&a, "vm1", t);
        assert_eq!(r["kind"], "up-to-date", "{r}");
    }
    // The pushing node holds the bucket's base, so its own retention keeps it.
    let locks = a.run(&["lock", "list", "--json"]).json();
    let s2 = a.snapshot_id("vm1@s2");
    assert!(
        locks
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["holder"] == "app:target.bucket"
                && l["snapshot"] == s2.as_str()
                && l["type"] == "destination-path"
                && l["value"] == url.as_str()),
        "{locks}"
    );
    a.ok(&["verify", "--target", "bucket"]);
    a.ok(&["verify", "--target", "disk"]);

    // Disaster: a brand-new node with only the URL and the credentials.
    let fresh = node_for(&s3);
    add_s3_target(&fresh, &s3, "bucket", "holdfast-dr");
    fresh.ok(&["target", "add", "disk", "--url", &dir_url]);
    for t in ["bucket", "disk"] {
        assert_eq!(target_ids(&fresh, "vm1", t).len(), 2);
        let out = fresh.path(&format!("restored-{t}.img"));
        fresh.ok(&[
            "snapshot",
            "restore",
            "vm1@s2",
            "--target",
            t,
            "--to",
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&img).unwrap(),
            "restore from {t}"
        );
    }
}

/// A node seeded from the bucket continues with normal incremental mirroring.
#[test]
fn pull_seeds_a_node_then_mirroring_continues() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-seed");
    let tls = Tls::new();
    let mut a = Peer::new("a");
    a.node.env = s3.env();
    let img = a.node.image("vm1.img", &mixed_bytes(4 * MIB, 12));
    a.node.add_volume("vm1", &img, "64KiB");
    add_s3_target(&a.node, &s3, "bucket", "holdfast-seed");
    a.node.snapshot("vm1", "s1");
    push(&a.node, "vm1", "bucket");

    let mut b = Peer::new("b");
    b.node.env = s3.env();
    add_s3_target(&b.node, &s3, "bucket", "holdfast-seed");
    let r = b
        .node
        .run(&["mirror", "pull", "vm1", "--target", "bucket", "--json"])
        .json();
    assert_eq!(r["kind"], "baseline", "{r}");
    b.node.ok(&["verify"]);

    a.configure(
        &tls,
        Relations {
            downstreams: vec![(&b, vec!["vm1"], "")],
            ..Default::default()
        },
    );
    b.configure(
        &tls,
        Relations {
            upstream: Some((&a, "vm1")),
            ..Default::default()
        },
    );
    a.start();
    change(&img, 3, 2);
    a.node.snapshot("vm1", "s2");
    let r = b.mirror("vm1");
    assert_eq!(r["kind"], "incremental", "{r}");
    assert!(u(&r["chunks-fetched"]) <= 3, "{r}");
    assert_eq!(b.node.restore("vm1@s2"), std::fs::read(&img).unwrap());
}

/// A push interrupted by a server that stops answering resumes when it is back, without
/// sending again what it had sent.
#[test]
fn interrupted_push_resumes() {
    interrupted_push_resumes_on(false);
}

/// The same into an encrypted bucket (its multipart uploads are sealed whole).
#[test]
fn interrupted_push_into_an_encrypted_bucket_resumes() {
    interrupted_push_resumes_on(true);
}

fn interrupted_push_resumes_on(encrypted: bool) {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-resume");
    let mut a = node_for(&s3);
    encrypting(&mut a);
    let data = random_bytes(40 * MIB);
    let img = a.image("vm1.img", &data);
    a.add_volume("vm1", &img, "64KiB");
    add_s3_target_with(&a, &s3, "bucket", "holdfast-resume", encrypted);
    a.snapshot("vm1", "s1");

    let mut watcher = s3.freeze_when_key_appears("holdfast-resume", "backups/index/");
    // Packs of 16 MiB go up as multipart uploads here, so one is cut off mid-way.
    let mut child = a
        .cmd(&["mirror", "push", "vm1", "--target", "bucket"])
        .env("HOLDFAST_TARGET_MULTIPART_THRESHOLD", "8MiB")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The server freezes once the first pack and its index are there, mid-transfer.
    assert!(watcher.wait().unwrap().success(), "no pack was uploaded");
    let status = child.wait().unwrap();
    s3.thaw();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(7), "{stderr}");
    assert!(
        target_ids(&a, "vm1", "bucket").is_empty(),
        "a half-pushed snapshot is visible"
    );

    // Every pack already in the bucket is used, with or without its index.
    let present: usize = s3
        .objects("holdfast-resume")
        .iter()
        .filter(|o| o.starts_with("backups/packs/"))
        .map(|o| {
            o.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert!(present > 0, "nothing was stored before the freeze");
    let r = push(&a, "vm1", "bucket");
    // Frozen before its intent, the push is sent again (a baseline that resends only what is
    // missing); frozen after it (the whole snapshot was stored, its manifest write hung), the
    // rerun completes the push it left: the manifest, confirmed, and nothing to send.
    if r["kind"] == "up-to-date" {
        assert_eq!(
            r["finished-pending"].as_array().map(Vec::len),
            Some(1),
            "{r}"
        );
        assert!(
            r["finished-pending"][0]
                .as_str()
                .unwrap()
                .ends_with("committed"),
            "{r}"
        );
    } else {
        assert_eq!(r["kind"], "baseline", "{r}");
    }
    let resent = u(&r["plain-bytes"]) as usize;
    assert!(
        resent + present <= data.len() + MIB,
        "the rerun sent {resent} bytes of {} though {present} were in the bucket",
        data.len()
    );
    a.ok(&["verify", "--target", "bucket"]);
    let out = a.path("r.img");
    a.ok(&[
        "snapshot",
        "restore",
        "vm1@s1",
        "--target",
        "bucket",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

/// Wrong credentials, a missing bucket, an unreachable endpoint, a bucket of another format
/// version and a bucket of something else: each a clear error, and nothing changes.
#[test]
fn bad_targets_change_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-bad");
    s3.create_bucket("holdfast-future");
    s3.put(
        "holdfast-future",
        "backups/config",
        r#"{"format":"holdfast-repository","version":99,"id":"x","created-unix-ms":0,"chunk-hash":"blake3","compression":"zstd"}"#,
    );
    s3.create_bucket("holdfast-other");
    s3.put("holdfast-other", "backups/photo.jpg", "not ours");
    let mut n = node_for(&s3);
    let before = (
        s3.objects("holdfast-bad"),
        s3.objects("holdfast-future"),
        s3.objects("holdfast-other"),
    );
    let add = |n: &TestNode, bucket: &str, endpoint: &str| {
        n.run(&[
            "target",
            "add",
            "t",
            "--url",
            &format!("s3://{bucket}/backups"),
            "--endpoint",
            endpoint,
            "--allow-http",
        ])
    };

    n.env = s3.env();
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG"),
        ("AWS_SECRET_ACCESS_KEY", "wrong"),
    ] {
        n.env.retain(|(key, _)| key != k);
        n.env.push((k.into(), v.into()));
    }
    // Refused credentials have their own exit code (9), and one sentence without the
    // store's XML (the chain is for -v).
    let r = add(&n, "holdfast-bad", &s3.endpoint());
    assert_eq!(r.code, 9, "{}", r.stderr);
    assert!(
        r.stderr.contains("refused access")
            && r.stderr.contains("check the credentials")
            && !r.stderr.contains('<')
            && !r.stderr.contains("wrong\""),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    n.env = s3.env();

    let r = add(&n, "holdfast-missing", &s3.endpoint());
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(
        r.stderr.contains("holdfast-missing") && r.stderr.to_lowercase().contains("bucket"),
        "{}",
        r.stderr
    );

    let dead = format!("http://127.0.0.1:{}", holdfast_tests::cascade::free_port());
    let r = add(&n, "holdfast-bad", &dead);
    assert_eq!(r.code, 7, "{}", r.stderr);

    let r = add(&n, "holdfast-future", &s3.endpoint());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("format version 99"), "{}", r.stderr);

    let r = add(&n, "holdfast-other", &s3.endpoint());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no holdfast repository"), "{}", r.stderr);

    // Plain HTTP is never implied.
    let r = n.run(&[
        "target",
        "add",
        "t",
        "--url",
        "s3://holdfast-bad/x",
        "--endpoint",
        &s3.endpoint(),
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--allow-http"), "{}", r.stderr);
    // Hostile URLs.
    for url in [
        "s3://holdfast-bad/../x",
        "file://relative",
        "ftp://x",
        "s3://UPPER/x",
    ] {
        let r = n.run(&["target", "add", "t", "--url", url]);
        assert_eq!(r.code, 2, "{url}: {}", r.stderr);
    }

    assert_eq!(
        n.run(&["target", "list", "--json"]).json(),
        serde_json::json!([])
    );
    assert_eq!(
        (
            s3.objects("holdfast-bad"),
            s3.objects("holdfast-future"),
            s3.objects("holdfast-other")
        ),
        before
    );
}

/// Lock records inside the target stop its prune; releasing them lets it prune; gc then
/// reclaims the space and the bucket verifies.
#[test]
fn target_locks_stop_its_prune() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-prune");
    let mut a = node_for(&s3);
    // Condemned packs are deleted by the next gc (the default waits an hour).
    a.env.push(("HOLDFAST_TARGET_GRACE".into(), "0s".into()));
    let img = a.image("vm1.img", &mixed_bytes(2 * MIB, 13));
    a.add_volume("vm1", &img, "64KiB");
    add_s3_target(&a, &s3, "bucket", "holdfast-prune");
    for i in 1..=4 {
        // s2..s4 rewrite the same blocks, so the packs pushed for s2 and s3 hold only chunks
        // that nothing references once those snapshots are pruned: gc frees whole packs.
        change(&img, 4, if i == 1 { 1 } else { 7 });
        a.snapshot("vm1", &format!("s{i}"));
        push(&a, "vm1", "bucket");
    }
    let ids = target_ids(&a, "vm1", "bucket");
    assert_eq!(ids.len(), 4);
    // An application restoring from the bucket holds s1.
    a.ok(&[
        "lock",
        "add",
        "vm1@s1",
        "--target",
        "bucket",
        "--holder",
        "app:restore-job",
        "--type",
        "application",
        "--value",
        "monthly-restore-test",
    ]);
    let listed = a
        .run(&[
            "lock", "list", "--target", "bucket", "--volume", "vm1", "--json",
        ])
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}"); // the pusher's base and the app's
    a.ok(&["prune", "vm1", "--target", "bucket", "--keep-last", "1"]);
    let left = target_ids(&a, "vm1", "bucket");
    assert_eq!(
        left,
        vec![ids[0].clone(), ids[3].clone()],
        "locked s1 and newest s4 stay"
    );

    a.ok(&[
        "lock",
        "release",
        "vm1@s1",
        "--target",
        "bucket",
        "--holder",
        "app:restore-job",
    ]);
    a.ok(&["prune", "vm1", "--target", "bucket", "--keep-last", "1"]);
    assert_eq!(target_ids(&a, "vm1", "bucket"), vec![ids[3].clone()]);
    let before = s3.objects("holdfast-prune").len();
    // The first gc condemns what nothing references, the next one deletes it.
    let r = a.run(&["gc", "--target", "bucket", "--json"]).json();
    assert!(u(&r["packs-condemned"]) >= 2, "{r}");
    assert_eq!(u(&r["packs-deleted"]), 0, "{r}");
    let r = a.run(&["gc", "--target", "bucket", "--json"]).json();
    assert!(u(&r["packs-deleted"]) >= 2, "{r}");
    assert!(s3.objects("holdfast-prune").len() < before);
    a.ok(&["verify", "--target", "bucket"]);
    let out = a.path("r.img");
    a.ok(&[
        "snapshot",
        "restore",
        "vm1@s4",
        "--target",
        "bucket",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
}

/// Two nodes push to the same bucket while they prune and gc it, all at once, with a grace
/// period short enough that gcs condemn and delete during the run: nobody waits for anybody,
/// the bucket verifies afterwards and every snapshot in it restores.
#[test]
fn concurrent_pushers_and_pruners_leave_a_verifying_bucket() {
    concurrent_pushers_and_pruners_on(false);
}

#[test]
fn concurrent_pushers_and_pruners_leave_a_verifying_encrypted_bucket() {
    concurrent_pushers_and_pruners_on(true);
}

fn concurrent_pushers_and_pruners_on(encrypted: bool) {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-race");
    let nodes: Vec<TestNode> = (0..2)
        .map(|_| {
            let mut n = node_for(&s3);
            n.env.push(("HOLDFAST_TARGET_GRACE".into(), "1s".into()));
            encrypting(&mut n);
            n
        })
        .collect();
    let mut imgs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let img = n.image("v.img", &mixed_bytes(2 * MIB, 20 + i as u64));
        n.add_volume(&format!("vol{i}"), &img, "64KiB");
        add_s3_target_with(n, &s3, "bucket", "holdfast-race", encrypted);
        imgs.push(img);
    }
    std::thread::scope(|scope| {
        for (i, n) in nodes.iter().enumerate() {
            let img = &imgs[i];
            scope.spawn(move || {
                for round in 0..4 {
                    change(img, 3, round * 10 + i as u64);
                    n.snapshot(&format!("vol{i}"), &format!("r{round}"));
                    let r = n.run(&["mirror", "push", &format!("vol{i}"), "--target", "bucket"]);
                    assert_eq!(r.code, 0, "{}", r.stderr);
                    let vol = format!("vol{}", 1 - i);
                    let r = n.run(&["prune", &vol, "--target", "bucket", "--keep-last", "2"]);
                    assert!(
                        r.code == 0 || r.stderr.contains("never prunes"),
                        "{}",
                        r.stderr
                    );
                    // Concurrent gcs and pushes: none waits, none fails, nothing is damaged.
                    let r = n.run(&["gc", "--target", "bucket"]);
                    assert_eq!(r.code, 0, "{}", r.stderr);
                }
            });
        }
    });
    nodes[0].ok(&["gc", "--target", "bucket"]);
    let report = nodes[0]
        .run(&["verify", "--target", "bucket", "--json"])
        .json();
    assert_eq!(report["damage"], serde_json::json!([]), "{report}");
    for (i, n) in nodes.iter().enumerate() {
        let vol = format!("vol{i}");
        let ids = target_ids(n, &vol, "bucket");
        assert!(!ids.is_empty());
        let out = n.path("r.img");
        n.ok(&[
            "snapshot",
            "restore",
            &format!("{vol}@r3"),
            "--target",
            "bucket",
            "--to",
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&imgs[i]).unwrap()
        );
    }
}

/// A -> B -> bucket: B keeps the bucket's base, and so does A (B's lock set carries it).
#[test]
fn cascade_into_a_bucket_keeps_the_bucket_base() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-cascade");
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let img = a.node.image("vm1.img", &mixed_bytes(2 * MIB, 14));
    a.node.add_volume("vm1", &img, "64KiB");
    let mut b = Peer::new("b");
    b.node.env = s3.env();
    a.configure(
        &tls,
        Relations {
            downstreams: vec![(&b, vec!["vm1"], "")],
            ..Default::default()
        },
    );
    b.configure(
        &tls,
        Relations {
            upstream: Some((&a, "vm1")),
            ..Default::default()
        },
    );
    a.start();
    add_s3_target(&b.node, &s3, "bucket", "holdfast-cascade");
    let s1 = a.node.snapshot("vm1", "s1");
    b.mirror("vm1");
    push(&b.node, "vm1", "bucket");
    for i in 2..=4 {
        change(&img, 2, i);
        a.node.snapshot("vm1", &format!("s{i}"));
        b.mirror("vm1");
    }
    // The bucket's base is s1: B's and A's retention keep it.
    b.node.ok(&["prune", "vm1", "--keep-last", "1"]);
    a.node.ok(&["prune", "vm1", "--keep-last", "1"]);
    assert!(b.ids("vm1").contains(&s1), "B pruned the bucket's base");
    assert!(a.ids("vm1").contains(&s1), "A pruned the bucket's base");
    let held = a.locks();
    assert!(
        held.iter().any(|l| l["snapshot"] == s1.as_str()
            && l["type"] == "destination-path"
            && l["value"] == "s3://holdfast-cascade/backups"
            && l["path"] == serde_json::json!(["b"])),
        "{held:?}"
    );
    // The next push moves the base; then s1 may go everywhere.
    push(&b.node, "vm1", "bucket");
    b.mirror("vm1");
    a.node.ok(&["prune", "vm1", "--keep-last", "1"]);
    assert!(!a.ids("vm1").contains(&s1));
    b.mirror("vm1");
    assert!(!b.ids("vm1").contains(&s1));
}

/// examples/bucket/run.sh is what a user copies: it must keep working (small volume here).
#[test]
fn the_bucket_example_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("examples/bucket/run.sh"))
        .env("HOLDFAST_BIN", holdfast_tests::holdfast_bin())
        .env("VOLUME_SIZE", "8MiB")
        .env_remove("HOLDFAST_STATE")
        .env_remove("HOLDFAST_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON last line");
    assert_eq!(last["ok"], true);
    assert_eq!(last["volume_bytes"], 8 << 20);
    assert!(u(&last["incremental_stored_bytes"]) < 1 << 20, "{last}");
}

/// Keys can come from a profile of an AWS credentials file, read when the target is used and
/// never stored or printed; a missing profile or wrong keys are clear errors that record nothing.
#[test]
fn credentials_come_from_a_profile() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-profile");
    let mut n = TestNode::new();
    n.env = s3
        .env()
        .into_iter()
        .filter(|(k, _)| k != "AWS_ACCESS_KEY_ID" && k != "AWS_SECRET_ACCESS_KEY")
        .collect();
    let home = n.path("home");
    std::fs::create_dir_all(&home).unwrap();
    n.env.push(("HOME".into(), home.to_str().unwrap().into()));
    let creds = n.path("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n\
             [backup]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            s3.access_key, s3.secret_key
        ),
    )
    .unwrap();
    let img = n.image("vm1.img", &mixed_bytes(MIB, 30));
    n.add_volume("vm1", &img, "64KiB");
    n.snapshot("vm1", "s1");
    let endpoint = s3.endpoint();
    let add = |extra: &[&str]| {
        let mut args = vec![
            "target",
            "add",
            "bucket",
            "--url",
            "s3://holdfast-profile/p",
            "--endpoint",
            &endpoint,
            "--allow-http",
        ];
        args.extend_from_slice(extra);
        n.run(&args)
    };
    let creds_arg = creds.to_str().unwrap();

    let r = add(&["--profile", "nosuch", "--credentials-file", creds_arg]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no profile [nosuch]"), "{}", r.stderr);
    let r = add(&["--credentials-file", creds_arg]); // [default] holds wrong keys
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains(&s3.secret_key));
    assert_eq!(
        n.run(&["target", "list", "--json"]).json(),
        serde_json::json!([])
    );

    let r = add(&["--profile", "backup", "--credentials-file", creds_arg]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    push(&n, "vm1", "bucket");
    let listed = n.ok(&["target", "list", "--json"]);
    assert!(
        listed.contains("backup") && !listed.contains(&s3.secret_key),
        "{listed}"
    );
    // The keys are read from the file each time, never copied into the state directory.
    for f in walk(&n.state) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes
                .windows(s3.secret_key.len())
                .any(|w| w == s3.secret_key.as_bytes()),
            "{} holds the secret key",
            f.display()
        );
    }

    // AWS_PROFILE picks a profile of AWS_SHARED_CREDENTIALS_FILE, as the AWS tools do.
    let mut m = TestNode::new();
    m.env = n.env.clone();
    m.env
        .push(("AWS_SHARED_CREDENTIALS_FILE".into(), creds_arg.into()));
    m.env.push(("AWS_PROFILE".into(), "backup".into()));
    m.ok(&[
        "target",
        "add",
        "bucket",
        "--url",
        "s3://holdfast-profile/p",
        "--endpoint",
        &endpoint,
        "--allow-http",
    ]);
    let listed = m
        .run(&["snapshot", "list", "vm1", "--target", "bucket", "--json"])
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A lease left by a release before target format 3 (which relied on leases) stops gc while
/// it is less than an hour old: gc names it, exits 7 and changes nothing.
#[test]
fn a_lease_of_an_older_release_stops_gc() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-lease");
    let a = node_for(&s3);
    let img = a.image("vm1.img", &mixed_bytes(MIB, 40));
    a.add_volume("vm1", &img, "64KiB");
    add_s3_target(&a, &s3, "bucket", "holdfast-lease");
    a.snapshot("vm1", "s1");
    push(&a, "vm1", "bucket");
    s3.put(
        "holdfast-lease",
        "backups/leases/push-old-0000000000000001",
        "{}",
    );
    let before = s3.objects("holdfast-lease");
    let r = a.run(&["gc", "--target", "bucket"]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(
        r.stderr.contains("leases/push-old-0000000000000001")
            && r.stderr.contains("older holdfast"),
        "{}",
        r.stderr
    );
    assert_eq!(
        s3.objects("holdfast-lease"),
        before,
        "gc changed the bucket"
    );
}

/// A bucket written by a release before repository format 2: reading it changes nothing; the
/// first push marks it version 3 (a conditional put: format-2 manifests, salted packs and
/// intents) so that older releases refuse to write it.
#[test]
fn a_version_1_bucket_is_marked_version_3_by_its_first_push_only() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-old");
    let n = node_for(&s3);
    let img = n.image("v.img", &mixed_bytes(2 << 20, 4));
    n.add_volume("vm1", &img, "64KiB");
    add_s3_target(&n, &s3, "old", "holdfast-old");
    // Back to version 1, as an older release left it.
    s3.python(
        r#"
import boto3, json, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
c = json.loads(s3.get_object(Bucket="holdfast-old", Key="backups/config")["Body"].read())
c["version"] = 1
s3.put_object(Bucket="holdfast-old", Key="backups/config", Body=json.dumps(c).encode())
"#,
        &[],
    );
    let version = || n.run(&["target", "check", "old", "--json"]).json()["format-version"].clone();
    assert_eq!(version(), 1);
    n.ok(&["snapshot", "list", "vm1", "--target", "old"]);
    assert_eq!(version(), 1, "reading the bucket changed it");
    n.snapshot("vm1", "s1");
    let r = push(&n, "vm1", "old");
    assert_eq!(r["kind"], "baseline", "{r}");
    assert_eq!(version(), 3);
    assert_eq!(target_ids(&n, "vm1", "old").len(), 1);
    n.ok(&["verify", "--target", "old"]);
}

/// Damage in a bucket is damage, never a panic: a pack cut short makes verify name the
/// snapshot and blocks (exit 6) and restore fail with exit 6, leaving no file behind.
#[test]
fn a_truncated_pack_is_reported_as_damage() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-cut");
    let a = node_for(&s3);
    let img = a.image("vm1.img", &random_bytes(3 * MIB));
    a.add_volume("vm1", &img, "64KiB");
    add_s3_target(&a, &s3, "bucket", "holdfast-cut");
    a.snapshot("vm1", "s1");
    push(&a, "vm1", "bucket");
    let pack = s3
        .objects("holdfast-cut")
        .into_iter()
        .find(|o| o.starts_with("backups/packs/"))
        .unwrap();
    let key = pack.split_whitespace().next().unwrap().to_string();
    s3.python(
        r#"
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
body = s3.get_object(Bucket="holdfast-cut", Key=sys.argv[4])["Body"].read()
s3.put_object(Bucket="holdfast-cut", Key=sys.argv[4], Body=body[: len(body) // 2])
"#,
        &[&key],
    );
    let r = a.run(&["verify", "--target", "bucket", "--json"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    let report = r.json();
    let damage = report["damage"].as_array().unwrap();
    assert!(!damage.is_empty(), "{report}");
    assert!(
        damage[0]["snapshot"].as_str().unwrap().contains("vm1@s1"),
        "{report}"
    );
    assert!(
        !damage[0]["blocks"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let out = a.path("restored.img");
    let r = a.run(&[
        "snapshot",
        "restore",
        "vm1@s1",
        "--target",
        "bucket",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let left: Vec<_> = std::fs::read_dir(a.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("restored"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// What S3's client does not retry is retried: a listing whose body is cut half-way, and a
/// connection reset while a pack's body is being sent. The push succeeds and the bucket
/// verifies.
#[test]
fn cut_listings_and_reset_uploads_are_retried() {
    let s3 = S3Server::start();
    s3.create_bucket("holdfast-flaky");
    let proxy = holdfast_tests::proxy::Proxy::start(s3.port);
    let a = node_for(&s3);
    let img = a.image("vm1.img", &random_bytes(4 * MIB));
    a.add_volume("vm1", &img, "64KiB");
    a.ok(&[
        "target",
        "add",
        "bucket",
        "--url",
        "s3://holdfast-flaky/backups",
        "--endpoint",
        &proxy.endpoint(),
        "--allow-http",
    ]);
    a.snapshot("vm1", "s1");
    proxy.cut_response("GET", "list-type=2", 40, 1);
    proxy.truncate_body("GET", "list-type=2", 60, 2);
    proxy.reset_during_body("PUT", "/holdfast-flaky/backups/packs/", 1 << 20, 1);
    let r = push(&a, "vm1", "bucket");
    assert_eq!(r["transferred"].as_array().unwrap().len(), 1, "{r}");
    let resets = proxy
        .requests()
        .iter()
        .filter(|q| q.starts_with("PUT /holdfast-flaky/backups/packs/"))
        .count();
    assert!(
        resets >= 2,
        "the reset upload was not sent again: {:?}",
        proxy.requests()
    );
    a.ok(&["verify", "--target", "bucket"]);
}
