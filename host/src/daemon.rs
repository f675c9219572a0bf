//! `holdfast daemon`: serves the peer protocol and runs the node's schedules (mirror updates,
//! snapshots, retention), keeps their status for `holdfast status` and exports metrics.
//!
//! Jobs of one volume run one at a time (a per-volume mutex); jobs of different volumes run
//! side by side. A job that fails is logged with its outcome, counted, shown in `status`, and
//! tried again at its next scheduled time; the daemon lives on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{NodeConfig, Schedule};
use crate::error::{Error, Result};
use crate::id::{NodeId, VolumeName};
use crate::mirror::{self, MirrorReport};
use crate::peer::server::{Reporter, ServedCounters, ServerState};
use crate::policy::PolicyEngine;
use crate::state::Node;

/// The file in the state directory that tells local commands how to reach the daemon.
pub const DAEMON_FILE: &str = "daemon.json";

/// What `daemon.json` holds (mode 0600: the admin token is in it).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DaemonFile {
    pub pid: u32,
    pub node: NodeId,
    pub url: String,
    pub admin_token: String,
    /// The certificate to trust for `url` (the daemon's own), when it speaks TLS.
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    Mirror,
    Push,
    Snapshot,
    Retention,
}

/// One scheduled job and how it went.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobStatus {
    pub kind: JobKind,
    pub volume: VolumeName,
    /// Push jobs: the target.
    pub target: Option<String>,
    pub upstream: Option<NodeId>,
    pub schedule: String,
    pub runs: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    pub running: bool,
    pub last_started_unix_ms: Option<u64>,
    pub last_finished_unix_ms: Option<u64>,
    pub last_ok: Option<bool>,
    pub last_error: Option<String>,
    pub last_summary: Option<String>,
    pub next_run_unix_ms: Option<u64>,
    /// Mirror jobs: the last update that ran to the end.
    pub last_transfer: Option<MirrorReport>,
    /// A reload removed or changed the job: it runs no more once its current run ends.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
}

impl JobStatus {
    fn new(j: &Job) -> Self {
        JobStatus {
            kind: j.kind,
            volume: j.volume.clone(),
            target: j.target.clone(),
            upstream: j.upstream.clone(),
            schedule: j.schedule.to_string(),
            runs: 0,
            failures: 0,
            consecutive_failures: 0,
            running: false,
            last_started_unix_ms: None,
            last_finished_unix_ms: None,
            last_ok: None,
            last_error: None,
            last_summary: None,
            next_run_unix_ms: None,
            last_transfer: None,
            stopping: false,
        }
    }

    /// `mirror vm1 <- a`, `push vm1 -> bucket`, `snapshot vm1`: for logs.
    fn describe(&self) -> String {
        match (&self.upstream, &self.target) {
            (Some(u), _) => format!("{:?} {} <- {u}", self.kind, self.volume),
            (_, Some(t)) => format!("{:?} {} -> {t}", self.kind, self.volume),
            _ => format!("{:?} {}", self.kind, self.volume),
        }
        .to_lowercase()
    }
}

/// A job the daemon runs: its definition, how it goes, and the switch a reload uses to end it.
struct JobEntry {
    id: u64,
    /// Equal for two definitions that are the same job (see [`Job::identity`]).
    identity: String,
    status: JobStatus,
    stop: tokio::sync::watch::Sender<bool>,
}

#[derive(Clone)]
struct Job {
    kind: JobKind,
    volume: VolumeName,
    target: Option<String>,
    upstream: Option<NodeId>,
    schedule: Schedule,
    keep: crate::retention::KeepRules,
    /// Retention jobs: gc after pruning.
    gc: bool,
    /// Snapshot jobs: commands run around each snapshot.
    hooks: crate::snapshot::hooks::Hooks,
    /// Snapshot jobs: how often to read everything anyway.
    full_read_every: Option<Duration>,
}

impl Job {
    /// Everything that defines the job: a reload keeps a job whose identity is unchanged
    /// running as it was, and replaces one whose identity changed.
    fn identity(&self) -> String {
        format!(
            "{:?}|{}|{:?}|{:?}|{}|{:?}|{}|{:?}|{:?}",
            self.kind,
            self.volume,
            self.target,
            self.upstream,
            self.schedule,
            self.keep,
            self.gc,
            self.hooks,
            self.full_read_every
        )
    }
}

/// The jobs a configuration asks for, checked against the node (scheduled volumes and pushed
/// targets must exist).
fn jobs_of(node: &Node, cfg: &NodeConfig, reload: bool) -> Result<Vec<Job>> {
    // A volume a job works on exists here, or is a replica a mirror relation brings. A reload
    // that names another is refused; at start such a job is kept (and fails each run, which
    // status shows), so that one stale entry does not keep a whole node down.
    let known = |v: &VolumeName, what: &str| -> Result<()> {
        if cfg.mirror.iter().any(|m| m.volume == *v) || node.catalog.volume(v).is_ok() {
            return Ok(());
        }
        let e = Error::not_found(format!(
            "{}: the {what} of volume {v}: there is no such volume on this node and no \
             [[mirror]] brings it (`holdfast volume list`)",
            cfg.path.display()
        ));
        if reload {
            return Err(e);
        }
        tracing::warn!("{e}");
        Ok(())
    };
    let mut jobs = Vec::new();
    for m in &cfg.mirror {
        jobs.push(Job {
            kind: JobKind::Mirror,
            volume: m.volume.clone(),
            target: None,
            upstream: Some(m.upstream.clone()),
            schedule: m.when.schedule("mirror")?,
            keep: Default::default(),
            gc: false,
            hooks: Default::default(),
            full_read_every: None,
        });
    }
    for s in &cfg.schedule {
        node.catalog.volume(&s.volume)?;
        jobs.push(Job {
            kind: JobKind::Snapshot,
            volume: s.volume.clone(),
            target: None,
            upstream: None,
            schedule: s.when.schedule("schedule")?,
            keep: Default::default(),
            gc: false,
            hooks: crate::snapshot::hooks::Hooks {
                before: s.before.clone(),
                frozen: s.frozen.clone(),
                after: s.after.clone(),
            },
            full_read_every: match &s.full_read_every {
                Some(d) => Some(crate::config::parse_duration("full_read_every", d)?),
                None => None,
            },
        });
    }
    for p in &cfg.push {
        known(&p.volume, "[[push]]")?;
        crate::target::Targets::new(node).get(&p.target)?;
        jobs.push(Job {
            kind: JobKind::Push,
            volume: p.volume.clone(),
            target: Some(p.target.clone()),
            upstream: None,
            schedule: p.when.schedule("push")?,
            keep: Default::default(),
            gc: false,
            hooks: Default::default(),
            full_read_every: None,
        });
    }
    for r in &cfg.retention {
        known(&r.volume, "[[retention]]")?;
        jobs.push(Job {
            kind: JobKind::Retention,
            volume: r.volume.clone(),
            target: None,
            upstream: None,
            schedule: r.when.schedule("retention")?,
            keep: crate::retention::KeepRules {
                keep_last: r.keep_last,
                keep_within: match &r.keep_within {
                    Some(w) => Some(crate::config::parse_duration("keep_within", w)?),
                    None => None,
                },
            },
            gc: r.gc,
            hooks: Default::default(),
            full_read_every: None,
        });
    }
    Ok(jobs)
}

