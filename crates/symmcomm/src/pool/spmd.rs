//! The SPMD check: each rank logs its pool requests and a running hash of them; ranks compare
//! digests and, on a mismatch, their logs, to name the first request that differs.

use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

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
pub(crate) enum PoolRequest {
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

impl PoolRequest {
    /// The request's canonical bytes, the same on every machine: a tag byte (1 for an
    /// allocation, 2 for a free), then each field as a little-endian `u64`.
    fn encode(&self, out: &mut Vec<u8>) {
        // `usize` is at most 64 bits on every target Rust supports, so `as u64` is lossless.
        match *self {
            PoolRequest::Alloc { bytes } => {
                out.push(1);
                out.extend_from_slice(&(bytes as u64).to_le_bytes());
            }
            PoolRequest::Free { segment, offset } => {
                out.push(2);
                out.extend_from_slice(&(segment as u64).to_le_bytes());
                out.extend_from_slice(&(offset as u64).to_le_bytes());
            }
        }
    }
}

/// In words, as divergence reports show it: `alloc of 4096 B`, `free of segment 0 offset 256`.
impl fmt::Display for PoolRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolRequest::Alloc { bytes } => write!(f, "alloc of {bytes} B"),
            PoolRequest::Free { segment, offset } => {
                write!(f, "free of segment {segment} offset {offset}")
            }
        }
    }
}

/// Count and running hash of a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RequestDigest {
    /// Requests logged since the pool was made.
    pub count: u64,
    /// Running hash over all of them.
    pub hash: u64,
}

/// The log of one rank: a count and running hash of every request, and the requests not yet
/// verified against the other ranks.
///
/// The hash starts at 0 and folds each request in as
/// `hash = xxh3_64(hash as 8 little-endian bytes ++ request's canonical bytes)`, so it is the
/// same on every process and machine and depends only on the sequence of requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RequestLog {
    count: u64,
    hash: u64,
    /// Requests `count - tail.len()` onwards.
    tail: Vec<PoolRequest>,
}

/// The first difference between ranks' logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Divergence {
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
///
/// `tails[r]` is rank `r`'s `(index of its first unverified request, requests from there)`.
/// Every rank is compared with rank 0; the result is the smallest index at which any rank
/// differs from it, naming rank 0 and the lowest rank that differs there. A log that ends
/// early shows `nothing` at that index. Tails that start at different indices (the ranks
/// verified different numbers of requests) diverge at the smaller start.
pub(crate) fn find_divergence(tails: &[(u64, Vec<PoolRequest>)]) -> Option<Divergence> {
    let (start0, log0) = tails.first()?;
    let mut first: Option<Divergence> = None;
    for (rank, (start, log)) in tails.iter().enumerate().skip(1) {
        let found = if start != start0 {
            let index = (*start0).min(*start);
            Some(Divergence {
                index,
                rank: 0,
                request: at_verified_edge(*start0, log0, index),
                other_rank: rank,
                other_request: at_verified_edge(*start, log, index),
            })
        } else {
            (0..log0.len().max(log.len()))
                .find(|&i| log0.get(i) != log.get(i))
                .map(|i| Divergence {
                    // `i` indexes an in-memory slice, so it fits in a `u64`.
                    index: start0 + i as u64,
                    rank: 0,
                    request: describe(log0.get(i)),
                    other_rank: rank,
                    other_request: describe(log.get(i)),
                })
        };
        if let Some(d) = found
            && first.as_ref().is_none_or(|f| d.index < f.index)
        {
            first = Some(d);
        }
    }
    first
}

fn describe(request: Option<&PoolRequest>) -> String {
    request.map_or_else(|| "nothing".to_string(), PoolRequest::to_string)
}

/// What a rank whose tail is `(start, log)` has at `index`, the smaller of two ranks' starts.
fn at_verified_edge(start: u64, log: &[PoolRequest], index: u64) -> String {
    if start == index {
        format!(
            "{} (after only {start} verified requests)",
            describe(log.first())
        )
    } else {
        format!("a request it had already verified (its first {start} requests were verified)")
    }
}

