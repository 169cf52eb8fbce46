//! Access control through the real binary: tokens, KILN-HMAC-SHA256,
//! client certificates made by openssl, TLS rotation, scopes and the audit
//! log, checked with curl and with kiln's own (rustls) client.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SHA_ADMINTOKEN: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"; // sha256("secret")

fn token_file(dir: &Path) -> String {
    let p = dir.join("tokens");
    std::fs::write(
        &p,
        format!("# test tokens\nci:s3cret\nviewer:look read\nops:sha256:{SHA_ADMINTOKEN} all\n"),
    )
    .unwrap();
    p.display().to_string()
}

/// A tiny valid tar.gz: enough to create a build job (which then fails).
fn tiny_tgz(dir: &Path) -> String {
    sh(&format!(
        "cd {d} && mkdir -p t && echo x > t/Makefile && tar czf tiny.tgz t",
        d = dir.display()
    ));
    dir.join("tiny.tgz").display().to_string()
}

fn audit(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("cache/state/audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn code_of(body: &[u8]) -> String {
    json(body)["code"].as_str().unwrap_or_default().to_string()
}

#[test]
fn tokens_scopes_open_routes_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let src = module_source(dir.path(), "");
    let s = Server::start(
        dir.path(),
        &[
            "--api-tokens-file",
            &tokens,
            "--drbd-dir",
            src.to_str().unwrap(),
        ],
    );
    for open in [
        "/health",
        "/healthz",
        "/livez",
        "/readyz",
        "/api/v1/hello",
        "/metrics",
    ] {
        let (code, _) = curl(&[&s.url(open)]);
        assert_eq!(code, 200, "{open} stays open");
    }
    // No credentials, a wrong token, an unknown scheme: 401, and the body never says why.
    let (code, body) = curl(&["-D", "-", &s.url("/api/v1/jobs")]);
    assert_eq!(code, 401);
    let text = String::from_utf8_lossy(&body).to_lowercase();
    assert!(text.contains("www-authenticate: bearer"), "{text}");
    for h in [
        "Authorization: Bearer wrong",
        "X-API-Token: wrong",
        "Authorization: Bearer s3cre",
        "Authorization: Basic Y2k6czNjcmV0",
    ] {
        let (code, body) = curl(&["-H", h, &s.url("/api/v1/jobs")]);
        assert_eq!(code, 401, "{h}");
        assert_eq!(code_of(&body), "unauthorized");
        assert!(!String::from_utf8_lossy(&body).contains("s3cret"));
    }
    // The right token, both ways; a hashed entry works as a bearer token.
    for h in [
        "Authorization: Bearer s3cret",
        "X-API-Token: s3cret",
        "Authorization: bearer secret",
    ] {
        let (code, body) = curl(&["-H", h, &s.url("/api/v1/jobs")]);
        assert_eq!(code, 200, "{h}: {}", String::from_utf8_lossy(&body));
    }
    // Unknown paths need credentials before they answer 404.
    assert_eq!(curl(&[&s.url("/api/v1/nope")]).0, 401);
    let (code, body) = curl(&["-H", "X-API-Token: look", &s.url("/api/v1/whoami")]);
    assert_eq!(code, 200);
    assert_eq!(json(&body)["identity"], "viewer");
    assert_eq!(json(&body)["scopes"], serde_json::json!(["read"]));
    assert_eq!(
        curl(&["-H", "X-API-Token: look", &s.url("/api/v1/nope")]).0,
        404
    );

    // Scopes: read cannot write, write cannot purge, admin can.
    let tgz = tiny_tgz(dir.path());
    let post = |tok: &str| {
        curl(&[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {tok}"),
            "-H",
            "X-Kernel-Version: 6.1.0-9-amd64",
            "--data-binary",
            &format!("@{tgz}"),
            &s.url("/api/v1/build"),
        ])
    };
    let (code, body) = post("look");
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&body), "forbidden");
    assert!(json(&body)["error"].as_str().unwrap().contains("write"));
    let (code, body) = post("s3cret");
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let job = json(&body)["job_id"].as_str().unwrap().to_string();
    let (code, _) = curl(&[
        "-H",
        "X-API-Token: look",
        &s.url(&format!("/api/v1/status/{job}")),
    ]);
    assert!(code == 200 || code == 202);
    let purge = |tok: &str| {
        curl(&[
            "-X",
            "DELETE",
            "-H",
            &format!("X-API-Token: {tok}"),
            &s.url("/api/v1/cache"),
        ])
    };
    assert_eq!(purge("s3cret").0, 403);
    let (code, body) = purge("secret");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(json(&body)["evicted"].is_u64());

    // The audit log has every mutating request: who, which job, what came of it.
    let a = audit(dir.path());
    let find = |who: Option<&str>, status: u64| {
        a.iter()
            .find(|r| r["identity"].as_str() == who && r["status"].as_u64() == Some(status))
            .unwrap_or_else(|| panic!("no audit record for {who:?}/{status} in {a:#?}"))
    };
    let built = find(Some("ci"), 202);
    assert_eq!(built["job_id"].as_str(), Some(job.as_str()));
    assert_eq!(built["auth"].as_str(), Some("token"));
    assert_eq!(built["method"].as_str(), Some("POST"));
    assert_eq!(
        find(Some("viewer"), 403)["route"].as_str(),
        Some("/api/v1/build")
    );
    assert_eq!(
        find(Some("ops"), 200)["path"].as_str(),
        Some("/api/v1/cache")
    );
    assert_eq!(
        find(Some("ci"), 403)["path"].as_str(),
        Some("/api/v1/cache")
    );
    // Reads are not audited.
    assert!(a.iter().all(|r| r["method"] != "GET"), "{a:#?}");
}

