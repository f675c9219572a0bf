//! `holdfast policy simulate`: the command line of `crate::policy::simulate`, with its table,
//! JSON and SVG plot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;

use super::{Context, human_bytes, print_json};
use crate::id::{VolumeName, parse_label};
use crate::policy::registry::Policies;
use crate::policy::simulate::{self, Outage, Report, SimPolicy, Timeline};
use crate::policy::{Limits, PolicyEngine};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Simulate the policies registered for this volume (with their configuration and limits).
    #[arg(long, required_unless_present = "wasm")]
    volume: Option<VolumeName>,
    /// Or simulate these component files instead (with --config); repeatable.
    #[arg(long, conflicts_with = "volume")]
    wasm: Vec<PathBuf>,
    /// Configuration KEY=VALUE for the --wasm components; repeatable.
    #[arg(long = "config", value_parser = parse_pair, requires = "wasm")]
    config: Vec<(String, String)>,
    /// The first snapshot's time, RFC 3339 (2026-01-01T00:00:00Z); default: today, 00:00 UTC.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    start: Option<SystemTime>,
    /// A snapshot every so often (at least 1s).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    every: Duration,
    /// How many days to simulate.
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// A label KEY=VALUE on every new snapshot; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// The application relabels each snapshot this long after it was taken (with --relabel).
    #[arg(long, value_parser = humantime::parse_duration, requires = "relabel")]
    relabel_after: Option<Duration>,
    /// The labels KEY=VALUE it sets then; repeatable.
    #[arg(long = "relabel", value_parser = parse_pair, requires = "relabel_after")]
    relabel: Vec<(String, String)>,
    /// A downstream node that mirrors the volume after every snapshot; repeatable.
    #[arg(long = "downstream", value_name = "NODE")]
    downstreams: Vec<String>,
    /// A downstream away for a while, NAME:LENGTH@dayN (c:3d@day10); repeatable.
    #[arg(long = "outage")]
    outages: Vec<Outage>,
    /// The volume's size, for the storage estimate (default: the volume's newest snapshot's,
    /// else 10GiB).
    #[arg(long)]
    size: Option<bytesize::ByteSize>,
    /// The share of the volume rewritten between two snapshots, for the estimate.
    #[arg(long, default_value = "1%", value_parser = parse_percent)]
    change: f64,
    /// Print the result as JSON (for scripts): the timeline, each day, each snapshot's life.
    #[arg(long)]
    json: bool,
    /// Draw the snapshots over time (kept, locked, pruned) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    parse_label(s).map_err(|e| e.to_string())
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (e.g. 1% or 0.5%)"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?} is not between 0% and 100%"));
    }
    Ok(v / 100.0)
}

const DAY_MS: u64 = 86_400_000;

