//! `holdfast policy simulate`: what a volume's policies will keep, lock and prune over weeks or
//! months of snapshots, downstream outages and application holds, without touching data.
//!
//! How: the real code on a scratch node. A temporary state directory gets the volume and the
//! policies (their components and, when there is one, their compiled artifact: nothing is
//! compiled again); the process clock ([`crate::set_fake_now`]) steps through the timeline;
//! snapshots are catalog records without data. At each step, in this order, the same functions
//! run as on a real node:
//!
//! 1. the application relabels the snapshots that became due (`--relabel-after`), as
//!    `snapshot label` does: `Catalog::set_labels`, then the policies' scheduled lock decision;
//! 2. a snapshot is taken (`--label`s on it), and the policies that handle `snapshot-created`
//!    decide their locks, as the daemon's snapshot job does;
//! 3. each downstream that is not away sends its lock set, its base being the new snapshot (the
//!    set a mirror sends after a transfer), stored as the peer server stores it
//!    (`LockRegistry::replace_set`); an absent downstream's last set stays in force;
//! 4. retention runs as the daemon's retention job does (`retention::prune_by_policies`).
//!
//! So what it reports is what those would do, by construction; a test replays a timeline for
//! real (with `HOLDFAST_FAKE_NOW`) and compares. Its answers are reproducible because a
//! policy's randomness is seeded from what it sees.
//!
//! The storage estimate is a model, not a measurement: each step rewrites `change` of the
//! volume's blocks, chosen at random ([`stored`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use super::registry::{self, Asked, Policies};
use super::{Limits, Phase, PolicyEngine};
use crate::catalog::{SnapshotRecord, VolumeRecord};
use crate::error::{Error, Result};
use crate::id::{SnapshotId, VolumeName};
use crate::softlock::{HolderId, LockSetUpdate, LockType, NewLock};
use crate::state::Node;

const DAY_MS: u64 = 86_400_000;
/// At most this many steps (a year of snapshots every 5 minutes).
pub const MAX_STEPS: u64 = 105_120;
/// The last instant snapshot names can show: 9999-12-31T23:59:59.999Z.
const LAST_MS: u64 = 253_402_300_799_999;

fn millis(what: &str, d: Duration) -> Result<u64> {
    u64::try_from(d.as_millis())
        .ok()
        .filter(|ms| *ms <= LAST_MS)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{what} {} is too long",
                humantime::format_duration(d)
            ))
        })
}

/// A downstream away for a while: `NAME:LENGTH@dayN` (`c:3d@day10`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outage {
    pub downstream: String,
    /// Days after the start.
    pub from_day: u32,
    #[serde(with = "ms")]
    pub length: Duration,
}

mod ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

impl FromStr for Outage {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "--outage {:?} must be NAME:LENGTH@dayN, e.g. c:3d@day10 (downstream c is away \
                 for 3 days from day 10)",
                crate::id::shorten(s)
            ))
        };
        let (name, rest) = s.split_once(':').ok_or_else(bad)?;
        let (length, day) = rest.split_once("@day").ok_or_else(bad)?;
        crate::id::validate_name("downstream name", name)?;
        Ok(Outage {
            downstream: name.to_string(),
            from_day: day.parse().map_err(|_| bad())?,
            length: humantime::parse_duration(length).map_err(|_| bad())?,
        })
    }
}

/// What happens over the simulated time.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timeline {
    /// The first snapshot's time (milliseconds since the Unix epoch).
    pub start_unix_ms: u64,
    /// A snapshot every so often.
    #[serde(with = "ms")]
    pub every: Duration,
    pub days: u32,
    /// Labels on every new snapshot.
    pub labels: BTreeMap<String, String>,
    /// The application relabels each snapshot this long after it was taken.
    #[serde(with = "opt_ms", skip_serializing_if = "Option::is_none")]
    pub relabel_after: Option<Duration>,
    /// The labels it sets then.
    pub relabel: BTreeMap<String, String>,
    /// Downstream nodes mirroring the volume after every snapshot.
    pub downstreams: Vec<String>,
    pub outages: Vec<Outage>,
    /// The volume's size and the fraction rewritten per step, for the storage estimate.
    pub size: u64,
    pub change: f64,
}

mod opt_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

