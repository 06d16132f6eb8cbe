"""benchmarks.cpu_headline end to end at its quick size (eager epilogues, one round, no Liger: seconds)."""

import json

from benchmarks import cpu_headline


def test_quick_run_writes_its_tables(tmp_path, capsys):
    methods = "sod_fast,sod_low,sod_jsd_fast,naive,logprobs_fused,logprobs_naive,policy_fused,policy_naive"
    assert cpu_headline.main(["--quick", "--methods", methods, "--reps", "1", "--out", str(tmp_path)]) == 0
    (md,), (js,) = sorted(tmp_path.glob("*.md")), sorted(tmp_path.glob("*.json"))
    doc = json.loads(js.read_text())
    assert doc["size"] == cpu_headline.QUICK and set(doc["methods"]) == set(methods.split(","))
    for rec in doc["methods"].values():
        assert rec["median_s"] > 0 and rec["first_call_s"] > 0 and rec["extra_memory_bytes"] >= 0
    # every weighted method computes the same loss
    losses = [doc["methods"][m]["loss"] for m in ("sod_fast", "sod_low", "naive")]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    assert 0 < doc["methods"]["sod_jsd_fast"]["loss"] < float("inf")
    text = md.read_text()
    assert "JSD (beta=0.5)" in text
    assert "ours, memory=\"fast\" (default)" in text and "fused_token_logprobs" in text and "PPO" in text
    assert "python -m benchmarks.cpu_headline --quick" in text
