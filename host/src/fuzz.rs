//! What the fuzzers in `tests/fuzz` drive: one entry point per parser of bytes from outside
//! (a peer, a bucket, a policy, an operator's file), each the function the node itself calls,
//! with the properties that must hold for any input checked by assertions. An input may be
//! refused (a clear error is the right answer to garbage), but never panic, never ask for more
//! memory than its own size allows, and what is accepted must mean what it says: it encodes
//! back to what decodes to the same thing, and a checked answer names only what exists.
//!
//! The same entry points run over the corpora in `tests/fuzz/corpus` in every `cargo test`
//! (`tests/tests/fuzz_corpus.rs`), so an input that once failed stays a regression test.

use std::collections::BTreeMap;
use std::str::FromStr;

use arbitrary::Unstructured;

use crate::catalog::SnapshotRecord;
use crate::id::{ChunkId, NodeId, RegionName, SnapshotId, SnapshotName, VolumeName};
use crate::policy::{NodeView, Phase};
use crate::repo::pack::{self, PackIndex};
use crate::snapshot::manifest::{Format2Length, Manifest, ManifestDelta, format_2_len};
use crate::softlock::{HolderId, LockType, SoftLock};

/// A fuzz target's entry point: any bytes at all.
pub type Target = fn(&[u8]);

/// Every fuzz target by name: `tests/fuzz/fuzz_targets/NAME.rs` calls it, and
/// `tests/fuzz/corpus/NAME/` holds its corpus.
pub const TARGETS: &[(&str, Target)] = &[
    ("manifest", manifest),
    ("manifest_delta", manifest_delta),
    ("pack", pack_trailer),
    ("chunk_frames", chunk_frames),
    ("lock_set", lock_set),
    ("peer_request", peer_request),
    ("peer_answer", peer_answer),
    ("target_records", target_records),
    ("node_toml", node_toml),
    ("names", names),
    ("wit_answers", wit_answers),
    ("sealed", sealed),
];

