//! `holdfast demo`: the main job end to end on a scratch directory, no server needed.

use std::path::PathBuf;

use clap::Args;

use super::Context;
use super::snapshot::SnapshotCommand;
use super::verify::VerifyCommand;
use crate::sample;
use crate::state::Node;

const MARKER: &str = ".holdfast-demo";

#[derive(Debug, Args)]
pub struct DemoCommand {
    /// Scratch directory for the demo (recreated on every run).
    #[arg(long, default_value = "holdfast-demo")]
    pub dir: PathBuf,
    /// Size of the sample volume in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
}

impl DemoCommand {
    pub async fn run(self, outer: &Context) -> anyhow::Result<()> {
        let dir = &self.dir;
        if dir.exists() {
            if !dir.join(MARKER).exists() {
                anyhow::bail!(crate::Error::conflict(format!(
                    "{} exists and was not made by `holdfast demo`; pass another --dir",
                    dir.display()
                )));
            }
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(MARKER), b"made by holdfast demo; safe to delete\n")?;
        let state = dir.join("state");
        let image = dir.join("sample.img");
        let restored = dir.join("restored.img");
        let ctx = Context {
            state: state.clone(),
            quiet: outer.quiet,
        };
        let say = |s: &str| {
            if !outer.quiet {
                eprintln!("\n== {s}");
            }
        };

        say(&format!("initialising a node in {}", state.display()));
        let node = Node::init(&state, Some("demo".parse()?)).await?;
        drop(node);

        say(&format!(
            "writing a {} MiB sample volume (a third zeros, a quarter random, the rest text and tables)",
            self.size_mib
        ));
        sample::write_mixed_image(&image, self.size_mib << 20, 64 << 10, 1)?;
        let node = ctx.open().await?;
        node.catalog
            .add_volume(&crate::catalog::VolumeRecord::image(
                "demo".parse()?,
                std::fs::canonicalize(&image)?,
                64 << 10,
            ))?;
        drop(node);

        say("first snapshot (everything is new)");
        create(&ctx, "first").await?;

        say("rewriting 2% of the blocks at random offsets");
        let changed = sample::rewrite_blocks(&image, 64 << 10, 0.02, 2)?;
        if !outer.quiet {
            eprintln!("rewrote {} blocks", changed.len());
        }

        say("second snapshot (only the changed blocks are stored)");
        create(&ctx, "second").await?;

        say("what changed between them");
        SnapshotCommand::Diff {
            from: "demo@first".parse()?,
            to: "demo@second".parse()?,
            region: None,
            json: false,
        }
        .run(&ctx)
        .await?;

        say("restoring the second snapshot");
        SnapshotCommand::Restore {
            snapshot: "demo@second".parse()?,
            to: restored.clone(),
            force: false,
            target: None,
            region: None,
        }
        .run(&ctx)
        .await?;
        let same = hash_file(&image)? == hash_file(&restored)?;
        if !same {
            anyhow::bail!(crate::Error::corrupt(
                "the restored image differs from the volume; please report this"
            ));
        }
        if !outer.quiet {
            eprintln!("restored image is bit-identical to the volume");
        }

        say("verifying every stored chunk");
        VerifyCommand {
            volume: None,
            json: false,
            target: None,
        }
        .run(&ctx)
        .await?;

        if !outer.quiet {
            eprintln!(
                "\nDone. Explore it yourself:\n  export HOLDFAST_STATE={}\n  holdfast snapshot list demo\n  holdfast snapshot show demo@second\n  holdfast snapshot diff demo@first demo@second --json",
                state.display()
            );
        }
        Ok(())
    }
}

async fn create(ctx: &Context, name: &str) -> anyhow::Result<()> {
    SnapshotCommand::Create {
        volume: "demo".parse()?,
        name: Some(name.parse()?),
        labels: vec![("made-by".into(), "demo".into())],
        json: false,
        before: None,
        frozen: None,
        after: None,
        full_read: false,
    }
    .run(ctx)
    .await
}

fn hash_file(path: &std::path::Path) -> anyhow::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize())
}
