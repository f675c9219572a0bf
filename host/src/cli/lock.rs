//! `holdfast lock add|release|list|explain|history|replace-set|auto-release`.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde::Serialize;

use super::{Context, format_time, human_bytes, print_json};
use crate::catalog::SnapshotRecord;
use crate::id::{SnapshotRef, VolumeName};
use crate::snapshot;
use crate::softlock::registry::HolderSettings;
use crate::softlock::{HolderId, LockSetUpdate, LockType, NewLock, SoftLock};

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Set a soft lock on a snapshot (or refresh the same one).
    #[command(
        after_help = "Examples:\n  holdfast lock add db@nightly --type owner-name --value \"dba team\" --holder app:dba --ttl 24h"
    )]
    Add {
        /// The snapshot: VOLUME@NAME, VOLUME@ID or a unique prefix of its id (VOLUME@01a2b3)
        #[arg(value_name = "VOL@SNAP")]
        snapshot: SnapshotRef,
        /// owner-name, destination-path, qtree-name, application or custom:TAG.
        #[arg(long = "type")]
        lock_type: LockType,
        /// What users see: the owner, the destination, the application...
        #[arg(long)]
        value: String,
        /// app:NAME for an application, NODE/VOLUME for a mirror.
        #[arg(long)]
        holder: HolderId,
        /// Lease: the lock goes stale this long after its last refresh (e.g. 2h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Set the lock inside this mirror target (honoured by every prune of the target).
        #[arg(long)]
        target: Option<String>,
    },
    /// Release a holder's locks: on one snapshot, or (without a snapshot) all of them.
    #[command(
        after_help = "Examples:\n  holdfast lock release db@nightly --holder app:dba\n  holdfast lock release --holder app:dba --volume db"
    )]
    Release {
        /// The snapshot (VOLUME@NAME or VOLUME@ID); without it, every lock of the holder
        #[arg(value_name = "VOL@SNAP")]
        snapshot: Option<SnapshotRef>,
        #[arg(long)]
        /// The holder: app:NAME for an application, NODE/VOLUME for a downstream mirror
        holder: HolderId,
        /// Only on this volume (without a snapshot).
        #[arg(long)]
        volume: Option<VolumeName>,
        /// Release inside this mirror target.
        #[arg(long)]
        target: Option<String>,
    },
    /// List soft locks.
    #[command(after_help = "Examples:\n  holdfast lock list --volume db --stale")]
    List {
        #[arg(long)]
        /// Only this volume
        volume: Option<VolumeName>,
        #[arg(long)]
        /// Only this holder's locks (app:NAME or NODE/VOLUME)
        holder: Option<HolderId>,
        /// Only locks whose lease ran out.
        #[arg(long)]
        stale: bool,
        /// Only locks of this type (qtree-name: the bases of region mirrors).
        #[arg(long = "type", value_name = "TYPE")]
        lock_type: Option<LockType>,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
        /// The lock records inside this mirror target (with --volume).
        #[arg(long)]
        target: Option<String>,
    },
    /// Why a snapshot cannot be deleted, and what deleting it would free and cost.
    #[command(after_help = "Examples:\n  holdfast lock explain db@nightly")]
    Explain {
        /// The snapshot: VOLUME@NAME, VOLUME@ID or a unique prefix of its id (VOLUME@01a2b3)
        #[arg(value_name = "VOL@SNAP")]
        snapshot: SnapshotRef,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Releases, breaks, expiries and replaced sets, oldest first.
    #[command(after_help = "Examples:\n  holdfast lock history --json")]
    History {
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Replace a holder's whole lock set from a JSON file (`-` for stdin):
    /// {"volume", "holder", "generation", "locks": [{"snapshot", "type", "value", "lease-ms"}]}.
    /// An older generation than the stored one is ignored.
    ReplaceSet { file: PathBuf },
    /// Whether a holder's stale locks are released automatically (default: no).
    #[command(after_help = "Examples:\n  holdfast lock auto-release --holder b/db")]
    AutoRelease {
        #[arg(long)]
        /// The holder: app:NAME for an application, NODE/VOLUME for a downstream mirror
        holder: HolderId,
        /// Turn it off again.
        #[arg(long)]
        off: bool,
    },
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ListedLock<'a> {
    #[serde(flatten)]
    lock: &'a SoftLock,
    snapshot_name: String,
    stale: bool,
    generation: u64,
}

impl LockCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        let locks = node.catalog.locks();
        let now = crate::now_unix_ms();
        match self {
            LockCommand::Add {
                snapshot,
                lock_type,
                value,
                holder,
                ttl,
                target: None,
            } => {
                let rec = node.catalog.resolve(&snapshot)?;
                let l = locks.add(
                    &rec.volume,
                    &holder,
                    NewLock {
                        snapshot: rec.id,
                        lock_type,
                        value,
                        lease_ms: ttl.map(|d| d.as_millis() as u64),
                        path: vec![],
                    },
                )?;
                ctx.summary(format!("locked {}: {}", rec.display_ref(), l.describe(now)));
            }
            LockCommand::Release {
                snapshot,
                holder,
                volume,
                target: None,
            } => {
                let released = match &snapshot {
                    Some(r) => {
                        let rec = node.catalog.resolve(r)?;
                        locks.release(
                            &holder,
                            Some(&rec.volume),
                            Some(&rec.id),
                            "released by the operator",
                        )?
                    }
                    None => {
                        locks.release(&holder, volume.as_ref(), None, "released by the operator")?
                    }
                };
                if released.is_empty() {
                    anyhow::bail!(crate::Error::not_found(format!(
                        "{holder} holds no lock{}",
                        snapshot.map(|s| format!(" on {s}")).unwrap_or_default()
                    )));
                }
                ctx.summary(format!("released {} lock(s) of {holder}", released.len()));
            }
            LockCommand::List {
                volume,
                holder,
                stale,
                lock_type,
                json,
                target: None,
            } => {
                locks.expire_stale()?;
                let sets = locks.sets(volume.as_ref())?;
                let names = snapshot_names(
                    &node,
                    &sets.iter().map(|s| s.volume.clone()).collect::<Vec<_>>(),
                )?;
                let rows = sets
                    .iter()
                    .filter(|s| holder.as_ref().is_none_or(|h| *h == s.holder))
                    .flat_map(|s| s.locks.iter().map(move |l| (s, l)))
                    .filter(|(_, l)| !stale || l.is_stale(now))
                    .filter(|(_, l)| lock_type.as_ref().is_none_or(|t| *t == l.lock_type));
                let name_of = |l: &SoftLock| -> String {
                    names
                        .get(&l.volume)
                        .and_then(|m| m.get(&l.snapshot))
                        .cloned()
                        .unwrap_or_else(|| l.snapshot.to_string())
                };
                if json {
                    let rows: Vec<ListedLock> = rows
                        .map(|(s, l)| ListedLock {
                            lock: l,
                            snapshot_name: name_of(l),
                            stale: l.is_stale(now),
                            generation: s.generation,
                        })
                        .collect();
                    return print_json(&rows);
                }
                // A node can hold 100,000 locks: build the table by hand into one buffer.
                use std::io::Write;
                let mut out: Vec<u8> = Vec::with_capacity(1 << 20);
                let cell = |out: &mut Vec<u8>, s: &str, width: usize| {
                    out.extend_from_slice(s.as_bytes());
                    let n = s.chars().count();
                    out.resize(out.len() + width.saturating_sub(n) + 1, b' ');
                };
                for (h, w) in [
                    ("SNAPSHOT", 32),
                    ("HOLDER", 24),
                    ("TYPE", 18),
                    ("VALUE", 24),
                    ("AGE", 8),
                    ("LEASE", 8),
                    ("STATE", 6),
                ] {
                    cell(&mut out, h, w);
                }
                out.extend_from_slice(b"VIA\n");
                let mut buf = String::new();
                let mut stdout = std::io::stdout().lock();
                for (_, l) in rows {
                    buf.clear();
                    buf.push_str(l.volume.as_str());
                    buf.push('@');
                    match names.get(&l.volume).and_then(|m| m.get(&l.snapshot)) {
                        Some(n) => buf.push_str(n),
                        None => buf.push_str(&l.snapshot.to_string()),
                    }
                    cell(&mut out, &buf, 32);
                    cell(&mut out, l.holder.as_str(), 24);
                    buf.clear();
                    let _ = std::fmt::Write::write_fmt(&mut buf, format_args!("{}", l.lock_type));
                    cell(&mut out, &buf, 18);
                    cell(&mut out, &l.value, 24);
                    buf.clear();
                    compact_age(&mut buf, now.saturating_sub(l.set_unix_ms));
                    cell(&mut out, &buf, 8);
                    buf.clear();
                    match l.lease_ms {
                        Some(lease) => compact_age(&mut buf, lease),
                        None => buf.push('-'),
                    }
                    cell(&mut out, &buf, 8);
                    cell(&mut out, if l.is_stale(now) { "STALE" } else { "held" }, 6);
                    if l.path.is_empty() {
                        out.extend_from_slice(b"local");
                    } else {
                        for (i, n) in l.path.iter().enumerate() {
                            if i > 0 {
                                out.extend_from_slice(b" -> ");
                            }
                            out.extend_from_slice(n.as_str().as_bytes());
                        }
                    }
                    out.push(b'\n');
                    if out.len() > (1 << 20) - 4096 {
                        stdout.write_all(&out).map_err(super::stdout_error)?;
                        out.clear();
                    }
                }
                stdout.write_all(&out).map_err(super::stdout_error)?;
                stdout.flush().map_err(super::stdout_error)?;
            }
            LockCommand::Explain { snapshot, json } => {
                let rec = node.catalog.resolve(&snapshot)?;
                let e = explain(&node, &rec, now).await?;
                if json {
                    return print_json(&e);
                }
                outln!(
                    "{} ({}), taken {}, {}",
                    rec.display_ref(),
                    rec.id,
                    format_time(rec.created_unix_ms),
                    human_bytes(rec.size)
                );
                if e.locks.is_empty() {
                    outln!(
                        "no soft lock holds it: `holdfast snapshot delete {}` would delete it",
                        rec.display_ref()
                    );
                } else {
                    outln!(
                        "it cannot be deleted: {} soft lock(s) hold it",
                        e.locks.len()
                    );
                    for (l, cost) in e.locks.iter().zip(&e.break_costs) {
                        outln!("  - {}", l.describe(now));
                        outln!("    breaking it: {cost}");
                    }
                }
                outln!(
                    "deleting it would free up to {} before compression ({} blocks it shares \
                     with neither {} nor {}); `holdfast gc --dry-run` after a delete gives the \
                     exact figure",
                    human_bytes(e.unique_bytes),
                    e.unique_blocks,
                    e.previous.as_deref().unwrap_or("(no older snapshot)"),
                    e.next.as_deref().unwrap_or("(no newer snapshot)")
                );
            }
            LockCommand::History { json } => {
                let h = locks.history()?;
                if json {
                    return print_json(&h);
                }
                outln!(
                    "{:<20} {:<8} {:<24} {:<30} {:<18} {:<20}  DETAIL",
                    "TIME",
                    "EVENT",
                    "HOLDER",
                    "SNAPSHOT",
                    "TYPE",
                    "VALUE"
                );
                for e in h {
                    outln!(
                        "{:<20} {:<8} {:<24} {:<30} {:<18} {:<20}  {}",
                        format_time(e.unix_ms),
                        e.event,
                        e.holder.as_str(),
                        format!("{}@{}", e.volume, e.snapshot),
                        e.lock_type.to_string(),
                        super::printable(&e.value),
                        e.detail
                    );
                }
                // Each holder keeps its newest events (HOLDFAST_HISTORY_PER_HOLDER, 1000);
                // older ones are summarised.
                for sum in locks.history_summaries()? {
                    let counts: Vec<String> =
                        sum.events.iter().map(|(k, n)| format!("{n} {k}")).collect();
                    outln!(
                        "(older events of {} summarised: {} between {} and {})",
                        sum.holder,
                        counts.join(", "),
                        format_time(sum.first_unix_ms),
                        format_time(sum.last_unix_ms)
                    );
                }
            }
            LockCommand::ReplaceSet { file } => {
                let mut raw = Vec::new();
                if file.as_os_str() == "-" {
                    std::io::stdin().read_to_end(&mut raw)?;
                } else {
                    raw = std::fs::read(&file)
                        .map_err(|e| crate::Error::io(format!("reading {}", file.display()), e))?;
                }
                let update: LockSetUpdate = serde_json::from_slice(&raw).map_err(|e| {
                    crate::Error::invalid(format!(
                        "{} is not a valid lock set: {e}",
                        file.display()
                    ))
                })?;
                node.catalog.volume(&update.volume)?;
                let outcome = locks.replace_set(update)?;
                print_json(&outcome)?;
            }
            LockCommand::Add {
                snapshot,
                lock_type,
                value,
                holder,
                ttl,
                target: Some(t),
            } => {
                if ttl.is_some() {
                    anyhow::bail!(crate::Error::invalid(
                        "--ttl is not supported for locks inside a target (a target has no clock \
                         of its own); release the lock when done"
                    ));
                }
                crate::softlock::validate_value(&value)?;
                let repo = crate::target::Targets::new(&node).open(&t).await?;
                let rec = crate::target::resolve(&repo, &snapshot).await?;
                let mut mine = target_locks_of(&repo, &rec.volume, &holder).await?;
                let l = crate::target::TargetLock {
                    snapshot: rec.id,
                    lock_type,
                    value,
                };
                if !mine.contains(&l) {
                    mine.push(l);
                }
                crate::target::write_lock_record(&repo, &rec.volume, &holder, mine).await?;
                ctx.summary(format!(
                    "locked {} in target {t} for {holder}",
                    rec.display_ref()
                ));
            }
            LockCommand::Release {
                snapshot,
                holder,
                volume,
                target: Some(t),
            } => {
                let repo = crate::target::Targets::new(&node).open(&t).await?;
                let (vol, id) = match &snapshot {
                    Some(r) => {
                        let rec = crate::target::resolve(&repo, r).await?;
                        (rec.volume, Some(rec.id))
                    }
                    None => (
                        volume.ok_or_else(|| {
                            crate::Error::invalid("give VOLUME@SNAPSHOT or --volume with --target")
                        })?,
                        None,
                    ),
                };
                let mine = target_locks_of(&repo, &vol, &holder).await?;
                let before = mine.len();
                let kept: Vec<_> = mine
                    .into_iter()
                    .filter(|l| id.is_some_and(|id| l.snapshot != id))
                    .collect();
                let released = before - kept.len();
                crate::target::write_lock_record(&repo, &vol, &holder, kept).await?;
                ctx.summary(format!(
                    "released {released} lock(s) of {holder} in target {t}"
                ));
            }
            LockCommand::List {
                volume,
                holder,
                json,
                target: Some(t),
                ..
            } => {
                let volume =
                    volume.ok_or_else(|| crate::Error::invalid("give --volume with --target"))?;
                let repo = crate::target::Targets::new(&node).open(&t).await?;
                let recs: Vec<_> = crate::target::lock_records(&repo, &volume)
                    .await?
                    .into_iter()
                    .filter(|r| holder.as_ref().is_none_or(|h| *h == r.holder))
                    .collect();
                if json {
                    return print_json(&recs);
                }
                outln!("{:<22} {:<28} {:<18} VALUE", "SNAPSHOT", "HOLDER", "TYPE");
                for r in &recs {
                    for l in &r.locks {
                        outln!(
                            "{:<22} {:<28} {:<18} {}",
                            l.snapshot.to_string(),
                            r.holder.as_str(),
                            l.lock_type.to_string(),
                            l.value
                        );
                    }
                }
            }
            LockCommand::AutoRelease { holder, off } => {
                locks.set_settings(
                    &holder,
                    &HolderSettings {
                        auto_release_stale: !off,
                    },
                )?;
                ctx.summary(format!(
                    "stale locks of {holder} are {} released automatically",
                    if off { "no longer" } else { "now" }
                ));
            }
        }
        Ok(())
    }
}

