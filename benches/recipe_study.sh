#!/usr/bin/env bash
# The WHVI recipe study (issue 18): trains every configuration of the chosen subsets with
# `whvi train`, evaluates it with `whvi eval`, and writes the tables (mean and spread over seeds)
# and the accuracy/ECE-under-shift plots. Every step is skipped when its output exists, so an
# interrupted study continues where it stopped; delete a run's folder to redo it.
#
#   benches/recipe_study.sh [SUBSET ...]       # default: fmnist cifar
#   benches/recipe_study.sh SUBSET/NAME ...    # single configurations (no plots)
#   benches/recipe_study.sh --list             # the configurations and their flags
#
# Subsets: fmnist (lenet5 width 1, 3 epochs), fmnist-candidates (the WHVI variants tried for
# the Fashion-MNIST default), cifar (vgg11 x0.25 at the same epoch budget per method: the
# methods and the deep ensemble), cifar-candidates (WHVI variants on CIFAR-10).
# Environment: OUT (default study/), SEEDS (default "0 1 2"), CIFAR (the cifar-10-batches-bin
# folder; default /tmp/cifar10/cifar-10-batches-bin), CIFAR_EPOCHS (default 20: 7-9 minutes of
# training per run on a 2-core AVX-512 EPYC; the deep ensemble's 3 members get a third each),
# CORRUPTION_IMAGES (default 1000), THREADS (default 2), CARGO_TARGET_DIR (as for cargo).
set -euo pipefail
# Flags are split on spaces on purpose (word splitting); never expand globs such as he*0.1.
set -f

source "$(dirname "$0")/lib.sh"
out="${OUT:-study}"
seeds="${SEEDS:-0 1 2}"
cifar="${CIFAR:-/tmp/cifar10/cifar-10-batches-bin}"
cifar_epochs="${CIFAR_EPOCHS:-20}"
threads="${THREADS:-2}"
corruption_images="${CORRUPTION_IMAGES:-1000}"

fmnist_train="--model lenet5 --dataset fashion-mnist --epochs 3"
elbo="--initial-sigma 0.01 --kl-weight 1"
cifar_train="--model vgg11 --width 0.25 --dataset cifar10 --data $cifar --batch-size 64 --lr 2e-3"
# SUBSET|NAME|FLAGS (after the subset's common flags). An "ensemble" name trains 3 members of
# the flags at a third of the epochs each and evaluates them as one predictive.
configs=(
    "fmnist|whvi|--method whvi"
    "fmnist|deterministic|--bayes none"
    "fmnist|mc-dropout|--method mc-dropout"
    "fmnist|mean-field|--method mean-field"
    "fmnist-candidates|whvi-head-b32|--method whvi --bayes head --batch-size 32"
    "fmnist-candidates|whvi-head-b32-diag30|--method whvi --bayes head --batch-size 32 --diagonal-lr-scale 30"
    "fmnist-candidates|whvi-last-b32|--method whvi --bayes last --batch-size 32"
    "fmnist-candidates|whvi-head-fc1-dense-b32|--method whvi --bayes head --layer fc1=deterministic --batch-size 32"
    "fmnist-candidates|deterministic-b32|--bayes none --batch-size 32"
    "fmnist-candidates|whvi-all-b32|--method whvi --bayes all --batch-size 32"
    # The WHVI default on CIFAR-10: a WHVI head, tempered (initial sigma 0.3, KL weight 10).
    "cifar|whvi|--method whvi --epochs $cifar_epochs"
    "cifar|deterministic|--bayes none --epochs $cifar_epochs"
    "cifar|mc-dropout|--method mc-dropout --epochs $cifar_epochs"
    "cifar|mean-field|--method mean-field --epochs $cifar_epochs"
    "cifar|deterministic-ensemble|--bayes none --epochs $((cifar_epochs / 3 > 0 ? cifar_epochs / 3 : 1))"
    # The candidates. A run with any --bayes but head, or any --layer, keeps the ELBO from sigma
    # 1% of the means, head included (TrainConfig::with_posterior_recipe); "-elbo" names a head
    # with that recipe, the default before this study ($elbo).
    "cifar-candidates|whvi-head-elbo|--method whvi --bayes head $elbo --epochs $cifar_epochs"
    "cifar-candidates|whvi-last|--method whvi --bayes last --epochs $cifar_epochs"
    "cifar-candidates|whvi-head-conv8|--method whvi --bayes head --layer conv8=whvi --epochs $cifar_epochs"
    "cifar-candidates|whvi-head-conv8-per-example|--method whvi --bayes head --layer conv8=whvi --conv-sampling per-example --epochs $cifar_epochs"
    "cifar-candidates|whvi-all|--method whvi --bayes all --epochs $cifar_epochs"
    "cifar-candidates|whvi-head-elbo-prior-x0.1|--method whvi --bayes head $elbo --prior-variance he*0.1 --epochs $cifar_epochs"
    "cifar-candidates|whvi-head-sigma0.3-kl1|--method whvi --bayes head --initial-sigma 0.3 --kl-weight 1 --epochs $cifar_epochs"
    "cifar-candidates|whvi-head-conv8-sigma0.3|--method whvi --bayes head --layer conv8=whvi --initial-sigma 0.3 --epochs $cifar_epochs"
    "cifar-candidates|whvi-head-elbo-diag30|--method whvi --bayes head $elbo --diagonal-lr-scale 30 --epochs $cifar_epochs"
    "cifar-candidates|whvi-head-elbo-klwarmup5|--method whvi --bayes head $elbo --kl-warmup 5 --epochs $cifar_epochs"
    "cifar-candidates|whvi-head-mc2|--method whvi --bayes head --mc-samples 2 --epochs $cifar_epochs"
)

