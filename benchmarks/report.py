"""Turn a run's result document into Markdown tables and PNG plots, and maintain ``LATEST.md``.

``python -m benchmarks.report [FOLDER]`` regenerates ``LATEST.md`` (and any missing per-run Markdown) from
the JSON files in ``FOLDER`` (default ``benchmarks/results``).  ``LATEST.md`` holds the newest full run of
each device kind (CPU, CUDA), then the codegen table if ``codegen.md`` exists in the folder; its image
links are relative to the repository root, so it can be pasted into README.md as is.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from .inputs import FAMILIES, LM_RANK, LM_TARGET_ENTROPY, LM_TEACHER_NOISE, STEP_TOKENS
from .methods import METHOD_INFO, METHODS

GIB = float(1 << 30)
MIB = float(1 << 20)
BUSY_LOAD_PER_CORE = 0.75         # above this 1-minute load average per core the run is flagged as shared
MEMORY_TARGET = 0.03               # the package's target: at most 3 % of the naive extra memory
LATEST_NAME = "LATEST.md"
CODEGEN_NAME = "codegen.md"
PLOT_DPI = 110
FAMILY_LABELS = {"worst_case": "worst case", "lm_like": "LM-like"}
STATUS_LABELS = {"oom": "OOM", "oom_predicted": "OOM (predicted)", "skipped": "skipped (time budget)",
                 "timeout": "timeout", "error": "error", "unavailable": "n/a"}
OURS = {"cpu": "sod_torch", "cuda": "sod_triton"}


# ------------------------------------------------------------------------------------------- formatting
def fmt_time(seconds: float | None) -> str:
    """Seconds with three significant digits, in ms below one second."""
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_bytes(count: float | None) -> str:
    """Bytes in MiB below 1 GiB, else GiB."""
    if count is None:
        return "-"
    if count < GIB:
        return f"{count / MIB:.1f} MiB"
    return f"{count / GIB:.2f} GiB"


def fmt_ratio(value: float | None) -> str:
    """A ratio with three significant digits (or '-')."""
    return "-" if value is None else f"{value:.3g}"


def status_cell(record: dict) -> str:
    """What a table shows for a case that did not produce figures."""
    label = STATUS_LABELS.get(record["status"], record["status"])
    if record["status"] == "unavailable":
        return f"n/a ({record.get('message', '')})"
    return label


def size_label(size: dict) -> str:
    """``N=.. V=.. Hs=.. Ht=..``."""
    return f"N={size['tokens']} V={size['vocab']} Hs={size['student_width']} Ht={size['teacher_width']}"


def size_of(record: dict) -> tuple[int, int, int, int]:
    """(N, V, Hs, Ht) of a record or size dict."""
    return record["tokens"], record["vocab"], record["student_width"], record["teacher_width"]


def index_results(doc: dict) -> dict:
    """``{(N, V, Hs, Ht, mode, family, method): record}``."""
    return {(*size_of(r), r["mode"], r["family"], r["method"]): r for r in doc["results"]}


# ------------------------------------------------------------------------------------------------ tables
def judged_summary(doc: dict) -> list[str]:
    """Ratios of ours to naive and Liger at the judged (CPU) and headline (GPU) sizes, if the run has them."""
    lines = []
    for tag, title in (("judged", "The judged configuration"), ("headline", "The headline size")):
        for size in [s for s in doc["sizes"] if tag in s.get("tags", [])]:
            lines += ratio_table(doc, size, title)
    return lines


def ratio_table(doc: dict, size_dict: dict, title: str) -> list[str]:
    """One summary table: ours against naive / naive compiled / Liger (compiled and not) at one size."""
    ours = OURS[doc["device_kind"]]
    size = size_of(size_dict)
    results = index_results(doc)
    lines = [f"### {title}: {size_label(size_dict)}, {doc['dtype']}, {doc['device_name']}"
             + (f", {doc.get('threads')} threads" if doc["device_kind"] == "cpu" else ""),
             "",
             f"Ours = `{ours}`.  Targets: extra memory at most {MEMORY_TARGET:.0%} of naive's, time no slower than "
             "Liger compiled.  Liger computes the *unweighted* loss (it has no step weights); ours and naive "
             "compute the step-weighted one.",
             "",
             "Time ratios compare medians; the last ratio compares the fastest repeats (least disturbed when the "
             "machine is shared).",
             "",
             "| inputs | mode | ours time | ours extra mem | mem ours/naive | mem ours/Liger c. | time ours/naive "
             "| time ours/naive c. | time ours/Liger c. | time ours/Liger | memory target | time target "
             "| min time ours/Liger c. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ("fwd_bwd", "fwd"):
        for family in FAMILIES:
            get = lambda m: results.get((*size, mode, family, m))  # noqa: E731
            mine = get(ours)
            if mine is None or mine["status"] != "ok":
                continue

            def ratio(method: str, field: str):
                other = get(method)
                if other is None or other["status"] != "ok" or not other.get(field):
                    return None
                return mine[field] / other[field]

            mem_naive = ratio("naive", "extra_memory_bytes")
            time_liger_c = ratio("liger_compiled", "median_s")
            mem_ok = "-" if mem_naive is None else ("met" if mem_naive <= MEMORY_TARGET else "missed")
            time_ok = "-" if time_liger_c is None else ("met" if time_liger_c <= 1.0 else "missed")
            lines.append(f"| {FAMILY_LABELS[family]} | {mode} | {fmt_time(mine['median_s'])} "
                         f"| {fmt_bytes(mine['extra_memory_bytes'])} | {fmt_ratio(mem_naive)} "
                         f"| {fmt_ratio(ratio('liger_compiled', 'extra_memory_bytes'))} "
                         f"| {fmt_ratio(ratio('naive', 'median_s'))} | {fmt_ratio(ratio('naive_compiled', 'median_s'))} "
                         f"| {fmt_ratio(time_liger_c)} | {fmt_ratio(ratio('liger', 'median_s'))} "
                         f"| {mem_ok} | {time_ok} | {fmt_ratio(ratio('liger_compiled', 'min_s'))} |")
    return lines + [""]


def size_tables(doc: dict) -> list[str]:
    """One table per (size, mode): methods as rows, the two input families side by side."""
    results = index_results(doc)
    methods = [m for m in METHODS if m in doc["settings"]["methods"]]
    families = [f for f in FAMILIES if f in doc["settings"]["families"]]
    lines = []
    for size in doc["sizes"]:
        key = size_of(size)
        for mode in size["modes"]:
            records = [results.get((*key, mode, f, m)) for m in methods for f in families]
            sample = next((r for r in records if r is not None), None)
            if sample is None:
                continue
            tags = ", ".join(size.get("tags", []))
            lines += [f"### {size_label(size)} ({tags}): {mode}", ""]
            floor = f"FLOP floor {sample['flop_floor'] / 1e9:.4g} GFLOP"
            if mode == "fwd_bwd":
                floor += f" ({sample['flop_recompute'] / 1e9:.4g} GFLOP with recomputation)"
            floor += f"; byte floor {fmt_bytes(sample['byte_floor'])}"
            if sample.get("time_floor_s"):
                floor += (f"; time floor at the measured matmul rate ({sample['matmul_tflops']:.3g} TFLOP/s) "
                          f"{fmt_time(sample['time_floor_s'])}")
            lines += [floor + ".", ""]
            header = "| method |"
            rule = "|---|"
            for family in families:
                label = FAMILY_LABELS[family]
                header += f" {label}: median [IQR] | {label}: extra memory | {label}: TFLOP/s (share) |"
                rule += "---|---|---|"
            lines += [header, rule]
            for method in methods:
                row = f"| {method} |"
                for family in families:
                    r = results.get((*key, mode, family, method))
                    if r is None:
                        row += " - | - | - |"
                    elif r["status"] != "ok":
                        row += f" {status_cell(r)} | {status_cell(r)} | - |"
                    else:
                        spread = f"[{fmt_time(r['q25_s'])}, {fmt_time(r['q75_s'])}]"
                        share = "" if r.get("share_of_matmul") is None else f" ({r['share_of_matmul']:.0%})"
                        rate = "-" if r.get("achieved_tflops") is None else f"{r['achieved_tflops']:.3g}{share}"
                        row += f" {fmt_time(r['median_s'])} {spread} n={r['reps']} | " \
                               f"{fmt_bytes(r['extra_memory_bytes'])} | {rate} |"
                lines.append(row)
            lines.append("")
    return lines


def input_table(doc: dict) -> list[str]:
    """Mean entropies and KLs of the drawn inputs (first rows of each problem)."""
    seen = {}
    for r in doc["results"]:
        if r.get("input_stats"):
            seen.setdefault((r["family"], *size_of(r)), r["input_stats"])
    if not seen:
        return []
    lines = ["| inputs | size | student entropy | teacher entropy | reverse KL | forward KL | log V |",
             "|---|---|---|---|---|---|---|"]
    for (family, n, v, hs, ht), s in sorted(seen.items()):
        lines.append(f"| {FAMILY_LABELS[family]} | N={n} V={v} Hs={hs} Ht={ht} | {s['student_entropy']:.2f} "
                     f"| {s['teacher_entropy']:.2f} | {s['reverse_kl']:.3f} | {s['forward_kl']:.3f} "
                     f"| {s['log_vocab']:.2f} |")
    return lines + [""]


def method_notes(doc: dict) -> list[str]:
    """How every figure was obtained."""
    cap = doc["settings"].get("mem_cap_bytes")
    cpu = doc["device_kind"] == "cpu"
    memory = ("peak resident set size of a fresh worker process (one per method and size) during one "
              "iteration, minus its resident size just before (inputs allocated, gradients dropped, freed "
              "memory returned with malloc_trim; the kernel's peak counter reset through "
              "/proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_ fixed so freed buffers leave the process)"
              if cpu else "torch.cuda.max_memory_allocated during one iteration minus memory_allocated before it")
    timer = ("time.perf_counter around each iteration after warm-up (the memory iteration is the first "
             "timed one); median, interquartile range [q25, q75] and n" if cpu else
             "triton.testing.do_bench (all runs, L2 cleared before each; CUDA events with 3 repeats for "
             "iterations above 0.5 s); median, [q25, q75] and n")
    oom = (f"each case runs under RLIMIT_AS = the worker's address space + {fmt_bytes(cap)}; an allocation "
           f"beyond it fails and the case is recorded as OOM. Naive methods whose predicted footprint "
           f"({doc['settings']['naive_footprint_copies']} float32 N x V buffers) exceeds the cap are recorded as "
           "'OOM (predicted)' without running" if cpu and cap else
           "a CUDA out-of-memory error is recorded as OOM at that size (nothing is extrapolated)")
    return [
        f"- **Time**: {timer}.",
        f"- **Extra memory**: {memory}.  It includes the student gradients a method returns.",
        f"- **Memory cap / OOM**: {oom}.",
        "- **Floors**: forward `2NV(Hs+Ht)` FLOPs; forward+backward `2NV(Hs+Ht) + 4NVHs` (the "
        "minimum; achieved TFLOP/s always use it, so recomputation is not credited); bytes: inputs read "
        "once per pass, gradients written once.  Share = achieved rate / the dense matmul rate measured in "
        "this run (largest of the calibrations listed above, same (Ht, V) shape on CPU).",
        "- **Loss**: naive and ours compute the step-weighted token-mean reverse KL (SOD, step divergence "
        f"'kl', steps of {STEP_TOKENS} tokens, every token distilled); Liger (`LigerFusedLinearJSDLoss`, beta=1, "
        "weight_hard_loss=0, weight_soft_loss=1) has no step weights and computes the unweighted token-mean "
        "reverse KL: the same N x V work without the O(N) weighting.  Liger forms the student gradients "
        "inside its forward, so its 'fwd' figure contains the gradient work.",
        "- **Modes**: `fwd` = the loss with gradients enabled (what a training step's forward keeps "
        "counts), `fwd_bwd` = loss and `.backward()`.",
        f"- **Inputs**, drawn fresh per run (seed {doc['seed']}), same for every method: worst case = hidden "
        "~ N(0,1), weights ~ N(0,1/H) (near-uniform softmax); LM-like = shared rank-"
        f"{LM_RANK} factors, logit scale calibrated to a student entropy of {LM_TARGET_ENTROPY} nats, teacher "
        f"latent = student latent + {LM_TEACHER_NOISE} N(0,1) (see benchmarks/inputs.py).",
    ]


def header(doc: dict) -> list[str]:
    """Title and run identity."""
    code, ver = doc["code"], doc["versions"]
    dirty = "" if not code.get("dirty") else " (with uncommitted changes)"
    load = doc["load_average"]
    lines = [f"## Benchmarks: {doc['device_name']} ({doc['device_kind']}), {doc['dtype']}, preset `{doc['preset']}`",
             "",
             f"Run {doc['date']}, commit `{code['commit']}`{dirty}, source digest `{code['source_digest']}`; "
             f"torch {ver['torch']}, triton {ver['triton']}, liger-kernel {ver['liger-kernel']}, "
             f"Python {ver['python']}; {doc.get('threads')} threads; wall time {doc['wall_s']:.0f} s; "
             f"system load (1 min) {load['before'][0]:.2f} before, {load['after'][0]:.2f} after.",
             ""]
    if doc.get("note"):
        lines += [f"Note: {doc['note']}", ""]
    cores = doc.get("cpu_count")
    if cores and max(load["before"][0], load["after"][0]) > cores * BUSY_LOAD_PER_CORE:
        lines += [f"Caution: the machine was busy during this run (system load above "
                  f"{BUSY_LOAD_PER_CORE:g} per core on {cores} cores); CPU times are noisy, compare ratios within "
                  "the run and mind the IQR.", ""]
    rates = []
    for i, cal in enumerate(doc["calibration"]):
        when = "start" if i == 0 else "end"
        for rate in cal.get("matmul", []):
            m, k, n = rate["shape"]
            rates.append(f"{rate['dtype']} [{m}x{k}]@[{k}x{n}] at the {when}: {rate['tflops'] * 1e3:.4g} GFLOP/s")
    if rates:
        lines += ["Dense matrix-product rate measured in this run: " + "; ".join(rates) + ".", ""]
    return lines


def plot_sweeps(doc: dict, out_dir: Path, stem: str) -> tuple[list[str], str | None]:
    """Time and memory against N (one line per method, log-log), one panel per input family.

    Returns the written file names and a note if plots were skipped (matplotlib missing, no sweep).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed"
    groups = defaultdict(set)
    for r in doc["results"]:
        if r["mode"] == "fwd_bwd":
            groups[(r["vocab"], r["student_width"], r["teacher_width"])].add(r["tokens"])
    sweeps = {k: v for k, v in groups.items() if len(v) >= 2}
    if not sweeps:
        return [], "plots skipped: the run has no sweep over N (at least two N with the same V, Hs, Ht)"
    vocab, hs, ht = max(sweeps, key=lambda k: (len(sweeps[k]), k))
    families = [f for f in FAMILIES if f in doc["settings"]["families"]]
    files = []
    for metric, field, scale, unit in (("time", "median_s", 1.0, "median time per iteration (s)"),
                                       ("memory", "extra_memory_bytes", GIB, "peak extra memory (GiB)")):
        fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.2), squeeze=False)
        for ax, family in zip(axes[0], families):
            for method in METHODS:
                pts = sorted((r["tokens"], r[field] / scale) for r in doc["results"]
                             if r["method"] == method and r["family"] == family and r["mode"] == "fwd_bwd"
                             and (r["vocab"], r["student_width"], r["teacher_width"]) == (vocab, hs, ht)
                             and r["status"] == "ok" and r.get(field))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(unit)
            ax.set_title(f"{FAMILY_LABELS[family]}, fwd+bwd, V={vocab} Hs={hs} Ht={ht}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{doc['device_name']} ({doc['dtype']})", fontsize=10)
        fig.tight_layout()
        name = f"{stem}-{metric}.png"
        fig.savefig(out_dir / name, dpi=PLOT_DPI)
        plt.close(fig)
        files.append(name)
    return files, None


