//! `holdfast verify`.

use clap::Args;

use super::{Context, human_bytes, print_json, throughput};
use crate::id::VolumeName;
use crate::snapshot;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  holdfast verify --volume db\n  holdfast verify --target bucket"
)]
pub struct VerifyCommand {
    /// Only this volume's snapshots.
    #[arg(long)]
    pub volume: Option<VolumeName>,
    #[arg(long)]
    pub json: bool,
    /// Verify the snapshots inside this mirror target instead.
    #[arg(long)]
    pub target: Option<String>,
}

impl VerifyCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        let pb = ctx.bytes_bar("verify");
        let r = match &self.target {
            Some(t) => {
                let repo = crate::target::Targets::new(&node).open(t).await?;
                crate::target::verify(&repo, &pb).await
            }
            None => snapshot::verify(&node, self.volume.as_ref(), &pb).await,
        };
        pb.finish_and_clear();
        let r = r?;
        // Damage decides the exit code even if stdout was closed while it was listed.
        let printed = (|| -> anyhow::Result<()> {
            if self.json {
                print_json(&r)?;
            } else {
                for n in &r.notes {
                    eprintln!("note: {n}");
                }
                for d in &r.damage {
                    let blocks = summarize_blocks(&d.blocks);
                    outln!(
                        "DAMAGED {} ({}) {}: {}",
                        d.snapshot,
                        d.snapshot_id,
                        if blocks.is_empty() {
                            "manifest".into()
                        } else {
                            format!("blocks {blocks}")
                        },
                        d.problem
                    );
                }
                ctx.summary(format!(
                    "verified {} snapshots, {} chunks ({}) in {:.2}s ({}): {}",
                    r.snapshots,
                    r.chunks,
                    human_bytes(r.stored_bytes),
                    r.elapsed.as_secs_f64(),
                    throughput(r.stored_bytes, r.elapsed),
                    if r.is_clean() {
                        "no damage".to_string()
                    } else {
                        format!("{} damaged snapshot/chunk pairs", r.damage.len())
                    }
                ));
            }
            Ok(())
        })();
        if !r.is_clean() {
            anyhow::bail!(crate::Error::corrupt(format!(
                "verification found damage in {} place(s); the snapshots named above cannot be \
                 restored whole",
                r.damage.len()
            )));
        }
        printed
    }
}

/// `3,7-9,12` for a sorted block list.
fn summarize_blocks(blocks: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i];
        let mut end = start;
        while i + 1 < blocks.len() && blocks[i + 1] == end + 1 {
            i += 1;
            end += 1;
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}
