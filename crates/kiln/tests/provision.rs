//! Volume provisioning through the real binary: QCOW2 images made with
//! qemu-img and written by qemu-io at known offsets, served by an HTTP
//! server in this file (with and without Range, ETag and `.sha256`, and one
//! that cuts the first transfer in half), S3 served by moto on loopback,
//! volumes as files, as a loop device, and as LVM LVs on a loop-device PV.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A small HTTP/1.1 image server. Paths are `/MODE/NAME`, NAME a file in
/// `root`: `r` answers Range and conditional requests and sends ETag and
/// Last-Modified; `n` sends neither and ignores Range; `f` is `r` whose
/// first plain GET of each file stops after half the bytes; `s` is `r`,
/// slowly (about 4 MiB/s). Every request is logged as
/// `GET /path range=… inm=… -> code`.
struct ImageServer {
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl ImageServer {
    fn start(root: &Path) -> ImageServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let cut: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
        let (root, log2) = (root.to_path_buf(), log.clone());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (root, log, cut) = (root.clone(), log2.clone(), cut.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(c, &root, &log, &cut);
                });
            }
        });
        ImageServer { port, log }
    }

    fn url(&self, mode: &str, name: &str) -> String {
        format!("http://127.0.0.1:{}/{mode}/{name}", self.port)
    }

    /// Logged requests whose path is exactly `/mode/name`.
    fn gets(&self, mode: &str, name: &str) -> Vec<String> {
        let p = format!("GET /{mode}/{name} ");
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(&p))
            .cloned()
            .collect()
    }
}

fn serve_one(
    mut c: TcpStream,
    root: &Path,
    log: &Mutex<Vec<String>>,
    cut: &Mutex<std::collections::HashSet<String>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(c.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned().unwrap_or_default();
    let inm = headers.get("if-none-match").cloned().unwrap_or_default();
    let mut respond = |code: u16, extra: &str, body: &[u8]| -> std::io::Result<()> {
        log.lock()
            .unwrap()
            .push(format!("{method} {path} range={range} inm={inm} -> {code}"));
        write!(
            c,
            "HTTP/1.1 {code} X\r\nConnection: close\r\nContent-Length: {}\r\n{extra}\r\n",
            body.len()
        )?;
        c.write_all(body)
    };
    let mut segs = path.trim_start_matches('/').splitn(2, '/');
    let (mode, name) = (segs.next().unwrap_or(""), segs.next().unwrap_or(""));
    let file = root.join(name);
    let Ok(meta) = std::fs::metadata(&file) else {
        return respond(404, "", b"not found");
    };
    let etag = {
        use std::os::unix::fs::MetadataExt;
        format!("\"{}-{}-{}\"", meta.ino(), meta.len(), meta.mtime_nsec())
    };
    let with_validators = mode != "n";
    let validators = if with_validators {
        format!("ETag: {etag}\r\nLast-Modified: Mon, 02 Nov 2026 10:00:00 GMT\r\nAccept-Ranges: bytes\r\n")
    } else {
        String::new()
    };
    if with_validators && !inm.is_empty() && inm == etag {
        return respond(304, &validators, b"");
    }
    let len = meta.len();
    let mut start = 0u64;
    if with_validators {
        if let Some(s) = range
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
        {
            let if_range_ok = headers.get("if-range").is_none_or(|v| *v == etag);
            if if_range_ok {
                start = s.parse().unwrap_or(0);
            }
        }
    }
    let status = if start > 0 { 206 } else { 200 };
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {}\r\n{validators}",
        len - start
    );
    if start > 0 {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{len}\r\n",
            len - 1
        ));
    }
    head.push_str("\r\n");
    log.lock().unwrap().push(format!(
        "{method} {path} range={range} inm={inm} -> {status}"
    ));
    c.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return Ok(());
    }
    let mut f = std::fs::File::open(&file)?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start))?;
    let mut limit = len - start;
    if mode == "f" && start == 0 && cut.lock().unwrap().insert(path.clone()) {
        limit = len / 2; // then the connection closes early
    }
    let mut buf = vec![0u8; 256 << 10];
    while limit > 0 {
        let n = f.read(&mut buf[..(limit as usize).min(256 << 10)])?;
        if n == 0 {
            break;
        }
        c.write_all(&buf[..n])?;
        limit -= n as u64;
        if mode == "s" {
            std::thread::sleep(Duration::from_millis(60));
        }
    }
    Ok(())
}

