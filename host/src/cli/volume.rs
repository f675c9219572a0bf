//! `holdfast volume add|list|remove`.

use std::path::PathBuf;

use clap::Subcommand;

use super::{Context, human_bytes, print_json};
use holdfast::catalog::VolumeRecord;
use holdfast::id::VolumeName;
use holdfast::volume::{self, DEFAULT_BLOCK_SIZE, FileVolume};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Register a raw image file or block device as a volume.
    #[command(
        after_help = "Examples:\n  holdfast volume add db --image /dev/vg0/db-snap\n  holdfast volume add vm1 --image /var/lib/images/vm1.raw --block-size 128KiB"
    )]
    Add {
        /// The volume's name (letters, digits, `_ - : . +`, up to 255 bytes)
        name: VolumeName,
        /// The image file or block device.
        #[arg(long)]
        image: PathBuf,
        /// Block size: a power of two from 4KiB to 4MiB.
        #[arg(long, default_value_t = bytesize::ByteSize::b(DEFAULT_BLOCK_SIZE as u64))]
        block_size: bytesize::ByteSize,
    },
    /// List the registered volumes.
    List {
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Unregister a volume (it must have no snapshots left).
    Remove { name: VolumeName },
}

impl VolumeCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        match self {
            VolumeCommand::Add {
                name,
                image,
                block_size,
            } => {
                let block_size = volume::validate_block_size(block_size.as_u64())?;
                let image = volume::check_image(&image)?;
                let rec = VolumeRecord {
                    name,
                    image,
                    block_size,
                    added_unix_ms: holdfast::now_unix_ms(),
                    upstream: None,
                };
                node.catalog.add_volume(&rec)?;
                ctx.summary(format!(
                    "added volume {} ({}, blocks of {})",
                    rec.name,
                    rec.image.display(),
                    human_bytes(block_size as u64)
                ));
            }
            VolumeCommand::List { json } => {
                let vols = node.catalog.volumes()?;
                if json {
                    return print_json(&vols);
                }
                outln!(
                    "{:<24} {:>10} {:>10} {:>9}  IMAGE",
                    "NAME",
                    "SIZE",
                    "BLOCK",
                    "SNAPSHOTS"
                );
                for v in vols {
                    let snaps = node.catalog.snapshots(&v.name)?;
                    let n = snaps.len();
                    if let Some(from) = &v.upstream {
                        let size = snaps
                            .last()
                            .map_or_else(|| "-".into(), |s| human_bytes(s.size));
                        outln!(
                            "{:<24} {:>10} {:>10} {:>9}  ({from})",
                            v.name.as_str(),
                            size,
                            human_bytes(v.block_size as u64),
                            n
                        );
                        continue;
                    }
                    let size = FileVolume::open(&v.image)
                        .map(|f| human_bytes(f.size()))
                        .unwrap_or_else(|_| "missing".into());
                    outln!(
                        "{:<24} {:>10} {:>10} {:>9}  {}",
                        v.name.as_str(),
                        size,
                        human_bytes(v.block_size as u64),
                        n,
                        v.image.display()
                    );
                }
            }
            VolumeCommand::Remove { name } => {
                let rec = node.catalog.remove_volume(&name)?;
                match &rec.upstream {
                    Some(from) => {
                        ctx.summary(format!("removed replica volume {} ({from})", rec.name))
                    }
                    None => ctx.summary(format!(
                        "removed volume {} (the image {} was not touched)",
                        rec.name,
                        rec.image.display()
                    )),
                }
            }
        }
        Ok(())
    }
}
