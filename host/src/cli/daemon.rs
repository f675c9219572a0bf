//! `holdfast daemon`, `holdfast status`, `holdfast tls`, `holdfast token`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{Context, human_bytes, print_json, printable};
use crate::config::NodeConfig;
use crate::softlock::human_duration;

/// Where the node configuration comes from.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The node configuration (TOML): listener, peers, mirrors, schedules, retention.
    #[arg(long, env = "HOLDFAST_CONFIG")]
    pub config: PathBuf,
}

impl ConfigArg {
    /// The configuration and the node it names (its `state`, else `--state`).
    pub async fn open(&self, ctx: &Context) -> anyhow::Result<(NodeConfig, crate::state::Node)> {
        let cfg = NodeConfig::load(&self.config)?;
        let state = cfg
            .state
            .as_ref()
            .map_or_else(|| ctx.state.clone(), |s| cfg.resolve(s));
        let node = crate::state::Node::open(&state).await?;
        Ok((cfg, node))
    }
}

#[derive(Debug, Args)]
#[command(
    after_long_help = "SIGHUP (systemctl reload) re-reads the configuration. A file \
that does not parse or check is refused, the reason logged and shown by `holdfast status`; the \
daemon keeps the configuration it had. Unchanged jobs run on; a removed or changed job finishes \
its current run, then ends. [listen] and `state` need a restart.

SIGTERM or SIGINT (systemctl stop) stops the daemon: no new job starts; running ones get \
[daemon] shutdown_grace (default 1m) to finish, then stop at a safe point (a mirror update keeps \
what it fetched and commits nothing). A second signal cuts the grace short.

Under systemd (Type=notify) the daemon reports ready, reloading and stopping, and logs to the \
journal with fields HOLDFAST_*; elsewhere it logs text on stderr.

The packaged service reads /etc/holdfast/node.toml and keeps its state in /var/lib/holdfast, \
where daemon.json tells `holdfast status` how to reach the running daemon.

Example: systemctl reload holdfast && holdfast --state /var/lib/holdfast status"
)]
pub struct DaemonCommand {
    #[command(flatten)]
    pub config: ConfigArg,
}

impl DaemonCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        crate::target::keys::NO_PROMPT.store(true, std::sync::atomic::Ordering::Relaxed);
        let (cfg, node) = self.config.open(ctx).await?;
        crate::daemon::run(node, cfg).await?;
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct StatusCommand {
    #[arg(long)]
    pub json: bool,
}

fn ago(now: u64, t: Option<u64>) -> String {
    match t {
        Some(t) if t <= now => format!("{} ago", human_duration(now - t)),
        Some(t) => format!("in {}", human_duration(t - now)),
        None => "never".into(),
    }
}

