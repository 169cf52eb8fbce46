//! End-to-end tests of kernel module builds through the real `kiln` binary:
//! real Debian headers, real make, real curl.

mod common;

use std::time::Duration;

use common::*;

const BUILD_TIMEOUT: Duration = Duration::from_secs(180);

/// The seed README's curl flows, as written: POST with the header, poll
/// status, download; then the query-parameter form; then cache hits, also
/// for the same tree repacked in another order with other mtimes.
#[test]
fn seed_curl_flow_cache_hits_and_repacked_headers() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = module_source(dir.path(), "");
    let s = Server::start(dir.path(), &["--drbd-dir", src.to_str().unwrap()]);

    let (code, body) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_eq!(v["status"], "building");
    let id = v["job_id"].as_str().unwrap().to_string();

    let st = s.wait_job(&id, BUILD_TIMEOUT);
    assert_eq!(
        st["status"],
        "completed",
        "{st}\n{}",
        String::from_utf8_lossy(&curl(&[&s.url(&format!("/api/v1/jobs/{id}/logs"))]).1)
    );
    assert_eq!(st["job_id"], id.as_str());
    assert_eq!(st["kernel_version"], fx.kver.as_str());
    for f in [
        "created_at",
        "completed_at",
        "duration",
        "cache_path",
        "download_url",
    ] {
        assert!(st[f].is_string(), "status lacks {f}: {st}");
    }
    assert!(std::path::Path::new(st["cache_path"].as_str().unwrap()).is_file());

    let (code, data) = curl(&[&s.url(st["download_url"].as_str().unwrap())]);
    assert_eq!(code, 200);
    assert_eq!(tar_names(&data), vec!["hello.ko"]);
    let out = sh(&format!(
        "curl -s -o /dev/null -w '%{{content_type}}' {}",
        s.url(&format!("/api/v1/download/{id}"))
    ));
    assert_eq!(out, "application/gzip");

    // The build saw SPAAS_URL and never the host's /usr/src.
    let (_, log) = curl(&[&s.url(&format!("/api/v1/jobs/{id}/logs"))]);
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("SPAAS_URL=https://spaas.drbd.io"), "{log}");

    // Same bytes again, via the query parameter: 200 with the archive.
    let (code, data) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", fx.headers.display()),
        &s.url(&format!("/api/v1/build?kernel_version={}", fx.kver)),
    ]);
    assert_eq!(code, 200);
    assert_eq!(tar_names(&data), vec!["hello.ko"]);

    // With the body's SHA-256 declared, a hit is answered before the body
    // is read: here the body is not even gzip, and the answer is the archive.
    let sha = sh(&format!(
        "sha256sum {} | cut -d' ' -f1",
        fx.headers.display()
    ));
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![b'x'; 3 << 20]).unwrap();
    let hdrs = sh(&format!(
        "curl -s -D - -o {out} -H 'X-Kernel-Version: {k}' -H 'X-Kiln-Content-SHA256: {sha}' --data-binary @{j} {u}",
        out = dir.path().join("declared.tgz").display(),
        k = fx.kver,
        sha = sha.trim(),
        j = junk.display(),
        u = s.url("/api/v1/build")
    ));
    assert!(
        hdrs.starts_with("HTTP/1.1 200") && hdrs.contains("x-kiln-cache-index: declared-digest"),
        "{hdrs}"
    );
    assert_eq!(
        tar_names(&std::fs::read(dir.path().join("declared.tgz")).unwrap()),
        vec!["hello.ko"]
    );
    // An unknown declared digest falls back to reading the body.
    let (code, _) = curl(&[
        "-H",
        &format!("X-Kernel-Version: {}", fx.kver),
        "-H",
        &format!("X-Kiln-Content-SHA256: {}", "0".repeat(64)),
        "--data-binary",
        &format!("@{}", junk.display()),
        &s.url("/api/v1/build"),
    ]);
    assert_eq!(code, 400, "junk is refused once it is read");

    // Asked by digest (kiln's client does this before uploading): the
    // archive without sending a byte; another kernel or unknown bytes 404;
    // a malformed digest 400.
    let by =
        |sha: &str, k: &str| curl(&[&s.url(&format!("/api/v1/build/{sha}?kernel_version={k}"))]);
    let (code, data) = by(sha.trim(), &fx.kver);
    assert_eq!(code, 200);
    assert_eq!(tar_names(&data), vec!["hello.ko"]);
    assert_eq!(by(sha.trim(), "6.1.0-99-amd64").0, 404);
    let (code, body) = by(&"0".repeat(64), &fx.kver);
    assert_eq!(code, 404);
    assert!(json(&body)["error"].as_str().unwrap().contains("POST"));
    assert_eq!(by("abc", &fx.kver).0, 400);
    assert_eq!(by(sha.trim(), "../etc").0, 400);

    // The first request extracted the headers; the job used that tree.
    let trees = dir.path().join("cache/state/trees");
    let kept = || {
        std::fs::read_dir(&trees)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir() && e.file_name().len() == 64)
            .count()
    };
    assert_eq!(kept(), 1);
    assert!(log.contains("headers already extracted"), "{log}");

    // The same tree, repacked: reverse order, other mtimes, no directories.
    let re = dir.path().join("re");
    let repacked = dir.path().join("repacked.tgz");
    sh(&format!(
        "mkdir -p {re} && tar xzf {h} -C {re} && cd {re} && find . -type f -o -type l | sort -r | tar czf {out} --no-recursion --mtime=2001-02-03 -T -",
        re = re.display(),
        h = fx.headers.display(),
        out = repacked.display()
    ));
    assert_ne!(
        std::fs::read(&repacked).unwrap(),
        std::fs::read(&fx.headers).unwrap()
    );
    let (code, data) = s.build(&repacked, &fx.kver, "");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&data));
    assert_eq!(tar_names(&data), vec!["hello.ko"]);
    // A tree for this kernel is kept, so the repack was only digested.
    assert_eq!(kept(), 1);
    assert_eq!(std::fs::read_dir(trees.join("tmp")).unwrap().count(), 0);

    // Another kernel version is another key: a miss.
    let (code, _) = s.build(&repacked, "6.1.0-99-amd64", "");
    assert_eq!(code, 202);

    // Only one build ran for the first key; metrics say so.
    let (_, m) = curl(&[&s.url("/metrics")]);
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains("kiln_jobs_total{kind=\"kmod\",status=\"completed\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("kiln_cache_hits_total{index=\"raw\",kind=\"kmod\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("kiln_cache_hits_total{index=\"tree\",kind=\"kmod\"} 1"),
        "{m}"
    );
    assert!(m.contains("kiln_job_duration_seconds_bucket"), "{m}");
    assert!(m.contains("kiln_http_requests_total"), "{m}");
    for p in ["/health", "/healthz", "/livez", "/readyz", "/api/v1/hello"] {
        assert_eq!(curl(&[&s.url(p)]).0, 200, "{p}");
    }
    let (code, list) = curl(&[&s.url("/api/v1/jobs?status=completed")]);
    assert_eq!(code, 200);
    assert_eq!(json(&list)["count"], 1);
    assert_eq!(curl(&[&s.url("/api/v1/jobs?status=bogus")]).0, 400);
}

