//! `holdfast volume add|list|remove` and `holdfast volume region add|list|remove`.

use std::path::PathBuf;

use clap::Subcommand;

use super::{Context, human_bytes, print_json};
use crate::catalog::VolumeRecord;
use crate::id::{RegionName, VolumeName};
use crate::region::{self, Region, RegionDef};
use crate::volume::{self, DEFAULT_BLOCK_SIZE, FileVolume, SourceSpec};

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
    /// Name parts of a volume (partitions or byte ranges) that a downstream can mirror alone.
    Region {
        #[command(subcommand)]
        command: RegionCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RegionCommand {
    /// Name a region: a byte range, or a partition of the volume's GPT or MBR (read again at
    /// every snapshot, so a partition that grows or moves is followed).
    #[command(
        after_help = "Examples:\n  holdfast volume region add vm1 data --partition 2\n  holdfast volume region add vm1 home --partition-label home\n  holdfast volume region add lun0 tenant-a --offset 0 --length 100GiB\n\nA downstream then mirrors it alone with `region = \"data\"` in its [[mirror]].\nA region starts on a block of the volume; regions of a volume do not overlap."
    )]
    #[command(group(clap::ArgGroup::new("where").required(true).args(["offset", "partition", "partition_label"])))]
    Add {
        volume: VolumeName,
        /// The region's name (letters, digits, `_ - : . +`)
        name: RegionName,
        /// Where a byte range starts (a multiple of the block size; 1GiB, 65536, ...)
        #[arg(long, requires = "length")]
        offset: Option<bytesize::ByteSize>,
        /// How long a byte range is (a multiple of the block size, or up to the volume's end)
        #[arg(long, requires = "offset")]
        length: Option<bytesize::ByteSize>,
        /// A partition by number (GPT, or MBR with logical partitions from 5)
        #[arg(long, value_name = "N")]
        partition: Option<u32>,
        /// A GPT partition by its label
        #[arg(long, value_name = "LABEL")]
        partition_label: Option<String>,
    },
    /// List a volume's regions and where they lay in its newest snapshot.
    List {
        volume: VolumeName,
        /// Print the result as JSON (for scripts)
        #[arg(long)]
        json: bool,
    },
    /// Forget a region (snapshots taken so far keep it in their region map).
    Remove {
        volume: VolumeName,
        name: RegionName,
    },
}

