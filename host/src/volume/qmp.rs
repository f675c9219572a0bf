//! Point-in-time snapshots of a disk that a running QEMU (or qemu-storage-daemon) is writing,
//! through its QMP monitor: the pull-mode backup that libvirt uses.
//!
//! One QMP `transaction` freezes the view: it starts the bitmap that will record writes for
//! the next snapshot, copies the previous bitmap into a frozen (disabled) one for this
//! snapshot's changed-block read, and starts a copy-before-write job (`blockdev-backup
//! sync=none`) into a temporary qcow2 overlay (the fleece) whose backing is the disk. From then
//! on the fleece reads as the disk did at that instant, while the guest keeps writing. The
//! fleece is exported over NBD, read, and torn down (export, job, node, scratch file, frozen
//! bitmap); the previous bitmap is removed only after the snapshot commits.
//!
//! Everything holdfast adds to QEMU has a name derived from the volume, so a holdfast that was
//! killed half-way leaves nothing the next snapshot cannot find and remove first. The writer
//! never stops: nothing here pauses the guest.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::nbd::{NbdAddr, NbdUri};
use super::qemu::Bitmap;
use crate::error::{Error, Result};

/// How long QEMU may take to answer one command.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The largest QMP message accepted (a block node listing of a big VM is a few hundred KiB).
const MAX_LINE: usize = 16 << 20;

/// A QMP connection.
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Qmp({})", self.socket.display())
    }
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode.
    pub fn connect(socket: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(socket).map_err(|e| {
            Error::unavailable_msg(format!(
                "cannot reach the QMP monitor at {}: {e}; is QEMU running, and is this a \
                     monitor of its own for holdfast (-qmp unix:PATH,server=on,wait=off)?",
                socket.display()
            ))
        })?;
        let lost = |e: std::io::Error| Error::io(format!("QMP monitor {}", socket.display()), e);
        s.set_read_timeout(Some(TIMEOUT)).map_err(lost)?;
        s.set_write_timeout(Some(TIMEOUT)).map_err(lost)?;
        let writer = s.try_clone().map_err(lost)?;
        let mut q = Qmp {
            socket: socket.to_path_buf(),
            reader: BufReader::new(s),
            writer,
            next_id: 0,
        };
        let greeting = q.message()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::unavailable_msg(format!(
                "{} is not a QMP monitor",
                socket.display()
            )));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn message(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let n = Read::by_ref(&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| {
                Error::unavailable_msg(format!(
                    "the QMP monitor at {} did not answer: {e}",
                    self.socket.display()
                ))
            })?;
        if n == 0 || !line.ends_with(b"\n") {
            return Err(Error::unavailable_msg(format!(
                "the QMP monitor at {} closed the connection (or sent a line over {} MiB)",
                self.socket.display(),
                MAX_LINE >> 20
            )));
        }
        serde_json::from_slice(&line).map_err(|e| {
            Error::unavailable_msg(format!(
                "the QMP monitor at {} sent {e}",
                self.socket.display()
            ))
        })
    }

    /// Runs a command and returns its `return` value; an `error` answer is an error naming
    /// the command and QEMU's description.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        self.next_id += 1;
        let id = format!("holdfast-{}", self.next_id);
        let mut msg = serde_json::to_vec(&json!({"execute": cmd, "arguments": args, "id": id}))
            .map_err(|e| Error::internal(e.to_string()))?;
        msg.push(b'\n');
        self.writer.write_all(&msg).map_err(|e| {
            Error::unavailable_msg(format!(
                "the QMP monitor at {} went away: {e}",
                self.socket.display()
            ))
        })?;
        loop {
            let m = self.message()?;
            if m.get("event").is_some() || m.get("id").and_then(Value::as_str) != Some(&id) {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            let desc = m["error"]["desc"].as_str().unwrap_or("no description");
            return Err(QmpRefused(format!(
                "QEMU (monitor {}) refused {cmd}: {desc}",
                self.socket.display()
            ))
            .into());
        }
    }
}

/// A command QEMU answered with an error.
#[derive(Debug)]
struct QmpRefused(String);

impl From<QmpRefused> for Error {
    fn from(e: QmpRefused) -> Self {
        Error::unavailable_msg(e.0)
    }
}

/// What QEMU says of the disk's block node.
#[derive(Debug)]
pub struct NodeInfo {
    pub size: u64,
    pub driver: String,
    pub bitmaps: Vec<Bitmap>,
}

