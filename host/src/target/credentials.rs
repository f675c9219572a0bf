//! Credentials of S3 targets: from the target's own profile, the environment, or the shared
//! credentials file; never stored, never printed.

use crate::error::{Error, Result};

use super::*;

/// Keys read from an AWS shared credentials file.
pub(super) struct ProfileKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Where a target's keys come from, in order: the target's own `--profile` /
/// `--credentials-file`; else `AWS_ACCESS_KEY_ID` and friends (left to `object_store`); else
/// the profile `AWS_PROFILE` (or `default`) of the shared credentials file, if that file
/// exists; else instance credentials (`object_store` again).
pub(super) fn profile_keys(rec: &TargetRecord) -> Result<Option<ProfileKeys>> {
    let explicit = rec.profile.is_some() || rec.credentials_file.is_some();
    if !explicit && std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        return Ok(None);
    }
    let file = match (
        &rec.credentials_file,
        std::env::var_os("AWS_SHARED_CREDENTIALS_FILE"),
    ) {
        (Some(f), _) => f.clone(),
        (None, Some(f)) => PathBuf::from(f),
        (None, None) => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let profile = rec
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".into());
    let asked = explicit || std::env::var_os("AWS_PROFILE").is_some();
    let ini = match ini::Ini::load_from_file(&file) {
        Ok(i) => i,
        Err(ini::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && !asked => {
            return Ok(None);
        }
        Err(e) => {
            return Err(Error::invalid(format!(
                "target {}: cannot read the credentials file {}: {e}",
                rec.name,
                file.display()
            )));
        }
    };
    let Some(sec) = ini.section(Some(profile.as_str())) else {
        if asked {
            return Err(Error::invalid(format!(
                "target {}: no profile [{profile}] in {}",
                rec.name,
                file.display()
            )));
        }
        return Ok(None);
    };
    let get = |k: &str| {
        sec.get(k)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(ProfileKeys {
            access_key_id,
            secret_access_key,
            session_token: get("aws_session_token"),
        })),
        _ => Err(Error::invalid(format!(
            "target {}: profile [{profile}] in {} lacks aws_access_key_id or aws_secret_access_key",
            rec.name,
            file.display()
        ))),
    }
}
