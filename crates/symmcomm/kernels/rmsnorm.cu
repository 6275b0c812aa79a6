// rmsnorm.cu: the residual add and RMSNorm that follow every all-reduce of a tensor-parallel
// decode layer (and every reduce-scatter of DP attention / sequence parallelism), alone and fused
// with the collective before it. For bf16 and f16, f32 arithmetic, per row of `hidden`
// elements:
//
//   a      = the collective's result: the ranks' rows summed in f32 in rank order and rounded
//            once to the element type (exactly what collectives.cu's all-reduce gives)
//   r      = round(f32(a) + f32(residual))                              -> residual_out
//   ss     = sum of f32(r)^2: per thread over its units in order, then a fixed tree over the block
//   rstd   = 1 / sqrt(ss / hidden + eps)                   (correctly rounded f32 operations)
//   normed = round((f32(r) * rstd) * f32(weight))                       -> normed
//
// so normed is exactly the RMSNorm of the residual_out a rank keeps, and the fused kernels give
// the same bits as the all-reduce of collectives.cu followed by symm_add_rmsnorm (they share the
// row step, rms_row). Rows are whole 16-byte units (hidden a multiple of 8), every buffer
// 16-byte aligned; one block normalises one row at a time, each thread holding at most
// RMSNORM_MAX_UNITS units of it in registers between the add and the norm.
//
// The fused kernels speak the protocol of symm_protocol.cuh on the group's pads, state and
// workspace, like the collectives: the LL kernels push every 16-byte unit as two LL lines and
// poll their own lines (no barrier); the others push rows into the peers' workspace slots and
// meet at one block barrier (two for two-shot). RmsNormArgs, RMSNORM_BLOCK_THREADS and
// RMSNORM_MAX_UNITS come from symm_abi.cuh, generated from crates/symmcomm/src/kernels/abi.rs.
// Layouts, algorithms and launch rules: crates/symmcomm/KERNELS.md, section 10.
//
// No multimem / multicast instructions anywhere: the GPU machines this project runs on must never
// run NVLink multicast (crates/symmcomm/KERNELS.md, introduction; a test greps for them).

#include "symm_protocol.cuh"

typedef unsigned long long rms_u64;

// ---------------------------------------------------------------------------------------------
// Arguments.

// 16-byte units per row, or 0 when a row is not whole units.
template <class Ty>
SYMM_DEVICE unsigned int rms_row_units(const RmsNormArgs& n) {
    const rms_u64 row = (rms_u64)n.hidden * Ty::ES;
    return row % 16 == 0 && row / 16 <= (rms_u64)RMSNORM_MAX_UNITS * RMSNORM_BLOCK_THREADS
               ? (unsigned int)(row / 16)
               : 0u;
}

// The shape and buffers every kernel of this file needs: rows of whole units that the block's
// threads can hold, a 1-D block of whole warps, every buffer non-null and 16-byte aligned.
template <class Ty>
SYMM_DEVICE bool rms_shape_ok(const RmsNormArgs& n) {
    const unsigned int units = rms_row_units<Ty>(n);
    const bool block = blockDim.x <= RMSNORM_BLOCK_THREADS && blockDim.x % 32 == 0 &&
                       blockDim.y == 1 && blockDim.z == 1;
    const unsigned long long ptrs[5] = {n.input, n.residual, n.weight, n.normed, n.residual_out};
    bool aligned = true;
#pragma unroll
    for (int i = 0; i < 5; ++i) {
        aligned = aligned && ptrs[i] != 0 && symm_aligned16(ptrs[i]);
    }
    return n.tokens > 0 && units > 0 && block && aligned &&
           units <= (rms_u64)RMSNORM_MAX_UNITS * blockDim.x;
}

// ---------------------------------------------------------------------------------------------
// The row step, shared by every kernel.

// What the row step reads and writes: row t of the residual and the outputs starts at
// t * units * 16 bytes of each.
struct RmsRows {
    const unsigned char* residual;
    const unsigned char* weight;
    unsigned char* normed;
    unsigned char* residual_out;
    unsigned int units;
    unsigned int hidden;
    float eps;
};

