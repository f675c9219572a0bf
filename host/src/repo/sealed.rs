//! Encrypted targets: an object store whose every object (except `config`, which holds the
//! wrapped keys) is sealed with authenticated encryption before it leaves the node, and opened
//! and checked when it is read back. Everything above it (packs, indexes, manifests, lock
//! records, leases, push intents, gc records) is the plain repository format; only this layer
//! knows the store is encrypted.
//!
//! # Format of a sealed object
//! ```text
//! "HFSEAL01" | nonce (24 random bytes) | segment 0 | segment 1 | ... | segment n-1
//! ```
//! The plaintext is cut into segments of [`SEGMENT`] bytes (the last may be shorter, or empty
//! for an empty object: n >= 1), each sealed with the target's AEAD ([`Cipher`], below)
//! under the object's own key, with the segment's number and a flag for the
//! last one as its nonce: the STREAM construction, as in `age`. The object's key is BLAKE3 in
//! keyed mode (key: the target's object key, derived from its master key) over the object's
//! name and its random nonce, so
//! - no two objects share a key (192 random bits of nonce), so nonces never repeat under one;
//! - an object moved or copied to another name does not open (its key is another);
//! - a segment moved within an object, or an object cut at a segment boundary, does not open.
//!
//! Segments, not whole objects, so that a restore or a verify reads a chunk's byte range of a
//! pack without fetching the pack: a range of the plaintext is the segments that hold it.
//!
//! # Ciphers
//! A target is sealed with one of two AEADs, named in its config's `cipher` ([`Cipher`]):
//! AES-256-GCM where the CPU has AES and carry-less multiply instructions (nearly every x86-64
//! CPU since 2010, ARMv8 server CPUs), else ChaCha20-Poly1305, which is fast in software on
//! every CPU (AES without those instructions is several times slower, in `ring`'s
//! constant-time fallback). Both are `ring`'s implementations (BoringSSL's assembly, already the crypto of
//! this node's TLS and S3 signing): on this project's benchmark machine one core seals a
//! 16 MiB pack at 5.8 GB/s with AES-256-GCM and 2.3 GB/s with ChaCha20-Poly1305, where
//! RustCrypto's crates reach 1.5 and 1.6 GB/s (`cargo bench -p holdfast --bench seal`).
//! Targets made before AES-256-GCM was offered are ChaCha20-Poly1305 and stay so; their
//! objects are the same bytes as RustCrypto's `chacha20poly1305` made (a test checks it).

use std::collections::HashMap;
use std::fmt;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, UploadPart,
};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::{Zeroize, ZeroizeOnDrop};

const MAGIC: &[u8; 8] = b"HFSEAL01";
const NONCE: usize = 24;
const HEADER: u64 = (MAGIC.len() + NONCE) as u64;
const TAG: u64 = 16;
/// Plaintext bytes per sealed segment.
pub const SEGMENT: u64 = 64 << 10;
const SEALED_SEGMENT: u64 = SEGMENT + TAG;
/// The one object stored in the clear: the repository's config, with the wrapped keys.
pub const CLEAR: &str = "config";
const STORE: &str = "Sealed";
/// Objects bigger than this are sealed and opened on a blocking thread.
const BLOCKING: usize = 1 << 20;

/// The AEAD an encrypted target's objects are sealed with, by its name in the target's
/// config. Each object is the same STREAM of 64 KiB segments (module docs) whichever it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cipher {
    ChaCha20Poly1305,
    Aes256Gcm,
}

impl Cipher {
    pub const ALL: [Cipher; 2] = [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305];

    /// The name in a target's config.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305-stream-64k",
            Cipher::Aes256Gcm => "aes-256-gcm-stream-64k",
        }
    }

    /// The name an operator gives (`target add --cipher`) and reads.
    pub fn short_name(self) -> &'static str {
        match self {
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
            Cipher::Aes256Gcm => "aes-256-gcm",
        }
    }

    /// What a new target is sealed with on this machine: AES-256-GCM if the CPU has AES and
    /// carry-less multiply instructions (then it is both the faster and constant-time), else
    /// ChaCha20-Poly1305.
    pub fn preferred() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
        {
            return Cipher::Aes256Gcm;
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
        {
            return Cipher::Aes256Gcm;
        }
        Cipher::ChaCha20Poly1305
    }

    fn algorithm(self) -> &'static ring::aead::Algorithm {
        match self {
            Cipher::ChaCha20Poly1305 => &ring::aead::CHACHA20_POLY1305,
            Cipher::Aes256Gcm => &ring::aead::AES_256_GCM,
        }
    }

    /// The context the object key is derived from the master key in: one per cipher, so
    /// that no key is ever used with both.
    fn context(self) -> &'static str {
        match self {
            Cipher::ChaCha20Poly1305 => "holdfast 2026-12 encrypted target objects v1",
            Cipher::Aes256Gcm => "holdfast 2026-12 encrypted target objects aes-256-gcm v1",
        }
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// The key every object key is derived from (itself derived from the target's master key),
/// and the cipher the target's objects are sealed with.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ObjectKey {
    key: [u8; 32],
    #[zeroize(skip)]
    cipher: Cipher,
}

