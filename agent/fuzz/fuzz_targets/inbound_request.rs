//! The inbound tunnel's request parsing: any method and request-target the
//! HTTP layer accepts must give a target or an error, never a panic, and a
//! target it returns must print back as the authority it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First line: the method; the rest: the request-target.
    let (method, target) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"CONNECT"[..], data),
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    if let Ok(addr) = ferry::hbone::parse_connect(&method, &uri) {
        assert_eq!(method, http::Method::CONNECT);
        assert_ne!(addr.port(), 0);
        // Canonical forms only: what we accept is what we would send.
        assert_eq!(
            Some(addr.to_string().as_str()),
            uri.authority().map(|a| a.as_str())
        );
    }
});
