//! Bad input gets a clear error, the documented exit code, and changes nothing.

use holdfast_tests::{TestNode, mixed_bytes};

/// A node with one volume `v` (4 KiB blocks) and one snapshot `v@s`.
fn node_with_snapshot() -> TestNode {
    let n = TestNode::new();
    let img = n.image("v.img", &mixed_bytes(40_000, 1));
    n.add_volume("v", &img, "4KiB");
    n.snapshot("v", "s");
    n
}

/// Runs `args`, expects `code` and `needle` in stderr, and checks that nothing changed.
fn refused(n: &TestNode, args: &[&str], code: i32, needle: &str) {
    let before = n.fingerprint();
    let err = n.fails(args, code);
    assert!(
        err.contains(needle),
        "holdfast {:?}: expected {needle:?} in:\n{err}",
        args.iter()
            .map(|a| holdfast_tests_short(a))
            .collect::<Vec<_>>()
    );
    assert!(
        err.len() < 2000,
        "error message too long: {} bytes",
        err.len()
    );
    assert_eq!(
        before,
        n.fingerprint(),
        "state changed after {:?}",
        args.first()
    );
}

fn holdfast_tests_short(s: &str) -> String {
    s.chars().take(40).collect()
}

#[test]
fn hostile_names_are_refused_everywhere_they_are_accepted() {
    // Volume names, snapshot names and label keys share the same rules.
    let n = node_with_snapshot();
    let img = n.path("v.img");
    let img = img.to_str().unwrap();
    let long = "n".repeat(256);
    let huge = "h".repeat(100_000);
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        (&long, "256 bytes"),
        (&huge, "100000 bytes"),
        ("a/b", "path separator"),
        ("..", "`..`"),
        ("../etc", "`..`"),
        ("a@b", "`@`"),
        ("a\u{1}b", "control character"),
        ("a\nb", "control character"),
        ("a b", "' '"),
    ];
    for (name, why) in cases {
        refused(&n, &["volume", "add", name, "--image", img], 2, why);
        refused(&n, &["snapshot", "create", "v", "--name", name], 2, why);
        refused(&n, &["snapshot", "show", &format!("v@{name}")], 2, why);
        refused(
            &n,
            &["snapshot", "create", "v", "--label", &format!("{name}=x")],
            2,
            why,
        );
    }
    // A label value may be free text, but not control characters or 10 KiB of it.
    refused(
        &n,
        &["snapshot", "create", "v", "--label", "k=a\u{7}b"],
        2,
        "control",
    );
    let big = format!("k={}", "x".repeat(10_000));
    refused(
        &n,
        &["snapshot", "create", "v", "--label", &big],
        2,
        "limit is 1024",
    );
    refused(&n, &["snapshot", "show", "v"], 2, "VOLUME@SNAPSHOT");
}

#[test]
fn unknown_volumes_and_snapshots_are_not_found() {
    // Exit code 3 and a hint where to look.
    let n = node_with_snapshot();
    refused(
        &n,
        &["snapshot", "create", "nosuch"],
        3,
        "no volume named \"nosuch\"",
    );
    refused(&n, &["snapshot", "show", "v@nosuch"], 3, "snapshot list v");
    refused(&n, &["snapshot", "show", "nosuch@s"], 3, "no volume named");
    let out = n.path("out.img");
    refused(
        &n,
        &[
            "snapshot",
            "restore",
            "v@nosuch",
            "--to",
            out.to_str().unwrap(),
        ],
        3,
        "no snapshot",
    );
    assert!(!out.exists());
    refused(&n, &["snapshot", "delete", "v@nosuch"], 3, "no snapshot");
    refused(&n, &["verify", "--volume", "nosuch"], 3, "no volume");
    refused(&n, &["volume", "remove", "nosuch"], 3, "no volume");
}

#[test]
fn missing_images_directories_and_bad_block_sizes_are_refused() {
    // Registering or snapshotting something that is not a readable image changes nothing.
    let n = node_with_snapshot();
    let dir = n.path("");
    refused(
        &n,
        &["volume", "add", "w", "--image", "/nonexistent/x.img"],
        3,
        "does not exist",
    );
    refused(
        &n,
        &["volume", "add", "w", "--image", dir.to_str().unwrap()],
        2,
        "neither a regular file",
    );
    let img = n.image("w.img", b"abc");
    for bs in ["1000", "3KiB", "8MiB", "0"] {
        refused(
            &n,
            &[
                "volume",
                "add",
                "w",
                "--image",
                img.to_str().unwrap(),
                "--block-size",
                bs,
            ],
            2,
            "block size",
        );
    }
    // The image vanishes after registration: the snapshot fails and names the path.
    n.add_volume("w", &img, "4KiB");
    std::fs::remove_file(&img).unwrap();
    refused(&n, &["snapshot", "create", "w"], 3, "w.img does not exist");
}

