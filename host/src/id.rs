//! Identifier newtypes and the validation of every name that comes from outside.
//!
//! Names (volumes, snapshots, nodes) end up in object keys, file names and log lines, so they
//! are checked once, here, when they are parsed: 1 to 255 bytes of ASCII letters, digits and
//! `_ - : . +`, not starting with `-` or `.`, and never `..`, `/`, `@`, NUL or control characters.
//! Each refusal says which rule the name broke.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest accepted name, in bytes (as ZFS).
pub const MAX_NAME_BYTES: usize = 255;

/// Checks a user-supplied name; `kind` ("volume name", "snapshot name") goes into the error.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let shown = shorten(name);
    let refuse = |why: &str| Err(Error::invalid(format!("invalid {kind} {shown:?}: {why}")));
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return refuse(&format!(
            "it is {} bytes long; the limit is {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if name.contains('\0') {
        return refuse("it contains a NUL byte");
    }
    if name.chars().any(char::is_control) {
        return refuse("it contains a control character");
    }
    if name.contains("..") {
        return refuse("it contains `..`");
    }
    if name.contains('/') || name.contains('\\') {
        return refuse("it contains a path separator");
    }
    if name.contains('@') {
        return refuse("it contains `@`, which separates volume and snapshot in VOLUME@SNAPSHOT");
    }
    if name.starts_with('-') || name.starts_with('.') {
        return refuse("it starts with `-` or `.`");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '+')))
    {
        return refuse(&format!(
            "it contains {c:?}; use letters, digits and `_ - : . +`"
        ));
    }
    Ok(())
}

/// A name cut to a length that is safe to print in an error (hostile names can be megabytes).
pub fn shorten(s: &str) -> String {
    shorten_to(s, 64)
}

/// `s` cut to at most `max` bytes (on a character boundary), saying how long it was.
pub fn shorten_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        /// Quoted, like a string, so messages can write `{name:?}`.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// For names read back from this node's own database, validated when stored.
            #[allow(dead_code)] // not every name type is read back this way
            pub(crate) fn from_trusted(s: &str) -> Self {
                debug_assert!(validate_name($kind, s).is_ok(), "{s:?}");
                Self(s.to_string())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                validate_name($kind, s)?;
                Ok(Self(s.to_string()))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The name of a volume on a node, unique on that node.
    VolumeName,
    "volume name"
);
name_type!(
    /// The user-visible name of a snapshot, unique within its volume.
    SnapshotName,
    "snapshot name"
);
name_type!(
    /// The name of a region of a volume (a partition or a byte range), unique within it.
    RegionName,
    "region name"
);
name_type!(
    /// A node's identity: chosen at `init` or generated.
    NodeId,
    "node id"
);

macro_rules! hash_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn to_hex(&self) -> String {
                hex32(&self.0).to_string()
            }

            /// The first 12 hex digits, for humans.
            pub fn short(&self) -> String {
                self.to_hex()[..12].to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                parse_hex32(s)
                    .map(Self)
                    .ok_or_else(|| Error::invalid(format!("invalid {} {:?}: expected 64 hex digits", $kind, shorten(s))))
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&hex32(&self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hash_type!(
    /// The BLAKE3 hash of a block's plain bytes: a chunk's address.
    ChunkId,
    "chunk id"
);
hash_type!(
    /// The BLAKE3 hash of a pack object's bytes: its address.
    PackId,
    "pack id"
);

/// 64 lowercase hex digits, without allocating (manifests hold one per block).
struct Hex32([u8; 64]);

impl std::ops::Deref for Hex32 {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

fn hex32(bytes: &[u8; 32]) -> Hex32 {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    Hex32(out)
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Where the random part of new snapshot ids comes from, when a simulation seeded it.
static SEEDED_IDS: std::sync::Mutex<Option<rand::rngs::StdRng>> = std::sync::Mutex::new(None);

/// A snapshot's identity, the same on every node of a cascade: 48 bits of creation time in
/// milliseconds and 32 random bits, printed as 20 hex digits, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(u128);

impl SnapshotId {
    const HEX_LEN: usize = 20;

    /// A new id for a snapshot taken at `unix_ms`.
    pub fn generate(unix_ms: u64) -> Self {
        let random: u32 = match SEEDED_IDS.lock().expect("not poisoned").as_mut() {
            Some(rng) => rand::Rng::random(rng),
            None => rand::random(),
        };
        SnapshotId((((unix_ms & 0xffff_ffff_ffff) as u128) << 32) | random as u128)
    }

    /// Makes the random part of new ids come from `seed` (`None`: from the system again), so
    /// that a simulation (`tests/sim`), which also sets the clock, replays the same ids.
    pub fn seed_random_part(seed: Option<u64>) {
        *SEEDED_IDS.lock().expect("not poisoned") =
            seed.map(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64);
    }

    pub fn as_u128(&self) -> u128 {
        self.0
    }

    pub fn from_u128(v: u128) -> Self {
        SnapshotId(v)
    }

    /// The creation time encoded in the id.
    pub fn unix_ms(&self) -> u64 {
        (self.0 >> 32) as u64
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // By hand: ids are formatted by the thousand for listings and policy views.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 20];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = HEX[((self.0 >> (4 * (19 - i))) & 0xf) as usize];
        }
        f.write_str(std::str::from_utf8(&buf).expect("ascii"))
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

impl FromStr for SnapshotId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.len() != Self::HEX_LEN || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(format!(
                "invalid snapshot id {:?}: expected {} hex digits",
                shorten(s),
                Self::HEX_LEN
            )));
        }
        u128::from_str_radix(s, 16)
            .map(SnapshotId)
            .map_err(|_| Error::invalid(format!("invalid snapshot id {s:?}")))
    }
}

impl Serialize for SnapshotId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SnapshotId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `VOLUME@SNAPSHOT`, where SNAPSHOT is a name, an id or a unique prefix of an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRef {
    pub volume: VolumeName,
    pub snapshot: String,
}

impl FromStr for SnapshotRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let Some((vol, snap)) = s.split_once('@') else {
            return Err(Error::invalid(format!(
                "invalid snapshot reference {:?}: expected VOLUME@SNAPSHOT (a name or an id)",
                shorten(s)
            )));
        };
        let volume: VolumeName = vol.parse()?;
        // The snapshot part is either a name or an id (hex digits are valid name characters).
        validate_name("snapshot name", snap)?;
        Ok(SnapshotRef {
            volume,
            snapshot: snap.to_string(),
        })
    }
}

