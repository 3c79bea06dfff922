//! Workload identities: SPIFFE IDs `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing is strict (an identity is compared byte for byte in
//! authorization, so there must be exactly one spelling of each): lowercase
//! trust domain of DNS characters, namespace and service account as DNS
//! labels, no query, fragment, port, user info, empty or extra segments.

use std::fmt;

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("must start with spiffe://")]
    Scheme,
    #[error("trust domain {0:?} is not a lowercase DNS name")]
    TrustDomain(String),
    #[error("path must be /ns/<namespace>/sa/<service-account>")]
    Path,
    #[error("{what} {value:?} is not a DNS label (1-63 of a-z, 0-9, '-')")]
    Label { what: &'static str, value: String },
    #[error("server name {0:?} does not encode a workload identity")]
    ServerName(String),
}

/// A workload identity in one trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// The suffix of the TLS server names Ferry uses to ask a peer node for one
/// of its workloads' certificates (see [`Identity::server_name`]).
pub const SERVER_NAME_SUFFIX: &str = "ferry-identity.invalid";

/// True for a DNS label: 1-63 of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// True for a trust domain: a lowercase DNS name of labels (max 255 bytes).
pub fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.split('.').all(valid_label)
}

impl Identity {
    /// Builds an identity, checking each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, IdentityError> {
        if !valid_trust_domain(trust_domain) {
            return Err(IdentityError::TrustDomain(trust_domain.to_owned()));
        }
        for (what, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if !valid_label(value) {
                return Err(IdentityError::Label {
                    what,
                    value: value.to_owned(),
                });
            }
        }
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://td/ns/NS/sa/SA`.
    pub fn parse(uri: &str) -> Result<Identity, IdentityError> {
        let rest = uri.strip_prefix("spiffe://").ok_or(IdentityError::Scheme)?;
        let (td, path) = rest.split_once('/').ok_or(IdentityError::Path)?;
        if !valid_trust_domain(td) {
            return Err(IdentityError::TrustDomain(td.to_owned()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => Identity::new(td, ns, sa),
            _ => Err(IdentityError::Path),
        }
    }

    /// The SPIFFE ID, `spiffe://td/ns/NS/sa/SA`.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// The TLS server name a client sends to ask the peer node to present
    /// this identity: `SA.NS.ferry-identity.invalid`. (The trust domain is
    /// the cluster's own and is checked on the certificate; namespaces and
    /// service accounts are DNS labels, so the name is a valid DNS name.)
    pub fn server_name(&self) -> String {
        format!(
            "{}.{}.{SERVER_NAME_SUFFIX}",
            self.service_account, self.namespace
        )
    }

    /// The inverse of [`Identity::server_name`], in `trust_domain`.
    pub fn from_server_name(name: &str, trust_domain: &str) -> Result<Identity, IdentityError> {
        let bad = || IdentityError::ServerName(name.to_owned());
        let head = name
            .strip_suffix(SERVER_NAME_SUFFIX)
            .and_then(|h| h.strip_suffix('.'))
            .ok_or_else(bad)?;
        let (sa, ns) = head.split_once('.').ok_or_else(bad)?;
        Identity::new(trust_domain, ns, sa).map_err(|_| bad())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_canonical_form() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.service_account, "web");
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(Identity::parse(&id.uri()).unwrap(), id);
    }

    #[test]
    fn rejects_every_other_spelling() {
        for (uri, want) in [
            ("http://cluster.local/ns/a/sa/b", IdentityError::Scheme),
            ("SPIFFE://cluster.local/ns/a/sa/b", IdentityError::Scheme),
            ("spiffe://cluster.local", IdentityError::Path),
            ("spiffe://cluster.local/", IdentityError::Path),
            ("spiffe://cluster.local/ns/a/sa/b/", IdentityError::Path),
            ("spiffe://cluster.local/ns/a/sa/b/c", IdentityError::Path),
            ("spiffe://cluster.local/ns/a/sa", IdentityError::Path),
            ("spiffe://cluster.local/sa/b/ns/a", IdentityError::Path),
            ("spiffe://cluster.local//ns/a/sa/b", IdentityError::Path),
            (
                "spiffe://Cluster.local/ns/a/sa/b",
                IdentityError::TrustDomain("Cluster.local".into()),
            ),
            (
                "spiffe://cluster.local:443/ns/a/sa/b",
                IdentityError::TrustDomain("cluster.local:443".into()),
            ),
            (
                "spiffe://u@cluster.local/ns/a/sa/b",
                IdentityError::TrustDomain("u@cluster.local".into()),
            ),
            (
                "spiffe:///ns/a/sa/b",
                IdentityError::TrustDomain(String::new()),
            ),
            (
                "spiffe://cluster.local/ns/A/sa/b",
                IdentityError::Label {
                    what: "namespace",
                    value: "A".into(),
                },
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b?x=1",
                IdentityError::Label {
                    what: "service account",
                    value: "b?x=1".into(),
                },
            ),
            (
                "spiffe://cluster.local/ns/a/sa/-b",
                IdentityError::Label {
                    what: "service account",
                    value: "-b".into(),
                },
            ),
            (
                "spiffe://cluster.local/ns//sa/b",
                IdentityError::Label {
                    what: "namespace",
                    value: String::new(),
                },
            ),
        ] {
            assert_eq!(Identity::parse(uri), Err(want), "{uri}");
        }
    }

    #[test]
    fn server_name_round_trips_and_rejects_others() {
        let id = Identity::new("example.org", "shop", "web").unwrap();
        let name = id.server_name();
        assert_eq!(name, "web.shop.ferry-identity.invalid");
        assert_eq!(Identity::from_server_name(&name, "example.org"), Ok(id));
        for bad in [
            "web.ferry-identity.invalid",
            "ferry-identity.invalid",
            "x.web.shop.ferry-identity.invalid",
            "web.shop.example.com",
            "Web.shop.ferry-identity.invalid",
        ] {
            assert!(
                Identity::from_server_name(bad, "example.org").is_err(),
                "{bad}"
            );
        }
    }
}