/// Where the configuration came from and when it was (re)loaded, for `status`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct ConfigInfo {
    path: PathBuf,
    loaded_unix_ms: u64,
    reloads: u64,
    /// The last reload that was refused, and why (the configuration before it stayed).
    last_refused: Option<String>,
    last_refused_unix_ms: Option<u64>,
}

pub struct Daemon {
    node: Arc<Node>,
    /// Replaced whole by a reload; a job takes the one current when it starts and keeps it
    /// to its end.
    cfg: std::sync::RwLock<Arc<NodeConfig>>,
    config_info: Mutex<ConfigInfo>,
    engine: Option<Arc<PolicyEngine>>,
    jobs: Mutex<Vec<JobEntry>>,
    next_job_id: std::sync::atomic::AtomicU64,
    /// Set when the daemon is stopping: no job starts a new run.
    draining: tokio::sync::watch::Sender<bool>,
    served: Arc<ServedCounters>,
    volume_locks: Mutex<HashMap<VolumeName, Arc<tokio::sync::Mutex<()>>>>,
    started_unix_ms: u64,
    listen: Option<String>,
    /// A retention run pruned something but could not gc: the next retention run does.
    gc_pending: std::sync::atomic::AtomicBool,
    /// What the gc after deletions last did when it was due (ran, deferred, failed).
    gc_attempt: Mutex<Option<String>>,
    /// The daemon's own gc while it runs (`gc after deletions`, `gc of target NAME`).
    gc_running: Mutex<Option<String>>,
}

impl Daemon {
    fn volume_lock(&self, v: &VolumeName) -> Arc<tokio::sync::Mutex<()>> {
        self.volume_locks
            .lock()
            .expect("not poisoned")
            .entry(v.clone())
            .or_default()
            .clone()
    }