/// The valid inputs each corpus starts from (what `holdfast` itself writes), by target.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let m = sample_manifest(64);
    let m2 = {
        let mut m2 = m.clone();
        m2.id = SnapshotId::from_u128(0x0abc_0000_0002);
        m2.blocks = (0..64u8)
            .map(|i| (i % 5 != 0).then(|| chunk_id(i.wrapping_add(3))))
            .collect();
        m2
    };
    out.push(("manifest", [&[0u8][..], &m.encode().unwrap()].concat()));
    out.push((
        "manifest",
        [&[0u8][..], &m.encode_format_1().unwrap()].concat(),
    ));
    let enc = m.encode().unwrap();
    out.push(("manifest", [&[1u8][..], &enc[8..enc.len() - 32]].concat()));
    let delta = m2.delta_from(&m);
    out.push((
        "manifest_delta",
        [&[0u8][..], &delta.encode().unwrap()].concat(),
    ));
    let mut b = pack::PackBuilder::new();
    for i in 0..4u8 {
        let data = vec![i; 700 + i as usize * 300];
        let (e, stored) = crate::chunk::encode(&data).unwrap();
        b.add(crate::chunk::hash(&data), e, &stored, data.len());
    }
    let p = b.finish().unwrap();
    out.push(("pack", [&[0u8][..], &p.bytes].concat()));
    out.push((
        "pack",
        [&[2u8][..], &serde_json::to_vec(&p.index).unwrap()].concat(),
    ));
    let mut frames = Vec::new();
    for (i, data) in [vec![7u8; 4096], b"plain".to_vec()].iter().enumerate() {
        let (e, stored) = crate::chunk::encode(data).unwrap();
        crate::peer::write_frame(
            &mut frames,
            &crate::chunk::hash(data),
            e,
            data.len() as u32,
            &stored,
        );
        if i == 0 {
            out.push(("chunk_frames", frames.clone()));
        }
    }
    out.push(("chunk_frames", frames));
    out.push((
        "lock_set",
        br#"{"volume":"vm1","holder":"nodeB/vm1","generation":3,"locks":[{"snapshot":"0000000abc0000000001","type":"destination-path","value":"nodeB:vm1","lease-ms":60000,"path":["nodeC","nodeB"]}]}"#.to_vec(),
    ));
    out.push((
        "peer_request",
        b"\x00format=2&base=0000000abc0000000001&region=boot".to_vec(),
    ));
    out.push((
        "peer_request",
        [
            &b"\x01"[..],
            format!(r#"{{"chunks":["{}","{}"]}}"#, chunk_id(1), chunk_id(2)).as_bytes(),
        ]
        .concat(),
    ));
    let list = crate::peer::SnapshotList {
        node: "nodeA".parse().unwrap(),
        volume: "vm1".parse().unwrap(),
        snapshots: view()
            .local_snapshots
            .into_iter()
            .map(|mut r| {
                r.size = 1 << 20;
                r.regions.insert(
                    "boot".parse().unwrap(),
                    crate::region::Extent {
                        offset: 4096,
                        length: 65536,
                    },
                );
                r
            })
            .collect(),
        region: None,
    };
    out.push((
        "peer_answer",
        [&b"\x00"[..], &serde_json::to_vec(&list).unwrap()].concat(),
    ));
    out.push((
        "peer_answer",
        br#"{"kind":"not-found","message":"no snapshot vm1@x"}"#.to_vec(),
    ));
    let rec = crate::target::LockRecord {
        holder: "app:backup".parse().unwrap(),
        volume: "vm1".parse().unwrap(),
        written_unix_ms: 1_700_000_000_000,
        locks: vec![crate::target::TargetLock {
            snapshot: SnapshotId::from_u128(0x0abc_0000_0001),
            lock_type: LockType::Application,
            value: "keep".into(),
        }],
    };
    out.push((
        "target_records",
        [&b"\x00"[..], &serde_json::to_vec(&rec).unwrap()].concat(),
    ));
    out.push((
        "target_records",
        format!(
            "\x01{{\"written-by\":\"nodeA\",\"packs\":[\"{}\"]}}",
            chunk_id(9)
        )
        .into_bytes(),
    ));
    out.push((
        "target_records",
        b"\x02pending/vm1/0000000abc0000000001/nodeA-0123456789abcdef".to_vec(),
    ));
    // The configurations the project ships, as operators start from them.
    for text in [
        &include_bytes!("../../examples/cascade/a.toml")[..],
        include_bytes!("../../examples/cascade/b.toml"),
        include_bytes!("../../examples/cascade/c.toml"),
        include_bytes!("../packaging/node.toml"),
    ] {
        out.push(("node_toml", text.to_vec()));
    }
    // An encrypted target's objects and config.
    for (mode, cipher) in [0u8, 2].into_iter().zip(sealed_ciphers()) {
        let key = crate::repo::sealed::ObjectKey::from_master(&SEALED_MASTER, cipher);
        for len in [0usize, 1000, 70_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = crate::repo::sealed::seal(&key, "fuzz", &plain);
            out.push(("sealed", [&[mode][..], &sealed].concat()));
        }
        out.push(("sealed", [&[mode + 1][..], &sealed_config(cipher)].concat()));
    }
    out.push(("names", b"vm1\0nodeB/vm1\0custom:tag\0backup=done".to_vec()));
    out.push(("wit_answers", vec![0, 3, 0, 1, 2, 1, 0, 0, 1, 2, 3, 4, 5]));
    out.push(("wit_answers", vec![1, 3, 1, 1, 0, 2, 1, 0, 7, 7, 7, 7]));
    out
}

fn chunk_id(i: u8) -> ChunkId {
    crate::chunk::hash(&[i; 16])
}

