//! Data tokens: self-verifying, expiring capabilities for one block of one
//! snapshot. `v1.<snapshot hex>.<block>.<expiry unix>.<HMAC-SHA256 hex>`;
//! nothing is stored per token, a forged or altered one fails the HMAC, an
//! expired one fails the clock, and one issued for another snapshot fails
//! the comparison the server makes with the snapshot asked for.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataToken {
    /// The snapshot's unique id (its uid, not its name: a deleted and
    /// re-created snapshot of the same name gets new tokens).
    pub snapshot: String,
    pub block: u64,
    /// Unix seconds.
    pub expires: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed data token")]
    Malformed,
    #[error("invalid data token")]
    Invalid,
    #[error("the data token has expired")]
    Expired,
}

impl TokenKey {
    pub fn new(bytes: [u8; 32]) -> TokenKey {
        TokenKey(bytes)
    }

    fn mac(&self, snapshot: &str, block: u64, expires: i64) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("any key length");
        m.update(format!("kiln-cbt-v1\n{snapshot}\n{block}\n{expires}").as_bytes());
        m
    }

    pub fn issue(&self, t: &DataToken) -> String {
        let sig = self
            .mac(&t.snapshot, t.block, t.expires)
            .finalize()
            .into_bytes();
        format!(
            "v1.{}.{}.{}.{}",
            hex::encode(t.snapshot.as_bytes()),
            t.block,
            t.expires,
            hex::encode(sig)
        )
    }

    pub fn verify(&self, token: &str, now: i64) -> Result<DataToken, TokenError> {
        let mut it = token.split('.');
        let (Some("v1"), Some(snap), Some(block), Some(exp), Some(sig), None) = (
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let snapshot = hex::decode(snap)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(TokenError::Malformed)?;
        let block: u64 = block.parse().map_err(|_| TokenError::Malformed)?;
        let expires: i64 = exp.parse().map_err(|_| TokenError::Malformed)?;
        let sig = hex::decode(sig).map_err(|_| TokenError::Malformed)?;
        self.mac(&snapshot, block, expires)
            .verify_slice(&sig)
            .map_err(|_| TokenError::Invalid)?;
        if now > expires {
            return Err(TokenError::Expired);
        }
        Ok(DataToken {
            snapshot,
            block,
            expires,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_refuse() {
        let k = TokenKey::new([7; 32]);
        let t = DataToken {
            snapshot: "default/target/0f3c".into(),
            block: 42,
            expires: 1000,
        };
        let s = k.issue(&t);
        assert_eq!(k.verify(&s, 999), Ok(t.clone()));
        assert_eq!(k.verify(&s, 1001), Err(TokenError::Expired));
        // Altered block, expiry, snapshot; another key; garbage.
        let alt = s.replacen(".42.", ".43.", 1);
        assert_eq!(k.verify(&alt, 0), Err(TokenError::Invalid));
        let alt = s.replacen(".1000.", ".9999.", 1);
        assert_eq!(k.verify(&alt, 0), Err(TokenError::Invalid));
        let other = k.issue(&DataToken {
            snapshot: "default/other/1".into(),
            ..t.clone()
        });
        let spliced = format!(
            "{}.{}",
            other.rsplit_once('.').unwrap().0,
            s.rsplit_once('.').unwrap().1
        );
        assert_eq!(k.verify(&spliced, 0), Err(TokenError::Invalid));
        assert_eq!(
            TokenKey::new([8; 32]).verify(&s, 0),
            Err(TokenError::Invalid)
        );
        for bad in [
            "",
            "v1",
            "v2.00.1.1.00",
            "v1.zz.1.1.00",
            "v1.00.x.1.00",
            &format!("{s}.x"),
        ] {
            assert_eq!(k.verify(bad, 0), Err(TokenError::Malformed), "{bad}");
        }
    }
}
