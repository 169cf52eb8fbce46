//! kiln-auth's unit tests: token files, bearer lookup, HMAC signing and its
//! refusals, replay bounds, scopes and grants.

use std::path::Path;

use super::*;

fn tokens(text: &str) -> Tokens {
    Tokens::parse(text, Path::new("tokens")).unwrap()
}

fn auth(text: &str) -> Authenticator {
    Authenticator::new(AuthConfig {
        tokens: Some(tokens(text)),
        client_certs: false,
        certs_only: false,
        grants: [("ops".to_string(), Scopes::ALL)].into_iter().collect(),
        default_scopes: Scopes::READ_WRITE,
        skew_secs: 300,
    })
}

const FILE: &str = "# ci tokens\n\
    ci:s3cret\n\
    viewer:look read\n\
    ops:sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\n";

#[test]
fn token_file_forms_and_scopes() {
    let a = auth(FILE);
    let ci = a.bearer("s3cret").unwrap();
    assert_eq!((ci.name.as_str(), ci.scopes), ("ci", Scopes::READ_WRITE));
    let v = a.bearer("look").unwrap();
    assert!(v.scopes.contains(Scope::Read) && !v.scopes.contains(Scope::Write));
    // sha256("secret") is stored; the clear token still works as a bearer.
    let ops = a.bearer("secret").unwrap();
    assert_eq!((ops.name.as_str(), ops.scopes), ("ops", Scopes::ALL));
    assert_eq!(a.bearer("wrong"), Err(Denied::Invalid));
    assert_eq!(a.bearer(""), Err(Denied::Invalid));
    // The hash itself is not a token.
    assert_eq!(
        a.bearer("2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"),
        Err(Denied::Invalid)
    );
}

