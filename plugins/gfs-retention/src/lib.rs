//! gfs-retention: grandfather-father-son retention, like sanoid's or Proxmox Backup Server's
//! prune options. Keeps the newest `keep-last` snapshots, then the newest snapshot of each of
//! the last `hourly` hours, `daily` days, `weekly` ISO weeks, `monthly` months and `yearly`
//! years that have snapshots (UTC). Each rule only looks at snapshots older than those kept
//! by the rules before it, and a period already covered counts as covered (PBS semantics).
//! Everything not kept is proposed for pruning; the host still never prunes a locked one.
//!
//! Config (all optional, default 0): keep-last, hourly, daily, weekly, monthly, yearly.
//!
//! Built against holdfast:policy@0.2.0: it asks the view for the local snapshots as
//! fixed-size records (id and creation time), nothing else.

wit_bindgen::generate!({ world: "policy", path: "../../wit/since_v0.2.0" });

use holdfast::policy::config;
use holdfast::policy::types::Phase;

struct Gfs;

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

/// (year, month) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn year_month(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// The period a snapshot falls into for each rule.
fn period(rule: &str, ms: u64) -> i64 {
    let days = (ms / DAY) as i64;
    match rule {
        "hourly" => (ms / HOUR) as i64,
        "daily" => days,
        // 1970-01-01 was a Thursday; +3 makes weeks start on Monday (ISO).
        "weekly" => (days + 3).div_euclid(7),
        "monthly" => {
            let (y, m) = year_month(days);
            y * 12 + m as i64
        }
        _ => year_month(days).0,
    }
}

fn count(key: &str) -> Result<usize, String> {
    match config::get(key) {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| format!("config {key}={v:?} is not a count")),
    }
}

impl Guest for Gfs {
    fn describe() -> Description {
        Description {
            name: "gfs-retention".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            phases: vec![Phase::Retention],
        }
    }

    fn decide_locks(_view: &NodeView) -> Result<Vec<LockRequest>, String> {
        Ok(Vec::new())
    }

    fn plan_retention(view: &NodeView) -> Result<Vec<PruneProposal>, String> {
        let keep_last = count("keep-last")?;
        let rules = [
            ("hourly", count("hourly")?),
            ("daily", count("daily")?),
            ("weekly", count("weekly")?),
            ("monthly", count("monthly")?),
            ("yearly", count("yearly")?),
        ];
        if keep_last == 0 && rules.iter().all(|(_, n)| *n == 0) {
            return Err(
                "no retention configured: set keep-last, hourly, daily, weekly, monthly or yearly"
                    .into(),
            );
        }
        // Newest first.
        let mut snaps = view.local_snapshots();
        snaps.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        let mut keep: Vec<Option<&str>> = vec![None; snaps.len()];
        for k in keep.iter_mut().take(keep_last) {
            *k = Some("keep-last");
        }
        for (rule, n) in rules {
            if n == 0 {
                continue;
            }
            let mut covered = std::collections::HashSet::new();
            let mut kept = 0;
            for (i, s) in snaps.iter().enumerate() {
                let p = period(rule, s.created_unix_ms);
                if keep[i].is_some() {
                    covered.insert(p);
                    continue;
                }
                if kept < n && covered.insert(p) {
                    keep[i] = Some(rule);
                    kept += 1;
                }
            }
        }
        let summary = format!(
            "not kept by keep-last={keep_last}{}",
            rules
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!(", {r}={n}"))
                .collect::<String>()
        );
        Ok(snaps
            .iter()
            .zip(keep)
            .filter(|(_, k)| k.is_none())
            .map(|(s, _)| PruneProposal {
                snapshot: s.id,
                reason: summary.clone(),
            })
            .collect())
    }
}

export!(Gfs);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_periods_are_right_at_the_edges() {
        // 2024-02-29 (leap day), 2024-12-30 (ISO week 1 of 2025 starts Monday 2024-12-30).
        assert_eq!(year_month(19_782), (2024, 2));
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(
            period("weekly", 20_087 * DAY),
            period("weekly", 20_089 * DAY)
        );
        assert_ne!(
            period("weekly", 20_086 * DAY),
            period("weekly", 20_087 * DAY)
        );
    }
}