/// Fifty identical concurrent requests make one job.
#[test]
fn fifty_identical_requests_make_one_build() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = module_source(dir.path(), "sleep 2");
    let s = Server::start(dir.path(), &["--drbd-dir", src.to_str().unwrap()]);
    let url = s.url("/api/v1/build");
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let (url, h, k) = (url.clone(), fx.headers.clone(), fx.kver.clone());
            std::thread::spawn(move || {
                curl(&[
                    "-X",
                    "POST",
                    "-H",
                    &format!("X-Kernel-Version: {k}"),
                    "--data-binary",
                    &format!("@{}", h.display()),
                    &url,
                ])
            })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for h in handles {
        let (code, body) = h.join().unwrap();
        match code {
            202 => {
                ids.insert(json(&body)["job_id"].as_str().unwrap().to_string());
            }
            200 => assert_eq!(tar_names(&body), vec!["hello.ko"]),
            other => panic!("{other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(s.wait_job(&id, BUILD_TIMEOUT)["status"], "completed");
    let (_, list) = curl(&[&s.url("/api/v1/jobs")]);
    assert_eq!(
        json(&list)["count"],
        1,
        "{}",
        String::from_utf8_lossy(&list)
    );
}

/// DELETE /api/v1/jobs/{id} kills the whole build tree.
#[test]
fn cancel_kills_the_build() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = module_source(dir.path(), "sleep 317");
    let s = Server::start(dir.path(), &["--drbd-dir", src.to_str().unwrap()]);
    let (code, body) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(code, 202);
    let id = json(&body)["job_id"].as_str().unwrap().to_string();
    let t = std::time::Instant::now();
    while !process_alive("sleep 317") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "build never started:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = curl(&["-X", "DELETE", &s.url(&format!("/api/v1/jobs/{id}"))]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["status"], "cancelled");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !process_alive("sleep 317"),
        "the build's sleep survived cancel"
    );
    let st = s.wait_job(&id, Duration::from_secs(10));
    assert_eq!(st["status"], "cancelled");
    // Cancelling again is a conflict, an unknown job a 404.
    assert_eq!(
        curl(&["-X", "DELETE", &s.url(&format!("/api/v1/jobs/{id}"))]).0,
        409
    );
    assert_eq!(
        curl(&[
            "-X",
            "DELETE",
            &s.url("/api/v1/jobs/0123456789abcdef0123456789abcdef")
        ])
        .0,
        404
    );
}