fn sample_manifest(blocks: u8) -> Manifest {
    let bs = 4096u32;
    Manifest {
        format: crate::snapshot::MANIFEST_FORMAT,
        id: SnapshotId::from_u128(0x0abc_0000_0001),
        volume: "vm1".parse().unwrap(),
        name: "hourly-1".parse().unwrap(),
        created_unix_ms: 1_700_000_000_000,
        size: u64::from(blocks) * u64::from(bs) - 100,
        block_size: bs,
        parent: None,
        labels: BTreeMap::from([("backup".to_string(), "done".to_string())]),
        blocks: (0..blocks)
            .map(|i| (i % 3 != 0).then(|| chunk_id(i)))
            .collect(),
    }
}

/// Manifests from a repository, a bucket or a peer, formats 1 and 2, with the streaming length
/// check a downstream runs while one arrives. The first byte picks the form: 0 the bytes as
/// they are; 1 a format-2 body given its magic and checksum (so the fuzzer explores the
/// parser behind the checksum, not the checksum); 2 a format-1 JSON body given its zstd frame.
pub fn manifest(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = match mode % 3 {
        0 => rest.to_vec(),
        1 => {
            let mut b = b"HFMNFST2".to_vec();
            b.extend_from_slice(rest);
            let sum = blake3::hash(&b);
            b.extend_from_slice(sum.as_bytes());
            b
        }
        _ => zstd::bulk::compress(rest, 1).expect("compressing in memory"),
    };
    let Ok(m) = Manifest::decode(&bytes, "fuzz") else {
        // A refused manifest is refused by the streaming check too, or it waits for more.
        return;
    };
    // What was accepted encodes to bytes that decode to the same manifest.
    let again = m.encode().expect("a decoded manifest encodes");
    let mut back = Manifest::decode(&again, "fuzz").expect("an encoded manifest decodes");
    // (A format-1 manifest says so; it is otherwise the same manifest.)
    back.format = m.format;
    assert_eq!(back, m, "format 2 round trip");
    if crate::snapshot::manifest::is_format_2(&bytes) {
        // The length a downstream computes from the first bytes is the manifest's length,
        // whether it reads them at once or a piece at a time.
        let expect = (m.size, m.block_size);
        assert_eq!(
            format_2_len(&bytes, expect, "fuzz").expect("accepted"),
            Some(bytes.len())
        );
        let mut f = Format2Length::default();
        let mut got = None;
        for end in (1..=bytes.len()).step_by(bytes.len().div_ceil(7).max(1)) {
            got = f.feed(&bytes[..end], expect, "fuzz").expect("accepted");
            if got.is_some() {
                break;
            }
        }
        if got.is_none() {
            got = f.feed(&bytes, expect, "fuzz").expect("accepted");
        }
        assert_eq!(got, Some(bytes.len()), "streamed length");
    }
}

/// Manifest deltas from a peer, parsed with the bound a downstream gives them and applied to
/// a base. The first byte: 0 the bytes as they are, 1 the rest given its zstd frame.
pub fn manifest_delta(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        zstd::bulk::compress(rest, 1).expect("compressing in memory")
    };
    // At most what a delta of a 64-block snapshot can take (see mirror.rs), here 1 MiB.
    let Ok(d) = ManifestDelta::decode_at_most(&bytes, "fuzz", 1 << 20) else {
        return;
    };
    let again = d.encode().expect("a decoded delta encodes");
    let back = ManifestDelta::decode(&again, "fuzz").expect("an encoded delta decodes");
    assert_eq!(back, d, "delta round trip");
    let base = sample_manifest(64);
    if let Ok(m) = d.apply(&base, "fuzz") {
        // What a delta builds is a whole, valid manifest.
        let enc = m.encode().expect("an applied delta encodes");
        assert_eq!(Manifest::decode(&enc, "fuzz").expect("decodes"), m);
    }
}

