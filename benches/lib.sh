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

# whvi_binary: builds the release binary and prints its path.
whvi_binary() {
    (cd "$repo" && cargo build --release --quiet --bin whvi) >&2
    echo "${CARGO_TARGET_DIR:-$repo/target}/release/whvi"
}