impl fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.snapshot)
    }
}

/// A name or id read from a key in a store, only in the form holdfast writes it: one that
/// parses but prints otherwise (an id in capitals) is another object naming the same thing,
/// which no holdfast wrote, and is ignored like any other stranger.
pub fn canonical<T: FromStr + fmt::Display>(s: &str) -> Option<T> {
    let v: T = s.parse().ok()?;
    (v.to_string() == s).then_some(v)
}

/// Longest accepted label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;

/// Parses a `key=value` label: the key follows the name rules, the value is bounded UTF-8
/// without control characters.
pub fn parse_label(s: &str) -> Result<(String, String)> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(Error::invalid(format!(
            "invalid label {:?}: expected KEY=VALUE",
            shorten(s)
        )));
    };
    validate_name("label key", k)?;
    validate_text("label value", v, MAX_LABEL_VALUE_BYTES)?;
    Ok((k.to_string(), v.to_string()))
}

/// Checks free text that users will see (label values, lock values): bounded, no controls.
pub fn validate_text(kind: &str, s: &str, max_bytes: usize) -> Result<()> {
    if s.len() > max_bytes {
        return Err(Error::invalid(format!(
            "invalid {kind} {:?}: it is {} bytes long; the limit is {max_bytes}",
            shorten(s),
            s.len()
        )));
    }
    if s.chars().any(is_hazard) {
        return Err(Error::invalid(format!(
            "invalid {kind} {:?}: it contains a control character",
            shorten(s)
        )));
    }
    Ok(())
}

