//! The command line: one file per subcommand under `cli/`.

/// `println!` for command output, as a `?`-propagated error: output piped into a command
/// that stops reading early (`holdfast snapshot list | head -1`) ends the command cleanly
/// ([`StdoutClosed`], which `main` treats as success) instead of panicking, and whatever the
/// command holds, such as a lock taken by `snapshot read --hold-as`, is released on the way out.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::stdout_error)?;
    }};
}

/// Standard output was closed by its reader: the end of the output, not a failure. Only
/// writes to stdout are mapped to it, so a broken pipe anywhere else (a peer, a bucket) stays
/// an error.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed by its reader")
    }
}

impl std::error::Error for StdoutClosed {}

/// An error writing to stdout, as the command should report it.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

mod daemon;
mod demo;
mod gc;
mod init;
mod install;
mod lock;
mod mirror;
mod policy;
mod prune;
mod sample;
mod simulate;
mod snapshot;
mod target;
mod verify;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::state::{DEFAULT_STATE_DIR, Node};

/// Block-level snapshots with soft locks that travel upstream through mirror cascades.
#[derive(Debug, Parser)]
#[command(name = "holdfast", version, about, max_term_width = 100)]
pub struct Cli {
    /// The node's state directory.
    #[arg(long, global = true, env = "HOLDFAST_STATE", default_value = DEFAULT_STATE_DIR, help_heading = "Global options")]
    pub state: PathBuf,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Global options")]
    pub verbose: u8,
    /// No progress bars or summaries; errors only.
    #[arg(short, long, global = true, help_heading = "Global options")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a node's state directory (identity, catalog, repository).
    Init(init::InitCommand),
    /// Register, list and remove volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Take, list, show, compare, restore and delete snapshots.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Set, release, list and explain soft locks.
    #[command(subcommand)]
    Lock(lock::LockCommand),
    /// Register, list, show, remove and dry-run WebAssembly policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Delete old snapshots by rule (keep-last, keep-within), never a locked one.
    Prune(prune::PruneCommand),
    /// Reclaim repository space that no snapshot references.
    Gc(gc::GcCommand),
    /// Re-read and re-hash every stored chunk; report damage by snapshot and block.
    Verify(verify::VerifyCommand),
    /// A walk-through in a scratch directory: snapshot, change, snapshot, diff, restore.
    Demo(demo::DemoCommand),
    /// Serve peers and run the node's schedules (mirrors, snapshots, retention).
    Daemon(daemon::DaemonCommand),
    /// Pull mirror updates from upstream nodes; list the relations.
    #[command(subcommand)]
    Mirror(mirror::MirrorCommand),
    /// Ask the running daemon how its mirrors, schedules and locks are doing.
    Status(daemon::StatusCommand),
    /// Register, list, check and remove mirror targets (a directory or an S3 bucket).
    #[command(subcommand)]
    Target(target::TargetCommand),
    /// Make TLS certificates for the daemon's listener.
    #[command(subcommand)]
    Tls(daemon::TlsCommand),
    /// Make peer tokens.
    #[command(subcommand)]
    Token(daemon::TokenCommand),
    /// Make key files for encrypted targets.
    #[command(subcommand)]
    Key(daemon::KeyFileCommand),
    /// Deterministic sample images, to try holdfast out and for benchmarks.
    #[command(subcommand)]
    Sample(sample::SampleCommand),
    /// Print a shell completion script (bash: `holdfast completions bash >
    /// /etc/bash_completion.d/holdfast`).
    Completions(install::CompletionsCommand),
    /// Write the manual pages (for packaging).
    #[command(hide = true)]
    Manpages(install::ManpagesCommand),
}

/// What every command gets.
pub struct Context {
    pub state: PathBuf,
    pub quiet: bool,
}

impl Context {
    pub async fn open(&self) -> anyhow::Result<Node> {
        Ok(Node::open(&self.state).await?)
    }

    /// A byte-count progress bar on stderr; hidden when quiet or not on a terminal.
    pub fn bytes_bar(&self, what: &str) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(None, self.draw_target());
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }

    /// A count progress bar on stderr.
    pub fn count_bar(&self, what: &str) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(None, self.draw_target());
        pb.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        pb
    }

    fn draw_target(&self) -> ProgressDrawTarget {
        if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            // indicatif draws nothing when stderr is not a terminal.
            ProgressDrawTarget::stderr()
        }
    }

    /// A summary line on stderr (stdout stays for data and ids).
    pub fn summary(&self, line: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", line.as_ref());
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = Context {
        state: cli.state,
        quiet: cli.quiet,
    };
    match cli.command {
        Command::Init(c) => c.run(&ctx).await,
        Command::Volume(c) => c.run(&ctx).await,
        Command::Snapshot(c) => c.run(&ctx).await,
        Command::Lock(c) => c.run(&ctx).await,
        Command::Policy(c) => c.run(&ctx).await,
        Command::Prune(c) => c.run(&ctx).await,
        Command::Gc(c) => c.run(&ctx).await,
        Command::Verify(c) => c.run(&ctx).await,
        Command::Demo(c) => c.run(&ctx).await,
        Command::Sample(c) => c.run(&ctx).await,
        Command::Daemon(c) => c.run(&ctx).await,
        Command::Mirror(c) => c.run(&ctx).await,
        Command::Status(c) => c.run(&ctx).await,
        Command::Tls(c) => c.run(&ctx).await,
        Command::Target(c) => c.run(&ctx).await,
        Command::Token(c) => c.run(&ctx).await,
        Command::Key(c) => c.run(&ctx).await,
        Command::Completions(c) => c.run(&ctx).await,
        Command::Manpages(c) => c.run(&ctx).await,
    }
}

