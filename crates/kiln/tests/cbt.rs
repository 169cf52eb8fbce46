//! Changed block tracking through the real binary: images made by qemu-img
//! with blocks written by qemu-io at known offsets, a loop device, kubectl
//! against kiln as its API server, curl for pages and block data.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const G: &str = "/apis/cbt.storage.k8s.io/v1alpha1/namespaces/default";

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut c = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let o = c.wait_with_output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn kubeconfig(dir: &Path, s: &Server) -> std::path::PathBuf {
    let p = dir.join("kubeconfig");
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: kiln, cluster: {{server: \"{}\"}}}}]\ncontexts: [{{name: kiln, context: {{cluster: kiln, namespace: default}}}}]\ncurrent-context: kiln\n",
            s.url("")
        ),
    )
    .unwrap();
    p
}

fn wait_computed(s: &Server, name: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (code, body) = curl(&[&s.url(&format!("{G}/volumesnapshotdeltas/{name}"))]);
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let v = json(&body);
        match v["status"]["state"].as_str() {
            Some("computed") => return v,
            Some("failed") => panic!("delta failed: {v}\n{}", s.log()),
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(60), "not computed: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every changed block, walked with `limit` and `offset`, and again with `continue`.
fn walk(s: &Server, name: &str, limit: usize) -> (Vec<u64>, Vec<(u64, String)>) {
    let mut by_offset = vec![];
    let mut tokens = vec![];
    loop {
        let (code, body) = curl(&[&s.url(&format!(
            "{G}/volumesnapshotdeltas/{name}?fetchcbd=true&limit={limit}&offset={}",
            by_offset.len()
        ))]);
        assert_eq!(code, 200);
        let v = json(&body);
        let e = v["status"]["changedBlockDeltas"]
            .as_array()
            .unwrap()
            .clone();
        if e.is_empty() {
            break;
        }
        assert!(e.len() <= limit);
        for x in e {
            by_offset.push(x["offset"].as_u64().unwrap());
            tokens.push((
                x["offset"].as_u64().unwrap(),
                x["dataToken"]["token"].as_str().unwrap().to_string(),
            ));
        }
    }
    let mut by_continue = vec![];
    let mut cont: Option<String> = None;
    loop {
        let q = match &cont {
            Some(c) => format!("fetchcbd=true&limit={limit}&continue={c}"),
            None => format!("fetchcbd=true&limit={limit}"),
        };
        let (_, body) = curl(&[&s.url(&format!("{G}/volumesnapshotdeltas/{name}?{q}"))]);
        let v = json(&body);
        by_continue.extend(
            v["status"]["changedBlockDeltas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["offset"].as_u64().unwrap()),
        );
        match v["metadata"]["continue"].as_str() {
            Some(c) => cont = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(
        by_offset, by_continue,
        "offset and continue walk the same blocks"
    );
    (by_offset, tokens)
}

/// A kiln server whose snapshot root is `vols`, plus `extra` flags.
fn cbt_server(d: &Path, vols: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--snapshot-root",
        vols.to_str().unwrap(),
        "--drbd-dir",
        "/nonexistent",
    ];
    args.extend_from_slice(extra);
    Server::start(&d.join("srv"), &args)
}

/// POST an object as JSON; it must be created.
fn create(s: &Server, kind: &str, body: &str) -> serde_json::Value {
    let (c, b) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        body,
        &s.url(&format!("{G}/{kind}")),
    ]);
    assert_eq!(c, 201, "{}", String::from_utf8_lossy(&b));
    json(&b)
}

fn yaml_objects(base: &str, target: &str, extra: &str) -> String {
    format!(
        "apiVersion: cbt.storage.k8s.io/v1alpha1\nkind: VolumeSnapshot\nmetadata: {{name: vs-00}}\nspec: {{source: {{path: {base}}}}}\n---\napiVersion: cbt.storage.k8s.io/v1alpha1\nkind: VolumeSnapshot\nmetadata: {{name: vs-01}}\nspec: {{source: {{path: {target}}}}}\n---\napiVersion: cbt.storage.k8s.io/v1alpha1\nkind: VolumeSnapshotDelta\nmetadata: {{name: test-delta}}\nspec: {{baseVolumeSnapshotName: vs-00, targetVolumeSnapshotName: vs-01, mode: block{extra}}}\n"
    )
}

#[test]
fn qcow2_overlay_delta_via_kubectl_pages_and_block_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vols = d.join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    // base <- top; top writes at known offsets (64 KiB blocks):
    // 2M (1 byte), 10M..10M+200k (4 blocks), 40M (1 MiB = 16 blocks), zeroes at 50M (2 blocks).
    sh(&format!(
        "cd {v}
         qemu-img create -q -f qcow2 base.qcow2 64M
         qemu-io -c 'write -P 0x11 0 16M' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
         qemu-io -c 'write -P 0x33 2M 1' -c 'write -P 0x22 10M 200k' -c 'write -P 0x44 40M 1M' -c 'write -z 50M 128k' top.qcow2 >/dev/null
         qemu-img convert -O raw top.qcow2 top.raw",
        v = vols.display()
    ));
    let bs = 65536u64;
    let m = |mib: u64| mib * 16;
    let mut want: Vec<u64> = vec![m(2)];
    want.extend(m(10)..m(10) + 4);
    want.extend(m(40)..m(40) + 16);
    want.extend(m(50)..m(50) + 2);
    let s = cbt_server(d, &vols, &[]);
    let kc = kubeconfig(d, &s);
    let objs = yaml_objects(
        &vols.join("base.qcow2").display().to_string(),
        &vols.join("top.qcow2").display().to_string(),
        &format!(", blockSizeBytes: {bs}"),
    );
    // kubectl validates against kiln's OpenAPI and leaves strict field checks to kiln.
    let typo = objs.replace("mode: block", "mode: block, blockSize: 1");
    let (ok, out) = kubectl(&kc, &["create", "-f", "-"], Some(&typo));
    assert!(
        !ok && out.contains("unknown field \"spec.blockSize\""),
        "{out}"
    );
    let (ok, out) = kubectl(&kc, &["delete", "volumesnapshots", "vs-00", "vs-01"], None);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&kc, &["create", "-f", "-"], Some(&objs));
    assert!(ok, "{out}");
    assert!(
        out.contains("volumesnapshotdelta.cbt.storage.k8s.io/test-delta created"),
        "{out}"
    );
    let v = wait_computed(&s, "test-delta");
    assert_eq!(v["status"]["method"], "qcow2-allocation-map");
    assert_eq!(v["status"]["totalChangedBlocks"], want.len() as u64);
    assert_eq!(v["status"]["volumeSizeBytes"], 64u64 << 20);
    let (ok, y) = kubectl(
        &kc,
        &["get", "volumesnapshotdelta", "test-delta", "-o", "yaml"],
        None,
    );
    assert!(ok, "{y}");
    for f in [
        "kind: VolumeSnapshotDelta",
        "uid:",
        "resourceVersion:",
        "creationTimestamp:",
        "baseVolumeSnapshotName: vs-00",
        "type: Computed",
        "status: \"True\"",
    ] {
        assert!(y.contains(f), "{f} missing in\n{y}");
    }
    let (ok, l) = kubectl(&kc, &["get", "volumesnapshotdeltas"], None);
    assert!(ok && l.contains("test-delta"), "{l}");

    // Pages: every block exactly once, in order, with offset and with continue.
    for limit in [1, 5, 256] {
        let (blocks, _) = walk(&s, "test-delta", limit);
        assert_eq!(blocks, want, "limit {limit}");
    }
    let (_, body) = curl(&[&s.url(&format!(
        "{G}/volumesnapshotdeltas/test-delta?fetchcbd=true&limit=99999"
    ))]);
    assert_eq!(json(&body)["status"]["limit"], 10000, "the cap");
    let (_, body) = curl(&[&s.url(&format!(
        "{G}/volumesnapshotdeltas/test-delta?fetchcbd=true"
    ))]);
    assert_eq!(json(&body)["status"]["limit"], 256, "the default");

    // Block data: the target's bytes, with a matching SHA-256.
    let (_, tokens) = walk(&s, "test-delta", 256);
    let raw = std::fs::read(vols.join("top.raw")).unwrap();
    for (blk, tok) in tokens
        .iter()
        .filter(|(b, _)| [m(2), m(10) + 3, m(40) + 15, m(50)].contains(b))
    {
        let out = d.join("blk");
        let hdr = sh(&format!(
            "curl -sS -D - -o {} '{}'",
            out.display(),
            s.url(&format!("{G}/volumesnapshots/vs-01/blocks/{tok}"))
        ));
        let body = std::fs::read(&out).unwrap();
        let start = (*blk * bs) as usize;
        assert_eq!(body.len(), bs as usize, "block {blk}");
        assert!(
            body == raw[start..start + bs as usize],
            "block {blk}: not the target's bytes"
        );
        let sum = sh(&format!("sha256sum {} | cut -d' ' -f1", out.display()));
        assert!(
            hdr.to_lowercase()
                .contains(&format!("x-kiln-checksum-sha256: {}", sum.trim())),
            "{hdr}"
        );
    }
    // Refused: forged, altered, cross-snapshot.
    let tok = &tokens[0].1;
    let forged = format!(
        "{}{}",
        &tok[..tok.len() - 1],
        if tok.ends_with('0') { "1" } else { "0" }
    );
    let altered = tok.replacen(
        &format!(".{}.", tokens[0].0),
        &format!(".{}.", tokens[0].0 + 1),
        1,
    );
    for (t, code, path) in [
        (&forged, 401, "vs-01"),
        (&altered, 401, "vs-01"),
        (tok, 403, "vs-00"),
        (&"garbage".to_string(), 401, "vs-01"),
    ] {
        let (c, body) = curl(&[&s.url(&format!("{G}/volumesnapshots/{path}/blocks/{t}"))]);
        assert_eq!(c, code, "{}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["kind"], "Status");
    }

    // Sources outside the roots, even through a link inside one, are refused.
    std::os::unix::fs::symlink("/etc/passwd", vols.join("sneaky")).unwrap();
    for p in [
        "/etc/passwd".to_string(),
        vols.join("sneaky").display().to_string(),
        format!("{}/../x", vols.display()),
    ] {
        let (c, body) = curl(&[
            "-X", "POST", "-H", "content-type: application/json",
            "-d", &format!("{{\"metadata\":{{\"name\":\"bad\"}},\"spec\":{{\"source\":{{\"path\":\"{p}\"}}}}}}"),
            &s.url(&format!("{G}/volumesnapshots")),
        ]);
        assert!(
            c == 403 || c == 422,
            "{p}: {c} {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(json(&body)["kind"], "Status");
    }
    // A block list evicted from the cache (here: purged) is reported as gone.
    let (c, _) = curl(&["-X", "DELETE", &s.url("/api/v1/cache")]);
    assert_eq!(c, 200);
    let (c, body) = curl(&[&s.url(&format!(
        "{G}/volumesnapshotdeltas/test-delta?fetchcbd=true"
    ))]);
    assert_eq!((c, json(&body)["reason"].as_str()), (410, Some("Gone")));
    // Kubernetes-style errors.
    let (c, body) = curl(&[&s.url(&format!("{G}/volumesnapshotdeltas/nope"))]);
    assert_eq!((c, json(&body)["reason"].as_str()), (404, Some("NotFound")));
    let (ok, out) = kubectl(&kc, &["create", "-f", "-"], Some(&objs));
    assert!(!ok && out.contains("already exists"), "{out}");
    let (ok, out) = kubectl(&kc, &["delete", "volumesnapshotdelta", "test-delta"], None);
    assert!(ok, "{out}");
    assert_eq!(
        curl(&[&s.url(&format!("{G}/volumesnapshotdeltas/test-delta"))]).0,
        404
    );
}

#[test]
fn expired_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vols = d.join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    sh(&format!(
        "cd {v} && truncate -s 8M a.raw && cp a.raw b.raw && qemu-io -f raw -c 'write -P 0x5a 1M 4k' b.raw >/dev/null",
        v = vols.display()
    ));
    let s = cbt_server(d, &vols, &["--cbt-token-ttl", "1"]);
    let post = |kind: &str, body: String| create(&s, kind, &body);
    post(
        "volumesnapshots",
        format!(
            "{{\"metadata\":{{\"name\":\"a\"}},\"spec\":{{\"source\":{{\"path\":\"{}/a.raw\"}}}}}}",
            vols.display()
        ),
    );
    post(
        "volumesnapshots",
        format!(
            "{{\"metadata\":{{\"name\":\"b\"}},\"spec\":{{\"source\":{{\"path\":\"{}/b.raw\"}}}}}}",
            vols.display()
        ),
    );
    post("volumesnapshotdeltas", "{\"metadata\":{\"name\":\"ab\"},\"spec\":{\"baseVolumeSnapshotName\":\"a\",\"targetVolumeSnapshotName\":\"b\"}}".into());
    let v = wait_computed(&s, "ab");
    assert_eq!(v["status"]["method"], "full-scan");
    let (blocks, tokens) = walk(&s, "ab", 10);
    assert_eq!(blocks, vec![2], "1 MiB at 512 KiB blocks is block 2");
    assert_eq!(
        curl(&[&s.url(&format!("{G}/volumesnapshots/b/blocks/{}", tokens[0].1))]).0,
        200
    );
    std::thread::sleep(Duration::from_millis(2100));
    let (c, body) = curl(&[&s.url(&format!("{G}/volumesnapshots/b/blocks/{}", tokens[0].1))]);
    assert_eq!(c, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("expired"));
}

/// Two independent volumes: a file and a block device (a loop device over a
/// copy), compared in full.
#[test]
fn independent_file_and_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vols = d.join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    sh(&format!(
        "cd {v} && head -c 33554432 /dev/urandom > base.raw && cp base.raw target.raw
         qemu-io -f raw -c 'write -P 0x01 0 1' -c 'write -P 0x02 5M 600k' -c 'write -P 0x03 33553920 512' target.raw >/dev/null",
        v = vols.display()
    ));
    let dev = sh(&format!("losetup -f --show {}/target.raw", vols.display()))
        .trim()
        .to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _guard = Detach(dev.clone());
    let s = cbt_server(d, &vols, &["--snapshot-root", &dev]);
    let post = |kind: &str, body: String| create(&s, kind, &body);
    post("volumesnapshots", format!("{{\"metadata\":{{\"name\":\"base\"}},\"spec\":{{\"source\":{{\"path\":\"{}/base.raw\"}}}}}}", vols.display()));
    let snap = post(
        "volumesnapshots",
        format!(
            "{{\"metadata\":{{\"name\":\"dev\"}},\"spec\":{{\"source\":{{\"path\":\"{dev}\"}}}}}}"
        ),
    );
    assert_eq!(snap["status"]["sourceFormat"], "block");
    post("volumesnapshotdeltas", "{\"metadata\":{\"name\":\"d\"},\"spec\":{\"baseVolumeSnapshotName\":\"base\",\"targetVolumeSnapshotName\":\"dev\",\"blockSizeBytes\":131072}}".into());
    let v = wait_computed(&s, "d");
    assert_eq!(v["status"]["method"], "full-scan");
    let (blocks, tokens) = walk(&s, "d", 3);
    // 0 (1 byte), 5M..5M+600k at 128 KiB = blocks 40..44 (5 blocks), the last block (255).
    assert_eq!(blocks, vec![0, 40, 41, 42, 43, 44, 255]);
    // Block data from the device.
    let t = &tokens.iter().find(|(b, _)| *b == 41).unwrap().1;
    let out = d.join("blk");
    sh(&format!(
        "curl -sSf -o {} '{}'",
        out.display(),
        s.url(&format!("{G}/volumesnapshots/dev/blocks/{t}"))
    ));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 131072);
    assert!(got.iter().all(|b| *b == 0x02));
}

