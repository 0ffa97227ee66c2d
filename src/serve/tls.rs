//! HTTPS with rustls: the certificate chain and key read from PEM files, HTTP/2 or HTTP/1.1 chosen by
//! ALPN, and the files watched so that a renewed certificate is served without a restart. A file that
//! cannot be read, or a key that does not match its certificate, keeps the certificate in use and says
//! so in the log; at start it is an error.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// How often the files are looked at for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// ALPN protocol id of HTTP/2.
pub(super) const H2: &[u8] = b"h2";

/// What a connection's handshake needs, and the watcher that keeps its certificate current.
#[derive(Clone)]
pub struct Tls {
    pub(super) acceptor: TlsAcceptor,
    certificate: Arc<Current>,
}

impl Tls {
    /// Reads the certificate and key; an error names the file and what is wrong with it.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (key, stamp) = read(files, &provider)?;
        let certificate = Arc::new(Current {
            files: files.clone(),
            provider: provider.clone(),
            key: RwLock::new((Arc::new(key), stamp)),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![H2.to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certificate,
        })
    }

    /// Looks at the files every [`RELOAD_EVERY`] and serves what they hold once it changed and reads
    /// as a valid pair. Runs until dropped.
    pub async fn watch(self) {
        let mut every = tokio::time::interval(RELOAD_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.certificate.reload_if_changed();
        }
    }
}

/// When each file last changed and how long it was: a change to either is a reason to read both.
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(files: &TlsFiles) -> Stamp {
    let of =
        |path: &Path| std::fs::metadata(path).map_or((None, 0), |m| (m.modified().ok(), m.len()));
    [of(&files.cert), of(&files.key)]
}

/// The certificate being served and the stamp of the files it came from.
struct Current {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    key: RwLock<(Arc<CertifiedKey>, Stamp)>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Current {
    fn reload_if_changed(&self) {
        let now = stamp(&self.files);
        let known = match self.key.read() {
            Ok(current) => current.1,
            Err(poisoned) => poisoned.into_inner().1,
        };
        if now == known {
            return;
        }
        match read(&self.files, &self.provider) {
            Ok((key, stamp)) => {
                let mut current = match self.key.write() {
                    Ok(c) => c,
                    Err(poisoned) => poisoned.into_inner(),
                };
                *current = (Arc::new(key), stamp);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                // Not again until the files change once more.
                match self.key.write() {
                    Ok(mut c) => c.1 = now,
                    Err(poisoned) => poisoned.into_inner().1 = now,
                }
                tracing::error!(
                    error = %e,
                    "the TLS files changed but cannot be used; serving the previous certificate"
                );
            }
        }
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.key.read() {
            Ok(current) => current.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        })
    }
}

/// The pair in `files`, checked: a chain, a key the provider can sign with, and the key the chain's
/// leaf certifies.
fn read(files: &TlsFiles, provider: &CryptoProvider) -> anyhow::Result<(CertifiedKey, Stamp)> {
    // The stamp is taken first: a file replaced while it is read is read again at the next look.
    let stamp = stamp(files);
    let cert = files.cert.display();
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("CATRACA_TLS_CERT {cert}: {e}"))?;
    if chain.is_empty() {
        anyhow::bail!("CATRACA_TLS_CERT {cert}: no certificate in the file");
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow::anyhow!("CATRACA_TLS_KEY {}: {e}", files.key.display()))?;
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| anyhow::anyhow!("CATRACA_TLS_CERT {cert} and CATRACA_TLS_KEY: {e}"))?;
    Ok((certified, stamp))
}
