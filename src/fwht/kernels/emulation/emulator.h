// The GPU execution model on one CPU thread, for the tests of src/fwht/gpu_emulation.rs: the
// kernel sources of src/fwht/kernels are compiled unchanged as C++ against the shims in cuda/
// and metal/, whose GPU built-ins call into this file.
//
// Blocks (threadgroups) run one after another. The threads of a block are fibers (ucontext)
// that a scheduler resumes in a fixed order, one at a time, each until it reaches a barrier or
// a warp shuffle; so every run is deterministic, and a thread that reads shared memory another
// thread has not written yet (a missing barrier) reads the poison the block started with. The
// order is forward or reverse (thread 0 first or last), so that either side of a race shows.
// Warp shuffles exchange through per-warp slots with a warp-wide barrier in between. Any
// misuse a GPU leaves undefined (a barrier not every thread reaches, a partial shuffle mask)
// ends the run with a message instead.
#pragma once

#include <ucontext.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace emu {

[[noreturn]] inline void fail(const char *format, ...) {
  va_list args;
  va_start(args, format);
  std::fputs("emulation: ", stderr);
  std::vfprintf(stderr, format, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::exit(2);
}

constexpr unsigned kWarp = 32;

struct Dim3 {
  unsigned x, y, z;
};

class Scheduler {
 public:
  // Runs body() once per thread of a block of `threads` threads, as fibers.
  void run_block(unsigned threads, bool reverse, const std::function<void()> &body) {
    if (threads == 0 || threads % kWarp != 0) {
      fail("a block of %u threads: the kernels take whole warps of %u", threads, kWarp);
    }
    threads_ = threads;
    body_ = &body;
    if (fibers_.size() < threads) fibers_.resize(threads);
    exchange_.assign(2 * threads, 0);
    warp_arrivals_.assign(threads / kWarp, 0);
    warp_generation_.assign(threads / kWarp, 0);
    block_arrivals_ = 0;
    block_generation_ = 0;
    unsigned finished = 0;
    for (unsigned t = 0; t < threads; ++t) start_fiber(t);
    while (finished < threads) {
      bool resumed = false;
      for (unsigned k = 0; k < threads; ++k) {
        unsigned t = reverse ? threads - 1 - k : k;
        Fiber &fiber = fibers_[t];
        if (fiber.done || !runnable(t)) continue;
        fiber.wait = Wait::None;
        current_ = t;
        if (swapcontext(&scheduler_, &fiber.context) != 0) fail("swapcontext failed");
        resumed = true;
        if (fiber.done) ++finished;
      }
      if (!resumed) report_deadlock(finished);
    }
  }

  unsigned current_thread() const { return current_; }
  unsigned threads() const { return threads_; }

  // __syncthreads / threadgroup_barrier: every thread of the block must arrive.
  void block_barrier() {
    Fiber &fiber = fibers_[current_];
    fiber.wait = Wait::Block;
    fiber.generation = block_generation_;
    if (++block_arrivals_ == threads_) {
      block_arrivals_ = 0;
      ++block_generation_;
    }
    yield();
  }

  // A barrier over the 32 lanes of the calling thread's warp.
  void warp_barrier() {
    const unsigned warp = current_ / kWarp;
    Fiber &fiber = fibers_[current_];
    fiber.wait = Wait::Warp;
    fiber.generation = warp_generation_[warp];
    if (++warp_arrivals_[warp] == kWarp) {
      warp_arrivals_[warp] = 0;
      ++warp_generation_[warp];
    }
    yield();
  }

  // __shfl_xor_sync / simd_shuffle_xor over all 32 lanes of the warp.
  template <typename T>
  T shuffle_xor(T value, unsigned lane_mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    if (lane_mask >= kWarp) fail("a shuffle with lane mask %u (lanes are 0..31)", lane_mask);
    const unsigned lane = current_ % kWarp;
    const unsigned source = current_ - lane + (lane ^ lane_mask);
    // Two slot arrays, used in turn: a lane can be one shuffle ahead of another (it waits at
    // the next barrier for the rest), never two, so one barrier per shuffle is enough.
    const unsigned warp = current_ / kWarp;
    uint64_t *slots = exchange_.data() + (warp_generation_[warp] % 2) * threads_;
    std::memcpy(&slots[current_], &value, sizeof(T));
    warp_barrier();
    T other;
    std::memcpy(&other, &slots[source], sizeof(T));
    return other;
  }

 private:
  enum class Wait { None, Block, Warp };

  struct Fiber {
    ucontext_t context;
    std::vector<unsigned char> stack;
    Wait wait = Wait::None;
    uint64_t generation = 0;
    bool done = false;
  };

  static constexpr size_t kStackBytes = 64 * 1024;

  static void entry();

  void start_fiber(unsigned t) {
    Fiber &fiber = fibers_[t];
    fiber.stack.resize(kStackBytes);
    fiber.wait = Wait::None;
    fiber.done = false;
    if (getcontext(&fiber.context) != 0) fail("getcontext failed");
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = &scheduler_;
    makecontext(&fiber.context, &Scheduler::entry, 0);
  }

  bool runnable(unsigned t) const {
    const Fiber &fiber = fibers_[t];
    switch (fiber.wait) {
      case Wait::None:
        return true;
      case Wait::Block:
        return fiber.generation != block_generation_;
      case Wait::Warp:
        return fiber.generation != warp_generation_[t / kWarp];
    }
    return false;
  }

  void yield() {
    if (swapcontext(&fibers_[current_].context, &scheduler_) != 0) fail("swapcontext failed");
  }

  [[noreturn]] void report_deadlock(unsigned finished) const {
    unsigned at_block = 0, at_warp = 0;
    for (unsigned t = 0; t < threads_; ++t) {
      if (fibers_[t].done) continue;
      if (fibers_[t].wait == Wait::Block) ++at_block;
      if (fibers_[t].wait == Wait::Warp) ++at_warp;
    }
    fail("deadlock in a block of %u threads: %u finished, %u wait at a block barrier, %u at a "
         "warp shuffle (a barrier or shuffle that not every thread reaches)",
         threads_, finished, at_block, at_warp);
  }

  std::vector<Fiber> fibers_;
  std::vector<uint64_t> exchange_;
  std::vector<unsigned> warp_arrivals_;
  std::vector<uint64_t> warp_generation_;
  unsigned block_arrivals_ = 0;
  uint64_t block_generation_ = 0;
  unsigned threads_ = 0;
  unsigned current_ = 0;
  const std::function<void()> *body_ = nullptr;
  ucontext_t scheduler_;
};

inline Scheduler scheduler;

inline void Scheduler::entry() {
  (*scheduler.body_)();
  scheduler.fibers_[scheduler.current_].done = true;
}

// The launch geometry the built-ins report (threadIdx comes from the scheduler).
inline Dim3 block_index{0, 0, 0};
inline Dim3 block_dim{1, 1, 1};
inline Dim3 grid_dim{1, 1, 1};

inline Dim3 thread_index() { return Dim3{scheduler.current_thread(), 0, 0}; }

// IEEE half and bfloat16 conversions, rounding to nearest even, as the GPUs and the `half`
// crate do.
inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint16_t f32_to_f16(float value) {
  const uint32_t x = float_bits(value);
  const uint16_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and up round to infinity
  if (magnitude >= 0x38800000u) {                       // normal halves, 2^-14 and up
    uint32_t rebiased = magnitude - 0x38000000u;
    rebiased += 0xfffu + ((rebiased >> 13) & 1u);
    return sign | static_cast<uint16_t>(rebiased >> 13);
  }
  if (magnitude <= 0x33000000u) return sign;  // 2^-25 and below round to zero
  const uint32_t exponent = magnitude >> 23;
  const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exponent;  // 14..24: the value in units of 2^-24
  uint32_t units = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t tie = 1u << (shift - 1);
  if (rest > tie || (rest == tie && (units & 1u))) ++units;
  return sign | static_cast<uint16_t>(units);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return bits_float(float_bits(magnitude) | sign);
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t f32_to_bf16(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace emu
