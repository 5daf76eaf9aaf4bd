//! Errors of the link crate: TLS settings whose files cannot be loaded (named by field and path),
//! and why a link's client options could not be built (which broker, which setting).

use std::path::PathBuf;
use thiserror::Error;

/// Why the client options of a link could not be built. Retrying does not help until the
/// configuration, the environment or the files are fixed.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The password could not be resolved (`password_env` names an unset variable).
    #[error("{0}")]
    Secret(String),
    /// The TLS files of the link could not be loaded.
    #[error("mqtt link to {broker}: {source}")]
    Tls {
        /// The link's primary broker, `host:port`.
        broker: String,
        /// Which file or setting, and why.
        source: TlsError,
    },
}

/// Why a link's `tls:` settings could not be turned into a TLS client configuration. Messages name
/// the field and the file, never the file's contents. Retrying does not help until the file or the
/// setting is fixed.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file named in the settings could not be read (missing, unreadable).
    #[error("tls.{field}: cannot read {}: {source}", path.display())]
    Read {
        /// The setting naming the file (`ca_file`, `client_cert_file`, `client_key_file`).
        field: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file was read but does not hold what the setting expects (no PEM certificate, no key,
    /// malformed PEM, a certificate unusable as a trust anchor).
    #[error("tls.{field}: {}: {detail}", path.display())]
    Invalid {
        /// The setting naming the file.
        field: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// What is wrong, without quoting the file.
        detail: String,
    },
    /// `server_name` is neither a DNS name nor an IP address.
    #[error("tls.server_name: not a DNS name or an IP address: {name:?}")]
    ServerName {
        /// The configured name.
        name: String,
    },
    /// Only one of `client_cert_file` and `client_key_file` is set.
    #[error("tls: client_cert_file and client_key_file must be set together")]
    ClientAuthIncomplete,
    /// The client certificate and key were read but rustls refused them (e.g. the key does not
    /// belong to the certificate).
    #[error("tls.client_cert_file {} and tls.client_key_file {}: {detail}", cert.display(), key.display())]
    ClientAuth {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        detail: String,
    },
    /// The crypto provider could not be set up with the default protocol versions (not expected
    /// with the bundled ring provider).
    #[error("tls: {detail}")]
    Rejected {
        /// rustls's reason.
        detail: String,
    },
}