def render_markdown(doc: dict, image_prefix: str = "") -> str:
    """The Markdown report of one run (image links prefixed by ``image_prefix``)."""
    lines = header(doc) + judged_summary(doc)
    lines += ["### How the figures were obtained", ""] + method_notes(doc) + [""]
    lines += size_tables(doc)
    plots = doc.get("plots", {})
    if plots.get("files"):
        lines += ["### Plots", ""] + [f"![{name}]({image_prefix}{name})" for name in plots["files"]] + [""]
    if plots.get("note"):
        lines += [f"({plots['note']}.)", ""]
    lines += ["### Inputs (first 64 rows of each problem)", ""] + input_table(doc)
    policy = doc.get("policy")
    if policy:
        lines += ["### Policy-gradient helpers", ""]
        if policy.get("added"):
            lines += [f"(Policy section {policy['added']}.)", ""]
        lines += policy_lines(policy) + [""]
    return "\n".join(lines).rstrip() + "\n"


def policy_lines(policy: dict) -> list[str]:
    """The policy-helper section: a table the policy module rendered, or the reason it is absent."""
    if policy.get("markdown"):  # demote its headings below this report's
        text = [("###" + line) if line.startswith("#") else line for line in policy["markdown"].rstrip().splitlines()]
        return text
    return [policy.get("note", "not measured")]


