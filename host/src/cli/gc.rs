//! `holdfast gc`.

use clap::Args;

use super::{Context, human_bytes, print_json};
use holdfast::snapshot;

#[derive(Debug, Args)]
pub struct GcCommand {
    /// Say what would be reclaimed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    /// Reclaim space inside this mirror target (waits for no push; see host/TARGETS.md).
    #[arg(long)]
    pub target: Option<String>,
}

impl GcCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        if let Some(t) = &self.target {
            let repo = holdfast::target::Targets::new(&node).open(t).await?;
            let r = holdfast::target::gc(&repo, &node.info.node_id, self.dry_run).await?;
            if self.json {
                return print_json(&r);
            }
            ctx.summary(format!(
                "gc of target {t}{}: {} snapshots, {} live chunks; {} packs deleted ({}), {} partly live packs kept",
                if r.dry_run { " (dry run)" } else { "" },
                r.snapshots,
                r.live_chunks,
                r.packs_deleted,
                human_bytes(r.bytes_freed),
                r.packs_kept_partly_live
            ));
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
