//! A target's chunk index as a pusher sees it, with the node's cache of pack indexes.

use std::collections::{HashMap, HashSet};

use redb::ReadableDatabase;

use crate::error::Result;
use crate::repo::{ChunkIndex, Repository};
use crate::state::Node;

use super::*;

/// Remembers the indexes of packs this node stored in the target, so that its next push does
/// not read them back.
pub(super) fn remember_indexes(
    node: &Node,
    rec: &TargetRecord,
    packs: &[crate::repo::pack::PackIndex],
) -> Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    let tx = node.catalog.db().begin_write()?;
    {
        let mut t = tx.open_table(TARGET_INDEX)?;
        for pi in packs {
            t.insert(
                (rec.name.as_str(), pi.pack.to_string().as_str()),
                pi.encode()?.as_slice(),
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The target's chunk index, reading only the pack indexes this node has not read before:
/// one LIST per 1,000 packs, then one GET per pack new since the last push or pull, so an
/// incremental push costs requests in proportion to the change, not to the target's size.
/// The cache lives in the node's catalog; what is no longer listed is dropped from it.
pub async fn load_index(
    node: &Node,
    rec: &TargetRecord,
    repo: &Repository,
) -> Result<(ChunkIndex, Vec<String>)> {
    let mut known = HashMap::new();
    {
        let tx = node.catalog.db().begin_read()?;
        match tx.open_table(TARGET_INDEX) {
            Ok(t) => {
                for row in t.range((rec.name.as_str(), "")..)? {
                    let (k, v) = row?;
                    let (target, pack) = k.value();
                    if target != rec.name {
                        break;
                    }
                    // A cache entry that does not decode is only read again from the target.
                    if let (Ok(id), Ok(pi)) = (
                        pack.parse(),
                        crate::repo::pack::PackIndex::decode(v.value(), "cached index"),
                    ) {
                        known.insert(id, pi);
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let before: HashSet<crate::id::PackId> = known.keys().copied().collect();
    let (index, problems, fresh) = repo.load_index_known(known).await?;
    let gone: Vec<String> = before
        .iter()
        .filter(|id| !index.packs.contains_key(id))
        .map(|id| id.to_string())
        .collect();
    if !fresh.is_empty() || !gone.is_empty() {
        let tx = node.catalog.db().begin_write()?;
        {
            let mut t = tx.open_table(TARGET_INDEX)?;
            for pi in &fresh {
                t.insert(
                    (rec.name.as_str(), pi.pack.to_string().as_str()),
                    pi.encode()?.as_slice(),
                )?;
            }
            for id in &gone {
                t.remove((rec.name.as_str(), id.as_str()))?;
            }
        }
        tx.commit()?;
    }
    Ok((index, problems))
}