SYMM_DEVICE RmsRows rms_rows(const RmsNormArgs& n, unsigned int units, rms_u64 first_row) {
    const rms_u64 skip = first_row * units * 16ULL;
    return RmsRows{reinterpret_cast<const unsigned char*>(n.residual) + skip,
                   reinterpret_cast<const unsigned char*>(n.weight),
                   reinterpret_cast<unsigned char*>(n.normed) + skip,
                   reinterpret_cast<unsigned char*>(n.residual_out) + skip,
                   units,
                   n.hidden,
                   n.eps};
}

// r = round(a + residual) for one unit; returns the sum of f32(r)^2 over its elements, in order.
template <class Ty>
SYMM_DEVICE float rms_add_unit(uint4 a, uint4 res, uint4* r) {
    constexpr int n = 16 / Ty::ES;
    float fa[n], fr[n];
    symm_unit_to_f32<Ty>(a, fa);
    symm_unit_to_f32<Ty>(res, fr);
#pragma unroll
    for (int j = 0; j < n; ++j) {
        fa[j] = __fadd_rn(fa[j], fr[j]);
    }
    *r = symm_f32_to_unit<Ty>(fa);
    float y[n];
    symm_unit_to_f32<Ty>(*r, y);
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < n; ++j) {
        ss = __fadd_rn(ss, __fmul_rn(y[j], y[j]));
    }
    return ss;
}

// normed = round((r * rstd) * weight) for one unit.
template <class Ty>
SYMM_DEVICE uint4 rms_norm_unit(uint4 r, uint4 w, float rstd) {
    constexpr int n = 16 / Ty::ES;
    float y[n], fw[n];
    symm_unit_to_f32<Ty>(r, y);
    symm_unit_to_f32<Ty>(w, fw);
#pragma unroll
    for (int j = 0; j < n; ++j) {
        y[j] = __fmul_rn(__fmul_rn(y[j], rstd), fw[j]);
    }
    return symm_f32_to_unit<Ty>(y);
}

// The sum of every thread's v over the block: a butterfly in each warp, then the warps' sums in
// warp 0 (a fixed tree, so every block and every rank sums a row the same way). Every thread of
// the block calls it; all get the total.
SYMM_DEVICE float rms_block_sum(float v) {
    __shared__ float warp_sum[RMSNORM_BLOCK_THREADS / 32];
    __shared__ float total;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    if (lane == 0) {
        warp_sum[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float w = lane < (blockDim.x >> 5) ? warp_sum[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            w = __fadd_rn(w, __shfl_xor_sync(0xffffffffu, w, o));
        }
        if (lane == 0) {
            total = w;
        }
    }
    __syncthreads();
    return total;
}

SYMM_DEVICE float rms_rstd(float ss, unsigned int hidden, float eps) {
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)hidden), eps)));
}

// A row step's forward that forwards nothing (every kernel but two-shot).
struct RmsNoForward {
    __device__ void operator()(unsigned int, uint4, int) const {}
};

