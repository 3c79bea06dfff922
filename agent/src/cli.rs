//! The `ferry` command line (clap). Every flag has an environment fallback.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config;

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: eBPF-captured, shared per-node L4 proxy for Kubernetes pod traffic"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: bind listeners, attach capture, proxy until SIGTERM.
    Run {
        /// The configuration file (YAML). SIGHUP re-reads it.
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
        /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `ferry=debug`).
        #[arg(long, env = "FERRY_LOG", default_value = "info")]
        log: String,
        /// Log format.
        #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Worker threads for the proxy (default: one per CPU).
        #[arg(long, env = "FERRY_WORKERS")]
        workers: Option<usize>,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Validate a configuration file and exit; attaches nothing.
    Check {
        /// The configuration file (YAML).
        #[arg(long, short, env = "FERRY_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Print the version and whether the eBPF object is embedded.
    Version,
    /// The mesh's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA (a self-signed ECDSA P-256 certificate, ten years, and
    /// its PKCS#8 key) in DIR as `ca.pem` and `ca-key.pem` (mode 0600), for
    /// the Secret every node's Ferry reads (README "Kubernetes"). Refuses to
    /// overwrite existing files.
    Init {
        /// The directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Named in the certificate's subject; identities are
        /// spiffe://<trust domain>/ns/<ns>/sa/<sa> whatever it says.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

/// Writes a new CA's files; refuses to overwrite.
fn ca_init(out: &std::path::Path, trust_domain: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let ca = crate::tls::LocalCa::generate(trust_domain).map_err(|e| e.to_string())?;
    let (cert, key) = ca.to_pem();
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, text, mode) in [("ca-key.pem", key, 0o600), ("ca.pem", cert, 0o644)] {
        let path = out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Values that replace the file's (the DaemonSet sets them from the
/// downward API).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OverrideArgs {
    /// Where services come from: `file` or `kubernetes` (replaces `source:`).
    #[arg(long, env = "FERRY_SOURCE", value_enum)]
    pub source: Option<config::Source>,
    /// This node's name (replaces `node.name`).
    #[arg(long, env = "FERRY_NODE_NAME")]
    pub node_name: Option<String>,
    /// Replaces `capture.redirect_ipv4`.
    #[arg(long, env = "FERRY_REDIRECT_IPV4")]
    pub redirect_ipv4: Option<std::net::IpAddr>,
    /// Replaces `capture.redirect_ipv6`.
    #[arg(long, env = "FERRY_REDIRECT_IPV6")]
    pub redirect_ipv6: Option<std::net::IpAddr>,
}

impl OverrideArgs {
    fn overrides(&self) -> config::Overrides {
        config::Overrides {
            source: self.source,
            node_name: self.node_name.clone().filter(|n| !n.is_empty()),
            redirect_ipv4: self.redirect_ipv4,
            redirect_ipv6: self.redirect_ipv6,
        }
    }
}

/// Reads the file, applies the overrides, validates.
fn load_with(
    path: &std::path::Path,
    o: &config::Overrides,
) -> Result<(config::Config, config::RawConfig), config::ConfigError> {
    let mut raw = config::load_raw(path)?;
    raw.apply_overrides(o);
    let cfg = raw
        .validate()
        .map_err(|violations| config::ConfigError::Invalid {
            file: path.display().to_string(),
            violations,
        })?;
    Ok((cfg, raw))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("invalid --log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let r = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    r.map_err(|e| format!("cannot initialise logging: {e}"))
}

/// An error and its sources, `outer: inner: innermost`, skipping a source
/// whose text its parent already includes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

/// Entry point of the `ferry` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!(
                "ferry {} (eBPF object {})",
                env!("CARGO_PKG_VERSION"),
                if crate::capture::Capture::object_embedded() {
                    "embedded"
                } else {
                    "NOT embedded: run `cargo xtask build-ebpf` and rebuild"
                }
            );
            ExitCode::SUCCESS
        }
        Command::Ca(CaCommand::Init { out, trust_domain }) => match ca_init(&out, &trust_domain) {
            Ok(()) => {
                println!(
                    "wrote {}/ca.pem and {}/ca-key.pem",
                    out.display(),
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Check { config, overrides } => match load_with(&config, &overrides.overrides()) {
            Ok((c, _)) => {
                println!(
                    "{}: ok ({} services, {} endpoints, capture {})",
                    config.display(),
                    c.services.len(),
                    c.services
                        .iter()
                        .map(|s| s.endpoints().count())
                        .sum::<usize>(),
                    if c.capture.enabled {
                        "enabled"
                    } else {
                        "disabled"
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run {
            config: path,
            log,
            log_format,
            workers,
            overrides,
        } => {
            if let Err(e) = init_logging(&log, log_format) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let o = overrides.overrides();
            let (cfg, raw) = match load_with(&path, &o) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{}", error_chain(&e));
                    return ExitCode::from(2);
                }
            };
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.enable_all();
            if let Some(n) = workers {
                rt.worker_threads(n.max(1));
            }
            let rt = match rt.build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(crate::app::run_with(cfg, Some(path), Some((raw, o)))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_init_writes_a_loadable_ca_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ca");
        super::ca_init(&out, "cluster.local").unwrap();
        let cert = std::fs::read_to_string(out.join("ca.pem")).unwrap();
        let key = std::fs::read_to_string(out.join("ca-key.pem")).unwrap();
        let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca-key.pem"), 0o600);
        assert_eq!(mode("ca.pem"), 0o644);
        crate::tls::LocalCa::from_pem("cluster.local", &cert, &key).expect("the agent loads it");
        let again = super::ca_init(&out, "cluster.local").unwrap_err();
        assert!(again.contains("exists"), "{again}");
        assert_eq!(
            std::fs::read_to_string(out.join("ca-key.pem")).unwrap(),
            key
        );
    }
}
