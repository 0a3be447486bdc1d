"""The import graph of `framework/` + `kernels/` runs one way and has no cycle.

Every import is read from the source (module level and inside functions): each module belongs to a layer,
and a module may import only from its own layer or the ones below it:

    kernels -> base (dist, errors, io, progress, noise, faults, _paths) -> data, models
    -> components (distill, prune, quant, eval) -> train -> recipes -> config -> cli (cli, help, __main__)
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"sapling": REPO / "framework", "sapling.kernels": REPO / "kernels"}

LAYERS = ["kernels", "base", "data/models", "components", "train", "recipes", "config", "cli"]
_FIRST = {  # the first name under `sapling.`: its layer
    "kernels": "kernels",
    "dist": "base", "errors": "base", "io": "base", "progress": "base", "noise": "base", "_paths": "base",
    "faults": "base",
    "data": "data/models", "models": "data/models",
    "distill": "components", "prune": "components", "quant": "components", "eval": "components",
    "train": "train", "recipes": "recipes", "config": "config",
    "cli": "cli", "help": "cli", "__main__": "cli",
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py of the package (a package is its __init__.py)."""
    mods = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


def layer(module: str) -> str:
    """The layer of a `sapling...` module (the package `sapling` itself is base)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if parts[1] not in _FIRST:
        raise AssertionError(f"{module}: no layer: add `{parts[1]}` to tests/test_layers.py's map and to "
                             "the order in DESIGN.md")
    return _FIRST[parts[1]]


def _imports(module: str, path: Path, mods: dict[str, Path]) -> set[tuple[str, int]]:
    """(imported sapling module, line) for every import in `path`, a `from m import x` naming the
    submodule `m.x` where x is one."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append(sub if sub in mods else base)
        for name in names:
            while name and name not in mods:  # `import sapling.x.y` with y not a module: its package
                name = name.rpartition(".")[0]
            if name.startswith("sapling") and name != module:
                found.add((name, node.lineno))
    return found


def _graph() -> dict[str, dict[str, int]]:
    mods = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in mods.items():
        edges: dict[str, int] = {}
        for target, line in sorted(_imports(module, path, mods)):
            edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _where(module: str, line: int) -> str:
    path = _modules()[module]
    return f"{path.relative_to(REPO)}:{line}"


def test_every_import_goes_down_the_layers():
    graph = _graph()
    bad = []
    for module, edges in graph.items():
        here = LAYERS.index(layer(module))
        for target, line in edges.items():
            there = LAYERS.index(layer(target))
            if there > here:
                bad.append(f"{_where(module, line)}: {module} ({LAYERS[here]}) imports {target} ({LAYERS[there]})")
    assert not bad, "imports against the layer order " + " -> ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    lines = []
    for comp in cycles:
        edges = [f"  {_where(m, line)}: {m} -> {t}" for m in sorted(comp) for t, line in graph[m].items() if t in comp]
        lines.append(f"cycle of {len(comp)} modules:\n" + "\n".join(edges))
    assert not cycles, "\n".join(lines)


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.add(member)
                        if member == node:
                            break
                    out.append(comp)
    return out


def test_the_checker_sees_a_cycle_and_a_wrong_way_import():
    """The two checks above catch what they are for (a tiny made-up graph)."""
    graph = {"sapling.a": {"sapling.b": 1}, "sapling.b": {"sapling.c": 1}, "sapling.c": {"sapling.a": 1},
             "sapling.d": {}}
    assert [c for c in _strongly_connected(graph) if len(c) > 1] == [{"sapling.a", "sapling.b", "sapling.c"}]
    assert LAYERS.index(layer("sapling.train.loop")) > LAYERS.index(layer("sapling.prune.plan"))
    assert LAYERS.index(layer("sapling.recipes.hooks")) < LAYERS.index(layer("sapling.config"))
