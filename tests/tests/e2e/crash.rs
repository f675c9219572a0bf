//! `kill -9` at random instants of create, delete and gc: the repository always verifies,
//! no half snapshot is ever visible, and a rerun completes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use holdfast_tests::{Paused, TestNode, mixed_bytes};
use rand::{Rng, SeedableRng};

fn rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("HOLDFAST_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test seed: {seed} (set HOLDFAST_TEST_SEED to replay)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Starts `args`, kills it with SIGKILL after `delay` (or lets it finish first).
fn kill_after(n: &TestNode, args: &[&str], delay: Duration) -> bool {
    let mut child = n.spawn(args);
    let started = Instant::now();
    while started.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    !finished
}

/// Every visible snapshot restores to the bytes it was taken from.
fn check_visible(n: &TestNode, volume: &str, expected: &HashMap<String, Vec<u8>>) {
    check_new(n, volume, expected, &mut Default::default());
}

/// [`check_visible`] for the snapshots not in `checked` (committed snapshots never change, and
/// `verify` checks every chunk of all of them).
fn check_new(
    n: &TestNode,
    volume: &str,
    expected: &HashMap<String, Vec<u8>>,
    checked: &mut std::collections::HashSet<String>,
) {
    n.ok(&["verify"]);
    for s in n.snapshots(volume) {
        let name = s["name"].as_str().unwrap();
        if !checked.insert(name.to_string()) {
            continue;
        }
        let want = expected
            .get(name)
            .unwrap_or_else(|| panic!("unexpected snapshot {name}"));
        assert_eq!(
            &n.restore(&format!("{volume}@{name}")),
            want,
            "snapshot {name}"
        );
    }
}

/// A node on a copy of `n`'s state (in `n`'s folder, as `name`).
fn copy_of(n: &TestNode, name: &str) -> TestNode {
    let copy = TestNode::at(n.path(name));
    let st = std::process::Command::new("cp")
        .args([
            "-a",
            n.state.to_str().unwrap(),
            copy.state.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    copy
}

fn time_it(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

#[test]
fn killing_snapshot_create_at_random_instants_never_leaves_half_a_snapshot() {
    let mut rng = rng();
    let n = TestNode::new();
    // Incompressible: 36 MiB make two full packs (16 MiB each), stored before the commit.
    let data = random_data(36 << 20, 21);
    let img = n.image("v.img", &data);
    n.add_volume("v", &img, "64KiB");
    // Calibrate on a separate node so the kills land inside the run.
    let cal = TestNode::new();
    let cimg = cal.image("v.img", &data);
    cal.add_volume("v", &cimg, "64KiB");
    let full = time_it(|| {
        cal.snapshot("v", "c");
    });
    let mut expected = HashMap::new();
    let mut checked = Default::default();
    let mut killed = 0;
    // Where each kill landed: after the run had stored packs but before it committed.
    let mut mid_write = 0;
    // Delays are drawn from the later part of `window`, which adapts to the machine.
    let mut window = full.mul_f64(1.1);
    for k in 0..12 {
        let name = format!("c{k}");
        // New data every run: a run that deduplicates everything writes nothing to kill.
        let data = random_data(36 << 20, 100 + k);
        std::fs::write(&img, &data).unwrap();
        expected.insert(name.clone(), data);
        // Past the start of the process: the first pack is stored after 16 MiB of data.
        let delay = window.mul_f64(rng.random_range(0.3..1.0));
        let packs_before = dir_bytes(&n.state.join("repo"));
        // The window follows the machine: a run that finished first shrinks it, a kill that
        // came before anything was stored widens it.
        if kill_after(&n, &["snapshot", "create", "v", "--name", &name], delay) {
            killed += 1;
            let committed = n.snapshots("v").iter().any(|s| s["name"] == name.as_str());
            if dir_bytes(&n.state.join("repo")) == packs_before {
                window = window.mul_f64(1.25);
            } else if !committed {
                mid_write += 1;
            }
        } else {
            window = window.mul_f64(0.75);
        }
        check_new(&n, "v", &expected, &mut checked);
        // The rerun completes (unless the killed run had already committed).
        if !n.snapshots("v").iter().any(|s| s["name"] == name.as_str()) {
            n.snapshot("v", &name);
        }
    }
    assert!(killed >= 3, "only {killed} runs were interrupted");
    assert!(
        mid_write >= 2,
        "only {mid_write} of {killed} kills landed after packs were stored and before the commit"
    );
    eprintln!("{killed} runs killed, {mid_write} of them mid-write");
    n.ok(&["gc"]);
    check_visible(&n, "v", &expected);
}

/// Incompressible bytes, the same for the same seed.
fn random_data(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut out[..]);
    out
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn killing_delete_and_gc_at_random_instants_keeps_the_rest_intact() {
    let mut rng = rng();
    let n = TestNode::new();
    let img = n.path("v.img");
    let mut expected = HashMap::new();
    for k in 0..6 {
        let data = mixed_bytes(6 << 20, 30 + k);
        std::fs::write(&img, &data).unwrap();
        if k == 0 {
            n.add_volume("v", &img, "64KiB");
        }
        n.snapshot("v", &format!("s{k}"));
        expected.insert(format!("s{k}"), data);
    }
    // A delete killed at a random instant: it landed before the catalog let go of the
    // snapshot (still listed, deleted again), or after (gone, perhaps its manifest left).
    let orphans = |n: &TestNode| {
        n.run(&["gc", "--dry-run", "--json"]).json()["orphan-manifests-deleted"]
            .as_u64()
            .unwrap()
    };
    let delay = Duration::from_millis(rng.random_range(0..40));
    let killed = kill_after(&n, &["snapshot", "delete", "v@s1"], delay);
    check_visible(&n, "v", &expected);
    let listed = n.snapshots("v").iter().any(|s| s["name"] == "s1");
    eprintln!(
        "delete kill after {delay:?} landed {}",
        match (killed, listed) {
            (false, _) => "after it finished",
            (true, true) => "before its catalog commit",
            (true, false) if orphans(&n) > 0 => "between its catalog commit and its manifest",
            (true, false) => "after its last write",
        }
    );
    if listed {
        n.ok(&["snapshot", "delete", "v@s1"]);
    }
    expected.remove("s1");
    n.ok(&["snapshot", "delete", "v@s3"]);
    expected.remove("s3");
    let gc_time = {
        // Measure gc on a copy of the state, so the real one still has garbage.
        let copy = copy_of(&n, "copy");
        time_it(|| {
            copy.ok(&["gc"]);
        })
    };
    // Each kill on a fresh copy of the garbage-laden state, at an instant that homes in on
    // gc's writing phase: a kill that changed nothing moves the window later, one that came
    // after gc's deletes moves it earlier. Where each landed is recorded, and enough must land
    // while gc was changing the repository (mid-write, or after its last delete but before it
    // finished) for the test to mean anything.
    let (mut lo, mut hi) = (0.0f64, 1.1f64);
    let during = |l: &&String| !l.ends_with(":before") && !l.ends_with(":after");
    let mut landed = Vec::new();
    for attempt in 0..20 {
        if hi - lo < 0.02 {
            // Timing noise closed the window: open it again around where it closed.
            (lo, hi) = ((lo - 0.1).max(0.0), hi + 0.1);
        }
        let copy = copy_of(&n, &format!("try{attempt}"));
        let before = copy.fingerprint();
        let frac = rng.random_range(lo..hi);
        let killed = kill_after(&copy, &["gc"], gc_time.mul_f64(frac));
        // Mid-write: gc had changed the repository and still had work left.
        let work_left = || {
            let r = copy.run(&["gc", "--dry-run", "--json"]).json();
            r["bytes-freed"].as_u64().unwrap_or(0) > 0
                || r["packs-deleted"].as_u64().unwrap_or(0) > 0
                || r["packs-repacked"].as_u64().unwrap_or(0) > 0
        };
        let where_ = if !killed {
            hi = frac;
            "after"
        } else if copy.fingerprint() == before {
            lo = frac;
            "before"
        } else if work_left() {
            "mid-write"
        } else {
            // Changed everything it was going to, not yet done (recording the gc, exiting).
            hi = frac;
            "after its last delete"
        };
        landed.push(format!("{frac:.2}:{where_}"));
        check_visible(&copy, "v", &expected);
        copy.ok(&["gc"]);
        check_visible(&copy, "v", &expected);
        if landed.iter().filter(during).count() >= 3 {
            break;
        }
    }
    eprintln!("gc kills landed (fraction of gc's time: where): {landed:?}");
    // gc's deleting phase is a small part of its run (starting the process and reading
    // manifests and indexes are most of it): every kill landed somewhere recorded, at least
    // two while gc was changing the repository and before it finished.
    assert!(
        landed.iter().filter(during).count() >= 2,
        "too few kills landed while gc was changing the repository: {landed:?}"
    );
    n.ok(&["gc"]);
    check_visible(&n, "v", &expected);
    let again = n.run(&["gc", "--json"]).json();
    assert_eq!(again["bytes-freed"], 0, "{again}");

    // And one killed where it must land: uncatalogued, its manifest still there. The
    // snapshot is gone for good; the manifest is an orphan that gc removes, and nothing else.
    let flags = tempfile::tempdir().unwrap();
    Paused::at(
        &n,
        "snapshot-delete-uncatalogued",
        flags.path(),
        &["snapshot", "delete", "v@s4"],
    )
    .kill();
    expected.remove("s4");
    assert!(!n.snapshots("v").iter().any(|s| s["name"] == "s4"));
    assert_eq!(orphans(&n), 1, "the killed delete left no orphan manifest");
    check_visible(&n, "v", &expected);
    let r = n.run(&["gc", "--json"]).json();
    assert_eq!(r["orphan-manifests-deleted"], 1, "{r}");
    check_visible(&n, "v", &expected);
}

#[test]
fn gc_after_a_repack_interrupted_before_its_deletes_keeps_every_live_chunk() {
    // State as a crash leaves it when a repack wrote its new pack but deleted nothing yet:
    // the old, partly dead pack and the new one both exist. The next gc redoes the same
    // repack (same layout, same pack name) and must not delete the only copies.
    let n = TestNode::new();
    let img = n.path("v.img");
    let a = mixed_bytes(3 << 20, 41);
    std::fs::write(&img, &a).unwrap();
    n.add_volume("v", &img, "64KiB");
    n.snapshot("v", "a");
    // b shares about half of a's blocks, so deleting a leaves a's pack partly dead.
    let mut b = a.clone();
    for x in &mut b[(3 << 20) / 2..] {
        *x = x.wrapping_add(1);
    }
    std::fs::write(&img, &b).unwrap();
    n.snapshot("v", "b");
    n.ok(&["snapshot", "delete", "v@a"]);
    // Run gc on a copy, then bring its new packs and indexes back into the original.
    let copy = TestNode::at(n.path("copy"));
    let cp = |from: &std::path::Path, to: &std::path::Path| {
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(st.success());
    };
    cp(&n.state, &copy.state);
    let r = copy.run(&["gc", "--json"]).json();
    assert!(
        r["packs-repacked"].as_u64().unwrap() >= 1,
        "the scenario needs a repack: {r}"
    );
    for dir in ["repo/packs", "repo/index"] {
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/{dir}/.", copy.state.display()))
            .arg(n.state.join(dir))
            .status()
            .unwrap();
        assert!(st.success());
    }
    n.ok(&["gc"]);
    n.ok(&["verify"]);
    assert_eq!(n.restore("v@b"), b);
    n.ok(&["gc"]);
    n.ok(&["verify"]);
    assert_eq!(n.restore("v@b"), b);
}

/// `kill -9` of `mirror push` at random instants, each run with new data: the target never
/// shows a half-pushed snapshot, it always verifies, a rerun completes, and kills are seen to
/// land after packs were uploaded and before the snapshot was committed there.
#[test]
fn killing_a_push_at_random_instants_never_leaves_half_a_snapshot_in_the_target() {
    let mut rng = rng();
    let n = TestNode::new();
    let img = n.image("v.img", &random_data(36 << 20, 500));
    n.add_volume("v", &img, "64KiB");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    n.ok(&["target", "add", "bucket", "--url", &url]);
    let listed = |n: &TestNode| -> Vec<String> {
        n.run(&["snapshot", "list", "v", "--target", "bucket", "--json"])
            .json()
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    // Calibrate: one push of new data.
    n.snapshot("v", "p0");
    let full = time_it(|| {
        n.ok(&["mirror", "push", "v", "--target", "bucket"]);
    });
    let mut window = full.mul_f64(1.1);
    let (mut killed, mut mid_upload) = (0, 0);
    let mut expected = HashMap::from([("p0".to_string(), random_data(36 << 20, 500))]);
    for k in 1..11u64 {
        let name = format!("p{k}");
        let data = random_data(36 << 20, 500 + k);
        std::fs::write(&img, &data).unwrap();
        n.snapshot("v", &name);
        expected.insert(name.clone(), data);
        let before = dir_bytes(dir.path());
        let delay = window.mul_f64(rng.random_range(0.4..1.0));
        // The window follows the machine: a run that finished first shrinks it, a kill that
        // came before anything was uploaded widens it.
        if kill_after(&n, &["mirror", "push", "v", "--target", "bucket"], delay) {
            killed += 1;
            if dir_bytes(dir.path()) == before {
                window = window.mul_f64(1.25);
            } else if !listed(&n).contains(&name) {
                mid_upload += 1;
            }
        } else {
            window = window.mul_f64(0.75);
        }
        // Whatever the kill left, the target verifies and shows only whole snapshots.
        let report = n.run(&["verify", "--target", "bucket", "--json"]).json();
        assert_eq!(report["damage"], serde_json::json!([]), "{report}");
        n.ok(&["mirror", "push", "v", "--target", "bucket"]);
        assert!(listed(&n).contains(&name));
    }
    eprintln!("{killed} pushes killed, {mid_upload} of them mid-upload");
    assert!(killed >= 3, "only {killed} pushes were interrupted");
    assert!(
        mid_upload >= 2,
        "only {mid_upload} of {killed} kills landed after packs were uploaded and before the commit"
    );
    // Every snapshot in the target restores to its bytes.
    for name in listed(&n) {
        let out = n.path("r.img");
        n.ok(&[
            "snapshot",
            "restore",
            &format!("v@{name}"),
            "--target",
            "bucket",
            "--to",
            out.to_str().unwrap(),
            "--force",
        ]);
        assert!(std::fs::read(&out).unwrap() == expected[&name], "{name}");
    }
}
