//! `holdfast policy add|list|show|remove|test|simulate`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde::Serialize;

use super::{Context, format_time, human_bytes, print_json};
use crate::id::{VolumeName, parse_label};
use crate::policy::registry::{self, Policies, PolicyRecord};
use crate::policy::{Limits, Phase, PolicyEngine};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Register a policy component for one or more volumes.
    #[command(
        after_help = "Examples:\n  holdfast policy add gfs --wasm gfs_retention.wasm --volume db --config keep-last=7 --config daily=14"
    )]
    Add {
        /// Its name (letters, digits, `_ - : . +`)
        name: String,
        /// The component (.wasm) built for wasm32-wasip2 against wit/since_v0.2.0 (or 0.1.0).
        #[arg(long)]
        wasm: PathBuf,
        /// A volume the policy decides for; repeatable.
        #[arg(long = "volume", required = true)]
        volumes: Vec<VolumeName>,
        /// Configuration KEY=VALUE handed to the policy; repeatable.
        #[arg(long = "config", value_parser = parse_config)]
        config: Vec<(String, String)>,
        /// Deadline of one call.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Memory cap of one call.
        #[arg(long, default_value = "64MiB")]
        memory: bytesize::ByteSize,
    },
    /// List registered policies, with their failure counts.
    List {
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Show one policy.
    Show {
        /// Its name (letters, digits, `_ - : . +`)
        name: String,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Unregister a policy and release its locks.
    Remove { name: String },
    /// Dry run on this node's real data: the locks and prunes the policy would produce.
    #[command(after_help = "Examples:\n  holdfast policy test gfs --volume db")]
    Test {
        /// Its name (letters, digits, `_ - : . +`)
        name: String,
        #[arg(long)]
        /// The volume (as `holdfast volume list` names it)
        volume: VolumeName,
        /// The phase to simulate (default: retention for retention policies, else scheduled).
        #[arg(long)]
        phase: Option<Phase>,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// What the policies will keep, lock and prune over weeks of snapshots, day by day, on a
    /// simulated timeline (downstream outages, application holds): touches no data.
    #[command(after_help = "Examples:\n  \
        holdfast policy simulate --volume db --every 1h --days 60\n  \
        holdfast policy simulate --wasm gfs_retention.wasm --config keep-last=3 --config daily=7 \\\n      \
            --config weekly=4 --config monthly=6 --every 1d --days 400 --plot gfs.svg\n  \
        holdfast policy simulate --volume db --downstream c --outage c:3d@day10 \\\n      \
            --label backup=pending --relabel-after 6h --relabel backup=done\n\n\
        The policies run for real, in a scratch node with a simulated clock: the same code as \
        `snapshot create`, `snapshot label`, a downstream's lock set and the daemon's retention \
        job, step by step, from an empty volume (the node's own snapshots are not part of it). \
        STORED and PINNED are estimates from --size and --change.")]
    Simulate(super::simulate::SimulateArgs),
}

fn parse_config(s: &str) -> Result<(String, String), String> {
    parse_label(s).map_err(|e| e.to_string().replace("label", "config"))
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Shown<'a> {
    #[serde(flatten)]
    record: &'a PolicyRecord,
    holder: String,
    failures: Option<&'a registry::FailureCount>,
}

impl PolicyCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        // It needs no node for component files: it makes its own.
        let this = match self {
            PolicyCommand::Simulate(args) => return super::simulate::run(args, ctx).await,
            other => other,
        };
        let node = ctx.open().await?;
        let policies = Policies::new(&node);
        match this {
            PolicyCommand::Simulate(_) => unreachable!("handled above"),
            PolicyCommand::Add {
                name,
                wasm,
                volumes,
                config,
                timeout,
                memory,
            } => {
                let bytes = std::fs::read(&wasm)
                    .map_err(|e| crate::Error::io(format!("reading {}", wasm.display()), e))?;
                let mut cfg = BTreeMap::new();
                for (k, v) in config {
                    cfg.insert(k, v);
                }
                let engine = PolicyEngine::new()?;
                let started = std::time::Instant::now();
                let rec = policies.add(
                    &engine,
                    &name,
                    &bytes,
                    volumes,
                    cfg,
                    Limits {
                        timeout_ms: timeout.as_millis() as u64,
                        memory_bytes: memory.as_u64(),
                    },
                )?;
                ctx.summary(format!(
                    "registered policy {} ({} {}, phases {}) for {}; compiled in {:.2}s",
                    rec.name,
                    rec.description.name,
                    rec.description.version,
                    phases(&rec),
                    rec.volumes
                        .iter()
                        .map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    started.elapsed().as_secs_f64()
                ));
            }
            PolicyCommand::List { json } => {
                let list = policies.list()?;
                let failures = policies.failures()?;
                if json {
                    let shown: Vec<Shown> = list
                        .iter()
                        .map(|r| Shown {
                            record: r,
                            holder: r.holder().to_string(),
                            failures: failures.get(&r.name),
                        })
                        .collect();
                    return print_json(&shown);
                }
                outln!(
                    "{:<20} {:<24} {:<26} {:<44} {:<20} {:>8}",
                    "NAME",
                    "POLICY",
                    "WIT",
                    "PHASES",
                    "VOLUMES",
                    "FAILURES"
                );
                for r in &list {
                    outln!(
                        "{:<20} {:<24} {:<26} {:<44} {:<20} {:>8}",
                        r.name,
                        format!("{} {}", r.description.name, r.description.version),
                        r.world,
                        phases(r),
                        r.volumes
                            .iter()
                            .map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                        failures.get(&r.name).map_or(0, |f| f.count)
                    );
                }
            }
            PolicyCommand::Show { name, json } => {
                let r = policies.require(&name)?;
                let failures = policies.failures()?;
                let f = failures.get(&r.name);
                if json {
                    return print_json(&Shown {
                        record: &r,
                        holder: r.holder().to_string(),
                        failures: f,
                    });
                }
                outln!("policy       {}", r.name);
                outln!(
                    "implements   {} {} ({})",
                    r.description.name,
                    r.description.version,
                    r.world
                );
                outln!("phases       {}", phases(&r));
                outln!(
                    "volumes      {}",
                    r.volumes
                        .iter()
                        .map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                outln!(
                    "component    {} ({})",
                    r.component,
                    human_bytes(r.component_bytes)
                );
                outln!(
                    "limits       {} ms, {}",
                    r.limits.timeout_ms,
                    human_bytes(r.limits.memory_bytes)
                );
                outln!("locks held   as {}", r.holder());
                for (k, v) in &r.config {
                    outln!("config       {k}={v}");
                }
                outln!("added        {}", format_time(r.added_unix_ms));
                match f {
                    Some(f) => outln!(
                        "failures     {} (last {}: {})",
                        f.count,
                        format_time(f.last_unix_ms),
                        f.last_error
                    ),
                    None => outln!("failures     0"),
                }
            }
            PolicyCommand::Remove { name } => {
                let r = policies.remove(&name)?;
                ctx.summary(format!("removed policy {} and released its locks", r.name));
            }
            PolicyCommand::Test {
                name,
                volume,
                phase,
                json,
            } => {
                let r = policies.require(&name)?;
                if !r.volumes.contains(&volume) {
                    anyhow::bail!(crate::Error::invalid(format!(
                        "policy {name} is not registered for volume {volume}"
                    )));
                }
                let phase = phase.unwrap_or(if r.handles(Phase::Retention) {
                    Phase::Retention
                } else {
                    Phase::Scheduled
                });
                let engine = PolicyEngine::new()?;
                // For a retention plan, every policy of the volume decides its locks first, as
                // on a real prune (their locks hold snapshots in the plan below); this one's
                // decisions are the ones shown.
                let asked = if phase == Phase::Retention {
                    registry::Asked::Every
                } else {
                    registry::Asked::Only(&name)
                };
                let all_locks =
                    registry::decide_locks(&node, &engine, &volume, phase, asked, false)?;
                let locks: Vec<registry::LockDecision> = all_locks
                    .iter()
                    .filter(|d| d.policy == name)
                    .cloned()
                    .collect();
                let retention = if r.handles(Phase::Retention) {
                    Some(registry::plan_retention(
                        &node,
                        &engine,
                        &volume,
                        Some(&name),
                        false,
                    ))
                } else {
                    None
                };
                // What a real run would plan against: the locks the policy is about to set
                // included (the same as `prune --dry-run` and the real prune).
                let locked = crate::retention::locks_after(&node, &volume, &all_locks, false)?;
                let failed =
                    locks.iter().any(|d| d.error.is_some()) || matches!(retention, Some(Err(_)));
                let names: std::collections::HashMap<_, _> = node
                    .catalog
                    .snapshots(&volume)?
                    .into_iter()
                    .map(|s| (s.id, s.display_ref()))
                    .collect();
                if json {
                    #[derive(Serialize)]
                    #[serde(rename_all = "kebab-case")]
                    struct TestReport<'a> {
                        phase: Phase,
                        locks: &'a [registry::LockDecision],
                        retention: Option<Result<Option<&'a registry::RetentionDecision>, String>>,
                    }
                    let retention = retention.as_ref().map(|r| match r {
                        Ok(d) => Ok(d.as_ref()),
                        Err(e) => Err(e.to_string()),
                    });
                    print_json(&TestReport {
                        phase,
                        locks: &locks,
                        retention,
                    })?;
                    if failed {
                        anyhow::bail!(crate::Error::Policy(format!(
                            "policy {name} failed on volume {volume} (see the report)"
                        )));
                    }
                    return Ok(());
                }
                outln!(
                    "dry run of policy {name} on volume {volume}, phase {phase}; nothing is changed"
                );
                for d in &locks {
                    if let Some(e) = &d.error {
                        outln!("locks: FAILED: {e}");
                        outln!("       (on a real run the policy's previous locks stay in force)");
                    } else if d.locks.is_empty() {
                        outln!("locks: none");
                    }
                    for (snap, t, v) in &d.locks {
                        let n = names.get(snap).cloned().unwrap_or_else(|| snap.to_string());
                        outln!("lock   {n}  {t} {v:?}");
                    }
                }
                match retention {
                    None => outln!("prune: not a retention policy"),
                    Some(Err(e)) => {
                        outln!("prune: FAILED: {e}");
                    }
                    Some(Ok(None)) => {}
                    Some(Ok(Some(d))) => {
                        let props = d.proposals.get(&name).cloned().unwrap_or_default();
                        if props.is_empty() {
                            outln!("prune: nothing");
                        }
                        for p in props {
                            let n = names
                                .get(&p.snapshot)
                                .cloned()
                                .unwrap_or_else(|| p.snapshot.to_string());
                            match locked.get(&p.snapshot) {
                                Some(h) => outln!(
                                    "keep   {n}  (proposed: {}; refused: locked by {})",
                                    p.reason,
                                    h.iter().map(|h| h.as_str()).collect::<Vec<_>>().join(", ")
                                ),
                                None => outln!("prune  {n}  ({})", p.reason),
                            }
                        }
                    }
                }
                if failed {
                    anyhow::bail!(crate::Error::Policy(format!(
                        "policy {name} failed on volume {volume} (see above); a real run would \
                         keep its previous locks and prune nothing"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn phases(r: &PolicyRecord) -> String {
    r.description
        .phases
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