/// LVM thin snapshots: no device-mapper here, so the pool metadata is a file
/// built by thin_restore with known mappings; kiln runs thin_delta on it.
#[test]
fn lvm_thin_delta_from_pool_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vols = d.join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    // 64 KiB pool blocks. Device 2 (the snapshot taken later) remapped block
    // 2, shares 0, 1 and 3 with device 1, and has block 20 of its own.
    std::fs::write(
        vols.join("pool.xml"),
        r#"<superblock uuid="" time="1" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="2048">
  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <single_mapping origin_block="2" data_block="10" time="1"/>
    <single_mapping origin_block="3" data_block="3" time="0"/>
    <single_mapping origin_block="20" data_block="11" time="1"/>
  </device>
</superblock>"#,
    )
    .unwrap();
    sh(&format!(
        "cd {v} && truncate -s 8M meta.bin && thin_restore -i pool.xml -o meta.bin && truncate -s 2M lv1.raw lv2.raw",
        v = vols.display()
    ));
    let s = cbt_server(d, &vols, &[]);
    let post = |kind: &str, body: String| create(&s, kind, &body);
    for (name, id) in [("lv1", 1), ("lv2", 2)] {
        post(
            "volumesnapshots",
            format!(
                "{{\"metadata\":{{\"name\":\"{name}\"}},\"spec\":{{\"source\":{{\"path\":\"{v}/{name}.raw\",\"thin\":{{\"metadata\":\"{v}/meta.bin\",\"deviceId\":{id}}}}}}}}}",
                v = vols.display()
            ),
        );
    }
    post("volumesnapshotdeltas", "{\"metadata\":{\"name\":\"thin\"},\"spec\":{\"baseVolumeSnapshotName\":\"lv1\",\"targetVolumeSnapshotName\":\"lv2\",\"blockSizeBytes\":65536}}".into());
    let v = wait_computed(&s, "thin");
    assert_eq!(v["status"]["method"], "thin-delta");
    assert_eq!(walk(&s, "thin", 10).0, vec![2, 20]);
    // Thin metadata outside the roots is refused like any source.
    let (c, _) = curl(&["-X", "POST", "-H", "content-type: application/json", "-d",
        &format!("{{\"metadata\":{{\"name\":\"x\"}},\"spec\":{{\"source\":{{\"path\":\"{}/lv1.raw\",\"thin\":{{\"metadata\":\"/etc/hostname\",\"deviceId\":1}}}}}}}}", vols.display()),
        &s.url(&format!("{G}/volumesnapshots"))]);
    assert_eq!(c, 403);
}

