//! KILN-HMAC-SHA256 request signing, shared by the server (verify) and the
//! CLI (sign) so the two can never disagree. The scheme is documented in
//! README.md ("Request signing"); in short:
//!
//! ```text
//! Authorization: KILN-HMAC-SHA256 Credential=<name>, Timestamp=<unix>, Nonce=<nonce>, Signature=<hex>
//! X-Kiln-Content-SHA256: <hex SHA-256 of the body>          (required for bodies over 1 MiB)
//!
//! string to sign = "KILN-HMAC-SHA256\n" name "\n" timestamp "\n" nonce "\n"
//!                  METHOD "\n" path?query "\n" hex(sha256(body))
//! Signature      = hex(HMAC-SHA256(key = token, string to sign))
//! ```

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use crate::Denied;

pub const SCHEME: &str = "KILN-HMAC-SHA256";
/// The header carrying the body's SHA-256, so large bodies can stream.
pub const BODY_HEADER: &str = "x-kiln-content-sha256";

type HmacSha256 = Hmac<Sha256>;

pub fn body_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

pub fn string_to_sign(
    name: &str,
    timestamp: i64,
    nonce: &str,
    method: &str,
    path_and_query: &str,
    body_sha256: &str,
) -> String {
    format!("{SCHEME}\n{name}\n{timestamp}\n{nonce}\n{method}\n{path_and_query}\n{body_sha256}")
}

/// The `Authorization` header value for a request.
pub fn sign(
    name: &str,
    secret: &[u8],
    timestamp: i64,
    nonce: &str,
    method: &str,
    path_and_query: &str,
    body_sha256: &str,
) -> String {
    let msg = string_to_sign(name, timestamp, nonce, method, path_and_query, body_sha256);
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(msg.as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    format!("{SCHEME} Credential={name}, Timestamp={timestamp}, Nonce={nonce}, Signature={sig}")
}

pub(crate) fn verify(secret: &[u8], msg: &str, sig: &[u8; 32]) -> bool {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(msg.as_bytes());
    mac.verify_slice(sig).is_ok()
}

/// The parameters of a `KILN-HMAC-SHA256` authorization header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HmacParams {
    pub credential: String,
    pub timestamp: i64,
    pub nonce: String,
    pub signature: [u8; 32],
}

impl HmacParams {
    /// Parse what follows the scheme name.
    pub fn parse(params: &str) -> Result<HmacParams, Denied> {
        let (mut cred, mut ts, mut nonce, mut sig) = (None, None, None, None);
        for part in params.split(',') {
            let (k, v) = part.trim().split_once('=').ok_or(Denied::Malformed(
                "want Key=Value pairs separated by commas",
            ))?;
            let slot = match k {
                "Credential" => &mut cred,
                "Timestamp" => &mut ts,
                "Nonce" => &mut nonce,
                "Signature" => &mut sig,
                _ => return Err(Denied::Malformed("unknown parameter")),
            };
            if slot.replace(v).is_some() {
                return Err(Denied::Malformed("a parameter is repeated"));
            }
        }
        let credential = cred.ok_or(Denied::Malformed("Credential is missing"))?;
        let timestamp = ts
            .ok_or(Denied::Malformed("Timestamp is missing"))?
            .parse::<i64>()
            .map_err(|_| Denied::Malformed("Timestamp must be Unix seconds"))?;
        let nonce = nonce.unwrap_or("");
        if nonce.len() > 64
            || !nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Denied::Malformed(
                "Nonce must be at most 64 of [A-Za-z0-9_-]",
            ));
        }
        let mut signature = [0u8; 32];
        hex::decode_to_slice(
            sig.ok_or(Denied::Malformed("Signature is missing"))?,
            &mut signature,
        )
        .map_err(|_| Denied::Malformed("Signature must be 64 hex digits"))?;
        Ok(HmacParams {
            credential: credential.to_string(),
            timestamp,
            nonce: nonce.to_string(),
            signature,
        })
    }
}
