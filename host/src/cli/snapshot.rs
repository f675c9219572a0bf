//! `holdfast snapshot create|list|show|diff|restore|delete`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;

use super::{Context, format_time, human_bytes, print_json, throughput};
use crate::catalog::SnapshotRecord;
use crate::id::{RegionName, SnapshotName, SnapshotRef, VolumeName, parse_label};
use crate::policy::{Phase, PolicyEngine, registry};
use crate::region;
use crate::snapshot::{self, CreateOptions};
use crate::softlock::{BreakLocks, HolderId, LockType, NewLock, SoftLock};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume and print its id.
    #[command(
        after_help = "Examples:\n  holdfast snapshot create db\n  holdfast snapshot create db --name nightly --label app=postgres"
    )]
    Create {
        /// The volume (as `holdfast volume list` names it)
        volume: VolumeName,
        /// The snapshot's name (default: the creation time).
        #[arg(long)]
        name: Option<SnapshotName>,
        /// A label KEY=VALUE; repeatable.
        #[arg(long = "label", value_parser = parse_label_arg)]
        labels: Vec<(String, String)>,
        /// Print the new snapshot as JSON instead of its id.
        #[arg(long)]
        json: bool,
        /// A command run (with `sh -c`) before the source is read, to prepare it: make an LVM
        /// snapshot, `fsfreeze --freeze`, put a database in backup mode. If it fails, no
        /// snapshot is taken. It sees HOLDFAST_VOLUME, HOLDFAST_SNAPSHOT and HOLDFAST_SOURCE.
        #[arg(long, value_name = "COMMAND")]
        before: Option<String>,
        /// A command run as soon as the source's view is fixed (a running QEMU's disk: right
        /// after the freeze, before the read), or opening it failed: thaw here what --before
        /// froze, so a guest stays frozen for a moment, not for the whole read.
        #[arg(long, value_name = "COMMAND")]
        frozen: Option<String>,
        /// A command run after the snapshot, whatever happened (also when --before failed),
        /// to undo what --before did; it also sees HOLDFAST_RESULT (ok or failed) and
        /// HOLDFAST_SNAPSHOT_ID or HOLDFAST_ERROR.
        #[arg(long, value_name = "COMMAND")]
        after: Option<String>,
        /// Read the whole source even if its dirty bitmap could be used (qcow2 and running
        /// QEMU volumes).
        #[arg(long)]
        full_read: bool,
    },
    /// List a volume's snapshots, oldest first.
    #[command(
        after_help = "Examples:\n  holdfast snapshot list db\n  holdfast snapshot list db --target bucket --json"
    )]
    List {
        /// The volume (as `holdfast volume list` names it)
        volume: VolumeName,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
        /// List the snapshots held in this mirror target instead.
        #[arg(long)]
        target: Option<String>,
    },
    /// Show one snapshot.
    #[command(after_help = "Examples:\n  holdfast snapshot show db@nightly")]
    Show {
        /// The snapshot: VOLUME@NAME, VOLUME@ID or a unique prefix of its id (VOLUME@01a2b3)
        #[arg(value_name = "VOL@SNAP")]
        snapshot: SnapshotRef,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// The block ranges that differ between two snapshots.
    #[command(after_help = "Examples:\n  holdfast snapshot diff db@monday db@tuesday")]
    Diff {
        /// The older snapshot (VOLUME@NAME or VOLUME@ID)
        #[arg(value_name = "VOL@SNAP")]
        from: SnapshotRef,
        /// The newer snapshot (VOLUME@NAME or VOLUME@ID)
        #[arg(value_name = "VOL@SNAP")]
        to: SnapshotRef,
        /// Compare only this region of the volume (offsets are then the region's own).
        #[arg(long, value_name = "NAME")]
        region: Option<RegionName>,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot's image to a file or block device, verifying every chunk.
    #[command(
        after_help = "Examples:\n  holdfast snapshot restore db@nightly --to ./db.img\n  holdfast snapshot restore db@nightly --target bucket --to /dev/vg0/db"
    )]
    Restore {
        /// The snapshot: VOLUME@NAME, VOLUME@ID or a unique prefix of its id (VOLUME@01a2b3)
        #[arg(value_name = "VOL@SNAP")]
        snapshot: SnapshotRef,
        #[arg(long)]
        /// The image file or block device to write (a new file unless --force)
        to: PathBuf,
        /// Overwrite the destination if it exists.
        #[arg(long)]
        force: bool,
        /// Restore from this mirror target (disaster recovery on a new node).
        #[arg(long)]
        target: Option<String>,
        /// Write only this region of the volume (a partition or byte range named with
        /// `volume region add`), as it lay in the snapshot.
        #[arg(long, value_name = "NAME")]
        region: Option<RegionName>,
    },
    /// Change a snapshot's labels (its data never changes), e.g. to mark it as copied.
    #[command(
        after_help = "Examples:\n  holdfast snapshot label db@nightly copied=yes --remove pending"
    )]
    Label {
        /// The snapshot: VOLUME@NAME, VOLUME@ID or a unique prefix of its id (VOLUME@01a2b3)
        #[arg(value_name = "VOL@SNAP")]
        snapshot: SnapshotRef,
        /// KEY=VALUE to set; repeatable.
        #[arg(value_parser = parse_label_arg)]
        set: Vec<(String, String)>,
        /// A label to remove; repeatable.
        #[arg(long = "remove")]
        remove: Vec<String>,
    },
    /// Delete a snapshot (its space is reclaimed by `holdfast gc`); refused while locked.
    #[command(
        after_help = "Examples:\n  holdfast snapshot delete db@monday\n  holdfast snapshot delete db@monday --break-locks --yes"
    )]
    Delete {
        /// The snapshot: VOLUME@NAME, VOLUME@ID or a unique prefix of its id (VOLUME@01a2b3)
        #[arg(value_name = "VOL@SNAP")]
        snapshot: SnapshotRef,
        /// Delete even though soft locks hold it; the locks are released and recorded in
        /// `holdfast lock history` with their holders.
        #[arg(long)]
        break_locks: bool,
        /// Do not ask for confirmation of --break-locks.
        #[arg(long)]
        yes: bool,
    },
    /// Stream a snapshot's image to stdout, holding an application lock while reading.
    ///
    /// Example: `holdfast snapshot read db@nightly --hold-as restic | restic backup --stdin`.
    /// The lock (holder app:NAME) is released when the stream ends; if the process dies, it
    /// goes stale when its lease runs out.
    #[command(
        after_help = "Examples:\n  holdfast snapshot read db@nightly --hold-as restic | restic backup --stdin"
    )]
    Read {
        /// The snapshot: VOLUME@NAME, VOLUME@ID or a unique prefix of its id (VOLUME@01a2b3)
        #[arg(value_name = "VOL@SNAP")]
        snapshot: SnapshotRef,
        /// The application name to hold the lock as.
        #[arg(long)]
        hold_as: String,
        /// Lease of the lock, refreshed while reading (e.g. 30m, 6h).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

fn parse_label_arg(s: &str) -> Result<(String, String), String> {
    parse_label(s).map_err(|e| e.to_string())
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ShowSnapshot<'a> {
    #[serde(flatten)]
    record: &'a SnapshotRecord,
    created: String,
    zero_blocks_percent: f64,
}

impl SnapshotCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        match self {
            SnapshotCommand::Create {
                volume,
                name,
                labels,
                json,
                before,
                frozen,
                after,
                full_read,
            } => {
                let mut map = BTreeMap::new();
                for (k, v) in labels {
                    if map.insert(k.clone(), v).is_some() {
                        anyhow::bail!(crate::Error::invalid(format!("label {k:?} is given twice")));
                    }
                }
                let pb = ctx.bytes_bar("snapshot");
                let opts = CreateOptions {
                    name,
                    labels: map,
                    hooks: snapshot::hooks::Hooks {
                        before,
                        frozen,
                        after,
                    },
                    full_read: snapshot::create::FullRead {
                        now: full_read,
                        every: None,
                    },
                };
                // SIGINT or SIGTERM: stop cleanly (hooks, what was added to QEMU).
                crate::shutdown::on_signals()?;
                let report = snapshot::create(&node, &volume, opts, &pb).await;
                pb.finish_and_clear();
                let report = report?;
                let r = &report.record;
                // Policies that lock new snapshots (app-hold, say) decide now. A failure keeps
                // their previous locks and does not undo the snapshot.
                refresh_policy_locks(&node, &volume, Phase::SnapshotCreated)?;
                if json {
                    #[derive(Serialize)]
                    #[serde(rename_all = "kebab-case")]
                    struct Created<'a> {
                        #[serde(flatten)]
                        record: &'a SnapshotRecord,
                        /// Bytes read from the image (holes are not read).
                        bytes_read: u64,
                        /// How a source with changed-block tracking was read.
                        #[serde(skip_serializing_if = "Option::is_none")]
                        tracking: Option<&'a snapshot::create::Tracking>,
                    }
                    print_json(&Created {
                        record: r,
                        bytes_read: report.bytes_read,
                        tracking: report.tracking.as_ref(),
                    })?;
                } else {
                    outln!("{}", r.id);
                }
                let s = &r.stats;
                let ratio = if s.new_stored_bytes > 0 {
                    s.new_bytes as f64 / s.new_stored_bytes as f64
                } else {
                    1.0
                };
                if let Some(t) = &report.tracking {
                    match (&t.base, &t.full_read_reason) {
                        (Some(base), _) => ctx.summary(format!(
                            "changed-block tracking: read only the {} written since {base}",
                            human_bytes(t.dirty_bytes)
                        )),
                        (None, Some(why)) => {
                            ctx.summary(format!("changed-block tracking: full read: {why}"))
                        }
                        (None, None) => {}
                    }
                }
                ctx.summary(format!(
                    "snapshot {} ({}): read {} in {:.2}s ({}); {} blocks, {} zero, {} new \
                     chunks: {} new data stored as {} ({ratio:.2}x)",
                    r.display_ref(),
                    r.id,
                    human_bytes(report.bytes_read),
                    report.elapsed.as_secs_f64(),
                    throughput(report.bytes_read, report.elapsed),
                    s.blocks,
                    s.zero_blocks,
                    s.new_chunks,
                    human_bytes(s.new_bytes),
                    human_bytes(s.new_stored_bytes),
                ));
            }
            SnapshotCommand::List {
                volume,
                json,
                target,
            } => {
                let in_target = target.clone();
                let snaps = match target {
                    Some(t) => {
                        let rec = crate::target::Targets::new(&node).get(&t)?;
                        let repo = crate::target::open(&rec).await?;
                        crate::target::snapshots(&repo, &volume)
                            .await?
                            .into_iter()
                            .map(|(s, _)| s)
                            .collect()
                    }
                    None => {
                        node.catalog.volume(&volume)?;
                        node.catalog.snapshots(&volume)?
                    }
                };
                if json {
                    return print_json(&snaps);
                }
                // A target keeps no record of what each snapshot added: no NEW column there.
                let new_column = in_target.is_none();
                outln!(
                    "{:<28} {:<20} {:<20} {:>10} {:>10}  LABELS",
                    "NAME",
                    "ID",
                    "CREATED",
                    "SIZE",
                    if new_column { "NEW" } else { "" }
                );
                for s in snaps {
                    outln!(
                        "{:<28} {:<20} {:<20} {:>10} {:>10}  {}",
                        s.name.as_str(),
                        s.id,
                        format_time(s.created_unix_ms),
                        human_bytes(s.size),
                        if new_column {
                            human_bytes(s.stats.new_stored_bytes)
                        } else {
                            String::new()
                        },
                        super::labels_text(&s.labels)
                    );
                }
            }
            SnapshotCommand::Show { snapshot, json } => {
                let rec = node.catalog.resolve(&snapshot)?;
                let zero_pct = if rec.stats.blocks > 0 {
                    100.0 * rec.stats.zero_blocks as f64 / rec.stats.blocks as f64
                } else {
                    0.0
                };
                if json {
                    return print_json(&ShowSnapshot {
                        record: &rec,
                        created: format_time(rec.created_unix_ms),
                        zero_blocks_percent: zero_pct,
                    });
                }
                outln!("snapshot     {}", rec.display_ref());
                outln!("id           {}", rec.id);
                outln!("created      {}", format_time(rec.created_unix_ms));
                outln!(
                    "size         {} ({} bytes)",
                    human_bytes(rec.size),
                    rec.size
                );
                outln!("block size   {}", human_bytes(rec.block_size as u64));
                outln!(
                    "blocks       {} ({} zero, {zero_pct:.1}%)",
                    rec.stats.blocks,
                    rec.stats.zero_blocks
                );
                outln!(
                    "added        {} chunks, {} stored as {}",
                    rec.stats.new_chunks,
                    human_bytes(rec.stats.new_bytes),
                    human_bytes(rec.stats.new_stored_bytes)
                );
                if let Some(p) = rec.parent {
                    outln!("previous     {p}");
                }
                for (k, v) in &rec.labels {
                    outln!(
                        "label        {}={}",
                        super::printable(k),
                        super::printable(v)
                    );
                }
            }
            SnapshotCommand::Diff {
                from,
                to,
                region,
                json,
            } => {
                let a = node.catalog.resolve(&from)?;
                let b = node.catalog.resolve(&to)?;
                let mut ma = snapshot::load_manifest(&node.repo, &a).await?;
                let mut mb = snapshot::load_manifest(&node.repo, &b).await?;
                if let Some(r) = &region {
                    let (ea, eb) = (
                        region::extent_of(&a.display_ref(), &a.regions, r)?,
                        region::extent_of(&b.display_ref(), &b.regions, r)?,
                    );
                    // A last block the region ends inside compares by the region's bytes.
                    let _lock = node.lock_repo_shared().await?;
                    ma = region::local_view(&node, &ma, ea).await?;
                    mb = region::local_view(&node, &mb, eb).await?;
                }
                let d = snapshot::diff(&ma, &mb)?;
                if json {
                    return print_json(&d);
                }
                for r in &d.ranges {
                    // Blocks are numbered from 0; a range names its first and last block.
                    let blocks = if r.blocks == 1 {
                        format!("block {}", r.first_block)
                    } else {
                        format!("blocks {}-{}", r.first_block, r.first_block + r.blocks - 1)
                    };
                    outln!(
                        "changed  offset {:>14}  length {:>12}  {blocks}",
                        r.offset,
                        r.length,
                    );
                }
                ctx.summary(format!(
                    "{} -> {}: {} of {} blocks changed ({}) in {} range(s){}",
                    d.from,
                    d.to,
                    d.changed_blocks,
                    mb.blocks.len(),
                    human_bytes(d.changed_bytes),
                    d.ranges.len(),
                    if d.from_size != d.to_size {
                        format!(
                            "; size {} -> {}",
                            human_bytes(d.from_size),
                            human_bytes(d.to_size)
                        )
                    } else {
                        String::new()
                    }
                ));
            }
            SnapshotCommand::Restore {
                snapshot,
                to,
                force,
                target,
                region,
            } => {
                snapshot::restore::check_destination(&to, force)?;
                // From a target (a new node with only its URL), or from this node's repository,
                // whose lock is held shared so gc cannot remove a pack being read.
                let (repo, unlocked, _repo_lock, from) = match &target {
                    Some(t) => {
                        let rec = crate::target::Targets::new(&node).get(t)?;
                        let (repo, unlocked) = crate::target::open_unlocking(&rec).await?;
                        (repo, Some(unlocked), None, format!(" from target {t}"))
                    }
                    None => {
                        let lock = node.lock_repo_shared().await?;
                        (node.repo.clone(), None, Some(lock), String::new())
                    }
                };
                // The snapshot's manifest and the repository's index, read at once (from a
                // bucket, each is several round trips), while an encrypted target's key is
                // opened: only what needs the key waits for it.
                let unlocked = async {
                    match unlocked {
                        Some(u) => u.await,
                        None => Ok(()),
                    }
                };
                let manifest = async {
                    let rec = match &target {
                        Some(_) => crate::target::resolve(&repo, &snapshot).await?,
                        None => node.catalog.resolve(&snapshot)?,
                    };
                    let m = snapshot::load_manifest(&repo, &rec).await?;
                    Ok::<_, crate::Error>((rec, m))
                };
                let (unlocked, manifest, index) =
                    futures::join!(unlocked, manifest, repo.load_index());
                // A key that did not open says why (a wrong passphrase), not what failed
                // for want of it.
                unlocked?;
                let ((rec, mut m), (mut index, _)) = (manifest?, index?);
                // A target's index was listed while the snapshot was looked for: a push that
                // committed it meanwhile stored its packs and their indexes before, so they
                // are listed when asked again, now. (This node's own repository is held
                // shared, and its catalog names a snapshot only once its packs are indexed.)
                if target.is_some()
                    && m.blocks
                        .data()
                        .any(|(_, id)| !index.chunks.contains_key(&id))
                {
                    index = repo.load_index().await?.0;
                }
                // A region: its blocks alone, the last one cut where the region ends.
                let mut cut_last = false;
                if let Some(r) = &region {
                    let e = region::extent_of(&rec.display_ref(), &rec.regions, r)?;
                    cut_last = e.cut_tail(m.size, m.block_size).is_some();
                    m = region::slice(&m, e, None);
                }
                let pb = ctx.bytes_bar("restore");
                let report =
                    snapshot::restore::restore_cut(&repo, &m, &index, cut_last, &to, force, &pb)
                        .await;
                pb.finish_and_clear();
                let report = report?;
                ctx.summary(format!(
                    "restored {}{}{from} to {}: {} in {:.2}s ({}), {} chunks verified",
                    rec.display_ref(),
                    region.map_or_else(String::new, |r| format!(" (region {r})")),
                    report.path.display(),
                    human_bytes(report.bytes_written),
                    report.elapsed.as_secs_f64(),
                    throughput(report.bytes_written, report.elapsed),
                    report.chunks_verified
                ));
            }
            SnapshotCommand::Label {
                snapshot,
                set,
                remove,
            } => {
                for k in &remove {
                    crate::id::validate_name("label key", k)?;
                }
                if set.is_empty() && remove.is_empty() {
                    anyhow::bail!(crate::Error::invalid(
                        "give KEY=VALUE to set or --remove KEY"
                    ));
                }
                let rec = node.catalog.resolve(&snapshot)?;
                let rec = node.catalog.set_labels(
                    &rec.volume,
                    &rec.id,
                    &set.into_iter().collect(),
                    &remove,
                )?;
                // Policies that lock by label (app-hold) decide again at once.
                refresh_policy_locks(&node, &rec.volume, Phase::Scheduled)?;
                ctx.summary(format!(
                    "{} labels: {}",
                    rec.display_ref(),
                    super::labels_text(&rec.labels)
                ));
            }
            SnapshotCommand::Delete {
                snapshot,
                break_locks,
                yes,
            } => {
                let rec = node.catalog.resolve(&snapshot)?;
                let brk = if break_locks {
                    let locks = node.catalog.locks().locks_on(&rec.volume, &rec.id)?;
                    if !locks.is_empty() && !yes {
                        confirm_break(&rec, &locks)?;
                    }
                    Some(BreakLocks {
                        reason: format!("operator on {}", hostname()),
                    })
                } else {
                    None
                };
                let (removed, broken) = snapshot::delete(&node, &rec, brk.as_ref()).await?;
                for l in &broken {
                    eprintln!("broke lock: {}", l.describe(crate::now_unix_ms()));
                }
                ctx.summary(format!(
                    "deleted {} ({}); run `holdfast gc` to reclaim its space",
                    removed.display_ref(),
                    removed.id
                ));
            }
            SnapshotCommand::Read {
                snapshot,
                hold_as,
                ttl,
            } => read(&node, ctx, &snapshot, &hold_as, ttl).await?,
        }
        Ok(())
    }
}

