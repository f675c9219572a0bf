//! A node's daemon configuration (`node.toml`): where it listens, which peers it pulls from
//! (`[[upstream]]`) and serves (`[[downstream]]`), its mirror relations, snapshot schedules and
//! retention rules. Everything is checked when the file is loaded, so a daemon never starts
//! on a half-understood configuration; relative paths are relative to the file.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::id::{NodeId, RegionName, VolumeName, shorten};

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The state directory (overrides `--state` when given).
    pub state: Option<PathBuf>,
    pub listen: Option<Listen>,
    #[serde(default)]
    pub upstream: Vec<Upstream>,
    #[serde(default)]
    pub downstream: Vec<Downstream>,
    #[serde(default)]
    pub mirror: Vec<Mirror>,
    #[serde(default)]
    pub schedule: Vec<SnapshotSchedule>,
    #[serde(default)]
    pub retention: Vec<Retention>,
    #[serde(default)]
    pub push: Vec<Push>,
    /// The daemon's gc after deletions.
    #[serde(default)]
    pub gc: GcConfig,
    /// How the daemon stops.
    #[serde(default)]
    pub daemon: DaemonSettings,
    /// Where this file was read from (for messages and relative paths).
    #[serde(skip)]
    pub path: PathBuf,
}

/// When the daemon reclaims the space of deleted snapshots, whatever deleted them (retention,
/// a mirror applying its upstream's deletions, `holdfast snapshot delete`): it looks `every`
/// so often, and runs gc when the repository is idle and the deletions since the last gc added
/// up to `min_dead` (their stored bytes, an estimate), or the oldest of them is `max_wait` old.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_gc_every")]
    pub every: String,
    #[serde(default = "default_gc_min_dead")]
    pub min_dead: String,
    #[serde(default = "default_gc_max_wait")]
    pub max_wait: String,
    /// How often the daemon gcs each target it pushes to (what prunes of it left: two phases,
    /// so a pack goes one grace period after the gc that condemned it).
    #[serde(default = "default_gc_target_every")]
    pub target_every: String,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            enabled: true,
            every: default_gc_every(),
            min_dead: default_gc_min_dead(),
            max_wait: default_gc_max_wait(),
            target_every: default_gc_target_every(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_gc_every() -> String {
    "10m".into()
}
fn default_gc_min_dead() -> String {
    "1GiB".into()
}
fn default_gc_max_wait() -> String {
    "1d".into()
}
fn default_gc_target_every() -> String {
    "1d".into()
}

impl GcConfig {
    /// (every, min_dead bytes, max_wait, target_every), checked.
    pub fn parsed(&self) -> Result<(Duration, u64, Duration, Duration)> {
        let min_dead: bytesize::ByteSize = self.min_dead.parse().map_err(|e| {
            Error::invalid(format!(
                "[gc] min_dead {:?} is not a size (1GiB, 500MiB): {e}",
                self.min_dead
            ))
        })?;
        let every = parse_duration("[gc] every", &self.every)?;
        if every < Duration::from_secs(1) {
            return Err(Error::invalid(format!(
                "[gc] every = {:?} is less than a second",
                self.every
            )));
        }
        Ok((
            every,
            min_dead.as_u64(),
            parse_duration("[gc] max_wait", &self.max_wait)?,
            parse_duration("[gc] target_every", &self.target_every)?,
        ))
    }
}

/// `[daemon]`: how the daemon stops. On SIGTERM it starts no new job and lets the running ones
/// finish for up to `shutdown_grace`; then it asks them to stop at their next safe point (what
/// they fetched is kept, nothing half done is committed).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSettings {
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: String,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings {
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

fn default_shutdown_grace() -> String {
    "1m".into()
}

impl DaemonSettings {
    pub fn shutdown_grace(&self) -> Result<Duration> {
        parse_duration("[daemon] shutdown_grace", &self.shutdown_grace)
    }
}

/// The daemon's listener: the peer protocol, `status` and `/metrics`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub address: SocketAddr,
    /// PEM certificate chain and key; required unless `plaintext` is set.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Plain TCP (HTTP/2 without TLS): refused unless the address is a loopback address.
    #[serde(default)]
    pub plaintext: bool,
    /// A bearer token `/metrics` requires (give one of these two); without one, the metrics
    /// are served only to clients on this host (a loopback address), since they name the
    /// node's volumes and peers.
    pub metrics_token: Option<String>,
    pub metrics_token_file: Option<PathBuf>,
}

/// A peer this node pulls from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: NodeId,
    /// `https://HOST:PORT`, or `http://` on loopback when the upstream listens in plaintext.
    pub url: String,
    /// The token this node presents (inline, or read from `token_file`).
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// A PEM certificate (or CA) to trust for this upstream, e.g. its self-signed certificate.
    pub ca: Option<PathBuf>,
}