/// Text from outside (labels, lock values, an error a peer sent) as it is safe to print on a
/// terminal: control characters (a terminal escape, say) shown escaped, never sent raw.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    crate::id::escape_hazards(s)
}

/// `k=v,k=v`, printable.
pub fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{}={}", printable(k), printable(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// 1.5 GiB, 64 KiB, 12 B.
pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// Bytes per second over `elapsed`, human readable.
pub fn throughput(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

/// A Unix time in milliseconds as RFC 3339, to the second.
pub fn format_time(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(unix_ms))
        .to_string()
}

/// Writes JSON to stdout.
pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // Through io::Error, so a closed pipe (`| grep -q`) is recognised as such by main.
    serde_json::to_writer_pretty(&mut out, v)
        .map_err(std::io::Error::from)
        .map_err(stdout_error)?;
    writeln!(out).map_err(stdout_error)?;
    Ok(())
}

/// Cuts every run of more than 80 non-blank characters to its first 64.
fn shorten_words(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(4096));
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if word.chars().count() > 80 {
            out.extend(word.chars().take(64));
            out.push_str(&format!("…({} chars)", word.chars().count()));
        } else {
            out.push_str(word);
        }
    }
    out
}

/// Everything holdfast creates is private to its user, whatever the umask it inherited: a
/// backup repository, its catalog, tokens and restored images are not for other local users.
#[allow(unsafe_code)]
fn private_umask() {
    // SAFETY: umask only sets the process's file-creation mask; it cannot fail, touches no
    // memory, and runs before any other thread exists.
    unsafe {
        libc::umask(0o077);
    }
}

/// Few malloc arenas. glibc gives each thread that allocates under contention an arena of its
/// own (up to 8 per core), and the daemon runs many (async workers, the blocking pool, rayon):
/// memory freed in one arena is not reused by the others, so a daemon's resident memory crept
/// up for hours (the soak: 53 → 167 MB in 7 minutes with the default, 51 → 81 MB with two
/// arenas, the same work done).
#[allow(unsafe_code)]
fn few_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it runs before any other thread
    // exists, and a value it refuses leaves the default.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// For a single command (not the daemon): large buffers (a pack read or written, about
/// 16 MiB) come from the heap and are reused, rather than mapped fresh for each pack and
/// faulted in and zeroed by the kernel page by page. glibc maps anything of 128 KiB or more
/// (adapting upwards, but never for a second buffer of the same size) and trims the heap as
/// soon as 128 KiB at its top are free. Measured on a 1 GiB restore from an encrypted bucket:
/// 143k page faults and 0.64 s of system time with the defaults, 60k and 0.44 s with these,
/// 0.16 s less wall time (`host/TARGETS.md`). The daemon keeps the defaults: it runs for
/// months and should give memory back between jobs.
#[allow(unsafe_code)]
fn reuse_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread exists,
    // and a value it refuses leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The whole program: `host/src/main.rs` calls it, and so does the end-to-end tests' build of
/// it against a mutated library (`tests/mutants.sh`).
pub fn main() -> ExitCode {
    private_umask();
    few_malloc_arenas();
    let args = match Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // clap repeats the offending value; a hostile one can be megabytes long.
            eprint!("{}", shorten_words(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    if !matches!(args.command, Command::Daemon(_)) {
        reuse_large_buffers();
    }
    crate::telemetry::init(args.verbose, args.quiet);
    if let Some(fake) = std::env::var_os("HOLDFAST_FAKE_NOW") {
        // Tests replay a timeline with it (`policy simulate` must agree with what really
        // happens). A daemon's clock must move: leases, gc and schedules would stand still.
        if matches!(args.command, Command::Daemon(_)) {
            eprintln!(
                "holdfast: error: HOLDFAST_FAKE_NOW is set; it is for tests of single commands, \
                 never for the daemon: unset it"
            );
            return ExitCode::from(2);
        }
        match fake.to_str().and_then(|s| s.parse::<u64>().ok()) {
            Some(ms) if ms > 0 => {
                crate::set_fake_now(ms);
                tracing::warn!(
                    "HOLDFAST_FAKE_NOW is set: this command takes the time to be {ms} ms since the epoch"
                );
            }
            _ => {
                eprintln!(
                    "holdfast: error: HOLDFAST_FAKE_NOW must be milliseconds since the Unix epoch"
                );
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("holdfast: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let result = runtime.block_on(run(args));
    // Blocking work left behind (a stopped daemon's job that waited for a file lock held by
    // another command) must not keep the process alive once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed stdout (`holdfast snapshot list | head`) is not a failure.
            if err.chain().any(|c| c.is::<StdoutClosed>()) {
                return ExitCode::SUCCESS;
            }
            // A message may quote text from outside (a peer's, an object store's): no
            // terminal escape in it reaches the terminal raw. Line breaks are ours.
            let text: String = format!("{err:#}")
                .split('\n')
                .map(|line| crate::id::escape_hazards(line).into_owned())
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("holdfast: error: {text}");
            let code = err
                .chain()
                .find_map(|c| c.downcast_ref::<crate::Error>())
                .map(crate::Error::exit_code)
                .unwrap_or(1);
            ExitCode::from(code as u8)
        }
    }
}