pub async fn run(args: SimulateArgs, ctx: &Context) -> anyhow::Result<()> {
    let engine = PolicyEngine::new()?;
    let mut size = args.size.map(|s| s.as_u64());
    let (volume, block_size, policies) = match &args.volume {
        Some(volume) => {
            let node = ctx.open().await?;
            let rec = node.catalog.volume(volume)?;
            let registered = Policies::new(&node);
            let mut policies = Vec::new();
            for r in registered.for_volume(volume)? {
                policies.push(SimPolicy {
                    wasm: registered.component(&r)?,
                    artifact: registered.cached_artifact(&engine, &r),
                    name: r.name,
                    config: r.config,
                    limits: r.limits,
                });
            }
            if size.is_none() {
                size = node.catalog.snapshots(volume)?.last().map(|s| s.size);
            }
            (volume.clone(), rec.block_size, policies)
        }
        None => {
            let config: BTreeMap<String, String> = args.config.iter().cloned().collect();
            let mut policies = Vec::new();
            for path in &args.wasm {
                let wasm = std::fs::read(path)
                    .map_err(|e| crate::Error::io(format!("reading {}", path.display()), e))?;
                // Named after the file, in the characters a policy name may have.
                let stem: String = path
                    .file_stem()
                    .map(|s| s.to_string_lossy())
                    .unwrap_or_default()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '.' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .take(48)
                    .collect();
                let stem = match stem.trim_matches(|c| c == '-' || c == '.') {
                    "" => "policy".to_string(),
                    s => s.to_string(),
                };
                let mut name = stem.clone();
                let mut n = 1;
                while policies.iter().any(|p: &SimPolicy| p.name == name) {
                    n += 1;
                    name = format!("{stem}-{n}");
                }
                policies.push(SimPolicy {
                    name,
                    wasm,
                    artifact: None,
                    config: config.clone(),
                    limits: Limits::default(),
                });
            }
            ("volume".parse()?, 65536, policies)
        }
    };
    let start = match args.start {
        Some(t) => t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|_| crate::Error::invalid("--start is before 1970"))?,
        None => {
            let now = crate::now_unix_ms();
            now - now % DAY_MS
        }
    };
    let timeline = Timeline {
        start_unix_ms: start,
        every: args.every,
        days: args.days,
        labels: args.labels.into_iter().collect(),
        relabel_after: args.relabel_after,
        relabel: args.relabel.into_iter().collect(),
        downstreams: args.downstreams,
        outages: args.outages,
        size: size.unwrap_or(10 << 30),
        change: args.change,
    };
    let bar = ctx.count_bar("simulating");
    let report = simulate::simulate(&engine, &volume, block_size, policies, &timeline, |i, n| {
        bar.set_length(n);
        bar.set_position(i);
    })
    .await?;
    bar.finish_and_clear();
    if let Some(path) = &args.plot {
        let svg = plot(&report);
        std::fs::write(path, svg)
            .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
    }
    if args.json {
        return print_json(&report);
    }
    print_table(&report)?;
    if let Some(path) = &args.plot {
        ctx.summary(format!("plot written to {}", path.display()));
    }
    Ok(())
}

