#!/usr/bin/env bash
# Everything this project checks on a GPU machine, in one run of a few minutes (see README, "On a
# GPU"). The machine's Python must already hold torch (CUDA), and ideally timm, torchvision,
# transformers, Lightning; packages it lacks may sit as wheels in .whl/ and are installed to
# /tmp/site first: deepdiff with orderly-set and cachebox (deepdiff 9 imports cachebox only when it
# compares, so a missing one passed the version print below and failed every diff), isal, and for
# the diffusers tests diffusers with importlib_metadata. From the repository root:
#
#     bash benchmarks/gpu_session.sh OUTDIR            # FIXTURES=0: skip step 1, test the committed ones
#                                                      # GPU_CHECK=0 / SWEEP=0: skip step 2 / 3
#
# 1. writes the GPU-saved fixtures (tests/data/make_gpu.py) to OUTDIR/gpu_fixtures.tgz
# 2. runs benchmarks/gpu_check.py (the README table)
# 3. runs benchmarks/sweep.py (every surgery on many real architectures, files written from CUDA)
# 4. runs the whole test suite there, the GPU-saved tests against the files just written
# Each step has its own time limit; a failing step does not stop the others; the exit status
# is non-zero when any step failed.
set -u
OUT=${1:?usage: gpu_session.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step setup
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || status=1
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 - <<'EOF'
import importlib
for m in ("torch", "transformers", "timm", "torchvision", "lightning", "safetensors", "deepdiff", "isal", "xxhash", "diffusers", "peft"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", None) or getattr(mod, "VERSION", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__)
try:  # what diff runs: a comparison, not only the import
    from deepdiff import DeepDiff
    DeepDiff({"a": 1}, {"a": 2})
except Exception as e:
    print("deepdiff CANNOT COMPARE:", type(e).__name__, e)
EOF

fixtures=tests/data/gpu
if [ "${FIXTURES:-1}" != 0 ]; then
    step "GPU-saved fixtures"
    rm -rf "$OUT/fixtures"
    fixtures="$OUT/fixtures/gpu"
    timeout 150 python3 tests/data/make_gpu.py "$fixtures" >"$OUT/make_gpu.log" 2>&1 || status=1
    grep -E "^make_gpu:" "$OUT/make_gpu.log"
    tar czf "$OUT/gpu_fixtures.tgz" -C "$OUT/fixtures" gpu && du -sh "$OUT/gpu_fixtures.tgz"
fi

if [ "${GPU_CHECK:-1}" != 0 ]; then
    step "gpu_check"
    timeout 180 python3 benchmarks/gpu_check.py >"$OUT/gpu_check.log" 2>&1 || status=1
    sed -n '/^GPU check on/,$p' "$OUT/gpu_check.log"
fi

if [ "${SWEEP:-1}" != 0 ]; then
    step "sweep of real architectures (benchmarks/sweep.py)"
    timeout 300 python3 benchmarks/sweep.py --device cuda --jobs 8 --json "$OUT/sweep.json" >"$OUT/sweep.log" \
        2>"$OUT/sweep.err" || status=1
    cat "$OUT/sweep.log"
fi

step "test suite (CUDA visible; GPU-saved tests on $fixtures)"
n=$(( $(nproc) > 8 ? 8 : $(nproc) ))
CKPT_SURGEON_GPU_FIXTURES="$fixtures" timeout 200 python3 -m pytest -q -p no:cacheprovider -n "$n" -rfEs tests \
    >"$OUT/pytest.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest.log" | tail -40
rm -rf "$OUT/fixtures"
step "done: status $status"
exit $status
