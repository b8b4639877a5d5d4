#!/usr/bin/env bash
# Training throughput of whvi's VGG-11/16 (deterministic and WHVI head) against PyTorch's
# (shared/anchors/torch_vgg_throughput.py): batch 64, 32x32x3, 2 threads, one after the other.
#
# Prints images/s of both and whvi / PyTorch per configuration (issue target: >= 1.0).
# Environment: TORCH_VENV (default ~/.cache/torch-venv), TORCH_VGG (the anchor; default:
# shared/anchors/torch_vgg_throughput.py next to the checkout), STEPS (default 6),
# CARGO_TARGET_DIR (as for cargo).
set -euo pipefail

source "$(dirname "$0")/lib.sh"
venv="${TORCH_VENV:-$HOME/.cache/torch-venv}"

anchor="$(anchor_path torch_vgg_throughput.py "${TORCH_VGG:-}")"

bin="$(whvi_binary)"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
"$bin" bench train --threads 2 --batch 64 --steps "${STEPS:-6}" --model vgg11 vgg16 | sed 's/^/whvi /' >>"$log"
"$venv/bin/python" "$anchor" | sed 's/^/torch /' >>"$log"

"$venv/bin/python" - "$log" <<'PY'
import json, sys
ours, theirs, convs = {}, {}, []
for line in open(sys.argv[1]):
    who, rec = line.split(" ", 1)
    r = json.loads(rec)
    if r.get("bench") == "conv":
        convs.append(r)
    elif who == "whvi":
        ours[(r["model"], r["head"] == "whvi")] = r["images_per_s"]
    else:
        theirs[(r["model"], r["whvi_dense"])] = r["train_img_per_s"]
print(f"{'model':>6} {'head':>13} | {'whvi img/s':>10} {'torch img/s':>11} | {'whvi/torch':>10}")
for key in sorted(theirs):
    model, whvi = key
    print(f"{model:>6} {'whvi' if whvi else 'deterministic':>13} | {ours[key]:>10.1f} {theirs[key]:>11.1f} |"
          f" {ours[key] / theirs[key]:>10.2f}")
print()
print("vgg16 convolutions, batch 64, ms (whvi::conv against candle's conv2d):")
print(f"{'layers':>22} {'c_in>c_out @hw':>16} | {'fwd whvi':>8} {'candle':>8} | {'bwd whvi':>8} {'candle':>8}")
for c in convs:
    shape = f"{c['c_in']}>{c['c_out']} @{c['hw'][0]}"
    print(f"{','.join(c['layers']):>22} {shape:>16} | {c['whvi_forward_ms']:>8.1f} {c['candle_forward_ms']:>8.1f} |"
          f" {c['whvi_backward_ms']:>8.1f} {c['candle_backward_ms']:>8.1f}")
PY
