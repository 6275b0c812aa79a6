// util.cu: the small kernels around the collectives. The reference data generator (bit for bit
// the same as crates/symmcomm/src/fill.rs), an epoch counter bump for CUDA graphs, an ordering
// guard for NCCL's programmatic-dependent-launch kernels, and a GPU-to-GPU flag ping-pong.
//
// Compiled at run time by NVRTC (crates/symmcomm/src/kernels.rs); ABI in
// crates/symmcomm/KERNELS.md.
//
// No multimem / multicast instructions anywhere: the GPU machines this project runs on must never
// run NVLink multicast (crates/symmcomm/KERNELS.md, introduction; a test greps for them).

#include "symm_common.cuh"

// How long the ping-pong waits for one reply before it gives up (10 s).
#define SYMM_PINGPONG_TIMEOUT_NS 10000000000ULL

// ---------------------------------------------------------------------------------------------
// Plumbing beyond symm_common.cuh.

SYMM_DEVICE void symm_st_release_sys_u32(volatile unsigned int* p, unsigned int v) {
    asm volatile("st.release.sys.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

SYMM_DEVICE unsigned int symm_ld_acquire_sys_u32(const volatile unsigned int* p) {
    unsigned int v;
    asm volatile("ld.acquire.sys.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// ---------------------------------------------------------------------------------------------
// The reference generator. Keep in step with src/fill.rs: a test checks that every constant of
// fill.rs appears in this file.

// SplitMix64's finaliser (fill.rs: splitmix64).
SYMM_DEVICE unsigned long long symm_splitmix64(unsigned long long x) {
    unsigned long long z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// 64 random bits for element i (fill.rs: raw).
SYMM_DEVICE unsigned long long symm_raw(unsigned long long seed, unsigned long long rank,
                                        unsigned long long epoch, unsigned long long i) {
    const unsigned long long a = symm_splitmix64((epoch * 0xD1B54A32D192ED03ULL) ^ i);
    const unsigned long long b = symm_splitmix64((rank * 0x8CB92BA72F3D8DD7ULL) ^ a);
    return symm_splitmix64(seed ^ b);
}

// Uniform on [-1, 1) from the top 24 bits (fill.rs: unit_f32). Every step is exact in f32 (24-bit
// integer, times 2^-23 = 1 / 8388608, minus 1), so no rounding mode or contraction can change it;
// the _rn intrinsics pin it anyway.
SYMM_DEVICE float symm_unit_f32(unsigned long long bits) {
    const float k = __uint2float_rn((unsigned int)(bits >> 40));
    return __fsub_rn(__fmul_rn(k, 1.0f / 8388608.0f), 1.0f);
}

SYMM_DEVICE void symm_fill_store(float* p, unsigned long long bits) { *p = symm_unit_f32(bits); }

SYMM_DEVICE void symm_fill_store(__half* p, unsigned long long bits) {
    *p = __float2half_rn(symm_unit_f32(bits));
}

SYMM_DEVICE void symm_fill_store(__nv_bfloat16* p, unsigned long long bits) {
    *p = __float2bfloat16_rn(symm_unit_f32(bits));
}

SYMM_DEVICE void symm_fill_store(int* p, unsigned long long bits) {
    *p = (int)(unsigned int)(bits >> 32);
}

SYMM_DEVICE void symm_fill_store(unsigned char* p, unsigned long long bits) {
    *p = (unsigned char)(bits >> 56);
}

// out[i] = fill value of (seed, rank, epoch, i) for i in 0..n; grid-stride, any grid.
template <typename T>
SYMM_DEVICE void symm_fill(T* out, unsigned long long n, unsigned long long seed,
                           unsigned long long rank, const unsigned long long* epoch,
                           unsigned long long epoch_if_null) {
    symm_grid_dependency_wait();
    const unsigned long long e = epoch != nullptr ? *epoch : epoch_if_null;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        symm_fill_store(out + i, symm_raw(seed, rank, e, i));
    }
}

extern "C" __global__ void symm_fill_f32(float* out, unsigned long long n, unsigned long long seed,
                                         unsigned long long rank, const unsigned long long* epoch,
                                         unsigned long long epoch_if_null) {
    symm_fill(out, n, seed, rank, epoch, epoch_if_null);
}

extern "C" __global__ void symm_fill_f16(__half* out, unsigned long long n, unsigned long long seed,
                                         unsigned long long rank, const unsigned long long* epoch,
                                         unsigned long long epoch_if_null) {
    symm_fill(out, n, seed, rank, epoch, epoch_if_null);
}

extern "C" __global__ void symm_fill_bf16(__nv_bfloat16* out, unsigned long long n,
                                          unsigned long long seed, unsigned long long rank,
                                          const unsigned long long* epoch,
                                          unsigned long long epoch_if_null) {
    symm_fill(out, n, seed, rank, epoch, epoch_if_null);
}

extern "C" __global__ void symm_fill_i32(int* out, unsigned long long n, unsigned long long seed,
                                         unsigned long long rank, const unsigned long long* epoch,
                                         unsigned long long epoch_if_null) {
    symm_fill(out, n, seed, rank, epoch, epoch_if_null);
}

extern "C" __global__ void symm_fill_u8(unsigned char* out, unsigned long long n,
                                        unsigned long long seed, unsigned long long rank,
                                        const unsigned long long* epoch,
                                        unsigned long long epoch_if_null) {
    symm_fill(out, n, seed, rank, epoch, epoch_if_null);
}

// The bf16 fill, as a deliberately bad producer for PDL tests: it lets its dependents launch at
// once (griddepcontrol.launch_dependents), then spins for delay_ns, then writes. A consumer
// launched after it with programmatic dependent launch that reads its input before
// griddepcontrol.wait (NCCL 2.28.0 to 2.30.6's symmetric kernels) sees stale data.
extern "C" __global__ void symm_slow_fill_bf16(__nv_bfloat16* out, unsigned long long n,
                                               unsigned long long seed, unsigned long long rank,
                                               const unsigned long long* epoch,
                                               unsigned long long epoch_if_null,
                                               unsigned long long delay_ns) {
    symm_grid_dependency_wait();
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    const unsigned long long t0 = symm_globaltimer();
    while (symm_globaltimer() - t0 < delay_ns) {
    }
    symm_fill(out, n, seed, rank, epoch, epoch_if_null);
}

// ---------------------------------------------------------------------------------------------

// *counter += 1, by one thread: advances the data epoch inside a CUDA graph between replays.
// Launch with one block of one thread.
extern "C" __global__ void symm_bump(unsigned long long* counter) {
    symm_grid_dependency_wait();
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        *counter += 1;
    }
}

// Does nothing. Launched *without* programmatic dependent launch between a producer kernel and an
// NCCL symmetric kernel that is launched with it (NCCL 2.28.0 to 2.30.6 do not wait for their
// predecessor): this grid starts only after the producer has finished, so the NCCL kernel, which
// may start as soon as this one exits, sees the producer's writes. The wait makes it correct even
// when it is itself launched with PDL.
extern "C" __global__ void symm_guard() { symm_grid_dependency_wait(); }

// Waits until *flag >= v; false once it has waited longer than SYMM_PINGPONG_TIMEOUT_NS.
SYMM_DEVICE bool symm_pingpong_wait(const volatile unsigned int* flag, unsigned int v) {
    unsigned long long start = 0;
    for (unsigned long long it = 0;; ++it) {
        if (symm_ld_acquire_sys_u32(flag) >= v) {
            return true;
        }
        if ((it & 255u) == 0u) {
            const unsigned long long now = symm_globaltimer();
            if (it == 0) {
                start = now;
            } else if (now - start > SYMM_PINGPONG_TIMEOUT_NS) {
                return false;
            }
        }
    }
}

// GPU-to-GPU flag round trip, one thread on each of two GPUs. For i = 1..iters the initiator
// stores i to peer_flag and waits until my_flag == i; the other side waits for i on my_flag and
// stores i to peer_flag. Both flags must be 0 before the launch. *out_ns (may be null) gets the
// total time in ns on this side, or ~0 if one reply took longer than 10 s.
extern "C" __global__ void symm_flag_pingpong(volatile unsigned int* my_flag,
                                              volatile unsigned int* peer_flag,
                                              unsigned int iters, unsigned int initiator,
                                              unsigned long long* out_ns) {
    symm_grid_dependency_wait();
    if (blockIdx.x != 0 || threadIdx.x != 0) {
        return;
    }
    const unsigned long long t0 = symm_globaltimer();
    bool ok = true;
    for (unsigned int i = 1; ok && i <= iters; ++i) {
        if (initiator != 0) {
            symm_st_release_sys_u32(peer_flag, i);
            ok = symm_pingpong_wait(my_flag, i);
        } else {
            ok = symm_pingpong_wait(my_flag, i);
            symm_st_release_sys_u32(peer_flag, i);
        }
    }
    const unsigned long long t1 = symm_globaltimer();
    if (out_ns != nullptr) {
        *out_ns = ok ? t1 - t0 : ~0ULL;
    }
}
