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

/// A lock record's bytes (`what` names where they were read).
pub fn parse_lock_record(raw: &[u8], what: &str) -> Result<LockRecord> {
    serde_json::from_slice(raw).map_err(|e| {
        Error::corrupt(format!(
            "lock record {what} is unreadable ({e}); prune refuses to guess, fix or remove it"
        ))
    })
}

/// Every lock record of `volume` in the target.
pub async fn lock_records(repo: &Repository, volume: &VolumeName) -> Result<Vec<LockRecord>> {
    let mut out = Vec::new();
    for (key, _, _) in repo.list_objects(&format!("locks/{volume}")).await? {
        let Some(raw) = repo.get_object(&key).await? else {
            continue;
        };
        out.push(parse_lock_record(
            &raw,
            &format!("{key} in {}", repo.location()),
        )?);
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

    fn lock(snapshot: SnapshotId) -> TargetLock {
        TargetLock {
            snapshot,
            lock_type: LockType::Application,
            value: "restic".into(),
        }
    }

    /// A volume's locks are its own (`vm1` is a prefix of `vm10`'s key, not of its folder),
    /// an empty set removes a record, and an unreadable record is an error, never "no lock".
    #[tokio::test]
    async fn lock_records_are_per_volume_and_unreadable_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::local(dir.path()).unwrap();
        let (vm1, vm10): (VolumeName, VolumeName) =
            ("vm1".parse().unwrap(), "vm10".parse().unwrap());
        let (a, b): (HolderId, HolderId) = ("app:a".parse().unwrap(), "app:b".parse().unwrap());
        let (s1, s2) = (
            SnapshotId::generate(1_700_000_000_000),
            SnapshotId::generate(1_700_000_000_001),
        );
        assert!(locked(&repo, &vm1).await.unwrap().is_empty());
        write_lock_record(&repo, &vm1, &a, vec![lock(s1)])
            .await
            .unwrap();
        write_lock_record(&repo, &vm1, &b, vec![lock(s1), lock(s2)])
            .await
            .unwrap();
        write_lock_record(&repo, &vm10, &b, vec![lock(s2)])
            .await
            .unwrap();

        let on_vm1 = locked(&repo, &vm1).await.unwrap();
        assert_eq!(on_vm1.len(), 2);
        let mut holders = on_vm1[&s1].clone();
        holders.sort_by(|x, y| x.as_str().cmp(y.as_str()));
        assert_eq!(holders, vec![a.clone(), b.clone()]);
        assert_eq!(on_vm1[&s2], vec![b.clone()]);
        let on_vm10 = locked(&repo, &vm10).await.unwrap();
        assert_eq!(on_vm10.len(), 1);
        assert_eq!(on_vm10[&s2], vec![b.clone()]);
        let records = lock_records(&repo, &vm10).await.unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!((&records[0].holder, &records[0].volume), (&b, &vm10));
        assert_eq!(records[0].locks, vec![lock(s2)]);

        // Releasing every lock removes the record.
        write_lock_record(&repo, &vm1, &b, vec![]).await.unwrap();
        let on_vm1 = locked(&repo, &vm1).await.unwrap();
        assert_eq!((on_vm1.len(), &on_vm1[&s1]), (1, &vec![a.clone()]));

        repo.put_object(&lock_key(&vm1, &b), b"{not json".to_vec())
            .await
            .unwrap();
        let err = locked(&repo, &vm1).await.unwrap_err().to_string();
        assert!(err.contains("unreadable"), "{err}");
    }
}
