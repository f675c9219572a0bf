//! The Debian package: built by `host/packaging/build-deb.sh` from the test binary, installed
//! on this machine with `dpkg -i` (as root), checked (files, user, state directory, man pages,
//! completions, the unit, the daemon on the shipped configuration), then purged, leaving
//! nothing. Skipped, saying why, where it cannot run (not root, no dpkg, or holdfast already
//! installed here).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast_tests::holdfast_bin;

fn sh(cmd: &str) -> (i32, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn ok(cmd: &str) -> String {
    let (code, text) = sh(cmd);
    assert_eq!(code, 0, "`{cmd}` failed:\n{text}");
    text
}

fn skip(why: &str) {
    holdfast_tests::skipped(
        "package::the_debian_package_installs_runs_and_purges_cleanly",
        why,
    );
}

/// Purges the package however the test ends, so a failure leaves the machine as it was.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = sh("dpkg --purge holdfast >/dev/null 2>&1");
    }
}

#[test]
fn the_debian_package_installs_runs_and_purges_cleanly() {
    if !ok("id -u").trim().eq("0") {
        return skip("it installs a package, which needs root");
    }
    for tool in ["dpkg", "dpkg-deb", "strip", "objdump", "man", "runuser"] {
        if sh(&format!("command -v {tool}")).0 != 0 {
            return skip(&format!("{tool} is missing (./test.sh installs it)"));
        }
    }
    // Purging deletes /var/lib/holdfast and /etc/holdfast: never where someone may use them.
    if sh("dpkg -s holdfast >/dev/null 2>&1").0 == 0
        || sh("getent passwd holdfast >/dev/null || getent group holdfast >/dev/null").0 == 0
        || ["/usr/bin/holdfast", "/var/lib/holdfast", "/etc/holdfast"]
            .iter()
            .any(|p| Path::new(p).exists())
    {
        return skip(
            "holdfast (its package, user, state or configuration) is already on this machine; \
             the test leaves it alone",
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().expect("tempdir");
    let deb = ok(&format!(
        "{}/host/packaging/build-deb.sh --binary {} --out {}",
        root.display(),
        holdfast_bin().display(),
        out.path().display()
    ));
    let deb = deb.trim().lines().last().expect("the package's path");
    let info = ok(&format!("dpkg-deb --info {deb}"));
    assert!(info.contains("Package: holdfast"), "{info}");
    assert!(info.contains("Depends: libc6 (>= 2."), "{info}");
    let listing = ok(&format!("dpkg-deb --contents {deb}"));
    for f in [
        "./usr/bin/holdfast",
        "./etc/holdfast/node.toml",
        "./lib/systemd/system/holdfast.service",
        "./lib/systemd/system/holdfast@.service",
        "./usr/share/man/man1/holdfast.1.gz",
        "./usr/share/man/man1/holdfast-snapshot-create.1.gz",
        "./usr/share/bash-completion/completions/holdfast",
        "./usr/share/zsh/vendor-completions/_holdfast",
        "./usr/share/fish/vendor_completions.d/holdfast.fish",
    ] {
        assert!(listing.contains(f), "{f} is not in the package:\n{listing}");
    }
    assert!(
        !listing.contains("holdfast-manpages"),
        "the hidden packaging command has no page"
    );

    let _purge = Purge;
    ok(&format!("dpkg -i {deb}"));
    // The binary, its user and its state directory.
    let version = ok("/usr/bin/holdfast --version");
    assert!(version.starts_with("holdfast "), "{version}");
    let user = ok("getent passwd holdfast");
    assert!(
        user.contains(":/var/lib/holdfast:/usr/sbin/nologin"),
        "{user}"
    );
    assert!(
        ok("id -nG holdfast")
            .split_whitespace()
            .any(|g| g == "disk")
    );
    assert_eq!(
        ok("stat -c '%U:%G %a' /var/lib/holdfast /etc/holdfast/node.toml"),
        "holdfast:holdfast 700\nroot:holdfast 640\n"
    );
    assert!(
        Path::new("/var/lib/holdfast/node.json").exists(),
        "initialised"
    );
    assert!(
        ok("dpkg-query -W -f='${Conffiles}' holdfast").contains("/etc/holdfast/node.toml"),
        "node.toml is a conffile"
    );
    // The manual, from the installed pages.
    let page = ok("MANPAGER=cat MANWIDTH=100 man holdfast-snapshot 2>&1");
    assert!(page.contains("holdfast-snapshot"), "{page}");
    assert!(page.contains("create"), "{page}");
    // Completions: bash loads them and completes subcommands.
    let completion =
        ok("bash -c '. /usr/share/bash-completion/completions/holdfast && complete -p holdfast'");
    assert!(completion.contains("holdfast"), "{completion}");
    // The units, where systemd's tools are.
    if sh("command -v systemd-analyze").0 == 0 {
        for unit in ["holdfast.service", "holdfast@.service"] {
            let path = format!("/lib/systemd/system/{unit}");
            let (code, text) = sh(&format!("systemd-analyze verify {path} 2>&1"));
            let problems: Vec<&str> = text
                .lines()
                // Not about the unit: this machine may not run systemd.
                .filter(|l| !l.contains("Failed to") && !l.trim().is_empty())
                .collect();
            assert!(code == 0 && problems.is_empty(), "{unit}:\n{text}");
        }
        let security =
            ok("systemd-analyze security --offline=yes /lib/systemd/system/holdfast.service 2>&1");
        assert!(security.contains("Overall exposure level"), "{security}");
    } else {
        skip("systemd-analyze is missing: the units were not verified");
    }

    // The daemon runs as its user on the shipped configuration (loopback, no schedule).
    if std::net::TcpListener::bind("127.0.0.1:7400").is_ok() {
        use std::os::unix::process::CommandExt;
        let id = |what: &str| -> u32 {
            ok(&format!("id {what} holdfast"))
                .trim()
                .parse()
                .expect("an id")
        };
        // As the service's user, directly (so that the signal reaches the daemon itself).
        let mut daemon = Command::new("/usr/bin/holdfast");
        daemon
            .args(["daemon", "--config", "/etc/holdfast/node.toml"])
            .uid(id("-u"))
            .gid(id("-g"));
        let mut daemon = daemon
            .env_remove("HOLDFAST_STATE")
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the daemon");
        let t0 = Instant::now();
        let status = loop {
            let (code, text) =
                sh("runuser -u holdfast -- /usr/bin/holdfast --state /var/lib/holdfast status");
            if code == 0 {
                break text;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the packaged daemon did not answer: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.contains("configuration /etc/holdfast/node.toml"),
            "{status}"
        );
        ok(&format!("kill -TERM {}", daemon.id()));
        let st = daemon.wait().expect("wait");
        assert!(st.success(), "{st}");
    } else {
        skip("127.0.0.1:7400 is in use: the packaged daemon was not started");
    }

    // Removal keeps the state and the configuration; purge takes everything.
    ok("dpkg --remove holdfast");
    assert!(!Path::new("/usr/bin/holdfast").exists());
    assert!(
        Path::new("/var/lib/holdfast/node.json").exists(),
        "kept on removal"
    );
    assert!(
        Path::new("/etc/holdfast/node.toml").exists(),
        "kept on removal"
    );
    ok("dpkg --purge holdfast");
    for p in [
        "/var/lib/holdfast",
        "/etc/holdfast",
        "/lib/systemd/system/holdfast.service",
        "/usr/share/man/man1/holdfast.1.gz",
        "/usr/share/bash-completion/completions/holdfast",
    ] {
        assert!(!Path::new(p).exists(), "{p} is left after purge");
    }
    assert_ne!(sh("getent passwd holdfast").0, 0, "the user is left");
    assert_ne!(sh("getent group holdfast").0, 0, "the group is left");
}