/// A QCOW2 image of `mib` MiB virtual with patterns at known offsets,
/// its `.sha256` sidecar, and the raw bytes `qemu-img convert` makes of it.
fn qcow2(dir: &Path, name: &str, mib: u64, writes: &[(u8, &str, &str)]) -> PathBuf {
    let p = dir.join(name);
    sh(&format!(
        "qemu-img create -q -f qcow2 {} {mib}M",
        p.display()
    ));
    for (pat, off, len) in writes {
        sh(&format!(
            "qemu-io -c 'write -P {pat} {off} {len}' {} >/dev/null",
            p.display()
        ));
    }
    sh(&format!(
        "cd {} && sha256sum {name} > {name}.sha256",
        dir.display()
    ));
    sh(&format!(
        "qemu-img convert -f qcow2 -O raw {} {}.raw",
        p.display(),
        p.display()
    ));
    p
}

fn provision(s: &Server, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (code, b) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &body.to_string(),
        &s.url("/api/v1/provision"),
    ]);
    (code, json(&b))
}

fn submit(s: &Server, url: &str, vol: &str, gb: u64) -> String {
    let (code, v) = provision(
        s,
        serde_json::json!({"image_url": url, "volume_name": vol, "volume_size_gb": gb, "image_type": "qcow2", "correlation_id": format!("corr-{vol}")}),
    );
    assert_eq!(code, 202, "{v}\n{}", s.log());
    v["job_id"].as_str().unwrap().to_string()
}

