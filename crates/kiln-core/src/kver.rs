//! Kernel version strings, validated against the DRBD build server's
//! documented format `X.Y.Z[-flavor]` or `X.Y.Z[-flavor]-build`. The version
//! ends up in paths and command lines, so anything else is refused.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KernelVersion(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelVersionError {
    #[error("kernel version is missing: send the X-Kernel-Version header or the kernel_version query parameter")]
    Missing,
    #[error("invalid kernel version {0:?}: want X.Y.Z[-flavor] or X.Y.Z[-flavor]-build, e.g. 5.15.0-86-generic")]
    Invalid(String),
}

impl KernelVersion {
    pub const MAX_LEN: usize = 128;

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `(major, minor, patch)`.
    pub fn numbers(&self) -> (u32, u32, u32) {
        let base = self.0.split('-').next().unwrap_or_default();
        let mut it = base.split('.').map(|p| p.parse().unwrap_or(0));
        (
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
        )
    }
}

impl FromStr for KernelVersion {
    type Err = KernelVersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(KernelVersionError::Missing);
        }
        let invalid = || KernelVersionError::Invalid(s.chars().take(80).collect());
        if s.len() > Self::MAX_LEN {
            return Err(invalid());
        }
        let (base, rest) = match s.split_once('-') {
            Some((b, r)) => (b, Some(r)),
            None => (s, None),
        };
        let nums: Vec<&str> = base.split('.').collect();
        if nums.len() != 3
            || nums
                .iter()
                .any(|n| n.is_empty() || n.len() > 6 || !n.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(invalid());
        }
        if let Some(rest) = rest {
            // Each dash-separated part is a flavor or build: letters, digits
            // and `._+~`, never empty and never a path component like `..`.
            for part in rest.split('-') {
                if part.is_empty()
                    || part.starts_with('.')
                    || !part.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'~')
                    })
                {
                    return Err(invalid());
                }
            }
        }
        Ok(KernelVersion(s.to_string()))
    }
}

impl TryFrom<String> for KernelVersion {
    type Error = KernelVersionError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<KernelVersion> for String {
    fn from(k: KernelVersion) -> String {
        k.0
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_documented_and_real_versions() {
        for ok in [
            "5.15.0",
            "5.15.0-generic",
            "5.15.0-86-generic",
            "6.1.0-28-amd64",
            "6.1.0-28-cloud-amd64",
            "5.14.0-427.13.1.el9_4.x86_64",
        ] {
            let k: KernelVersion = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(k.as_str(), ok);
        }
        assert_eq!(
            "6.1.0-28-amd64".parse::<KernelVersion>().unwrap().numbers(),
            (6, 1, 0)
        );
    }

    #[test]
    fn refuses_bad_versions() {
        for bad in [
            "5.15",
            "5",
            "latest",
            "5.15.0-",
            "5.15.0--x",
            "5.15.0-../../etc",
            "5.15.0-a/b",
            "5.15.0 -x",
            "5.15.0-$(reboot)",
            "x.15.0",
        ] {
            assert!(bad.parse::<KernelVersion>().is_err(), "{bad} accepted");
        }
        assert_eq!(
            "".parse::<KernelVersion>(),
            Err(KernelVersionError::Missing)
        );
    }
}
