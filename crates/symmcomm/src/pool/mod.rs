//! The symmetric pool's logic, independent of any backend: a deterministic sub-allocator over
//! segments (same requests, same offsets, on every rank), the segment map that says whether a
//! raw address is symmetric, and the request log that catches ranks whose requests diverge.

mod layout;
mod segment_map;
mod spmd;

pub use layout::PoolConfig;
pub(crate) use layout::{PoolLayout, Slot};
pub use segment_map::SegmentHit;
pub(crate) use segment_map::SegmentMap;
pub use spmd::CheckMode;
pub(crate) use spmd::{Divergence, PoolRequest, RequestDigest, RequestLog, find_divergence};