/// Poll until the job ends; the provisioner's status is 200 in every state.
fn wait_done(s: &Server, id: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (code, b) = curl(&[&s.url(&format!("/api/v1/status/{id}"))]);
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
        let v = json(&b);
        if matches!(
            v["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "job {id} hangs: {v}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn completed(s: &Server, id: &str) -> serde_json::Value {
    let v = wait_done(s, id);
    assert_eq!(v["status"], "completed", "{v}\n{}", s.log());
    v
}

/// The volume holds exactly `raw`, then zeros up to `size`.
fn assert_volume(vol: &Path, raw: &Path, size: u64) {
    let want = std::fs::read(raw).unwrap();
    let mut f = std::fs::File::open(vol).unwrap();
    let mut got = vec![0u8; want.len()];
    f.read_exact(&mut got).unwrap();
    assert!(
        got == want,
        "{} differs from {}",
        vol.display(),
        raw.display()
    );
    let mut rest = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert!(
            buf[..n].iter().all(|&b| b == 0),
            "non-zero byte past the image's end near {}",
            want.len() as u64 + rest
        );
        rest += n as u64;
    }
    assert_eq!(want.len() as u64 + rest, size, "volume size");
}

fn vol_server(dir: &Path, extra: &[&str]) -> Server {
    let vols = dir.join("vols").display().to_string();
    let imgs = dir.join("images").display().to_string();
    let mut args = vec!["--volume-dir", &vols, "--image-cache-dir", &imgs];
    args.extend_from_slice(extra);
    Server::start(&dir.join("kiln"), &args)
}

const GIB: u64 = 1 << 30;

#[test]
fn qcow2_miss_then_hit_byte_exact_and_zeroed_past_the_end() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let img = qcow2(
        &www,
        "base.qcow2",
        64,
        &[(0xab, "1M", "2M"), (0xcd, "60M", "512k"), (0x11, "0", "4k")],
    );
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    let url = http.url("r", "base.qcow2");

    let id = submit(&s, &url, "vm-root-1", 1);
    let v = completed(&s, &id);
    assert_eq!(v["cache_hit"], false);
    assert_eq!(v["correlation_id"], "corr-vm-root-1");
    assert_eq!(v["progress"]["stage"], "finalizing");
    assert_eq!(v["progress"]["percent"], 100);
    assert_eq!(v["result"]["digest_source"], "sidecar");
    let image_path = PathBuf::from(v["image_path"].as_str().unwrap());
    assert!(image_path.starts_with(d.path().join("images")));
    // Cached as downloaded: still QCOW2, byte for byte.
    assert_eq!(
        std::fs::read(&image_path).unwrap(),
        std::fs::read(&img).unwrap()
    );
    let vol = d.path().join("vols/vm-root-1");
    assert_volume(&vol, &img.with_extension("qcow2.raw"), GIB);

    // The second volume: a cache hit, no second download, through the CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["provision", "--server", &s.url(""), "--image-url", &url])
        .args([
            "--volume-name",
            "vm-root-2",
            "--size-gb",
            "1",
            "--correlation-id",
            "cli-2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli = json(&out.stdout);
    assert_eq!(cli["cache_hit"], true, "{cli}");
    assert_eq!(cli["correlation_id"], "cli-2");
    assert_volume(
        &d.path().join("vols/vm-root-2"),
        &img.with_extension("qcow2.raw"),
        GIB,
    );
    assert_eq!(
        http.gets("r", "base.qcow2").len(),
        1,
        "{:?}",
        http.log.lock().unwrap()
    );

    // Reprovisioning a used volume: stale bytes past the image's end are zeroed.
    sh(&format!(
        "printf 'stale' | dd of={} bs=1 seek=$((700*1024*1024)) conv=notrunc status=none",
        vol.display()
    ));
    let id = submit(&s, &url, "vm-root-1", 1);
    let v = completed(&s, &id);
    assert_eq!(v["cache_hit"], true);
    assert_eq!(v["result"]["volume_created"], false);
    assert_volume(&vol, &img.with_extension("qcow2.raw"), GIB);

    // The seed's metric names, for its alert rules.
    let (_, m) = curl(&[&s.url("/metrics")]);
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains("libvirt_volume_provisioner_jobs_total{status=\"completed\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("libvirt_volume_provisioner_jobs_total{status=\"started\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("libvirt_volume_provisioner_active_jobs 0"),
        "{m}"
    );
    assert!(m.contains("libvirt_volume_provisioner_requests_total{endpoint=\"/api/v1/provision\",method=\"POST\",status=\"202\"} 3"), "{m}");
    assert!(
        m.contains(
            "libvirt_volume_provisioner_stage_duration_seconds_count{stage=\"converting\"} 3"
        ),
        "{m}"
    );
    // The cache listing names the one image.
    let (_, b) = curl(&[&s.url("/api/v1/images")]);
    let imgs = json(&b);
    assert_eq!(imgs["count"], 1, "{imgs}");
}

#[test]
fn bad_requests_get_clear_4xx_and_incompatible_volumes_are_kept() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    qcow2(&www, "i.qcow2", 16, &[(0x42, "0", "1M")]);
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    let url = http.url("r", "i.qcow2");
    for (body, needle) in [
        (
            serde_json::json!({"image_url": url, "volume_name": "../etc/x", "volume_size_gb": 1}),
            "volume name",
        ),
        (
            serde_json::json!({"image_url": url, "volume_name": "-rf", "volume_size_gb": 1}),
            "volume name",
        ),
        (
            serde_json::json!({"image_url": url, "volume_name": "v", "volume_size_gb": 0}),
            "volume_size_gb",
        ),
        (
            serde_json::json!({"image_url": url, "volume_name": "v", "volume_size_gb": 1, "image_type": "vmdk"}),
            "image_type",
        ),
        (
            serde_json::json!({"image_url": "file:///etc/shadow", "volume_name": "v", "volume_size_gb": 1}),
            "scheme",
        ),
        (
            serde_json::json!({"image_url": "s3://b/k", "volume_name": "v", "volume_size_gb": 1}),
            "MINIO_ENDPOINT",
        ),
        (
            serde_json::json!({"volume_name": "v", "volume_size_gb": 1}),
            "image_url",
        ),
    ] {
        let (code, v) = provision(&s, body);
        assert_eq!(code, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
        assert!(v["message"].is_string(), "{v}");
    }
    let (code, b) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        "{not json",
        &s.url("/api/v1/provision"),
    ]);
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&b));
    let (code, _) = curl(&[&s.url("/api/v1/status/00000000000000000000000000000000")]);
    assert_eq!(code, 404);

    // A pre-existing volume three times the request: refused, untouched,
    // and nothing downloaded for it.
    let vols = d.path().join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    let big = vols.join("vm-big");
    sh(&format!(
        "truncate -s 3G {0} && printf 'precious' | dd of={0} conv=notrunc status=none",
        big.display()
    ));
    let id = submit(&s, &url, "vm-big", 1);
    let v = wait_done(&s, &id);
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("±5%"), "{v}");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 3 * GIB);
    assert_eq!(&std::fs::read(&big).unwrap()[..8], b"precious");
    assert!(http.gets("r", "i.qcow2").is_empty());
    // Not a regular file: refused.
    std::os::unix::fs::symlink("/etc/passwd", vols.join("vm-link")).unwrap();
    let v = wait_done(&s, &submit(&s, &url, "vm-link", 1));
    assert!(
        v["error"].as_str().unwrap().contains("not a regular file"),
        "{v}"
    );
    // An image bigger than the volume fails before any volume is created.
    qcow2(&www, "huge.qcow2", 2048, &[]);
    let v = wait_done(&s, &submit(&s, &http.url("r", "huge.qcow2"), "vm-small", 1));
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("larger than the volume"),
        "{v}"
    );
    assert!(!vols.join("vm-small").exists());
}

