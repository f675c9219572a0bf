//! holdfast: block-level snapshots (PCPIs) kept in a verified, deduplicating repository and
//! mirrored through cascades of nodes, with soft locks that travel upstream.
//!
//! # Layout
//!
//! - [`id`]: newtypes for every identifier, and the validation of names from outside.
//! - [`error`]: the one public error type and its categories.
//! - [`chunk`]: hashing (BLAKE3), zero detection, compression (zstd) and verification of blocks.
//! - [`volume`]: the sources a snapshot reads: image files and block devices, NBD exports
//!   ([`volume::nbd`]), qcow2 images ([`volume::qemu`]) and running QEMU disks ([`volume::qmp`]).
//! - [`policy`]: WebAssembly policies (the only module naming wasmtime): engine, registry, decisions.
//! - [`repo`]: the repository format over `object_store`: packs, pack indexes, manifests.
//! - [`catalog`]: the node's embedded database of volumes and committed snapshots.
//! - [`softlock`]: soft locks, lock sets and their registry; the one guard every deletion passes.
//! - [`state`]: a node's state directory (identity, catalog, repository), through cap-std.
//! - [`retention`]: built-in keep-last/keep-within pruning that never touches a locked snapshot.
//! - [`sample`]: deterministic sample images for the demo, benchmarks and tests.
//! - [`config`]: the daemon's `node.toml` (listener, peers, mirrors, schedules, retention).
//! - [`peer`]: the peer protocol (HTTP/2 over rustls): client, server, TLS, wire format.
//! - [`mirror`]: one mirror update, pulled by the downstream, with lock sets sent before and after.
//! - [`daemon`]: `holdfast daemon`: the listener, the scheduled jobs, status and metrics.
//! - [`ui`]: the daemon's read-only web page (`/ui`) and its JSON API (`/api/v1/`), and the
//!   cascade map ([`ui::cascade`]) drawn from jobs, lock paths and the upstreams' views.
//! - [`target`]: mirror targets (a directory or an S3 bucket): push, pull, locks, prune, gc.
//! - [`transfers`]: the log of every mirror update and push, whoever ran it, for `status`.
//! - [`snapshot`]: manifests and the operations: create, restore, diff, delete, verify, gc.
//! - [`cli`]: the `holdfast` command line (`host/src/main.rs` only calls [`cli::main`]).
//!
//! # Data flow of a snapshot
//!
//! image → [`volume::FileVolume`] → blocks → [`chunk`] (hash; skip zeros; compress new ones)
//! → [`repo::pack::PackBuilder`] → [`repo::Repository::put_pack`] (durable) → manifest
//! (durable, create-only) → [`catalog::Catalog::commit_snapshot`] (visible).
//! Restore runs it backwards and verifies every chunk against its id.

pub mod catalog;
pub mod chunk;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod id;
pub mod mirror;
pub mod peer;
pub mod policy;
pub mod region;
pub mod repo;
pub mod retention;
pub mod sample;
pub mod shutdown;
pub mod snapshot;
pub mod softlock;
pub mod state;
pub mod target;
mod telemetry;
pub mod transfers;
pub mod ui;
pub mod volume;

pub use error::{Error, Result};

/// The time every part of holdfast reads when set (milliseconds since the Unix epoch); 0 is
/// the real clock. See [`set_fake_now`].
static FAKE_NOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Milliseconds since the Unix epoch, now (or the simulated time, see [`set_fake_now`]).
pub fn now_unix_ms() -> u64 {
    match FAKE_NOW.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        fake => fake,
    }
}

/// Makes [`now_unix_ms`] answer `unix_ms` from now on, in this process (0: the real clock
/// again). The one seam of time: snapshot times and ids, lock and lease times, the time a
/// policy sees and retention's "now" all read `now_unix_ms`. `policy simulate` steps it through
/// a timeline; the binary sets it from `HOLDFAST_FAKE_NOW` (for tests that replay a timeline
/// for real). Timeouts, schedules and transfer timing still use the real clock.
pub fn set_fake_now(unix_ms: u64) {
    FAKE_NOW.store(unix_ms, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this process is a simulation (`tests/sim`): peers are reached through a simulated
/// network ([`peer::client::set_transport`]), and then the simulated time ([`set_fake_now`])
/// also drives back-offs, rate limits and lock-set generations. `HOLDFAST_FAKE_NOW` alone
/// (tests of the binary) moves only the dates.
static SIMULATING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn set_simulating(on: bool) {
    SIMULATING.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn simulated_ms() -> Option<u64> {
    match FAKE_NOW.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        fake => SIMULATING
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some(fake),
    }
}

/// Microseconds since the Unix epoch (in a simulation, its time).
pub fn now_unix_us() -> u64 {
    match simulated_ms() {
        Some(ms) => ms.saturating_mul(1000),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0),
    }
}

/// Milliseconds on a clock that never goes back (since this process first asked), for rates
/// and intervals; in a simulation, its time.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    match simulated_ms() {
        Some(ms) => ms,
        None => START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64,
    }
}

