//! Who is calling, and what may they do. This crate turns credentials
//! (bearer tokens, KILN-HMAC-SHA256 signatures, verified client-certificate
//! subjects) into an [`Identity`] with [`Scopes`]. It knows nothing of HTTP or
//! sockets: kiln-api extracts the headers and the TLS peer, this crate decides.
//!
//! Secrets are compared in constant time, a failed check never says which
//! part failed, and there is no built-in or fallback credential.

mod cert;
mod replay;
mod scope;
mod sign;
mod tokens;

use std::collections::HashMap;

pub use cert::cert_identity;
pub use replay::ReplayCache;
pub use scope::{Scope, Scopes};
pub use sign::{body_sha256_hex, sign, string_to_sign, HmacParams, BODY_HEADER, SCHEME};
pub use tokens::{Secret, TokenEntry, Tokens};

/// Errors loading auth configuration (token file, grants).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the API token file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: std::path::PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid scope {0:?}: one of read, write, admin")]
    Scope(String),
    #[error("invalid grant {0:?}: want NAME=SCOPE[,SCOPE...]")]
    Grant(String),
}

/// Why a request was refused. The [`Display`](std::fmt::Display) text is
/// safe to send to the caller: it never says why a secret did not match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("authentication required: send a bearer token, a KILN-HMAC-SHA256 signature or a client certificate")]
    Missing,
    #[error("invalid credentials")]
    Invalid,
    #[error("malformed KILN-HMAC-SHA256 authorization: {0}")]
    Malformed(&'static str),
    #[error("request timestamp is outside the allowed window of ±{0} s; check the client's clock")]
    Skew(i64),
    #[error("replayed request: this signature was already used")]
    Replay,
    #[error("this server accepts only client certificates (--client-auth required)")]
    CertificateRequired,
    #[error("too many signed requests in flight; retry shortly")]
    Busy,
    #[error("the body does not match the signed {BODY_HEADER}")]
    BodyMismatch,
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No auth configured: everyone is anonymous with every scope.
    Open,
    Token,
    Hmac,
    Certificate,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Open => "open",
            AuthMethod::Token => "token",
            AuthMethod::Hmac => "hmac",
            AuthMethod::Certificate => "certificate",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub method: AuthMethod,
    pub scopes: Scopes,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            name: "anonymous".into(),
            method: AuthMethod::Open,
            scopes: Scopes::ALL,
        }
    }
}

/// Validated auth settings, built once at start.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub tokens: Option<Tokens>,
    /// Client certificates are verified by the TLS layer against a CA.
    pub client_certs: bool,
    /// Only certificates are accepted; tokens and signatures are refused.
    pub certs_only: bool,
    /// Scopes per identity name (token name or certificate subject).
    pub grants: HashMap<String, Scopes>,
    /// Scopes of an identity with no grant and no scopes in the token file.
    pub default_scopes: Scopes,
    /// Allowed clock skew for signed requests, in seconds.
    pub skew_secs: i64,
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        self.tokens.is_some() || self.client_certs
    }
}

/// Parse `NAME=read,write` as given to `--grant`.
pub fn parse_grant(s: &str) -> Result<(String, Scopes), ConfigError> {
    let (name, scopes) = s
        .split_once('=')
        .filter(|(n, _)| tokens::valid_name(n))
        .ok_or_else(|| ConfigError::Grant(s.to_string()))?;
    Ok((name.to_string(), scopes.parse()?))
}

#[derive(Debug)]
pub struct Authenticator {
    cfg: AuthConfig,
    replay: ReplayCache,
}

impl Authenticator {
    pub fn new(cfg: AuthConfig) -> Authenticator {
        let window = 2 * cfg.skew_secs;
        Authenticator {
            cfg,
            replay: ReplayCache::new(window, 1_000_000),
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled()
    }

    fn scopes_for(&self, name: &str, listed: Option<Scopes>) -> Scopes {
        listed
            .or_else(|| self.cfg.grants.get(name).copied())
            .unwrap_or(self.cfg.default_scopes)
    }

    /// A subject the TLS layer has already verified against the client CA.
    pub fn certificate(&self, subject: &str) -> Identity {
        Identity {
            name: subject.to_string(),
            method: AuthMethod::Certificate,
            scopes: self.scopes_for(subject, None),
        }
    }

    fn tokens(&self) -> Result<&Tokens, Denied> {
        if self.cfg.certs_only {
            return Err(Denied::CertificateRequired);
        }
        self.cfg.tokens.as_ref().ok_or(Denied::Invalid)
    }

    /// `Authorization: Bearer <token>` or `X-API-Token: <token>`.
    pub fn bearer(&self, presented: &str) -> Result<Identity, Denied> {
        let entry = self
            .tokens()?
            .find(presented.as_bytes())
            .ok_or(Denied::Invalid)?;
        Ok(Identity {
            name: entry.name.clone(),
            method: AuthMethod::Token,
            scopes: self.scopes_for(&entry.name, entry.scopes),
        })
    }

    /// Verify a signed request. `body_sha256` is the lowercase hex SHA-256
    /// of the body the signature claims; the caller must make sure the body
    /// it passes on really has that digest.
    pub fn hmac(
        &self,
        p: &HmacParams,
        method: &str,
        path_and_query: &str,
        body_sha256: &str,
        now_unix: i64,
    ) -> Result<Identity, Denied> {
        let tokens = self.tokens()?;
        if (p.timestamp - now_unix).abs() > self.cfg.skew_secs {
            return Err(Denied::Skew(self.cfg.skew_secs));
        }
        // A hashed entry cannot verify a signature: the server does not hold
        // the secret. Refused exactly like a wrong signature.
        let entry = tokens.get(&p.credential).ok_or(Denied::Invalid)?;
        let Secret::Clear(secret) = &entry.secret else {
            return Err(Denied::Invalid);
        };
        let msg = string_to_sign(
            &p.credential,
            p.timestamp,
            &p.nonce,
            method,
            path_and_query,
            body_sha256,
        );
        if !sign::verify(secret, &msg, &p.signature) {
            return Err(Denied::Invalid);
        }
        // Only a valid signature is remembered, so forgeries cannot fill the cache.
        self.replay.insert(&p.signature, p.timestamp, now_unix)?;
        Ok(Identity {
            name: entry.name.clone(),
            method: AuthMethod::Hmac,
            scopes: self.scopes_for(&entry.name, entry.scopes),
        })
    }
}

#[cfg(test)]
mod tests;
