// collectives.cu: our own NVLink collectives over symmetric memory (all-reduce one-shot and
// two-shot, all-gather, reduce-scatter, barrier) for bf16, f16 and f32 with f32 accumulation.
//
// Model: push, one barrier, finish locally. Each block stores its share of the data into the
// peers' workspaces (plain 16-byte stores over NVLink), signals every peer's flag for this block
// with a system-scope release store, waits on its own flags with acquire loads, then reads only
// its own workspace. One epoch per launch, the same on every rank; the workspace is
// double-buffered on the epoch's parity, so one barrier per phase is enough. That protocol is in
// symm_protocol.cuh, the ABI (SymmArgs, SymmState, the SYMM_* limits and layouts) in
// symm_abi.cuh, generated from crates/symmcomm/src/kernels/abi.rs. The argument, the layouts
// and the launch rules are in crates/symmcomm/KERNELS.md; keep the two in step.
//
// No multimem / multicast instructions anywhere: the GPU machines this project runs on must never
// run NVLink multicast (crates/symmcomm/KERNELS.md, introduction; a test greps for them).

#include "symm_protocol.cuh"

// ---------------------------------------------------------------------------------------------
// Reduction. symm_push and symm_copy (data movement over the workspace) are in symm_protocol.cuh,
// shared with rmsnorm.cu.

