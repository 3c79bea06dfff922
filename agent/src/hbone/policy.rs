//! Inbound L4 authorization: who may reach this node's pods through the
//! tunnel.
//!
//! Evaluation, for a verified source identity and a destination port:
//! 1. any `deny` rule that matches denies;
//! 2. with no `allow` rules, everything else is allowed;
//! 3. otherwise some `allow` rule must match.
//!
//! A rule matches when every list it gives matches (a list matches when one
//! of its entries does; a list left out matches everything).

use crate::config::{Authorization, Rule, RuleAction};
use crate::tls::Identity;

/// Why an inbound stream was refused; the `reason` label of
/// `ferry_authorization_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// A deny rule matched.
    DenyRule,
    /// Allow rules exist and none matched.
    NoAllowRule,
    /// The target is not a pod of this node.
    UnknownDestination,
    /// The target pod's identity is not the one the client asked this node
    /// to present in the TLS handshake.
    IdentityMismatch,
    /// The request is not a well-formed CONNECT.
    BadRequest,
}

impl Denial {
    pub fn reason(self) -> &'static str {
        match self {
            Denial::DenyRule => "deny_rule",
            Denial::NoAllowRule => "no_allow_rule",
            Denial::UnknownDestination => "unknown_destination",
            Denial::IdentityMismatch => "identity_mismatch",
            Denial::BadRequest => "bad_request",
        }
    }
}

fn matches(rule: &Rule, source: &Identity, uri: &str, port: u16) -> bool {
    (rule.identities.is_empty() || rule.identities.iter().any(|i| i == uri))
        && (rule.identity_prefixes.is_empty()
            || rule
                .identity_prefixes
                .iter()
                .any(|p| uri.starts_with(p.as_str())))
        && (rule.namespaces.is_empty() || rule.namespaces.contains(&source.namespace))
        && (rule.ports.is_empty() || rule.ports.contains(&port))
}

/// Decides whether `source` may reach a local pod on `port`.
pub fn authorize(policy: &Authorization, source: &Identity, port: u16) -> Result<(), Denial> {
    let uri = source.uri();
    let mut any_allow = false;
    let mut allowed = false;
    for r in &policy.rules {
        match r.action {
            RuleAction::Deny => {
                if matches(r, source, &uri, port) {
                    return Err(Denial::DenyRule);
                }
            }
            RuleAction::Allow => {
                any_allow = true;
                allowed = allowed || matches(r, source, &uri, port);
            }
        }
    }
    if any_allow && !allowed {
        return Err(Denial::NoAllowRule);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthorizationMode;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    fn rule(action: RuleAction) -> Rule {
        Rule {
            action,
            identities: vec![],
            identity_prefixes: vec![],
            namespaces: vec![],
            ports: vec![],
        }
    }

    fn policy(rules: Vec<Rule>) -> Authorization {
        Authorization {
            mode: AuthorizationMode::Permissive,
            rules,
        }
    }

    #[test]
    fn no_rules_allows() {
        assert_eq!(authorize(&policy(vec![]), &id("a", "b"), 80), Ok(()));
    }

    #[test]
    fn deny_wins_over_allow() {
        let mut allow = rule(RuleAction::Allow);
        allow.namespaces = vec!["shop".into()];
        let mut deny = rule(RuleAction::Deny);
        deny.identities = vec!["spiffe://cluster.local/ns/shop/sa/intruder".into()];
        let p = policy(vec![allow, deny]);
        assert_eq!(authorize(&p, &id("shop", "web"), 80), Ok(()));
        assert_eq!(
            authorize(&p, &id("shop", "intruder"), 80),
            Err(Denial::DenyRule)
        );
        assert_eq!(
            authorize(&p, &id("other", "web"), 80),
            Err(Denial::NoAllowRule)
        );
    }

    #[test]
    fn prefix_exact_namespace_and_port_combine() {
        let mut allow = rule(RuleAction::Allow);
        allow.identity_prefixes = vec!["spiffe://cluster.local/ns/shop/".into()];
        allow.ports = vec![8080, 9090];
        let mut exact = rule(RuleAction::Allow);
        exact.identities = vec!["spiffe://cluster.local/ns/ops/sa/prober".into()];
        let p = policy(vec![allow, exact]);
        assert_eq!(authorize(&p, &id("shop", "web"), 8080), Ok(()));
        assert_eq!(authorize(&p, &id("shop", "web"), 9090), Ok(()));
        assert_eq!(
            authorize(&p, &id("shop", "web"), 22),
            Err(Denial::NoAllowRule)
        );
        // The prefix is a string prefix of the URI: "shop-2" is not "shop/".
        assert_eq!(
            authorize(&p, &id("shop-2", "web"), 8080),
            Err(Denial::NoAllowRule)
        );
        assert_eq!(authorize(&p, &id("ops", "prober"), 22), Ok(()));
        assert_eq!(
            authorize(&p, &id("ops", "other"), 22),
            Err(Denial::NoAllowRule)
        );
    }

    #[test]
    fn deny_by_port_only() {
        let mut deny = rule(RuleAction::Deny);
        deny.ports = vec![22];
        let p = policy(vec![deny]);
        assert_eq!(authorize(&p, &id("a", "b"), 22), Err(Denial::DenyRule));
        assert_eq!(authorize(&p, &id("a", "b"), 23), Ok(()));
    }

    #[test]
    fn reasons_are_a_fixed_set() {
        let all = [
            Denial::DenyRule,
            Denial::NoAllowRule,
            Denial::UnknownDestination,
            Denial::IdentityMismatch,
            Denial::BadRequest,
        ];
        let mut names: Vec<_> = all.iter().map(|d| d.reason()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
    }
}
