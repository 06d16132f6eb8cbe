"""Documentation runs and says what its code does.

- every Python block of docs/*.md runs, in order, one namespace per page (docs/policy_gradient.md has its own
  test with its own checks, tests/docs/test_policy_docs.py; README.md's blocks all run in tests/docs/test_examples.py);
  the pages' claims are checked here;
- README's "Use it in your training loop" example trains (its loss falls);
- examples/quickstart.py is the README block that says it is;
- every relative link and image of the Markdown files resolves from the file that holds it.
"""

import re
from pathlib import Path

import pytest

from tests.docs.test_policy_docs import python_blocks

ROOT = Path(__file__).resolve().parents[2]
TESTED_ELSEWHERE = {"policy_gradient.md", "sparse_teacher.md", "teacher_server.md", "migrating.md"}
DOCS = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in TESTED_ELSEWHERE)


def run_blocks(blocks: list[str], where: str) -> dict:
    namespace: dict = {"__name__": "doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{where} block {i}", "exec"), namespace)
    return namespace


def check_integrations(ns: dict, out: str) -> None:
    assert "step 0: 'python(17 * 23)<|im_end|>'" in out and "step 1: '17 * 23 = 391.<|im_end|>'" in out
    assert "steps per row [2, 1]" in out
    logs = [entry for entry in ns["trainer"].state.log_history if "sod/kl" in entry]
    assert len(logs) == 2 and all(entry["sod/kl"] > 0 for entry in logs)
    weights = ns["data"].meta_info["token_kl_reg"]["stepwise_weights"]
    assert weights.shape == (4, 20) and (weights[:, 7:11] == 0).all() and (weights[:, 0] == 1).all()
    assert set(ns["metrics"]) == {"actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert ns["metrics"]["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-5)  # first epoch: new = old policy


def check_math(ns: dict, out: str) -> None:
    assert "d_k [0.1, 0.2, 0.3, 0.05]" in out and "w_k [1.0, 0.5, 0.3333, 1.2]" in out


CHECKS = {"integrations.md": check_integrations, "math.md": check_math}


def test_every_page_with_code_has_its_checks():
    with_code = {p.name for p in DOCS if python_blocks(p.read_text())}
    assert with_code == set(CHECKS), with_code


@pytest.mark.parametrize("page", [p.name for p in DOCS])
def test_doc_page_runs_and_says_what_it_prints(page, capsys):
    text = (ROOT / "docs" / page).read_text()
    ns = run_blocks(python_blocks(text), page)
    out = capsys.readouterr().out
    CHECKS.get(page, lambda ns, out: None)(ns, out)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


def test_readme_training_loop_trains(capsys):
    blocks = python_blocks(readme_section("Use it in your training loop"))
    assert len(blocks) == 1
    assert len(blocks[0].strip().splitlines()) <= 25
    ns = run_blocks(blocks, "README training loop")
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"step \d: loss ([\d.]+)", out)]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0]
    assert ns["stats"].num_steps.tolist() == [2, 2, 2, 2]
    assert ns["inputs"]["student_hidden"].shape == (4, 47, 64)  # shifted: L - 1 positions
    assert all(p.grad is None for p in ns["teacher"].parameters())


def test_quickstart_is_the_readme_snippet():
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```\n+This is `examples/quickstart.py`", text, flags=re.S)
    assert match, "README.md must show the quickstart block followed by 'This is `examples/quickstart.py`'"
    source = (ROOT / "examples" / "quickstart.py").read_text()
    docstring, _, code = source.partition("\n\n")
    assert docstring.startswith('"""') and docstring.endswith('"""') and "\n" not in docstring
    assert code == match.group(1)


def markdown_files() -> list[Path]:
    skip = {".venv", ".git", "runs", "build", ".pytest_cache"}
    return sorted(p for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts))


def test_relative_links_resolve_from_their_file():
    broken = []
    for path in markdown_files():
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links only, not code
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_front_door_comes_first():
    text = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    front = ["Install", "Shortest example", "Which entry point do I use", "Two commands"]
    assert headings[:4] == front and headings.index("API") == 4, headings
    install = readme_section("Install")
    for extra in ("'.[hf]'", "'.[trl]'", "'.[trainer]'", "'.[dev]'", "pip wheel"):
        assert extra in install, extra
    table = readme_section("Which entry point do I use")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    for needle in ("own training loop", "Hugging Face", "TRL", "verl", "python -m trainer train", "several GPUs"):
        assert sum(needle in row for row in rows) >= 1, needle
    commands = readme_section("Two commands")
    assert "make demo" in commands and "make test" in commands


def test_readme_cites_the_paper_and_ships_a_license():
    text = (ROOT / "README.md").read_text()
    assert "https://arxiv.org/abs/2605.07725" in text and "https://github.com/YoungZ365/SOD" in text
    citation = readme_section("Citation")
    assert "```bibtex" in citation and "2605.07725" in citation
    assert "Apache License" in (ROOT / "LICENSE").read_text() and (ROOT / "CHANGELOG.md").is_file()


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md"])
def test_front_pages_speak_about_the_software_not_its_development(name):
    text = (ROOT / name).read_text()
    for phrase in ("load average", "re-run at", "rerun at", "previous demo", "from a fresh clone at commit",
                   "this repository's shared", "apt-get", ".ci/run", "is refused with a `ValueError`"):
        assert phrase not in text, phrase
