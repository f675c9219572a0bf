//! `holdfast prune`.

use std::time::Duration;

use clap::Args;

use super::{Context, print_json};
use crate::id::VolumeName;
use crate::retention::{self, KeepRules};

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  holdfast prune db --keep-last 24 --keep-within 7d --dry-run\n  holdfast prune db --target bucket --keep-last 30"
)]
pub struct PruneCommand {
    /// The volume (as `holdfast volume list` names it)
    pub volume: VolumeName,
    /// Keep the newest N snapshots. Without --keep-last and --keep-within, the volume's
    /// retention policies decide (see `holdfast policy`).
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Keep snapshots younger than this (e.g. 7d, 36h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub keep_within: Option<Duration>,
    /// Say what would be pruned, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Prune inside this mirror target (its lock records are honoured).
    #[arg(long)]
    pub target: Option<String>,
    #[arg(long)]
    pub json: bool,
}

impl PruneCommand {
    fn report_policies(
        &self,
        ctx: &Context,
        r: &retention::PolicyPruneReport,
    ) -> anyhow::Result<()> {
        if self.json {
            return print_json(r);
        }
        for d in &r.lock_decisions {
            if let Some(e) = &d.error {
                eprintln!("warning: {e} (its previous locks stay in force)");
            }
        }
        let verb = if r.dry_run { "would prune" } else { "pruned" };
        for s in &r.pruned {
            outln!("{verb} {s}");
        }
        for (s, holders) in &r.kept_locked {
            let h: Vec<&str> = holders.iter().map(|h| h.as_str()).collect();
            outln!(
                "kept   {s}: every retention policy proposed it, but it is locked by {}",
                h.join(", ")
            );
        }
        ctx.summary(format!(
            "{}: {verb} {} by the agreement of {} retention polic{} ({}); {} kept because of locks",
            r.volume,
            r.pruned.len(),
            r.decision.proposals.len(),
            if r.decision.proposals.len() == 1 {
                "y"
            } else {
                "ies"
            },
            r.decision
                .proposals
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            r.kept_locked.len()
        ));
        Ok(())
    }

    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        let rules = KeepRules {
            keep_last: self.keep_last,
            keep_within: self.keep_within,
        };
        if let Some(t) = &self.target {
            if rules.keep_last.is_none() && rules.keep_within.is_none() {
                anyhow::bail!(crate::Error::invalid(
                    "give --keep-last N and/or --keep-within DURATION for a target (holdfast never \
                     prunes without a rule)"
                ));
            }
            let repo = crate::target::Targets::new(&node).open(t).await?;
            let r = crate::target::prune(&repo, &self.volume, &rules, self.dry_run).await?;
            if self.json {
                return print_json(&r);
            }
            let label = format!("target {t}, {}", self.volume);
            print_outcome(
                ctx,
                &label,
                &r.plan,
                &r.pruned,
                &r.locked_meanwhile,
                r.dry_run,
                &format!("gc --target {t}"),
            )?;
            return Ok(());
        }
        if rules.keep_last.is_none() && rules.keep_within.is_none() {
            // No rule on the command line: the volume's retention policies decide.
            node.catalog.volume(&self.volume)?;
            let has_policies = !crate::policy::registry::Policies::new(&node)
                .for_volume(&self.volume)?
                .is_empty();
            if has_policies {
                let engine = crate::policy::PolicyEngine::new()?;
                if let Some(r) =
                    retention::prune_by_policies(&node, &engine, &self.volume, self.dry_run).await?
                {
                    return self.report_policies(ctx, &r);
                }
            }
            anyhow::bail!(crate::Error::invalid(format!(
                "volume {} has no retention policy; give --keep-last N and/or --keep-within DURATION (holdfast never prunes without a rule)",
                self.volume
            )));
        }
        let r = retention::prune(&node, &self.volume, &rules, self.dry_run).await?;
        if self.json {
            return print_json(&r);
        }
        print_outcome(
            ctx,
            self.volume.as_str(),
            &r.plan,
            &r.pruned,
            &r.locked_meanwhile,
            r.dry_run,
            "gc",
        )
    }
}

/// What a prune did (or would do), one line per snapshot, then a summary.
fn print_outcome(
    ctx: &Context,
    label: &str,
    plan: &retention::PrunePlan,
    pruned: &[String],
    locked_meanwhile: &[String],
    dry_run: bool,
    gc: &str,
) -> anyhow::Result<()> {
    let verb = if dry_run { "would prune" } else { "pruned" };
    for e in plan.to_prune() {
        if dry_run || pruned.contains(&e.snapshot) {
            outln!("{verb} {} ({})", e.snapshot, e.id);
        }
    }
    for e in plan.kept_for_locks() {
        let holders: Vec<&str> = e.locked_by.iter().map(|h| h.as_str()).collect();
        outln!(
            "kept   {} ({}): locked by {}",
            e.snapshot,
            e.id,
            holders.join(", ")
        );
    }
    for s in locked_meanwhile {
        outln!("kept   {s}: a lock was set while pruning");
    }
    let kept = plan.entries.iter().filter(|e| !e.prune).count() + locked_meanwhile.len();
    ctx.summary(format!(
        "{label}: {verb} {}, {kept} kept ({} only because of locks){}",
        if dry_run {
            plan.to_prune().count()
        } else {
            pruned.len()
        },
        plan.kept_for_locks().count() + locked_meanwhile.len(),
        if dry_run {
            String::new()
        } else {
            format!("; run `holdfast {gc}` to reclaim space")
        }
    ));
    Ok(())
}
