#!/usr/bin/env bash
# whvi's layers against the PyTorch WHVI anchor (shared/anchors/torch_whvi.py), same cores.
#
# Alternates `whvi bench layers` (batch 128, forward+backward, 2 threads) and the anchor ROUNDS
# times and prints, per D, the median milliseconds of whvi's WhviLinear, candle's dense Linear
# and the PyTorch WHVI layer, with whvi's speed-up over each. The issue's targets: faster than
# dense from D = 1024, >= 10x at D = 4096, >= 3x faster than the PyTorch version at D = 4096.
#
# Environment: TORCH_VENV (default ~/.cache/torch-venv; `pip install torch==2.15.0 numpy`),
# TORCH_WHVI (the anchor; default: shared/anchors/torch_whvi.py next to the checkout),
# ROUNDS (default 3), THREADS (default 2), CARGO_TARGET_DIR (as for cargo).
set -euo pipefail

source "$(dirname "$0")/lib.sh"
venv="${TORCH_VENV:-$HOME/.cache/torch-venv}"
rounds="${ROUNDS:-3}"
threads="${THREADS:-2}"

anchor="$(anchor_path torch_whvi.py "${TORCH_WHVI:-}")"
"$venv/bin/python" -c 'import torch' 2>/dev/null ||
    { echo "no torch in $venv: python3 -m venv $venv && $venv/bin/pip install torch==2.15.0 numpy" >&2; exit 1; }

bin="$(whvi_binary)"
machine_banner

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for ((round = 0; round < rounds; round++)); do
    "$bin" bench layers --threads "$threads" --d 512 1024 2048 4096 | sed 's/^/whvi /' >>"$log"
    "$venv/bin/python" "$anchor" "$threads" | sed 's/^/torch /' >>"$log"
done

"$venv/bin/python" - "$log" <<'PY'
import json, statistics, sys
ours, theirs = {}, {}
for line in open(sys.argv[1]):
    who, rec = line.split(" ", 1)
    r = json.loads(rec)
    if who == "whvi":
        ours.setdefault((r["d"], r["layer"]), []).append(r["ms"])
    else:
        theirs.setdefault(r["D"], []).append(r["whvi"])
med = statistics.median
print(f"{'D':>5} | {'whvi ms':>8} {'dense ms':>9} {'meanfield ms':>12} {'torch whvi ms':>13} |"
      f" {'dense/whvi':>10} {'torch/whvi':>10}")
for d in sorted(theirs):
    w, dn, mf, t = med(ours[(d, "whvi")]), med(ours[(d, "dense")]), med(ours[(d, "meanfield")]), med(theirs[d])
    print(f"{d:>5} | {w:>8.2f} {dn:>9.2f} {mf:>12.2f} {t:>13.2f} | {dn / w:>10.1f} {t / w:>10.1f}")
PY