/// A peer allowed to pull from this node.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Downstream {
    /// Must be the downstream's node id: it sends lock sets as `NAME/VOLUME`.
    pub name: NodeId,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// The volumes it may read (and pin).
    #[serde(default)]
    pub volumes: Vec<VolumeName>,
    /// Regions it may read (and pin) without the rest of their volume: `VOLUME/REGION`.
    #[serde(default)]
    pub regions: Vec<String>,
    /// The most locks its lock set for one volume may hold.
    #[serde(default = "default_max_locks")]
    pub max_locks: usize,
    /// The most distinct snapshots its lock set for one volume may pin.
    #[serde(default = "default_max_snapshots")]
    pub max_snapshots: usize,
    /// A lock set not refreshed for this long is reported stale (`1d`, `6h`).
    pub lease: Option<String>,
    /// Release a stale set automatically (only when a lease is set). Off by default:
    /// a downstream that is away keeps its base.
    #[serde(default)]
    pub release_stale: bool,
}

impl Downstream {
    /// Its region grants, by volume.
    pub fn region_grants(
        &self,
    ) -> Result<std::collections::HashMap<VolumeName, std::collections::HashSet<RegionName>>> {
        let mut out: std::collections::HashMap<_, std::collections::HashSet<_>> =
            Default::default();
        for g in &self.regions {
            let (v, r) = g.split_once('/').ok_or_else(|| {
                Error::invalid(format!(
                    "[[downstream]] {}: region grant {g:?} is not VOLUME/REGION",
                    self.name
                ))
            })?;
            out.entry(v.parse()?).or_default().insert(r.parse()?);
        }
        Ok(out)
    }
}

fn default_max_locks() -> usize {
    1000
}
fn default_max_snapshots() -> usize {
    100
}

/// When a job runs: `every = "30s"` or `cron = "0 */5 * * * *"` (with seconds).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    pub every: Option<String>,
    pub cron: Option<String>,
}

/// A mirror relation: pull `volume` from `upstream` on a schedule.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub volume: VolumeName,
    pub upstream: NodeId,
    /// Mirror only this region of the upstream's volume (a partition or byte range named
    /// there): the replica holds the region alone.
    pub region: Option<RegionName>,
    #[serde(flatten)]
    pub when: When,
}

/// Scheduled snapshots of a local volume.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSchedule {
    pub volume: VolumeName,
    #[serde(flatten)]
    pub when: When,
    /// A command run before each snapshot (`sh -c`); if it fails, no snapshot is taken.
    pub before: Option<String>,
    /// A command run once the source's view is fixed (a running QEMU's disk: right after the
    /// freeze): thaw here what `before` froze.
    pub frozen: Option<String>,
    /// A command run after each snapshot, whatever happened.
    pub after: Option<String>,
    /// Read the whole source at least this often (`7d`), even when a dirty bitmap could be
    /// used (qcow2 and running QEMU volumes).
    pub full_read_every: Option<String>,
}

fn yes() -> bool {
    true
}

/// Scheduled retention of a volume: the volume's retention policies when it has any,
/// otherwise these rules. Never removes a locked snapshot.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub volume: VolumeName,
    pub keep_last: Option<usize>,
    pub keep_within: Option<String>,
    /// After pruning something, reclaim its space (`holdfast gc`) when the repository is idle.
    #[serde(default = "yes")]
    pub gc: bool,
    #[serde(flatten)]
    pub when: When,
}

