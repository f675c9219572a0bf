//! Lock records inside a target: one object per holder and volume, honoured by every prune.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{SnapshotId, VolumeName};
use crate::repo::Repository;
use crate::softlock::{HolderId, LockType};

// ---------------------------------------------------------------------------------------
// Lock records inside a target.

/// One holder's locks on one volume of a target (`locks/VOLUME/HOLDER.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockRecord {
    pub holder: HolderId,
    pub volume: VolumeName,
    pub written_unix_ms: u64,
    pub locks: Vec<TargetLock>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetLock {
    pub snapshot: SnapshotId,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    pub value: String,
}

fn lock_key(volume: &VolumeName, holder: &HolderId) -> String {
    let hex: String = holder
        .as_str()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("locks/{volume}/{hex}.json")
}

/// Every lock record of `volume` in the target.
pub async fn lock_records(repo: &Repository, volume: &VolumeName) -> Result<Vec<LockRecord>> {
    let mut out = Vec::new();
    for (key, _, _) in repo.list_objects(&format!("locks/{volume}")).await? {
        let Some(raw) = repo.get_object(&key).await? else {
            continue;
        };
        let rec: LockRecord = serde_json::from_slice(&raw).map_err(|e| {
            Error::corrupt(format!(
                "lock record {key} in {} is unreadable ({e}); prune refuses to guess, fix or \
                 remove it",
                repo.location()
            ))
        })?;
        out.push(rec);
    }
    Ok(out)
}

/// Replaces `holder`'s lock record for `volume` (an empty set removes it).
pub async fn write_lock_record(
    repo: &Repository,
    volume: &VolumeName,
    holder: &HolderId,
    locks: Vec<TargetLock>,
) -> Result<()> {
    let key = lock_key(volume, holder);
    if locks.is_empty() {
        return repo.delete_object(&key).await;
    }
    for l in &locks {
        crate::softlock::validate_value(&l.value)?;
    }
    let rec = LockRecord {
        holder: holder.clone(),
        volume: volume.clone(),
        written_unix_ms: crate::now_unix_ms(),
        locks,
    };
    repo.put_object(
        &key,
        serde_json::to_vec_pretty(&rec).map_err(|e| Error::internal(e.to_string()))?,
    )
    .await
}

/// Snapshot id → holders, from the target's lock records.
pub async fn locked(
    repo: &Repository,
    volume: &VolumeName,
) -> Result<HashMap<SnapshotId, Vec<HolderId>>> {
    let mut out: HashMap<SnapshotId, Vec<HolderId>> = HashMap::new();
    for r in lock_records(repo, volume).await? {
        for l in r.locks {
            out.entry(l.snapshot).or_default().push(r.holder.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_plain() {
        let k = lock_key(&"v".parse().unwrap(), &"app:x".parse().unwrap());
        assert_eq!(k, "locks/v/6170703a78.json");
        let k = lock_key(&"v".parse().unwrap(), &"b/v".parse().unwrap());
        assert!(k.starts_with("locks/v/") && !k["locks/v/".len()..].contains('/'));
    }
}
