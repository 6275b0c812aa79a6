// collectives.cu: our own NVLink collectives over symmetric memory (all-reduce one-shot and
// two-shot, all-gather, reduce-scatter, barrier) for bf16, f16 and f32 with f32 accumulation.
//
// Model: push, one barrier, finish locally. Each block stores its share of the data into the
// peers' workspaces (plain 16-byte stores over NVLink), signals every peer's flag for this block
// with a system-scope release store, waits on its own flags with acquire loads, then reads only
// its own workspace. One epoch per launch, the same on every rank; the workspace is
// double-buffered on the epoch's parity, so one barrier per phase is enough. The argument, the
// layouts and the launch rules are in crates/symmcomm/KERNELS.md; keep the two in step.
//
// No multimem / multicast instructions anywhere (see /work/shared/gpu-machine.md).

#include "symm_common.cuh"
#include "symm_abi.cuh"

// A spinning thread checks its deadline and this rank's error every this many polls.
#define SYMM_SPIN_CHECK_EVERY 256

// The LL (low-latency) area follows the pad: ll[parity][src] slots of SYMM_LL_SLOT_BYTES. Each
// 16-byte line carries 8 data bytes and the 32-bit launch flag twice ({d0, flag, d1, flag}), so
// a reader knows the data arrived from the line alone: no barrier, no fence. Only the LL kernels
// touch this area, so a line can only ever hold an older launch's flag (KERNELS.md §5a).

// ---------------------------------------------------------------------------------------------
// Plumbing.

