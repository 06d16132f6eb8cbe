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
