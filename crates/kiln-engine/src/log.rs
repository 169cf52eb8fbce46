//! Job logs: one append-only file per job, so a log outlives the process and
//! can be followed live by any number of readers.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use kiln_exec::{LogSink, Stream as Out};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

#[derive(Debug)]
pub struct JobLog {
    file: Mutex<Option<File>>,
    path: PathBuf,
    opened: std::time::Instant,
}

impl JobLog {
    pub fn open(path: &Path) -> JobLog {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| tracing::warn!(path = %path.display(), error = %e, "cannot open job log"))
            .ok();
        JobLog {
            file: Mutex::new(file),
            path: path.to_path_buf(),
            opened: std::time::Instant::now(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, prefix: &str, line: &str) {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = f.as_mut() {
            let _ = writeln!(f, "{prefix}{line}");
        }
    }

    /// A line from kiln itself (not from a tool), stamped with the time
    /// since this attempt started.
    pub fn info(&self, line: &str) {
        let t = self.opened.elapsed().as_secs_f64();
        self.write(&format!("[kiln +{t:.3}s] "), line);
    }

    /// The last `n` lines, for error reports.
    pub fn tail(path: &Path, n: usize) -> String {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl LogSink for JobLog {
    fn line(&self, stream: Out, line: &str) {
        // Both streams interleave in one log, in arrival order, as a
        // terminal would show them.
        let _ = stream;
        self.write("", line);
    }
}

/// Stream a log file's bytes from the start, then whatever is appended,
/// until `done()` says the writer finished and everything has been read.
/// "Done" is checked *before* each read, so nothing written before the job
/// finished is missed. Yields empty chunks while waiting; callers skip them.
pub fn follow_log(
    path: PathBuf,
    done: Arc<dyn Fn() -> bool + Send + Sync>,
) -> impl Stream<Item = std::io::Result<Vec<u8>>> {
    struct St {
        path: PathBuf,
        file: Option<tokio::fs::File>,
        pos: u64,
        done: Arc<dyn Fn() -> bool + Send + Sync>,
    }
    let st = St {
        path,
        file: None,
        pos: 0,
        done,
    };
    futures::stream::unfold(Some(st), |st| async move {
        let mut st = st?;
        let finished = (st.done)();
        if st.file.is_none() {
            match tokio::fs::File::open(&st.path).await {
                Ok(f) => st.file = Some(f),
                Err(_) if finished => return None,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Some((Ok(Vec::new()), Some(st)));
                }
            }
        }
        let f = st.file.as_mut()?;
        let mut buf = vec![0u8; 64 * 1024];
        let read = async {
            f.seek(std::io::SeekFrom::Start(st.pos)).await?;
            f.read(&mut buf).await
        };
        match read.await {
            Ok(0) if finished => None,
            Ok(0) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((Ok(Vec::new()), Some(st)))
            }
            Ok(n) => {
                buf.truncate(n);
                st.pos += n as u64;
                Some((Ok(buf), Some(st)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}
