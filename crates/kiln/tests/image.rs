//! Container image builds through the real binary: buildah (chroot
//! isolation, vfs storage) pushing to Debian's docker-registry on loopback,
//! skopeo inspecting what was pushed, `RUN` steps executing Debian's static
//! busybox, sources as `data:` URIs and from `python3 -m http.server`, and a
//! callback receiver in this file that refuses its first delivery.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const APP_UUID: &str = "0b5e2b2c-1111-2222-3333-444455556666";

/// Debian's docker-registry on a free loopback port; killed on drop.
struct Registry {
    child: Child,
    host: String,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = free_port();
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is installed");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            host: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One received callback: headers, body, and the code it was answered with.
type Delivery = (Vec<(String, String)>, String, u16);

/// Records every callback (headers and body); answers 500 to the first
/// `fail_first` requests, 200 after.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}/hook", l.local_addr().unwrap().port());
        let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let g = got.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let mut headers = vec![];
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end().to_string();
                    if h.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                        if k == "content-length" {
                            len = v.parse().unwrap();
                        }
                        headers.push((k, v));
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                let mut g = g.lock().unwrap();
                let code = if g.len() < fail_first { 500 } else { 200 };
                g.push((headers, String::from_utf8_lossy(&body).into_owned(), code));
                let mut c = c;
                let _ = write!(
                    c,
                    "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Receiver { url, got }
    }

    /// Bodies accepted (200), in arrival order.
    fn delivered(&self) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, c)| *c == 200)
            .map(|(_, b, _)| serde_json::from_str(b).unwrap())
            .collect()
    }

    /// Wait until a delivered callback has a final status.
    fn wait_final(&self) -> Vec<serde_json::Value> {
        let t = Instant::now();
        loop {
            let d = self.delivered();
            if d.iter().any(|v| {
                matches!(
                    v["status"].as_str(),
                    Some("succeeded" | "failed" | "stopped" | "timed_out")
                )
            }) {
                return d;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "no final callback: {d:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A build context: static busybox and a Dockerfile.
fn context(dir: &Path, dockerfile: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir.to_path_buf()
}

fn data_uri(tgz: &Path) -> String {
    let b64 = sh(&format!("base64 -w0 {}", tgz.display()));
    format!("data:application/gzip;base64,{}", b64.trim())
}

fn payload(
    reg: &Registry,
    app: &str,
    number: u64,
    sources: &str,
    callback: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "sha": "abc123", "app": app, "space": "default", "branch": "main", "repo": "https://git/x", "org": "test",
        "callback": callback, "callback_auth": "Bearer hook-token",
        "build_uuid": format!("8a3e0f2a-aaaa-bbbb-cccc-{number:012}"), "app_uuid": APP_UUID,
        "sources": sources, "gm_registry_host": reg.host, "gm_registry_repo": "org",
        "build_number": number, "build_args": {"GREETING": "hello-from-build-args"},
    })
}

fn post(s: &Server, dir: &Path, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let f = dir.join(format!("body-{}.json", body["build_number"]));
    std::fs::write(&f, body.to_string()).unwrap();
    let (code, b) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", f.display()),
        &s.url("/"),
    ]);
    (code, json(&b))
}

fn image_server(dir: &Path, extra: &[&str], reg: &Registry) -> Server {
    let mut args = vec![
        "--insecure-registry",
        reg.host.as_str(),
        "--callback-secret",
        "hook-secret",
    ];
    args.extend_from_slice(extra);
    Server::start(&dir.join("kiln"), &args)
}

fn inspect(image: &str) -> serde_json::Value {
    json(
        sh(&format!(
            "skopeo inspect --tls-verify=false docker://{image}"
        ))
        .as_bytes(),
    )
}

/// The content of `path` in the pushed image's layers.
fn file_in_image(image: &str, path: &str, work: &Path) -> String {
    let d = work.join("pulled");
    sh(&format!(
        "rm -rf {0} && skopeo copy -q --src-tls-verify=false docker://{image} dir:{0}",
        d.display()
    ));
    for e in std::fs::read_dir(&d).unwrap().flatten() {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(e.path())
            .arg(path)
            .output()
            .unwrap();
        if out.status.success() && !out.stdout.is_empty() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
    }
    panic!("{path} not in {image}");
}