/// Lets the volume's policies that handle `phase` decide their locks again (a failure keeps
/// that policy's previous locks and is only a warning here).
fn refresh_policy_locks(
    node: &crate::state::Node,
    volume: &VolumeName,
    phase: Phase,
) -> anyhow::Result<()> {
    let policies = registry::Policies::new(node).for_volume(volume)?;
    if !policies.iter().any(|p| p.handles(phase)) {
        return Ok(());
    }
    let engine = PolicyEngine::new()?;
    for d in registry::decide_locks(
        node,
        &engine,
        volume,
        phase,
        registry::Asked::HandlingPhase,
        true,
    )? {
        if let Some(e) = d.error {
            eprintln!("warning: {e} (its previous locks stay in force)");
        }
    }
    Ok(())
}

/// Asks on the terminal before breaking locks; refuses without a terminal.
fn confirm_break(rec: &SnapshotRecord, locks: &[SoftLock]) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(crate::Error::invalid(format!(
            "{} is held by {} lock(s); --break-locks needs --yes when not run on a terminal",
            rec.display_ref(),
            locks.len()
        )));
    }
    let now = crate::now_unix_ms();
    eprintln!("{} is held by:", rec.display_ref());
    for l in locks {
        eprintln!("  - {}", l.describe(now));
    }
    eprint!("break these locks and delete it? type yes: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        anyhow::bail!(crate::Error::conflict("not confirmed; nothing was changed"));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this host".into())
}