    fn cfg(&self) -> Arc<NodeConfig> {
        self.cfg.read().expect("not poisoned").clone()
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut JobStatus)) {
        if let Some(e) = self
            .jobs
            .lock()
            .expect("not poisoned")
            .iter_mut()
            .find(|e| e.id == id)
        {
            f(&mut e.status);
        }
    }

    /// The jobs running now, described for a log line.
    fn running_jobs(&self) -> Vec<String> {
        self.jobs
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|e| e.status.running)
            .map(|e| e.status.describe())
            .chain(self.gc_running.lock().expect("not poisoned").clone())
            .collect()
    }

    /// Marks the daemon's own gc as running until the guard is dropped (however the gc ends).
    fn gc_running(&self, what: String) -> impl Drop + '_ {
        struct Running<'a>(&'a Mutex<Option<String>>);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                *self.0.lock().expect("not poisoned") = None;
            }
        }
        *self.gc_running.lock().expect("not poisoned") = Some(what);
        Running(&self.gc_running)
    }

    /// Registers a job and starts its loop.
    fn start_job(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>, job: Job) {
        let id = self.next_job_id.fetch_add(1, Ordering::Relaxed);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        self.jobs.lock().expect("not poisoned").push(JobEntry {
            id,
            identity: job.identity(),
            status: JobStatus::new(&job),
            stop,
        });
        tasks.spawn(self.clone().job_loop(id, job, stopped));
    }

    async fn run_job(&self, job: &Job) -> Result<(String, Option<MirrorReport>)> {
        let hidden = indicatif::ProgressBar::hidden();
        match job.kind {
            JobKind::Mirror => {
                if crate::failpoint("mirror-panic") {
                    panic!("failure point mirror-panic (HOLDFAST_FAILPOINT, for tests only)");
                }
                let r = mirror::run(
                    &self.node,
                    &self.cfg(),
                    &job.volume,
                    self.engine.as_deref(),
                    &hidden,
                )
                .await?;
                Ok((r.summary(), Some(r)))
            }
            JobKind::Push => {
                let name = job.target.as_deref().unwrap_or_default();
                let rec = crate::target::Targets::new(&self.node).get(name)?;
                let r = crate::target::push(&self.node, &rec, &job.volume, &hidden).await?;
                Ok((r.summary(), None))
            }
            JobKind::Snapshot => {
                let opts = crate::snapshot::create::CreateOptions {
                    hooks: job.hooks.clone(),
                    full_read: crate::snapshot::create::FullRead {
                        now: false,
                        every: job.full_read_every,
                    },
                    ..Default::default()
                };
                let r =
                    crate::snapshot::create::create(&self.node, &job.volume, opts, &hidden).await?;
                if let Some(engine) = &self.engine {
                    crate::policy::registry::decide_locks(
                        &self.node,
                        engine,
                        &job.volume,
                        crate::policy::Phase::SnapshotCreated,
                        crate::policy::registry::Asked::HandlingPhase,
                        true,
                    )?;
                }
                Ok((
                    format!(
                        "took {} ({} new chunks) in {:.2}s",
                        r.record.display_ref(),
                        r.record.stats.new_chunks,
                        r.elapsed.as_secs_f64()
                    ),
                    None,
                ))
            }
            JobKind::Retention => {
                let has_policies = !crate::policy::registry::Policies::new(&self.node)
                    .for_volume(&job.volume)?
                    .is_empty();
                if has_policies
                    && let Some(engine) = &self.engine
                    && let Some(r) =
                        crate::retention::prune_by_policies(&self.node, engine, &job.volume, false)
                            .await?
                {
                    let gc = self.gc_after_prune(job, r.pruned.len()).await?;
                    return Ok((
                        format!(
                            "pruned {:?} by policies; kept locked {}{gc}",
                            r.pruned,
                            r.kept_locked.len()
                        ),
                        None,
                    ));
                }
                if job.keep.keep_last.is_none() && job.keep.keep_within.is_none() {
                    return Err(Error::invalid(format!(
                        "retention of {} has no rule: give keep_last and/or keep_within, or \
                         register a retention policy for the volume",
                        job.volume
                    )));
                }
                let r = crate::retention::prune(&self.node, &job.volume, &job.keep, false).await?;
                let gc = self.gc_after_prune(job, r.pruned.len()).await?;
                Ok((
                    format!(
                        "pruned {:?}; {} kept only because of locks{gc}",
                        r.pruned,
                        r.plan.kept_for_locks().count() + r.locked_meanwhile.len()
                    ),
                    None,
                ))
            }
        }
    }

    /// Reclaims what a retention run pruned, if the job asks for it and the repository is
    /// idle (otherwise the next retention run does); returns the words for the job's summary.
    /// A gc that fails does not fail the prune before it.
    async fn gc_after_prune(&self, job: &Job, pruned: usize) -> Result<String> {
        use std::sync::atomic::Ordering;
        // What any deletion left (the daemon's own gc may have taken it already).
        let waiting = self
            .node
            .catalog
            .gc_state()
            .map_or(true, |s| s.deleted_snapshots > 0);
        if !job.gc || (pruned == 0 && !self.gc_pending.load(Ordering::Relaxed)) || !waiting {
            return Ok(String::new());
        }
        let hidden = indicatif::ProgressBar::hidden();
        let outcome = crate::snapshot::gc::gc_when_idle(&self.node, &hidden).await;
        self.gc_pending
            .store(!matches!(outcome, Ok(Some(_))), Ordering::Relaxed);
        Ok(match outcome {
            Err(e) => {
                tracing::warn!("gc after retention failed (the next run tries again): {e}");
                format!("; gc failed: {e}")
            }
            Ok(Some(g)) => {
                tracing::info!(
                    packs_deleted = g.packs_deleted,
                    packs_repacked = g.packs_repacked,
                    bytes_freed = g.bytes_freed,
                    "gc after retention"
                );
                format!(
                    "; gc freed {} bytes ({} packs deleted, {} repacked)",
                    g.bytes_freed, g.packs_deleted, g.packs_repacked
                )
            }
            Ok(None) => "; gc deferred: the repository is busy".to_string(),
        })
    }

    /// Reclaims the space of deleted snapshots, whatever deleted them, when enough is dead
    /// (an estimate: what they added) or the oldest deletion waited long enough, and the
    /// repository is idle; a repository that stays busy is waited for after three looks.
    /// Then the targets this node pushes to, each once per `target_every`.
    async fn gc_loop(self: Arc<Self>) {
        let mut deferred = 0u32;
        let mut draining = self.draining.subscribe();
        loop {
            // Read each round: a reload may change them (they were checked when loaded).
            let cfg = self.cfg();
            let Ok((every, min_dead, max_wait, target_every)) = cfg.gc.parsed() else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = draining.wait_for(|d| *d) => return,
                _ = crate::shutdown::wait() => return,
            }
            if !self.cfg().gc.enabled {
                continue;
            }
            let max_wait_ms = u64::try_from(max_wait.as_millis()).unwrap_or(u64::MAX);
            let state = match self.node.catalog.gc_state() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("reading what deletions left for gc: {e}");
                    continue;
                }
            };
            let waited = state
                .since_unix_ms
                .map_or(0, |t| crate::now_unix_ms().saturating_sub(t));
            let due = state.deleted_snapshots > 0
                && (state.dead_bytes_estimate >= min_dead || waited >= max_wait_ms);
            if due {
                let _running = self.gc_running("gc after deletions".into());
                self.gc_after_deletions(&state, &mut deferred).await;
            }
            self.gc_targets(target_every).await;
        }
    }

    /// One gc after deletions (see [`Daemon::gc_loop`]).
    async fn gc_after_deletions(&self, state: &crate::catalog::GcState, deferred: &mut u32) {
        let hidden = indicatif::ProgressBar::hidden();
        let run = if *deferred >= 3 {
            crate::snapshot::gc::gc_waiting(self.node.clone(), &hidden)
                .await
                .map(Some)
        } else {
            crate::snapshot::gc::gc_when_idle(&self.node, &hidden).await
        };
        let outcome = match run {
            Ok(Some(g)) => {
                *deferred = 0;
                tracing::info!(
                    deleted_snapshots = state.deleted_snapshots,
                    packs_deleted = g.packs_deleted,
                    packs_repacked = g.packs_repacked,
                    bytes_freed = g.bytes_freed,
                    "gc after deletions"
                );
                format!(
                    "freed {} bytes after {} deletion(s)",
                    g.bytes_freed, state.deleted_snapshots
                )
            }
            Ok(None) => {
                *deferred += 1;
                "deferred: the repository is busy (after three looks, gc waits for it)".into()
            }
            Err(e) => {
                tracing::warn!("gc after deletions failed (it tries again): {e}");
                format!("failed: {e}")
            }
        };
        *self.gc_attempt.lock().expect("not poisoned") = Some(outcome);
    }

    /// Gcs each target this node pushes to, once per `target_every` (the last run is kept in
    /// the catalog, so restarts do not repeat it).
    async fn gc_targets(&self, target_every: Duration) {
        let cfg = self.cfg();
        let mut targets: Vec<&str> = cfg.push.iter().map(|p| p.target.as_str()).collect();
        targets.sort_unstable();
        targets.dedup();
        for name in targets {
            let last = self
                .node
                .catalog
                .gc_state()
                .ok()
                .and_then(|s| s.targets.get(name).map(|t| t.finished_unix_ms))
                .unwrap_or(0);
            let every_ms = u64::try_from(target_every.as_millis()).unwrap_or(u64::MAX);
            if crate::now_unix_ms().saturating_sub(last) < every_ms || *self.draining.borrow() {
                continue;
            }
            let _running = self.gc_running(format!("gc of target {name}"));
            let run = async {
                let repo = crate::target::Targets::new(&self.node).open(name).await?;
                crate::target::gc(&repo, &self.node.info.node_id, false).await
            };
            let (ok, summary) = match run.await {
                Ok(r) => {
                    tracing::info!(
                        target = name,
                        packs_condemned = r.packs_condemned,
                        packs_deleted = r.packs_deleted,
                        bytes_freed = r.bytes_freed,
                        "target gc"
                    );
                    (
                        true,
                        format!(
                            "condemned {} pack(s), deleted {} ({} bytes freed)",
                            r.packs_condemned, r.packs_deleted, r.bytes_freed
                        ),
                    )
                }
                Err(e) => {
                    tracing::warn!("gc of target {name} failed (it tries again): {e}");
                    (false, format!("failed: {e}"))
                }
            };
            // A failed run is tried again at the next look.
            let done = crate::catalog::TargetGcDone {
                finished_unix_ms: if ok { crate::now_unix_ms() } else { last },
                summary,
            };
            if let Err(e) = self.node.catalog.target_gc_done(name, done) {
                tracing::warn!("could not record the gc of target {name}: {e}");
            }
        }
    }

    /// Records in the transfer log a mirror or push run that ended without recording itself
    /// (it panicked), so that `status` counts it.
    fn record_unfinished(&self, job: &Job, err: &Error) {
        let relation = match (job.kind, &job.upstream, &job.target) {
            (JobKind::Mirror, Some(upstream), _) => crate::transfers::Relation::Mirror {
                volume: job.volume.clone(),
                upstream: upstream.to_string(),
            },
            (JobKind::Push, _, Some(target)) => crate::transfers::Relation::Push {
                volume: job.volume.clone(),
                target: target.clone(),
            },
            _ => return,
        };
        crate::transfers::record(&self.node.catalog, relation, Err(err));
    }

    /// Runs a job at its times until a reload ends it (`stop`: its current run finishes
    /// first) or the daemon stops.
    async fn job_loop(
        self: Arc<Self>,
        id: u64,
        job: Job,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut draining = self.draining.subscribe();
        // Mirrors catch up at start; snapshots and retention wait for their first slot.
        let mut delay = match job.kind {
            JobKind::Mirror => Duration::ZERO,
            _ => job.schedule.next_delay(),
        };
        loop {
            self.update(id, |s| {
                s.next_run_unix_ms = Some(crate::now_unix_ms() + delay.as_millis() as u64)
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => break,
                _ = draining.wait_for(|d| *d) => return,
            }
            let lock = self.volume_lock(&job.volume);
            let _guard = tokio::select! {
                g = lock.lock() => g,
                _ = stop.wait_for(|s| *s) => break,
                _ = draining.wait_for(|d| *d) => return,
            };
            if *stop.borrow() {
                break;
            }
            // Under the jobs' mutex, which `stop` holds to set `draining`: a run either starts
            // before the stop begins (and is waited for) or not at all.
            let started = {
                let mut jobs = self.jobs.lock().expect("not poisoned");
                let go = !crate::shutdown::requested() && !*draining.borrow();
                if go && let Some(e) = jobs.iter_mut().find(|e| e.id == id) {
                    e.status.running = true;
                    e.status.last_started_unix_ms = Some(crate::now_unix_ms());
                }
                go
            };
            if !started {
                return;
            }
            let t0 = Instant::now();
            // In a task of its own, so that a job that panics is a failed run (reported and
            // tried again at its next time), never a job that silently stops.
            let result = {
                let (d, j) = (self.clone(), job.clone());
                match tokio::spawn(async move { d.run_job(&j).await }).await {
                    Ok(r) => r,
                    Err(e) => {
                        let err = Error::internal(format!(
                            "the {:?} job of {} {}: {}",
                            job.kind,
                            job.volume,
                            if e.is_panic() {
                                "panicked"
                            } else {
                                "was cancelled"
                            },
                            panic_message(e)
                        ));
                        // A run that unwound never reached the transfer log, from which
                        // `status` takes a relation's counts: it goes there as a failure.
                        self.record_unfinished(&job, &err);
                        Err(err)
                    }
                }
            };
            let secs = t0.elapsed().as_secs_f64();
            let upstream = job
                .upstream
                .as_ref()
                .map_or_else(String::new, |u| u.to_string());
            match &result {
                Ok((line, _)) => {
                    tracing::info!(job = ?job.kind, volume = %job.volume, upstream, seconds = secs, outcome = "ok", "{line}");
                }
                Err(e) => {
                    // The same failure again and again is logged once per ten minutes; status
                    // and the metrics count every one.
                    let said = e.to_string();
                    let source = format!("job/{:?}/{}/{upstream}", job.kind, job.volume);
                    if let Some(left_out) = crate::first_in_a_while(&source, &said) {
                        tracing::warn!(job = ?job.kind, volume = %job.volume, upstream, seconds = secs, outcome = "error", left_out, "{said}");
                    }
                }
            }
            self.update(id, |s| {
                s.running = false;
                s.runs += 1;
                s.last_finished_unix_ms = Some(crate::now_unix_ms());
                match result {
                    Ok((line, report)) => {
                        s.last_ok = Some(true);
                        s.last_error = None;
                        s.consecutive_failures = 0;
                        s.last_summary = Some(line);
                        if report.is_some() {
                            s.last_transfer = report;
                        }
                    }
                    Err(e) => {
                        s.last_ok = Some(false);
                        s.failures += 1;
                        s.consecutive_failures += 1;
                        s.last_error = Some(e.to_string());
                    }
                }
            });
            drop(_guard);
            if *stop.borrow() {
                break;
            }
            delay = job.schedule.next_delay();
        }
        // Ended by a reload: it no longer exists.
        tracing::info!(job = ?job.kind, volume = %job.volume, "job removed by a configuration reload");
        self.jobs
            .lock()
            .expect("not poisoned")
            .retain(|e| e.id != id);
    }

    /// Forwards changed downstream lock sets upstream at once (see `mirror::forward_locks`).
    async fn forward_loop(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<VolumeName>,
    ) {
        while let Some(first) = rx.recv().await {
            let mut volumes = std::collections::BTreeSet::from([first]);
            while let Ok(v) = rx.try_recv() {
                volumes.insert(v);
            }
            for v in volumes {
                if self.cfg().mirror_of(&v).is_err() {
                    continue; // the top of the cascade: nobody to tell
                }
                let lock = self.volume_lock(&v);
                let _guard = lock.lock().await;
                let t0 = Instant::now();
                // In a task of its own: a panic is a failed forward, not the end of forwarding.
                let (node, cfg, vol) = (self.node.clone(), self.cfg(), v.clone());
                let forwarded =
                    tokio::spawn(async move { mirror::forward_locks(&node, &cfg, &vol).await })
                        .await
                        .unwrap_or_else(|e| {
                            Err(Error::internal(format!(
                                "forwarding locks: {}",
                                panic_message(e)
                            )))
                        });
                match forwarded {
                    Ok(n) => {
                        tracing::info!(volume = %v, locks = n, ms = t0.elapsed().as_millis() as u64, outcome = "ok", "forwarded downstream locks upstream")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v, outcome = "error", "forwarding downstream locks failed (the next update sends them): {e}")
                    }
                }
            }
        }
    }

    fn lock_report(&self) -> Result<serde_json::Value> {
        let now = crate::now_unix_ms();
        let mut vols = Vec::new();
        for v in self.node.catalog.volumes()? {
            let sets = self.node.catalog.locks().sets(Some(&v.name))?;
            let mut here = Vec::new();
            let mut down = Vec::new();
            for s in sets {
                let stale_since = s
                    .locks
                    .iter()
                    .filter_map(|l| l.expires_unix_ms())
                    .filter(|&e| e <= now)
                    .min();
                let mut snaps: Vec<String> =
                    s.locks.iter().map(|l| l.snapshot.to_string()).collect();
                snaps.sort();
                snaps.dedup();
                let entry = serde_json::json!({
                    "holder": s.holder,
                    "generation": s.generation,
                    "locks": s.locks.len(),
                    "snapshots": snaps,
                    "refreshed-unix-ms": s.refreshed_unix_ms,
                    "seen-ago-ms": now.saturating_sub(s.refreshed_unix_ms),
                    "stale": stale_since.is_some(),
                    "stale-for-ms": stale_since.map(|e| now.saturating_sub(e)),
                });
                if s.holder.application_name().is_some() {
                    here.push(entry);
                } else {
                    down.push(entry);
                }
            }
            let snaps = self.node.catalog.snapshots(&v.name)?;
            vols.push(serde_json::json!({
                "volume": v.name,
                "replica-of": v.upstream,
                "snapshots": snaps.len(),
                "newest": snaps.last().map(|s| s.display_ref()),
                "newest-created-unix-ms": snaps.last().map(|s| s.created_unix_ms),
                "held-here": here,
                "from-downstream": down,
            }));
        }
        Ok(serde_json::Value::Array(vols))
    }
}

