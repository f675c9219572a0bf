//! Keys of an encrypted target (`host/TARGETS.md`, "Encryption").
//!
//! A target's **master key** is 32 random bytes made when the target is created. It is
//! stored only wrapped, in the target's `config` object, once per **key slot**: sealed with
//! XChaCha20-Poly1305 under a key-encryption key derived from a passphrase (Argon2id, its
//! parameters and salt stored in the slot) or from a key file (32 random bytes, `holdfast key
//! new`; derived with BLAKE3, a random key needs no stretching). The slot's sealing binds the
//! repository id, the slot id and its kind, so a slot copied from another target or edited
//! does not open. The object key ([`ObjectKey`]) is derived from the master key.
//!
//! Nothing here is logged or written into the state directory: a target's record names where
//! its secret comes from (a key file or a passphrase file), never the secret itself.

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::repo::sealed::{Cipher, ObjectKey};

/// Argon2id's cost for new passphrase slots: 64 MiB, 3 passes, 4 lanes (RFC 9106's second
/// recommended option), the lanes filled on as many cores as there are (85 ms on 2 cores here,
/// 120 ms with one lane; a guess costs an attacker the same work either way).
pub const ARGON2_MEMORY_KIB: u32 = 64 << 10;
pub const ARGON2_PASSES: u32 = 3;
pub const ARGON2_LANES: u32 = 4;
/// The most a slot may ask for (4 times the default), so a config edited by someone else cannot
/// make a node spend gigabytes or minutes on opening it: a slot asking for more is skipped.
const ARGON2_MAX_MEMORY_KIB: u32 = 4 * ARGON2_MEMORY_KIB;
const ARGON2_MAX_PASSES: u32 = 4 * ARGON2_PASSES;
const ARGON2_MAX_LANES: u32 = 4;
/// The most key slots a target has (`target key add` refuses more).
pub const MAX_SLOTS: usize = 32;
/// Secret files are small: a key file is 64 hex digits, a passphrase one line.
const MAX_SECRET_FILE: u64 = 4096;

/// The `encryption` member of an encrypted target's config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Encryption {
    /// What the objects are sealed with: a [`Cipher`]'s name.
    pub cipher: String,
    pub slots: Vec<KeySlot>,
}

impl Encryption {
    /// The cipher the target's objects are sealed with; one this holdfast does not know is
    /// refused (nothing is read or written with a guess).
    pub fn cipher(&self, target: &str) -> Result<Cipher> {
        Cipher::ALL
            .into_iter()
            .find(|c| c.name() == self.cipher)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "target {target} is encrypted with {:?}, which this holdfast does not know \
                     (it knows {}); use the release that wrote it",
                    self.cipher,
                    Cipher::ALL.map(Cipher::name).join(", ")
                ))
            })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    Passphrase,
    KeyFile,
}

impl std::fmt::Display for SlotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlotKind::Passphrase => "passphrase",
            SlotKind::KeyFile => "key file",
        })
    }
}

/// One wrapped copy of the master key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KeySlot {
    /// 8 hex digits, random.
    pub id: String,
    pub kind: SlotKind,
    pub created_unix_ms: u64,
    /// Argon2id parameters (passphrase slots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argon2id: Option<Argon2Params>,
    /// Hex: a 24-byte nonce, then the sealed master key (32 bytes and a 16-byte tag).
    pub wrapped: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Argon2Params {
    pub memory_kib: u32,
    pub passes: u32,
    pub lanes: u32,
    /// Hex, 16 random bytes.
    pub salt: String,
}

/// A target's master key (zeroed when dropped).
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    pub fn random() -> Self {
        MasterKey(Zeroizing::new(rand::random()))
    }

    pub fn object_key(&self, cipher: Cipher) -> ObjectKey {
        ObjectKey::from_master(&self.0, cipher)
    }

    /// A given key (the fuzzers' seeds).
    #[doc(hidden)]
    pub fn from_bytes(key: [u8; 32]) -> Self {
        MasterKey(Zeroizing::new(key))
    }

    /// Whether this is `key` (tests).
    #[doc(hidden)]
    pub fn is(&self, key: &[u8; 32]) -> bool {
        *self.0 == *key
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// A secret that opens (or will open) a key slot.
pub enum Secret {
    Passphrase(Zeroizing<String>),
    KeyFile(Zeroizing<[u8; 32]>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.kind())
    }
}