impl StatusCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        let node = ctx.open().await?;
        let f = crate::daemon::read_daemon_file(&node)?;
        let client = crate::peer::client::PeerClient::admin(
            &f.url,
            &f.admin_token,
            f.ca.as_deref(),
            &f.node,
        )?;
        let s = client
            .status()
            .await
            .map_err(|e| crate::Error::Unavailable {
                message: format!(
                    "the daemon of {} (pid {}, {}) does not answer: {e}; is it still running?",
                    node.path.display(),
                    f.pid,
                    f.url
                ),
                source: None,
            })?;
        if self.json {
            return print_json(&s);
        }
        let now = s["now-unix-ms"].as_u64().unwrap_or(0);
        let u = |v: &serde_json::Value| v.as_u64();
        outln!(
            "node {} (holdfast {}, pid {}), up {}, listening on {}",
            s["node"].as_str().unwrap_or("?"),
            s["version"].as_str().unwrap_or("?"),
            s["pid"],
            human_duration(now.saturating_sub(u(&s["started-unix-ms"]).unwrap_or(now))),
            s["listen"].as_str().unwrap_or("-")
        );
        let c = &s["config"];
        if !c.is_null() {
            outln!(
                "configuration {}, loaded {}{}",
                c["path"].as_str().unwrap_or("?"),
                ago(now, u(&c["loaded-unix-ms"])),
                match u(&c["reloads"]) {
                    Some(n) if n > 0 => format!(" ({n} reload(s))"),
                    _ => String::new(),
                }
            );
            if let Some(why) = c["last-refused"].as_str() {
                outln!(
                    "  the last reload was REFUSED {} (the configuration above stays): {why}",
                    ago(now, u(&c["last-refused-unix-ms"]))
                );
            }
        }
        outln!("\nMIRRORS");
        for r in s["relations"].as_array().into_iter().flatten() {
            let j = &r["job"];
            outln!(
                "  {}{} <- {}: lag {}, last run {} ({}), next {}, {}",
                r["volume"].as_str().unwrap_or("?"),
                r["region"]
                    .as_str()
                    .map_or_else(String::new, |g| format!(" (region {g})")),
                r["upstream"].as_str().unwrap_or("?"),
                u(&r["lag-ms"]).map_or("-".into(), human_duration),
                ago(now, u(&j["last-finished-unix-ms"])),
                match j["last-ok"].as_bool() {
                    Some(true) => "ok",
                    Some(false) => "FAILED",
                    None => "-",
                },
                ago(now, u(&j["next-run-unix-ms"])),
                j["schedule"].as_str().unwrap_or("")
            );
            let t = &j["last-transfer"];
            if !t.is_null() {
                outln!(
                    "      last transfer: {}, {} snapshot(s), {} on the wire, {:.2}s",
                    t["kind"].as_str().unwrap_or("?"),
                    t["received"].as_array().map_or(0, Vec::len),
                    human_bytes(u(&t["bytes-fetched"]).unwrap_or(0)),
                    t["seconds"].as_f64().unwrap_or(0.0)
                );
            }
            if let Some(e) = j["last-error"].as_str() {
                outln!(
                    "      error ({} in a row): {}",
                    j["consecutive-failures"],
                    printable(e)
                );
            }
        }
        let g = &s["gc"];
        if !g.is_null() {
            let last = &g["last"];
            outln!(
                "\nGC\n  waiting: {} deleted snapshot(s), about {}; last gc {}{}",
                u(&g["deleted-snapshots"]).unwrap_or(0),
                human_bytes(u(&g["dead-bytes-estimate"]).unwrap_or(0)),
                ago(now, u(&last["finished-unix-ms"])),
                u(&last["bytes-freed"])
                    .map_or_else(String::new, |b| format!(", freed {}", human_bytes(b)))
            );
            if let Some(a) = g["last-attempt"].as_str() {
                outln!("  the daemon's last gc after deletions: {a}");
            }
        }
        outln!("\nSCHEDULES");
        for j in s["jobs"].as_array().into_iter().flatten() {
            if j["kind"] == "mirror" {
                continue;
            }
            outln!(
                "  {} {}: {}, last {} ({}), next {}{}",
                j["kind"].as_str().unwrap_or("?"),
                j["volume"].as_str().unwrap_or("?"),
                j["schedule"].as_str().unwrap_or(""),
                ago(now, u(&j["last-finished-unix-ms"])),
                match j["last-ok"].as_bool() {
                    Some(true) => "ok",
                    Some(false) => "FAILED",
                    None => "-",
                },
                ago(now, u(&j["next-run-unix-ms"])),
                j["last-error"].as_str().map_or(String::new(), |e| format!(
                    "\n      error: {}",
                    printable(e)
                ))
            );
        }
        outln!("\nLOCKS");
        for v in s["volumes"].as_array().into_iter().flatten() {
            outln!(
                "  {} ({} snapshots{}):",
                v["volume"].as_str().unwrap_or("?"),
                v["snapshots"],
                v["replica-of"]
                    .as_str()
                    .map_or(String::new(), |r| format!(", {r}"))
            );
            for (label, key) in [
                ("held here", "held-here"),
                ("from downstream", "from-downstream"),
            ] {
                for h in v[key].as_array().into_iter().flatten() {
                    let stale = if h["stale"].as_bool() == Some(true) {
                        format!(
                            "  STALE for {} (last seen {} ago)",
                            human_duration(u(&h["stale-for-ms"]).unwrap_or(0)),
                            human_duration(u(&h["seen-ago-ms"]).unwrap_or(0))
                        )
                    } else {
                        String::new()
                    };
                    outln!(
                        "    {label:<15} {:<28} {} lock(s) on {} snapshot(s), generation {}, refreshed {} ago{stale}",
                        h["holder"].as_str().unwrap_or("?"),
                        h["locks"],
                        h["snapshots"].as_array().map_or(0, Vec::len),
                        h["generation"],
                        human_duration(u(&h["seen-ago-ms"]).unwrap_or(0)),
                    );
                }
            }
        }
        if let Some(f) = s["policy-failures"].as_object().filter(|f| !f.is_empty()) {
            outln!("\nPOLICY FAILURES");
            for (name, c) in f {
                outln!(
                    "  {name}: {} failure(s), last: {}",
                    c["count"],
                    c["last-error"].as_str().unwrap_or("")
                );
            }
        }
        ctx.summary(format!("denied peer requests: {}", s["denied-requests"]));
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Write a self-signed certificate and key (PEM) for the daemon's listener.
    SelfSigned {
        /// Where to write the certificate.
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the private key (created with mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Names the certificate is valid for (DNS names or IP addresses).
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1", "::1"])]
        names: Vec<String>,
    },
}

impl TlsCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        match self {
            TlsCommand::SelfSigned { cert, key, names } => {
                for p in [&cert, &key] {
                    if p.exists() {
                        anyhow::bail!(crate::Error::conflict(format!(
                            "{} already exists; remove it or choose another path",
                            p.display()
                        )));
                    }
                }
                let (c, k) = crate::peer::tls::self_signed(&names)?;
                write_new(&key, k.as_bytes(), 0o600)?;
                write_new(&cert, c.as_bytes(), 0o644)?;
                ctx.summary(format!(
                    "wrote {} and {} (valid for {}); give the certificate to downstreams as `ca`",
                    cert.display(),
                    key.display(),
                    names.join(", ")
                ));
                Ok(())
            }
        }
    }
}

fn write_new(path: &std::path::Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| crate::Error::io(format!("creating {}", path.display()), e))?;
    // The mode as asked, whatever the umask (holdfast runs with 077): a certificate is
    // public, a key is not.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum KeyFileCommand {
    /// Write a new random key file (32 bytes as 64 hex digits, mode 0600) for
    /// `holdfast target add --encrypt --key-file FILE`. Keep a copy away from the node: without
    /// it (or another key slot) the target cannot be read.
    #[command(after_help = "Examples:\n  holdfast key new /root/bucket.key")]
    New {
        /// The file to create (never overwritten)
        file: std::path::PathBuf,
    },
}

impl KeyFileCommand {
    pub async fn run(self, ctx: &Context) -> anyhow::Result<()> {
        match self {
            KeyFileCommand::New { file } => {
                let text = crate::target::keys::new_key_file_text();
                write_new(&file, text.as_bytes(), 0o600)?;
                ctx.summary(format!(
                    "wrote a new key file {} (mode 0600); keep a copy somewhere safe",
                    file.display()
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new random peer token (give it to both ends of a relation).
    New,
}

impl TokenCommand {
    pub async fn run(self, _ctx: &Context) -> anyhow::Result<()> {
        match self {
            TokenCommand::New => outln!("{}", crate::peer::new_token()),
        }
        Ok(())
    }
}