impl Daemon {
    /// The jobs, with the counts of their relations' transfer logs: every mirror update and
    /// push of the relation, whether the daemon or a command line ran it.
    fn jobs_with_transfers(&self) -> Result<Vec<JobStatus>> {
        let mut jobs: Vec<JobStatus> = self
            .jobs
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|e| e.status.clone())
            .collect();
        let logs = crate::transfers::all(&self.node.catalog)?;
        for j in &mut jobs {
            let log = logs.iter().find(|l| match (&l.relation, j.kind) {
                (crate::transfers::Relation::Mirror { volume, .. }, JobKind::Mirror) => {
                    *volume == j.volume
                }
                (crate::transfers::Relation::Push { volume, target }, JobKind::Push) => {
                    *volume == j.volume && Some(target) == j.target.as_ref()
                }
                _ => false,
            });
            let Some(log) = log else { continue };
            j.runs = log.runs;
            j.failures = log.failures;
            j.consecutive_failures = log.consecutive_failures;
            j.last_ok = Some(log.last_ok);
            j.last_error = log.last_error.clone();
            j.last_summary = log.last_summary.clone();
            j.last_finished_unix_ms = Some(log.last_finished_unix_ms);
            if j.kind == JobKind::Mirror {
                j.last_transfer = log
                    .last_report
                    .clone()
                    .and_then(|r| serde_json::from_value(r).ok());
            }
        }
        Ok(jobs)
    }
}