/// Scheduled pushes of a volume to a mirror target (`holdfast target add` registers it).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Push {
    pub volume: VolumeName,
    pub target: String,
    #[serde(flatten)]
    pub when: When,
}

/// A parsed schedule.
#[derive(Clone, Debug)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<cron::Schedule>),
}

impl Schedule {
    /// How long from now until the next run.
    pub fn next_delay(&self) -> Duration {
        match self {
            Schedule::Every(d) => *d,
            Schedule::Cron(c) => c
                .upcoming(chrono::Utc)
                .next()
                .and_then(|t| (t - chrono::Utc::now()).to_std().ok())
                .unwrap_or(Duration::from_secs(3600)),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
            Schedule::Cron(c) => write!(f, "cron {c}"),
        }
    }
}

impl When {
    pub fn schedule(&self, what: &str) -> Result<Schedule> {
        match (&self.every, &self.cron) {
            (Some(_), Some(_)) => Err(Error::invalid(format!(
                "{what}: give either `every` or `cron`, not both"
            ))),
            (None, None) => Err(Error::invalid(format!(
                "{what}: say when it runs, with `every = \"10m\"` or `cron = \"0 0 * * * *\"`"
            ))),
            (Some(e), None) => {
                let d = parse_duration(&format!("{what}: every"), e)?;
                if d < Duration::from_millis(100) {
                    return Err(Error::invalid(format!(
                        "{what}: every = {e:?} is too short; use at least 100ms"
                    )));
                }
                Ok(Schedule::Every(d))
            }
            (None, Some(c)) => cron::Schedule::from_str(c)
                .map(|s| Schedule::Cron(Box::new(s)))
                .map_err(|e| {
                    Error::invalid(format!(
                        "{what}: cron = {:?} is not a schedule ({e}); use six fields with \
                         seconds first, e.g. \"0 */5 * * * *\"",
                        shorten(c)
                    ))
                }),
        }
    }
}

/// `90s`, `10m`, `1d 2h`.
pub fn parse_duration(what: &str, s: &str) -> Result<Duration> {
    humantime::parse_duration(s).map_err(|e| {
        Error::invalid(format!(
            "{what} = {:?} is not a duration ({e}); write e.g. \"30s\", \"10m\", \"1d\"",
            shorten(s)
        ))
    })
}

