//! The destination a connection had before netfilter NAT (iptables
//! `REDIRECT`/`DNAT`) rewrote it: `SO_ORIGINAL_DST` (IPv4) and
//! `IP6T_SO_ORIGINAL_DST` (IPv6), read from the accepted socket.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h); libc does not
/// export it. Same value as `SO_ORIGINAL_DST`.
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// Errors of the original-destination lookup.
#[derive(Debug, thiserror::Error)]
pub enum OriginalDstError {
    #[error("getsockopt(SO_ORIGINAL_DST): {0}")]
    Getsockopt(#[source] io::Error),
}

/// The pre-NAT destination of an accepted connection whose local address
/// is `local`; `None` when netfilter has no record of it (conntrack not in
/// use) or did not rewrite it.
pub fn original_dst(
    sock: &impl AsRawFd,
    local: SocketAddr,
) -> Result<Option<SocketAddr>, OriginalDstError> {
    let fd = sock.as_raw_fd();
    // An IPv4 connection on a dual-stack socket has a v4-mapped local
    // address; netfilter tracked it as IPv4.
    let local = SocketAddr::new(crate::state::canonical_ip(local.ip()), local.port());
    let found = match local {
        SocketAddr::V4(_) => {
            // SAFETY: sockaddr_in is plain old data; all zeroes is valid.
            let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: `addr` and `len` are valid for writes and `len` holds
            // the buffer's size, as getsockopt requires.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    libc::SO_ORIGINAL_DST,
                    (&raw mut addr).cast(),
                    &mut len,
                )
            };
            check(r)?.then(|| {
                SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                    u16::from_be(addr.sin_port),
                ))
            })
        }
        SocketAddr::V6(_) => {
            // SAFETY: sockaddr_in6 is plain old data; all zeroes is valid.
            let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: as above, for sockaddr_in6.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    IP6T_SO_ORIGINAL_DST,
                    (&raw mut addr).cast(),
                    &mut len,
                )
            };
            check(r)?.then(|| {
                SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(addr.sin6_addr.s6_addr),
                    u16::from_be(addr.sin6_port),
                    0,
                    0,
                ))
            })
        }
    };
    Ok(found.filter(|&o| o != local))
}

/// `Ok(true)`: found; `Ok(false)`: no record (`ENOENT`: not tracked;
/// `ENOPROTOOPT`: no conntrack for this family).
fn check(r: libc::c_int) -> Result<bool, OriginalDstError> {
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOPROTOOPT) => Ok(false),
        _ => Err(OriginalDstError::Getsockopt(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untracked_connection_has_no_original_destination() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        // Without NAT there is nothing to report, whether or not conntrack
        // tracks loopback here.
        assert_eq!(original_dst(&s, addr).unwrap(), None);
    }
}
