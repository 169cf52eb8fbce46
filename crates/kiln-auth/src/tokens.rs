//! The API token file, in the seed's format plus hashed entries:
//!
//! ```text
//! # comment
//! name:token                 # the seed's line: a secret in clear
//! name:sha256:<64 hex>       # the SHA-256 of the secret; the file no longer holds it
//! name:token read            # optional scopes after whitespace: read,write,admin
//! ```
//!
//! Every presented token is hashed once and compared against every entry in
//! constant time, so neither the match nor its position leaks through timing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::{ConfigError, Scopes};

#[derive(Clone)]
pub enum Secret {
    /// The secret itself: usable for bearer tokens and HMAC signatures.
    Clear(Vec<u8>),
    /// Only its SHA-256: bearer tokens only.
    Hashed,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Clear(_) => "Clear(..)",
            Secret::Hashed => "Hashed",
        })
    }
}

#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub name: String,
    pub secret: Secret,
    digest: [u8; 32],
    /// Scopes written on the line, if any.
    pub scopes: Option<Scopes>,
}

#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
    by_name: HashMap<String, usize>,
}

pub(crate) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Tokens::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Tokens, ConfigError> {
        let err = |line: usize, message: String| ConfigError::Syntax {
            path: PathBuf::from(path),
            line,
            message,
        };
        let mut t = Tokens::default();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (cred, scopes) = match line.split_once(char::is_whitespace) {
                Some((c, rest)) => (c, Some(rest.trim())),
                None => (line, None),
            };
            let (name, secret) = cred
                .split_once(':')
                .ok_or_else(|| err(n, "want name:token or name:sha256:<hex>".into()))?;
            if !valid_name(name) {
                return Err(err(
                    n,
                    format!("invalid name {name:?}: letters, digits, . _ @ - only"),
                ));
            }
            if secret.is_empty() {
                return Err(err(n, format!("empty token for {name:?}")));
            }
            let (secret, digest) = match secret.strip_prefix("sha256:") {
                Some(h) => {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(h, &mut d)
                        .map_err(|_| err(n, format!("{name:?}: sha256: needs 64 hex digits")))?;
                    (Secret::Hashed, d)
                }
                None => (
                    Secret::Clear(secret.as_bytes().to_vec()),
                    Sha256::digest(secret.as_bytes()).into(),
                ),
            };
            let scopes = match scopes {
                Some(s) => Some(s.parse().map_err(|e| err(n, format!("{e}")))?),
                None => None,
            };
            if t.by_name.contains_key(name) {
                return Err(err(n, format!("{name:?} is listed twice")));
            }
            t.by_name.insert(name.to_string(), t.entries.len());
            t.entries.push(TokenEntry {
                name: name.to_string(),
                secret,
                digest,
                scopes,
            });
        }
        Ok(t)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&TokenEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    /// The entry whose secret is `presented`, checked against every entry
    /// in constant time.
    pub fn find(&self, presented: &[u8]) -> Option<&TokenEntry> {
        let h: [u8; 32] = Sha256::digest(presented).into();
        let mut found = u32::MAX;
        for (i, e) in self.entries.iter().enumerate() {
            let eq = e.digest.ct_eq(&h);
            found = u32::conditional_select(&found, &(i as u32), eq);
        }
        self.entries.get(found as usize)
    }
}
