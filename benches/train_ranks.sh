#!/usr/bin/env bash
# Data-parallel training on one machine: images/s of one process with 2 threads against
# `mpirun -n 2` ranks with 1 thread each (`whvi bench train`, vgg11 x0.25 by default, global
# batch 64), and the share of a step rank 0 spends in all-reduces (waiting for the other rank
# included). Rounds alternate the two, so that a noisy machine moves both alike; prints one JSON
# line per measurement, then the median ratio.
# Environment: MODEL (default vgg11), WIDTH (0.25), HEADS ("deterministic whvi"), BATCH (64),
# STEPS (8), ROUNDS (3), MPIRUN (default mpirun), CARGO_TARGET_DIR (as for cargo). Needs Open MPI
# (`apt-get install openmpi-bin libopenmpi-dev libclang-dev`); builds with `--features mpi`.
set -euo pipefail

source "$(dirname "$0")/lib.sh"
bin="$(whvi_binary mpi)"
machine_banner
mpirun="${MPIRUN:-mpirun}"
read -r -a heads <<<"${HEADS:-deterministic whvi}"
args=(bench train --model "${MODEL:-vgg11}" --width "${WIDTH:-0.25}" --head "${heads[@]}"
    --batch "${BATCH:-64}" --steps "${STEPS:-8}" --conv-shapes none)

results="$(mktemp)"
trap 'rm -f "$results"' EXIT
for round in $(seq "${ROUNDS:-3}"); do
    "$bin" "${args[@]}" --threads 2 | sed "s/^{/{\"round\":$round,\"setup\":\"1x2\",/" | tee -a "$results"
    "$mpirun" --allow-run-as-root --oversubscribe --bind-to core -n 2 "$bin" "${args[@]}" --threads 1 |
        sed "s/^{/{\"round\":$round,\"setup\":\"2x1\",/" | tee -a "$results"
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
print("\n| network | head | 1 rank x 2 threads img/s | 2 ranks x 1 thread img/s | ratio | all-reduce share |")
print("|---|---|---|---|---|---|")
for key in sorted({(r["model"], r["head"]) for r in rows}):
    pick = lambda s: {r["round"]: r for r in rows if (r["model"], r["head"]) == key and r["setup"] == s}
    one, two = pick("1x2"), pick("2x1")
    ratios = [two[k]["images_per_s"] / one[k]["images_per_s"] for k in one if k in two]
    med = lambda d, f: statistics.median(r[f] for r in d.values())
    print(f"| {key[0]} | {key[1]} | {med(one, 'images_per_s'):.0f} | {med(two, 'images_per_s'):.0f} "
          f"| {statistics.median(ratios):.2f} | {100 * med(two, 'allreduce_share'):.1f}% |")
PY
