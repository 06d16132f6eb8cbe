"""benchmarks/policy.py at tiny sizes: the inputs have the claimed structure and the records are complete."""

import torch

from benchmarks.policy import _logprob_case, bench_step_weights, markdown, rollout_batch
from sod_kernels import step_ids_from_mask


def test_rollout_batch_structure():
    mask, old, teacher, rewards, groups = rollout_batch(6, 3000, seed=1)
    assert mask.shape == old.shape == teacher.shape == (6, 3000)
    ids = step_ids_from_mask(mask)
    steps = ids.amax(1) + 1
    assert bool((steps >= 1).all())  # every row has assistant turns
    assert bool((mask[:, :200] == 0).all())  # the prompt comes first
    assert bool((old <= 0).all() and (teacher <= old).all())
    assert rewards.shape == groups.shape == (6,)


def test_step_weight_record():
    r = bench_step_weights(5, 1500, loop_rows=2, reps=1)
    assert r["loop_rows_timed"] == 2 and r["loop_extrapolated"]
    for op in ("sod_step_weights", "sod_advantages"):
        e = r[op]
        assert e["vectorised_median_s"] > 0 and e["loop_total_s"] == e["loop_s_per_row"] * 5
        assert e["speedup"] == e["loop_total_s"] / e["vectorised_median_s"]
    assert r["sod_policy_inputs"]["vectorised_median_s"] > 0


def test_logprob_case_and_markdown():
    fused = _logprob_case("fused", 16, 8, 300, "float32", "cpu", reps=1)
    naive = _logprob_case("naive", 16, 8, 300, "float32", "cpu", reps=1)
    for rec in (fused, naive):
        assert not rec["oom"] and rec["median_s"] > 0 and rec["extra_memory_bytes"] >= 0
    env = {"device_name": "cpu", "device": "cpu", "threads": torch.get_num_threads(), "torch": "x", "triton": "y",
           "git_commit": "0" * 40, "date_utc": "today"}
    step = bench_step_weights(3, 800, loop_rows=1, reps=1)
    lp = {"N": 16, "H": 8, "V": 300, "dtype": "float32", "logits_bytes_fp32": 16 * 300 * 4, "fused": fused,
          "naive": naive, "speedup": 1.0, "memory_ratio": 1.0}
    text = markdown(env, [step], [lp])
    assert "| 3 | 800 |" in text and "| 16 | 8 | 300 | float32 |" in text
