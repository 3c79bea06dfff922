//! Who signs workload certificates: the [`Signer`] interface and the
//! embedded CA ([`LocalCa`]).
//!
//! Ferry generates each workload's key pair itself, in memory, and sends the
//! signer a PKCS#10 request (proof of possession of the key) plus the
//! identity it asks for. The signer decides what goes in the certificate: the
//! embedded CA takes only the public key from the request and writes the
//! SPIFFE URI SAN, validity and usages itself. A remote signer (the
//! Kubernetes CSR API, an external CA) implements the same trait.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

use super::TlsError;
use super::identity::Identity;

/// A signing request: the identity asked for and a PKCS#10 request (DER)
/// signed with the workload's new key.
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub identity: Identity,
    pub csr_der: Vec<u8>,
    pub lifetime: Duration,
}

/// What a signer returns: the leaf first, then any intermediates.
#[derive(Debug, Clone)]
pub struct Signed {
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A boxed future, so that [`Signer`] stays object safe.
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Signed, TlsError>> + Send + 'a>>;

/// Issues workload certificates.
pub trait Signer: Send + Sync + fmt::Debug {
    /// Signs one request (may wait on a remote service).
    fn sign(&self, request: SignRequest) -> SignFuture<'_>;
    /// The CA certificates certificates from this signer chain to.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

/// Leaves are valid from this long before they are issued, so a peer whose
/// clock is slightly behind still accepts them.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A CA whose key is held in this process.
pub struct LocalCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> TlsError {
    move |e| TlsError::Certificate {
        what,
        reason: e.to_string(),
    }
}

impl LocalCa {
    /// A new self-signed CA with a fresh P-256 key, valid for ten years; the
    /// key never leaves memory.
    pub fn generate(trust_domain: &str) -> Result<LocalCa, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc("CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry");
        dn.push(DnType::CommonName, format!("ferry CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
        let cert = params.self_signed(&key).map_err(rc("CA certificate"))?;
        Ok(LocalCa {
            trust_domain: trust_domain.to_owned(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from PEM text (certificate and PKCS#8 key), e.g. read from a
    /// Kubernetes Secret mounted as files.
    pub fn from_pem(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<LocalCa, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let key = KeyPair::from_pem(key_pem).map_err(rc("CA key"))?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            TlsError::Certificate {
                what: "CA certificate",
                reason: e.to_string(),
            }
        })?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(rc("CA certificate"))?;
        Ok(LocalCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
            cert,
        })
    }

    /// The CA certificate and key as PEM (`ferry ca init`, test
    /// topologies). The agent never writes a key.
    pub fn to_pem(&self) -> (String, String) {
        let cert = pem_block("CERTIFICATE", &self.cert);
        (cert, self.issuer.key().serialize_pem())
    }

    /// The CA certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Signs `request` with an explicit validity (tests use this to make
    /// expired and not-yet-valid certificates).
    pub fn sign_with_validity(
        &self,
        request: &SignRequest,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Signed, TlsError> {
        if request.identity.trust_domain != self.trust_domain {
            return Err(TlsError::Certificate {
                what: "signing request",
                reason: format!(
                    "identity {} is outside this CA's trust domain {}",
                    request.identity, self.trust_domain
                ),
            });
        }
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            request.csr_der.as_slice(),
        ))
        .map_err(rc("signing request"))?;
        let mut params = CertificateParams::default();
        // SPIFFE X.509-SVID: the identity is the one URI SAN; the subject
        // carries nothing that authorization reads.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry");
        params.distinguished_name = dn;
        let uri = request
            .identity
            .uri()
            .try_into()
            .map_err(rc("identity URI"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(rand::random::<u64>().into());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rc("leaf certificate"))?;
        Ok(Signed {
            chain: vec![cert.der().clone()],
            not_before,
            not_after,
        })
    }
}

impl Signer for LocalCa {
    fn sign(&self, request: SignRequest) -> SignFuture<'_> {
        let now = SystemTime::now();
        let r = self.sign_with_validity(&request, now - CLOCK_SKEW, now + request.lifetime);
        Box::pin(std::future::ready(r))
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }
}

/// A new in-memory P-256 key and a signing request for `identity`.
pub fn new_key_and_csr(identity: &Identity) -> Result<(KeyPair, Vec<u8>), TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc("workload key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity.uri().try_into().map_err(rc("identity URI"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(rc("signing request"))?;
    Ok((key, csr.der().to_vec()))
}

/// PEM armour for one DER object.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(B64[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