impl Secret {
    /// A passphrase given as text (tests, benchmarks).
    pub fn passphrase(p: &str) -> Secret {
        Secret::Passphrase(Zeroizing::new(p.to_string()))
    }

    pub fn kind(&self) -> SlotKind {
        match self {
            Secret::Passphrase(_) => SlotKind::Passphrase,
            Secret::KeyFile(_) => SlotKind::KeyFile,
        }
    }

    /// The key-encryption key of `slot` from this secret.
    fn kek(&self, slot_argon: Option<&Argon2Params>) -> Result<Zeroizing<[u8; 32]>> {
        let mut out = Zeroizing::new([0u8; 32]);
        match (self, slot_argon) {
            (Secret::KeyFile(k), None) => {
                *out = blake3::derive_key("holdfast 2026-12 target key-file slot v1", &k[..]);
            }
            (Secret::Passphrase(p), Some(a)) => {
                if a.memory_kib > ARGON2_MAX_MEMORY_KIB
                    || a.passes > ARGON2_MAX_PASSES
                    || a.lanes > ARGON2_MAX_LANES
                {
                    return Err(Error::corrupt(format!(
                        "a passphrase key slot asks for Argon2id with {} KiB, {} passes and {} \
                         lanes, more than this holdfast spends ({} KiB, {} passes, {} lanes); \
                         the config was edited by someone else",
                        a.memory_kib,
                        a.passes,
                        a.lanes,
                        ARGON2_MAX_MEMORY_KIB,
                        ARGON2_MAX_PASSES,
                        ARGON2_MAX_LANES
                    )));
                }
                let salt = hex::decode(&a.salt)
                    .map_err(|_| Error::corrupt("a key slot's salt is not hex"))?;
                let params = argon2::Params::new(a.memory_kib, a.passes, a.lanes, Some(32))
                    .map_err(|e| {
                        Error::corrupt(format!("a key slot's Argon2id parameters: {e}"))
                    })?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                    .hash_password_into(p.as_bytes(), &salt, &mut out[..])
                    .map_err(|e| {
                        Error::corrupt(format!("deriving a key from the passphrase: {e}"))
                    })?;
            }
            _ => return Err(Error::internal("a secret of another kind than its slot")),
        }
        Ok(out)
    }
}

/// What a slot's sealing binds besides the master key: the repository, the slot, its kind and
/// the cipher the target's objects are sealed with, so that a config whose cipher was changed
/// opens with no slot. (ChaCha20-Poly1305 targets were made before the cipher was bound and
/// have no cipher here; binding it for every other cipher tells them apart all the same.)
fn aad(repo_id: &str, slot_id: &str, kind: SlotKind, cipher: Cipher) -> Vec<u8> {
    let mut aad = format!("holdfast key slot\0{repo_id}\0{slot_id}\0{kind}");
    if cipher != Cipher::ChaCha20Poly1305 {
        aad.push('\0');
        aad.push_str(cipher.name());
    }
    aad.into_bytes()
}

/// A new slot holding `master` wrapped by `secret`, for the repository `repo_id`, whose objects
/// are sealed with `cipher`.
pub fn new_slot(
    master: &MasterKey,
    secret: &Secret,
    repo_id: &str,
    cipher: Cipher,
) -> Result<KeySlot> {
    let id = format!("{:08x}", rand::random::<u32>());
    let argon2id = match secret {
        Secret::Passphrase(_) => Some(Argon2Params {
            memory_kib: ARGON2_MEMORY_KIB,
            passes: ARGON2_PASSES,
            lanes: ARGON2_LANES,
            salt: hex::encode(rand::random::<[u8; 16]>()),
        }),
        Secret::KeyFile(_) => None,
    };
    let kek = secret.kek(argon2id.as_ref())?;
    let nonce: [u8; 24] = rand::random();
    let sealed = XChaCha20Poly1305::new((&*kek).into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &master.0[..],
                aad: &aad(repo_id, &id, secret.kind(), cipher),
            },
        )
        .map_err(|_| Error::internal("wrapping the master key"))?;
    let mut wrapped = nonce.to_vec();
    wrapped.extend_from_slice(&sealed);
    Ok(KeySlot {
        id,
        kind: secret.kind(),
        created_unix_ms: crate::now_unix_ms(),
        argon2id,
        wrapped: hex::encode(wrapped),
    })
}