#[test]
fn checksum_mismatch_fails_and_leaves_no_cache_entry_and_no_volume() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    qcow2(&www, "bad.qcow2", 16, &[(0x42, "0", "1M")]);
    std::fs::write(
        www.join("bad.qcow2.sha256"),
        format!("{}  bad.qcow2\n", "0".repeat(64)),
    )
    .unwrap();
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "provision",
            "--server",
            &s.url(""),
            "--image-url",
            &http.url("r", "bad.qcow2"),
        ])
        .args(["--volume-name", "vm-x", "--size-gb", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the CLI exits non-zero on failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum file says"), "{err}");
    assert!(!d.path().join("vols/vm-x").exists());
    let (_, b) = curl(&[&s.url("/api/v1/images")]);
    assert_eq!(json(&b)["count"], 0);
    let files = sh(&format!(
        "find {} -type f | wc -l",
        d.path().join("images").display()
    ));
    assert_eq!(files.trim(), "0", "nothing left in the image cache");
}

#[test]
fn without_a_sidecar_the_url_is_revalidated_with_etag() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let img = qcow2(&www, "u.qcow2", 16, &[(0x42, "0", "1M")]);
    std::fs::remove_file(www.join("u.qcow2.sha256")).unwrap();
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    let url = http.url("r", "u.qcow2");
    let v = completed(&s, &submit(&s, &url, "a", 1));
    assert_eq!(
        (v["cache_hit"].clone(), v["result"]["digest_source"].clone()),
        (false.into(), "computed".into())
    );
    let v = completed(&s, &submit(&s, &url, "b", 1));
    assert_eq!(v["cache_hit"], true, "{v}");
    let gets = http.gets("r", "u.qcow2");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(
        gets[1].contains("inm=\"") && gets[1].ends_with("-> 304"),
        "{gets:?}"
    );
    // The image changes on the server: downloaded again.
    qcow2(&www, "u.qcow2", 16, &[(0x43, "0", "1M")]);
    std::fs::remove_file(www.join("u.qcow2.sha256")).unwrap();
    let v = completed(&s, &submit(&s, &url, "c", 1));
    assert_eq!(v["cache_hit"], false, "{v}");
    assert_volume(
        &d.path().join("vols/c"),
        &img.with_extension("qcow2.raw"),
        GIB,
    );
}

#[test]
fn interrupted_download_resumes_with_range() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let img = qcow2(
        &www,
        "f.qcow2",
        64,
        &[(0x61, "0", "24M"), (0x62, "40M", "8M")],
    );
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    let v = completed(&s, &submit(&s, &http.url("f", "f.qcow2"), "vm-f", 1));
    assert_eq!(v["result"]["resumed"], 1, "{v}");
    let gets = http.gets("f", "f.qcow2");
    let half = std::fs::metadata(&img).unwrap().len() / 2;
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(
        gets[1].contains(&format!("range=bytes={half}-")) && gets[1].ends_with("206"),
        "{gets:?}"
    );
    assert_volume(
        &d.path().join("vols/vm-f"),
        &img.with_extension("qcow2.raw"),
        GIB,
    );
    let log = curl(&[&s.url(&format!(
        "/api/v1/jobs/{}/logs",
        v["job_id"].as_str().unwrap()
    ))])
    .1;
    assert!(String::from_utf8_lossy(&log).contains(&format!(
        "resuming {} at byte {half}",
        http.url("f", "f.qcow2")
    )));
}

