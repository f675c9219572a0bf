//! The daemon as a service: readiness and reload notifications to systemd, reloading the
//! configuration without dropping a transfer, refusing a broken one, and stopping gracefully
//! (running transfers finish within the grace period, or stop at a safe point and resume).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use holdfast_tests::cascade::{Peer, Relations, Tls};
use holdfast_tests::{KillOnDrop, TestNode, mixed_bytes, pack_files};
use serde_json::Value;

/// Messages sent to a NOTIFY_SOCKET, as systemd would receive them.
struct Notifications {
    sock: UnixDatagram,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Notifications {
    fn new() -> Notifications {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Notifications {
            sock,
            _dir: dir,
            path,
        }
    }

    /// The next message (fails the test after a minute of silence).
    fn next(&self) -> String {
        let mut buf = vec![0u8; 4096];
        let n = self
            .sock
            .recv(&mut buf)
            .expect("a notification within a minute");
        String::from_utf8_lossy(&buf[..n]).to_string()
    }
}

/// Random data (incompressible: what is stored is what is sent).
fn random_image(node: &TestNode, name: &str, len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let path = node.image(name, &data);
    node.add_volume(name, &path, "64KiB");
    data
}

fn mirror_table(upstream: &str, volume: &str, every: &str) -> String {
    format!("\n[[mirror]]\nvolume = {volume:?}\nupstream = {upstream:?}\nevery = {every:?}\n")
}

/// The job of `kind` for `volume` in `status --json`.
fn job<'a>(status: &'a Value, kind: &str, volume: &str) -> Option<&'a Value> {
    status["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["kind"] == kind && j["volume"] == volume)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_reload_adds_and_removes_relations_without_dropping_a_transfer() {
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let mut b = Peer::new("b");
    let v1 = random_image(&a.node, "v1", 8 << 20, 1);
    for v in ["v2", "v3"] {
        a.node
            .add_volume(v, &a.node.image(v, &mixed_bytes(1 << 20, 7)), "64KiB");
    }
    for v in ["v1", "v2", "v3"] {
        a.node.snapshot(v, "s1");
    }
    a.configure(
        &tls,
        Relations {
            downstreams: vec![(&b, vec!["v1", "v2", "v3"], "")],
            ..Default::default()
        },
    );
    // b mirrors v1 and v2, each every second.
    b.configure(
        &tls,
        Relations {
            upstream: Some((&a, "v1")),
            mirror_every: Some("1s"),
            ..Default::default()
        },
    );
    let first = std::fs::read_to_string(&b.config).expect("config");
    std::fs::write(
        &b.config,
        format!("{first}{}", mirror_table("a", "v2", "1s")),
    )
    .expect("write");
    let notify = Notifications::new();
    b.node.env.push((
        "NOTIFY_SOCKET".into(),
        notify.path.to_str().expect("utf-8").into(),
    ));

    // The upstream is paused: b's first updates start and cannot end, so they are running
    // when the configuration changes.
    a.start();
    a.signal("STOP");
    b.start();
    let ready = notify.next();
    assert!(ready.contains("READY=1"), "first notification: {ready}");
    wait_for("both updates running", Duration::from_secs(30), || {
        let s = b.status();
        ["v1", "v2"]
            .iter()
            .all(|v| job(&s, "mirror", v).is_some_and(|j| j["running"].as_bool() == Some(true)))
    });

    // Reload: v1's relation removed, v3's added, v2's unchanged.
    std::fs::write(
        &b.config,
        first.replace("volume = \"v1\"", "volume = \"v3\"") + &mirror_table("a", "v2", "1s"),
    )
    .expect("write");
    b.signal("HUP");
    let reloading = notify.next();
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let ready = notify.next();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("configuration reloaded"), "{ready}");
    let s = b.status();
    assert_eq!(s["config"]["reloads"], 1, "{s}");
    let removed = job(&s, "mirror", "v1").expect("v1's job shows until its run ends");
    assert_eq!(removed["stopping"], true, "{removed}");
    assert_eq!(removed["running"], true, "{removed}");
    assert!(job(&s, "mirror", "v3").is_some(), "v3's job was added: {s}");
    let v2_runs_before = job(&s, "mirror", "v2").expect("v2")["runs"]
        .as_u64()
        .unwrap_or(0);

    // The transfer that was running when its relation went completes, then its job ends.
    a.signal("CONT");
    wait_for("v1, v2 and v3 on b", Duration::from_secs(60), || {
        ["v1", "v2", "v3"].iter().all(|v| b.ids(v).len() == 1)
    });
    assert_eq!(
        b.node.restore("v1@s1"),
        v1,
        "the transfer in progress completed"
    );
    wait_for("v1's job to end", Duration::from_secs(30), || {
        job(&b.status(), "mirror", "v1").is_none()
    });

    // The removed relation runs no more; the unchanged and the added ones go on.
    for v in ["v1", "v2", "v3"] {
        a.node.snapshot(v, "s2");
    }
    wait_for("v2 and v3 at s2", Duration::from_secs(60), || {
        b.ids("v2").len() == 2 && b.ids("v3").len() == 2
    });
    wait_for("two more runs of v2", Duration::from_secs(30), || {
        job(&b.status(), "mirror", "v2")
            .and_then(|j| j["runs"].as_u64())
            .is_some_and(|r| r >= v2_runs_before + 3)
    });
    assert_eq!(
        b.ids("v1").len(),
        1,
        "v1's relation was removed: no update since"
    );

    // A broken configuration is refused; the daemon runs on with the one it had.
    std::fs::write(&b.config, format!("{first}\n[[mirror]]\nvolume = ")).expect("write");
    b.signal("HUP");
    assert!(notify.next().contains("RELOADING=1"));
    let refused = notify.next();
    assert!(refused.contains("READY=1"), "{refused}");
    assert!(refused.contains("reload refused"), "{refused}");
    let s = b.status();
    assert_eq!(s["config"]["reloads"], 1, "{s}");
    assert!(
        s["config"]["last-refused"]
            .as_str()
            .is_some_and(|e| e.contains("node.toml")),
        "the refusal names the file: {s}"
    );
    assert!(job(&s, "mirror", "v2").is_some() && job(&s, "mirror", "v3").is_some());
    assert!(job(&s, "mirror", "v1").is_none());
    let text = b.node.ok(&["status"]);
    assert!(text.contains("REFUSED"), "{text}");
    // So is one that names a volume that is neither here nor mirrored.
    std::fs::write(
        &b.config,
        format!("{first}\n[[retention]]\nvolume = \"nope\"\nkeep_last = 1\nevery = \"1h\"\n"),
    )
    .expect("write");
    b.signal("HUP");
    assert!(notify.next().contains("RELOADING=1"));
    assert!(notify.next().contains("reload refused"));
    let s = b.status();
    assert!(
        s["config"]["last-refused"]
            .as_str()
            .is_some_and(|e| e.contains("volume nope")),
        "{s}"
    );
    assert_eq!(s["config"]["reloads"], 1, "{s}");
    assert!(
        b.log().contains("configuration reload refused"),
        "{}",
        b.log()
    );

    b.signal("TERM");
    assert!(notify.next().contains("STOPPING=1"));
    let st = b.wait_exit(Duration::from_secs(90)).expect("b exits");
    assert!(st.success(), "{st}\n{}", b.log());
}

