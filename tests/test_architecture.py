"""The layout's promises (docs/architecture.md), checked on the source:

- no import cycles between d2v_jax modules (module-level imports, a package's
  `__init__` counted as imported with any of its modules);
- no d2v_jax import hidden inside a function (such imports hid a cycle before);
- no module of d2v_jax over 500 lines;
- no modality named outside `d2v_jax/modalities/`: the generic code asks the
  registry, so neither a modality's name as a string nor an import of one
  modality's package appears anywhere else.

The same checks, from the command line: `python tests/test_architecture.py`.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "d2v_jax"
MAX_LINES = 500
MODALITY_NAMES = ("image", "audio", "text")  # the built-ins (d2v_jax/modalities/*/)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, tuple[pathlib.Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p)))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules) -> list[str]:
    """The d2v_jax modules executed by importing `name`: it (or its nearest
    existing parent) and every parent package's __init__."""
    parts = name.split(".")
    out = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in out if m in modules]


def import_graph() -> dict[str, set[str]]:
    modules = _sources()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, (path, tree) in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in tree.body:  # module level only; see test_no_imports_inside_functions
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports pkg.mod when that is a module
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t.startswith("d2v_jax"):
                    graph[name].update(m for m in _resolve(t, modules) if m != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan),
    ignoring the edge from a package's __init__ to its own submodules' parents
    that Python resolves without a cycle (a submodule importing its package)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def edges(v):
        # A submodule "importing" its ancestor packages is how Python runs
        # them, not a cycle: drop ancestor edges.
        return [w for w in graph[v] if not v.startswith(w + ".")]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def function_level_imports() -> list[str]:
    found = []
    for name, (path, tree) in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    mod = None
                    if isinstance(inner, ast.ImportFrom):
                        mod = "d2v_jax (relative)" if inner.level else (inner.module or "")
                    elif isinstance(inner, ast.Import):
                        mod = inner.names[0].name
                    if mod and mod.startswith("d2v_jax"):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno} imports {mod}")
    return sorted(set(found))


def long_modules() -> list[str]:
    return [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]


def modality_names_outside_modalities(names=MODALITY_NAMES) -> list[str]:
    found = []
    for name, (path, tree) in _sources().items():
        if name.startswith("d2v_jax.modalities"):
            continue
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{where}: the string {node.value!r}")
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for m in mods:
                if any(m.startswith(f"d2v_jax.modalities.{n}") for n in names):
                    found.append(f"{where}: imports {m}")
    return found


def test_import_graph_sees_the_known_edges():
    # The checker itself: edges it must find, or it would pass vacuously.
    graph = import_graph()
    assert "d2v_jax.modalities" in graph["d2v_jax.train"]
    assert "d2v_jax.models.layers" in graph["d2v_jax.modalities.image.model"]
    assert "d2v_jax.modalities.registry" in graph["d2v_jax.modalities.image"]
    assert len(graph) > 40


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"p": {"p.m"}, "p.m": {"p"}}) == []  # a submodule using its package


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_imports_inside_functions():
    assert function_level_imports() == []


def test_no_module_over_500_lines():
    assert long_modules() == []


def test_no_modality_named_outside_modalities():
    assert modality_names_outside_modalities() == []
    # The check sees a name the generic code does use (parallel.mode "jit"), so
    # it is not vacuous; and the names it looks for are the registered ones.
    assert any("parallel.py" in f for f in modality_names_outside_modalities(("jit",)))
    from d2v_jax import modalities

    assert set(MODALITY_NAMES) == set(modalities.names())


if __name__ == "__main__":
    problems = ([f"cycle: {c}" for c in cycles(import_graph())] + function_level_imports()
                + long_modules() + modality_names_outside_modalities())
    print("\n".join(problems) or "ok: no cycles, no function-level d2v_jax imports, no module "
          f"over {MAX_LINES} lines, no modality named outside d2v_jax/modalities/")
    sys.exit(1 if problems else 0)
