//! Policy answers built from fuzz input, as the component model would lift them, converted
//! and checked by the host exactly as a real policy's are (see [`crate::fuzz::wit_answers`]).

use arbitrary::{Result, Unstructured};

use super::bindings::since_v0_1::holdfast::policy::types as v01;
use super::bindings::since_v0_2::holdfast::policy::types as v02;
use super::convert::{since_v0_1, since_v0_2};
use super::view::ViewIndex;
use super::{NodeView, Phase, PruneProposal};
use crate::id::SnapshotId;
use crate::softlock::{LockType, MAX_LOCKS_PER_SET, validate_value};

/// What a fuzz input's answer was built from: most ids the view's, some anything at all.
struct Gen<'a, 'b> {
    u: &'a mut Unstructured<'b>,
    ids: &'a [SnapshotId],
    /// Strings at most a few bytes (for the item repeated past the limit: 100,001 copies).
    short: bool,
}

impl<'a, 'b> Gen<'a, 'b> {
    fn new(u: &'a mut Unstructured<'b>, ids: &'a [SnapshotId]) -> Self {
        Gen {
            u,
            ids,
            short: false,
        }
    }

    fn id(&mut self) -> Result<SnapshotId> {
        if !self.ids.is_empty() && self.u.ratio(3u8, 4u8)? {
            Ok(*self.u.choose(self.ids)?)
        } else {
            Ok(SnapshotId::from_u128(self.u.arbitrary()?))
        }
    }
    /// A string, usually short and printable, sometimes anything (controls, huge, empty).
    fn text(&mut self) -> Result<String> {
        if self.short {
            let n = self.u.int_in_range(0..=4usize)?;
            return Ok(String::from_utf8_lossy(self.u.bytes(n)?).into_owned());
        }
        if self.u.ratio(1u8, 8u8)? {
            let n = self.u.int_in_range(0..=4096usize)?;
            return Ok("x".repeat(n));
        }
        self.u.arbitrary()
    }

    /// A list of up to 16 items; now and then one item repeated past the limit of a lock set
    /// (the check comes before any other work).
    fn list<T: Clone>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        if self.u.ratio(1u8, 64u8)? {
            self.short = true;
            let one = item(self)?;
            self.short = false;
            return Ok(vec![one; MAX_LOCKS_PER_SET + 1]);
        }
        let n = self.u.int_in_range(0..=16)?;
        (0..n).map(|_| item(self)).collect()
    }
    /// A description's name, version and phases (0..=4 each).
    fn description(&mut self) -> Result<(String, String, Vec<usize>)> {
        let (name, version) = (self.text()?, self.text()?);
        let n = self.u.int_in_range(0..=6)?;
        let phases = (0..n)
            .map(|_| self.u.int_in_range(0..=4))
            .collect::<Result<_>>()?;
        Ok((name, version, phases))
    }
    fn tag(&mut self) -> Result<(usize, String)> {
        Ok((self.u.int_in_range(0..=4)?, self.text()?))
    }
}

macro_rules! lock_type {
    ($wit:ident, $k:expr, $tag:expr) => {
        match $k {
            0 => $wit::LockType::OwnerName,
            1 => $wit::LockType::DestinationPath,
            2 => $wit::LockType::QtreeName,
            3 => $wit::LockType::Application,
            _ => $wit::LockType::Custom($tag),
        }
    };
}

macro_rules! phase {
    ($wit:ident, $k:expr) => {
        match $k {
            0 => $wit::Phase::SnapshotCreated,
            1 => $wit::Phase::BeforeMirror,
            2 => $wit::Phase::AfterMirror,
            3 => $wit::Phase::Scheduled,
            _ => $wit::Phase::Retention,
        }
    };
}

/// The index a view is checked against.
pub fn view_index(view: NodeView) -> ViewIndex {
    ViewIndex::new(view)
}

/// Lock requests of 0.1 (ids as text: the view's, changed in case, or anything).
pub fn v01_locks(
    index: &ViewIndex,
    u: &mut Unstructured<'_>,
    ids: &[SnapshotId],
) -> Result<crate::Result<Vec<(SnapshotId, LockType, String)>>> {
    let answer = Gen::new(u, ids).list(|g| {
        let snapshot_id = match g.u.int_in_range(0..=3u8)? {
            0 => g.text()?,
            1 => g.id()?.to_string().to_uppercase(),
            _ => g.id()?.to_string(),
        };
        let (k, tag) = g.tag()?;
        Ok(v01::LockRequest {
            snapshot_id,
            lock_type: lock_type!(v01, k, tag),
            value: g.text()?,
        })
    })?;
    Ok(checked_locks(
        index,
        since_v0_1::locks_from_wit(index, answer),
    ))
}