impl Daemon {
    /// What deletions left for gc, the last gc, and when the daemon runs one.
    fn gc_status(&self) -> Result<serde_json::Value> {
        let state = self.node.catalog.gc_state()?;
        let mut v = serde_json::to_value(&state).map_err(|e| Error::internal(e.to_string()))?;
        let cfg = self.cfg();
        v["enabled"] = cfg.gc.enabled.into();
        v["every"] = cfg.gc.every.clone().into();
        v["min-dead"] = cfg.gc.min_dead.clone().into();
        v["max-wait"] = cfg.gc.max_wait.clone().into();
        v["last-attempt"] = self.gc_attempt.lock().expect("not poisoned").clone().into();
        Ok(v)
    }
}

impl Reporter for Daemon {
    fn status(&self) -> Result<serde_json::Value> {
        let jobs = self.jobs_with_transfers()?;
        let now = crate::now_unix_ms();
        let locks = self.lock_report()?;
        let relations: Vec<serde_json::Value> = jobs
            .iter()
            .filter(|j| j.kind == JobKind::Mirror)
            .map(|j| {
                let newest = self
                    .node
                    .catalog
                    .snapshots(&j.volume)
                    .ok()
                    .and_then(|s| s.last().map(|s| s.created_unix_ms));
                // The region the replica holds (its relation's, or its upstream's).
                let region = self
                    .node
                    .catalog
                    .volume(&j.volume)
                    .ok()
                    .and_then(|v| v.region)
                    .or_else(|| {
                        self.cfg()
                            .mirror_of(&j.volume)
                            .ok()
                            .and_then(|m| m.region.clone())
                    });
                serde_json::json!({
                    "volume": j.volume,
                    "region": region,
                    "upstream": j.upstream,
                    "lag-ms": newest.map(|c| now.saturating_sub(c)),
                    "newest-unix-ms": newest,
                    "job": j,
                })
            })
            .collect();
        let failures = crate::policy::registry::Policies::new(&self.node).failures()?;
        Ok(serde_json::json!({
            "node": self.node.info.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "started-unix-ms": self.started_unix_ms,
            "now-unix-ms": now,
            "listen": self.listen,
            "config": self.config_info.lock().expect("not poisoned").clone(),
            "relations": relations,
            "jobs": jobs,
            "volumes": locks,
            "policy-failures": failures,
            "gc": self.gc_status()?,
            "served-bytes": *self.served.chunk_bytes.lock().expect("not poisoned"),
            "denied-requests": self.served.denied.load(Ordering::Relaxed),
        }))
    }

    fn metrics(&self) -> String {
        metrics_text(self).unwrap_or_else(|e| format!("# error: {e}\n"))
    }
}

