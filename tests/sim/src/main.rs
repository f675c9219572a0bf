//! `holdfast-sim`: runs seeded histories of a simulated cascade (see the crate's doc).
//!
//! `holdfast-sim --seeds 100000` runs many and prints each failing seed; `--seed S --trace`
//! replays one step by step; `--scale` runs the 100-node figures.

use clap::Parser;

#[derive(Parser)]
#[command(about = "Seeded histories of a simulated holdfast cascade, checked after every step")]
struct Args {
    /// Replay this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds, from --from.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Steps per history.
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// At most this many nodes per history.
    #[arg(long, default_value_t = 9)]
    max_nodes: usize,
    /// Print every step of the history (with --seed).
    #[arg(long)]
    trace: bool,
    /// Run the scale scenario instead: a tree of NODES nodes (depth 6, fan-out up to 4).
    #[arg(long)]
    scale: bool,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Volumes in the scale scenario.
    #[arg(long, default_value_t = 100)]
    volumes: usize,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    if a.scale {
        return match holdfast_sim::scale::run(a.from, a.nodes, a.volumes, a.trace) {
            Ok(r) => {
                println!("{r}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("holdfast-sim: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let seeds: Vec<u64> = match a.seed {
        Some(s) => vec![s],
        None => (a.from..a.from + a.seeds).collect(),
    };
    let started = std::time::Instant::now();
    let (mut failed, mut sim_ms, mut messages, mut faults, mut steps) = (0u64, 0u64, 0, 0, 0);
    for s in &seeds {
        let mut o = holdfast_sim::Options::new(*s);
        o.steps = a.steps;
        o.trace = a.trace;
        o.max_nodes = a.max_nodes;
        match holdfast_sim::run_seed(o) {
            Ok(out) => {
                sim_ms += out.simulated_ms;
                messages += out.messages;
                faults += out.faults;
                steps += out.steps;
                if a.seed.is_some() {
                    println!("seed {s}: ok, {out:?}");
                }
            }
            Err(e) => {
                failed += 1;
                println!("seed {s}: FAILED: {e}");
            }
        }
    }
    println!(
        "{} seeds, {failed} failed; {steps} steps, {:.0} simulated hours, {messages} messages \
         ({faults} faults) in {:.1} s",
        seeds.len(),
        sim_ms as f64 / 3_600_000.0,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