impl ObjectKey {
    pub fn from_master(master: &[u8; 32], cipher: Cipher) -> Self {
        ObjectKey {
            key: blake3::derive_key(cipher.context(), master),
            cipher,
        }
    }

    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The key of the object `name` whose header holds `nonce`.
    fn object_key(&self, name: &str, nonce: &[u8; NONCE]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(nonce);
        *h.finalize().as_bytes()
    }

    fn for_object(&self, name: &str, nonce: &[u8; NONCE]) -> ObjectCipher {
        let mut k = self.object_key(name, nonce);
        let cipher = ObjectCipher::new(self.cipher, &k);
        k.zeroize();
        cipher
    }
}

/// One object's key, ready to seal or open its segments; its memory is zeroed when dropped.
struct ObjectCipher(MaybeUninit<LessSafeKey>);

impl ObjectCipher {
    fn new(cipher: Cipher, key: &[u8; 32]) -> Self {
        let key = UnboundKey::new(cipher.algorithm(), key).expect("a 32-byte key");
        ObjectCipher(MaybeUninit::new(LessSafeKey::new(key)))
    }

    // Held as `MaybeUninit` so that its bytes may be zeroed when dropped (`ring` does not).
    #[allow(unsafe_code)]
    fn key(&self) -> &LessSafeKey {
        // SAFETY: initialised in `new`, and only zeroed when dropped.
        unsafe { self.0.assume_init_ref() }
    }

    /// Seals segment `i` (the last one if `last`) in place; returns its tag.
    fn seal(&self, i: u64, last: bool, text: &mut [u8]) -> [u8; TAG as usize] {
        let tag = self
            .key()
            .seal_in_place_separate_tag(segment_nonce(i, last), Aad::empty(), text)
            .expect("a segment is far below the cipher's limit");
        tag.as_ref().try_into().expect("16-byte tags")
    }

    /// Opens segment `i` (the last one if `last`) in place, if `tag` authenticates it.
    fn open(&self, i: u64, last: bool, text: &mut [u8], tag: &[u8]) -> bool {
        let Ok(tag) = Tag::try_from(tag) else {
            return false;
        };
        self.key()
            .open_in_place_separate_tag(segment_nonce(i, last), Aad::empty(), tag, text, 0..)
            .is_ok()
    }
}

impl Drop for ObjectCipher {
    fn drop(&mut self) {
        // `LessSafeKey` owns no other memory and needs no drop: its key schedule is all here.
        self.0.zeroize();
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ObjectKey(..)")
    }
}

/// An object that does not open: changed, damaged, cut short, moved from another name, or
/// written by someone without the key. Reported as damage (`Error::Corrupt`), never retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SealError(pub String);

fn seal_error(name: &str, why: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: Box::new(SealError(format!(
            "object {name} of the encrypted target does not open ({why}): it was changed, \
             damaged, cut short, moved from another name or written without the target's key"
        ))),
    }
}

fn segment_nonce(i: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&i.to_be_bytes());
    n[11] = last as u8;
    Nonce::assume_unique_for_key(n)
}

/// Segments of an object of `plain` bytes (at least one).
fn segments(plain: u64) -> u64 {
    plain.div_ceil(SEGMENT).max(1)
}

/// The stored size of an object of `plain` bytes.
pub fn sealed_len(plain: u64) -> u64 {
    HEADER + plain + TAG * segments(plain)
}

/// The plaintext size of a stored object of `sealed` bytes, if that is a size a sealed
/// object can have.
pub fn plain_len(sealed: u64) -> Option<u64> {
    let body = sealed.checked_sub(HEADER)?;
    let (full, rest) = (body / SEALED_SEGMENT, body % SEALED_SEGMENT);
    // The last segment holds 1..=SEGMENT bytes, or 0 when it is the only one.
    match rest {
        0 if full > 0 => Some(full * SEGMENT),
        TAG if full == 0 => Some(0),
        r if r > TAG => Some(full * SEGMENT + r - TAG),
        _ => None,
    }
}

/// Seals `plain` as the object `name`.
pub fn seal(key: &ObjectKey, name: &str, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    seal_into(key, name, plain, &mut out);
    out
}

