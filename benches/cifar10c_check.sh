#!/usr/bin/env bash
# Checks the CIFAR-10-C reader against the on-the-fly corruptions on real data: writes the
# CIFAR-10 test set under every corruption whvi makes (`whvi corrupt`, CIFAR-10-C layout),
# evaluates the checkpoints from those files and on the fly with the same seed, and compares
# every per-set number (they must agree to 1e-6).
#
#   benches/cifar10c_check.sh CIFAR10_DATA WORK_DIR CHECKPOINT... [-- EXTRA EVAL FLAGS]
#
# Writes WORK_DIR/CIFAR-10-C (about 2 GB), WORK_DIR/files.json and WORK_DIR/fly.json.
# IMAGES=N limits each severity to the first N test images (default all 10,000).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$1" work="$2"
shift 2
checkpoints=()
while [[ $# -gt 0 && "$1" != "--" ]]; do checkpoints+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
images="${IMAGES:-10000}"
whvi="${CARGO_TARGET_DIR:-$repo/target}/release/whvi"
cargo build --release --bin whvi --manifest-path "$repo/Cargo.toml" --quiet
mkdir -p "$work"
"$whvi" corrupt --data "$data" --out "$work/CIFAR-10-C" --images "$images" --seed 0
common=(--data "$data" --seed 0 --corruption-images "$images" --report)
"$whvi" eval "${checkpoints[@]}" --corruptions "cifar10-c:$work/CIFAR-10-C" "${common[@]}" \
    "$work/files.json" --force "$@"
"$whvi" eval "${checkpoints[@]}" --corruptions all "${common[@]}" "$work/fly.json" --force "$@"
python3 - "$work/files.json" "$work/fly.json" <<'PY'
import json, sys
load = lambda p: (lambda r: r if isinstance(r, list) else [r])(json.load(open(p)))
files, fly = load(sys.argv[1]), load(sys.argv[2])
worst = 0.0
for a, b in zip(files, fly):
    sets_a = {(c["corruption"], c["severity"]): c for c in a["corruptions"]}
    sets_b = {(c["corruption"], c["severity"]): c for c in b["corruptions"]}
    assert sets_a.keys() == sets_b.keys(), (sorted(sets_a), sorted(sets_b))
    for key, ca in sets_a.items():
        for metric in ("accuracy", "nll", "brier", "ece15"):
            worst = max(worst, abs(ca[metric] - sets_b[key][metric]))
    print(f"{a['checkpoint']}: {len(sets_a)} sets, corrupted accuracy {a['corrupted_accuracy']:.4f}, "
          f"NLL {a['corrupted_nll']:.4f}, ECE-15 {a['corrupted_ece15']:.4f}")
print(f"largest difference between files and on the fly: {worst:.3g}")
sys.exit(0 if worst <= 1e-6 else 1)
PY