impl Timeline {
    fn check(&self) -> Result<u64> {
        // Snapshots are named by their time to the second.
        if self.every < Duration::from_secs(1) {
            return Err(Error::invalid("--every must be at least 1s"));
        }
        let every = millis("--every", self.every)?;
        if let Some(after) = self.relabel_after {
            millis("--relabel-after", after)?;
        }
        // 0 would read as "the real clock" (set_fake_now).
        let end = self
            .start_unix_ms
            .checked_add(u64::from(self.days) * DAY_MS);
        if self.start_unix_ms == 0 || end.is_none_or(|e| e > LAST_MS) {
            return Err(Error::invalid(
                "the simulated time must lie after 1970-01-01T00:00:00Z and before the year 10000: \
                 change --start or --days",
            ));
        }
        for d in &self.downstreams {
            crate::id::validate_name("--downstream", d)?;
        }
        if self.days == 0 {
            return Err(Error::invalid("--days must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.change) {
            return Err(Error::invalid("--change must be between 0% and 100%"));
        }
        for o in &self.outages {
            millis("--outage", o.length)?;
            if !self.downstreams.contains(&o.downstream) {
                return Err(Error::invalid(format!(
                    "--outage names downstream {:?}, which is not among --downstream {:?}",
                    o.downstream, self.downstreams
                )));
            }
        }
        let steps = (u64::from(self.days) * DAY_MS).div_ceil(every);
        if steps > MAX_STEPS {
            return Err(Error::invalid(format!(
                "{steps} snapshots is more than a simulation takes ({MAX_STEPS}): take them less \
                 often (--every) or simulate fewer days"
            )));
        }
        Ok(steps)
    }

    fn away(&self, downstream: &str, now: u64) -> bool {
        self.outages.iter().any(|o| {
            let from = self.start_unix_ms + u64::from(o.from_day) * DAY_MS;
            let until = from.saturating_add(o.length.as_millis().try_into().unwrap_or(u64::MAX));
            o.downstream == downstream && (from..until).contains(&now)
        })
    }
}

/// A policy to simulate: a registered one, or a component file with its configuration.
#[derive(Clone)]
pub struct SimPolicy {
    pub name: String,
    pub wasm: Vec<u8>,
    /// Its compiled artifact, when one is at hand for this engine.
    pub artifact: Option<Vec<u8>>,
    pub config: BTreeMap<String, String>,
    pub limits: Limits,
}

impl fmt::Debug for SimPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimPolicy({})", self.name)
    }
}

/// One snapshot's life in the simulation.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SimSnapshot {
    /// The same in every run of the same timeline (a real snapshot's has 32 random bits).
    pub id: SnapshotId,
    pub name: String,
    pub created_unix_ms: u64,
    /// When retention pruned it, and why (every retention policy's reason).
    pub pruned_unix_ms: Option<u64>,
    pub reason: Option<String>,
    /// The days at whose end a lock held it.
    pub locked_days: Vec<u32>,
    /// Every holder that held it at the end of a day.
    pub holders: BTreeSet<String>,
}

/// What a holder pins, estimated.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct Estimate {
    /// What the kept snapshots take in the repository.
    pub stored_bytes: u64,
    /// What would be freed if every snapshot kept only because of a lock were pruned.
    pub pinned_by_locks_bytes: u64,
    /// What would be freed if this holder let go (the snapshots only it holds that retention
    /// would otherwise prune).
    pub pinned_by_holder: BTreeMap<String, u64>,
}

/// The state at the end of one simulated day.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Day {
    pub day: u32,
    /// The day's first instant (RFC 3339).
    pub date: String,
    /// The snapshots that exist at its end, oldest first.
    pub snapshots: Vec<String>,
    /// Which of them a lock holds, and who.
    pub locked: BTreeMap<String, Vec<String>>,
    /// Pruned during the day.
    pub pruned: Vec<String>,
    /// Agreed by the retention policies but kept for a lock (at the day's last retention run).
    pub kept_locked: Vec<String>,
    /// Policy failures during the day (a failing retention plan prunes nothing).
    pub failures: Vec<String>,
    pub estimate: Estimate,
}

/// The whole simulation.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub volume: VolumeName,
    pub timeline: Timeline,
    pub policies: Vec<String>,
    /// Whether any policy handles retention (without one, nothing is pruned).
    pub retention: bool,
    pub days: Vec<Day>,
    pub snapshots: Vec<SimSnapshot>,
}

