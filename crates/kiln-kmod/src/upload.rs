//! Extracting headers while they are still arriving. A request for a kernel
//! version with no kept tree will need the tree built, so its body is fed
//! to the extraction as it is received (besides being stored and hashed):
//! the tree is ready about when the last byte is, not a whole pass later.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use kiln_archive::{Limits, TreeSummary};
use kiln_core::KernelVersion;
use tokio::sync::mpsc;

use crate::trees::{HeaderTrees, Staging};
use crate::{KmodError, TreesError};

/// An extraction fed by the request body. Dropped before
/// [`finish`](Self::finish), it stops and leaves nothing behind.
#[derive(Debug)]
pub struct StreamingStage {
    tx: Option<mpsc::Sender<Bytes>>,
    done: tokio::task::JoinHandle<Result<TreeSummary, TreesError>>,
}

impl StreamingStage {
    /// Start extracting for `kver`, if this request may (see
    /// [`HeaderTrees::claim`]).
    pub(crate) fn start(
        trees: &Arc<HeaderTrees>,
        kver: &KernelVersion,
        limits: Limits,
    ) -> Option<StreamingStage> {
        let claim: Staging = trees.claim(kver)?;
        // Bounded: a slow disk slows the upload instead of filling memory.
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let (trees, kver) = (trees.clone(), kver.clone());
        let done = tokio::task::spawn_blocking(move || {
            let _claim = claim;
            let body = ChannelReader {
                rx,
                cur: Bytes::new(),
            };
            trees.stage_from(body, &kver, limits).map(|(s, _)| s)
        });
        Some(StreamingStage { tx: Some(tx), done })
    }

    /// Hand the extraction the next piece of the body. False once it has
    /// stopped (on an error, which [`finish`](Self::finish) reports).
    pub async fn feed(&mut self, chunk: Bytes) -> bool {
        match &self.tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        }
    }

    /// The body is complete: wait for the extraction and return what it
    /// found (the tree is then kept).
    pub async fn finish(mut self) -> Result<TreeSummary, KmodError> {
        self.tx = None;
        (&mut self.done)
            .await
            .map_err(|e| KmodError::Join(e.to_string()))?
            .map_err(KmodError::from)
    }
}

/// The body as a `Read` for the extraction thread; EOF when the sender is
/// dropped.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}