/// Packs read back from a bucket or a directory: the framing, the trailer, its name, the
/// entries' ranges, and every chunk in them. The first byte: even, the pack named by the hash
/// its trailer would have (so the fuzzer gets past the name check), odd, a name that is not its
/// own (refused); below 2 the rest is the pack as it is, from 2 the rest is the trailer's JSON,
/// compressed and framed after 4 KiB of chunk bytes (so the fuzzer reaches the entries).
pub fn pack_trailer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let framed;
    let bytes = if mode % 4 >= 2 {
        let trailer = zstd::bulk::compress(rest, 1).expect("compressing in memory");
        let mut b = b"HFPACK01".to_vec();
        b.resize(4096, 0x5a);
        b.extend_from_slice(&trailer);
        b.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        b.extend_from_slice(b"HFPKEND1");
        framed = b;
        &framed[..]
    } else {
        rest
    };
    let n = bytes.len();
    // The name the trailer implies, if it parses at all.
    let named = (|| {
        let last12 = bytes.get(n.checked_sub(12)?..)?;
        let tlen = pack::trailer_len(&crate::id::PackId([0; 32]), n as u64, last12).ok()?;
        let trailer = &bytes[n - 12 - tlen as usize..n - 12];
        let index = PackIndex::decode(trailer, "fuzz").ok()?;
        PackIndex::id_of(&index.entries, index.salt.as_deref()).ok()
    })();
    let id = match (mode % 2, named) {
        (0, Some(id)) => id,
        (_, Some(mut id)) => {
            id.0[0] ^= 1;
            id
        }
        (_, None) => crate::id::PackId([mode; 32]),
    };
    let Ok(index) = pack::read_trailer(&id, bytes) else {
        return;
    };
    assert!(mode % 2 == 0, "a pack under another name was accepted");
    for e in &index.entries {
        // read_trailer promised every entry lies inside the pack.
        let blob = &bytes[e.offset as usize..(e.offset + u64::from(e.length)) as usize];
        let _ = crate::chunk::decode(&e.id, e.encoding, blob, e.raw_length as usize);
    }
    // An index object (the same zstd JSON, stored on its own) is held to the same name.
    if mode % 4 >= 2 {
        let index = PackIndex::decode(&zstd::bulk::compress(rest, 1).expect("in memory"), "fuzz")
            .expect("decoded above");
        assert_eq!(
            PackIndex::id_of(&index.entries, index.salt.as_deref()).ok(),
            Some(id)
        );
    }
}

/// A chunk stream from an upstream: frames split, each chunk decoded and verified against its
/// id (a peer that lies about a length or an id is refused, never trusted).
pub fn chunk_frames(data: &[u8]) {
    let Ok(frames) = crate::peer::parse_frames(data) else {
        return;
    };
    for f in frames {
        assert!(f.raw_len <= crate::peer::MAX_CHUNK_BYTES);
        if let Ok(plain) = crate::chunk::decode(&f.id, f.encoding, f.stored, f.raw_len) {
            assert_eq!(plain.len(), f.raw_len);
            assert_eq!(
                crate::chunk::hash(&plain),
                f.id,
                "a chunk passed under another id"
            );
        }
    }
}

/// A lock set from a downstream or `lock replace-set` (JSON), checked as the registry checks
/// it. (How the registry stores sets is not an outside format: the node's own database, read
/// back without validating names again, for speed.)
pub fn lock_set(data: &[u8]) {
    let Ok(update) = parse_lock_set(data) else {
        return;
    };
    // Accepted means: a bounded set of bounded, printable values through a bounded path.
    assert!(update.locks.len() <= crate::softlock::MAX_LOCKS_PER_SET);
    for l in &update.locks {
        crate::softlock::validate_value(&l.value).expect("checked");
        assert!(l.path.len() <= crate::softlock::MAX_LOCK_PATH);
    }
    let json = serde_json::to_vec(&update).expect("encodes");
    assert_eq!(
        parse_lock_set(&json).expect("its own encoding parses"),
        update
    );
}

/// A lock set's body as the server parses it and the registry checks it.
fn parse_lock_set(data: &[u8]) -> crate::Result<crate::softlock::LockSetUpdate> {
    let update = crate::peer::server::lock_set_body(data)?;
    crate::softlock::registry::check_update(&update)?;
    Ok(update)
}