/// A node `b` pulling a 96 MiB volume of random data from `a`, with `[daemon]` settings;
/// returns the volume's data once `b` has stored part of it, with the update still running.
fn mid_baseline(a: &mut Peer, b: &mut Peer, tls: &Tls, grace: &str) -> Vec<u8> {
    let data = random_image(&a.node, "big", 96 << 20, 2);
    a.node.snapshot("big", "s1");
    a.configure(
        tls,
        Relations {
            downstreams: vec![(b, vec!["big"], "")],
            ..Default::default()
        },
    );
    let extra = format!("[daemon]\nshutdown_grace = {grace:?}\n");
    b.configure(
        tls,
        Relations {
            upstream: Some((a, "big")),
            extra: &extra,
            ..Default::default()
        },
    );
    a.start();
    b.start();
    wait_for("b to store a first pack", Duration::from_secs(120), || {
        !pack_files(&b.node.state).is_empty()
    });
    data
}

#[test]
fn a_daemon_stopped_mid_baseline_exits_within_its_grace_and_resumes_at_the_next_start() {
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let mut b = Peer::new("b");
    let data = mid_baseline(&mut a, &mut b, &tls, "1s");
    // The upstream stops answering, so the transfer cannot end within the grace period.
    a.signal("STOP");
    assert!(
        b.ids("big").is_empty(),
        "the transfer ended before the test could stop it; make the volume bigger"
    );
    let t0 = Instant::now();
    b.signal("TERM");
    let st = b.wait_exit(Duration::from_secs(60)).expect("b exits");
    let took = t0.elapsed();
    assert!(st.success(), "{st}\n{}", b.log());
    assert!(
        took < Duration::from_secs(6),
        "b took {took:?} to stop with a 1s grace period\n{}",
        b.log()
    );
    let log = b.log();
    assert!(
        log.contains("interrupted"),
        "the exit names what it cut:\n{log}"
    );
    assert!(log.contains("mirror big <- a"), "{log}");
    // Nothing half done: no snapshot, and what was stored is whole.
    assert!(b.ids("big").is_empty());
    b.node.ok(&["verify"]);
    let stored = pack_files(&b.node.state).len();
    assert!(stored >= 1, "b kept what it had fetched");

    // The next start resumes: what was stored is not fetched again.
    a.signal("CONT");
    b.start();
    wait_for("the baseline on b", Duration::from_secs(120), || {
        b.ids("big").len() == 1
    });
    let fetched = job(&b.status(), "mirror", "big").expect("job")["last-transfer"]["bytes-fetched"]
        .as_u64()
        .expect("bytes-fetched");
    assert!(
        fetched <= (96 << 20) - (15 << 20),
        "the resumed baseline fetched {fetched} bytes of 96 MiB, though {stored} pack(s) were \
         stored before the stop"
    );
    assert_eq!(b.node.restore("big@s1"), data);
    b.node.ok(&["verify"]);
}

