"""The README's runnable example runs and prints what it claims."""

import runpy


def test_quickstart_runs(capsys):
    runpy.run_path("examples/quickstart.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "loss" in out and "steps per row        [3, 1]" in out and "step weights w_k" in out