if [[ "${1:-}" == "--list" ]]; then
    printf '%s\n' "${configs[@]}" | column -t -s '|'
    exit 0
fi
subsets=("$@")
[[ ${#subsets[@]} -gt 0 ]] || subsets=(fmnist cifar)

mkdir -p "$out"
# A copy: a rebuild while the study runs must not change the binary half-way.
cp "$(whvi_binary)" "$out/whvi"
bin="$out/whvi"
machine_banner 2>"$out/machine.txt"
cat "$out/machine.txt" >&2

common_flags() {
    case "$1" in
        fmnist*) echo "$fmnist_train" ;;
        cifar*) echo "$cifar_train" ;;
        *) echo "unknown subset $1" >&2; return 1 ;;
    esac
}

eval_flags() {
    case "$1" in
        fmnist*) echo "--ood noise" ;;
        cifar*) echo "--ood fashion-mnist --data $cifar" ;;
    esac
}

# train DIR SEED FLAGS...: one run, unless it finished; an interrupted one is resumed.
train() {
    local dir="$1" seed="$2" start=--overwrite
    shift 2
    [[ -f "$dir/train.done" ]] && return
    [[ -f "$dir/last.safetensors" ]] && start=--resume
    echo "== train $dir" >&2
    # shellcheck disable=SC2068
    "$bin" train $@ --seed "$seed" --threads "$threads" --quiet $start --out "$dir" >&2
    touch "$dir/train.done"
}

# evaluate REPORT FLAGS... CHECKPOINTS...: one report, unless it is there.
evaluate() {
    local report="$1"
    shift
    [[ -f "$report" ]] && return
    echo "== eval $report" >&2
    # shellcheck disable=SC2068
    "$bin" eval $@ --samples 32 --corruptions all --corruption-images "$corruption_images" \
        --threads "$threads" --report "$report" >"${report%.json}.log" 2>&1
}

for selection in "${subsets[@]}"; do
    subset="${selection%%/*}"
    only="${selection#"$subset"}"
    only="${only#/}"
    found=0
    for entry in "${configs[@]}"; do
        IFS='|' read -r set name flags <<<"$entry"
        [[ "$set" == "$subset" && ( -z "$only" || "$name" == "$only" ) ]] || continue
        found=1
        base="$(common_flags "$set")"
        # Run folders are named NAME-sSEED: the folder name is the label in whvi's tables.
        for seed in $seeds; do
            run="$out/$set/$name-s$seed"
            if [[ "$name" == *ensemble ]]; then
                members=()
                for m in 0 1 2; do
                    train "$run-m$m" "$((100 + 3 * seed + m))" "$base $flags"
                    members+=("$run-m$m/best.safetensors")
                done
                evaluate "$run.json" "$(eval_flags "$set") --ensemble" "${members[@]}"
            else
                train "$run" "$seed" "$base $flags"
                evaluate "$run.json" "$(eval_flags "$set")" "$run/best.safetensors"
            fi
        done
    done
    [[ $found == 1 ]] || { echo "no configuration '$selection' (see --list)" >&2; exit 1; }
    [[ -z "$only" ]] || continue
    # The accuracy/ECE-under-shift plot of every method, seed 0 (first seed) of each.
    first="${seeds%% *}"
    plots=()
    for entry in "${configs[@]}"; do
        IFS='|' read -r set name _ <<<"$entry"
        [[ "$set" == "$subset" && "$name" != *ensemble ]] || continue
        plots+=("$out/$set/$name-s$first/best.safetensors")
    done
    mkdir -p "$out/$subset/plots"
    evaluate "$out/$subset/plots/shift.json" "$(eval_flags "$subset") --plots $out/$subset/plots" \
        "${plots[@]}"
done

tables=()
for selection in "${subsets[@]}"; do
    [[ " ${tables[*]} " == *" ${selection%%/*} "* ]] || tables+=("${selection%%/*}")
done
python3 "$(dirname "$0")/study_table.py" "$out" "${tables[@]}" | tee "$out/tables.md"
