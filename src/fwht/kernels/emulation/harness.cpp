// Runs a launch plan of the FWHT kernels on the CPU emulation (tests only; driven by
// src/fwht/gpu_emulation.rs). Built once per kernel source:
//   c++ -std=c++17 -DEMU_CUDA  -Icuda  -DEMU_KERNEL_SOURCE='"fwht.cu"'    harness.cpp
//   c++ -std=c++17 -DEMU_METAL -Imetal -DEMU_KERNEL_SOURCE='"fwht.metal"' harness.cpp
// and run as `harness PLAN`, PLAN holding one command per line:
//   schedule forward|reverse
//   buffer NAME TYPE COUNT [FILE]     (TYPE f32, f64, f16 or bf16; from FILE, else poisoned)
//   launch KERNEL GRID BLOCK SHARED_BYTES X Y ROWS LOG_D FOURTH SCALE
//   save NAME FILE
// Every buffer has guard bytes on both sides; uninitialised memory, the guards and shared
// memory hold all-ones bytes (NaN in every float type), so a read of anything not written shows
// in the output, and a write out of bounds fails the launch.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "emulator.h"

#if defined(EMU_CUDA)
#include "cuda/cuda_bf16.h"
// The dynamic shared memory `extern __shared__ unsigned char shared_bytes[]` names; its size
// is the largest an sm_90 block may opt in to, plus a guard.
constexpr size_t kMaxSharedBytes = 227 * 1024;
constexpr size_t kSharedGuardBytes = 4096;
alignas(16) unsigned char shared_bytes[kMaxSharedBytes + kSharedGuardBytes];
#elif defined(EMU_METAL)
#include "metal/metal_types.h"
constexpr size_t kMaxSharedBytes = 32 * 1024;
constexpr size_t kSharedGuardBytes = 4096;
#else
#error "define EMU_CUDA or EMU_METAL"
#endif

namespace {

constexpr size_t kGuardBytes = 256;
constexpr unsigned char kPoison = 0xff;

struct Buffer {
  std::string type;
  size_t count = 0;
  size_t element_bytes = 0;
  std::vector<unsigned char> bytes;

  unsigned char *data() { return bytes.data() + kGuardBytes; }
  size_t size() const { return count * element_bytes; }

  void check_guards(const std::string &name, const std::string &kernel) const {
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (bytes[i] != kPoison || bytes[kGuardBytes + size() + i] != kPoison) {
        emu::fail("%s wrote outside buffer %s", kernel.c_str(), name.c_str());
      }
    }
  }
};

size_t element_bytes(const std::string &type) {
  if (type == "f32") return 4;
  if (type == "f64") return 8;
  if (type == "f16" || type == "bf16") return 2;
  emu::fail("unknown element type %s", type.c_str());
}

struct Launch {
  std::string kernel;
  unsigned grid = 0, block = 0;
  size_t shared_bytes = 0;
  std::string x, y;
  uint64_t rows = 0;
  unsigned log_d = 0, fourth = 0;
  double scale = 1.0;
  bool reverse = false;
};

// A kernel name's parts: whvi_fwht_<rows|pass>_<in>_<out>_...
struct KernelName {
  std::string kind, input, output;
  bool uses_shared = false;
};

KernelName parse_name(const std::string &name) {
  std::vector<std::string> parts;
  std::stringstream stream(name);
  for (std::string part; std::getline(stream, part, '_');) parts.push_back(part);
  if (parts.size() < 6 || parts[0] != "whvi" || parts[1] != "fwht") {
    emu::fail("not a kernel name: %s", name.c_str());
  }
  KernelName parsed{parts[2], parts[3], parts[4], false};
  // Row kernels past one warp (w > 0) exchange through shared memory.
  parsed.uses_shared = parsed.kind == "rows" && parts.size() == 7 && parts[6] != "w0";
  return parsed;
}

void *find_kernel(const std::string &name) {
  void *symbol = dlsym(RTLD_DEFAULT, name.c_str());
  if (symbol == nullptr) emu::fail("no kernel %s in the source", name.c_str());
  return symbol;
}

void check_geometry(const Launch &launch) {
  if (launch.block == 0 || launch.block > 1024) {
    emu::fail("%s: %u threads per block (1..1024)", launch.kernel.c_str(), launch.block);
  }
  if (launch.grid == 0 || launch.grid > 0x7fffffffu) {
    emu::fail("%s: a grid of %u blocks", launch.kernel.c_str(), launch.grid);
  }
  if (launch.shared_bytes > kMaxSharedBytes) {
    emu::fail("%s: %zu bytes of shared memory (at most %zu)", launch.kernel.c_str(),
              launch.shared_bytes, kMaxSharedBytes);
  }
}