/// kill -9 mid-build: after a restart nothing is stuck `building`; the job
/// is re-run and completes, and the old build's processes died with kiln.
#[test]
fn kill9_during_build_recovers_after_restart() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = module_source(dir.path(), "sleep 329");
    let port = free_port();
    let state = dir.path().join("state");
    let args = [
        "--drbd-dir",
        src.to_str().unwrap(),
        "--data-dir",
        state.to_str().unwrap(),
    ];
    let mut s = Server::start_on(dir.path(), port, &args, "http");
    let (code, body) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(code, 202);
    let id = json(&body)["job_id"].as_str().unwrap().to_string();
    let t = std::time::Instant::now();
    while !process_alive("sleep 329") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "build never started:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !process_alive("sleep 329"),
        "the build outlived kill -9 of kiln"
    );
    // The re-run must not hang again: drop the sleep from the source.
    module_source(dir.path(), "");
    let s = Server::start_on(dir.path(), port, &args, "http");
    let st = s.wait_job(&id, BUILD_TIMEOUT);
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["attempts"], 2);
    let (_, log) = curl(&[&s.url(&format!("/api/v1/jobs/{id}/logs"))]);
    assert!(String::from_utf8_lossy(&log).contains("re-queued"));
}

/// A failed build is remembered until ?force=true.
#[test]
fn failed_build_is_remembered_until_forced() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = module_source(dir.path(), "echo 'deliberate failure' >&2; exit 7");
    let s = Server::start(dir.path(), &["--drbd-dir", src.to_str().unwrap()]);
    let (_, body) = s.build(&fx.headers, &fx.kver, "");
    let id = json(&body)["job_id"].as_str().unwrap().to_string();
    let st = s.wait_job(&id, BUILD_TIMEOUT);
    assert_eq!(st["status"], "failed");
    let err = st["error"].as_str().unwrap();
    assert!(
        err.contains("make failed") && err.contains("deliberate failure"),
        "{err}"
    );

    let (code, body) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(code, 422);
    let v = json(&body);
    assert_eq!(v["job_id"], id.as_str());
    assert!(
        v["log"].as_str().unwrap().contains("deliberate failure"),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("force=true"));

    let (code, body) = s.build(&fx.headers, &fx.kver, "?force=true");
    assert_eq!(code, 202);
    assert_ne!(json(&body)["job_id"], id.as_str());
    // Bytes read before are not read again to find their tree.
    assert!(s.log().contains("upload seen before: its tree is known"));
    // Download of a failed job is a 400.
    assert_eq!(curl(&[&s.url(&format!("/api/v1/download/{id}"))]).0, 400);
}