fn metrics_text(d: &Daemon) -> Result<String> {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;
    type Labels = Vec<(String, String)>;
    let l = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut reg = Registry::with_prefix("holdfast");
    let transfers = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let lag = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let locks = Family::<Labels, Gauge>::default();
    let stale = Family::<Labels, Gauge>::default();
    let snaps = Family::<Labels, Gauge>::default();
    let failures = Family::<Labels, Counter>::default();
    let served = Family::<Labels, Counter>::default();
    let denied = Counter::<u64>::default();
    let job_failures = Family::<Labels, Gauge>::default();
    let gc_state = d.node.catalog.gc_state()?;
    let gc_dead = Gauge::<i64>::default();
    gc_dead.set(gc_state.dead_bytes_estimate as i64);
    let gc_deleted = Gauge::<i64>::default();
    gc_deleted.set(gc_state.deleted_snapshots as i64);
    let gc_last = Gauge::<i64>::default();
    gc_last.set(
        gc_state
            .last
            .as_ref()
            .map_or(0, |l| (l.finished_unix_ms / 1000) as i64),
    );
    // Every update of every relation, whoever ran it (the transfer log).
    // Series of a volume removed since are not kept alive by its old transfer log.
    let present: std::collections::HashSet<VolumeName> = d
        .node
        .catalog
        .volumes()?
        .into_iter()
        .map(|v| v.name)
        .collect();
    for log in crate::transfers::all(&d.node.catalog)? {
        let crate::transfers::Relation::Mirror { volume, upstream } = &log.relation else {
            continue;
        };
        if !present.contains(volume) {
            continue;
        }
        for (kind, n) in &log.by_kind {
            transfers
                .get_or_create(&l(&[
                    ("volume", volume.as_str()),
                    ("upstream", upstream),
                    ("kind", kind),
                    ("outcome", "ok"),
                ]))
                .inc_by(*n);
        }
        if log.failures > 0 {
            transfers
                .get_or_create(&l(&[
                    ("volume", volume.as_str()),
                    ("upstream", upstream),
                    ("kind", "none"),
                    ("outcome", "error"),
                ]))
                .inc_by(log.failures);
        }
        bytes
            .get_or_create(&l(&[("volume", volume.as_str()), ("upstream", upstream)]))
            .inc_by(log.bytes);
    }
    let now = crate::now_unix_ms();
    for j in d.jobs_with_transfers()?.iter() {
        let kind = format!("{:?}", j.kind).to_lowercase();
        job_failures
            .get_or_create(&l(&[("volume", j.volume.as_str()), ("job", &kind)]))
            .set(j.consecutive_failures as i64);
    }
    for v in d.node.catalog.volumes()? {
        let s = d.node.catalog.snapshots(&v.name)?;
        snaps
            .get_or_create(&l(&[("volume", v.name.as_str())]))
            .set(s.len() as i64);
        if v.upstream.is_some()
            && let Some(newest) = s.last()
        {
            let region = v.region.as_ref().map_or("", |r| r.as_str());
            lag.get_or_create(&l(&[("volume", v.name.as_str()), ("region", region)]))
                .set(now.saturating_sub(newest.created_unix_ms) as f64 / 1000.0);
        }
        let (mut here, mut down, mut stale_n) = (0i64, 0i64, 0i64);
        for set in d.node.catalog.locks().sets(Some(&v.name))? {
            if set.holder.application_name().is_some() {
                here += set.locks.len() as i64;
            } else {
                down += set.locks.len() as i64;
            }
            if set.locks.iter().any(|l| l.is_stale(now)) {
                stale_n += 1;
            }
        }
        locks
            .get_or_create(&l(&[("volume", v.name.as_str()), ("source", "here")]))
            .set(here);
        locks
            .get_or_create(&l(&[("volume", v.name.as_str()), ("source", "downstream")]))
            .set(down);
        stale
            .get_or_create(&l(&[("volume", v.name.as_str())]))
            .set(stale_n);
    }
    for (name, f) in crate::policy::registry::Policies::new(&d.node).failures()? {
        failures
            .get_or_create(&l(&[("policy", &name)]))
            .inc_by(f.count);
    }
    for (peer, n) in d.served.chunk_bytes.lock().expect("not poisoned").iter() {
        served.get_or_create(&l(&[("peer", peer)])).inc_by(*n);
    }
    denied.inc_by(d.served.denied.load(Ordering::Relaxed));
    reg.register(
        "mirror_transfers",
        "Mirror updates by volume, upstream, kind and outcome",
        transfers,
    );
    reg.register(
        "mirror_received_bytes",
        "Chunk bytes received from upstreams",
        bytes,
    );
    reg.register(
        "mirror_lag_seconds",
        "Age of the newest snapshot of a replica (region: the part of the volume it holds)",
        lag,
    );
    reg.register("locks", "Soft locks held on this node, by source", locks);
    reg.register("stale_holders", "Lock holders whose lease ran out", stale);
    reg.register("snapshots", "Snapshots per volume", snaps);
    reg.register("policy_failures", "Policy calls that failed", failures);
    reg.register(
        "served_chunk_bytes",
        "Chunk bytes served to downstreams",
        served,
    );
    reg.register("denied_requests", "Peer requests refused", denied);
    reg.register(
        "job_consecutive_failures",
        "Consecutive failures of each scheduled job",
        job_failures,
    );
    reg.register(
        "gc_dead_bytes_estimate",
        "Stored bytes of the snapshots deleted since the last gc (what gc may free)",
        gc_dead,
    );
    reg.register(
        "gc_deleted_snapshots",
        "Snapshots deleted since the last gc",
        gc_deleted,
    );
    reg.register(
        "gc_last_run_timestamp_seconds",
        "When the last gc finished (0: never)",
        gc_last,
    );
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| Error::internal(format!("encoding metrics: {e}")))?;
    Ok(out)
}

fn write_daemon_file(node: &Node, f: &DaemonFile) -> Result<()> {
    use cap_std::fs::OpenOptionsExt;
    use std::io::Write;
    let bytes = serde_json::to_vec_pretty(f).map_err(|e| Error::internal(e.to_string()))?;
    let tmp = format!(".{DAEMON_FILE}.tmp");
    let mut o = cap_std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true).mode(0o600);
    let io = |e| Error::io(format!("writing {}/{DAEMON_FILE}", node.path.display()), e);
    let _ = node.dir.remove_file(&tmp);
    let mut file = node.dir.open_with(&tmp, &o).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    node.dir.rename(&tmp, &node.dir, DAEMON_FILE).map_err(io)
}

