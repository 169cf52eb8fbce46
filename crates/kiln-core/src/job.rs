//! Job identity and lifecycle. The status names are the DRBD build server's
//! (`pending`, `building`, `completed`, `failed`) plus `cancelled`, which the
//! seed could not express because it could not cancel.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A job id: 32 lowercase hex characters, unique across all job kinds.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a job id (want 32 lowercase hex characters): {0:?}")]
pub struct JobIdError(pub String);

impl JobId {
    pub fn new_random() -> JobId {
        JobId(uuid::Uuid::new_v4().simple().to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for JobId {
    type Err = JobIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(JobId(s.to_string()))
        } else {
            Err(JobIdError(s.chars().take(80).collect()))
        }
    }
}

impl TryFrom<String> for JobId {
    type Error = JobIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Building,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Building,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Building => "building",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// A terminal job never changes status again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown job status {s:?} (one of pending, building, completed, failed, cancelled)"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        let id = JobId::new_random();
        assert_eq!(id.as_str().len(), 32);
        assert_eq!(id.as_str().parse::<JobId>().unwrap(), id);
        assert!("../etc/passwd".parse::<JobId>().is_err());
        assert!("ABCDEF0123456789ABCDEF0123456789".parse::<JobId>().is_err());
    }

    #[test]
    fn statuses_roundtrip() {
        for st in JobStatus::ALL {
            assert_eq!(st.as_str().parse::<JobStatus>().unwrap(), st);
        }
        assert!("done".parse::<JobStatus>().is_err());
        assert!(JobStatus::Cancelled.is_terminal());
        assert!(!JobStatus::Building.is_terminal());
    }
}