/// curl with a KILN-HMAC-SHA256 signature made by kiln-auth.
fn signed(
    s: &Server,
    method: &str,
    pq: &str,
    sign_body: &[u8],
    send_body: Option<&Path>,
    (ts, nonce): (i64, &str),
    declare: bool,
) -> (u16, Vec<u8>) {
    let h = kiln_auth::body_sha256_hex(sign_body);
    let auth = kiln_auth::sign("ci", b"s3cret", ts, nonce, method, pq, &h);
    let mut args = vec![
        "-X".to_string(),
        method.to_string(),
        "-H".into(),
        format!("Authorization: {auth}"),
        "-H".into(),
        "X-Kernel-Version: 6.1.0-9-amd64".into(),
    ];
    if declare {
        args.extend(["-H".into(), format!("X-Kiln-Content-SHA256: {h}")]);
    }
    if let Some(b) = send_body {
        args.extend(["--data-binary".into(), format!("@{}", b.display())]);
    }
    args.push(s.url(pq));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&refs)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn hmac_signed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let src = module_source(dir.path(), "");
    let s = Server::start(
        dir.path(),
        &[
            "--api-tokens-file",
            &tokens,
            "--drbd-dir",
            src.to_str().unwrap(),
        ],
    );
    let t = now();
    // Fresh: accepted. The same request again: a replay.
    let (code, body) = signed(
        &s,
        "GET",
        "/api/v1/jobs?status=failed",
        b"",
        None,
        (t, "a1"),
        false,
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (code, body) = signed(
        &s,
        "GET",
        "/api/v1/jobs?status=failed",
        b"",
        None,
        (t, "a1"),
        false,
    );
    assert_eq!(code, 401);
    assert!(json(&body)["error"].as_str().unwrap().contains("replay"));
    // Outside the ±300 s window, either way.
    for skew in [-400, 400] {
        let (code, body) = signed(
            &s,
            "GET",
            "/api/v1/jobs",
            b"",
            None,
            (t + skew, "a2"),
            false,
        );
        assert_eq!(code, 401);
        assert!(json(&body)["error"].as_str().unwrap().contains("window"));
    }
    // The signature covers the query: a changed query is refused.
    let h = kiln_auth::body_sha256_hex(b"");
    let auth = kiln_auth::sign(
        "ci",
        b"s3cret",
        t,
        "a3",
        "GET",
        "/api/v1/jobs?status=failed",
        &h,
    );
    let (code, _) = curl(&[
        "-H",
        &format!("Authorization: {auth}"),
        &s.url("/api/v1/jobs?status=completed"),
    ]);
    assert_eq!(code, 401);

    // A small body altered after signing (buffered and checked up front).
    let tgz = tiny_tgz(dir.path());
    let orig = std::fs::read(&tgz).unwrap();
    let mut other = orig.clone();
    *other.last_mut().unwrap() ^= 1;
    let other_p = dir.path().join("other.tgz");
    std::fs::write(&other_p, &other).unwrap();
    let pq = "/api/v1/build";
    let (code, _) = signed(&s, "POST", pq, &orig, Some(&other_p), (now(), "b1"), false);
    assert_eq!(code, 401);
    let (code, _) = signed(&s, "POST", pq, &orig, Some(&other_p), (now(), "b2"), true);
    assert_eq!(code, 401);
    let (code, body) = signed(
        &s,
        "POST",
        pq,
        &orig,
        Some(Path::new(&tgz)),
        (now(), "b3"),
        true,
    );
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));

    // A large body (streamed) altered after signing: refused at its end,
    // and nothing of it is kept.
    let big = dir.path().join("big.tgz");
    sh(&format!(
        "cd {d} && head -c 3000000 /dev/urandom > t/blob && tar czf {b} t",
        d = dir.path().display(),
        b = big.display()
    ));
    let big_bytes = std::fs::read(&big).unwrap();
    let mut bad = big_bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let bad_p = dir.path().join("bad.tgz");
    std::fs::write(&bad_p, &bad).unwrap();
    let (code, body) = signed(&s, "POST", pq, &big_bytes, Some(&big), (now(), "c0"), false);
    assert_eq!(
        code,
        413,
        "an undeclared large signed body: {}",
        String::from_utf8_lossy(&body)
    );
    let blobs_before = blob_count(dir.path());
    let (code, body) = signed(
        &s,
        "POST",
        pq,
        &big_bytes,
        Some(&bad_p),
        (now(), "c1"),
        true,
    );
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("does not match"));
    assert_eq!(
        blob_count(dir.path()),
        blobs_before,
        "the altered upload was not cached"
    );
    let (code, body) = signed(&s, "POST", pq, &big_bytes, Some(&big), (now(), "c2"), true);
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    assert_eq!(blob_count(dir.path()), blobs_before + 1);

    // A hashed entry holds no secret to verify a signature with.
    let auth = kiln_auth::sign("ops", b"secret", now(), "d1", "GET", "/api/v1/jobs", &h);
    assert_eq!(
        curl(&[
            "-H",
            &format!("Authorization: {auth}"),
            &s.url("/api/v1/jobs")
        ])
        .0,
        401
    );
}

