//! gfs-retention: grandfather-father-son retention, like sanoid's or Proxmox Backup Server's
//! prune options. Keeps the newest `keep-last` snapshots, then the newest snapshot of each of
//! the last `hourly` hours, `daily` days, `weekly` ISO weeks, `monthly` months and `yearly`
//! years that have snapshots (UTC). Each rule only looks at snapshots older than those kept
//! by the rules before it, and a period already covered counts as covered (PBS semantics).
//! Everything not kept is proposed for pruning; the host still never prunes a locked one.
//!
//! Config (all optional, default 0): keep-last, hourly, daily, weekly, monthly, yearly.
//!
//! Built against holdfast:policy@0.2.0 (through the holdfast-policy crate): it asks the view
//! for the local snapshots as fixed-size records (id and creation time), nothing else. Its
//! JavaScript twin is `plugins/gfs-retention-js`.

use std::collections::HashSet;

use holdfast_policy::calendar::Period;
use holdfast_policy::{Description, NodeView, Phase, Policy, PruneProposal, config};

struct Gfs;

const RULES: [(&str, Period); 5] = [
    ("hourly", Period::Hour),
    ("daily", Period::Day),
    ("weekly", Period::Week),
    ("monthly", Period::Month),
    ("yearly", Period::Year),
];

impl Policy for Gfs {
    fn describe() -> Description {
        holdfast_policy::description!(&[Phase::Retention])
    }

    fn plan_retention(view: &NodeView) -> Result<Vec<PruneProposal>, String> {
        let keep_last = config::count("keep-last", 0)?;
        let mut rules = Vec::new();
        for (name, period) in RULES {
            rules.push((name, period, config::count(name, 0)?));
        }
        if keep_last == 0 && rules.iter().all(|(_, _, n)| *n == 0) {
            return Err(
                "no retention configured: set keep-last, hourly, daily, weekly, monthly or yearly"
                    .into(),
            );
        }
        let snaps = view.newest_first();
        let mut keep = vec![false; snaps.len()];
        keep.iter_mut().take(keep_last).for_each(|k| *k = true);
        for &(_, period, n) in rules.iter().filter(|(_, _, n)| *n > 0) {
            let mut covered = HashSet::new();
            let mut kept = 0;
            for (i, s) in snaps.iter().enumerate() {
                let p = period.of(s.created_unix_ms);
                if keep[i] {
                    covered.insert(p);
                } else if kept < n && covered.insert(p) {
                    keep[i] = true;
                    kept += 1;
                }
            }
        }
        let reason = format!(
            "not kept by keep-last={keep_last}{}",
            rules
                .iter()
                .filter(|(_, _, n)| *n > 0)
                .map(|(r, _, n)| format!(", {r}={n}"))
                .collect::<String>()
        );
        Ok(snaps
            .iter()
            .zip(keep)
            .filter(|(_, k)| !k)
            .map(|(s, _)| PruneProposal::new(s.id, reason.clone()))
            .collect())
    }
}

holdfast_policy::export!(Gfs);
