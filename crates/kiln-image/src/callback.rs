//! Build status callbacks: the seed's body (`{id, status, building, type}`)
//! plus the image and its digest, POSTed with the caller's `authorization`
//! as given and an `X-Kiln-Signature: sha256=<hex>` HMAC of the body when a
//! secret is configured. Each build has one queue and one delivery task, so
//! status changes arrive in order; each is retried with backoff before the
//! next is sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::Mac;
use tokio::sync::mpsc;

/// One status change to deliver.
#[derive(Debug, Clone)]
pub struct Message {
    pub url: String,
    pub authorization: Option<String>,
    pub body: serde_json::Value,
    /// The last message of this build: its queue closes after it.
    pub last: bool,
}

#[derive(Debug)]
pub struct Callbacks {
    client: reqwest::Client,
    secret: Option<Vec<u8>>,
    attempts: u32,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Message>>>,
}

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

impl Callbacks {
    pub fn new(client: reqwest::Client, secret: Option<Vec<u8>>, attempts: u32) -> Callbacks {
        Callbacks {
            client,
            secret,
            attempts: attempts.max(1),
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Queue `m` behind the build's earlier messages.
    pub fn send(self: &Arc<Self>, build: &str, m: Message) {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let last = m.last;
        let tx = q.entry(build.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let me = self.clone();
            tokio::spawn(async move { me.deliver_all(rx).await });
            tx
        });
        let _ = tx.send(m);
        if last {
            q.remove(build);
        }
    }

    async fn deliver_all(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Message>) {
        while let Some(m) = rx.recv().await {
            self.deliver(&m).await;
        }
    }

    async fn deliver(&self, m: &Message) {
        let body = m.body.to_string();
        for attempt in 1..=self.attempts {
            let mut req = self
                .client
                .post(&m.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("x-kiln-delivery-attempt", attempt.to_string())
                .body(body.clone());
            if let Some(a) = &m.authorization {
                req = req.header(reqwest::header::AUTHORIZATION, a);
            }
            if let Some(s) = &self.secret {
                req = req.header("x-kiln-signature", signature(s, body.as_bytes()));
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::debug!(url = %m.url, status = %m.body["status"], attempt, "callback delivered");
                    return;
                }
                Ok(r) => {
                    tracing::warn!(url = %m.url, code = r.status().as_u16(), attempt, "callback refused")
                }
                Err(e) => tracing::warn!(url = %m.url, error = %e, attempt, "callback failed"),
            }
            if attempt < self.attempts {
                let wait = Duration::from_millis(250u64 << (attempt - 1).min(7))
                    .min(Duration::from_secs(30));
                tokio::time::sleep(wait).await;
            }
        }
        tracing::error!(url = %m.url, status = %m.body["status"], attempts = self.attempts, "callback given up");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_are_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
