//! Logging, set up once by `main`: to the systemd journal with structured fields when stderr
//! is the journal (a service started by systemd), otherwise plain text on stderr.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `RUST_LOG` wins; otherwise warnings, or more with `-v`/`-vv`, or errors only with `--quiet`.
/// A daemon under systemd logs at info unless told otherwise.
pub fn init(verbose: u8, quiet: bool) {
    let journal = stderr_is_the_journal();
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) if journal => "info",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                // Fields as HOLDFAST_VOLUME=vm1, HOLDFAST_OUTCOME=error, ...:
                // `journalctl -u holdfast HOLDFAST_VOLUME=vm1`.
                let layer = layer
                    .with_syslog_identifier("holdfast".into())
                    .with_field_prefix(Some("HOLDFAST".into()));
                let _ = tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => eprintln!("holdfast: the journal is not reachable ({e}); logging to stderr"),
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// systemd sets `JOURNAL_STREAM=DEVICE:INODE` for a service whose stderr goes to the journal;
/// it is ours only if stderr is still that stream (not redirected by a script in between).
fn stderr_is_the_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}
