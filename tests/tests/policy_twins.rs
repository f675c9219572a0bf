//! Policies written in Python (`plugins/app-hold-py`, componentize-py) and JavaScript
//! (`plugins/gfs-retention-js`, componentize-js) answer exactly as their Rust twins
//! (`plugins/app-hold`, `plugins/gfs-retention`) over the same views: hand-made fixtures and
//! random views (proptest), compared answer by answer, errors included. Both twins are loaded
//! under the same name, so even the host's messages must match.
//!
//! Also here: a policy's randomness is seeded from the call, so the same view gives the same
//! answer (Rust and Python), and a Python policy is stopped by the same deadline and memory
//! cap as a Rust one.
//!
//! The components come from `plugins/` (`./test.sh` builds them: `cargo build` and
//! `plugins/build-py-js.sh`); each is compiled once per run of this test binary.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use holdfast::catalog::SnapshotRecord;
use holdfast::id::SnapshotId;
use holdfast::policy::{Limits, NodeView, Phase, PolicyEngine, PreparedView};
use holdfast_tests::plugin;
use proptest::prelude::*;

struct Components {
    engine: PolicyEngine,
    artifacts: BTreeMap<&'static str, Vec<u8>>,
}

const ALL: [&str; 6] = [
    "app_hold",
    "app_hold_py",
    "gfs_retention",
    "gfs_retention_js",
    "hostile",
    "hostile_py",
];

fn components() -> &'static Components {
    static C: OnceLock<Components> = OnceLock::new();
    C.get_or_init(|| {
        let engine = PolicyEngine::new().unwrap();
        let artifacts = ALL
            .iter()
            .map(|name| {
                let bytes = std::fs::read(plugin(name)).unwrap();
                (*name, engine.compile(name, &bytes).unwrap())
            })
            .collect();
        Components { engine, artifacts }
    })
}

/// A deadline a loaded machine running a test build meets: the deadline's own tests set theirs.
fn generous() -> Limits {
    Limits {
        timeout_ms: 20_000,
        ..Limits::default()
    }
}

/// What a policy answered, as comparable text: the locks or prunes, or the host's error.
fn answer(component: &str, config: &[(&str, &str)], view: &PreparedView, limits: Limits) -> String {
    let c = components();
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The same name for both twins: the host's messages name the policy.
    let policy = c
        .engine
        .load("twin", &c.artifacts[component], config, limits)
        .unwrap();
    let out = if view.view().phase == Phase::Retention {
        policy.plan_retention(view).map(|p| format!("{p:?}"))
    } else {
        policy.decide_locks(view).map(|l| format!("{l:?}"))
    };
    match out {
        Ok(text) => text,
        Err(e) => format!("error: {e}"),
    }
}

/// A snapshot taken at `ms`, its id's random part `r`.
fn snapshot(ms: u64, r: u32, name: &str, labels: &[(&str, &str)]) -> SnapshotRecord {
    SnapshotRecord {
        id: SnapshotId::from_u128(((ms as u128) << 32) | r as u128),
        volume: "v".parse().unwrap(),
        name: name.parse().unwrap(),
        created_unix_ms: ms,
        size: 1 << 20,
        block_size: 65536,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        parent: None,
        stats: Default::default(),
        regions: Default::default(),
    }
}

/// A view of volume `v` with these snapshots (listed oldest first, as the catalog does).
fn view(phase: Phase, now: u64, mut snapshots: Vec<SnapshotRecord>) -> PreparedView {
    snapshots.sort_by_key(|s| s.id);
    NodeView {
        node_id: "n1".parse().unwrap(),
        volume: "v".parse().unwrap(),
        phase,
        now_unix_ms: now,
        local_snapshots: snapshots,
        upstream_snapshots: None,
        locks_held_here: Vec::new(),
        locks_from_downstream: Vec::new(),
        downstreams: Vec::new(),
    }
    .prepare()
}

fn assert_twins(rust: &str, other: &str, config: &[(&str, &str)], view: &PreparedView) {
    let a = answer(rust, config, view, generous());
    let b = answer(other, config, view, generous());
    assert_eq!(a, b, "{rust} and {other} differ with config {config:?}");
}

