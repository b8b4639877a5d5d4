// CUDA's bfloat16 type for fwht.cu, on the CPU emulation (tests only); see cuda_fp16.h.
#pragma once

#include "cuda_fp16.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) { return ::emu::bf16_to_f32(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  return __nv_bfloat16{::emu::f32_to_bf16(value)};
}
