# Shared by the benchmark scripts (source it): where the anchor scripts are, and the whvi binary.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# anchor_path NAME [OVERRIDE]: OVERRIDE if set, else shared/anchors/NAME beside the checkout.
anchor_path() {
    local name="$1" override="${2:-}"
    if [[ -n "$override" ]]; then
        [[ -f "$override" ]] || { echo "$override not found" >&2; return 1; }
        echo "$override"
        return
    fi
    for dir in "$repo/.." "$repo/../.." "$repo/../../.."; do
        if [[ -f "$dir/shared/anchors/$name" ]]; then
            echo "$(cd "$dir/shared/anchors" && pwd)/$name"
            return
        fi
    done
    echo "$name not found in shared/anchors next to the checkout; set its variable" >&2
    return 1
}

# whvi_binary [FEATURES]: builds the release binary (with the cargo features FEATURES, if given)
# and prints its path.
whvi_binary() {
    (cd "$repo" && cargo build --release --quiet --bin whvi ${1:+--features "$1"}) >&2
    echo "${CARGO_TARGET_DIR:-$repo/target}/release/whvi"
}

# machine_banner: the facts a figure needs beside it (CPU, its SIMD flags, the compiler, the
# instruction set whvi's kernels run at), on stderr so that tables on stdout stay parseable.
machine_banner() {
    local cpu flags
    cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
    flags="$(grep -o -w 'avx2\|avx512f\|avx512bw\|avx512vl\|avx512dq' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')"
    {
        echo "# cpu: ${cpu:-unknown}, $(nproc) cores; SIMD flags: ${flags:-none}"
        echo "# $(cd "$repo" && rustc --version); WHVI_SIMD=${WHVI_SIMD:-<unset>}"
    } >&2
}
