//! `holdfast mirror`: run one update now, list the relations.

use clap::Subcommand;

use super::daemon::ConfigArg;
use super::{Context, human_bytes, print_json, throughput};
use crate::id::VolumeName;

enum Kind {
    Push,
    Other,
}

#[derive(Debug, Subcommand)]
pub enum MirrorCommand {
    /// Pull one update of VOLUME from its upstream now (locks before and after, as the daemon does).
    #[command(after_help = "Examples:\n  holdfast mirror run db --config /etc/holdfast/node.toml")]
    Run {
        /// The volume (as `holdfast volume list` names it)
        volume: VolumeName,
        #[command(flatten)]
        config: ConfigArg,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Push the volume's new snapshots to a mirror target (a directory or a bucket); the
    /// node keeps a destination-path lock on the target's base.
    #[command(after_help = "Examples:\n  holdfast mirror push db --target bucket")]
    Push {
        /// The volume (as `holdfast volume list` names it)
        volume: VolumeName,
        /// The target (as `holdfast target list` names it)
        #[arg(long)]
        target: String,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Copy a target's snapshots of the volume into this node (seed a new node from a bucket;
    /// normal mirroring from an upstream continues incrementally afterwards).
    #[command(after_help = "Examples:\n  holdfast mirror pull db --target bucket")]
    Pull {
        /// The volume (as `holdfast volume list` names it)
        volume: VolumeName,
        /// The target (as `holdfast target list` names it)
        #[arg(long)]
        target: String,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// The configured mirror relations and the state of each replica.
    #[command(after_help = "Examples:\n  holdfast mirror list --config /etc/holdfast/node.toml")]
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
}

impl MirrorCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let self_kind = match &self {
            MirrorCommand::Push { .. } => Kind::Push,
            _ => Kind::Other,
        };
        match self {
            MirrorCommand::Run {
                volume,
                config,
                json,
            } => {
                let (cfg, node) = config.open(ctx).await?;
                let engine = crate::policy::PolicyEngine::new()?;
                let pb = ctx.count_bar("chunks");
                // SIGINT or SIGTERM: stop at the next safe point, keeping the chunks fetched
                // so far (the next run does not fetch them again); a second one ends at once.
                crate::shutdown::on_signals()?;
                // A step that does not reach a safe point soon (an upstream that stopped
                // answering in the middle of a request) is cut where it is, as a kill would
                // cut it: every step is safe to cut.
                let cut = async {
                    crate::shutdown::wait().await;
                    tokio::time::sleep(crate::daemon::SAFE_POINT_WAIT).await;
                };
                let r = tokio::select! {
                    r = crate::mirror::run(&node, &cfg, &volume, Some(&engine), &pb) => r,
                    () = cut => Err(crate::Error::unavailable_msg(format!(
                        "the update of {volume} was interrupted (the process was asked to stop) \
                         and reached no safe point within {}s; it was cut where it was, which \
                         loses nothing committed, and the next update goes on from there",
                        crate::daemon::SAFE_POINT_WAIT.as_secs()
                    ))),
                };
                pb.finish_and_clear();
                let r = r?;
                if json {
                    return print_json(&r);
                }
                for s in &r.received {
                    outln!("received {s}");
                }
                for s in &r.deleted {
                    outln!("deleted  {s} (gone upstream)");
                }
                for s in &r.kept_locked {
                    outln!("kept     {s} (gone upstream, locked here)");
                }
                ctx.summary(format!(
                    "{volume} <- {}: {}{}, {} snapshot(s), {} chunks, {} on the wire (manifests {}) ({} plain) in {:.2}s ({}); locks sent {} before, {} after",
                    r.upstream,
                    r.kind,
                    r.base.as_ref().map_or(String::new(), |b| format!(" from {b}")),
                    r.received.len(),
                    r.chunks_fetched,
                    human_bytes(r.bytes_fetched),
                    human_bytes(r.manifest_bytes_fetched),
                    human_bytes(r.plain_bytes_fetched),
                    r.seconds,
                    throughput(r.bytes_fetched, std::time::Duration::from_secs_f64(r.seconds)),
                    r.locks_sent_before,
                    r.locks_sent_after
                ));
                Ok(())
            }
            MirrorCommand::Push {
                volume,
                target,
                json,
            }
            | MirrorCommand::Pull {
                volume,
                target,
                json,
            } => {
                let pushing = matches!(self_kind, Kind::Push);
                let node = ctx.open().await?;
                let rec = crate::target::Targets::new(&node).get(&target)?;
                let pb = ctx.count_bar("chunks");
                let r = if pushing {
                    crate::target::push(&node, &rec, &volume, &pb).await
                } else {
                    crate::target::pull(&node, &rec, &volume, &pb).await
                };
                pb.finish_and_clear();
                let r = r?;
                if json {
                    return print_json(&r);
                }
                for s in &r.transferred {
                    outln!("{} {s}", if pushing { "pushed" } else { "pulled" });
                }
                ctx.summary(format!(
                    "{volume} {} {}: {}{}, {} snapshot(s), {} chunks, {} ({} stored) in {:.2}s ({})",
                    if pushing { "->" } else { "<-" },
                    r.target,
                    r.kind,
                    r.base.as_ref().map_or(String::new(), |b| format!(" from {b}")),
                    r.transferred.len(),
                    r.chunks,
                    human_bytes(r.plain_bytes),
                    human_bytes(r.stored_bytes),
                    r.seconds,
                    throughput(r.stored_bytes, std::time::Duration::from_secs_f64(r.seconds))
                ));
                Ok(())
            }
            MirrorCommand::List { config, json } => {
                let (cfg, node) = config.open(ctx).await?;
                let mut rows = Vec::new();
                for m in &cfg.mirror {
                    let snaps = node.catalog.snapshots(&m.volume).unwrap_or_default();
                    let up = cfg.upstream(&m.upstream)?;
                    rows.push(serde_json::json!({
                        "volume": m.volume,
                        "upstream": m.upstream,
                        "url": up.url,
                        "schedule": m.when.schedule("mirror")?.to_string(),
                        "snapshots": snaps.len(),
                        "newest": snaps.last().map(|s| s.display_ref()),
                    }));
                }
                if json {
                    return print_json(&rows);
                }
                outln!(
                    "{:<20} {:<16} {:<28} {:>9}  NEWEST",
                    "VOLUME",
                    "UPSTREAM",
                    "SCHEDULE",
                    "SNAPSHOTS"
                );
                for r in rows {
                    outln!(
                        "{:<20} {:<16} {:<28} {:>9}  {}",
                        r["volume"].as_str().unwrap_or(""),
                        r["upstream"].as_str().unwrap_or(""),
                        r["schedule"].as_str().unwrap_or(""),
                        r["snapshots"],
                        r["newest"].as_str().unwrap_or("-")
                    );
                }
                Ok(())
            }
        }
    }
}
