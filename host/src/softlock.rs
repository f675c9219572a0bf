//! Soft locks: "this holder depends on this snapshot; do not delete or change it".
//!
//! A [`SoftLock`] names the snapshot it protects, a [`LockType`] with a user-visible value,
//! the [`HolderId`] (the locking dataset: `NODE/VOLUME` for a mirror, `app:NAME` for an
//! application), when it was set and last refreshed, an optional lease, and the nodes it
//! travelled through. Locks are grouped in lock sets: everything one holder asks of this node
//! for one volume, versioned by a generation and replaced as a whole ([`registry`]).
//!
//! # Invariants (DESIGN.md 2, 3, 7)
//! - No path deletes a locked snapshot: every deletion goes through [`registry::guard_delete`]
//!   inside the catalog transaction that removes the snapshot. Only an explicit break removes
//!   the locks, and it is recorded in the history with the holders named.
//! - A lock set with an older generation than the stored one changes nothing.
//! - A lock whose lease ran out is *stale*: shown as such, and released only for holders
//!   whose auto-release setting is on (default off). Every release is in the history.

pub mod registry;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{NodeId, SnapshotId, VolumeName, shorten, validate_name, validate_text};

pub use registry::{
    BreakLocks, LockEvent, LockRegistry, LockSetUpdate, NewLock, ReplaceOutcome, guard_delete,
};

/// Longest lock value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Most locks one holder may keep in one set.
pub const MAX_LOCKS_PER_SET: usize = 100_000;
/// Most nodes a lock may have come through: deeper than any cascade anyone runs, and it bounds
/// what one lock costs to store.
pub const MAX_LOCK_PATH: usize = 32;

/// What kind of dependency a lock records; the value's meaning follows from it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockType {
    /// The value names the owner (a person, a team, a service).
    OwnerName,
    /// The value is the path or URL of a mirror destination that needs the snapshot.
    DestinationPath,
    /// The value names a qtree (a subtree of the volume) that depends on it.
    QtreeName,
    /// The value names an application (a backup tool reading the snapshot, say).
    Application,
    /// A tag of the holder's own choosing (`custom:TAG`).
    Custom(String),
}

impl LockType {
    pub const KNOWN: &'static [&'static str] = &[
        "owner-name",
        "destination-path",
        "qtree-name",
        "application",
        "custom:TAG",
    ];
}

impl fmt::Display for LockType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockType::OwnerName => f.write_str("owner-name"),
            LockType::DestinationPath => f.write_str("destination-path"),
            LockType::QtreeName => f.write_str("qtree-name"),
            LockType::Application => f.write_str("application"),
            LockType::Custom(tag) => write!(f, "custom:{tag}"),
        }
    }
}

impl FromStr for LockType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "owner-name" => LockType::OwnerName,
            "destination-path" => LockType::DestinationPath,
            "qtree-name" => LockType::QtreeName,
            "application" => LockType::Application,
            _ => match s.strip_prefix("custom:") {
                Some(tag) => {
                    validate_name("custom lock tag", tag)?;
                    LockType::Custom(tag.to_string())
                }
                None => {
                    return Err(Error::invalid(format!(
                        "unknown lock type {:?}; use one of {}",
                        shorten(s),
                        LockType::KNOWN.join(", ")
                    )));
                }
            },
        })
    }
}

