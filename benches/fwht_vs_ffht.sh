#!/usr/bin/env bash
# whvi's CPU FWHT against FFHT (the fastest public CPU FWHT), one thread pinned to core 0.
#
# For D = 2^10 and 2^14 at a 256 KiB batch (in cache) it alternates `whvi bench fwht` and the
# FFHT anchor script ROUNDS times and prints, per D, the median ns per row of each and their
# ratio (below 1: whvi is faster). Both sides time their own memcpy of the same bytes, so the
# ratios to memcpy are printed too: they do not depend on which process ran when.
# With DRAM=1 it also compares the 128 MiB batch (slow: about a minute per round).
#
# Environment: FFHT_VENV (default ~/.cache/ffht-venv, created with FFHT from PyPI if missing),
# FFHT_BENCH (the anchor script; default: shared/anchors/ffht_bench.py next to the checkout),
# ROUNDS (default 3), CARGO_TARGET_DIR (as for cargo).
set -euo pipefail

source "$(dirname "$0")/lib.sh"
venv="${FFHT_VENV:-$HOME/.cache/ffht-venv}"
rounds="${ROUNDS:-3}"

anchor="$(anchor_path ffht_bench.py "${FFHT_BENCH:-}")"

if ! "$venv/bin/python" -c 'import ffht' 2>/dev/null; then
    echo "creating the FFHT venv in $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q numpy pybind11 setuptools wheel
    "$venv/bin/pip" install -q --no-build-isolation ffht-unofficial
fi

bin="$(whvi_binary)"
machine_banner

sizes=(262144)
[[ "${DRAM:-0}" == 1 ]] && sizes+=(134217728)

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for ((round = 0; round < rounds; round++)); do
    for bytes in "${sizes[@]}"; do
        for logd in 10 14; do
            taskset -c 0 "$bin" bench fwht --threads 1 --d "$logd" --bytes "$bytes" |
                sed 's/^/whvi /' >>"$log"
            taskset -c 0 "$venv/bin/python" "$anchor" "$logd" "$bytes" | sed 's/^/ffht /' >>"$log"
        done
    done
done

"$venv/bin/python" - "$log" <<'PY'
import json, statistics, sys
ours, theirs = {}, {}
for line in open(sys.argv[1]):
    who, rec = line.split(" ", 1)
    r = json.loads(rec)
    if who == "whvi":
        ours.setdefault((r["d"], r["bytes"], r["variant"]), []).append(r)
    else:
        theirs.setdefault((r["d"], r["rows"] * r["d"] * 4), []).append(r)
med = lambda rs, k: statistics.median(x[k] for x in rs)
print(f"{'D':>6} {'batch':>10} | {'whvi ns/row':>11} {'FFHT ns/row':>11} {'whvi/FFHT':>9} |"
      f" {'whvi/memcpy':>11} {'FFHT/memcpy':>11} | {'whvi into/memcpy':>16} {'FFHT out/memcpy':>15}")
for (d, nbytes), fr in sorted(theirs.items()):
    w, wi = ours[(d, nbytes, "inplace")], ours[(d, nbytes, "into")]
    print(f"{d:>6} {nbytes:>10} | {med(w, 'ns_per_row'):>11.1f} {med(fr, 'ffht_inplace_ns_row'):>11.1f}"
          f" {med(w, 'ns_per_row') / med(fr, 'ffht_inplace_ns_row'):>9.3f} |"
          f" {med(w, 'ratio_to_memcpy'):>11.3f} {med(fr, 'ffht_inplace_over_memcpy'):>11.3f} |"
          f" {med(wi, 'ratio_to_memcpy'):>16.3f} {med(fr, 'ffht_outofplace_over_memcpy'):>15.3f}")
PY
