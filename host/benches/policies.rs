//! Policy benchmark: per-call latency of a lock decision with 1,000 snapshots and 1,000 locks
//! in the view (fresh Store per call), load time from the precompiled cache versus the first
//! compile, memory per loaded policy, and a daemon-like start that loads 10 registered
//! policies.
//!
//! `(cd plugins && cargo build --release) && cargo bench -p holdfast --bench policies`
//! (uses plugins/target/wasm32-wasip2/{release,debug}/keep_base.wasm).

use std::path::Path;
use std::time::{Duration, Instant};

use holdfast::catalog::{SnapshotRecord, VolumeRecord};
use holdfast::id::SnapshotId;
use holdfast::policy::registry::{self, Policies};
use holdfast::policy::{Limits, Phase, PolicyEngine};
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
        .add_volume(&VolumeRecord {
            name: vol.clone(),
            image: img,
            block_size: 4096,
            added_unix_ms: 0,
        })
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
    let view = registry::view(&node, &vol, Phase::BeforeMirror).unwrap();
    assert_eq!(view.local_snapshots.len(), 1000);
    assert_eq!(view.locks_from_downstream.len(), 1000);
    let mut preps = Vec::new();
    for v in vec![view.clone(); 200] {
        let t = Instant::now();
        std::hint::black_box(v.prepare());
        preps.push(t.elapsed());
    }
    preps.sort();
    let view = view.prepare();
    for _ in 0..50 {
        policy.decide_locks(&view).unwrap();
    }
    let mut calls = Vec::new();
    let mut n_locks = 0;
    for _ in 0..2000 {
        let t = Instant::now();
        n_locks = policy.decide_locks(&view).unwrap().len();
        calls.push(t.elapsed());
    }
    calls.sort();
    // The same view handed to a policy that ignores it: the cost of passing it in.
    let idle_wasm = std::fs::read(wasm_path.with_file_name("hostile.wasm")).unwrap();
    let idle_artifact = engine.compile("idle", &idle_wasm).unwrap();
    let idle = engine
        .load(
            "idle",
            &idle_artifact,
            Default::default(),
            Limits::default(),
        )
        .unwrap();
    let mut transfer = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        idle.decide_locks(&view).unwrap();
        transfer.push(t.elapsed());
    }
    transfer.sort();
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
    println!(
        "lock decision, 1,000 snapshots + 1,000 locks in the view, fresh Store per call, 2,000 calls:"
    );
    println!(
        "  p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms   ({n_locks} locks answered)",
        ms(percentile(&calls, 0.5)),
        ms(percentile(&calls, 0.99)),
        ms(*calls.last().unwrap())
    );
    println!(
        "  converting the view once per decision (shared by its policies): p50 {:.3} ms",
        ms(percentile(&preps, 0.5))
    );
    println!(
        "  passing the view to a policy that ignores it: p50 {:.3} ms",
        ms(percentile(&transfer, 0.5))
    );
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
}