#[test]
fn data_uri_build_push_callbacks_signed_in_order_and_retried() {
    let d = tempfile::tempdir().unwrap();
    let reg = Registry::start(d.path());
    let hook = Receiver::start(1);
    let s = image_server(d.path(), &[], &reg);
    let ctx = context(
        &d.path().join("ctx"),
        "FROM scratch\nCOPY busybox /bin/busybox\nARG GREETING=unset\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox echo $GREETING > /greeting\"]\n",
    );
    let tgz = d.path().join("src.tgz");
    sh(&format!("tar czf {} -C {} .", tgz.display(), ctx.display()));
    let body = payload(&reg, "web", 7, &data_uri(&tgz), Some(&hook.url));
    let (code, v) = post(&s, d.path(), &body);
    assert_eq!((code, v["status"].as_str()), (200, Some("ok")), "{v}");
    let calls = hook.wait_final();
    let statuses: Vec<&str> = calls
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["pending", "building", "succeeded"],
        "{calls:?}\n{}",
        s.log()
    );
    assert_eq!(calls[1]["building"], true);
    assert_eq!(
        (calls[2]["id"].clone(), calls[2]["type"].clone()),
        (7.into(), "buildshuttle".into())
    );
    // The first delivery was refused and retried; every one carries the
    // caller's authorization and a signature over its exact body.
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got[0].2, 500);
    assert_eq!(got[0].1, got[1].1, "the refused callback is retried first");
    for (h, b, _) in &got {
        let hv = |k: &str| {
            h.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(hv("authorization"), "Bearer hook-token");
        let f = d.path().join("cb");
        std::fs::write(&f, b).unwrap();
        let mac = sh(&format!(
            "openssl dgst -sha256 -hmac hook-secret -r {} | cut -d' ' -f1",
            f.display()
        ));
        assert_eq!(hv("x-kiln-signature"), format!("sha256={}", mac.trim()));
    }
    // Pushed with both tags; the callback's digest is the registry's.
    let repo = format!("{}/org/web-{APP_UUID}", reg.host);
    let i = inspect(&format!("{repo}:1.7"));
    assert_eq!(i["Digest"], calls[2]["digest"], "{i}");
    let tags: Vec<&str> = i["RepoTags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        tags.contains(&"1.7") && tags.contains(&"latest"),
        "{tags:?}"
    );
    assert_eq!(inspect(&format!("{repo}:latest"))["Digest"], i["Digest"]);
    assert_eq!(i["Labels"]["build_uuid"], body["build_uuid"]);
    // The build arg reached RUN (the Dockerfile was not edited).
    assert_eq!(
        file_in_image(&format!("{repo}:1.7"), "greeting", d.path()).trim(),
        "hello-from-build-args"
    );
    // The sources are kept: GET and HEAD /{build_uuid}.
    let uuid = body["build_uuid"].as_str().unwrap();
    let (code, got_src) = curl(&[&s.url(&format!("/{uuid}"))]);
    assert_eq!(code, 200);
    assert!(got_src == std::fs::read(&tgz).unwrap());
    assert_eq!(curl(&["-I", &s.url(&format!("/{uuid}"))]).0, 200);
    assert_eq!(
        curl(&[&s.url("/8a3e0f2a-aaaa-bbbb-cccc-000000000999")]).0,
        404
    );
    assert_eq!(curl(&[&s.url("/not-a-uuid")]).0, 400);
    // Logs by the seed's path; kiln's own routes are not shadowed.
    let (code, log) = curl(&[&s.url(&format!("/web-{APP_UUID}/7/logs"))]);
    assert_eq!(code, 200);
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.contains("STEP") && log.contains("outcome: succeeded"),
        "{log}"
    );
    assert_eq!(
        curl(&[&s.url("/octhc")]),
        (200, b"overall_status=good".to_vec())
    );
    assert_eq!(json(&curl(&[&s.url("/health")]).1)["status"], "ok");
    assert_eq!(curl(&[&s.url("/api/v1/hello")]).0, 200);
    assert!(String::from_utf8_lossy(&curl(&[&s.url("/metrics")]).1)
        .contains("kiln_jobs_total{kind=\"image\",status=\"completed\"} 1"));
    // Bad payloads: the seed's 400s.
    let mut bad = body.clone();
    bad["build_uuid"] = "nope".into();
    let (code, v) = post(&s, d.path(), &bad);
    assert_eq!(code, 400, "{v}");
    assert!(v["status"].as_str().unwrap().starts_with("Bad Request"));
    let mut bad = body.clone();
    bad["gm_registry_host"] = "--tls-verify=false".into();
    assert_eq!(post(&s, d.path(), &bad).0, 400);
}

