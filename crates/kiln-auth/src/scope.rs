//! Scopes: `read` (status, downloads, logs, lists), `write` (submit,
//! cancel), `admin` (cache purge and other operator actions). A set is a
//! small bit mask so checks cost nothing on the request path.

use std::fmt;
use std::str::FromStr;

use crate::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
    fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Write => 2,
            Scope::Admin => 4,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Scope, ConfigError> {
        match s.trim() {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            other => Err(ConfigError::Scope(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub const NONE: Scopes = Scopes(0);
    pub const ALL: Scopes = Scopes(7);
    pub const READ_WRITE: Scopes = Scopes(3);

    pub fn contains(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }
    pub fn with(self, s: Scope) -> Scopes {
        Scopes(self.0 | s.bit())
    }
}

impl FromStr for Scopes {
    type Err = ConfigError;
    /// `read,write`; `all` is every scope.
    fn from_str(s: &str) -> Result<Scopes, ConfigError> {
        if s.trim() == "all" {
            return Ok(Scopes::ALL);
        }
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .try_fold(Scopes::NONE, |acc, p| Ok(acc.with(p.parse()?)))
            .and_then(|sc| {
                if sc == Scopes::NONE {
                    Err(ConfigError::Scope(s.to_string()))
                } else {
                    Ok(sc)
                }
            })
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [Scope::Read, Scope::Write, Scope::Admin]
            .into_iter()
            .filter(|s| self.contains(*s))
            .map(Scope::as_str)
            .collect();
        f.write_str(&names.join(","))
    }
}
