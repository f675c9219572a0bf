//! The one public error type, and the policy for using it.
//!
//! Every fallible public function returns [`Error`]. Modules keep precise private errors where
//! that helps and convert them here, in one place, into a few categories an operator can act on:
//!
//! - [`Error::NotFound`]: a volume, snapshot, chunk or object that was named does not exist.
//! - [`Error::InvalidInput`]: something from outside (a name, a path, a flag, a config value)
//!   is malformed; nothing was changed.
//! - [`Error::Conflict`]: the request contradicts the current state (the name is taken, the
//!   state directory already exists); nothing was changed.
//! - [`Error::Locked`]: a soft lock forbids the change; the message names the holders.
//! - [`Error::Corrupt`]: stored data failed verification; the message names the snapshot, the
//!   block and the chunk involved.
//! - [`Error::Unavailable`]: a resource is out of reach or exhausted (disk full, a store that
//!   does not answer); retrying later may succeed ([`Error::is_transient`]).
//! - [`Error::Io`]: a local I/O failure, with the path or object involved.
//! - [`Error::Denied`]: a peer is unknown, presented a wrong token, or asked for something it
//!   is not granted (another volume, another holder's locks, more locks than its limit).
//! - [`Error::Policy`]: a policy failed (trapped, ran out of time or memory, answered with an
//!   error or a malformed answer); the message names the policy and the call. The host falls
//!   back to its safe default and lives on.
//! - [`Error::Internal`]: a bug; please report it.
//!
//! Messages say what failed, on which object, and what to do next. They are written for the
//! operator who reads them on a terminal, so they are full sentences without a trailing period.

use std::io;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The errors holdfast reports. See the module documentation for the categories.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Locked(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The OS error is part of the message, once: it is not also a `source`, so a chain
    /// printed with its causes does not repeat it.
    #[error("{context}: {cause}{}", io_hint(.cause))]
    Io { context: String, cause: io::Error },
    #[error("{0}")]
    Policy(String),
    #[error("{0}")]
    Denied(String),
    #[error("internal error: {0} (this is a bug in holdfast; please report it)")]
    Internal(String),
}

fn io_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::StorageFull => {
            " (free some space and run the command again; nothing was committed)"
        }
        io::ErrorKind::PermissionDenied => " (check the permissions of that path)",
        _ => "",
    }
}

impl Error {
    /// Wraps an I/O error with what was being done and on which path or object. A path that
    /// does not exist (a missing file, or a missing parent folder) is invalid input: nothing
    /// went wrong with the machine, the path given was wrong.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if source.kind() == io::ErrorKind::NotFound {
            return Error::InvalidInput(format!(
                "{context}: {source} (check that the path and its parent folders exist)"
            ));
        }
        Error::Io {
            context,
            cause: source,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        Error::NotFound(msg.into())
    }

    pub fn conflict(msg: impl Into<String>) -> Self {
        Error::Conflict(msg.into())
    }

    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }

    pub fn denied(msg: impl Into<String>) -> Self {
        Error::Denied(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    pub fn unavailable(
        msg: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Unavailable {
            message: msg.into(),
            source: Some(source.into()),
        }
    }

    /// Unavailable, with nothing more to say than the message.
    pub fn unavailable_msg(msg: impl Into<String>) -> Self {
        Error::Unavailable {
            message: msg.into(),
            source: None,
        }
    }

    /// The kind of the local I/O error, if this is one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { cause, .. } => Some(cause.kind()),
            _ => None,
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Io { cause, .. } => matches!(
                cause.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::Interrupted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    /// The process exit code the CLI uses for this error (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidInput(_) => 2,
            Error::NotFound(_) => 3,
            Error::Conflict(_) => 4,
            Error::Locked(_) => 5,
            Error::Corrupt(_) => 6,
            Error::Unavailable { .. } | Error::Io { .. } => 7,
            Error::Policy(_) => 8,
            Error::Denied(_) => 9,
            Error::Internal(_) => 70,
        }
    }
}

impl From<redb::Error> for Error {
    fn from(err: redb::Error) -> Self {
        catalog_error(err)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(err: $t) -> Self {
                catalog_error(redb::Error::from(err))
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn catalog_error(err: redb::Error) -> Error {
    match err {
        redb::Error::Io(source) => Error::io("catalog I/O failed", source),
        redb::Error::DatabaseAlreadyOpen => Error::Unavailable {
            message: "the node catalog is held by another process that does not share it; \
                      wait for it to finish and retry"
                .into(),
            source: None,
        },
        other => Error::Corrupt(format!(
            "the node catalog could not be read: {other}; run `holdfast verify` and restore \
             the state directory from a backup if it persists"
        )),
    }
}

impl From<object_store::Error> for Error {
    fn from(err: object_store::Error) -> Self {
        match err {
            object_store::Error::NotFound { path, .. } => {
                Error::NotFound(format!("object {path} is missing from the repository"))
            }
            object_store::Error::AlreadyExists { path, .. } => {
                Error::Conflict(format!("object {path} already exists in the repository"))
            }
            object_store::Error::InvalidPath { source } => {
                Error::InvalidInput(format!("invalid repository path: {source}"))
            }
            object_store::Error::PermissionDenied { ref path, .. }
            | object_store::Error::Unauthenticated { ref path, .. } => {
                tracing::debug!("object store refused access: {err:?}");
                Error::Denied(format!(
                    "the object store refused access to {path} ({}): check the credentials \
                     (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the target's \
                     --profile) and that they may read and write this bucket and prefix",
                    store_cause(&err)
                ))
            }
            other => {
                // An encrypted target's object that does not open is damage, not an outage.
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&other);
                while let Some(c) = cause {
                    if let Some(s) = c.downcast_ref::<crate::repo::sealed::SealError>() {
                        return Error::Corrupt(s.0.clone());
                    }
                    cause = c.source();
                }
                // The local store reports a full disk as a generic error; find the io::Error.
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&other);
                while let Some(c) = cause {
                    if let Some(io) = c.downcast_ref::<io::Error>()
                        && io.kind() == io::ErrorKind::StorageFull
                    {
                        return Error::io(
                            format!("writing to the repository failed ({other})"),
                            io::Error::from(io::ErrorKind::StorageFull),
                        );
                    }
                    cause = c.source();
                }
                // One sentence for the operator; the whole chain (XML bodies and all) for -v.
                tracing::debug!("object store error: {other:?}");
                Error::Unavailable {
                    message: format!("repository access failed: {}", store_cause(&other)),
                    source: None,
                }
            }
        }
    }
}

/// The gist of an object store error: the distinct messages of its chain, without XML
/// bodies or repeats, cut to a line.
fn store_cause(err: &object_store::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(c) = cause {
        let text = c.to_string();
        // Drop XML bodies (an S3 error document) and everything after them.
        let text = text.split('<').next().unwrap_or("").trim();
        let text = text.trim_end_matches([':', ',', ' ']).to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.retain(|p| !text.contains(p.as_str()));
            parts.push(text);
        }
        cause = c.source();
    }
    crate::id::shorten_to(&parts.join(": "), 400)
}
