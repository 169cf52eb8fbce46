//! `kiln dkms2bin` through the real binary: real Debian `*-dkms` packages,
//! real Debian headers, then dpkg-deb, lintian, dpkg --root, depmod -b and
//! apt itself on the output.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn dkms2bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("dkms2bin")
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn debs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    v.sort();
    v
}

fn deb_kos(deb: &Path) -> Vec<String> {
    sh(&format!("dpkg-deb -c '{}'", deb.display()))
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|p| p.contains(".ko"))
        .map(str::to_string)
        .collect()
}

/// A small DKMS source; `conf` is appended to the name and version lines.
fn dkms_src(dir: &Path, name: &str, c_extra: &str, conf: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(d.join("src")).unwrap();
    std::fs::write(
        d.join("src/hello.c"),
        format!("#include <linux/module.h>\n#include <linux/init.h>\nstatic int __init h_init(void) {{ return 0; }}\nstatic void __exit h_exit(void) {{}}\nmodule_init(h_init);\nmodule_exit(h_exit);\nMODULE_LICENSE(\"GPL\");\n{c_extra}\n"),
    )
    .unwrap();
    std::fs::write(d.join("src/Kbuild"), "obj-m := hello.o\n").unwrap();
    std::fs::write(
        d.join("dkms.conf"),
        format!("PACKAGE_NAME=\"{name}\"\nPACKAGE_VERSION=\"1.0\"\n{conf}\n"),
    )
    .unwrap();
    d
}