impl RequestLog {
    /// Log a request.
    pub(crate) fn push(&mut self, request: PoolRequest) {
        let mut bytes = Vec::with_capacity(25);
        bytes.extend_from_slice(&self.hash.to_le_bytes());
        request.encode(&mut bytes);
        self.hash = xxh3_64(&bytes);
        self.count += 1;
        self.tail.push(request);
    }

    /// Count and running hash of everything logged.
    pub(crate) fn digest(&self) -> RequestDigest {
        RequestDigest {
            count: self.count,
            hash: self.hash,
        }
    }

    /// Index of the first unverified request and the requests from there on.
    pub(crate) fn unverified(&self) -> (u64, &[PoolRequest]) {
        // The tail holds at most `count` requests, so this does not underflow.
        (self.count - self.tail.len() as u64, &self.tail)
    }

    /// Everything logged so far agreed across ranks: forget it (the digest stays).
    pub(crate) fn mark_verified(&mut self) {
        self.tail.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alloc(bytes: usize) -> PoolRequest {
        PoolRequest::Alloc { bytes }
    }

    fn free(segment: usize, offset: usize) -> PoolRequest {
        PoolRequest::Free { segment, offset }
    }

    fn requests() -> impl Strategy<Value = PoolRequest> {
        prop_oneof![
            (0usize..1 << 30).prop_map(alloc),
            (0usize..4, 0usize..1 << 20).prop_map(|(s, o)| free(s, o)),
        ]
    }

    fn logged(requests: &[PoolRequest]) -> RequestLog {
        let mut log = RequestLog::default();
        for r in requests {
            log.push(r.clone());
        }
        log
    }

    /// A request different from `r`.
    fn other_than(r: &PoolRequest) -> PoolRequest {
        match *r {
            PoolRequest::Alloc { bytes } => alloc(bytes + 1),
            PoolRequest::Free { segment, offset } => free(segment, offset + 256),
        }
    }

    /// Brute force: walk the global indices up from the smallest start until two ranks
    /// disagree, then name rank 0 and the lowest rank that differs from it there.
    fn reference(tails: &[(u64, Vec<PoolRequest>)]) -> Option<(u64, usize, usize)> {
        let lo = tails.iter().map(|t| t.0).min()?;
        let hi = tails.iter().map(|t| t.0 + t.1.len() as u64).max()?;
        // `Err(())` stands for a request the rank already verified and dropped.
        fn at(t: &(u64, Vec<PoolRequest>), i: u64) -> Result<Option<&PoolRequest>, ()> {
            if i < t.0 {
                Err(())
            } else {
                Ok(t.1.get((i - t.0) as usize))
            }
        }
        (lo..hi).find_map(|i| {
            let zero = at(&tails[0], i);
            (1..tails.len())
                .find(|&r| at(&tails[r], i) != zero)
                .map(|r| (i, 0, r))
        })
    }

    #[test]
    fn requests_read_as_words() {
        assert_eq!(alloc(4096).to_string(), "alloc of 4096 B");
        assert_eq!(free(0, 256).to_string(), "free of segment 0 offset 256");
    }

    #[test]
    fn hash_is_pinned_to_the_canonical_encoding() {
        // One request, built by hand from the documented encoding.
        let mut one = RequestLog::default();
        one.push(alloc(4096));
        let mut bytes = vec![0u8; 8];
        bytes.push(1);
        bytes.extend_from_slice(&4096u64.to_le_bytes());
        assert_eq!(
            one.digest(),
            RequestDigest {
                count: 1,
                hash: xxh3_64(&bytes)
            }
        );
        one.push(free(1, 512));
        let mut bytes = xxh3_64(&bytes).to_le_bytes().to_vec();
        bytes.push(2);
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&512u64.to_le_bytes());
        assert_eq!(
            one.digest(),
            RequestDigest {
                count: 2,
                hash: xxh3_64(&bytes)
            }
        );
        // A fixed sequence has a fixed digest on every machine, forever: changing the
        // encoding breaks the check between ranks built from different versions.
        let fixed = logged(&[
            alloc(0),
            alloc(4096),
            free(0, 0),
            alloc(1 << 30),
            free(3, 768),
        ]);
        assert_eq!(
            fixed.digest(),
            RequestDigest {
                count: 5,
                hash: GOLDEN
            }
        );
    }