// Runs `block_body(b)` for each block in turn, with fresh poisoned shared memory, and checks
// that no block wrote past the shared memory its launch asked for.
template <typename Body>
void run_blocks(const Launch &launch, unsigned char *shared, Body block_body) {
  for (unsigned b = 0; b < launch.grid; ++b) {
    std::memset(shared, kPoison, launch.shared_bytes + kSharedGuardBytes);
    emu::block_index = emu::Dim3{b, 0, 0};
    emu::scheduler.run_block(launch.block, launch.reverse, [&] { block_body(b); });
    for (size_t i = 0; i < kSharedGuardBytes; ++i) {
      if (shared[launch.shared_bytes + i] != kPoison) {
        emu::fail("%s wrote past its %zu bytes of shared memory", launch.kernel.c_str(),
                  launch.shared_bytes);
      }
    }
  }
}

#if defined(EMU_CUDA)
// fwht.cu: every kernel takes (x, y, rows, log_d, rows_per_block or low_bit, scale).
template <typename TI, typename TO, typename A>
void run_typed(void *symbol, const Launch &launch, Buffer &x, Buffer &y) {
  using Kernel = void (*)(const TI *, TO *, uint64_t, int, int, A);
  Kernel entry = reinterpret_cast<Kernel>(symbol);
  const TI *input = reinterpret_cast<const TI *>(x.data());
  TO *output = reinterpret_cast<TO *>(y.data());
  emu::block_dim = emu::Dim3{launch.block, 1, 1};
  emu::grid_dim = emu::Dim3{launch.grid, 1, 1};
  run_blocks(launch, shared_bytes, [&](unsigned) {
    entry(input, output, launch.rows, static_cast<int>(launch.log_d),
           static_cast<int>(launch.fourth), static_cast<A>(launch.scale));
  });
}

void run(const Launch &launch, Buffer &x, Buffer &y) {
  const KernelName name = parse_name(launch.kernel);
  void *symbol = find_kernel(launch.kernel);
  const std::string types = name.input + "_" + name.output;
  if (types == "f32_f32") return run_typed<float, float, float>(symbol, launch, x, y);
  if (types == "f64_f64") return run_typed<double, double, double>(symbol, launch, x, y);
  if (types == "f16_f16") return run_typed<__half, __half, float>(symbol, launch, x, y);
  if (types == "bf16_bf16") {
    return run_typed<__nv_bfloat16, __nv_bfloat16, float>(symbol, launch, x, y);
  }
  if (types == "f16_f32") return run_typed<__half, float, float>(symbol, launch, x, y);
  if (types == "bf16_f32") return run_typed<__nv_bfloat16, float, float>(symbol, launch, x, y);
  if (types == "f32_f16") return run_typed<float, __half, float>(symbol, launch, x, y);
  if (types == "f32_bf16") return run_typed<float, __nv_bfloat16, float>(symbol, launch, x, y);
  emu::fail("no element types %s for %s", types.c_str(), launch.kernel.c_str());
}
#else
// fwht.metal: (x, y, rows, log_d, rows_per_group, scale[, threadgroup memory], tid, group,
// lane) for row kernels, (x, y, rows, log_d, low_bit, scale, column) for passes.
std::vector<float> threadgroup_memory((kMaxSharedBytes + kSharedGuardBytes) / sizeof(float));

template <typename TI, typename TO>
void run_typed(void *symbol, const Launch &launch, const KernelName &name, Buffer &x, Buffer &y) {
  const TI *input = reinterpret_cast<const TI *>(x.data());
  TO *output = reinterpret_cast<TO *>(y.data());
  ulong rows = launch.rows;
  uint log_d = launch.log_d, fourth = launch.fourth;
  float scale = static_cast<float>(launch.scale);
  unsigned char *shared = reinterpret_cast<unsigned char *>(threadgroup_memory.data());
  if (name.kind == "pass") {
    using Kernel = void (*)(const TI *, TO *, ulong &, uint &, uint &, float &, uint);
    Kernel entry = reinterpret_cast<Kernel>(symbol);
    run_blocks(launch, shared, [&](unsigned group) {
      entry(input, output, rows, log_d, fourth, scale,
             group * launch.block + emu::scheduler.current_thread());
    });
  } else if (name.uses_shared) {
    if (launch.shared_bytes == 0) {
      emu::fail("%s takes threadgroup memory, and the launch gives none", launch.kernel.c_str());
    }
    using Kernel = void (*)(const TI *, TO *, ulong &, uint &, uint &, float &, volatile float *,
                            uint, uint, uint);
    Kernel entry = reinterpret_cast<Kernel>(symbol);
    run_blocks(launch, shared, [&](unsigned group) {
      const uint tid = emu::scheduler.current_thread();
      entry(input, output, rows, log_d, fourth, scale, threadgroup_memory.data(), tid, group,
             tid % emu::kWarp);
    });
  } else {
    using Kernel = void (*)(const TI *, TO *, ulong &, uint &, uint &, float &, uint, uint, uint);
    Kernel entry = reinterpret_cast<Kernel>(symbol);
    run_blocks(launch, shared, [&](unsigned group) {
      const uint tid = emu::scheduler.current_thread();
      entry(input, output, rows, log_d, fourth, scale, tid, group, tid % emu::kWarp);
    });
  }
}