fn print_table(r: &Report) -> anyhow::Result<()> {
    let t = &r.timeline;
    outln!(
        "simulated {} day(s) of volume {}: a snapshot every {} from {}; policies {}{}",
        t.days,
        r.volume,
        humantime::format_duration(t.every),
        simulate::snapshot_name(t.start_unix_ms),
        r.policies.join(", "),
        if r.retention {
            ""
        } else {
            " (none handles retention: nothing is pruned)"
        }
    );
    for d in &t.downstreams {
        let away: Vec<String> = t
            .outages
            .iter()
            .filter(|o| &o.downstream == d)
            .map(|o| {
                format!(
                    "away {} from day {}",
                    humantime::format_duration(o.length),
                    o.from_day
                )
            })
            .collect();
        outln!(
            "downstream {d}/{}{}",
            r.volume,
            if away.is_empty() {
                String::new()
            } else {
                format!(": {}", away.join(", "))
            }
        );
    }
    outln!(
        "{:>5}  {:<10}  {:>6}  {:>6}  {:>6}  {:>11}  {:>13}  LOCKED BY",
        "DAY",
        "DATE",
        "KEPT",
        "LOCKED",
        "PRUNED",
        "STORED ≈",
        "PINNED ≈"
    );
    for d in &r.days {
        let mut holders: BTreeMap<&str, usize> = BTreeMap::new();
        for h in d.locked.values().flatten() {
            *holders.entry(h.as_str()).or_default() += 1;
        }
        outln!(
            "{:>5}  {:<10}  {:>6}  {:>6}  {:>6}  {:>11}  {:>13}  {}",
            d.day,
            &d.date[..10],
            d.snapshots.len(),
            d.locked.len(),
            d.pruned.len(),
            human_bytes(d.estimate.stored_bytes),
            human_bytes(d.estimate.pinned_by_locks_bytes),
            holders
                .iter()
                .map(|(h, n)| format!("{h} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for f in &d.failures {
            outln!("       failure: {f}");
        }
    }
    let pruned: Vec<_> = r
        .snapshots
        .iter()
        .filter(|s| s.pruned_unix_ms.is_some())
        .collect();
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &pruned {
        *reasons
            .entry(s.reason.as_deref().unwrap_or(""))
            .or_default() += 1;
    }
    outln!(
        "pruned {} of {} snapshot(s){}",
        pruned.len(),
        r.snapshots.len(),
        if reasons.is_empty() { "" } else { ", because:" }
    );
    for (reason, n) in reasons {
        outln!("  {n:>6}  {reason}");
    }
    if let Some(last) = r.days.last() {
        outln!("at the end ({} snapshot(s)):", last.snapshots.len());
        for name in &last.snapshots {
            match last.locked.get(name) {
                Some(h) => outln!("  {}@{name}  locked by {}", r.volume, h.join(", ")),
                None => outln!("  {}@{name}", r.volume),
            }
        }
        for (h, bytes) in &last.estimate.pinned_by_holder {
            outln!(
                "  {h} pins ≈ {} that retention would free",
                human_bytes(*bytes)
            );
        }
    }
    Ok(())
}

/// Each snapshot as a row (oldest at the bottom), from its creation to its pruning or the
/// end: blue while kept, orange on days a lock held it, a grey cross where it was pruned.
fn plot(r: &Report) -> String {
    use svg::Document;
    use svg::node::element::{Line, Rectangle, Text};

    let (w, h) = (1000.0, 640.0);
    let (left, right, top, bottom) = (60.0, 20.0, 40.0, 50.0);
    let days = f64::from(r.timeline.days);
    let n = r.snapshots.len().max(1) as f64;
    let x = |ms: u64| {
        left + (ms - r.timeline.start_unix_ms) as f64 / DAY_MS as f64 / days * (w - left - right)
    };
    let y = |i: usize| h - bottom - (i as f64 + 0.5) / n * (h - top - bottom);
    let end = r.timeline.start_unix_ms + u64::from(r.timeline.days) * DAY_MS;
    let stroke = ((h - top - bottom) / n).clamp(0.5, 6.0);
    let mut doc = Document::new()
        .set("viewBox", (0, 0, w, h))
        .set("width", w)
        .set("height", h)
        .set("font-family", "sans-serif")
        .set("font-size", 12)
        .add(
            Rectangle::new()
                .set("width", w)
                .set("height", h)
                .set("fill", "white"),
        )
        .add(
            Text::new(format!(
                "{}: {} snapshot(s) over {} day(s), policies {}",
                r.volume,
                r.snapshots.len(),
                r.timeline.days,
                r.policies.join(", ")
            ))
            .set("x", left)
            .set("y", 20),
        );
    // Day ticks.
    let tick = (r.timeline.days / 10).max(1);
    for d in (0..=r.timeline.days).step_by(tick as usize) {
        let at = x(r.timeline.start_unix_ms + u64::from(d) * DAY_MS);
        doc = doc
            .add(
                Line::new()
                    .set("x1", at)
                    .set("x2", at)
                    .set("y1", top)
                    .set("y2", h - bottom)
                    .set("stroke", "#ddd"),
            )
            .add(
                Text::new(format!("day {d}"))
                    .set("x", at)
                    .set("y", h - bottom + 16.0)
                    .set("text-anchor", "middle"),
            );
    }
    doc = doc.add(
        Text::new("snapshots, oldest at the bottom; blue: kept, orange: locked, grey ×: pruned")
            .set("x", left)
            .set("y", h - 10.0),
    );
    for (i, s) in r.snapshots.iter().enumerate() {
        let until = s.pruned_unix_ms.unwrap_or(end);
        doc = doc.add(
            Line::new()
                .set("x1", x(s.created_unix_ms))
                .set("x2", x(until))
                .set("y1", y(i))
                .set("y2", y(i))
                .set("stroke", "#3b75af")
                .set("stroke-width", stroke),
        );
        for &d in &s.locked_days {
            let from = (r.timeline.start_unix_ms + u64::from(d) * DAY_MS).max(s.created_unix_ms);
            let to = (r.timeline.start_unix_ms + u64::from(d + 1) * DAY_MS).min(until.max(from));
            doc = doc.add(
                Line::new()
                    .set("x1", x(from))
                    .set("x2", x(to.max(from)))
                    .set("y1", y(i))
                    .set("y2", y(i))
                    .set("stroke", "#ef8636")
                    .set("stroke-width", stroke),
            );
        }
        if s.pruned_unix_ms.is_some() {
            doc = doc.add(
                Text::new("×")
                    .set("x", x(until))
                    .set("y", y(i) + 4.0)
                    .set("fill", "#888")
                    .set("font-size", 10)
                    .set("text-anchor", "middle"),
            );
        }
    }
    doc.to_string()
}
