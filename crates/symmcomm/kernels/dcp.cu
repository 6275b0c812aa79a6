// dcp.cu: the combine of decode context parallelism (src/dcp/): the correction step of the
// all-gather / correct / reduce-scatter sequence (`cp_lse_ag_out_rs`), and the fused combine
// that exchanges the partial outputs over NVLink and merges this rank's heads in one kernel
// with one cross-GPU barrier. Maths in f32, no fast math; empty shards (NaN or +inf LSE, and
// -inf) weigh 0 and their outputs are never read; all-empty rows give zeros and LSE -inf.
//
// The fused kernel speaks the protocol of collectives.cu (epoch per launch, signal pad, 64-bit
// flags, deadlines, workspace double-buffered on the epoch's parity): it is compiled from that
// source, entry points left out, and it runs on the same pad and state as the group's other
// kernels. Layouts and launch rules: crates/symmcomm/KERNELS.md, section 9.
//
// No multimem / multicast instructions anywhere (see /work/shared/gpu-machine.md).

#define SYMM_PROTOCOL_ONLY
#include "collectives.cu"

#define DCP_BLOCK_THREADS 512

// The second by-value argument of every DCP kernel; mirrored by `#[repr(C)] DcpArgs` in
// src/kernels.rs (56 bytes, no padding).
struct DcpArgs {
    unsigned long long partial;    // [B, H, D] partial output of this rank (TIn)
    unsigned long long lse;        // correct: [N, B, H] f32 of every rank; fused: [B, H] f32, this rank's
    unsigned long long out;        // correct: [H, B, D] (TOut); fused: [H/N, B, D] (TOut)
    unsigned long long merged_lse; // [B, H/N] f32, or 0 for none
    unsigned int world;            // N
    unsigned int rank;             // this rank, < N
    unsigned int batch;            // B
    unsigned int heads;            // H, a multiple of N
    unsigned int dim;              // D, a multiple of 8
    unsigned int base2;            // 1: LSEs are log2, 0: natural log
};

static_assert(sizeof(DcpArgs) == 56, "DcpArgs size");

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
// same rows [lo, hi) (symm_block_range), one warp per row.
//   push:    for each peer p, partial[b, p*H/N + hl, :] -> slot(p, parity, rank).o[row, :] and
//            lse[b, p*H/N + hl] -> slot(p, parity, rank).lse[row]   (NVLink stores)
//   barrier: symm_block_barrier, phase 0 (one flag per peer per block)
//   merge:   out[hl, b, :] = sum over s of w_s * (s == rank ? partial[b, h, :] : slot(rank, parity,
//            s).o[row, :]), in f32 in rank order, shards of weight 0 skipped; merged_lse = S.
// A slot holds o [rows, D] (TIn) at 0, then lse [rows] (f32) at round_up(rows * D * ES, 16).

