//! Commands run around a snapshot: `before` prepares the source (an LVM or dm-thin snapshot,
//! `fsfreeze --freeze`, a database's backup mode), `after` undoes it. Both run with `sh -c`
//! and these environment variables:
//!
//! - `HOLDFAST_VOLUME`, `HOLDFAST_SNAPSHOT` (the name the snapshot will have),
//!   `HOLDFAST_SOURCE` (the image path, NBD URI or qcow2 path);
//! - for `after` also `HOLDFAST_RESULT` (`ok` or `failed`), and `HOLDFAST_SNAPSHOT_ID` or
//!   `HOLDFAST_ERROR`.
//!
//! A `before` that fails (or runs longer than the timeout) means no snapshot, and the error
//! says which command failed and what it printed. `frozen` runs as soon as the source's view
//! is fixed (a running QEMU's disk right after the freeze; other sources right before their
//! read), or opening the source failed: the place to thaw a guest's filesystems that `before`
//! froze, so that the guest is frozen for a moment rather than for the whole read. `after`
//! always runs once `before` was tried, whatever happened; failures of `frozen` and `after`
//! are logged and do not undo a snapshot that committed.

use std::time::Duration;

use crate::error::{Error, Result};

/// How long a hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Default)]
pub struct Hooks {
    pub before: Option<String>,
    /// Run once the source's view is fixed (see the module documentation).
    pub frozen: Option<String>,
    pub after: Option<String>,
}

/// What the hooks are told.
#[derive(Clone, Debug)]
pub struct HookEnv {
    pub volume: String,
    pub snapshot: String,
    pub source: String,
}

impl Hooks {
    pub async fn before(&self, env: &HookEnv) -> Result<()> {
        let Some(cmd) = &self.before else {
            return Ok(());
        };
        match run(cmd, env, &[], true).await {
            Ok(()) => Ok(()),
            Err(why) => {
                // `after` still runs: `before` may have done half of its work.
                self.after_failed(env, &why).await;
                Err(Error::unavailable_msg(format!(
                    "the before hook of volume {} failed, so no snapshot was taken: {why}",
                    env.volume
                )))
            }
        }
    }

    /// Runs `frozen`, if any.
    pub async fn frozen(&self, env: &HookEnv) {
        let Some(cmd) = &self.frozen else {
            return;
        };
        if let Err(why) = run(cmd, env, &[], false).await {
            tracing::warn!("the frozen hook of volume {} failed: {why}", env.volume);
        }
    }

    /// Runs `after` with the snapshot's outcome.
    pub async fn after<T: HasId>(&self, env: &HookEnv, result: &Result<T>) {
        match result {
            Ok(r) => {
                let id = r.snapshot_id();
                self.run_after(
                    env,
                    &[("HOLDFAST_RESULT", "ok"), ("HOLDFAST_SNAPSHOT_ID", &id)],
                )
                .await
            }
            Err(e) => self.after_failed(env, &e.to_string()).await,
        }
    }

    async fn after_failed(&self, env: &HookEnv, why: &str) {
        self.run_after(
            env,
            &[("HOLDFAST_RESULT", "failed"), ("HOLDFAST_ERROR", why)],
        )
        .await
    }

    async fn run_after(&self, env: &HookEnv, extra: &[(&str, &str)]) {
        let Some(cmd) = &self.after else {
            return;
        };
        if let Err(why) = run(cmd, env, extra, false).await {
            tracing::warn!("the after hook of volume {} failed: {why}", env.volume);
        }
    }
}

/// The id of what a snapshot produced, for `after`.
pub trait HasId {
    fn snapshot_id(&self) -> String;
}

impl HasId for super::create::CreateReport {
    fn snapshot_id(&self) -> String {
        self.record.id.to_string()
    }
}

/// Runs `cmd` with `sh -c`; `Err` says how it failed and ends with what it printed.
async fn run(
    cmd: &str,
    env: &HookEnv,
    extra: &[(&str, &str)],
    stoppable: bool,
) -> std::result::Result<(), String> {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env("HOLDFAST_VOLUME", &env.volume)
        .env("HOLDFAST_SNAPSHOT", &env.snapshot)
        .env("HOLDFAST_SOURCE", &env.source)
        // Secrets of encrypted targets are not the hook's.
        .env_remove("HOLDFAST_PASSPHRASE")
        .env_remove("HOLDFAST_NEW_PASSPHRASE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra {
        c.env(k, v);
    }
    let child = c
        .spawn()
        .map_err(|e| format!("`{cmd}` could not start: {e}"))?;
    // A stop request ends a `before` (dropping the child kills it); an `after` is let finish,
    // since it undoes what `before` did.
    let stop = async {
        if stoppable {
            crate::shutdown::wait().await
        } else {
            std::future::pending().await
        }
    };
    let out = tokio::select! {
        r = tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output()) => match r {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(format!("`{cmd}` failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "`{cmd}` ran longer than {} s and was stopped",
                    HOOK_TIMEOUT.as_secs()
                ));
            }
        },
        _ = stop => return Err(format!("`{cmd}` was stopped (the process was asked to stop)")),
    };
    let said = |b: &[u8]| {
        let t = String::from_utf8_lossy(b);
        let t = t.trim();
        // The end says most; keep messages short.
        let start = t.len().saturating_sub(800);
        let start = (start..t.len())
            .find(|&i| t.is_char_boundary(i))
            .unwrap_or(t.len());
        t[start..]
            .chars()
            .map(|c| match c {
                '\n' => " | ".to_string(),
                c if crate::id::is_hazard(c) => c.escape_default().to_string(),
                c => c.to_string(),
            })
            .collect::<String>()
    };
    for line in String::from_utf8_lossy(&out.stdout).lines().take(100) {
        tracing::info!(target: "holdfast::hook", "{line}");
    }
    if out.status.success() {
        return Ok(());
    }
    let printed = said(&out.stderr);
    let printed = if printed.is_empty() {
        said(&out.stdout)
    } else {
        printed
    };
    Err(format!(
        "`{cmd}` exited with {}{}{printed}",
        out.status,
        if printed.is_empty() { "" } else { ": " }
    ))
}