#[test]
fn two_concurrent_jobs_share_one_download() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let img = qcow2(&www, "s.qcow2", 16, &[(0x71, "0", "6M")]);
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    let url = http.url("s", "s.qcow2");
    let a = submit(&s, &url, "vm-a", 1);
    let b = submit(&s, &url, "vm-b", 1);
    // Both run at once (the default concurrency is 2, as in the seed).
    let t = Instant::now();
    loop {
        let (_, x) = curl(&[&s.url(&format!("/api/v1/status/{a}"))]);
        let (_, y) = curl(&[&s.url(&format!("/api/v1/status/{b}"))]);
        if json(&x)["status"] == "running" && json(&y)["status"] == "running" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}\n{}",
            String::from_utf8_lossy(&x),
            String::from_utf8_lossy(&y)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (va, vb) = (completed(&s, &a), completed(&s, &b));
    assert_eq!(http.gets("s", "s.qcow2").len(), 1);
    let hits = [&va, &vb].iter().filter(|v| v["cache_hit"] == true).count();
    assert_eq!(hits, 1, "{va}\n{vb}");
    for v in ["vm-a", "vm-b"] {
        assert_volume(
            &d.path().join("vols").join(v),
            &img.with_extension("qcow2.raw"),
            GIB,
        );
    }
    let (_, m) = curl(&[&s.url("/metrics")]);
    assert!(String::from_utf8_lossy(&m)
        .contains("libvirt_volume_provisioner_image_cache_total{result=\"shared\"} 1"));
}

#[test]
fn raw_images_are_copied_sparsely_without_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let raw = www.join("disk.raw");
    sh(&format!(
        "truncate -s 48M {0} && printf 'BOOT' | dd of={0} conv=notrunc status=none && head -c 3M /dev/urandom | dd of={0} bs=1M seek=20 conv=notrunc status=none && cd {1} && sha256sum disk.raw > disk.raw.sha256",
        raw.display(),
        www.display()
    ));
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    let (code, v) = provision(
        &s,
        serde_json::json!({"image_url": http.url("n", "disk.raw"), "volume_name": "vm-raw", "volume_size_gb": 1, "image_type": "raw"}),
    );
    assert_eq!(code, 202, "{v}");
    let v = completed(&s, v["job_id"].as_str().unwrap());
    let vol = d.path().join("vols/vm-raw");
    assert_volume(&vol, &raw, GIB);
    // Sparse: about the 3 MiB of data and a block, not 1 GiB.
    let blocks: u64 = sh(&format!("stat -c %b {}", vol.display()))
        .trim()
        .parse()
        .unwrap();
    assert!(blocks * 512 < 8 << 20, "{blocks} blocks allocated");
    let log = String::from_utf8_lossy(
        &curl(&[&s.url(&format!(
            "/api/v1/jobs/{}/logs",
            v["job_id"].as_str().unwrap()
        ))])
        .1,
    )
    .into_owned();
    assert!(!log.contains("qemu-img convert"), "{log}");
}

/// Wait until the job is converting, then cancel it.
fn cancel_while_converting(s: &Server, id: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (_, b) = curl(&[&s.url(&format!("/api/v1/status/{id}"))]);
        let v = json(&b);
        if v["progress"]["stage"] == "converting"
            && v["progress"]["bytes_processed"].as_u64() > Some(0)
        {
            break;
        }
        assert_ne!(
            v["status"], "completed",
            "finished before it could be cancelled: {v}"
        );
        assert!(t.elapsed() < Duration::from_secs(60), "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, b) = curl(&["-X", "DELETE", &s.url(&format!("/api/v1/cancel/{id}"))]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
    wait_done(s, id)
}

#[test]
fn cancel_mid_conversion_kills_qemu_img_and_removes_only_a_created_volume() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    // 1.5 GiB of data, so the conversion takes a few seconds.
    let img = www.join("c.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 {0} 2G && qemu-io -c 'write -P 0x5a 0 1536M' {0} >/dev/null && cd {1} && sha256sum c.qcow2 > c.qcow2.sha256",
        img.display(),
        www.display()
    ));
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    let url = http.url("r", "c.qcow2");
    let id = submit(&s, &url, "vm-new", 2);
    let v = cancel_while_converting(&s, &id);
    assert_eq!(v["status"], "cancelled", "{v}");
    let vol = d.path().join("vols/vm-new");
    assert!(!vol.exists(), "the volume this job created is removed");
    assert!(
        !process_alive(&vol.display().to_string()),
        "qemu-img was killed"
    );

    // A volume that existed before the job is kept, even when cancelled.
    let old = d.path().join("vols/vm-old");
    sh(&format!("truncate -s 2G {}", old.display()));
    let id = submit(&s, &url, "vm-old", 2);
    let v = cancel_while_converting(&s, &id);
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(std::fs::metadata(&old).unwrap().len(), 2 * GIB);
    let (_, m) = curl(&[&s.url("/metrics")]);
    assert!(String::from_utf8_lossy(&m)
        .contains("libvirt_volume_provisioner_jobs_total{status=\"cancelled\"} 2"));
}

