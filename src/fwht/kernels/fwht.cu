// The fast Walsh-Hadamard transform on NVIDIA GPUs, compiled to PTX by build.rs.
//
// One row of length D = 2^log_d is transformed by T = D / E threads holding E = 2^LOG_E
// values each, in three stages that each handle some of the log_d butterfly levels (the
// levels commute, so any order gives H·x):
//   1. registers: thread t holds elements r·T + t (r < E), so the top LOG_E index bits live in
//      registers and are transformed without any communication; the loads are coalesced;
//   2. warp shuffles: the next five bits (or fewer, for short rows) are lanes of one warp;
//   3. shared memory: when a row spans W = 2^LOG_W > 1 warps, the warp bits are exchanged
//      through shared memory and transformed in registers again on the way out.
// Rows up to 2^10 use one warp each and no shared memory; rows up to 2^15 (2^14 in f64) take
// one launch. Longer rows are transformed in blocks of that length first, then by strided
// radix-32 passes over the remaining bits. Half-precision types are computed in f32 and
// rounded once; the scale is applied at the final store.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

template <typename T> struct Io;
template <> struct Io<float> {
  typedef float Acc;
  static __device__ __forceinline__ float load(const float *p) { return *p; }
  static __device__ __forceinline__ void store(float *p, float v) { *p = v; }
};
template <> struct Io<double> {
  typedef double Acc;
  static __device__ __forceinline__ double load(const double *p) { return *p; }
  static __device__ __forceinline__ void store(double *p, double v) { *p = v; }
};
template <> struct Io<__half> {
  typedef float Acc;
  static __device__ __forceinline__ float load(const __half *p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half *p, float v) { *p = __float2half_rn(v); }
};
template <> struct Io<__nv_bfloat16> {
  typedef float Acc;
  static __device__ __forceinline__ float load(const __nv_bfloat16 *p) {
    return __bfloat162float(*p);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16 *p, float v) {
    *p = __float2bfloat16_rn(v);
  }
};

// Butterflies over all index bits of a register array of N = 2^LOG_N values.
template <typename A, int LOG_N>
static __device__ __forceinline__ void butterflies_in_registers(A *v) {
#pragma unroll
  for (int h = 1; h < (1 << LOG_N); h <<= 1) {
#pragma unroll
    for (int r = 0; r < (1 << LOG_N); ++r) {
      if ((r & h) == 0) {
        A a = v[r];
        A b = v[r + h];
        v[r] = a + b;
        v[r + h] = a - b;
      }
    }
  }
}

// Rows of D = 2^log_d <= 2^(LOG_E + 5 + LOG_W) elements; `rows_per_block` rows per block of
// rows_per_block · T threads, T = D / E. With LOG_W > 0 a block holds whole rows of W warps
// and needs rows_per_block · D accumulator values of dynamic shared memory.
template <typename TI, typename TO, int LOG_E, int LOG_W>
static __device__ __forceinline__ void fwht_rows(const TI *__restrict__ x, TO *__restrict__ y,
                                                 uint64_t rows, int log_d, int rows_per_block,
                                                 typename Io<TI>::Acc scale) {
  typedef typename Io<TI>::Acc A;
  constexpr int E = 1 << LOG_E;
  constexpr int W = 1 << LOG_W;
  extern __shared__ unsigned char shared_bytes[];

  const uint32_t d = 1u << log_d;
  const uint32_t threads_per_row = d >> LOG_E;
  const uint32_t t = threadIdx.x % threads_per_row;
  const uint32_t row_in_block = threadIdx.x / threads_per_row;
  const uint64_t row = (uint64_t)blockIdx.x * rows_per_block + row_in_block;
  const bool live = row < rows;
  const uint64_t base = row * d;

  A v[E];
#pragma unroll
  for (int r = 0; r < E; ++r) {
    v[r] = live ? Io<TI>::load(x + base + (uint64_t)r * threads_per_row + t) : A(0);
  }
  butterflies_in_registers<A, LOG_E>(v);

  // Every lane of the warp takes part in the shuffles (rows past the end carry zeros).
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t lane_span = threads_per_row < 32 ? threads_per_row : 32;
  for (uint32_t m = 1; m < lane_span; m <<= 1) {
#pragma unroll
    for (int r = 0; r < E; ++r) {
      A other = __shfl_xor_sync(0xffffffffu, v[r], m);
      v[r] = (lane & m) ? other - v[r] : v[r] + other;
    }
  }

  if (LOG_W == 0) {
    if (live) {
#pragma unroll
      for (int r = 0; r < E; ++r) {
        Io<TO>::store(y + base + (uint64_t)r * threads_per_row + t, v[r] * scale);
      }
    }
    return;
  }

  // Cross-warp levels: element r·T + w·32 + lane goes through shared memory; on the way back
  // each thread takes W values that differ only in the warp bits, for E / W register indices.
  A *row_buffer = reinterpret_cast<A *>(shared_bytes) + (size_t)row_in_block * d;
#pragma unroll
  for (int r = 0; r < E; ++r) {
    row_buffer[r * threads_per_row + t] = v[r];
  }
  __syncthreads();
  const uint32_t warp = t >> 5;
#pragma unroll
  for (int k = 0; k < E / W; ++k) {
    const uint32_t r = warp + W * k;
    A u[W];
#pragma unroll
    for (int w = 0; w < W; ++w) {
      u[w] = row_buffer[r * threads_per_row + w * 32 + lane];
    }
    butterflies_in_registers<A, LOG_W>(u);
    if (live) {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        Io<TO>::store(y + base + (uint64_t)r * threads_per_row + w * 32 + lane, u[w] * scale);
      }
    }
  }
}

