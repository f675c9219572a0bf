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
}

impl GcCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
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