/// A new target's encryption: a random master key, one slot for `secret`, objects sealed with
/// `cipher`.
pub fn create(secret: &Secret, repo_id: &str, cipher: Cipher) -> Result<(MasterKey, Encryption)> {
    let master = MasterKey::random();
    let slot = new_slot(&master, secret, repo_id, cipher)?;
    Ok((
        master,
        Encryption {
            cipher: cipher.name().into(),
            slots: vec![slot],
        },
    ))
}

/// Opens the target's master key with `secret`: the first slot of its kind that opens. Returns
/// the slot's id too. A secret that opens none is refused (`InvalidInput`: the operator gave the
/// wrong one).
pub fn unlock(
    enc: &Encryption,
    repo_id: &str,
    secret: &Secret,
    target: &str,
) -> Result<(MasterKey, String)> {
    let cipher = enc.cipher(target)?;
    // More slots than `target key add` makes: the first ones are tried (a config edited by
    // someone else costs at most that many derivations).
    let mut skipped = Vec::new();
    for slot in enc
        .slots
        .iter()
        .take(MAX_SLOTS)
        .filter(|s| s.kind == secret.kind())
    {
        let Ok(wrapped) = hex::decode(&slot.wrapped) else {
            continue;
        };
        if wrapped.len() != 24 + 32 + 16 {
            continue;
        }
        let kek = match secret.kek(slot.argon2id.as_ref()) {
            Ok(k) => k,
            // One slot of someone else's making does not stop the others from opening.
            Err(e) => {
                skipped.push(format!("slot {}: {e}", crate::id::shorten(&slot.id)));
                continue;
            }
        };
        let opened = XChaCha20Poly1305::new((&*kek).into()).decrypt(
            XNonce::from_slice(&wrapped[..24]),
            Payload {
                msg: &wrapped[24..],
                aad: &aad(repo_id, &slot.id, slot.kind, cipher),
            },
        );
        if let Ok(mut key) = opened {
            let mut master = Zeroizing::new([0u8; 32]);
            master.copy_from_slice(&key);
            key.zeroize();
            return Ok((MasterKey(master), slot.id.clone()));
        }
    }
    let mut msg = format!(
        "no key slot of target {target} opens with this {} ({} slot(s) of that kind); check the \
         {}",
        secret.kind(),
        enc.slots.iter().filter(|s| s.kind == secret.kind()).count(),
        match secret.kind() {
            SlotKind::Passphrase => "passphrase (HOLDFAST_PASSPHRASE or the passphrase file)",
            SlotKind::KeyFile => "key file",
        }
    );
    if !skipped.is_empty() {
        msg.push_str(&format!("; skipped: {}", skipped.join("; ")));
    }
    Err(Error::invalid(msg))
}

/// Set by the daemon: it never waits for a passphrase on a terminal (a job would hang).
pub static NO_PROMPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where a node finds the secret of an encrypted target (stored in the target's record: paths,
/// never secrets). With neither, the passphrase is `HOLDFAST_PASSPHRASE`, else asked for on a
/// terminal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KeySource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
}

impl KeySource {
    /// Paths made absolute (the daemon may run elsewhere); at most one of them.
    pub fn new(key_file: Option<PathBuf>, passphrase_file: Option<PathBuf>) -> Result<Self> {
        if key_file.is_some() && passphrase_file.is_some() {
            return Err(Error::invalid(
                "give --key-file or --passphrase-file, not both",
            ));
        }
        let abs = |p: Option<PathBuf>| {
            p.map(|p| std::path::absolute(&p).map_err(|e| Error::io("resolving a path", e)))
                .transpose()
        };
        Ok(KeySource {
            key_file: abs(key_file)?,
            passphrase_file: abs(passphrase_file)?,
        })
    }