const DAY: u64 = 86_400_000;
/// 2024-01-01T00:00:00Z.
const T0: u64 = 1_704_067_200_000;

#[test]
fn gfs_retention_in_javascript_keeps_what_the_rust_one_keeps() {
    // 400 days of snapshots at 01:00 and 13:00, a few of them at the same millisecond.
    let snaps: Vec<SnapshotRecord> = (0..800u64)
        .map(|i| {
            let ms = T0 + (i / 2) * DAY + 3_600_000 + (i % 2) * 12 * 3_600_000;
            snapshot(ms, (i * 7919 % 1000) as u32, &format!("s{i}"), &[])
        })
        .chain((0..3).map(|i| snapshot(T0 + 50 * DAY, 5000 + i, &format!("tie{i}"), &[])))
        .collect();
    let v = view(Phase::Retention, T0 + 401 * DAY, snaps);
    let configs: [&[(&str, &str)]; 10] = [
        &[("keep-last", "3")],
        // Not counts: a byte-order mark after the digits, an Arabic-Indic three.
        &[("keep-last", "5\u{feff}")],
        &[("daily", "\u{663}")],
        &[
            ("keep-last", "3"),
            ("daily", "7"),
            ("weekly", "4"),
            ("monthly", "6"),
            ("yearly", "2"),
        ],
        &[("hourly", "48")],
        &[("weekly", "60")],
        &[("monthly", "13"), ("yearly", "5")],
        &[],
        &[("daily", "seven")],
        &[("keep-last", "99999999999")],
    ];
    for config in configs {
        assert_twins("gfs_retention", "gfs_retention_js", config, &v);
    }
    // The comparison is not vacuous: the plan prunes, and names what it kept.
    let plan = answer("gfs_retention_js", configs[3], &v, generous());
    assert!(plan.contains("not kept by keep-last=3, daily=7"), "{plan}");
    assert!(
        answer("gfs_retention_js", configs[7], &v, generous()).contains("no retention configured")
    );
}

#[test]
fn app_hold_in_python_holds_what_the_rust_one_holds() {
    let snaps: Vec<SnapshotRecord> = (0..60u64)
        .map(|i| {
            let labels: &[(&str, &str)] = match i % 4 {
                0 => &[("backup", "pending")],
                1 => &[("backup", "done"), ("tier", "gold")],
                2 => &[("tier", "")],
                _ => &[],
            };
            let name = format!("{}-{i}", ["daily", "backup", "x"][i as usize % 3]);
            snapshot(T0 + i * 3_600_000, i as u32, &name, labels)
        })
        .collect();
    let v = view(Phase::Scheduled, T0 + 61 * 3_600_000, snaps);
    let configs: [&[(&str, &str)]; 11] = [
        &[("label", "backup:pending")],
        // Values beyond ASCII, matched and refused alike.
        &[("label", "café")],
        &[("label", "tier:gölb"), ("owner", "ünïcode")],
        &[("label", "backup:pending"), ("owner", "nightly")],
        &[("name-prefix", "backup-")],
        &[("label", "backup:done"), ("name-prefix", "daily-")],
        &[("label", "tier:")],
        &[("label", "tier")],
        &[("label", "backup:pending"), ("owner", "")],
        &[("name-prefix", "")],
        &[],
    ];
    for config in configs {
        assert_twins("app_hold", "app_hold_py", config, &v);
    }
    let held = answer("app_hold_py", configs[3], &v, generous());
    assert_eq!(held.matches("nightly").count(), 15, "{held}");
}

/// A random volume: up to 150 snapshots over about a year, some taken at the same millisecond,
/// names with three prefixes, labels from a small set.
fn random_snapshots() -> impl Strategy<Value = Vec<SnapshotRecord>> {
    prop::collection::vec((0u64..3 * DAY, any::<u32>(), 0usize..3, 0usize..5), 0..150).prop_map(
        |steps| {
            let mut ms = T0;
            steps
                .into_iter()
                .enumerate()
                .map(|(i, (gap, r, prefix, label))| {
                    // One gap in eight is zero: snapshots at the same millisecond.
                    if r % 8 != 0 {
                        ms += gap;
                    }
                    let labels: &[(&str, &str)] = [
                        &[][..],
                        &[("backup", "pending")],
                        &[("backup", "done")],
                        &[("backup", "pending"), ("tier", "gold")],
                        &[("tier", "gold")],
                    ][label];
                    let name = format!("{}{i}", ["daily-", "hourly-", "backup-"][prefix]);
                    snapshot(ms, r, &name, labels)
                })
                .collect()
        },
    )
}

