//! Workload identities and mutual TLS between node proxies.
//!
//! * [`identity`]: SPIFFE IDs `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//! * [`signer`]: the [`Signer`] interface and the embedded CA.
//! * [`store`]: per-identity certificates in memory, rotated at half life.
//! * [`verify`]: peer certificate and identity checks.
//!
//! [`TlsContext`] builds the rustls configurations the HBONE tunnel uses:
//! TLS 1.3 only, ALPN `h2`, mutual authentication, no session resumption
//! (every connection is a full handshake that presents the current
//! certificate, and pooling makes handshakes rare). The client presents the
//! certificate of the pod that opened the connection and checks the peer
//! presents the identity the endpoint should have; the server presents the
//! identity the client asked for by server name, if it is one of this node's
//! workloads, and requires a client certificate from the trust bundle.

pub mod identity;
pub mod signer;
pub mod store;
pub mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

pub use identity::Identity;
pub use signer::{LocalCa, Signer};
pub use store::CertStore;

/// ALPN protocol of the tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors of the TLS module.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    Certificate { what: &'static str, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificates { path: PathBuf },
    #[error("peer identity: {0}")]
    PeerIdentity(String),
    #[error("rustls: {0}")]
    Rustls(#[source] rustls::Error),
    #[error("trust bundle: {0}")]
    Verifier(String),
}

/// The crypto provider: aws-lc-rs (chosen by measurement; see
/// tests/bench/PROVIDER.md).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Makes [`provider`] the process-wide rustls default. The binary links
/// two providers (aws-lc-rs for the tunnel; ring, which the Kubernetes
/// client's TLS stack enables), and rustls then refuses to guess: code that
/// uses the default (`ClientConfig::builder()`, as the Kubernetes client
/// does) would panic. Called at start; calling it again does nothing.
pub fn install_process_default() {
    if CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// Reads every certificate of a PEM file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The TLS state of one agent: certificates, trust bundle, configurations.
#[derive(Debug)]
pub struct TlsContext {
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    store: Arc<CertStore>,
    roots: Arc<ArcSwap<RootCertStore>>,
    server: ArcSwap<ServerConfig>,
    clients: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

impl TlsContext {
    /// A context trusting `signer`'s roots plus `extra_roots`.
    pub fn new(
        trust_domain: &str,
        signer: Arc<dyn Signer>,
        extra_roots: Vec<CertificateDer<'static>>,
        lifetime: Duration,
    ) -> Result<TlsContext, TlsError> {
        let provider = provider();
        let store = Arc::new(CertStore::new(signer, provider.clone(), lifetime));
        let roots = roots_of(store.signer().roots(), extra_roots)?;
        let server = build_server(&provider, &store, roots.clone(), trust_domain)?;
        Ok(TlsContext {
            trust_domain: trust_domain.to_owned(),
            provider,
            store,
            roots: Arc::new(ArcSwap::from(roots)),
            server: ArcSwap::from(server),
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// Replaces the trust bundle (the signer's roots plus `extra_roots`):
    /// the next handshake on either side uses it; established connections
    /// are not touched.
    pub fn set_trust_bundle(
        &self,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<(), TlsError> {
        let roots = roots_of(self.store.signer().roots(), extra_roots)?;
        let server = build_server(
            &self.provider,
            &self.store,
            roots.clone(),
            &self.trust_domain,
        )?;
        self.roots.store(roots);
        self.server.store(server);
        Ok(())
    }

    /// The server configuration in force now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.load_full()
    }

    /// The client configuration for connections opened on behalf of `source`.
    pub fn client_config(&self, source: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(source) {
            return Ok(c.clone());
        }
        let verifier = Arc::new(verify::PeerVerifier {
            roots: self.roots.clone(),
            trust_domain: self.trust_domain.clone(),
            algorithms: self.provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(ClientCert {
                store: self.store.clone(),
                identity: source.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        clients.insert(source.clone(), config.clone());
        Ok(config)
    }
}

fn roots_of(
    signer_roots: Vec<CertificateDer<'static>>,
    extra: Vec<CertificateDer<'static>>,
) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in signer_roots.into_iter().chain(extra) {
        roots.add(c).map_err(TlsError::Rustls)?;
    }
    Ok(Arc::new(roots))
}

fn build_server(
    provider: &Arc<CryptoProvider>,
    store: &Arc<CertStore>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ServerCert {
            store: store.clone(),
            trust_domain: trust_domain.to_owned(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// Presents the current certificate of one source identity.
#[derive(Debug)]
struct ClientCert {
    store: Arc<CertStore>,
    identity: Identity,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.get(&self.identity).map(|l| l.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Presents the certificate of the local workload identity the client asked
/// for by server name; no name or an identity that is not local: no
/// certificate, and the handshake fails.
#[derive(Debug)]
struct ServerCert {
    store: Arc<CertStore>,
    trust_domain: String,
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let id = Identity::from_server_name(name, &self.trust_domain).ok()?;
        self.store.get(&id).map(|l| l.key.clone())
    }
}

/// The CA and trust bundle a configuration names.
pub fn context_from_config(cfg: &crate::config::Tls) -> Result<TlsContext, TlsError> {
    let signer: Arc<dyn Signer> = match &cfg.ca {
        crate::config::CaSource::Generate => Arc::new(LocalCa::generate(&cfg.trust_domain)?),
        crate::config::CaSource::Files { cert, key } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|source| TlsError::Read {
                    path: p.clone(),
                    source,
                })
            };
            Arc::new(LocalCa::from_pem(
                &cfg.trust_domain,
                &read(cert)?,
                &read(key)?,
            )?)
        }
    };
    let extra = match &cfg.trust_bundle {
        Some(p) => read_pem_certs(p)?,
        None => Vec::new(),
    };
    TlsContext::new(&cfg.trust_domain, signer, extra, cfg.leaf_lifetime)
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_default_is_installed_once_and_usable() {
        super::install_process_default();
        super::install_process_default();
        // Would panic with two providers linked and no default.
        let _ = rustls::ClientConfig::builder();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