// Elements [lo, hi): out = sum over src = 0..world-1 of (src == rank ? own : this rank's slot
// (0, parity, src)), accumulated in f32 in src order and rounded once to Ty, so every rank that
// sums the same values gets the same bits. With `forward`, the result is also stored into slot
// (1, parity, rank) of every peer (two-shot's second phase).
template <class Ty>
SYMM_DEVICE void symm_reduce(const SymmArgs& a, const unsigned char* own, bool own_aligned,
                             unsigned int parity, unsigned long long lo, unsigned long long hi,
                             unsigned char* out, bool out_aligned, bool forward) {
    constexpr int ES = Ty::ES;
    constexpr int n = 16 / ES;
    const unsigned char* slot[SYMM_MAX_WORLD];
    unsigned char* fwd[SYMM_MAX_WORLD];
#pragma unroll
    for (int s = 0; s < SYMM_MAX_WORLD; ++s) {
        const bool peer = (unsigned int)s < a.world && (unsigned int)s != a.rank;
        slot[s] = peer ? symm_ws_slot(a, a.rank, 0, parity, s) : nullptr;
        fwd[s] = (peer && forward) ? symm_ws_slot(a, s, 1, parity, a.rank) : nullptr;
    }
    const unsigned long long units = (hi - lo) / n;
    for (unsigned long long k = threadIdx.x; k < units; k += blockDim.x) {
        const unsigned long long off = (lo + k * n) * ES;
        uint4 v[SYMM_MAX_WORLD];
#pragma unroll
        for (int s = 0; s < SYMM_MAX_WORLD; ++s) {
            if ((unsigned int)s < a.world) {
                v[s] = slot[s] != nullptr ? *reinterpret_cast<const uint4*>(slot[s] + off)
                                          : symm_ld_unit<ES>(own + off, own_aligned);
            }
        }
        float acc[n];
        symm_unit_to_f32<Ty>(v[0], acc);
#pragma unroll
        for (int s = 1; s < SYMM_MAX_WORLD; ++s) {
            if ((unsigned int)s < a.world) {
                float x[n];
                symm_unit_to_f32<Ty>(v[s], x);
#pragma unroll
                for (int j = 0; j < n; ++j) {
                    acc[j] = __fadd_rn(acc[j], x[j]);
                }
            }
        }
        const uint4 r = symm_f32_to_unit<Ty>(acc);
        symm_st_unit<ES>(out + off, r, out_aligned);
#pragma unroll
        for (int s = 0; s < SYMM_MAX_WORLD; ++s) {
            if (fwd[s] != nullptr) {
                *reinterpret_cast<uint4*>(fwd[s] + off) = r;
            }
        }
    }
    for (unsigned long long i = lo + units * n + threadIdx.x; i < hi; i += blockDim.x) {
        const unsigned long long off = i * ES;
        float acc = 0.0f;
#pragma unroll
        for (int s = 0; s < SYMM_MAX_WORLD; ++s) {
            if ((unsigned int)s < a.world) {
                const unsigned int bits = slot[s] != nullptr ? symm_ld_elem<ES>(slot[s] + off)
                                                             : symm_ld_elem<ES>(own + off);
                const float x = Ty::to_f32(bits);
                acc = s == 0 ? x : __fadd_rn(acc, x);
            }
        }
        const unsigned int r = Ty::from_f32(acc);
        symm_st_elem<ES>(out + off, r);
#pragma unroll
        for (int s = 0; s < SYMM_MAX_WORLD; ++s) {
            if (fwd[s] != nullptr) {
                symm_st_elem<ES>(fwd[s] + off, r);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The collectives. Each: wait for the predecessor (PDL, symm_enter), check the arguments, then
// symm_launch: take the epoch, move data (or record SYMM_ERR_ARGS), finish.

// count = elements of the whole buffer; slot >= count * ES.
template <class Ty>
SYMM_DEVICE void symm_oneshot_allreduce(const SymmArgs& a) {
    symm_enter();
    constexpr int ES = Ty::ES;
    const auto check = [&] {
        return a.count <= (~0ULL >> 5) && symm_args_ok(a, a.count * ES, true);
    };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        unsigned long long lo, hi;
        symm_block_range(a.count, 16 / ES, &lo, &hi);
        const unsigned char* in = reinterpret_cast<const unsigned char*>(a.in);
        unsigned char* out = reinterpret_cast<unsigned char*>(a.out);
        symm_push<ES>(a, in, symm_aligned16(a.in), lo, hi, 0, parity, -1);
        symm_block_barrier(a, l, 0);
        symm_reduce<Ty>(a, in, symm_aligned16(a.in), parity, lo, hi, out, symm_aligned16(a.out),
                        false);
    });
}

// Elements per piece of two-shot: ceil(count / world), rounded up to whole 16-byte units so that
// every piece starts 16-byte aligned relative to the buffer.
template <int ES>
SYMM_DEVICE unsigned long long symm_twoshot_chunk(const SymmArgs& a) {
    constexpr unsigned long long n = 16 / ES;
    const unsigned long long per_rank = (a.count + a.world - 1) / a.world;
    return (per_rank + n - 1) / n * n;
}

// Elements of piece c (the last pieces may be short or empty).
SYMM_DEVICE unsigned long long symm_piece_len(unsigned long long count, unsigned long long chunk,
                                              unsigned int c) {
    const unsigned long long start = chunk * c;
    return start >= count ? 0 : symm_min(chunk, count - start);
}

// count = elements of the whole buffer; slot >= twoshot chunk * ES; workspace holds both areas.
template <class Ty>
SYMM_DEVICE void symm_twoshot_allreduce(const SymmArgs& a) {
    symm_enter();
    constexpr int ES = Ty::ES;
    constexpr unsigned long long n = 16 / ES;
    unsigned long long chunk = 0; // elements per piece, set by check
    const auto check = [&] {
        const bool sane = a.count <= (~0ULL >> 5) && a.world >= 2 && a.world <= SYMM_MAX_WORLD;
        chunk = sane ? symm_twoshot_chunk<ES>(a) : 0;
        return sane && symm_args_ok(a, chunk * ES, true);
    };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned char* in = reinterpret_cast<const unsigned char*>(a.in);
        unsigned char* out = reinterpret_cast<unsigned char*>(a.out);
        unsigned long long lo, hi;
        // Phase 0: piece c of the input to rank c.
        for (unsigned int c = 0; c < a.world; ++c) {
            if (c == a.rank) {
                continue;
            }
            symm_block_range(symm_piece_len(a.count, chunk, c), n, &lo, &hi);
            const unsigned long long base = chunk * c * ES;
            symm_push<ES>(a, in + base, symm_aligned16(a.in + base), lo, hi, 0, parity, (int)c);
        }
        symm_block_barrier(a, l, 0);
        // Reduce this rank's piece into the output and forward it to every peer's area 1.
        {
            const unsigned long long base = chunk * a.rank * ES;
            symm_block_range(symm_piece_len(a.count, chunk, a.rank), n, &lo, &hi);
            symm_reduce<Ty>(a, in + base, symm_aligned16(a.in + base), parity, lo, hi, out + base,
                            symm_aligned16(a.out + base), true);
        }
        symm_block_barrier(a, l, 1);
        // Phase 1: the peers' reduced pieces into the output.
        for (unsigned int s = 0; s < a.world; ++s) {
            if (s == a.rank) {
                continue;
            }
            symm_block_range(symm_piece_len(a.count, chunk, s), n, &lo, &hi);
            const unsigned long long base = chunk * s * ES;
            symm_copy<ES>(out + base, symm_aligned16(a.out + base),
                          symm_ws_slot(a, a.rank, 1, parity, s), true, lo, hi);
        }
    });
}