fn blob_count(dir: &Path) -> usize {
    walk_files(&dir.join("cache/sha256"))
}

fn walk_files(p: &Path) -> usize {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.file_type().unwrap().is_dir() {
                        walk_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn cli_signs_a_real_build() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let src = module_source(dir.path(), "");
    let s = Server::start(
        dir.path(),
        &[
            "--api-tokens-file",
            &tokens,
            "--drbd-dir",
            src.to_str().unwrap(),
        ],
    );
    let out = dir.path().join("mods.tgz");
    let kiln = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "kmod",
                "build",
                "--server",
                &s.url(""),
                "--kernel-version",
                &f.kver,
            ])
            .args([
                "--headers",
                f.headers.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = kiln(&[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = kiln(&["--token-name", "ci", "--token", "s3cret"]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.log()
    );
    assert!(tar_names(&std::fs::read(&out).unwrap())
        .iter()
        .any(|n| n.ends_with("hello.ko")));
    // The upload (14 MB, over the buffering limit) went through the streaming check.
    let a = audit(dir.path());
    assert!(
        a.iter()
            .any(|r| r["auth"] == "hmac" && r["identity"] == "ci" && r["status"] == 202),
        "{a:#?}"
    );
    // A read-only token is told so before anything is packed or uploaded.
    let o = kiln(&["--token", "look"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("lacks the write scope"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A wrong secret is refused before anything is built.
    let o = kiln(&["--token-name", "ci", "--token", "guess", "--force"]);
    assert!(!o.status.success());
}

/// A CA, a server certificate for 127.0.0.1, and client certificates: one
/// from the CA, one from another CA, one from the CA but expired.
fn pki(d: &Path) {
    let d = d.display();
    sh(&format!(
        r#"cd {d}
ec() {{ openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $1 2>/dev/null; }}
ca() {{ ec $1.key; openssl req -x509 -new -key $1.key -days 30 -subj "/CN=$1" -out $1.crt; }}
leaf() {{ # name ca subj ext
  ec $1.key; openssl req -new -key $1.key -subj "$3" -out $1.csr
  printf '%s\n' "$4" > $1.ext
  openssl x509 -req -in $1.csr -CA $2.crt -CAkey $2.key -CAcreateserial -days 30 -extfile $1.ext -out $1.crt 2>/dev/null
}}
ca ca; ca rogueca; ca ca2
leaf server ca /CN=kiln "subjectAltName=IP:127.0.0.1"
leaf server2 ca2 /CN=kiln2 "subjectAltName=IP:127.0.0.1"
leaf node1 ca /CN=node1 "extendedKeyUsage=clientAuth"
leaf rogue rogueca /CN=node1 "extendedKeyUsage=clientAuth"
ec expired.key; openssl req -new -key expired.key -subj /CN=node1 -out expired.csr
mkdir -p db && : > db/index && echo 01 > db/serial
cat > ca.cnf <<'C'
[ca]
default_ca = d
[d]
database = db/index
serial = db/serial
new_certs_dir = db
default_md = sha256
policy = p
[p]
commonName = supplied
C
openssl ca -batch -config ca.cnf -cert ca.crt -keyfile ca.key -in expired.csr -out expired.crt \
  -startdate 20200101000000Z -enddate 20200201000000Z 2>/dev/null
"#
    ));
}

#[test]
fn mutual_tls_identities() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d);
    let p = |n: &str| d.join(n).display().to_string();
    let tokens = token_file(d);
    let src = module_source(d, "");
    let s = Server::start_on(
        d,
        free_port(),
        &[
            "--certfile",
            &p("server.crt"),
            "--keyfile",
            &p("server.key"),
            "--client-ca-cert",
            &p("ca.crt"),
            "--api-tokens-file",
            &tokens,
            "--grant",
            "node1=read,write,admin",
            "--drbd-dir",
            src.to_str().unwrap(),
        ],
        "https",
    );
    let tls = |client: &str, path: &str, extra: &[&str]| {
        let mut a = vec!["--cacert".to_string(), p("ca.crt")];
        if !client.is_empty() {
            a.extend([
                "--cert".into(),
                p(&format!("{client}.crt")),
                "--key".into(),
                p(&format!("{client}.key")),
            ]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(s.url(path));
        let r: Vec<&str> = a.iter().map(String::as_str).collect();
        curl(&r)
    };
    // A certificate from the CA is an identity; no credentials is 401;
    // certificates from another CA, or expired, fail the handshake.
    assert_eq!(tls("node1", "/api/v1/jobs", &[]).0, 200);
    assert_eq!(tls("", "/api/v1/jobs", &[]).0, 401);
    assert_eq!(
        tls("", "/healthz", &[]).0,
        200,
        "probes need no certificate"
    );
    assert_eq!(tls("rogue", "/api/v1/jobs", &[]).0, 0);
    assert_eq!(tls("expired", "/api/v1/jobs", &[]).0, 0);
    // Optional mode: tokens work too.
    assert_eq!(
        tls("", "/api/v1/jobs", &["-H", "X-API-Token: s3cret"]).0,
        200
    );
    // The certificate's subject gets its grant, and the audit log names it.
    let (code, body) = tls("node1", "/api/v1/cache", &["-X", "DELETE"]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(audit(d)
        .iter()
        .any(|r| r["identity"] == "node1" && r["auth"] == "certificate" && r["status"] == 200));
    // Plain HTTP is not served on the TLS port.
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{}/healthz", s.port)]).0,
        0
    );

    // kiln's own client (rustls): a job submitted with the certificate, then read back.
    let tgz = tiny_tgz(d);
    let (code, body) = tls(
        "node1",
        "/api/v1/build",
        &[
            "-X",
            "POST",
            "-H",
            "X-Kernel-Version: 6.1.0-9-amd64",
            "--data-binary",
            &format!("@{tgz}"),
        ],
    );
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let job = json(&body)["job_id"].as_str().unwrap().to_string();
    let status = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "status",
                &job,
                "--server",
                &s.url(""),
                "--cacert",
                &p("ca.crt"),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = status(&["--cert", &p("node1.crt"), "--key", &p("node1.key")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&job));
    let o = status(&[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("401"));
    let o = status(&["--cert", &p("rogue.crt"), "--key", &p("rogue.key")]);
    assert!(!o.status.success());
    let o = status(&["--token", "look"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(s);

    // Required mode: only certificates count.
    let s = Server::start_on(
        &d.join("req"),
        free_port(),
        &[
            "--certfile",
            &p("server.crt"),
            "--keyfile",
            &p("server.key"),
            "--client-ca-cert",
            &p("ca.crt"),
            "--api-tokens-file",
            &tokens,
            "--client-auth",
            "required",
            "--drbd-dir",
            "/nonexistent",
        ],
        "https",
    );
    let (code, body) = curl(&[
        "--cacert",
        &p("ca.crt"),
        "-H",
        "X-API-Token: s3cret",
        &s.url("/api/v1/jobs"),
    ]);
    assert_eq!(code, 401);
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("only client certificates"));
    let (code, _) = curl(&[
        "--cacert",
        &p("ca.crt"),
        "--cert",
        &p("node1.crt"),
        "--key",
        &p("node1.key"),
        &s.url("/api/v1/jobs"),
    ]);
    assert_eq!(code, 200);
}

/// Replace `dst` atomically, as certificate tooling does.
fn install(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn certificate_rotation_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d);
    let p = |n: &str| d.join(n);
    install(&p("server.crt"), &p("live.crt"));
    install(&p("server.key"), &p("live.key"));
    let live = |n: &str| p(n).display().to_string();
    let args = |watch: &'static str| {
        vec![
            "--certfile".to_string(),
            live("live.crt"),
            "--keyfile".into(),
            live("live.key"),
            "--tls-watch-interval".into(),
            watch.into(),
            "--drbd-dir".into(),
            "/nonexistent".into(),
        ]
    };
    let trusts = |s: &Server, ca: &str| curl(&["--cacert", &live(ca), &s.url("/healthz")]).0 == 200;
    // File change: the watcher picks up the new pair.
    let a = args("1");
    let s = Server::start_on(
        &d.join("w"),
        free_port(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "https",
    );
    assert!(trusts(&s, "ca.crt") && !trusts(&s, "ca2.crt"));
    install(&p("server2.key"), &p("live.key"));
    install(&p("server2.crt"), &p("live.crt"));
    until("the rotated certificate", || trusts(&s, "ca2.crt"));
    // A broken file is refused and the working certificate stays.
    std::fs::write(p("live.crt"), "not a certificate").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(trusts(&s, "ca2.crt"));
    assert!(s.log().contains("TLS reload failed"));
    drop(s);

    // SIGHUP, with the watcher off.
    install(&p("server.crt"), &p("live.crt"));
    install(&p("server.key"), &p("live.key"));
    let a = args("0");
    let s = Server::start_on(
        &d.join("h"),
        free_port(),
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "https",
    );
    assert!(trusts(&s, "ca.crt"));
    install(&p("server2.key"), &p("live.key"));
    install(&p("server2.crt"), &p("live.crt"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        trusts(&s, "ca.crt"),
        "no reload without a signal when the watcher is off"
    );
    sh(&format!("kill -HUP {}", s.child.id()));
    until("the SIGHUP reload", || trusts(&s, "ca2.crt"));
}

#[test]
fn start_refusals_and_protected_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "serve",
                "--addr",
                "127.0.0.1:1",
                "--cache-dir",
                d.join("c").to_str().unwrap(),
            ])
            .args(args)
            .env_remove("API_TOKENS_FILE")
            .env_remove("CLIENT_CA_CERT")
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} must not start");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(run(&["--require-auth"]).contains("no authentication is configured"));
    let e = run(&["--api-tokens-file", "/nonexistent/tokens"]);
    assert!(e.contains("/nonexistent/tokens"), "{e}");
    std::fs::write(d.join("empty"), "# nothing\n").unwrap();
    assert!(run(&["--api-tokens-file", d.join("empty").to_str().unwrap()]).contains("no tokens"));
    std::fs::write(d.join("bad"), "ci:t\nbroken\n").unwrap();
    assert!(run(&["--api-tokens-file", d.join("bad").to_str().unwrap()]).contains(":2:"));
    assert!(run(&["--client-ca-cert", "/etc/ssl/certs/ca-certificates.crt"]).contains("needs TLS"));
    assert!(run(&["--grant", "x=root"]).contains("invalid scope"));

    // Open with a loud warning; metrics protected on request.
    let s = Server::start(&d.join("open"), &["--drbd-dir", "/nonexistent"]);
    assert_eq!(curl(&[&s.url("/api/v1/jobs")]).0, 200);
    assert!(s.log().contains("NO AUTHENTICATION CONFIGURED"));
    drop(s);
    let tokens = token_file(d);
    let s = Server::start(
        &d.join("m"),
        &[
            "--api-tokens-file",
            &tokens,
            "--metrics-auth",
            "--drbd-dir",
            "/nonexistent",
        ],
    );
    assert_eq!(curl(&[&s.url("/metrics")]).0, 401);
    let (code, body) = curl(&["-H", "Authorization: Bearer look", &s.url("/metrics")]);
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("kiln_http_requests_total"));
    assert_eq!(curl(&[&s.url("/healthz")]).0, 200);
}

/// The README's bash + openssl signing recipe, run as written against kiln:
/// an independent implementation of the scheme, so the docs cannot drift.
#[test]
fn readme_signing_recipe_works() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let start = readme
        .find("With `bash` and `openssl`:")
        .expect("recipe in README");
    let block = &readme[start..];
    let code = block
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokens"), "ci:Zm9vYmFyYmF6\n").unwrap();
    let s = Server::start(
        dir.path(),
        &[
            "--api-tokens-file",
            dir.path().join("tokens").to_str().unwrap(),
            "--drbd-dir",
            "/nonexistent",
        ],
    );
    let script = code
        .replace("http://kiln:2021", &s.url(""))
        .replace("curl -H", "curl -sS -w '\\n%{http_code}' -H");
    let out = sh(&script);
    assert!(out.trim_end().ends_with("200"), "{out}\n{}", s.log());
    // The same recipe with the wrong token is refused.
    let out = sh(&script.replace("token=Zm9vYmFyYmF6", "token=wrong"));
    assert!(out.trim_end().ends_with("401"), "{out}");
}
