//! TLS for the peer protocol: rustls with the ring provider, certificates in PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's TLS crypto provider (the one holdfast builds), for the HTTP
/// clients that take the process default: the peer client and object_store's S3 client.
/// Harmless when it already is.
pub fn ensure_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A server configuration offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .map_err(|e| {
            Error::invalid(format!("reading certificates from {}: {e}", cert.display()))
        })?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "{} holds no PEM certificate",
            cert.display()
        )));
    }
    crate::state::check_private(key, "the TLS private key")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::invalid(format!("reading the private key {}: {e}", key.display())))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::invalid(format!("{}: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The certificates to trust for a peer.
pub fn load_roots(ca: &Path) -> Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(ca).map_err(|e| Error::io(format!("reading {}", ca.display()), e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| Error::invalid(format!("{} is not a PEM certificate: {e}", ca.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "{} holds no PEM certificate",
            ca.display()
        )));
    }
    Ok(certs)
}

/// A self-signed certificate and key for `names` (DNS names or IP addresses), as PEM.
pub fn self_signed(names: &[String]) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()
        .map_err(|e| Error::internal(format!("generating a key: {e}")))?;
    let params = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| Error::invalid(format!("certificate names {names:?}: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::internal(format!("signing the certificate: {e}")))?;
    Ok((cert.pem(), key.serialize_pem()))
}