void run(const Launch &launch, Buffer &x, Buffer &y) {
  const KernelName name = parse_name(launch.kernel);
  void *symbol = find_kernel(launch.kernel);
  const std::string types = name.input + "_" + name.output;
  if (types == "f32_f32") return run_typed<float, float>(symbol, launch, name, x, y);
  if (types == "f16_f16") return run_typed<half, half>(symbol, launch, name, x, y);
  if (types == "bf16_bf16") return run_typed<bfloat, bfloat>(symbol, launch, name, x, y);
  if (types == "f16_f32") return run_typed<half, float>(symbol, launch, name, x, y);
  if (types == "bf16_f32") return run_typed<bfloat, float>(symbol, launch, name, x, y);
  if (types == "f32_f16") return run_typed<float, half>(symbol, launch, name, x, y);
  if (types == "f32_bf16") return run_typed<float, bfloat>(symbol, launch, name, x, y);
  emu::fail("no element types %s for %s", types.c_str(), launch.kernel.c_str());
}
#endif

Buffer &find_buffer(std::map<std::string, Buffer> &buffers, const std::string &name) {
  auto found = buffers.find(name);
  if (found == buffers.end()) emu::fail("no buffer %s", name.c_str());
  return found->second;
}

void read_file(const std::string &path, unsigned char *into, size_t bytes) {
  std::ifstream file(path, std::ios::binary);
  file.read(reinterpret_cast<char *>(into), static_cast<std::streamsize>(bytes));
  if (!file || file.peek() != EOF) emu::fail("%s does not hold %zu bytes", path.c_str(), bytes);
}

void write_file(const std::string &path, const unsigned char *from, size_t bytes) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char *>(from), static_cast<std::streamsize>(bytes));
  if (!file) emu::fail("cannot write %s", path.c_str());
}

void execute(std::istream &plan) {
  std::map<std::string, Buffer> buffers;
  bool reverse = false;
  std::string line;
  while (std::getline(plan, line)) {
    std::istringstream words(line);
    std::string command;
    if (!(words >> command)) continue;
    if (command == "schedule") {
      std::string order;
      words >> order;
      if (order != "forward" && order != "reverse") emu::fail("schedule %s", order.c_str());
      reverse = order == "reverse";
    } else if (command == "buffer") {
      std::string name, type, path;
      size_t count = 0;
      if (!(words >> name >> type >> count)) emu::fail("bad line: %s", line.c_str());
      Buffer buffer;
      buffer.type = type;
      buffer.count = count;
      buffer.element_bytes = element_bytes(type);
      buffer.bytes.assign(buffer.size() + 2 * kGuardBytes, kPoison);
      if (words >> path) read_file(path, buffer.data(), buffer.size());
      buffers[name] = std::move(buffer);
    } else if (command == "launch") {
      Launch launch;
      if (!(words >> launch.kernel >> launch.grid >> launch.block >> launch.shared_bytes >>
            launch.x >> launch.y >> launch.rows >> launch.log_d >> launch.fourth >>
            launch.scale)) {
        emu::fail("bad line: %s", line.c_str());
      }
      launch.reverse = reverse;
      check_geometry(launch);
      Buffer &x = find_buffer(buffers, launch.x);
      Buffer &y = find_buffer(buffers, launch.y);
      run(launch, x, y);
      x.check_guards(launch.x, launch.kernel);
      y.check_guards(launch.y, launch.kernel);
    } else if (command == "save") {
      std::string name, path;
      if (!(words >> name >> path)) emu::fail("bad line: %s", line.c_str());
      Buffer &buffer = find_buffer(buffers, name);
      write_file(path, buffer.data(), buffer.size());
    } else {
      emu::fail("unknown command %s", command.c_str());
    }
  }
}

}  // namespace

int main(int argc, char **argv) {
  if (argc != 2) emu::fail("usage: %s PLAN", argv[0]);
  std::ifstream plan(argv[1]);
  if (!plan) emu::fail("cannot read %s", argv[1]);
  execute(plan);
  return 0;
}

// The kernels, last, so that nothing above depends on what they define.
#include EMU_KERNEL_SOURCE