/// A loop device over a sparse file; detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(file: &Path, size: &str) -> Loop {
        sh(&format!("truncate -s {size} {}", file.display()));
        let dev = sh(&format!("losetup -f --show {}", file.display()))
            .trim()
            .to_string();
        Loop { dev }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn block_device_targets_on_a_loop_device() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let img = qcow2(
        &www,
        "b.qcow2",
        64,
        &[(0x5c, "3M", "5M"), (0x5d, "63M", "1M")],
    );
    let http = ImageServer::start(&www);
    let lp = Loop::new(&d.path().join("disk.img"), "1G");
    // Old data everywhere, so any byte not written or zeroed shows.
    sh(&format!(
        "yes kiln | head -c 1G > {} 2>/dev/null || true",
        lp.dev
    ));
    let devs = d.path().join("devs");
    std::fs::create_dir_all(&devs).unwrap();
    std::os::unix::fs::symlink(&lp.dev, devs.join("vm-dev")).unwrap();
    let devdir = devs.display().to_string();
    let imgs = d.path().join("images").display().to_string();
    let s = Server::start(
        &d.path().join("kiln"),
        &["--device-dir", &devdir, "--image-cache-dir", &imgs],
    );
    let v = completed(&s, &submit(&s, &http.url("r", "b.qcow2"), "vm-dev", 1));
    assert_eq!(v["result"]["volume_created"], false);
    assert_volume(Path::new(&lp.dev), &img.with_extension("qcow2.raw"), GIB);
    // Devices are never grown: a bigger request is refused.
    let v = wait_done(&s, &submit(&s, &http.url("r", "b.qcow2"), "vm-dev", 2));
    assert_eq!(v["status"], "failed");
    assert!(v["error"].as_str().unwrap().contains("refused"), "{v}");
    // Not a block device: refused.
    std::fs::write(devs.join("plain"), b"x").unwrap();
    let v = wait_done(&s, &submit(&s, &http.url("r", "b.qcow2"), "plain", 1));
    assert!(
        v["error"].as_str().unwrap().contains("not a block device"),
        "{v}"
    );
}

/// A volume group on a loop-device PV; removed on drop.
struct Vg {
    name: String,
    _lp: Loop,
}

impl Drop for Vg {
    fn drop(&mut self) {
        let _ = Command::new("vgremove")
            .args(["--driverloaded", "n", "-f", &self.name])
            .output();
        let _ = Command::new("pvremove")
            .args(["-ff", "-y", &self._lp.dev])
            .output();
    }
}

fn lv_size(vg: &str, lv: &str) -> Option<u64> {
    let out = sh(&format!(
        "lvs --driverloaded n --noheadings --units b --nosuffix -o lv_size -S lv_name={lv} {vg} 2>/dev/null"
    ));
    out.trim().parse().ok()
}