#[test]
fn a_daemon_stopped_mid_transfer_lets_it_finish_within_its_grace() {
    let tls = Tls::new();
    let mut a = Peer::new("a");
    let mut b = Peer::new("b");
    let data = mid_baseline(&mut a, &mut b, &tls, "5m");
    b.signal("TERM");
    let st = b.wait_exit(Duration::from_secs(240)).expect("b exits");
    assert!(st.success(), "{st}\n{}", b.log());
    assert!(
        b.log().contains("every running job finished"),
        "{}",
        b.log()
    );
    assert_eq!(
        b.ids("big").len(),
        1,
        "the transfer finished before the exit"
    );
    assert_eq!(b.node.restore("big@s1"), data);
}

/// Under systemd (stderr is the journal stream systemd named in `JOURNAL_STREAM`), the daemon
/// logs to the journal with structured fields; elsewhere it logs text on stderr. The journal
/// here is a socket the test binds where journald's would be, so the test runs only as root on
/// a machine without a running journald.
#[test]
fn under_systemd_the_daemon_logs_to_the_journal_with_fields() {
    let socket = std::path::Path::new("/run/systemd/journal/socket");
    let made_run_systemd = !std::path::Path::new("/run/systemd").exists();
    if socket.exists() || std::fs::create_dir_all("/run/systemd/journal").is_err() {
        holdfast_tests::skipped(
            "service::under_systemd_the_daemon_logs_to_the_journal_with_fields",
            "a journald runs here, or /run is not writable",
        );
        return;
    }
    /// Removes the socket, and the folders if the test made them.
    struct Unbind<'a>(&'a std::path::Path, bool);
    impl Drop for Unbind<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
            if self.1 {
                let _ = std::fs::remove_dir_all("/run/systemd");
            }
        }
    }
    let _unbind = Unbind(socket, made_run_systemd);
    let journal = UnixDatagram::bind(socket).expect("bind");
    journal
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let node = TestNode::new();
    let config = node.path("node.toml");
    std::fs::write(&config, format!("state = {:?}\n", node.state)).expect("config");
    let stderr_path = node.path("stderr.txt");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let st = std::os::unix::fs::MetadataExt::dev(&stderr.metadata().expect("stat"));
    let ino = std::os::unix::fs::MetadataExt::ino(&stderr.metadata().expect("stat"));
    let mut daemon = KillOnDrop(
        node.cmd(&["daemon", "--config", config.to_str().expect("utf-8")])
            .env("JOURNAL_STREAM", format!("{st}:{ino}"))
            .stderr(stderr)
            .spawn()
            .expect("daemon"),
    );
    let mut seen = Vec::new();
    let t0 = Instant::now();
    let mut buf = vec![0u8; 65536];
    while !String::from_utf8_lossy(&seen).contains("daemon started") {
        assert!(t0.elapsed() < Duration::from_secs(60), "no journal entry");
        if let Ok(n) = journal.recv(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let _ = std::process::Command::new("kill")
        .arg(daemon.0.id().to_string())
        .status();
    assert!(daemon.0.wait().expect("wait").success());
    let entries = String::from_utf8_lossy(&seen).to_string();
    for field in [
        "SYSLOG_IDENTIFIER",
        "HOLDFAST_NODE",
        "PRIORITY",
        "CODE_FILE",
    ] {
        assert!(entries.contains(field), "{field} missing: {entries:?}");
    }
    let text = std::fs::read_to_string(&stderr_path).expect("stderr");
    assert!(
        !text.contains("daemon started"),
        "the log went to the journal, not stderr: {text}"
    );

    // Without the journal stream, the same daemon logs text on stderr.
    let mut daemon = KillOnDrop(
        node.cmd(&["-v", "daemon", "--config", config.to_str().expect("utf-8")])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("daemon"),
    );
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        daemon.0.stderr.take().expect("stderr"),
    ));
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("daemon started"));
    let _ = std::process::Command::new("kill")
        .arg(daemon.0.id().to_string())
        .status();
    let _ = daemon.0.wait();
    assert!(started.is_some(), "no \"daemon started\" on stderr");
}

