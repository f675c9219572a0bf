//! Encrypted targets: what sealing and opening a pack costs (`host/src/repo/sealed.rs`), and
//! what opening a target's key costs (Argon2id, `host/src/target/keys.rs`).
//!
//! `cargo bench -p holdfast --bench seal` prints the median of each, with throughput.

use std::time::{Duration, Instant};

use holdfast::repo::sealed::{Cipher, ObjectKey, open, seal};
use holdfast::target::keys::{self, Secret};

mod common;

const RUNS: usize = 15;
const PACK: usize = 16 << 20;

fn time<T>(f: impl FnMut() -> T) -> Duration {
    common::median_of(RUNS, f)
}

fn main() {
    let plain: Vec<u8> = (0..PACK).map(|i| (i * 31 % 251) as u8).collect();
    let gbs = |d: Duration| PACK as f64 / d.as_secs_f64() / 1e9;
    for cipher in Cipher::ALL {
        let key = ObjectKey::from_master(&[7; 32], cipher);
        let sealed = seal(&key, "packs/ab/pack", &plain);
        let s = time(|| seal(&key, "packs/ab/pack", &plain));
        let name = cipher.short_name();
        println!(
            "seal a 16 MiB pack, {name:<18} {:>8.2} ms  {:.2} GB/s",
            s.as_secs_f64() * 1e3,
            gbs(s)
        );
        let o = time(|| open(&key, "packs/ab/pack", &sealed).unwrap());
        println!(
            "open a 16 MiB pack, {name:<18} {:>8.2} ms  {:.2} GB/s",
            o.as_secs_f64() * 1e3,
            gbs(o)
        );
    }
    // RustCrypto's ChaCha20-Poly1305 on the same segments (what sealed them before `ring`).
    let rc = {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(&[7; 32].into());
        let mut buf = plain.clone();
        time(|| {
            for (i, seg) in buf.chunks_mut(64 << 10).enumerate() {
                let mut n = [0u8; 12];
                n[3..11].copy_from_slice(&(i as u64).to_be_bytes());
                cipher
                    .encrypt_in_place_detached(&n.into(), b"", seg)
                    .unwrap();
            }
        })
    };
    println!(
        "seal, RustCrypto's chacha20poly1305    {:>8.2} ms  {:.2} GB/s",
        rc.as_secs_f64() * 1e3,
        gbs(rc)
    );
    let c = time(|| plain.clone());
    println!(
        "copy a 16 MiB pack                     {:>8.2} ms  {:.2} GB/s",
        c.as_secs_f64() * 1e3,
        gbs(c)
    );
    let secret = Secret::Passphrase(zeroize::Zeroizing::new("correct horse".into()));
    let (_, enc) = keys::create(&secret, "bench", Cipher::preferred()).unwrap();
    let mut v: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            keys::unlock(&enc, "bench", &secret, "bench").unwrap();
            t.elapsed()
        })
        .collect();
    v.sort();
    println!(
        "open a passphrase slot                 {:>8.2} ms  (Argon2id, 64 MiB, 3 passes, 4 lanes)",
        v[2].as_secs_f64() * 1e3
    );
}