/// Seals `plain` as the object `name` into `out` (cleared first; its room is reused).
fn seal_into(key: &ObjectKey, name: &str, plain: &[u8], out: &mut Vec<u8>) {
    let nonce: [u8; NONCE] = rand::random();
    let cipher = key.for_object(name, &nonce);
    let n = segments(plain.len() as u64);
    // Each segment copied once, into room made without zeroing it first.
    out.clear();
    out.reserve(sealed_len(plain.len() as u64) as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    // One thread: a push or a restore already seals or opens several packs at once, and
    // spreading one pack over the cores measured slower (`host/TARGETS.md`).
    for i in 0..n {
        let seg = &plain[(i * SEGMENT) as usize..(((i + 1) * SEGMENT) as usize).min(plain.len())];
        let at = out.len();
        out.extend_from_slice(seg);
        let tag = cipher.seal(i, i + 1 == n, &mut out[at..]);
        out.extend_from_slice(&tag);
    }
    debug_assert_eq!(out.len() as u64, sealed_len(plain.len() as u64));
}

/// Buffers that held sealed packs whose upload is done, for the next packs to be sealed
/// into. A fresh buffer the size of a pack costs a page fault per 4 KiB the first time it is
/// written (measured: a 1 GiB push into an encrypted target took 30,000 more page faults
/// than into a plain one, most of the extra system time). Only ciphertext is ever in them.
/// Kept by the store, so they are freed with it when the command's transfer ends.
#[derive(Debug, Default)]
struct Spares(Mutex<Vec<Vec<u8>>>);

/// At most this many spare buffers (as many packs as upload at once, plus one sealing).
const SPARES: usize = 5;

impl Spares {
    /// A buffer for `plain` bytes sealed: a spare if one is big enough, else a new one with
    /// room to spare (room never written costs nothing), so that it fits the next packs,
    /// whose sizes differ by a few KiB.
    fn take(&self, plain: usize) -> Vec<u8> {
        if plain <= BLOCKING {
            return Vec::new();
        }
        let want = sealed_len(plain as u64) as usize;
        let mut spares = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match spares.iter().position(|b| b.capacity() >= want) {
            Some(i) => spares.swap_remove(i),
            None => {
                // None fits: the smallest goes, so that spares too small for the packs now
                // being sealed cannot fill the pool for good.
                if let Some(i) = (0..spares.len()).min_by_key(|&i| spares[i].capacity()) {
                    spares.swap_remove(i);
                }
                Vec::with_capacity(want + want / 8)
            }
        }
    }

    /// Keeps the buffer behind `sealed` if this was its last holder (the upload is done
    /// with it) and it is big enough to be worth keeping.
    fn give_back(&self, sealed: Bytes) {
        if sealed.len() <= BLOCKING {
            return;
        }
        if let Ok(mut buf) = sealed.try_into_mut() {
            // Emptied first: the conversion then moves no bytes.
            buf.clear();
            let buf = Vec::from(buf);
            let mut spares = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if spares.len() < SPARES {
                spares.push(buf);
            }
        }
    }
}

/// Opens a whole sealed object.
pub fn open(key: &ObjectKey, name: &str, sealed: &[u8]) -> object_store::Result<Vec<u8>> {
    let mut out = sealed.to_vec();
    let len = open_in_place(key, name, &mut out)?;
    out.truncate(len);
    Ok(out)
}

/// Opens a whole sealed object where it lies: its plaintext ends up at the start of `sealed`,
/// and its length is returned.
fn open_in_place(key: &ObjectKey, name: &str, sealed: &mut [u8]) -> object_store::Result<usize> {
    let Some(plain) = plain_len(sealed.len() as u64) else {
        return Err(seal_error(name, "its size is not that of a sealed object"));
    };
    if &sealed[..MAGIC.len()] != MAGIC {
        return Err(seal_error(name, "it is not a sealed object"));
    }
    let nonce: [u8; NONCE] = sealed[MAGIC.len()..HEADER as usize]
        .try_into()
        .expect("24 bytes");
    let cipher = key.for_object(name, &nonce);
    let len = open_segments(
        &cipher,
        name,
        0,
        segments(plain),
        &mut sealed[HEADER as usize..],
    )?;
    sealed.copy_within(HEADER as usize..HEADER as usize + len, 0);
    Ok(len)
}

/// Opens consecutive sealed segments `first..` of an object of `n` segments where they lie
/// in `sealed`, each plaintext moved down over the tags before it: the plaintext is
/// `sealed[..returned length]`. Nothing is allocated (a restore opens a whole pack this way).
fn open_segments(
    cipher: &ObjectCipher,
    name: &str,
    first: u64,
    n: u64,
    sealed: &mut [u8],
) -> object_store::Result<usize> {
    let (seg, tag) = (SEALED_SEGMENT as usize, TAG as usize);
    let count = sealed.len().div_ceil(seg);
    let last = sealed.len() - (count.max(1) - 1) * seg;
    if count == 0 || last < tag || first + count as u64 > n {
        return Err(seal_error(name, "a segment is cut short"));
    }
    let mut out = 0;
    for k in 0..count {
        let i = first + k as u64;
        let (start, end) = (k * seg, ((k + 1) * seg).min(sealed.len()));
        // An empty object is one empty segment: its tag is checked all the same.
        let (text, t) = sealed[start..end].split_at_mut(end - start - tag);
        if !cipher.open(i, i + 1 == n, text, t) {
            return Err(seal_error(name, "a segment fails authentication"));
        }
        sealed.copy_within(start..end - tag, out);
        out += end - tag - start;
    }
    Ok(out)
}

async fn blocking<T: Send + 'static>(
    big: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> object_store::Result<T> {
    if !big {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| object_store::Error::JoinError { source: e })
}

/// A store's key: still being opened (`None`), opened, or not opened (why).
pub type KeyState = Option<Result<Arc<ObjectKey>, String>>;

/// An object store that seals what it writes and opens what it reads (see the module docs).
#[derive(Debug)]
pub struct SealedStore {
    inner: Arc<dyn ObjectStore>,
    /// The key, or where it arrives once opened: requests that need no key (a listing, a
    /// size, the bytes of an object) go out meanwhile, and only opening or sealing waits.
    key: tokio::sync::watch::Receiver<KeyState>,
    /// Nonce and stored size of objects read by range (packs, whose names are never reused),
    /// so that a second range costs one request, not two. Bounded; cleared when full.
    /// A pack's stored size also comes from a listing of `packs/` (a restore lists them
    /// before it reads any): its first read then needs no HEAD.
    headers: Arc<Headers>,
    /// Buffers of packs sealed and uploaded, for the next ones ([`Spares`]).
    spares: Arc<Spares>,
}

const HEADER_CACHE: usize = 8192;

/// Objects' nonces (once read) and stored sizes, by name.
type Headers = Mutex<HashMap<String, (Option<[u8; NONCE]>, u64)>>;

impl SealedStore {
    pub fn new(inner: Arc<dyn ObjectStore>, key: ObjectKey) -> Self {
        Self::unlocking(
            inner,
            tokio::sync::watch::channel(Some(Ok(Arc::new(key)))).1,
        )
    }

    /// A store whose key arrives on `key` (a passphrase's Argon2id takes a fifth of a
    /// second: a command's first requests need not wait for it).
    pub fn unlocking(
        inner: Arc<dyn ObjectStore>,
        key: tokio::sync::watch::Receiver<KeyState>,
    ) -> Self {
        SealedStore {
            inner,
            key,
            headers: Arc::default(),
            spares: Arc::default(),
        }
    }

    /// The key, once opened.
    async fn key(&self) -> object_store::Result<Arc<ObjectKey>> {
        let not_opened = |why: &str| object_store::Error::PermissionDenied {
            path: String::new(),
            source: Box::new(SealError(format!("the target's key did not open: {why}"))),
        };
        let mut rx = self.key.clone();
        let state = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| not_opened("it was abandoned"))?;
        match state.as_ref().expect("waited for") {
            Ok(k) => Ok(k.clone()),
            Err(why) => Err(not_opened(why)),
        }
    }

    fn meta(name: &str, mut meta: ObjectMeta) -> object_store::Result<ObjectMeta> {
        meta.size = plain_len(meta.size)
            .ok_or_else(|| seal_error(name, "its size is not that of a sealed object"))?;
        Ok(meta)
    }

    /// A listed object's plaintext size. One that no sealed object can have is listed with its
    /// stored size, at least 1 (reading it fails), so that a foreign object, an empty one
    /// included, is never mistaken for an empty sealed one (a fence).
    fn listed(mut meta: ObjectMeta) -> ObjectMeta {
        if meta.location.as_ref() != CLEAR {
            meta.size = plain_len(meta.size).unwrap_or(meta.size.max(1));
        }
        meta
    }

    /// The object's nonce (if known yet) and stored size, for a ranged read.
    async fn header(
        &self,
        location: &Path,
        refresh: bool,
    ) -> object_store::Result<(Option<[u8; NONCE]>, u64)> {
        let name = location.to_string();
        if !refresh
            && let Some((nonce, size)) = self.headers.lock().expect("not poisoned").get(&name)
        {
            return Ok((*nonce, *size));
        }
        // Its size first: a range request past the end of an object cut short would be an
        // error of the store (retried as if it were an outage), not the damage it is.
        let size = self.inner.head(location).await?.size;
        if plain_len(size).is_none() {
            return Err(seal_error(&name, "its size is not that of a sealed object"));
        }
        Ok((None, size))
    }

    fn remember(&self, name: &str, nonce: [u8; NONCE], size: u64) {
        let mut cache = self.headers.lock().expect("not poisoned");
        if cache.len() >= HEADER_CACHE {
            cache.clear();
        }
        cache.insert(name.to_string(), (Some(nonce), size));
    }

    /// Remembers the stored size of a listed pack not read yet (a size a sealed object can
    /// have; a pack's name is never reused for other bytes, and a read that finds another
    /// size asks for it again).
    fn remember_listed(cache: &Headers, meta: &ObjectMeta) {
        if !meta.location.as_ref().starts_with("packs/") || plain_len(meta.size).is_none() {
            return;
        }
        let mut cache = cache.lock().expect("not poisoned");
        if cache.len() >= HEADER_CACHE {
            return;
        }
        cache
            .entry(meta.location.to_string())
            .or_insert((None, meta.size));
    }

    /// Plaintext bytes `range` of `location` (clamped to its end, as stores do). The first
    /// read of an object costs its size (a HEAD, unless a listing gave it) and one GET that
    /// starts at its header when the range is near the start (a restore's first range of a
    /// pack), else two.
    async fn read_range(
        &self,
        location: &Path,
        range: &GetRange,
        options: &GetOptions,
    ) -> object_store::Result<(Bytes, Range<u64>, ObjectMeta)> {
        let name = location.to_string();
        let mut refresh = false;
        loop {
            let (known, sealed) = self.header(location, refresh).await?;
            let plain = plain_len(sealed)
                .ok_or_else(|| seal_error(&name, "its size is not that of a sealed object"))?;
            let want = match range.as_range(plain) {
                Ok(want) => want,
                // Past the end of the size remembered (or listed): asked for again first.
                Err(_) if !refresh => {
                    refresh = true;
                    continue;
                }
                // Past the end: the object is shorter than the index that led here says.
                Err(e) => return Err(seal_error(&name, &format!("it is cut short: {e}"))),
            };
            let n = segments(plain);
            let (s0, s1) = (want.start / SEGMENT, want.end.saturating_sub(1) / SEGMENT);
            let segs =
                HEADER + s0 * SEALED_SEGMENT..(HEADER + (s1 + 1) * SEALED_SEGMENT).min(sealed);
            let with_header = known.is_none() && segs.start <= 1 << 20;
            let fetch = if with_header {
                0..segs.end
            } else {
                segs.clone()
            };
            let get = |range: Range<u64>| {
                let mut opts = GetOptions::new().with_range(Some(range));
                opts.if_match = options.if_match.clone();
                opts.if_none_match = options.if_none_match.clone();
                opts.version = options.version.clone();
                self.inner.get_opts(location, opts)
            };
            let nonce_of = |head: &[u8]| -> object_store::Result<[u8; NONCE]> {
                if head.len() < HEADER as usize || &head[..MAGIC.len()] != MAGIC {
                    return Err(seal_error(&name, "it is not a sealed object"));
                }
                Ok(head[MAGIC.len()..HEADER as usize]
                    .try_into()
                    .expect("24 bytes"))
            };
            let nonce = match known {
                Some(n) => n,
                None if with_header => [0; NONCE], // read below, with the segments
                None => nonce_of(&get(0..HEADER).await?.bytes().await?)?,
            };
            let r = get(fetch.clone()).await?;
            let mut meta = r.meta.clone();
            let bytes = r.bytes().await?;
            if meta.size != sealed || bytes.len() as u64 != fetch.end - fetch.start {
                // Rewritten since its size was read (or cut short): read it again.
                if !refresh {
                    refresh = true;
                    continue;
                }
                return Err(seal_error(&name, "it is shorter than its size said"));
            }
            let (nonce, body) = if with_header {
                (nonce_of(&bytes)?, segs.start as usize)
            } else {
                (nonce, 0)
            };
            let cipher = self.key().await?.for_object(&name, &nonce);
            let big = bytes.len() > BLOCKING;
            let nm = name.clone();
            // Opened where it lies: what was received is the plaintext's buffer (a copy only
            // if the client still shares it).
            let mut buf = bytes
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            let opened = blocking(big, move || {
                open_segments(&cipher, &nm, s0, n, &mut buf[body..]).map(|len| (buf, len))
            })
            .await?;
            match opened {
                Ok((buf, opened)) => {
                    self.remember(&name, nonce, sealed);
                    let skip = body + (want.start - s0 * SEGMENT) as usize;
                    let len = (want.end - want.start) as usize;
                    if skip + len > body + opened {
                        return Err(seal_error(&name, "a segment is cut short"));
                    }
                    meta.size = plain;
                    return Ok((buf.freeze().slice(skip..skip + len), want, meta));
                }
                Err(_) if !refresh => refresh = true,
                Err(e) => return Err(e),
            }
        }
    }
}