impl Serialize for LockType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LockType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who holds a lock: `NODE/VOLUME` (a downstream mirror's dataset) or `app:NAME`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HolderId(String);

impl HolderId {
    pub fn application(name: &str) -> Result<Self> {
        format!("app:{name}").parse()
    }

    pub fn mirror(node: &NodeId, volume: &VolumeName) -> Self {
        HolderId(format!("{node}/{volume}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For holders read back from this node's own database, validated when stored.
    pub(crate) fn from_trusted(s: &str) -> Self {
        debug_assert!(s.parse::<HolderId>().is_ok(), "{s:?}");
        HolderId(s.to_string())
    }

    /// An application holder's name.
    pub fn application_name(&self) -> Option<&str> {
        self.0.strip_prefix("app:")
    }
}

impl FromStr for HolderId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(name) = s.strip_prefix("app:") {
            validate_name("application name in holder", name)?;
        } else if let Some((node, vol)) = s.split_once('/') {
            validate_name("node id in holder", node)?;
            validate_name("volume name in holder", vol)?;
        } else {
            return Err(Error::invalid(format!(
                "invalid holder {:?}: use app:NAME for an application or NODE/VOLUME for a mirror",
                shorten(s)
            )));
        }
        Ok(HolderId(s.to_string()))
    }
}

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for HolderId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HolderId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a lock value: non-empty, bounded, no control characters.
pub fn validate_value(v: &str) -> Result<()> {
    if v.is_empty() {
        return Err(Error::invalid("a lock value must not be empty"));
    }
    validate_text("lock value", v, MAX_VALUE_BYTES)
}

/// One soft lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SoftLock {
    pub volume: VolumeName,
    pub snapshot: SnapshotId,
    #[serde(rename = "type")]
    pub lock_type: LockType,
    pub value: String,
    pub holder: HolderId,
    pub set_unix_ms: u64,
    pub refreshed_unix_ms: u64,
    /// Time to live after the last refresh; `None` holds until released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// The nodes this lock came through, nearest first; empty when set on this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<NodeId>,
}

impl SoftLock {
    /// When the lease runs out, if it has one.
    pub fn expires_unix_ms(&self) -> Option<u64> {
        self.lease_ms
            .map(|l| self.refreshed_unix_ms.saturating_add(l))
    }

    /// Whether the lease ran out before `now`.
    pub fn is_stale(&self, now_ms: u64) -> bool {
        self.expires_unix_ms().is_some_and(|e| e <= now_ms)
    }

    /// Same dependency (snapshot, type, value, and the node it started from): a refresh
    /// rather than a new lock.
    pub fn same_dependency(&self, other: &SoftLock) -> bool {
        self.snapshot == other.snapshot
            && self.lock_type == other.lock_type
            && self.value == other.value
            && self.path.first() == other.path.first()
    }

    /// One line for an operator: holder, type and value, age, refresh, lease, route.
    pub fn describe(&self, now_ms: u64) -> String {
        let mut s = format!(
            "{} holds it as {} {:?}, set {} ago, refreshed {} ago",
            self.holder,
            self.lock_type,
            self.value,
            ago(now_ms, self.set_unix_ms),
            ago(now_ms, self.refreshed_unix_ms)
        );
        match (self.lease_ms, self.expires_unix_ms()) {
            (Some(l), Some(e)) if e <= now_ms => s.push_str(&format!(
                ", lease {} ran out {} ago (stale)",
                human_duration(l),
                ago(now_ms, e)
            )),
            (Some(l), Some(e)) => s.push_str(&format!(
                ", lease {} (expires in {})",
                human_duration(l),
                human_duration(e - now_ms)
            )),
            _ => s.push_str(", no lease"),
        }
        if self.path.is_empty() {
            s.push_str(", set on this node");
        } else {
            let route: Vec<&str> = self.path.iter().map(|n| n.as_str()).collect();
            s.push_str(&format!(", came through {}", route.join(" -> ")));
        }
        s
    }
}

/// `2h 5m` style, rounded to seconds.
pub fn human_duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    human_duration(now_ms.saturating_sub(then_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Downstream c's base lock on v, which came through b: set at 1 s, refreshed at 61 s,
    /// with a 2-minute lease.
    fn mirror_lock() -> SoftLock {
        SoftLock {
            volume: "v".parse().unwrap(),
            snapshot: SnapshotId::from_u128(1 << 40),
            lock_type: LockType::DestinationPath,
            value: "c/v".into(),
            holder: "c/v".parse().unwrap(),
            set_unix_ms: 1_000,
            refreshed_unix_ms: 61_000,
            lease_ms: Some(120_000),
            path: vec!["b".parse().unwrap(), "c".parse().unwrap()],
        }
    }

    #[test]
    fn a_refresh_is_the_same_dependency_and_anything_else_is_a_new_lock() {
        // `add` refreshes a lock that is the same dependency instead of adding a second one:
        // the same snapshot, type, value and first node of its path; times, leases and the
        // rest of the route do not count.
        let base = SoftLock {
            value: "b/v".into(),
            holder: "b/v".parse().unwrap(),
            set_unix_ms: 1,
            refreshed_unix_ms: 1,
            lease_ms: None,
            path: vec!["b".parse().unwrap()],
            ..mirror_lock()
        };
        let refreshed = SoftLock {
            set_unix_ms: 5,
            refreshed_unix_ms: 9,
            lease_ms: Some(1000),
            path: vec!["b".parse().unwrap(), "c".parse().unwrap()],
            ..base.clone()
        };
        assert!(base.same_dependency(&refreshed));
        for other in [
            SoftLock {
                snapshot: SnapshotId::from_u128(2 << 40),
                ..base.clone()
            },
            SoftLock {
                lock_type: LockType::QtreeName,
                ..base.clone()
            },
            SoftLock {
                value: "c/v".into(),
                ..base.clone()
            },
            SoftLock {
                path: vec!["c".parse().unwrap()],
                ..base.clone()
            },
        ] {
            assert!(!base.same_dependency(&other), "{other:?}");
        }
    }

    #[test]
    fn an_operator_reads_a_locks_age_lease_and_route() {
        let lock = mirror_lock();
        assert_eq!(
            lock.describe(121_500),
            "c/v holds it as destination-path \"c/v\", set 2m ago, refreshed 1m ago, \
             lease 2m (expires in 59s), came through b -> c"
        );
        assert_eq!(
            lock.describe(241_000),
            "c/v holds it as destination-path \"c/v\", set 4m ago, refreshed 3m ago, \
             lease 2m ran out 1m ago (stale), came through b -> c"
        );
        let here = SoftLock {
            lease_ms: None,
            path: vec![],
            ..lock
        };
        assert!(
            here.describe(61_000)
                .ends_with("no lease, set on this node")
        );
    }

    #[test]
    fn holders_say_whether_they_are_applications() {
        let app: HolderId = "app:backup".parse().unwrap();
        let mirror: HolderId = "nodeB/v".parse().unwrap();
        assert_eq!(app.application_name(), Some("backup"));
        assert_eq!(mirror.application_name(), None);
        assert_eq!(format!("{app:?} {mirror}"), "\"app:backup\" nodeB/v");
    }

    #[test]
    fn lock_types_parse_and_print_and_unknown_types_are_refused() {
        // Every known type round-trips; custom tags need the custom: prefix.
        for t in [
            "owner-name",
            "destination-path",
            "qtree-name",
            "application",
            "custom:tier-1",
        ] {
            assert_eq!(t.parse::<LockType>().unwrap().to_string(), t);
        }
        let err = "ownername".parse::<LockType>().unwrap_err().to_string();
        assert!(err.contains("unknown lock type"), "{err}");
        assert!("custom:".parse::<LockType>().is_err());
        assert!("custom:a/b".parse::<LockType>().is_err());
    }

    #[test]
    fn holders_are_applications_or_node_volume_pairs() {
        // app:NAME and NODE/VOLUME are accepted, anything else refused.
        assert!("app:nightly-db".parse::<HolderId>().is_ok());
        assert!("nodeB/db".parse::<HolderId>().is_ok());
        for bad in [
            "nightly", "app:", "app:../x", "a/b/c", "/v", "n/", "app:a b",
        ] {
            assert!(bad.parse::<HolderId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_bounded_and_free_of_controls() {
        // Hostile values are refused with the rule they broke.
        assert!(validate_value("nightly backup to s3://b/p").is_ok());
        assert!(validate_value("").is_err());
        assert!(validate_value("a\u{0}b").is_err());
        assert!(validate_value(&"x".repeat(10 << 20)).is_err());
    }

    #[test]
    fn staleness_follows_the_lease_from_the_last_refresh() {
        // A lease counts from the last refresh; no lease never goes stale.
        let mut l = SoftLock {
            volume: "v".parse().unwrap(),
            snapshot: SnapshotId::generate(1),
            lock_type: LockType::Application,
            value: "x".into(),
            holder: "app:x".parse().unwrap(),
            set_unix_ms: 1_000,
            refreshed_unix_ms: 5_000,
            lease_ms: Some(1_000),
            path: vec![],
        };
        assert!(!l.is_stale(5_999));
        assert!(l.is_stale(6_000));
        assert!(l.describe(7_000).contains("stale"));
        l.lease_ms = None;
        assert!(!l.is_stale(u64::MAX));
    }
}