pub fn v01_prunes(
    index: &ViewIndex,
    u: &mut Unstructured<'_>,
    ids: &[SnapshotId],
) -> Result<crate::Result<Vec<PruneProposal>>> {
    let answer = Gen::new(u, ids).list(|g| {
        let snapshot_id = if g.u.ratio(1u8, 4u8)? {
            g.text()?
        } else {
            g.id()?.to_string()
        };
        Ok(v01::PruneProposal {
            snapshot_id,
            reason: g.text()?,
        })
    })?;
    Ok(checked_prunes(
        index,
        since_v0_1::prunes_from_wit(index, answer),
    ))
}

pub fn v01_description(u: &mut Unstructured<'_>) -> Result<crate::Result<()>> {
    let (name, version, phases) = Gen::new(u, &[]).description()?;
    let phases = phases.into_iter().map(|k| phase!(v01, k)).collect();
    let d = v01::Description {
        name,
        version,
        phases,
    };
    Ok(since_v0_1::description_from_wit(d).map(check_description))
}

pub fn v02_locks(
    index: &ViewIndex,
    u: &mut Unstructured<'_>,
    ids: &[SnapshotId],
) -> Result<crate::Result<Vec<(SnapshotId, LockType, String)>>> {
    let answer = Gen::new(u, ids).list(|g| {
        let snapshot = since_v0_2::id_to_wit(g.id()?);
        let (k, tag) = g.tag()?;
        Ok(v02::LockRequest {
            snapshot,
            lock_type: lock_type!(v02, k, tag),
            value: g.text()?,
        })
    })?;
    Ok(checked_locks(
        index,
        since_v0_2::locks_from_wit(index, answer),
    ))
}

pub fn v02_prunes(
    index: &ViewIndex,
    u: &mut Unstructured<'_>,
    ids: &[SnapshotId],
) -> Result<crate::Result<Vec<PruneProposal>>> {
    let answer = Gen::new(u, ids).list(|g| {
        Ok(v02::PruneProposal {
            snapshot: since_v0_2::id_to_wit(g.id()?),
            reason: g.text()?,
        })
    })?;
    Ok(checked_prunes(
        index,
        since_v0_2::prunes_from_wit(index, answer),
    ))
}

pub fn v02_description(u: &mut Unstructured<'_>) -> Result<crate::Result<()>> {
    let (name, version, phases) = Gen::new(u, &[]).description()?;
    let phases = phases.into_iter().map(|k| phase!(v02, k)).collect();
    let d = v02::Description {
        name,
        version,
        phases,
    };
    Ok(since_v0_2::description_from_wit(d).map(check_description))
}

fn checked_locks(
    index: &ViewIndex,
    out: crate::Result<Vec<(SnapshotId, LockType, String)>>,
) -> crate::Result<Vec<(SnapshotId, LockType, String)>> {
    if let Ok(locks) = &out {
        check_locks(index, locks);
    }
    out
}

fn checked_prunes(
    index: &ViewIndex,
    out: crate::Result<Vec<PruneProposal>>,
) -> crate::Result<Vec<PruneProposal>> {
    if let Ok(p) = &out {
        check_prunes(index, p);
    }
    out
}

/// An accepted lock answer: a set's worth at most, of snapshots the view has, with values a
/// lock may carry and custom tags that are names.
fn check_locks(index: &ViewIndex, locks: &[(SnapshotId, LockType, String)]) {
    assert!(locks.len() <= MAX_LOCKS_PER_SET);
    for (id, t, value) in locks {
        assert!(
            index.has(*id),
            "a lock on {id}, which the view does not have"
        );
        validate_value(value).expect("an accepted lock's value is valid");
        if let LockType::Custom(tag) = t {
            crate::id::validate_name("tag", tag).expect("an accepted tag is a name");
        }
    }
}

/// Accepted prunes: snapshots the view has, each once, with short printable reasons.
fn check_prunes(index: &ViewIndex, prunes: &[PruneProposal]) {
    let mut seen = std::collections::HashSet::new();
    for p in prunes {
        assert!(index.has(p.snapshot), "a prune of {}", p.snapshot);
        assert!(seen.insert(p.snapshot), "{} proposed twice", p.snapshot);
        assert!(
            p.reason.len() <= 1100,
            "a reason of {} bytes",
            p.reason.len()
        );
        assert!(!p.reason.chars().any(crate::id::is_hazard));
    }
}

fn check_description(d: super::Description) {
    crate::id::validate_name("policy name", &d.name).expect("an accepted name is a name");
    assert!(d.version.len() <= 64);
    let _: Vec<Phase> = d.phases;
}
