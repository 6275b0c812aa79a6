//! Sorted map from address ranges to segments: "is this raw address symmetric, in which
//! segment, at which offset", in O(log n).

use std::collections::BTreeMap;

/// Where an address falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHit {
    /// Segment index.
    pub segment: usize,
    /// Byte offset of the address inside the segment.
    pub offset: usize,
}

/// One recorded range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    len: usize,
    segment: usize,
}

/// Address ranges of the segments, sorted by base address.
///
/// Ranges never overlap and are never empty, so the only range that can hold an address is
/// the one with the greatest base not above it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SegmentMap {
    /// Base address -> range starting there.
    ranges: BTreeMap<u64, Range>,
}

impl SegmentMap {
    /// Record segment `segment` at `[base, base + len)`.
    ///
    /// # Panics
    ///
    /// If [`SegmentMap::try_insert`] fails: the range is empty, wraps past the end of the
    /// address space, or overlaps a recorded one. Live allocations never do, so any of these
    /// means the backend handed out bad memory.
    #[cfg(test)]
    pub(crate) fn insert(&mut self, base: u64, len: usize, segment: usize) {
        if let Err(e) = self.try_insert(base, len, segment) {
            panic!("symmetric segment map: {e}");
        }
    }

    /// Record segment `segment` at `[base, base + len)`; `Err` (and the map unchanged) if the
    /// range is empty, wraps past the end of the address space, or overlaps a recorded one.
    pub(crate) fn try_insert(
        &mut self,
        base: u64,
        len: usize,
        segment: usize,
    ) -> Result<(), String> {
        if len == 0 {
            return Err(format!(
                "segment {segment} at {base:#x} is empty (zero-length segments are rejected)"
            ));
        }
        let Some(end) = end_of(base, len) else {
            return Err(format!(
                "segment {segment} at {base:#x} of {len} B runs past the end of the address space"
            ));
        };
        let before = self.ranges.range(..=base).next_back();
        let after = self.ranges.range(base..).next();
        for (&b, r) in before.into_iter().chain(after) {
            // `b` and `r` were checked on insertion, so their end is representable.
            let e = b + r.len as u64;
            if b < end && base < e {
                return Err(format!(
                    "segment {segment} at [{base:#x}, {end:#x}) overlaps segment {} at \
                     [{b:#x}, {e:#x})",
                    r.segment
                ));
            }
        }
        self.ranges.insert(base, Range { len, segment });
        Ok(())
    }

    /// Which segment holds `addr`, and where.
    pub(crate) fn lookup(&self, addr: u64) -> Option<SegmentHit> {
        self.find(addr).map(|(hit, _)| hit)
    }

    /// Which segment holds the whole of `[addr, addr + len)`, and where it starts; `None` if
    /// any byte of it lies outside that segment. A zero-length range needs `addr` itself to
    /// lie in a segment.
    pub(crate) fn lookup_range(&self, addr: u64, len: usize) -> Option<SegmentHit> {
        let (hit, seg_len) = self.find(addr)?;
        let end = hit.offset.checked_add(len)?;
        (end <= seg_len).then_some(hit)
    }

    /// The hit for `addr` and the length of the segment holding it.
    fn find(&self, addr: u64) -> Option<(SegmentHit, usize)> {
        let (&base, r) = self.ranges.range(..=addr).next_back()?;
        let offset = usize::try_from(addr - base).ok()?;
        (offset < r.len).then_some((
            SegmentHit {
                segment: r.segment,
                offset,
            },
            r.len,
        ))
    }

    /// Forget the segment based at `base`; returns its index, or `None` if no segment
    /// starts exactly there.
    #[cfg(test)]
    pub(crate) fn remove(&mut self, base: u64) -> Option<usize> {
        self.ranges.remove(&base).map(|r| r.segment)
    }

