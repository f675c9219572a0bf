//! `holdfast volume add|list|remove`.

use std::path::PathBuf;

use clap::Subcommand;

use super::{Context, human_bytes, print_json};
use holdfast::catalog::VolumeRecord;
use holdfast::id::VolumeName;
use holdfast::volume::{self, DEFAULT_BLOCK_SIZE, FileVolume, SourceSpec};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Register a raw image file, block device, NBD export or qcow2 image as a volume.
    #[command(
        after_help = "Examples:\n  holdfast volume add db --image /dev/vg0/db-snap\n  holdfast volume add vm1 --image /var/lib/images/vm1.raw --block-size 128KiB\n  holdfast volume add vm2 --qcow2 /var/lib/images/vm2.qcow2\n  holdfast volume add vm3 --nbd 'nbd+unix:///vm3?socket=/run/vm3.sock'\n\nA --qcow2 image is served to holdfast by qemu-nbd (read-only) while a snapshot reads it,\nand holdfast keeps a persistent dirty bitmap in it, so that the next snapshot reads only\nthe blocks written since. The image must not be in use by a writer then."
    )]
    #[command(group(clap::ArgGroup::new("source").required(true).args(["image", "nbd", "qcow2", "qmp"])))]
    Add {
        /// The volume's name (letters, digits, `_ - : . +`, up to 255 bytes)
        name: VolumeName,
        /// A raw image file or block device, read directly (holes of a file are skipped).
        #[arg(long)]
        image: Option<PathBuf>,
        /// An NBD export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
        #[arg(long, value_name = "URI")]
        nbd: Option<String>,
        /// A qcow2 image (QEMU's format), served by qemu-nbd, with changed-block tracking.
        #[arg(long, value_name = "PATH")]
        qcow2: Option<PathBuf>,
        /// The QMP monitor socket of a running QEMU or qemu-storage-daemon: point-in-time
        /// snapshots of its disk --node while it runs, with changed-block tracking. Give
        /// holdfast a monitor of its own (-qmp unix:PATH,server=on,wait=off).
        #[arg(long, value_name = "SOCKET", requires = "node")]
        qmp: Option<PathBuf>,
        /// With --qmp: the disk's block node name (as query-named-block-nodes lists it).
        #[arg(long, value_name = "NODE", requires = "qmp")]
        node: Option<String>,
        /// With --qmp: the NBD server that QEMU already runs, if it runs one
        /// (nbd+unix:///?socket=PATH or nbd://HOST:PORT/); holdfast adds its read-only export
        /// there. Without it, holdfast starts a server on a private socket and stops it after.
        #[arg(long, value_name = "URI", requires = "qmp")]
        nbd_server: Option<String>,
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
                nbd,
                qcow2,
                qmp,
                node: qmp_node,
                nbd_server,
                block_size,
            } => {
                let block_size = volume::validate_block_size(block_size.as_u64())?;
                let (image, source, size) = match (image, nbd, qcow2, qmp) {
                    (None, None, None, Some(monitor)) => {
                        let qmp_node = qmp_node.expect("clap requires --node");
                        if let Some(uri) = &nbd_server {
                            uri.parse::<volume::nbd::NbdUri>()?;
                        }
                        let monitor = std::path::absolute(&monitor).map_err(|e| {
                            holdfast::Error::io(format!("resolving {}", monitor.display()), e)
                        })?;
                        // Reach it now: a wrong socket or node is found at once.
                        let (m, n) = (monitor.clone(), qmp_node.clone());
                        let size = tokio::task::spawn_blocking(move || {
                            let mut q = volume::qmp::Qmp::connect(&m)?;
                            volume::qmp::node_info(&mut q, &n).map(|i| i.size)
                        })
                        .await??;
                        let source = SourceSpec::Qmp {
                            monitor,
                            node: qmp_node,
                            nbd_server,
                        };
                        (PathBuf::new(), Some(source), size)
                    }
                    (Some(image), None, None, None) => {
                        let image = volume::check_image(&image)?;
                        let size = FileVolume::open(&image)?.size();
                        (image, None, size)
                    }
                    (None, Some(uri), None, None) => {
                        let parsed: volume::nbd::NbdUri = uri.parse()?;
                        // Reach it now: a typo is found at once, not at the first snapshot.
                        let size = tokio::task::spawn_blocking(move || {
                            volume::nbd::Client::connect(&parsed, &[]).map(|c| c.size())
                        })
                        .await??;
                        (PathBuf::new(), Some(SourceSpec::Nbd { uri }), size)
                    }
                    (None, None, Some(path), None) => {
                        let path = volume::check_image(&path)?;
                        let info = volume::qemu::info(&path)?;
                        if info.format != "qcow2" {
                            anyhow::bail!(holdfast::Error::invalid(format!(
                                "{} is a {} image, not qcow2; register a raw image with --image",
                                path.display(),
                                info.format
                            )));
                        }
                        (
                            path.clone(),
                            Some(SourceSpec::Qcow2 { path }),
                            info.virtual_size,
                        )
                    }
                    _ => unreachable!("clap allows exactly one source"),
                };
                holdfast::snapshot::manifest::check_block_count(
                    size,
                    block_size,
                    &format!("volume {name}"),
                )?;
                let rec = VolumeRecord {
                    name,
                    image,
                    block_size,
                    added_unix_ms: holdfast::now_unix_ms(),
                    upstream: None,
                    source,
                    checkpoint: None,
                };
                node.catalog.add_volume(&rec)?;
                ctx.summary(format!(
                    "added volume {} ({}, {}, blocks of {})",
                    rec.name,
                    rec.source_label(),
                    human_bytes(size),
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
                    let size = match &v.source {
                        None => FileVolume::open(&v.image)
                            .map(|f| human_bytes(f.size()))
                            .unwrap_or_else(|_| "missing".into()),
                        Some(SourceSpec::Qcow2 { path }) => volume::qemu::info(path)
                            .map(|i| human_bytes(i.virtual_size))
                            .unwrap_or_else(|_| "missing".into()),
                        // Listing does not reach out to servers.
                        Some(SourceSpec::Nbd { .. } | SourceSpec::Qmp { .. }) => "-".into(),
                    };
                    outln!(
                        "{:<24} {:>10} {:>10} {:>9}  {}",
                        v.name.as_str(),
                        size,
                        human_bytes(v.block_size as u64),
                        n,
                        v.source_label()
                    );
                }
            }
            VolumeCommand::Remove { name } => {
                let rec = node.catalog.remove_volume(&name)?;
                match &rec.upstream {
                    Some(from) => {
                        ctx.summary(format!("removed replica volume {} ({from})", rec.name))
                    }
                    None => {
                        // Its dirty bitmap would record writes for nobody.
                        let removed = match (&rec.source, &rec.checkpoint) {
                            (Some(SourceSpec::Qcow2 { path }), Some(cp)) => {
                                Some(volume::qemu::remove_bitmap(path, &cp.bitmap))
                            }
                            // And whatever an interrupted snapshot left in QEMU.
                            (
                                Some(SourceSpec::Qmp {
                                    monitor,
                                    node: disk,
                                    ..
                                }),
                                _,
                            ) => Some(node.run_dir().and_then(|run| {
                                volume::qmp::forget(monitor, disk, rec.name.as_str(), &run)
                            })),
                            _ => None,
                        };
                        if let Some(Err(e)) = removed {
                            tracing::warn!("could not remove the volume's dirty bitmap: {e}");
                        }
                        ctx.summary(format!(
                            "removed volume {} (the source {} was not touched)",
                            rec.name,
                            rec.source_label()
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}
