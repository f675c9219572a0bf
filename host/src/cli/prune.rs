//! `holdfast prune`.

use std::time::Duration;

use clap::Args;

use super::{Context, print_json};
use holdfast::id::VolumeName;
use holdfast::retention::{self, KeepRules};

#[derive(Debug, Args)]
pub struct PruneCommand {
    pub volume: VolumeName,
    /// Keep the newest N snapshots.
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Keep snapshots younger than this (e.g. 7d, 36h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub keep_within: Option<Duration>,
    /// Say what would be pruned, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

impl PruneCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        let rules = KeepRules {
            keep_last: self.keep_last,
            keep_within: self.keep_within,
        };
        let r = retention::prune(&node, &self.volume, &rules, self.dry_run).await?;
        if self.json {
            return print_json(&r);
        }
        let verb = if r.dry_run { "would prune" } else { "pruned" };
        for e in r.plan.to_prune() {
            if r.dry_run || r.pruned.contains(&e.snapshot) {
                println!("{verb} {} ({})", e.snapshot, e.id);
            }
        }
        for e in r.plan.kept_for_locks() {
            let holders: Vec<&str> = e.locked_by.iter().map(|h| h.as_str()).collect();
            println!(
                "kept   {} ({}): locked by {}",
                e.snapshot,
                e.id,
                holders.join(", ")
            );
        }
        for s in &r.locked_meanwhile {
            println!("kept   {s}: a lock was set while pruning");
        }
        let kept = r.plan.entries.iter().filter(|e| !e.prune).count() + r.locked_meanwhile.len();
        ctx.summary(format!(
            "{}: {} {}, {} kept ({} only because of locks){}",
            self.volume,
            verb,
            if r.dry_run {
                r.plan.to_prune().count()
            } else {
                r.pruned.len()
            },
            kept,
            r.plan.kept_for_locks().count() + r.locked_meanwhile.len(),
            if r.dry_run {
                ""
            } else {
                "; run `holdfast gc` to reclaim space"
            }
        ));
        Ok(())
    }
}