/// A long full scan shows progress and stops when its delta is deleted.
#[test]
fn a_running_scan_reports_progress_and_is_cancelled_by_delete() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vols = d.join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    // Two sparse 256 GiB volumes: reading them takes far longer than the test.
    sh(&format!(
        "cd {} && truncate -s 256G a.raw b.raw",
        vols.display()
    ));
    let s = cbt_server(d, &vols, &[]);
    for n in ["a", "b"] {
        let (c, _) = curl(&["-X", "POST", "-H", "content-type: application/json", "-d",
            &format!("{{\"metadata\":{{\"name\":\"{n}\"}},\"spec\":{{\"source\":{{\"path\":\"{}/{n}.raw\"}}}}}}", vols.display()),
            &s.url(&format!("{G}/volumesnapshots"))]);
        assert_eq!(c, 201);
    }
    let (c, body) = curl(&["-X", "POST", "-H", "content-type: application/json", "-d",
        "{\"metadata\":{\"name\":\"big\"},\"spec\":{\"baseVolumeSnapshotName\":\"a\",\"targetVolumeSnapshotName\":\"b\"}}",
        &s.url(&format!("{G}/volumesnapshotdeltas"))]);
    assert_eq!(c, 201);
    let job = json(&body)["status"]["jobId"].as_str().unwrap().to_string();
    // Progress moves while it computes.
    let t = Instant::now();
    loop {
        let (_, body) = curl(&[&s.url(&format!("{G}/volumesnapshotdeltas/big"))]);
        let v = json(&body);
        assert_eq!(v["status"]["state"], "computing", "{v}");
        let msg = v["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if msg.starts_with("comparing") && !msg.contains("(5%)") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no progress: {msg}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (c, _) = curl(&[
        "-X",
        "DELETE",
        &s.url(&format!("{G}/volumesnapshotdeltas/big")),
    ]);
    assert_eq!(c, 200);
    let t = Instant::now();
    loop {
        let (_, body) = curl(&[&s.url(&format!("/api/v1/jobs/{job}"))]);
        if json(&body)["status"] == "cancelled" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "not cancelled: {}",
            String::from_utf8_lossy(&body)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With access control on, kubectl authenticates with `--token` like any
/// client (over TLS: kubectl sends no token to a plain-HTTP server), and a
/// read-only token cannot create.
#[test]
fn kubectl_with_tokens_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vols = d.join("vols");
    std::fs::create_dir_all(&vols).unwrap();
    sh(&format!(
        "cd {d} && truncate -s 1M vols/a.raw && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=kiln -addext subjectAltName=IP:127.0.0.1 -keyout tls.key -out tls.crt 2>/dev/null",
        d = d.display()
    ));
    std::fs::write(d.join("tokens"), "ops:s3cret\nviewer:look read\n").unwrap();
    let p = |n: &str| d.join(n).display().to_string();
    let s = Server::start_on(
        &d.join("srv"),
        free_port(),
        &[
            "--api-tokens-file",
            &p("tokens"),
            "--certfile",
            &p("tls.crt"),
            "--keyfile",
            &p("tls.key"),
            "--snapshot-root",
            vols.to_str().unwrap(),
            "--drbd-dir",
            "/nonexistent",
        ],
        "https",
    );
    let kc = d.join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: kiln, cluster: {{server: \"{}\", certificate-authority: {}}}}}]\ncontexts: [{{name: kiln, context: {{cluster: kiln, namespace: default}}}}]\ncurrent-context: kiln\n",
            s.url(""),
            p("tls.crt")
        ),
    )
    .unwrap();
    let snap = format!(
        "apiVersion: cbt.storage.k8s.io/v1alpha1\nkind: VolumeSnapshot\nmetadata: {{name: a}}\nspec: {{source: {{path: {}/a.raw}}}}\n",
        vols.display()
    );
    // Without a token kubectl gets 401 (and, on a terminal, would ask for a user name).
    let (ok, out) = kubectl(&kc, &["get", "volumesnapshots"], Some(""));
    assert!(!ok, "{out}");
    let (ok, out) = kubectl(&kc, &["--token", "wrong", "get", "volumesnapshots"], None);
    assert!(!ok && out.contains("provide credentials"), "{out}");
    let (ok, out) = kubectl(&kc, &["--token", "look", "create", "-f", "-"], Some(&snap));
    assert!(!ok && out.to_lowercase().contains("forbidden"), "{out}");
    let (ok, out) = kubectl(
        &kc,
        &["--token", "s3cret", "create", "-f", "-"],
        Some(&snap),
    );
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&kc, &["--token", "look", "get", "volumesnapshots"], None);
    assert!(ok && out.contains("a "), "{out}");
}
