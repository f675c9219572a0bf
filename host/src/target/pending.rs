//! Push intents and the check that makes a pushed snapshot safe from gc.
//!
//! Before a push writes a snapshot's manifest it writes an intent,
//! `pending/VOLUME/SNAPSHOT/NODE-RANDOM`. After the manifest, it **confirms** the snapshot:
//! every chunk the manifest names must be in a pack that exists and that no gc record
//! condemns; the chunks that are not are stored again in new packs (from the node's own
//! repository), and the check repeats. Only then is the intent removed. While an intent
//! exists its snapshot is not listed, restored, pulled or pruned (it may be incomplete); gc
//! counts its manifest as live like any other. A push that stopped leaves its intent: the same
//! node's next push of the volume finishes it (its per-volume lock proves the old push is not
//! running), and `holdfast target clear-pending` finishes one for a node that is gone.
//! Why a confirmed snapshot is safe from every gc, however slow, is argued in
//! `host/TARGETS.md`.

use std::collections::HashSet;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ChunkId, NodeId, SnapshotId, VolumeName};
use crate::repo::{ChunkIndex, Repository};
use crate::snapshot::Manifest;
use crate::state::Node;

use super::TargetRecord;
use super::gc::Condemned;
use super::sink::{PackSink, copy_chunks};

/// Where intents live.
pub const PENDING: &str = "pending";
/// Packs without an index that one push reads from their trailers (more are left to later
/// pushes, and to gc).
const MAX_ORPHANS_READ: usize = 256;
/// How many times a push stores again what gcs keep condemning before it gives up.
const MAX_REPAIR_ROUNDS: usize = 8;

/// One intent, as listed.
#[derive(Clone, Debug)]
pub struct Intent {
    pub key: String,
    pub volume: VolumeName,
    pub snapshot: SnapshotId,
    pub node: NodeId,
    /// By the store's clock.
    pub modified_unix_ms: u64,
}

/// An intent's body (for people reading the bucket; the key says it all).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct IntentBody {
    node: NodeId,
    volume: VolumeName,
    snapshot: SnapshotId,
    written_unix_ms: u64,
}

/// A push that has not finished, for reports.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PendingPush {
    pub node: NodeId,
    pub volume: VolumeName,
    pub snapshot: SnapshotId,
    /// How long ago the intent was written, by the store's clock.
    pub age_seconds: u64,
}

pub fn parse_key(key: &str) -> Option<(VolumeName, SnapshotId, NodeId)> {
    let rest = key.strip_prefix(PENDING)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (v, s, last) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (node, random) = last.rsplit_once('-')?;
    if random.len() != 16 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((
        crate::id::canonical(v)?,
        crate::id::canonical(s)?,
        crate::id::canonical(node)?,
    ))
}

/// The intents in the target, of one volume or of all.
pub async fn intents(repo: &Repository, volume: Option<&VolumeName>) -> Result<Vec<Intent>> {
    let prefix = match volume {
        Some(v) => format!("{PENDING}/{v}"),
        None => PENDING.to_string(),
    };
    let mut out = Vec::new();
    for (key, _, t) in repo.list_objects(&prefix).await? {
        match parse_key(&key) {
            Some((volume, snapshot, node)) => out.push(Intent {
                key,
                volume,
                snapshot,
                node,
                modified_unix_ms: t,
            }),
            // Not written by holdfast: it hides nothing and is left alone.
            None => tracing::warn!("ignoring {key} in {}: not a push intent", repo.location()),
        }
    }
    Ok(out)
}

/// The unfinished pushes, aged by the store's clock `now`.
pub async fn pending_pushes(repo: &Repository, now: u64) -> Result<Vec<PendingPush>> {
    Ok(intents(repo, None)
        .await?
        .into_iter()
        .map(|i| PendingPush {
            node: i.node,
            volume: i.volume,
            snapshot: i.snapshot,
            age_seconds: now.saturating_sub(i.modified_unix_ms) / 1000,
        })
        .collect())
}

