//! Workload certificates held in memory, one per local identity, and their
//! rotation schedule.
//!
//! Every key is generated here and lives only in this process (the
//! `rustls::sign::SigningKey` made from it); nothing is written to disk.
//! A certificate is renewed at half its lifetime: [`CertStore::rotate_due`]
//! replaces it in place, so the next handshake presents the new one while
//! connections already established keep theirs (TLS does not re-check a
//! certificate after the handshake), and no connection is dropped.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::metrics::counter::Counter;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use super::TlsError;
use super::identity::Identity;
use super::signer::{SignRequest, Signer, new_key_and_csr};

/// One identity's current certificate.
#[derive(Debug)]
pub struct Leaf {
    pub identity: Identity,
    pub key: Arc<CertifiedKey>,
    pub issued: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// 1 for the first certificate of this identity, +1 per rotation.
    pub generation: u64,
    /// The certificate's serial number (hex), as logged by peers.
    pub serial: String,
}

impl Leaf {
    /// When this certificate is due for renewal: half way from issue to expiry.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.issued, self.not_after)
    }

    /// The serial-free fingerprint tests compare: the leaf's DER.
    pub fn der(&self) -> &[u8] {
        self.key.cert.first().map(|c| c.as_ref()).unwrap_or(&[])
    }
}

/// Half way from `issued` to `not_after` (at `issued` if already expired).
pub fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or(Duration::ZERO);
    issued + life / 2
}

/// The certificates of this node's workloads.
#[derive(Debug)]
pub struct CertStore {
    signer: Arc<dyn Signer>,
    provider: Arc<CryptoProvider>,
    lifetime: Duration,
    leaves: RwLock<HashMap<Identity, Arc<Leaf>>>,
    issued: OnceLock<Counter>,
}

impl CertStore {
    pub fn new(
        signer: Arc<dyn Signer>,
        provider: Arc<CryptoProvider>,
        lifetime: Duration,
    ) -> CertStore {
        CertStore {
            signer,
            provider,
            lifetime,
            leaves: RwLock::new(HashMap::new()),
            issued: OnceLock::new(),
        }
    }

    /// Counts every certificate issued from now on in `counter`.
    pub fn count_issues(&self, counter: Counter) {
        let _ = self.issued.set(counter);
    }

    pub fn signer(&self) -> &Arc<dyn Signer> {
        &self.signer
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The current certificate of `identity`, if one was issued.
    pub fn get(&self, identity: &Identity) -> Option<Arc<Leaf>> {
        self.leaves
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .cloned()
    }

    /// Identities that hold a certificate.
    pub fn identities(&self) -> Vec<Identity> {
        self.leaves
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Issues a new certificate for `identity` and makes it current.
    pub async fn issue(&self, identity: &Identity) -> Result<Arc<Leaf>, TlsError> {
        let (key, csr_der) = new_key_and_csr(identity)?;
        let issued = SystemTime::now();
        let signed = self
            .signer
            .sign(SignRequest {
                identity: identity.clone(),
                csr_der,
                lifetime: self.lifetime,
            })
            .await?;
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(TlsError::Rustls)?;
        let certified = Arc::new(CertifiedKey::new(signed.chain, signing_key));
        let mut map = self.leaves.write().unwrap_or_else(|e| e.into_inner());
        let generation = map.get(identity).map_or(1, |l| l.generation + 1);
        let serial =
            super::verify::serial_of(certified.cert.first().map_or(&[][..], |c| c.as_ref()));
        let leaf = Arc::new(Leaf {
            serial,
            identity: identity.clone(),
            key: certified,
            issued,
            not_before: signed.not_before,
            not_after: signed.not_after,
            generation,
        });
        map.insert(identity.clone(), leaf.clone());
        if let Some(c) = self.issued.get() {
            c.inc();
        }
        Ok(leaf)
    }

    /// Makes sure every identity in `wanted` has a certificate and drops the
    /// certificates of identities no longer wanted.
    pub async fn sync(&self, wanted: &[Identity]) -> Result<(), TlsError> {
        for id in wanted {
            if self.get(id).is_none() {
                let leaf = self.issue(id).await?;
                info!(identity = %id, serial = %leaf.serial, not_after = ?leaf.not_after, "workload certificate issued");
            }
        }
        self.leaves
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| wanted.contains(id));
        Ok(())
    }

    /// Renews every certificate due at `now`; returns how many were renewed.
    /// A failed renewal is logged and retried on the next call while the old
    /// certificate stays in use.
    pub async fn rotate_due(&self, now: SystemTime) -> usize {
        let due: Vec<Identity> = self
            .leaves
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|l| l.renew_at() <= now)
            .map(|l| l.identity.clone())
            .collect();
        self.renew(due).await
    }

    /// Renews every certificate now (forced rotation).
    pub async fn rotate_all(&self) -> usize {
        let all = self.identities();
        self.renew(all).await
    }

    async fn renew(&self, ids: Vec<Identity>) -> usize {
        let mut n = 0;
        for id in ids {
            match self.issue(&id).await {
                Ok(leaf) => {
                    n += 1;
                    info!(identity = %id, generation = leaf.generation, serial = %leaf.serial, not_after = ?leaf.not_after, "workload certificate rotated");
                }
                Err(e) => {
                    warn!(identity = %id, error = %e, "certificate renewal failed; keeping the current one")
                }
            }
        }
        n
    }