#[test]
fn http_zip_sources_a_404_and_a_docker_retag() {
    let d = tempfile::tempdir().unwrap();
    let reg = Registry::start(d.path());
    let hook = Receiver::start(0);
    let s = image_server(d.path(), &[], &reg);
    // A zip whose single top folder is the context.
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    context(
        &d.path().join("zipsrc/app"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"touch\", \"/built\"]\n",
    );
    sh(&format!(
        "cd {} && python3 -m zipfile -c {}/src.zip app",
        d.path().join("zipsrc").display(),
        www.display()
    ));
    let port = free_port();
    let mut http = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "-b",
            "127.0.0.1",
            &port.to_string(),
            "-d",
        ])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _) = post(
        &s,
        d.path(),
        &payload(
            &reg,
            "zipped",
            1,
            &format!("http://127.0.0.1:{port}/src.zip"),
            Some(&hook.url),
        ),
    );
    assert_eq!(code, 200);
    let calls = hook.wait_final();
    assert_eq!(
        calls.last().unwrap()["status"],
        "succeeded",
        "{calls:?}\n{}",
        s.log()
    );
    let built = format!("{}/org/zipped-{APP_UUID}:1.1", reg.host);
    let digest = inspect(&built)["Digest"].clone();

    // A 404 source is a failed build, not a build of an error page.
    let hook2 = Receiver::start(0);
    let (code, _) = post(
        &s,
        d.path(),
        &payload(
            &reg,
            "missing",
            2,
            &format!("http://127.0.0.1:{port}/nope.tgz"),
            Some(&hook2.url),
        ),
    );
    assert_eq!(code, 200);
    let calls = hook2.wait_final();
    assert_eq!(calls.last().unwrap()["status"], "failed");
    let (_, log) = curl(&[&s.url(&format!("/missing-{APP_UUID}/2/logs"))]);
    assert!(
        String::from_utf8_lossy(&log).contains("answered 404"),
        "{}",
        String::from_utf8_lossy(&log)
    );

    // docker:// sources are copied registry to registry and retagged.
    let hook3 = Receiver::start(0);
    let (code, _) = post(
        &s,
        d.path(),
        &payload(
            &reg,
            "copied",
            3,
            &format!("docker://{built}"),
            Some(&hook3.url),
        ),
    );
    assert_eq!(code, 200);
    let calls = hook3.wait_final();
    assert_eq!(
        calls.last().unwrap()["status"],
        "succeeded",
        "{calls:?}\n{}",
        s.log()
    );
    let copied = inspect(&format!("{}/org/copied-{APP_UUID}:1.3", reg.host));
    assert_eq!(copied["Digest"], digest);
    assert_eq!(calls.last().unwrap()["digest"], digest);
    let _ = http.kill();
    let _ = http.wait();
}

const SLEEPER: &str =
    "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sleep\", \"SECS\"]\n";

fn sleeper_uri(d: &Path, name: &str, secs: &str) -> String {
    let ctx = context(&d.join(name), &SLEEPER.replace("SECS", secs));
    let tgz = d.join(format!("{name}.tgz"));
    sh(&format!("tar czf {} -C {} .", tgz.display(), ctx.display()));
    data_uri(&tgz)
}