    const GOLDEN: u64 = 15448033863253605180;

    #[test]
    fn log_tracks_count_and_tail_across_verification() {
        let mut log = RequestLog::default();
        assert_eq!(log.digest(), RequestDigest { count: 0, hash: 0 });
        assert_eq!(log.unverified(), (0, &[][..]));
        log.push(alloc(10));
        log.push(free(0, 0));
        assert_eq!(log.unverified(), (0, &[alloc(10), free(0, 0)][..]));
        let before = log.digest();
        assert_eq!(before.count, 2);
        log.mark_verified();
        assert_eq!(log.digest(), before);
        assert_eq!(log.unverified(), (2, &[][..]));
        log.push(alloc(7));
        assert_eq!(log.unverified(), (2, &[alloc(7)][..]));
        assert_eq!(log.digest().count, 3);
        assert_ne!(log.digest().hash, before.hash);
    }

    #[test]
    fn agreeing_tails_have_no_divergence() {
        assert_eq!(find_divergence(&[]), None);
        let tail = vec![alloc(1), free(0, 0), alloc(0)];
        assert_eq!(find_divergence(&[(5, tail.clone())]), None);
        assert_eq!(find_divergence(&vec![(5, tail.clone()); 8]), None);
        assert_eq!(find_divergence(&vec![(9, Vec::new()); 3]), None);
    }

    #[test]
    fn a_shorter_log_differs_by_nothing() {
        let tails = [
            (3, vec![alloc(4096), free(0, 256)]),
            (3, vec![alloc(4096), free(0, 256)]),
            (3, vec![alloc(4096)]),
        ];
        assert_eq!(
            find_divergence(&tails),
            Some(Divergence {
                index: 4,
                rank: 0,
                request: "free of segment 0 offset 256".into(),
                other_rank: 2,
                other_request: "nothing".into(),
            })
        );
    }

    #[test]
    fn different_starts_are_a_divergence() {
        let tails = [
            (4, vec![alloc(4096)]),
            (4, vec![alloc(4096)]),
            (6, vec![alloc(4096)]),
            (2, vec![]),
        ];
        let d = find_divergence(&tails).expect("starts differ");
        // Rank 3 verified only 2 requests: the smallest index where ranks disagree.
        assert_eq!((d.index, d.rank, d.other_rank), (2, 0, 3));
        assert_eq!(
            d.request,
            "a request it had already verified (its first 4 requests were verified)"
        );
        assert_eq!(d.other_request, "nothing (after only 2 verified requests)");
        let d = find_divergence(&tails[..3]).expect("starts differ");
        assert_eq!((d.index, d.rank, d.other_rank), (4, 0, 2));
        assert_eq!(
            d.request,
            "alloc of 4096 B (after only 4 verified requests)"
        );
        assert_eq!(reference(&tails), Some((2, 0, 3)));
    }

    #[derive(Clone, Copy, Debug)]
    enum Change {
        /// A different request at the index.
        Replace,
        /// The log ends at the index.
        Truncate,
        /// The log has one extra request at the end.
        Extend,
    }

