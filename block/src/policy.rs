//! Error policies (`werror`/`rerror`), as in QEMU, and the io-status they leave.

use std::fmt;
use std::str::FromStr;

use crate::HostError;

/// What a disk does when a host call fails. holdfast's default is `stop`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ErrorPolicy {
    /// Park the request and pause the VM until `cont` replays.
    #[default]
    Stop,
    /// Complete the request with `S_IOERR`.
    Report,
    /// Complete the request `S_OK`; only the event tells.
    Ignore,
    /// `stop` on ENOSPC/EDQUOT, `report` on anything else.
    Enospc,
}

/// What the policy decided for one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    Stop,
    Report,
    Ignore,
}

impl ErrorPolicy {
    pub fn action(self, error: &HostError) -> ErrorAction {
        match self {
            ErrorPolicy::Stop => ErrorAction::Stop,
            ErrorPolicy::Report => ErrorAction::Report,
            ErrorPolicy::Ignore => ErrorAction::Ignore,
            ErrorPolicy::Enospc if error.is_nospace() => ErrorAction::Stop,
            ErrorPolicy::Enospc => ErrorAction::Report,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorPolicy::Stop => "stop",
            ErrorPolicy::Report => "report",
            ErrorPolicy::Ignore => "ignore",
            ErrorPolicy::Enospc => "enospc",
        }
    }
}

impl fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error policy `{0}` (expected stop, report, ignore or enospc)")]
pub struct ParsePolicyError(pub String);

impl FromStr for ErrorPolicy {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop" => Ok(ErrorPolicy::Stop),
            "report" => Ok(ErrorPolicy::Report),
            "ignore" => Ok(ErrorPolicy::Ignore),
            "enospc" => Ok(ErrorPolicy::Enospc),
            other => Err(ParsePolicyError(other.to_owned())),
        }
    }
}

impl ErrorAction {
    /// The name QMP's `BLOCK_IO_ERROR` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Stop => "stop",
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
        }
    }
}

/// A disk's io-status, as `query-block` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoStatus {
    #[default]
    Ok,
    Failed,
    Nospace,
}

impl IoStatus {
    pub fn of(error: &HostError) -> Self {
        if error.is_nospace() {
            IoStatus::Nospace
        } else {
            IoStatus::Failed
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostOp;

    #[test]
    fn enospc_policy_stops_only_on_space_errors() {
        let nospace = HostError::new(HostOp::Write, libc::ENOSPC);
        let quota = HostError::new(HostOp::Flush, libc::EDQUOT);
        let eio = HostError::new(HostOp::Write, libc::EIO);
        assert_eq!(ErrorPolicy::Enospc.action(&nospace), ErrorAction::Stop);
        assert_eq!(ErrorPolicy::Enospc.action(&quota), ErrorAction::Stop);
        assert_eq!(ErrorPolicy::Enospc.action(&eio), ErrorAction::Report);
        for e in [nospace, eio] {
            assert_eq!(ErrorPolicy::Stop.action(&e), ErrorAction::Stop);
            assert_eq!(ErrorPolicy::Report.action(&e), ErrorAction::Report);
            assert_eq!(ErrorPolicy::Ignore.action(&e), ErrorAction::Ignore);
        }
        assert_eq!(IoStatus::of(&quota), IoStatus::Nospace);
        assert_eq!(IoStatus::of(&eio), IoStatus::Failed);
    }

    #[test]
    fn parses_names() {
        for p in [
            ErrorPolicy::Stop,
            ErrorPolicy::Report,
            ErrorPolicy::Ignore,
            ErrorPolicy::Enospc,
        ] {
            assert_eq!(p.as_str().parse::<ErrorPolicy>(), Ok(p));
        }
        let err = "halt".parse::<ErrorPolicy>().expect_err("bad name");
        assert!(err.to_string().contains("halt"));
    }
}
