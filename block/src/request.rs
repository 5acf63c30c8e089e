//! The neutral request a frontend hands the engine, and the guest-visible outcome.
//!
//! Frontends (virtio-blk in `holdfast-vmm`, the simulations in this crate) translate
//! their own wire format into a [`Request`]; the engine answers with a [`Completion`]
//! whose [`Status`] is all a guest ever learns. Host errors never appear here: they are
//! [`crate::HostError`]s, handled by the disk's error policy.

use crate::bytes::Bytes;

/// What the guest asked for. Offsets and lengths are in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOp {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        data: Bytes,
    },
    Flush,
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    /// The device's serial number (virtio's GET_ID).
    GetId,
}

impl RequestOp {
    /// The byte range the request touches, if it touches one.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            RequestOp::Read { offset, len }
            | RequestOp::WriteZeroes { offset, len, .. }
            | RequestOp::Discard { offset, len } => Some((*offset, *len)),
            RequestOp::Write { offset, data } => Some((*offset, data.len() as u64)),
            RequestOp::Flush | RequestOp::GetId => None,
        }
    }

    /// Whether a host failure of this request falls under `rerror` (else `werror`).
    pub fn is_read(&self) -> bool {
        matches!(self, RequestOp::Read { .. })
    }
}

/// One guest request. `tag` is the frontend's handle (a descriptor head index, a
/// sequence number); the engine hands it back untouched in the [`Completion`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub tag: u64,
    pub op: RequestOp,
}

impl Request {
    pub fn new(tag: u64, op: RequestOp) -> Self {
        Request { tag, op }
    }
}

/// The guest-visible outcome, as virtio-blk's `VIRTIO_BLK_S_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    /// The `VIRTIO_BLK_S_*` byte.
    pub fn virtio_code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::IoErr => 1,
            Status::Unsupp => 2,
        }
    }
}

/// A finished request: its tag, its status and, for reads and GET_ID, its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub status: Status,
    pub data: Vec<u8>,
}

impl Completion {
    pub fn ok(tag: u64) -> Self {
        Completion {
            tag,
            status: Status::Ok,
            data: Vec::new(),
        }
    }

    pub fn with_status(tag: u64, status: Status) -> Self {
        Completion {
            tag,
            status,
            data: Vec::new(),
        }
    }
}