/// What a downstream sends a peer besides lock sets: the query string of a manifest or chunk
/// request (first byte 0), or a chunk request's body (first byte 1), parsed and checked as
/// the server does.
pub fn peer_request(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let Ok(q) = std::str::from_utf8(rest) else {
            return;
        };
        let _ = crate::peer::server::parse_queries(q);
    } else if let Ok(req) = crate::peer::server::parse_chunk_request(rest) {
        assert!(req.chunks.len() <= crate::peer::MAX_CHUNKS_PER_REQUEST);
        let unique: std::collections::HashSet<_> = req.chunks.iter().collect();
        assert_eq!(unique.len(), req.chunks.len());
    }
}

/// What an upstream answers: a snapshot listing (first byte 0, parsed with the label budget
/// a downstream gives it and checked as a downstream checks it, also as a replica of each
/// region sees it), a lock-set reply (1), or an error (anything else).
pub fn peer_answer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        let _ = serde_json::from_slice::<crate::peer::WireError>(data);
        return;
    };
    match mode {
        0 => {
            let list: Result<crate::peer::SnapshotList, _> =
                crate::id::with_label_budget(|| serde_json::from_slice(rest));
            let Ok(list) = list else {
                return;
            };
            let labels: usize = list.snapshots.iter().map(|s| s.labels.len()).sum();
            assert!(labels <= crate::id::MAX_LISTED_LABELS);
            // Then checked as a downstream checks a listing before using any of it.
            let up: NodeId = "nodeA".parse().expect("a name");
            let volume = list.volume.clone();
            let Ok(checked) = crate::mirror::check_listing(&up, &volume, None, list.snapshots)
            else {
                return;
            };
            assert!(
                checked.windows(2).all(|w| w[0].id < w[1].id),
                "oldest first"
            );
            // A replica of one region sees a listing that is itself valid.
            let regions: std::collections::BTreeSet<RegionName> = checked
                .iter()
                .flat_map(|r| r.regions.keys().cloned())
                .collect();
            for region in regions.iter().take(4) {
                if let Ok(recs) = crate::mirror::region_records(&up, &checked, region) {
                    crate::mirror::check_listing(&up, &volume, None, recs)
                        .expect("a region's records are a listing a downstream accepts");
                }
            }
        }
        1 => {
            let _ = serde_json::from_slice::<crate::softlock::ReplaceOutcome>(rest);
        }
        _ => {
            if let Ok(w) = serde_json::from_slice::<crate::peer::WireError>(data) {
                let _ = w.into_error("fuzz");
            }
        }
    }
}

/// Records a bucket holds besides packs and manifests: a holder's lock record (first byte 0),
/// a gc's record of condemned packs (1), a push intent's key (2, what a lease is in a target).
pub fn target_records(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(rec) = crate::target::locks::parse_lock_record(rest, "fuzz") {
                let json = serde_json::to_vec(&rec).expect("encodes");
                let back = crate::target::locks::parse_lock_record(&json, "fuzz").expect("parses");
                assert_eq!(back.locks, rec.locks);
            }
        }
        1 => {
            let _ = crate::target::gc::parse_condemned(rest, "fuzz");
        }
        _ => {
            let Ok(key) = std::str::from_utf8(rest) else {
                return;
            };
            if let Some((v, s, n)) = crate::target::pending::parse_key(key) {
                // A key that parses names a volume, a snapshot and a node that print back
                // as the key has them.
                assert!(key.starts_with(&format!("pending/{v}/{s}/{n}-")), "{key}");
            }
        }
    }
}

/// The master key of the `sealed` target's seeds (a key-file slot opens it with
/// [`SEALED_KEY_FILE`]).
const SEALED_MASTER: [u8; 32] = [0x42; 32];
const SEALED_KEY_FILE: [u8; 32] = [0x17; 32];

/// The ciphers of the `sealed` target's inputs, by the second bit of their first byte.
fn sealed_ciphers() -> [crate::repo::sealed::Cipher; 2] {
    use crate::repo::sealed::Cipher;
    [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm]
}

