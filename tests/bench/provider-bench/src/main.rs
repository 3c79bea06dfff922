//! rustls crypto provider measurement: ring vs aws-lc-rs, one thread, in
//! memory (no sockets), so only the crypto and rustls differ.
//!
//! * handshakes/s: full TLS 1.3 mutual-TLS handshakes (ECDSA P-256 leaves,
//!   X25519 key exchange, no resumption), client and server in one thread.
//! * bulk: AES-128-GCM and AES-256-GCM, 16 KiB records, encrypt on one side
//!   and decrypt on the other, MiB/s of plaintext.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

struct Pki {
    ca: CertificateDer<'static>,
    server: (Vec<CertificateDer<'static>>, Vec<u8>),
    client: (Vec<CertificateDer<'static>>, Vec<u8>),
}

fn pki() -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (vec![cert.der().clone()], key.serialize_der())
    };
    Pki {
        ca: ca.der().clone(),
        server: leaf("server.test"),
        client: leaf("client.test"),
    }
}

fn configs(
    p: &Arc<CryptoProvider>,
    pki: &Pki,
    suite: Option<rustls::SupportedCipherSuite>,
) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let mut provider = (**p).clone();
    if let Some(s) = suite {
        provider.cipher_suites = vec![s];
    }
    let provider = Arc::new(provider);
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let roots = Arc::new(roots);
    let key = |k: &Vec<u8>| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.clone()));
    let client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(pki.client.0.clone(), key(&pki.client.1))
        .unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .unwrap();
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server.0.clone(), key(&pki.server.1))
        .unwrap();
    server.send_tls13_tickets = 0;
    (Arc::new(client), Arc::new(server))
}


fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
    let mut buf = Vec::new();
    loop {
        let mut moved = false;
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        if !moved {
            return;
        }
    }
}

fn handshakes(cc: &Arc<ClientConfig>, sc: &Arc<ServerConfig>, dur: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        let mut c =
            ClientConnection::new(cc.clone(), ServerName::try_from("server.test").unwrap()).unwrap();
        let mut s = ServerConnection::new(sc.clone()).unwrap();
        pump(&mut c, &mut s);
        assert!(!c.is_handshaking() && !s.is_handshaking());
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn bulk(cc: &Arc<ClientConfig>, sc: &Arc<ServerConfig>, total: usize) -> f64 {
    let mut c =
        ClientConnection::new(cc.clone(), ServerName::try_from("server.test").unwrap()).unwrap();
    let mut s = ServerConnection::new(sc.clone()).unwrap();
    pump(&mut c, &mut s);
    let chunk = vec![0x5au8; 16 * 1024];
    let mut out = vec![0u8; 64 * 1024];
    let mut wire = Vec::with_capacity(64 * 1024);
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        c.writer().write_all(&chunk).unwrap();
        sent += chunk.len();
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        let mut got = 0;
        while got < chunk.len() {
            got += s.reader().read(&mut out).unwrap();
        }
    }
    (total as f64 / (1024.0 * 1024.0)) / start.elapsed().as_secs_f64()
}

fn main() {
    let pki = pki();
    let providers: [(&str, Arc<CryptoProvider>); 2] = [
        ("ring", Arc::new(rustls::crypto::ring::default_provider())),
        ("aws-lc-rs", Arc::new(rustls::crypto::aws_lc_rs::default_provider())),
    ];
    println!("| provider | mTLS handshakes/s | AES-128-GCM MiB/s | AES-256-GCM MiB/s |");
    println!("|---|---|---|---|");
    for round in 0..2 {
        for (name, p) in &providers {
            let (cc, sc) = configs(p, &pki, None);
            let hs = handshakes(&cc, &sc, Duration::from_secs(3));
            let find = |n: rustls::CipherSuite| {
                p.cipher_suites.iter().copied().find(|s| s.suite() == n)
            };
            let (c128, s128) = configs(p, &pki, find(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
            let (c256, s256) = configs(p, &pki, find(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
            let b128 = bulk(&c128, &s128, 1 << 30);
            let b256 = bulk(&c256, &s256, 1 << 30);
            if round == 1 {
                println!("| {name} | {hs:.0} | {b128:.0} | {b256:.0} |");
            }
        }
    }
}
