//! The seed's build payload, and the checks that make its fields safe to
//! use in image references, tags and file names. Unknown fields are
//! ignored, as the seed did.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{field}: {why}")]
pub struct RequestError {
    pub field: &'static str,
    pub why: String,
}

/// Registry credentials, as Docker's auth config objects carry them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAuth {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub serveraddress: Option<String>,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// `POST /`'s body.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildRequest {
    #[serde(default)]
    pub sha: Option<String>,
    #[serde(default)]
    pub app: String,
    #[serde(default)]
    pub space: String,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default)]
    pub callback: Option<String>,
    #[serde(default)]
    pub callback_auth: Option<String>,
    #[serde(default)]
    pub build_uuid: String,
    #[serde(default)]
    pub app_uuid: String,
    #[serde(default)]
    pub sources: String,
    #[serde(default)]
    pub gm_registry_host: String,
    #[serde(default)]
    pub gm_registry_repo: String,
    #[serde(default)]
    pub gm_registry_auth: Option<RegistryAuth>,
    /// A number or a string of digits.
    #[serde(default)]
    pub build_number: serde_json::Value,
    #[serde(default)]
    pub build_args: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub docker_registry: Option<String>,
    #[serde(default)]
    pub docker_login: Option<String>,
    #[serde(default)]
    pub docker_password: Option<String>,
}

impl std::fmt::Debug for BuildRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildRequest")
            .field("app", &self.app)
            .field("app_uuid", &self.app_uuid)
            .field("build_uuid", &self.build_uuid)
            .field("build_number", &self.build_number)
            .finish_non_exhaustive()
    }
}

fn err(field: &'static str, why: impl Into<String>) -> RequestError {
    RequestError {
        field,
        why: why.into(),
    }
}

/// 8-4-4-4-12 hex digits.
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl BuildRequest {
    /// The build number as digits.
    pub fn number(&self) -> String {
        match &self.build_number {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) => s.clone(),
            _ => String::new(),
        }
    }

    /// `{app}-{app_uuid}`, the seed's name for an app's builds.
    pub fn app_key(&self) -> String {
        format!("{}-{}", self.app, self.app_uuid)
    }

    /// `{host}/{repo}/{app}-{app_uuid}`.
    pub fn repository(&self) -> String {
        format!(
            "{}/{}/{}",
            self.gm_registry_host,
            self.gm_registry_repo.trim_matches('/'),
            self.app_key()
        )
    }

    /// Refuse what the seed refused (missing fields, a bad build uuid) and
    /// anything that could not be an image reference or could smuggle an
    /// option into a command line.
    pub fn validate(&self) -> Result<(), RequestError> {
        for (f, v) in [
            ("sources", &self.sources),
            ("app", &self.app),
            ("space", &self.space),
            ("app_uuid", &self.app_uuid),
            ("gm_registry_host", &self.gm_registry_host),
            ("gm_registry_repo", &self.gm_registry_repo),
            ("build_uuid", &self.build_uuid),
        ] {
            if v.is_empty() {
                return Err(err(f, "missing"));
            }
        }
        if !is_uuid(&self.build_uuid) {
            return Err(err("build_uuid", "not a UUID"));
        }
        let n = self.number();
        if n.is_empty() || n.len() > 18 || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("build_number", "must be a number"));
        }
        let lower = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && s.as_bytes()[0].is_ascii_alphanumeric()
        };
        if !lower(&self.app) || self.app.len() > 64 {
            return Err(err(
                "app",
                "lowercase letters, digits and '-', starting with a letter or digit",
            ));
        }
        if !lower(&self.app_uuid) || self.app_uuid.len() > 64 {
            return Err(err("app_uuid", "lowercase hex digits and '-'"));
        }
        let host = &self.gm_registry_host;
        if host.starts_with('-')
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        {
            return Err(err(
                "gm_registry_host",
                "a host name or address, with an optional :port",
            ));
        }
        let repo = self.gm_registry_repo.trim_matches('/');
        if repo.is_empty() || repo.split('/').any(|c| !lower(&c.replace(['.', '_'], "-"))) {
            return Err(err("gm_registry_repo", "lowercase path components"));
        }
        let s = self.sources.as_str();
        if !(s.starts_with("http://")
            || s.starts_with("https://")
            || s.starts_with("data:")
            || s.starts_with("docker://"))
        {
            return Err(err(
                "sources",
                "an http(s) URL, a data: URI or docker://image",
            ));
        }
        if let Some(c) = &self.callback {
            if !(c.is_empty() || c.starts_with("http://") || c.starts_with("https://")) {
                return Err(err("callback", "an http(s) URL"));
            }
        }
        if let Some(img) = s.strip_prefix("docker://") {
            if img.is_empty() || img.starts_with('-') || img.contains(char::is_whitespace) {
                return Err(err("sources", "docker://host/org/repo:tag"));
            }
        }
        Ok(())
    }

    /// Build args: `extra` (`EXTRA_BUILD_ARGS`) under the request's own;
    /// names stripped to `[A-Za-z0-9_]`, as the seed did.
    pub fn build_args(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut m: std::collections::BTreeMap<String, String> = extra.iter().cloned().collect();
        for (k, v) in self.build_args.iter().flatten() {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            m.insert(k.clone(), v);
        }
        m.into_iter()
            .map(|(k, v)| {
                (
                    k.chars()
                        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect::<String>(),
                    v,
                )
            })
            .filter(|(k, _)| !k.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> BuildRequest {
        serde_json::from_value(serde_json::json!({
            "app": "web", "space": "default", "app_uuid": "0b5e2b2c-1111-2222-3333-444455556666",
            "build_uuid": "8a3e0f2a-aaaa-bbbb-cccc-ddddeeeeffff", "build_number": 7,
            "sources": "data:,x", "gm_registry_host": "127.0.0.1:5000", "gm_registry_repo": "org",
            "unknown_field": true
        }))
        .unwrap()
    }

    #[test]
    fn validation() {
        ok().validate().unwrap();
        assert_eq!(
            ok().repository(),
            "127.0.0.1:5000/org/web-0b5e2b2c-1111-2222-3333-444455556666"
        );
        let bad = |f: &dyn Fn(&mut BuildRequest)| {
            let mut r = ok();
            f(&mut r);
            r.validate().unwrap_err().field
        };
        assert_eq!(bad(&|r| r.sources.clear()), "sources");
        assert_eq!(bad(&|r| r.build_uuid = "nope".into()), "build_uuid");
        assert_eq!(bad(&|r| r.app = "Web; rm".into()), "app");
        assert_eq!(
            bad(&|r| r.gm_registry_host = "--tls-verify=false".into()),
            "gm_registry_host"
        );
        assert_eq!(bad(&|r| r.sources = "file:///etc/passwd".into()), "sources");
        assert_eq!(
            bad(&|r| r.build_number = serde_json::json!("1; x")),
            "build_number"
        );
        assert_eq!(bad(&|r| r.sources = "docker://-x".into()), "sources");
    }

    #[test]
    fn build_args_merge_and_sanitise() {
        let mut r = ok();
        r.build_args = serde_json::json!({"A": "req", "B-x!": 2})
            .as_object()
            .cloned();
        let extra = vec![("A".into(), "extra".into()), ("C".into(), "c".into())];
        assert_eq!(
            r.build_args(&extra),
            vec![
                ("A".into(), "req".into()),
                ("Bx".into(), "2".into()),
                ("C".into(), "c".into())
            ]
        );
    }
}
