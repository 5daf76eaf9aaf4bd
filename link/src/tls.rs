//! TLS for MQTT links: the `tls:` block of a link and the rustls client configuration built from
//! it — the one place every crate (and the cluster's NATS client) gets its TLS setup from.
//!
//! Owns reading the PEM files (trust anchors, client certificate and key) and the choice of crypto
//! provider: ring, installed explicitly, so nothing depends on a process-wide default provider.
//! Opens no socket: each crate hands the configuration to its MQTT client. Errors and `Debug`
//! output name fields and paths, never certificate or key contents.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// TLS settings of one MQTT link: whom to trust and, optionally, who we are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM bundle of the certificate authorities trusted to sign the broker's certificate. The
    /// system's roots are deliberately not used: a link trusts exactly what its file lists.
    pub ca_file: PathBuf,
    /// PEM client certificate (chain, leaf first) for brokers that require one; needs
    /// `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate (PKCS#8, PKCS#1 or SEC1); needs
    /// `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Name the broker's certificate must be valid for, when it differs from the link's `host`
    /// (e.g. a broker reached by IP address whose certificate carries only its DNS name). Applies
    /// to every address of the link, alternates included. Only verification uses it: rumqttc
    /// derives SNI from `host`, so a broker that picks its certificate by SNI needs `host` itself.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl TlsSettings {
    /// Settings trusting the CAs in `ca_file`, without a client certificate.
    pub fn with_ca(ca_file: impl Into<PathBuf>) -> Self {
        Self {
            ca_file: ca_file.into(),
            client_cert_file: None,
            client_key_file: None,
            server_name: None,
        }
    }

    /// Problems with these settings, each as `field: message` (empty when valid). Files are not
    /// opened here; that happens when the client configuration is built.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if is_blank(&self.ca_file) {
            out.push("ca_file: must not be empty".to_string());
        }
        for (field, path) in [
            ("client_cert_file", &self.client_cert_file),
            ("client_key_file", &self.client_key_file),
        ] {
            if path.as_deref().is_some_and(is_blank) {
                out.push(format!(
                    "{field}: must not be empty (remove the key instead)"
                ));
            }
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => {
                out.push("client_key_file: required when client_cert_file is set".to_string())
            }
            (None, Some(_)) => {
                out.push("client_cert_file: required when client_key_file is set".to_string())
            }
            _ => {}
        }
        if let Some(name) = &self.server_name {
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                out.push(format!(
                    "server_name: must be a DNS name or an IP address, got {name:?}"
                ));
            }
        }
        out
    }
}

fn is_blank(p: &Path) -> bool {
    p.as_os_str().to_string_lossy().trim().is_empty()
}

pub use client::rustls_cause;

mod client {
    use super::TlsSettings;
    use crate::error::TlsError;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
    use std::path::Path;
    use std::sync::Arc;