fn maybe(values: &'static [&'static str]) -> impl Strategy<Value = Option<&'static str>> {
    prop::option::of(prop::sample::select(values))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn gfs_twins_agree_on_random_volumes(
        snaps in random_snapshots(),
        rules in prop::collection::vec(maybe(&["0", "1", "2", "3", "5", "8", "x"]), 6),
    ) {
        let keys = ["keep-last", "hourly", "daily", "weekly", "monthly", "yearly"];
        let config: Vec<(&str, &str)> = keys
            .iter()
            .zip(&rules)
            .filter_map(|(k, v)| v.map(|v| (*k, v)))
            .collect();
        let now = snaps.last().map_or(T0, |s| s.created_unix_ms + DAY);
        let v = view(Phase::Retention, now, snaps);
        assert_twins("gfs_retention", "gfs_retention_js", &config, &v);
    }

    #[test]
    fn app_hold_twins_agree_on_random_volumes(
        snaps in random_snapshots(),
        label in maybe(&["backup:pending", "backup:done", "tier:gold", "tier:", "backup"]),
        prefix in maybe(&["daily-", "backup-", "", "zzz"]),
        owner in maybe(&["nightly", "restic"]),
    ) {
        let mut config = Vec::new();
        config.extend(label.map(|l| ("label", l)));
        config.extend(prefix.map(|p| ("name-prefix", p)));
        config.extend(owner.map(|o| ("owner", o)));
        let now = snaps.last().map_or(T0, |s| s.created_unix_ms + 1);
        let v = view(Phase::Scheduled, now, snaps);
        assert_twins("app_hold", "app_hold_py", &config, &v);
    }
}

#[test]
fn randomness_is_seeded_from_the_view_so_the_same_view_gives_the_same_answer() {
    for component in ["hostile", "hostile_py"] {
        let snaps = || {
            (0..5)
                .map(|i| snapshot(T0 + i * DAY, i as u32, &format!("s{i}"), &[]))
                .collect()
        };
        let drawn = |now: u64| {
            let a = answer(
                component,
                &[("mode", "random")],
                &view(Phase::Scheduled, now, snaps()),
                generous(),
            );
            assert!(a.contains("drawn "), "{component}: {a}");
            a
        };
        // Two views built apart, the same content: the same answer, from separate stores.
        assert_eq!(drawn(T0 + 9 * DAY), drawn(T0 + 9 * DAY), "{component}");
        // Anything the policy can see changes the draw (here, the time).
        assert_ne!(drawn(T0 + 9 * DAY), drawn(T0 + 9 * DAY + 1), "{component}");
    }
}

#[test]
fn a_python_policy_is_stopped_by_the_same_deadline_and_memory_cap_as_a_rust_one() {
    let v = view(
        Phase::SnapshotCreated,
        T0 + DAY,
        vec![snapshot(T0, 1, "s0", &[])],
    );
    let strict = Limits {
        timeout_ms: 2_000,
        memory_bytes: 64 << 20,
    };
    for component in ["hostile", "hostile_py"] {
        let looped = answer(component, &[("mode", "loop")], &v, strict);
        assert!(
            looped.contains("ran past its deadline of 2000 ms and was stopped"),
            "{component}: {looped}"
        );
        let grown = answer(component, &[("mode", "alloc")], &v, strict);
        assert!(
            grown.contains("more than its memory limit of 64 MiB"),
            "{component}: {grown}"
        );
        // And it still works afterwards: a behaving call answers.
        assert_eq!(
            answer(component, &[("mode", "ok")], &v, strict),
            "[]",
            "{component}"
        );
    }
    let raised = answer("hostile_py", &[("mode", "raise")], &v, strict);
    assert!(raised.starts_with("error: policy twin"), "{raised}");
}