// count = elements of each rank's piece (output has world * count); slot >= count * ES.
template <class Ty>
SYMM_DEVICE void symm_reducescatter(const SymmArgs& a) {
    symm_enter();
    constexpr int ES = Ty::ES;
    const auto check = [&] {
        return a.count <= (~0ULL >> 8) && symm_args_ok(a, a.count * ES, true);
    };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned char* in = reinterpret_cast<const unsigned char*>(a.in);
        unsigned char* out = reinterpret_cast<unsigned char*>(a.out);
        unsigned long long lo, hi;
        symm_block_range(a.count, 16 / ES, &lo, &hi);
        for (unsigned int c = 0; c < a.world; ++c) {
            if (c == a.rank) {
                continue;
            }
            const unsigned long long base = a.count * c * ES;
            symm_push<ES>(a, in + base, symm_aligned16(a.in + base), lo, hi, 0, parity, (int)c);
        }
        symm_block_barrier(a, l, 0);
        const unsigned long long base = a.count * a.rank * ES;
        symm_reduce<Ty>(a, in + base, symm_aligned16(a.in + base), parity, lo, hi, out,
                        symm_aligned16(a.out), false);
    });
}

// ---------------------------------------------------------------------------------------------
// The LL collectives (protocol in symm_protocol.cuh): each thread owns 8-byte chunks c = tid,
// tid + stride, ... of a piece; chunk c of every rank's piece goes to line c of the slot.

// The 8 bytes at p, of which `avail` (a multiple of ES, > 0) belong to the buffer; the rest read
// as zero. One 8-byte load when p is 8-byte aligned and whole, else element by element.
template <int ES>
SYMM_DEVICE unsigned long long symm_ld8(const unsigned char* p, unsigned long long avail,
                                        bool aligned8) {
    if (aligned8 && avail >= 8) {
        return *reinterpret_cast<const unsigned long long*>(p);
    }
    unsigned long long v = 0;
#pragma unroll
    for (int k = 0; k < 8 / ES; ++k) {
        if ((unsigned long long)(k + 1) * ES <= avail) {
            v |= (unsigned long long)symm_ld_elem<ES>(p + k * ES) << (8 * ES * k);
        }
    }
    return v;
}

// Store the first min(avail, 8) bytes of v at p (same rules as symm_ld8).
template <int ES>
SYMM_DEVICE void symm_st8(unsigned char* p, unsigned long long v, unsigned long long avail,
                          bool aligned8) {
    if (aligned8 && avail >= 8) {
        *reinterpret_cast<unsigned long long*>(p) = v;
        return;
    }
#pragma unroll
    for (int k = 0; k < 8 / ES; ++k) {
        if ((unsigned long long)(k + 1) * ES <= avail) {
            symm_st_elem<ES>(p + k * ES, (unsigned int)(v >> (8 * ES * k)));
        }
    }
}

