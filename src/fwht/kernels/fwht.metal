// The fast Walsh-Hadamard transform on Apple GPUs, compiled at run time by src/fwht/metal.rs.
//
// Same plan as fwht.cu: a row of D = 2^log_d is held by T = D / E threads with E = 2^LOG_E
// values each (element r·T + t in register r of thread t); butterflies run over the register
// bits in registers, over the lane bits with simdgroup shuffles, and over the simdgroup bits
// (rows wider than 32 threads) through threadgroup memory, whose length the host sets (the
// launch plan of src/fwht/gpu_plan.rs: at most the 32 KiB every Metal GPU offers, so one
// dispatch takes rows up to 2^13). Longer rows are transformed in blocks of 2^13, then by
// strided radix-32 passes. Arithmetic is in f32 for every type; the scale is applied at the
// final store.

#include <metal_stdlib>
using namespace metal;

template <int LOG_N>
inline void butterflies_in_registers(thread float *v) {
    for (int h = 1; h < (1 << LOG_N); h <<= 1) {
        for (int r = 0; r < (1 << LOG_N); ++r) {
            if ((r & h) == 0) {
                float a = v[r];
                float b = v[r + h];
                v[r] = a + b;
                v[r + h] = a - b;
            }
        }
    }
}

template <typename TI, typename TO, int LOG_E, int LOG_W>
inline void fwht_rows(device const TI *x, device TO *y, ulong rows, uint log_d,
                      uint rows_per_group, float scale, threadgroup float *shared,
                      uint tid, uint group, uint lane) {
    constexpr int E = 1 << LOG_E;
    constexpr int W = 1 << LOG_W;
    const uint d = 1u << log_d;
    const uint threads_per_row = d >> LOG_E;
    const uint t = tid % threads_per_row;
    const uint row_in_group = tid / threads_per_row;
    const ulong row = (ulong)group * rows_per_group + row_in_group;
    const bool live = row < rows;
    const ulong base = row * d;

    float v[E];
    for (int r = 0; r < E; ++r) {
        v[r] = live ? float(x[base + (ulong)r * threads_per_row + t]) : 0.0f;
    }
    butterflies_in_registers<LOG_E>(v);

    // Every lane of the simdgroup takes part in the shuffles (rows past the end carry zeros).
    const uint lane_span = threads_per_row < 32 ? threads_per_row : 32;
    for (uint m = 1; m < lane_span; m <<= 1) {
        for (int r = 0; r < E; ++r) {
            float other = simd_shuffle_xor(v[r], (ushort)m);
            v[r] = (lane & m) ? other - v[r] : v[r] + other;
        }
    }

    if (LOG_W == 0) {
        if (live) {
            for (int r = 0; r < E; ++r) {
                y[base + (ulong)r * threads_per_row + t] = TO(v[r] * scale);
            }
        }
        return;
    }

    threadgroup float *row_buffer = shared + row_in_group * d;
    for (int r = 0; r < E; ++r) {
        row_buffer[r * threads_per_row + t] = v[r];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint simdgroup = t >> 5;
    for (int k = 0; k < E / W; ++k) {
        const uint r = simdgroup + W * k;
        float u[W];
        for (int w = 0; w < W; ++w) {
            u[w] = row_buffer[r * threads_per_row + w * 32 + lane];
        }
        butterflies_in_registers<LOG_W>(u);
        if (live) {
            for (int w = 0; w < W; ++w) {
                y[base + (ulong)r * threads_per_row + w * 32 + lane] = TO(u[w] * scale);
            }
        }
    }
}

// One strided radix-2^LOG_R pass over index bits [low_bit, low_bit + LOG_R); `x` and `y` may
// be the same buffer (each thread reads its own elements before writing them).
template <typename TI, typename TO, int LOG_R>
inline void fwht_strided_pass(device const TI *x, device TO *y, ulong rows, uint log_d,
                              uint low_bit, float scale, ulong column) {
    constexpr int R = 1 << LOG_R;
    const ulong columns_per_row = 1ul << (log_d - LOG_R);
    if (column >= rows * columns_per_row) {
        return;
    }
    const ulong row = column >> (log_d - LOG_R);
    const ulong q = column & (columns_per_row - 1);
    const ulong low_mask = (1ul << low_bit) - 1;
    const ulong start = (row << log_d) | ((q & ~low_mask) << LOG_R) | (q & low_mask);
    float v[R];
    for (int j = 0; j < R; ++j) {
        v[j] = float(x[start + ((ulong)j << low_bit)]);
    }
    butterflies_in_registers<LOG_R>(v);
    for (int j = 0; j < R; ++j) {
        y[start + ((ulong)j << low_bit)] = TO(v[j] * scale);
    }
}

// Exported names match the CUDA ones: whvi_fwht_rows_<in>_<out>_e<LOG_E>_w<LOG_W> and
// whvi_fwht_pass_<in>_<out>_r<LOG_R>.
// Rows of one simdgroup need no threadgroup memory; wider rows take rows_per_group rows of
// f32 accumulators as threadgroup buffer 0.
#define ROWS_KERNEL_ARGUMENTS(TI, TO)                                                         \
    device const TI *x [[buffer(0)]], device TO *y [[buffer(1)]],                             \
        constant ulong &rows [[buffer(2)]], constant uint &log_d [[buffer(3)]],               \
        constant uint &rows_per_group [[buffer(4)]], constant float &scale [[buffer(5)]]

#define ROWS_THREAD_ARGUMENTS                                                                 \
    uint tid [[thread_position_in_threadgroup]], uint group [[threadgroup_position_in_grid]], \
        uint lane [[thread_index_in_simdgroup]]

#define ROWS_KERNEL(TI, TO, NI, NO, LE, LW)                                                   \
    kernel void whvi_fwht_rows_##NI##_##NO##_e##LE##_w##LW(ROWS_KERNEL_ARGUMENTS(TI, TO),     \
                                                           ROWS_THREAD_ARGUMENTS) {           \
        fwht_rows<TI, TO, LE, LW>(x, y, rows, log_d, rows_per_group, scale, nullptr, tid,     \
                                  group, lane);                                               \
    }

