#!/usr/bin/env bash
# One command for a (bare) GPU machine, under 5 minutes by default: benchmarks.gpu_headline first (the headline
# comparison with Liger compiled and naive compiled measured in the same run, the launch counts, the switches:
# d(weight) fold depth, chunk plan, JSD, hard term, low memory), then the CUDA tests, then sweeps if time is
# left; every result is written as soon as it exists, everything into one folder.
#
#   SOD_GIT_COMMIT=<sha> bash benchmarks/gpu_suite.sh          # CUDA; results in $OUT (or runs/gpu-suite)
#   bash benchmarks/gpu_suite.sh --device cpu                   # the same pipeline on CPU (quick sizes)
#   bash benchmarks/gpu_suite.sh --out DIR --budget 480 --tests-first --skip-tests -- --methods sod_triton,naive
#   bash benchmarks/gpu_suite.sh --all-tests                    # the whole test suite instead of the CUDA test files
#
# Options: --device cuda|cpu (default cuda), --out DIR (default $OUT, else runs/gpu-suite),
# --budget SECONDS for the whole suite (default 290), --bench-share SECONDS for the benchmarks before the tests
# (default 140), --test-timeout SECONDS (default: what the budget leaves, at most 150), --skip-tests,
# --tests-first (the tests before the benchmarks), --all-tests; arguments after -- go to `python -m benchmarks`.
# The tests: by default the files whose tests run on the GPU (kernels, the vocabulary-parallel and FSDP2 tests on
# NCCL, the trainer on a GPU); the others are CPU logic that CI covers.
#
# The machine starts bare (torch, triton, transformers, pytest, hypothesis; nothing can be downloaded):
# - liger-kernel is installed from a wheel in .whl/ if one was carried there (run tool: carry [".whl"]),
#   into a private folder on PYTHONPATH; otherwise Liger is recorded as "not installed";
# - without matplotlib the plots are skipped with a note; JSON and Markdown are always written;
# - without .git, set SOD_GIT_COMMIT=<sha> so that the results name the commit (a digest of the
#   sources is recorded either way).
# Afterwards: copy DIR/*.json, *.md, *.png into benchmarks/results/gpu/ and run
# `python -m benchmarks.report` to refresh benchmarks/results/LATEST.md.
set -uo pipefail

DEVICE=cuda
OUT_DIR="${OUT:-}"
BUDGET=290
BENCH_SHARE=140
TEST_TIMEOUT=
TESTS_FIRST=0
RESERVE=75          # seconds kept for a worker overrunning its share (45 s grace), reports and policy
RUN_TESTS=1
TEST_TARGETS=(tests/sod_kernels/dense/test_triton_divergence.py tests/sod_kernels/logprobs/test_token_logprobs.py
              tests/sod_kernels/logprobs/test_policy_loss.py tests/sod_kernels/sparse/test_sparse_teacher.py
              tests/sod_kernels/logprobs/test_topk_logprobs.py tests/sod_kernels/test_execution_contract.py
              tests/sod_kernels/core/test_validation.py tests/sod_kernels/steps/test_steps.py
              tests/sod_kernels/parallel/test_vocab_parallel.py tests/sod_kernels/parallel/test_vocab_parallel_sparse.py
              tests/sod_kernels/test_fsdp.py tests/sod_kernels/test_loss_features.py tests/trainer/test_trainer_placement.py)
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --test-timeout) TEST_TIMEOUT="$2"; shift 2 ;;
    --bench-share) BENCH_SHARE="$2"; shift 2 ;;
    --tests-first) TESTS_FIRST=1; shift ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    --all-tests) TEST_TARGETS=(tests); shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT_DIR:-$ROOT/runs/gpu-suite}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/suite.log"