// The f32 accumulators of one 8-byte chunk: 8 / ES lanes used.
struct SymmAcc8 {
    float x[4];
};

// acc = (first) or += the elements of v, in f32.
template <class Ty>
SYMM_DEVICE void symm_ll_accumulate(unsigned long long v, SymmAcc8& acc, bool first) {
    constexpr int ES = Ty::ES;
    constexpr unsigned long long mask = ES == 4 ? 0xffffffffULL : 0xffffULL;
#pragma unroll
    for (int j = 0; j < 8 / ES; ++j) {
        const float x = Ty::to_f32((unsigned int)((v >> (8 * ES * j)) & mask));
        acc.x[j] = first ? x : __fadd_rn(acc.x[j], x);
    }
}

template <class Ty>
SYMM_DEVICE unsigned long long symm_ll_pack(const SymmAcc8& acc) {
    constexpr int ES = Ty::ES;
    unsigned long long v = 0;
#pragma unroll
    for (int j = 0; j < 8 / ES; ++j) {
        v |= (unsigned long long)Ty::from_f32(acc.x[j]) << (8 * ES * j);
    }
    return v;
}

// This thread's first chunk index.
SYMM_DEVICE unsigned long long symm_ll_first_chunk() {
    return (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// This thread's first chunk of `src` (`bytes` long), or 0 when it has none: loaded before the
// epoch so that the two loads overlap (the input is final once symm_enter returned).
template <int ES>
SYMM_DEVICE unsigned long long symm_ll_prefetch(const unsigned char* src, bool src_aligned8,
                                                unsigned long long bytes) {
    const unsigned long long c = symm_ll_first_chunk();
    return c < (bytes + 7) / 8 ? symm_ld8<ES>(src + c * 8, bytes - c * 8, src_aligned8) : 0;
}

// Send chunks of `src` (`bytes` long) to slot (parity, rank) of `peer`, or of every peer when
// peer < 0. `first` is this thread's first chunk (symm_ll_prefetch).
template <int ES>
SYMM_DEVICE void symm_ll_send(const SymmArgs& a, const unsigned char* src, bool src_aligned8,
                              unsigned long long bytes, unsigned int parity, unsigned int flag,
                              int peer, unsigned long long first) {
    const unsigned long long chunks = (bytes + 7) / 8;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long c = symm_ll_first_chunk(); c < chunks; c += stride) {
        const unsigned long long v = c == symm_ll_first_chunk()
                                         ? first
                                         : symm_ld8<ES>(src + c * 8, bytes - c * 8, src_aligned8);
#pragma unroll 1
        for (unsigned int p = 0; p < a.world; ++p) {
            if (p != a.rank && (peer < 0 || p == (unsigned int)peer)) {
                symm_ll_store(symm_ll_slot(a, p, parity, a.rank) + c, v, flag);
            }
        }
    }
}

// Reduce: out = sum over src in rank order of (src == rank ? own : the LL line from src), for
// `bytes` of elements; the same order and rounding as symm_reduce. False if a wait gave up.
template <class Ty>
SYMM_DEVICE bool symm_ll_reduce(const SymmArgs& a, const SymmLaunch& l, const unsigned char* own,
                                bool own_aligned8, unsigned long long own_first,
                                unsigned char* out, bool out_aligned8, unsigned long long bytes,
                                unsigned int parity, unsigned int flag) {
    constexpr int ES = Ty::ES;
    const unsigned long long chunks = (bytes + 7) / 8;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long c = symm_ll_first_chunk(); c < chunks; c += stride) {
        const unsigned long long mine =
            c == symm_ll_first_chunk() ? own_first
                                       : symm_ld8<ES>(own + c * 8, bytes - c * 8, own_aligned8);
        unsigned long long v[SYMM_MAX_WORLD];
        if (!symm_ll_load_all(a, l.st, parity, c, flag, l.e, v)) {
            return false;
        }
        SymmAcc8 acc = {{0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
            if (s < a.world) {
                symm_ll_accumulate<Ty>(s == a.rank ? mine : v[s], acc, s == 0);
            }
        }
        symm_st8<ES>(out + c * 8, symm_ll_pack<Ty>(acc), bytes - c * 8, out_aligned8);
    }
    return true;
}

SYMM_DEVICE bool symm_aligned8(unsigned long long address) { return (address & 7ULL) == 0; }

// count = elements of the whole buffer; count * ES <= SYMM_LL_MAX_BYTES.
template <class Ty>
SYMM_DEVICE void symm_ll_allreduce(const SymmArgs& a) {
    constexpr int ES = Ty::ES;
    symm_enter();
    const bool sized = a.count <= SYMM_LL_MAX_BYTES / ES && a.in != 0;
    const unsigned long long bytes = sized ? a.count * ES : 0;
    const unsigned char* in = reinterpret_cast<const unsigned char*>(a.in);
    const unsigned long long first = symm_ll_prefetch<ES>(in, symm_aligned8(a.in), bytes);
    const auto check = [&] { return sized && symm_args_ok(a, 0, false); };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned int flag = (unsigned int)l.e;
        symm_ll_send<ES>(a, in, symm_aligned8(a.in), bytes, parity, flag, -1, first);
        symm_ll_reduce<Ty>(a, l, in, symm_aligned8(a.in), first,
                           reinterpret_cast<unsigned char*>(a.out), symm_aligned8(a.out), bytes,
                           parity, flag);
    });
}

