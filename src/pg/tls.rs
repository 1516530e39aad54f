//! TLS to PostgreSQL with rustls, honouring `sslmode` and `sslrootcert` as libpq does
//! (PostgreSQL documentation, "SSL Support", table "SSL Mode Descriptions"):
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default) | when the server offers it, else plain | not checked |
//! | `require` | always | not checked, unless a root certificate file exists: then as `verify-ca` |
//! | `verify-ca` | always | signed by a CA of `sslrootcert` |
//! | `verify-full` | always | signed by a CA of `sslrootcert`, and issued for the host name |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt`, as in libpq. A connection over a Unix
//! socket never uses TLS (PostgreSQL offers none there), whatever the mode. Unlike libpq,
//! `prefer` does not retry without TLS when a TLS handshake the server accepted fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

/// `sslmode`, as libpq names its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it.
    Prefer,
    /// TLS always.
    Require,
    /// TLS always, with a certificate signed by a trusted CA.
    VerifyCa,
    /// TLS always, with a certificate signed by a trusted CA for the host name.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's name of a mode.
    ///
    /// # Errors
    /// A message naming the values allowed, for anything else (`allow` included, which
    /// tokio-postgres cannot do).
    pub fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other:?} is not supported: use disable, prefer, require, \
                     verify-ca or verify-full"
                ));
            }
        })
    }

    /// The mode tokio-postgres negotiates with: whether TLS is required or only tried.
    #[must_use]
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Not at all (the handshake's signatures still are).
    Nothing,
    /// The chain to a trusted CA.
    Chain,
    /// The chain, and the host name.
    ChainAndName,
}

/// The TLS connector for `mode` and `sslrootcert` (`None`: libpq's default file,
/// `~/.postgresql/root.crt`).
///
/// # Errors
/// When the mode verifies certificates and the root certificate file is missing, cannot be
/// read or holds no certificate; or when `sslrootcert=system` is asked for.
pub fn connector(mode: SslMode, sslrootcert: Option<&str>) -> Result<MakeRustlsConnect, String> {
    if sslrootcert == Some("system") {
        return Err(
            "sslrootcert=system is not supported: name a file holding the CA certificates \
             (PEM)"
                .into(),
        );
    }
    let root_file = match sslrootcert {
        Some(path) => Some(PathBuf::from(path)),
        None => std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt")),
    };
    let check = match mode {
        SslMode::Disable | SslMode::Prefer => Check::Nothing,
        // libpq: "if a root CA file exists, the behavior of sslmode=require will be the
        // same as that of verify-ca".
        SslMode::Require if root_file.as_deref().is_some_and(Path::exists) => Check::Chain,
        SslMode::Require => Check::Nothing,
        SslMode::VerifyCa => Check::Chain,
        SslMode::VerifyFull => Check::ChainAndName,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let config = if check == Check::Nothing {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth()
    } else {
        let Some(file) = root_file else {
            return Err(format!(
                "sslmode={mode:?} checks the server's certificate, but no root certificate \
                 file is named (sslrootcert) and HOME is not set for the default one"
            ));
        };
        let roots = Arc::new(load_roots(&file)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|e| {
                format!(
                    "cannot use the root certificates of {}: {e}",
                    file.display()
                )
            })?;
        let builder = builder.dangerous();
        let verifier: Arc<dyn ServerCertVerifier> = if check == Check::Chain {
            Arc::new(ChainOnly(webpki))
        } else {
            webpki
        };
        builder
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The CA certificates of a PEM file.
fn load_roots(file: &Path) -> Result<RootCertStore, String> {
    let mode_hint = "or change sslmode to disable server certificate verification";
    if !file.exists() {
        return Err(format!(
            "root certificate file {} does not exist: name the CA certificates with \
             sslrootcert=FILE in the connection string, {mode_hint}",
            file.display()
        ));
    }
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| {
            format!(
                "cannot read the root certificate file {}: {e}",
                file.display()
            )
        })?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "the root certificate file {} holds no usable certificate (PEM, \
             -----BEGIN CERTIFICATE-----)",
            file.display()
        ));
    }
    Ok(roots)
}

/// `verify-ca`: the chain to a trusted CA is checked, the host name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // rustls checks the chain first and the name last: a name error means the chain
        // is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: encryption without authentication,
/// as libpq does; the handshake's signatures are still checked against the certificate.
#[derive(Debug)]
struct Unchecked(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unchecked {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_libpq_names_them() {
        assert_eq!(SslMode::parse("verify-full"), Ok(SslMode::VerifyFull));
        assert_eq!(
            SslMode::VerifyCa.negotiation(),
            tokio_postgres::config::SslMode::Require
        );
        assert!(SslMode::parse("allow").unwrap_err().contains("verify-ca"));
    }

    #[test]
    fn verifying_modes_need_a_root_certificate_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none.pem");
        let e = connector(SslMode::VerifyFull, missing.to_str())
            .err()
            .expect("refused");
        assert!(
            e.contains("does not exist") && e.contains("sslrootcert"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = connector(SslMode::VerifyCa, empty.to_str())
            .err()
            .expect("refused");
        assert!(e.contains("no usable certificate"), "{e}");
        // Without verification, no file is needed.
        assert!(connector(SslMode::Require, missing.to_str()).is_ok());
        assert!(connector(SslMode::VerifyCa, Some("system")).is_err());
    }
}