/// The manifests in the target, as (volume, snapshot id): every object at a manifest's key
/// but the empty ones, which are **fences**. Finishing a push that left no manifest (or
/// dropping an incomplete one) puts an empty object at the manifest's key, create-only, before
/// the intent goes: the abandoned push's own manifest write, which may still be on its way (a
/// request held by a proxy or retried after its process ended), is create-only too and can
/// then never land, so no snapshot appears that nobody confirmed. A fence is never removed; a
/// push of the same snapshot overwrites it (`push.rs`).
///
/// In an encrypted target a fence is a sealed empty object, and each one listed is opened
/// first: an empty object of the bucket's owner's making is damage (an error), never a fence
/// that hides a snapshot from gc.
pub async fn listed_manifests(repo: &Repository) -> Result<Vec<(VolumeName, SnapshotId)>> {
    let mut out = Vec::new();
    for (v, id, size) in repo.list_manifest_objects().await? {
        if size > 0 {
            out.push((v, id));
        } else if repo.is_sealed() {
            repo.read_manifest_if_present(&v, &id).await?;
        }
    }
    Ok(out)
}

/// What a manifest's key in a target holds.
#[derive(Debug)]
pub enum AtKey {
    Absent,
    /// An empty object (see [`listed_manifests`]).
    Fence,
    Manifest(bytes::Bytes),
}

/// What `volume@id`'s manifest key holds. An empty body is a fence only if the store says
/// the object is empty: a store or middlebox that answers a manifest with no bytes must stop
/// whoever reads it, not make a manifest look absent (gc would free its chunks).
pub async fn at_key(repo: &Repository, volume: &VolumeName, id: &SnapshotId) -> Result<AtKey> {
    let Some(raw) = repo.read_manifest_if_present(volume, id).await? else {
        return Ok(AtKey::Absent);
    };
    if !raw.is_empty() {
        return Ok(AtKey::Manifest(raw));
    }
    match repo
        .object_size(&Repository::manifest_key(volume, id))
        .await?
    {
        None => Ok(AtKey::Absent),
        Some(0) => Ok(AtKey::Fence),
        Some(n) => Err(Error::corrupt(format!(
            "{} answered the manifest {volume}@{id} ({n} bytes) with no bytes; nothing was \
             changed. Check the store or what stands between it and this node",
            repo.location()
        ))),
    }
}

/// A manifest in the target, `None` if it is not there or is a fence.
pub async fn manifest_if_present(
    repo: &Repository,
    volume: &VolumeName,
    id: &SnapshotId,
) -> Result<Option<bytes::Bytes>> {
    Ok(match at_key(repo, volume, id).await? {
        AtKey::Manifest(raw) => Some(raw),
        AtKey::Absent | AtKey::Fence => None,
    })
}

/// Puts a fence at `volume@id`'s manifest key, create-only, unless something is there: then
/// says what is (a manifest that landed in the meantime, or an earlier fence). Nothing ever
/// overwrites a manifest key: once a fence or a manifest is there, a create-only manifest
/// write can never land.
async fn fence(repo: &Repository, volume: &VolumeName, id: &SnapshotId) -> Result<AtKey> {
    let key = Repository::manifest_key(volume, id);
    for _ in 0..3 {
        if repo.put_object_if_absent(&key, Vec::new()).await? {
            return Ok(AtKey::Fence);
        }
        match at_key(repo, volume, id).await? {
            AtKey::Absent => continue, // deleted between the two: try again
            other => return Ok(other),
        }
    }
    Err(Error::Unavailable {
        message: format!(
            "the manifest key of {volume}@{id} in {} keeps changing; try again",
            repo.location()
        ),
        source: None,
    })
}

