//! The SPMD check: each rank logs its pool requests and a running hash of them; ranks compare
//! digests and, on a mismatch, their logs, to name the first request that differs.

use serde::{Deserialize, Serialize};

/// When ranks compare their pool requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CheckMode {
    /// Never (no log is kept).
    Off,
    /// Whenever the pool grows (a registration, which is collective anyway).
    #[default]
    AtRegistration,
    /// After every request (slow; for debugging).
    EveryRequest,
}

/// One pool request as the check sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PoolRequest {
    /// An allocation of `bytes`.
    Alloc {
        /// Requested size.
        bytes: usize,
    },
    /// A free of the slot at `(segment, offset)`.
    Free {
        /// Segment index.
        segment: usize,
        /// Offset in the segment.
        offset: usize,
    },
}

/// Count and running hash of a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestDigest {
    /// Requests logged since the pool was made.
    pub count: u64,
    /// Running hash over all of them.
    pub hash: u64,
}

/// The log of one rank.
#[derive(Clone, Debug, Default)]
pub struct RequestLog {}

/// The first difference between ranks' logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// Index of the first differing request.
    pub index: u64,
    /// A rank and its request there (or "nothing" when its log is shorter).
    pub rank: usize,
    /// That rank's request, described.
    pub request: String,
    /// Another rank that differs from it.
    pub other_rank: usize,
    /// The other rank's request, described.
    pub other_request: String,
}

/// Compare the unverified tails of every rank's log (rank order); `None` when they agree.
pub fn find_divergence(tails: &[(u64, Vec<PoolRequest>)]) -> Option<Divergence> {
    let _ = tails;
    todo!("helper")
}

impl RequestLog {
    /// Log a request.
    pub fn push(&mut self, request: PoolRequest) {
        let _ = request;
        todo!()
    }
    /// Count and running hash of everything logged.
    pub fn digest(&self) -> RequestDigest {
        todo!()
    }
    /// Index of the first unverified request and the requests from there on.
    pub fn unverified(&self) -> (u64, &[PoolRequest]) {
        todo!()
    }
    /// Everything logged so far agreed across ranks: forget it (the digest stays).
    pub fn mark_verified(&mut self) {
        todo!()
    }
}