/// --drbd-version/--drbd-repo: a local repo with branch drbd-X.Y.Z and a
/// submodule; cloned once, .git removed, .drbd_git_revision written.
#[test]
fn git_source_with_submodule_is_cloned_once() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let src = module_source(dir.path(), "test -f $(CURDIR)/.drbd_git_revision; test ! -e $(CURDIR)/.git; test -f $(CURDIR)/drbd-headers/compat.h");
    sh(&format!(
        "set -e; export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t
         git init -q -b main {d}/headers-repo && echo '#define X 1' > {d}/headers-repo/compat.h
         git -C {d}/headers-repo add -A && git -C {d}/headers-repo commit -qm h
         cd {src} && git init -q -b main . && git add -A && git commit -qm init && git checkout -qb drbd-9.9.9
         git -c protocol.file.allow=always submodule add -q {d}/headers-repo drbd-headers && git commit -qm sub",
        src = src.display()
    ));
    let s = Server::start(
        dir.path(),
        &[
            "--drbd-version",
            "9.9.9",
            "--drbd-repo",
            src.to_str().unwrap(),
        ],
    );
    let (code, body) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let id = json(&body)["job_id"].as_str().unwrap().to_string();
    let st = s.wait_job(&id, BUILD_TIMEOUT);
    assert_eq!(st["status"], "completed", "{st}\n{}", s.log());
    let cached = dir.path().join("cache/state/sources/drbd-9.9.9");
    let rev = std::fs::read_to_string(cached.join(".drbd_git_revision")).unwrap();
    let head = sh(&format!("git -C {} rev-parse drbd-9.9.9", src.display()));
    assert_eq!(rev.trim(), format!("GIT-hash: {}", head.trim()));
    assert!(!cached.join(".git").exists());
    assert!(!cached.join("drbd-headers/.git").exists());
    // Forced rebuild uses the cached clone.
    let (code, body) = s.build(&fx.headers, &fx.kver, "?force=true");
    assert_eq!(code, 202);
    let id2 = json(&body)["job_id"].as_str().unwrap().to_string();
    assert_eq!(s.wait_job(&id2, BUILD_TIMEOUT)["status"], "completed");
    assert_eq!(
        s.log().matches("cloning module source").count(),
        1,
        "{}",
        s.log()
    );
}

/// --sign-key/--sign-cert: modules are signed with the tree's own sign-file
/// and modinfo shows the signer; the certificate is served as DER.
#[test]
fn signed_modules_show_their_signer() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=kiln test signer' -keyout {d}/sign.key -out {d}/sign.crt 2>/dev/null"
    ));
    let src = module_source(dir.path(), "");
    let s = Server::start(
        dir.path(),
        &[
            "--drbd-dir",
            src.to_str().unwrap(),
            "--sign-key",
            &format!("{d}/sign.key"),
            "--sign-cert",
            &format!("{d}/sign.crt"),
        ],
    );
    let (code, body) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let id = json(&body)["job_id"].as_str().unwrap().to_string();
    let st = s.wait_job(&id, BUILD_TIMEOUT);
    assert_eq!(st["status"], "completed", "{st}");
    let (_, data) = curl(&[&s.url(&format!("/api/v1/download/{id}"))]);
    std::fs::write(dir.path().join("m.tgz"), &data).unwrap();
    let signer = sh(&format!(
        "cd {d} && tar xzf m.tgz && /sbin/modinfo -F signer hello.ko"
    ));
    assert_eq!(signer.trim(), "kiln test signer");
    let (code, der) = curl(&[&s.url("/api/v1/signing-cert")]);
    assert_eq!(code, 200);
    std::fs::write(dir.path().join("c.der"), der).unwrap();
    let subj = sh(&format!(
        "openssl x509 -inform DER -in {d}/c.der -noout -subject"
    ));
    assert!(subj.contains("kiln test signer"), "{subj}");
}