fn sealed_config(cipher: crate::repo::sealed::Cipher) -> Vec<u8> {
    use crate::target::keys;
    let master = keys::MasterKey::from_bytes(SEALED_MASTER);
    let secret = keys::Secret::KeyFile(zeroize::Zeroizing::new(SEALED_KEY_FILE));
    let slot = keys::new_slot(&master, &secret, "fuzz-repository", cipher).expect("a slot");
    serde_json::to_vec(&crate::repo::RepoConfig {
        format: crate::repo::FORMAT_NAME.into(),
        version: crate::repo::TARGET_FORMAT_VERSION,
        id: "fuzz-repository".into(),
        created_unix_ms: 1_700_000_000_000,
        chunk_hash: "blake3".into(),
        compression: "zstd".into(),
        encryption: Some(keys::Encryption {
            cipher: cipher.name().into(),
            slots: vec![slot],
        }),
    })
    .expect("encodes")
}

/// What an encrypted target's bucket hands back: a sealed object (mode 0, sealed with
/// ChaCha20-Poly1305; mode 2, with AES-256-GCM), opened with the seeds' key; or a repository
/// config with key slots (mode 1 or 3), opened with the seeds' key file (key-file slots only:
/// a passphrase slot would cost Argon2id per input). Garbage is refused;
/// what opens must seal and open back to itself, and a config that opens gives the seeds' key.
pub fn sealed(data: &[u8]) {
    use crate::repo::sealed;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key =
        sealed::ObjectKey::from_master(&SEALED_MASTER, sealed_ciphers()[(mode / 2 % 2) as usize]);
    if mode % 2 == 0 {
        if let Ok(plain) = sealed::open(&key, "fuzz", rest) {
            assert_eq!(
                sealed::plain_len(rest.len() as u64),
                Some(plain.len() as u64)
            );
            let again = sealed::seal(&key, "fuzz", &plain);
            assert_eq!(sealed::open(&key, "fuzz", &again).expect("opens"), plain);
            assert!(sealed::open(&key, "other", &again).is_err());
        }
        return;
    }
    let Ok(config) = serde_json::from_slice::<crate::repo::RepoConfig>(rest) else {
        return;
    };
    let Some(enc) = &config.encryption else {
        return;
    };
    let secret = crate::target::keys::Secret::KeyFile(zeroize::Zeroizing::new(SEALED_KEY_FILE));
    if let Ok((master, _)) = crate::target::keys::unlock(enc, &config.id, &secret, "fuzz") {
        assert!(master.is(&SEALED_MASTER));
        // A config that opens names a cipher this holdfast knows.
        enc.cipher("fuzz").expect("a known cipher");
    }
}

/// An operator's `node.toml`, parsed and checked. The checks read token files, relative to
/// `/fuzz/` (which does not exist): a file that names one by an absolute path or through `..`
/// is skipped, so that the fuzzer never reads this machine's files.
pub fn node_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    fn reads_outside(v: &toml::Value) -> bool {
        match v {
            toml::Value::Table(t) => t.iter().any(|(k, v)| {
                (k == "token_file"
                    && v.as_str()
                        .is_none_or(|p| p.starts_with('/') || p.contains("..")))
                    || reads_outside(v)
            }),
            toml::Value::Array(a) => a.iter().any(reads_outside),
            _ => false,
        }
    }
    if text
        .parse::<toml::Table>()
        .is_ok_and(|t| reads_outside(&toml::Value::Table(t)))
    {
        return;
    }
    let _ = crate::config::NodeConfig::parse(text, std::path::Path::new("/fuzz/node.toml"));
}

