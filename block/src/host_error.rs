//! Errors of the host storage, classified by errno.
//!
//! A [`HostError`] is what a [`crate::Backend`] returns; the disk's error policy
//! decides from its class (nospace or not) whether to stop, report or ignore. Guest
//! mistakes (a sector past the end, a write to a read-only disk) are not host errors:
//! they become a [`crate::Status`] directly.

use std::fmt;
use std::io;

/// The host operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostOp {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Discard,
}

impl fmt::Display for HostOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostOp::Read => "read",
            HostOp::Write => "write",
            HostOp::Flush => "flush",
            HostOp::WriteZeroes => "write-zeroes",
            HostOp::Discard => "discard",
        })
    }
}

/// A failed host call: which operation, and the errno it failed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("host {op} failed: {} ({})", errno_name(*.errno), strerror(*.errno))]
pub struct HostError {
    pub op: HostOp,
    pub errno: i32,
}

impl HostError {
    pub fn new(op: HostOp, errno: i32) -> Self {
        HostError { op, errno }
    }

    /// Classifies an `io::Error`; errors without an errno count as `EIO`.
    pub fn from_io(op: HostOp, err: &io::Error) -> Self {
        HostError {
            op,
            errno: err.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Out of space or quota: the class the `enospc` policy stops on.
    pub fn is_nospace(&self) -> bool {
        self.errno == libc::ENOSPC || self.errno == libc::EDQUOT
    }

    pub fn errno_name(&self) -> &'static str {
        errno_name(self.errno)
    }
}

/// The system's description of an errno ("Input/output error").
pub fn strerror(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// Errnos that storage produces, by name; the fault-plan parser accepts these names.
pub const ERRNO_NAMES: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("EDQUOT", libc::EDQUOT),
    ("EROFS", libc::EROFS),
    ("ENOMEM", libc::ENOMEM),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("ENXIO", libc::ENXIO),
    ("ENODEV", libc::ENODEV),
    ("ENOMEDIUM", libc::ENOMEDIUM),
    ("EAGAIN", libc::EAGAIN),
    ("EINVAL", libc::EINVAL),
    ("EBADF", libc::EBADF),
    ("EFBIG", libc::EFBIG),
    ("ESTALE", libc::ESTALE),
    ("ENOLINK", libc::ENOLINK),
    ("EREMOTEIO", libc::EREMOTEIO),
];

/// The symbolic name of an errno (`"EIO"`), or `"errno N"` for one not in the table.
pub fn errno_name(errno: i32) -> &'static str {
    ERRNO_NAMES
        .iter()
        .find(|(_, n)| *n == errno)
        .map(|(name, _)| *name)
        .unwrap_or("unknown errno")
}

/// The errno for a symbolic name, case-insensitively.
pub fn errno_from_name(name: &str) -> Option<i32> {
    ERRNO_NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, errno)| *errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_nospace() {
        assert!(HostError::new(HostOp::Write, libc::ENOSPC).is_nospace());
        assert!(HostError::new(HostOp::Flush, libc::EDQUOT).is_nospace());
        assert!(!HostError::new(HostOp::Flush, libc::EIO).is_nospace());
    }

    #[test]
    fn message_names_op_and_errno() {
        let e = HostError::new(HostOp::Flush, libc::ENOSPC);
        let msg = e.to_string();
        assert!(msg.contains("flush") && msg.contains("ENOSPC"), "{msg}");
        assert!(
            msg.contains("No space left on device") && !msg.contains("os error"),
            "{msg}"
        );
    }

    #[test]
    fn errno_names_round_trip() {
        for (name, errno) in ERRNO_NAMES {
            assert_eq!(errno_from_name(name), Some(*errno));
            assert_eq!(errno_name(*errno), *name);
        }
        assert_eq!(errno_from_name("eio"), Some(libc::EIO));
        assert_eq!(errno_from_name("EWHATEVER"), None);
    }

    #[test]
    fn io_error_without_errno_is_eio() {
        let e = HostError::from_io(HostOp::Read, &io::Error::other("x"));
        assert_eq!(e.errno, libc::EIO);
    }
}
