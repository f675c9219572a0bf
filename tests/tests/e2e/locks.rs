//! Soft locks on one node: enforcement on every deletion path, generations, leases, the
//! read lock of `snapshot read`, bad input, and crashes while a lock set is written.

use std::io::Read;
use std::time::{Duration, Instant};

use holdfast_tests::{TestNode, mixed_bytes};
use serde_json::{Value, json};

/// A node with volume `v` and snapshots s0..s{n-1} of changing content.
/// Polls `f` until it gives a value (at most a minute).
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "waited a minute for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_with_snapshots(n: usize) -> TestNode {
    let node = TestNode::new();
    let img = node.path("v.img");
    for i in 0..n {
        std::fs::write(&img, mixed_bytes(200_000, 100 + i as u64)).unwrap();
        if i == 0 {
            node.add_volume("v", &img, "4KiB");
        }
        node.snapshot("v", &format!("s{i}"));
    }
    node
}

/// Starts `snapshot read v@s0 --hold-as NAME` with its output unread (the stream blocks on
/// the full pipe) and waits until its lock is registered.
fn start_reader(n: &TestNode, hold_as: &str, ttl: &str) -> std::process::Child {
    let child = n
        .cmd(&[
            "snapshot",
            "read",
            "v@s0",
            "--hold-as",
            hold_as,
            "--ttl",
            ttl,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let holder = format!("app:{hold_as}");
    let t = Instant::now();
    while locks(n, &["--holder", &holder]).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "read lock never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn names(n: &TestNode) -> Vec<String> {
    n.snapshot_names("v")
}

fn locks(n: &TestNode, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["lock", "list", "--json"];
    a.extend_from_slice(args);
    n.run(&a).json().as_array().unwrap().clone()
}

fn id_of(n: &TestNode, name: &str) -> String {
    n.snapshot_id(&format!("v@{name}"))
}

fn replace_set(n: &TestNode, set: &Value) -> Value {
    let f = n.path(&format!("set-{}.json", rand::random::<u32>()));
    std::fs::write(&f, serde_json::to_vec(set).unwrap()).unwrap();
    n.run(&["lock", "replace-set", f.to_str().unwrap()]).json()
}

#[test]
fn delete_prune_and_gc_refuse_locked_snapshots_until_released() {
    // Invariant 2 on every path: delete and prune refuse, gc keeps the data; after release
    // the same commands succeed.
    let n = node_with_snapshots(4);
    n.ok(&[
        "lock",
        "add",
        "v@s1",
        "--type",
        "application",
        "--value",
        "nightly-db",
        "--holder",
        "app:nightly-db",
    ]);
    let err = n.fails(&["snapshot", "delete", "v@s1"], 5);
    assert!(
        err.contains("app:nightly-db holds it as application \"nightly-db\""),
        "{err}"
    );
    assert!(err.contains("--break-locks"), "{err}");
    let plan = n.run(&["prune", "v", "--keep-last", "1", "--json"]).json();
    assert_eq!(names(&n), ["s1", "s3"], "{plan}");
    let kept: Vec<&Value> = plan["plan"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reasons"] == json!(["locked"]))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["locked-by"], json!(["app:nightly-db"]));
    n.ok(&["gc"]);
    n.ok(&["verify"]);
    assert_eq!(n.restore("v@s1"), mixed_bytes(200_000, 101));
    // Explain names the holder and the cost.
    let e = n.run(&["lock", "explain", "v@s1", "--json"]).json();
    assert_eq!(e["locks"][0]["holder"], "app:nightly-db");
    assert!(e["break-costs"][0].as_str().unwrap().contains("nightly-db"));
    n.ok(&["lock", "release", "v@s1", "--holder", "app:nightly-db"]);
    n.ok(&["snapshot", "delete", "v@s1"]);
    assert_eq!(names(&n), ["s3"]);
    let h = n.run(&["lock", "history", "--json"]).json();
    assert_eq!(h[0]["event"], "release");
}

#[test]
fn break_locks_needs_confirmation_and_is_recorded() {
    // --break-locks without a terminal needs --yes; with it the holders are named in history.
    let n = node_with_snapshots(2);
    n.ok(&[
        "lock",
        "add",
        "v@s0",
        "--type",
        "owner-name",
        "--value",
        "alice",
        "--holder",
        "app:audit",
    ]);
    let err = n.fails(&["snapshot", "delete", "v@s0", "--break-locks"], 2);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(names(&n), ["s0", "s1"]);
    n.ok(&["snapshot", "delete", "v@s0", "--break-locks", "--yes"]);
    assert_eq!(names(&n), ["s1"]);
    let h = n.run(&["lock", "history", "--json"]).json();
    assert_eq!(h[0]["event"], "break");
    assert_eq!(h[0]["holder"], "app:audit");
    assert_eq!(h[0]["value"], "alice");
    assert!(locks(&n, &[]).is_empty());
}

#[test]
fn lock_sets_follow_generations() {
    // Invariant 3: newer replaces (and so releases), older is ignored, the same is a refresh.
    let n = node_with_snapshots(3);
    let (s0, s1, s2) = (id_of(&n, "s0"), id_of(&n, "s1"), id_of(&n, "s2"));
    let set = |generation: u64, snaps: &[&str]| {
        json!({
            "volume": "v", "holder": "nodeB/v", "generation": generation,
            "locks": snaps.iter().map(|s| json!({"snapshot": s, "type": "destination-path", "value": "nodeB:/pool/v"})).collect::<Vec<_>>()
        })
    };
    assert_eq!(replace_set(&n, &set(5, &[&s0, &s1]))["outcome"], "replaced");
    let older = replace_set(&n, &set(4, &[&s2]));
    assert_eq!(older["outcome"], "ignored-stale", "{older}");
    assert_eq!(older["stored"], 5);
    let held: Vec<String> = locks(&n, &[])
        .iter()
        .map(|l| l["snapshot"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(held, [s0.clone(), s1.clone()]);
    // Sending the same generation twice equals once.
    assert_eq!(
        replace_set(&n, &set(5, &[&s0, &s1]))["outcome"],
        "refreshed"
    );
    assert_eq!(locks(&n, &[]).len(), 2);
    // A newer set without s0 releases it: s0 can go, s1 and s2 cannot.
    let newer = replace_set(&n, &set(6, &[&s1, &s2]));
    assert_eq!(newer["released"], 1, "{newer}");
    n.ok(&["snapshot", "delete", "v@s0"]);
    n.fails(&["snapshot", "delete", "v@s1"], 5);
    let h = n.run(&["lock", "history", "--json"]).json();
    assert_eq!(h[0]["event"], "release");
    assert_eq!(h[0]["snapshot"], s0.as_str());
}

#[test]
fn stale_locks_are_shown_and_released_only_where_configured() {
    // Invariant 7: an expired lease is reported as stale but still protects, until the
    // operator turns on auto-release for that holder.
    let n = node_with_snapshots(2);
    n.ok(&[
        "lock",
        "add",
        "v@s0",
        "--type",
        "application",
        "--value",
        "job",
        "--holder",
        "app:job",
        "--ttl",
        "3s",
    ]);
    n.ok(&[
        "lock",
        "add",
        "v@s1",
        "--type",
        "application",
        "--value",
        "keep",
        "--holder",
        "app:keep",
        "--ttl",
        "3s",
    ]);
    assert!(locks(&n, &["--stale"]).is_empty());
    // (Polled, not slept: a loaded machine takes its time.)
    let stale = wait_for("both leases to run out", || {
        let s = locks(&n, &["--stale"]);
        (s.len() == 2).then_some(s)
    });
    assert_eq!(stale[0]["stale"], true);
    let err = n.fails(&["snapshot", "delete", "v@s0"], 5);
    assert!(err.contains("stale"), "{err}");
    n.ok(&["lock", "auto-release", "--holder", "app:job"]);
    n.ok(&["snapshot", "delete", "v@s0"]);
    n.fails(&["snapshot", "delete", "v@s1"], 5);
    let h = n.run(&["lock", "history", "--json"]).json();
    assert_eq!(h[0]["event"], "expire");
    assert_eq!(h[0]["holder"], "app:job");
}

#[test]
fn snapshot_read_holds_its_lock_exactly_while_reading() {
    // The stream blocks on a full pipe: meanwhile the lock is there; after the stream ends
    // it is gone, and the bytes are the snapshot's.
    let n = node_with_snapshots(1);
    let mut child = start_reader(&n, "restic-nightly", "1h");
    n.fails(&["snapshot", "delete", "v@s0"], 5);
    let mut data = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut data).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(data, mixed_bytes(200_000, 100));
    assert!(locks(&n, &[]).is_empty());
    let h = n.run(&["lock", "history", "--json"]).json();
    assert_eq!(h[0]["detail"], "snapshot read finished");
}

#[test]
fn a_killed_reader_leaves_a_lock_that_goes_stale_after_its_ttl() {
    let n = node_with_snapshots(1);
    let mut child = start_reader(&n, "dies", "3s");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(locks(&n, &["--holder", "app:dies"])[0]["stale"], false);
    let stale = wait_for("the lease to run out", || {
        let s = locks(&n, &["--stale"]);
        (!s.is_empty()).then_some(s)
    });
    assert_eq!(stale[0]["holder"], "app:dies");
    n.fails(&["snapshot", "delete", "v@s0"], 5);
}

#[test]
fn bad_lock_input_is_refused_and_changes_nothing() {
    let n = node_with_snapshots(1);
    n.ok(&[
        "lock",
        "add",
        "v@s0",
        "--type",
        "application",
        "--value",
        "x",
        "--holder",
        "app:x",
    ]);
    let before = n.fingerprint();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[
                "lock",
                "add",
                "v@nosuch",
                "--type",
                "application",
                "--value",
                "x",
                "--holder",
                "app:y",
            ],
            3,
            "no snapshot",
        ),
        (
            &[
                "lock",
                "add",
                "v@s0",
                "--type",
                "ownername",
                "--value",
                "x",
                "--holder",
                "app:y",
            ],
            2,
            "unknown lock type",
        ),
        (
            &[
                "lock",
                "add",
                "v@s0",
                "--type",
                "custom:a/b",
                "--value",
                "x",
                "--holder",
                "app:y",
            ],
            2,
            "path separator",
        ),
        (
            &[
                "lock",
                "add",
                "v@s0",
                "--type",
                "application",
                "--value",
                "a\u{1b}[31m",
                "--holder",
                "app:y",
            ],
            2,
            "control",
        ),
        (
            &[
                "lock",
                "add",
                "v@s0",
                "--type",
                "application",
                "--value",
                "",
                "--holder",
                "app:y",
            ],
            2,
            "empty",
        ),
        (
            &[
                "lock",
                "add",
                "v@s0",
                "--type",
                "application",
                "--value",
                "x",
                "--holder",
                "../etc",
            ],
            2,
            "holder",
        ),
        (
            &[
                "lock",
                "add",
                "v@s0",
                "--type",
                "application",
                "--value",
                "x",
                "--holder",
                "app:a b",
            ],
            2,
            "' '",
        ),
        (
            &["lock", "release", "v@s0", "--holder", "app:nobody"],
            3,
            "holds no lock",
        ),
    ];
    for (args, code, needle) in cases {
        let err = n.fails(args, *code);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A 10 MB value and a lock on a snapshot that does not exist, in a lock set file.
    let id = id_of(&n, "s0");
    for (value, snap, needle) in [
        ("x".repeat(10 << 20), id.clone(), "limit is 1024"),
        (
            "ok".to_string(),
            "0123456789abcdef0123".to_string(),
            "no snapshot with id",
        ),
    ] {
        let f = n.path("bad.json");
        let set = json!({"volume": "v", "holder": "app:z", "generation": 1,
            "locks": [{"snapshot": snap, "type": "application", "value": value}]});
        std::fs::write(&f, serde_json::to_vec(&set).unwrap()).unwrap();
        let err = n.fails(
            &["lock", "replace-set", f.to_str().unwrap()],
            if needle == "limit is 1024" { 2 } else { 3 },
        );
        assert!(err.contains(needle), "{}", &err[..err.len().min(500)]);
        assert!(err.len() < 2000);
    }
    let f = n.path("garbage.json");
    std::fs::write(&f, b"{\"volume\": \"v\", \"holder\": \"app:z\", \"generation\": 1, \"locks\": [], \"extra\": 1}").unwrap();
    n.fails(&["lock", "replace-set", f.to_str().unwrap()], 2);
    assert_eq!(before, n.fingerprint());
}

#[test]
fn a_crash_while_writing_a_lock_set_leaves_the_old_set_or_the_new_one() {
    // kill -9 at random instants of replacing a 5,000-lock set: afterwards the holder's
    // set is whole, either generation 1 (values old-*) or generation 2 (values new-*).
    let n = node_with_snapshots(2);
    let (s0, s1) = (id_of(&n, "s0"), id_of(&n, "s1"));
    let set = |generation: u64, prefix: &str| {
        json!({"volume": "v", "holder": "nodeB/v", "generation": generation,
            "locks": (0..5_000).map(|i| json!({"snapshot": if i % 2 == 0 { &s0 } else { &s1 },
                "type": "custom:test", "value": format!("{prefix}-{i}")})).collect::<Vec<_>>()})
    };
    replace_set(&n, &set(1, "old"));
    let f = n.path("new.json");
    std::fs::write(&f, serde_json::to_vec(&set(2, "new")).unwrap()).unwrap();
    let t = Instant::now();
    n.ok(&["lock", "replace-set", f.to_str().unwrap()]);
    let full = t.elapsed();
    replace_set(&n, &set(3, "old"));
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..6u64 {
        let f = n.path(&format!("new{k}.json"));
        std::fs::write(&f, serde_json::to_vec(&set(4 + 2 * k, "new")).unwrap()).unwrap();
        let mut child = n.spawn(&["lock", "replace-set", f.to_str().unwrap()]);
        std::thread::sleep(full.mul_f64(k as f64 / 5.0));
        let _ = child.kill();
        let _ = child.wait();
        let l = locks(&n, &["--holder", "nodeB/v"]);
        assert_eq!(l.len(), 5_000);
        let prefixes: std::collections::BTreeSet<&str> = l
            .iter()
            .map(|x| x["value"].as_str().unwrap().split('-').next().unwrap())
            .collect();
        assert_eq!(prefixes.len(), 1, "a mix of old and new locks");
        seen.insert(prefixes.into_iter().next().unwrap().to_string());
        // Back to an old set with a newer generation for the next round.
        replace_set(&n, &set(5 + 2 * k, "old"));
    }
    eprintln!("states seen after kills: {seen:?}");
}

/// A downstream whose lease ran out is reported stale with how long ago it was last seen; its
/// set is released by a prune only where `release_stale = true` says so (issue 21, item 6).
#[test]
fn stale_downstreams_are_reported_and_released_only_where_configured() {
    use holdfast_tests::cascade::{Peer, Relations, Tls};
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let img = a.node.image("vm1.img", &mixed_bytes(1 << 20, 3));
    a.node.add_volume("vm1", &img, "64KiB");
    let (b, d) = (Peer::new("b"), Peer::new("d"));
    a.configure(
        &tls,
        Relations {
            downstreams: vec![
                (&b, vec!["vm1"], "lease = \"2s\"\nrelease_stale = true"),
                (&d, vec!["vm1"], "lease = \"2s\""),
            ],
            ..Default::default()
        },
    );
    for p in [&b, &d] {
        p.configure(
            &tls,
            Relations {
                upstream: Some((&a, "vm1")),
                ..Default::default()
            },
        );
    }
    a.start();
    let s1 = a.node.snapshot("vm1", "s1");
    b.mirror("vm1");
    d.mirror("vm1");
    a.node.snapshot("vm1", "s2");
    a.node.snapshot("vm1", "s3");
    // Both go quiet; after the lease, both are stale, seen at least 2 s ago.
    let t0 = Instant::now();
    let stale = loop {
        let st = a.status();
        let down: Vec<Value> = st["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|v| v["from-downstream"].as_array().cloned().unwrap_or_default())
            .collect();
        if down.len() == 2 && down.iter().all(|s| s["stale"] == true) {
            break down;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never stale: {st}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for s in &stale {
        assert!(s["seen-ago-ms"].as_u64().unwrap() >= 2000, "{s}");
        assert!(s["stale-for-ms"].as_u64().is_some(), "{s}");
    }
    // The first command that looks at the locks releases B's stale set (release_stale) and
    // keeps D's, reported stale; a prune keeps s1 for D.
    let listed = a.node.ok(&["lock", "list", "--stale"]);
    assert!(
        !listed.contains("b/vm1") && listed.contains("d/vm1"),
        "{listed}"
    );
    a.node.ok(&["prune", "vm1", "--keep-last", "1"]);
    assert!(a.locked_by("b/vm1").is_empty(), "{:?}", a.locks());
    assert_eq!(a.locked_by("d/vm1"), vec![s1.clone()]);
    assert!(a.ids("vm1").contains(&s1));
    let history = a.node.ok(&["lock", "history", "--json"]);
    let events: Vec<Value> = serde_json::from_str(&history).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["holder"] == "b/vm1" && e.to_string().contains("expire")),
        "{history}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["holder"] == "d/vm1" && e.to_string().contains("expire")),
        "{history}"
    );
}

/// Invariant 2 under a race (issue 21, item 2): locks are added while a prune deletes, many
/// times over; every lock that was set protects its snapshot, because the check runs in the
/// transaction that deletes. (A check before that transaction lets some through.)
#[test]
fn locks_set_while_a_prune_runs_hold_their_snapshots() {
    let n = node_with_snapshots(24);
    let mut locked_total = 0;
    for round in 0..3 {
        let names: Vec<String> = n.snapshot_names("v");
        let holder = format!("app:race{round}");
        let locked: Vec<String> = std::thread::scope(|s| {
            let pruner = s.spawn(|| n.run(&["prune", "v", "--keep-last", "1"]));
            let mut locked = Vec::new();
            // Newest first, so that locks and deletions meet in the middle.
            for name in names.iter().rev() {
                let r = n.run(&[
                    "lock",
                    "add",
                    &format!("v@{name}"),
                    "--type",
                    "application",
                    "--value",
                    "race",
                    "--holder",
                    &holder,
                ]);
                if r.code == 0 {
                    locked.push(name.clone());
                }
            }
            let p = pruner.join().unwrap();
            assert!(p.code == 0 || p.code == 5, "prune: {}", p.stderr);
            locked
        });
        let left = n.snapshot_names("v");
        for name in &locked {
            assert!(
                left.contains(name),
                "round {round}: {name} was locked and deleted"
            );
        }
        locked_total += locked.len();
        // Next round: release, and take new snapshots to race over.
        n.ok(&["lock", "release", "--holder", &holder, "--volume", "v"]);
        let img = n.path("v.img");
        for i in 0..12 {
            std::fs::write(&img, mixed_bytes(200_000, 1000 * (round + 1) + i)).unwrap();
            n.ok(&[
                "snapshot",
                "create",
                "v",
                "--name",
                &format!("r{round}-{i}"),
            ]);
        }
    }
    assert!(locked_total > 0);
}
