//! Test and lab machinery, not the engine (cargo feature `sim`): simulated host page
//! caches with the failure behaviour of real file systems ([`hostcache`]), a reference
//! model of the durability invariant ([`oracle`]), and the outage matrix that runs a
//! synthetic guest workload against holdfast and QEMU-like strategies ([`matrix`]).
//!
//! `holdfast lab` (vmm/src/lab) uses all three; the engine uses none of them.

pub mod hostcache;
pub mod imitate;
pub mod matrix;
pub mod oracle;
pub mod timeline;

pub use hostcache::{HostCache, HostModel, SimulatedHost};
pub use imitate::Imitate;
