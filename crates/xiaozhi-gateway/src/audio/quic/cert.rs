//! The QUIC endpoint's certificate, and the pin a client checks it against.
//!
//! Devices have no CA store worth trusting, so the hello carries the SHA-256 of the
//! server's DER certificate and the client accepts exactly that certificate (still
//! checking the TLS 1.3 handshake signature, so only the holder of its key can answer).
//! That makes a self-signed certificate as good as any: with no `quic.cert_path` the
//! gateway makes one at start-up. With one, the certificate reloads like the MQTT
//! listener's ([`crate::tls`]) and each hello carries the current pin.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, verify_tls13_signature};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, DigitallySignedStruct, SignatureScheme};

use crate::tls::{ReloadingCert, TlsError};

/// Where the endpoint's certificate comes from.
#[derive(Clone)]
pub enum ServerIdentity {
    /// PEM files, reloaded on change.
    Files(Arc<ReloadingCert>),
    /// Made at start-up for this process.
    Generated {
        cert: CertificateDer<'static>,
        key: Arc<PrivateKeyDer<'static>>,
    },
}

impl ServerIdentity {
    /// A fresh self-signed certificate naming `host`.
    pub fn generate(host: &str) -> Result<ServerIdentity, TlsError> {
        let certified = rcgen::generate_simple_self_signed(vec![host.to_owned()]).map_err(|e| {
            TlsError::Invalid {
                path: "<generated QUIC certificate>".into(),
                reason: e.to_string(),
            }
        })?;
        Ok(ServerIdentity::Generated {
            cert: certified.cert.der().clone(),
            key: Arc::new(PrivateKeyDer::Pkcs8(
                certified.signing_key.serialize_der().into(),
            )),
        })
    }

    /// The SHA-256 of the DER certificate handshakes present now.
    pub fn fingerprint(&self) -> [u8; 32] {
        match self {
            ServerIdentity::Files(cert) => Sha256::digest(cert.current_der()).into(),
            ServerIdentity::Generated { cert, .. } => Sha256::digest(cert.as_ref()).into(),
        }
    }

    /// A TLS 1.3 server configuration with the given ALPN.
    pub fn server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let invalid = |reason: String| TlsError::Invalid {
            path: "<QUIC certificate>".into(),
            reason,
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid(e.to_string()))?
            .with_no_client_auth();
        let mut config = match self {
            ServerIdentity::Files(cert) => builder.with_cert_resolver(cert.clone()),
            ServerIdentity::Generated { cert, key } => builder
                .with_single_cert(vec![cert.clone()], key.clone_key())
                .map_err(|e| invalid(e.to_string()))?,
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the certificate whose SHA-256 the hello named.
#[derive(Debug)]
pub struct PinnedCert {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCert {
    pub fn new(sha256: [u8; 32]) -> Arc<PinnedCert> {
        Arc::new(PinnedCert {
            sha256,
            provider: provider(),
        })
    }

    /// A TLS 1.3 client configuration that trusts only the pinned certificate.
    pub fn client_config(self: Arc<Self>, alpn: &[u8]) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(self)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if bool::from(subtle::ConstantTimeEq::ct_eq(&seen[..], &self.sha256[..])) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate SHA-256 {} is not the pinned {}",
                hex::encode(seen),
                hex::encode(self.sha256)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("QUIC is TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