impl fmt::Display for SealedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for SealedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if location.as_ref() == CLEAR {
            return self.inner.put_opts(location, payload, opts).await;
        }
        let plain = Bytes::from(payload);
        let (key, name) = (self.key().await?, location.to_string());
        let mut out = self.spares.take(plain.len());
        let sealed = blocking(plain.len() > BLOCKING, move || {
            seal_into(&key, &name, &plain, &mut out);
            Bytes::from(out)
        })
        .await?;
        let put = self
            .inner
            .put_opts(location, PutPayload::from(sealed.clone()), opts)
            .await;
        self.spares.give_back(sealed);
        put
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Ok(Box::new(BufferedUpload {
            inner: self.inner.clone(),
            key: self.key().await?,
            spares: self.spares.clone(),
            location: location.clone(),
            opts: Some(opts),
            buf: BytesMut::new(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if location.as_ref() == CLEAR {
            return self.inner.get_opts(location, options).await;
        }
        let name = location.to_string();
        if options.head {
            let r = self.inner.get_opts(location, options).await?;
            let meta = Self::meta(&name, r.meta)?;
            return Ok(GetResult {
                payload: GetResultPayload::Stream(futures::stream::empty().boxed()),
                range: 0..meta.size,
                meta,
                attributes: r.attributes,
                extensions: r.extensions,
            });
        }
        let (bytes, range, meta) = match options.range.clone() {
            Some(range) => self.read_range(location, &range, &options).await?,
            None => {
                let r = self.inner.get_opts(location, options).await?;
                let meta = r.meta.clone();
                let sealed = r.bytes().await?;
                let (key, nm) = (self.key().await?, name.clone());
                let big = sealed.len() > BLOCKING;
                let mut buf = sealed
                    .try_into_mut()
                    .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
                let plain = blocking(big, move || {
                    open_in_place(&key, &nm, &mut buf).map(|len| {
                        buf.truncate(len);
                        buf.freeze()
                    })
                })
                .await??;
                let meta = Self::meta(&name, meta)?;
                let len = plain.len() as u64;
                (plain, 0..len, meta)
            }
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::once(async { Ok(bytes) }).boxed()),
            meta,
            range,
            attributes: Default::default(),
            extensions: Default::default(),
        })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let (b, _, _) = self
                .read_range(location, &GetRange::Bounded(r.clone()), &GetOptions::new())
                .await?;
            out.push(b);
        }
        Ok(out)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let cache = self.headers.clone();
        self.inner
            .list(prefix)
            .map(move |m| {
                m.map(|m| {
                    Self::remember_listed(&cache, &m);
                    Self::listed(m)
                })
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let mut r = self.inner.list_with_delimiter(prefix).await?;
        for m in &r.objects {
            Self::remember_listed(&self.headers, m);
        }
        r.objects = r.objects.into_iter().map(Self::listed).collect();
        Ok(r)
    }

    /// A copy is opened and sealed again under its new name (its key depends on the name).
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let plain = self
            .get_opts(from, GetOptions::new())
            .await?
            .bytes()
            .await?;
        let mode = match options.mode {
            CopyMode::Create => PutMode::Create,
            CopyMode::Overwrite => PutMode::Overwrite,
        };
        self.put_opts(
            to,
            PutPayload::from(plain),
            PutOptions {
                mode,
                ..Default::default()
            },
        )
        .await
        .map(|_| ())
    }
}

