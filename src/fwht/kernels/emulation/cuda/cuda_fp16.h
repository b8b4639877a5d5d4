// CUDA's built-ins for fwht.cu, on the CPU emulation of emulator.h (tests only). The kernel's
// `#include <cuda_fp16.h>` finds this file first; it declares what the kernel uses.
#pragma once

#include <stdint.h>

#include "../emulator.h"

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
// Dynamic shared memory: one array, reused by the blocks, which run one after another.
#define __shared__

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { ::emu::scheduler.block_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned member_mask, T value, int lane_mask) {
  if (member_mask != 0xffffffffu) {
    ::emu::fail("__shfl_xor_sync with member mask %#x: the emulation runs full warps", member_mask);
  }
  return ::emu::scheduler.shuffle_xor(value, static_cast<unsigned>(lane_mask));
}

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) { return ::emu::f16_to_f32(h.bits); }
inline __half __float2half_rn(float value) { return __half{::emu::f32_to_f16(value)}; }
