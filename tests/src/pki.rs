//! A throwaway PKI for TLS tests and benchmarks: CAs and server certificates naming lab
//! addresses, written as PEM files (rcgen, ECDSA P-256).

use anyhow::{Context as _, Result};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig,
};
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

/// A CA whose certificate is in `cert` (PEM).
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub cert: PathBuf,
}

/// A server certificate and its key (PEM files).
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerCert {
    /// A rustls server configuration (ring provider) serving the certificate at `cert` with the
    /// key at `key`, as PEM files.
    pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading {}", key.display()))?;
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?;
        Ok(Arc::new(config))
    }
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let cert = dir.join(format!("{name}.pem"));
        std::fs::write(&cert, issuer.pem())
            .with_context(|| format!("writing {}", cert.display()))?;
        Ok(Self { issuer, cert })
    }

    /// A certificate for `addresses` signed by this CA, written to `dir/<name>.{pem,key}`.
    pub fn server(&self, dir: &Path, name: &str, addresses: &[IpAddr]) -> Result<ServerCert> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = addresses.iter().map(|a| SanType::IpAddress(*a)).collect();
        let key = KeyPair::generate()?;
        let signed = params.signed_by(&key, &self.issuer)?;
        let paths = ServerCert {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&paths.cert, signed.pem())?;
        std::fs::write(&paths.key, key.serialize_pem())?;
        Ok(paths)
    }
}
