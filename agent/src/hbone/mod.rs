//! HBONE: connections to pods on other nodes, carried over mutual TLS as
//! HTTP/2 CONNECT streams between the node proxies (Istio ambient's wire
//! protocol, on port 15008).
//!
//! * [`pool`]: the client side. One TLS connection per (source identity,
//!   destination node, destination identity), shared by up to
//!   `max_streams_per_connection` streams; past the cap another connection
//!   is opened.
//! * [`inbound`]: the server side. Terminates mutual TLS, parses each
//!   CONNECT request, authorizes it ([`policy`]) and relays to the local pod.
//! * [`stream`]: a CONNECT stream as a relay peer (FIN ⇄ END_STREAM,
//!   reset ⇄ RST_STREAM).
//! * [`strict`]: STRICT mode's kernel rule: only Ferry may open connections
//!   to local mesh pods.

pub mod inbound;
pub mod policy;
pub mod pool;
pub mod stream;
pub mod strict;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::{Method, Uri};

use crate::tls::TlsError;

/// HTTP/2 stream receive window (per tunnelled connection): 4 MiB keeps one
/// stream at 25 Gbit/s over a 1 ms round trip. What a peer may have in flight
/// toward a pod that is not reading is capped by the connection window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection receive window (shared by a connection's streams).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame payload we accept.
pub const MAX_FRAME: u32 = 64 * 1024;
/// A pooled tunnel connection without streams for this long is closed.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound on a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("cannot bind the HBONE inbound listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to node {node}: {source}")]
    Connect {
        node: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with node {node}: {source}")]
    Handshake {
        node: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node} did not negotiate HTTP/2 (ALPN h2)")]
    NoAlpn { node: SocketAddr },
    #[error("HTTP/2: {0}")]
    Http2(#[from] h2::Error),
    #[error("the peer node answered {status} for {target}")]
    Refused { status: u16, target: SocketAddr },
    #[error("no answer from the peer node for {target} within {timeout:?}")]
    Timeout {
        target: SocketAddr,
        timeout: Duration,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid request: {0}")]
    Request(#[from] RequestError),
    #[error("STRICT mode rule: {0}")]
    Strict(String),
}

impl HboneError {
    /// The error as the failover policy sees a failed connect: a refused or
    /// unreachable node keeps its kind; the peer's answers map to the kind
    /// of the local connect they stand for (503: the pod refused; 403:
    /// denied by policy).
    pub fn into_io(self) -> std::io::Error {
        use std::io::{Error, ErrorKind};
        let kind = match &self {
            HboneError::Connect { source, .. } => source.kind(),
            HboneError::Refused { status: 503, .. } => ErrorKind::ConnectionRefused,
            HboneError::Refused { status: 403, .. } => ErrorKind::PermissionDenied,
            HboneError::Timeout { .. } => ErrorKind::TimedOut,
            _ => ErrorKind::Other,
        };
        Error::new(kind, self)
    }
}

/// Why an inbound request is not a tunnel request we serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("a CONNECT request carries no scheme or path")]
    NotAuthorityForm,
    #[error("no :authority")]
    NoAuthority,
    #[error("authority {0:?} is not IP:PORT")]
    Authority(String),
    #[error("port 0")]
    PortZero,
}

/// The target of a tunnel request: `CONNECT` with the pod's `IP:PORT` (or
/// `[IPv6]:PORT`) as `:authority`, nothing else in the URI. Host names,
/// user info, IPv4-mapped IPv6 and non-canonical spellings are refused (a pod is named by its
/// one address, which is what authorization and the workload table use).
pub fn parse_connect(method: &Method, uri: &Uri) -> Result<SocketAddr, RequestError> {
    if method != Method::CONNECT {
        return Err(RequestError::Method(
            method.as_str().chars().take(32).collect(),
        ));
    }
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty()) {
        return Err(RequestError::NotAuthorityForm);
    }
    let auth = uri.authority().ok_or(RequestError::NoAuthority)?;
    let text = auth.as_str();
    let bad = || RequestError::Authority(text.chars().take(64).collect());
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let ip: IpAddr = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let a: Ipv6Addr = v6.parse().map_err(|_| bad())?;
        if a.to_ipv4_mapped().is_some() {
            return Err(bad());
        }
        IpAddr::V6(a)
    } else {
        IpAddr::V4(host.parse::<Ipv4Addr>().map_err(|_| bad())?)
    };
    // Digits only: u16's parser would take "+80".
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(RequestError::PortZero);
    }
    let addr = SocketAddr::new(ip, port);
    // One spelling per target (found by fuzzing: `10.0.0.1:080`): leading
    // zeros, upper-case or uncompressed IPv6 are refused.
    if addr.to_string() != text {
        return Err(bad());
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(m: &str, u: &str) -> Result<SocketAddr, RequestError> {
        let uri: Uri = u.parse().map_err(|_| RequestError::NoAuthority)?;
        parse_connect(&Method::from_bytes(m.as_bytes()).unwrap(), &uri)
    }

    #[test]
    fn accepts_ip_and_port() {
        assert_eq!(
            parse("CONNECT", "10.77.2.11:8080"),
            Ok("10.77.2.11:8080".parse().unwrap())
        );
        assert_eq!(
            parse("CONNECT", "[fd77:2::11]:8080"),
            Ok("[fd77:2::11]:8080".parse().unwrap())
        );
    }

    #[test]
    fn refuses_everything_else() {
        assert!(matches!(
            parse("GET", "10.0.0.1:80"),
            Err(RequestError::Method(_))
        ));
        assert_eq!(
            parse("CONNECT", "http://10.0.0.1:80/"),
            Err(RequestError::NotAuthorityForm)
        );
        assert_eq!(parse("CONNECT", "10.0.0.1:0"), Err(RequestError::PortZero));
        for bad in [
            "10.0.0.1",
            "example.com:80",
            "[::ffff:10.0.0.1]:80",
            "10.0.0.1:99999",
            "10.0.0.1:+80",
            "fd77::1:80",
            "010.0.0.1:80",
            "10.0.0.1:080",
            "[FD77::1]:80",
            "[fd77:0::1]:80",
        ] {
            assert!(parse("CONNECT", bad).is_err(), "{bad}");
        }
    }
}
