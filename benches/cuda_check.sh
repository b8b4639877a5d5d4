#!/usr/bin/env bash
# The GPU checks of the CUDA path, in one run on a machine with an NVIDIA GPU, from a folder
# made by benches/cuda_bundle.sh:
#
#   BUNDLE/cuda_check.sh RESULTS_DIR
#
# 1. the driver and the CUDA libraries the binaries load;
# 2. the fwht_cuda tests: parity with the CPU op (f32, f64, f16, bf16), more rows than a grid
#    dimension, strided inputs, gradients, a WHVI layer's outputs and gradients;
# 3. compute-sanitizer's memcheck over the kernel on a smaller test (where the tool runs);
# 4. `whvi bench fwht --device cuda`: the op against a device-to-device copy (f32, bf16);
# 5. `whvi bench train --device cuda` (vgg11/vgg16, both heads) and the same networks in
#    PyTorch on the same GPU;
# 6. one CIFAR-10 epoch of vgg16 with a WHVI head (`whvi train --device cuda`).
# Every step's output goes to RESULTS_DIR/*.log; a failing step does not stop the later ones.
set -uo pipefail
bundle="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
results="${1:?usage: $0 RESULTS_DIR}"
mkdir -p "$results"
work="$(mktemp -d)"
status=0
step() { echo "== $1"; }
fail() { echo "FAILED: $1"; status=1; }

step "driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nvidia-smi | grep -o "CUDA Version: [0-9.]*"

step "unpack"
if ! tar -C "$work" -xJf "$bundle/binaries.tar.xz"; then
    # No xz program: Python's lzma reads it too.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$bundle/binaries.tar.xz" "$work" || { echo "cannot unpack the binaries"; exit 1; }
fi

# The CUDA libraries candle links: the driver's libcuda, and cudart, cublas, cublasLt, curand and
# nvrtc from a CUDA toolkit or from PyTorch's wheels.
libdirs=""
for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    found="$(find /usr/local/nvidia /usr/local/cuda* /usr/lib /opt -name "$lib" 2>/dev/null | head -1)"
    if [[ -z "$found" ]]; then
        echo "$lib not found"
        status=1
    else
        libdirs="$libdirs:$(dirname "$found")"
    fi
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$work/whvi" | grep -E "cuda|cublas|curand|nvrtc|not found"

# The CIFAR-10 binary files, built in the background while the GPU checks run.
data_pid=""
if [[ -f "$bundle/cifar10-jpeg.tar.gz" ]]; then
    python3 "$bundle/make_bin.py" "$work/cifar10" >"$results/data.log" 2>&1 &
    data_pid=$!
fi

step "fwht_cuda tests"
"$work/fwht_cuda" --test-threads 1 2>&1 | tee "$results/tests.log" || fail "fwht_cuda tests"

step "compute-sanitizer memcheck (strided inputs and gradients, rows beyond a grid dimension)"
if command -v compute-sanitizer >/dev/null; then
    timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$work/fwht_cuda" \
        --test-threads 1 strided_inputs more_rows 2>&1 | tail -20 | tee "$results/memcheck.log" ||
        fail "memcheck"
else
    echo "compute-sanitizer is not installed"
fi

step "whvi bench fwht --device cuda"
"$work/whvi" bench fwht --device cuda 2>&1 | tee "$results/bench_fwht.log" || fail "bench fwht"

step "whvi bench train --device cuda (batch 128)"
"$work/whvi" bench train --device cuda --batch 128 --steps 10 2>&1 |
    tee "$results/bench_train.log" || fail "bench train"

step "PyTorch on the same GPU (same networks, batch 128, Adam, synthetic data)"
if [[ -f "$bundle/torch_vgg_throughput.py" ]]; then
    (cd "$bundle" && timeout 180 python3 - <<'EOF' 2>&1 | tee "$results/torch.log") || fail "torch"
import json, time, torch, torch.nn as nn
from torch_vgg_throughput import vgg

def images_per_s(name, whvi, batch=128, steps=10):
    torch.manual_seed(0)
    model = vgg(name, whvi).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    times.sort()
    return batch / times[len(times) // 2]

print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
for name in ["vgg11", "vgg16"]:
    for whvi in [False, True]:
        print(json.dumps({"model": name, "head": "whvi" if whvi else "deterministic",
                          "batch": 128, "images_per_s": round(images_per_s(name, whvi), 1),
                          "framework": "pytorch"}))
EOF
fi

step "one CIFAR-10 epoch: vgg16, WHVI head, batch 128"
if [[ -n "$data_pid" ]] && wait "$data_pid"; then
    timeout 300 "$work/whvi" train --model vgg16 --method whvi --bayes head --dataset cifar10 \
        --data "$work/cifar10/cifar-10-batches-bin" --epochs 1 --batch-size 128 --seed 0 \
        --device cuda --out "$work/run" 2>&1 | tr '\r' '\n' | tee "$results/train.log" ||
        fail "training epoch"
else
    echo "no CIFAR-10 data (see data.log)"
fi
rm -rf "$work"
exit $status
