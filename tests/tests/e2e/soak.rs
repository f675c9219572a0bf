//! A soak of a three-node cascade (issue: nodes that run for months): snapshots every second
//! on A, mirrors every second on B and C, retention keep-last 5 with gc on A and B (C only
//! mirrors: the daemon's gc after deletions reclaims its space), a writer changing 1 % of the
//! volume every second. It samples each daemon's resident memory, open files, state size,
//! catalog size and lock history, and the replicas' lag; after a warm-up (the first half) it
//! fits a line to each and fails if one grows beyond a bound over the run, or if gc would
//! still find much to reclaim on any node at the end.
//!
//! `./test.sh` runs it for 40 s. For hours, with a report:
//! `HOLDFAST_SOAK_SECS=3600 HOLDFAST_SOAK_REPORT=soak.md cargo test -p holdfast-tests --test e2e
//! -- soak --nocapture` (with `HOLDFAST_BIN` for a release binary; `HOLDFAST_SOAK_LEGACY=1`
//! measures a binary from before `[gc]` existed, and only reports).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use holdfast_tests::cascade::{Peer, Relations, Tls};
use holdfast_tests::mixed_bytes;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;
const VOLUME: u64 = 32 * MIB;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(p) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Least-squares slope of `ys` over `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

/// One sample of one node.
fn sample(p: &Peer, lagging: bool) -> BTreeMap<&'static str, f64> {
    let pid = p.pid().expect("daemon running");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let history = p.node.run(&["lock", "history", "--json"]);
    let events = serde_json::from_str::<serde_json::Value>(&history.stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0);
    let mut m = BTreeMap::from([
        ("rss-mb", p.rss() as f64 / 1e6),
        ("open-files", fds as f64),
        ("state-mb", dir_bytes(&p.node.state) as f64 / 1e6),
        (
            "catalog-kb",
            std::fs::metadata(p.node.state.join("catalog.redb")).map_or(0, |m| m.len()) as f64
                / 1e3,
        ),
        ("history-events", events as f64),
    ]);
    if lagging {
        let st = p.status();
        let lag = st["relations"][0]["lag-ms"].as_f64().unwrap_or(0.0) / 1000.0;
        m.insert("lag-s", lag);
    }
    m
}

/// How much a metric may grow over the measured window (after the warm-up) before the soak
/// calls it a leak: a fraction of its mean, or an absolute floor for small ones.
fn allowed_growth(metric: &str, mean: f64) -> f64 {
    let floor = match metric {
        // Caches fill while the repository grows to its steady size.
        "rss-mb" => 48.0,
        "open-files" => 8.0,
        "state-mb" => 24.0,
        "catalog-kb" => 256.0,
        "history-events" => 40.0,
        "lag-s" => 5.0,
        _ => 0.0,
    };
    (0.25 * mean).max(floor)
}

#[test]
fn a_cascade_stays_flat() {
    let secs = env_u64("HOLDFAST_SOAK_SECS", 40);
    let legacy = std::env::var_os("HOLDFAST_SOAK_LEGACY").is_some();
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let img = a.node.image("vm1.img", &mixed_bytes(VOLUME as usize, 5));
    a.node.add_volume("vm1", &img, "64KiB");
    let (mut b, mut c) = (Peer::new("b"), Peer::new("c"));
    let gc = if legacy {
        ""
    } else {
        "[gc]\nevery = \"2s\"\nmin_dead = \"1MiB\"\n"
    };
    let retention = "[[retention]]\nvolume = \"vm1\"\nkeep_last = 5\nevery = \"2s\"\n";
    let a_extra = format!("{gc}[[schedule]]\nvolume = \"vm1\"\nevery = \"1s\"\n{retention}");
    // B prunes without retention's own gc: the daemon's gc after deletions reclaims it, as it
    // does on C, which only mirrors.
    let b_extra = format!("{gc}{retention}gc = false\n");
    a.configure(
        &tls,
        Relations {
            downstreams: vec![(&b, vec!["vm1"], "")],
            extra: &a_extra,
            ..Default::default()
        },
    );
    b.configure(
        &tls,
        Relations {
            upstream: Some((&a, "vm1")),
            downstreams: vec![(&c, vec!["vm1"], "")],
            mirror_every: Some("1s"),
            extra: &b_extra,
            ..Default::default()
        },
    );
    c.configure(
        &tls,
        Relations {
            upstream: Some((&b, "vm1")),
            mirror_every: Some("1s"),
            extra: gc,
            ..Default::default()
        },
    );
    // History is kept per holder (1,000 events by default): a cap that the busiest holder
    // (about an event a second) reaches within the warm-up shows that it is one, whatever the
    // length of the run.
    let cap = (secs / 8).clamp(10, 1000).to_string();
    for p in [&mut a, &mut b, &mut c] {
        p.node
            .env
            .push(("HOLDFAST_HISTORY_PER_HOLDER".into(), cap.clone()));
        p.start();
    }

    let started = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut samples: Vec<(f64, [BTreeMap<&str, f64>; 3])> = Vec::new();
    std::thread::scope(|s| {
        // The writer: 3 % of the volume's blocks, every second.
        s.spawn(|| {
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            let n = VOLUME / BLOCK;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..(n * 3 / 100).max(1) {
                    let at = rand::random::<u64>() % n * BLOCK;
                    let bytes: Vec<u8> = (0..BLOCK).map(|_| rand::random::<u8>()).collect();
                    f.write_all_at(&bytes, at).unwrap();
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        let every = Duration::from_secs((secs / 40).clamp(2, 60));
        while started.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(every);
            let t = started.elapsed().as_secs_f64();
            samples.push((t, [sample(&a, false), sample(&b, true), sample(&c, true)]));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(
        samples.len() >= 4,
        "a soak needs a few samples: give it more seconds"
    );

    // The report: first, last and max of each metric per node, and its fitted growth.
    let warm = samples.len() / 2;
    let mut report = format!(
        "soak of {secs} s, {} samples (the first {warm} are the warm-up)\n\n| node | metric | \
         first | last | max | growth after warm-up (fit) | allowed |\n|---|---|---|---|---|---|---|\n",
        samples.len()
    );
    let mut leaks = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let metrics: Vec<&str> = samples[0].1[i].keys().copied().collect();
        for metric in metrics {
            let ys: Vec<f64> = samples.iter().map(|(_, s)| s[i][metric]).collect();
            let xs: Vec<f64> = samples.iter().map(|(t, _)| *t).collect();
            let (wx, wy) = (&xs[warm..], &ys[warm..]);
            let growth = slope(wx, wy) * (wx[wx.len() - 1] - wx[0]);
            let mean = wy.iter().sum::<f64>() / wy.len() as f64;
            let allowed = allowed_growth(metric, mean);
            let max = ys.iter().cloned().fold(f64::MIN, f64::max);
            report.push_str(&format!(
                "| {name} | {metric} | {:.1} | {:.1} | {max:.1} | {growth:+.1} | {allowed:.1} |\n",
                ys[0],
                ys[ys.len() - 1]
            ));
            if growth > allowed {
                leaks.push(format!(
                    "{name} {metric} grew by {growth:.1} (allowed {allowed:.1})"
                ));
            }
        }
    }
    eprintln!("{report}");
    if let Some(path) = std::env::var_os("HOLDFAST_SOAK_REPORT") {
        std::fs::write(path, &report).unwrap();
    }
    for p in [&a, &b, &c] {
        let st = p.status();
        eprintln!("{}: gc {}", p.name, st["gc"]);
        for j in st["jobs"].as_array().unwrap() {
            assert!(
                j["last-ok"] != false,
                "{}: a job failed at the end: {j}\n{report}",
                p.name
            );
        }
    }
    // Quiet: A takes no more snapshots; B and C catch up, and their gcs take what the last
    // deletions left (less than `min_dead` may stay).
    a.stop();
    let t0 = Instant::now();
    loop {
        if legacy {
            break;
        }
        let settled = [&b, &c].iter().all(|p| {
            let g = &p.status()["gc"];
            !g["last"].is_null() && g["dead-bytes-estimate"].as_u64().unwrap_or(u64::MAX) < MIB
        });
        if settled || t0.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for p in [&mut a, &mut b, &mut c] {
        p.stop();
        p.node.ok(&["verify"]);
    }
    // What deletions left is reclaimed as the run goes, on every node (C only mirrors).
    for p in [&a, &b, &c] {
        let g = p.node.run(&["gc", "--dry-run", "--json"]).json();
        let (dead, state) = (
            g["bytes-freed"].as_u64().unwrap_or(0) as f64,
            dir_bytes(&p.node.state) as f64,
        );
        eprintln!(
            "{}: gc would free {:.1} MB of {:.1} MB",
            p.name,
            dead / 1e6,
            state / 1e6
        );
        if dead > (0.15 * state).max(4e6) {
            leaks.push(format!(
                "{}: {:.1} MB of its {:.1} MB are reclaimable",
                p.name,
                dead / 1e6,
                state / 1e6
            ));
        }
    }
    if !legacy {
        assert!(leaks.is_empty(), "{leaks:?}\n{report}");
    }
}

/// What a prune of a target left is reclaimed by the daemon of a node that pushes there: its
/// gc condemns the dead packs, and a later one (a grace period on) deletes them.
#[test]
fn the_daemon_reclaims_what_a_target_prune_left() {
    let tls = Tls::new();
    let mut a = Peer::new("a");
    a.node
        .env
        .push(("HOLDFAST_TARGET_GRACE".into(), "1s".into()));
    let img = a.node.image("vm1.img", &mixed_bytes(4 * MIB as usize, 1));
    a.node.add_volume("vm1", &img, "64KiB");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/bucket", dir.path().display());
    a.node.ok(&["target", "add", "bucket", "--url", &url]);
    a.node.snapshot("vm1", "s1");
    a.node.ok(&["mirror", "push", "vm1", "--target", "bucket"]);
    std::fs::write(&img, mixed_bytes(4 * MIB as usize, 2)).unwrap();
    a.node.snapshot("vm1", "s2");
    a.node.ok(&["mirror", "push", "vm1", "--target", "bucket"]);
    a.node
        .ok(&["prune", "vm1", "--target", "bucket", "--keep-last", "1"]);
    let packs = || dir_bytes(&dir.path().join("bucket/packs"));
    let before = packs();
    a.configure(
        &tls,
        Relations {
            extra: "[gc]\nevery = \"1s\"\ntarget_every = \"1s\"\n\n[[push]]\nvolume = \"vm1\"\ntarget = \"bucket\"\nevery = \"1h\"\n",
            ..Default::default()
        },
    );
    a.start();
    let t0 = Instant::now();
    while packs() * 10 > before * 6 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the target still holds {} of {before} bytes of packs: {}",
            packs(),
            a.status()["gc"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = a.status();
    assert!(
        st["gc"]["targets"]["bucket"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("deleted")),
        "{}",
        st["gc"]
    );
    a.stop();
    let report = a
        .node
        .run(&["verify", "--target", "bucket", "--json"])
        .json();
    assert_eq!(report["damage"], serde_json::json!([]), "{report}");
    let out = a.node.path("r.img");
    a.node.ok(&[
        "snapshot",
        "restore",
        "vm1@s2",
        "--target",
        "bucket",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(out).unwrap() == mixed_bytes(4 * MIB as usize, 2));
}
