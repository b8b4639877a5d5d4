#!/usr/bin/env bash
# Builds the CUDA binaries (whvi and the fwht_cuda test) on a machine WITHOUT a GPU or driver, and
# packs them with benches/cuda_check.sh into a folder to copy to a GPU machine.
#
#   CUDA_HOME=/path/to/cuda benches/cuda_bundle.sh OUT_DIR [CIFAR10_JPEG_TAR_GZ]
#   # on the GPU machine:  OUT_DIR/cuda_check.sh RESULTS_DIR
#
# CUDA_HOME's nvcc must not be newer than the GPU machine's driver (`nvidia-smi` shows its CUDA
# version): candle's PTX and ours carry the compiler's PTX version, which an older driver
# refuses. The PyPI wheels work (nvidia-cuda-nvcc, -crt, -runtime, -cccl, nvidia-nvvm of that
# version; CUDA_HOME = their nvidia/cu13 folder). CUDA_COMPUTE_CAP defaults to 90 (Hopper).
#
# Candle links the CUDA libraries at build time (libcuda, cublas, cublasLt, curand, nvrtc, cudart),
# and a machine without a driver has no libcuda. So this script links against stubs: empty
# functions with the real libraries' names and sonames, generated from cudarc's bindings (cudart
# comes with the toolkit). The binaries then
# load the real libraries on the GPU machine (cuda_check.sh finds them). The stubs are only
# found through LIBRARY_PATH, which cargo does not fingerprint, so nothing else rebuilds.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: CUDA_HOME=... $0 OUT_DIR [CIFAR10_JPEG_TAR_GZ]}"
cifar="${2:-$repo/../shared/data/cifar10/cifar10-jpeg.tar.gz}"
: "${CUDA_HOME:?set CUDA_HOME to the CUDA toolkit (the folder holding bin/nvcc)}"
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
target="${CARGO_TARGET_DIR:-$repo/target}"
nvcc --version | tail -1

# Stubs from the cudarc version in Cargo.lock.
cudarc_src="$(cd "$repo" && cargo metadata --format-version 1 --features cuda |
    python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')/src"
stubs="$target/cuda-link-stubs"
mkdir -p "$stubs"
# module in cudarc, library name, soname version (CUDA 13's)
for spec in "driver cuda 1" "nvrtc nvrtc 13" "curand curand 10" "cublas cublas 13" "cublaslt cublasLt 13"; do
    read -r module lib version <<<"$spec"
    grep -oE 'pub unsafe fn [A-Za-z0-9_]+\(' "$cudarc_src/$module/sys/mod.rs" |
        sed -E 's/pub unsafe fn ([A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u >"$stubs/$lib.c"
    cc -shared -fPIC -w -o "$stubs/lib$lib.so" -Wl,-soname,"lib$lib.so.$version" "$stubs/$lib.c"
done
# candle's quantized kernels also link the CUDA runtime, which the toolkit has (no stub needed).
cudart="$(ls "$CUDA_HOME"/lib*/libcudart.so* | head -1)"
ln -sf "$cudart" "$stubs/libcudart.so"

(cd "$repo" && LIBRARY_PATH="$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}" \
    cargo build --release --features cuda --bin whvi --test fwht_cuda)
test_binary="$(ls -t "$target"/release/deps/fwht_cuda-* | grep -v '\.d$' | head -1)"

mkdir -p "$out"
staging="$(mktemp -d)"
cp "$target/release/whvi" "$staging/whvi"
cp "$test_binary" "$staging/fwht_cuda"
strip "$staging/whvi" "$staging/fwht_cuda"
# Both binaries embed candle's PTX (about 80 MB of text): xz with a large window stores it once.
tar -C "$staging" -cf - whvi fwht_cuda | xz -9e --lzma2=dict=192MiB -T2 >"$out/binaries.tar.xz"
rm -rf "$staging"
cp "$repo/benches/cuda_check.sh" "$out/"
if [[ -f "$cifar" ]]; then
    cp "$cifar" "$(dirname "$cifar")/make_bin.py" "$out/"
else
    echo "no CIFAR-10 JPEG archive at $cifar: cuda_check.sh will skip the training epoch" >&2
fi
anchors="$repo/../shared/anchors"
[[ -d "$anchors" ]] && cp "$anchors/torch_vgg_throughput.py" "$anchors/torch_whvi.py" "$out/"
du -sh "$out"/*