/// The snapshots of `volume` whose manifests are committed: listed, with no intent.
///
/// Manifests are listed first, intents after: a push writes its intent before its manifest,
/// so a manifest this listing sees had its intent written before the intents are listed (the
/// other order could see a manifest, and miss the intent written just before it).
pub async fn committed_ids(repo: &Repository, volume: &VolumeName) -> Result<HashSet<SnapshotId>> {
    let listed: Vec<SnapshotId> = listed_manifests(repo)
        .await?
        .into_iter()
        .filter(|(v, _)| v == volume)
        .map(|(_, id)| id)
        .collect();
    let pending: HashSet<SnapshotId> = intents(repo, Some(volume))
        .await?
        .into_iter()
        .map(|i| i.snapshot)
        .collect();
    Ok(listed
        .into_iter()
        .filter(|id| !pending.contains(id))
        .collect())
}

/// Writes an intent for `volume@snapshot` by `me`.
pub async fn write_intent(
    repo: &Repository,
    volume: &VolumeName,
    snapshot: &SnapshotId,
    me: &NodeId,
) -> Result<String> {
    let key = format!(
        "{PENDING}/{volume}/{snapshot}/{me}-{:016x}",
        rand::random::<u64>()
    );
    let body = IntentBody {
        node: me.clone(),
        volume: volume.clone(),
        snapshot: *snapshot,
        written_unix_ms: crate::now_unix_ms(),
    };
    let body = serde_json::to_vec(&body).map_err(|e| Error::internal(e.to_string()))?;
    repo.put_object_if_absent(&key, body).await?;
    Ok(key)
}

/// The target's chunks as a push may rely on them: packs that are listed and that no gc record
/// condemns. A pack that a record condemns is never relied on again.
pub struct PushView {
    pub index: ChunkIndex,
    /// Every pack index read so far (of packs in the view or not), so that none is read twice.
    indexes: std::collections::HashMap<crate::id::PackId, crate::repo::pack::PackIndex>,
    condemned: Condemned,
}

impl PushView {
    /// Loads the target's indexes (through the node's cache), its packs and gc records.
    pub async fn load(
        node: &Node,
        rec: &TargetRecord,
        repo: &Repository,
    ) -> Result<(PushView, Vec<String>)> {
        let (index, problems) = super::load_index(node, rec, repo).await?;
        let view = PushView::over(repo, index).await?;
        Ok((view, problems))
    }

