//! Region mirroring (issue: region mirroring with qtree-name soft locks): one partition or
//! byte range of a volume through a cascade of real daemons on 127.0.0.1, on GPT disk images
//! made with `sgdisk`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use holdfast_tests::cascade::{Peer, Relations, Tls};
use holdfast_tests::mixed_bytes;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;

fn sgdisk(img: &Path, args: &[&str]) {
    let out = Command::new("sgdisk")
        .args(args)
        .arg(img)
        .output()
        .expect("run sgdisk (Debian package gdisk; ./test.sh installs it)");
    assert!(
        out.status.success(),
        "sgdisk {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 40 MiB disk image full of data with a GPT: partition 1 "boot" (4 MiB at 1 MiB), 2
/// "data" (8 MiB at 5 MiB), a gap, and 3 "rest" from 24 MiB to the last usable sector (its end
/// is not on a 64 KiB block: the backup GPT follows it).
fn disk(p: &Peer) -> std::path::PathBuf {
    let img = p.node.image("vm1.img", &mixed_bytes(40 * MIB as usize, 11));
    sgdisk(
        &img,
        &[
            "-n",
            "1:2048:+4M",
            "-c",
            "1:boot",
            "-n",
            "2:10240:+8M",
            "-c",
            "2:data",
            "-n",
            "3:49152:0",
            "-c",
            "3:rest",
        ],
    );
    img
}

/// `(first byte, length)` of partition `n`, from `sgdisk -i`.
fn partition(img: &Path, n: u32) -> (u64, u64) {
    let out = Command::new("sgdisk")
        .arg("-i")
        .arg(n.to_string())
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let sector = |what: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(what))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {what} in {text}"))
    };
    let (first, last) = (sector("First sector: "), sector("Last sector: "));
    (first * 512, (last - first + 1) * 512)
}

