//! Configuration parsing and validation: the documented example, the
//! defaults, and every kind of invalid input with its exact field path.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;

const EXAMPLE: &str = include_str!("../../../deploy/examples/ferry.yaml");

/// Capture off, so a test can look at one rule without the capture ones.
const NO_CAPTURE: &str = "capture: { enabled: false }\n";

fn ep(addr: &str, weight: u32) -> Endpoint {
    Endpoint {
        target: EndpointTarget::Ip(ip(addr)),
        port: None,
        weight,
        locality: Locality::default(),
        namespace: "default".into(),
        service_account: "default".into(),
        mesh: true,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn ok(text: &str) -> Config {
    match parse(text, "test.yaml") {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got: {e}"),
    }
}

/// Every violation, rendered as `path: reason`, in the order reported.
fn violations(text: &str) -> Vec<String> {
    match parse(text, "test.yaml") {
        Err(ConfigError::Invalid { file, violations }) => {
            assert_eq!(file, "test.yaml");
            violations.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected validation errors, got {other:?}"),
    }
}

/// The (field, message) of a parse error.
fn parse_error(text: &str) -> (String, String) {
    match parse(text, "test.yaml") {
        Err(ConfigError::Parse {
            file,
            field,
            message,
        }) => {
            assert_eq!(file, "test.yaml");
            (field, message)
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

/// One service with the given YAML body lines (indented under `- `).
fn services(body: &str) -> String {
    format!("{NO_CAPTURE}services:\n{body}")
}

// ---------------------------------------------------------------------------
// The documented example and the defaults.
// ---------------------------------------------------------------------------

#[test]
fn example_file_parses_with_documented_values() {
    let c = ok(EXAMPLE);
    let expected = Config {
        source: crate::config::Source::File,
        kubernetes: crate::config::Kubernetes {
            cgroup_driver: crate::config::CgroupDriver::Systemd,
            cgroup_root: "kubepods.slice".into(),
        },
        node_name: "node-a".into(),
        locality: Locality {
            node: Some("node-a".into()),
            zone: None,
            region: None,
        },
        listeners: Listeners {
            outbound: "[::]:15001".parse().unwrap(),
            metrics: "0.0.0.0:15020".parse().unwrap(),
            readiness: "0.0.0.0:15021".parse().unwrap(),
            inbound: "[::]:15008".parse().unwrap(),
        },
        capture: Capture {
            enabled: true,
            cgroups: vec!["ferry-demo/pods".into()],
            redirect_ipv4: Some(Ipv4Addr::new(10, 77, 1, 1)),
            redirect_ipv6: Some("fd77:1::1".parse::<Ipv6Addr>().unwrap()),
            bypass_mark: 0x539,
            ebpf_log: false,
        },
        proxy: Proxy {
            connect_timeout: Duration::from_secs(1),
            drain_deadline: Duration::from_secs(30),
            zero_copy: true,
            socket_join: false,
        },
        services: vec![
            Service {
                name: "web".into(),
                namespace: "default".into(),
                addresses: vec![ip("10.96.0.20"), ip("fd96::20")],
                ports: vec![Port {
                    port: 80,
                    target_port: 8080,
                }],
                sets: vec![BackendSet {
                    name: "default".into(),
                    weight: 1,
                    endpoints: vec![
                        ep("10.77.1.11", 60),
                        ep("10.77.1.12", 30),
                        ep("10.77.1.13", 10),
                    ],
                }],
                policy: c.services[0].policy.clone(),
            },
            Service {
                name: "reviews".into(),
                namespace: "shop".into(),
                addresses: vec![ip("10.96.0.30")],
                ports: vec![Port {
                    port: 9080,
                    target_port: 9080,
                }],
                sets: vec![BackendSet {
                    name: "default".into(),
                    weight: 1,
                    endpoints: vec![Endpoint {
                        target: EndpointTarget::Ip(ip("10.77.2.11")),
                        port: None,
                        weight: 1,
                        locality: Locality {
                            node: Some("node-b".into()),
                            zone: None,
                            region: None,
                        },
                        namespace: "shop".into(),
                        service_account: "reviews".into(),
                        mesh: true,
                    }],
                }],
                policy: c.services[1].policy.clone(),
            },
        ],
        dns: crate::config::Dns::default(),
        workloads: vec![Workload {
            address: ip("10.77.1.10"),
            namespace: "default".into(),
            service_account: "client".into(),
        }],
        nodes: [("node-b".to_owned(), "10.77.0.2:15008".parse().unwrap())]
            .into_iter()
            .collect(),
        tls: Tls {
            trust_domain: "cluster.local".into(),
            ca: CaSource::Generate,
            trust_bundle: None,
            leaf_lifetime: Duration::from_secs(24 * 3600),
        },
        hbone: Hbone {
            max_streams_per_connection: 100,
            pooling: true,
        },
        authorization: Authorization {
            mode: AuthorizationMode::Permissive,
            rules: vec![],
        },
    };
    assert_eq!(c, expected);
    assert_eq!(c.services[0].key(), "default/web");
}

#[test]
fn example_file_documents_the_real_defaults() {
    // The example says every key is shown with its default unless marked
    // required: the code's defaults must be those values.
    let example = ok(EXAMPLE);
    let minimal = ok("capture:
  cgroups: [ferry-demo/pods]
  redirect_ipv4: 10.77.1.1
  redirect_ipv6: \"fd77:1::1\"
services:
  - name: web
    addresses: [10.96.0.20, \"fd96::20\"]
    ports: [{ port: 80, target_port: 8080 }]
    endpoints:
      - { address: 10.77.1.11, weight: 60 }
      - { address: 10.77.1.12, weight: 30 }
      - { address: 10.77.1.13, weight: 10 }
  - name: reviews
    namespace: shop
    addresses: [10.96.0.30]
    ports: [{ port: 9080 }]
    endpoints: [{ address: 10.77.2.11, node: node-b, service_account: reviews }]
nodes: { node-b: 10.77.0.2 }
");
    assert_eq!(minimal.listeners, example.listeners);
    assert_eq!(minimal.capture, example.capture);
    assert_eq!(minimal.proxy, example.proxy);
    assert_eq!(minimal.services, example.services);
    assert_eq!(minimal.nodes, example.nodes);
    assert_eq!(minimal.tls, example.tls);
    assert_eq!(minimal.hbone, example.hbone);
    assert_eq!(minimal.authorization, example.authorization);
}

#[test]
fn defaults() {
    let c = ok(&services(
        "  - name: db
    addresses: [10.96.0.30]
    ports: [{ port: 5432 }]
    endpoints: [{ address: 10.1.0.7 }]
",
    ));
    assert_eq!(c.listeners.outbound, "[::]:15001".parse().unwrap());
    assert_eq!(c.listeners.metrics, "0.0.0.0:15020".parse().unwrap());
    assert_eq!(c.listeners.readiness, "0.0.0.0:15021".parse().unwrap());
    assert_eq!(c.capture.bypass_mark, 0x539);
    assert_eq!(c.capture.bypass_mark, DEFAULT_BYPASS_MARK);
    assert!(!c.capture.ebpf_log);
    assert!(c.capture.cgroups.is_empty());
    assert_eq!(c.proxy.drain_deadline, Duration::from_secs(30));
    assert_eq!(c.proxy.connect_timeout, Duration::from_secs(1));
    // Without node.name, the host name (never empty).
    assert!(!c.node_name.is_empty());
    assert_eq!(c.node_name, hostname());

    let s = &c.services[0];
    assert_eq!(s.namespace, "default");
    assert_eq!(s.key(), "default/db");
    assert_eq!(
        s.ports,
        vec![Port {
            port: 5432,
            target_port: 5432
        }]
    );
    assert_eq!(
        s.endpoints().cloned().collect::<Vec<_>>(),
        vec![ep("10.1.0.7", 1)]
    );
    assert_eq!(s.sets.len(), 1);
    assert_eq!(s.sets[0].name, "default");
}

#[test]
fn capture_is_enabled_by_default() {
    let c = ok("capture: { cgroups: [pods], redirect_ipv4: 10.0.0.1 }\n");
    assert!(c.capture.enabled);
    assert_eq!(c.capture.redirect_ipv4, Some(Ipv4Addr::new(10, 0, 0, 1)));
    assert_eq!(c.capture.redirect_ipv6, None);
    assert!(c.services.is_empty());
}

#[test]
fn explicit_values_override_defaults() {
    let c = ok("node: { name: n1 }
listeners:
  outbound: \"127.0.0.1:7001\"
  metrics: \"127.0.0.1:7002\"
  readiness: \"127.0.0.1:7003\"
capture: { enabled: false, bypass_mark: 7, ebpf_log: true }
proxy: { connect_timeout: 250ms, drain_deadline: 1m30s, zero_copy: false, socket_join: true }
services:
  - name: web
    namespace: shop
    addresses: [10.96.0.20]
    ports: [{ port: 80, target_port: 8080, protocol: tcp }]
    endpoints: [{ address: 10.1.0.5, weight: 1000000 }]
");
    assert_eq!(c.node_name, "n1");
    assert_eq!(c.listeners.outbound, "127.0.0.1:7001".parse().unwrap());
    assert_eq!(c.listeners.metrics, "127.0.0.1:7002".parse().unwrap());
    assert_eq!(c.listeners.readiness, "127.0.0.1:7003".parse().unwrap());
    assert!(!c.capture.enabled);
    assert_eq!(c.capture.bypass_mark, 7);
    assert!(c.capture.ebpf_log);
    assert_eq!(c.proxy.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.proxy.drain_deadline, Duration::from_secs(90));
    assert!(!c.proxy.zero_copy);
    assert!(c.proxy.socket_join);
    assert_eq!(c.services[0].key(), "shop/web");
    assert_eq!(c.services[0].ports[0].target_port, 8080);
    assert_eq!(c.services[0].sets[0].endpoints[0].weight, 1_000_000);
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, EXAMPLE).unwrap();
    assert_eq!(load(&good).unwrap(), ok(EXAMPLE));

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "").unwrap();
    let e = load(&bad).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}: invalid configuration:", bad.display())),
        "{e}"
    );

    let missing = dir.path().join("missing.yaml");
    match load(&missing) {
        Err(ConfigError::Read { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a read error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Parse errors: the exact path of the offending field.
// ---------------------------------------------------------------------------

#[test]
fn unknown_field_is_named_by_path() {
    let (field, message) = parse_error(&services(
        "  - name: web
    addresses: [10.96.0.20]
    ports: [{ port: 80 }]
    endpoint: [{ address: 10.1.0.5 }]
",
    ));
    assert_eq!(field, "services[0].endpoint");
    assert!(
        message.starts_with("unknown field `endpoint`, expected one of"),
        "{message}"
    );

    let (field, _) = parse_error("capture: { cgroup: [pods] }\n");
    assert_eq!(field, "capture.cgroup");
    let (field, _) = parse_error(&services(
        "  - name: web\n    ports: [{ port: 80, targetPort: 8080 }]\n",
    ));
    assert_eq!(field, "services[0].ports[0].targetPort");
    let (field, message) = parse_error("service: []\n");
    assert_eq!(field, "service");
    assert!(message.starts_with("unknown field `service`"), "{message}");
}

#[test]
fn parse_error_names_the_field_once() {
    // The YAML parser prefixes its own, coarser path ("services[0]: ...");
    // the error must not show a second, contradicting path.
    let e = parse(&services("  - name: web\n    endpoint: []\n"), "test.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "test.yaml: services[0].endpoint: unknown field `endpoint`, expected one of \
         `name`, `namespace`, `addresses`, `ports`, `endpoints`, `backend_sets`, `balancing`, \
         `failover`, `outlier_detection`, `health_check` at line 4 column 5"
    );
    let e = parse("proxy: { connect_timeout: 5 }\n", "test.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "test.yaml: proxy.connect_timeout: invalid duration \"5\": time unit needed, \
         for example 5sec or 5ms at line 1 column 8"
    );
}

#[test]
fn bad_ip_strings() {
    let (field, message) = parse_error(&services(
        "  - name: web\n    addresses: [10.96.0.20, 10.96.0.300]\n",
    ));
    assert_eq!(field, "services[0].addresses[1]");
    assert!(message.contains("invalid IP address syntax"), "{message}");

    let (field, message) = parse_error(&services(
        "  - name: web
    endpoints:
      - { address: 10.1.0.5 }
      - { address: not-an-ip }
",
    ));
    assert_eq!(field, "services[0].endpoints[1].address");
    assert!(message.contains("invalid IP address syntax"), "{message}");

    let (field, _) = parse_error("capture: { redirect_ipv4: 10.0.0 }\n");
    assert_eq!(field, "capture.redirect_ipv4");

    // A listener needs a port too.
    let (field, message) = parse_error("listeners: { metrics: \"0.0.0.0\" }\n");
    assert_eq!(field, "listeners.metrics");
    assert!(
        message.contains("invalid socket address syntax"),
        "{message}"
    );
}

#[test]
fn bad_durations() {
    for (text, field, needle) in [
        (
            "proxy: { connect_timeout: 5 }\n",
            "proxy.connect_timeout",
            "invalid duration \"5\"",
        ),
        (
            "proxy: { connect_timeout: fivesec }\n",
            "proxy.connect_timeout",
            "invalid duration \"fivesec\"",
        ),
        (
            "proxy: { drain_deadline: 30 parsecs }\n",
            "proxy.drain_deadline",
            "invalid duration \"30 parsecs\"",
        ),
        (
            "proxy: { drain_deadline: -1s }\n",
            "proxy.drain_deadline",
            "invalid duration \"-1s\"",
        ),
    ] {
        let (f, message) = parse_error(text);
        assert_eq!(f, field, "{text}");
        assert!(message.contains(needle), "{text}: {message}");
    }
}

#[test]
fn out_of_range_numbers() {
    let (field, message) = parse_error(&services("  - name: web\n    ports: [{ port: 65536 }]\n"));
    assert_eq!(field, "services[0].ports[0].port");
    assert!(message.contains("expected u16"), "{message}");

    let (field, message) = parse_error(&services(
        "  - name: web\n    endpoints: [{ address: 10.1.0.5, weight: -1 }]\n",
    ));
    assert_eq!(field, "services[0].endpoints[0].weight");
    assert!(message.contains("expected u32"), "{message}");
}

#[test]
fn missing_required_field() {
    let (field, message) = parse_error(&services("  - name: web\n  - addresses: [10.96.0.21]\n"));
    assert_eq!(field, "services[1]");
    assert!(message.starts_with("missing field `name`"), "{message}");
}

#[test]
fn yaml_syntax_error() {
    let (field, message) = parse_error("services: [\n");
    assert_eq!(field, "services");
    assert!(message.contains("line 2"), "{message}");

    // Tabs may not indent YAML.
    let (_, message) = parse_error("capture:\n\tenabled: false\n");
    assert!(message.contains("line 2"), "{message}");

    // A wrong shape: a scalar where a mapping belongs.
    let (field, message) = parse_error("node: node-a\n");
    assert_eq!(field, "node");
    assert!(message.contains("invalid type"), "{message}");

    // A document that is just null is not a configuration.
    let (field, _) = parse_error("~\n");
    assert_eq!(field, "(top level)");
}

// ---------------------------------------------------------------------------
// Validation: every rule, with its field path and reason.
// ---------------------------------------------------------------------------

#[test]
fn empty_file_means_defaults_and_needs_capture_settings() {
    // An empty file is all defaults: capture enabled, with no cgroups and no
    // redirect address, which is not a working configuration.
    let expected = vec![
        "capture.cgroups: must name at least one cgroup to enroll when capture is enabled"
            .to_owned(),
        "capture: needs redirect_ipv4 and/or redirect_ipv6 when capture is enabled".to_owned(),
    ];
    assert_eq!(violations(""), expected);
    assert_eq!(violations("# nothing but a comment\n"), expected);
    assert_eq!(violations("---\n"), expected);
    // With capture off, an empty service list is fine.
    let c = ok(NO_CAPTURE);
    assert!(c.services.is_empty());
}

#[test]
fn zero_weight() {
    let text = services(
        "  - name: a
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.1.0.1, weight: 5 }]
  - name: b
    addresses: [10.96.0.2]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.1.0.2 }]
  - name: c
    addresses: [10.96.0.3]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.1.0.3, weight: 0 }, { address: 10.1.0.4, weight: 2 }]
",
    );
    assert_eq!(
        violations(&text),
        ["services[2].endpoints[0].weight: must be greater than 0"]
    );
    let e = parse(&text, "ferry.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "ferry.yaml: invalid configuration:\n  services[2].endpoints[0].weight: must be greater than 0"
    );
}

#[test]
fn weight_upper_bound() {
    assert_eq!(
        violations(&services(
            "  - name: a
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.1.0.1, weight: 1000001 }]
"
        )),
        ["services[0].endpoints[0].weight: must be at most 1000000"]
    );
}

#[test]
fn port_zero() {
    assert_eq!(
        violations(&services(
            "  - name: a
    addresses: [10.96.0.1]
    ports: [{ port: 80 }, { port: 0 }, { port: 81, target_port: 0 }]
"
        )),
        [
            "services[0].ports[1].port: must be between 1 and 65535",
            "services[0].ports[2].target_port: must be between 1 and 65535",
        ]
    );
    assert_eq!(
        violations("capture: { enabled: false }\nlisteners: { outbound: \"[::]:0\" }\n"),
        ["listeners.outbound: port must not be 0"]
    );
}

#[test]
fn duplicate_service_name() {
    let text = services(
        "  - name: web
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
  - name: web
    namespace: shop
    addresses: [10.96.0.2]
    ports: [{ port: 80 }]
  - name: web
    addresses: [10.96.0.3]
    ports: [{ port: 80 }]
",
    );
    // The same name in another namespace is a different service.
    assert_eq!(
        violations(&text),
        ["services[2].name: default/web is already defined by services[0]"]
    );
}

#[test]
fn service_address_and_port_claimed_twice() {
    let text = services(
        "  - name: a
    addresses: [10.96.0.1, \"fd96::1\"]
    ports: [{ port: 80 }, { port: 443 }]
  - name: b
    addresses: [10.96.0.2, \"fd96::1\"]
    ports: [{ port: 8080 }, { port: 443 }]
",
    );
    // fd96::1 port 443 is both a's and b's; 10.96.0.1 and 10.96.0.2 are not
    // shared, and fd96::1 port 8080 belongs to b alone.
    assert_eq!(
        violations(&text),
        ["services[1].ports[1].port: fd96::1 port 443 is already used by services[0]"]
    );
    // A third claimant is told about the first owner, and an endpoint of the
    // first owner on its own address is reported once, as its own address,
    // not as belonging to a later claimant.
    let text = services(
        "  - name: a
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.96.0.1 }]
  - name: b
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
  - name: c
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
",
    );
    assert_eq!(
        violations(&text),
        [
            "services[0].endpoints[0].address: is one of the service's own addresses (it would loop)",
            "services[1].ports[0].port: 10.96.0.1 port 80 is already used by services[0]",
            "services[2].ports[0].port: 10.96.0.1 port 80 is already used by services[0]",
        ]
    );
}

#[test]
fn duplicates_inside_one_service() {
    assert_eq!(
        violations(&services(
            "  - name: a
    addresses: [10.96.0.1, 10.96.0.1]
    ports: [{ port: 80 }, { port: 80, target_port: 81 }]
    endpoints: [{ address: 10.1.0.1 }, { address: 10.1.0.1, weight: 3 }]
"
        )),
        [
            "services[0].addresses[1]: is listed twice",
            "services[0].ports[1].port: is listed twice",
            "services[0].endpoints[1].address: is listed twice",
        ]
    );
}

#[test]
fn endpoint_equal_to_a_service_address() {
    // Its own address: the proxy would connect to itself.
    assert_eq!(
        violations(&services(
            "  - name: a
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.1.0.1 }, { address: 10.96.0.1 }]
"
        )),
        ["services[0].endpoints[1].address: is one of the service's own addresses (it would loop)"]
    );
    // Another service's address and port: the connection would be captured
    // again. The endpoint is dialled at the target port, so that is the port
    // that matters.
    let text = services(
        "  - name: a
    addresses: [10.96.0.1]
    ports: [{ port: 80, target_port: 8080 }]
    endpoints: [{ address: 10.96.0.2 }]
  - name: b
    addresses: [10.96.0.2]
    ports: [{ port: 8080 }]
    endpoints: [{ address: 10.1.0.2 }]
",
    );
    assert_eq!(
        violations(&text),
        [
            "services[0].endpoints[0].address: 10.96.0.2:8080 is a service address of \
             services[1]; endpoints must be workload addresses"
        ]
    );
    // The same address on a port that is not a service port is allowed.
    ok(&services(
        "  - name: a
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.96.0.2 }]
  - name: b
    addresses: [10.96.0.2]
    ports: [{ port: 8080 }]
