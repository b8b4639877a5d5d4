#!/usr/bin/env bash
# Training throughput of whvi's VGG-11/16 (deterministic and WHVI head) against PyTorch's
# (shared/anchors/torch_vgg_throughput.py): batch 64, 32x32x3, 2 threads.
#
# The machines are shared and move by 10-40% from minute to minute, so the two are interleaved:
# each round times every configuration with whvi and then with PyTorch, one right after the
# other, and the ratio reported is the median over rounds of the per-round ratios. Prints one
# JSON line per round and configuration, then the table (issue target: whvi / PyTorch >= 1.0),
# then the vgg16 per-convolution table (whvi::conv against candle's conv2d).
# Environment: TORCH_VENV (default ~/.cache/torch-venv), TORCH_VGG (the anchor; default:
# shared/anchors/torch_vgg_throughput.py next to the checkout), STEPS (default 6), ROUNDS
# (default 3), CARGO_TARGET_DIR (as for cargo).
set -euo pipefail

source "$(dirname "$0")/lib.sh"
venv="${TORCH_VENV:-$HOME/.cache/torch-venv}"

anchor="$(anchor_path torch_vgg_throughput.py "${TORCH_VGG:-}")"

bin="$(whvi_binary)"
machine_banner

"$venv/bin/python" - "$bin" "$anchor" "${STEPS:-6}" "${ROUNDS:-3}" <<'PY'
import importlib.util, json, statistics, subprocess, sys

import torch

binary, anchor, steps, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = importlib.util.spec_from_file_location("torch_vgg_throughput", anchor)
torch_vgg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_vgg)
torch.set_num_threads(2)


def whvi(*args):
    out = subprocess.run([binary, "bench", "train", "--threads", "2", "--batch", "64", *args],
                         check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


configs = [(model, head) for model in ("vgg11", "vgg16") for head in ("deterministic", "whvi")]
ours = {c: [] for c in configs}
theirs = {c: [] for c in configs}
for r in range(rounds):
    for model, head in configs:
        [line] = whvi("--steps", str(steps), "--model", model, "--head", head,
                      "--conv-shapes", "none")
        ours[(model, head)].append(line["images_per_s"])
        theirs[(model, head)].append(torch_vgg.run(model, head == "whvi", batch=64, steps=steps))
        print(json.dumps({"round": r, "model": model, "head": head,
                          "whvi_images_per_s": round(ours[(model, head)][-1], 1),
                          "torch_images_per_s": round(theirs[(model, head)][-1], 1)}), flush=True)

print()
print(f"{'model':>6} {'head':>13} | {'whvi img/s':>10} {'torch img/s':>11} | {'whvi/torch':>10}"
      f" {'per round':>18}")
for key in configs:
    ratios = [a / b for a, b in zip(ours[key], theirs[key])]
    print(f"{key[0]:>6} {key[1]:>13} | {statistics.median(ours[key]):>10.1f}"
          f" {statistics.median(theirs[key]):>11.1f} | {statistics.median(ratios):>10.2f}"
          f" {' '.join(f'{x:.2f}' for x in ratios):>18}")

# The per-shape table; the network timed first is a cheap one (the shapes are vgg16's).
convs = [line for line in whvi("--steps", "3", "--model", "lenet5", "--head", "deterministic",
                               "--conv-shapes", "vgg16") if line.get("bench") == "conv"]
print()
print("vgg16 convolutions, batch 64, ms (whvi::conv against candle's conv2d):")
print(f"{'layers':>22} {'c_in>c_out @hw':>16} | {'fwd whvi':>8} {'candle':>8} | {'bwd whvi':>8} {'candle':>8}")
for c in convs:
    shape = f"{c['c_in']}>{c['c_out']} @{c['hw'][0]}"
    print(f"{','.join(c['layers']):>22} {shape:>16} | {c['whvi_forward_ms']:>8.1f} {c['candle_forward_ms']:>8.1f} |"
          f" {c['whvi_backward_ms']:>8.1f} {c['candle_backward_ms']:>8.1f}")
PY