/// Every name and id parsed from outside (URL paths, command lines, records): split at NUL,
/// each piece parsed as each kind. What parses prints back as itself and parses again to the
/// same value.
pub fn names(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for s in text.split('\0') {
        round_trip::<VolumeName>(s);
        round_trip::<SnapshotName>(s);
        round_trip::<RegionName>(s);
        round_trip::<NodeId>(s);
        round_trip::<HolderId>(s);
        round_trip::<SnapshotId>(s);
        round_trip::<LockType>(s);
        round_trip::<ChunkId>(s);
        round_trip::<Phase>(s);
        let _ = crate::id::SnapshotRef::from_str(s);
        let _ = crate::id::parse_label(s);
        let _ = crate::target::parse_url(s);
        let _ = crate::config::parse_duration("fuzz", s);
    }
}

fn round_trip<T>(s: &str)
where
    T: FromStr + std::fmt::Display + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = s.parse::<T>() {
        let shown = v.to_string();
        let again: T = shown
            .parse()
            .unwrap_or_else(|_| panic!("{shown:?} (from {s:?}) does not parse again"));
        assert_eq!(again, v);
    }
}

/// A policy's answers after the component model lifted them: lock requests, prune proposals
/// and descriptions of both WIT versions, as the host converts and checks them. The input
/// drives an `arbitrary` builder; snapshots are often ones the view has, so the checks past
/// "does it exist" are reached.
pub fn wit_answers(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let index = crate::policy::fuzz::view_index(view());
    let ids: Vec<SnapshotId> = view().local_snapshots.iter().map(|s| s.id).collect();
    let (Ok(version), Ok(kind)) = (u.int_in_range(0u8..=1), u.int_in_range(0u8..=2)) else {
        return;
    };
    use crate::policy::fuzz as f;
    // Running out of input midway is the fuzzer's problem, not an answer to check.
    let _ = match (version, kind) {
        (0, 0) => f::v01_locks(&index, &mut u, &ids).map(|_| ()),
        (0, 1) => f::v01_prunes(&index, &mut u, &ids).map(|_| ()),
        (0, _) => f::v01_description(&mut u).map(|_| ()),
        (_, 0) => f::v02_locks(&index, &mut u, &ids).map(|_| ()),
        (_, 1) => f::v02_prunes(&index, &mut u, &ids).map(|_| ()),
        (_, _) => f::v02_description(&mut u).map(|_| ()),
    };
}