/// A multipart upload into a sealed store: the parts are gathered, sealed as one object and
/// uploaded in parts (a pack is a few tens of MiB at most).
#[derive(Debug)]
struct BufferedUpload {
    inner: Arc<dyn ObjectStore>,
    key: Arc<ObjectKey>,
    spares: Arc<Spares>,
    location: Path,
    opts: Option<PutMultipartOptions>,
    buf: BytesMut,
}

#[async_trait]
impl MultipartUpload for BufferedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        for b in &data {
            self.buf.extend_from_slice(b);
        }
        Box::pin(async { Ok(()) })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let plain = std::mem::take(&mut self.buf).freeze();
        let (key, name) = (self.key.clone(), self.location.to_string());
        let mut out = self.spares.take(plain.len());
        let sealed = blocking(true, move || {
            seal_into(&key, &name, &plain, &mut out);
            Bytes::from(out)
        })
        .await?;
        let upload = self
            .inner
            .put_multipart_opts(&self.location, self.opts.take().unwrap_or_default())
            .await?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, 8 << 20);
        w.put(sealed.clone());
        let done = w.finish().await;
        self.spares.give_back(sealed);
        done
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.buf.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;

    /// A key; odd ones seal with ChaCha20-Poly1305, even ones with AES-256-GCM.
    fn key(b: u8) -> ObjectKey {
        ObjectKey::from_master(&[b; 32], Cipher::ALL[b as usize % 2])
    }

    #[test]
    fn a_sealed_buffer_is_reused_only_once_its_upload_let_go_of_it() {
        let spares = Spares::default();
        let plain = vec![3u8; 2 << 20];
        let mut out = spares.take(plain.len());
        seal_into(&key(1), "packs/ab/x", &plain, &mut out);
        let at = out.as_ptr();
        let sealed = Bytes::from(out);
        assert_eq!(open(&key(1), "packs/ab/x", &sealed).unwrap(), plain);
        // Still held elsewhere (an upload that has not finished): not kept.
        let held = sealed.clone();
        spares.give_back(sealed);
        assert!(spares.0.lock().unwrap().is_empty());
        // The last holder: kept, and the next pack of about that size is sealed into it.
        spares.give_back(held);
        let mut again = spares.take(plain.len() - 1000);
        assert_eq!(again.as_ptr(), at);
        seal_into(&key(1), "packs/ab/y", &plain[1000..], &mut again);
        assert_eq!(open(&key(1), "packs/ab/y", &again).unwrap(), &plain[1000..]);
        // Small objects are left to the allocator, and the spares are bounded.
        spares.give_back(Bytes::from(seal(&key(1), "s", b"small")));
        for _ in 0..SPARES + 2 {
            let mut b = spares.take(plain.len());
            seal_into(&key(1), "z", &plain, &mut b);
            spares.give_back(Bytes::from(b));
        }
        for _ in 0..SPARES + 2 {
            spares.give_back(Bytes::from(seal(&key(1), "z", &plain)));
        }
        assert_eq!(spares.0.lock().unwrap().len(), SPARES);
        // A full pool of spares too small for bigger packs makes room for them.
        let big = vec![4u8; 3 << 20];
        let mut b = spares.take(big.len());
        assert_eq!(spares.0.lock().unwrap().len(), SPARES - 1);
        seal_into(&key(1), "packs/ab/big", &big, &mut b);
        let at = b.as_ptr();
        spares.give_back(Bytes::from(b));
        let again = spares.take(big.len());
        assert_eq!(again.as_ptr(), at);
    }

    #[test]
    fn sizes_round_trip_and_odd_sizes_are_refused() {
        for plain in [
            0,
            1,
            15,
            16,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            1 << 24,
        ] {
            assert_eq!(plain_len(sealed_len(plain)), Some(plain), "{plain}");
            let sealed = seal(&key(1), "x", &vec![7; plain as usize]);
            assert_eq!(sealed.len() as u64, sealed_len(plain));
        }
        for bad in [
            0,
            HEADER,
            HEADER + 15,
            HEADER + SEALED_SEGMENT + 3,
            HEADER + SEALED_SEGMENT + TAG,
        ] {
            assert_eq!(plain_len(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_object_opens_only_under_its_key_and_name_and_whole() {
        for b in [1, 2] {
            opens_only_under_its_key_and_name_and_whole(|d| key(b + 2 * d));
        }
        // The same master key with the other cipher is another key.
        let sealed = seal(&key(2), "x", b"text");
        let chacha = ObjectKey::from_master(&[2; 32], Cipher::ChaCha20Poly1305);
        assert!(open(&chacha, "x", &sealed).is_err());
    }

    fn opens_only_under_its_key_and_name_and_whole(key: impl Fn(u8) -> ObjectKey) {
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sealed = seal(&key(0), "packs/ab/x", &plain);
        assert_eq!(open(&key(0), "packs/ab/x", &sealed).unwrap(), plain);
        // No plaintext run survives.
        assert!(!sealed.windows(64).any(|w| plain[..64] == *w));
        for (k, name) in [(key(1), "packs/ab/x"), (key(0), "packs/ab/y")] {
            assert!(open(&k, name, &sealed).is_err());
        }
        let mut flipped = sealed.clone();
        flipped[HEADER as usize + 70_000] ^= 1;
        let err = open(&key(0), "packs/ab/x", &flipped).unwrap_err();
        assert!(err.to_string().contains("does not open"), "{err}");
        // An empty object's one (empty) segment is authenticated too.
        let mut empty = seal(&key(0), "e", b"");
        assert_eq!(open(&key(0), "e", &empty).unwrap(), b"");
        empty[HEADER as usize + 3] ^= 1;
        assert!(open(&key(0), "e", &empty).is_err());
        assert!(open(&key(0), "f", &seal(&key(0), "e", b"")).is_err());
        // Cut at a segment boundary: the new last segment was not sealed as the last.
        let cut = &sealed[..(HEADER + 2 * SEALED_SEGMENT) as usize];
        assert!(open(&key(0), "packs/ab/x", cut).is_err());
        // Two segments swapped.
        let mut swapped = sealed.clone();
        let (a, b) = (HEADER as usize, (HEADER + SEALED_SEGMENT) as usize);
        let first = swapped[a..b].to_vec();
        swapped.copy_within(b..b + (b - a), a);
        swapped[b..b + (b - a)].copy_from_slice(&first);
        assert!(open(&key(0), "packs/ab/x", &swapped).is_err());
    }

    /// ChaCha20-Poly1305 targets were sealed with RustCrypto's `chacha20poly1305` before
    /// `ring` seals them: the bytes are the same, so those targets open as they did.
    #[test]
    fn chacha_objects_are_what_rustcrypto_seals_and_opens() {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        let k = key(5);
        assert_eq!(k.cipher(), Cipher::ChaCha20Poly1305);
        let plain: Vec<u8> = (0..150_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let n = segments(plain.len() as u64);
        let nonce: [u8; NONCE] = [9; NONCE];
        let rc =
            chacha20poly1305::ChaCha20Poly1305::new(&k.object_key("packs/cd/y", &nonce).into());
        let rc_nonce = |i: u64| {
            let mut b = [0u8; 12];
            b.copy_from_slice(segment_nonce(i, i + 1 == n).as_ref());
            b
        };
        // Sealed as RustCrypto sealed it: opens here.
        let mut old = [&MAGIC[..], &nonce].concat();
        for (i, seg) in plain.chunks(SEGMENT as usize).enumerate() {
            let mut text = seg.to_vec();
            let tag = rc
                .encrypt_in_place_detached(&rc_nonce(i as u64).into(), b"", &mut text)
                .unwrap();
            old.extend_from_slice(&text);
            old.extend_from_slice(&tag);
        }
        assert_eq!(open(&k, "packs/cd/y", &old).unwrap(), plain);
        // Sealed here: RustCrypto opens it.
        let new = seal(&k, "packs/cd/y", &plain);
        let nonce: [u8; NONCE] = new[MAGIC.len()..HEADER as usize].try_into().unwrap();
        let rc =
            chacha20poly1305::ChaCha20Poly1305::new(&k.object_key("packs/cd/y", &nonce).into());
        let mut opened = Vec::new();
        for (i, seg) in new[HEADER as usize..]
            .chunks(SEALED_SEGMENT as usize)
            .enumerate()
        {
            let (text, tag) = seg.split_at(seg.len() - TAG as usize);
            let mut text = text.to_vec();
            rc.decrypt_in_place_detached(&rc_nonce(i as u64).into(), b"", &mut text, tag.into())
                .unwrap();
            opened.extend_from_slice(&text);
        }
        assert_eq!(opened, plain);
    }

    #[tokio::test]
    async fn the_store_reads_ranges_lists_plain_sizes_and_keeps_config_clear() {
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = SealedStore::new(mem.clone(), key(3));
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let p = Path::from("packs/00/p");
        store.put(&p, plain.clone().into()).await.unwrap();
        store.put(&Path::from("config"), "{}".into()).await.unwrap();
        store
            .put(&Path::from("manifests/v/empty"), PutPayload::new())
            .await
            .unwrap();
        assert_eq!(
            mem.get(&Path::from("config"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
            "{}"
        );
        for r in [
            0..1,
            65_535..65_537,
            100..250_000,
            299_990..300_000,
            299_990..400_000,
        ] {
            let got = store.get_range(&p, r.clone()).await.unwrap();
            let end = (r.end as usize).min(plain.len());
            assert_eq!(got, plain[r.start as usize..end], "{r:?}");
        }
        let ranges = store
            .get_ranges(&p, &[5..10, 70_000..70_010])
            .await
            .unwrap();
        assert_eq!(ranges[1], plain[70_000..70_010]);
        assert_eq!(store.head(&p).await.unwrap().size, 300_000);
        let mut listed: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
            .await
            .unwrap();
        listed.sort_by(|a, b| a.location.cmp(&b.location));
        let sizes: Vec<u64> = listed.iter().map(|m| m.size).collect();
        assert_eq!(sizes, vec![2, 0, 300_000]);
        assert_eq!(store.get(&p).await.unwrap().bytes().await.unwrap(), plain);
        // Another object put in its place (sealed by the same key, for another name).
        let other = mem
            .get(&Path::from("manifests/v/empty"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        mem.put(&p, other.into()).await.unwrap();
        assert!(store.get(&p).await.is_err());
        assert!(store.get_range(&p, 0..1).await.is_err());
        // A copy opens under its new name.
        store.put(&p, plain.clone().into()).await.unwrap();
        store.copy(&p, &Path::from("packs/00/q")).await.unwrap();
        let q = store
            .get(&Path::from("packs/00/q"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(q, plain);
    }

    #[tokio::test]
    async fn a_listed_size_spares_a_head_and_a_pack_changed_since_is_still_refused() {
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let (p, q) = (Path::from("packs/00/p"), Path::from("packs/00/q"));
        let writer = SealedStore::new(mem.clone(), key(4));
        writer.put(&p, plain.clone().into()).await.unwrap();
        writer.put(&q, plain.clone().into()).await.unwrap();
        let store = SealedStore::new(mem.clone(), key(4));
        let _: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
            .await
            .unwrap();
        let sealed = sealed_len(plain.len() as u64);
        for name in ["packs/00/p", "packs/00/q"] {
            let cached = store.headers.lock().unwrap().get(name).copied();
            assert_eq!(cached, Some((None, sealed)), "{name}");
        }
        assert_eq!(
            store.get_range(&p, 70_000..70_100).await.unwrap(),
            plain[70_000..70_100]
        );
        // q cut short, then p replaced by longer bytes, after the listing: neither is read
        // as if it were what was listed.
        let whole = mem.get(&q).await.unwrap().bytes().await.unwrap();
        mem.put(&q, whole.slice(..100_000).into()).await.unwrap();
        assert!(
            store.get_range(&q, 0..10).await.is_ok(),
            "its first segment is whole"
        );
        let err = store.get_range(&q, 150_000..150_010).await.unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        let longer = seal(
            &key(4),
            "packs/00/p",
            &[plain.clone(), plain.clone()].concat(),
        );
        mem.put(&Path::from("packs/00/r"), longer.into())
            .await
            .unwrap();
        let other = SealedStore::new(mem.clone(), key(4));
        let _: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(other.list(None))
            .await
            .unwrap();
        let bigger = seal(
            &key(4),
            "packs/00/q",
            &[plain.clone(), plain.clone()].concat(),
        );
        mem.put(&q, bigger.into()).await.unwrap();
        assert_eq!(
            other.get_range(&q, 250_000..250_010).await.unwrap(),
            plain[50_000..50_010],
            "a size that changed since the listing is asked for again"
        );
    }
}
