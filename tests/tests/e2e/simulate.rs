//! `policy simulate`: a GFS schedule over 400 days against a table worked out by hand, and a
//! timeline with an application hold and a downstream outage replayed for real (with a fake
//! clock) that must go exactly as the simulation said, day by day.

use std::collections::BTreeMap;

use holdfast_tests::{TestNode, mixed_bytes, plugin};
use serde_json::Value;

#[test]
fn a_gfs_schedule_over_400_days_keeps_what_the_hand_computed_table_says() {
    // Daily snapshots at midnight UTC from 2025-01-01 to 2026-02-04 (day 399), pruned after
    // each with keep-last=3, daily=7, weekly=4, monthly=6, yearly=1 (Proxmox Backup Server's
    // semantics: each rule looks past what the rules before it kept, and a period already
    // covered counts as covered). At the end:
    //   keep-last 3   2026-02-04, 02-03, 02-02
    //   daily 7       02-01, 01-31, 01-30, 01-29, 01-28, 01-27, 01-26
    //   weekly 4      ISO weeks not yet covered, newest of each: Sun 01-25, 01-18, 01-11, 01-04
    //   monthly 6     December to July 2025, their last days: 12-31, 11-30, 10-31, 09-30,
    //                 08-31, 07-31 (January and February 2026 are covered)
    //   yearly 1      nothing: 2026 and 2025 are covered, no snapshot is older
    let n = TestNode::uninitialised();
    let gfs = plugin("gfs_retention");
    let out = simulate(
        &n,
        &[
            "--wasm",
            gfs.to_str().unwrap(),
            "--plot",
            n.path("gfs.svg").to_str().unwrap(),
        ],
        "--config keep-last=3 --config daily=7 --config weekly=4 --config monthly=6 --config yearly=1 --every 1d --days 400 --start 2025-01-01T00:00:00Z --json",
    );
    let r: Value = serde_json::from_str(&out).unwrap();
    let days = r["days"].as_array().unwrap();
    assert_eq!(days.len(), 400);
    let last = &days[399];
    assert_eq!(last["date"], "2026-02-04T00:00:00Z");
    let mut want: Vec<String> = [
        "2025-07-31",
        "2025-08-31",
        "2025-09-30",
        "2025-10-31",
        "2025-11-30",
        "2025-12-31",
        "2026-01-04",
        "2026-01-11",
        "2026-01-18",
        "2026-01-25",
        "2026-01-26",
        "2026-01-27",
        "2026-01-28",
        "2026-01-29",
        "2026-01-30",
        "2026-01-31",
        "2026-02-01",
        "2026-02-02",
        "2026-02-03",
        "2026-02-04",
    ]
    .iter()
    .map(|d| format!("{d}T00:00:00Z"))
    .collect();
    want.sort();
    assert_eq!(last["snapshots"], serde_json::json!(want));
    // 380 pruned, each with the policy's reason; nothing locked, nothing failed.
    let snaps = r["snapshots"].as_array().unwrap();
    let pruned: Vec<&Value> = snaps
        .iter()
        .filter(|s| !s["pruned-unix-ms"].is_null())
        .collect();
    assert_eq!(pruned.len(), 380);
    assert!(
        pruned
            .iter()
            .all(|s| s["reason"]
                == "not kept by keep-last=3, daily=7, weekly=4, monthly=6, yearly=1"),
        "{:?}",
        pruned[0]
    );
    assert!(
        days.iter()
            .all(|d| d["failures"].as_array().unwrap().is_empty())
    );
    // Day 0 has its one snapshot; the plot is an SVG with a row per snapshot.
    assert_eq!(
        days[0]["snapshots"],
        serde_json::json!(["2025-01-01T00:00:00Z"])
    );
    let svg = std::fs::read_to_string(n.path("gfs.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
    assert!(svg.matches("<line").count() >= 400, "a line per snapshot");
    // The text table says the same in words.
    let table = simulate(
        &n,
        &["--wasm", gfs.to_str().unwrap()],
        "--config keep-last=3 --every 1d --days 5 --start 2025-01-01T00:00:00Z",
    );
    assert!(
        table.contains("pruned 2 of 5 snapshot(s), because:"),
        "{table}"
    );
    assert!(table.contains("volume@2025-01-05T00:00:00Z"), "{table}");
}

#[test]
fn a_simulated_timeline_goes_exactly_so_when_it_is_replayed_for_real() {
    // Every 6 hours for 4 days: a snapshot labelled backup=pending, which the backup
    // application relabels backup=done 12 hours later (app-hold holds it until then);
    // gfs-retention keeps the last 4 and 2 dailies; downstream c mirrors after every
    // snapshot but is away on day 1, so its base stays locked meanwhile.
    let mut n = TestNode::new();
    let img = n.path("v.img");
    std::fs::write(&img, mixed_bytes(64 << 10, 1)).unwrap();
    n.add_volume("v", &img, "4KiB");
    let (hold, gfs) = (plugin("app_hold"), plugin("gfs_retention"));
    n.ok(&[
        "policy",
        "add",
        "hold",
        "--wasm",
        hold.to_str().unwrap(),
        "--volume",
        "v",
        "--config",
        "label=backup:pending",
        "--config",
        "owner=nightly",
    ]);
    n.ok(&[
        "policy",
        "add",
        "gfs",
        "--wasm",
        gfs.to_str().unwrap(),
        "--volume",
        "v",
        "--config",
        "keep-last=4",
        "--config",
        "daily=2",
    ]);
    let start: u64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z
    let sim = simulate(
        &n,
        &[],
        "--volume v --start 2026-03-01T00:00:00Z --every 6h --days 4 --label backup=pending --relabel-after 12h --relabel backup=done --downstream c --outage c:1d@day1 --json",
    );
    let sim: Value = serde_json::from_str(&sim).unwrap();
    let days = sim["days"].as_array().unwrap();
    assert_eq!(days.len(), 4);

    // The same, for real: the same commands in the same order at the same (fake) times.
    let six_hours = 6 * 3_600_000;
    let mut relabelled = std::collections::BTreeSet::new();
    let mut real_days = Vec::new();
    for step in 0..16u64 {
        let now = start + step * six_hours;
        n.env = vec![("HOLDFAST_FAKE_NOW".into(), now.to_string())];
        for s in n.snapshots("v") {
            let (name, created) = (
                s["name"].as_str().unwrap().to_string(),
                s["created-unix-ms"].as_u64().unwrap(),
            );
            if created + 2 * six_hours <= now && relabelled.insert(name.clone()) {
                n.ok(&["snapshot", "label", &format!("v@{name}"), "backup=done"]);
            }
        }
        std::fs::write(&img, mixed_bytes(64 << 10, 100 + step)).unwrap();
        let name = time_name(now);
        n.ok(&[
            "snapshot",
            "create",
            "v",
            "--name",
            &name,
            "--label",
            "backup=pending",
        ]);
        let away = (1..2).contains(&(step * 6 / 24));
        if !away {
            let set = serde_json::json!({"volume": "v", "holder": "c/v", "generation": step + 1,
                "locks": [{"snapshot": n.snapshot_id(&format!("v@{name}")), "type": "destination-path", "value": "c/v"}]});
            let f = n.path("set.json");
            std::fs::write(&f, serde_json::to_vec(&set).unwrap()).unwrap();
            n.ok(&["lock", "replace-set", f.to_str().unwrap()]);
        }
        n.ok(&["prune", "v"]);
        if step % 4 == 3 {
            let mut locked: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let locks = n.run(&["lock", "list", "--volume", "v", "--json"]).json();
            for l in locks.as_array().unwrap() {
                let snap = l["snapshot-name"].as_str().unwrap().to_string();
                locked
                    .entry(snap)
                    .or_default()
                    .push(l["holder"].as_str().unwrap().to_string());
            }
            real_days.push((n.snapshot_names("v"), locked));
        }
    }
    for (d, (names, locked)) in real_days.iter().enumerate() {
        assert_eq!(
            days[d]["snapshots"],
            serde_json::json!(names),
            "day {d}: the simulation and the real run differ"
        );
        let mut simulated: BTreeMap<String, Vec<String>> =
            serde_json::from_value(days[d]["locked"].clone()).unwrap();
        for h in simulated.values_mut() {
            h.sort();
        }
        let mut real = locked.clone();
        for h in real.values_mut() {
            h.sort();
            h.dedup();
        }
        assert_eq!(simulated, real, "day {d}: locks differ");
    }
    // Not vacuous: retention pruned, the outage kept c's old base, app-hold held pending ones.
    let pruned = sim["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["pruned-unix-ms"].is_null())
        .count();
    assert!(pruned >= 4, "{sim}");
    let day1 = &days[1]["locked"];
    assert!(
        day1.as_object().unwrap().values().any(|h| h
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "c/v")),
        "{day1}"
    );
    assert!(
        day1.as_object().unwrap().values().any(|h| h
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "app:policy.hold")),
        "{day1}"
    );
}

/// `holdfast policy simulate` with `paths` as they are (`--wasm FILE`, which may hold spaces) and
/// `args` split at spaces, which must succeed: its output.
fn simulate(n: &TestNode, paths: &[&str], args: &str) -> String {
    let mut all = vec!["policy", "simulate"];
    all.extend(paths);
    all.extend(args.split_whitespace());
    n.ok(&all)
}

/// `2026-03-01T06:00:00Z`, as the simulation names snapshots.
fn time_name(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn every_day_is_reported_runs_replay_and_bad_timelines_are_refused() {
    let n = TestNode::uninitialised();
    let gfs = plugin("gfs_retention");
    let gfs = gfs.to_str().unwrap();
    // A snapshot every 36 hours: day 2 has none, and is reported all the same.
    let out = simulate(
        &n,
        &["--wasm", gfs],
        "--config keep-last=1 --every 36h --days 4 --start 2026-01-01T00:00:00Z --json",
    );
    let r: Value = serde_json::from_str(&out).unwrap();
    let days: Vec<(u64, Value)> = r["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["day"].as_u64().unwrap(), d["snapshots"].clone()))
        .collect();
    assert_eq!(
        days,
        [
            (0, serde_json::json!(["2026-01-01T00:00:00Z"])),
            (1, serde_json::json!(["2026-01-02T12:00:00Z"])),
            (2, serde_json::json!(["2026-01-02T12:00:00Z"])),
            (3, serde_json::json!(["2026-01-04T00:00:00Z"])),
        ]
    );
    // A policy that draws random numbers decides the same in every run of a simulation.
    let hostile = plugin("hostile");
    let random = || {
        let out = simulate(
            &n,
            &["--wasm", hostile.to_str().unwrap()],
            "--config mode=random --every 12h --days 2 --start 2026-01-01T00:00:00Z --json",
        );
        let r: Value = serde_json::from_str(&out).unwrap();
        (r["days"].clone(), r["snapshots"].clone())
    };
    // (The snapshots' ids are what the policy sees besides the time: the same in every run.)
    assert_eq!(random(), random());
    // Bad timelines are refused with what to change; nothing is simulated.
    for (args, needle) in [
        (&["--every", "500ms"][..], "--every must be at least 1s"),
        (
            &["--start", "1970-01-01T00:00:00Z"],
            "after 1970-01-01T00:00:00Z",
        ),
        (
            &["--start", "9999-12-31T00:00:00Z", "--days", "2"],
            "before the year 10000",
        ),
        (
            &["--downstream", "c", "--outage", "d:1d@day1"],
            "not among --downstream",
        ),
        (
            &["--downstream", "c", "--outage", "c:1d@tuesday"],
            "NAME:LENGTH@dayN",
        ),
        (&["--downstream", "no way"], "--downstream"),
        (&["--days", "0"], "--days must be at least 1"),
        (&["--change", "150%"], "between 0% and 100%"),
    ] {
        let mut all = vec![
            "policy",
            "simulate",
            "--wasm",
            gfs,
            "--config",
            "keep-last=1",
        ];
        all.extend(args);
        let r = n.run(&all);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    }
    // The fake clock is for single commands, never for a daemon.
    let mut node = TestNode::new();
    node.env = vec![("HOLDFAST_FAKE_NOW".into(), "1772323200000".into())];
    let err = node.fails(&["daemon", "--config", "node.toml"], 2);
    assert!(err.contains("never for the daemon"), "{err}");
}
