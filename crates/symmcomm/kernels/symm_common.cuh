// symm_common.cuh: device plumbing every kernel module shares. NVRTC receives it in memory
// (crates/symmcomm/src/kernels.rs, HEADERS) when a module writes #include "symm_common.cuh".

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
