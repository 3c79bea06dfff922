//! Active health checks: per service, optional. Every `interval` each member
//! of each set is probed: a TCP connect (with Ferry's bypass mark), then
//! optionally `send` and a read until `expect` appears, all within
//! `timeout`. `unhealthy_threshold` failures in a row take an endpoint out;
//! `healthy_threshold` successes in a row bring it back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::SetBalancer;
use crate::config::HealthCheck;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("send: {0}")]
    Send(#[source] std::io::Error),
    #[error("read: {0}")]
    Read(#[source] std::io::Error),
    #[error("the response did not contain the expected bytes")]
    Mismatch,
    #[error("no answer within the timeout")]
    Timeout,
}

/// One probe of one endpoint.
pub async fn probe(addr: SocketAddr, hc: &HealthCheck, mark: u32) -> Result<(), ProbeError> {
    let run = async {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(ProbeError::Connect)?;
        if mark != 0 {
            socket2::SockRef::from(&sock)
                .set_mark(mark)
                .map_err(ProbeError::Connect)?;
        }
        let mut s = sock.connect(addr).await.map_err(ProbeError::Connect)?;
        if let Some(send) = &hc.send {
            s.write_all(send).await.map_err(ProbeError::Send)?;
        }
        if let Some(expect) = &hc.expect {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.map_err(ProbeError::Read)?;
                if n == 0 {
                    return Err(ProbeError::Mismatch);
                }
                got.extend_from_slice(&buf[..n]);
                if got.windows(expect.len()).any(|w| w == expect.as_slice()) {
                    break;
                }
                if got.len() > 64 * 1024 {
                    return Err(ProbeError::Mismatch);
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(hc.timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout),
    }
}

#[derive(Default)]
struct Streak {
    ok: u32,
    failed: u32,
}

/// Probes every member of `set` until `stop` fires.
pub async fn run(set: Arc<SetBalancer>, hc: HealthCheck, mark: u32, stop: CancellationToken) {
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let members = set.view().members.clone();
        let probes = members.iter().map(|m| {
            let hc = &hc;
            let addr = m.stats.addr;
            async move { (addr, probe(addr, hc, mark).await) }
        });
        let results = futures_util::future::join_all(probes).await;
        let mut changed = false;
        for (m, (addr, r)) in members.iter().zip(results) {
            let st = streaks.entry(addr).or_default();
            match r {
                Ok(()) => {
                    st.ok += 1;
                    st.failed = 0;
                    if !m.stats.health_ok() && st.ok >= hc.healthy_threshold {
                        info!(service = %set.service(), endpoint = %addr, "health check: healthy");
                        changed |= m.stats.set_health(true);
                    }
                }
                Err(e) => {
                    st.failed += 1;
                    st.ok = 0;
                    if m.stats.health_ok() && st.failed >= hc.unhealthy_threshold {
                        warn!(service = %set.service(), endpoint = %addr, error = %e, "health check: unhealthy");
                        changed |= m.stats.set_health(false);
                    }
                }
            }
        }
        streaks.retain(|a, _| members.iter().any(|m| m.stats.addr == *a));
        if changed {
            set.rebuild();
        }
    }
}
