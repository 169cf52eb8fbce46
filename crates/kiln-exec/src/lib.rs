//! The one way kiln runs other programs (make, git, tar, sign-file, bwrap).
//!
//! Rules it enforces, so that no caller has to remember them:
//! - arguments are an explicit argv; there is no shell in between;
//! - stdout and stderr are read concurrently, line by line, into a [`LogSink`];
//! - every run has a timeout;
//! - the child leads its own process group, and the whole group is killed
//!   with SIGKILL on timeout, on cancel and when the run future is dropped;
//!   the child also gets `PR_SET_PDEATHSIG` so a `kill -9` of kiln takes it
//!   down too;
//! - a failure carries the tool's name and the tail of its stderr.

// pre_exec and prctl need unsafe; the block is small and documented below.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio_util::sync::CancellationToken;

/// Which stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Where a child's output goes, one line at a time (without the newline).
pub trait LogSink: Send + Sync {
    fn line(&self, stream: Stream, line: &str);
}

/// Discards output; for probes whose output nobody reads.
#[derive(Debug, Default)]
pub struct NullSink;

impl LogSink for NullSink {
    fn line(&self, _: Stream, _: &str) {}
}

/// Keeps every line in memory; for short commands whose output is the answer
/// (`git rev-parse HEAD`).
#[derive(Debug, Default)]
pub struct CaptureSink {
    pub lines: Mutex<Vec<(Stream, String)>>,
}

impl CaptureSink {
    pub fn stdout(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (s, l) in lines.iter() {
            if *s == Stream::Stdout {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl LogSink for CaptureSink {
    fn line(&self, stream: Stream, line: &str) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((stream, line.to_string()));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("could not start {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}){}", tail_suffix(.stderr_tail))]
    Failed {
        tool: String,
        status: ExitStatus,
        stderr_tail: String,
    },
    #[error("{tool} timed out after {}s and was killed{}", .after.as_secs(), tail_suffix(.stderr_tail))]
    TimedOut {
        tool: String,
        after: Duration,
        stderr_tail: String,
    },
    #[error("{tool} was cancelled and killed")]
    Cancelled { tool: String },
    #[error("reading the output of {tool}: {source}")]
    Io {
        tool: String,
        #[source]
        source: std::io::Error,
    },
}

impl ExecError {
    pub fn stderr_tail(&self) -> &str {
        match self {
            ExecError::Failed { stderr_tail, .. } | ExecError::TimedOut { stderr_tail, .. } => {
                stderr_tail
            }
            _ => "",
        }
    }
    pub fn is_cancelled(&self) -> bool {
        matches!(self, ExecError::Cancelled { .. })
    }
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

/// A command to run. Build it with [`Cmd::new`] and the setters.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_clear: bool,
    cwd: Option<PathBuf>,
    timeout: Duration,
    tail_lines: usize,
    /// The name errors use; a wrapped command keeps its inner tool's name.
    label: Option<String>,
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Cmd {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_clear: false,
            cwd: None,
            timeout: Duration::from_secs(600),
            tail_lines: 20,
            label: None,
        }
    }
    pub fn arg(mut self, a: impl Into<OsString>) -> Cmd {
        self.args.push(a.into());
        self
    }
    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Cmd {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Start from an empty environment (plus what [`Cmd::env`] adds).
    pub fn env_clear(mut self) -> Cmd {
        self.env_clear = true;
        self
    }
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Cmd {
        self.cwd = Some(dir.into());
        self
    }
    pub fn timeout(mut self, t: Duration) -> Cmd {
        self.timeout = t;
        self
    }
    /// Run this command under a wrapper such as `bwrap ... --`: the
    /// wrapper's argv comes first; environment, cwd and timeout are kept.
    pub fn wrapped<I, S>(mut self, wrapper: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut argv: Vec<OsString> = wrapper.into_iter().map(Into::into).collect();
        if argv.is_empty() {
            return self;
        }
        let program = argv.remove(0);
        self.label = Some(self.tool());
        argv.push(std::mem::replace(&mut self.program, program));
        argv.append(&mut self.args);
        self.args = argv;
        self
    }
    /// The program's name as shown in errors and logs.
    pub fn tool(&self) -> String {
        if let Some(l) = &self.label {
            return l.clone();
        }
        std::path::Path::new(&self.program)
            .file_name()
            .unwrap_or(self.program.as_os_str())
            .to_string_lossy()
            .into_owned()
    }
    /// The command line, for logs. Not for execution.
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// Run to completion. Ok only when the program exits 0.
    pub async fn run(
        &self,
        sink: Arc<dyn LogSink>,
        cancel: &CancellationToken,
    ) -> Result<(), ExecError> {
        let tool = self.tool();
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if self.env_clear {
            cmd.env_clear();
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // memory of the parent; it only asks the kernel to SIGKILL the child
        // when kiln dies, so a kill -9 of the daemon leaves no build behind.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
            tool: tool.clone(),
            source,
        })?;
        let pgid = child.id().map(|p| Pid::from_raw(p as i32));
        // Kills the group if this future is dropped before the child is reaped.
        let mut guard = GroupGuard { pgid };
        tracing::debug!(tool = %tool, pid = ?pgid, cmd = %self.display(), "spawned");

        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(self.tail_lines)));
        let out = pump(
            child.stdout.take(),
            Stream::Stdout,
            sink.clone(),
            None,
            self.tail_lines,
        );
        let err = pump(
            child.stderr.take(),
            Stream::Stderr,
            sink,
            Some(tail.clone()),
            self.tail_lines,
        );
        let readers = async { tokio::try_join!(out, err) };
        let waited = async {
            let r = readers.await;
            let st = child.wait().await;
            (r, st)
        };
        let tail_text = |t: &Arc<Mutex<VecDeque<String>>>| {
            let t = t.lock().unwrap_or_else(|e| e.into_inner());
            t.iter().cloned().collect::<Vec<_>>().join("\n")
        };
        tokio::select! {
            (r, st) = waited => {
                guard.kill();
                r.map_err(|source| ExecError::Io { tool: tool.clone(), source })?;
                let status = st.map_err(|source| ExecError::Io { tool: tool.clone(), source })?;
                if status.success() {
                    Ok(())
                } else {
                    Err(ExecError::Failed { tool, status, stderr_tail: tail_text(&tail) })
                }
            }
            _ = tokio::time::sleep(self.timeout) => {
                guard.kill();
                tracing::warn!(tool = %tool, timeout_s = self.timeout.as_secs(), "timed out; killed process group");
                Err(ExecError::TimedOut { tool, after: self.timeout, stderr_tail: tail_text(&tail) })
            }
            _ = cancel.cancelled() => {
                guard.kill();
                tracing::info!(tool = %tool, "cancelled; killed process group");
                Err(ExecError::Cancelled { tool })
            }
        }
    }
}

struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // ESRCH (group already gone) is the normal case after a clean exit.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn pump<R: AsyncRead + Unpin>(
    r: Option<R>,
    stream: Stream,
    sink: Arc<dyn LogSink>,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    tail_lines: usize,
) -> std::io::Result<()> {
    let Some(r) = r else { return Ok(()) };
    let mut r = BufReader::new(r);
    let mut buf = Vec::with_capacity(256);
    let emit = |buf: &mut Vec<u8>| {
        let line = String::from_utf8_lossy(buf);
        sink.line(stream, &line);
        if let Some(t) = &tail {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() == tail_lines {
                t.pop_front();
            }
            t.push_back(line.chars().take(500).collect());
        }
        buf.clear();
    };
    // Lines end at `\n` or at a lone `\r`: progress meters (`qemu-img -p`)
    // redraw one line with `\r`, and each redraw is a line to the sink.
    let mut after_cr = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            if !buf.is_empty() {
                emit(&mut buf);
            }
            return Ok(());
        }
        let n = chunk.len();
        for &b in chunk {
            match b {
                b'\n' if after_cr => after_cr = false,
                b'\n' | b'\r' => {
                    after_cr = b == b'\r';
                    emit(&mut buf);
                }
                _ => {
                    after_cr = false;
                    buf.push(b);
                    if buf.len() >= 64 << 10 {
                        emit(&mut buf);
                    }
                }
            }
        }
        r.consume(n);
    }
}

/// Is `program` on PATH?
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn captures_both_streams_and_stderr_tail() {
        let sink = Arc::new(CaptureSink::default());
        let err = Cmd::new("bash")
            .args(["-c", "echo out; echo err1 >&2; echo err2 >&2; exit 3"])
            .run(sink.clone(), &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(sink.stdout(), "out\n");
        match err {
            ExecError::Failed {
                stderr_tail,
                status,
                tool,
            } => {
                assert_eq!(tool, "bash");
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr_tail, "err1\nerr2");
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn carriage_returns_end_lines_like_newlines() {
        let sink = Arc::new(CaptureSink::default());
        Cmd::new("printf")
            .arg("a\\r(1/100%%)\\r(50/100%%)\\r\\nb\\r\\nc")
            .run(sink.clone(), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(sink.stdout(), "a\n(1/100%)\n(50/100%)\nb\nc\n");
    }

    /// Alive and not a zombie (a killed orphan may wait a while for its reaper).
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !s
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    async fn grandchild_pid(dir: &std::path::Path) -> i32 {
        let f = dir.join("pid");
        for _ in 0..200 {
            if let Ok(s) = std::fs::read_to_string(&f) {
                if let Ok(p) = s.trim().parse() {
                    return p;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("grandchild never wrote its pid");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidf = dir.path().join("pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidf.display());
        let t = Instant::now();
        let cmd = Cmd::new("bash")
            .args(["-c", &script])
            .timeout(Duration::from_millis(500));
        let run =
            tokio::spawn(
                async move { cmd.run(Arc::new(NullSink), &CancellationToken::new()).await },
            );
        let gc = grandchild_pid(dir.path()).await;
        let err = run.await.unwrap().unwrap_err();
        assert!(matches!(err, ExecError::TimedOut { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!alive(gc), "grandchild {gc} survived the timeout");
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidf = dir.path().join("pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidf.display());
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let run = tokio::spawn(async move {
            Cmd::new("bash")
                .args(["-c", &script])
                .run(Arc::new(NullSink), &c2)
                .await
        });
        let gc = grandchild_pid(dir.path()).await;
        assert!(alive(gc));
        cancel.cancel();
        let err = run.await.unwrap().unwrap_err();
        assert!(err.is_cancelled());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!alive(gc), "grandchild {gc} survived cancel");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = Cmd::new("/nonexistent/kiln-tool")
            .run(Arc::new(NullSink), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("could not start kiln-tool"),
            "{err}"
        );
    }
}