    /// Reads the secret. `what` names it in messages ("target bucket"); `confirm` asks twice on
    /// a terminal (a new passphrase).
    pub fn secret(&self, what: &str, confirm: bool) -> Result<Secret> {
        self.read(what, confirm, "HOLDFAST_PASSPHRASE")
    }

    /// A new slot's secret: like [`KeySource::secret`], but the passphrase from the
    /// environment is `HOLDFAST_NEW_PASSPHRASE`.
    pub fn new_secret(&self, what: &str) -> Result<Secret> {
        self.read(what, true, "HOLDFAST_NEW_PASSPHRASE")
    }

    fn read(&self, what: &str, confirm: bool, env: &str) -> Result<Secret> {
        if let Some(f) = &self.key_file {
            return read_key_file(f);
        }
        let pass = match &self.passphrase_file {
            Some(f) => {
                let raw = read_small(f, "passphrase file")?;
                let text = std::str::from_utf8(&raw).map_err(|_| {
                    Error::invalid(format!("passphrase file {} is not UTF-8", f.display()))
                })?;
                // Its first line (the only copy made is zeroed when dropped).
                let line = text.lines().next().unwrap_or("");
                Zeroizing::new(line.trim_end_matches('\r').to_string())
            }
            None => match std::env::var(env) {
                Ok(p) => Zeroizing::new(p),
                Err(_)
                    if !NO_PROMPT.load(std::sync::atomic::Ordering::Relaxed)
                        && std::io::IsTerminal::is_terminal(&std::io::stdin()) =>
                {
                    let p = Zeroizing::new(
                        rpassword::prompt_password(format!("passphrase for {what}: "))
                            .map_err(|e| Error::io("reading the passphrase", e))?,
                    );
                    if confirm {
                        let again = Zeroizing::new(
                            rpassword::prompt_password("the same passphrase again: ")
                                .map_err(|e| Error::io("reading the passphrase", e))?,
                        );
                        if *again != *p {
                            return Err(Error::invalid("the two passphrases differ"));
                        }
                    }
                    p
                }
                Err(_) => {
                    return Err(Error::invalid(format!(
                        "{what}: no secret was given; set {env}, or give --passphrase-file or \
                         --key-file"
                    )));
                }
            },
        };
        if pass.is_empty() {
            return Err(Error::invalid(format!(
                "the passphrase for {what} is empty"
            )));
        }
        Ok(Secret::Passphrase(pass))
    }
}

fn read_small(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    let mut raw = Zeroizing::new(Vec::new());
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_end(&mut raw))
        .map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    if raw.len() as u64 > MAX_SECRET_FILE {
        return Err(Error::invalid(format!(
            "{what} {} holds more than 4 KiB; it is not a {what}",
            path.display()
        )));
    }
    Ok(raw)
}

/// A key file: 64 hex digits (what `holdfast key new` writes), or 32 raw bytes.
pub fn read_key_file(path: &Path) -> Result<Secret> {
    let raw = read_small(path, "key file")?;
    let mut key = Zeroizing::new([0u8; 32]);
    let text = std::str::from_utf8(&raw).map(str::trim).unwrap_or("");
    if text.len() == 64 && hex::decode_to_slice(text, &mut key[..]).is_ok() {
        return Ok(Secret::KeyFile(key));
    }
    if raw.len() == 32 {
        key.copy_from_slice(&raw);
        return Ok(Secret::KeyFile(key));
    }
    Err(Error::invalid(format!(
        "key file {} holds neither 64 hex digits nor 32 bytes; `holdfast key new FILE` makes one",
        path.display()
    )))
}

