//! Build isolation. Module builds run code from the upload (the tree's
//! `scripts/` binaries) and from the module source, so they get no network,
//! a read-only view of the host, a hidden `/usr/src` (so a build can never
//! lean on the host's own headers), and write access only to the job's work
//! directory. bubblewrap does this when it works here; otherwise kiln falls
//! back to `unshare --net`, and otherwise runs unsandboxed and says so.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use kiln_exec::{Cmd, NullSink};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    Bwrap,
    UnshareNet,
    None,
}

impl Sandbox {
    /// Probe what this machine allows.
    pub async fn detect() -> Sandbox {
        async fn probe(c: Cmd) -> bool {
            c.timeout(std::time::Duration::from_secs(10))
                .run(Arc::new(NullSink), &Default::default())
                .await
                .is_ok()
        }
        // Probe with exactly the arguments builds will use.
        let tmp = std::env::temp_dir();
        if kiln_exec::which("bwrap").is_some()
            && probe(Sandbox::Bwrap.wrap(Cmd::new("true"), &tmp, &tmp, false)).await
        {
            return Sandbox::Bwrap;
        }
        if kiln_exec::which("unshare").is_some()
            && probe(Cmd::new("unshare").args(["--net", "true"])).await
        {
            return Sandbox::UnshareNet;
        }
        Sandbox::None
    }

    pub fn describe(self) -> &'static str {
        match self {
            Sandbox::Bwrap => {
                "bubblewrap: no network, read-only host, hidden /usr/src, writable work dir only"
            }
            Sandbox::UnshareNet => "unshare --net: no network, but the host filesystem is visible",
            Sandbox::None => "none: builds run with the daemon's full view of the host",
        }
    }

    /// Wrap `cmd` to run in `cwd` inside the sandbox, writable only in `work`.
    pub fn wrap(self, cmd: Cmd, work: &Path, cwd: &Path, network: bool) -> Cmd {
        self.wrap_with(cmd, work, cwd, network, &[])
    }

    /// [`wrap`](Self::wrap), with host directories that stay visible
    /// (read-only) even where the sandbox hides them, for builds against
    /// headers installed on the host (dkms2bin).
    pub fn wrap_with(
        self,
        cmd: Cmd,
        work: &Path,
        cwd: &Path,
        network: bool,
        visible: &[std::path::PathBuf],
    ) -> Cmd {
        let mut w: Vec<OsString> = Vec::new();
        match self {
            Sandbox::Bwrap => {
                w.extend(
                    [
                        "bwrap",
                        "--ro-bind",
                        "/",
                        "/",
                        "--dev",
                        "/dev",
                        "--proc",
                        "/proc",
                        "--tmpfs",
                        "/tmp",
                    ]
                    .map(OsString::from),
                );
                for hidden in ["/usr/src", "/lib/modules", "/usr/lib/modules"] {
                    if Path::new(hidden).is_dir() {
                        w.extend(["--tmpfs", hidden].map(OsString::from));
                    }
                }
                for v in visible.iter().filter(|v| v.is_dir()) {
                    w.extend(["--ro-bind".into(), v.into(), v.into()]);
                }
                w.extend(["--bind".into(), work.into(), work.into()]);
                if !network {
                    w.push("--unshare-net".into());
                }
                w.extend(
                    [
                        "--unshare-pid",
                        "--unshare-ipc",
                        "--unshare-uts",
                        "--die-with-parent",
                        "--chdir",
                    ]
                    .map(OsString::from),
                );
                w.push(cwd.into());
                w.push("--".into());
            }
            Sandbox::UnshareNet if !network => {
                w.extend(["unshare", "--net", "--"].map(OsString::from));
            }
            _ => {}
        }
        cmd.cwd(cwd).wrapped(w)
    }
}