def write_run(doc: dict, out_dir: Path, stem: str, plots: bool = True) -> dict[str, Path]:
    """Write ``stem.json``, ``stem.md`` and the plots into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        files, note = plot_sweeps(doc, out_dir, stem)
    else:
        files, note = [], "plots skipped (--no-plots)"
    doc["plots"] = {"files": files, "note": note}
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n")
    paths["md"].write_text(render_markdown(doc))
    for name in files:
        paths[name] = out_dir / name
    return paths


def load_runs(folder: Path) -> list[tuple[Path, dict]]:
    """Every run document (``*.json`` with a ``results`` list) in ``folder``, oldest first."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("results"), list) and "device_kind" in doc:
            runs.append((path, doc))
    return sorted(runs, key=lambda item: item[1]["date"])


def image_prefix_for(folder: Path, repo_root: Path) -> str:
    """Link prefix that makes ``folder``'s images resolve from the repository root (README.md)."""
    try:
        return folder.resolve().relative_to(repo_root.resolve()).as_posix() + "/"
    except ValueError:
        return ""


def write_latest(folder: Path, repo_root: Path) -> Path | None:
    """``LATEST.md``: the newest full run per device kind (a quick run only if no full one), plus codegen."""
    runs = load_runs(folder)
    if not runs:
        return None
    chosen = {}
    for kind in ("cuda", "cpu"):
        of_kind = [item for item in runs if item[1]["device_kind"] == kind]
        full = [item for item in of_kind if item[1].get("preset") != "quick"]
        if of_kind:
            chosen[kind] = (full or of_kind)[-1]
    prefix = image_prefix_for(folder, repo_root)
    parts = ["# Benchmark results (latest)", "",
             "Generated by `python -m benchmarks` from the JSON files in this folder; each section names its "
             "device, commit and settings.", ""]
    for kind in ("cuda", "cpu"):
        if kind in chosen:
            path, doc = chosen[kind]
            # Image links relative to LATEST.md itself (the plots sit next to it); the source path is text.
            parts += [render_markdown(doc), f"Source: `{prefix}{path.name}`.", ""]
    codegen = folder / CODEGEN_NAME
    if codegen.exists():
        parts += ["## Code generation for sm_90 (`python -m benchmarks.codegen`)", "",
                  codegen.read_text().rstrip(), ""]
    latest = folder / LATEST_NAME
    latest.write_text("\n".join(parts).rstrip() + "\n")
    return latest


