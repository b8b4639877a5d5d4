#!/usr/bin/env python3
"""Fails when whvi's own code calls a `core::arch` intrinsic out of line in a release binary.

An intrinsic such as `_mm256_fmadd_ps` is one instruction when it is inlined into a function
compiled with its target feature. Reached through a closure or a generic std helper
(`array::from_fn`, `Option::map`, ...), it lands in a function compiled without the feature and
becomes a call: the SIMD kernels then run about 10x slower, and whether that happens depends on
one compiler version's inlining choices.

The script disassembles the binary (objdump), finds every direct call or tail jump to a
`core::core_arch::` function, and attributes each calling function to a crate: by its name, or,
for generic core/std/alloc code (whose instances carry no type arguments in their symbols), by
walking up the direct calls to it until it reaches non-generic functions. A call attributed to
whvi fails the check; the rest (dependencies) is listed for information.

Usage: .ci/check_intrinsics.py [BINARY]  (default: the release `whvi` in CARGO_TARGET_DIR)
"""

import os
import re
import subprocess
import sys
from collections import defaultdict

FUNCTION = re.compile(r"^([0-9a-f]+) <(.*)>:$")
CALL = re.compile(r"\t(?:call|jmp)\w*\s+([0-9a-f]+) <([^>+]*)>$")
GENERIC_STD = re.compile(r"^<?(?:core|std|alloc)::")


def crate_of(name):
    """The crate a demangled function name belongs to, or None for generic core/std/alloc."""
    if "whvi" in name:
        return "whvi"
    if GENERIC_STD.match(name) and not name.startswith("core::core_arch::"):
        return None
    return re.split(r"::|<| ", name.lstrip("<"), maxsplit=1)[0] or name


def disassemble(binary):
    """Function names by address, and the direct calls as (caller address, callee address)."""
    names, calls = {}, []
    proc = subprocess.Popen(
        ["objdump", "-d", "--no-show-raw-insn", "-C", binary],
        stdout=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    current = None
    for line in proc.stdout:
        m = FUNCTION.match(line)
        if m:
            current = int(m.group(1), 16)
            names[current] = m.group(2)
            continue
        m = CALL.search(line.rstrip("\n"))
        if m and current is not None:
            calls.append((current, int(m.group(1), 16)))
    if proc.wait() != 0:
        sys.exit(f"check_intrinsics: objdump failed on {binary}")
    return names, calls


def owners(start, names, callers):
    """The crates of the nearest non-generic functions that reach `start` through generic code."""
    found, seen, todo = set(), {start}, [start]
    while todo:
        addr = todo.pop()
        crate = crate_of(names.get(addr, ""))
        if crate is not None:
            found.add(crate)
            continue
        for caller in callers[addr]:
            if caller not in seen:
                seen.add(caller)
                todo.append(caller)
    return found or {"(reached only indirectly)"}


def main():
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(target, "release", "whvi")
    if not os.access(binary, os.X_OK):
        sys.exit(f"check_intrinsics: {binary} not found: build it with cargo build --release")
    names, calls = disassemble(binary)
    callers = defaultdict(set)
    for caller, callee in calls:
        callers[callee].add(caller)
    counts = defaultdict(int)
    for caller, callee in calls:
        if names.get(callee, "").startswith("core::core_arch::"):
            counts[(caller, callee)] += 1
    ours, theirs = [], []
    for (caller, callee), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        crates = owners(caller, names, callers)
        row = f"{n:5} {names[caller]} -> {names[callee]}  [{', '.join(sorted(crates))}]"
        (ours if "whvi" in crates else theirs).append(row)
    if ours:
        print(f"check_intrinsics: {binary} calls core::arch intrinsics out of line from whvi's code")
        print("(count, caller -> intrinsic [crates reaching the caller]). Keep vector operations out")
        print("of closures and std helpers inside #[target_feature] kernels:")
        print("\n".join(ours))
        sys.exit(1)
    print(f"check_intrinsics: {binary}: whvi's code calls no core::arch intrinsic out of line.")
    if theirs:
        print("Out-of-line intrinsic calls in dependencies (count, caller -> intrinsic [crates]):")
        print("\n".join(theirs))


if __name__ == "__main__":
    main()
