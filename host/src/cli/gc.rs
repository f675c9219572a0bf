//! `holdfast gc`.

use clap::Args;

use super::{Context, human_bytes, print_json};
use crate::snapshot;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  holdfast gc --dry-run\n  holdfast gc --target bucket --json")]
pub struct GcCommand {
    /// Say what would be reclaimed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    /// Reclaim space inside this mirror target: deletes the packs an earlier gc condemned at
    /// least the grace period ago (HOLDFAST_TARGET_GRACE, 1h) that are still unreferenced,
    /// and condemns what is unreferenced now. Runs beside pushes and other gcs.
    #[arg(long)]
    pub target: Option<String>,
}

impl GcCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        if let Some(t) = &self.target {
            let repo = crate::target::Targets::new(&node).open(t).await?;
            let r = crate::target::gc(&repo, &node.info.node_id, self.dry_run).await?;
            if self.json {
                return print_json(&r);
            }
            let (did, will) = if r.dry_run {
                ("would be ", "would be ")
            } else {
                ("", "")
            };
            ctx.summary(format!(
                "gc of target {t}{}: {} snapshots, {} live chunks; {} packs {did}deleted ({}), \
                 {} packs {will}condemned ({}), {} partly live packs kept",
                if r.dry_run { " (dry run)" } else { "" },
                r.snapshots,
                r.live_chunks,
                r.packs_deleted,
                human_bytes(r.bytes_freed),
                r.packs_condemned,
                human_bytes(r.bytes_condemned),
                r.packs_kept_partly_live
            ));
            if let Some(at) = r.next_deletion_unix_ms.filter(|_| r.packs_waiting > 0) {
                eprintln!(
                    "note: {} condemned packs ({}) wait out the grace period ({}); a gc after {} \
                     (the store's clock) deletes those still unreferenced",
                    r.packs_waiting,
                    human_bytes(r.bytes_waiting),
                    humantime::format_duration(std::time::Duration::from_secs(r.grace_seconds)),
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(at)
                    )
                );
            }
            if r.packs_too_young > 0 {
                eprintln!(
                    "note: {} unreferenced packs are younger than the grace period; a later gc \
                     condemns them",
                    r.packs_too_young
                );
            }
            if r.packs_unreadable > 0 {
                eprintln!(
                    "warning: {} packs in target {t} have neither a readable index nor a \
                     readable trailer: gc keeps them, as it cannot tell what they hold. Run \
                     `holdfast verify --target {t}` to see which snapshots they damage",
                    r.packs_unreadable
                );
            }
            for p in &r.pending_pushes {
                eprintln!(
                    "note: unfinished push of {}@{} by node {} ({}s ago); its chunks are kept \
                     (`holdfast target check {t}`)",
                    p.volume, p.snapshot, p.node, p.age_seconds
                );
            }
            return Ok(());
        }
        let pb = ctx.count_bar("gc");
        let r = snapshot::gc(&node, self.dry_run, &pb).await;
        pb.finish_and_clear();
        let r = r?;
        if self.json {
            return print_json(&r);
        }
        for n in &r.notes {
            eprintln!("note: {n}");
        }
        ctx.summary(format!(
            "gc{}: {} snapshots, {} live chunks; {} packs deleted, {} repacked into {}, {} \
             orphan manifests, {} stale indexes; {} {} in {:.2}s",
            if r.dry_run { " (dry run)" } else { "" },
            r.snapshots,
            r.live_chunks,
            r.packs_deleted,
            r.packs_repacked,
            r.packs_written,
            r.orphan_manifests_deleted,
            r.stale_indexes_deleted,
            human_bytes(r.bytes_freed),
            if r.dry_run { "would be freed" } else { "freed" },
            r.elapsed.as_secs_f64()
        ));
        Ok(())
    }
}