/// The view the policy answers are checked against: four snapshots of `vm1`, one locked.
fn view() -> NodeView {
    let snaps: Vec<SnapshotRecord> = (0..4u128)
        .map(|i| SnapshotRecord {
            id: SnapshotId::from_u128(0x0abc_0000_0001 + i),
            volume: "vm1".parse().unwrap(),
            name: format!("hourly-{i}").parse().unwrap(),
            created_unix_ms: 1_700_000_000_000 + i as u64,
            size: 4096,
            block_size: 4096,
            labels: BTreeMap::new(),
            parent: None,
            stats: Default::default(),
            regions: Default::default(),
        })
        .collect();
    let lock = SoftLock {
        volume: "vm1".parse().unwrap(),
        snapshot: snaps[0].id,
        lock_type: LockType::Application,
        value: "keep".into(),
        holder: "app:x".parse().unwrap(),
        set_unix_ms: 0,
        refreshed_unix_ms: 0,
        lease_ms: None,
        path: vec![],
    };
    NodeView {
        node_id: "nodeA".parse().unwrap(),
        volume: "vm1".parse().unwrap(),
        phase: Phase::Retention,
        now_unix_ms: 1_700_000_100_000,
        local_snapshots: snaps,
        upstream_snapshots: None,
        locks_held_here: vec![lock],
        locks_from_downstream: vec![],
        downstreams: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_runs_and_every_target_has_one() {
        let seeds = seeds();
        for (name, _) in TARGETS {
            assert!(seeds.iter().any(|(n, _)| n == name), "no seed for {name}");
        }
        for (name, bytes) in &seeds {
            let f = TARGETS.iter().find(|(n, _)| n == name).expect("a target").1;
            f(bytes);
        }
    }

    #[test]
    fn the_seeds_are_accepted_so_the_fuzzers_start_past_the_checks() {
        // A corpus of inputs the parsers refuse at once would leave the fuzzers at the door.
        let seeds = seeds();
        let of = |name: &'static str| {
            seeds
                .iter()
                .filter(move |(n, _)| *n == name)
                .map(|(_, b)| b)
        };
        for b in of("manifest") {
            let bytes = if b[0] == 1 {
                let mut v = b"HFMNFST2".to_vec();
                v.extend_from_slice(&b[1..]);
                let sum = blake3::hash(&v);
                v.extend_from_slice(sum.as_bytes());
                v
            } else {
                b[1..].to_vec()
            };
            Manifest::decode(&bytes, "seed").unwrap();
        }
        for b in of("manifest_delta") {
            let d = ManifestDelta::decode(&b[1..], "seed").unwrap();
            d.apply(&sample_manifest(64), "seed").unwrap();
        }
        for b in of("pack").filter(|b| b[0] < 2) {
            let p = b[1..].to_vec();
            let n = p.len();
            let tlen = pack::trailer_len(&crate::id::PackId([0; 32]), n as u64, &p[n - 12..]);
            let trailer = &p[n - 12 - tlen.unwrap() as usize..n - 12];
            let index = PackIndex::decode(trailer, "seed").unwrap();
            let id = PackIndex::id_of(&index.entries, None).unwrap();
            assert_eq!(pack::read_trailer(&id, &p).unwrap().entries.len(), 4);
        }
        for b in of("chunk_frames") {
            assert!(!crate::peer::parse_frames(b).unwrap().is_empty());
        }
        for b in of("lock_set") {
            parse_lock_set(b).unwrap();
        }
        for b in of("peer_request") {
            if b[0] == 0 {
                crate::peer::server::parse_queries(std::str::from_utf8(&b[1..]).unwrap()).unwrap();
            } else {
                crate::peer::server::parse_chunk_request(&b[1..]).unwrap();
            }
        }
        for b in of("target_records") {
            match b[0] {
                0 => drop(crate::target::locks::parse_lock_record(&b[1..], "seed").unwrap()),
                1 => drop(crate::target::gc::parse_condemned(&b[1..], "seed").unwrap()),
                _ => {
                    let key = std::str::from_utf8(&b[1..]).unwrap();
                    crate::target::pending::parse_key(key).unwrap();
                }
            }
        }
        for b in of("peer_answer").filter(|b| b[0] == 0) {
            let list: crate::peer::SnapshotList = serde_json::from_slice(&b[1..]).unwrap();
            let up = "nodeA".parse().unwrap();
            let ok = crate::mirror::check_listing(&up, &list.volume, None, list.snapshots);
            let region = "boot".parse().unwrap();
            assert_eq!(
                crate::mirror::region_records(&up, &ok.unwrap(), &region)
                    .unwrap()
                    .len(),
                4
            );
        }
        for b in of("sealed") {
            let key = crate::repo::sealed::ObjectKey::from_master(
                &SEALED_MASTER,
                sealed_ciphers()[(b[0] / 2 % 2) as usize],
            );
            if b[0] % 2 == 0 {
                crate::repo::sealed::open(&key, "fuzz", &b[1..]).unwrap();
            } else {
                let c: crate::repo::RepoConfig = serde_json::from_slice(&b[1..]).unwrap();
                let secret =
                    crate::target::keys::Secret::KeyFile(zeroize::Zeroizing::new(SEALED_KEY_FILE));
                let (m, _) = crate::target::keys::unlock(
                    c.encryption.as_ref().unwrap(),
                    &c.id,
                    &secret,
                    "s",
                )
                .unwrap();
                assert!(m.is(&SEALED_MASTER));
            }
        }
        for b in of("node_toml") {
            let text = std::str::from_utf8(b).unwrap();
            // (Past the parse and the checks up to the token files, which are not there.)
            match crate::config::NodeConfig::parse(text, std::path::Path::new("/seed/node.toml")) {
                Ok(_) => {}
                Err(e) => assert!(e.to_string().contains("token file"), "{e}"),
            }
        }
    }
}