// count = elements of each rank's piece (the input holds world pieces); count * ES <=
// SYMM_LL_MAX_BYTES.
template <class Ty>
SYMM_DEVICE void symm_ll_reducescatter(const SymmArgs& a) {
    constexpr int ES = Ty::ES;
    symm_enter();
    // Prefetch this thread's first chunk of every piece (independent loads, in flight together).
    const bool sized = a.count <= SYMM_LL_MAX_BYTES / ES && a.in != 0 && a.world >= 2 &&
                       a.world <= SYMM_MAX_WORLD && a.rank < a.world;
    const unsigned long long bytes = sized ? a.count * ES : 0;
    unsigned long long firsts[SYMM_MAX_WORLD];
#pragma unroll
    for (unsigned int p = 0; p < SYMM_MAX_WORLD; ++p) {
        const unsigned long long piece = a.in + bytes * p;
        firsts[p] = p < a.world ? symm_ll_prefetch<ES>(reinterpret_cast<const unsigned char*>(piece),
                                                       symm_aligned8(piece), bytes)
                                : 0;
    }
    // The own piece's chunk: picked from firsts on 2 ranks, loaded once more otherwise (a
    // runtime index would put firsts in local memory).
    const unsigned long long own = a.in + bytes * a.rank;
    const unsigned long long own_first =
        a.world == 2 ? (a.rank == 0 ? firsts[0] : firsts[1])
                     : symm_ll_prefetch<ES>(reinterpret_cast<const unsigned char*>(own),
                                            symm_aligned8(own), bytes);
    const auto check = [&] { return sized && symm_args_ok(a, 0, false); };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned int flag = (unsigned int)l.e;
#pragma unroll
        for (unsigned int p = 0; p < SYMM_MAX_WORLD; ++p) {
            if (p < a.world && p != a.rank) {
                const unsigned long long piece = a.in + bytes * p;
                symm_ll_send<ES>(a, reinterpret_cast<const unsigned char*>(piece),
                                 symm_aligned8(piece), bytes, parity, flag, (int)p, firsts[p]);
            }
        }
        symm_ll_reduce<Ty>(a, l, reinterpret_cast<const unsigned char*>(own), symm_aligned8(own),
                           own_first, reinterpret_cast<unsigned char*>(a.out),
                           symm_aligned8(a.out), bytes, parity, flag);
    });
}