// Row t: for each of this thread's units k (threadIdx.x + j * blockDim.x), `reduced(k, &a)` gives
// the collective's result a; then r = a + residual (stored to residual_out), the block's sum of
// squares, and normed (stored). `forward(k, unit, kind)` also sees each unit of residual_out
// (kind 0) and of normed (kind 1). Every thread of the block calls it for the same row (it
// synchronises the block); a thread reads and writes only its own units, so residual_out may be
// the residual and normed the input. False when `reduced` reported a wait that gave up.
template <class Ty, class Reduced, class Forward>
SYMM_DEVICE bool rms_row(const RmsRows& rr, rms_u64 t, const Reduced& reduced,
                         const Forward& forward) {
    const rms_u64 base = t * rr.units * 16ULL;
    uint4 r[RMSNORM_MAX_UNITS];
    float ss = 0.0f;
    bool alive = true;
#pragma unroll
    for (int j = 0; j < RMSNORM_MAX_UNITS; ++j) {
        const unsigned int k = threadIdx.x + j * blockDim.x;
        if (k < rr.units) {
            // The residual first: its load is in flight while `reduced` waits.
            const uint4 res = *reinterpret_cast<const uint4*>(rr.residual + base + k * 16ULL);
            uint4 a;
            alive = reduced(k, &a) && alive;
            ss = __fadd_rn(ss, rms_add_unit<Ty>(a, res, &r[j]));
            *reinterpret_cast<uint4*>(rr.residual_out + base + k * 16ULL) = r[j];
            forward(k, r[j], 0);
        }
    }
    const float rstd = rms_rstd(rms_block_sum(ss), rr.hidden, rr.eps);
#pragma unroll
    for (int j = 0; j < RMSNORM_MAX_UNITS; ++j) {
        const unsigned int k = threadIdx.x + j * blockDim.x;
        if (k < rr.units) {
            const uint4 w = *reinterpret_cast<const uint4*>(rr.weight + k * 16ULL);
            const uint4 y = rms_norm_unit<Ty>(r[j], w, rstd);
            *reinterpret_cast<uint4*>(rr.normed + base + k * 16ULL) = y;
            forward(k, y, 1);
        }
    }
    return alive;
}

// ---------------------------------------------------------------------------------------------
// The collective's result of one unit.

// acc (first: =, else +=) the 8 / ES elements of the 8 bytes v, in f32.
template <class Ty>
SYMM_DEVICE void rms_accumulate8(rms_u64 v, float* acc, bool first) {
    constexpr int ES = Ty::ES;
    constexpr rms_u64 mask = ES == 4 ? 0xffffffffULL : 0xffffULL;
#pragma unroll
    for (int j = 0; j < 8 / ES; ++j) {
        const float x = Ty::to_f32((unsigned int)((v >> (8 * ES * j)) & mask));
        acc[j] = first ? x : __fadd_rn(acc[j], x);
    }
}

// The sum over the ranks, in f32 in rank order, of the unit at byte `off` of this rank's `own`
// rows and of each peer's slot (0, parity, peer) of this rank's workspace, rounded once to Ty:
// the arithmetic of collectives.cu's symm_reduce.
template <class Ty>
SYMM_DEVICE uint4 rms_reduce_unit(const SymmArgs& a, const unsigned char* own,
                                  unsigned int parity, rms_u64 off) {
    constexpr int n = 16 / Ty::ES;
    uint4 v[SYMM_MAX_WORLD];
#pragma unroll
    for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
        if (s < a.world) {
            const unsigned char* src = s == a.rank ? own : symm_ws_slot(a, a.rank, 0, parity, s);
            v[s] = *reinterpret_cast<const uint4*>(src + off);
        }
    }
    float acc[n];
    symm_unit_to_f32<Ty>(v[0], acc);
#pragma unroll
    for (unsigned int s = 1; s < SYMM_MAX_WORLD; ++s) {
        if (s < a.world) {
            float x[n];
            symm_unit_to_f32<Ty>(v[s], x);
#pragma unroll
            for (int j = 0; j < n; ++j) {
                acc[j] = __fadd_rn(acc[j], x[j]);
            }
        }
    }
    return symm_f32_to_unit<Ty>(acc);
}

// LL: the sum over the ranks, in rank order, of LL line c (8 bytes) into acc[0 .. 8 / ES): this
// rank's `own` bytes, the peers' lines from this rank's LL slots. False if a wait gave up.
template <class Ty>
SYMM_DEVICE bool rms_ll_sum_line(const SymmArgs& a, const SymmLaunch& l, unsigned int parity,
                                 unsigned int flag, rms_u64 c, rms_u64 own, float* acc) {
    rms_u64 v[SYMM_MAX_WORLD];
    const bool ok = symm_ll_load_all(a, l.st, parity, c, flag, l.e, v);
#pragma unroll
    for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
        if (s < a.world) {
            rms_accumulate8<Ty>(s == a.rank ? own : v[s], acc, s == 0);
        }
    }
    return ok;
}

