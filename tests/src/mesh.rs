//! Two-node pieces shared by the HBONE tests and `cargo xtask demo`: the
//! cluster CA both nodes' Ferry use, a random marker to send through the
//! mesh, and tshark on node A's end of the node-to-node link with what the
//! capture shows ([`LinkCapture`], [`LinkReport`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{LINK_B, LINK_IFACE_A, Topology};

/// The HBONE port on the node-to-node link.
pub const HBONE_PORT: u16 = 15008;

/// A random string that must never cross the node link in clear.
pub fn marker() -> String {
    use rand::Rng;
    let mut r = rand::rng();
    format!(
        "FERRY-MARKER-{:016x}{:016x}",
        r.random::<u64>(),
        r.random::<u64>()
    )
}

impl Topology {
    /// Generates one CA for the cluster (trust domain `cluster.local`),
    /// writes it to `<dir>/ca.pem` and `<dir>/ca-key.pem`, and returns the
    /// `tls:` config section every node's Ferry uses (Ferry generates the
    /// workload keys itself and keeps them in memory).
    pub fn cluster_ca(&self, leaf_lifetime: &str) -> Result<String> {
        let ca = ferry::tls::LocalCa::generate("cluster.local")?;
        let (ca_pem, key_pem) = ca.to_pem();
        let ca_file = self.dir.join("ca.pem");
        let key_file = self.dir.join("ca-key.pem");
        std::fs::write(&ca_file, ca_pem)?;
        std::fs::write(&key_file, key_pem)?;
        Ok(format!(
            "tls:\n  ca: {{ cert: \"{}\", key: \"{}\" }}\n  leaf_lifetime: {leaf_lifetime}\n",
            ca_file.display(),
            key_file.display()
        ))
    }
}

/// tshark on node A's end of the node-to-node link ([`LINK_IFACE_A`]),
/// writing every TCP packet to a pcapng file.
#[derive(Debug)]
pub struct LinkCapture {
    label: String,
    node_a: String,
    pcap: PathBuf,
    log: PathBuf,
}

/// Probe ports: node B listens on neither, so a probe is one SYN (no
/// payload) answered by a RST.
const PROBE_START: u16 = 9;
const PROBE_END: u16 = 13;

impl LinkCapture {
    /// Starts tshark (after [`Topology::add_second_node`]) and returns once
    /// it really captures: tshark says it has started before packets are
    /// captured, so node A probes node B's closed port 9 until tshark shows
    /// the SYN (bounded, ~10 s).
    pub fn start(t: &mut Topology, label: &str) -> Result<LinkCapture> {
        let tshark = crate::which("tshark")
            .context("`tshark` is not installed (run `cargo xtask setup`)")?;
        let node_a = t.node_netns.clone();
        let pcap = t.dir.join(format!("{label}.pcapng"));
        let pcap_s = pcap.display().to_string();
        t.spawn_in_netns(
            label,
            &node_a,
            &tshark.to_string_lossy(),
            &["-i", LINK_IFACE_A, "-f", "tcp", "-l", "-P", "-w", &pcap_s],
        )?;
        let capture = LinkCapture {
            label: label.to_owned(),
            log: t.dir.join(format!("{label}.log")),
            node_a,
            pcap,
        };
        if !capture.probe_until_captured(PROBE_START) {
            bail!(
                "tshark never saw a probe on the node link:\n{}",
                std::fs::read_to_string(&capture.log).unwrap_or_default()
            );
        }
        Ok(capture)
    }

    /// The pcapng file tshark writes.
    pub fn pcap(&self) -> &Path {
        &self.pcap
    }

    /// Waits until tshark has caught up with the traffic (it prints packets
    /// in order: once a probe sent after the traffic shows, everything
    /// before it is in the file), stops it (SIGINT, so it flushes) and
    /// reads what it captured.
    pub fn finish(self, t: &mut Topology) -> Result<LinkReport> {
        if !self.probe_until_captured(PROBE_END) {
            bail!("tshark never caught up with the traffic on the node link");
        }
        t.interrupt(&self.label, Duration::from_secs(20))?;
        LinkReport::read(&self.pcap)
    }

