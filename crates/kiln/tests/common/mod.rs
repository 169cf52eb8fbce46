//! Test harness: real kiln servers on loopback, real curl, real Debian
//! headers (prepared by scripts/test.sh), real make.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Fixtures {
    pub dir: PathBuf,
    pub kver: String,
    pub headers: PathBuf,
    pub root: PathBuf,
}

pub fn fixtures() -> Fixtures {
    let dir = std::env::var_os("KILN_TEST_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-fixtures")
        });
    assert!(
        dir.join("ready").exists(),
        "kernel header fixtures missing at {}: run ./scripts/test.sh, which prepares them",
        dir.display()
    );
    let kver = std::fs::read_to_string(dir.join("kver"))
        .unwrap()
        .trim()
        .to_string();
    Fixtures {
        headers: dir.join("headers.tgz"),
        root: dir.join("root"),
        dir,
        kver,
    }
}

/// A DRBD-shaped module source: `make module KDIR=...` builds hello.ko.
/// `pre` is extra shell put in the recipe before the kernel build.
pub fn module_source(dir: &Path, pre: &str) -> PathBuf {
    let src = dir.join("drbd");
    std::fs::create_dir_all(src.join("src")).unwrap();
    std::fs::write(
        src.join("src/hello.c"),
        "#include <linux/module.h>\n#include <linux/init.h>\nstatic int __init h_init(void) { return 0; }\nstatic void __exit h_exit(void) {}\nmodule_init(h_init);\nmodule_exit(h_exit);\nMODULE_LICENSE(\"GPL\");\n",
    )
    .unwrap();
    std::fs::write(src.join("src/Kbuild"), "obj-m := hello.o\n").unwrap();
    let pre = if pre.is_empty() {
        String::new()
    } else {
        format!("\t{pre}\n")
    };
    std::fs::write(
        src.join("Makefile"),
        format!("module:\n\t@echo SPAAS_URL=$$SPAAS_URL\n{pre}\t$(MAKE) -C $(KDIR) M=$(CURDIR)/src modules\n"),
    )
    .unwrap();
    src
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub scheme: &'static str,
}

impl Server {
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        Self::start_on(dir, free_port(), args, "http")
    }

    pub fn start_on(dir: &Path, port: u16, args: &[&str], scheme: &'static str) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap();
        let mut all = vec![
            "serve".to_string(),
            "--addr".into(),
            format!("127.0.0.1:{port}"),
            "--cache-dir".into(),
            dir.join("cache").display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&all)
            .env_remove("DRBD_VERSION")
            .env_remove("DRBD_REPO")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let s = Server {
            child,
            port,
            dir: dir.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            scheme,
        };
        s.wait_up();
        s
    }

    fn wait_up(&self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kiln did not start; log:\n{}", self.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{}", self.scheme, self.port, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Poll status until the job is terminal; returns the status document.
    pub fn wait_job(&self, id: &str, timeout: Duration) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let (code, body) = curl(&[&self.url(&format!("/api/v1/status/{id}"))]);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if code == 200 {
                return v;
            }
            assert_eq!(code, 202, "status: {}", String::from_utf8_lossy(&body));
            assert!(
                t.elapsed() < timeout,
                "job {id} did not finish: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// POST the headers; returns (status code, body).
    pub fn build(&self, headers: &Path, kver: &str, query: &str) -> (u16, Vec<u8>) {
        curl(&[
            "-X",
            "POST",
            "-H",
            &format!("X-Kernel-Version: {kver}"),
            "--data-binary",
            &format!("@{}", headers.display()),
            &self.url(&format!("/api/v1/build{query}")),
        ])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run real curl; returns (HTTP status, body).
pub fn curl(args: &[&str]) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    let mut body = out.stdout;
    let nl = body
        .iter()
        .rposition(|b| *b == b'\n')
        .expect("curl printed a status");
    let code: u16 = String::from_utf8_lossy(&body[nl + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(nl);
    (code, body)
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Names in a tar.gz.
pub fn tar_names(data: &[u8]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.tgz");
    std::fs::write(&p, data).unwrap();
    let out = Command::new("tar").arg("tzf").arg(&p).output().unwrap();
    assert!(
        out.status.success(),
        "not a tar.gz: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("bash").args(["-ec", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Is any process's command line containing `needle` alive (not a zombie)?
pub fn process_alive(needle: &str) -> bool {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let p = e.path();
        let Ok(cmd) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
            if !stat
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'))
            {
                return true;
            }
        }
    }
    false
}
