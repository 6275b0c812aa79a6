// dcp.cu: the combine of decode context parallelism (src/dcp/): the correction step of the
// all-gather / correct / reduce-scatter sequence (`cp_lse_ag_out_rs`), and the fused combine
// that exchanges the partial outputs over NVLink and merges this rank's heads in one kernel
// with one cross-GPU barrier. Maths in f32, no fast math; empty shards (NaN or +inf LSE, and
// -inf) weigh 0 and their outputs are never read; all-empty rows give zeros and LSE -inf.
//
// The fused kernel speaks the protocol of symm_protocol.cuh, as the collectives do (epoch per
// launch, signal pad, 64-bit flags, deadlines, workspace double-buffered on the epoch's parity),
// and it runs on the same pad and state as the group's other kernels. DcpArgs and
// DCP_BLOCK_THREADS come from symm_abi.cuh, generated from crates/symmcomm/src/kernels/abi.rs.
// Layouts and launch rules: crates/symmcomm/KERNELS.md, section 9.
//
// No multimem / multicast instructions anywhere: the GPU machines this project runs on must never
// run NVLink multicast (crates/symmcomm/KERNELS.md, introduction; a test greps for them).

#include "symm_protocol.cuh"

SYMM_DEVICE float dcp_neg_inf() { return __int_as_float(0xff800000); }

SYMM_DEVICE float dcp_exp(float x, bool base2) { return base2 ? exp2f(x) : expf(x); }

SYMM_DEVICE float dcp_log(float x, bool base2) { return base2 ? log2f(x) : logf(x); }

// NaN and +inf mark an empty shard (FlashMLA writes +inf for an empty split): read as -inf.
SYMM_DEVICE float dcp_sanitize(float x) {
    return (x != x || x == __int_as_float(0x7f800000)) ? dcp_neg_inf() : x;
}

// The merged LSE of one row from its shards' LSEs, `lse_of(s)` for s < world, already sanitized:
// m = max, then S = m + log(sum in source order of exp(x_s - m)); -inf when every shard is empty.
// A shard's weight is then dcp_weight(x_s, S). The same operations, in the same order, as
// `merge_weights_f32` in src/dcp/merge.rs. The LSEs are read again rather than held in an array
// (a dynamically indexed array would live on the stack).
template <class LseOf>
SYMM_DEVICE float dcp_merged_lse(const LseOf& lse_of, unsigned int world, bool base2) {
    float m = dcp_neg_inf();
    for (unsigned int s = 0; s < world; ++s) {
        m = fmaxf(m, lse_of(s));
    }
    if (m == dcp_neg_inf()) {
        return m;
    }
    float sum = 0.0f;
    for (unsigned int s = 0; s < world; ++s) {
        sum = __fadd_rn(sum, dcp_exp(__fsub_rn(lse_of(s), m), base2));
    }
    return __fadd_rn(m, dcp_log(sum, base2));
}

// Weight of a shard of (sanitized) LSE x in a row of merged LSE `merged`: 0 for an empty shard
// and for all-empty rows.
SYMM_DEVICE float dcp_weight(float x, float merged, bool base2) {
    if (merged == dcp_neg_inf()) {
        return 0.0f;
    }
    const float d = __fsub_rn(x, merged);
    return d == d ? dcp_exp(d, base2) : 0.0f;
}

// Eight elements at p (16-byte aligned) to f32, and back.
template <class Ty>
SYMM_DEVICE void dcp_load8(const unsigned char* p, float* f) {
    if constexpr (Ty::ES == 2) {
        symm_unit_to_f32<Ty>(*reinterpret_cast<const uint4*>(p), f);
    } else {
        symm_unit_to_f32<Ty>(reinterpret_cast<const uint4*>(p)[0], f);
        symm_unit_to_f32<Ty>(reinterpret_cast<const uint4*>(p)[1], f + 4);
    }
}

