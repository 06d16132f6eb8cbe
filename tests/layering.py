"""Reads the package's imports with ``ast`` (nothing is imported): the module graph, its cycles, the layer
rule of ``sod_kernels`` and the counts that describe how the package reads (``python tests/layering.py``).

Layers of ``sod_kernels`` (a module's layer is its first folder; modules at the top are the face):
``core`` imports nothing of the package, ``steps`` only ``core``, the loss families (``dense``, ``sparse``,
``logprobs``) import ``core``/``steps`` and never each other except through ``ALLOWED_CROSS``, ``parallel``
may import the families, and the face (top-level modules, ``integrations``) may import anything.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAMILIES = ("dense", "sparse", "logprobs")
LAYERS = {
    "core": set(),
    "steps": {"core"},
    "dense": {"core", "steps"},
    "sparse": {"core", "steps"},
    "logprobs": {"core", "steps"},
    "parallel": {"core", "steps", "dense", "sparse", "logprobs"},
}
# The one allowed import between loss families: (importer layer, imported layer).
ALLOWED_CROSS: set[tuple[str, str]] = set()

# The public losses and the modules that define them (for the "modules to read" count).
PUBLIC_LOSSES = {
    "fused_sod_loss": "sod_kernels.dense.loss",
    "fused_sparse_sod_loss": "sod_kernels.sparse.loss",
    "fused_token_logprobs": "sod_kernels.logprobs.token_logprobs",
    "fused_sod_policy_loss": "sod_kernels.logprobs.policy_loss",
    "fused_topk_logprobs": "sod_kernels.logprobs.topk",
    "vocab_parallel_sod_loss": "sod_kernels.parallel.losses",
    "vocab_parallel_sparse_sod_loss": "sod_kernels.parallel.sparse",
}


def modules_of(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``package`` (a folder under ``root``): dotted name -> file."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The in-repository modules ``module`` imports anywhere in its file (lazy imports included); a name
    imported from a package counts as the submodule when one of that name exists."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name:
                    found.add(name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            hit = False
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    found.add(sub)
                    hit = True
            if not hit:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target:
                    found.add(target)
    found |= _dispatched_backends(module, is_package, tree, known)
    found.discard(module)
    return found


# Calls that import a family's backend module by name (``sod_kernels.core.runtime``): counted as imports of the
# sibling modules they can return, so that the module counts stay honest.
DISPATCHERS = {"backend_module": ("triton_backend", "torch_backend"),
               "single_pass_module": ("triton_backend", "cpu_backend")}


def _dispatched_backends(module: str, is_package: bool, tree: ast.AST, known: dict[str, Path]) -> set[str]:
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in DISPATCHERS or not any(isinstance(a, ast.Name) and a.id == "__package__" for a in node.args):
            continue
        targets = list(DISPATCHERS[name])
        for kw in node.keywords:   # backend_module(..., torch_module="token_logprobs")
            if kw.arg == "torch_module" and isinstance(kw.value, ast.Constant):
                targets[1] = kw.value.value
        found |= {f"{package}.{t}" for t in targets if f"{package}.{t}" in known}
    return found


def graph(packages: tuple[str, ...], root: Path = ROOT) -> dict[str, set[str]]:
    known: dict[str, Path] = {}
    for package in packages:
        known.update(modules_of(package, root))
    return {m: imports_of(m, p, known) for m, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> str:
    """``sod_kernels.<folder>...`` -> the folder; top-level modules and ``integrations`` -> ``face``."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return "face"


def layer_violations(g: dict[str, set[str]], layer: Callable[[str], str] = layer_of) -> list[str]:
    bad = []
    for m, deps in sorted(g.items()):
        lm = layer(m)
        if lm == "face":
            continue
        for d in sorted(deps):
            ld = layer(d)
            if ld == lm or ld in LAYERS.get(lm, set()) or (lm, ld) in ALLOWED_CROSS:
                continue
            bad.append(f"{m} ({lm}) imports {d} ({ld})")
    return bad


def closure(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(g.get(m, ()))
    return seen


def underscore_imports(package: str = "sod_kernels", root: Path = ROOT) -> set[tuple[str, str]]:
    """(importing module, name) for every underscore name imported from another module of the package."""
    known = modules_of(package, root)
    out = set()
    for m, path in known.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        out.add((m, alias.name))
    return out


def cross_family_edges(g: dict[str, set[str]], layer: Callable[[str], str] = layer_of) -> list[tuple[str, str]]:
    """Import edges between two different loss families (``dense``/``sparse``/``logprobs``/``parallel``)."""
    fams = set(FAMILIES) | {"parallel"}
    return sorted((m, d) for m, deps in g.items() for d in deps
                  if layer(m) in fams and layer(d) in fams and layer(m) != layer(d))


def lines(module: str, root: Path = ROOT) -> int:
    path = modules_of(module.split(".")[0], root)[module]
    return len(path.read_text().splitlines())


def report(losses: dict[str, str] = PUBLIC_LOSSES, layer: Callable[[str], str] = layer_of,
           root: Path = ROOT) -> str:
    g = graph(("sod_kernels",), root)
    out = []
    total = sum(lines(m, root) for m in g)
    for name, mod in losses.items():
        if mod not in g:
            out.append(f"{name}: {mod} not found")
            continue
        mods = closure(g, mod)
        n = sum(lines(m, root) for m in mods)
        out.append(f"{name}: {len(mods)} modules / {n} lines ({100 * n / total:.0f}% of the package)")
    cross = cross_family_edges(g, layer)
    out.append(f"cross-family import edges: {len(cross)} "
               f"({len({e for e in cross if layer(e[0]) != 'parallel'})} not from parallel)")
    und = underscore_imports(root=root)
    out.append(f"underscore names imported across modules: {len({n for _, n in und})} names, {len(und)} imports")
    cyc = cycles(g)
    out.append(f"cycles in sod_kernels: {cyc or 'none'}")
    out.append(f"modules: {len(g)}, lines: {total}")
    return "\n".join(out)


if __name__ == "__main__":
    print(report())