/// `45s`, `12m`, `5h`, `3d`: the largest whole unit, appended to `out`.
fn compact_age(out: &mut String, ms: u64) {
    use std::fmt::Write;
    let s = ms / 1000;
    let _ = match s {
        0..60 => write!(out, "{s}s"),
        60..3600 => write!(out, "{}m", s / 60),
        3600..86_400 => write!(out, "{}h", s / 3600),
        _ => write!(out, "{}d", s / 86_400),
    };
}

type Names =
    std::collections::HashMap<VolumeName, std::collections::HashMap<crate::id::SnapshotId, String>>;

/// Snapshot names by volume and id, for showing locks by name.
fn snapshot_names(node: &crate::state::Node, volumes: &[VolumeName]) -> anyhow::Result<Names> {
    let mut out = Names::new();
    for v in volumes {
        if !out.contains_key(v) {
            let names = node
                .catalog
                .snapshots(v)?
                .into_iter()
                .map(|s| (s.id, s.name.as_str().to_string()))
                .collect();
            out.insert(v.clone(), names);
        }
    }
    Ok(out)
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Explanation {
    snapshot: String,
    locks: Vec<SoftLock>,
    break_costs: Vec<String>,
    unique_blocks: u64,
    unique_bytes: u64,
    previous: Option<String>,
    next: Option<String>,
}

async fn explain(
    node: &crate::state::Node,
    rec: &SnapshotRecord,
    _now: u64,
) -> anyhow::Result<Explanation> {
    let locks = node.catalog.locks().locks_on(&rec.volume, &rec.id)?;
    let break_costs = locks.iter().map(|l| break_cost(l, rec)).collect();
    // The chunks only this snapshot has among its neighbours bound what deleting it frees.
    let snaps = node.catalog.snapshots(&rec.volume)?;
    let pos = snaps.iter().position(|s| s.id == rec.id).unwrap_or(0);
    let prev = pos.checked_sub(1).map(|i| &snaps[i]);
    let next = snaps.get(pos + 1);
    let size = snapshot::exclusive_size(&node.repo, &snaps, pos).await?;
    Ok(Explanation {
        snapshot: rec.display_ref(),
        locks,
        break_costs,
        unique_blocks: size.blocks,
        unique_bytes: size.bytes,
        previous: prev.map(|s| s.display_ref()),
        next: next.map(|s| s.display_ref()),
    })
}

/// What breaking a lock would cost its holder, in plain words.
fn break_cost(l: &SoftLock, rec: &SnapshotRecord) -> String {
    let size = human_bytes(rec.size);
    match (&l.lock_type, l.holder.application_name()) {
        (LockType::QtreeName, None) => {
            // `VOLUME/REGION`: the region's size in this snapshot, when it has the region.
            let region = l.value.split_once('/').map_or("", |(_, r)| r);
            let size = rec
                .regions
                .iter()
                .find(|(n, _)| n.as_str() == region)
                .map_or(size, |(_, e)| human_bytes(e.length));
            format!(
                "the mirror {} of region {:?}: if this is the newest snapshot it shares with this \
                 node, its next transfer has no base and must re-copy the whole region ({size})",
                l.holder, l.value
            )
        }
        (_, None) => format!(
            "if this is the newest snapshot the mirror {} shares with this node, its next \
             transfer has no base and must re-copy the whole volume ({size})",
            l.holder
        ),
        (LockType::DestinationPath, _) => format!(
            "the destination {:?} loses its base: its next update must re-copy the whole \
             volume ({size})",
            l.value
        ),
        (LockType::Application, Some(app)) => format!(
            "the application {app:?} loses the snapshot it depends on; a read or backup in \
             progress fails"
        ),
        (LockType::OwnerName, _) => format!(
            "{:?} asked to keep it and is not told when it goes",
            l.value
        ),
        (LockType::QtreeName, _) => format!(
            "the qtree {:?} loses the point-in-time image it depends on",
            l.value
        ),
        (LockType::Custom(tag), _) => format!(
            "{} no longer has the snapshot its {tag} dependency ({:?}) needs",
            l.holder, l.value
        ),
    }
}

/// `holder`'s locks in a target's record for `volume`.
async fn target_locks_of(
    repo: &crate::repo::Repository,
    volume: &VolumeName,
    holder: &HolderId,
) -> anyhow::Result<Vec<crate::target::TargetLock>> {
    Ok(crate::target::lock_records(repo, volume)
        .await?
        .into_iter()
        .filter(|r| &r.holder == holder)
        .flat_map(|r| r.locks)
        .collect())
}