/// `snapshot read`: lock, stream, refresh the lease while streaming, release at the end.
async fn read(
    node: &crate::state::Node,
    ctx: &Context,
    r: &SnapshotRef,
    hold_as: &str,
    ttl: std::time::Duration,
) -> anyhow::Result<()> {
    let holder = HolderId::application(hold_as)?;
    let rec = node.catalog.resolve(r)?;
    // gc must not remove a pack while its chunks are being streamed.
    let _repo_lock = node.lock_repo_shared().await?;
    let m = snapshot::load_manifest(&node.repo, &rec).await?;
    let new_lock = || NewLock {
        snapshot: rec.id,
        lock_type: LockType::Application,
        value: hold_as.to_string(),
        lease_ms: Some(ttl.as_millis() as u64),
        path: vec![],
    };
    let locks = node.catalog.locks();
    locks.add(&rec.volume, &holder, new_lock())?;
    let started = std::time::Instant::now();
    let pb = ctx.bytes_bar("read");
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::io::stdout());
    let outcome = {
        let stream = snapshot::read::stream(&node.repo, &m, &mut out, &pb);
        tokio::pin!(stream);
        // Refresh well before the lease runs out, so a long read keeps its lock.
        let mut refresh = tokio::time::interval((ttl / 3).max(std::time::Duration::from_secs(1)));
        refresh.tick().await;
        loop {
            tokio::select! {
                // The stream writes only to stdout and reads the local repository: a broken
                // pipe is its reader going away.
                r = &mut stream => break r.map_err(|e| {
                    if e.io_kind() == Some(std::io::ErrorKind::BrokenPipe) {
                        anyhow::Error::new(super::StdoutClosed)
                    } else {
                        anyhow::Error::from(e)
                    }
                }),
                _ = refresh.tick() => {
                    if let Err(e) = locks.add(&rec.volume, &holder, new_lock()) {
                        tracing::warn!("could not refresh the read lock: {e}");
                    }
                }
                _ = tokio::signal::ctrl_c() => break Err(anyhow::anyhow!("interrupted")),
            }
        }
    };
    pb.finish_and_clear();
    let detail = match &outcome {
        Ok(_) => "snapshot read finished".to_string(),
        Err(e) => format!("snapshot read ended early: {e}"),
    };
    locks.release(&holder, Some(&rec.volume), Some(&rec.id), &detail)?;
    let bytes = outcome?;
    ctx.summary(format!(
        "read {} ({}) in {:.2}s ({}) holding lock {holder}",
        rec.display_ref(),
        human_bytes(bytes),
        started.elapsed().as_secs_f64(),
        throughput(bytes, started.elapsed())
    ));
    Ok(())
}
