"""Fails when two top-level modules of src/ import each other, directly or through others.

The layout's promise (data -> model -> loss/optimiser -> checkpoint -> evaluation, no module
importing one above it) is checked on the `crate::MODULE` paths of every source file: they
are how whvi's modules name each other (`super::` stays inside a module).
"""

import collections
import re
import sys
from pathlib import Path


def import_graph(src):
    graph = collections.defaultdict(set)
    for path in src.rglob("*.rs"):
        module = path.relative_to(src).parts[0].removesuffix(".rs")
        text = path.read_text()
        # `crate::data::x` and the groups of `use crate::{data, zoo::Network};`.
        names = re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text)
        for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
            names += re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group)
        for used in names:
            is_module = (src / used).is_dir() or (src / f"{used}.rs").exists()
            if used != module and is_module:
                graph[module].add(used)
    return graph


def cycle_through(graph, start):
    """A path start -> ... -> start, or None."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    graph = import_graph(src)
    cycles = {tuple(c) for m in graph if (c := cycle_through(graph, m))}
    for cycle in sorted(cycles):
        print("import cycle: " + " -> ".join(cycle), file=sys.stderr)
    if cycles:
        sys.exit("modules of src/ import each other; move what both need below both")
    print(f"no import cycle between the {len(graph)} modules of {src} that import others")


if __name__ == "__main__":
    main()
