//! Peer verification: chains to the trust bundle, and the SPIFFE identity in
//! the one URI SAN.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_parser::extensions::GeneralName;

use super::TlsError;
use super::identity::Identity;

/// The workload identity a certificate carries: exactly one URI SAN, a
/// valid SPIFFE workload ID in `trust_domain`.
pub fn identity_of(cert: &[u8], trust_domain: &str) -> Result<Identity, TlsError> {
    let bad = |reason: String| TlsError::PeerIdentity(reason);
    let (_, x) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| bad(format!("unparsable certificate: {e}")))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| bad(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| bad("no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(bad(format!(
            "expected exactly one URI SAN, found {}",
            uris.len()
        )));
    };
    let id = Identity::parse(uri).map_err(|e| bad(format!("{uri:?}: {e}")))?;
    if id.trust_domain != trust_domain {
        return Err(bad(format!(
            "{id} is outside the trust domain {trust_domain}"
        )));
    }
    Ok(id)
}

/// A certificate's serial number as lowercase hex (for logs: which
/// certificate a peer presented); empty if it does not parse.
pub fn serial_of(cert: &[u8]) -> String {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, x)| x.raw_serial_as_string().replace(':', ""))
        .unwrap_or_default()
}

/// The client side's check of the peer node: the certificate chains to the
/// trust bundle (read at each handshake, so a reloaded bundle applies to the
/// next connection) and names exactly the identity the endpoint should have,
/// which the client encoded in the server name.
#[derive(Debug)]
pub struct PeerVerifier {
    pub roots: Arc<ArcSwap<RootCertStore>>,
    pub trust_domain: String,
    pub algorithms: WebPkiSupportedAlgorithms,
}

fn other(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        TlsError::PeerIdentity(msg),
    ))))
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ServerName::DnsName(name) = server_name else {
            return Err(other("server name is not an identity name".into()));
        };
        let expected = Identity::from_server_name(name.as_ref(), &self.trust_domain)
            .map_err(|e| other(e.to_string()))?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots.load(),
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let got = identity_of(end_entity, &self.trust_domain).map_err(|e| other(e.to_string()))?;
        if got != expected {
            return Err(other(format!("peer presented {got}, expected {expected}")));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