// LL: unit u (lines 2u and 2u + 1) summed over the ranks and rounded to Ty; `own` is this
// rank's unit. False if a wait gave up.
template <class Ty>
SYMM_DEVICE bool rms_ll_reduce_unit(const SymmArgs& a, const SymmLaunch& l, unsigned int parity,
                                    unsigned int flag, rms_u64 u, uint4 own, uint4* out) {
    float acc[16 / Ty::ES];
    const rms_u64 lo = (rms_u64)own.x | ((rms_u64)own.y << 32);
    const rms_u64 hi = (rms_u64)own.z | ((rms_u64)own.w << 32);
    bool ok = rms_ll_sum_line<Ty>(a, l, parity, flag, 2 * u, lo, acc);
    ok = rms_ll_sum_line<Ty>(a, l, parity, flag, 2 * u + 1, hi, acc + 8 / Ty::ES) && ok;
    *out = symm_f32_to_unit<Ty>(acc);
    return ok;
}

// LL: units [0, units) of `src` as lines 2u, 2u + 1 into LL slot (parity, rank) of `peer`, or of
// every peer (from rank + 1 on) when peer < 0; the units spread over every thread of the grid.
// `first` is this thread's first unit when `have_first` (loaded before the epoch).
SYMM_DEVICE void rms_ll_push(const SymmArgs& a, const unsigned char* src, rms_u64 units,
                             unsigned int parity, unsigned int flag, int peer, uint4 first,
                             bool have_first) {
    const rms_u64 u0 = (rms_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const rms_u64 stride = (rms_u64)gridDim.x * blockDim.x;
    for (rms_u64 u = u0; u < units; u += stride) {
        const uint4 v =
            (u == u0 && have_first) ? first : *reinterpret_cast<const uint4*>(src + u * 16);
        const rms_u64 lo = (rms_u64)v.x | ((rms_u64)v.y << 32);
        const rms_u64 hi = (rms_u64)v.z | ((rms_u64)v.w << 32);
#pragma unroll 1
        for (unsigned int i = 1; i < a.world; ++i) {
            const unsigned int p = (a.rank + i) % a.world;
            if (peer < 0 || p == (unsigned int)peer) {
                uint4* slot = symm_ll_slot(a, p, parity, a.rank);
                symm_ll_store(slot + 2 * u, lo, flag);
                symm_ll_store(slot + 2 * u + 1, hi, flag);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The kernels. Fused: symm_enter, then symm_launch (epoch, argument check, work, finish); rows
// [lo, hi) of block b by symm_block_range, the same on every rank.

// The add and RMSNorm of rows already reduced (n.input): one block per row, grid-stride. No
// communication; any grid.
template <class Ty>
SYMM_DEVICE void rms_add_rmsnorm(const RmsNormArgs& n) {
    symm_grid_dependency_wait();
    if (!rms_shape_ok<Ty>(n) || gridDim.y != 1 || gridDim.z != 1) {
        return; // the host validates; never touch memory on a bad shape
    }
    const unsigned int units = rms_row_units<Ty>(n);
    const RmsRows rr = rms_rows(n, units, 0);
    const unsigned char* in = reinterpret_cast<const unsigned char*>(n.input);
    for (rms_u64 t = blockIdx.x; t < n.tokens; t += gridDim.x) {
        rms_row<Ty>(
            rr, t,
            [&](unsigned int k, uint4* a) {
                *a = *reinterpret_cast<const uint4*>(in + (t * units + k) * 16ULL);
                return true;
            },
            RmsNoForward{});
    }
}

// LL all-reduce: every unit of the input to every peer (the whole grid pushes), then each block
// reduces, adds and normalises its rows from its own LL slots. Input <= SYMM_LL_MAX_BYTES.
template <class Ty>
SYMM_DEVICE void rms_ll_allreduce(const SymmArgs& a, const RmsNormArgs& n) {
    symm_enter();
    const unsigned int units = rms_row_units<Ty>(n);
    const bool shape =
        rms_shape_ok<Ty>(n) && (rms_u64)n.tokens * units * 16 <= SYMM_LL_MAX_BYTES;
    const rms_u64 total = shape ? (rms_u64)n.tokens * units : 0;
    const unsigned char* in = reinterpret_cast<const unsigned char*>(n.input);
    // This thread's first unit, loaded before the epoch (the input is final after symm_enter).
    const rms_u64 u0 = (rms_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const uint4 first =
        u0 < total ? *reinterpret_cast<const uint4*>(in + u0 * 16) : make_uint4(0, 0, 0, 0);
    const auto check = [&] { return shape && symm_args_ok(a, 0, false); };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned int flag = (unsigned int)l.e;
        rms_ll_push(a, in, total, parity, flag, -1, first, true);
        const RmsRows rr = rms_rows(n, units, 0);
        rms_u64 lo, hi;
        symm_block_range(n.tokens, 1, &lo, &hi);
        for (rms_u64 t = lo; t < hi; ++t) {
            rms_row<Ty>(
                rr, t,
                [&](unsigned int k, uint4* out) {
                    const rms_u64 u = t * units + k;
                    const uint4 own = *reinterpret_cast<const uint4*>(in + u * 16);
                    return rms_ll_reduce_unit<Ty>(a, l, parity, flag, u, own, out);
                },
                RmsNoForward{});
        }
    });
}

// One-shot all-reduce: block b pushes its rows of the input into every peer's slot (0, parity,
// rank), meets the peers' block b at the barrier, then reduces, adds and normalises those rows.
// Slot >= the whole input.
template <class Ty>
SYMM_DEVICE void rms_oneshot_allreduce(const SymmArgs& a, const RmsNormArgs& n) {
    symm_enter();
    constexpr int ES = Ty::ES;
    const unsigned int units = rms_row_units<Ty>(n);
    const rms_u64 row_bytes = (rms_u64)units * 16;
    const bool shape = rms_shape_ok<Ty>(n);
    const auto check = [&] { return shape && symm_args_ok(a, n.tokens * row_bytes, true); };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned char* in = reinterpret_cast<const unsigned char*>(n.input);
        const rms_u64 per_row = row_bytes / ES;
        rms_u64 lo, hi;
        symm_block_range(n.tokens, 1, &lo, &hi);
        symm_push<ES>(a, in, true, lo * per_row, hi * per_row, 0, parity, -1);
        symm_block_barrier(a, l, 0);
        const RmsRows rr = rms_rows(n, units, 0);
        for (rms_u64 t = lo; t < hi; ++t) {
            rms_row<Ty>(
                rr, t,
                [&](unsigned int k, uint4* out) {
                    *out = rms_reduce_unit<Ty>(a, in, parity, t * row_bytes + k * 16ULL);
                    return true;
                },
                RmsNoForward{});
        }
    });
}

// Rows of rank c's slice of `slice` rows out of `tokens`: [c * slice, c * slice + this).
SYMM_DEVICE rms_u64 rms_slice_rows(rms_u64 tokens, rms_u64 slice, unsigned int c) {
    const rms_u64 start = slice * c;
    return start >= tokens ? 0 : symm_min(slice, tokens - start);
}

// The reduce-scatter of rows (rank c owns the slice of rows [c * S, c * S + S)), the add and
// RMSNorm of this rank's slice, and with kGather (two-shot all-reduce) the all-gather of both
// outputs. S = ceil(tokens / world) with kGather, tokens / world (exact) without. Block b:
//   phase 0: rows [lo, hi) of peer c's slice -> c's slot (0, parity, rank); barrier phase 0;
//   rows [lo, hi) of this rank's slice reduced, added, normalised; with kGather both outputs
//   also -> every peer's slot (1, parity, rank) (residual_out rows, then normed rows at S rows);
//   barrier phase 1; rows [lo, hi) of each peer's slice copied from slot (1, parity, peer).
// Residual and outputs: [tokens, hidden] with kGather, [S, hidden] without. Slot >= S rows
// (2 S rows with kGather).
template <class Ty, bool kGather>
SYMM_DEVICE void rms_scatter_rows(const SymmArgs& a, const RmsNormArgs& n) {
    symm_enter();
    constexpr int ES = Ty::ES;
    const unsigned int units = rms_row_units<Ty>(n);
    const rms_u64 row_bytes = (rms_u64)units * 16;
    const bool world_ok = a.world >= 2 && a.world <= SYMM_MAX_WORLD && a.rank < a.world;
    const rms_u64 slice = world_ok ? (n.tokens + a.world - 1) / a.world : 0;
    const bool shape = rms_shape_ok<Ty>(n) && world_ok && (kGather || n.tokens % a.world == 0);
    const auto check = [&] {
        return shape && symm_args_ok(a, (kGather ? 2 : 1) * slice * row_bytes, true);
    };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned char* in = reinterpret_cast<const unsigned char*>(n.input);
        const rms_u64 per_row = row_bytes / ES;
        rms_u64 lo, hi;
        symm_block_range(slice, 1, &lo, &hi);
        for (unsigned int i = 1; i < a.world; ++i) {
            const unsigned int c = (a.rank + i) % a.world;
            const rms_u64 end = symm_min(hi, rms_slice_rows(n.tokens, slice, c));
            if (lo < end) {
                symm_push<ES>(a, in + c * slice * row_bytes, true, lo * per_row, end * per_row, 0,
                              parity, (int)c);
            }
        }
        symm_block_barrier(a, l, 0);
        const unsigned char* own = in + a.rank * slice * row_bytes;
        const RmsRows rr = rms_rows(n, units, kGather ? a.rank * slice : 0);
        const rms_u64 mine = symm_min(hi, rms_slice_rows(n.tokens, slice, a.rank));
        for (rms_u64 t = lo; t < mine; ++t) {
            const auto forward = [&](unsigned int k, uint4 v, int kind) {
                if constexpr (kGather) {
                    const rms_u64 off = ((rms_u64)kind * slice + t) * row_bytes + k * 16ULL;
#pragma unroll 1
                    for (unsigned int i = 1; i < a.world; ++i) {
                        const unsigned int p = (a.rank + i) % a.world;
                        *reinterpret_cast<uint4*>(symm_ws_slot(a, p, 1, parity, a.rank) + off) = v;
                    }
                }
            };
            rms_row<Ty>(
                rr, t,
                [&](unsigned int k, uint4* out) {
                    *out = rms_reduce_unit<Ty>(a, own, parity, t * row_bytes + k * 16ULL);
                    return true;
                },
                forward);
        }
        if constexpr (kGather) {
            symm_block_barrier(a, l, 1);
            unsigned char* res_out = reinterpret_cast<unsigned char*>(n.residual_out);
            unsigned char* normed = reinterpret_cast<unsigned char*>(n.normed);
            for (unsigned int i = 1; i < a.world; ++i) {
                const unsigned int s = (a.rank + i) % a.world;
                const rms_u64 end = symm_min(hi, rms_slice_rows(n.tokens, slice, s));
                if (lo >= end) {
                    continue;
                }
                const unsigned char* slot = symm_ws_slot(a, a.rank, 1, parity, s);
                const rms_u64 at = s * slice * row_bytes;
                symm_copy<ES>(res_out + at, true, slot, true, lo * per_row, end * per_row);
                symm_copy<ES>(normed + at, true, slot + slice * row_bytes, true, lo * per_row,
                              end * per_row);
            }
        }
    });
}