// ---------------------------------------------------------------------------------------------
// Entry points.
// Launch: block (SYMM_BLOCK_THREADS, 1, 1), grid (g, 1, 1) with 1 <= g <= SYMM_MAX_BLOCKS (128),
// the same g on every rank (KERNELS.md section 4).

// One block per SM is all a launch needs (grids are at most 128 blocks): saying so lets ptxas
// keep the LL kernels out of local memory instead of squeezing them into 32 registers.
#define SYMM_KERNEL extern "C" __global__ void __launch_bounds__(SYMM_BLOCK_THREADS, 1)

SYMM_KERNEL symm_oneshot_allreduce_bf16(const SymmArgs a) { symm_oneshot_allreduce<SymmBF16>(a); }
SYMM_KERNEL symm_oneshot_allreduce_f16(const SymmArgs a) { symm_oneshot_allreduce<SymmF16>(a); }
SYMM_KERNEL symm_oneshot_allreduce_f32(const SymmArgs a) { symm_oneshot_allreduce<SymmF32>(a); }

SYMM_KERNEL symm_twoshot_allreduce_bf16(const SymmArgs a) { symm_twoshot_allreduce<SymmBF16>(a); }
SYMM_KERNEL symm_twoshot_allreduce_f16(const SymmArgs a) { symm_twoshot_allreduce<SymmF16>(a); }
SYMM_KERNEL symm_twoshot_allreduce_f32(const SymmArgs a) { symm_twoshot_allreduce<SymmF32>(a); }

SYMM_KERNEL symm_reducescatter_bf16(const SymmArgs a) { symm_reducescatter<SymmBF16>(a); }
SYMM_KERNEL symm_reducescatter_f16(const SymmArgs a) { symm_reducescatter<SymmF16>(a); }
SYMM_KERNEL symm_reducescatter_f32(const SymmArgs a) { symm_reducescatter<SymmF32>(a); }

SYMM_KERNEL symm_ll_allreduce_bf16(const SymmArgs a) { symm_ll_allreduce<SymmBF16>(a); }
SYMM_KERNEL symm_ll_allreduce_f16(const SymmArgs a) { symm_ll_allreduce<SymmF16>(a); }
SYMM_KERNEL symm_ll_allreduce_f32(const SymmArgs a) { symm_ll_allreduce<SymmF32>(a); }

SYMM_KERNEL symm_ll_reducescatter_bf16(const SymmArgs a) { symm_ll_reducescatter<SymmBF16>(a); }
SYMM_KERNEL symm_ll_reducescatter_f16(const SymmArgs a) { symm_ll_reducescatter<SymmF16>(a); }
SYMM_KERNEL symm_ll_reducescatter_f32(const SymmArgs a) { symm_ll_reducescatter<SymmF32>(a); }

