//! The transfer log: every mirror update and every push this node ran, whoever started it
//! (the daemon's schedule or `holdfast mirror run|push` on the command line), counted per
//! relation in the node's catalog, so that `status` and the metrics tell the whole story.

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::id::VolumeName;

/// Key: `mirror/VOLUME` or `push/VOLUME/TARGET`.
const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");

/// Which relation a transfer served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "relation")]
pub enum Relation {
    /// A mirror update of `volume` from `upstream`.
    Mirror {
        volume: VolumeName,
        upstream: String,
    },
    /// A push of `volume` to `target`.
    Push { volume: VolumeName, target: String },
}

impl Relation {
    fn key(&self) -> String {
        match self {
            Relation::Mirror { volume, .. } => format!("mirror/{volume}"),
            Relation::Push { volume, target } => format!("push/{volume}/{target}"),
        }
    }
}

/// How the transfers of one relation went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransferLog {
    #[serde(flatten)]
    pub relation: Relation,
    pub runs: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    /// Successful runs by kind (baseline, incremental, resync, up-to-date).
    pub by_kind: BTreeMap<String, u64>,
    /// Bytes that crossed the wire or went into the target, in all.
    pub bytes: u64,
    pub last_finished_unix_ms: u64,
    pub last_ok: bool,
    pub last_error: Option<String>,
    pub last_summary: Option<String>,
    /// The last successful run's report (a mirror's or a push's, as JSON).
    pub last_report: Option<serde_json::Value>,
}

/// What one run did, for the log.
#[derive(Debug)]
pub struct Outcome {
    pub kind: String,
    pub bytes: u64,
    pub summary: String,
    pub report: serde_json::Value,
}

/// Adds one run to its relation's log. The log is bookkeeping: failing to write it is
/// logged, never an error of the transfer.
pub fn record(
    catalog: &Catalog,
    relation: Relation,
    outcome: std::result::Result<Outcome, &Error>,
) {
    if let Err(e) = try_record(catalog, &relation, outcome) {
        tracing::warn!("could not record a transfer of {}: {e}", relation.key());
    }
}

fn try_record(
    catalog: &Catalog,
    relation: &Relation,
    outcome: std::result::Result<Outcome, &Error>,
) -> Result<()> {
    let key = relation.key();
    let tx = catalog.db().begin_write()?;
    {
        let mut t = tx.open_table(TRANSFERS)?;
        let mut log = match t.get(key.as_str())? {
            Some(v) => serde_json::from_slice(v.value()).ok(),
            None => None,
        }
        .unwrap_or_else(|| TransferLog {
            relation: relation.clone(),
            runs: 0,
            failures: 0,
            consecutive_failures: 0,
            by_kind: BTreeMap::new(),
            bytes: 0,
            last_finished_unix_ms: 0,
            last_ok: false,
            last_error: None,
            last_summary: None,
            last_report: None,
        });
        log.relation = relation.clone();
        log.runs += 1;
        log.last_finished_unix_ms = crate::now_unix_ms();
        match outcome {
            Ok(o) => {
                log.consecutive_failures = 0;
                log.last_ok = true;
                log.last_error = None;
                *log.by_kind.entry(o.kind).or_default() += 1;
                log.bytes += o.bytes;
                log.last_summary = Some(o.summary);
                log.last_report = Some(o.report);
            }
            Err(e) => {
                log.failures += 1;
                log.consecutive_failures += 1;
                log.last_ok = false;
                log.last_error = Some(e.to_string());
            }
        }
        let bytes = serde_json::to_vec(&log).map_err(|e| Error::internal(e.to_string()))?;
        t.insert(key.as_str(), bytes.as_slice())?;
    }
    tx.commit()?;
    Ok(())
}

/// Every relation's log.
pub fn all(catalog: &Catalog) -> Result<Vec<TransferLog>> {
    let tx = catalog.db().begin_read()?;
    let t = match tx.open_table(TRANSFERS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        match serde_json::from_slice(v.value()) {
            Ok(log) => out.push(log),
            Err(e) => tracing::warn!("transfer log {} is unreadable ({e}); skipped", k.value()),
        }
    }
    Ok(out)
}

/// The log of one relation, if it ran.
pub fn of(catalog: &Catalog, relation: &Relation) -> Result<Option<TransferLog>> {
    Ok(all(catalog)?
        .into_iter()
        .find(|l| l.relation.key() == relation.key()))
}