#[test]
fn conflicts_are_refused() {
    // A taken name, a second init, a volume with snapshots, an existing restore target.
    let n = node_with_snapshot();
    refused(
        &n,
        &["snapshot", "create", "v", "--name", "s"],
        4,
        "already has a snapshot named",
    );
    refused(&n, &["init"], 4, "already a holdfast state directory");
    let img = n.path("v.img");
    refused(
        &n,
        &["volume", "add", "v", "--image", img.to_str().unwrap()],
        4,
        "already registered",
    );
    refused(&n, &["volume", "remove", "v"], 4, "still has 1 snapshot");
    let target = n.image("existing.img", b"keep me");
    refused(
        &n,
        &[
            "snapshot",
            "restore",
            "v@s",
            "--to",
            target.to_str().unwrap(),
        ],
        4,
        "--force",
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    // With --force it is overwritten with the snapshot.
    n.ok(&[
        "snapshot",
        "restore",
        "v@s",
        "--to",
        target.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(std::fs::read(&target).unwrap(), mixed_bytes(40_000, 1));
}

#[test]
fn a_directory_that_is_not_a_state_directory_is_refused() {
    // Commands on an uninitialised or foreign directory say to run init.
    let n = TestNode::uninitialised();
    let err = n.fails(&["volume", "list"], 3);
    assert!(err.contains("holdfast init"), "{err}");
    std::fs::create_dir_all(&n.state).unwrap();
    std::fs::write(n.state.join("unrelated.txt"), b"x").unwrap();
    let err = n.fails(&["volume", "list"], 3);
    assert!(err.contains("not a holdfast state directory"), "{err}");
    let err = n.fails(&["init"], 4);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read_dir(&n.state).unwrap().count(), 1);
}

#[test]
fn a_full_disk_fails_cleanly_and_a_rerun_completes_after_space_is_freed() {
    // The state lives on a 6 MiB tmpfs; a 16 MiB random image cannot fit. The snapshot
    // fails with a clear message, nothing becomes visible, verify passes; after the
    // filesystem grows, the same command succeeds.
    if !is_root() {
        holdfast_tests::skipped(
            "bad_input::a_full_disk_fails_cleanly",
            "mounting a small tmpfs needs root",
        );
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap().to_string();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs", &m])
        .status()
        .unwrap();
    if !mount.success() {
        holdfast_tests::skipped(
            "bad_input::a_full_disk_fails_cleanly",
            "this machine does not allow mounting a tmpfs",
        );
        return;
    }
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(m.clone());
    let n = TestNode::at(mnt.path().join("state"));
    n.ok(&["init"]);
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let img = n.image("big.img", &data);
    n.add_volume("v", &img, "64KiB");
    let err = n.fails(&["snapshot", "create", "v", "--name", "s"], 7);
    assert!(
        err.contains("No space left") || err.contains("no space"),
        "{err}"
    );
    assert!(err.contains("free some space"), "{err}");
    assert!(n.snapshots("v").is_empty());
    n.ok(&["verify"]);
    let grow = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m", &m])
        .status()
        .unwrap();
    assert!(grow.success());
    n.ok(&["snapshot", "create", "v", "--name", "s"]);
    assert_eq!(n.restore("v@s"), data);
    n.ok(&["gc"]);
    n.ok(&["verify"]);
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_and_releases_what_it_held() {
    // `holdfast … | head -0`: every write fails with a broken pipe. Commands stop with exit 0
    // and no panic message, and `snapshot read --hold-as` releases its lock on the way out.
    let n = node_with_snapshot();
    for args in [
        &["snapshot", "list", "v"][..],
        &["snapshot", "show", "v@s"],
        &["volume", "list"],
        &["lock", "list"],
        &["snapshot", "read", "v@s", "--hold-as", "reader"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = n
            .cmd(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "holdfast {args:?}: {err}");
        assert!(!err.contains("panicked"), "holdfast {args:?}: {err}");
    }
    assert!(
        !n.ok(&["lock", "list"]).contains("reader"),
        "the reader's lock outlived it"
    );
}