/// Characters that change how a terminal shows what follows: control characters, line and
/// paragraph separators, and the bidirectional overrides and isolates (which can make text
/// read backwards).
pub fn is_hazard(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

/// Most labels one snapshot in a peer's listing may carry, and one listing in all. A listing is
/// parsed before its records can be checked, and a tiny label costs ten times its bytes once
/// held: these bounds apply while it is parsed ([`with_label_budget`]).
pub const MAX_LISTED_LABELS_PER_SNAPSHOT: usize = 256;
pub const MAX_LISTED_LABELS: usize = 1 << 17;

thread_local! {
    /// Labels the parse running on this thread may still take (`None`: no bound, as when the
    /// catalog reads its own records).
    static LABEL_BUDGET: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `parse`, a synchronous deserialization of text from a peer, with the labels of the
/// snapshot records in it bounded ([`MAX_LISTED_LABELS_PER_SNAPSHOT`],
/// [`MAX_LISTED_LABELS`]): past them the parse fails, before more is allocated.
pub fn with_label_budget<T>(parse: impl FnOnce() -> T) -> T {
    let before = LABEL_BUDGET.replace(Some(MAX_LISTED_LABELS));
    let out = parse();
    LABEL_BUDGET.set(before);
    out
}

/// A snapshot record's labels, bounded while a [`with_label_budget`] parse runs.
pub fn deserialize_labels<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    bounded_map(d, MAX_LISTED_LABELS_PER_SNAPSHOT, "labels")
}

/// A snapshot record's regions, bounded like its labels (and counted in the same budget).
pub fn deserialize_regions<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<crate::region::RegionMap, D::Error> {
    bounded_map(d, crate::region::MAX_REGIONS, "regions")
}

/// A map whose entries, while a [`with_label_budget`] parse runs, are counted as they are
/// parsed: at most `per_record` in this map and [`MAX_LISTED_LABELS`] in the whole parse.
fn bounded_map<'de, D, K, V>(
    d: D,
    per_record: usize,
    what: &'static str,
) -> Result<std::collections::BTreeMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: serde::Deserialize<'de> + Ord,
    V: serde::Deserialize<'de>,
{
    struct Bounded<K, V> {
        per_record: usize,
        what: &'static str,
        _kv: std::marker::PhantomData<(K, V)>,
    }
    impl<'de, K, V> serde::de::Visitor<'de> for Bounded<K, V>
    where
        K: serde::Deserialize<'de> + Ord,
        V: serde::Deserialize<'de>,
    {
        type Value = std::collections::BTreeMap<K, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a map of {}", self.what)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<K, V>()? {
                if let Some(left) = LABEL_BUDGET.get() {
                    if out.len() >= self.per_record {
                        return Err(serde::de::Error::custom(format!(
                            "a snapshot with more than {} {}",
                            self.per_record, self.what
                        )));
                    }
                    if left == 0 {
                        return Err(serde::de::Error::custom(format!(
                            "more than {MAX_LISTED_LABELS} labels and regions in all"
                        )));
                    }
                    LABEL_BUDGET.set(Some(left - 1));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Bounded {
        per_record,
        what,
        _kv: std::marker::PhantomData,
    })
}

/// Text from outside (a label, a lock value, a peer's error message) as it is safe to print on
/// a terminal or in a log: the characters of [`is_hazard`] shown escaped (`\u{1b}`), never
/// sent raw.
pub fn escape_hazards(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(is_hazard) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if is_hazard(c) {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused_with_the_rule_they_broke() {
        // Each hostile name is refused and the message says why.
        let long = "a".repeat(256);
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (&long, "256 bytes"),
            ("a/b", "path separator"),
            ("..", "`..`"),
            ("a..b", "`..`"),
            ("a@b", "`@`"),
            ("a\0b", "NUL"),
            ("a\nb", "control"),
            ("-x", "starts with"),
            ("a b", "' '"),
        ];
        for (name, why) in cases {
            let err = validate_name("volume name", name).unwrap_err().to_string();
            assert!(err.contains(why), "{name:?}: {err}");
        }
        assert!(validate_name("volume name", &"a".repeat(255)).is_ok());
        assert!(validate_name("volume name", "db-01:prod.v2+x_y").is_ok());
    }

    #[test]
    fn ten_megabyte_name_is_refused_and_the_error_stays_short() {
        // A 10 MB name must not end up whole in the message.
        let huge = "x".repeat(10 << 20);
        let err = validate_name("volume name", &huge).unwrap_err().to_string();
        assert!(err.len() < 300, "{}", err.len());
    }

    #[test]
    fn snapshot_ids_round_trip_and_sort_by_time() {
        // Display/FromStr round-trip, and a later id sorts after an earlier one.
        let a = SnapshotId::generate(1_700_000_000_000);
        let b = SnapshotId::generate(1_700_000_000_001);
        assert!(a < b);
        assert_eq!(a.to_string().parse::<SnapshotId>().unwrap(), a);
        assert_eq!(a.unix_ms(), 1_700_000_000_000);
        assert!("xyz".parse::<SnapshotId>().is_err());
        // A store's key names an id only in the form holdfast writes.
        let a = SnapshotId::from_u128(0xabc_0000_0001);
        let upper = a.to_string().to_uppercase();
        assert_eq!(upper.parse::<SnapshotId>().unwrap(), a);
        assert_eq!(canonical::<SnapshotId>(&a.to_string()), Some(a));
        assert_eq!(canonical::<SnapshotId>(&upper), None);
        let pack = PackId([0xab; 32]);
        assert_eq!(canonical::<PackId>(&pack.to_string().to_uppercase()), None);
        assert_eq!(canonical::<PackId>(&pack.to_string()), Some(pack));
    }

    #[test]
    fn chunk_ids_round_trip_through_hex_and_serde() {
        // The hex form is the serde form.
        let id = ChunkId(*blake3::hash(b"abc").as_bytes());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", id.to_hex()));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
    }

    #[test]
    fn snapshot_refs_need_both_parts() {
        // VOLUME@SNAPSHOT parses; missing or hostile parts are refused.
        let r: SnapshotRef = "vol@snap-1".parse().unwrap();
        assert_eq!(r.volume.as_str(), "vol");
        assert_eq!(r.snapshot, "snap-1");
        assert!("vol".parse::<SnapshotRef>().is_err());
        assert!("vol@".parse::<SnapshotRef>().is_err());
        assert!("../x@y".parse::<SnapshotRef>().is_err());
        assert!("v@a@b".parse::<SnapshotRef>().is_err());
    }
}
