//! TLS server certificates that are replaced without a restart.
//!
//! Certificates expire (Let's Encrypt every 90 days) and a gateway holding ten thousand
//! device connections should not drop them all to pick up a renewed one. So every TLS
//! listener (device MQTT on 8883, the broker listener) resolves its certificate through a
//! [`ReloadingCert`]: each new handshake takes whatever certificate is current, and
//! [`watch`] replaces it when the operator sends SIGHUP or when the PEM files change on
//! disk (checked every few seconds by modification time, size and inode, so an atomic
//! rename by certbot is seen too). Connections already open keep the session they
//! negotiated.
//!
//! A reload that fails (a half-written file, a key that does not match the certificate)
//! is logged and counted, and the previous certificate stays in use; the next change to
//! either file is tried again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// How often the certificate files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no certificate found (expected PEM \"CERTIFICATE\" blocks)")]
    NoCertificate(PathBuf),
    #[error("{0}: no private key found (expected a PEM private key)")]
    NoKey(PathBuf),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// What identifies a version of a file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    })
}

/// A certificate and key from PEM files, replaceable while in use.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' stamps at the last load attempt.
    stamps: Mutex<(Option<FileStamp>, Option<FileStamp>)>,
}

impl ReloadingCert {
    /// Loads the certificate chain and key; fails if either is missing, unreadable or
    /// they do not belong together.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = (stamp(cert_path), stamp(key_path));
        let certified = read_certified_key(cert_path, key_path, &provider)?;
        Ok(Arc::new(ReloadingCert {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: RwLock::new(Arc::new(certified)),
            stamps: Mutex::new(stamps),
        }))
    }

    /// A TLS acceptor whose handshakes use the current certificate.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                path: self.cert_path.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reads the files again and, if they load, makes them current.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        let certified = read_certified_key(&self.cert_path, &self.key_path, &self.provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certified);
        Ok(())
    }

    /// Reloads if either file changed since the last attempt; `Ok(false)` if neither did.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        let changed = *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now;
        if !changed {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// The DER end-entity certificate in use now.
    pub fn current_der(&self) -> Vec<u8> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current.cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn read_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError::Invalid {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| TlsError::NoKey(key_path.to_owned()))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::Invalid {
        path: key_path.to_owned(),
        reason: format!("{e} (does the key belong to {}?)", cert_path.display()),
    })
}

/// Reloads every certificate on SIGHUP, and each one whose files changed every
/// `interval`, until `stop` fires.
pub async fn watch(
    certs: Vec<(&'static str, Arc<ReloadingCert>)>,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    if certs.is_empty() {
        return;
    }
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; certificates reload on file change only");
            None
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        #[cfg(unix)]
        let hangup_recv = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup_recv = std::future::pending::<Option<()>>();
        let forced = tokio::select! {
            _ = stop.cancelled() => return,
            _ = hangup_recv => true,
            _ = tick.tick() => false,
        };
        for (listener, cert) in &certs {
            let outcome = if forced {
                cert.reload().map(|()| true)
            } else {
                cert.reload_if_changed()
            };
            match outcome {
                Ok(false) => {}
                Ok(true) => {
                    Metrics::inc(&metrics.tls_reloads);
                    info!(listener, cert = %cert.cert_path().display(), trigger = if forced { "SIGHUP" } else { "file change" }, "TLS certificate reloaded; new handshakes use it");
                }
                Err(e) => {
                    Metrics::inc(&metrics.tls_reload_failures);
                    warn!(listener, error = %e, "TLS certificate reload failed; the previous certificate stays in use");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let cert = dir.join("server.pem");
        let key = dir.join("server.key");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        (cert, key, certified.cert.der().to_vec())
    }

    #[test]
    fn reloads_changed_files_and_keeps_the_old_cert_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = write_pair(dir.path(), "one.test");
        let reloading = ReloadingCert::load(&cert, &key).unwrap();
        assert_eq!(reloading.current_der(), first);
        assert!(!reloading.reload_if_changed().unwrap(), "nothing changed");

        // A certificate whose key has not been written yet: refused, old one kept.
        let other = rcgen::generate_simple_self_signed(vec!["two.test".to_owned()]).unwrap();
        std::fs::write(&cert, other.cert.pem()).unwrap();
        let e = reloading.reload().unwrap_err();
        assert!(e.to_string().contains("does the key belong"), "{e}");
        assert_eq!(reloading.current_der(), first);

        // The matching key arrives: the change is seen and loaded.
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        assert!(reloading.reload_if_changed().unwrap());
        assert_eq!(reloading.current_der(), other.cert.der().to_vec());
    }

    #[test]
    fn clear_errors_for_missing_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing =
            ReloadingCert::load(&dir.path().join("nope.pem"), &dir.path().join("nope.key"))
                .unwrap_err();
        assert!(missing.to_string().contains("nope.pem"), "{missing}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = ReloadingCert::load(&empty, &empty).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate(_)), "{e}");
    }
}