/// The bytes of partition `n` of the image, read by `dd`.
fn dd(img: &Path, n: u32) -> Vec<u8> {
    let (at, len) = partition(img, n);
    let out = Command::new("dd")
        .arg(format!("if={}", img.display()))
        .args([
            "bs=512",
            &format!("skip={}", at / 512),
            &format!("count={}", len / 512),
            "status=none",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Writes `blocks` fresh random blocks into partition `n`, from its block `from` on.
fn change_in(img: &Path, n: u32, from: u64, blocks: u64) {
    let (at, _) = partition(img, n);
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    for i in 0..blocks {
        let bytes: Vec<u8> = (0..BLOCK).map(|_| rand::random::<u8>()).collect();
        f.write_all_at(&bytes, at + (from + i * 3) * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A with a GPT disk `vm1` and its three partitions named as regions.
fn source(name: &str) -> (Peer, std::path::PathBuf) {
    let a = Peer::new(name);
    let img = disk(&a);
    a.node.add_volume("vm1", &img, "64KiB");
    a.node
        .ok(&["volume", "region", "add", "vm1", "boot", "--partition", "1"]);
    a.node.ok(&[
        "volume",
        "region",
        "add",
        "vm1",
        "data",
        "--partition-label",
        "data",
    ]);
    a.node
        .ok(&["volume", "region", "add", "vm1", "rest", "--partition", "3"]);
    (a, img)
}

fn restore_region(p: &Peer, snap: &str, region: Option<&str>) -> Vec<u8> {
    let out = p.node.path("restored.img");
    let mut args = vec![
        "snapshot",
        "restore",
        snap,
        "--to",
        out.to_str().unwrap(),
        "--force",
    ];
    if let Some(r) = region {
        args.extend(["--region", r]);
    }
    p.node.ok(&args);
    std::fs::read(out).unwrap()
}

/// Locks on `p` as `lock list --type qtree-name --json` shows them.
fn qtree_locks(p: &Peer) -> Vec<Value> {
    p.node
        .run(&["lock", "list", "--type", "qtree-name", "--json"])
        .json()
        .as_array()
        .unwrap()
        .clone()
}

/// A (the GPT disk `vm1`) → B (region `data` of it; A grants B `volumes` and `grant`) → C
/// (B's replica, whole), with A's and B's daemons running.
fn region_cascade(
    volumes: Vec<&str>,
    grant: &str,
) -> (Tls, (Peer, std::path::PathBuf, Peer, Peer)) {
    let tls = Tls::new();
    let (mut a, img) = source("a");
    let mut b = Peer::new("b");
    let c = Peer::new("c");
    a.configure(
        &tls,
        Relations {
            downstreams: vec![(&b, volumes, grant)],
            ..Default::default()
        },
    );
    b.configure(
        &tls,
        Relations {
            upstream: Some((&a, "vm1")),
            mirror_extra: "region = \"data\"",
            downstreams: vec![(&c, vec!["vm1"], "")],
            ..Default::default()
        },
    );
    c.configure(
        &tls,
        Relations {
            upstream: Some((&b, "vm1")),
            ..Default::default()
        },
    );
    a.start();
    b.start();
    (tls, (a, img, b, c))
}

/// Tests 1, 2 and 5: A → B (partition 2 only) → C (B's replica): C restores partition 2 as
/// `dd` reads it on A; writes outside the region transfer no chunk, writes inside about the
/// change; a partition that grows is followed and the replicas grow.
#[test]
fn a_partition_cascades_alone_and_follows_its_growth() {
    let (_tls, (a, img, b, c)) = region_cascade(vec![], "regions = [\"vm1/data\"]");

    a.node.snapshot("vm1", "s1");
    let p2 = dd(&img, 2);
    assert_eq!(p2.len() as u64, 8 * MIB);
    let r = b.mirror("vm1");
    assert_eq!(r["kind"], "baseline", "{r}");
    assert!(
        u(&r["plain-bytes-fetched"]) <= 8 * MIB,
        "B fetched more than the region: {r}"
    );
    let r = c.mirror("vm1");
    assert_eq!(r["kind"], "baseline", "{r}");
    assert_eq!(b.node.snapshots("vm1")[0]["size"], 8 * MIB);
    assert!(
        c.node.restore("vm1@s1") == p2,
        "C's restore differs from A's partition 2"
    );
    assert!(restore_region(&a, "vm1@s1", Some("data")) == p2);
    assert!(restore_region(&c, "vm1@s1", Some("data")) == p2);
    let listed = b.node.run(&["volume", "list", "--json"]).json();
    assert_eq!(listed[0]["region"], "data", "{listed}");
    let e = b.node.fails(
        &[
            "volume", "region", "add", "vm1", "x", "--offset", "0", "--length", "64KiB",
        ],
        2,
    );
    assert!(e.contains("replica"), "{e}");

    // Writes outside the region: nothing but the manifest's delta crosses.
    change_in(&img, 1, 0, 8);
    change_in(&img, 3, 2, 8);
    a.node.snapshot("vm1", "s2");
    let r = b.mirror("vm1");
    assert_eq!(r["kind"], "incremental", "{r}");
    assert_eq!(u(&r["chunks-fetched"]), 0, "{r}");
    assert!(u(&r["bytes-fetched"]) < 4096, "{r}");
    assert_eq!(u(&c.mirror("vm1")["chunks-fetched"]), 0);

    // Writes inside: about the change.
    change_in(&img, 2, 5, 4);
    a.node.snapshot("vm1", "s3");
    let r = b.mirror("vm1");
    assert_eq!(u(&r["chunks-fetched"]), 4, "{r}");
    assert_eq!(u(&r["plain-bytes-fetched"]), 4 * BLOCK, "{r}");
    let r = c.mirror("vm1");
    assert_eq!(u(&r["chunks-fetched"]), 4, "{r}");
    assert!(c.node.restore("vm1@s3") == dd(&img, 2));

    // C's base on B is a qtree-name lock naming the region; B carries it to A.
    let on_b = qtree_locks(&b);
    assert!(
        on_b.iter()
            .any(|l| l["holder"] == "c/vm1" && l["value"] == "vm1/data"),
        "{on_b:?}"
    );
    b.mirror("vm1");
    let on_a = qtree_locks(&a);
    assert!(
        on_a.iter().any(|l| l["holder"] == "b/vm1"
            && l["value"] == "vm1/data"
            && l["path"].as_array().unwrap().iter().any(|n| n == "c")),
        "{on_a:?}"
    );
    let explained = a.node.ok(&["lock", "explain", "vm1@s3"]);
    assert!(explained.contains("region"), "{explained}");

    // Partition 2 grows to 12 MiB (into the gap): the region follows, the replicas grow.
    sgdisk(&img, &["-d", "2", "-n", "2:10240:+12M", "-c", "2:data"]);
    change_in(&img, 2, 130, 10);
    a.node.snapshot("vm1", "s4");
    let regions = a
        .node
        .run(&["volume", "region", "list", "vm1", "--json"])
        .json();
    let data = regions
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "data")
        .unwrap();
    assert_eq!(data["extent"]["length"], 12 * MIB, "{regions}");
    let r = b.mirror("vm1");
    assert_eq!(r["kind"], "incremental", "{r}");
    assert!(
        u(&r["plain-bytes-fetched"]) <= 5 * MIB,
        "growing by 4 MiB fetched {r}"
    );
    c.mirror("vm1");
    let p2 = dd(&img, 2);
    assert_eq!(p2.len() as u64, 12 * MIB);
    assert!(c.node.restore("vm1@s4") == p2);
    assert!(restore_region(&a, "vm1@s4", Some("data")) == p2);
    let d = a.node.run(&[
        "snapshot", "diff", "vm1@s3", "vm1@s4", "--region", "data", "--json",
    ]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(d.json()["to-size"], 12 * MIB);
    for p in [&a, &b, &c] {
        p.node.ok(&["verify"]);
    }
}

/// Test 3: C, a replica of B's region replica, is away while A prunes to keep-last 2: its
/// base survives on A and B as a qtree-name lock whose path names C; its return is
/// incremental; the old base goes afterwards.
#[test]
fn an_absent_region_replica_keeps_its_base_as_a_qtree_lock() {
    let (_tls, (a, img, b, c)) = region_cascade(vec!["vm1"], "");
    let s0 = a.node.snapshot("vm1", "s0");
    b.mirror("vm1");
    c.mirror("vm1");
    b.mirror("vm1"); // carries C's base to A

    for i in 1..=5u64 {
        change_in(&img, 2, i * 7, 2);
        change_in(&img, 3, i * 7, 2);
        a.node.snapshot("vm1", &format!("s{i}"));
        a.node.ok(&["prune", "vm1", "--keep-last", "2"]);
        b.mirror("vm1");
        assert!(a.ids("vm1").contains(&s0), "A pruned C's base at step {i}");
        assert!(b.ids("vm1").contains(&s0), "B dropped C's base at step {i}");
    }
    let held = qtree_locks(&a);
    assert!(
        held.iter().any(|l| l["snapshot"] == s0.as_str()
            && l["value"] == "vm1/data"
            && l["path"].as_array().unwrap().iter().any(|n| n == "c")),
        "{held:?}"
    );

    let r = c.mirror("vm1");
    assert_eq!(r["kind"], "incremental", "{r}");
    assert!(u(&r["plain-bytes-fetched"]) <= 10 * BLOCK, "{r}");
    assert!(c.node.restore("vm1@s5") == dd(&img, 2));

    // The old base is released on B, then on A, and retention takes it.
    b.mirror("vm1");
    a.node.ok(&["prune", "vm1", "--keep-last", "2"]);
    assert!(!a.ids("vm1").contains(&s0));
    b.mirror("vm1");
    assert!(!b.ids("vm1").contains(&s0));
    for p in [&a, &b, &c] {
        p.node.ok(&["verify"]);
    }
}

/// Test 4: two downstreams mirror different regions (one granted only its region, one whose
/// region ends inside a block) and a third the whole volume: each keeps its own base, and
/// releasing one releases nothing else.
#[test]
fn regions_and_the_whole_volume_fan_out_with_their_own_bases() {
    let tls = Tls::new();
    let (mut a, img) = source("a");
    let (b, d, e) = (Peer::new("b"), Peer::new("d"), Peer::new("e"));
    a.configure(
        &tls,
        Relations {
            downstreams: vec![
                (&b, vec![], "regions = [\"vm1/data\"]"),
                (&d, vec!["vm1"], ""),
                (&e, vec!["vm1"], ""),
            ],
            ..Default::default()
        },
    );
    for (p, extra) in [
        (&b, "region = \"data\""),
        (&d, "region = \"rest\""),
        (&e, ""),
    ] {
        p.configure(
            &tls,
            Relations {
                upstream: Some((&a, "vm1")),
                mirror_extra: extra,
                ..Default::default()
            },
        );
    }
    a.start();
    let s1 = a.node.snapshot("vm1", "s1");
    for p in [&b, &d, &e] {
        p.mirror("vm1");
    }
    assert!(b.node.restore("vm1@s1") == dd(&img, 2));
    // Partition 3 ends inside a block: its replica holds its bytes exactly, no byte of the
    // backup GPT after it.
    let p3 = dd(&img, 3);
    assert_ne!(p3.len() as u64 % BLOCK, 0);
    assert!(d.node.restore("vm1@s1") == p3);
    assert!(restore_region(&a, "vm1@s1", Some("rest")) == p3);
    assert!(e.node.restore("vm1@s1") == std::fs::read(&img).unwrap());

    change_in(&img, 2, 1, 2);
    change_in(&img, 3, 1, 2);
    let s2 = a.node.snapshot("vm1", "s2");
    b.mirror("vm1");
    assert_eq!(a.locked_by("b/vm1"), vec![s2.clone()]);
    assert_eq!(a.locked_by("d/vm1"), vec![s1.clone()]);
    assert_eq!(a.locked_by("e/vm1"), vec![s1.clone()]);
    let types: Vec<(String, String)> = a
        .locks()
        .iter()
        .map(|l| {
            (
                l["holder"].as_str().unwrap().into(),
                l["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        types.contains(&("b/vm1".into(), "qtree-name".into())),
        "{types:?}"
    );
    assert!(
        types.contains(&("d/vm1".into(), "qtree-name".into())),
        "{types:?}"
    );
    assert!(
        types.contains(&("e/vm1".into(), "destination-path".into())),
        "{types:?}"
    );

    // Releasing D's base releases nothing of B's or E's.
    a.node
        .ok(&["lock", "release", "--holder", "d/vm1", "--volume", "vm1"]);
    assert!(a.locked_by("d/vm1").is_empty());
    assert_eq!(a.locked_by("b/vm1"), vec![s2.clone()]);
    assert_eq!(a.locked_by("e/vm1"), vec![s1.clone()]);
    a.node.ok(&["prune", "vm1", "--keep-last", "1"]);
    assert_eq!(a.ids("vm1"), vec![s1.clone(), s2.clone()]);
    let r = e.mirror("vm1");
    assert_eq!(r["kind"], "incremental", "{r}");
    let r = d.mirror("vm1");
    assert_eq!(r["kind"], "incremental", "{r}");
    assert!(d.node.restore("vm1@s2") == dd(&img, 3));

    // B is granted its region only: the whole volume and other regions are refused, and
    // its listing shows no other region.
    let status = |path: &str| a.request(&tls, "GET", path, "b", &b.token, "").0;
    assert_eq!(
        status(&format!("/v1/volumes/vm1/snapshots/{s2}/manifest?format=2")),
        403
    );
    assert_eq!(
        status(&format!(
            "/v1/volumes/vm1/snapshots/{s2}/manifest?format=2&region=rest"
        )),
        403
    );
    assert_eq!(
        status(&format!(
            "/v1/volumes/vm1/snapshots/{s2}/manifest?format=2&region=data"
        )),
        200
    );
    let (_, listing) = a.request(&tls, "GET", "/v1/volumes/vm1/snapshots", "b", &b.token, "");
    let listing: Value = serde_json::from_str(&listing).unwrap();
    let regions = &listing["snapshots"][1]["regions"];
    assert_eq!(regions.as_object().unwrap().len(), 1, "{listing}");
    assert_eq!(
        listing["snapshots"][1]["stats"]["new-bytes"], 0,
        "{listing}"
    );

    // A snapshot without B's region: B neither lists nor pins it.
    a.node.ok(&["volume", "region", "remove", "vm1", "data"]);
    let s3 = a.node.snapshot("vm1", "s3");
    let (_, listing) = a.request(&tls, "GET", "/v1/volumes/vm1/snapshots", "b", &b.token, "");
    assert!(!listing.contains(&s3), "{listing}");
    let set = serde_json::json!({"volume": "vm1", "holder": "b/vm1", "generation": u64::MAX / 2,
        "locks": [{"snapshot": s3, "type": "qtree-name", "value": "vm1/data"}]});
    let (code, body) = a.request(
        &tls,
        "PUT",
        "/v1/volumes/vm1/locks",
        "b",
        &b.token,
        &set.to_string(),
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("granted only regions"), "{body}");

    // Only bytes past the end of partition 3 change (the backup GPT's entries share its last
    // block): the region's diff shows nothing, on A as on D.
    let (at, len) = partition(&img, 3);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xa5; 100], at + len + 100).unwrap();
    a.node.snapshot("vm1", "s4");
    let d4 = a
        .node
        .run(&[
            "snapshot", "diff", "vm1@s3", "vm1@s4", "--region", "rest", "--json",
        ])
        .json();
    assert_eq!(d4["changed-blocks"], 0, "{d4}");
    let whole = a
        .node
        .run(&["snapshot", "diff", "vm1@s3", "vm1@s4", "--json"])
        .json();
    assert_eq!(whole["changed-blocks"], 1, "{whole}");

    // B's grant changes to a region none of A's snapshots has: B's update fails and changes
    // nothing here or there (its replica and its base lock stay).
    a.stop();
    a.configure(
        &tls,
        Relations {
            downstreams: vec![
                (&b, vec![], "regions = [\"vm1/other\"]"),
                (&d, vec!["vm1"], ""),
                (&e, vec!["vm1"], ""),
            ],
            ..Default::default()
        },
    );
    a.start();
    let (b_before, held_before) = (b.ids("vm1"), a.locked_by("b/vm1"));
    let r = b.mirror_run("vm1");
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("lists no snapshot"), "{}", r.stderr);
    assert_eq!(b.ids("vm1"), b_before);
    assert_eq!(a.locked_by("b/vm1"), held_before);
}

/// Test 6: bad regions are refused with a clear error and change nothing; a region that no
/// longer fits stops the snapshot (exit 6) with nothing committed.
#[test]
fn bad_regions_are_refused_and_change_nothing() {
    let (a, img) = source("a");
    let n = &a.node;
    let before = n.ok(&["volume", "region", "list", "vm1", "--json"]);
    for (args, code, says) in [
        (
            vec!["x", "--offset", "1000", "--length", "64KiB"],
            2,
            "multiple of the volume's block size",
        ),
        (
            vec!["x", "--offset", "0", "--length", "1000"],
            2,
            "does not end at the volume's end",
        ),
        (
            vec!["x", "--offset", "6MiB", "--length", "1MiB"],
            2,
            "overlap",
        ),
        (
            vec!["x", "--offset", "32MiB", "--length", "64MiB"],
            2,
            "past the end",
        ),
        (vec!["x", "--partition", "7"], 2, "no such partition"),
        (
            vec!["x", "--partition-label", "nope"],
            2,
            "no such partition",
        ),
        (
            vec!["data", "--offset", "20MiB", "--length", "1MiB"],
            4,
            "already has a region",
        ),
        (vec!["x", "--partition", "1", "--offset", "0"], 2, ""),
    ] {
        let mut full = vec!["volume", "region", "add", "vm1"];
        full.extend(args.iter().copied());
        let e = n.fails(&full, code);
        assert!(e.contains(says), "{args:?}: {e}");
    }
    assert_eq!(n.ok(&["volume", "region", "list", "vm1", "--json"]), before);
    n.fails(&["volume", "region", "remove", "vm1", "nope"], 3);

    // A region that no longer fits: the volume shrank under partition 3.
    let s1 = a.node.snapshot("vm1", "s1");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(30 * MIB).unwrap();
    let e = n.fails(&["snapshot", "create", "vm1", "--name", "s2"], 6);
    assert!(e.contains("rest") && e.contains("past the end"), "{e}");
    // The partition table is gone: the partitions cannot be found.
    f.set_len(40 * MIB).unwrap();
    f.write_all_at(&[0u8; 34 * 512], 0).unwrap();
    f.write_all_at(&[0u8; 33 * 512], 40 * MIB - 33 * 512)
        .unwrap();
    let e = n.fails(&["snapshot", "create", "vm1", "--name", "s2"], 6);
    assert!(e.contains("no partition table"), "{e}");
    assert_eq!(a.ids("vm1"), vec![s1]);

    // Restoring a region a snapshot lacks.
    let e = n.fails(
        &[
            "snapshot",
            "restore",
            "vm1@s1",
            "--region",
            "nope",
            "--to",
            "/tmp/never-written",
        ],
        3,
    );
    assert!(e.contains("no region nope"), "{e}");

    // A replica carries its upstream's regions; it names none of its own.
    let tls = Tls::new();
    let mut a = a;
    let b = Peer::new("b");
    a.serve_to(&tls, &b, "vm1", "region = \"missing\"");
    a.start();
    let e = b.node.fails(
        &[
            "mirror",
            "run",
            "vm1",
            "--config",
            b.config.to_str().unwrap(),
        ],
        3,
    );
    assert!(
        e.contains("no region missing") || e.contains("region missing"),
        "{e}"
    );
    assert!(b.ids("vm1").is_empty());
}
