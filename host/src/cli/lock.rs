//! `holdfast lock add|release|list|explain|history|replace-set|auto-release`.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde::Serialize;

use super::{Context, format_time, human_bytes, print_json};
use holdfast::catalog::SnapshotRecord;
use holdfast::id::{SnapshotRef, VolumeName};
use holdfast::snapshot;
use holdfast::softlock::registry::HolderSettings;
use holdfast::softlock::{HolderId, LockSetUpdate, LockType, NewLock, SoftLock, human_duration};

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Set a soft lock on a snapshot (or refresh the same one).
    Add {
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
    },
    /// Release a holder's locks: on one snapshot, or (without a snapshot) all of them.
    Release {
        snapshot: Option<SnapshotRef>,
        #[arg(long)]
        holder: HolderId,
        /// Only on this volume (without a snapshot).
        #[arg(long)]
        volume: Option<VolumeName>,
    },
    /// List soft locks.
    List {
        #[arg(long)]
        volume: Option<VolumeName>,
        #[arg(long)]
        holder: Option<HolderId>,
        /// Only locks whose lease ran out.
        #[arg(long)]
        stale: bool,
        #[arg(long)]
        json: bool,
    },
    /// Why a snapshot cannot be deleted, and what deleting it would free and cost.
    Explain {
        snapshot: SnapshotRef,
        #[arg(long)]
        json: bool,
    },
    /// Releases, breaks, expiries and replaced sets, oldest first.
    History {
        #[arg(long)]
        json: bool,
    },
    /// Replace a holder's whole lock set from a JSON file (`-` for stdin):
    /// {"volume", "holder", "generation", "locks": [{"snapshot", "type", "value", "lease-ms"}]}.
    /// An older generation than the stored one is ignored.
    ReplaceSet { file: PathBuf },
    /// Whether a holder's stale locks are released automatically (default: no).
    AutoRelease {
        #[arg(long)]
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
        let now = holdfast::now_unix_ms();
        match self {
            LockCommand::Add {
                snapshot,
                lock_type,
                value,
                holder,
                ttl,
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
                    anyhow::bail!(holdfast::Error::not_found(format!(
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
                json,
            } => {
                locks.expire_stale()?;
                let sets = locks.sets(volume.as_ref())?;
                let names = snapshot_names(
                    &node,
                    &sets.iter().map(|s| s.volume.clone()).collect::<Vec<_>>(),
                )?;
                let mut rows = Vec::new();
                for s in &sets {
                    if holder.as_ref().is_some_and(|h| *h != s.holder) {
                        continue;
                    }
                    for l in &s.locks {
                        if stale && !l.is_stale(now) {
                            continue;
                        }
                        rows.push(ListedLock {
                            lock: l,
                            snapshot_name: names
                                .get(&(l.volume.clone(), l.snapshot))
                                .cloned()
                                .unwrap_or_else(|| l.snapshot.to_string()),
                            stale: l.is_stale(now),
                            generation: s.generation,
                        });
                    }
                }
                if json {
                    return print_json(&rows);
                }
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                writeln!(
                    out,
                    "{:<32} {:<24} {:<18} {:<24} {:>8} {:>10} {:>8}  VIA",
                    "SNAPSHOT", "HOLDER", "TYPE", "VALUE", "AGE", "LEASE", "STATE"
                )?;
                for r in &rows {
                    let l = r.lock;
                    writeln!(
                        out,
                        "{:<32} {:<24} {:<18} {:<24} {:>8} {:>10} {:>8}  {}",
                        format!("{}@{}", l.volume, r.snapshot_name),
                        l.holder.as_str(),
                        l.lock_type.to_string(),
                        l.value,
                        human_duration(now.saturating_sub(l.set_unix_ms)),
                        l.lease_ms.map(human_duration).unwrap_or_else(|| "-".into()),
                        if r.stale { "STALE" } else { "held" },
                        if l.path.is_empty() {
                            "local".to_string()
                        } else {
                            l.path
                                .iter()
                                .map(|n| n.as_str())
                                .collect::<Vec<_>>()
                                .join(" -> ")
                        }
                    )?;
                }
                out.flush()?;
            }
            LockCommand::Explain { snapshot, json } => {
                let rec = node.catalog.resolve(&snapshot)?;
                let e = explain(&node, &rec, now).await?;
                if json {
                    return print_json(&e);
                }
                println!(
                    "{} ({}), taken {}, {}",
                    rec.display_ref(),
                    rec.id,
                    format_time(rec.created_unix_ms),
                    human_bytes(rec.size)
                );
                if e.locks.is_empty() {
                    println!(
                        "no soft lock holds it: `holdfast snapshot delete {}` would delete it",
                        rec.display_ref()
                    );
                } else {
                    println!(
                        "it cannot be deleted: {} soft lock(s) hold it",
                        e.locks.len()
                    );
                    for (l, cost) in e.locks.iter().zip(&e.break_costs) {
                        println!("  - {}", l.describe(now));
                        println!("    breaking it: {cost}");
                    }
                }
                println!(
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
                println!(
                    "{:<20} {:<8} {:<24} {:<30} {:<18} {:<20}  DETAIL",
                    "TIME", "EVENT", "HOLDER", "SNAPSHOT", "TYPE", "VALUE"
                );
                for e in h {
                    println!(
                        "{:<20} {:<8} {:<24} {:<30} {:<18} {:<20}  {}",
                        format_time(e.unix_ms),
                        e.event,
                        e.holder.as_str(),
                        format!("{}@{}", e.volume, e.snapshot),
                        e.lock_type.to_string(),
                        e.value,
                        e.detail
                    );
                }
            }
            LockCommand::ReplaceSet { file } => {
                let mut raw = Vec::new();
                if file.as_os_str() == "-" {
                    std::io::stdin().read_to_end(&mut raw)?;
                } else {
                    raw = std::fs::read(&file).map_err(|e| {
                        holdfast::Error::io(format!("reading {}", file.display()), e)
                    })?;
                }
                let update: LockSetUpdate = serde_json::from_slice(&raw).map_err(|e| {
                    holdfast::Error::invalid(format!(
                        "{} is not a valid lock set: {e}",
                        file.display()
                    ))
                })?;
                node.catalog.volume(&update.volume)?;
                let outcome = locks.replace_set(update)?;
                print_json(&outcome)?;
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

fn snapshot_names(
    node: &holdfast::state::Node,
    volumes: &[VolumeName],
) -> anyhow::Result<std::collections::HashMap<(VolumeName, holdfast::id::SnapshotId), String>> {
    let mut out = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for v in volumes {
        if seen.insert(v.clone()) {
            for s in node.catalog.snapshots(v)? {
                out.insert((v.clone(), s.id), s.name.as_str().to_string());
            }
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
    node: &holdfast::state::Node,
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
    let m = snapshot::load_manifest(&node.repo, rec).await?;
    let mut shared = std::collections::HashSet::new();
    for n in [prev, next].into_iter().flatten() {
        shared.extend(
            snapshot::load_manifest(&node.repo, n)
                .await?
                .blocks
                .into_iter()
                .flatten(),
        );
    }
    let mut counted = std::collections::HashSet::new();
    let (mut blocks, mut bytes) = (0u64, 0u64);
    for (i, b) in m.blocks.iter().enumerate() {
        if b.is_some_and(|id| !shared.contains(&id) && counted.insert(id)) {
            blocks += 1;
            bytes += m.block_len(i as u64) as u64;
        }
    }
    Ok(Explanation {
        snapshot: rec.display_ref(),
        locks,
        break_costs,
        unique_blocks: blocks,
        unique_bytes: bytes,
        previous: prev.map(|s| s.display_ref()),
        next: next.map(|s| s.display_ref()),
    })
}

/// What breaking a lock would cost its holder, in plain words.
fn break_cost(l: &SoftLock, rec: &SnapshotRecord) -> String {
    let size = human_bytes(rec.size);
    match (&l.lock_type, l.holder.application_name()) {
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
