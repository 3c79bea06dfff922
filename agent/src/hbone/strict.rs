//! STRICT mode: local mesh pods accept new TCP connections only from Ferry.
//!
//! Ferry opens every connection to a local pod with its bypass mark
//! (`SO_MARK`, 0x539 by default): tunnelled connections after mutual TLS and
//! authorization, and captured connections from this node's own pods. The
//! rule below, installed in the node's network namespace, refuses every
//! other new connection to a mesh pod address:
//!
//! * `inet ferry_strict`: SYNs routed through the node (from another node,
//!   or anything else outside the pod bridge) and SYNs from processes on the
//!   node itself, without the mark, are answered with a TCP reset;
//! * `bridge ferry_strict`: SYNs bridged between two pods of the node (which
//!   never reach the IP hooks) are dropped (this kernel's bridge family has
//!   no `reject`).
//!
//! The mark is per socket and is cleared when a packet crosses into another
//! network namespace, so only processes in the node namespace that set it
//! (Ferry, which needs `CAP_NET_ADMIN` for that) pass. The tables are
//! removed when [`StrictRules`] is dropped (agent exit); a crash leaves them
//! in place, so STRICT fails closed until Ferry is back and replaces them.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use tracing::{info, warn};

use super::HboneError;

/// The nftables tables Ferry owns.
pub const TABLE: &str = "ferry_strict";

/// The installed rules; removed on drop.
#[derive(Debug)]
pub struct StrictRules {
    installed: bool,
}

/// The nftables program for `pods` and `mark`.
pub fn ruleset(pods: &[IpAddr], mark: u32) -> String {
    let v4: Vec<String> = pods
        .iter()
        .filter(|a| a.is_ipv4())
        .map(ToString::to_string)
        .collect();
    let v6: Vec<String> = pods
        .iter()
        .filter(|a| a.is_ipv6())
        .map(ToString::to_string)
        .collect();
    let set = |name: &str, ty: &str, elems: &[String]| {
        if elems.is_empty() {
            format!("  set {name} {{ type {ty}; }}\n")
        } else {
            format!(
                "  set {name} {{ type {ty}; elements = {{ {} }}; }}\n",
                elems.join(", ")
            )
        }
    };
    let syn = "tcp flags & (syn|ack) == syn";
    let mut s = String::new();
    // Delete-then-create in one transaction: `add` first so the delete
    // never fails on a fresh node.
    s.push_str(&format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n"
    ));
    s.push_str(&format!(
        "add table bridge {TABLE}\ndelete table bridge {TABLE}\n"
    ));
    s.push_str(&format!("table inet {TABLE} {{\n"));
    s.push_str(&set("pods4", "ipv4_addr", &v4));
    s.push_str(&set("pods6", "ipv6_addr", &v6));
    for (chain, hook) in [("local_out", "output"), ("routed", "forward")] {
        s.push_str(&format!(
            "  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;\n\
             \x20   ip daddr @pods4 {syn} meta mark != {mark:#x} counter reject with tcp reset\n\
             \x20   ip6 daddr @pods6 {syn} meta mark != {mark:#x} counter reject with tcp reset\n  }}\n"
        ));
    }
    s.push_str("}\n");
    s.push_str(&format!("table bridge {TABLE} {{\n"));
    s.push_str(&set("pods4", "ipv4_addr", &v4));
    s.push_str(&set("pods6", "ipv6_addr", &v6));
    s.push_str(&format!(
        "  chain bridged {{\n    type filter hook forward priority 0; policy accept;\n\
         \x20   ether type ip ip daddr @pods4 {syn} meta mark != {mark:#x} counter drop\n\
         \x20   ether type ip6 ip6 daddr @pods6 {syn} meta mark != {mark:#x} counter drop\n  }}\n}}\n"
    ));
    s
}

fn nft(script: &str) -> Result<(), HboneError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HboneError::Strict(format!("cannot run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| HboneError::Strict(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| HboneError::Strict(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(HboneError::Strict(format!(
            "nft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl StrictRules {
    /// Installs (or replaces) the rules for `pods`.
    pub fn install(pods: &[IpAddr], mark: u32) -> Result<StrictRules, HboneError> {
        if mark == 0 {
            return Err(HboneError::Strict(
                "STRICT mode needs a non-zero capture.bypass_mark".into(),
            ));
        }
        nft(&ruleset(pods, mark))?;
        info!(
            pods = pods.len(),
            mark, "STRICT: only Ferry may connect to local mesh pods"
        );
        Ok(StrictRules { installed: true })
    }

    /// Replaces the pod set (on reload).
    pub fn update(&self, pods: &[IpAddr], mark: u32) -> Result<(), HboneError> {
        nft(&ruleset(pods, mark))
    }

    /// Connections refused so far (sum of the rules' counters).
    pub fn refused(&self) -> u64 {
        let Ok(out) = Command::new("nft")
            .args(["list", "table", "inet", TABLE])
            .output()
        else {
            return 0;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        count_packets(&text)
            + Command::new("nft")
                .args(["list", "table", "bridge", TABLE])
                .output()
                .map(|o| count_packets(&String::from_utf8_lossy(&o.stdout)))
                .unwrap_or(0)
    }
}

fn count_packets(text: &str) -> u64 {
    let mut total = 0;
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets"
            && let Some(n) = words.next()
        {
            total += n.parse::<u64>().unwrap_or(0);
        }
    }
    total
}

impl Drop for StrictRules {
    fn drop(&mut self) {
        if self.installed
            && let Err(e) = nft(&format!(
                "add table inet {TABLE}\ndelete table inet {TABLE}\nadd table bridge {TABLE}\ndelete table bridge {TABLE}\n"
            ))
        {
            warn!(error = %e, "removing the STRICT rules failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_every_pod_and_the_mark() {
        let r = ruleset(
            &["10.77.2.11".parse().unwrap(), "fd77:2::11".parse().unwrap()],
            0x539,
        );
        assert!(r.contains("elements = { 10.77.2.11 }"), "{r}");
        assert!(r.contains("elements = { fd77:2::11 }"), "{r}");
        assert!(r.contains("meta mark != 0x539"), "{r}");
        assert!(r.contains("hook forward"), "{r}");
        assert!(r.contains("hook output"), "{r}");
        let empty = ruleset(&[], 0x539);
        assert!(!empty.contains("elements"), "{empty}");
    }

    #[test]
    fn counts_packets_in_listing() {
        let listing = "counter packets 3 bytes 180 reject\n counter packets 2 bytes 120 drop";
        assert_eq!(count_packets(listing), 5);
    }
}
