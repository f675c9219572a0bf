//! Leases: pushes and gc exclude each other.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::NodeId;
use crate::repo::Repository;

use super::*;

// ---------------------------------------------------------------------------------------
// Leases: pushes and gc exclude each other.

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) struct Lease {
    pub(super) owner: String,
    pub(super) kind: String,
    expires_unix_ms: u64,
}

/// A held lease; release it with [`LeaseGuard::release`].
#[derive(Debug)]
pub struct LeaseGuard {
    pub(super) key: String,
}

impl LeaseGuard {
    pub async fn release(self, repo: &Repository) -> Result<()> {
        repo.delete_object(&self.key).await
    }
}

/// The leases that are live, judged by the server's clock: `now` is the modification time of
/// our own lease (`own`, just written), a lease is live for [`LEASE_MS`] after its own.
/// An expired lease is deleted (a lease key is never written twice, so it cannot come back).
/// A lease that cannot be read counts as live and blocking (kind "unknown"): fail closed.
pub(super) async fn live_leases(repo: &Repository, own: &str) -> Result<Vec<(String, Lease)>> {
    let listed = repo.list_objects("leases").await?;
    let now = listed
        .iter()
        .find(|(k, _, _)| k == own)
        .map_or_else(crate::now_unix_ms, |(_, _, t)| *t);
    let mut out = Vec::new();
    for (key, _, modified) in listed {
        if key == own {
            continue;
        }
        if modified + LEASE_MS < now {
            tracing::info!("removing expired lease {key}");
            repo.delete_object(&key).await?;
            continue;
        }
        let Some(raw) = repo.get_object(&key).await? else {
            continue;
        };
        match serde_json::from_slice::<Lease>(&raw) {
            Ok(l) => out.push((key, l)),
            Err(e) => {
                tracing::warn!("unreadable lease {key} ({e}): treated as held");
                out.push((
                    key.clone(),
                    Lease {
                        owner: format!(
                            "unknown (unreadable lease object {key}; delete it if no holdfast \
                             uses the target)"
                        ),
                        kind: "unknown".into(),
                        expires_unix_ms: modified + LEASE_MS,
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// Fails unless our lease is still there (another node may have removed it as expired).
pub(super) async fn still_leased(repo: &Repository, lease: &LeaseGuard) -> Result<()> {
    if repo.get_object(&lease.key).await?.is_some() {
        return Ok(());
    }
    Err(Error::Unavailable {
        message: format!(
            "our lease {} on {} is gone (it ran past {} minutes, or another node removed it); \
             stopped before committing anything more: run it again",
            lease.key,
            repo.location(),
            LEASE_MS / 60_000
        ),
        source: None,
    })
}

/// Writes a new lease of `kind` under its own key and returns the key.
async fn put_lease(repo: &Repository, me: &NodeId, kind: &str) -> Result<String> {
    let key = format!("leases/{kind}-{me}-{:016x}", rand::random::<u64>());
    let lease = Lease {
        owner: me.to_string(),
        kind: kind.into(),
        expires_unix_ms: crate::now_unix_ms() + LEASE_MS,
    };
    let body = serde_json::to_vec(&lease).map_err(|e| Error::internal(e.to_string()))?;
    repo.put_object(&key, body).await?;
    Ok(key)
}

/// Takes a push lease, waiting (up to `wait`) while a gc holds the target.
pub async fn lease_push(repo: &Repository, me: &NodeId, wait: Duration) -> Result<LeaseGuard> {
    let t0 = Instant::now();
    loop {
        let key = put_lease(repo, me, "push").await?;
        // Created first, then looked: a gc that looks after us sees our lease.
        let gc = live_leases(repo, &key)
            .await?
            .into_iter()
            .find(|(_, l)| l.kind != "push");
        let Some((_, gc)) = gc else {
            return Ok(LeaseGuard { key });
        };
        repo.delete_object(&key).await?;
        if t0.elapsed() >= wait {
            return Err(Error::Unavailable {
                message: format!(
                    "a gc by {} holds the target {}; push again when it is done",
                    gc.owner,
                    repo.location()
                ),
                source: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes a gc lease: refused while another gc or any push holds a lease. Like a push lease it
/// has a key of its own, created first and then looked around: of two gcs (or a gc and a push)
/// starting at once, at least one sees the other. Nothing is ever taken over, so a lease is
/// only ever deleted by its owner, or by anyone once it has expired (it cannot come back).
pub async fn lease_gc(repo: &Repository, me: &NodeId) -> Result<LeaseGuard> {
    let guard = LeaseGuard {
        key: put_lease(repo, me, "gc").await?,
    };
    let others = live_leases(repo, &guard.key).await?;
    if let Some((_, other)) = others.iter().find(|(_, l)| l.kind != "push") {
        let owner = other.owner.clone();
        guard.release(repo).await?;
        return Err(Error::conflict(format!(
            "a gc by {owner} is running on {}; wait for it",
            repo.location()
        )));
    }
    let pushes: Vec<String> = others
        .into_iter()
        .filter(|(_, l)| l.kind == "push")
        .map(|(_, l)| l.owner)
        .collect();
    if !pushes.is_empty() {
        guard.release(repo).await?;
        return Err(Error::Unavailable {
            message: format!(
                "pushes by {} are running on {}; gc again when they are done",
                pushes.join(", "),
                repo.location()
            ),
            source: None,
        });
    }
    Ok(guard)
}
