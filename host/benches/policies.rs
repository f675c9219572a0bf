//! Policy benchmark: per-call latency of a lock decision with 1,000 snapshots and 1,000 locks
//! in the view (fresh Store per call) by keep-base (holdfast:policy@0.2.0) and by the same
//! policy built against 0.1.0, what passing the view costs in each version, a retention plan by
//! gfs-retention over the same view, load time from the precompiled cache versus the first
//! compile, memory per loaded policy, and a daemon-like start that loads 10 registered
//! policies. Then what a policy written in Python or JavaScript costs beside its Rust twin
//! (app-hold and app-hold-py, gfs-retention and gfs-retention-js): first compile, load from
//! the cached artifact, memory per loaded policy, p50/p99 per decision over 1,000 snapshots
//! with the default limits.
//!
//! `(cd plugins && cargo build --release && ./build-py-js.sh target/wasm32-wasip2/release) &&
//! cargo bench -p holdfast --bench policies`
//! (uses plugins/target/wasm32-wasip2/{release,debug}/: keep_base, keep_base_v01, hostile,
//! hostile_v01, gfs_retention, app_hold, app_hold_py, gfs_retention_js).

use std::path::Path;
use std::time::{Duration, Instant};

use holdfast::catalog::{SnapshotRecord, VolumeRecord};
use holdfast::id::SnapshotId;
use holdfast::policy::registry::{self, Policies};
use holdfast::policy::{Limits, Phase, PolicyEngine, WorldVersion};
use holdfast::softlock::{LockSetUpdate, LockType, NewLock};
use holdfast::state::Node;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2");
    let wasm_path = ["release", "debug"]
        .iter()
        .map(|p| root.join(p).join("keep_base.wasm"))
        .find(|p| p.exists())
        .expect("build the policies first: (cd plugins && cargo build --release)");
    let wasm = std::fs::read(&wasm_path).unwrap();
    println!("component {} ({} bytes)", wasm_path.display(), wasm.len());
    let sibling = |name: &str| std::fs::read(wasm_path.with_file_name(name)).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let node = rt
        .block_on(Node::init(&state, Some("bench".parse().unwrap())))
        .unwrap();
    let img = dir.path().join("v.img");
    std::fs::write(&img, b"x").unwrap();
    let vol: holdfast::id::VolumeName = "v".parse().unwrap();
    node.catalog
        .add_volume(&VolumeRecord::image(vol.clone(), img, 4096))
        .unwrap();
    let t0 = 1_600_000_000_000u64;
    let recs: Vec<SnapshotRecord> = (0..1000)
        .map(|i| SnapshotRecord {
            id: SnapshotId::generate(t0 + i * 3_600_000),
            volume: vol.clone(),
            name: format!("hourly-{i:04}").parse().unwrap(),
            created_unix_ms: t0 + i * 3_600_000,
            size: 1 << 30,
            block_size: 65536,
            labels: [("backup".to_string(), "done".to_string())].into(),
            parent: None,
            stats: Default::default(),
            regions: Default::default(),
        })
        .collect();
    node.catalog.commit_snapshots(&recs).unwrap();
    // 1,000 locks from 10 downstreams, 100 each.
    for h in 0..10 {
        node.catalog
            .locks()
            .replace_set(LockSetUpdate {
                volume: vol.clone(),
                holder: format!("node{h}/v").parse().unwrap(),
                generation: 1,
                locks: (0..100)
                    .map(|i| NewLock {
                        snapshot: recs[(h * 37 + i * 9) % 1000].id,
                        lock_type: LockType::DestinationPath,
                        value: format!("node{h}:/pool/v"),
                        lease_ms: None,
                        path: vec![],
                    })
                    .collect(),
            })
            .unwrap();
    }

    let engine = PolicyEngine::new().unwrap();
    let t = Instant::now();
    let artifact = engine.compile("keep-base", &wasm).unwrap();
    let first_compile = t.elapsed();
    let mut loads = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let p = engine
            .load(
                "keep-base",
                &artifact,
                Default::default(),
                Limits::default(),
            )
            .unwrap();
        loads.push(t.elapsed());
        drop(p);
    }
    loads.sort();

    let policy = engine
        .load(
            "keep-base",
            &artifact,
            [("n".to_string(), "2".to_string())].into(),
            Limits::default(),
        )
        .unwrap();
    assert_eq!(policy.world(), WorldVersion::V0_2);
    let load = |name: &str, file: &str, config: &[(&str, &str)]| {
        let artifact = engine.compile(name, &sibling(file)).unwrap();
        let config = config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        engine
            .load(name, &artifact, config, Limits::default())
            .unwrap()
    };
    let view = registry::view(&node, &vol, Phase::BeforeMirror).unwrap();
    assert_eq!(view.local_snapshots.len(), 1000);
    assert_eq!(view.locks_from_downstream.len(), 1000);
    // Preparing a view (indexing it for 0.2 and for checking answers), once per decision;
    // dropping the views is not part of it.
    let mut preps = Vec::new();
    let mut prepared = Vec::with_capacity(200);
    for v in vec![view.clone(); 200] {
        let t = Instant::now();
        prepared.push(v.prepare());
        preps.push(t.elapsed());
    }
    drop(prepared);
    preps.sort();
    let timed = |n: usize, mut f: Box<dyn FnMut() + '_>| {
        for _ in 0..n.min(50) {
            f();
        }
        let mut out: Vec<Duration> = (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        out.sort();
        out
    };
    let prepared = view.clone().prepare();
    let mut n_locks = 0;
    let calls = timed(
        2000,
        Box::new(|| n_locks = policy.decide_locks(&prepared).unwrap().len()),
    );
    // The same decision by keep-base built against 0.1, which gets the whole view copied in.
    let v01 = load("keep-base-v01", "keep_base_v01.wasm", &[("n", "2")]);
    assert_eq!(v01.world(), WorldVersion::V0_1);
    assert_eq!(
        v01.decide_locks(&prepared).unwrap(),
        policy.decide_locks(&prepared).unwrap(),
        "0.1 and 0.2 keep-base decide alike"
    );
    let calls_v01 = timed(500, Box::new(|| drop(v01.decide_locks(&prepared).unwrap())));
    // The view handed to a policy that ignores it: the cost of passing it in, per version.
    let idle = load("idle", "hostile.wasm", &[]);
    let transfer = timed(
        500,
        Box::new(|| drop(idle.decide_locks(&prepared).unwrap())),
    );
    let idle_v01 = load("idle-v01", "hostile_v01.wasm", &[]);
    let transfer_v01 = timed(
        500,
        Box::new(|| drop(idle_v01.decide_locks(&prepared).unwrap())),
    );
    // A retention plan over the same 1,000 snapshots: 24 kept by keep-last, 7 by daily, the
    // rest (969) proposed with a reason each.
    let gfs = load(
        "gfs",
        "gfs_retention.wasm",
        &[("keep-last", "24"), ("daily", "7")],
    );
    let retention = view.clone();
    let retention = holdfast::policy::NodeView {
        phase: Phase::Retention,
        ..retention
    }
    .prepare();
    let mut n_prunes = 0;
    let plans = timed(
        500,
        Box::new(|| n_prunes = gfs.plan_retention(&retention).unwrap().len()),
    );
    // Fixed cost of a call: a fresh store, instantiation and a trivial export.
    let mut fixed = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        policy.describe().unwrap();
        fixed.push(t.elapsed());
    }
    fixed.sort();

    // Memory per loaded policy: ten more loaded from the artifact.
    let before = rss_bytes();
    let many: Vec<_> = (0..10)
        .map(|i| {
            engine
                .load(
                    &format!("p{i}"),
                    &artifact,
                    Default::default(),
                    Limits::default(),
                )
                .unwrap()
        })
        .collect();
    let per_policy = (rss_bytes().saturating_sub(before)) / 10;
    drop(many);

    // A daemon-like start: a new engine, then the 10 registered policies from the cache.
    let policies = Policies::new(&node);
    for i in 0..10 {
        policies
            .add(
                &engine,
                &format!("kb{i}"),
                &wasm,
                vec![vol.clone()],
                Default::default(),
                Limits::default(),
            )
            .unwrap();
    }
    let mut starts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let e = PolicyEngine::new().unwrap();
        let loaded: Vec<_> = policies
            .list()
            .unwrap()
            .iter()
            .map(|r| policies.load(&e, r).unwrap().name.clone())
            .collect();
        assert_eq!(loaded.len(), 10);
        starts.push(t.elapsed());
    }
    starts.sort();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let summary = |d: &[Duration]| {
        format!(
            "p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
            ms(percentile(d, 0.5)),
            ms(percentile(d, 0.99)),
            ms(*d.last().unwrap())
        )
    };
    println!(
        "lock decision, 1,000 snapshots + 1,000 locks in the view, fresh Store per call, 2,000 calls:"
    );
    println!(
        "  keep-base (0.2.0)        {}   ({n_locks} locks answered)",
        summary(&calls)
    );
    println!(
        "  keep-base built for 0.1  {}   (500 calls)",
        summary(&calls_v01)
    );
    println!(
        "  preparing the view once per decision (shared by its policies): p50 {:.3} ms",
        ms(percentile(&preps, 0.5))
    );
    println!(
        "  passing the view to a policy that ignores it: 0.2 p50 {:.3} ms, 0.1 p50 {:.3} ms",
        ms(percentile(&transfer, 0.5)),
        ms(percentile(&transfer_v01, 0.5))
    );
    println!("retention plan, gfs-retention keep-last=24 daily=7 over 1,000 snapshots, 500 calls:");
    println!("  {}   ({n_prunes} prunes proposed)", summary(&plans));
    println!(
        "  fixed cost per call (fresh store + instantiate + describe): p50 {:.3} ms",
        ms(percentile(&fixed, 0.5))
    );
    println!("first compile             {:>8.1} ms", ms(first_compile));
    println!(
        "load from cached artifact {:>8.3} ms (median of 50)",
        ms(percentile(&loads, 0.5))
    );
    println!(
        "memory per loaded policy  {:>8.1} KiB (RSS growth over 10 loads)",
        per_policy as f64 / 1024.0
    );
    println!(
        "engine + 10 registered policies from the cache: {:.1} ms (median of 5)",
        ms(percentile(&starts, 0.5))
    );

    // The same decisions by policies in other languages and their Rust twins, with the
    // default limits (100 ms, 64 MiB): every call must pass.
    println!("policies by language, 1,000 snapshots in the view, default limits (100 ms, 64 MiB):");
    println!(
        "  {:<18} {:>8} {:>11} {:>11} {:>10} {:>10} {:>9}",
        "policy", "size", "compile", "load", "memory", "p50", "p99"
    );
    type Twin<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Phase);
    let twins: [Twin; 4] = [
        (
            "app-hold",
            "app_hold.wasm",
            &[("label", "backup:done")],
            Phase::Scheduled,
        ),
        (
            "app-hold-py",
            "app_hold_py.wasm",
            &[("label", "backup:done")],
            Phase::Scheduled,
        ),
        (
            "gfs-retention",
            "gfs_retention.wasm",
            &[("keep-last", "24"), ("daily", "7")],
            Phase::Retention,
        ),
        (
            "gfs-retention-js",
            "gfs_retention_js.wasm",
            &[("keep-last", "24"), ("daily", "7")],
            Phase::Retention,
        ),
    ];
    let mut answers = Vec::new();
    for (name, file, config, phase) in twins {
        let Ok(bytes) = std::fs::read(wasm_path.with_file_name(file)) else {
            println!("  {name:<18} (missing: build it with plugins/build-py-js.sh)");
            continue;
        };
        let t = Instant::now();
        let artifact = engine.compile(name, &bytes).unwrap();
        let compile = t.elapsed();
        let config: std::collections::BTreeMap<String, String> = config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut loads = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            drop(
                engine
                    .load(name, &artifact, config.clone(), Limits::default())
                    .unwrap(),
            );
            loads.push(t.elapsed());
        }
        loads.sort();
        let before = rss_bytes();
        let many: Vec<_> = (0..5)
            .map(|_| {
                engine
                    .load(name, &artifact, config.clone(), Limits::default())
                    .unwrap()
            })
            .collect();
        let memory = rss_bytes().saturating_sub(before) / 5;
        drop(many);
        let p = engine
            .load(name, &artifact, config.clone(), Limits::default())
            .unwrap();
        let v = holdfast::policy::NodeView {
            phase,
            ..view.clone()
        }
        .prepare();
        let mut answer = String::new();
        let calls = timed(
            200,
            Box::new(|| {
                answer = if phase == Phase::Retention {
                    format!("{} prunes", p.plan_retention(&v).unwrap().len())
                } else {
                    format!("{} locks", p.decide_locks(&v).unwrap().len())
                }
            }),
        );
        answers.push((name, answer.clone()));
        println!(
            "  {name:<18} {:>6.1} MB {:>8.0} ms {:>8.2} ms {:>6.0} KiB {:>7.2} ms {:>7.2} ms  ({answer})",
            bytes.len() as f64 / 1e6,
            ms(compile),
            ms(percentile(&loads, 0.5)),
            memory as f64 / 1024.0,
            ms(percentile(&calls, 0.5)),
            ms(percentile(&calls, 0.99)),
        );
    }
    for pair in answers.chunks(2) {
        if let [(a, x), (b, y)] = pair {
            assert_eq!(x, y, "{a} and {b} answer alike");
        }
    }
}