template <class TIn, class TOut>
SYMM_DEVICE void dcp_fused(const SymmArgs& a, const DcpArgs& d) {
    SymmLaunch l;
    if (!symm_begin(a, &l)) {
        return;
    }
    const bool shape_ok = d.world == a.world && d.rank == a.rank && d.world >= 2 &&
                          d.heads % d.world == 0 && d.dim % 8 == 0 && d.dim > 0 &&
                          d.batch <= (1u << 24) && d.heads <= (1u << 16) && d.dim <= (1u << 16) &&
                          symm_aligned16(d.partial) && symm_aligned16(d.out);
    const unsigned int hl = shape_ok ? d.heads / d.world : 0;
    const unsigned long long rows = (unsigned long long)d.batch * hl;
    const unsigned long long row_in = (unsigned long long)d.dim * TIn::ES;
    const unsigned long long lse_off = (rows * row_in + 15) / 16 * 16;
    const bool ok = shape_ok && symm_args_ok(a, lse_off + rows * 4, true);
    if (ok) {
        const bool base2 = d.base2 != 0;
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned int lane = threadIdx.x & 31u;
        const unsigned int warp = threadIdx.x >> 5;
        const unsigned int warps = blockDim.x >> 5;
        const unsigned int units = (unsigned int)(row_in / 16);
        const unsigned int vecs = d.dim / 8;
        const unsigned char* partial = reinterpret_cast<const unsigned char*>(d.partial);
        const float* lse = reinterpret_cast<const float*>(d.lse);
        unsigned long long lo, hi;
        symm_block_range(rows, 1, &lo, &hi);
        // Push: peers in the order rank+1, rank+2, ... so that the ranks do not all store into
        // the same peer at once.
        for (unsigned int i = 1; i < a.world; ++i) {
            const unsigned int p = (a.rank + i) % a.world;
            unsigned char* slot = symm_ws_slot(a, p, 0, parity, a.rank);
            float* slot_lse = reinterpret_cast<float*>(slot + lse_off);
            for (unsigned long long row = lo + warp; row < hi; row += warps) {
                const unsigned long long b = row / hl;
                const unsigned long long h = (unsigned long long)p * hl + row % hl;
                const uint4* src =
                    reinterpret_cast<const uint4*>(partial + (b * d.heads + h) * row_in);
                uint4* dst = reinterpret_cast<uint4*>(slot + row * row_in);
                for (unsigned int k = lane; k < units; k += 32) {
                    dst[k] = src[k];
                }
                if (lane == 0) {
                    slot_lse[row] = lse[b * d.heads + h];
                }
            }
        }
        symm_block_barrier(a, l, 0);
        for (unsigned long long row = lo + warp; row < hi; row += warps) {
            const unsigned long long b = row / hl;
            const unsigned int hh = (unsigned int)(row % hl);
            const unsigned long long h = (unsigned long long)a.rank * hl + hh;
            const unsigned char* own_row = partial + (b * d.heads + h) * row_in;
            const auto lse_of = [&](unsigned int s) {
                return dcp_sanitize(
                    s == a.rank ? lse[b * d.heads + h]
                                : reinterpret_cast<const float*>(
                                      symm_ws_slot(a, a.rank, 0, parity, s) + lse_off)[row]);
            };
            const float merged = dcp_merged_lse(lse_of, a.world, base2);
            if (lane == 0 && d.merged_lse != 0) {
                reinterpret_cast<float*>(d.merged_lse)[b * hl + hh] = merged;
            }
            unsigned char* dst = reinterpret_cast<unsigned char*>(d.out) +
                                 ((unsigned long long)hh * d.batch + b) * d.dim * TOut::ES;
            for (unsigned int k = lane; k < vecs; k += 32) {
                float acc[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    acc[j] = 0.0f;
                }
                for (unsigned int s = 0; s < a.world; ++s) {
                    const float w = dcp_weight(lse_of(s), merged, base2);
                    if (w != 0.0f) {
                        const unsigned char* src =
                            s == a.rank ? own_row
                                        : symm_ws_slot(a, a.rank, 0, parity, s) + row * row_in;
                        float f[8];
                        dcp_load8<TIn>(src + (unsigned long long)k * 8 * TIn::ES, f);
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            acc[j] = __fadd_rn(acc[j], __fmul_rn(w, f[j]));
                        }
                    }
                }
                dcp_store8<TOut>(dst + (unsigned long long)k * 8 * TOut::ES, acc);
            }
        }
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
}

// ---------------------------------------------------------------------------------------------
// Entry points: dcp_{correct,fused}_<partial dtype>_<output dtype>. Correction: any grid, any
// block that is a multiple of 32 up to 512. Fused: block (512, 1, 1), grid 1..64, the same on
// every rank of the group (KERNELS.md section 4).

#define DCP_KERNEL extern "C" __global__ void __launch_bounds__(DCP_BLOCK_THREADS)

DCP_KERNEL dcp_correct_bf16_bf16(const DcpArgs d) { dcp_correct<SymmBF16, SymmBF16>(d); }
DCP_KERNEL dcp_correct_bf16_f32(const DcpArgs d) { dcp_correct<SymmBF16, SymmF32>(d); }
DCP_KERNEL dcp_correct_f32_bf16(const DcpArgs d) { dcp_correct<SymmF32, SymmBF16>(d); }
DCP_KERNEL dcp_correct_f32_f32(const DcpArgs d) { dcp_correct<SymmF32, SymmF32>(d); }

DCP_KERNEL dcp_fused_bf16_bf16(const SymmArgs a, const DcpArgs d) { dcp_fused<SymmBF16, SymmBF16>(a, d); }
DCP_KERNEL dcp_fused_bf16_f32(const SymmArgs a, const DcpArgs d) { dcp_fused<SymmBF16, SymmF32>(a, d); }
DCP_KERNEL dcp_fused_f32_bf16(const SymmArgs a, const DcpArgs d) { dcp_fused<SymmF32, SymmBF16>(a, d); }
DCP_KERNEL dcp_fused_f32_f32(const SymmArgs a, const DcpArgs d) { dcp_fused<SymmF32, SymmF32>(a, d); }
