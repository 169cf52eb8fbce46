//! Bad input through the real binary: every unsafe archive is refused with a
//! clear 4xx JSON error (or a failed job that says why), and nothing is
//! written outside kiln's directories. Also TLS.

mod common;

use common::*;

/// Builds the hostile archives with Python's tarfile (a real tar writer that
/// will happily produce all of these).
fn make_archives(dir: &std::path::Path) {
    let script = r#"
import io, sys, tarfile
d = sys.argv[1]
def make(name, entries, fmt=tarfile.GNU_FORMAT):
    with tarfile.open(f"{d}/{name}.tgz", "w:gz", format=fmt) as t:
        for e in entries:
            e(t)
def f(path, data=b"x"):
    def add(t):
        i = tarfile.TarInfo(path); i.size = len(data); t.addfile(i, io.BytesIO(data))
    return add
def link(path, target, kind=tarfile.SYMTYPE):
    def add(t):
        i = tarfile.TarInfo(path); i.type = kind; i.linkname = target; t.addfile(i)
    return add
def dev(path):
    def add(t):
        i = tarfile.TarInfo(path); i.type = tarfile.CHRTYPE; i.devmajor = 1; i.devminor = 3; t.addfile(i)
    return add
make("traversal", [f("usr/src/../../escape", b"pwned")])
make("absolute", [f("/tmp/kiln-absolute-escape", b"pwned")])
make("symlink_escape", [link("usr/src/evil", "../../../../etc")])
make("hardlink_escape", [link("usr/src/evil", "/etc/passwd", tarfile.LNKTYPE)])
make("device", [dev("usr/src/null")])
make("fifo", [link("usr/src/fifo", "", tarfile.FIFOTYPE)])
make("bomb", [f("usr/src/zeros", b"\0" * (8 << 20))])
make("many", [f(f"usr/src/f{i}") for i in range(3000)])
make("through_link", [link("a", "."), link("b", "a/.."), f("b/kiln-through-escape", b"pwned")])
make("link_chain", [link("a", "."), link("b", "a/..")])
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hostile_archives_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let arch = dir.path().join("arch");
    std::fs::create_dir_all(&arch).unwrap();
    make_archives(&arch);
    let src = module_source(dir.path(), "");
    let s = Server::start(
        dir.path(),
        &[
            "--drbd-dir",
            src.to_str().unwrap(),
            "--max-extract-bytes",
            "4194304",
            "--max-extract-entries",
            "2000",
            "--maxbytesbody",
            "2000000",
        ],
    );
    let kver = "6.1.0-1-amd64";
    for (name, expect) in [
        ("traversal", "climbs out"),
        ("absolute", "absolute path"),
        ("symlink_escape", "points outside"),
        ("hardlink_escape", "points outside"),
        ("device", "device node"),
        ("fifo", "device node or fifo"),
        ("bomb", "decompression bomb"),
        ("many", "more than 2000 entries"),
        ("through_link", "through the symlink"),
    ] {
        let (code, body) = s.build(&arch.join(format!("{name}.tgz")), kver, "");
        assert_eq!(code, 400, "{name}: {}", String::from_utf8_lossy(&body));
        let v = json(&body);
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(expect), "{name}: {msg}");
    }
    // Link chains only escape when resolved for real. No tree is kept for
    // this kernel, so the request extracts the upload (into the header tree
    // store's tmp/) and refuses it once the links exist.
    let (code, body) = s.build(&arch.join("link_chain.tgz"), kver, "");
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("points outside"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(!std::path::Path::new("/tmp/kiln-absolute-escape").exists());

    // Not gzip; empty; too big; bad or missing kernel versions.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"this is not gzip").unwrap();
    let (code, body) = s.build(&junk, kver, "");
    assert_eq!(code, 400);
    assert!(json(&body)["error"].as_str().unwrap().contains("not gzip"));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(s.build(&empty, kver, "").0, 400);
    let big = dir.path().join("big");
    let mut data = vec![0u8; 3_000_000];
    data[..2].copy_from_slice(&[0x1f, 0x8b]);
    std::fs::write(&big, data).unwrap();
    let (code, body) = s.build(&big, kver, "");
    assert_eq!(code, 413);
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("--maxbytesbody"));
    // Chunked (no Content-Length) is cut off by counting, too.
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        &format!("X-Kernel-Version: {kver}"),
        "--data-binary",
        &format!("@{}", big.display()),
        &s.url("/api/v1/build"),
    ]);
    assert_eq!(code, 413);
    for bad in ["5.15", "latest", "6.1.0-$(id)", "6.1.0-../../x"] {
        let (code, body) = s.build(&arch.join("traversal.tgz"), bad, "");
        assert_eq!(code, 400, "{bad}");
        assert!(json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("kernel version"));
    }
    let (code, body) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        "@/dev/null",
        &s.url("/api/v1/build"),
    ]);
    assert_eq!(code, 400);
    assert!(json(&body)["error"].as_str().unwrap().contains("missing"));
    // Unknown routes and ids are JSON 404s; the server is still healthy.
    assert_eq!(curl(&[&s.url("/api/v1/nope")]).0, 404);
    assert_eq!(curl(&[&s.url("/api/v1/download/../../etc/passwd")]).0, 404);
    assert_eq!(curl(&[&s.url("/api/v1/hello")]).0, 200);
    // Nothing was left in the cache's temp dir.
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join("cache/tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    // Refused uploads were extracted on the way in (no tree is kept for this
    // kernel), cut off or refused there: no tree is kept, and their partial
    // extractions are removed.
    let trees = dir.path().join("cache/state/trees");
    let t = std::time::Instant::now();
    loop {
        let left: Vec<_> = std::fs::read_dir(trees.join("tmp"))
            .unwrap()
            .chain(std::fs::read_dir(&trees).unwrap())
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| n != "tmp")
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "left in the header tree store: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn tls_serves_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=127.0.0.1' -addext 'subjectAltName=IP:127.0.0.1' -keyout {d}/tls.key -out {d}/tls.crt 2>/dev/null"
    ));
    let port = free_port();
    let s = Server::start_on(
        dir.path(),
        port,
        &[
            "--certfile",
            &format!("{d}/tls.crt"),
            "--keyfile",
            &format!("{d}/tls.key"),
            "--drbd-dir",
            "/nonexistent",
        ],
        "https",
    );
    let (code, body) = curl(&["--cacert", &format!("{d}/tls.crt"), &s.url("/api/v1/hello")]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (code, _) = curl(&[&format!("http://127.0.0.1:{port}/api/v1/hello")]);
    assert_ne!(code, 200, "plain HTTP must not be served on the TLS port");
    // An unknown CA is refused by the client.
    let (code, _) = curl(&[&s.url("/api/v1/hello")]);
    assert_eq!(code, 0);
}