// E = 4 or 8 f32 values stored as Ty at p (aligned to E * Ty::ES bytes).
template <class Ty, int E>
SYMM_DEVICE void dcp_store(unsigned char* p, const float* f) {
    if constexpr (E * Ty::ES == 16) {
        *reinterpret_cast<uint4*>(p) = symm_f32_to_unit<Ty>(f);
    } else if constexpr (E * Ty::ES == 32) {
        reinterpret_cast<uint4*>(p)[0] = symm_f32_to_unit<Ty>(f);
        reinterpret_cast<uint4*>(p)[1] = symm_f32_to_unit<Ty>(f + 4);
    } else {
        static_assert(E * Ty::ES == 8, "4 two-byte elements");
        *reinterpret_cast<uint2*>(p) = make_uint2(Ty::from_f32(f[0]) | (Ty::from_f32(f[1]) << 16),
                                                  Ty::from_f32(f[2]) | (Ty::from_f32(f[3]) << 16));
    }
}

template <class Ty>
SYMM_DEVICE void dcp_store8(unsigned char* p, const float* f) {
    if constexpr (Ty::ES == 2) {
        *reinterpret_cast<uint4*>(p) = symm_f32_to_unit<Ty>(f);
    } else {
        reinterpret_cast<uint4*>(p)[0] = symm_f32_to_unit<Ty>(f);
        reinterpret_cast<uint4*>(p)[1] = symm_f32_to_unit<Ty>(f + 4);
    }
}

// ---------------------------------------------------------------------------------------------
// Correction: one warp per (b, h) row, grid-stride. corrected[h, b, :] = w_rank * partial[b, h, :]
// (zeros where w_rank == 0), and merged_lse[b, h - rank*H/N] = S for this rank's heads. Any world
// size: the weights are computed in two passes over the LSEs instead of being held.