/// Runs the timeline. `progress(step, steps)` is called after every step.
pub async fn simulate(
    engine: &PolicyEngine,
    volume: &VolumeName,
    block_size: u32,
    policies: Vec<SimPolicy>,
    timeline: &Timeline,
    mut progress: impl FnMut(u64, u64),
) -> Result<Report> {
    let steps = timeline.check()?;
    if policies.is_empty() {
        return Err(Error::invalid(
            "nothing to simulate: the volume has no registered policy; give --wasm FILE",
        ));
    }
    let scratch = tempfile::Builder::new()
        .prefix("holdfast-simulate-")
        .tempdir()
        .map_err(|e| Error::io("creating a scratch state directory", e))?;
    crate::set_fake_now(timeline.start_unix_ms);
    let result = run(
        engine,
        volume,
        block_size,
        policies,
        timeline,
        steps,
        scratch.path(),
        &mut progress,
    )
    .await;
    crate::set_fake_now(0);
    result
}

#[allow(clippy::too_many_arguments)]
async fn run(
    engine: &PolicyEngine,
    volume: &VolumeName,
    block_size: u32,
    policies: Vec<SimPolicy>,
    t: &Timeline,
    steps: u64,
    scratch: &std::path::Path,
    progress: &mut impl FnMut(u64, u64),
) -> Result<Report> {
    let node = Node::init(&scratch.join("state"), Some("simulation".parse()?)).await?;
    node.catalog.add_volume(&VolumeRecord::image(
        volume.clone(),
        scratch.join("no-image"),
        block_size,
    ))?;
    let registered = Policies::new(&node);
    let mut names = Vec::new();
    for p in policies {
        registered.add_precompiled(
            engine,
            &p.name,
            &p.wasm,
            p.artifact.as_deref(),
            vec![volume.clone()],
            p.config,
            p.limits,
        )?;
        names.push(p.name);
    }
    let retention = registered
        .for_volume(volume)?
        .iter()
        .any(|r| r.handles(Phase::Retention));

    let mut report = Report {
        volume: volume.clone(),
        timeline: t.clone(),
        policies: names,
        retention,
        days: Vec::new(),
        snapshots: Vec::new(),
    };
    let mut index: HashMap<SnapshotId, usize> = HashMap::new();
    let mut by_name: HashMap<String, SnapshotId> = HashMap::new();
    // Snapshots waiting for the application's relabel, oldest first.
    let mut pending: std::collections::VecDeque<(u64, SnapshotId)> = Default::default();
    let mut today = Day::empty(0, t.start_unix_ms);
    let every = t.every.as_millis() as u64;
    for step in 0..steps {
        let now = t.start_unix_ms + step * every;
        let day = ((now - t.start_unix_ms) / DAY_MS) as u32;
        // Close the days before this one (a day without a step too: --every above a day).
        while today.day < day {
            close(&node, volume, t, &mut today, &mut report, &index)?;
        }
        crate::set_fake_now(now);

        // 1. The application relabels what became due, one snapshot at a time.
        if let Some(after) = t.relabel_after {
            let after = millis("--relabel-after", after)?;
            while let Some(&(created, id)) = pending.front() {
                if created.saturating_add(after) > now {
                    break;
                }
                pending.pop_front();
                match node.catalog.set_labels(volume, &id, &t.relabel, &[]) {
                    Ok(_) => decide(&node, engine, volume, Phase::Scheduled, &mut today)?,
                    // Pruned before its backup was done (nothing held it): nothing to relabel.
                    Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }

        // 2. A snapshot.
        // Ids as a real snapshot's (time, then 32 bits) but the same in every run, so that a
        // policy's seeded randomness, which sees them, replays too.
        let salt = u32::from_le_bytes(
            blake3::hash(&step.to_le_bytes()).as_bytes()[..4]
                .try_into()
                .expect("4 bytes"),
        );
        let rec = SnapshotRecord {
            id: SnapshotId::from_u128((u128::from(now) << 32) | u128::from(salt)),
            volume: volume.clone(),
            name: snapshot_name(now).parse()?,
            created_unix_ms: now,
            size: t.size,
            block_size,
            labels: t.labels.clone(),
            parent: None,
            stats: Default::default(),
            regions: Default::default(),
        };
        node.catalog.commit_snapshots(std::slice::from_ref(&rec))?;
        index.insert(rec.id, report.snapshots.len());
        pending.push_back((now, rec.id));
        by_name.insert(rec.name.to_string(), rec.id);
        report.snapshots.push(SimSnapshot {
            id: rec.id,
            name: rec.name.to_string(),
            created_unix_ms: now,
            pruned_unix_ms: None,
            reason: None,
            locked_days: Vec::new(),
            holders: BTreeSet::new(),
        });
        decide(&node, engine, volume, Phase::SnapshotCreated, &mut today)?;

        // 3. Downstreams that are here hold the new snapshot as their base.
        for d in &t.downstreams {
            if t.away(d, now) {
                continue;
            }
            let holder: HolderId = format!("{d}/{volume}").parse()?;
            node.catalog.locks().replace_set(LockSetUpdate {
                volume: volume.clone(),
                holder: holder.clone(),
                generation: step + 1,
                locks: vec![NewLock {
                    snapshot: rec.id,
                    lock_type: LockType::DestinationPath,
                    value: holder.to_string(),
                    lease_ms: None,
                    path: vec![],
                }],
            })?;
        }

        // 4. Retention.
        if retention {
            match crate::retention::prune_by_policies(&node, engine, volume, false).await {
                Ok(Some(r)) => {
                    for pruned in &r.pruned {
                        let name = pruned.split_once('@').map_or(pruned.as_str(), |(_, n)| n);
                        let Some(&id) = by_name.get(name) else {
                            continue;
                        };
                        // Every retention policy proposed it: each one's reason.
                        let reasons: BTreeSet<&str> = r
                            .decision
                            .proposals
                            .values()
                            .flatten()
                            .filter(|p| p.snapshot == id)
                            .map(|p| p.reason.as_str())
                            .collect();
                        let s = &mut report.snapshots[index[&id]];
                        s.pruned_unix_ms = Some(now);
                        s.reason = Some(reasons.into_iter().collect::<Vec<_>>().join("; "));
                        today.pruned.push(name.to_string());
                    }
                    today.kept_locked = r
                        .kept_locked
                        .iter()
                        .map(|(s, _)| s.split_once('@').map_or(s.as_str(), |(_, n)| n).to_string())
                        .collect();
                }
                Ok(None) => {}
                Err(e @ Error::Policy(_)) => today.failures.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        progress(step + 1, steps);
    }
    while today.day + 1 < t.days {
        close(&node, volume, t, &mut today, &mut report, &index)?;
    }
    report.days.push(close_day(
        &node,
        volume,
        t,
        today,
        &mut report.snapshots,
        &index,
    )?);
    Ok(report)
}

/// Ends `today` (its report goes into `report`) and starts the next day.
fn close(
    node: &Node,
    volume: &VolumeName,
    t: &Timeline,
    today: &mut Day,
    report: &mut Report,
    index: &HashMap<SnapshotId, usize>,
) -> Result<()> {
    let next = today.day + 1;
    let done = std::mem::replace(
        today,
        Day::empty(next, t.start_unix_ms + u64::from(next) * DAY_MS),
    );
    report.days.push(close_day(
        node,
        volume,
        t,
        done,
        &mut report.snapshots,
        index,
    )?);
    Ok(())
}

/// The policies' lock decision for `phase`, as the CLI and the daemon ask it; a failure keeps
/// the policy's previous locks and is reported.
fn decide(
    node: &Node,
    engine: &PolicyEngine,
    volume: &VolumeName,
    phase: Phase,
    today: &mut Day,
) -> Result<()> {
    for d in registry::decide_locks(node, engine, volume, phase, Asked::HandlingPhase, true)? {
        if let Some(e) = d.error {
            today.failures.push(e);
        }
    }
    Ok(())
}

/// Snapshots are named by their time, to the second: `2026-01-05T13:00:00Z`.
pub fn snapshot_name(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(unix_ms))
        .to_string()
}

impl Day {
    fn empty(day: u32, start: u64) -> Self {
        Day {
            day,
            date: snapshot_name(start),
            snapshots: Vec::new(),
            locked: BTreeMap::new(),
            pruned: Vec::new(),
            kept_locked: Vec::new(),
            failures: Vec::new(),
            estimate: Estimate::default(),
        }
    }
}

fn close_day(
    node: &Node,
    volume: &VolumeName,
    t: &Timeline,
    mut day: Day,
    snapshots: &mut [SimSnapshot],
    index: &HashMap<SnapshotId, usize>,
) -> Result<Day> {
    let existing = node.catalog.snapshots(volume)?;
    let locked = node.catalog.locks().locked_snapshots(volume)?;
    day.snapshots = existing.iter().map(|s| s.name.to_string()).collect();
    for rec in &existing {
        if let Some(holders) = locked.get(&rec.id) {
            let holders: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
            if let Some(&i) = index.get(&rec.id) {
                snapshots[i].locked_days.push(day.day);
                snapshots[i].holders.extend(holders.iter().cloned());
            }
            day.locked.insert(rec.name.to_string(), holders);
        }
    }
    day.estimate = estimate(t, &existing, &day.kept_locked, &day.locked);
    Ok(day)
}

/// The storage model: each step rewrites `change` of the volume's blocks, chosen at random. A
/// block then has one version per kept snapshot between which it changed, so the oldest kept
/// snapshot costs the whole volume and every later one the share of blocks that changed since
/// the kept one before it, `1 - (1 - change)^steps`. Dropping a snapshot between two others
/// frees what changed on both sides of it.
fn stored(t: &Timeline, times: &[u64]) -> u64 {
    let every = t.every.as_millis().max(1) as f64;
    let mut total = 0.0;
    let mut prev: Option<u64> = None;
    for &at in times {
        total += match prev {
            None => 1.0,
            Some(p) => 1.0 - (1.0 - t.change).powf((at - p) as f64 / every),
        } * t.size as f64;
        prev = Some(at);
    }
    total.round() as u64
}

fn estimate(
    t: &Timeline,
    existing: &[SnapshotRecord],
    kept_locked: &[String],
    locked: &BTreeMap<String, Vec<String>>,
) -> Estimate {
    let mut times: Vec<(u64, &str)> = existing
        .iter()
        .map(|s| (s.created_unix_ms, s.name.as_str()))
        .collect();
    times.sort();
    let all: Vec<u64> = times.iter().map(|(at, _)| *at).collect();
    let stored_bytes = stored(t, &all);
    let without = |drop: &dyn Fn(&str) -> bool| {
        let kept: Vec<u64> = times
            .iter()
            .filter(|(_, n)| !drop(n))
            .map(|(at, _)| *at)
            .collect();
        stored_bytes.saturating_sub(stored(t, &kept))
    };
    let only_for_locks: BTreeSet<&str> = kept_locked
        .iter()
        .map(|s| s.as_str())
        .filter(|n| locked.contains_key(*n))
        .collect();
    let pinned_by_locks_bytes = without(&|n| only_for_locks.contains(n));
    let mut pinned_by_holder = BTreeMap::new();
    let holders: BTreeSet<&String> = locked.values().flatten().collect();
    for h in holders {
        let sole: BTreeSet<&str> = only_for_locks
            .iter()
            .copied()
            .filter(|n| locked[*n].iter().all(|x| x == h))
            .collect();
        pinned_by_holder.insert(h.clone(), without(&|n| sole.contains(n)));
    }
    Estimate {
        stored_bytes,
        pinned_by_locks_bytes,
        pinned_by_holder,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            "c:3d@day10".parse::<Outage>().unwrap(),
            Outage {
                downstream: "c".into(),
                from_day: 10,
                length: Duration::from_secs(3 * 86_400),
            }
        );
        for bad in [
            "c3d@day10",
            "c:3d@10",
            "c:soon@day1",
            "c:3d@dayx",
            ":3d@day1",
        ] {
            let e = bad.parse::<Outage>().unwrap_err().to_string();
            assert!(
                e.contains("NAME:LENGTH@dayN") || e.contains("name"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_storage_model_charges_the_changes_between_kept_snapshots() {
        let t = Timeline {
            start_unix_ms: 0,
            every: Duration::from_secs(3600),
            days: 1,
            labels: Default::default(),
            relabel_after: None,
            relabel: Default::default(),
            downstreams: vec![],
            outages: vec![],
            size: 1000,
            change: 0.1,
        };
        let h = 3_600_000;
        // The first costs the volume; one step later 10 % changed; five steps later
        // 1 - 0.9^5 = 40.951 %.
        assert_eq!(stored(&t, &[0, h, 6 * h]), 1000 + 100 + 410);
        // However long the gap, at most the whole volume changed.
        assert_eq!(stored(&t, &[0, 500 * h]), 2000);
        assert_eq!(stored(&t, &[]), 0);
        // A snapshot between two others costs what changed on both sides of it: dropping the
        // middle of 0, 24 h, 48 h frees (1 - 0.9^24)^2 of the volume (92.8 %^2).
        let freed = stored(&t, &[0, 24 * h, 48 * h]) - stored(&t, &[0, 48 * h]);
        let p = 1.0 - 0.9f64.powi(24);
        assert!((freed as f64 - 1000.0 * p * p).abs() <= 1.0, "{freed}");
    }
}
