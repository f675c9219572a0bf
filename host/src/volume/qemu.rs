//! QEMU disk images: `qemu-img` for what an image holds (size, persistent dirty bitmaps) and
//! to add or remove bitmaps, and `qemu-nbd` to serve an image to holdfast itself, read-only,
//! on a unix socket in a private folder, for as long as a snapshot reads it.
//!
//! The image must not be in use by a writer while holdfast reads it this way (QEMU's image
//! locking refuses it, and holdfast says so): for a running VM, take the snapshot through the
//! VM's own QEMU instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::nbd::{Client, NbdAddr, NbdUri};
use crate::error::{Error, Result};

/// What `qemu-img info` says of an image.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub bitmaps: Vec<Bitmap>,
}

/// A persistent dirty bitmap of a qcow2 image.
#[derive(Clone, Debug, Deserialize)]
pub struct Bitmap {
    pub name: String,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub granularity: u64,
}

impl Bitmap {
    /// Recording writes (`auto`).
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
    /// Left inconsistent by a QEMU that did not close the image (`in-use`).
    pub fn in_use(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
}

fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    c.stdin(Stdio::null())
        .env_remove("HOLDFAST_PASSPHRASE")
        .env_remove("HOLDFAST_NEW_PASSPHRASE");
    c
}

fn missing_tool(name: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::unavailable_msg(format!(
            "{name} is not installed; install it (Debian: apt-get install qemu-utils)"
        ))
    } else {
        Error::io(format!("running {name}"), e)
    }
}

/// Runs a QEMU tool and returns its standard output, or an error with its message.
fn run(mut cmd: Command, name: &str, image: &Path, what: &str) -> Result<Vec<u8>> {
    let out = cmd.output().map_err(|e| missing_tool(name, e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg = msg.trim();
        if msg.contains("lock") {
            return Err(Error::conflict(format!(
                "{} is in use by another process (a running VM?), so holdfast cannot {what}: \
                 {msg}; stop the writer, or snapshot it through its own QEMU",
                image.display()
            )));
        }
        return Err(Error::unavailable_msg(format!(
            "{name} could not {what} {}: {msg}",
            image.display()
        )));
    }
    Ok(out.stdout)
}

/// Reads an image's format, size and bitmaps.
pub fn info(image: &Path) -> Result<ImageInfo> {
    #[derive(Deserialize)]
    struct Info {
        format: String,
        #[serde(rename = "virtual-size")]
        virtual_size: u64,
        #[serde(rename = "format-specific", default)]
        specific: Option<Specific>,
    }
    #[derive(Deserialize)]
    struct Specific {
        #[serde(default)]
        data: Option<SpecificData>,
    }
    #[derive(Deserialize)]
    struct SpecificData {
        #[serde(default)]
        bitmaps: Vec<Bitmap>,
    }
    let mut cmd = tool("qemu-img");
    cmd.args(["info", "--output=json"]).arg(image);
    let out = run(cmd, "qemu-img", image, "read")?;
    let info: Info = serde_json::from_slice(&out).map_err(|e| {
        Error::unavailable_msg(format!(
            "qemu-img info of {} was not understood: {e}",
            image.display()
        ))
    })?;
    Ok(ImageInfo {
        format: info.format,
        virtual_size: info.virtual_size,
        bitmaps: info
            .specific
            .and_then(|s| s.data)
            .map(|d| d.bitmaps)
            .unwrap_or_default(),
    })
}

/// Adds an enabled persistent bitmap: from now on it records every write to the image, one
/// bit per `granularity` bytes (the volume's block size: coarser marks more than was written,
/// finer only costs the bitmap's size).
pub fn add_bitmap(image: &Path, name: &str, granularity: u32) -> Result<()> {
    let mut cmd = tool("qemu-img");
    cmd.args(["bitmap", "--add", "--enable", "-f", "qcow2", "-g"])
        .arg(granularity.to_string())
        .arg(image)
        .arg(name);
    run(cmd, "qemu-img", image, "add a dirty bitmap to").map(drop)
}

/// Removes a persistent bitmap.
pub fn remove_bitmap(image: &Path, name: &str) -> Result<()> {
    let mut cmd = tool("qemu-img");
    cmd.args(["bitmap", "--remove", "-f", "qcow2"])
        .arg(image)
        .arg(name);
    run(cmd, "qemu-img", image, "remove a dirty bitmap from").map(drop)
}

/// A `qemu-nbd` serving an image read-only on a private unix socket; stopped when dropped.
#[derive(Debug)]
pub struct Served {
    child: Child,
    _dir: tempfile::TempDir,
    uri: NbdUri,
    /// Keeps the thread that started qemu-nbd alive (see [`spawn_tied`]).
    _tie: std::sync::mpsc::Sender<()>,
}

/// Starts qemu-nbd with `args` so that it dies with holdfast: the child asks the kernel for
/// SIGKILL when its parent goes (and exits at once if holdfast is already gone), from a thread
/// that lives until the returned sender is dropped, because the kernel sends the signal when
/// the *thread* that started the child ends.
fn spawn_tied(args: Vec<std::ffi::OsString>) -> Result<(Child, std::sync::mpsc::Sender<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (tie, tied) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("qemu-nbd".into())
        .spawn(move || {
            let mut c = tool("qemu-nbd");
            c.args(&args).stdout(Stdio::null()).stderr(Stdio::piped());
            die_with_parent(&mut c);
            let r = c.spawn();
            let started = r.is_ok();
            let _ = tx.send(r);
            if started {
                // Until the server is no longer needed.
                let _ = tied.recv();
            }
        })
        .map_err(|e| Error::io("starting a thread for qemu-nbd", e))?;
    let child = rx
        .recv()
        .map_err(|_| Error::internal("the qemu-nbd thread ended early"))?
        .map_err(|e| missing_tool("qemu-nbd", e))?;
    Ok((child, tie))
}

/// Makes the child killed when the thread that starts it ends (holdfast exits or is killed).
#[allow(unsafe_code)]
fn die_with_parent(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe work is allowed: it makes two system calls through rustix (prctl and
    // getppid), which allocate nothing and take no locks.
    unsafe {
        c.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The parent may have died before the line above: then nobody would kill us.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::other(
                    "holdfast exited before qemu-nbd started",
                ));
            }
            Ok(())
        });
    }
}

