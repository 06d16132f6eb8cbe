"""The package's layout holds: the layer rule of ``sod_kernels`` and no import cycle anywhere in the repository
(imports read with ``ast``, lazy ones included; see tests/layering.py)."""

from __future__ import annotations

import pytest

from tests import layering


def test_sod_kernels_layer_rule():
    """``core`` imports nothing of the package, ``steps`` only ``core``, a loss family only ``core``/``steps``
    (never another family), ``parallel`` the families too; the face (top-level modules, ``integrations``)
    anything."""
    g = layering.graph(("sod_kernels",))
    assert not layering.layer_violations(g), "\n".join(layering.layer_violations(g))


def test_every_module_has_a_layer_folder_or_is_the_face():
    faces = {"sod_kernels", "sod_kernels.modules", "sod_kernels.hf", "sod_kernels.hf_chat", "sod_kernels.fsdp"}
    for module in layering.modules_of("sod_kernels"):
        assert layering.layer_of(module) != "face" or module in faces or module.startswith(
            "sod_kernels.integrations"), f"{module}: put it in a layer folder ({sorted(layering.LAYERS)})"


def test_core_imports_no_triton_eagerly():
    """``import sod_kernels`` stays cheap: the modules it imports eagerly do not import Triton at module level."""
    import ast
    for module, path in layering.modules_of("sod_kernels").items():
        if path.stem in ("kernels", "triton_backend") or path.stem.endswith("_kernels"):  # Triton kernel modules
            continue
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
        assert not {"triton", "triton.language"} & names, f"{module} imports Triton at module level"


def test_layer_rule_catches_a_violation():
    g = {"sod_kernels.core.a": {"sod_kernels.dense.b"}, "sod_kernels.sparse.c": {"sod_kernels.dense.b"},
         "sod_kernels.dense.b": set(), "sod_kernels.parallel.d": {"sod_kernels.dense.b"}}
    assert len(layering.layer_violations(g)) == 2
    assert layering.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("packages", [("sod_kernels",), ("reference",), ("benchmarks",), ("trainer",),
                                      ("sod_kernels", "trainer", "benchmarks", "reference")],
                         ids=lambda p: "+".join(p))
def test_no_import_cycle(packages):
    found = layering.cycles(layering.graph(packages))
    assert not found, f"import cycles: {found}"


# The one row-chunk loop outside core: the low-memory Triton mode sweeps rows x vocabulary slices (the backward with
# the slices outermost, so that its float32 d(weight) accumulator is one slice), which the core loop's
# whole-vocabulary row chunks do not express.
CHUNK_LOOPS_ALLOWED = {("sod_kernels.dense.triton_backend", "_forward_low_memory"),
                       ("sod_kernels.dense.triton_backend", "_backward_low_memory")}


def _row_chunk_loops(tree) -> list[tuple[str, int]]:
    """``(function, line)`` of every ``for`` over row starts (a target named ``start``) outside Triton kernels."""
    import ast

    found = []

    def visit(node, function, in_kernel):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kernel = any("jit" in ast.unparse(d) for d in node.decorator_list)
            function = function if function and function != "<module>" and not kernel else node.name
            in_kernel = in_kernel or kernel
        if isinstance(node, ast.For) and not in_kernel:
            names = {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
            if "start" in names:
                found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function, in_kernel)

    visit(tree, "<module>", False)
    return found


def test_every_loss_runs_the_one_chunk_loop():
    """Row chunks are iterated once, in ``sod_kernels.core.loop.run_chunks``: a loss family's (or the
    vocabulary-parallel) module writes epilogues, not loops over row starts (Triton kernels' own loops over columns aside; the low-memory slice sweep is the named
    exception)."""
    import ast
    offenders = []
    for module, path in layering.modules_of("sod_kernels").items():
        if layering.layer_of(module) not in (*layering.FAMILIES, "parallel"):
            continue
        for function, line in _row_chunk_loops(ast.parse(path.read_text())):
            if (module, function) not in CHUNK_LOOPS_ALLOWED:
                offenders.append(f"{path.relative_to(layering.ROOT)}:{line} ({function})")
    assert not offenders, "row-chunk loops outside core.loop: " + ", ".join(offenders)


def test_chunk_loop_detector_sees_a_loop():
    import ast
    tree = ast.parse("def f(chunks):\n    for start, stop in chunks:\n        pass\n")
    assert _row_chunk_loops(tree) == [("f", 2)]
    kernel = ast.parse("@triton.jit\ndef k(n):\n    for start in range(0, n, 4):\n        pass\n")
    assert _row_chunk_loops(kernel) == []
