#!/usr/bin/env bash
# Runs the bad-input list of the reliability review against the release binary: one line per
# case with its exit code and the first line of its message, and whether the files it must not
# touch are intact. Fails when any case panics (exit 101), aborts (134), exits otherwise than
# expected, or changes a protected file.
#
#   cargo build --release --bin whvi && benches/bad_inputs.sh [path/to/whvi]
#
# Needs nothing but the binary (data: the CIFAR-10 sample built into it; files it writes go to
# a temporary directory, removed at the end). About two minutes on 2 cores.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
whvi="${1:-${CARGO_TARGET_DIR:-$repo/target}/release/whvi}"
[[ -x "$whvi" ]] || { echo "no whvi binary at $whvi; build it with cargo build --release" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
failures=0

# case NAME EXPECTED_EXIT PROTECTED_FILES... -- COMMAND...
case_() {
    local name="$1" expected="$2"
    shift 2
    local protected=()
    while [[ "$1" != "--" ]]; do protected+=("$1"); shift; done
    shift
    local before=()
    for f in "${protected[@]}"; do before+=("$(sha256sum "$f" 2>/dev/null | cut -d' ' -f1)"); done
    "$@" >"$work/out.txt" 2>"$work/err.txt"
    local code=$?
    # The error line if there is one, else the last line of output.
    local message
    message="$(grep -m1 '^whvi: \|^error:' "$work/err.txt")"
    [[ -z "$message" ]] && message="$(cat "$work/out.txt" "$work/err.txt" | grep -v '^\s*$' | tail -1)"
    local intact="files intact"
    for i in "${!protected[@]}"; do
        if [[ "$(sha256sum "${protected[$i]}" 2>/dev/null | cut -d' ' -f1)" != "${before[$i]}" ]]; then
            intact="CHANGED ${protected[$i]}"
        fi
    done
    local verdict=ok
    if [[ $code -eq 101 || $code -eq 134 || $code -ne $expected || "$intact" == CHANGED* ]]; then
        verdict=FAIL
        failures=$((failures + 1))
    fi
    [[ ${#protected[@]} -eq 0 ]] && intact="-"
    printf '%-4s %-44s exit %-3s %-22s %s\n' "$verdict" "$name" "$code" "$intact" "${message:0:150}"
}

# A one-epoch LeNet-5 run on the embedded CIFAR-10 sample; flags given replace the defaults.
train_small() {
    local defaults=(--model lenet5 --width 0.25 --epochs 1 --batch-size 64 --validation 100
        --eval-samples 2 --test-samples 2)
    local args=() i
    for ((i = 0; i < ${#defaults[@]}; i += 2)); do
        [[ " $* " == *" ${defaults[i]} "* ]] || args+=("${defaults[i]}" "${defaults[i + 1]}")
    done
    "$whvi" train --quiet "${args[@]}" "$@"
}

echo "whvi: $whvi"
echo "-- setting up: a one-epoch LeNet-5 run on the embedded CIFAR-10 sample"
train_small --out run >/dev/null 2>&1 || { echo "the set-up run failed" >&2; exit 2; }
ck=run/best.safetensors
python3 - "$ck" <<'EOF'
import struct, sys
# Two damaged copies: 100 flipped bytes in the tensor data, and NaN in the first weights.
data = bytearray(open(sys.argv[1], 'rb').read())
start = 8 + struct.unpack('<Q', data[:8])[0]
flipped = bytearray(data)
for k in range(100):
    flipped[start + 4 * k] ^= 0x5a
open('flipped.safetensors', 'wb').write(flipped)
nan = bytearray(data)
nan[start:start + 8] = struct.pack('<ff', float('nan'), float('inf'))
open('nan.safetensors', 'wb').write(nan)
open('garbage.safetensors', 'wb').write(b'not a checkpoint')
open('truncated.safetensors', 'wb').write(data[: len(data) // 2])
# A tensor whose recorded shape is another factorisation of its size: the spec and the file
# disagree (a candle error inside whvi's message).
import json
header = json.loads(bytes(data[8:start]))
name = next(n for n in sorted(header) if n != '__metadata__' and len(header[n]['shape']) == 4)
shape = header[name]['shape']
header[name]['shape'] = [shape[0], shape[1] * shape[2] * shape[3]]
text = json.dumps(header).encode()
text += b' ' * (-len(text) % 8)
open('reshaped.safetensors', 'wb').write(struct.pack('<Q', len(text)) + text + data[start:])
# A small MNIST-format set (idx files): 200 training and 100 test images.
import os, random
random.seed(0)
os.makedirs('mnist', exist_ok=True)
for prefix, n in (('train', 200), ('t10k', 100)):
    with open(f'mnist/{prefix}-images-idx3-ubyte', 'wb') as f:
        f.write(struct.pack('>IIII', 0x803, n, 28, 28) + bytes(random.randrange(256) for _ in range(n * 784)))
    with open(f'mnist/{prefix}-labels-idx1-ubyte', 'wb') as f:
        f.write(struct.pack('>II', 0x801, n) + bytes(i % 10 for i in range(n)))
EOF
python3 - <<'EOF'
import struct
def npy(path, descr, shape, values, code):
    # The .npy format, version 1.0: magic, header length, a Python-literal header, the data.
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, repr(tuple(shape)))
    header += ' ' * (63 - (len(header) + 10) % 64) + '\n'
    with open(path, 'wb') as f:
        f.write(b'\x93NUMPY\x01\x00' + struct.pack('<H', len(header)) + header.encode())
        f.write(struct.pack('<%d%s' % (len(values), code), *values))
npy('p.npy', '<f4', (4, 3), [1 / 3] * 12, 'f')
npy('y.npy', '<i8', (4,), [0, 1, 2, 0], 'q')
npy('certain.npy', '<f8', (4, 3), [1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0], 'd')
EOF
cat >huge.toml <<'EOF'
name = "huge"
summary = "a convolution of four billion channels"
input = [3, 32, 32]
classes = 10
batch_norm = false
features = [ { conv = 4000000000, kernel = 3, padding = 1 }, "M" ]
head = [64]
EOF
cp -r run copied-run
echo "-- cases"

# 1. Reports never replace their inputs, nor an existing file without --force.
case_ "eval --report over the checkpoint" 1 "$ck" -- "$whvi" eval "$ck" --samples 2 --limit 50 --report "$ck"
case_ "eval --report ./ spelling of the checkpoint" 1 "$ck" -- "$whvi" eval "$ck" --samples 2 --limit 50 --report "./run/../$ck"
case_ "metrics --report over its input" 1 p.npy -- "$whvi" metrics --probs p.npy --labels y.npy --report p.npy
echo '{}' >old.json
case_ "eval --report over a file, no --force" 1 old.json -- "$whvi" eval "$ck" --samples 2 --limit 50 --report old.json
case_ "eval --report over a file, --force" 0 "$ck" -- "$whvi" eval "$ck" --samples 2 --limit 50 --report old.json --force
case_ "eval --report in a new directory" 0 "$ck" -- "$whvi" eval "$ck" --samples 2 --limit 50 --report new/dir/r.json
# 2. A new run never replaces an old one.
case_ "train into an existing run" 1 run/metrics.jsonl run/last.safetensors run/best.safetensors -- train_small --out run
# 3. Resume compares what changes the computation.
case_ "resume with a trailing slash" 0 -- train_small --out run/ --resume
case_ "resume a copied run" 0 -- train_small --out copied-run --resume
case_ "resume with another batch size" 1 run/last.safetensors -- train_small --out run --resume --batch-size 32
# 4. The CIFAR-10 hint.
case_ "train on a missing CIFAR-10 directory" 1 -- train_small --data nowhere --out nodata
case_ "no empty --out left after a data error" 1 -- test -d nodata
# 5. Sizes beyond memory.
case_ "train --width 1e9" 1 -- train_small --width 1e9 --out huge-width
case_ "spec with conv = 4000000000" 1 -- "$whvi" train --model huge.toml --epochs 1 --out huge-spec --quiet
# 6. Damaged checkpoints.
case_ "eval a checkpoint with 100 flipped bytes" 1 flipped.safetensors -- "$whvi" eval flipped.safetensors --samples 2 --limit 50
case_ "eval it with --skip-checksum" 0 -- "$whvi" eval flipped.safetensors --samples 2 --limit 50 --skip-checksum
case_ "eval a checkpoint with NaN weights" 1 -- "$whvi" eval nan.safetensors --samples 2 --limit 50 --skip-checksum
case_ "info on a damaged checkpoint" 0 -- "$whvi" info flipped.safetensors
case_ "eval a garbage file" 1 -- "$whvi" eval garbage.safetensors
case_ "eval a truncated file" 1 -- "$whvi" eval truncated.safetensors
case_ "eval a missing file" 1 -- "$whvi" eval missing.safetensors
case_ "eval an unknown pretrained: name" 1 -- "$whvi" eval pretrained:vgg12
case_ "card of a checkpoint without one" 1 "$ck" -- "$whvi" card "$ck"
case_ "card of a shipped one without --out" 1 -- "$whvi" card pretrained:vgg11-x0.25-whvi-cifar10
case_ "publish with a garbage report" 1 "$ck" -- "$whvi" publish "$ck" --out pub.safetensors --report garbage.safetensors --summary s --training-command t --evaluation e
# 7. Settings the data contradict.
case_ "train --validation 100000" 1 -- train_small --validation 100000 --out val
case_ "train --classes 5" 1 -- train_small --classes 5 --out classes
case_ "train --input 1,28,28" 1 -- train_small --input 1,28,28 --out input
case_ "train --input 1,28" 1 -- train_small --input 1,28 --out input
# 8. Validation before the first forward pass.
case_ "eval --batch-size 0" 1 -- "$whvi" eval "$ck" --batch-size 0
case_ "eval --ood mnist without a directory" 1 -- "$whvi" eval "$ck" --ood mnist
case_ "eval --corruption-images 0" 1 -- "$whvi" eval "$ck" --corruptions jpeg --corruption-images 0
case_ "eval, bad second checkpoint, no report" 1 -- "$whvi" eval "$ck" missing.safetensors --samples 2 --limit 50 --report late.json
case_ "(the late report was not written)" 1 -- test -e late.json
# 9. Small ones.
pushd run >/dev/null
case_ "eval a checkpoint in the current dir" 0 -- "$whvi" eval best.safetensors --samples 2 --limit 50 --plots plots
popd >/dev/null
case_ "(its plots are named after the run)" 0 -- test -e run/plots/run-best-reliability.png
case_ "metrics of certain predictions (no -0)" 0 -- sh -c "'$whvi' metrics --probs certain.npy --labels y.npy | grep -v -- '-0.000000'"
case_ "train --lr -1" 1 -- train_small --lr -1 --out lr
case_ "RUST_BACKTRACE=1, tensor of another shape" 1 -- env RUST_BACKTRACE=1 "$whvi" eval reshaped.safetensors --skip-checksum
case_ "(and no backtrace printed)" 1 -- grep -q '^ *[0-9]*: ' "$work/err.txt"
"$whvi" train --model lenet5 --dataset mnist --data mnist --epochs 1 --batch-size 50 --validation 20 \
    --eval-samples 2 --test-samples 2 --quiet --out mnist-run >/dev/null 2>&1
case_ "eval an MNIST run --dataset cifar10" 1 -- "$whvi" eval mnist-run/best.safetensors --dataset cifar10 --samples 2
# 10. Found by reading the code (the panic audit): sizes from flags and metadata.
case_ "eval --samples 100000000" 1 -- "$whvi" eval "$ck" --samples 100000000 --limit 50
case_ "zoo vgg16 --width 1e9 (saturated counts)" 0 -- "$whvi" zoo vgg16 --width 1e9
case_ "zoo lenet5 --width 1e300" 1 -- "$whvi" zoo lenet5 --width 1e300
case_ "bench layers --reps 0" 1 -- "$whvi" bench layers --reps 0
case_ "bench train --steps 0" 1 -- "$whvi" bench train --steps 0
case_ "bench fwht --bytes 2^64-1" 1 -- "$whvi" bench fwht --bytes 18446744073709551615
case_ "train --time-limit nan" 1 -- train_small --time-limit nan --out nan-limit
python3 - "$ck" <<'EOF'
import json, struct, sys
# Metadata is not covered by the checksum: a stride of 0, and one std for three channels.
data = open(sys.argv[1], 'rb').read()
start = 8 + struct.unpack('<Q', data[:8])[0]
for name, key, edit in (
    ('stride0.safetensors', 'spec', lambda v: v.replace('"stride":1', '"stride":0', 1)),
    ('norm.safetensors', 'normalization', lambda v: '{"mean":[0.5,0.5,0.5],"std":[0.25]}'),
):
    header = json.loads(data[8:start])
    header['__metadata__'][key] = edit(header['__metadata__'][key])
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    open(name, 'wb').write(struct.pack('<Q', len(text)) + text + data[start:])
EOF
case_ "eval a checkpoint whose spec has stride 0" 1 -- "$whvi" eval stride0.safetensors --samples 2 --limit 50
case_ "eval one with 1 std for 3 channels" 1 -- "$whvi" eval norm.safetensors --samples 2 --limit 50
# 11. The published evaluation sets (issue 17): files of the wrong kind, shape or format.
mkdir -p c10c && cp "$ck" c10c/labels.npy
case_ "eval --corruptions cifar10-c:missing" 1 -- "$whvi" eval "$ck" --corruptions cifar10-c:nowhere
case_ "eval cifar10-c: a checkpoint as labels.npy" 1 -- "$whvi" eval "$ck" --corruptions cifar10-c:c10c --samples 2 --limit 50
case_ "eval --corruptions cifar10-c:DIR,jpeg" 1 -- "$whvi" eval "$ck" --corruptions cifar10-c:c10c,jpeg
case_ "eval --ood svhn without a file" 1 -- "$whvi" eval "$ck" --ood svhn
case_ "eval --ood svhn:a checkpoint" 1 "$ck" -- "$whvi" eval "$ck" --ood "svhn:$ck" --samples 2 --limit 50
case_ "eval --save-samples without --save-probs" 1 -- "$whvi" eval "$ck" --save-samples
case_ "eval --save-probs over the checkpoint" 1 "$ck" -- "$whvi" eval "$ck" --save-probs "$ck"
case_ "corrupt --corruptions frost" 1 -- "$whvi" corrupt --out frost --corruptions frost
case_ "train --dataset cifar100 without data" 1 -- "$whvi" train --dataset cifar100 --out c100
case_ "train --dataset cifar100 on a CIFAR-10 dir" 1 -- "$whvi" train --dataset cifar100 --data c10c --out c100

echo "-- $failures failing case(s)"
[[ $failures -eq 0 ]]