    impl TlsSettings {
        /// Reads the PEM files and builds the rustls client configuration: ring provider, TLS 1.2
        /// and 1.3, the CAs of `ca_file` as the only trust anchors, the client certificate when
        /// given. Build it once per link and share it between the link's addresses.
        pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = RootCertStore::empty();
            for ca in read_certs("ca_file", &self.ca_file)? {
                roots.add(ca).map_err(|e| TlsError::Invalid {
                    field: "ca_file",
                    path: self.ca_file.clone(),
                    detail: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Rejected {
                    detail: e.to_string(),
                })?;
            let builder = match &self.server_name {
                None => builder.with_root_certificates(roots),
                Some(name) => {
                    let fixed = ServerName::try_from(name.clone())
                        .map_err(|_| TlsError::ServerName { name: name.clone() })?;
                    let inner =
                        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                            .build()
                            .map_err(|e| TlsError::Rejected {
                                detail: e.to_string(),
                            })?;
                    // Full WebPKI verification, only against the configured name.
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(FixedName { inner, fixed }))
                }
            };
            let config = match (&self.client_cert_file, &self.client_key_file) {
                (None, None) => builder.with_no_client_auth(),
                (Some(cert), Some(key)) => {
                    let chain = read_certs("client_cert_file", cert)?;
                    let key_der = read_key("client_key_file", key)?;
                    builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                        TlsError::ClientAuth {
                            cert: cert.clone(),
                            key: key.clone(),
                            detail: e.to_string(),
                        }
                    })?
                }
                _ => return Err(TlsError::ClientAuthIncomplete),
            };
            Ok(Arc::new(config))
        }
    }

    /// The rustls error behind `err`, if TLS is what failed: looks through the whole source chain,
    /// including inside `std::io::Error`s (where tokio-rustls puts handshake failures).
    pub fn rustls_cause<'a>(
        err: &'a (dyn std::error::Error + 'static),
    ) -> Option<&'a rustls::Error> {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<rustls::Error>() {
                return Some(t);
            }
            if let Some(t) = e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Some(t);
            }
            cur = e.source();
        }
        None
    }

    fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|source| TlsError::Read {
            field,
            path: path.to_path_buf(),
            source,
        })
    }

    fn invalid(field: &'static str, path: &Path, detail: impl Into<String>) -> TlsError {
        TlsError::Invalid {
            field,
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    /// What is wrong with a PEM file, without quoting any of it (a key file must never leak).
    fn pem_problem(e: &pem::Error) -> &'static str {
        match e {
            pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
            pem::Error::IllegalSectionStart { .. } => "malformed PEM BEGIN line",
            pem::Error::Base64Decode(_) => "invalid base64 in a PEM section",
            pem::Error::NoItemsFound => "no PEM item of the expected kind",
            pem::Error::SectionTooLarge => "PEM section too large",
            _ => "unreadable PEM",
        }
    }

    fn read_certs(
        field: &'static str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let pem = read(field, path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(field, path, pem_problem(&e)))?;
        if certs.is_empty() {
            return Err(invalid(
                field,
                path,
                "no PEM certificate (-----BEGIN CERTIFICATE-----) found",
            ));
        }
        Ok(certs)
    }

    fn read_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
        let pem = read(field, path)?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
            pem::Error::NoItemsFound => invalid(
                field,
                path,
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) found",
            ),
            other => invalid(field, path, pem_problem(&other)),
        })
    }

    /// WebPKI verification against a configured name instead of the host connected to.
    #[derive(Debug)]
    struct FixedName {
        inner: Arc<WebPkiServerVerifier>,
        fixed: ServerName<'static>,
    }

    impl ServerCertVerifier for FixedName {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            self.inner.verify_server_cert(
                end_entity,
                intermediates,
                &self.fixed,
                ocsp_response,
                now,
            )
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn temp_dir(name: &str) -> std::path::PathBuf {
            let d = std::env::temp_dir()
                .join(format!("edgewatch-link-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            d
        }

        #[test]
        fn a_missing_ca_file_error_names_the_field_and_the_path() {
            let path = temp_dir("missing").join("no-such-ca.pem");
            let e = TlsSettings::with_ca(&path).client_config().unwrap_err();
            assert!(
                matches!(
                    e,
                    TlsError::Read {
                        field: "ca_file",
                        ..
                    }
                ),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(msg.starts_with("tls.ca_file: cannot read "), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }

        #[test]
        fn a_file_without_certificates_is_rejected_with_its_path() {
            let path = temp_dir("empty").join("ca.pem");
            std::fs::write(&path, "just text, no PEM\n").unwrap();
            let msg = TlsSettings::with_ca(&path)
                .client_config()
                .unwrap_err()
                .to_string();
            assert!(msg.starts_with("tls.ca_file: "), "{msg}");
            assert!(msg.contains("no PEM certificate"), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }

        #[test]
        fn a_broken_key_is_reported_without_quoting_the_file() {
            let path = temp_dir("key").join("client.key");
            std::fs::write(
                &path,
                "-----BEGIN PRIVATE KEY-----\nSECRET*MATERIAL*!!\n-----END PRIVATE KEY-----\n",
            )
            .unwrap();
            let msg = read_key("client_key_file", &path).unwrap_err().to_string();
            assert!(msg.starts_with("tls.client_key_file: "), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(!msg.contains("SECRET"), "{msg}");
            std::fs::write(&path, "no key here\n").unwrap();
            let msg = read_key("client_key_file", &path).unwrap_err().to_string();
            assert!(msg.contains("no PEM private key"), "{msg}");
        }

        #[test]
        fn rustls_errors_are_found_inside_io_errors() {
            let io = std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            );
            let found = rustls_cause(&io).map(ToString::to_string);
            assert_eq!(
                found.as_deref(),
                Some("invalid peer certificate: UnknownIssuer")
            );
            assert!(rustls_cause(&std::io::Error::other("nope")).is_none());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_without_key_and_key_without_cert_are_reported() {
        let mut t = TlsSettings::with_ca("ca.pem");
        assert!(t.problems().is_empty());
        t.client_cert_file = Some("client.pem".into());
        assert_eq!(
            t.problems(),
            vec!["client_key_file: required when client_cert_file is set"]
        );
        t.client_cert_file = None;
        t.client_key_file = Some("client.key".into());
        assert_eq!(
            t.problems(),
            vec!["client_cert_file: required when client_key_file is set"]
        );
    }

    #[test]
    fn empty_paths_and_blank_server_names_are_reported() {
        let t = TlsSettings {
            ca_file: "".into(),
            client_cert_file: Some(" ".into()),
            client_key_file: Some("k.pem".into()),
            server_name: Some("".into()),
        };
        let p = t.problems();
        assert!(
            p.contains(&"ca_file: must not be empty".to_string()),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("client_cert_file: must not be empty")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.starts_with("server_name:")), "{p:?}");
    }

    #[test]
    fn unknown_tls_fields_are_rejected_and_ca_file_is_required() {
        let e = serde_json::from_str::<TlsSettings>(r#"{"ca_file":"a","cafile":"b"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cafile"), "{e}");
        let e = serde_json::from_str::<TlsSettings>(r#"{"server_name":"b"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca_file"), "{e}");
    }
}
