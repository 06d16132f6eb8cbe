"""Smoke tests of the benchmark harness at tiny sizes (no timing assertions).

They run the real pipeline: worker processes, the CPU memory measurement, the OOM path under an
artificially small address-space cap, the JSON / Markdown / PNG outputs and LATEST.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import floors, report
from benchmarks.inputs import FAMILIES, input_statistics, make_inputs, step_ids_for
from benchmarks.methods import make_step, naive_sod_loss, predicted_extra_bytes
from benchmarks.runner import REPO_ROOT, RunConfig, Size, parse_sizes, plan_cases, result_stem, run, worker_env

TINY = Size(48, 320, 16, 24, floors.MODES, ("N sweep", "judged"))
TINY_2 = Size(96, 320, 16, 24, ("fwd_bwd",), ("N sweep",))


def test_flop_and_byte_floors_match_hand_computed_values():
    # judged size: N=4096, V=32000, Hs=256, Ht=384
    assert floors.flop_floor("fwd", 4096, 32000, 256, 384) == 2 * 4096 * 32000 * 640 == 167_772_160_000
    assert floors.flop_floor("fwd_bwd", 4096, 32000, 256, 384) == 167_772_160_000 + 134_217_728_000
    assert floors.flop_recompute("fwd_bwd", 4096, 32000, 256, 384) == 2 * 167_772_160_000 + 134_217_728_000
    # headline: N=16384, V=151936, Hs=1024, Ht=2560 -> about 17.8 TFLOP forward
    assert floors.flop_floor("fwd", 16384, 151936, 1024, 2560) == 17_843_441_631_232
    # bytes, fp32: forward reads (N + V)(Hs + Ht) elements once
    assert floors.byte_floor("fwd", 10, 20, 3, 5, 4) == 4 * 30 * 8
    assert floors.byte_floor("fwd_bwd", 10, 20, 3, 5, 2) == 2 * (2 * 30 * 8) + 2 * 30 * 3
    assert floors.achieved_tflops(2 * 10**12, 2.0) == pytest.approx(1.0)
    assert floors.share_of_rate(0.5, 2.0) == pytest.approx(0.25)
    assert floors.achieved_tflops(1, None) is None
    with pytest.raises(ValueError):
        floors.flop_floor("backward", 1, 1, 1, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_are_fresh_nonzero_and_shaped(family):
    a = make_inputs(family, 40, 300, 16, 24, seed=1)
    b = make_inputs(family, 40, 300, 16, 24, seed=2)
    assert a.student_hidden.shape == (40, 16) and a.teacher_weight.shape == (300, 24)
    assert a.student_hidden.requires_grad and not a.teacher_hidden.requires_grad
    assert not torch.equal(a.student_hidden, b.student_hidden)
    assert all(bool((t != 0).any()) for t in (a.student_hidden, a.student_weight, a.teacher_hidden, a.teacher_weight))
    assert torch.equal(a.step_ids, step_ids_for(40, "cpu"))
    stats = input_statistics(a)
    if family == "lm_like":  # peaked: far below log V
        assert stats["student_entropy"] < 0.6 * stats["log_vocab"]
    else:  # near uniform
        assert stats["student_entropy"] > 0.8 * stats["log_vocab"]


def test_naive_loss_and_ours_agree():
    x = make_inputs("lm_like", 40, 300, 16, 24, seed=5)
    naive = make_step("naive", x, "fwd_bwd")()
    grad_naive = x.student_weight.grad.clone()
    x.zero_grads()
    ours = make_step("sod_torch", x, "fwd_bwd")()
    assert float(ours) == pytest.approx(float(naive), rel=1e-4)
    assert torch.allclose(x.student_weight.grad, grad_naive, rtol=1e-3, atol=1e-6)
    direct = naive_sod_loss(x.student_hidden, x.student_weight, x.teacher_hidden, x.teacher_weight, x.step_ids)
    assert float(direct.detach()) == pytest.approx(float(naive), rel=1e-6)


def test_plan_groups_cpu_cases_per_method_and_size():
    config = RunConfig(device="cpu", dtype="float32", sizes=[TINY, TINY_2], methods=("naive", "sod_torch"))
    per_method = plan_cases(RunConfig(device="cuda", dtype="bfloat16", sizes=[TINY, TINY_2],
                                      methods=("naive", "sod_torch")))
    assert [len(g) for g in per_method] == [6, 6]
    groups = plan_cases(config)
    assert len(groups) == 4
    assert {(c["method"], c["tokens"]) for c in groups[0]} == {("naive", 48)}
    assert len(groups[0]) == 4 and len(groups[1]) == 4 and len(groups[2]) == 2  # TINY_2 runs fwd_bwd only
    assert parse_sizes("8:16:4:4", ("fwd",))[0].key() == {"tokens": 8, "vocab": 16, "student_width": 4,
                                                          "teacher_width": 4}
    with pytest.raises(ValueError):
        parse_sizes("8:16:4", ("fwd",))


def test_harness_writes_json_markdown_plots_and_latest(tmp_path):
    config = RunConfig(device="cpu", dtype="float32", sizes=[TINY, TINY_2],
                       methods=("naive", "sod_triton", "sod_torch"), families=FAMILIES, warmup=0, reps=1,
                       case_budget_s=2.0, mem_cap_bytes=1 << 30, threads=1, seed=11, out_dir=tmp_path,
                       drift_check=False, group_by="method")
    doc = run(config, log=lambda _: None)
    stem = result_stem(doc)
    paths = report.write_run(doc, tmp_path, stem)
    latest = report.write_latest(tmp_path, REPO_ROOT)

    saved = json.loads(paths["json"].read_text())
    assert saved["device_name"] and saved["versions"]["torch"] == importlib.metadata.version("torch")
    assert saved["code"]["commit"] and saved["dtype"] == "float32"
    by_method = {}
    for r in saved["results"]:
        by_method.setdefault(r["method"], []).append(r)
    assert len(by_method["naive"]) == len(by_method["sod_torch"]) == 6
    assert all(r["status"] == "unavailable" for r in by_method["sod_triton"])
    for r in by_method["naive"] + by_method["sod_torch"]:
        assert r["status"] == "ok", r
        assert r["reps"] >= 1 and r["median_s"] > 0 and r["extra_memory_bytes"] >= 0
        assert r["flop_floor"] == floors.flop_floor(r["mode"], r["tokens"], 320, 16, 24)
        assert r["achieved_tflops"] == pytest.approx(r["flop_floor"] / r["median_s"] / 1e12)
    ours = {(r["family"], r["mode"], r["tokens"]): r["loss_value"] for r in by_method["sod_torch"]}
    naive = {(r["family"], r["mode"], r["tokens"]): r["loss_value"] for r in by_method["naive"]}
    assert all(ours[k] == pytest.approx(naive[k], rel=1e-4) for k in ours)

    markdown = paths["md"].read_text()
    assert "N=48 V=320 Hs=16 Ht=24" in markdown and "The judged configuration" in markdown
    assert "n/a (Triton backend needs a CUDA device)" in markdown
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"{stem}-memory.png", f"{stem}-time.png"]
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    assert latest is not None and f"{stem}-time.png" in latest.read_text()


def test_oom_is_recorded_under_a_tiny_cap(tmp_path):
    # A real allocation failure (RLIMIT_AS) for the chunked backend, and a predicted one for naive.
    cap = 64 * 1024
    cases = [{"method": m, "family": "worst_case", "mode": "fwd_bwd", "tokens": 512, "vocab": 4096,
              "student_width": 16, "teacher_width": 24} for m in ("naive", "sod_torch")]
    job = {"kind": "cases", "device": "cpu", "dtype": "float32", "threads": 1, "seed": 3, "cases": cases,
           "warmup": 1, "reps": 1, "case_budget_s": 1.0, "mem_cap_bytes": cap, "deadline": None}
    job_path, out_path = tmp_path / "job.json", tmp_path / "out.jsonl"
    job_path.write_text(json.dumps(job))
    config = RunConfig(device="cpu", dtype="float32", sizes=[], threads=1)
    subprocess.run([sys.executable, "-m", "benchmarks.worker", str(job_path), str(out_path)], cwd=REPO_ROOT,
                   env=worker_env(config), check=True, timeout=120)
    naive, ours = (json.loads(line) for line in out_path.read_text().splitlines())
    assert naive["status"] == "oom_predicted" and predicted_extra_bytes("naive", 512, 4096) > cap
    assert ours["status"] == "oom", ours
    table = report.status_cell(ours) + report.status_cell(naive)
    assert table == "OOMOOM (predicted)"