    /// The view over `index` (the target's pack indexes): only packs that exist (an index can
    /// outlive its pack: a gc stopped between the two deletes, or a push wrote an index after
    /// its pack was deleted) and are not condemned.
    ///
    /// A pack without its index (a push stopped between the two) is read from its trailer and
    /// used, and its index is written, so that a resumed push does not send it again.
    pub async fn over(repo: &Repository, mut index: ChunkIndex) -> Result<PushView> {
        let mut condemned = Condemned::default();
        condemned.refresh(repo).await?;
        let packs = repo.pack_listing().await?;
        let orphans: Vec<_> = packs
            .iter()
            .filter(|(p, _)| !index.packs.contains_key(p) && !condemned.contains(p))
            .take(MAX_ORPHANS_READ)
            .map(|(p, info)| (*p, info.size))
            .collect();
        for (p, size) in orphans {
            match repo.read_pack_trailer(&p, size).await {
                Ok(pi) => {
                    repo.put_index(&pi).await?;
                    index.insert(pi);
                }
                Err(e @ Error::Corrupt(_)) => {
                    tracing::warn!(
                        "{e}; no push relies on it, and gc keeps it for an operator to look at"
                    );
                }
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let indexes = index.packs.clone();
        index.retain_packs(|p| packs.contains_key(p) && !condemned.contains(p));
        Ok(PushView {
            index,
            indexes,
            condemned,
        })
    }

    /// Brings the view up to the target as it is now: reads the gc records and lists the
    /// indexes and the packs again, drops every pack that is condemned or gone, adds the
    /// packs stored since (by other pushes too), and returns which of `chunks` are
    /// then not stored in the view.
    ///
    /// The packs are listed again every time, whatever the time since the last listing: how
    /// long ago that was can only be told by this node's clock, which stands still while the
    /// machine is suspended, and a pack may be gone by then (`host/TARGETS.md`).
    pub async fn unsafe_chunks(
        &mut self,
        repo: &Repository,
        chunks: &[ChunkId],
    ) -> Result<Vec<ChunkId>> {
        self.condemned.refresh(repo).await?;
        let mut known = std::mem::take(&mut self.indexes);
        known.extend(self.index.packs.drain());
        let (fresh, problems, _) = repo.load_index_known(known).await?;
        for p in problems {
            tracing::warn!("{p}; its chunks count as absent");
        }
        self.indexes = fresh.packs.clone();
        self.index = fresh;
        let packs = repo.pack_listing().await?;
        let condemned = &self.condemned;
        self.index
            .retain_packs(|p| packs.contains_key(p) && !condemned.contains(p));
        let mut seen = HashSet::new();
        Ok(chunks
            .iter()
            .filter(|id| !self.index.contains(id) && seen.insert(**id))
            .copied()
            .collect())
    }
}

/// What confirming a snapshot found.
#[derive(Debug, PartialEq, Eq)]
pub enum Confirmed {
    /// Every chunk is safely stored; `restored` of them had to be stored again.
    Whole { restored: u64 },
    /// These chunks are not safely stored and the node cannot store them again.
    Incomplete { missing: usize },
}

/// Confirms that every one of `chunks` (a manifest's, already written to the target) is in a
/// pack that exists and is not condemned, storing the others again from `src` (the node's
/// repository and its index), and checking again, until nothing is missing.
pub async fn confirm(
    view: &mut PushView,
    repo: &Repository,
    src: Option<(&Repository, &ChunkIndex)>,
    chunks: &[ChunkId],
    progress: &ProgressBar,
) -> Result<Confirmed> {
    let mut restored = 0u64;
    for _ in 0..MAX_REPAIR_ROUNDS {
        let missing = view.unsafe_chunks(repo, chunks).await?;
        if missing.is_empty() {
            return Ok(Confirmed::Whole { restored });
        }
        let Some((src, src_index)) = src.filter(|(_, i)| missing.iter().all(|c| i.contains(c)))
        else {
            return Ok(Confirmed::Incomplete {
                missing: missing.len(),
            });
        };
        tracing::info!(
            chunks = missing.len(),
            target_url = repo.location(),
            "storing chunks again: their packs were condemned by a gc while this push ran"
        );
        restored += missing.len() as u64;
        let mut sink = PackSink::into_target(repo, &mut view.index);
        copy_chunks(src, src_index, &missing, &mut sink, progress).await?;
    }
    Err(Error::Unavailable {
        message: format!(
            "gcs of {} condemned the chunks this push stored {MAX_REPAIR_ROUNDS} times over; \
             is HOLDFAST_TARGET_GRACE set to almost nothing? push again",
            repo.location()
        ),
        source: None,
    })
}

/// What finishing an unfinished push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Finished {
    /// The manifest is whole: the intent went, the snapshot is committed.
    Committed,
    /// There was no manifest: its key was fenced (the push's write can no longer land), and
    /// the intent went.
    NoManifest,
    /// The manifest names chunks that are not safely stored and cannot be stored again from
    /// here: it stays hidden under its intent (the node that wrote the intent completes it if
    /// it still has the snapshot; `target clear-pending --drop-incomplete` with every node
    /// that pushed the snapshot removes it).
    Incomplete { missing: usize },
    /// The object at the manifest's key does not decode, or describes another snapshot: it
    /// stays hidden under its intent for an operator to look at (`holdfast target check`).
    Damaged,
    /// Incomplete, and removed as the operator asked (the manifest deleted and its key fenced,
    /// then the intent).
    Dropped,
}

/// Finishes an intent whose push is not running (this node's own, proven by its volume lock,
/// or one the operator clears). `ours` is the snapshot's manifest when this node still has
/// it: the push is then completed (the manifest written, create-only, if it is not there). A
/// manifest that is there is confirmed (repaired from `src` if given); once whole, the intent
/// goes and the snapshot becomes visible. Without a manifest (and without `ours`) the key is
/// fenced first, so the stopped push's write, if it is still on its way, can never land. A
/// manifest that cannot be made whole is removed only if `drop_incomplete` says so, only
/// while an intent still hides it and no lock record names it; otherwise it stays hidden.
pub async fn finish(
    view: &mut PushView,
    repo: &Repository,
    src: Option<(&Repository, &ChunkIndex)>,
    intent: &Intent,
    ours: Option<&[u8]>,
    drop_incomplete: Option<&[NodeId]>,
    progress: &ProgressBar,
) -> Result<Finished> {
    let (volume, snapshot) = (&intent.volume, intent.snapshot);
    let what = format!("{volume}@{snapshot} in {}", repo.location());
    let mut found = at_key(repo, volume, &snapshot).await?;
    if let (AtKey::Absent, Some(raw)) = (&found, ours) {
        found = match repo.put_manifest(volume, &snapshot, raw.to_vec()).await {
            Ok(()) => AtKey::Manifest(bytes::Bytes::copy_from_slice(raw)),
            Err(Error::Conflict(_)) => at_key(repo, volume, &snapshot).await?,
            Err(e) => return Err(e),
        };
    }
    if let AtKey::Absent = found {
        // The push's manifest write may still land (a request that outlived its process):
        // fence the key first, so that it cannot, or find the manifest that just did.
        found = fence(repo, volume, &snapshot).await?;
    }
    let outcome = match found {
        AtKey::Absent | AtKey::Fence => Finished::NoManifest,
        AtKey::Manifest(raw) => {
            let decoded = Manifest::decode(&raw, &what).and_then(|m| {
                let ours_too = ours.map(|o| Manifest::decode(o, &what)).transpose()?;
                Ok((m, ours_too))
            });
            match decoded {
                Ok((m, ours_too))
                    if m.id == snapshot
                        && &m.volume == volume
                        && ours_too.as_ref().is_none_or(|o| o.blocks == m.blocks) =>
                {
                    finish_manifest(view, repo, src, intent, &m, drop_incomplete, progress).await?
                }
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "it describes other blocks or another snapshot".to_string(),
                    };
                    tracing::warn!(
                        "{what}: the object at its manifest's key is not this snapshot's \
                         manifest ({why}); it stays hidden under its intent. If no holdfast \
                         wrote it, delete it and its intent {}",
                        intent.key
                    );
                    Finished::Damaged
                }
            }
        }
    };
    if matches!(outcome, Finished::Committed | Finished::NoManifest) {
        repo.delete_object(&intent.key).await?;
    }
    tracing::info!(
        volume = %volume,
        snapshot = %snapshot,
        node = %intent.node,
        ?outcome,
        "finished an interrupted push"
    );
    Ok(outcome)
}