def add_policy(run_json: Path, quick: bool) -> Path:
    """Measure the policy helpers now and store them in an existing run (for runs whose budget ran out).

    The section records when and how it was added; the run's Markdown is rewritten from the JSON.
    """
    import datetime as dt

    from .policy_bridge import policy_section

    doc = json.loads(run_json.read_text())
    section = policy_section(doc["device"], quick, doc.get("threads"))
    section["added"] = (f"measured {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} by "
                        "`python -m benchmarks.report --add-policy`, after the sweep")
    doc["policy"] = section
    run_json.write_text(json.dumps(doc, indent=1) + "\n")
    run_json.with_suffix(".md").write_text(render_markdown(doc))
    return run_json


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report [FOLDER] [--add-policy RUN.json [--quick]]``: rebuild LATEST.md.

    With ``--add-policy``, first measure the policy helpers and store them in the run file ``RUN.json``.
    """
    import argparse

    from .runner import REPO_ROOT, RESULTS_DIR

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=RESULTS_DIR)
    parser.add_argument("--add-policy", type=Path, help="run file to which the policy section is added")
    parser.add_argument("--quick", action="store_true", help="with --add-policy: one small size per benchmark")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.add_policy:
        print(f"policy section added to {add_policy(args.add_policy, args.quick)}")
    latest = write_latest(args.folder, REPO_ROOT)
    print(latest if latest else f"no run files in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