/// This machine has no device-mapper, so LVs cannot be activated and their
/// data cannot be written. kiln runs with `--lvm-metadata-only` (LVM's
/// `--driverloaded n`): every metadata path is real (lvs, lvcreate,
/// lvextend, lvremove on a real PV), and each job then fails at the write,
/// which exercises rollback too.
#[test]
fn lvm_metadata_paths_on_a_loop_device_pv() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    qcow2(&www, "l.qcow2", 16, &[(0x42, "0", "1M")]);
    let http = ImageServer::start(&www);
    let url = http.url("r", "l.qcow2");
    let lp = Loop::new(&d.path().join("pv.img"), "12G");
    let name = format!("kilntest{}", std::process::id());
    sh(&format!(
        "pvcreate -q {0} && vgcreate -q {name} {0}",
        lp.dev
    ));
    let vg = Vg {
        name: name.clone(),
        _lp: lp,
    };
    let imgs = d.path().join("images").display().to_string();
    let s = Server::start(
        &d.path().join("kiln"),
        &[
            "--lvm-volume-group",
            &vg.name,
            "--lvm-metadata-only",
            "--image-cache-dir",
            &imgs,
        ],
    );
    let lvcreate = |lv: &str, size: &str| {
        sh(&format!(
            "lvcreate --driverloaded n -an -Zn -q -y -n {lv} -L {size} {name} 2>/dev/null"
        ));
    };

    // New LV: created, then the write fails (no device node), then rolled back.
    let v = wait_done(&s, &submit(&s, &url, "vm-new", 1));
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&format!("/dev/{name}/vm-new")),
        "{v}"
    );
    assert_eq!(
        lv_size(&name, "vm-new"),
        None,
        "the LV this job created is removed"
    );
    let log = String::from_utf8_lossy(
        &curl(&[&s.url(&format!(
            "/api/v1/jobs/{}/logs",
            v["job_id"].as_str().unwrap()
        ))])
        .1,
    )
    .into_owned();
    assert!(
        log.contains("created volume") && log.contains("rolling back"),
        "{log}"
    );

    // Existing LV within ±5%: reused (not created), kept after the failure.
    lvcreate("vm-same", "1G");
    let v = wait_done(&s, &submit(&s, &url, "vm-same", 1));
    assert_eq!(v["status"], "failed");
    assert_eq!(lv_size(&name, "vm-same"), Some(GIB));

    // Existing smaller LV: grown to the request, and kept.
    lvcreate("vm-grow", "1G");
    let v = wait_done(&s, &submit(&s, &url, "vm-grow", 3));
    assert_eq!(v["status"], "failed");
    assert_eq!(lv_size(&name, "vm-grow"), Some(3 * GIB));

    // Existing LV far bigger than the request: refused before any download.
    let before = http.gets("r", "l.qcow2").len();
    lvcreate("vm-big", "4G");
    let v = wait_done(&s, &submit(&s, &url, "vm-big", 1));
    assert!(v["error"].as_str().unwrap().contains("±5%"), "{v}");
    assert_eq!(lv_size(&name, "vm-big"), Some(4 * GIB));
    assert_eq!(http.gets("r", "l.qcow2").len(), before);
}

/// S3 through moto (PyPI) in server mode, configured only through the
/// seed's environment variables (PORT, HOST, MINIO_*).
#[test]
fn s3_images_from_moto_with_the_seed_environment() {
    let moto = std::env::var("KILN_TEST_MOTO")
        .unwrap_or_else(|_| "/var/cache/kiln-test-venv/bin/moto_server".into());
    assert!(
        Path::new(&moto).exists(),
        "moto_server not found at {moto}; scripts/test.sh installs it"
    );
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let img = qcow2(&www, "s3.qcow2", 32, &[(0x33, "2M", "3M")]);
    let mport = free_port();
    let mut m = Command::new(&moto)
        .args(["-H", "127.0.0.1", "-p", &mport.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ep = format!("http://127.0.0.1:{mport}");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mport)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let sig = [
        "--aws-sigv4",
        "aws:amz:us-east-1:s3",
        "--user",
        "AKIDKILN:secretkiln",
    ];
    let put = |path: &str, file: Option<&Path>| {
        let mut a: Vec<String> = sig.iter().map(|s| s.to_string()).collect();
        a.extend(["-X".into(), "PUT".into()]);
        if let Some(f) = file {
            a.extend(["-T".into(), f.display().to_string()]);
        }
        a.push(format!("{ep}{path}"));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let (code, b) = curl(&refs);
        assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&b));
    };
    put("/images", None);
    put("/images/base/s3.qcow2", Some(&img));
    put(
        "/images/base/s3.qcow2.sha256",
        Some(&www.join("s3.qcow2.sha256")),
    );

    let port = free_port();
    let dir = d.path().join("kiln");
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "serve",
            "--cache-dir",
            &dir.join("cache").display().to_string(),
        ])
        .env("PORT", port.to_string())
        .env("HOST", "127.0.0.1")
        .env("MINIO_ENDPOINT", &ep)
        .env("MINIO_ACCESS_KEY", "AKIDKILN")
        .env("MINIO_SECRET_KEY", "secretkiln")
        .env("KILN_VOLUME_DIR", d.path().join("vols"))
        .env("KILN_IMAGE_CACHE_DIR", d.path().join("images"))
        .env_remove("KILN_ADDR")
        .stderr(log)
        .spawn()
        .unwrap();
    let s = Server {
        child,
        port,
        dir,
        args: vec![],
        scheme: "http",
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "kiln did not listen on PORT: {}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = completed(&s, &submit(&s, "s3://images/base/s3.qcow2", "vm-s3", 1));
    assert_eq!(
        (v["cache_hit"].clone(), v["result"]["digest_source"].clone()),
        (false.into(), "sidecar".into())
    );
    assert_volume(
        &d.path().join("vols/vm-s3"),
        &img.with_extension("qcow2.raw"),
        GIB,
    );
    // The same object named by an http URL on the MinIO host: a cache hit.
    let v = completed(
        &s,
        &submit(&s, &format!("{ep}/images/base/s3.qcow2"), "vm-s3b", 1),
    );
    assert_eq!(v["cache_hit"], true, "{v}");
    // A missing object fails clearly.
    let v = wait_done(&s, &submit(&s, "s3://images/base/nope.qcow2", "vm-nope", 1));
    assert_eq!(v["status"], "failed");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("s3://images/base/nope.qcow2"),
        "{v}"
    );
    let _ = m.kill();
    let _ = m.wait();
}

