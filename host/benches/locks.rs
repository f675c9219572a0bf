//! Soft-lock benchmark: 10,000 snapshots and 100,000 locks on one volume.
//!
//! `cargo bench -p holdfast --bench locks` prints medians of the library calls behind
//! `lock list`, `lock explain`, `prune --dry-run` and a 1,000-lock set replacement, and the
//! wall time of the same CLI commands when `target/release/holdfast` exists. Seeded and
//! deterministic: the same catalog every run.

use std::path::Path;
use std::time::{Duration, Instant};

use holdfast::catalog::{SnapshotRecord, VolumeRecord};
use holdfast::id::SnapshotId;
use holdfast::retention::{KeepRules, PrunePlan};
use holdfast::snapshot::{self, CreateOptions};
use holdfast::softlock::{LockSetUpdate, LockType, NewLock};
use holdfast::state::Node;

const SNAPSHOTS: usize = 10_000;
const HOLDERS: usize = 100;
const LOCKS_PER_HOLDER: usize = 1_000;
const RUNS: usize = 15;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(mut f: impl FnMut() -> T) -> Duration {
    let mut v = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        std::hint::black_box(f());
        v.push(t.elapsed());
    }
    median(v)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let node = rt
        .block_on(Node::init(&state, Some("bench".parse().unwrap())))
        .unwrap();
    let img = dir.path().join("v.img");
    holdfast::sample::write_mixed_image(&img, 1 << 20, 64 << 10, 7).unwrap();
    let vol: holdfast::id::VolumeName = "v".parse().unwrap();
    node.catalog
        .add_volume(&VolumeRecord::image(vol.clone(), img.clone(), 64 << 10))
        .unwrap();
    // 10,000 catalogued snapshots (records only), then three real ones to explain.
    let t0 = 1_600_000_000_000u64;
    let recs: Vec<SnapshotRecord> = (0..SNAPSHOTS - 3)
        .map(|i| SnapshotRecord {
            id: SnapshotId::generate(t0 + i as u64 * 60_000),
            volume: vol.clone(),
            name: format!("auto-{i:05}").parse().unwrap(),
            created_unix_ms: t0 + i as u64 * 60_000,
            size: 1 << 20,
            block_size: 64 << 10,
            labels: Default::default(),
            parent: None,
            stats: Default::default(),
            regions: Default::default(),
        })
        .collect();
    node.catalog.commit_snapshots(&recs).unwrap();
    let hidden = indicatif::ProgressBar::hidden();
    for k in 0..3 {
        holdfast::sample::rewrite_blocks(&img, 64 << 10, 0.1, k).unwrap();
        rt.block_on(snapshot::create(
            &node,
            &vol,
            CreateOptions {
                name: Some(format!("real-{k}").parse().unwrap()),
                labels: Default::default(),
                hooks: Default::default(),
                full_read: Default::default(),
            },
            &hidden,
        ))
        .unwrap();
    }
    let snaps = node.catalog.snapshots(&vol).unwrap();
    assert_eq!(snaps.len(), SNAPSHOTS);
    let locks = node.catalog.locks();
    let set_for = |h: usize, generation: u64| LockSetUpdate {
        volume: vol.clone(),
        holder: format!("node{h:03}/v").parse().unwrap(),
        generation,
        locks: (0..LOCKS_PER_HOLDER)
            .map(|i| NewLock {
                snapshot: snaps[(h * 97 + i * 7 + generation as usize) % SNAPSHOTS].id,
                lock_type: LockType::DestinationPath,
                value: format!("node{h:03}:/pool/v#{i}"),
                lease_ms: Some(3_600_000),
                path: vec!["relay".parse().unwrap()],
            })
            .collect(),
    };
    let t = Instant::now();
    for h in 0..HOLDERS {
        locks.replace_set(set_for(h, 1)).unwrap();
    }
    eprintln!(
        "setup: {} lock sets of {} in {:?}",
        HOLDERS,
        LOCKS_PER_HOLDER,
        t.elapsed()
    );
    let total: usize = locks
        .sets(Some(&vol))
        .unwrap()
        .iter()
        .map(|s| s.locks.len())
        .sum();
    assert_eq!(total, HOLDERS * LOCKS_PER_HOLDER);

    let explained = &snaps[SNAPSHOTS - 2];
    locks
        .add(
            &vol,
            &"app:bench".parse().unwrap(),
            NewLock {
                snapshot: explained.id,
                lock_type: LockType::Application,
                value: "bench".into(),
                lease_ms: None,
                path: vec![],
            },
        )
        .unwrap();

    let list = time(|| {
        let sets = locks.sets(Some(&vol)).unwrap();
        sets.iter().map(|s| s.locks.len()).sum::<usize>()
    });
    let explain = time(|| {
        let l = locks.locks_on(&vol, &explained.id).unwrap();
        let m = rt
            .block_on(snapshot::load_manifest(&node.repo, explained))
            .unwrap();
        let p = rt
            .block_on(snapshot::load_manifest(&node.repo, &snaps[SNAPSHOTS - 3]))
            .unwrap();
        let n = rt
            .block_on(snapshot::load_manifest(&node.repo, &snaps[SNAPSHOTS - 1]))
            .unwrap();
        (l.len(), m.blocks.len() + p.blocks.len() + n.blocks.len())
    });
    let prune = time(|| {
        let s = node.catalog.snapshots(&vol).unwrap();
        let locked = locks.locked_snapshots(&vol).unwrap();
        let rules = KeepRules {
            keep_last: Some(100),
            keep_within: None,
        };
        PrunePlan::compute(&vol, &s, &locked, &rules, holdfast::now_unix_ms())
            .unwrap()
            .to_prune()
            .count()
    });
    let mut generation = 1;
    let replace = time(|| {
        generation += 1;
        locks.replace_set(set_for(0, generation)).unwrap()
    });
    println!("library calls, 10,000 snapshots, 100,000 locks, median of {RUNS}:");
    println!("  lock list (load all 100,000 locks){:>8.1} ms", ms(list));
    println!(
        "  lock explain (locks + 3 manifests){:>8.1} ms",
        ms(explain)
    );
    println!("  prune --dry-run (plan)            {:>8.1} ms", ms(prune));
    println!(
        "  replace a 1,000-lock set          {:>8.1} ms",
        ms(replace)
    );

    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/holdfast");
    if bin.exists() {
        let cli = |args: &[&str]| {
            time(|| {
                let out = std::process::Command::new(&bin)
                    .arg("-q")
                    .args(args)
                    .env("HOLDFAST_STATE", &state)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                assert!(out.success(), "{args:?}");
            })
        };
        let explained_ref = format!("v@{}", explained.name);
        let set_file = dir.path().join("set.json");
        std::fs::write(
            &set_file,
            serde_json::to_vec(&set_for(1, 1_000_000)).unwrap(),
        )
        .unwrap();
        println!("whole CLI commands (process start included), median of {RUNS}:");
        println!(
            "  holdfast lock list                {:>8.1} ms",
            ms(cli(&["lock", "list"]))
        );
        println!(
            "  holdfast lock explain             {:>8.1} ms",
            ms(cli(&["lock", "explain", &explained_ref]))
        );
        println!(
            "  holdfast prune --dry-run          {:>8.1} ms",
            ms(cli(&["prune", "v", "--keep-last", "100", "--dry-run"]))
        );
        println!(
            "  holdfast lock replace-set (1,000) {:>8.1} ms",
            ms(cli(&["lock", "replace-set", set_file.to_str().unwrap()]))
        );
    } else {
        println!("(build target/release/holdfast to also time the CLI commands)");
    }
    if let Ok(keep) = std::env::var("HOLDFAST_BENCH_KEEP") {
        let _ = std::fs::remove_dir_all(&keep);
        std::process::Command::new("cp")
            .args(["-a", state.to_str().unwrap(), &keep])
            .status()
            .unwrap();
        eprintln!("state kept in {keep}");
    }
    drop(node);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