// One strided radix-2^LOG_R pass over index bits [low_bit, low_bit + LOG_R) of every row, for
// rows longer than one block. Each thread owns one column (an index with those bits zero) and
// its 2^LOG_R elements; consecutive threads own consecutive columns, so accesses coalesce.
// `x` and `y` may be the same buffer (each thread reads its elements before writing them).
template <typename TI, typename TO, int LOG_R>
static __device__ __forceinline__ void fwht_strided_pass(const TI *x, TO *y, uint64_t rows,
                                                         int log_d, int low_bit,
                                                         typename Io<TI>::Acc scale) {
  typedef typename Io<TI>::Acc A;
  constexpr int R = 1 << LOG_R;
  const uint64_t columns_per_row = (uint64_t)1 << (log_d - LOG_R);
  const uint64_t columns = rows * columns_per_row;
  const uint64_t low_mask = ((uint64_t)1 << low_bit) - 1;
  for (uint64_t c = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c < columns;
       c += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t row = c >> (log_d - LOG_R);
    const uint64_t q = c & (columns_per_row - 1);
    const uint64_t start =
        (row << log_d) | ((q & ~low_mask) << LOG_R) | (q & low_mask);
    A v[R];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      v[j] = Io<TI>::load(x + start + ((uint64_t)j << low_bit));
    }
    butterflies_in_registers<A, LOG_R>(v);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      Io<TO>::store(y + start + ((uint64_t)j << low_bit), v[j] * scale);
    }
  }
}

// Exported names: whvi_fwht_rows_<in>_<out>_e<LOG_E>_w<LOG_W> and
// whvi_fwht_pass_<in>_<out>_r<LOG_R>; the launcher in src/fwht/cuda.rs builds them.
// A block holds 256 threads, or one row of 32 << LW threads when that is more; the bound lets
// ptxas fit 1024-thread blocks in the 64K registers of an SM.
#define ROWS_BLOCK_THREADS(LW) ((LW) <= 3 ? 256 : (32 << (LW)))

#define ROWS_KERNEL(TI, TO, NI, NO, LE, LW)                                                    \
  extern "C" __global__ void __launch_bounds__(ROWS_BLOCK_THREADS(LW))                         \
      whvi_fwht_rows_##NI##_##NO##_e##LE##_w##LW(                                              \
      const TI *x, TO *y, uint64_t rows, int log_d, int rows_per_block,                        \
      typename Io<TI>::Acc scale) {                                                            \
    fwht_rows<TI, TO, LE, LW>(x, y, rows, log_d, rows_per_block, scale);                       \
  }

#define ROWS_KERNELS(TI, TO, NI, NO)                                                           \
  ROWS_KERNEL(TI, TO, NI, NO, 0, 0)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 1, 0)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 2, 0)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 3, 0)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 4, 0)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 5, 0)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 5, 1)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 5, 2)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 5, 3)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 5, 4)                                                            \
  ROWS_KERNEL(TI, TO, NI, NO, 5, 5)

#define PASS_KERNEL(TI, TO, NI, NO, LR)                                                        \
  extern "C" __global__ void __launch_bounds__(256) whvi_fwht_pass_##NI##_##NO##_r##LR(      \
      const TI *x, TO *y, uint64_t rows, int log_d, int low_bit, typename Io<TI>::Acc scale) { \
    fwht_strided_pass<TI, TO, LR>(x, y, rows, log_d, low_bit, scale);                         \
  }

#define PASS_KERNELS(TI, TO, NI, NO)                                                           \
  PASS_KERNEL(TI, TO, NI, NO, 1)                                                               \
  PASS_KERNEL(TI, TO, NI, NO, 2)                                                               \
  PASS_KERNEL(TI, TO, NI, NO, 3)                                                               \
  PASS_KERNEL(TI, TO, NI, NO, 4)                                                               \
  PASS_KERNEL(TI, TO, NI, NO, 5)

ROWS_KERNELS(float, float, f32, f32)
ROWS_KERNELS(double, double, f64, f64)
ROWS_KERNELS(__half, __half, f16, f16)
ROWS_KERNELS(__nv_bfloat16, __nv_bfloat16, bf16, bf16)
// Long half-precision rows: first blocks into an f32 workspace, then passes in f32, the last
// one rounding into the output.
ROWS_KERNELS(__half, float, f16, f32)
ROWS_KERNELS(__nv_bfloat16, float, bf16, f32)

PASS_KERNELS(float, float, f32, f32)
PASS_KERNELS(double, double, f64, f64)
PASS_KERNELS(float, __half, f32, f16)
PASS_KERNELS(float, __nv_bfloat16, f32, bf16)