/// Looks up the block node `node`.
pub fn node_info(q: &mut Qmp, node: &str) -> Result<NodeInfo> {
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    let list = nodes.as_array().cloned().unwrap_or_default();
    let Some(n) = list.iter().find(|n| n["node-name"] == node) else {
        let names: Vec<&str> = list
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .filter(|n| !n.starts_with('#'))
            .collect();
        return Err(Error::not_found(format!(
            "QEMU (monitor {}) has no block node named {node:?}; its named nodes: {}",
            q.socket.display(),
            names.join(", ")
        )));
    };
    // A protocol node under a format node (the `file` under a qcow2) holds the container:
    // its snapshot would be the qcow2 file, not the disk the guest sees.
    const PROTOCOL: &[&str] = &["file", "host_device", "host_cdrom"];
    if PROTOCOL.contains(&n["drv"].as_str().unwrap_or_default()) {
        let filename = &n["image"]["filename"];
        if let Some(above) = list.iter().find(|o| {
            o["node-name"] != node
                && o["image"]["filename"] == *filename
                && !PROTOCOL.contains(&o["drv"].as_str().unwrap_or_default())
        }) {
            return Err(Error::invalid(format!(
                "block node {node:?} is the {} under the {} node {}: its snapshot would hold \
                 the image file, not the disk the guest sees; give --node {}",
                n["drv"].as_str().unwrap_or_default(),
                above["drv"].as_str().unwrap_or_default(),
                above["node-name"],
                above["node-name"].as_str().unwrap_or_default()
            )));
        }
    }
    let size = n["image"]["virtual-size"].as_u64().ok_or_else(|| {
        Error::unavailable_msg(format!("QEMU did not say the size of block node {node:?}"))
    })?;
    let bitmaps = n["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let mut flags = Vec::new();
            if b["recording"].as_bool().unwrap_or(false) {
                flags.push("auto".to_string());
            }
            if b["inconsistent"].as_bool().unwrap_or(false) {
                flags.push("in-use".to_string());
            }
            Bitmap {
                name: b["name"].as_str().unwrap_or_default().to_string(),
                flags,
                granularity: b["granularity"].as_u64().unwrap_or(0),
            }
        })
        .collect();
    Ok(NodeInfo {
        size,
        driver: n["drv"].as_str().unwrap_or_default().to_string(),
        bitmaps,
    })
}

/// The names of what holdfast adds to QEMU for one volume.
#[derive(Clone, Debug)]
pub struct Names {
    /// Prefix of the persistent bitmaps that record writes between snapshots.
    pub bitmap_prefix: String,
    /// The frozen copy of the previous bitmap, read by this snapshot.
    pub frozen: String,
    /// Fleece node, backup job and NBD export.
    pub fleece: String,
}

impl Names {
    pub fn new(volume: &str) -> Names {
        Names {
            bitmap_prefix: format!("holdfast.{volume}."),
            frozen: format!("holdfast-frozen.{volume}"),
            fleece: format!("holdfast-fleece.{volume}"),
        }
    }
}

/// A frozen view of a running disk, exported over NBD; torn down when dropped.
pub struct Fleece {
    q: Qmp,
    node: String,
    names: Names,
    scratch: PathBuf,
    /// The NBD server holdfast started (stopped again at the end), if QEMU had none.
    started_server: bool,
    pub uri: NbdUri,
    /// Whether the export carries the frozen bitmap (a changed-block read).
    pub with_bitmap: bool,
}

impl std::fmt::Debug for Fleece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fleece({} of {:?})", self.names.fleece, self.node)
    }
}

/// Where the volume's QEMU is and what holdfast may use there.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    /// The QMP monitor's socket (names the NBD server holdfast may start for this QEMU).
    pub monitor: &'a Path,
    pub node: &'a str,
    /// The NBD server QEMU already runs, if any (holdfast adds its export there).
    pub nbd_server: Option<&'a NbdUri>,
    /// A folder QEMU can write the scratch overlay to, and holdfast can read.
    pub run_dir: &'a Path,
}