    /// Number of segments recorded.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no segment is recorded.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// One past the last byte of `[base, base + len)`, or `None` if that is not a `u64`.
fn end_of(base: u64, len: usize) -> Option<u64> {
    u64::try_from(len).ok().and_then(|l| base.checked_add(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A segment as the brute-force reference sees it.
    #[derive(Clone, Copy, Debug)]
    struct Seg {
        base: u64,
        len: usize,
        segment: usize,
    }

    impl Seg {
        fn end(&self) -> u64 {
            self.base + self.len as u64
        }
    }

    fn scan(segs: &[Seg], addr: u64) -> Option<SegmentHit> {
        segs.iter()
            .find(|s| s.base <= addr && addr < s.end())
            .map(|s| SegmentHit {
                segment: s.segment,
                offset: (addr - s.base) as usize,
            })
    }

    fn scan_range(segs: &[Seg], addr: u64, len: usize) -> Option<SegmentHit> {
        segs.iter()
            .find(|s| s.base <= addr && addr < s.end() && addr + len as u64 <= s.end())
            .map(|s| SegmentHit {
                segment: s.segment,
                offset: (addr - s.base) as usize,
            })
    }

    /// Non-overlapping segments (sometimes touching), given segment indices in an order
    /// unrelated to their addresses, and listed in a shuffled insertion order.
    fn segment_sets() -> impl Strategy<Value = Vec<Seg>> {
        (
            prop_oneof![Just(0u64), 0u64..1 << 40],
            prop::collection::vec(
                (
                    prop_oneof![Just(0u64), 1u64..3, 1u64..10_000],
                    1usize..5_000,
                ),
                0..24,
            ),
        )
            .prop_flat_map(|(start, shape)| {
                let mut base = start;
                let mut segs = Vec::new();
                for (i, (gap, len)) in shape.into_iter().enumerate() {
                    base += gap;
                    segs.push(Seg {
                        base,
                        len,
                        segment: i,
                    });
                    base += len as u64;
                }
                let n = segs.len();
                (
                    Just(segs),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            })
            .prop_map(|(segs, order, ids)| {
                order
                    .into_iter()
                    .zip(ids)
                    .map(|(i, id)| Seg {
                        segment: id,
                        ..segs[i]
                    })
                    .collect()
            })
    }

    fn build(segs: &[Seg]) -> SegmentMap {
        let mut map = SegmentMap::default();
        for s in segs {
            map.try_insert(s.base, s.len, s.segment)
                .expect("disjoint segments insert");
        }
        map
    }

    /// Addresses around every edge of every segment, and a few random ones.
    fn probes(segs: &[Seg], extra: &[u64]) -> Vec<u64> {
        let mut out = extra.to_vec();
        for s in segs {
            out.extend([s.base, s.end() - 1, s.end(), s.base + s.len as u64 / 2]);
            if s.base > 0 {
                out.push(s.base - 1);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn lookups_match_a_linear_scan(
            segs in segment_sets(),
            extra in prop::collection::vec(0u64..(1 << 40) + 200_000, 0..32),
        ) {
            let map = build(&segs);
            prop_assert_eq!(map.len(), segs.len());
            for addr in probes(&segs, &extra) {
                prop_assert_eq!(map.lookup(addr), scan(&segs, addr), "addr {:#x}", addr);
            }
            // The edges, spelled out.
            for s in &segs {
                let first = SegmentHit { segment: s.segment, offset: 0 };
                let last = SegmentHit { segment: s.segment, offset: s.len - 1 };
                prop_assert_eq!(map.lookup(s.base), Some(first));
                prop_assert_eq!(map.lookup(s.end() - 1), Some(last));
                prop_assert_ne!(map.lookup(s.end()).map(|h| h.segment), Some(s.segment));
                if s.base > 0 {
                    prop_assert_ne!(map.lookup(s.base - 1).map(|h| h.segment), Some(s.segment));
                }
            }
        }

        #[test]
        fn range_lookups_match_a_linear_scan(
            segs in segment_sets(),
            lens in prop::collection::vec(0usize..6_000, 1..8),
        ) {
            let map = build(&segs);
            for (k, addr) in probes(&segs, &[]).into_iter().enumerate() {
                let len = lens[k % lens.len()];
                prop_assert_eq!(
                    map.lookup_range(addr, len),
                    scan_range(&segs, addr, len),
                    "[{:#x}, +{})", addr, len
                );
            }
            for s in &segs {
                let whole = SegmentHit { segment: s.segment, offset: 0 };
                prop_assert_eq!(map.lookup_range(s.base, s.len), Some(whole));
                prop_assert_eq!(map.lookup_range(s.base, s.len + 1), None);
                prop_assert_eq!(map.lookup_range(s.end() - 1, 2), None);
                prop_assert_eq!(map.lookup_range(s.base, usize::MAX), None);
            }
        }

        #[test]
        fn overlapping_inserts_are_refused_and_change_nothing(
            segs in segment_sets(),
            base in 0u64..(1 << 40) + 200_000,
            len in 0usize..20_000,
            pick in any::<prop::sample::Index>(),
            shift in 0usize..5_000,
        ) {
            let mut map = build(&segs);
            // Mostly, aim the new range at a recorded segment: starting inside it, or
            // starting before it and perhaps running into it.
            let base = match (segs.is_empty(), shift % 3) {
                (true, _) | (_, 0) => base,
                (_, 1) => {
                    let s = segs[pick.index(segs.len())];
                    s.base + (shift % s.len) as u64
                }
                _ => segs[pick.index(segs.len())].base.saturating_sub(shift as u64 / 3 + 1),
            };
            let before = map.clone();
            let overlaps = segs
                .iter()
                .any(|s| base.max(s.base) < (base + len as u64).min(s.end()));
            let got = map.try_insert(base, len, 999);
            if len == 0 || overlaps {
                let err = got.expect_err("refused");
                prop_assert!(err.contains(if len == 0 { "empty" } else { "overlaps" }), "{}", err);
                prop_assert_eq!(&map, &before);
            } else {
                prop_assert_eq!(got, Ok(()));
                prop_assert_eq!(map.lookup(base), Some(SegmentHit { segment: 999, offset: 0 }));
                prop_assert_eq!(map.len(), before.len() + 1);
            }
        }

        #[test]
        fn removed_segments_are_gone_and_others_stay(
            segs in segment_sets(),
            pick in any::<prop::sample::Index>(),
        ) {
            prop_assume!(!segs.is_empty());
            let mut map = build(&segs);
            let gone = segs[pick.index(segs.len())];
            if gone.len > 1 {
                prop_assert_eq!(map.remove(gone.base + 1), None);
            }
            prop_assert_eq!(map.remove(gone.base), Some(gone.segment));
            prop_assert_eq!(map.remove(gone.base), None);
            let rest: Vec<Seg> = segs.iter().copied().filter(|s| s.base != gone.base).collect();
            for addr in probes(&segs, &[]) {
                prop_assert_eq!(map.lookup(addr), scan(&rest, addr), "addr {:#x}", addr);
            }
            // The freed range can be recorded again.
            prop_assert_eq!(map.try_insert(gone.base, gone.len, 7), Ok(()));
            prop_assert_eq!(map.lookup(gone.end() - 1),
                Some(SegmentHit { segment: 7, offset: gone.len - 1 }));
        }
    }

    #[test]
    fn bad_ranges_are_refused() {
        let mut map = SegmentMap::default();
        assert!(map.is_empty());
        let err = map.try_insert(0x1000, 0, 0).expect_err("empty");
        assert!(err.contains("zero-length"), "{err}");
        let err = map.try_insert(u64::MAX - 10, 11, 0).expect_err("wraps");
        assert!(err.contains("address space"), "{err}");
        assert_eq!(map.try_insert(u64::MAX - 10, 10, 3), Ok(()));
        assert_eq!(
            map.lookup(u64::MAX - 1),
            Some(SegmentHit {
                segment: 3,
                offset: 9
            })
        );
        assert_eq!(map.lookup(u64::MAX), None);
        assert_eq!(map.lookup_range(u64::MAX - 1, 1).map(|h| h.offset), Some(9));
        assert_eq!(map.lookup_range(u64::MAX - 1, 2), None);
        assert!(!map.is_empty());
        assert_eq!(map.len(), 1);
    }

    #[test]
    #[should_panic(expected = "overlaps segment 0")]
    fn insert_panics_on_overlap() {
        let mut map = SegmentMap::default();
        map.insert(0x1000, 0x100, 0);
        map.insert(0x10ff, 0x100, 1);
    }
}
