//! A running QEMU for the tests: qemu-storage-daemon serving a qcow2 image writable over NBD
//! (the guest's writes come through it) with a QMP monitor for holdfast, a small NBD writer
//! that stands in for the guest, and QMP queries to see what holdfast left in QEMU.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// qemu-storage-daemon with the image as block node `disk0`, exported writable as `disk0` on
/// `nbd_socket`, and a QMP monitor on `qmp_socket`.
pub struct StorageDaemon {
    child: Child,
    image: PathBuf,
    pub qmp_socket: PathBuf,
    pub nbd_socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl StorageDaemon {
    pub fn start(image: &Path) -> StorageDaemon {
        let dir = tempfile::tempdir().unwrap();
        let qmp_socket = dir.path().join("qmp.sock");
        let nbd_socket = dir.path().join("nbd.sock");
        StorageDaemon {
            child: spawn(image, &qmp_socket, &nbd_socket),
            image: image.to_path_buf(),
            qmp_socket,
            nbd_socket,
            _dir: dir,
        }
    }

    /// Stops it as an orderly shutdown does (SIGTERM: persistent bitmaps are written to the
    /// image) and starts it again on the same sockets, as a restarted VM host would.
    pub fn restart(mut self) -> StorageDaemon {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not quit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&self.qmp_socket);
        let _ = std::fs::remove_file(&self.nbd_socket);
        self.child = spawn(&self.image, &self.qmp_socket, &self.nbd_socket);
        self
    }

    /// The NBD server's address, as `volume add --nbd-server` takes it.
    pub fn nbd_server(&self) -> String {
        format!("nbd+unix:///?socket={}", self.nbd_socket.display())
    }

    /// Runs one QMP command on a fresh connection (holdfast must not be connected).
    pub fn qmp(&self, cmd: &str, args: Value) -> Value {
        let s = UnixStream::connect(&self.qmp_socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut read = || loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        };
        read();
        writeln!(w, "{}", json!({"execute": "qmp_capabilities"})).unwrap();
        read();
        writeln!(w, "{}", json!({"execute": cmd, "arguments": args})).unwrap();
        let v = read();
        v.get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{cmd}: {v}"))
    }

    /// What holdfast may have added: export ids, job ids, node names, bitmaps of `disk0`.
    pub fn leftovers(&self) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
        let names = |v: Value, key: &str| -> Vec<String> {
            v.as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|x| x[key].as_str().map(str::to_string))
                .collect()
        };
        let exports = names(self.qmp("query-block-exports", json!({})), "id");
        let jobs = names(self.qmp("query-block-jobs", json!({})), "device");
        let nodes_v = self.qmp("query-named-block-nodes", json!({"flat": true}));
        let nodes = names(nodes_v.clone(), "node-name")
            .into_iter()
            .filter(|n| !n.starts_with('#'))
            .collect();
        let bitmaps = nodes_v
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "disk0")
            .map(|n| names(n["dirty-bitmaps"].clone(), "name"))
            .unwrap_or_default();
        (exports, jobs, nodes, bitmaps)
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal NBD client that writes (the guest, in the tests).
pub struct NbdWriter {
    s: UnixStream,
    cookie: u64,
}

impl NbdWriter {
    pub fn connect(socket: &Path, export: &str) -> NbdWriter {
        let mut s = UnixStream::connect(socket).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0; len as usize];
            s.read_exact(&mut d).unwrap();
            match kind {
                1 => break,
                3 => {}
                k => panic!("NBD_OPT_GO refused: {k:#x}"),
            }
        }
        NbdWriter { s, cookie: 0 }
    }

    /// Writes `data` at `offset` and waits until the server acknowledges it.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.cookie += 1;
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).unwrap();
        assert_eq!(
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            0,
            "write failed"
        );
        assert_eq!(
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
            self.cookie
        );
    }
}

/// Starts qemu-storage-daemon on `image` with its monitor and NBD server on these sockets, and
/// waits until both listen.
fn spawn(image: &Path, qmp_socket: &Path, nbd_socket: &Path) -> Child {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd_socket.display()))
        .args([
            "--export",
            "type=nbd,id=guest,node-name=disk0,name=disk0,writable=on",
        ])
        .arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qmp0",
            qmp_socket.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (Debian package qemu-utils)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(qmp_socket.exists() && nbd_socket.exists()) {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