/// The client packs a build tree directory (following links that leave it,
/// and the tree its Makefile includes by absolute path), uploads, waits and
/// downloads. Also `kiln status` and `kiln logs -f`.
#[test]
fn cli_builds_from_a_headers_directory() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = module_source(dir.path(), "");
    let s = Server::start(dir.path(), &["--drbd-dir", src.to_str().unwrap()]);
    // A node-like private copy: its Makefile includes its own -common by
    // absolute path, and scripts/ links out of the tree into kbuild.
    let node = dir.path().join("node");
    sh(&format!("cp -a {}/. {}", fx.root.display(), node.display()));
    let tree = node.join(format!("usr/src/linux-headers-{}", fx.kver));
    let mk = std::fs::read_to_string(tree.join("Makefile")).unwrap();
    std::fs::write(
        tree.join("Makefile"),
        mk.replace(
            "include /usr/src/",
            &format!("include {}/usr/src/", node.display()),
        ),
    )
    .unwrap();
    assert!(std::fs::symlink_metadata(tree.join("scripts"))
        .unwrap()
        .file_type()
        .is_symlink());

    let out = dir.path().join("mods.tgz");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let kmod_build = |out: &std::path::Path| {
        std::process::Command::new(kiln)
            .args([
                "kmod",
                "build",
                "--server",
                &s.url(""),
                "--kernel-version",
                &fx.kver,
                "--headers",
            ])
            .arg(&tree)
            .arg("-o")
            .arg(out)
            .output()
            .unwrap()
    };
    let o = kmod_build(&out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}\n{}", s.log());
    assert_eq!(tar_names(&std::fs::read(&out).unwrap()), vec!["hello.ko"]);
    let id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("job "))
        .expect("job id printed")
        .trim()
        .to_string();

    let o = std::process::Command::new(kiln)
        .args(["status", "--server", &s.url(""), &id])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(json(&o.stdout)["status"], "completed");
    let o = std::process::Command::new(kiln)
        .args(["logs", "-f", "--server", &s.url(""), &id])
        .output()
        .unwrap();
    assert!(o.status.success());
    let log = String::from_utf8_lossy(&o.stdout);
    assert!(
        log.contains("kernel build tree: lib/modules/") || log.contains("kernel build tree: "),
        "{log}"
    );
    assert!(log.contains("job completed"), "{log}");
    // The same headers again: the client asks by digest and sends nothing.
    let uploads = |s: &Server| s.log().matches("headers upload handled").count();
    let before = uploads(&s);
    let again = dir.path().join("again.tgz");
    let o = kmod_build(&again);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("nothing uploaded"), "{stderr}");
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&out).unwrap());
    assert_eq!(uploads(&s), before, "the second run uploaded the headers");

    // A bad job id is a clear error, not a crash.
    let o = std::process::Command::new(kiln)
        .args(["status", "--server", &s.url(""), "nope"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"));
}

/// The cache's guarantees through the binary: a tampered cached archive is
/// never served (it is dropped and the request becomes a build again); the
/// size cap evicts the least recently used archive; --keeptmpdir keeps the
/// build directory.
#[test]
fn cache_integrity_eviction_and_keeptmpdir() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let src = module_source(dir.path(), "");
    // Room for one uploaded headers blob plus module archives, not two headers blobs.
    let cap = (std::fs::metadata(&fx.headers).unwrap().len() * 3 / 2).to_string();
    let s = Server::start(
        dir.path(),
        &[
            "--drbd-dir",
            src.to_str().unwrap(),
            "--cache-max-bytes",
            &cap,
            "--keeptmpdir",
        ],
    );
    let (code, body) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(code, 202);
    let id = json(&body)["job_id"].as_str().unwrap().to_string();
    let st = s.wait_job(&id, BUILD_TIMEOUT);
    assert_eq!(st["status"], "completed", "{st}");
    assert!(
        dir.path()
            .join("cache/state/work")
            .join(&id)
            .join("src/src/hello.ko")
            .is_file(),
        "--keeptmpdir kept nothing"
    );

    // Tamper with the cached archive: the next identical request must not get it.
    let cached = std::path::PathBuf::from(st["cache_path"].as_str().unwrap());
    std::fs::write(&cached, b"tampered").unwrap();
    let (code, body) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(
        code,
        202,
        "a corrupt cache entry was served: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(s.log().contains("corrupt cache blob removed"));
    let id2 = json(&body)["job_id"].as_str().unwrap().to_string();
    assert_eq!(s.wait_job(&id2, BUILD_TIMEOUT)["status"], "completed");
    let (code, data) = s.build(&fx.headers, &fx.kver, "");
    assert_eq!(code, 200);
    assert_eq!(tar_names(&data), vec!["hello.ko"]);

    // A second kernel version brings a second headers blob: over the cap, the
    // least recently used blobs go, the running job's input never.
    let other = "6.1.0-77-amd64";
    let re = dir.path().join("other.tgz");
    sh(&format!(
        "mkdir -p {d}/o && tar xzf {h} -C {d}/o && cd {d}/o && mv usr/src/linux-headers-{k} usr/src/linux-headers-{other} && tar czf {re} usr",
        d = dir.path().display(),
        h = fx.headers.display(),
        k = fx.kver,
        re = re.display()
    ));
    let (code, body) = s.build(&re, other, "");
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let id3 = json(&body)["job_id"].as_str().unwrap().to_string();
    assert_eq!(s.wait_job(&id3, BUILD_TIMEOUT)["status"], "completed");
    assert!(s.log().contains("evicted from cache (LRU)"), "{}", s.log());
    let (_, m) = curl(&[&s.url("/metrics")]);
    let bytes: u64 = String::from_utf8_lossy(&m)
        .lines()
        .find_map(|l| l.strip_prefix("kiln_cache_bytes "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        bytes <= cap.parse().unwrap(),
        "cache holds {bytes} bytes, cap {cap}"
    );
    // The newest build is still served.
    let (code, _) = curl(&[&s.url(&format!("/api/v1/download/{id3}"))]);
    assert_eq!(code, 200);
}
