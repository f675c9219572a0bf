//! Volumes read over NBD: qcow2 images that holdfast serves to itself with qemu-nbd (with
//! changed-block tracking through persistent dirty bitmaps), exports of qemu-nbd and nbdkit,
//! restores into an export, hooks around a snapshot, and NBD servers that misbehave.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast_tests::TestNode;
use holdfast_tests::cascade::free_port;
use holdfast_tests::fake_nbd::{self, FakeNbd, Misbehaviour};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const KIB64: u64 = 64 << 10;

fn run_tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qcow2(path: &Path, size: &str) {
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size),
    );
}

/// Runs `qemu-io` commands (`write -P 0xab 1M 64k`, ...) on a qcow2 image.
fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run_tool(c.arg(img));
}

/// The image as raw bytes, as QEMU reads it.
fn raw_of(img: &Path) -> Vec<u8> {
    let out = img.with_extension(format!("raw-{}", rand::random::<u32>()));
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(img)
            .arg(&out),
    );
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// The image's persistent bitmaps: (name, flags).
fn bitmaps(img: &Path) -> Vec<(String, Vec<String>)> {
    let out = run_tool(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(img),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// The one bitmap holdfast keeps for volume `v`.
fn holdfast_bitmap(img: &Path) -> String {
    let mine: Vec<String> = bitmaps(img)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("holdfast.v."))
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    mine[0].clone()
}

/// An NBD server process (qemu-nbd or nbdkit), stopped when dropped.
struct Server {
    child: Child,
    uri: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// `qemu-nbd` serving `img` (format `fmt`) as export `disk` on a unix socket.
    fn qemu_nbd(img: &Path, fmt: &str, read_only: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let mut c = Command::new("qemu-nbd");
        c.args(["--persistent", "--shared=4", "--export-name=disk"])
            .arg(format!("--format={fmt}"))
            .arg(format!("--socket={}", sock.display()));
        if read_only {
            c.arg("--read-only");
        }
        let child = c.arg(img).stderr(Stdio::null()).spawn().unwrap();
        wait_for(|| sock.exists());
        Server {
            child,
            uri: fake_nbd::uri_for(&sock, "disk"),
            _dir: dir,
        }
    }

    /// `nbdkit` serving the raw file `img` over TCP on 127.0.0.1 (a second, independent
    /// server).
    fn nbdkit(img: &Path) -> Server {
        let port = free_port();
        let child = Command::new("nbdkit")
            .args(["--foreground", "--ipaddr", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("file")
            .arg(format!("file={}", img.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        Server {
            child,
            uri: format!("nbd://127.0.0.1:{port}/"),
            _dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Server {
    /// `nbdkit` serving the raw file `img` on a unix socket, every request logged to `log`
    /// (its log filter).
    fn nbdkit_logged(img: &Path, log: &Path) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("k.sock");
        let child = Command::new("nbdkit")
            .args(["--foreground", "--unix"])
            .arg(&sock)
            .args(["--filter=log", "file"])
            .arg(format!("file={}", img.display()))
            .arg(format!("logfile={}", log.display()))
            .spawn()
            .unwrap();
        wait_for(|| sock.exists());
        Server {
            child,
            uri: fake_nbd::uri_for(&sock, ""),
            _dir: dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn create(n: &TestNode, name: &str) -> Value {
    let r = n.run(&["snapshot", "create", "v", "--name", name, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json()
}

/// When volume `v`'s changed-block chain last read the whole volume (its checkpoint).
fn last_full_read(n: &TestNode) -> u64 {
    let vols = n.run(&["volume", "list", "--json"]).json();
    let v = vols.as_array().unwrap().iter().find(|v| v["name"] == "v");
    v.and_then(|v| v["checkpoint"]["full-read-unix-ms"].as_u64())
        .unwrap_or_else(|| panic!("no checkpoint for v in {vols}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The snapshot a changed-block snapshot builds on is deleted after the chain chose it and
/// before it is loaded: the snapshot refuses (exit 4, nothing committed), removes the bitmap it
/// had started, and the next one reads everything.
#[test]
fn a_base_deleted_under_a_changed_block_snapshot_commits_nothing() {
    let n = TestNode::new();
    let img = n.path("d.qcow2");
    qcow2(&img, "8M");
    qemu_io(&img, &["write -P 0x01 0 1M"]);
    n.ok(&["volume", "add", "v", "--qcow2", s(&img)]);
    create(&n, "s0");
    qemu_io(&img, &["write -P 0x02 2M 64k"]);
    create(&n, "s1");
    let checkpoint = holdfast_bitmap(&img);
    qemu_io(&img, &["write -P 0x03 4M 64k"]);

    let flags = tempfile::tempdir().unwrap();
    let paused = holdfast_tests::Paused::at(
        &n,
        "snapshot-base-chosen",
        flags.path(),
        &["snapshot", "create", "v", "--name", "s2"],
    );
    n.ok(&["snapshot", "delete", "v@s1"]);
    let r = paused.resume();
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("v@s1 was deleted while this snapshot started"),
        "{}",
        r.stderr
    );
    let left: Vec<Value> = n.snapshots("v").iter().map(|s| s["name"].clone()).collect();
    assert_eq!(left, ["s0"]);
    // Only the checkpoint's bitmap is left: the one this snapshot started is gone.
    assert_eq!(holdfast_bitmap(&img), checkpoint);

    let r = create(&n, "s2");
    assert_eq!(r["tracking"]["changed-blocks-only"], false, "{r}");
    assert!(
        r["tracking"]["full-read-reason"]
            .as_str()
            .unwrap()
            .contains("was deleted"),
        "{r}"
    );
    assert_eq!(n.restore("v@s2"), raw_of(&img));
    n.ok(&["verify"]);
}

/// Memory does not grow with what changed: a changed-block snapshot of 384 MiB written in one
/// range reads it a segment at a time, and one of 4096 small ranges in batches of a segment,
/// its peak RSS far below what changed.
#[test]
fn a_large_changed_range_is_read_a_segment_at_a_time() {
    let n = TestNode::new();
    let img = n.path("d.qcow2");
    qcow2(&img, "512M");
    qemu_io(&img, &["write -P 0x01 0 1M"]);
    n.ok(&["volume", "add", "v", "--qcow2", s(&img)]);
    let s1 = create(&n, "s1")["created-unix-ms"].as_u64().unwrap();
    qemu_io(
        &img,
        &[
            "write -P 0x02 64M 96M",
            "write -P 0x02 160M 96M",
            "write -P 0x02 256M 96M",
            "write -P 0x02 352M 96M",
        ],
    );
    // An incremental on s1 within the memory bound, restoring as the image is.
    let bounded = |name: &str, what: &str| {
        let (code, stderr, rss) =
            holdfast_tests::peak_rss(&n.state, &["snapshot", "create", "v", "--name", name]);
        assert_eq!(code, 0, "{stderr}");
        // It built on s1 (an incremental keeps the chain's full read).
        assert_eq!(last_full_read(&n), s1);
        let mib = rss >> 20;
        eprintln!("peak RSS of a changed-block snapshot of {what}: {mib} MiB");
        // As for a file (sparse::memory_stays_bounded_whatever_the_image_size): room for a
        // busy machine, far below the 256 MiB or more one buffer for what changed would take.
        assert!(mib < 224, "peak RSS {mib} MiB for {what}");
        // (Not assert_eq!: a failure would print 512 MiB twice.)
        assert!(
            n.restore(&format!("v@{name}")) == raw_of(&img),
            "{name} differs"
        );
    };
    bounded("s2", "384 MiB in one range");

    // The same for many small ranges: 64 KiB in every 128 KiB, 256 MiB in 4096 ranges, read
    // in batches of up to a segment (one batch of them all would hold 256 MiB).
    let writes: Vec<String> = (0..4096u64)
        .map(|i| format!("write -P 0x03 {} 64k", i * 128 * 1024))
        .collect();
    qemu_io(&img, &writes.iter().map(String::as_str).collect::<Vec<_>>());
    bounded("s3", "256 MiB in 4096 ranges");
}

/// A qcow2 image snapshotted through `--qcow2` (served by holdfast's own qemu-nbd), through
/// `--nbd` from a qemu-nbd and from an nbdkit: each restore equals what QEMU and libnbd's
/// nbdcopy read of the image, bit for bit, and only the allocated data is read. A restore into
/// a writable export writes the same image.
#[test]
fn qcow2_and_nbd_sources_restore_bit_for_bit() {
    let n = TestNode::new();
    let img = n.path("d.qcow2");
    qcow2(&img, "64M");
    qemu_io(
        &img,
        &[
            "write -P 0xab 1M 3M",
            "write -P 0x11 40M 64k",
            "write -P 0x5a 63M 4k",
            "write -z 2M 64k",
        ],
    );
    let want = raw_of(&img);

    n.ok(&["volume", "add", "v", "--qcow2", s(&img)]);
    let r = create(&n, "s1");
    let read = r["bytes-read"].as_u64().unwrap();
    assert!(
        read <= 4 * MIB + 2 * KIB64,
        "read {read} of 3 MiB + 2 blocks: {r}"
    );
    assert_eq!(n.restore("v@s1"), want);

    // The same image exported by qemu-nbd, cross-checked with libnbd's nbdcopy.
    let q = Server::qemu_nbd(&img, "qcow2", true);
    let copied = n.path("nbdcopy.raw");
    run_tool(Command::new("nbdcopy").arg(&q.uri).arg(&copied));
    assert!(
        std::fs::read(&copied).unwrap() == want,
        "nbdcopy disagrees with qemu-img"
    );
    n.ok(&[
        "volume",
        "add",
        "w",
        "--nbd",
        &q.uri,
        "--block-size",
        "16KiB",
    ]);
    let r = n.run(&["snapshot", "create", "w", "--name", "s1", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.json()["bytes-read"].as_u64().unwrap() <= 4 * MIB,
        "{}",
        r.stdout
    );
    assert_eq!(n.restore("w@s1"), want);
    drop(q);

    // A raw file served by nbdkit over TCP.
    let raw = n.image("d.raw", &want);
    let k = Server::nbdkit(&raw);
    n.ok(&["volume", "add", "k", "--nbd", &k.uri]);
    n.ok(&["snapshot", "create", "k", "--name", "s1"]);
    assert_eq!(n.restore("k@s1"), want);
    drop(k);

    // Restore into a writable export that holds other data: the result is the snapshot.
    let out = n.path("out.qcow2");
    qcow2(&out, "64M");
    qemu_io(&out, &["write -P 0x77 0 64M"]);
    let w = Server::qemu_nbd(&out, "qcow2", false);
    let e = n.fails(&["snapshot", "restore", "v@s1", "--to", &w.uri], 4);
    assert!(e.contains("--force"), "{e}");
    n.ok(&["snapshot", "restore", "v@s1", "--to", &w.uri, "--force"]);
    drop(w);
    assert!(raw_of(&out) == want, "restored export differs");
    n.ok(&["verify"]);
}

/// Whether the test `name` is skipped: the temporary directory's filesystem does not report
/// holes of 4 KiB.
fn without_4k_holes(n: &TestNode, name: &str) -> bool {
    if holdfast_tests::holes_of_4k(&n.dir.path().join("probe")) {
        return false;
    }
    holdfast_tests::skipped(
        name,
        "the temporary directory's filesystem does not report holes of 4 KiB (SEEK_DATA)",
    );
    true
}

/// Snapshots `img` as volume `v` (64 KiB blocks) through nbdkit with its log filter: the
/// snapshot's JSON and nbdkit's log.
fn snapshot_through_logged_nbdkit(n: &TestNode, img: &Path) -> (Value, String) {
    let log = n.path("nbdkit.log");
    let k = Server::nbdkit_logged(img, &log);
    n.ok(&[
        "volume",
        "add",
        "v",
        "--nbd",
        &k.uri,
        "--block-size",
        "64KiB",
    ]);
    let r = create(n, "s1");
    drop(k);
    (r, std::fs::read_to_string(&log).unwrap())
}

/// A hex field of an nbdkit log line: "connection=2 Read id=2 offset=0x100000 count=0x40000".
fn log_hex(line: &str, key: &str) -> u64 {
    let v = line.split(key).nth(1).unwrap().split(' ').next().unwrap();
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
}

/// Over NBD a snapshot asks the server for exactly the blocks that hold data: each run of
/// adjacent blocks is one request, the holes between them are never asked for, and data a
/// terabyte into a sparse export needs a buffer of its segment, not of its offset. Counted on
/// the server's side (nbdkit's log filter records every read), not by holdfast.
#[test]
fn nbd_reads_are_the_data_blocks_one_request_per_run() {
    use std::os::unix::fs::FileExt;
    let n = TestNode::new();
    if without_4k_holes(
        &n,
        "live::nbd_reads_are_the_data_blocks_one_request_per_run",
    ) {
        return;
    }
    let img = n.path("sparse.raw");
    let f = std::fs::File::create(&img).unwrap();
    let tib = 1u64 << 40;
    f.set_len(tib).unwrap();
    let data: [(u64, usize, u8); 4] = [
        (MIB, MIB as usize, 0xab),                 // 16 blocks
        (2 * MIB, 4096, 0xcd),                     // the start of the 17th: one run with them
        (3 * MIB + 8192, 4096, 0x11),              // inside a block, a hole away: a second run
        (tib - 3 * MIB, 2 * KIB64 as usize, 0x5a), // the last segment of the export
    ];
    for (at, len, byte) in data {
        f.write_all_at(&vec![byte; len], at).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let runs = [
        (MIB, 2 * MIB + KIB64),
        (3 * MIB, 3 * MIB + KIB64),
        (tib - 3 * MIB, tib - 3 * MIB + 2 * KIB64),
    ];

    let (r, log) = snapshot_through_logged_nbdkit(&n, &img);
    let mut reads: Vec<(u64, u64)> = log
        .lines()
        .filter(|l| l.contains(" Read id="))
        .map(|l| {
            let at = log_hex(l, " offset=");
            (at, at + log_hex(l, " count="))
        })
        .collect();
    reads.sort();
    assert_eq!(
        reads, runs,
        "the reads the server saw (sorted), against one per run of data blocks"
    );
    let want: u64 = runs.iter().map(|(a, b)| b - a).sum();
    assert_eq!(r["bytes-read"].as_u64(), Some(want), "{r}");
    assert_eq!(r["stats"]["blocks"].as_u64(), Some(tib / KIB64), "{r}");
    assert_eq!(
        r["stats"]["zero-blocks"].as_u64(),
        Some(tib / KIB64 - 20),
        "{r}"
    );
}

/// A sparse export is asked about its holes about twice over, however many segments hold
/// both data and holes: once a window at a time before reading, and once more per segment
/// after (to see holes filled meanwhile), for that segment alone. (Asking again from the
/// segment to the end of the window each time made qemu-nbd spend 3.3 s of CPU in `lseek`
/// for one snapshot of a 2 GiB image.)
#[test]
fn holes_of_an_export_are_asked_about_about_twice() {
    use std::os::unix::fs::FileExt;
    let n = TestNode::new();
    if without_4k_holes(&n, "live::holes_of_an_export_are_asked_about_about_twice") {
        return;
    }
    let size = 64 * MIB;
    let img = n.path("sparse.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    // Every other 64 KiB block holds data: every segment has data and holes.
    for b in (0..size / KIB64).step_by(2) {
        f.write_all_at(&vec![(b % 251) as u8 + 1; KIB64 as usize], b * KIB64)
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let (r, log) = snapshot_through_logged_nbdkit(&n, &img);
    assert_eq!(
        r["stats"]["zero-blocks"].as_u64(),
        Some(size / KIB64 / 2),
        "{r}"
    );
    let asked: Vec<u64> = log
        .lines()
        .filter(|l| l.contains(" Extents id="))
        .map(|l| log_hex(l, " count="))
        .collect();
    assert!(asked.len() > 1, "no block status requests logged:\n{log}");
    let total: u64 = asked.iter().sum();
    assert!(
        total <= 2 * size,
        "block status asked about {total} bytes of a {size}-byte export: {asked:?}"
    );
    assert_eq!(n.restore("v@s1"), std::fs::read(&img).unwrap());
}

/// With a dirty bitmap, an incremental reads exactly the blocks written since the previous
/// snapshot; every way the chain can break (bitmap removed, disabled, left inconsistent by a
/// crashed QEMU, image resized, previous snapshot deleted) gives a full read with the reason,
/// and every restore equals the image.
#[test]
fn dirty_bitmaps_read_only_what_changed_and_any_doubt_reads_everything() {
    let n = TestNode::new();
    let img = n.path("d.qcow2");
    qcow2(&img, "32M");
    qemu_io(&img, &["write -P 0x01 0 4M", "write -P 0x02 20M 1M"]);
    n.ok(&["volume", "add", "v", "--qcow2", s(&img)]);
    let r = create(&n, "s1");
    assert_eq!(r["tracking"]["changed-blocks-only"], false, "{r}");
    assert!(
        r["tracking"]["full-read-reason"]
            .as_str()
            .unwrap()
            .contains("first snapshot"),
        "{r}"
    );
    assert_eq!(r["bytes-read"], 5 * MIB, "{r}");
    let s1_ms = r["created-unix-ms"].as_u64().unwrap();
    assert_eq!(last_full_read(&n), s1_ms);

    // Writes at known offsets: three whole blocks and 4 KiB inside a fourth.
    qemu_io(
        &img,
        &[
            "write -P 0x21 1M 64k",
            "write -P 0x22 10M 128k",
            "write -P 0x23 20M 4k",
        ],
    );
    let r = create(&n, "s2");
    assert_eq!(r["tracking"]["changed-blocks-only"], true, "{r}");
    assert_eq!(r["tracking"]["base"], "v@s1", "{r}");
    assert_eq!(r["bytes-read"], 4 * KIB64, "{r}");
    assert_eq!(r["tracking"]["dirty-bytes"], 4 * KIB64, "{r}");
    assert_eq!(n.restore("v@s2"), raw_of(&img));
    // diff sees the same four blocks (1M, 10M and 10M+64k, 20M).
    let d = n
        .run(&["snapshot", "diff", "v@s1", "v@s2", "--json"])
        .json();
    assert_eq!(d["changed-blocks"], 4, "{d}");
    assert_eq!(n.restore("v@s1").len(), 32 * MIB as usize);

    // Nothing written: nothing read.
    let r = create(&n, "s3");
    assert_eq!(r["bytes-read"], 0, "{r}");
    assert_eq!(r["stats"]["new-chunks"], 0, "{r}");
    assert_eq!(n.restore("v@s3"), raw_of(&img));
    // Incrementals keep the time of the chain's full read (what `full_read_every` counts from).
    assert_eq!(last_full_read(&n), s1_ms);

    let full = |name: &str, reason: &str| {
        let r = create(&n, name);
        assert_eq!(r["tracking"]["changed-blocks-only"], false, "{r}");
        let why = r["tracking"]["full-read-reason"].as_str().unwrap();
        assert!(
            why.contains(reason),
            "{name}: expected {reason:?} in {why:?}"
        );
        assert!(r["bytes-read"].as_u64().unwrap() >= 5 * MIB, "{r}");
        assert_eq!(n.restore(&format!("v@{name}")), raw_of(&img), "{name}");
        let full_ms = r["created-unix-ms"].as_u64().unwrap();
        assert_eq!(last_full_read(&n), full_ms, "{name}");
        // The chain starts again at once.
        qemu_io(&img, &["write -P 0x44 30M 64k"]);
        let next = format!("{name}-next");
        let r = create(&n, &next);
        assert_eq!(r["tracking"]["changed-blocks-only"], true, "{r}");
        assert_eq!(r["bytes-read"], KIB64, "{r}");
        assert_eq!(n.restore(&format!("v@{next}")), raw_of(&img), "{next}");
        assert_eq!(last_full_read(&n), full_ms, "{next}");
    };

    // The bitmap removed (or renamed: holdfast finds it by name).
    let b = holdfast_bitmap(&img);
    run_tool(
        Command::new("qemu-img")
            .args(["bitmap", "--remove"])
            .arg(&img)
            .arg(&b),
    );
    qemu_io(&img, &["write -P 0x31 5M 64k"]);
    full("removed", "missing");

    // The bitmap disabled: writes after that were not recorded.
    let b = holdfast_bitmap(&img);
    run_tool(
        Command::new("qemu-img")
            .args(["bitmap", "--disable"])
            .arg(&img)
            .arg(&b),
    );
    qemu_io(&img, &["write -P 0x32 6M 64k"]);
    full("disabled", "disabled");

    // A writer that died with the image open leaves its bitmaps inconsistent.
    {
        let mut w = Server::qemu_nbd(&img, "qcow2", false);
        // 64 KiB of sevens at offset 0, written through the live export.
        let sevens = n.image("seven.raw", &[7u8; 65536]);
        run_tool(Command::new("nbdcopy").arg(&sevens).arg(&w.uri));
        unsafe_kill(&mut w.child);
    }
    assert!(
        bitmaps(&img)
            .iter()
            .any(|(_, f)| f.iter().any(|f| f == "in-use")),
        "the killed writer left no inconsistent bitmap"
    );
    full("crashed", "inconsistent");

    // The image grew.
    run_tool(
        Command::new("qemu-img")
            .args(["resize", "-f", "qcow2"])
            .arg(&img)
            .arg("+1M"),
    );
    full("resized", "changed size");

    // The snapshot the bitmap started at was deleted.
    n.ok(&["snapshot", "delete", "v@resized-next"]);
    full("deleted", "deleted");

    // Asked for.
    let r = n.run(&[
        "snapshot",
        "create",
        "v",
        "--name",
        "asked",
        "--full-read",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let why = r.json()["tracking"]["full-read-reason"].to_string();
    assert!(why.contains("--full-read"), "{why}");

    // Shrunk and grown back to the same size: the bitmap does not mark the cut part, which
    // now reads as zeros; those blocks are read again, and the snapshot equals the image.
    let size = raw_of(&img).len().to_string();
    // Cut inside a block that holds data (20M + 8 KiB): the block is partly zeros now.
    run_tool(
        Command::new("qemu-img")
            .args(["resize", "-f", "qcow2", "--shrink"])
            .arg(&img)
            .arg("20979712"),
    );
    run_tool(
        Command::new("qemu-img")
            .args(["resize", "-f", "qcow2"])
            .arg(&img)
            .arg(&size),
    );
    let r = create(&n, "regrown");
    assert_eq!(r["tracking"]["changed-blocks-only"], true, "{r}");
    assert!(
        r["tracking"]["unmarked-zero-bytes"].as_u64().unwrap_or(0) >= MIB,
        "the cut part was not read again: {r}"
    );
    assert_eq!(n.restore("v@regrown"), raw_of(&img), "regrown");

    // A guest's discard and write of zeros over data: the bitmap marks both, so nothing is
    // "unmarked" and nothing but the marked blocks is read.
    qemu_io(&img, &["write -P 0x21 2M 256k", "write -P 0x22 6M 128k"]);
    create(&n, "filled");
    qemu_io(&img, &["discard 2M 128k", "write -z 6M 64k"]);
    let r = create(&n, "trimmed");
    assert_eq!(r["tracking"]["changed-blocks-only"], true, "{r}");
    assert_eq!(
        r["tracking"]["unmarked-zero-bytes"].as_u64().unwrap_or(0),
        0,
        "{r}"
    );
    assert_eq!(n.restore("v@trimmed"), raw_of(&img), "trimmed");

    assert_eq!(
        bitmaps(&img)
            .iter()
            .filter(|(n, _)| n.starts_with("holdfast."))
            .count(),
        1,
        "{:?}",
        bitmaps(&img)
    );
    n.ok(&["verify"]);
}

/// SIGKILL, as a crash would.
fn unsafe_kill(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// `kill -9` of holdfast at random instants of a qcow2 snapshot: no qemu-nbd is left serving
/// the image, the image stays usable by a writer, and the next snapshot is correct and tidies
/// the bitmaps.
#[test]
fn a_killed_qcow2_snapshot_leaves_nothing_behind() {
    let n = TestNode::new();
    let img = n.path("big.qcow2");
    qcow2(&img, "256M");
    qemu_io(&img, &["write -P 0x01 0 200M"]);
    n.ok(&["volume", "add", "v", "--qcow2", s(&img)]);
    for (round, delay_ms) in [30u64, 150, 400, 900].into_iter().enumerate() {
        qemu_io(
            &img,
            &[&format!("write -P 0x{:02x} {}M 1M", round + 2, round * 7)],
        );
        let mut child = n.spawn(&["snapshot", "create", "v", "--name", &format!("k{round}")]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        unsafe_kill(&mut child);
        // qemu-nbd dies with holdfast (and a qemu-img it had started finishes its moment of
        // work): nothing holds the image for long.
        wait_for(|| {
            let out = Command::new("pgrep")
                .args(["-f", &format!("qemu-.*{}", img.display())])
                .output()
                .unwrap();
            out.stdout.is_empty()
        });
        // A writer can use the image.
        qemu_io(&img, &["write -P 0x66 100M 64k"]);
        let r = create(&n, &format!("after{round}"));
        assert_eq!(
            n.restore(&format!("v@after{round}")),
            raw_of(&img),
            "round {round}: {r}"
        );
        holdfast_bitmap(&img);
    }
    n.ok(&["verify"]);
}

/// An unreachable server, a wrong export name, and servers that drop the connection or break
/// the protocol: each is a clear error, and nothing is committed.
#[test]
fn bad_nbd_servers_give_clear_errors_and_commit_nothing() {
    let n = TestNode::new();
    let port = free_port();
    let e = n.fails(
        &[
            "volume",
            "add",
            "x",
            "--nbd",
            &format!("nbd://127.0.0.1:{port}/disk"),
        ],
        7,
    );
    assert!(e.contains("cannot reach"), "{e}");
    let e = n.fails(&["volume", "add", "x", "--nbd", "nbd://h/x?socket=/s"], 2);
    assert!(e.contains("socket="), "{e}");

    let good = FakeNbd::start(4 * MIB, Misbehaviour::None);
    let wrong = fake_nbd::uri_for(&good.socket, "nope");
    let e = n.fails(&["volume", "add", "x", "--nbd", &wrong], 3);
    assert!(e.contains("no export named"), "{e}");
    n.ok(&["volume", "add", "good", "--nbd", &good.uri()]);
    n.ok(&["snapshot", "create", "good", "--name", "s"]);
    let want: Vec<u8> = (0..4 * MIB).map(fake_nbd::byte_at).collect();
    assert!(
        n.restore("good@s") == want,
        "the fake server's data differs"
    );

    for (i, (mode, code, says)) in [
        (Misbehaviour::DropMidRead, 7, "closed the connection"),
        (Misbehaviour::WrongHandle, 6, "not in flight"),
        (Misbehaviour::OversizedReply, 6, "data chunk of"),
        (Misbehaviour::ExtentPastEnd, 6, "past the end"),
        (Misbehaviour::ShortRead, 6, "answered with"),
        (Misbehaviour::WrappingOffset, 6, "outside the request"),
    ]
    .into_iter()
    .enumerate()
    {
        let f = FakeNbd::start(4 * MIB, mode);
        let vol = format!("bad{i}");
        n.ok(&["volume", "add", &vol, "--nbd", &f.uri()]);
        let before = n.fingerprint();
        let e = n.fails(&["snapshot", "create", &vol, "--name", "s"], code);
        assert!(
            e.contains("NBD server") && e.contains(says),
            "{mode:?}: {e}"
        );
        assert!(e.contains("nothing was committed"), "{mode:?}: {e}");
        assert_eq!(n.fingerprint(), before, "{mode:?} changed something");
    }
    n.ok(&["verify"]);
}

/// `--before` prepares the source and `--after` always runs; a failing `before` means no
/// snapshot and an error that says what the command printed.
#[test]
fn hooks_run_around_snapshots() {
    let n = TestNode::new();
    let img = n.image("v.img", &holdfast_tests::mixed_bytes(MIB as usize, 1));
    n.add_volume("v", &img, "64KiB");
    let log = n.path("hooks.log");
    let before = format!(
        "echo \"before $HOLDFAST_VOLUME $HOLDFAST_SNAPSHOT $HOLDFAST_SOURCE\" >> {}",
        s(&log)
    );
    let after = format!(
        "echo \"after $HOLDFAST_RESULT $HOLDFAST_SNAPSHOT_ID$HOLDFAST_ERROR\" >> {}",
        s(&log)
    );
    let id = n
        .ok(&[
            "snapshot", "create", "v", "--name", "s1", "--before", &before, "--after", &after,
        ])
        .trim()
        .to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text,
        format!("before v s1 {}\nafter ok {id}\n", s(&img)),
        "{text}"
    );

    std::fs::remove_file(&log).unwrap();
    let e = n.fails(
        &[
            "snapshot",
            "create",
            "v",
            "--name",
            "s2",
            "--before",
            "echo could not freeze >&2; exit 3",
            "--after",
            &after,
        ],
        7,
    );
    assert!(
        e.contains("before hook") && e.contains("could not freeze") && e.contains("no snapshot"),
        "{e}"
    );
    assert_eq!(n.snapshot_names("v"), vec!["s1"]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("after failed "), "{text}");

    // A failing `after` does not undo a committed snapshot.
    n.ok(&[
        "snapshot", "create", "v", "--name", "s3", "--after", "exit 1",
    ]);
    assert_eq!(n.snapshot_names("v"), vec!["s1", "s3"]);
}

/// The guest of the live tests: writes sequence number `i` (over a whole block) into block
/// `(i * 617) % BLOCKS`, one write at a time, and counts what was acknowledged.
struct Guest {
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const BLOCKS: u64 = 2048;

fn guest_block(i: u64) -> u64 {
    (i * 617) % BLOCKS
}

impl Guest {
    fn start(qsd: &holdfast_tests::qemu::StorageDaemon) -> Guest {
        use std::sync::atomic::Ordering;
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut w = holdfast_tests::qemu::NbdWriter::connect(&qsd.nbd_socket, "disk0");
        let (a, s) = (acked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                let data: Vec<u8> = std::iter::repeat_n(i.to_le_bytes(), KIB64 as usize / 8)
                    .flatten()
                    .collect();
                w.write(guest_block(i) * KIB64, &data);
                a.store(i, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        Guest {
            acked,
            stop,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checks that `image` is the guest's disk at one instant: after exactly the writes 1..=k,
/// for a k between `acked_before` and one past `acked_after` (a write in flight at the freeze
/// may land on either side). Returns k.
fn assert_point_in_time(image: &[u8], acked_before: u64, acked_after: u64, what: &str) -> u64 {
    let bs = KIB64 as usize;
    let seq = |b: usize| u64::from_le_bytes(image[b * bs..b * bs + 8].try_into().unwrap());
    let k = (0..BLOCKS as usize).map(seq).max().unwrap();
    assert!(
        acked_before <= k && k <= acked_after + 1,
        "{what}: holds writes up to {k}, but {acked_before} were acknowledged before the \
         snapshot and {acked_after} after"
    );
    let mut want = vec![0u64; BLOCKS as usize];
    for i in 1..=k {
        want[guest_block(i) as usize] = i;
    }
    for b in 0..BLOCKS as usize {
        let block = &image[b * bs..(b + 1) * bs];
        let whole = block.chunks(8).all(|c| c == want[b].to_le_bytes());
        assert!(
            whole,
            "{what}: block {b} holds write {} (torn or out of order), the disk after write \
             {k} holds {}",
            seq(b),
            want[b]
        );
    }
    k
}

/// A guest keeps writing through qemu-storage-daemon while holdfast takes snapshots over QMP:
/// each restored snapshot is the disk at one instant (exactly the writes acknowledged before
/// its freeze, none after), incrementals read only changed blocks, and nothing holdfast added
/// stays in QEMU.
#[test]
fn a_running_writer_is_snapshotted_at_one_instant() {
    let n = TestNode::new();
    let img = n.path("guest.qcow2");
    qcow2(&img, &format!("{}", BLOCKS * KIB64));
    let qsd = holdfast_tests::qemu::StorageDaemon::start(&img);
    add_live(&n, &qsd);
    let guest = Guest::start(&qsd);
    let mut last_k = 0;
    for round in 0..4 {
        wait_for(|| guest.acked() > last_k + 50);
        let before = guest.acked();
        let r = create(&n, &format!("s{round}"));
        let after = guest.acked();
        assert!(
            after > before,
            "the guest stopped writing during the snapshot"
        );
        let k = assert_point_in_time(
            &n.restore(&format!("v@s{round}")),
            before,
            after,
            &format!("s{round}"),
        );
        if round > 0 {
            // Only the blocks of the writes since the previous freeze (one may have been in
            // flight at each freeze).
            assert_eq!(r["tracking"]["changed-blocks-only"], true, "{r}");
            let written = (k - last_k + 1).min(BLOCKS);
            assert!(
                r["bytes-read"].as_u64().unwrap() <= written * KIB64,
                "read more than the {written} blocks written since the last snapshot: {r}"
            );
        }
        assert!(k > last_k);
        last_k = k;
    }
    drop(guest);
    let (exports, jobs, nodes, bitmaps) = qsd.leftovers();
    assert_eq!(exports, vec!["guest"]);
    assert!(jobs.is_empty(), "{jobs:?}");
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert!(bitmaps[0].starts_with("holdfast.v."), "{bitmaps:?}");
    n.ok(&["verify"]);
}

/// `kill -9` of holdfast at random instants of a live snapshot: the guest never stops, and the
/// next snapshot removes what was left in QEMU and is the disk at one instant.
#[test]
fn a_killed_live_snapshot_is_cleaned_up_by_the_next() {
    let n = TestNode::new();
    let img = n.path("guest.qcow2");
    qcow2(&img, &format!("{}", BLOCKS * KIB64));
    let qsd = holdfast_tests::qemu::StorageDaemon::start(&img);
    add_live(&n, &qsd);
    let guest = Guest::start(&qsd);
    n.ok(&["snapshot", "create", "v", "--name", "first"]);
    for (round, delay_ms) in [5u64, 40, 90, 160, 300].into_iter().enumerate() {
        let mut child = n.spawn(&["snapshot", "create", "v", "--name", &format!("k{round}")]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        unsafe_kill(&mut child);
        let acked = guest.acked();
        wait_for(|| guest.acked() > acked + 20);
        let before = guest.acked();
        let name = format!("after{round}");
        let r = create(&n, &name);
        let after = guest.acked();
        assert_point_in_time(&n.restore(&format!("v@{name}")), before, after, &name);
        let _ = r;
        let (exports, jobs, _, bitmaps) = qsd.leftovers();
        assert_eq!(exports, vec!["guest"], "round {round}");
        assert!(jobs.is_empty(), "round {round}: {jobs:?}");
        assert_eq!(bitmaps.len(), 1, "round {round}: {bitmaps:?}");
    }
    drop(guest);
    n.ok(&["verify"]);
}

/// SIGTERM stops a snapshot cleanly: during `before` (the hook is killed), and during the
/// read of a running QEMU's disk (sent by the `frozen` hook itself, right after the freeze):
/// nothing is committed, `after` runs, and nothing holdfast added stays in QEMU.
#[test]
fn a_stopped_live_snapshot_undoes_what_it_did() {
    let n = TestNode::new();
    let img = n.path("guest.qcow2");
    qcow2(&img, "128M");
    qemu_io(&img, &["write -P 0x61 0 128M"]);
    let qsd = holdfast_tests::qemu::StorageDaemon::start(&img);
    add_live(&n, &qsd);
    n.ok(&["snapshot", "create", "v", "--name", "first"]);
    let log = n.path("hooks.log");
    let hook = |what: &str| format!("echo {what} $HOLDFAST_RESULT >> {}", s(&log));

    // During `before`.
    let child = n
        .cmd(&[
            "snapshot",
            "create",
            "v",
            "--name",
            "stopped1",
            "--before",
            &format!("{}; sleep 30", hook("before")),
            "--after",
            &hook("after"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(|| std::fs::read_to_string(&log).is_ok_and(|t| t.contains("before")));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the before hook was not stopped"
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "before\nafter failed\n"
    );

    // During the read, right after the freeze.
    std::fs::remove_file(&log).unwrap();
    let r = n.run(&[
        "snapshot",
        "create",
        "v",
        "--name",
        "stopped2",
        "--before",
        &hook("before"),
        "--frozen",
        &format!("{}; kill -TERM $PPID", hook("frozen")),
        "--after",
        &hook("after"),
    ]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(r.stderr.contains("interrupted"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "before\nfrozen\nafter failed\n"
    );
    assert_eq!(n.snapshot_names("v"), vec!["first"]);
    let (exports, jobs, nodes, bitmaps) = qsd.leftovers();
    assert_eq!(exports, vec!["guest"]);
    assert!(jobs.is_empty(), "{jobs:?}");
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    // The chain still holds.
    qemu_io_nbd(&qsd, "write -P 0x62 1M 64k");
    let r = create(&n, "next");
    assert_eq!(r["tracking"]["changed-blocks-only"], true, "{r}");
    assert_eq!(r["bytes-read"], KIB64, "{r}");
}

/// The dirty bitmap of a running QEMU's qcow2 disk is persistent: after QEMU shuts down and
/// starts again, the next snapshot still reads only what changed.
#[test]
fn a_live_chain_outlives_a_restart_of_qemu() {
    let n = TestNode::new();
    let img = n.path("guest.qcow2");
    qcow2(&img, "16M");
    let qsd = holdfast_tests::qemu::StorageDaemon::start(&img);
    add_live(&n, &qsd);
    qemu_io_nbd(&qsd, "write -P 0x61 0 1M");
    create(&n, "s1");
    let qsd = qsd.restart();
    qemu_io_nbd(&qsd, "write -P 0x62 4M 64k");
    let r = create(&n, "s2");
    assert_eq!(r["tracking"]["changed-blocks-only"], true, "{r}");
    assert_eq!(r["bytes-read"], KIB64, "{r}");
    drop(qsd);
    assert_eq!(n.restore("v@s2"), raw_of(&img));
}

fn qemu_io_nbd(qsd: &holdfast_tests::qemu::StorageDaemon, cmd: &str) {
    run_tool(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd])
            .arg(format!(
                "nbd+unix:///disk0?socket={}",
                qsd.nbd_socket.display()
            )),
    );
}

/// Runs openssl (Debian's `openssl`, present on every Debian system).
fn openssl(dir: &Path, args: &[&str]) {
    run_tool(Command::new("openssl").current_dir(dir).args(args));
}

/// A CA, a server certificate for `localhost` and a client certificate, as QEMU's
/// `tls-creds-x509` wants them (`DIR/ca-cert.pem`, `server-cert.pem`, `server-key.pem`).
fn pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    for (who, name, usage) in [
        ("server", "localhost", "serverAuth"),
        ("client", "holdfast", "clientAuth"),
    ] {
        let (key, csr, cert) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}-cert.pem"),
        );
        let subj = format!("/CN={name}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        let ext = dir.join(format!("{who}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
            ),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                s(&ext),
            ],
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// NBD over TLS (`nbds+unix://`, STARTTLS) against qemu-nbd with x509 credentials that ask
/// for a client certificate: the snapshot restores bit for bit; a plaintext URI, an untrusted
/// CA, a wrong host name and a missing client certificate are each refused (exit 7), with no
/// fallback to plaintext.
#[test]
fn nbd_over_tls_checks_both_sides() {
    let n = TestNode::new();
    let pki_dir = n.path("pki");
    std::fs::create_dir(&pki_dir).unwrap();
    pki(&pki_dir);
    let img = n.path("d.qcow2");
    qcow2(&img, "16M");
    qemu_io(&img, &["write -P 0x71 1M 1M", "write -P 0x72 9M 64k"]);
    let sock = n.path("tls.sock");
    let mut server = Command::new("qemu-nbd")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server",
            pki_dir.display()
        ))
        .args([
            "--tls-creds",
            "tls0",
            "--persistent",
            "--read-only",
            "-f",
            "qcow2",
        ])
        .args(["--export-name", "disk", "--socket"])
        .arg(&sock)
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| sock.exists());
    let p = |f: &str| pki_dir.join(f).display().to_string();
    let base = format!("nbds+unix:///disk?socket={}", sock.display());
    let good = format!(
        "{base}&tls-ca={}&tls-hostname=localhost&tls-cert={}&tls-key={}",
        p("ca-cert.pem"),
        p("client-cert.pem"),
        p("client-key.pem")
    );
    n.ok(&["volume", "add", "t", "--nbd", &good]);
    n.ok(&["snapshot", "create", "t", "--name", "s1"]);
    assert!(
        n.restore("t@s1") == raw_of(&img),
        "restore over TLS differs"
    );

    let plain = format!("nbd+unix:///disk?socket={}", sock.display());
    let e = n.fails(&["volume", "add", "p", "--nbd", &plain], 7);
    assert!(e.contains("requires TLS"), "{e}");
    let untrusted = good.replace(&p("ca-cert.pem"), &p("server-cert.pem"));
    let e = n.fails(&["volume", "add", "u", "--nbd", &untrusted], 7);
    assert!(e.contains("invalid peer certificate"), "{e}");
    let wrong_name = good.replace("tls-hostname=localhost", "tls-hostname=other");
    let e = n.fails(&["volume", "add", "w", "--nbd", &wrong_name], 7);
    assert!(e.contains("not valid for name"), "{e}");
    let no_client = format!("{base}&tls-ca={}&tls-hostname=localhost", p("ca-cert.pem"));
    let e = n.fails(&["volume", "add", "c", "--nbd", &no_client], 7);
    assert!(e.contains("tls-cert"), "{e}");
    let _ = server.kill();
    let _ = server.wait();

    // A running QEMU whose NBD server is named nbds:// but speaks plaintext: refused, not read
    // in the clear, and nothing is left in QEMU.
    let img2 = n.path("g.qcow2");
    qcow2(&img2, "8M");
    let qsd = holdfast_tests::qemu::StorageDaemon::start(&img2);
    let server = format!(
        "nbds+unix:///?socket={}&tls-ca={}&tls-hostname=localhost",
        qsd.nbd_socket.display(),
        p("ca-cert.pem")
    );
    n.ok(&[
        "volume",
        "add",
        "q",
        "--qmp",
        s(&qsd.qmp_socket),
        "--node",
        "disk0",
        "--nbd-server",
        &server,
    ]);
    let e = n.fails(&["snapshot", "create", "q"], 7);
    assert!(e.contains("does not offer TLS"), "{e}");
    let (exports, jobs, _, _) = qsd.leftovers();
    assert_eq!(exports, vec!["guest"]);
    assert!(jobs.is_empty(), "{jobs:?}");
}

/// A disk cut inside a block and grown back (small qcow2 clusters, so the block is left part
/// data, part unallocated): the block is read again, not taken from the base with its old
/// tail.
#[test]
fn a_disk_cut_inside_a_block_is_read_again() {
    let n = TestNode::new();
    let img = n.path("c.qcow2");
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
            .arg(&img)
            .arg("4M"),
    );
    qemu_io(&img, &["write -P 0x33 0 3M"]);
    n.ok(&["volume", "add", "v", "--qcow2", s(&img)]);
    create(&n, "a");
    for size in ["8192", "4M"] {
        let mut c = Command::new("qemu-img");
        c.args(["resize", "-f", "qcow2"]);
        if size == "8192" {
            c.arg("--shrink");
        }
        run_tool(c.arg(&img).arg(size));
    }
    let r = create(&n, "b");
    assert_eq!(r["tracking"]["changed-blocks-only"], true, "{r}");
    assert_eq!(n.restore("v@b"), raw_of(&img), "{r}");
}

/// Registers the disk of the test's qemu-storage-daemon as volume `v`.
fn add_live(n: &TestNode, qsd: &holdfast_tests::qemu::StorageDaemon) {
    n.ok(&[
        "volume",
        "add",
        "v",
        "--qmp",
        s(&qsd.qmp_socket),
        "--node",
        "disk0",
        "--nbd-server",
        &qsd.nbd_server(),
    ]);
}