#[test]
fn real_dkms_packages_become_installable_debs_and_an_apt_repo() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("repo");
    // One input of each kind: a package name (apt-get download), a .deb,
    // and a source directory that does not compile.
    sh(&format!(
        "cd {} && apt-get download -q bbswitch-dkms 2>/dev/null",
        d.display()
    ));
    let bbswitch = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("bbswitch-dkms"))
        .unwrap();
    let broken = dkms_src(
        d,
        "broken",
        "this is not C;",
        "MAKE[0]=\"make -C ${kernel_source_dir} M=${dkms_tree}/broken/1.0/build/src modules\"\nBUILT_MODULE_NAME[0]=hello\nBUILT_MODULE_LOCATION[0]=src",
    );
    let headers = f.root.join(format!("usr/src/linux-headers-{}", f.kver));
    let o = dkms2bin(&[
        "--dkms",
        "v4l2loopback-dkms",
        "acpi-call-dkms",
        "--dkms",
        bbswitch.to_str().unwrap(),
        broken.to_str().unwrap(),
        "--kver",
        &f.kver,
        "--headers",
        headers.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "-j",
        "2",
    ]);
    let t = text(&o);
    // The broken one fails with a warning, its log tail and path; the rest come out.
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("warning:") && t.contains("this is not C"), "{t}");
    assert!(t.contains(&format!("{}/logs/", out.display())), "{t}");
    for row in ["v4l2loopback-dkms", "acpi-call-dkms", "bbswitch-dkms"] {
        assert!(
            t.lines().any(|l| l.contains(row) && l.contains(" built ")),
            "{row}: {t}"
        );
    }
    assert!(
        t.lines()
            .any(|l| l.contains("broken") && l.contains(" failed ")),
        "{t}"
    );
    let debs = debs(&out);
    let names: Vec<String> = debs
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(debs.len(), 3, "{names:?}");
    for (n, base) in names.iter().zip(["acpi-call", "bbswitch", "v4l2loopback"]) {
        assert!(
            n.starts_with(&format!("{base}-modules-{}_", f.kver)) && n.ends_with("_amd64.deb"),
            "{n}"
        );
    }

    let root = d.join("root");
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    for deb in &debs {
        let info = sh(&format!("dpkg-deb --info '{}'", deb.display()));
        for field in [
            "Package:",
            "Version:",
            "Architecture: amd64",
            "Maintainer:",
            "Installed-Size:",
            &format!(
                "Depends: linux-image-{k} | linux-image-{k}-unsigned",
                k = f.kver
            ),
            "Provides:",
            "Conflicts:",
            "Description:",
            "md5sums",
            "postinst",
            "postrm",
        ] {
            assert!(
                info.contains(field),
                "{field} missing in {}: {info}",
                deb.display()
            );
        }
        let kos = deb_kos(deb);
        assert!(!kos.is_empty());
        assert!(
            kos.iter()
                .all(|k| k.starts_with(&format!("./lib/modules/{}/updates/dkms/", f.kver))),
            "{kos:?}"
        );
        // No lintian errors.
        let l = Command::new("lintian").arg(deb).output().unwrap();
        let errors: Vec<String> = String::from_utf8_lossy(&l.stdout)
            .lines()
            .filter(|l| l.starts_with("E:"))
            .map(str::to_string)
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", deb.display());
        // Modules are stripped of debug info.
        let tmp = d.join("x");
        sh(&format!(
            "rm -rf {t} && mkdir {t} && dpkg-deb -x '{}' {t}",
            deb.display(),
            t = tmp.display()
        ));
        for k in &kos {
            let sections = sh(&format!("objdump -h '{}/{}'", tmp.display(), k));
            assert!(!sections.contains(".debug_info"), "{k} is not stripped");
        }
    }
    // They install into a scratch root, where the maintainer scripts'
    // depmod indexes them.
    sh(&format!(
        "dpkg --root={r} --force-depends --force-script-chrootless --log=/dev/null -i {debs}",
        r = root.display(),
        debs = debs
            .iter()
            .map(|p| format!("'{}'", p.display()))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let dep =
        std::fs::read_to_string(root.join(format!("lib/modules/{}/modules.dep", f.kver))).unwrap();
    for m in ["v4l2loopback.ko", "acpi_call.ko", "bbswitch.ko"] {
        assert!(
            dep.contains(&format!("updates/dkms/{m}")),
            "{m} not in modules.dep: {dep}"
        );
    }
    let listed = sh(&format!(
        "depmod -b {} -n {} 2>/dev/null | grep -c updates/dkms || true",
        root.display(),
        f.kver
    ));
    assert!(listed.trim().parse::<u32>().unwrap() >= 3, "{listed}");

    // The out-dir is an apt repository apt accepts as it is.
    let packages = std::fs::read_to_string(out.join("Packages")).unwrap();
    for n in ["acpi-call", "bbswitch", "v4l2loopback"] {
        assert!(
            packages.contains(&format!("Package: {n}-modules-{}", f.kver)),
            "{packages}"
        );
    }
    assert!(out.join("Packages.gz").is_file() && out.join("Release").is_file());
    let apt = d.join("apt");
    sh(&format!(
        "mkdir -p {a}/lists/partial {a}/cache/archives/partial && echo 'deb [trusted=yes] file:{o} ./' > {a}/sources.list
         opts='-o Dir::Etc::SourceList={a}/sources.list -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists={a}/lists -o Dir::Cache={a}/cache -o Dir::State::status={a}/status'
         : > {a}/status
         apt-get $opts update -qq
         apt-cache $opts show v4l2loopback-modules-{k} | grep -q '^Filename: ./v4l2loopback-modules'",
        a = apt.display(),
        o = out.display(),
        k = f.kver
    ));
}

#[test]
fn dkms_conf_semantics_patches_matches_and_exclusions() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("repo");
    // PATCH[] with PATCH_MATCH (one applies, one must not: it is garbage),
    // MAKE_MATCH picking the make command, PRE_BUILD writing a file the build
    // needs, BUILT_MODULE_LOCATION, DEST_MODULE_NAME and STRIP.
    let full = dkms_src(
        d,
        "full",
        "",
        r#"PATCH[0]="describe.patch"
PATCH_MATCH[0]="^6\.1\."
PATCH[1]="garbage.patch"
PATCH_MATCH[1]="^2\.6\."
MAKE[0]="false wrong-make"
MAKE[1]="make -C ${kernel_source_dir} M=${dkms_tree}/full/1.0/build/src modules"
MAKE_MATCH[1]="^6\."
PRE_BUILD="prebuild.sh pre-arg"
POST_BUILD="postbuild.sh"
BUILT_MODULE_NAME[0]=hello
BUILT_MODULE_LOCATION[0]=src/
DEST_MODULE_NAME[0]=kiln_hello
STRIP[0]=no"#,
    );
    std::fs::create_dir_all(full.join("patches")).unwrap();
    std::fs::write(
        full.join("patches/describe.patch"),
        "--- a/src/hello.c\n+++ b/src/hello.c\n@@ -7,2 +7,3 @@\n MODULE_LICENSE(\"GPL\");\n+MODULE_DESCRIPTION(\"patched by PATCH[0]\");\n \n",
    )
    .unwrap();
    std::fs::write(full.join("patches/garbage.patch"), "this is not a patch\n").unwrap();
    std::fs::write(
        full.join("prebuild.sh"),
        "#!/bin/sh\necho \"ccflags-y += -DPRE=1 # $1\" >> src/Kbuild\n",
    )
    .unwrap();
    std::fs::write(
        full.join("postbuild.sh"),
        "#!/bin/sh\ntest -f src/hello.ko\n",
    )
    .unwrap();
    sh(&format!(
        "chmod +x {0}/prebuild.sh {0}/postbuild.sh",
        full.display()
    ));
    // BUILD_EXCLUSIVE mismatches: skipped, not failed.
    let old = dkms_src(
        d,
        "oldonly",
        "",
        "BUILT_MODULE_NAME[0]=hello\nBUILD_EXCLUSIVE_KERNEL=\"^4\\.\"",
    );
    let cfg = dkms_src(
        d,
        "needsfoo",
        "",
        "BUILT_MODULE_NAME[0]=hello\nBUILD_EXCLUSIVE_CONFIG=\"CONFIG_KILN_NO_SUCH_OPTION\"",
    );
    sh(&format!(
        "cd {} && openssl req -new -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kiln-dkms-signer -addext extendedKeyUsage=codeSigning -keyout sign.key -out sign.crt 2>/dev/null",
        d.display()
    ));
    let (key, cert) = (d.join("sign.key"), d.join("sign.crt"));
    let o = dkms2bin(&[
        "--sign-key",
        key.to_str().unwrap(),
        "--sign-cert",
        cert.to_str().unwrap(),
        "--dkms",
        full.to_str().unwrap(),
        old.to_str().unwrap(),
        cfg.to_str().unwrap(),
        "--kver",
        &f.kver,
        "--headers",
        f.headers.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--do-not-remove",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "skips are not failures: {t}");
    assert!(
        t.lines().any(|l| l.contains("oldonly")
            && l.contains(" skipped ")
            && l.contains("BUILD_EXCLUSIVE_KERNEL")),
        "{t}"
    );
    assert!(
        t.lines().any(|l| l.contains("needsfoo")
            && l.contains(" skipped ")
            && l.contains("BUILD_EXCLUSIVE_CONFIG")),
        "{t}"
    );
    let kept = t
        .lines()
        .find_map(|l| l.strip_prefix("work root kept: "))
        .expect("work root path printed");
    assert!(Path::new(kept).is_dir());
    let _ = std::fs::remove_dir_all(kept);
    let debs = debs(&out);
    assert_eq!(debs.len(), 1, "{t}");
    let kos = deb_kos(&debs[0]);
    assert_eq!(
        kos,
        vec![format!(
            "./lib/modules/{}/updates/dkms/kiln_hello.ko",
            f.kver
        )]
    );
    let x = d.join("x");
    sh(&format!(
        "mkdir {x} && dpkg-deb -x '{}' {x}",
        debs[0].display(),
        x = x.display()
    ));
    let ko = x.join(&kos[0][2..]);
    let info = sh(&format!("modinfo '{}'", ko.display()));
    assert!(info.contains("patched by PATCH[0]"), "{info}");
    assert!(
        info.contains("kiln-dkms-signer"),
        "signed after stripping: {info}"
    );
    assert!(
        info.contains(&format!("vermagic:       {} ", f.kver)),
        "{info}"
    );
    let sections = sh(&format!("objdump -h '{}'", ko.display()));
    assert!(
        sections.contains(".debug_info") || !sections.contains(".debug"),
        "STRIP[0]=no keeps what the build made"
    );
    let log = std::fs::read_to_string(out.join(format!(
        "logs/{}_{}.log",
        full.display().to_string().replace('/', "_"),
        f.kver
    )))
    .unwrap();
    assert!(
        log.contains("apply patch describe.patch") && !log.contains("garbage.patch"),
        "{log}"
    );
    assert!(
        log.contains("make -j") && log.contains(&format!("KERNELRELEASE={}", f.kver)),
        "{log}"
    );
    assert!(
        !log.contains("wrong-make"),
        "MAKE_MATCH[1] wins over MAKE[0]"
    );
}

/// lttng-modules: 50-odd modules in subdirectories. Its Debian 12 version
/// does not compile against the newest 6.1 security kernel (upstream API
/// drift), so this builds for the oldest 6.1 ABI apt offers, with headers
/// fetched from Debian into the work root (the no-headers-on-host path).
#[test]
fn lttng_modules_come_out_complete() {
    let kver = sh("apt-cache search --names-only '^linux-headers-6\\.1\\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | head -1")
        .trim()
        .trim_start_matches("linux-headers-")
        .to_string();
    assert!(kver.starts_with("6.1.0-"), "{kver}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("repo");
    let o = dkms2bin(&[
        "--dkms",
        "lttng-modules-dkms",
        "--kver",
        &kver,
        "--out-dir",
        out.to_str().unwrap(),
        "--work-dir",
        dir.path().to_str().unwrap(),
        "--do-not-remove",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let kept = t
        .lines()
        .find_map(|l| l.strip_prefix("work root kept: "))
        .unwrap();
    // Every module dkms.conf names for this kernel (as evaluated, logged
    // by kiln) is in the package, each one built in its subdirectory.
    let log =
        std::fs::read_to_string(out.join(format!("logs/lttng-modules-dkms_{kver}.log"))).unwrap();
    let named: usize = log
        .lines()
        .find_map(|l| {
            l.split("lttng-modules 2.13.9: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .expect("module count in the log");
    let built = sh(&format!(
        "find '{kept}/build' -path '*/tree/*' -name '*.ko' | wc -l"
    ))
    .trim()
    .parse::<usize>()
    .unwrap();
    let debs = debs(&out);
    assert_eq!(debs.len(), 1);
    let kos = deb_kos(&debs[0]);
    assert!(named >= 40, "{named}");
    assert_eq!(kos.len(), named, "every module dkms.conf names is packaged");
    assert!(built >= named, "{built} built, {named} named");
    assert!(
        kos.iter().any(|k| k.ends_with("/lttng-probe-sched.ko")),
        "{kos:?}"
    );
}

/// The same as a server job: built on the server, cached, deduplicated,
/// cancellable, protected like every other route, downloaded as .deb files.
#[test]
fn dkms_jobs_on_a_kiln_server() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tokens"), "ci:s3cret\n").unwrap();
    let s = Server::start(
        &d.join("srv"),
        &[
            "--api-tokens-file",
            d.join("tokens").to_str().unwrap(),
            "--drbd-dir",
            "/nonexistent",
        ],
    );
    sh(&format!(
        "cd {} && apt-get download -q acpi-call-dkms 2>/dev/null",
        d.display()
    ));
    let deb = sh(&format!("ls {}/acpi-call-dkms_*.deb", d.display()))
        .trim()
        .to_string();
    let src = dkms_src(d, "srcpkg", "", "BUILT_MODULE_NAME[0]=hello\nBUILT_MODULE_LOCATION[0]=src\nMAKE[0]=\"make -C ${kernel_source_dir} M=${dkms_tree}/srcpkg/1.0/build/src modules\"");
    let out = d.join("repo");
    let remote = |extra: &[&str]| {
        let mut args = vec![
            "--server",
            s.url("").leak(),
            "--token",
            "s3cret",
            "--dkms",
            deb.as_str(),
            src.to_str().unwrap(),
            "--kver",
            &f.kver,
            "--headers",
            f.headers.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        dkms2bin(&args)
    };
    let o = remote(&[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}\n{}", s.log());
    assert_eq!(t.matches(": job ").count(), 2, "{t}");
    let debs = debs(&out);
    assert_eq!(debs.len(), 2, "{t}");
    assert!(deb_kos(&debs[0])
        .iter()
        .any(|k| k.ends_with("acpi_call.ko")));
    assert!(std::fs::read_to_string(out.join("Packages"))
        .unwrap()
        .contains("Package: srcpkg-modules-"));
    // Again: answered from the cache, no new job.
    let o = remote(&[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(
        t.matches("cache hit").count(),
        4,
        "two rows, two progress lines: {t}"
    );

    // The routes need credentials.
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-F",
        &format!("package=@{deb}"),
        "-F",
        &format!("headers=@{}", f.headers.display()),
        &s.url(&format!("/api/v1/dkms?kernel_version={}", f.kver)),
    ]);
    assert_eq!(code, 401);

    // Cancel: a build that would hang is stopped, its processes with it.
    let slow = dkms_src(
        d,
        "slowpkg",
        "",
        "BUILT_MODULE_NAME[0]=hello\nPRE_BUILD=\"hang.sh\"",
    );
    std::fs::write(slow.join("hang.sh"), "#!/bin/sh\nexec sleep 7777\n").unwrap();
    sh(&format!(
        "chmod +x {}/hang.sh && tar -C {} -czf {}/slow.tgz .",
        slow.display(),
        slow.display(),
        d.display()
    ));
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "X-API-Token: s3cret",
        "-F",
        &format!("package=@{}/slow.tgz", d.display()),
        "-F",
        &format!("headers=@{}", f.headers.display()),
        &s.url(&format!("/api/v1/dkms?kernel_version={}", f.kver)),
    ]);
    assert_eq!(code, 202, "{}", String::from_utf8_lossy(&body));
    let id = json(&body)["job_id"].as_str().unwrap().to_string();
    let t0 = std::time::Instant::now();
    while !process_alive("sleep 7777") {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the build never started: {}",
            s.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (code, _) = curl(&[
        "-X",
        "DELETE",
        "-H",
        "X-API-Token: s3cret",
        &s.url(&format!("/api/v1/jobs/{id}")),
    ]);
    assert_eq!(code, 200);
    let t0 = std::time::Instant::now();
    loop {
        let (_, body) = curl(&[
            "-H",
            "X-API-Token: s3cret",
            &s.url(&format!("/api/v1/status/{id}")),
        ]);
        if json(&body)["status"] == "cancelled" && !process_alive("sleep 7777") {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 20,
            "not cancelled: {}",
            String::from_utf8_lossy(&body)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A kernel whose .config asks for xz modules gets `.ko.xz` files that
/// modinfo reads.
#[test]
fn modules_are_compressed_when_the_kernel_asks() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(&format!(
        "cp -a {root} {d}/root && sed -i 's/^CONFIG_MODULE_COMPRESS_NONE=y/# CONFIG_MODULE_COMPRESS_NONE is not set/; s/^# CONFIG_MODULE_COMPRESS_XZ is not set/CONFIG_MODULE_COMPRESS_XZ=y/' {d}/root/usr/src/linux-headers-{k}/.config && grep -q '^CONFIG_MODULE_COMPRESS_XZ=y' {d}/root/usr/src/linux-headers-{k}/.config",
        root = f.root.display(),
        d = d.display(),
        k = f.kver
    ));
    let src = dkms_src(
        d,
        "xzmod",
        "",
        "BUILT_MODULE_NAME[0]=hello\nBUILT_MODULE_LOCATION[0]=src\nMAKE[0]=\"make -C ${kernel_source_dir} M=${dkms_tree}/xzmod/1.0/build/src modules\"",
    );
    let out = d.join("repo");
    let headers = d.join(format!("root/usr/src/linux-headers-{}", f.kver));
    let o = dkms2bin(&[
        "--dkms",
        src.to_str().unwrap(),
        "--kver",
        &f.kver,
        "--headers",
        headers.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let debs = debs(&out);
    let kos = deb_kos(&debs[0]);
    assert_eq!(
        kos,
        vec![format!("./lib/modules/{}/updates/dkms/hello.ko.xz", f.kver)]
    );
    let x = d.join("x");
    sh(&format!(
        "mkdir {x} && dpkg-deb -x '{}' {x}",
        debs[0].display(),
        x = x.display()
    ));
    let ko = x.join(&kos[0][2..]);
    sh(&format!("xz -t '{}'", ko.display()));
    let info = sh(&format!("modinfo '{}'", ko.display()));
    assert!(
        info.contains(&format!("vermagic:       {} ", f.kver)),
        "{info}"
    );
}
