//! Test harness: real `holdfast` processes on throw-away state directories.
//!
//! The binary is `$HOLDFAST_BIN` if set, else `target/debug/holdfast` next to this test
//! executable's `deps/` folder (the test script builds it first), or with this package's
//! `mutants` feature `holdfast-mutant` there, which `cargo test` builds itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub mod browser;
pub mod cascade;
pub mod fake_nbd;
pub mod fake_upstream;
pub mod proxy;
pub mod qemu;
pub mod s3;

/// The holdfast binary under test.
pub fn holdfast_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HOLDFAST_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/e2e-HASH -> target/debug/holdfast
    let name = if cfg!(feature = "mutants") {
        "holdfast-mutant"
    } else {
        "holdfast"
    };
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p holdfast --bin holdfast` \
         (./test.sh does) or set HOLDFAST_BIN",
        bin.display()
    );
    bin
}

/// A process killed (and reaped) when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command held at a protocol step by the test hook `HOLDFAST_PAUSE_AT` (see
/// `holdfast::pause_point`): it waits while its flag file exists. Dropped without `resume` or
/// `kill` (a test that failed meanwhile), it is killed: it must not go on into a state
/// directory that is being removed.
pub struct Paused {
    child: Option<Child>,
    flag: PathBuf,
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Paused {
    /// Starts `args` on `n`, to pause at each of `points` (comma-separated) it gets to; waits
    /// until it is paused at the first.
    pub fn at(n: &TestNode, points: &str, dir: &Path, args: &[&str]) -> Paused {
        let mut c = n.cmd(args);
        c.env("HOLDFAST_PAUSE_AT", points)
            .env("HOLDFAST_PAUSE_DIR", dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().unwrap();
        let point = points.split(',').next().unwrap();
        let mut p = Paused {
            child: Some(child),
            flag: PathBuf::new(),
        };
        p.wait_for(dir, point, args);
        p
    }

    fn wait_for(&mut self, dir: &Path, point: &str, args: &[&str]) {
        let child = self.child.as_mut().expect("running");
        self.flag = dir.join(format!("{point}.{}", child.id()));
        let t0 = std::time::Instant::now();
        while !self.flag.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{args:?} ended ({status}) before it reached {point}");
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(60),
                "{args:?} never reached {point}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Lets it go on to the next pause point, `point`, and waits until it is there.
    pub fn next(&mut self, dir: &Path, point: &str) {
        std::fs::remove_file(&self.flag).unwrap();
        self.wait_for(dir, point, &[]);
    }

    /// Lets it go on, and waits for its end.
    pub fn resume(mut self) -> Run {
        std::fs::remove_file(&self.flag).unwrap();
        Run::of(self.child.take().expect("running"))
    }

    /// Kills it where it waits (SIGKILL, as a crash or a power cut would).
    pub fn kill(mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

/// Whether the filesystem holding `probe` (a file created and removed here) reports holes
/// and data to the 4 KiB (SEEK_DATA, SEEK_HOLE), which tests that count the bytes read of a
/// sparse image rely on.
pub fn holes_of_4k(probe: &Path) -> bool {
    let script = r#"
import os, sys
p = sys.argv[1]
with open(p, "wb") as f:
    f.truncate(1 << 20)
    f.seek(64 << 10)
    f.write(b"x" * 4096)
    f.flush()
    os.fsync(f.fileno())
    fd = f.fileno()
    try:
        ok = (os.lseek(fd, 0, os.SEEK_DATA) == 64 << 10
              and os.lseek(fd, 64 << 10, os.SEEK_HOLE) == 68 << 10)
    except OSError:
        ok = False
os.remove(p)
print("yes" if ok else "no")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(probe)
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// Records that `test` could not run here and why: on stderr, and in `target/test-skips.txt`,
/// which `./test.sh` prints after the run (cargo hides a passing test's output).
pub fn skipped(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-skips.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        use std::io::Write;
        let _ = writeln!(f, "{test}: {why}");
    }
}

/// A policy component built from `plugins/` (`keep_base`, `gfs_retention`, `app_hold`,
/// `hostile`, `wrong_world`).
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("HOLDFAST_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/debug")
        });
    let p = dir.join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: build the policies with `(cd plugins && cargo build)` (./test.sh does)",
        p.display()
    );
    p
}

/// The outcome of one command.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Waits for `child` (spawned with its output piped) and collects what it did.
    pub fn of(child: Child) -> Run {
        Run::from(child.wait_with_output().unwrap())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// The longest one command of a test may run: `HOLDFAST_TEST_TIMEOUT_SECS`, else 10 minutes.
pub fn command_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(
        std::env::var("HOLDFAST_TEST_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
    )
}

/// One node: a temporary directory holding its state and its images.
#[derive(Debug)]
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    /// Extra environment for every command (S3 credentials, say).
    pub env: Vec<(String, String)>,
}

impl Default for TestNode {
    fn default() -> Self {
        Self::new()
    }
}

impl TestNode {
    /// A new, initialised node.
    pub fn new() -> TestNode {
        let n = Self::uninitialised();
        n.ok(&["init"]);
        n
    }

    /// A node whose state directory does not exist yet.
    pub fn uninitialised() -> TestNode {
        let dir = tempfile::Builder::new()
            .prefix("holdfast-e2e")
            .tempdir()
            .expect("tempdir");
        let state = dir.path().join("state");
        TestNode {
            dir,
            state,
            env: vec![],
        }
    }

    /// A node whose state lives at `state` (for example on a small tmpfs).
    pub fn at(state: PathBuf) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        TestNode {
            dir,
            state,
            env: vec![],
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(holdfast_bin());
        // The runner's own settings must not change what a test sees.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("HOLDFAST_")
                || k.starts_with("AWS_")
                || k == "NOTIFY_SOCKET"
                || k == "JOURNAL_STREAM"
            {
                c.env_remove(k.as_ref());
            }
        }
        // Temporary files (qemu-nbd's socket folders) go with the test's folder: a holdfast
        // the test kills cannot remove its own.
        let tmp = self.dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("a temporary folder for the node");
        c.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("TMPDIR", tmp)
            .env("HOLDFAST_STATE", &self.state)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    /// Runs a command and returns what it did, whatever its exit code. A command that runs
    /// longer than [`command_timeout`] is killed and fails the test (a hang must not stall CI).
    pub fn run(&self, args: &[&str]) -> Run {
        let child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(command_timeout()) {
            Ok(out) => Run::from(out.expect("wait for holdfast")),
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                let out = rx.recv().ok().and_then(|r| r.ok());
                panic!(
                    "holdfast {args:?} ran for more than {:?} and was killed; stderr:\n{}",
                    command_timeout(),
                    out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                        .unwrap_or_default()
                );
            }
        }
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "holdfast {args:?} failed:\n{}", r.stderr);
        r.stdout
    }

    /// Runs a command that must fail with `code`; returns its stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let r = self.run(args);
        assert_eq!(
            r.code, code,
            "holdfast {args:?}: expected exit {code}, got {}\nstdout: {}\nstderr: {}",
            r.code, r.stdout, r.stderr
        );
        r.stderr
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holdfast")
    }

    /// Writes an image file and returns its path.
    pub fn image(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write image");
        p
    }

    /// Registers a volume on an image with the given block size.
    pub fn add_volume(&self, name: &str, image: &Path, block_size: &str) {
        self.ok(&[
            "volume",
            "add",
            name,
            "--image",
            image.to_str().expect("utf-8 path"),
            "--block-size",
            block_size,
        ]);
    }

    /// Takes a snapshot and returns its id.
    pub fn snapshot(&self, volume: &str, name: &str) -> String {
        self.ok(&["snapshot", "create", volume, "--name", name])
            .trim()
            .to_string()
    }

    /// The volume's snapshots as JSON records.
    pub fn snapshots(&self, volume: &str) -> Vec<Value> {
        let out = self.ok(&["snapshot", "list", volume, "--json"]);
        serde_json::from_str::<Value>(&out)
            .expect("json")
            .as_array()
            .expect("array")
            .clone()
    }

    /// The names of the volume's snapshots, oldest first.
    pub fn snapshot_names(&self, volume: &str) -> Vec<String> {
        self.snapshots(volume)
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// The id of `VOLUME@SNAPSHOT`.
    pub fn snapshot_id(&self, reference: &str) -> String {
        self.run(&["snapshot", "show", reference, "--json"]).json()["id"]
            .as_str()
            .expect("id")
            .to_string()
    }

    /// Restores `reference` to a fresh file and returns its bytes.
    pub fn restore(&self, reference: &str) -> Vec<u8> {
        let out = self.path(&format!("restore-{}", rand::random::<u32>()));
        self.ok(&[
            "snapshot",
            "restore",
            reference,
            "--to",
            out.to_str().expect("utf-8"),
        ]);
        let bytes = std::fs::read(&out).expect("read restored");
        std::fs::remove_file(&out).ok();
        bytes
    }

    /// Everything observable about the node's data: volumes, snapshots, repository files.
    /// Two equal fingerprints mean a command changed nothing.
    pub fn fingerprint(&self) -> String {
        let mut out = self.ok(&["volume", "list", "--json"]);
        let vols: Value = serde_json::from_str(&out).expect("json");
        for v in vols.as_array().expect("array") {
            let name = v["name"].as_str().expect("name");
            out.push_str(&self.ok(&["snapshot", "list", name, "--json"]));
        }
        out.push_str(&self.ok(&["lock", "list", "--json"]));
        let mut files = Vec::new();
        list_files(&self.state.join("repo"), &mut files);
        files.sort();
        out.push_str(&files.join("\n"));
        out
    }
}

fn list_files(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            list_files(&p, out);
        } else {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(format!("{} {len}", p.display()));
        }
    }
}

/// Deterministic bytes of mixed content: runs of zeros, text, and pseudo-random bytes.
pub fn mixed_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 1000 + (next() % 9000) as usize;
        let n = run.min(len - out.len());
        match next() % 3 {
            0 => out.extend(std::iter::repeat_n(0u8, n)),
            1 => out.extend(b"holdfast keeps snapshots ".iter().cycle().take(n)),
            _ => out.extend((0..n).map(|_| next() as u8)),
        }
    }
    out
}

/// All files under the repository's packs/ folder.
pub fn pack_files(state: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    list_files(&state.join("repo/packs"), &mut files);
    files
        .iter()
        .map(|l| PathBuf::from(l.rsplit_once(' ').expect("size").0))
        .collect()
}

/// How many bytes of `files` are in the page cache (`fincore` from util-linux-extra, which
/// `./test.sh` installs).
pub fn cached_bytes(files: &[PathBuf]) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .args(files)
        .output()
        .expect("fincore (util-linux-extra; ./test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|n| n.parse::<u64>().expect("a number of bytes"))
        .sum()
}

/// Runs `holdfast ARGS` under a Python parent that reports the child's peak resident memory
/// (getrusage of its children): (exit code, stderr, peak RSS in bytes).
pub fn peak_rss(state: &Path, args: &[&str]) -> (i32, String, u64) {
    let script = r#"
import resource, subprocess, sys
try:
    r = subprocess.run(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=float(sys.argv[1]))
except subprocess.TimeoutExpired:
    print("timeout")
    sys.exit(0)
sys.stderr.write(r.stderr.decode(errors="replace"))
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"#;
    let mut c = Command::new("python3");
    // The runner's own settings must not change what a test sees (as in `TestNode::cmd`).
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("HOLDFAST_") || k.starts_with("AWS_") || k == "RUST_LOG" {
            c.env_remove(k.as_ref());
        }
    }
    let out = c
        .arg("-c")
        .arg(script)
        .arg(command_timeout().as_secs().to_string())
        .arg(holdfast_bin())
        .args(args)
        .env("HOLDFAST_STATE", state)
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.trim() != "timeout",
        "holdfast {args:?} ran longer than {:?} (HOLDFAST_TEST_TIMEOUT_SECS) and was killed",
        command_timeout()
    );
    let mut it = text.split_whitespace();
    let code: i32 = it.next().and_then(|c| c.parse().ok()).expect(&text);
    let kib: u64 = it.next().and_then(|c| c.parse().ok()).expect(&text);
    (
        code,
        String::from_utf8_lossy(&out.stderr).to_string(),
        kib * 1024,
    )
}