impl Fleece {
    /// Removes what an earlier, interrupted snapshot of this volume left in QEMU: its export,
    /// job, fleece node and frozen bitmap, and bitmaps with the volume's prefix that `keep`
    /// does not name.
    pub fn clean_up(q: &mut Qmp, t: &Target, names: &Names, keep: Option<&str>) -> Result<()> {
        remove_fleece(q, names, t.node)?;
        let info = node_info(q, t.node)?;
        for b in &info.bitmaps {
            if b.name.starts_with(&names.bitmap_prefix) && Some(b.name.as_str()) != keep {
                tracing::info!("removing the stale dirty bitmap {}", b.name);
                q.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": t.node, "name": b.name}),
                )?;
            }
        }
        Ok(())
    }

    /// Freezes the disk's view and exports it. `new_bitmap` starts recording at the freeze;
    /// `old_bitmap`, when given, is copied into the frozen bitmap that the export carries.
    pub fn start(
        q: Qmp,
        t: &Target,
        names: &Names,
        size: u64,
        persistent: bool,
        (new_bitmap, granularity): (&str, u32),
        old_bitmap: Option<&str>,
    ) -> Result<Fleece> {
        let scratch = t.run_dir.join(format!("{}.qcow2", names.fleece));
        let _ = std::fs::remove_file(&scratch);
        let out = std::process::Command::new("qemu-img")
            .env_remove("HOLDFAST_PASSPHRASE")
            .env_remove("HOLDFAST_NEW_PASSPHRASE")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&scratch)
            .arg(size.to_string())
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| Error::io("running qemu-img to make the fleece overlay", e))?;
        if !out.status.success() {
            return Err(Error::unavailable_msg(format!(
                "qemu-img could not make the fleece overlay {}: {}",
                scratch.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut f = Fleece {
            q,
            node: t.node.to_string(),
            names: names.clone(),
            scratch: scratch.clone(),
            started_server: false,
            uri: NbdUri {
                addr: NbdAddr::Unix {
                    socket: PathBuf::new(),
                },
                export: names.fleece.clone(),
                tls: None,
            },
            with_bitmap: old_bitmap.is_some(),
        };
        f.q.execute(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": names.fleece,
                "file": {"driver": "file", "filename": scratch},
                "backing": t.node,
            }),
        )?;
        let mut actions = vec![json!({"type": "block-dirty-bitmap-add", "data": {
            "node": t.node, "name": new_bitmap, "persistent": persistent,
            "granularity": granularity}})];
        if let Some(old) = old_bitmap {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": t.node, "name": names.frozen, "persistent": false, "disabled": true}}));
            actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                "node": t.node, "target": names.frozen, "bitmaps": [old]}}));
        }
        actions.push(json!({"type": "blockdev-backup", "data": {
            "device": t.node, "target": names.fleece, "sync": "none",
            "job-id": names.fleece}}));
        f.q.execute("transaction", json!({"actions": actions}))?;

        let socket = match t.nbd_server {
            // QEMU's own server, as given: its address and its TLS settings (an `nbds://`
            // server is read over TLS, never in plaintext).
            Some(uri) => {
                f.uri.tls = uri.tls.clone();
                uri.addr.clone()
            }
            None => {
                let socket = our_server(t.run_dir, t.monitor);
                if socket.as_os_str().len() > 100 {
                    return Err(Error::invalid(format!(
                        "the socket path {} is too long for a unix socket; use a shorter \
                         --state, or give the volume --nbd-server",
                        socket.display()
                    )));
                }
                match f.q.execute(
                    "nbd-server-start",
                    json!({"addr": {"type": "unix", "data": {"path": socket}}}),
                ) {
                    Ok(_) => f.started_server = true,
                    // Ours, left by a killed holdfast: it is on our socket, so use it.
                    Err(e) if UnixStream::connect(&socket).is_ok() => {
                        tracing::debug!("reusing the NBD server on {}: {e}", socket.display());
                        f.started_server = true;
                    }
                    Err(e) => {
                        return Err(Error::unavailable_msg(format!(
                            "{e}; if this QEMU already runs an NBD server, tell holdfast \
                                 where it listens: `volume add ... --nbd-server \
                                 nbd+unix:///?socket=PATH`"
                        )));
                    }
                }
                NbdAddr::Unix { socket }
            }
        };
        f.uri.addr = socket;
        let mut export = json!({
            "type": "nbd", "id": names.fleece, "node-name": names.fleece,
            "name": names.fleece, "writable": false,
        });
        if old_bitmap.is_some() {
            export["bitmaps"] = json!([names.frozen]);
        }
        f.q.execute("block-export-add", export)?;
        Ok(f)
    }

    /// The dirty bitmap's name in the export, when it carries one.
    pub fn bitmap(&self) -> Option<&str> {
        self.with_bitmap.then_some(self.names.frozen.as_str())
    }

    fn tear_down(&mut self) -> Result<()> {
        let r = remove_fleece(&mut self.q, &self.names, &self.node);
        if self.started_server {
            stop_server_if_unused(&mut self.q);
        }
        let _ = std::fs::remove_file(&self.scratch);
        r
    }
}