// Generic addressing (no state space): correct for any pointer, local or a peer's mapping.
SYMM_DEVICE void symm_st_release_sys_u64(unsigned long long* p, unsigned long long v) {
    asm volatile("st.release.sys.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

SYMM_DEVICE unsigned long long symm_ld_acquire_sys_u64(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

SYMM_DEVICE void symm_st_release_sys_u32(unsigned int* p, unsigned int v) {
    asm volatile("st.release.sys.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Signal: make this block's earlier stores (ordered before by __syncthreads) visible to a peer,
// then store the flag: one release store at system scope. Measured on 2 x H200 against a fence
// plus a relaxed store and against __threadfence_system plus a volatile store: the release store
// was the fastest of the three (KERNELS.md).
SYMM_DEVICE void symm_signal(unsigned long long* flag, unsigned long long v) {
    symm_st_release_sys_u64(flag, v);
}

// Poll a flag with acquire semantics: once it shows the awaited epoch, this thread's later loads
// (and, after __syncthreads, the block's) see everything the peer stored before signalling.
SYMM_DEVICE unsigned long long symm_poll(const unsigned long long* flag) {
    return symm_ld_acquire_sys_u64(flag);
}

SYMM_DEVICE unsigned long long symm_min(unsigned long long x, unsigned long long y) {
    return x < y ? x : y;
}

SYMM_DEVICE bool symm_aligned16(unsigned long long address) { return (address & 15ULL) == 0; }

// ---------------------------------------------------------------------------------------------
// Element types: raw bits <-> f32. ES = element size in bytes.

struct SymmF32 {
    enum : int { ES = 4 };
    static __device__ __forceinline__ float to_f32(unsigned int b) { return __uint_as_float(b); }
    static __device__ __forceinline__ unsigned int from_f32(float f) { return __float_as_uint(f); }
};

struct SymmBF16 {
    enum : int { ES = 2 };
    static __device__ __forceinline__ float to_f32(unsigned int b) {
        return __bfloat162float(__ushort_as_bfloat16((unsigned short)b));
    }
    static __device__ __forceinline__ unsigned int from_f32(float f) {
        return __bfloat16_as_ushort(__float2bfloat16_rn(f));
    }
};

struct SymmF16 {
    enum : int { ES = 2 };
    static __device__ __forceinline__ float to_f32(unsigned int b) {
        return __half2float(__ushort_as_half((unsigned short)b));
    }
    static __device__ __forceinline__ unsigned int from_f32(float f) {
        return __half_as_ushort(__float2half_rn(f));
    }
};

// One element's raw bits at p (naturally aligned).
template <int ES>
SYMM_DEVICE unsigned int symm_ld_elem(const unsigned char* p) {
    if constexpr (ES == 4) {
        return *reinterpret_cast<const unsigned int*>(p);
    } else if constexpr (ES == 2) {
        return *reinterpret_cast<const unsigned short*>(p);
    } else {
        return *p;
    }
}

template <int ES>
SYMM_DEVICE void symm_st_elem(unsigned char* p, unsigned int v) {
    if constexpr (ES == 4) {
        *reinterpret_cast<unsigned int*>(p) = v;
    } else if constexpr (ES == 2) {
        *reinterpret_cast<unsigned short*>(p) = (unsigned short)v;
    } else {
        *p = (unsigned char)v;
    }
}

// 16 bytes at p: one vector access when p is 16-byte aligned, else element by element (p is
// then only ES-aligned). `aligned` is uniform over the block.
template <int ES>
SYMM_DEVICE uint4 symm_ld_unit(const unsigned char* p, bool aligned) {
    if (aligned) {
        return *reinterpret_cast<const uint4*>(p);
    }
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const unsigned char* q = p + 4 * k;
        if constexpr (ES == 4) {
            w[k] = symm_ld_elem<4>(q);
        } else if constexpr (ES == 2) {
            w[k] = symm_ld_elem<2>(q) | (symm_ld_elem<2>(q + 2) << 16);
        } else {
            w[k] = symm_ld_elem<1>(q) | (symm_ld_elem<1>(q + 1) << 8) |
                   (symm_ld_elem<1>(q + 2) << 16) | (symm_ld_elem<1>(q + 3) << 24);
        }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

template <int ES>
SYMM_DEVICE void symm_st_unit(unsigned char* p, uint4 v, bool aligned) {
    if (aligned) {
        *reinterpret_cast<uint4*>(p) = v;
        return;
    }
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        unsigned char* q = p + 4 * k;
        if constexpr (ES == 4) {
            symm_st_elem<4>(q, w[k]);
        } else if constexpr (ES == 2) {
            symm_st_elem<2>(q, w[k] & 0xffffu);
            symm_st_elem<2>(q + 2, w[k] >> 16);
        } else {
            symm_st_elem<1>(q, w[k] & 0xffu);
            symm_st_elem<1>(q + 1, (w[k] >> 8) & 0xffu);
            symm_st_elem<1>(q + 2, (w[k] >> 16) & 0xffu);
            symm_st_elem<1>(q + 3, w[k] >> 24);
        }
    }
}

// The 16 / ES elements of a unit, widened to f32 (exact for every type).
template <class Ty>
SYMM_DEVICE void symm_unit_to_f32(uint4 v, float* f) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if constexpr (Ty::ES == 4) {
            f[k] = Ty::to_f32(w[k]);
        } else {
            f[2 * k] = Ty::to_f32(w[k] & 0xffffu);
            f[2 * k + 1] = Ty::to_f32(w[k] >> 16);
        }
    }
}

// f32 accumulators back to a unit of Ty, rounded to nearest even.
template <class Ty>
SYMM_DEVICE uint4 symm_f32_to_unit(const float* f) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if constexpr (Ty::ES == 4) {
            w[k] = Ty::from_f32(f[k]);
        } else {
            w[k] = Ty::from_f32(f[2 * k]) | (Ty::from_f32(f[2 * k + 1]) << 16);
        }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---------------------------------------------------------------------------------------------
// Layout.

// Slot (area, parity, src) of rank `owner`'s workspace, as mapped in this rank's address space.
SYMM_DEVICE unsigned char* symm_ws_slot(const SymmArgs& a, unsigned int owner, unsigned int area,
                                        unsigned int parity, unsigned int src) {
    const unsigned long long index =
        ((unsigned long long)(area * SYMM_PARITIES + parity) * a.world + src);
    return reinterpret_cast<unsigned char*>(a.ws[owner]) + index * a.slot_bytes;
}

// flags[phase][block][src] of the pad at `pad`.
SYMM_DEVICE unsigned long long* symm_flag(unsigned long long pad, unsigned int phase,
                                          unsigned int block, unsigned int src) {
    return reinterpret_cast<unsigned long long*>(pad + SYMM_PAD_FLAGS_OFFSET) +
           ((phase * SYMM_MAX_BLOCKS + block) * SYMM_MAX_WORLD + src);
}

// peer_error[src] of the pad at `pad`.
SYMM_DEVICE unsigned int* symm_peer_error(unsigned long long pad, unsigned int src) {
    return reinterpret_cast<unsigned int*>(pad + SYMM_PAD_PEER_ERROR_OFFSET) + src;
}

// Elements [lo, hi) of a range of `len` that this block handles: whole 16-byte units (n elements
// each) split as evenly as possible over the grid; only the range's last unit may be partial.
// Depends only on (len, n, blockIdx.x, gridDim.x), so block b covers the same elements on every
// rank.
SYMM_DEVICE void symm_block_range(unsigned long long len, unsigned long long n,
                                  unsigned long long* lo, unsigned long long* hi) {
    const unsigned long long units = (len + n - 1) / n;
    const unsigned long long b = blockIdx.x;
    const unsigned long long g = gridDim.x;
    *lo = symm_min(units * b / g * n, len);
    *hi = symm_min(units * (b + 1) / g * n, len);
}

// ---------------------------------------------------------------------------------------------
// Epoch, barrier, errors.

SYMM_DEVICE void symm_record_error(SymmState* st, unsigned int code, unsigned int src,
                                   unsigned int phase, unsigned long long e) {
    if (atomicCAS(&st->error, SYMM_ERR_NONE, code) == SYMM_ERR_NONE) {
        st->error_src = src;
        st->error_block = blockIdx.x;
        st->error_phase = phase;
        st->error_epoch = e;
    }
}

// The host's arguments, checked the same way on every rank. `slot_need`: bytes of the largest
// piece a slot must hold; `uses_ws`: whether the kernel touches the workspace.
SYMM_DEVICE bool symm_args_ok(const SymmArgs& a, unsigned long long slot_need, bool uses_ws) {
    if (a.world < 2 || a.world > SYMM_MAX_WORLD || a.rank >= a.world) {
        return false;
    }
    if (gridDim.x > SYMM_MAX_BLOCKS || gridDim.y != 1 || gridDim.z != 1 ||
        blockDim.x < a.world || blockDim.y != 1 || blockDim.z != 1) {
        return false;
    }
    for (unsigned int p = 0; p < a.world; ++p) {
        if (a.pad[p] == 0 || (a.pad[p] & 7ULL) != 0) {
            return false;
        }
        if (uses_ws && (a.ws[p] == 0 || !symm_aligned16(a.ws[p]))) {
            return false;
        }
    }
    if (uses_ws && (slot_need > a.slot_bytes || (a.slot_bytes & 15ULL) != 0)) {
        return false;
    }
    return true;
}

// One launch as seen by one block: its epoch (the same in every block and on every rank), and,
// in thread 0 only, this block's arrival number and which peers had reported an error.
struct SymmLaunch {
    SymmState* st;
    unsigned long long e;
    unsigned int arrival;
    unsigned int peer_errors;
};

// Entry of every kernel: wait for the predecessor grid (PDL), then let the successor launch.
SYMM_DEVICE void symm_enter() {
    symm_grid_dependency_wait();
    symm_launch_dependents();
}

// Start of a launch, after symm_enter: read the epoch (one more than the last
// completed launch on this rank), then count this block in. Counting in only after the whole
// block has the epoch is what lets the last block to arrive advance it (in symm_finish) while
// other blocks may still be running. Thread 0 also reads this rank's peer_error words. Both
// results are used only in symm_finish, so their latency hides behind the block's work.
// False when there is no state to work with (nothing can be reported then).
SYMM_DEVICE bool symm_take_epoch(const SymmArgs& a, SymmLaunch* l) {
    __shared__ unsigned long long epoch;
    l->st = reinterpret_cast<SymmState*>(a.state);
    if (l->st == nullptr) {
        return false;
    }
    if (threadIdx.x == 0) {
        epoch = *reinterpret_cast<const volatile unsigned long long*>(&l->st->epoch) + 1;
    }
    __syncthreads();
    l->e = epoch;
    l->arrival = 0;
    l->peer_errors = 0;
    if (threadIdx.x == 0) {
        l->arrival = atomicAdd(&l->st->blocks_done, 1u);
        if (a.world <= SYMM_MAX_WORLD && a.rank < a.world && a.pad[a.rank] != 0) {
#pragma unroll
            for (unsigned int p = 0; p < SYMM_MAX_WORLD; ++p) {
                if (p < a.world && p != a.rank &&
                    *reinterpret_cast<const volatile unsigned int*>(
                        symm_peer_error(a.pad[a.rank], p)) != 0u) {
                    l->peer_errors |= 1u << p;
                }
            }
        }
    }
    return true;
}

// One thread waits until *flag >= e. Past the deadline it records SYMM_ERR_TIMEOUT, tells every
// peer through its pad, and gives up. Once this rank has an error, it stops waiting at once, so
// a stuck peer costs one timeout, not one per launch.
// symm_enter, then symm_take_epoch.
SYMM_DEVICE bool symm_begin(const SymmArgs& a, SymmLaunch* l) {
    symm_enter();
    return symm_take_epoch(a, l);
}

// Called by a spinning thread on iteration `it` of a wait for `src`: true when it must stop
// waiting. Every SYMM_SPIN_CHECK_EVERY iterations it checks whether this rank already has an
// error (then it stops at once, so a stuck peer costs one timeout, not one per launch) and the
// deadline; past the deadline it records SYMM_ERR_TIMEOUT and tells every peer through its pad.
SYMM_DEVICE bool symm_spin_must_stop(const SymmArgs& a, SymmState* st, unsigned long long it,
                                     unsigned long long* start, unsigned int src,
                                     unsigned int phase, unsigned long long e) {
    if (it % SYMM_SPIN_CHECK_EVERY != 0) {
        return false;
    }
    if (*reinterpret_cast<volatile unsigned int*>(&st->error) != SYMM_ERR_NONE) {
        return true;
    }
    const unsigned long long timeout = a.timeout_ns != 0 ? a.timeout_ns : SYMM_DEFAULT_TIMEOUT_NS;
    const unsigned long long now = symm_globaltimer();
    if (it == 0) {
        *start = now;
        return false;
    }
    if (now - *start <= timeout) {
        return false;
    }
    symm_record_error(st, SYMM_ERR_TIMEOUT, src, phase, e);
    for (unsigned int p = 0; p < a.world; ++p) {
        if (p != a.rank) {
            symm_st_release_sys_u32(symm_peer_error(a.pad[p], a.rank), 1u);
        }
    }
    return true;
}

// One thread waits until *flag >= e, or gives up (symm_spin_must_stop).
SYMM_DEVICE void symm_wait_flag(const SymmArgs& a, SymmState* st, const unsigned long long* flag,
                                unsigned long long e, unsigned int src, unsigned int phase) {
    unsigned long long start = 0;
    for (unsigned long long it = 0;; ++it) {
        if (symm_poll(flag) >= e) {
            return;
        }
        if (symm_spin_must_stop(a, st, it, &start, src, phase, e)) {
            return;
        }
    }
}

// Block barrier with the same block of every peer, for `phase` of launch epoch `e`. Everything
// this block stored before it (any thread) is visible to the peers' blocks after theirs.
SYMM_DEVICE void symm_block_barrier(const SymmArgs& a, const SymmLaunch& l, unsigned int phase) {
    __syncthreads();
    const unsigned int t = threadIdx.x;
    if (t < a.world && t != a.rank) {
        symm_signal(symm_flag(a.pad[t], phase, blockIdx.x, a.rank), l.e);
        symm_wait_flag(a, l.st, symm_flag(a.pad[a.rank], phase, blockIdx.x, t), l.e, t, phase);
    }
    __syncthreads();
}

// End of a launch: the last block to have arrived advances the epoch for the next launch (every
// block of this one has read it) and surfaces a peer's error report seen at the start. No fence:
// the next launch on this stream starts after this grid has completed and its writes are visible
// (also under PDL, through griddepcontrol.wait).
SYMM_DEVICE void symm_finish(const SymmLaunch& l, bool ok) {
    if (threadIdx.x != 0 || l.arrival != gridDim.x - 1) {
        return;
    }
    if (ok && l.peer_errors != 0) {
        const unsigned int src = (unsigned int)(__ffs((int)l.peer_errors) - 1);
        symm_record_error(l.st, SYMM_ERR_PEER, src, 0, l.e);
    }
    l.st->blocks_done = 0;
    *reinterpret_cast<volatile unsigned long long*>(&l.st->epoch) = l.e;
}

// ---------------------------------------------------------------------------------------------
// Data movement. Offsets are element offsets within a "frame": the same element index addresses
// the source, the workspace slot and the destination.

// Elements [lo, hi) of src (this rank's memory) into slot (area, parity, rank) of each peer, or
// of `only_peer` alone when it is >= 0. Loads once, stores to every peer.
template <int ES>
SYMM_DEVICE void symm_push(const SymmArgs& a, const unsigned char* src, bool src_aligned,
                           unsigned long long lo, unsigned long long hi, unsigned int area,
                           unsigned int parity, int only_peer) {
    constexpr unsigned long long n = 16 / ES;
    unsigned char* dst[SYMM_MAX_WORLD];
#pragma unroll
    for (int p = 0; p < SYMM_MAX_WORLD; ++p) {
        const bool to_p = (unsigned int)p < a.world && (unsigned int)p != a.rank &&
                          (only_peer < 0 || p == only_peer);
        dst[p] = to_p ? symm_ws_slot(a, p, area, parity, a.rank) : nullptr;
    }
    const unsigned long long units = (hi - lo) / n;
    for (unsigned long long k = threadIdx.x; k < units; k += blockDim.x) {
        const unsigned long long off = (lo + k * n) * ES;
        const uint4 v = symm_ld_unit<ES>(src + off, src_aligned);
#pragma unroll
        for (int p = 0; p < SYMM_MAX_WORLD; ++p) {
            if (dst[p] != nullptr) {
                *reinterpret_cast<uint4*>(dst[p] + off) = v;
            }
        }
    }
    for (unsigned long long i = lo + units * n + threadIdx.x; i < hi; i += blockDim.x) {
        const unsigned int v = symm_ld_elem<ES>(src + i * ES);
#pragma unroll
        for (int p = 0; p < SYMM_MAX_WORLD; ++p) {
            if (dst[p] != nullptr) {
                symm_st_elem<ES>(dst[p] + i * ES, v);
            }
        }
    }
}

// Elements [lo, hi): dst = src.
template <int ES>
SYMM_DEVICE void symm_copy(unsigned char* dst, bool dst_aligned, const unsigned char* src,
                           bool src_aligned, unsigned long long lo, unsigned long long hi) {
    constexpr unsigned long long n = 16 / ES;
    const unsigned long long units = (hi - lo) / n;
    for (unsigned long long k = threadIdx.x; k < units; k += blockDim.x) {
        const unsigned long long off = (lo + k * n) * ES;
        symm_st_unit<ES>(dst + off, symm_ld_unit<ES>(src + off, src_aligned), dst_aligned);
    }
    for (unsigned long long i = lo + units * n + threadIdx.x; i < hi; i += blockDim.x) {
        symm_st_elem<ES>(dst + i * ES, symm_ld_elem<ES>(src + i * ES));
    }
}

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
// The collectives. Each: wait for the predecessor (PDL), take the epoch, check the arguments,
// move data, finish. Invalid arguments move nothing, record SYMM_ERR_ARGS and still advance the
// epoch, so the epochs of the ranks stay equal when every rank got the same arguments.

// count = elements of the whole buffer; slot >= count * ES.
template <class Ty>
SYMM_DEVICE void symm_oneshot_allreduce(const SymmArgs& a) {
    SymmLaunch l;
    if (!symm_begin(a, &l)) {
        return;
    }
    constexpr int ES = Ty::ES;
    const bool ok = a.count <= (~0ULL >> 5) && symm_args_ok(a, a.count * ES, true);
    if (ok) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        unsigned long long lo, hi;
        symm_block_range(a.count, 16 / ES, &lo, &hi);
        const unsigned char* in = reinterpret_cast<const unsigned char*>(a.in);
        unsigned char* out = reinterpret_cast<unsigned char*>(a.out);
        symm_push<ES>(a, in, symm_aligned16(a.in), lo, hi, 0, parity, -1);
        symm_block_barrier(a, l, 0);
        symm_reduce<Ty>(a, in, symm_aligned16(a.in), parity, lo, hi, out, symm_aligned16(a.out),
                        false);
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
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
    SymmLaunch l;
    if (!symm_begin(a, &l)) {
        return;
    }
    constexpr int ES = Ty::ES;
    constexpr unsigned long long n = 16 / ES;
    const bool sane = a.count <= (~0ULL >> 5) && a.world >= 2 && a.world <= SYMM_MAX_WORLD;
    const unsigned long long chunk = sane ? symm_twoshot_chunk<ES>(a) : 0;
    const bool ok = sane && symm_args_ok(a, chunk * ES, true);
    if (ok) {
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
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
}

// count = elements of each rank's piece (output has world * count); slot >= count * ES.
template <class Ty>
SYMM_DEVICE void symm_reducescatter(const SymmArgs& a) {
    SymmLaunch l;
    if (!symm_begin(a, &l)) {
        return;
    }
    constexpr int ES = Ty::ES;
    const bool ok = a.count <= (~0ULL >> 8) && symm_args_ok(a, a.count * ES, true);
    if (ok) {
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
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
}

// ---------------------------------------------------------------------------------------------
// Low-latency (LL) protocol: the data carries its own flag. A sender stores each 8 bytes of
// payload with the launch's flag into the receiver's LL slot in one 16-byte volatile store; the
// receiver polls its own slot line by line until both flags of a line show this launch. One
// NVLink crossing, no barrier, no fence. Twice the bytes on the wire, so it is for small sizes
// (payload <= SYMM_LL_MAX_BYTES per piece). Each thread owns 8-byte chunks c = tid, tid + stride,
// ... of a piece; chunk c of every rank's piece goes to line c of the slot.

// Slot (parity, src) of rank `owner`'s LL area, as mapped in this rank's address space.
SYMM_DEVICE uint4* symm_ll_slot(const SymmArgs& a, unsigned int owner, unsigned int parity,
                                unsigned int src) {
    return reinterpret_cast<uint4*>(a.pad[owner] + SYMM_LL_OFFSET +
                                    ((unsigned long long)parity * a.world + src) *
                                        SYMM_LL_SLOT_BYTES);
}

SYMM_DEVICE void symm_ll_store(uint4* line, unsigned long long v, unsigned int flag) {
    asm volatile("st.volatile.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(line),
                 "r"((unsigned int)v), "r"(flag), "r"((unsigned int)(v >> 32)), "r"(flag)
                 : "memory");
}

// Wait for line's flags to show `flag`, then return its 8 data bytes in *v. False when the wait
// gave up (symm_spin_must_stop); *v is then 0.
SYMM_DEVICE bool symm_ll_load(const SymmArgs& a, SymmState* st, const uint4* line,
                              unsigned int flag, unsigned int src, unsigned long long e,
                              unsigned long long* v) {
    unsigned long long start = 0;
    for (unsigned long long it = 0;; ++it) {
        unsigned int d0, f0, d1, f1;
        asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(d0), "=r"(f0), "=r"(d1), "=r"(f1)
                     : "l"(line)
                     : "memory");
        if (f0 == flag && f1 == flag) {
            *v = (unsigned long long)d0 | ((unsigned long long)d1 << 32);
            return true;
        }
        if (symm_spin_must_stop(a, st, it, &start, src, SYMM_LL_PHASE, e)) {
            *v = 0;
            return false;
        }
    }
}

// Wait for line c of slot (parity, s) from every peer s, and return each line's 8 data bytes in
// v[s] (v[rank] is left alone). All pending lines are loaded back to back before any is checked,
// so their NVLink/L2 latencies overlap instead of adding up one peer after another. False when
// the wait gave up (symm_spin_must_stop), naming the lowest peer still missing.
SYMM_DEVICE bool symm_ll_load_all(const SymmArgs& a, SymmState* st, unsigned int parity,
                                  unsigned long long c, unsigned int flag, unsigned long long e,
                                  unsigned long long (&v)[SYMM_MAX_WORLD]) {
    unsigned int pending = 0;
#pragma unroll
    for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
        if (s < a.world && s != a.rank) {
            pending |= 1u << s;
        }
    }
    unsigned long long start = 0;
    for (unsigned long long it = 0;; ++it) {
        unsigned int d0[SYMM_MAX_WORLD], f0[SYMM_MAX_WORLD], d1[SYMM_MAX_WORLD],
            f1[SYMM_MAX_WORLD];
#pragma unroll
        for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
            if (pending & (1u << s)) {
                asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(d0[s]), "=r"(f0[s]), "=r"(d1[s]), "=r"(f1[s])
                             : "l"(symm_ll_slot(a, a.rank, parity, s) + c)
                             : "memory");
            }
        }
#pragma unroll
        for (unsigned int s = 0; s < SYMM_MAX_WORLD; ++s) {
            if ((pending & (1u << s)) && f0[s] == flag && f1[s] == flag) {
                v[s] = (unsigned long long)d0[s] | ((unsigned long long)d1[s] << 32);
                pending &= ~(1u << s);
            }
        }
        if (pending == 0) {
            return true;
        }
        if (symm_spin_must_stop(a, st, it, &start, (unsigned int)(__ffs(pending) - 1),
                                SYMM_LL_PHASE, e)) {
            return false;
        }
    }
}

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
    SymmLaunch l;
    if (!symm_take_epoch(a, &l)) {
        return;
    }
    const bool ok = sized && symm_args_ok(a, 0, false);
    if (ok) {
        const unsigned int parity = (unsigned int)(l.e & 1);
        const unsigned int flag = (unsigned int)l.e;
        symm_ll_send<ES>(a, in, symm_aligned8(a.in), bytes, parity, flag, -1, first);
        symm_ll_reduce<Ty>(a, l, in, symm_aligned8(a.in), first,
                           reinterpret_cast<unsigned char*>(a.out), symm_aligned8(a.out), bytes,
                           parity, flag);
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
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
    SymmLaunch l;
    if (!symm_take_epoch(a, &l)) {
        return;
    }
    const bool ok = sized && symm_args_ok(a, 0, false);
    if (ok) {
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
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
}

// ---------------------------------------------------------------------------------------------
// Entry points (left out when another module compiles this file for its protocol: dcp.cu).
#ifndef SYMM_PROTOCOL_ONLY
// Launch: block (SYMM_BLOCK_THREADS, 1, 1), grid (g, 1, 1) with 1 <= g <= 64, the
// same g on every rank; see KERNELS.md.

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
    SymmLaunch l;
    if (!symm_take_epoch(a, &l)) {
        return;
    }
    const bool ok = sized && symm_args_ok(a, 0, false);
    if (ok) {
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
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
}

// count = BYTES of each rank's piece (output has world * count bytes); slot >= count. Any dtype.
SYMM_KERNEL symm_allgather(const SymmArgs a) {
    SymmLaunch l;
    if (!symm_begin(a, &l)) {
        return;
    }
    const bool ok = a.count <= (~0ULL >> 8) && symm_args_ok(a, a.count, true);
    if (ok) {
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
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
}

// The epoch + flag barrier alone (phase 0), no data: for tests and copy-engine algorithms.
// Needs pad and state; ws, in, out, count, slot_bytes are ignored.
SYMM_KERNEL symm_barrier(const SymmArgs a) {
    SymmLaunch l;
    if (!symm_begin(a, &l)) {
        return;
    }
    const bool ok = symm_args_ok(a, 0, false);
    if (ok) {
        symm_block_barrier(a, l, 0);
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
}

#endif // SYMM_PROTOCOL_ONLY
