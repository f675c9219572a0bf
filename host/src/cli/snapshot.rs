//! `holdfast snapshot create|list|show|diff|restore|delete`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;

use super::{Context, format_time, human_bytes, print_json, throughput};
use holdfast::catalog::SnapshotRecord;
use holdfast::id::{SnapshotName, SnapshotRef, VolumeName, parse_label};
use holdfast::snapshot::{self, CreateOptions};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume and print its id.
    Create {
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
    },
    /// List a volume's snapshots, oldest first.
    List {
        volume: VolumeName,
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot.
    Show {
        snapshot: SnapshotRef,
        #[arg(long)]
        json: bool,
    },
    /// The block ranges that differ between two snapshots.
    Diff {
        from: SnapshotRef,
        to: SnapshotRef,
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot's image to a file or block device, verifying every chunk.
    Restore {
        snapshot: SnapshotRef,
        #[arg(long)]
        to: PathBuf,
        /// Overwrite the destination if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Delete a snapshot (its space is reclaimed by `holdfast gc`).
    Delete { snapshot: SnapshotRef },
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
            } => {
                let mut map = BTreeMap::new();
                for (k, v) in labels {
                    if map.insert(k.clone(), v).is_some() {
                        anyhow::bail!(holdfast::Error::invalid(format!(
                            "label {k:?} is given twice"
                        )));
                    }
                }
                let pb = ctx.bytes_bar("snapshot");
                let report =
                    snapshot::create(&node, &volume, CreateOptions { name, labels: map }, &pb)
                        .await;
                pb.finish_and_clear();
                let report = report?;
                let r = &report.record;
                if json {
                    print_json(r)?;
                } else {
                    println!("{}", r.id);
                }
                let s = &r.stats;
                let ratio = if s.new_stored_bytes > 0 {
                    s.new_bytes as f64 / s.new_stored_bytes as f64
                } else {
                    1.0
                };
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
            SnapshotCommand::List { volume, json } => {
                node.catalog.volume(&volume)?;
                let snaps = node.catalog.snapshots(&volume)?;
                if json {
                    return print_json(&snaps);
                }
                println!(
                    "{:<28} {:<20} {:<20} {:>10} {:>10}  LABELS",
                    "NAME", "ID", "CREATED", "SIZE", "NEW"
                );
                for s in snaps {
                    let labels: Vec<String> =
                        s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!(
                        "{:<28} {:<20} {:<20} {:>10} {:>10}  {}",
                        s.name.as_str(),
                        s.id,
                        format_time(s.created_unix_ms),
                        human_bytes(s.size),
                        human_bytes(s.stats.new_stored_bytes),
                        labels.join(",")
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
                println!("snapshot     {}", rec.display_ref());
                println!("id           {}", rec.id);
                println!("created      {}", format_time(rec.created_unix_ms));
                println!(
                    "size         {} ({} bytes)",
                    human_bytes(rec.size),
                    rec.size
                );
                println!("block size   {}", human_bytes(rec.block_size as u64));
                println!(
                    "blocks       {} ({} zero, {zero_pct:.1}%)",
                    rec.stats.blocks, rec.stats.zero_blocks
                );
                println!(
                    "added        {} chunks, {} stored as {}",
                    rec.stats.new_chunks,
                    human_bytes(rec.stats.new_bytes),
                    human_bytes(rec.stats.new_stored_bytes)
                );
                if let Some(p) = rec.parent {
                    println!("previous     {p}");
                }
                for (k, v) in &rec.labels {
                    println!("label        {k}={v}");
                }
            }
            SnapshotCommand::Diff { from, to, json } => {
                let a = node.catalog.resolve(&from)?;
                let b = node.catalog.resolve(&to)?;
                let ma = snapshot::load_manifest(&node.repo, &a).await?;
                let mb = snapshot::load_manifest(&node.repo, &b).await?;
                let d = snapshot::diff(&ma, &mb)?;
                if json {
                    return print_json(&d);
                }
                for r in &d.ranges {
                    println!(
                        "changed  offset {:>14}  length {:>12}  blocks {}..{}",
                        r.offset,
                        r.length,
                        r.first_block,
                        r.first_block + r.blocks
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
            } => {
                let rec = node.catalog.resolve(&snapshot)?;
                let m = snapshot::load_manifest(&node.repo, &rec).await?;
                let pb = ctx.bytes_bar("restore");
                let report = snapshot::restore(&node.repo, &m, &to, force, &pb).await;
                pb.finish_and_clear();
                let report = report?;
                ctx.summary(format!(
                    "restored {} to {}: {} in {:.2}s ({}), {} chunks verified",
                    rec.display_ref(),
                    report.path.display(),
                    human_bytes(report.bytes_written),
                    report.elapsed.as_secs_f64(),
                    throughput(report.bytes_written, report.elapsed),
                    report.chunks_verified
                ));
            }
            SnapshotCommand::Delete { snapshot } => {
                let rec = node.catalog.resolve(&snapshot)?;
                let removed = snapshot::delete(&node, &rec).await?;
                ctx.summary(format!(
                    "deleted {} ({}); run `holdfast gc` to reclaim its space",
                    removed.display_ref(),
                    removed.id
                ));
            }
        }
        Ok(())
    }
}