#define ROWS_KERNEL_SHARED(TI, TO, NI, NO, LE, LW)                                            \
    kernel void whvi_fwht_rows_##NI##_##NO##_e##LE##_w##LW(                                   \
        ROWS_KERNEL_ARGUMENTS(TI, TO), threadgroup float *shared [[threadgroup(0)]],          \
        ROWS_THREAD_ARGUMENTS) {                                                              \
        fwht_rows<TI, TO, LE, LW>(x, y, rows, log_d, rows_per_group, scale, shared, tid,      \
                                  group, lane);                                               \
    }

#define ROWS_KERNELS(TI, TO, NI, NO)                                                          \
    ROWS_KERNEL(TI, TO, NI, NO, 0, 0)                                                         \
    ROWS_KERNEL(TI, TO, NI, NO, 1, 0)                                                         \
    ROWS_KERNEL(TI, TO, NI, NO, 2, 0)                                                         \
    ROWS_KERNEL(TI, TO, NI, NO, 3, 0)                                                         \
    ROWS_KERNEL(TI, TO, NI, NO, 4, 0)                                                         \
    ROWS_KERNEL(TI, TO, NI, NO, 5, 0)                                                         \
    ROWS_KERNEL_SHARED(TI, TO, NI, NO, 5, 1)                                                  \
    ROWS_KERNEL_SHARED(TI, TO, NI, NO, 5, 2)                                                  \
    ROWS_KERNEL_SHARED(TI, TO, NI, NO, 5, 3)

#define PASS_KERNEL(TI, TO, NI, NO, LR)                                                       \
    kernel void whvi_fwht_pass_##NI##_##NO##_r##LR(                                           \
        device const TI *x [[buffer(0)]], device TO *y [[buffer(1)]],                         \
        constant ulong &rows [[buffer(2)]], constant uint &log_d [[buffer(3)]],               \
        constant uint &low_bit [[buffer(4)]], constant float &scale [[buffer(5)]],            \
        uint column [[thread_position_in_grid]]) {                                            \
        fwht_strided_pass<TI, TO, LR>(x, y, rows, log_d, low_bit, scale, column);             \
    }

#define PASS_KERNELS(TI, TO, NI, NO)                                                          \
    PASS_KERNEL(TI, TO, NI, NO, 1)                                                            \
    PASS_KERNEL(TI, TO, NI, NO, 2)                                                            \
    PASS_KERNEL(TI, TO, NI, NO, 3)                                                            \
    PASS_KERNEL(TI, TO, NI, NO, 4)                                                            \
    PASS_KERNEL(TI, TO, NI, NO, 5)

ROWS_KERNELS(float, float, f32, f32)
ROWS_KERNELS(half, half, f16, f16)
ROWS_KERNELS(half, float, f16, f32)
PASS_KERNELS(float, float, f32, f32)
PASS_KERNELS(float, half, f32, f16)

#if defined(__HAVE_BFLOAT__)
ROWS_KERNELS(bfloat, bfloat, bf16, bf16)
ROWS_KERNELS(bfloat, float, bf16, f32)
PASS_KERNELS(float, bfloat, f32, bf16)
#endif