// LL reduce-scatter: piece c (rows [c * S, c * S + S), S = tokens / world) of the input to peer
// c's LL slot (the whole grid pushes), then each block reduces, adds and normalises its rows of
// this rank's slice. Residual and outputs [S, hidden]; one piece <= SYMM_LL_MAX_BYTES.
template <class Ty>
SYMM_DEVICE void rms_ll_reducescatter(const SymmArgs& a, const RmsNormArgs& n) {
    symm_enter();
    const unsigned int units = rms_row_units<Ty>(n);
    const bool world_ok = a.world >= 2 && a.world <= SYMM_MAX_WORLD && a.rank < a.world;
    const rms_u64 slice = world_ok && n.tokens % a.world == 0 ? n.tokens / a.world : 0;
    const rms_u64 piece_units = slice * units;
    const bool shape =
        rms_shape_ok<Ty>(n) && slice > 0 && piece_units * 16 <= SYMM_LL_MAX_BYTES;
    const auto check = [&] { return shape && symm_args_ok(a, 0, false); };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned int flag = (unsigned int)l.e;
        const unsigned char* in = reinterpret_cast<const unsigned char*>(n.input);
        for (unsigned int i = 1; i < a.world; ++i) {
            const unsigned int c = (a.rank + i) % a.world;
            rms_ll_push(a, in + c * piece_units * 16, piece_units, parity, flag, (int)c,
                        make_uint4(0, 0, 0, 0), false);
        }
        const unsigned char* own = in + a.rank * piece_units * 16;
        const RmsRows rr = rms_rows(n, units, 0);
        rms_u64 lo, hi;
        symm_block_range(slice, 1, &lo, &hi);
        for (rms_u64 t = lo; t < hi; ++t) {
            rms_row<Ty>(
                rr, t,
                [&](unsigned int k, uint4* out) {
                    const rms_u64 u = t * units + k;
                    const uint4 mine = *reinterpret_cast<const uint4*>(own + u * 16);
                    return rms_ll_reduce_unit<Ty>(a, l, parity, flag, u, mine, out);
                },
                RmsNoForward{});
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Entry points. Block (RMSNORM_BLOCK_THREADS, 1, 1). symm_add_rmsnorm_*: any grid. Fused: grid
// (g, 1, 1), 1 <= g <= SYMM_MAX_BLOCKS, the same on every rank of the group (KERNELS.md §4, §10).

#define RMS_KERNEL extern "C" __global__ void __launch_bounds__(RMSNORM_BLOCK_THREADS, 1)

RMS_KERNEL symm_add_rmsnorm_bf16(const RmsNormArgs n) { rms_add_rmsnorm<SymmBF16>(n); }
RMS_KERNEL symm_add_rmsnorm_f16(const RmsNormArgs n) { rms_add_rmsnorm<SymmF16>(n); }

RMS_KERNEL symm_ll_allreduce_rmsnorm_bf16(const SymmArgs a, const RmsNormArgs n) {
    rms_ll_allreduce<SymmBF16>(a, n);
}
RMS_KERNEL symm_ll_allreduce_rmsnorm_f16(const SymmArgs a, const RmsNormArgs n) {
    rms_ll_allreduce<SymmF16>(a, n);
}

RMS_KERNEL symm_oneshot_allreduce_rmsnorm_bf16(const SymmArgs a, const RmsNormArgs n) {
    rms_oneshot_allreduce<SymmBF16>(a, n);
}
RMS_KERNEL symm_oneshot_allreduce_rmsnorm_f16(const SymmArgs a, const RmsNormArgs n) {
    rms_oneshot_allreduce<SymmF16>(a, n);
}

RMS_KERNEL symm_twoshot_allreduce_rmsnorm_bf16(const SymmArgs a, const RmsNormArgs n) {
    rms_scatter_rows<SymmBF16, true>(a, n);
}
RMS_KERNEL symm_twoshot_allreduce_rmsnorm_f16(const SymmArgs a, const RmsNormArgs n) {
    rms_scatter_rows<SymmF16, true>(a, n);
}

RMS_KERNEL symm_ll_reducescatter_rmsnorm_bf16(const SymmArgs a, const RmsNormArgs n) {
    rms_ll_reducescatter<SymmBF16>(a, n);
}
RMS_KERNEL symm_ll_reducescatter_rmsnorm_f16(const SymmArgs a, const RmsNormArgs n) {
    rms_ll_reducescatter<SymmF16>(a, n);
}

RMS_KERNEL symm_reducescatter_rmsnorm_bf16(const SymmArgs a, const RmsNormArgs n) {
    rms_scatter_rows<SymmBF16, false>(a, n);
}
RMS_KERNEL symm_reducescatter_rmsnorm_f16(const SymmArgs a, const RmsNormArgs n) {
    rms_scatter_rows<SymmF16, false>(a, n);
}