",
    ));
}

#[test]
fn ipv4_mapped_addresses_are_rejected() {
    // `::ffff:10.96.0.1` is 10.96.0.1 to capture and to lookups; accepting
    // the spelling would let a loop or an overlap slip past the checks.
    assert_eq!(
        violations(&services(
            "  - name: a
    addresses: [10.96.0.1]
    ports: [{ port: 80 }]
    endpoints: [{ address: \"::ffff:10.96.0.2\" }]
  - name: b
    addresses: [10.96.0.2]
    ports: [{ port: 80 }]
  - name: c
    addresses: [\"::ffff:10.96.0.1\"]
    ports: [{ port: 80 }]
"
        )),
        [
            "services[0].endpoints[0].address: is an IPv4-mapped IPv6 address: write it as 10.96.0.2",
            "services[2].addresses[0]: is an IPv4-mapped IPv6 address: write it as 10.96.0.1",
        ]
    );
}

#[test]
fn unsupported_protocol() {
    assert_eq!(
        violations(&services(
            "  - name: dns
    addresses: [10.96.0.10]
    ports: [{ port: 53, protocol: UDP }, { port: 54, protocol: SCTP }, { port: 55, protocol: tcp }]
"
        )),
        [
            "services[0].ports[0].protocol: \"UDP\" is not supported (only TCP)",
            "services[0].ports[1].protocol: \"SCTP\" is not supported (only TCP)",
        ]
    );
}

#[test]
fn unusable_service_fields() {
    assert_eq!(
        violations(&services(
            "  - name: Web_1
    namespace: \"-shop\"
    addresses: [224.0.0.1, \"::\"]
    ports: [{ port: 80 }]
    endpoints: [{ address: \"ff02::1\" }, { address: 0.0.0.0 }]
  - name: empty
"
        )),
        [
            "services[0].name: must be a DNS label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
            "services[0].namespace: must be a DNS label",
            "services[0].addresses[0]: must be a unicast address",
            "services[0].addresses[1]: must be a unicast address",
            "services[0].endpoints[0].address: must be a unicast address",
            "services[0].endpoints[1].address: must be a unicast address",
            "services[1].addresses: must list at least one IPv4 or IPv6 address",
            "services[1].ports: must list at least one port",
        ]
    );
    let long = "a".repeat(64);
    assert_eq!(
        violations(&services(&format!(
            "  - name: {long}\n    addresses: [10.96.0.1]\n    ports: [{{ port: 80 }}]\n"
        ))),
        [
            "services[0].name: must be a DNS label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
        ]
    );
    // 63 characters is the limit, not over it.
    ok(&services(&format!(
        "  - name: {}\n    addresses: [10.96.0.1]\n    ports: [{{ port: 80 }}]\n",
        "a".repeat(63)
    )));
}

#[test]
fn capture_enabled_needs_cgroups_and_a_redirect_address() {
    assert_eq!(
        violations("capture: { enabled: true, redirect_ipv4: 10.0.0.1 }\n"),
        ["capture.cgroups: must name at least one cgroup to enroll when capture is enabled"]
    );
    assert_eq!(
        violations("capture: { cgroups: [pods] }\n"),
        ["capture: needs redirect_ipv4 and/or redirect_ipv6 when capture is enabled"]
    );
    assert_eq!(
        violations("capture: { cgroups: [pods], redirect_ipv4: 10.0.0.1, bypass_mark: 0 }\n"),
        ["capture.bypass_mark: must not be 0 (0 is the mark of every unmarked socket)"]
    );
    // Disabled capture needs none of them.
    let c = ok("capture: { enabled: false, bypass_mark: 0 }\n");
    assert_eq!(c.capture.bypass_mark, 0);
}

#[test]
fn redirect_addresses_of_the_wrong_family() {
    assert_eq!(
        violations("capture: { cgroups: [pods], redirect_ipv4: \"fd77:1::1\" }\n"),
        ["capture.redirect_ipv4: must be an IPv4 address"]
    );
    assert_eq!(
        violations("capture: { cgroups: [pods], redirect_ipv6: 10.77.1.1 }\n"),
        ["capture.redirect_ipv6: must be an IPv6 address"]
    );
    assert_eq!(
        violations("capture: { cgroups: [pods], redirect_ipv4: 0.0.0.0, redirect_ipv6: \"::\" }\n"),
        [
            "capture.redirect_ipv4: must be a concrete address of this node, not 0.0.0.0",
            "capture.redirect_ipv6: must be a concrete address of this node, not ::",
        ]
    );
    // The family is checked even with capture off.
    assert_eq!(
        violations("capture: { enabled: false, redirect_ipv4: \"::1\" }\n"),
        ["capture.redirect_ipv4: must be an IPv4 address"]
    );
}

#[test]
fn outbound_listener_must_be_reachable_for_the_redirected_families() {
    assert_eq!(
        violations(
            "listeners: { outbound: \"0.0.0.0:15001\" }
capture: { cgroups: [pods], redirect_ipv4: 10.0.0.1, redirect_ipv6: \"fd00::1\" }
"
        ),
        [
            "listeners.outbound: is IPv4 but capture.redirect_ipv6 is set: use [::]:PORT to accept both families"
        ]
    );
    assert_eq!(
        violations(
            "listeners: { outbound: \"[fd00::1]:15001\" }
capture: { cgroups: [pods], redirect_ipv4: 10.0.0.1 }
"
        ),
        [
            "listeners.outbound: is a concrete IPv6 address but capture.redirect_ipv4 is set: IPv4 clients could not reach it"
        ]
    );
    // The IPv6 wildcard is dual-stack and serves both.
    ok("listeners: { outbound: \"[::]:15001\" }
capture: { cgroups: [pods], redirect_ipv4: 10.0.0.1, redirect_ipv6: \"fd00::1\" }
");
    ok("listeners: { outbound: \"0.0.0.0:15001\" }
capture: { cgroups: [pods], redirect_ipv4: 10.0.0.1 }
");
}

#[test]
fn listener_port_collisions() {
    // 0.0.0.0 overlaps the dual-stack [::] on the same port.
    assert_eq!(
        violations(
            "capture: { enabled: false }
listeners: { metrics: \"0.0.0.0:15001\" }
"
        ),
        ["listeners.metrics: 0.0.0.0:15001 collides with listeners.outbound ([::]:15001)"]
    );
    assert_eq!(
        violations(
            "capture: { enabled: false }
listeners: { outbound: \"127.0.0.1:9000\", metrics: \"127.0.0.1:9000\", readiness: \"0.0.0.0:9000\" }
"
        ),
        [
            "listeners.metrics: 127.0.0.1:9000 collides with listeners.outbound (127.0.0.1:9000)",
            "listeners.readiness: 0.0.0.0:9000 collides with listeners.outbound (127.0.0.1:9000)",
            "listeners.readiness: 0.0.0.0:9000 collides with listeners.metrics (127.0.0.1:9000)",
        ]
    );
    // Different concrete addresses may share a port; port 0 (any free port)
    // never collides.
    ok("capture: { enabled: false }
listeners: { outbound: \"127.0.0.1:9000\", metrics: \"127.0.0.2:9000\", readiness: \"127.0.0.2:0\" }
");
    ok("capture: { enabled: false }
listeners: { metrics: \"127.0.0.1:0\", readiness: \"127.0.0.1:0\" }
");
}

#[test]
fn cgroup_paths() {
    assert_eq!(
        violations(
            "capture:
  redirect_ipv4: 10.0.0.1
  cgroups: [pods, \"../escape\", \"a/../b\", \"/sys/fs/cgroup/..\", \"\", \"  \", \"..x/y..\"]
"
        ),
        [
            "capture.cgroups[1]: must not contain '..'",
            "capture.cgroups[2]: must not contain '..'",
            "capture.cgroups[3]: must not contain '..'",
            "capture.cgroups[4]: must not be empty",
            "capture.cgroups[5]: must not be empty",
        ]
    );
}

#[test]
fn node_name_and_connect_timeout() {
    assert_eq!(
        violations(
            "capture: { enabled: false }
node: { name: \" \" }
proxy: { connect_timeout: 0s, drain_deadline: 0s }
"
        ),
        [
            "node.name: must not be empty",
            "proxy.connect_timeout: must be greater than 0",
        ]
    );
}

#[test]
fn all_violations_are_reported_at_once() {
    let text = "listeners:
  metrics: \"0.0.0.0:15021\"
capture:
  cgroups: [\"../x\"]
  redirect_ipv4: \"fd00::1\"
proxy:
  connect_timeout: 0s
services:
  - name: web
    addresses: [10.96.0.20]
    ports: [{ port: 0 }, { port: 80, protocol: UDP }]
    endpoints: [{ address: 10.1.0.1, weight: 0 }, { address: 10.96.0.20 }]
  - name: api
    addresses: [10.96.0.20]
    ports: [{ port: 80 }]
  - name: web
    addresses: [10.96.0.21]
    ports: [{ port: 81 }]
    endpoints: [{ address: 10.1.0.2, weight: 0 }]
";
    assert_eq!(
        violations(text),
        [
            "listeners.readiness: 0.0.0.0:15021 collides with listeners.metrics (0.0.0.0:15021)",
            "capture.redirect_ipv4: must be an IPv4 address",
            "capture.cgroups[0]: must not contain '..'",
            "proxy.connect_timeout: must be greater than 0",
            "services[0].ports[0].port: must be between 1 and 65535",
            "services[0].ports[1].protocol: \"UDP\" is not supported (only TCP)",
            "services[0].endpoints[0].weight: must be greater than 0",
            "services[0].endpoints[1].address: is one of the service's own addresses (it would loop)",
            "services[1].ports[0].port: 10.96.0.20 port 80 is already used by services[0]",
            "services[2].name: default/web is already defined by services[0]",
            "services[2].endpoints[0].weight: must be greater than 0",
        ]
    );
    // The rendered error lists every one of them, one per line.
    let e = parse(text, "ferry.yaml").unwrap_err().to_string();
    assert_eq!(e.lines().count(), 1 + 11, "{e}");
    assert!(e.starts_with("ferry.yaml: invalid configuration:\n  listeners.readiness: "));
}

// ---------------------------------------------------------------------------
// Mesh: workloads, nodes, endpoints on other nodes, TLS, HBONE, authorization.
// ---------------------------------------------------------------------------

#[test]
fn mesh_defaults() {
    let c = ok(NO_CAPTURE);
    assert_eq!(c.listeners.inbound, "[::]:15008".parse().unwrap());
    assert_eq!(c.tls.trust_domain, "cluster.local");
    assert_eq!(c.tls.ca, CaSource::Generate);
    assert_eq!(c.tls.trust_bundle, None);
    assert_eq!(c.tls.leaf_lifetime, Duration::from_secs(86400));
    assert_eq!(c.hbone.max_streams_per_connection, 100);
    assert!(c.hbone.pooling);
    assert_eq!(c.authorization.mode, AuthorizationMode::Permissive);
    assert!(c.authorization.rules.is_empty());
    assert!(c.workloads.is_empty() && c.nodes.is_empty());
}

#[test]
fn mesh_settings_parse() {
    let c = ok(&format!(
        "{NO_CAPTURE}node: {{ name: node-a }}
workloads:
  - {{ address: 10.77.1.10, service_account: client }}
  - {{ address: \"fd77:1::10\", namespace: shop, service_account: web }}
nodes: {{ node-b: 10.77.0.2, node-c: \"[fd77::3]:16008\", node-a: 10.77.0.1 }}
tls:
  trust_domain: example.org
  ca: {{ cert: /etc/ferry/ca.pem, key: /etc/ferry/ca-key.pem }}
  trust_bundle: /etc/ferry/bundle.pem
  leaf_lifetime: 1h
hbone: {{ max_streams_per_connection: 7, pooling: false }}
authorization:
  mode: STRICT
  rules:
    - {{ action: deny, identities: [\"spiffe://example.org/ns/a/sa/b\"], ports: [22] }}
    - {{ action: allow, identity_prefixes: [\"spiffe://example.org/ns/\"], namespaces: [shop] }}
services:
  - name: web
    addresses: [10.96.0.20]
    ports: [{{ port: 80 }}]
    endpoints:
      - {{ address: 10.77.2.11, node: node-b, namespace: shop, service_account: web }}
      - {{ address: 10.77.1.11, node: node-a }}
      - {{ address: 192.0.2.1 }}
"
    ));
    assert_eq!(
        c.workloads[1],
        Workload {
            address: ip("fd77:1::10"),
            namespace: "shop".into(),
            service_account: "web".into()
        }
    );
    assert_eq!(c.workloads[0].namespace, "default");
    assert_eq!(c.nodes["node-b"], "10.77.0.2:15008".parse().unwrap());
    assert_eq!(c.nodes["node-c"], "[fd77::3]:16008".parse().unwrap());
    assert_eq!(
        c.tls.ca,
        CaSource::Files {
            cert: "/etc/ferry/ca.pem".into(),
            key: "/etc/ferry/ca-key.pem".into()
        }
    );
    assert_eq!(c.tls.leaf_lifetime, Duration::from_secs(3600));
    assert_eq!(c.hbone.max_streams_per_connection, 7);
    assert!(!c.hbone.pooling);
    assert_eq!(c.authorization.mode, AuthorizationMode::Strict);
    assert_eq!(c.authorization.rules[0].action, RuleAction::Deny);
    assert_eq!(c.authorization.rules[0].ports, [22]);
    assert_eq!(c.authorization.rules[1].namespaces, ["shop"]);
    let eps: Vec<&Endpoint> = c.services[0].endpoints().collect();
    assert_eq!(eps[0].locality.node.as_deref(), Some("node-b"));
    assert_eq!(
        (eps[0].namespace.as_str(), eps[0].service_account.as_str()),
        ("shop", "web")
    );
    // Defaults: the service's namespace, service account "default".
    assert_eq!(
        (eps[1].namespace.as_str(), eps[1].service_account.as_str()),
        ("default", "default")
    );
    assert_eq!(eps[1].locality.node.as_deref(), Some("node-a"));
    assert_eq!(eps[2].locality.node, None);
}

#[test]
fn mesh_violations_name_their_field() {
    let text = format!(
        "{NO_CAPTURE}node: {{ name: node-a }}
listeners: {{ inbound: \"0.0.0.0:15020\" }}
workloads:
  - {{ address: 0.0.0.0, namespace: Shop }}
  - {{ address: \"::ffff:10.0.0.1\", service_account: \"a_b\" }}
  - {{ address: 10.0.0.2 }}
  - {{ address: 10.0.0.2 }}
nodes: {{ node-b: \"not an address\", NodeC: 10.0.0.3, node-d: \"10.0.0.4:0\" }}
tls: {{ trust_domain: Cluster.Local, ca: make-one, leaf_lifetime: 500ms }}
hbone: {{ max_streams_per_connection: 0 }}
authorization:
  rules:
    - {{ action: allow, identities: [\"spiffe://cluster.local/ns/a\"], identity_prefixes: [\"http://x\"], namespaces: [A], ports: [0] }}
services:
  - name: web
    addresses: [10.96.0.20]
    ports: [{{ port: 80 }}]
    endpoints:
      - {{ address: 10.77.2.11, node: node-z, namespace: Bad, service_account: \"-x\" }}
"
    );
    assert_eq!(
        violations(&text),
        [
            "listeners.inbound: 0.0.0.0:15020 collides with listeners.metrics (0.0.0.0:15020)",
            "services[0].endpoints[0].namespace: must be a DNS label",
            "services[0].endpoints[0].service_account: must be a DNS label",
            "services[0].endpoints[0].node: \"node-z\" is not in nodes: a mesh endpoint on another node needs that node's HBONE address",
            "workloads[0].address: must be a unicast address",
            "workloads[0].namespace: must be a DNS label",
            "workloads[1].address: is an IPv4-mapped IPv6 address: write it as 10.0.0.1",
            "workloads[1].service_account: must be a DNS label",
            "workloads[3].address: is listed twice",
            "nodes.NodeC: node name must be a lowercase DNS name",
            "nodes.node-b: \"not an address\" is not an address (IP or IP:PORT; the port defaults to 15008)",
            "nodes.node-d: port must not be 0",
            "tls.trust_domain: must be a lowercase DNS name (labels of a-z, 0-9, '-')",
            "tls.ca: \"make-one\": must be \"generate\" or { cert: FILE, key: FILE }",
            "tls.leaf_lifetime: must be at least 1s",
            "hbone.max_streams_per_connection: must be between 1 and 10000",
            "authorization.rules[0].identities[0]: \"spiffe://cluster.local/ns/a\": path must be /ns/<namespace>/sa/<service-account>",
            "authorization.rules[0].identity_prefixes[0]: must start with spiffe:// and name at least a trust domain",
            "authorization.rules[0].namespaces[0]: must be a DNS label",
            "authorization.rules[0].ports[0]: must be between 1 and 65535",
        ]
    );
}

#[test]
fn endpoint_on_an_unlisted_node_without_identity_is_locality_only() {
    // Without an identity, `node` is locality (reached directly): no error.
    let c = ok(&services(
        "  - name: web
    addresses: [10.96.0.20]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.1.0.7, node: node-z }]
",
    ));
    assert_eq!(
        c.services[0].sets[0].endpoints[0].locality.node.as_deref(),
        Some("node-z")
    );
}

#[test]
fn endpoint_outside_the_mesh() {
    // `mesh: false`: no identity, and a listed node does not make it
    // tunnelled (the snapshot's job; here only the field and its rules).
    let c = ok(&format!(
        "nodes: {{ node-b: 10.77.0.2 }}\n{}",
        services(
            "  - name: web
    addresses: [10.96.0.20]
    ports: [{ port: 80 }]
    endpoints:
      - { address: 10.1.1.7, node: node-b, mesh: false }
      - { address: 10.1.1.8, node: node-b }
",
        )
    ));
    let eps = &c.services[0].sets[0].endpoints;
    assert_eq!((eps[0].mesh, eps[1].mesh), (false, true), "default true");
    let text = services(
        "  - name: web
    addresses: [10.96.0.20]
    ports: [{ port: 80 }]
    endpoints: [{ address: 10.1.1.7, node: node-z, mesh: false, service_account: web }]
",
    );
    assert_eq!(
        violations(&text),
        [
            "services[0].endpoints[0].mesh: is false but the endpoint has a namespace or service_account (an identity is for mesh pods)"
        ]
    );
}

#[test]
fn mesh_parse_errors_name_their_field() {
    let (field, message) = parse_error("authorization: { mode: strict }\n");
    assert_eq!(field, "authorization.mode");
    assert!(message.contains("unknown variant"), "{message}");
    let (field, message) = parse_error("authorization: { rules: [{ action: maybe }] }\n");
    assert_eq!(field, "authorization.rules[0].action");
    assert!(message.contains("unknown variant"), "{message}");
    let (field, _) = parse_error("tls: { ca_cert: x }\n");
    assert_eq!(field, "tls.ca_cert");
}