/// Reads `daemon.json` from a state directory.
pub fn read_daemon_file(node: &Node) -> Result<DaemonFile> {
    use std::io::Read;
    let mut raw = Vec::new();
    match node.dir.open(DAEMON_FILE) {
        Ok(mut f) => f
            .read_to_end(&mut raw)
            .map_err(|e| Error::io(format!("reading {}/{DAEMON_FILE}", node.path.display()), e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(format!(
                "no daemon is running on {} (no {DAEMON_FILE}); start one with `holdfast daemon \
                 --config FILE`",
                node.path.display()
            )));
        }
        Err(e) => {
            return Err(Error::io(
                format!("opening {}/{DAEMON_FILE}", node.path.display()),
                e,
            ));
        }
    };
    serde_json::from_slice(&raw).map_err(|e| {
        Error::corrupt(format!(
            "{}/{DAEMON_FILE} is unreadable: {e}",
            node.path.display()
        ))
    })
}

/// What a panicked task said, for the job's status.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "no message".into()),
        Err(_) => "cancelled".into(),
    }
}

/// Tells systemd (when it started the daemon with `Type=notify`) how the daemon is doing;
/// nothing without `NOTIFY_SOCKET`.
fn tell_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("could not notify the service manager: {e}");
    }
}

/// Runs the daemon until SIGINT or SIGTERM; SIGHUP reloads the configuration.
pub async fn run(node: Node, cfg: NodeConfig) -> Result<()> {
    let t0 = Instant::now();
    // First: a signal that comes while the daemon starts is handled, not fatal.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("installing the SIGINT handler", e))?;
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| Error::io("installing the SIGHUP handler", e))?;
    let node = Arc::new(node);
    let cfg = Arc::new(cfg);
    node.clean_staging_files();
    let engine = Some(Arc::new(PolicyEngine::new()?));
    let jobs = jobs_of(&node, &cfg, false)?;

    let listener = match &cfg.listen {
        Some(l) => Some((
            tokio::net::TcpListener::bind(l.address)
                .await
                .map_err(|e| Error::io(format!("listening on {}", l.address), e))?,
            l,
        )),
        None => None,
    };
    let listen = listener.as_ref().map(|(sock, l)| {
        let addr = sock.local_addr().unwrap_or(l.address);
        let scheme = if l.plaintext { "http" } else { "https" };
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        format!("{scheme}://{host}:{}", addr.port())
    });

    let daemon = Arc::new(Daemon {
        node: node.clone(),
        cfg: std::sync::RwLock::new(cfg.clone()),
        config_info: Mutex::new(ConfigInfo {
            path: std::fs::canonicalize(&cfg.path).unwrap_or_else(|_| cfg.path.clone()),
            loaded_unix_ms: crate::now_unix_ms(),
            reloads: 0,
            last_refused: None,
            last_refused_unix_ms: None,
        }),
        engine,
        jobs: Mutex::new(Vec::new()),
        next_job_id: Default::default(),
        draining: tokio::sync::watch::Sender::new(false),
        served: Default::default(),
        volume_locks: Default::default(),
        started_unix_ms: crate::now_unix_ms(),
        listen: listen.clone(),
        gc_pending: Default::default(),
        gc_attempt: Default::default(),
        gc_running: Default::default(),
    });

    let admin_token = crate::peer::new_token();
    let mut tasks = tokio::task::JoinSet::new();
    let mut server = None;
    if let Some((sock, l)) = listener {
        let tls = match (&l.tls_cert, &l.tls_key, l.plaintext) {
            (Some(c), Some(k), false) => Some(crate::peer::tls::server_config(
                &cfg.resolve(c),
                &cfg.resolve(k),
            )?),
            _ => None,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(ServerState::new(
            node.clone(),
            &cfg,
            admin_token.clone(),
            daemon.clone(),
            daemon.served.clone(),
            Some(tx),
        )?);
        server = Some(state.clone());
        tasks.spawn(daemon.clone().forward_loop(rx));
        let app = crate::peer::server::router(state);
        tasks.spawn(crate::peer::server::serve(sock, tls, app));
        write_daemon_file(
            &node,
            &DaemonFile {
                pid: std::process::id(),
                node: node.info.node_id.clone(),
                url: listen.clone().expect("listening"),
                admin_token,
                ca: l.tls_cert.as_ref().filter(|_| !l.plaintext).map(|c| {
                    std::fs::canonicalize(cfg.resolve(c)).unwrap_or_else(|_| cfg.resolve(c))
                }),
            },
        )?;
    }
    for job in jobs {
        daemon.start_job(&mut tasks, job);
    }
    tasks.spawn(daemon.clone().gc_loop());
    tracing::info!(
        node = %node.info.node_id,
        listen = listen.as_deref().unwrap_or("-"),
        jobs = daemon.jobs.lock().expect("not poisoned").len(),
        start_ms = t0.elapsed().as_millis() as u64,
        "daemon started"
    );
    eprintln!(
        "holdfast daemon {} listening on {}",
        node.info.node_id,
        listen.as_deref().unwrap_or("(no listener)")
    );
    if let Some(url) = &listen
        && cfg.metrics_token()?.is_none()
    {
        tracing::info!(
            "{url}/metrics is served to this host only; set metrics_token_file in [listen] \
             to serve it to whoever presents that token (a Prometheus elsewhere)"
        );
    }
    tell_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "serving on {}",
            listen.as_deref().unwrap_or("(no listener)")
        )),
    ]);

    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                tell_systemd(&[
                    sd_notify::NotifyState::Reloading,
                    sd_notify::NotifyState::monotonic_usec_now()
                        .unwrap_or(sd_notify::NotifyState::Status("reloading")),
                ]);
                // Loops of jobs that earlier reloads ended.
                while tasks.try_join_next().is_some() {}
                let status = match daemon.reload(&mut tasks, server.as_deref()) {
                    Ok(line) => {
                        tracing::info!("configuration reloaded: {line}");
                        format!("configuration reloaded: {line}")
                    }
                    Err(e) => {
                        tracing::error!(
                            "configuration reload refused, the running configuration stays: {e}"
                        );
                        let mut info = daemon.config_info.lock().expect("not poisoned");
                        info.last_refused = Some(e.to_string());
                        info.last_refused_unix_ms = Some(crate::now_unix_ms());
                        format!("reload refused: {e}")
                    }
                };
                tell_systemd(&[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status(&status),
                ]);
            }
        }
    }
    daemon.stop(&mut tasks, &mut int, &mut term).await;
    let _ = node.dir.remove_file(DAEMON_FILE);
    Ok(())
}