// count = BYTES of each rank's piece (output has world * count bytes); count <=
// SYMM_LL_MAX_BYTES. Any dtype.
SYMM_KERNEL symm_ll_allgather(const SymmArgs a) {
    symm_enter();
    const bool sized = a.count <= SYMM_LL_MAX_BYTES && a.in != 0;
    const unsigned long long bytes = sized ? a.count : 0;
    const unsigned char* in = reinterpret_cast<const unsigned char*>(a.in);
    const unsigned long long first = symm_ll_prefetch<1>(in, symm_aligned8(a.in), bytes);
    const auto check = [&] { return sized && symm_args_ok(a, 0, false); };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned int flag = (unsigned int)l.e;
        symm_ll_send<1>(a, in, symm_aligned8(a.in), bytes, parity, flag, -1, first);
        const unsigned long long chunks = (bytes + 7) / 8;
        const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
        const unsigned long long mine = symm_ll_first_chunk();
        if (a.world == 2) {
            // One peer: the own piece first, then the peer's, one line at a time (measured
            // 0.3-0.5 us faster a launch on 2 x H200 than the general loop below).
            const unsigned int peer = 1 - a.rank;
            for (unsigned int s = 0; s < 2; ++s) {
                const unsigned long long base = a.out + bytes * s;
                unsigned char* dst = reinterpret_cast<unsigned char*>(base);
                const bool dst8 = symm_aligned8(base);
                if (s == a.rank) {
                    if (a.in != base) {
                        for (unsigned long long c = mine; c < chunks; c += stride) {
                            const unsigned long long v =
                                c == mine ? first
                                          : symm_ld8<1>(in + c * 8, bytes - c * 8,
                                                        symm_aligned8(a.in));
                            symm_st8<1>(dst + c * 8, v, bytes - c * 8, dst8);
                        }
                    }
                    continue;
                }
                const uint4* slot = symm_ll_slot(a, a.rank, parity, peer);
                bool alive = true;
                for (unsigned long long c = mine; c < chunks && alive; c += stride) {
                    unsigned long long v;
                    alive = symm_ll_load(a, l.st, slot + c, flag, peer, l.e, &v);
                    if (alive) {
                        symm_st8<1>(dst + c * 8, v, bytes - c * 8, dst8);
                    }
                }
                if (!alive) {
                    break;
                }
            }
        }
        for (unsigned long long c = mine; a.world != 2 && c < chunks; c += stride) {
            const unsigned long long own =
                c == mine ? first : symm_ld8<1>(in + c * 8, bytes - c * 8, symm_aligned8(a.in));
            unsigned long long v[SYMM_MAX_WORLD];
            if (!symm_ll_load_all(a, l.st, parity, c, flag, l.e, v)) {
                break;
            }
#pragma unroll
            for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
                const unsigned long long base = a.out + bytes * s;
                // The own piece is copied unless the input already is it (in place).
                if (s < a.world && (s != a.rank || a.in != base)) {
                    symm_st8<1>(reinterpret_cast<unsigned char*>(base) + c * 8,
                                s == a.rank ? own : v[s], bytes - c * 8, symm_aligned8(base));
                }
            }
        }
    });
}

// count = BYTES of each rank's piece (output has world * count bytes); slot >= count. Any dtype.
SYMM_KERNEL symm_allgather(const SymmArgs a) {
    symm_enter();
    const auto check = [&] { return a.count <= (~0ULL >> 8) && symm_args_ok(a, a.count, true); };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned char* in = reinterpret_cast<const unsigned char*>(a.in);
        unsigned char* out = reinterpret_cast<unsigned char*>(a.out);
        unsigned long long lo, hi;
        symm_block_range(a.count, 16, &lo, &hi);
        symm_push<1>(a, in, symm_aligned16(a.in), lo, hi, 0, parity, -1);
        symm_block_barrier(a, l, 0);
        for (unsigned int s = 0; s < a.world; ++s) {
            const unsigned long long base = a.count * s;
            if (s == a.rank) {
                if (a.in != a.out + base) {
                    symm_copy<1>(out + base, symm_aligned16(a.out + base), in, symm_aligned16(a.in),
                                 lo, hi);
                }
            } else {
                symm_copy<1>(out + base, symm_aligned16(a.out + base),
                             symm_ws_slot(a, a.rank, 0, parity, s), true, lo, hi);
            }
        }
    });
}

// The epoch + flag barrier alone (phase 0), no data: for tests and copy-engine algorithms.
// Needs pad and state; ws, in, out, count, slot_bytes are ignored.
SYMM_KERNEL symm_barrier(const SymmArgs a) {
    symm_enter();
    const auto check = [&] { return symm_args_ok(a, 0, false); };
    symm_launch(a, check, [&](const SymmLaunch& l) {
        symm_block_barrier(a, l, 0);
    });
}

