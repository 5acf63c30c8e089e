//! holdfast's QMP server (QEMU Machine Protocol over a Unix socket) and its wire
//! types: greeting and capabilities negotiation, commands (`query-status`, `stop`,
//! `cont`, `query-block`, holdfast's `x-` commands) and events (`STOP`, `RESUME`,
//! `BLOCK_IO_ERROR`).
//!
//! Not built yet: it arrives with the issue "qmp/ + pause-on-error end to end".
