//! Why the lab could not do something: a run that could not run (the machine's
//! fault: a full disk, a VMM that did not start, a host tool that failed), a run the
//! plan cannot have, or a command line it does not understand. What a run finds (lost
//! units, a check that failed) is a result ([`super::report::RunRecord`]), not an
//! error.

use std::path::PathBuf;
use std::process::ExitStatus;

use super::scenario::{Host, LabStrategy, OutageKind};

/// A run that could not run; the lab stops there.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder of the run's.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A program the lab starts (holdfast, QEMU, a host check, e2fsck).
    #[error("cannot start {program}: {source}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited before its QMP socket appeared.
    #[error("{vmm} exited ({status}) before its QMP socket")]
    ExitedEarly { vmm: String, status: ExitStatus },
    /// The VMM's console is not a pipe the lab reads.
    #[error("the VMM's console is not piped to the lab")]
    NoConsole,
    /// Waiting for the VMM's process.
    #[error("{vmm}: {source}")]
    Wait {
        vmm: String,
        #[source]
        source: std::io::Error,
    },
    /// A QMP command to the VMM.
    #[error("QMP {command}: {failure}")]
    Qmp {
        command: String,
        failure: QmpFailure,
    },
    /// The real host (its devices, its file system, its tools).
    #[error("the real host: {0}")]
    RealHost(#[from] super::realhost::Error),
    /// A power-cut run whose guest ended (or timed out) before the cut.
    #[error("the power cut never came: {0}")]
    NoPowerCut(String),
    /// A disk's write log stopped before the cut: its crash states would be wrong.
    #[error("a write log stopped before the power cut (holdfast said: {0})")]
    WriteLogStopped(String),
    /// The plan asks for a run that cannot be.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
}

impl Error {
    /// An I/O error on `path`.
    pub fn file(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::File { path, source }
    }
}

/// How a QMP command failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpFailure {
    /// The socket never appeared.
    #[error("no socket at {} after 30 s: {source}", path.display())]
    NoSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("no answer in 30 s")]
    NoAnswer,
    /// The VMM answered with an error (its description).
    #[error("{0}")]
    Refused(String),
}

/// A run the plan cannot have.
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    #[error("outage `{}` cannot run on a simulated host", .0.as_str())]
    OutageOnSimulatedHost(OutageKind),
    #[error("{0} runs on the real host only")]
    QemuOnSimulatedHost(LabStrategy),
    #[error("a Linux guest needs `progress`")]
    NoProgress,
    #[error("the synthetic guest's oracle cannot check a Linux guest")]
    OracleForLinux,
    #[error("the synthetic guest cannot run {host} {strategy} {}", .outage.as_str())]
    Synthetic {
        host: Host,
        strategy: LabStrategy,
        outage: OutageKind,
    },
}