template <class TIn, class TOut>
SYMM_DEVICE void dcp_correct(const DcpArgs& d) {
    symm_grid_dependency_wait();
    if (d.world == 0 || d.heads % d.world != 0 || d.dim % 8 != 0 || d.rank >= d.world) {
        return; // the host validates; never touch memory on a bad shape
    }
    const bool base2 = d.base2 != 0;
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = blockDim.x >> 5;
    const unsigned long long rows = (unsigned long long)d.batch * d.heads;
    const unsigned int hl = d.heads / d.world;
    const unsigned int vecs = d.dim / 8;
    const float* lse = reinterpret_cast<const float*>(d.lse);
    for (unsigned long long row = (unsigned long long)blockIdx.x * warps + (threadIdx.x >> 5);
         row < rows; row += (unsigned long long)gridDim.x * warps) {
        const unsigned long long b = row / d.heads;
        const unsigned int h = (unsigned int)(row % d.heads);
        const unsigned long long stride = (unsigned long long)d.batch * d.heads;
        const auto lse_of = [&](unsigned int s) { return dcp_sanitize(lse[s * stride + row]); };
        const float merged = dcp_merged_lse(lse_of, d.world, base2);
        const float w = dcp_weight(lse_of(d.rank), merged, base2);
        if (lane == 0 && d.merged_lse != 0 && h / hl == d.rank) {
            reinterpret_cast<float*>(d.merged_lse)[b * hl + (h - d.rank * hl)] = merged;
        }
        const unsigned char* src =
            reinterpret_cast<const unsigned char*>(d.partial) + row * d.dim * TIn::ES;
        unsigned char* dst = reinterpret_cast<unsigned char*>(d.out) +
                             ((unsigned long long)h * d.batch + b) * d.dim * TOut::ES;
        for (unsigned int k = lane; k < vecs; k += 32) {
            float f[8];
            if (w != 0.0f) {
                dcp_load8<TIn>(src + (unsigned long long)k * 8 * TIn::ES, f);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    f[j] = __fmul_rn(f[j], w);
                }
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    f[j] = 0.0f;
                }
            }
            dcp_store8<TOut>(dst + (unsigned long long)k * 8 * TOut::ES, f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fused combine. Rows are (b, hl) pairs, row = b * H/N + hl; block k of every rank handles the
// same rows [lo, hi) (symm_block_range).
//   push:    for each peer p, partial[b, p*H/N + hl, :] -> slot(p, parity, rank).o[row, :] and
//            lse[b, p*H/N + hl] -> slot(p, parity, rank).lse[row]   (NVLink stores)
//   barrier: symm_block_barrier, phase 0 (one flag per peer per block)
//   merge:   out[hl, b, :] = sum over s of w_s * (s == rank ? partial[b, h, :] : slot(rank, parity,
//            s).o[row, :]), in f32 in rank order, shards of weight 0 skipped; merged_lse = S.
// A slot holds o [rows, D] (TIn) at 0, then lse [rows] (f32) at round_up(rows * D * ES, 16).
// Work is spread over all threads of the block as flat (row, 16-byte unit) items, several loads
// in flight per thread, so that no thread waits on one load at a time.

#define DCP_UNROLL 4
// Up to this many rows per block, every merge item computes its row's weights itself (latency
// bound: one memory round trip); above, weights are computed once per row into shared memory.
#define DCP_ITEM_WEIGHT_ROWS 8
#define DCP_TILE_ROWS 64

// What the tile merge of the fused combine needs (see dcp_fused).
struct DcpTile {
    unsigned int t0, tn, units, hl, rank, heads, batch;
    unsigned long long row_in, row_out;
    const unsigned char* partial;
    const unsigned char* ws_mine;
    unsigned long long slot0, slot_stride;
    unsigned char* out;
};

// Merge rows [t0, t0 + tn) of a tile whose weights are in tile_w, by 16-byte units of the
// partial rows (E = 16 / TIn::ES elements): U items per thread and round, shards in groups of S.
// All U x S loads of a group are issued before any is used, so a round costs one memory round
// trip per group: ceil(world / S). Shards of weight 0 are not loaded.
template <class TIn, class TOut, int S, int U>
SYMM_DEVICE void dcp_merge_tile(const DcpTile& t, const float (*tile_w)[SYMM_MAX_WORLD],
                                unsigned int shards) {
    constexpr int E = 16 / TIn::ES;
    const unsigned int items = t.tn * t.units;
    for (unsigned int it0 = threadIdx.x; it0 < items; it0 += blockDim.x * U) {
        float acc[U][E];
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int j = 0; j < E; ++j) {
                acc[u][j] = 0.0f;
            }
        }
#pragma unroll 1
        for (unsigned int s0 = 0; s0 < shards; s0 += S) {
            float w[U][S];
            uint4 raw[U][S];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const unsigned int it = it0 + u * blockDim.x;
                const unsigned int tr = it / t.units;
                const unsigned int k = it - tr * t.units;
                const unsigned int row = t.t0 + tr;
                const unsigned int b = row / t.hl;
                const unsigned long long h = (unsigned long long)t.rank * t.hl + (row - b * t.hl);
#pragma unroll
                for (int q = 0; q < S; ++q) {
                    const unsigned int s = s0 + q;
                    w[u][q] = it < items && s < shards ? tile_w[tr][s] : 0.0f;
                    if (w[u][q] != 0.0f) {
                        const unsigned char* src =
                            s == t.rank ? t.partial + ((unsigned long long)b * t.heads + h) * t.row_in
                                        : t.ws_mine + t.slot0 + s * t.slot_stride + row * t.row_in;
                        raw[u][q] = *reinterpret_cast<const uint4*>(src + k * 16ULL);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int q = 0; q < S; ++q) {
                    if (w[u][q] != 0.0f) {
                        float f[E];
                        symm_unit_to_f32<TIn>(raw[u][q], f);
#pragma unroll
                        for (int j = 0; j < E; ++j) {
                            acc[u][j] = __fadd_rn(acc[u][j], __fmul_rn(w[u][q], f[j]));
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const unsigned int it = it0 + u * blockDim.x;
            if (it < items) {
                const unsigned int tr = it / t.units;
                const unsigned int k = it - tr * t.units;
                const unsigned int row = t.t0 + tr;
                const unsigned int b = row / t.hl;
                const unsigned int hh = row - b * t.hl;
                dcp_store<TOut, E>(t.out + ((unsigned long long)hh * t.batch + b) * t.row_out +
                                       (unsigned long long)k * E * TOut::ES,
                                   acc[u]);
            }
        }
    }
}

template <class TIn, class TOut>
SYMM_DEVICE void dcp_fused(const SymmArgs& a, const DcpArgs& d) {
    __shared__ float tile_w[DCP_TILE_ROWS][SYMM_MAX_WORLD];
    symm_enter();
    // Indices below are 32-bit (64-bit division costs ~10x more): rows x (16-byte units per row)
    // must stay under 2^31, i.e. at most 32 GiB of partial rows per peer.
    const bool shape_ok = d.world == a.world && d.rank == a.rank && d.world >= 2 &&
                          d.heads % d.world == 0 && d.dim % 8 == 0 && d.dim > 0 &&
                          (unsigned long long)d.batch * (d.heads / d.world) * (d.dim / 8) *
                                  (TIn::ES == 4 ? 2 : 1) < (1ULL << 31) &&
                          symm_aligned16(d.partial) && symm_aligned16(d.out);
    const unsigned int hl = shape_ok ? d.heads / d.world : 0;
    const unsigned int rows = d.batch * hl;
    const unsigned long long row_in = (unsigned long long)d.dim * TIn::ES;
    const unsigned long long row_out = (unsigned long long)d.dim * TOut::ES;
    const unsigned long long lse_off = ((unsigned long long)rows * row_in + 15) / 16 * 16;
    const auto check = [&] {
        return shape_ok && symm_args_ok(a, lse_off + (unsigned long long)rows * 4, true);
    };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const bool base2 = d.base2 != 0;
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned int units = (unsigned int)(row_in / 16); // 16-byte units per row
        const unsigned int vecs = d.dim / 8;                    // 8-element vectors per row
        const unsigned char* partial = reinterpret_cast<const unsigned char*>(d.partial);
        const float* lse = reinterpret_cast<const float*>(d.lse);
        unsigned long long lo64, hi64;
        symm_block_range(rows, 1, &lo64, &hi64);
        const unsigned int lo = (unsigned int)lo64, hi = (unsigned int)hi64;
        const unsigned int n = hi - lo;
        // Push: peers in the order rank+1, rank+2, ... so that the ranks do not all store into
        // the same peer at once; DCP_UNROLL loads in flight before their stores.
        for (unsigned int i = 1; i < a.world; ++i) {
            const unsigned int p = (a.rank + i) % a.world;
            unsigned char* slot = symm_ws_slot(a, p, 0, parity, a.rank);
            const unsigned int items = n * units;
            for (unsigned int base = threadIdx.x; base < items; base += blockDim.x * DCP_UNROLL) {
                uint4 v[DCP_UNROLL];
                unsigned long long at[DCP_UNROLL];
#pragma unroll
                for (int u = 0; u < DCP_UNROLL; ++u) {
                    const unsigned int it = base + u * blockDim.x;
                    at[u] = ~0ULL;
                    if (it < items) {
                        const unsigned int row = lo + it / units;
                        const unsigned int k = it % units;
                        const unsigned int b = row / hl;
                        const unsigned int h = p * hl + (row - b * hl);
                        v[u] = reinterpret_cast<const uint4*>(
                            partial + ((unsigned long long)b * d.heads + h) * row_in)[k];
                        at[u] = (unsigned long long)row * row_in + k * 16ULL;
                    }
                }
#pragma unroll
                for (int u = 0; u < DCP_UNROLL; ++u) {
                    if (at[u] != ~0ULL) {
                        *reinterpret_cast<uint4*>(slot + at[u]) = v[u];
                    }
                }
            }
            float* slot_lse = reinterpret_cast<float*>(slot + lse_off);
            for (unsigned int r = threadIdx.x; r < n; r += blockDim.x) {
                const unsigned int row = lo + r;
                const unsigned int b = row / hl;
                slot_lse[row] = lse[(unsigned long long)b * d.heads + p * hl + (row - b * hl)];
            }
        }
        symm_block_barrier(a, l, 0);
        // Merge: one (row, 16-byte unit of the partial row) item per thread and round. Each
        // thread loads every shard's LSE and data for its item at once (one memory round trip),
        // then computes the row's weights itself (the loads of a warp's threads hit the same LSE
        // words) and skips shards of weight 0 (their data, possibly NaN, is loaded, never used).
        const unsigned char* ws_mine = reinterpret_cast<const unsigned char*>(a.ws[a.rank]);
        const unsigned long long slot_stride = a.slot_bytes;
        const unsigned long long slot0 = (unsigned long long)parity * a.world * slot_stride;
        constexpr int E = 16 / TIn::ES; // elements per item
        const unsigned int items = n * units;
        if (n <= DCP_ITEM_WEIGHT_ROWS) {
            for (unsigned int it = threadIdx.x; it < items; it += blockDim.x) {
                const unsigned int r = it / units;
                const unsigned int k = it - r * units;
                const unsigned int row = lo + r;
                const unsigned int b = row / hl;
                const unsigned int hh = row - b * hl;
                const unsigned long long bh = (unsigned long long)b * d.heads + a.rank * hl + hh;
                float x[SYMM_MAX_WORLD];
                uint4 raw[SYMM_MAX_WORLD];
#pragma unroll
                for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
                    x[s] = dcp_neg_inf();
                    if (s < a.world) {
                        const unsigned char* slot = ws_mine + slot0 + s * slot_stride;
                        x[s] = s == a.rank ? lse[bh]
                                           : reinterpret_cast<const float*>(slot + lse_off)[row];
                        raw[s] = *reinterpret_cast<const uint4*>(
                            (s == a.rank ? partial + bh * row_in : slot + row * row_in) + k * 16ULL);
                    }
                }
#pragma unroll
                for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
                    x[s] = dcp_sanitize(x[s]);
                }
                const auto lse_of = [&](unsigned int s) {
                    float v = x[0];
#pragma unroll
                    for (unsigned int t = 1; t < SYMM_MAX_WORLD; ++t) {
                        v = s == t ? x[t] : v;
                    }
                    return v;
                };
                const float merged = dcp_merged_lse(lse_of, a.world, base2);
                float acc[E];
#pragma unroll
                for (int j = 0; j < E; ++j) {
                    acc[j] = 0.0f;
                }
#pragma unroll
                for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
                    const float w = s < a.world ? dcp_weight(x[s], merged, base2) : 0.0f;
                    if (w != 0.0f) {
                        float f[E];
                        symm_unit_to_f32<TIn>(raw[s], f);
#pragma unroll
                        for (int j = 0; j < E; ++j) {
                            acc[j] = __fadd_rn(acc[j], __fmul_rn(w, f[j]));
                        }
                    }
                }
                dcp_store<TOut, E>(reinterpret_cast<unsigned char*>(d.out) +
                                       ((unsigned long long)hh * d.batch + b) * row_out +
                                       (unsigned long long)k * E * TOut::ES,
                                   acc);
                if (k == 0 && d.merged_lse != 0) {
                    reinterpret_cast<float*>(d.merged_lse)[(unsigned long long)b * hl + hh] = merged;
                }
            }
        } else {
            // Many rows per block: weights once per row, by tiles of DCP_TILE_ROWS rows (one thread
            // per row into shared memory), then the block merges the tile by 8-element vectors.
            for (unsigned int t0 = lo; t0 < hi; t0 += DCP_TILE_ROWS) {
                const unsigned int tn = min(DCP_TILE_ROWS, hi - t0);
                // Weights of the tile's rows: one thread per row, the shards' LSEs loaded at once.
                if (threadIdx.x < tn) {
                    const unsigned int row = t0 + threadIdx.x;
                    const unsigned int b = row / hl;
                    const unsigned int hh = row - b * hl;
                    const unsigned long long h = (unsigned long long)a.rank * hl + hh;
                    float x[SYMM_MAX_WORLD];
#pragma unroll
                    for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
                        x[s] = dcp_neg_inf();
                        if (s < a.world) {
                            x[s] = dcp_sanitize(
                                s == a.rank ? lse[(unsigned long long)b * d.heads + h]
                                            : reinterpret_cast<const float*>(
                                                  ws_mine + slot0 + s * slot_stride + lse_off)[row]);
                        }
                    }
                    const auto lse_of = [&](unsigned int s) {
                        float v = x[0];
#pragma unroll
                        for (unsigned int t = 1; t < SYMM_MAX_WORLD; ++t) {
                            v = s == t ? x[t] : v;
                        }
                        return v;
                    };
                    const float merged = dcp_merged_lse(lse_of, a.world, base2);
#pragma unroll
                    for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
                        tile_w[threadIdx.x][s] = s < a.world ? dcp_weight(x[s], merged, base2) : 0.0f;
                    }
                    if (d.merged_lse != 0) {
                        reinterpret_cast<float*>(d.merged_lse)[(unsigned long long)b * hl + hh] = merged;
                    }
                }
                __syncthreads();
                const DcpTile t = {t0,     tn,      units,  hl,          a.rank,  d.heads,
                                   d.batch, row_in, row_out, partial, ws_mine, slot0,
                                   slot_stride, reinterpret_cast<unsigned char*>(d.out)};
                // Loads in flight per thread: 4 (2 ranks: 2 items x 2 shards; 4 and 8 ranks: 1
                // item x 4 shards; otherwise 4 items x 1 shard). More spill under the 128
                // registers of 512-thread blocks.
                switch (a.world) {
                case 2:
                    dcp_merge_tile<TIn, TOut, 2, 2>(t, tile_w, a.world);
                    break;
                case 4:
                case 8:
                    dcp_merge_tile<TIn, TOut, 4, 1>(t, tile_w, a.world);
                    break;
                default:
                    dcp_merge_tile<TIn, TOut, 1, DCP_UNROLL>(t, tile_w, a.world);
                    break;
                }
                __syncthreads();
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Entry points: dcp_{correct,fused}_<partial dtype>_<output dtype>. Correction: any grid, any
// block that is a multiple of 32 up to 512. Fused: block (512, 1, 1), grid 1..128, the same on
// every rank of the group (KERNELS.md section 4).

#define DCP_KERNEL extern "C" __global__ void __launch_bounds__(DCP_BLOCK_THREADS, 1)

DCP_KERNEL dcp_correct_bf16_bf16(const DcpArgs d) { dcp_correct<SymmBF16, SymmBF16>(d); }
DCP_KERNEL dcp_correct_bf16_f32(const DcpArgs d) { dcp_correct<SymmBF16, SymmF32>(d); }
DCP_KERNEL dcp_correct_f32_bf16(const DcpArgs d) { dcp_correct<SymmF32, SymmBF16>(d); }
DCP_KERNEL dcp_correct_f32_f32(const DcpArgs d) { dcp_correct<SymmF32, SymmF32>(d); }

DCP_KERNEL dcp_fused_bf16_bf16(const SymmArgs a, const DcpArgs d) { dcp_fused<SymmBF16, SymmBF16>(a, d); }
DCP_KERNEL dcp_fused_bf16_f32(const SymmArgs a, const DcpArgs d) { dcp_fused<SymmBF16, SymmF32>(a, d); }
DCP_KERNEL dcp_fused_f32_bf16(const SymmArgs a, const DcpArgs d) { dcp_fused<SymmF32, SymmBF16>(a, d); }
DCP_KERNEL dcp_fused_f32_f32(const SymmArgs a, const DcpArgs d) { dcp_fused<SymmF32, SymmF32>(a, d); }