/// Confirms a manifest found under an intent; drops it if asked and allowed.
async fn finish_manifest(
    view: &mut PushView,
    repo: &Repository,
    src: Option<(&Repository, &ChunkIndex)>,
    intent: &Intent,
    m: &Manifest,
    drop_incomplete: Option<&[NodeId]>,
    progress: &ProgressBar,
) -> Result<Finished> {
    let (volume, snapshot) = (&intent.volume, intent.snapshot);
    let missing = match confirm(view, repo, src, m.blocks.ids(), progress).await? {
        Confirmed::Whole { .. } => return Ok(Finished::Committed),
        Confirmed::Incomplete { missing } => missing,
    };
    let Some(cleared) = drop_incomplete else {
        return Ok(Finished::Incomplete { missing });
    };
    // Only while every intent of the snapshot is one of the nodes the operator clears
    // (another node pushing the same snapshot has its own, and completes it; nodes that
    // pushed the same snapshot and are all gone are cleared together) and nobody locks it. A
    // node that starts such a push between this check and the deletion is the one window
    // left: the operator says those nodes are gone, and no other should push the snapshot.
    let of_snapshot: Vec<Intent> = intents(repo, Some(volume))
        .await?
        .into_iter()
        .filter(|i| i.snapshot == snapshot)
        .collect();
    let alone = of_snapshot.iter().all(|i| cleared.contains(&i.node));
    let locked = super::locked(repo, volume).await?.contains_key(&snapshot);
    if !alone || locked {
        // Being pushed by another node, committed meanwhile, or someone depends on it.
        return Ok(Finished::Incomplete { missing });
    }
    // Deleted, then fenced (create-only): a copy of the manifest write still on its way (a
    // retried request) can then never land. If one lands in between, the fence finds it:
    // it stays hidden under this intent, incomplete.
    repo.delete_manifest(volume, &snapshot).await?;
    match fence(repo, volume, &snapshot).await? {
        AtKey::Fence | AtKey::Absent => {
            repo.delete_object(&intent.key).await?;
            Ok(Finished::Dropped)
        }
        AtKey::Manifest(_) => Ok(Finished::Incomplete { missing }),
    }
}

