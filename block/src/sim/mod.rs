//! Test and lab machinery, not the engine (cargo feature `sim`): simulated host page
//! caches with the failure behaviour of real file systems ([`hostcache`]), a reference
//! model of the durability invariant ([`oracle`]), other devices' handling of host
//! errors behind the engine's interface ([`strategy`]), and the outage matrix that
//! runs a synthetic guest workload against them ([`matrix`]); the crash states of a
//! power cut, chosen from a disk's write log ([`powercut`]).
//!
//! `holdfast lab` (vmm/src/lab) uses them; the engine uses none of them.

pub mod hostcache;
pub mod matrix;
pub mod oracle;
pub mod powercut;
pub mod strategy;
pub mod timeline;

pub use hostcache::{HostCache, HostModel, SimulatedHost};