/// kiln's own volumes are snapshot sources without any `--snapshot-root`:
/// two volumes provisioned from related images, and the changed blocks
/// between them, through the VolumeSnapshotDelta API.
#[test]
fn provisioned_volumes_can_be_snapshotted() {
    let d = tempfile::tempdir().unwrap();
    let www = d.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    qcow2(&www, "a.qcow2", 64, &[(0xab, "1M", "2M")]);
    qcow2(
        &www,
        "b.qcow2",
        64,
        &[(0xab, "1M", "2M"), (0xee, "10M", "4k"), (0xef, "33M", "1M")],
    );
    let http = ImageServer::start(&www);
    let s = vol_server(d.path(), &[]);
    completed(&s, &submit(&s, &http.url("r", "a.qcow2"), "vm-a", 1));
    completed(&s, &submit(&s, &http.url("r", "b.qcow2"), "vm-b", 1));
    let g = "/apis/cbt.storage.k8s.io/v1alpha1/namespaces/default";
    let post = |kind: &str, body: String| {
        let (c, b) = curl(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &s.url(&format!("{g}/{kind}")),
        ]);
        assert_eq!(c, 201, "{}", String::from_utf8_lossy(&b));
    };
    for (n, v) in [("snap-a", "vm-a"), ("snap-b", "vm-b")] {
        let p = d.path().join("vols").join(v);
        post(
            "volumesnapshots",
            format!(
                "{{\"metadata\":{{\"name\":\"{n}\"}},\"spec\":{{\"source\":{{\"path\":\"{}\"}}}}}}",
                p.display()
            ),
        );
    }
    post("volumesnapshotdeltas", "{\"metadata\":{\"name\":\"ab\"},\"spec\":{\"baseVolumeSnapshotName\":\"snap-a\",\"targetVolumeSnapshotName\":\"snap-b\",\"mode\":\"block\"}}".into());
    let t = Instant::now();
    let v = loop {
        let (_, b) = curl(&[&s.url(&format!("{g}/volumesnapshotdeltas/ab?fetchcbd=true"))]);
        let v = json(&b);
        if v["status"]["state"] == "computed" {
            break v;
        }
        assert_ne!(v["status"]["state"], "failed", "{v}");
        assert!(t.elapsed() < Duration::from_secs(60), "{v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let blocks: Vec<u64> = v["status"]["changedBlockDeltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    // 512 KiB blocks: 10M is block 20; 33M..34M is blocks 66 and 67.
    assert_eq!(blocks, vec![20, 66, 67], "{v}");
    // Anything outside kiln's own directories is still refused.
    let (c, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        "{\"metadata\":{\"name\":\"etc\"},\"spec\":{\"source\":{\"path\":\"/etc/passwd\"}}}",
        &s.url(&format!("{g}/volumesnapshots")),
    ]);
    assert_eq!(c, 403);
}