/// The text of a new key file.
pub fn new_key_file_text() -> Zeroizing<String> {
    let key = Zeroizing::new(rand::random::<[u8; 32]>());
    Zeroizing::new(format!("{}\n", hex::encode(&key[..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(p: &str) -> Secret {
        Secret::Passphrase(Zeroizing::new(p.into()))
    }

    #[test]
    fn slots_open_with_their_secret_only_and_only_in_their_repository() {
        let (master, mut enc) =
            create(&pass("correct horse"), "repo-a", Cipher::Aes256Gcm).unwrap();
        assert_eq!(enc.cipher("t").unwrap(), Cipher::Aes256Gcm);
        let (m, _) = unlock(&enc, "repo-a", &pass("correct horse"), "t").unwrap();
        assert_eq!(*m.0, *master.0);
        let err = unlock(&enc, "repo-a", &pass("wrong"), "t").unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        assert!(unlock(&enc, "repo-b", &pass("correct horse"), "t").is_err());
        // A key-file slot beside it.
        let kf = Secret::KeyFile(Zeroizing::new([9; 32]));
        enc.slots
            .push(new_slot(&master, &kf, "repo-a", Cipher::Aes256Gcm).unwrap());
        assert_eq!(*unlock(&enc, "repo-a", &kf, "t").unwrap().0.0, *master.0);
        assert!(
            unlock(
                &enc,
                "repo-a",
                &Secret::KeyFile(Zeroizing::new([8; 32])),
                "t"
            )
            .is_err()
        );
        // A slot whose cost was raised is skipped, and said so; one beside it still opens.
        let mut edited = enc.clone();
        edited.slots[0].argon2id.as_mut().unwrap().memory_kib = u32::MAX;
        let err = unlock(&edited, "repo-a", &pass("correct horse"), "t").unwrap_err();
        assert!(err.to_string().contains("skipped"), "{err}");
        edited
            .slots
            .push(new_slot(&master, &pass("correct horse"), "repo-a", Cipher::Aes256Gcm).unwrap());
        assert!(unlock(&edited, "repo-a", &pass("correct horse"), "t").is_ok());
        // An edited slot does not open.
        let mut flipped = enc.clone();
        let w = &mut flipped.slots[1].wrapped;
        let last = if w.ends_with('0') { "1" } else { "0" };
        w.replace_range(w.len() - 1.., last);
        assert!(unlock(&flipped, "repo-a", &kf, "t").is_err());
        // A cipher this holdfast does not know: refused, saying so.
        let mut unknown = enc.clone();
        unknown.cipher = "rot13-stream-64k".into();
        let err = unlock(&unknown, "repo-a", &kf, "t").unwrap_err();
        assert!(err.to_string().contains("does not know"), "{err}");
        // A config whose cipher was changed opens with no slot, either way.
        let mut changed = enc.clone();
        changed.cipher = Cipher::ChaCha20Poly1305.name().into();
        assert!(unlock(&changed, "repo-a", &kf, "t").is_err());
        let (_, mut chacha) =
            create(&pass("correct horse"), "repo-a", Cipher::ChaCha20Poly1305).unwrap();
        assert!(unlock(&chacha, "repo-a", &pass("correct horse"), "t").is_ok());
        chacha.cipher = Cipher::Aes256Gcm.name().into();
        assert!(unlock(&chacha, "repo-a", &pass("correct horse"), "t").is_err());
    }

    /// Slots made before (one lane, `argon2` 0.5) open as they did, and four lanes filled on
    /// several cores derive what they derive on one: keys computed by `argon2` 0.5.3.
    #[test]
    fn passphrase_keys_are_argon2id_as_before() {
        for (lanes, want) in [
            (
                1,
                "b5d354876f658cde1a5d125c43b4a60465890d322a2394066a3428b0d1fa231a",
            ),
            (
                4,
                "5cea1d57f950121fbc7a6d90279d7612482cf65ea98cacf40dc8c22b92f9461f",
            ),
        ] {
            let params = Argon2Params {
                memory_kib: 64 << 10,
                passes: 3,
                lanes,
                salt: hex::encode([0x5a; 16]),
            };
            let kek = pass("correct horse battery staple")
                .kek(Some(&params))
                .unwrap();
            assert_eq!(hex::encode(*kek), want, "{lanes} lanes");
        }
    }

    #[test]
    fn key_files_are_hex_or_raw_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, new_key_file_text().as_bytes()).unwrap();
        assert!(matches!(read_key_file(&p), Ok(Secret::KeyFile(_))));
        std::fs::write(&p, [3u8; 32]).unwrap();
        assert!(matches!(read_key_file(&p), Ok(Secret::KeyFile(k)) if *k == [3u8; 32]));
        for bad in [&b"short"[..], &[0u8; 5000][..], &[b'a'; 63][..]] {
            std::fs::write(&p, bad).unwrap();
            let err = read_key_file(&p).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        }
    }
}
