//! `holdfast sample`: deterministic sample images, to try holdfast out and for benchmarks.

use std::path::PathBuf;

use clap::Subcommand;

use super::Context;
use crate::sample;

#[derive(Debug, Subcommand)]
pub enum SampleCommand {
    /// Write a mixed-content image (a third zeros, a quarter random, the rest text/binary).
    #[command(after_help = "Examples:\n  holdfast sample write db.img --size 64MiB")]
    Write {
        /// The image file to write (created or overwritten).
        path: PathBuf,
        /// Its size (64MiB, 1GiB...).
        #[arg(long)]
        size: bytesize::ByteSize,
        /// The same seed writes the same bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Rewrite a fraction of the image's blocks at random offsets.
    #[command(after_help = "Examples:\n  holdfast sample rewrite db.img --fraction 0.01 --seed 7")]
    Rewrite {
        /// The image file to change in place.
        path: PathBuf,
        /// The share of its blocks to rewrite (0.01 is 1%).
        #[arg(long)]
        fraction: f64,
        /// The size of the blocks rewritten.
        #[arg(long, default_value_t = bytesize::ByteSize::kib(64))]
        block_size: bytesize::ByteSize,
        /// The same seed rewrites the same blocks with the same bytes.
        #[arg(long, default_value_t = 2)]
        seed: u64,
    },
}

impl SampleCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        match self {
            SampleCommand::Write { path, size, seed } => {
                sample::write_mixed_image(&path, size.as_u64(), 64 << 10, seed)?;
                ctx.summary(format!(
                    "wrote {} ({} bytes)",
                    path.display(),
                    size.as_u64()
                ));
            }
            SampleCommand::Rewrite {
                path,
                fraction,
                block_size,
                seed,
            } => {
                if !(0.0..=1.0).contains(&fraction) {
                    anyhow::bail!(crate::Error::invalid("--fraction must be within 0..=1"));
                }
                let blocks =
                    sample::rewrite_blocks(&path, block_size.as_u64() as usize, fraction, seed)?;
                outln!("{}", blocks.len());
            }
        }
        Ok(())
    }
}