/// Waits `d` before trying something again (a retry's back-off). In a simulation the wait is
/// simulated: its clock moves on by `d` and the task yields, so that a history replays its
/// retries exactly and at once.
pub async fn back_off(d: std::time::Duration) {
    match simulated_ms() {
        None => tokio::time::sleep(d).await,
        Some(ms) => {
            let _ = FAKE_NOW.compare_exchange(
                ms,
                ms + d.as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
            tokio::task::yield_now().await;
        }
    }
}

/// A test hook (debug builds only; release builds compile it to nothing): the process waits
/// at the protocol step `point` if `HOLDFAST_PAUSE_AT` names it (a comma-separated list of
/// `POINT` or `POINT@PERCENT`, the chance of pausing at each pass). While it waits, the file
/// `$HOLDFAST_PAUSE_DIR/POINT.PID` exists; the process goes on once that file is removed. A
/// test thereby holds a push or gc at the one step whose window it attacks, as a SIGSTOP at
/// the right instant would, and resumes it when it chooses (`tests/tests/e2e/target_gc.rs`).
/// The points: `target-gc-decided` (a gc has read everything and decided, and has not
/// deleted or written anything), `target-push-before-manifest` (a push wrote its intent and
/// not its manifest), `target-push-before-confirm` (it wrote its manifest and has not
/// confirmed it), `snapshot-segment-read` (a snapshot read the data of a segment of an
/// image and has not looked again for holes filled meanwhile), `snapshot-base-chosen` (a
/// changed-block snapshot chose the snapshot it builds on and has not checked that it is
/// still in the catalog; its manifest may be read already), `snapshot-index-loaded` (a
/// snapshot loaded its chunk index while its source opens, without the repository lock when a
/// `frozen` hook is set, and has not yet taken the lock) and
/// `snapshot-delete-uncatalogued` (a deletion removed the snapshot from the catalog and has
/// not deleted its manifest).
pub fn pause_point(point: &str) {
    #[cfg(debug_assertions)]
    {
        let Ok(list) = std::env::var("HOLDFAST_PAUSE_AT") else {
            return;
        };
        let chance = list.split(',').find_map(|item| {
            let (name, percent) = item.split_once('@').unwrap_or((item, "100"));
            (name.trim() == point).then(|| percent.trim().parse::<u32>().unwrap_or(100))
        });
        let Some(percent) = chance else { return };
        if rand::random::<u32>() % 100 >= percent {
            return;
        }
        let dir = std::env::var_os("HOLDFAST_PAUSE_DIR").unwrap_or_else(|| ".".into());
        let flag = std::path::Path::new(&dir).join(format!("{point}.{}", std::process::id()));
        if std::fs::write(&flag, b"").is_err() {
            return;
        }
        tracing::warn!(
            "paused at {point} (test hook): remove {} to go on",
            flag.display()
        );
        while flag.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// Test-only failure injection: whether the failure point `name` fires now, which it does
/// once per process when `HOLDFAST_FAILPOINT` names it, and only in debug builds (a release
/// build compiles this to `false`, whatever the environment says). The points: `mirror-panic`
/// (the first mirror update a daemon job runs panics, so the tests can watch the daemon report
/// it and run the job again).
pub fn failpoint(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        static FIRED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        if std::env::var("HOLDFAST_FAILPOINT").is_ok_and(|v| v.split(',').any(|p| p == name)) {
            let mut fired = FIRED.lock().expect("not poisoned");
            if !fired.iter().any(|f| f == name) {
                fired.push(name.to_string());
                return true;
            }
        }
        false
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}

/// How long identical failure output stays out of the log after it was logged.
const REPEAT_QUIET: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether `text` from `source` (a policy, a job) should be logged now: not if the same text
/// was logged less than [`REPEAT_QUIET`] ago (a policy failing the same way on a one-second
/// schedule must not fill the log). `Some(n)`: log it, and say it was left out `n` times since.
pub(crate) fn first_in_a_while(source: &str, text: &str) -> Option<u64> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    /// Per source: the digest of the text last logged, when, and how often left out since.
    type Seen = HashMap<String, ([u8; 32], std::time::Instant, u64)>;
    static SEEN: Mutex<Option<Seen>> = Mutex::new(None);
    let digest = *blake3::hash(text.as_bytes()).as_bytes();
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let map = seen.get_or_insert_with(HashMap::new);
    match map.get_mut(source) {
        Some((d, at, left_out)) if *d == digest && at.elapsed() < REPEAT_QUIET => {
            *left_out += 1;
            None
        }
        Some(entry) => {
            let n = if entry.0 == digest { entry.2 } else { 0 };
            *entry = (digest, std::time::Instant::now(), 0);
            Some(n)
        }
        None => {
            map.insert(source.to_string(), (digest, std::time::Instant::now(), 0));
            Some(0)
        }
    }
}