START=$(date +%s)
log() { echo "[gpu_suite +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

if [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log "python: $PY; device: $DEVICE; output: $OUT_DIR; budget: ${BUDGET}s"

# liger-kernel: present, or from a carried wheel, or recorded as not installed.
if ! "$PY" -c "import liger_kernel" 2>/dev/null; then
  WHEEL="$(ls "$ROOT"/.whl/liger_kernel-*.whl 2>/dev/null | head -n 1)"
  if [[ -n "$WHEEL" ]]; then
    SITE="$OUT_DIR/.site"
    if "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEEL" >>"$LOG" 2>&1; then
      export PYTHONPATH="$PYTHONPATH:$SITE"
      log "liger-kernel installed from $WHEEL"
    else
      log "liger-kernel wheel $WHEEL did not install: Liger recorded as not installed"
    fi
  else
    log "no liger-kernel and no wheel in .whl/: Liger recorded as not installed"
  fi
fi
"$PY" -c "import matplotlib" 2>/dev/null || log "matplotlib missing: plots will be skipped (JSON and Markdown still written)"

{
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" - <<'PYEOF'
import importlib.metadata as md
for dist in ("torch", "triton", "liger-kernel", "matplotlib", "transformers", "pytest", "hypothesis", "numpy"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
PYEOF
} >"$OUT_DIR/environment.txt" 2>&1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

run_tests() {
  [[ "$RUN_TESTS" == 1 ]] || return 0
  local limit="${TEST_TIMEOUT:-$(( $(left) - 10 ))}"
  if [[ -z "$TEST_TIMEOUT" ]] && (( limit > 150 )); then limit=150; fi
  if (( limit < 30 )); then log "tests: skipped (only ${limit}s left)"; return 0; fi
  WORKERS=()
  "$PY" -c "import xdist" 2>/dev/null && WORKERS=(-n "${PYTEST_WORKERS:-12}")
  log "tests: python -m pytest -q ${WORKERS[*]:-} ${TEST_TARGETS[*]} (timeout ${limit}s)"
  timeout -k 10 "$limit" "$PY" -m pytest -q -rs "${WORKERS[@]}" -p no:cacheprovider "${TEST_TARGETS[@]}" \
    --junitxml="$OUT_DIR/pytest.xml" >"$OUT_DIR/pytest.log" 2>&1
  local rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then
    log "tests: stopped after ${limit}s (see pytest.log, pytest.xml)"
  else
    log "tests: exit $rc; $(tail -n 1 "$OUT_DIR/pytest.log")"
  fi
}

run_benchmarks() {  # $1: seconds for this part
  local budget="$1"
  if (( budget < 30 )); then log "benchmarks: skipped (only ${budget}s left)"; return 0; fi
  if [[ "$DEVICE" != cpu ]]; then
    log "benchmarks: python -m benchmarks.gpu_headline --deadline $budget"
    timeout -k 20 $(( budget + 15 )) "$PY" -m benchmarks.gpu_headline --out "$OUT_DIR" --deadline "$budget" \
      --skip-sweeps 2>&1 | tee -a "$LOG"
  else
    local args=(--device cpu --out "$OUT_DIR" --time-budget "$budget" --quick)
    log "benchmarks: python -m benchmarks ${args[*]} ${EXTRA[*]:-}"
    timeout -k 20 $(( budget + 15 )) "$PY" -m benchmarks "${args[@]}" "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
  fi
  RC=${PIPESTATUS[0]}
}

RC=0
if [[ "$TESTS_FIRST" == 1 ]]; then
  run_tests
  run_benchmarks $(( $(left) - 10 ))
else
  SHARE=$BENCH_SHARE
  (( SHARE > $(left) - 10 )) && SHARE=$(( $(left) - 10 ))
  run_benchmarks "$SHARE"
  run_tests
fi
REST=$(( $(left) - 10 ))
if [[ "$DEVICE" != cpu ]] && (( REST >= 60 )); then
  log "sweeps: python -m benchmarks.gpu_headline --only sweeps --deadline $REST"
  timeout -k 20 $(( REST + 15 )) "$PY" -m benchmarks.gpu_headline --out "$OUT_DIR/sweeps" --only sweeps \
    --deadline "$REST" 2>&1 | tee -a "$LOG"
fi
log "exit $RC; total $(( $(date +%s) - START ))s"
ls -la "$OUT_DIR" >>"$LOG"
exit "$RC"
