//! Multi-node tests: real `holdfast daemon` processes on 127.0.0.1, TLS with one
//! self-signed certificate, a token per node.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Run, TestNode, holdfast_bin};

/// A free TCP port on 127.0.0.1 (bound, read and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// One node of a cascade: a state directory, a port, its token, perhaps a running daemon.
pub struct Peer {
    pub name: String,
    pub node: TestNode,
    pub port: u16,
    /// The token this node presents to its upstream.
    pub token: String,
    pub config: PathBuf,
    child: Option<Child>,
}

/// The shared certificate of a test cluster (every daemon listens on 127.0.0.1).
pub struct Tls {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    pub fn new() -> Tls {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("node.crt"), dir.path().join("node.key"));
        let out = Command::new(holdfast_bin())
            .args(["tls", "self-signed", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .output()
            .expect("run holdfast tls");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tls { dir, cert, key }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Self::new()
    }
}

/// What a node's configuration says, beyond its listener.
#[derive(Default)]
pub struct Relations<'a> {
    /// (upstream, volume): pull this volume from that peer.
    pub upstream: Option<(&'a Peer, &'a str)>,
    /// (downstream, volumes, extra TOML lines for its [[downstream]] table).
    pub downstreams: Vec<(&'a Peer, Vec<&'a str>, &'a str)>,
    /// `every` for the mirror job (default one hour: tests run `mirror run` themselves).
    pub mirror_every: Option<&'a str>,
    /// Extra top-level TOML (schedules, retention).
    pub extra: &'a str,
    /// Extra lines for the [listen] table.
    pub listen_extra: &'a str,
    /// Extra lines for the [[mirror]] table (`region = "NAME"`).
    pub mirror_extra: &'a str,
}

impl Peer {
    /// A new initialised node named `name`.
    pub fn new(name: &str) -> Peer {
        let node = TestNode::uninitialised();
        node.ok(&["init", "--node-id", name]);
        let config = node.path("node.toml");
        Peer {
            name: name.into(),
            node,
            port: free_port(),
            token: format!("token-of-{name}-{:016x}", rand::random::<u64>()),
            config,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Writes this node's configuration.
    pub fn configure(&self, tls: &Tls, r: Relations<'_>) {
        let mut t = format!(
            "state = {:?}\n{}\n[listen]\naddress = \"127.0.0.1:{}\"\ntls_cert = {:?}\ntls_key = {:?}\n{}\n",
            self.node.state, r.extra, self.port, tls.cert, tls.key, r.listen_extra
        );
        if let Some((up, vol)) = r.upstream {
            t.push_str(&format!(
                "\n[[upstream]]\nname = {:?}\nurl = {:?}\ntoken = {:?}\nca = {:?}\n\n[[mirror]]\nvolume = {vol:?}\nupstream = {:?}\nevery = {:?}\n{}\n",
                up.name,
                up.url(),
                self.token,
                tls.cert,
                up.name,
                r.mirror_every.unwrap_or("1h"),
                r.mirror_extra
            ));
        }
        for (d, vols, extra) in r.downstreams {
            t.push_str(&format!(
                "\n[[downstream]]\nname = {:?}\ntoken = {:?}\nvolumes = {vols:?}\n{extra}\n",
                d.name, d.token
            ));
        }
        std::fs::write(&self.config, t).expect("write node.toml");
        // It holds tokens: private, as holdfast asks of a configuration with tokens in it.
        std::fs::set_permissions(
            &self.config,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod node.toml");
    }

    /// The simplest relation: this node serves `volume` to `b`, which pulls it from here
    /// (`mirror_extra`: more lines for `b`'s [[mirror]], `region = "NAME"` say).
    pub fn serve_to(&self, tls: &Tls, b: &Peer, volume: &str, mirror_extra: &str) {
        self.configure(
            tls,
            Relations {
                downstreams: vec![(b, vec![volume], "")],
                ..Default::default()
            },
        );
        b.configure(
            tls,
            Relations {
                upstream: Some((self, volume)),
                mirror_extra,
                ..Default::default()
            },
        );
    }

    /// Starts the daemon and waits until it answers `status`.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// [`Peer::start`] with more environment (`HOLDFAST_FAILPOINT`, say).
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = std::fs::File::create(self.node.path("daemon.log")).expect("log file");
        let child = self
            .node
            .cmd(&["-v", "daemon", "--config"])
            .arg(&self.config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if self.node.run(&["status", "--json"]).code == 0 {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("daemon {} exited with {st}:\n{}", self.name, self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "daemon {} did not come up:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's resident memory now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        let pid = self.pid().expect("daemon running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// The daemon's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let pid = self.pid().expect("daemon running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.node.path("daemon.log")).unwrap_or_default()
    }

    /// Stops the daemon (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// Sends the daemon a signal (`HUP`, `TERM`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().expect("daemon running");
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {pid} ({}) failed", self.name);
    }

    /// Waits up to `timeout` for the daemon to exit: how it exited, or None while it runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut()?.try_wait().expect("try_wait") {
                self.child = None;
                return Some(st);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `mirror run VOLUME --json`, which must succeed.
    pub fn mirror(&self, volume: &str) -> Value {
        let r = self.mirror_run(volume);
        assert_eq!(
            r.code, 0,
            "{}: mirror run {volume} failed:\n{}",
            self.name, r.stderr
        );
        r.json()
    }

    pub fn mirror_run(&self, volume: &str) -> Run {
        let c = self.config.to_str().expect("utf-8 path");
        self.node
            .run(&["mirror", "run", volume, "--config", c, "--json"])
    }

    /// `status --json` of the running daemon.
    pub fn status(&self) -> Value {
        self.node.run(&["status", "--json"]).json()
    }

    /// The lock sets on this node as `lock list --json` shows them.
    pub fn locks(&self) -> Vec<Value> {
        match self.node.run(&["lock", "list", "--json"]).json() {
            Value::Array(a) => a,
            other => panic!("lock list: {other}"),
        }
    }

    /// Ids of the snapshots locked by `holder` on this node.
    pub fn locked_by(&self, holder: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .locks()
            .iter()
            .filter(|l| l["holder"] == holder)
            .map(|l| l["snapshot"].as_str().expect("snapshot id").to_string())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Snapshot ids of a volume, oldest first (empty if the volume is not here).
    pub fn ids(&self, volume: &str) -> Vec<String> {
        let r = self.node.run(&["snapshot", "list", volume, "--json"]);
        if r.code != 0 {
            return vec![];
        }
        r.json()
            .as_array()
            .expect("list")
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// A peer's request to this node's daemon (as [`Peer::http`] makes it, with the peer's
    /// name and token): returns (status, body).
    pub fn request(
        &self,
        tls: &Tls,
        method: &str,
        path: &str,
        peer: &str,
        token: &str,
        body: &str,
    ) -> (u16, String) {
        let bearer = format!("Bearer {token}");
        let a = self.http(
            tls,
            method,
            path,
            &[
                ("Authorization", &bearer),
                ("X-Holdfast-Peer", peer),
                ("Content-Type", "application/json"),
            ],
            body,
        );
        (a.status, a.body)
    }
}

/// Configures a chain of nodes over `volume`: each pulls it from the one before it and serves
/// it to the one after (A -> B -> C for three).
pub fn chain(tls: &Tls, nodes: &[&Peer], volume: &str) {
    for (i, n) in nodes.iter().enumerate() {
        n.configure(
            tls,
            Relations {
                upstream: i.checked_sub(1).map(|u| (nodes[u], volume)),
                downstreams: nodes
                    .get(i + 1)
                    .map(|d| vec![(*d, vec![volume], "")])
                    .unwrap_or_default(),
                ..Default::default()
            },
        );
    }
}

/// An answer of [`Peer::http`].
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

impl Peer {
    /// The admin token of the running daemon (from its `daemon.json`).
    pub fn admin_token(&self) -> String {
        let f = std::fs::read_to_string(self.node.state.join("daemon.json")).expect("daemon.json");
        let v: Value = serde_json::from_str(&f).expect("daemon.json is JSON");
        v["admin-token"].as_str().expect("admin-token").to_string()
    }

    /// An HTTPS request to this node's daemon with exactly `headers` (redirects are not
    /// followed), made with Python's standard library (present on every machine of this
    /// kind); the body goes through stdin (it can be larger than an argument may be).
    pub fn http(
        &self,
        tls: &Tls,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let script = r#"
import json, ssl, sys, urllib.request, urllib.error
url, method, headers, cafile = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
body = sys.stdin.read()
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None
ctx = ssl.create_default_context(cafile=cafile)
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
req = urllib.request.Request(url, method=method, data=body.encode() if body else None, headers=dict(headers))
try:
    r = opener.open(req, timeout=30)
except urllib.error.HTTPError as e:
    r = e
print(json.dumps({"status": r.status if hasattr(r, "status") else r.code,
    "headers": [[k.lower(), v] for k, v in r.headers.items()],
    "body": r.read().decode(errors="replace")}))
"#;
        let hs: Vec<(&str, &str)> = headers.to_vec();
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(format!("{}{path}", self.url()))
            .arg(method)
            .arg(serde_json::to_string(&hs).expect("headers"))
            .arg(&tls.cert)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(body.as_bytes())?;
                c.wait_with_output()
            })
            .expect("python3");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "request {method} {path} failed ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        Answer {
            status: v["status"].as_u64().expect("status") as u16,
            headers: v["headers"]
                .as_array()
                .expect("headers")
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap_or("").to_string(),
                        h[1].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect(),
            body: v["body"].as_str().unwrap_or("").to_string(),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}
