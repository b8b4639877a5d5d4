// Metal's types and built-ins for fwht.metal, on the CPU emulation of emulator.h (tests only),
// without the keyword macros of metal_stdlib, so that the harness can use them too.
#pragma once

#include "../emulator.h"

typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned short ushort;

struct half {
  uint16_t bits;
  half(float value) : bits(::emu::f32_to_f16(value)) {}
  operator float() const { return ::emu::f16_to_f32(bits); }
};

struct bfloat {
  uint16_t bits;
  bfloat(float value) : bits(::emu::f32_to_bf16(value)) {}
  operator float() const { return ::emu::bf16_to_f32(bits); }
};

// Metal defines this where bfloat exists (Metal 3.1+).
#define __HAVE_BFLOAT__ 1

namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup };

inline void threadgroup_barrier(mem_flags) { ::emu::scheduler.block_barrier(); }

inline float simd_shuffle_xor(float value, ushort lane_mask) {
  return ::emu::scheduler.shuffle_xor(value, lane_mask);
}
}  // namespace metal