/// Images building now, by the engine's count.
fn building(s: &Server) -> usize {
    let (_, b) = curl(&[&s.url("/api/v1/jobs?kind=image&status=building")]);
    json(&b)["count"].as_u64().unwrap() as usize
}

#[test]
fn parallel_limit_holds_and_stop_kills_buildah() {
    let d = tempfile::tempdir().unwrap();
    let reg = Registry::start(d.path());
    let s = image_server(d.path(), &["--maximum-parallel-builds", "2"], &reg);
    let uri = sleeper_uri(d.path(), "nap", "1");
    let hooks: Vec<Receiver> = (0..10).map(|_| Receiver::start(0)).collect();
    for (i, h) in hooks.iter().enumerate() {
        let (code, v) = post(
            &s,
            d.path(),
            &payload(&reg, &format!("par{i}"), 10 + i as u64, &uri, Some(&h.url)),
        );
        assert_eq!(code, 200, "{v}");
    }
    let (mut max, t) = (0, Instant::now());
    while hooks
        .iter()
        .any(|h| h.delivered().iter().all(|c| c["status"] != "succeeded"))
    {
        max = max.max(building(&s));
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "builds did not finish\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(max, 2, "MAXIMUM_PARALLEL_BUILDS=2 was not the limit");

    // Stop: buildah and the RUN step die, the callback says `stopped`.
    let hook = Receiver::start(0);
    let (code, _) = post(
        &s,
        d.path(),
        &payload(
            &reg,
            "stopme",
            30,
            &sleeper_uri(d.path(), "long", "41"),
            Some(&hook.url),
        ),
    );
    assert_eq!(code, 200);
    let t = Instant::now();
    while !process_alive("sleep 41") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the RUN step never started\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The log streams live while the build runs: SSE and ?follow=true.
    let logs = s.url(&format!("/stopme-{APP_UUID}/30/logs"));
    let sse = sh(&format!(
        "curl -sN -m 2 -H 'Accept: text/event-stream' '{logs}' || true"
    ));
    assert!(sse.contains("data: ") && sse.contains("STEP"), "{sse}");
    let follow = sh(&format!("curl -sN -m 2 '{logs}?follow=true' || true"));
    assert!(follow.contains("STEP 3/"), "{follow}");
    let (code, b) = curl(&["-X", "DELETE", &s.url(&format!("/stopme-{APP_UUID}/30"))]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
    let calls = hook.wait_final();
    assert_eq!(calls.last().unwrap()["status"], "stopped", "{calls:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!process_alive("sleep 41"), "the RUN step survived the stop");
    assert!(!process_alive("stopme-"), "buildah survived the stop");
    assert_eq!(
        curl(&["-X", "DELETE", &s.url(&format!("/nobody-{APP_UUID}/1"))]).0,
        404
    );
}

#[test]
fn timeout_is_its_own_outcome_and_kills_the_build() {
    let d = tempfile::tempdir().unwrap();
    let reg = Registry::start(d.path());
    let s = image_server(d.path(), &["--timeout-in-ms", "4000"], &reg);
    let hook = Receiver::start(0);
    let (code, _) = post(
        &s,
        d.path(),
        &payload(
            &reg,
            "slow",
            1,
            &sleeper_uri(d.path(), "slow", "43"),
            Some(&hook.url),
        ),
    );
    assert_eq!(code, 200);
    let calls = hook.wait_final();
    let statuses: Vec<&str> = calls
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["pending", "building", "timed_out"],
        "{calls:?}\n{}",
        s.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !process_alive("sleep 43"),
        "the RUN step survived the timeout"
    );
    let (_, b) = curl(&[&s.url("/api/v1/jobs?kind=image")]);
    let j = &json(&b)["jobs"][0];
    assert_eq!(
        (j["status"].as_str(), j["progress"]["outcome"].as_str()),
        (Some("failed"), Some("timed_out")),
        "{j}"
    );
}
