//! Target URLs: `file:///PATH` and `s3://BUCKET/PREFIX`, checked before use.

use crate::error::{Error, Result};
use crate::id::{shorten, validate_name};

use super::*;

/// Where a target's objects live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetUrl {
    File(PathBuf),
    S3 { bucket: String, prefix: String },
}

/// Parses and checks a target URL.
pub fn parse_url(url: &str) -> Result<TargetUrl> {
    let bad = |why: &str| Error::invalid(format!("target url {:?}: {why}", shorten(url)));
    if let Some(path) = url.strip_prefix("file://") {
        let p = PathBuf::from(path);
        if !p.is_absolute() {
            return Err(bad(
                "a file:// url needs an absolute path (file:///srv/backup)",
            ));
        }
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(bad("the path must not contain `..`"));
        }
        crate::id::validate_text("target path", path, 4096)?;
        return Ok(TargetUrl::File(p));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.contains("..");
        if !ok_bucket {
            return Err(bad(
                "the bucket name must be 3-63 characters of a-z, 0-9, `-` and `.`",
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        for part in prefix.split('/').filter(|p| !p.is_empty()) {
            validate_name("target prefix segment", part)?;
        }
        if prefix.split('/').any(str::is_empty) && !prefix.is_empty() {
            return Err(bad("the prefix has an empty segment (`//`)"));
        }
        return Ok(TargetUrl::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        });
    }
    Err(bad("use file:///PATH or s3://BUCKET/PREFIX"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("s3://my-bucket/a/b").unwrap(),
            TargetUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            parse_url("file:///srv/x").unwrap(),
            TargetUrl::File("/srv/x".into())
        );
        for bad in [
            "s3://A/x",
            "s3://ab",
            "s3://bucket/../x",
            "s3://bucket/a//b",
            "file://relative/x",
            "file:///srv/../etc",
            "http://bucket",
            "s3://bucket/a\0b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
