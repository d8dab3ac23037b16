//! TLS for `https` checks: rustls with the ring provider (no OpenSSL), one full handshake per
//! check.
//!
//! Without `tls_verify`, any certificate is accepted (backends are addressed by IP, and their
//! certificates rarely name one), and so is the signature made with it: a signature by an
//! untrusted key proves nothing, and checking it costs CPU on every check. The handshake must
//! still complete (its Finished messages prove both sides derived the same keys), so the check
//! proves the TLS service works. With `tls_verify`, the chain is verified against `tls_ca` or
//! the system's roots, the name against `host` or the backend's IP address, and the signatures
//! as always.

use std::{
    io,
    net::IpAddr,
    path::Path,
    sync::{Arc, OnceLock},
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        Resumption,
    },
    crypto::{self, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::model::{CaFile, TlsSpec};

/// Reads the PEM file `tls_ca` names; the message says what is wrong with it.
pub fn load_ca(path: &Path) -> Result<CaFile, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read CA certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate: expected PEM \"BEGIN CERTIFICATE\" blocks",
            path.display()
        ));
    }
    roots(&certs).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(CaFile {
        path: path.to_owned(),
        certs,
    })
}

fn roots(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.clone())
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    Ok(roots)
}

/// The system's roots, read once (for `tls_verify` without `tls_ca`).
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _unusable) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "no system CA certificate found ({} errors); set tls_ca",
                    found.errors.len()
                ));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// The TLS server name: `host` without a port, or the backend's address. rustls sends an
/// address as no SNI at all (RFC 6066 allows only host names there) and verifies it against
/// the certificate's IP addresses.
pub fn server_name(host: Option<&str>, addr: IpAddr) -> Result<ServerName<'static>, String> {
    let Some(host) = host else {
        return Ok(ServerName::IpAddress(addr.into()));
    };
    // A Host header may carry a port: "svc.example:8443", "[2001:db8::1]:443".
    let name = match host.rsplit_once(':') {
        Some((name, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_owned())
        .map_err(|e| format!("host {host:?} is not a TLS server name: {e}"))
}

/// What a check needs to speak TLS to one backend.
pub(super) struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl Tls {
    pub fn new(spec: &TlsSpec, addr: IpAddr, host: Option<&str>) -> Result<Self, String> {
        let provider = Arc::new(crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = if spec.verify {
            let roots = match &spec.ca {
                Some(ca) => Arc::new(roots(&ca.certs)?),
                None => system_roots()?,
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        };
        // A full handshake every time: a check must prove the server can still do one (and,
        // verifying, that its certificate is still valid), not that it remembers us.
        config.resumption = Resumption::disabled();
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            name: server_name(host, addr)?,
        })
    }

    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }
}

/// Accepts any certificate and the signatures made with it (see the module docs).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in a fresh temporary directory, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> Self {
            let dir = std::env::temp_dir().join(format!("xdplb-tls-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    #[test]
    fn ca_files_are_read_or_rejected_with_the_reason() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        let good = TempFile::new("ca.pem", pem.as_bytes());
        let ca = load_ca(&good.0).unwrap();
        assert_eq!((ca.path.as_path(), ca.certs.len()), (good.0.as_path(), 1));

        let empty = TempFile::new("empty.pem", b"# no certificate here\n");
        let err = load_ca(&empty.0).unwrap_err();
        assert!(err.contains("holds no certificate"), "{err}");
        let broken = TempFile::new(
            "broken.pem",
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        );
        let err = load_ca(&broken.0).unwrap_err();
        assert!(err.starts_with("cannot read CA certificates from"), "{err}");
        let err = load_ca(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn server_names_come_from_host_without_its_port_or_from_the_address() {
        let addr = IpAddr::from([10, 0, 0, 11]);
        let name = |host| server_name(host, addr).map(|n| n.to_str().into_owned());
        assert_eq!(name(None).unwrap(), "10.0.0.11");
        assert_eq!(name(Some("svc.example")).unwrap(), "svc.example");
        assert_eq!(name(Some("svc.example:8443")).unwrap(), "svc.example");
        assert_eq!(name(Some("[2001:db8::1]:443")).unwrap(), "2001:db8::1");
        assert_eq!(name(Some("2001:db8::1")).unwrap(), "2001:db8::1");
        assert!(matches!(
            server_name(Some("10.0.0.12"), addr),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(name(Some("a..b"))
            .unwrap_err()
            .contains("not a TLS server name"));
    }
}