impl NodeConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<NodeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(format!("no configuration file at {}", path.display()))
            } else {
                Error::io(format!("reading {}", path.display()), e)
            }
        })?;
        let cfg = Self::parse(&text, path)?;
        let inline = cfg.upstream.iter().any(|u| u.token.is_some())
            || cfg.downstream.iter().any(|d| d.token.is_some())
            || cfg
                .listen
                .as_ref()
                .is_some_and(|l| l.metrics_token.is_some());
        if inline && crate::state::check_private(path, "the configuration").is_err() {
            tracing::warn!(
                "{} holds tokens and other users can read it: `chmod 600 {}`, or move the \
                 tokens into token_file entries (mode 0600)",
                path.display(),
                path.display()
            );
        }
        Ok(cfg)
    }

    /// Parses and checks the text of the configuration file at `path` (which is not read).
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig> {
        let mut cfg: NodeConfig =
            toml::from_str(text).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        cfg.path = path.to_path_buf();
        cfg.check()?;
        Ok(cfg)
    }

    /// A path from the file, relative to the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::invalid(format!("{}: {msg}", self.path.display()))
    }

    fn check(&self) -> Result<()> {
        if let Some(l) = &self.listen {
            if l.plaintext {
                if !l.address.ip().is_loopback() {
                    return Err(self.err(format!(
                        "[listen] plaintext is allowed only on a loopback address, not {}; \
                         give tls_cert and tls_key instead",
                        l.address
                    )));
                }
            } else if l.tls_cert.is_none() || l.tls_key.is_none() {
                return Err(self.err(
                    "[listen] needs tls_cert and tls_key (PEM files; `holdfast tls self-signed` \
                     makes a pair), or plaintext = true on a loopback address",
                ));
            }
            self.metrics_token()?;
        }
        let mut names = BTreeSet::new();
        for u in &self.upstream {
            if !names.insert(u.name.clone()) {
                return Err(self.err(format!("upstream {} is listed twice", u.name)));
            }
            let url = reqwest::Url::parse(&u.url)
                .map_err(|e| self.err(format!("upstream {}: url {:?}: {e}", u.name, u.url)))?;
            match url.scheme() {
                "https" => {}
                "http" => {
                    let loopback = match url.host() {
                        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                        Some(url::Host::Domain(d)) => d == "localhost",
                        None => false,
                    };
                    if !loopback {
                        return Err(self.err(format!(
                            "upstream {}: plain http is allowed only to a loopback address; \
                             use https",
                            u.name
                        )));
                    }
                }
                other => {
                    return Err(self.err(format!(
                        "upstream {}: url scheme {other:?} is not supported; use https://",
                        u.name
                    )));
                }
            }
            self.upstream_token(u)?;
        }
        let mut names = BTreeSet::new();
        for d in &self.downstream {
            if !names.insert(d.name.clone()) {
                return Err(self.err(format!("downstream {} is listed twice", d.name)));
            }
            self.downstream_token(d)?;
            d.region_grants().map_err(|e| self.err(e.to_string()))?;
            if let Some(l) = &d.lease {
                parse_duration(&format!("downstream {} lease", d.name), l)?;
            } else if d.release_stale {
                return Err(self.err(format!(
                    "downstream {}: release_stale needs a lease",
                    d.name
                )));
            }
        }
        self.gc.parsed().map_err(|e| self.err(e.to_string()))?;
        self.daemon
            .shutdown_grace()
            .map_err(|e| self.err(e.to_string()))?;
        for m in &self.mirror {
            if !self.upstream.iter().any(|u| u.name == m.upstream) {
                return Err(self.err(format!(
                    "mirror of {}: upstream {} is not configured as an [[upstream]]",
                    m.volume, m.upstream
                )));
            }
            m.when.schedule(&format!("mirror of {}", m.volume))?;
        }
        let mut mirrored = BTreeSet::new();
        for m in &self.mirror {
            if !mirrored.insert(m.volume.clone()) {
                return Err(self.err(format!(
                    "volume {} is mirrored twice; a replica has one upstream",
                    m.volume
                )));
            }
        }
        for s in &self.schedule {
            s.when.schedule(&format!("schedule of {}", s.volume))?;
            if mirrored.contains(&s.volume) {
                return Err(self.err(format!(
                    "volume {} is a mirror; its snapshots come from upstream, so it cannot \
                     have a snapshot [[schedule]]",
                    s.volume
                )));
            }
        }
        for p in &self.push {
            p.when
                .schedule(&format!("push of {} to {}", p.volume, p.target))?;
            crate::id::validate_name("target name", &p.target)?;
        }
        for r in &self.retention {
            r.when.schedule(&format!("retention of {}", r.volume))?;
            if let Some(w) = &r.keep_within {
                parse_duration(&format!("retention of {} keep_within", r.volume), w)?;
            }
        }
        Ok(())
    }

    fn token_of(
        &self,
        who: &str,
        token: &Option<String>,
        file: &Option<PathBuf>,
    ) -> Result<String> {
        let t = match (token, file) {
            (Some(t), None) => t.clone(),
            (None, Some(f)) => {
                let f = self.resolve(f);
                crate::state::check_private(&f, &format!("{who}: token file"))?;
                let mut raw = Vec::new();
                // A token is a line; a file of more than 4 KiB is not a token file (its size
                // is judged before its text, so a cut character does not hide what is wrong).
                std::fs::File::open(&f)
                    .and_then(|file| {
                        std::io::Read::read_to_end(&mut std::io::Read::take(file, 4097), &mut raw)
                    })
                    .map_err(|e| {
                        Error::io(format!("{who}: reading token file {}", f.display()), e)
                    })?;
                if raw.len() > 4096 {
                    return Err(self.err(format!(
                        "{who}: token file {} holds more than 4 KiB; a token is one line",
                        f.display()
                    )));
                }
                String::from_utf8_lossy(&raw).trim().to_string()
            }
            _ => {
                return Err(self.err(format!("{who}: give exactly one of token or token_file")));
            }
        };
        if t.len() < 16 || t.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(self.err(format!(
                "{who}: a token must be at least 16 printable ASCII characters \
                 (`holdfast token new` makes one)"
            )));
        }
        Ok(t)
    }

    pub fn upstream_token(&self, u: &Upstream) -> Result<String> {
        self.token_of(&format!("upstream {}", u.name), &u.token, &u.token_file)
    }

    pub fn downstream_token(&self, d: &Downstream) -> Result<String> {
        self.token_of(&format!("downstream {}", d.name), &d.token, &d.token_file)
    }

    /// The token `/metrics` requires, if the listener names one.
    pub fn metrics_token(&self) -> Result<Option<String>> {
        match &self.listen {
            Some(l) if l.metrics_token.is_some() || l.metrics_token_file.is_some() => self
                .token_of("[listen] metrics", &l.metrics_token, &l.metrics_token_file)
                .map(Some),
            _ => Ok(None),
        }
    }

    pub fn upstream(&self, name: &NodeId) -> Result<&Upstream> {
        self.upstream
            .iter()
            .find(|u| &u.name == name)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no [[upstream]] named {name} in {}",
                    self.path.display()
                ))
            })
    }

    pub fn mirror_of(&self, volume: &VolumeName) -> Result<&Mirror> {
        self.mirror
            .iter()
            .find(|m| &m.volume == volume)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "volume {volume} has no [[mirror]] relation in {}",
                    self.path.display()
                ))
            })
    }

    /// The holders of downstream mirrors of `volume`, i.e. `NODE/VOLUME` for every downstream.
    pub fn downstream_names(&self) -> BTreeSet<NodeId> {
        self.downstream.iter().map(|d| d.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.toml");
        std::fs::write(&p, text).unwrap();
        NodeConfig::load(&p)
    }

    #[test]
    fn plaintext_only_on_loopback() {
        let e = parse("[listen]\naddress = \"0.0.0.0:7000\"\nplaintext = true\n").unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        parse("[listen]\naddress = \"127.0.0.1:7000\"\nplaintext = true\n").unwrap();
        let e = parse("[listen]\naddress = \"127.0.0.1:7000\"\n").unwrap_err();
        assert!(e.to_string().contains("tls_cert"), "{e}");
    }

    #[test]
    fn relations_are_checked() {
        let e =
            parse("[[mirror]]\nvolume = \"v\"\nupstream = \"a\"\nevery = \"1m\"\n").unwrap_err();
        assert!(e.to_string().contains("not configured"), "{e}");
        let up = "[[upstream]]\nname = \"a\"\nurl = \"http://10.0.0.1:7000\"\ntoken = \"0123456789abcdef\"\n";
        let e = parse(up).unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        let up = up.replace("10.0.0.1", "127.0.0.1");
        let e = parse(&format!(
            "{up}[[mirror]]\nvolume = \"v\"\nupstream = \"a\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("every"), "{e}");
        let e = parse(&format!(
            "{up}[[mirror]]\nvolume = \"v\"\nupstream = \"a\"\ncron = \"nonsense\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("cron"), "{e}");
        parse(&format!(
            "{up}[[mirror]]\nvolume = \"v\"\nupstream = \"a\"\ncron = \"0 */5 * * * *\"\n"
        ))
        .unwrap();
        let e = parse(&up.replace("0123456789abcdef", "short")).unwrap_err();
        assert!(e.to_string().contains("16"), "{e}");
        let e = parse("[[mirror]]\nvolume = \"../x\"\nupstream = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains(".."), "{e}");
    }
}
