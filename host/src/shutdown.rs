//! A request to stop, from SIGINT or SIGTERM. Long operations check it at safe points and stop
//! there the ordinary way (what they added to QEMU is removed, `after` hooks run, nothing half
//! done is committed) instead of dying in the middle.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

fn notify() -> &'static tokio::sync::Notify {
    static N: OnceLock<tokio::sync::Notify> = OnceLock::new();
    N.get_or_init(tokio::sync::Notify::new)
}

/// Asks every operation of this process to stop.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
    notify().notify_waiters();
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Returns once a stop is requested.
pub async fn wait() {
    loop {
        let notified = notify().notified();
        if requested() {
            return;
        }
        notified.await;
    }
}

/// An error if a stop was requested: `what` was interrupted, and nothing was committed.
pub fn check(what: &str) -> Result<()> {
    if requested() {
        return Err(Error::unavailable_msg(format!(
            "{what} was interrupted (the process was asked to stop); nothing was committed"
        )));
    }
    Ok(())
}

/// Turns the first SIGINT or SIGTERM into a stop request; a second one ends the process at
/// once (exit 130).
pub fn on_signals() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("installing the SIGINT handler", e))?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if n > 0 {
                std::process::exit(130);
            }
            tracing::warn!("stopping: finishing what must be undone first (again to force)");
            request();
        }
    });
    Ok(())
}