/// The socket of the NBD server holdfast starts in the QEMU behind `monitor` (one per QEMU,
/// shared by its volumes, so that one left by a killed holdfast is found again).
fn our_server(run_dir: &Path, monitor: &Path) -> PathBuf {
    run_dir.join(format!(
        "nbd-{}.sock",
        short_hash(&monitor.to_string_lossy())
    ))
}

/// Stops the NBD server holdfast started, unless a snapshot of another volume of the same
/// QEMU is reading through it.
fn stop_server_if_unused(q: &mut Qmp) {
    let others = q.execute("query-block-exports", json!({})).map(|e| {
        e.as_array().is_some_and(|a| {
            a.iter().any(|e| {
                e["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("holdfast-fleece."))
            })
        })
    });
    if let Ok(false) = others {
        let _ = q.execute("nbd-server-stop", json!({}));
    }
}

/// Removes everything holdfast keeps in QEMU for a volume that is being removed: a fleece an
/// interrupted snapshot left, every bitmap of the volume, and holdfast's NBD server if no
/// other volume uses it.
pub fn forget(monitor: &Path, node: &str, volume: &str, run_dir: &Path) -> Result<()> {
    let names = Names::new(volume);
    let mut q = Qmp::connect(monitor)?;
    remove_fleece(&mut q, &names, node)?;
    for b in node_info(&mut q, node)?.bitmaps {
        if b.name.starts_with(&names.bitmap_prefix) {
            q.execute(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": b.name}),
            )?;
        }
    }
    if UnixStream::connect(our_server(run_dir, monitor)).is_ok() {
        stop_server_if_unused(&mut q);
    }
    let _ = std::fs::remove_file(run_dir.join(format!("{}.qcow2", names.fleece)));
    Ok(())
}

/// Removes the export, the backup job, the fleece node and the frozen bitmap of one volume,
/// whichever exist (after a snapshot, or left by one that was killed).
fn remove_fleece(q: &mut Qmp, names: &Names, node: &str) -> Result<()> {
    let has_export = |q: &mut Qmp| -> Result<bool> {
        let e = q.execute("query-block-exports", json!({}))?;
        Ok(e.as_array()
            .is_some_and(|a| a.iter().any(|e| e["id"] == names.fleece.as_str())))
    };
    if has_export(q)? {
        q.execute(
            "block-export-del",
            json!({"id": names.fleece, "mode": "hard"}),
        )?;
        wait_until(q, "the export to go", |q| Ok(!has_export(q)?))?;
    }
    cancel_job(q, &names.fleece)?;
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    if nodes
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n["node-name"] == names.fleece.as_str()))
    {
        q.execute("blockdev-del", json!({"node-name": names.fleece}))?;
    }
    if node_info(q, node)?
        .bitmaps
        .iter()
        .any(|b| b.name == names.frozen)
    {
        q.execute(
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": names.frozen}),
        )?;
    }
    Ok(())
}

impl Drop for Fleece {
    fn drop(&mut self) {
        if let Err(e) = self.tear_down() {
            tracing::warn!(
                "could not remove the fleece of {:?} from QEMU: {e}; the next snapshot does",
                self.node
            );
        }
    }
}

fn cancel_job(q: &mut Qmp, job: &str) -> Result<()> {
    let jobs = q.execute("query-block-jobs", json!({}))?;
    let present = |v: &Value| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|j| j["device"] == job))
    };
    if present(&jobs) {
        q.execute("block-job-cancel", json!({"device": job, "force": true}))?;
        wait_until(q, "the backup job to end", |q| {
            Ok(!present(&q.execute("query-block-jobs", json!({}))?))
        })?;
    }
    Ok(())
}

fn wait_until(
    q: &mut Qmp,
    what: &str,
    mut done: impl FnMut(&mut Qmp) -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while !done(q)? {
        if Instant::now() > deadline {
            return Err(Error::unavailable_msg(format!(
                "QEMU did not finish waiting for {what} within {} s",
                TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn short_hash(s: &str) -> String {
    blake3::hash(s.as_bytes()).to_hex()[..16].to_string()
}

/// Removes a bitmap of the disk (after a snapshot committed, the one before it).
pub fn remove_bitmap(monitor: &Path, node: &str, name: &str) -> Result<()> {
    let mut q = Qmp::connect(monitor)?;
    q.execute(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": name}),
    )
    .map(drop)
}
