// symm_common.cuh: device plumbing the kernel modules share: programmatic dependent launch, the
// global timer, element types (raw bits <-> f32) and 16-byte units. NVRTC receives it in memory
// (crates/symmcomm/src/kernels.rs, headers()) when a module writes #include "symm_common.cuh".

#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define SYMM_DEVICE static __device__ __forceinline__

// A no-op unless this grid was launched with programmatic dependent launch; then it waits until
// the preceding grid has finished and its memory is visible. First statement of every kernel.
SYMM_DEVICE void symm_grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Let the next grid on the stream launch now (if it was launched with programmatic dependent
// launch); it still waits in symm_grid_dependency_wait until this grid has completed. Called by
// our collectives right after their own wait, so the successor's launch overlaps their work.
SYMM_DEVICE void symm_launch_dependents() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Nanoseconds from the GPU's global timer.
SYMM_DEVICE unsigned long long symm_globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
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

