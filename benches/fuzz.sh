#!/usr/bin/env bash
# Fuzzes whvi's file readers with libFuzzer (cargo-fuzz, nightly toolchain) for a bounded time
# each, starting from small valid files of each format (benches/fuzz/make_seeds.py), and fails
# when any target finds a crash: a panic, a failed assertion, an arithmetic overflow (built
# with debug assertions) or more than 4 GiB of memory.
#
#   benches/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 600 s, every target)
#
# Targets: checkpoint, cifar10_batch, cifar10_tar, cifar10_tar_gz, idx, npy, model_spec,
# svhn_mat, cifar100, cifar10_c
# (benches/fuzz/fuzz_targets/). FUZZ_JOBS=2 runs two targets at a time. The corpus grows
# across runs in $CARGO_TARGET_DIR/fuzz-corpus; a crashing input is left in
# $CARGO_TARGET_DIR/fuzz-artifacts/TARGET/ and its path printed: turn it into a regression
# test before fixing it. Needs: rustup's nightly toolchain, `cargo install cargo-fuzz` (done
# here when missing), python3. The first build compiles candle with coverage instrumentation
# (about 15 minutes on 2 cores). Not run in CI.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-600}"
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(checkpoint cifar10_batch cifar10_tar cifar10_tar_gz idx npy model_spec svhn_mat cifar100 cifar10_c)
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
corpus="$target_dir/fuzz-corpus"
artifacts="$target_dir/fuzz-artifacts"
seeds="$(mktemp -d)"
trap 'rm -rf "$seeds"' EXIT

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup run nightly rustc --version >/dev/null || {
    echo "fuzz.sh needs the nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
}
fuzz=(cargo +nightly fuzz)
build_flags=(--fuzz-dir "$repo/benches/fuzz" --target-dir "$target_dir/fuzz" -s none --debug-assertions)

echo "-- a small checkpoint to start the checkpoint target from"
cargo build --release --bin whvi --manifest-path "$repo/Cargo.toml" --quiet
"$target_dir/release/whvi" train --model lenet5 --epochs 1 --out "$seeds/run" >/dev/null
python3 "$repo/benches/fuzz/make_seeds.py" "$seeds" "$seeds/run/best.safetensors" "$repo"

echo "-- building the targets"
"${fuzz[@]}" build "${build_flags[@]}"

run_one() {
    local t="$1" log
    log="$artifacts/$t.log"
    mkdir -p "$corpus/$t" "$artifacts/$t"
    if "${fuzz[@]}" run "${build_flags[@]}" "$t" "$corpus/$t" "$seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=60 \
        -artifact_prefix="$artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
        local runs cov
        runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
        cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || echo '?')"
        printf 'ok    %-15s %4s s  %9s inputs  coverage %5s  corpus %s files\n' \
            "$t" "$seconds" "$runs" "$cov" "$(ls "$corpus/$t" | wc -l)"
    else
        printf 'CRASH %-15s see %s\n' "$t" "$log"
        grep -m3 'panicked at\|SUMMARY\|Test unit written' "$log" | sed 's/^/      /'
        return 1
    fi
}
jobs="${FUZZ_JOBS:-1}"
echo "-- fuzzing ${#targets[@]} target(s), $seconds s each, $jobs at a time"
failed=0
running=()
for t in "${targets[@]}"; do
    run_one "$t" &
    running+=($!)
    if [[ ${#running[@]} -ge $jobs ]]; then
        wait "${running[0]}" || failed=1
        running=("${running[@]:1}")
    fi
done
for pid in "${running[@]}"; do wait "$pid" || failed=1; done
exit "$failed"