/// How long a job asked to stop at its next safe point is waited for.
pub const SAFE_POINT_WAIT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Reads the configuration file again and takes it when it is whole and valid: changed
    /// downstreams and tokens at once, new jobs started, removed or changed ones ended once
    /// their current run ends. Returns what changed; on an error nothing did.
    fn reload(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        server: Option<&ServerState>,
    ) -> Result<String> {
        let old = self.cfg();
        let new = NodeConfig::load(&old.path)?;
        let state_of = |c: &NodeConfig| c.state.as_ref().map(|s| c.resolve(s));
        if state_of(&new) != state_of(&old) {
            return Err(Error::invalid(format!(
                "{}: `state` changed; a daemon serves one state directory, so restart it to \
                 serve another",
                new.path.display()
            )));
        }
        let jobs = jobs_of(&self.node, &new, true)?;
        // The certificate and key are read at start only, but one that would not load
        // then is refused now, not found at the next restart.
        if let Some(l) = &new.listen
            && let (Some(c), Some(k), false) = (&l.tls_cert, &l.tls_key, l.plaintext)
        {
            crate::peer::tls::server_config(&new.resolve(c), &new.resolve(k))?;
        }
        if let Some(server) = server {
            server.reconfigure(&new)?;
        }
        let listen_of = |c: &NodeConfig| {
            c.listen.as_ref().map(|l| {
                (
                    l.address,
                    l.tls_cert.clone(),
                    l.tls_key.clone(),
                    l.plaintext,
                )
            })
        };
        if listen_of(&new) != listen_of(&old) {
            tracing::warn!(
                "[listen] changed in {}: the listener (address, TLS) is set up at start; \
                 restart the daemon to use the new one (everything else is reloaded)",
                new.path.display()
            );
        }
        let new = Arc::new(new);
        *self.cfg.write().expect("not poisoned") = new;

        // Match old and new jobs by identity; what is left over on each side changed.
        let mut wanted: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
        let (mut kept, mut removed) = (0, Vec::new());
        {
            let mut entries = self.jobs.lock().expect("not poisoned");
            for e in entries.iter_mut().filter(|e| !e.status.stopping) {
                let same = wanted
                    .iter_mut()
                    .find(|w| w.as_ref().is_some_and(|w| w.identity() == e.identity));
                match same {
                    Some(w) => {
                        *w = None;
                        kept += 1;
                    }
                    None => {
                        e.status.stopping = true;
                        e.stop.send_replace(true);
                        removed.push(e.status.describe());
                    }
                }
            }
        }
        let mut added = Vec::new();
        for job in wanted.into_iter().flatten() {
            added.push(JobStatus::new(&job).describe());
            self.start_job(tasks, job);
        }
        let mut info = self.config_info.lock().expect("not poisoned");
        info.loaded_unix_ms = crate::now_unix_ms();
        info.reloads += 1;
        info.last_refused = None;
        info.last_refused_unix_ms = None;
        Ok(format!(
            "{kept} job(s) unchanged, {} added {added:?}, {} removed {removed:?} (a removed job \
             finishes its current run)",
            added.len(),
            removed.len()
        ))
    }

    /// Stops the daemon: no new job runs; running ones get `[daemon] shutdown_grace` to
    /// finish (another signal cuts it short), then are asked to stop at their next safe point
    /// and waited for: a snapshot as long as its `after` hook may take, anything else
    /// [`SAFE_POINT_WAIT`]. systemd is asked for more time as long as there is work to wait
    /// for.
    async fn stop(
        &self,
        tasks: &mut tokio::task::JoinSet<()>,
        int: &mut tokio::signal::unix::Signal,
        term: &mut tokio::signal::unix::Signal,
    ) {
        tell_systemd(&[sd_notify::NotifyState::Stopping]);
        let grace = self
            .cfg()
            .daemon
            .shutdown_grace()
            .unwrap_or(Duration::from_secs(60));
        {
            let _jobs = self.jobs.lock().expect("not poisoned");
            self.draining.send_replace(true);
        }
        let running = self.running_jobs();
        tracing::info!(
            running = ?running,
            grace_secs = grace.as_secs(),
            "daemon stopping: no new job starts; running ones may finish (a second signal \
             stops them now)"
        );
        let finished = self.wait_for_jobs(grace, int, term).await;
        let mut interrupted = Vec::new();
        if !finished {
            interrupted = self.running_jobs();
            tracing::warn!(
                interrupted = ?interrupted,
                "stopping the jobs still running at their next safe point (what they stored \
                 is kept; nothing half done is committed; a snapshot runs its after hook)"
            );
            // Running jobs stop at their next safe point (a snapshot removes what it added
            // to QEMU and runs its after hook; a mirror keeps the chunks it stored).
            crate::shutdown::request();
            let snapshots = self
                .jobs
                .lock()
                .expect("not poisoned")
                .iter()
                .any(|e| e.status.running && e.status.kind == JobKind::Snapshot);
            let wait = if snapshots {
                crate::snapshot::hooks::HOOK_TIMEOUT + SAFE_POINT_WAIT
            } else {
                SAFE_POINT_WAIT
            };
            self.wait_for_jobs(wait, int, term).await;
        }
        let cut = self.running_jobs();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if interrupted.is_empty() {
            tracing::info!(finished = ?running, "daemon stopped; every running job finished");
        } else {
            tracing::warn!(
                finished = running.len().saturating_sub(interrupted.len()),
                interrupted = ?interrupted,
                cut_off = ?cut,
                "daemon stopped; interrupted jobs resume at the next start"
            );
        }
    }

    /// Waits up to `limit` for the running jobs (and gc) to end: true if they did, false at
    /// the limit or on another SIGINT or SIGTERM.
    async fn wait_for_jobs(
        &self,
        limit: Duration,
        int: &mut tokio::signal::unix::Signal,
        term: &mut tokio::signal::unix::Signal,
    ) -> bool {
        let deadline = Instant::now() + limit;
        let mut told = Instant::now() - Duration::from_secs(60);
        loop {
            if self.running_jobs().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if told.elapsed() >= Duration::from_secs(10) {
                // Ask systemd for 30 s more each 10 s of waiting (TimeoutStopSec stays the
                // bound for a daemon that stops answering).
                tell_systemd(&[sd_notify::NotifyState::ExtendTimeoutUsec(30_000_000)]);
                told = Instant::now();
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = int.recv() => return false,
                _ = term.recv() => return false,
            }
        }
    }
}