    /// The earliest renewal time among current certificates.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.leaves
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|l| l.renew_at())
            .min()
    }
}

/// Renews certificates as they come due until `stop` fires. Wakes at the
/// next renewal time (at most a minute apart, at least 200 ms).
pub async fn run_rotation(store: Arc<CertStore>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let wait = store
            .next_renewal()
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO)
            .clamp(Duration::from_millis(200), Duration::from_secs(60));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        store.rotate_due(SystemTime::now()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::signer::LocalCa;
    use crate::tls::verify::identity_of;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).unwrap()
    }

    fn store(lifetime: Duration) -> (Arc<LocalCa>, CertStore) {
        let ca = Arc::new(LocalCa::generate("cluster.local").unwrap());
        let s = CertStore::new(ca.clone(), crate::tls::provider(), lifetime);
        (ca, s)
    }

    #[test]
    fn renewal_is_at_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(86400)),
            t0 + Duration::from_secs(43200)
        );
        // Already expired (clock jumped): due at once.
        assert_eq!(renew_at(t0, t0 - Duration::from_secs(5)), t0);
    }

    #[tokio::test]
    async fn issues_a_leaf_with_the_identity_and_lifetime() {
        let (_ca, s) = store(Duration::from_secs(3600));
        let leaf = s.issue(&id("web")).await.unwrap();
        assert_eq!(identity_of(leaf.der(), "cluster.local").unwrap(), id("web"));
        // Outside the trust domain the same certificate is refused.
        assert!(identity_of(leaf.der(), "example.org").is_err());
        let life = leaf.not_after.duration_since(leaf.issued).unwrap();
        assert!(life >= Duration::from_secs(3599) && life <= Duration::from_secs(3601));
        let skew = leaf.issued.duration_since(leaf.not_before).unwrap();
        assert!(
            skew <= crate::tls::signer::CLOCK_SKEW
                && skew + Duration::from_secs(1) >= crate::tls::signer::CLOCK_SKEW,
            "valid from one clock skew before issue: {skew:?}"
        );
        let half = leaf.renew_at().duration_since(leaf.issued).unwrap();
        assert!(
            half.abs_diff(Duration::from_secs(1800)) < Duration::from_secs(1),
            "rotation at half life: {half:?}"
        );
        let (_, x) = x509_parser::parse_x509_certificate(leaf.der()).unwrap();
        assert!(!x.is_ca());
        assert_eq!(
            x.validity().not_after.timestamp(),
            leaf.not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
        );
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
    }

    #[tokio::test]
    async fn rotation_replaces_only_what_is_due() {
        let (_ca, s) = store(Duration::from_secs(100));
        s.sync(&[id("a"), id("b")]).await.unwrap();
        let a1 = s.get(&id("a")).unwrap();
        let b1 = s.get(&id("b")).unwrap();
        // Before half life nothing is due.
        assert_eq!(s.rotate_due(a1.issued + Duration::from_secs(49)).await, 0);
        assert_eq!(s.get(&id("a")).unwrap().generation, 1);
        // At half life both are.
        assert_eq!(s.rotate_due(a1.issued + Duration::from_secs(51)).await, 2);
        let a2 = s.get(&id("a")).unwrap();
        assert_eq!(a2.generation, 2);
        assert_ne!(a2.der(), a1.der(), "a new certificate");
        assert_ne!(s.get(&id("b")).unwrap().der(), b1.der());
        assert_eq!(s.rotate_all().await, 2);
        assert_eq!(s.get(&id("b")).unwrap().generation, 3);
        // Dropping an identity drops its certificate.
        s.sync(&[id("b")]).await.unwrap();
        assert!(s.get(&id("a")).is_none());
        assert_eq!(s.identities(), vec![id("b")]);
    }

    #[tokio::test]
    async fn ca_round_trips_through_pem_and_refuses_other_domains() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let (cert, key) = ca.to_pem();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----\n"));
        let again = LocalCa::from_pem("cluster.local", &cert, &key).unwrap();
        assert_eq!(again.certificate(), ca.certificate());
        let (_k, csr) = crate::tls::signer::new_key_and_csr(&id("web")).unwrap();
        let other = Identity::new("example.org", "default", "web").unwrap();
        let r = again
            .sign(crate::tls::signer::SignRequest {
                identity: other,
                csr_der: csr.clone(),
                lifetime: Duration::from_secs(60),
            })
            .await;
        assert!(r.is_err(), "outside the CA's trust domain");
        // A request whose signature does not verify is refused.
        let mut broken = csr;
        let n = broken.len();
        broken[n - 3] ^= 0x55;
        let r = again
            .sign(crate::tls::signer::SignRequest {
                identity: id("web"),
                csr_der: broken,
                lifetime: Duration::from_secs(60),
            })
            .await;
        assert!(r.is_err(), "tampered signing request");
        assert!(LocalCa::from_pem("cluster.local", "junk", &key).is_err());
    }
}