    /// Sends SYNs from node A to node B's closed `port` until the tshark
    /// log shows one (at most ~10 s).
    fn probe_until_captured(&self, port: u16) -> bool {
        let needle = format!("→ {port} [SYN]");
        for _ in 0..50 {
            let _ = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.node_a))
                .args(["curl", "-s", "--connect-timeout", "1"])
                .arg(format!("http://{LINK_B}:{port}/"))
                .output();
            for _ in 0..10 {
                if std::fs::read_to_string(&self.log)
                    .unwrap_or_default()
                    .contains(&needle)
                {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        false
    }
}

/// What crossed the node-to-node link, from tshark's capture.
#[derive(Debug)]
pub struct LinkReport {
    /// The capture file's bytes (for searching clear text).
    pub raw: Vec<u8>,
    /// Every TCP packet, and their bytes on the wire.
    pub packets: usize,
    pub bytes: u64,
    /// Packets with a TCP payload, and the payload bytes.
    pub payload_packets: usize,
    pub payload_bytes: u64,
    /// Packets with a payload that were not to or from port 15008
    /// (`frame: src -> dst`).
    pub payload_not_hbone: Vec<String>,
    /// Packets with a payload that tshark did not dissect as TLS
    /// (retransmissions aside: they repeat bytes already checked, and the
    /// clear-text search covers them too).
    pub payload_not_tls: Vec<String>,
    /// TLS application-data records.
    pub app_data_records: usize,
    /// The version each ServerHello selected (`0x0304`: TLS 1.3), one per
    /// TLS connection.
    pub server_hello_versions: Vec<String>,
}

impl LinkReport {
    /// Analyses a capture of the link with tshark (port 15008 decoded as
    /// TLS).
    pub fn read(pcap: &Path) -> Result<LinkReport> {
        let raw = std::fs::read(pcap)
            .with_context(|| format!("reading the capture {}", pcap.display()))?;
        let pcap_s = pcap.to_string_lossy();
        let decode = format!("tcp.port=={HBONE_PORT},tls");
        let fields = |filter: &str, fields: &[&str]| -> Result<String> {
            let mut args = vec!["-r", &pcap_s, "-d", &decode, "-T", "fields"];
            if !filter.is_empty() {
                args.extend(["-Y", filter]);
            }
            for f in fields {
                args.extend(["-e", f]);
            }
            crate::run("tshark", &args)
        };
        let all = fields(
            "tcp",
            &[
                "frame.number",
                "frame.len",
                "tcp.srcport",
                "tcp.dstport",
                "tcp.len",
            ],
        )?;
        let hbone = HBONE_PORT.to_string();
        let mut report = LinkReport {
            raw,
            packets: 0,
            bytes: 0,
            payload_packets: 0,
            payload_bytes: 0,
            payload_not_hbone: Vec::new(),
            payload_not_tls: Vec::new(),
            app_data_records: 0,
            server_hello_versions: Vec::new(),
        };
        for line in all.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let [frame, len, src, dst, tcp_len] = f[..] else {
                bail!("unexpected tshark line: {line:?}");
            };
            report.packets += 1;
            report.bytes += len.parse::<u64>().unwrap_or(0);
            let payload: u64 = tcp_len.parse().unwrap_or(0);
            if payload > 0 {
                report.payload_packets += 1;
                report.payload_bytes += payload;
                if src != hbone && dst != hbone {
                    report
                        .payload_not_hbone
                        .push(format!("frame {frame}: {src} -> {dst}"));
                }
            }
        }
        report.payload_not_tls = fields(
            "tcp.len > 0 && !tls && !tcp.analysis.retransmission \
             && !tcp.analysis.fast_retransmission",
            &["frame.number"],
        )?
        .lines()
        .map(|l| format!("frame {l}"))
        .collect();
        // A frame may carry several records: count the record types.
        report.app_data_records =
            fields("tls.record.opaque_type == 23", &["tls.record.opaque_type"])?
                .lines()
                .map(|l| l.split(',').filter(|t| t.trim() == "23").count())
                .sum();
        report.server_hello_versions = fields(
            "tls.handshake.type == 2",
            &["tls.handshake.extensions.supported_version"],
        )?
        .lines()
        .map(|l| l.trim().to_owned())
        .collect();
        Ok(report)
    }

    /// Whether `needle` appears anywhere in the capture's bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.raw.windows(needle.len()).any(|w| w == needle)
    }

    /// Only TLS crossed: payload packets exist, every one is to or from
    /// port 15008 and dissects as TLS, application data was carried, and
    /// every handshake negotiated TLS 1.3. `Err` says what broke it.
    pub fn check_tls_only(&self) -> Result<()> {
        if self.payload_packets == 0 {
            bail!("no payload crossed the node link");
        }
        if !self.payload_not_hbone.is_empty() {
            bail!(
                "payload not to or from port {HBONE_PORT}: {:?}",
                self.payload_not_hbone
            );
        }
        if !self.payload_not_tls.is_empty() {
            bail!("payload that is not TLS: {:?}", self.payload_not_tls);
        }
        if self.app_data_records == 0 {
            bail!("no TLS application data on the link");
        }
        if self.server_hello_versions.is_empty()
            || self.server_hello_versions.iter().any(|v| v != "0x0304")
        {
            bail!(
                "not every ServerHello negotiated TLS 1.3: {:?}",
                self.server_hello_versions
            );
        }
        Ok(())
    }
}