/// One unfinished push that `clear_pending` finished (or could not).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClearedPush {
    pub node: NodeId,
    pub volume: VolumeName,
    pub snapshot: SnapshotId,
    pub outcome: Finished,
}

/// Finishes every unfinished push of node `of` in the target: for an operator who knows that
/// node has stopped for good (or will not push there again), because until then its intents
/// hide those snapshots. A manifest that is whole now becomes a committed snapshot; one that
/// is not stays hidden, or with `drop_incomplete` is removed. This node's own unfinished
/// pushes are finished by its next push instead.
pub async fn clear_pending(
    node: &Node,
    rec: &TargetRecord,
    of: &[NodeId],
    drop_incomplete: bool,
    progress: &ProgressBar,
) -> Result<Vec<ClearedPush>> {
    if of.contains(&node.info.node_id) {
        return Err(Error::invalid(format!(
            "{} is this node: its unfinished pushes are finished by its next push of each \
             volume (`holdfast mirror push VOLUME --target {}`)",
            node.info.node_id, rec.name
        )));
    }
    let repo = super::open(rec).await?;
    repo.check_for_writing().await?;
    let theirs: Vec<Intent> = intents(&repo, None)
        .await?
        .into_iter()
        .filter(|i| of.contains(&i.node))
        .collect();
    let mut out = Vec::new();
    if theirs.is_empty() {
        return Ok(out);
    }
    let (mut view, _) = PushView::load(node, rec, &repo).await?;
    for intent in &theirs {
        let outcome = finish(
            &mut view,
            &repo,
            None,
            intent,
            None,
            drop_incomplete.then_some(of),
            progress,
        )
        .await?;
        out.push(ClearedPush {
            node: intent.node.clone(),
            volume: intent.volume.clone(),
            snapshot: intent.snapshot,
            outcome,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_keys_round_trip_and_others_are_refused() {
        // The key names volume, snapshot and node; anything else under pending/ is ignored.
        let id: SnapshotId = "0001000000000000000a".parse().unwrap();
        let key = format!("{PENDING}/vm-1/{id}/node-a.b-00000000000000ff");
        let (v, s, n) = parse_key(&key).unwrap();
        assert_eq!((v.as_str(), s, n.as_str()), ("vm-1", id, "node-a.b"));
        for bad in [
            format!("{PENDING}/vm/{id}/node"),
            format!("{PENDING}/vm/{id}/node-xyz"),
            format!("{PENDING}/vm/{id}/node-ff"),
            format!("{PENDING}/vm/{id}/node-zzzzzzzzzzzzzzzz"),
            format!("{PENDING}/vm/{id}/node-00000000000000ff/x"),
            format!("{PENDING}/../{id}/node-00000000000000ff"),
            format!("{PENDING}/vm/notanid/node-00000000000000ff"),
            // Found by the fuzzer (target_records): the same snapshot in capitals is a key
            // no holdfast wrote.
            format!("{PENDING}/vm/0001000000000000000A/node-00000000000000ff"),
        ] {
            assert!(parse_key(&bad).is_none(), "{bad}");
        }
    }
}