impl Served {
    /// Serves `image` (format `format`), exporting the dirty bitmap `bitmap` too if given,
    /// and waits until the socket accepts connections.
    pub fn start(image: &Path, format: &str, bitmap: Option<&str>) -> Result<Served> {
        remove_stale_folders();
        let dir = tempfile::Builder::new()
            .prefix("holdfast-nbd.")
            .tempdir()
            .map_err(|e| Error::io("making a private folder for qemu-nbd's socket", e))?;
        let socket: PathBuf = dir.path().join("s");
        let mut args: Vec<std::ffi::OsString> = [
            "--read-only",
            "--shared=2",
            "--export-name=holdfast",
            "--cache=none",
        ]
        .iter()
        .map(Into::into)
        .collect();
        args.push(format!("--format={format}").into());
        args.push(format!("--socket={}", socket.display()).into());
        if let Some(b) = bitmap {
            args.push(format!("--bitmap={b}").into());
        }
        args.push(image.into());
        let (mut child, tie) = spawn_tied(args)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| Error::io("waiting for qemu-nbd", e))?
            {
                let mut msg = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut msg);
                }
                let msg = msg.trim().to_string();
                if msg.contains("lock") {
                    return Err(Error::conflict(format!(
                        "{} is in use by another process (a running VM?), so holdfast cannot \
                         read it: {msg}; stop the writer, or snapshot it through its own QEMU",
                        image.display()
                    )));
                }
                return Err(Error::unavailable_msg(format!(
                    "qemu-nbd could not serve {} ({status}): {msg}",
                    image.display()
                )));
            }
            // No probe connection: without --persistent, qemu-nbd serves exactly one client
            // and exits when it leaves (or when holdfast dies), so nothing is left behind.
            if socket.exists() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::unavailable_msg(format!(
                    "qemu-nbd did not start serving {} within 30 s",
                    image.display()
                )));
            }
            // qemu-nbd is ready a few milliseconds after it starts: a coarser poll was most
            // of the time an incremental snapshot with few changes spent waiting for it.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Served {
            child,
            _tie: tie,
            _dir: dir,
            uri: NbdUri {
                addr: NbdAddr::Unix { socket },
                export: "holdfast".into(),
                tls: None,
            },
        })
    }

    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// Connects to the served image (the socket may exist a moment before it listens).
    pub fn connect(&mut self, contexts: &[&str]) -> Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(&self.uri, contexts) {
                Ok(c) => return Ok(c),
                Err(e @ Error::Unavailable { .. })
                    if Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) =>
                {
                    tracing::trace!("qemu-nbd not ready yet: {e}");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Removes socket folders that a killed holdfast left behind (a qemu-nbd dies with holdfast,
/// its folder does not): those older than a day. A folder is only needed until its server has
/// its clients, so removing an old one cannot disturb a snapshot still running.
fn remove_stale_folders() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("holdfast-nbd.") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(86_400));
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
