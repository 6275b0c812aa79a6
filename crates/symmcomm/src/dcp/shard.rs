//! Where the KV cache of a request lives under DCP: token position `p` belongs to rank
//! `(p / I) % N` and sits at local slot `(p / (N·I))·I + p % I` of that rank's shard (interleave
//! `I`; `I = 1` is token-level round robin, `I = block_size` keeps whole blocks on one rank).

use serde::{Deserialize, Serialize};

/// The KV sharding of one DCP group: `world` ranks, interleave `interleave` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvSharding {
    world: usize,
    interleave: usize,
}

impl KvSharding {
    /// Sharding over `world` ranks in runs of `interleave` consecutive tokens; `None` when
    /// either is 0.
    pub fn new(world: usize, interleave: usize) -> Option<Self> {
        (world > 0 && interleave > 0).then_some(KvSharding { world, interleave })
    }

    /// Ranks in the DCP group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Consecutive tokens kept on one rank.
    pub fn interleave(&self) -> usize {
        self.interleave
    }

    /// The rank that stores token position `pos`.
    pub fn owner(&self, pos: usize) -> usize {
        (pos / self.interleave) % self.world
    }

    /// Where position `pos` sits in its owner's shard.
    pub fn local_slot(&self, pos: usize) -> usize {
        let i = self.interleave;
        (pos / (self.world * i)) * i + pos % i
    }

    /// The position stored at `local_slot` of `rank`'s shard (the inverse of
    /// [`KvSharding::owner`] and [`KvSharding::local_slot`]).
    pub fn position(&self, rank: usize, local_slot: usize) -> usize {
        let i = self.interleave;
        (local_slot / i * self.world + rank) * i + local_slot % i
    }

    /// Tokens of a sequence of `seq_len` that `rank` stores: for `I = 1`,
    /// `seq_len / N + (rank < seq_len % N)`.
    pub fn local_len(&self, seq_len: usize, rank: usize) -> usize {
        let (n, i) = (self.world, self.interleave);
        let base = seq_len / i / n * i;
        let rest = seq_len - base * n;
        base + rest.saturating_sub(rank * i).min(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn owner_slot_and_length_match_enumeration(
            world in 1usize..9,
            interleave in 1usize..9,
            seq_len in 0usize..300,
        ) {
            let s = KvSharding::new(world, interleave).unwrap();
            // Brute force: walk the positions in order; each rank's shard fills slot by slot.
            let mut next = vec![0usize; world];
            for pos in 0..seq_len {
                // Runs of `interleave` tokens go to ranks 0, 1, ..., world-1, 0, ...
                let owner = (pos / interleave) % world;
                prop_assert_eq!(s.owner(pos), owner);
                prop_assert_eq!(s.local_slot(pos), next[owner]);
                prop_assert_eq!(s.position(owner, next[owner]), pos);
                next[owner] += 1;
            }
            for (rank, &n) in next.iter().enumerate() {
                prop_assert_eq!(s.local_len(seq_len, rank), n, "rank {}", rank);
            }
            prop_assert_eq!((0..world).map(|r| s.local_len(seq_len, r)).sum::<usize>(), seq_len);
        }

        #[test]
        fn interleave_one_is_the_round_robin_formula(world in 1usize..9, seq_len in 0usize..1000) {
            let s = KvSharding::new(world, 1).unwrap();
            for rank in 0..world {
                prop_assert_eq!(
                    s.local_len(seq_len, rank),
                    seq_len / world + usize::from(rank < seq_len % world)
                );
            }
        }
    }

    #[test]
    fn zero_sizes_are_refused() {
        assert!(KvSharding::new(0, 1).is_none());
        assert!(KvSharding::new(2, 0).is_none());
    }
}
