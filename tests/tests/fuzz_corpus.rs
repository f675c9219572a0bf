//! Every input in the fuzzers' committed corpora (tests/fuzz/corpus/TARGET/), run through the
//! same entry points the fuzzers drive (host/src/fuzz.rs), on the stable toolchain: what a
//! fuzzer once found, or once had to work for, stays a regression test in every `cargo test`.
//! The fuzzers themselves run in ./test.sh through tests/fuzz/run.sh.

use std::path::PathBuf;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

#[test]
fn every_committed_input_passes_its_target() {
    let mut ran = 0;
    for (name, target) in holdfast::fuzz::TARGETS {
        let dir = corpus().join(name);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target has a corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!entries.is_empty(), "{} is empty", dir.display());
        for path in entries {
            let bytes = std::fs::read(&path).unwrap();
            // A panic names the input: replay it with the fuzzer or this test.
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{} fails {name}", path.display());
            ran += 1;
        }
    }
    eprintln!("{ran} corpus inputs passed");
}

#[test]
fn every_fuzz_target_is_built_and_every_corpus_has_a_target() {
    // tests/fuzz/fuzz_targets/NAME.rs for each entry point, and no corpus left without one.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let names: Vec<&str> = holdfast::fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
    for n in &names {
        let f = root.join("fuzz_targets").join(format!("{n}.rs"));
        assert!(f.exists(), "{} is missing", f.display());
    }
    for e in std::fs::read_dir(corpus()).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(names.contains(&n.as_str()), "corpus {n} has no target");
    }
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for n in &names {
        assert!(
            manifest.contains(&format!("name = \"{n}\"")),
            "{n} is not a [[bin]] of tests/fuzz/Cargo.toml"
        );
    }
}

/// Writes the seeds `holdfast::fuzz::seeds` makes into the corpora (named by their hash, as
/// libFuzzer names what it finds): `cargo test -p holdfast-tests --test fuzz_corpus --
/// --ignored write_seeds` after a format changes.
#[test]
#[ignore = "writes the committed corpora"]
fn write_seeds() {
    for (name, bytes) in holdfast::fuzz::seeds() {
        let dir = corpus().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let file = format!("seed-{}", &blake3::hash(&bytes).to_hex()[..16]);
        std::fs::write(dir.join(file), bytes).unwrap();
    }
}
