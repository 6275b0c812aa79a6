// symm_protocol.cuh: the synchronisation protocol every kernel that runs on a group's signal
// pads and state speaks (the collectives of collectives.cu, the fused combine of dcp.cu, the
// fused add-RMSNorm kernels of rmsnorm.cu): one epoch per launch, the same on every rank; a
// barrier of release stores and acquire polls on 64-bit flags in the peers' pads; the workspace
// (with the pushes and copies that move data through it) and the LL area double-buffered on the
// epoch's parity; deadlines and errors recorded in the rank's SymmState and reported to the
// peers. The
// argument that it is correct, and the layouts, are in crates/symmcomm/KERNELS.md (sections 3,
// 5 and 5a). NVRTC receives this header in memory (crates/symmcomm/src/kernels.rs, headers()).

#pragma once

#include "symm_common.cuh"
#include "symm_abi.cuh"

// A spinning thread checks its deadline and this rank's error every this many polls.
#define SYMM_SPIN_CHECK_EVERY 256

// ---------------------------------------------------------------------------------------------
// Memory order across GPUs.

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
// was the fastest of the three (KERNELS.md section 8).
SYMM_DEVICE void symm_signal(unsigned long long* flag, unsigned long long v) {
    symm_st_release_sys_u64(flag, v);
}

// Poll a flag with acquire semantics: once it shows the awaited epoch, this thread's later loads
// (and, after __syncthreads, the block's) see everything the peer stored before signalling.
SYMM_DEVICE unsigned long long symm_poll(const unsigned long long* flag) {
    return symm_ld_acquire_sys_u64(flag);
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

// The skeleton of every kernel of the protocol, after its first statement, symm_enter(), and
// whatever it loads before the epoch (the LL kernels' first input chunks): take the epoch; ask
// `check()` whether the arguments are good; run `work(l)` if so, else record SYMM_ERR_ARGS
// (thread 0 of every block; the first error wins); finish. Invalid arguments thus move nothing
// and still advance the epoch, so the epochs of the ranks stay equal when every rank got the
// same arguments. Without a state (a.state == 0) nothing runs: nothing could be reported.
// `check` (no arguments, returns bool) and `work` (takes const SymmLaunch&) are lambdas; both
// are inlined, and `check` runs after the epoch is taken, where the kernels always checked.
template <class Check, class Work>
SYMM_DEVICE void symm_launch(const SymmArgs& a, const Check& check, const Work& work) {
    SymmLaunch l;
    if (!symm_take_epoch(a, &l)) {
        return;
    }
    const bool ok = check();
    if (ok) {
        work(l);
    } else if (threadIdx.x == 0) {
        symm_record_error(l.st, SYMM_ERR_ARGS, 0, 0, l.e);
    }
    symm_finish(l, ok);
}

// ---------------------------------------------------------------------------------------------
// Data movement over the workspace (the collectives of collectives.cu, the fused add-RMSNorm
// kernels of rmsnorm.cu). Offsets are element offsets within a "frame": the same element index
// addresses the source, the workspace slot and the destination.

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

// ---------------------------------------------------------------------------------------------
// The low-latency (LL) protocol: the data carries its own flag. A sender stores each 8 bytes of
// payload with the launch's flag into the receiver's LL slot in one 16-byte volatile store; the
// receiver polls its own slot line by line until both flags of a line show this launch. One
// NVLink crossing, no barrier, no fence. Twice the bytes on the wire, so it is for small sizes
// (payload <= SYMM_LL_MAX_BYTES per piece).
//
// The LL area follows the pad: ll[parity][src] slots of SYMM_LL_SLOT_BYTES. Each 16-byte line
// carries 8 data bytes and the 32-bit launch flag twice ({d0, flag, d1, flag}), so a reader
// knows the data arrived from the line alone. Only the LL kernels touch this area, so a line can
// only ever hold an older launch's flag (KERNELS.md §5a).

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

