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
use holdfast_tests::{Run, TestNode};
use serde_json::Value;

const MIB: usize = 1 << 20;
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
    n.ok(&[
        "target",
        "add",
        "bucket",
        "--url",
        &format!("s3://{bucket}/backups"),
        "--endpoint",
        endpoint,
        "--allow-http",
    ]);
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

fn output_of(child: Child) -> Run {
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn spawn_json(n: &TestNode, args: &[&str]) -> Child {
    n.cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The target verifies, and `vol@name` restores from it, on a node that has only the URL.
fn restores_from_the_bucket(s3: &S3Server, bucket: &str, reference: &str, want: &[u8]) {
    let fresh = node(s3, "fresh");
    add_target(&fresh, &s3.endpoint(), bucket);
    let report = fresh
        .run(&["verify", "--target", "bucket", "--json"])
        .json();
    assert_eq!(report["damage"], serde_json::json!([]), "{report}");
    let out = fresh.path("r.img");
    fresh.ok(&[
        "snapshot",
        "restore",
        reference,
        "--target",
        "bucket",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == want, "{reference} differs");
}

/// Sequence A: a gc decides to delete the packs of a pruned snapshot and stalls in its first
/// delete; meanwhile a push commits a snapshot with exactly that content. The push must not
/// rely on the condemned packs (it stores the chunks again), so when the gc resumes and
/// deletes, the new snapshot is whole. (Before format 3, the push deduplicated against the
/// dead packs once the gc's lease had expired, and the gc deleted them under it.)
#[test]
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
        let r = output_of(gc);
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
    let g = json_of(&output_of(gc));
    assert!(u(&g["packs-deleted"]) >= 1, "{g}");
    restores_from_the_bucket(&s3, "gc-stall", "vm1@s3", &x);
}

/// Sequence B: a push deduplicates against the packs of a pruned snapshot and stalls before
/// writing its manifest; gcs condemn those packs and, a grace period later, delete them; the
/// push resumes and writes its manifest. Its confirmation finds the packs condemned and
/// stores those chunks again before it reports success.
#[test]
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
    let r = json_of(&output_of(push));
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
    restores_from_the_bucket(&s3, "push-stall", "vm1@s3", &x);
}

/// A push killed after its intent: its snapshot stays hidden, `target check` names it, and
/// the same node's next push finishes it at once (no waiting for any lease). Another node's
/// unfinished push is finished by `target clear-pending`, refused for this node's own.
#[test]
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
        let r = output_of(child);
        self.pids.lock().unwrap().retain(|p| *p != pid);
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

/// Two nodes push overlapping data to one directory target while both prune and gc it, and
/// processes are paused at random for longer than the grace period (1 s): every command
/// succeeds, and after every round each committed snapshot restores bit for bit.
#[test]
fn pushes_and_gcs_paused_at_random_lose_nothing() {
    const ROUNDS: usize = 5;
    const BLOCK: usize = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/target", dir.path().display());
    let nodes: Vec<TestNode> = (0..2)
        .map(|i| {
            let mut n = TestNode::uninitialised();
            n.env.push(("HOLDFAST_TARGET_GRACE".into(), "1s".into()));
            n.ok(&["init", "--node-id", &format!("n{i}")]);
            n.ok(&["target", "add", "bucket", "--url", &url]);
            n
        })
        .collect();
    // Blocks come from a small pool, so snapshots (of both nodes) share chunks with pruned
    // ones: pushes keep meeting packs that gcs are condemning and deleting.
    let pool: Vec<Vec<u8>> = (0..12).map(|_| random_bytes(BLOCK)).collect();
    let chaos = Arc::new(Chaos::default());
    let pauser = {
        let c = chaos.clone();
        std::thread::spawn(move || c.pause_at_random(Duration::from_secs(1)))
    };
    let content: Mutex<BTreeMap<(usize, String), Vec<u8>>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for (i, n) in nodes.iter().enumerate() {
            let (chaos, pool, content) = (&chaos, &pool, &content);
            scope.spawn(move || {
                let vol = format!("v{i}");
                let img = n.path("v.img");
                for round in 0..ROUNDS {
                    let bytes: Vec<u8> = (0..16)
                        .flat_map(|_| pool[rand::random::<u32>() as usize % pool.len()].clone())
                        .collect();
                    std::fs::write(&img, &bytes).unwrap();
                    if round == 0 {
                        n.add_volume(&vol, &img, "64KiB");
                    }
                    let name = format!("r{round}");
                    n.snapshot(&vol, &name);
                    content.lock().unwrap().insert((i, name), bytes);
                    for args in [
                        vec!["mirror", "push", &vol, "--target", "bucket"],
                        vec!["prune", &vol, "--target", "bucket", "--keep-last", "2"],
                        vec!["gc", "--target", "bucket"],
                    ] {
                        let r = chaos.run(n, &args);
                        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
                    }
                    // Every committed snapshot of this volume restores bit for bit.
                    let listed = n
                        .run(&["snapshot", "list", &vol, "--target", "bucket", "--json"])
                        .json();
                    for s in listed.as_array().unwrap() {
                        let name = s["name"].as_str().unwrap().to_string();
                        let out = n.path("restored.img");
                        let r = chaos.run(
                            n,
                            &[
                                "snapshot",
                                "restore",
                                &format!("{vol}@{name}"),
                                "--target",
                                "bucket",
                                "--to",
                                out.to_str().unwrap(),
                                "--force",
                            ],
                        );
                        assert_eq!(r.code, 0, "restore {vol}@{name}: {}", r.stderr);
                        let want = content.lock().unwrap()[&(i, name.clone())].clone();
                        assert!(std::fs::read(&out).unwrap() == want, "{vol}@{name} differs");
                    }
                }
            });
        }
    });
    chaos.stop.store(true, Ordering::Relaxed);
    pauser.join().unwrap();
    assert!(*chaos.pauses.lock().unwrap() > 0, "nothing was paused");
    let report = nodes[0]
        .run(&["verify", "--target", "bucket", "--json"])
        .json();
    assert_eq!(report["damage"], serde_json::json!([]), "{report}");
}
