//! The symmetric pool's logic, independent of any backend: a deterministic sub-allocator over
//! segments (same requests, same offsets, on every rank), the segment map that says whether a
//! raw address is symmetric, and the request log that catches ranks whose requests diverge.

mod layout;
mod segment_map;
mod spmd;

pub use layout::{NeedSegment, PoolConfig, PoolLayout, Slot};
pub use segment_map::{SegmentHit, SegmentMap};
pub use spmd::{CheckMode, Divergence, PoolRequest, RequestDigest, RequestLog, find_divergence};