impl RegionCommand {
    async fn run(self, ctx: &Context, node: &crate::state::Node) -> anyhow::Result<()> {
        match self {
            RegionCommand::Add {
                volume,
                name,
                offset,
                length,
                partition,
                partition_label,
            } => {
                let mut rec = node.catalog.volume(&volume)?;
                if let Some(from) = &rec.upstream {
                    anyhow::bail!(crate::Error::invalid(format!(
                        "volume {volume} is a replica ({from}); regions are named where the \
                         data is, on the volume's own node, and its snapshots carry them here"
                    )));
                }
                let def = match (offset, length, partition, partition_label) {
                    (Some(o), Some(l), None, None) => RegionDef::Range {
                        offset: o.as_u64(),
                        length: l.as_u64(),
                    },
                    (None, None, Some(number), None) => RegionDef::Partition { number },
                    (None, None, None, Some(label)) => RegionDef::PartitionLabel { label },
                    _ => unreachable!("clap allows exactly one way"),
                };
                region::check_def(&def, rec.block_size)?;
                let check_new = |rec: &crate::catalog::VolumeRecord| {
                    if rec.regions.iter().any(|r| r.name == name) {
                        return Err(crate::Error::conflict(format!(
                            "volume {volume} already has a region named {name}; remove it first \
                             or choose another name"
                        )));
                    }
                    if rec.regions.len() >= region::MAX_REGIONS {
                        return Err(crate::Error::invalid(format!(
                            "volume {volume} has {} regions, the most a volume may have",
                            rec.regions.len()
                        )));
                    }
                    Ok(())
                };
                check_new(&rec)?;
                let before = rec.regions.clone();
                let new = Region {
                    name: name.clone(),
                    def: def.clone(),
                };
                rec.regions.push(new.clone());
                // Where every region lies now: a missing partition or an overlap is found at
                // once, not at the next snapshot. A running QEMU's disk is read only by
                // snapshots; its byte ranges are checked against its size.
                let (r2, new2) = (rec.clone(), new.clone());
                let extent = tokio::task::spawn_blocking(move || -> crate::Result<_> {
                    let (src, size, regions) = match &r2.source {
                        Some(SourceSpec::Qmp { monitor, node, .. }) => {
                            let mut q = volume::qmp::Qmp::connect(monitor)?;
                            let size = volume::qmp::node_info(&mut q, node)?.size;
                            let ranges: Vec<Region> = r2
                                .regions
                                .iter()
                                .filter(|r| matches!(r.def, RegionDef::Range { .. }))
                                .cloned()
                                .collect();
                            (None, size, ranges)
                        }
                        _ => {
                            let src = volume::open_source(&r2.image, r2.source.as_ref(), None)?;
                            let size = src.size();
                            (Some(src), size, r2.regions.clone())
                        }
                    };
                    region::check_range_end(&new2.def, size, r2.block_size)?;
                    let map = match &src {
                        Some(src) => region::resolve(
                            &r2.name,
                            &regions,
                            &mut volume::SourceReader::new(src),
                            size,
                            r2.block_size,
                        ),
                        None => region::resolve(
                            &r2.name,
                            &regions,
                            &mut std::io::Cursor::new(Vec::new()),
                            size,
                            r2.block_size,
                        ),
                    }
                    .map_err(crate::Error::invalid)?;
                    Ok(map.get(&new2.name).copied())
                })
                .await??;
                // Into the record as it is now (a snapshot may have moved its checkpoint).
                node.catalog.modify_volume(&volume, |now| {
                    // What was checked is what is there: a region added or removed meanwhile
                    // (another `region add`) means checking again.
                    if now.regions != before {
                        return Err(crate::Error::conflict(format!(
                            "the regions of volume {volume} changed while this command checked \
                             them; run it again"
                        )));
                    }
                    check_new(now)?;
                    now.regions.push(new);
                    Ok(())
                })?;
                ctx.summary(match extent {
                    Some(e) => format!(
                        "added region {name} of volume {volume} ({def}: now bytes {}..{}, {})",
                        e.offset,
                        e.end(),
                        human_bytes(e.length)
                    ),
                    None => format!(
                        "added region {name} of volume {volume} ({def}; the next snapshot finds \
                         where it lies)"
                    ),
                });
            }
            RegionCommand::List { volume, json } => {
                let rec = node.catalog.volume(&volume)?;
                let snaps = node.catalog.snapshots(&volume)?;
                let newest = snaps.last();
                #[derive(serde::Serialize)]
                #[serde(rename_all = "kebab-case")]
                struct Row {
                    name: RegionName,
                    /// How it is defined here (none on a replica: it comes with the snapshots).
                    #[serde(skip_serializing_if = "Option::is_none")]
                    definition: Option<RegionDef>,
                    /// Where it lay in the newest snapshot.
                    #[serde(skip_serializing_if = "Option::is_none")]
                    extent: Option<region::Extent>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    snapshot: Option<String>,
                }
                let mut names: Vec<RegionName> =
                    rec.regions.iter().map(|r| r.name.clone()).collect();
                if let Some(s) = newest {
                    names.extend(s.regions.keys().cloned());
                }
                names.sort();
                names.dedup();
                let rows: Vec<Row> = names
                    .into_iter()
                    .map(|n| Row {
                        definition: rec
                            .regions
                            .iter()
                            .find(|r| r.name == n)
                            .map(|r| r.def.clone()),
                        extent: newest.and_then(|s| s.regions.get(&n).copied()),
                        snapshot: newest.map(|s| s.name.to_string()),
                        name: n,
                    })
                    .collect();
                if json {
                    return print_json(&rows);
                }
                outln!(
                    "{:<20} {:<32} {:>14} {:>10}",
                    "NAME",
                    "DEFINED AS",
                    "OFFSET",
                    "SIZE"
                );
                for r in rows {
                    let def = r
                        .definition
                        .map_or_else(|| "(from upstream)".to_string(), |d| d.to_string());
                    let (off, size) = r.extent.map_or(("-".into(), "-".into()), |e| {
                        (e.offset.to_string(), human_bytes(e.length))
                    });
                    outln!(
                        "{:<20} {:<32} {:>14} {:>10}",
                        r.name.as_str(),
                        def,
                        off,
                        size
                    );
                }
            }
            RegionCommand::Remove { volume, name } => {
                node.catalog.modify_volume(&volume, |rec| {
                    let before = rec.regions.len();
                    rec.regions.retain(|r| r.name != name);
                    if rec.regions.len() == before {
                        return Err(crate::Error::not_found(format!(
                            "volume {volume} has no region named {name}; `holdfast volume \
                             region list {volume}` shows them"
                        )));
                    }
                    Ok(())
                })?;
                // Its downstreams keep their bases until they are told.
                let value = format!("{volume}/{name}");
                let holders: std::collections::BTreeSet<String> = node
                    .catalog
                    .locks()
                    .sets(Some(&volume))?
                    .into_iter()
                    .filter(|s| s.locks.iter().any(|l| l.value == value))
                    .map(|s| s.holder.to_string())
                    .collect();
                if !holders.is_empty() {
                    tracing::warn!(
                        "downstream(s) {} mirror region {name} and keep their base locks on it; \
                         remove the region from their [[mirror]] and release their locks \
                         (`holdfast lock release --holder NODE/{volume}`) when they are gone",
                        holders.into_iter().collect::<Vec<_>>().join(", ")
                    );
                }
                ctx.summary(format!(
                    "removed region {name} of volume {volume}; snapshots taken so far keep it"
                ));
            }
        }
        Ok(())
    }
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
                            crate::Error::io(format!("resolving {}", monitor.display()), e)
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
                            anyhow::bail!(crate::Error::invalid(format!(
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
                crate::snapshot::manifest::check_block_count(
                    size,
                    block_size,
                    &format!("volume {name}"),
                )?;
                let rec = VolumeRecord {
                    name,
                    image,
                    block_size,
                    added_unix_ms: crate::now_unix_ms(),
                    upstream: None,
                    source,
                    checkpoint: None,
                    regions: vec![],
                    region: None,
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
                        let region = v
                            .region
                            .as_ref()
                            .map_or_else(String::new, |r| format!(", region {r}"));
                        outln!(
                            "{:<24} {:>10} {:>10} {:>9}  ({from}{region})",
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
            VolumeCommand::Region { command } => return command.run(ctx, &node).await,
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