#[test]
fn token_file_errors_name_the_line() {
    for (text, want) in [
        ("a:b\nnocolon\n", "tokens:2"),
        ("a:b\na:c\n", "listed twice"),
        ("x:sha256:zz\n", "64 hex"),
        ("x:t superuser\n", "invalid scope"),
        ("bad name:t\n", "tokens:1"),
        ("x:\n", "empty token"),
    ] {
        let e = Tokens::parse(text, Path::new("tokens"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{text:?}: {e}");
    }
    let e = Tokens::load(Path::new("/nonexistent/tokens"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/tokens"), "{e}");
}

#[test]
fn hmac_round_trip_and_refusals() {
    let a = auth(FILE);
    let now = 1_700_000_000;
    let body = body_sha256_hex(b"{}");
    let h = sign(
        "ci",
        b"s3cret",
        now,
        "n1",
        "POST",
        "/api/v1/build?x=1",
        &body,
    );
    let p = HmacParams::parse(h.strip_prefix("KILN-HMAC-SHA256 ").unwrap()).unwrap();
    let id = a
        .hmac(&p, "POST", "/api/v1/build?x=1", &body, now + 10)
        .unwrap();
    assert_eq!((id.name.as_str(), id.method), ("ci", AuthMethod::Hmac));
    // The same request again is a replay.
    assert_eq!(
        a.hmac(&p, "POST", "/api/v1/build?x=1", &body, now + 11),
        Err(Denied::Replay)
    );
    // Each covered part matters.
    let fresh = |nonce: &str| {
        let h = sign(
            "ci",
            b"s3cret",
            now,
            nonce,
            "POST",
            "/api/v1/build?x=1",
            &body,
        );
        HmacParams::parse(h.strip_prefix("KILN-HMAC-SHA256 ").unwrap()).unwrap()
    };
    let p2 = fresh("n2");
    let other = body_sha256_hex(b"{ }");
    assert_eq!(
        a.hmac(&p2, "POST", "/api/v1/build?x=1", &other, now),
        Err(Denied::Invalid)
    );
    assert_eq!(
        a.hmac(&p2, "PUT", "/api/v1/build?x=1", &body, now),
        Err(Denied::Invalid)
    );
    assert_eq!(
        a.hmac(&p2, "POST", "/api/v1/build?x=2", &body, now),
        Err(Denied::Invalid)
    );
    assert_eq!(
        a.hmac(&p2, "POST", "/api/v1/build?x=1", &body, now + 301),
        Err(Denied::Skew(300))
    );
    assert_eq!(
        a.hmac(&p2, "POST", "/api/v1/build?x=1", &body, now - 301),
        Err(Denied::Skew(300))
    );
    // Failed attempts were not remembered: the genuine request still passes.
    a.hmac(&p2, "POST", "/api/v1/build?x=1", &body, now)
        .unwrap();
    // A wrong secret, and a hashed entry (no secret to check against).
    let bad = sign("ci", b"guess", now, "n3", "GET", "/", &body);
    let bad = HmacParams::parse(bad.strip_prefix("KILN-HMAC-SHA256 ").unwrap()).unwrap();
    assert_eq!(a.hmac(&bad, "GET", "/", &body, now), Err(Denied::Invalid));
    let ops = sign("ops", b"secret", now, "n4", "GET", "/", &body);
    let ops = HmacParams::parse(ops.strip_prefix("KILN-HMAC-SHA256 ").unwrap()).unwrap();
    assert_eq!(a.hmac(&ops, "GET", "/", &body, now), Err(Denied::Invalid));
}

#[test]
fn hmac_header_parsing() {
    let sig = "ab".repeat(32);
    let ok = HmacParams::parse(&format!("Credential=a, Timestamp=5, Signature={sig}")).unwrap();
    assert_eq!(
        (ok.credential.as_str(), ok.timestamp, ok.nonce.as_str()),
        ("a", 5, "")
    );
    for bad in [
        format!("Credential=a, Signature={sig}"),
        format!("Credential=a, Timestamp=x, Signature={sig}"),
        "Credential=a, Timestamp=5, Signature=abc".to_string(),
        format!("Credential=a, Credential=b, Timestamp=5, Signature={sig}"),
        format!("Credential=a, Timestamp=5, Nonce=a b, Signature={sig}"),
        format!("Credential=a, Timestamp=5, Extra=1, Signature={sig}"),
    ] {
        assert!(
            matches!(HmacParams::parse(&bad), Err(Denied::Malformed(_))),
            "{bad}"
        );
    }
}

#[test]
fn certs_only_refuses_tokens() {
    let mut cfg = auth(FILE).config().clone();
    cfg.certs_only = true;
    cfg.client_certs = true;
    let a = Authenticator::new(cfg);
    assert_eq!(a.bearer("s3cret"), Err(Denied::CertificateRequired));
    let id = a.certificate("ops");
    assert_eq!(
        (id.method, id.scopes),
        (AuthMethod::Certificate, Scopes::ALL)
    );
    assert_eq!(a.certificate("node1").scopes, Scopes::READ_WRITE);
}

#[test]
fn replay_cache_is_bounded() {
    let c = ReplayCache::new(600, 2);
    c.insert(&[1; 32], 0, 0).unwrap();
    c.insert(&[2; 32], 0, 0).unwrap();
    assert_eq!(c.insert(&[3; 32], 0, 0), Err(Denied::Busy));
    // Once the old entries are out of the window they make room.
    c.insert(&[3; 32], 1000, 1000).unwrap();
    assert_eq!(c.len(), 1);
}

#[test]
fn scopes_and_grants() {
    assert_eq!("read".parse::<Scopes>().unwrap().to_string(), "read");
    assert_eq!("all".parse::<Scopes>().unwrap(), Scopes::ALL);
    assert!("".parse::<Scopes>().is_err());
    assert!("root".parse::<Scopes>().is_err());
    let (n, s) = parse_grant("node-1.example=read,admin").unwrap();
    assert_eq!(n, "node-1.example");
    assert!(s.contains(Scope::Admin) && !s.contains(Scope::Write));
    assert!(parse_grant("=read").is_err());
    assert!(parse_grant("x").is_err());
}