    proptest! {
        #[test]
        fn equal_sequences_have_equal_digests_wherever_verified(
            seq in prop::collection::vec(requests(), 0..60),
            marks_a in prop::collection::vec(any::<bool>(), 60),
            marks_b in prop::collection::vec(any::<bool>(), 60),
        ) {
            let mut a = RequestLog::default();
            let mut b = RequestLog::default();
            for (i, r) in seq.iter().enumerate() {
                a.push(r.clone());
                b.push(r.clone());
                if marks_a[i] {
                    let d = a.digest();
                    a.mark_verified();
                    prop_assert_eq!(a.digest(), d);
                    prop_assert_eq!(a.unverified(), (i as u64 + 1, &[][..]));
                }
                if marks_b[i] {
                    b.mark_verified();
                }
                prop_assert_eq!(a.digest(), b.digest());
            }
            prop_assert_eq!(a.digest().count, seq.len() as u64);
            prop_assert_eq!(a.digest(), logged(&seq).digest());
            let (start, tail) = a.unverified();
            prop_assert_eq!(&seq[start as usize..], tail);
        }

        #[test]
        fn different_sequences_have_different_digests(
            seq in prop::collection::vec(requests(), 1..60),
            k in any::<prop::sample::Index>(),
            swap in any::<bool>(),
        ) {
            let k = k.index(seq.len());
            let mut other = seq.clone();
            if swap && k + 1 < seq.len() && seq[k] != seq[k + 1] {
                other.swap(k, k + 1);
            } else {
                other[k] = other_than(&seq[k]);
            }
            prop_assert_ne!(logged(&seq).digest(), logged(&other).digest());
        }

        #[test]
        fn one_divergent_rank_is_named_with_both_requests(
            world in prop::sample::select(vec![2usize, 3, 8]),
            seq in prop::collection::vec(requests(), 1..40),
            k in any::<prop::sample::Index>(),
            bad in any::<prop::sample::Index>(),
            change in prop_oneof![
                Just(Change::Replace), Just(Change::Truncate), Just(Change::Extend)
            ],
            extra in requests(),
            start in 0u64..1_000_000,
        ) {
            let bad = bad.index(world);
            let k = match change {
                Change::Extend => seq.len(),
                _ => k.index(seq.len()),
            };
            let mut diverged = seq.clone();
            match change {
                Change::Replace => diverged[k] = other_than(&seq[k]),
                Change::Truncate => diverged.truncate(k),
                Change::Extend => diverged.push(extra.clone()),
            }
            let tails: Vec<(u64, Vec<PoolRequest>)> = (0..world)
                .map(|r| (start, if r == bad { diverged.clone() } else { seq.clone() }))
                .collect();
            let words = |v: &[PoolRequest]| {
                v.get(k).map_or_else(|| "nothing".to_string(), |r| r.to_string())
            };
            // Rank 0 is compared with everyone: if it is the odd one out, rank 1 differs.
            let other_rank = if bad == 0 { 1 } else { bad };
            let expected = Divergence {
                index: start + k as u64,
                rank: 0,
                request: words(&tails[0].1),
                other_rank,
                other_request: words(&tails[other_rank].1),
            };
            prop_assert_ne!(&expected.request, &expected.other_request);
            prop_assert_eq!(find_divergence(&tails), Some(expected));
        }

        #[test]
        fn divergence_matches_a_brute_force_walk(
            world in 2usize..9,
            seq in prop::collection::vec(requests(), 0..30),
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), 0u8..5, any::<prop::sample::Index>(), requests()),
                0..6,
            ),
            start in 0u64..1_000,
            shifted in any::<prop::sample::Index>(),
            shift in prop::sample::select(vec![0u64, 0, 0, 1, 3]),
        ) {
            let mut tails: Vec<(u64, Vec<PoolRequest>)> = vec![(start, seq.clone()); world];
            for (who, what, pos, req) in edits {
                let log = &mut tails[who.index(world)].1;
                let at = pos.index(log.len() + 1);
                match what {
                    0 | 1 if at < log.len() => log[at] = req,
                    2 => log.truncate(at),
                    3 => log.push(req),
                    _ => log.insert(at, req),
                }
            }
            // Sometimes one rank verified a few more requests than the others.
            let s = shifted.index(world);
            let drop = (shift as usize).min(tails[s].1.len());
            tails[s].0 += drop as u64;
            tails[s].1.drain(..drop);
            let got = find_divergence(&tails);
            prop_assert_eq!(
                got.as_ref().map(|d| (d.index, d.rank, d.other_rank)),
                reference(&tails)
            );
            if let Some(d) = got {
                prop_assert_ne!(d.request, d.other_request);
            }
        }
    }
}