/// A job waiting for a lock another command holds (here a mirror-volume lock, as a `target
/// push` from the command line would) does not keep a stopping daemon alive.
#[test]
fn a_job_waiting_for_another_commands_lock_does_not_hold_up_the_stop() {
    let node = TestNode::new();
    let img = node.image("v1.img", &mixed_bytes(1 << 20, 3));
    node.add_volume("v1", &img, "64KiB");
    node.snapshot("v1", "s1");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}/bucket", dir.path().display());
    node.ok(&["target", "add", "bucket", "--url", &url]);
    let config = node.path("node.toml");
    std::fs::write(
        &config,
        format!(
            "state = {:?}\n[daemon]\nshutdown_grace = \"1s\"\n\n[[push]]\nvolume = \"v1\"\ntarget = \"bucket\"\nevery = \"1s\"\n",
            node.state
        ),
    )
    .expect("config");
    let lock = node.state.join("mirror.v1.lock");
    let _holder = KillOnDrop(
        // -o: the lock is flock's own, not its child's, so killing flock releases it.
        std::process::Command::new("flock")
            .arg("-o")
            .arg(&lock)
            // `cat` ends when the test's end of its stdin closes, whatever happens.
            .arg("cat")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("flock (util-linux)"),
    );
    wait_for("the lock to be held", Duration::from_secs(10), || {
        lock.exists()
            && std::process::Command::new("flock")
                .args(["-n"])
                .arg(&lock)
                .arg("true")
                .status()
                .is_ok_and(|s| !s.success())
    });
    let log = node.path("daemon.log");
    let mut daemon = KillOnDrop(
        node.cmd(&["-v", "daemon", "--config", config.to_str().expect("utf-8")])
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("daemon"),
    );
    let daemon = &mut daemon.0;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        "the push to wait for the lock",
        Duration::from_secs(60),
        || read_log().contains("waiting for it"),
    );
    let t0 = Instant::now();
    let _ = std::process::Command::new("kill")
        .arg(daemon.id().to_string())
        .status();
    let exited = loop {
        if let Some(st) = daemon.try_wait().expect("try_wait") {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = daemon.kill();
            let _ = daemon.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    let st = exited.unwrap_or_else(|| panic!("the daemon did not exit:\n{}", read_log()));
    assert!(st.success(), "{st}\n{}", read_log());
    assert!(
        took < Duration::from_secs(8),
        "stopping took {took:?} with a 1s grace period:\n{}",
        read_log()
    );
    assert!(read_log().contains("push v1 -> bucket"), "{}", read_log());
}
