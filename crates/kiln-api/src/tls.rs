//! Serving: plain HTTP, or HTTPS only (rustls) with optional client
//! certificates. The certificate, key and client CA are reloaded without a
//! restart, on [`Tls::reload`] (kiln wires SIGHUP to it) or when the files
//! change; a reload that fails keeps the previous, working configuration.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::middleware::AddExtension;
use axum::Router;
use axum_server::accept::{Accept, NoDelayAcceptor};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use futures::future::BoxFuture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest as _, Sha256};
use tower::Layer;

use crate::auth::Peer;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} holds no certificate")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Verify client certificates against this CA bundle.
    pub client_ca: Option<PathBuf>,
}

type Stamp = Vec<Option<(std::time::SystemTime, u64, u64)>>;

/// A live TLS configuration that can be swapped under a running server.
#[derive(Debug, Clone)]
pub struct Tls {
    settings: Arc<TlsSettings>,
    config: RustlsConfig,
    /// The files' (mtime, size, inode) when last loaded or last refused.
    seen: Arc<Mutex<Stamp>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            what,
            path: path.into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.into(),
        });
    }
    Ok(certs)
}

fn build(s: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs("certificate", &s.cert)?;
    let key = PrivateKeyDer::from_pem_file(&s.key).map_err(|e| TlsError::Pem {
        what: "private key",
        path: s.key.clone(),
        message: e.to_string(),
    })?;
    let rust = |e: rustls::Error| TlsError::Rustls(e.to_string());
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rust)?;
    let builder = match &s.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs("client CA", ca)? {
                roots.add(c).map_err(rust)?;
            }
            // Presented certificates are always verified (a bad one fails the
            // handshake); whether one is required is decided per route, so
            // health probes keep working without one.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(chain, key).map_err(rust)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn stamp(s: &TlsSettings) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [Some(&s.cert), Some(&s.key), s.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(std::time::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

impl Tls {
    pub fn load(settings: TlsSettings) -> Result<Tls, TlsError> {
        let seen = stamp(&settings);
        let cfg = build(&settings)?;
        Ok(Tls {
            settings: Arc::new(settings),
            config: RustlsConfig::from_config(cfg),
            seen: Arc::new(Mutex::new(seen)),
        })
    }

    pub fn client_certs(&self) -> bool {
        self.settings.client_ca.is_some()
    }

    /// Load the files again and swap them in for new connections.
    pub fn reload(&self, reason: &str) -> Result<(), TlsError> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp(&self.settings);
        match build(&self.settings) {
            Ok(cfg) => {
                self.config.reload_from_config(cfg);
                tracing::info!(reason, cert = %self.settings.cert.display(), "TLS configuration reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(reason, error = %e, "TLS reload failed; still serving the previous certificate");
                Err(e)
            }
        }
    }

    /// Poll the files every `every` and reload when one changes.
    pub fn watch(&self, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = stamp(&me.settings);
                let changed = *me.seen.lock().unwrap_or_else(|e| e.into_inner()) != now;
                if changed {
                    let _ = me.reload("files changed");
                }
            }
        });
    }
}

/// Runs the TLS handshake, then tags the connection's requests with the
/// identity of the verified client certificate, if one was presented.
#[derive(Debug, Clone)]
struct PeerAcceptor {
    inner: RustlsAcceptor<NoDelayAcceptor>,
}

impl<S> Accept<tokio::net::TcpStream, S> for PeerAcceptor
where
    S: Send + 'static,
{
    type Stream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Service = AddExtension<S, Peer>;
    type Future = BoxFuture<'static, io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (stream, service) = inner.accept(stream, service).await?;
            let cert_subject = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|leaf| {
                    kiln_auth::cert_identity(leaf).unwrap_or_else(|| {
                        // A verified certificate with no usable name is
                        // known by its fingerprint.
                        format!("cert-sha256:{}", hex::encode(Sha256::digest(leaf)))
                    })
                })
                .map(Arc::from);
            Ok((
                stream,
                axum::Extension(Peer { cert_subject }).layer(service),
            ))
        })
    }
}

/// Serve `app` until `handle` is shut down: HTTPS only when `tls` is given.
pub async fn serve(
    app: Router,
    addr: SocketAddr,
    tls: Option<Tls>,
    handle: axum_server::Handle,
) -> io::Result<()> {
    let svc = app.into_make_service();
    match tls {
        Some(tls) => {
            let acceptor = PeerAcceptor {
                inner: RustlsAcceptor::new(tls.config.clone()).acceptor(NoDelayAcceptor),
            };
            axum_server::bind(addr)
                .acceptor(acceptor)
                .handle(handle)
                .serve(svc)
                .await
        }
        // TCP_NODELAY: a response's headers and body leave at once instead of
        // waiting on the client's delayed ACK (40 ms per small answer).
        None => {
            axum_server::bind(addr)
                .acceptor(NoDelayAcceptor)
                .handle(handle)
                .serve(svc)
                .await
        }
    }
}
