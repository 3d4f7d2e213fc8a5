#!/usr/bin/env bash
# The prepared device call (issue: every CUDA path checked and timed in one call): the whole
# suite, the dense Triton kernel's tuning split, and a profile of the slow rows.
#
#   bash benchmarks/gpu_call.sh "$OUT"          # on the GPU machine, from the repository root
#
# sparsify and what its package imports are not on the GPU image and it reaches no network:
# download the wheels here first (they travel in the ignored folder .whl, named in `carry`):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform any -d .whl eai-sparsify==1.3.3 datasets==5.2.0 \
#     dill==0.4.1 docstring_parser==0.18.0 multiprocess==0.70.19 natsort==8.4.0 schedulefree==1.4.1 \
#     simple-parsing==0.1.9
# Budgets: SUITE_S (default 200) and TUNE_S (default 35) seconds; no row or configuration starts
# after its budget. Then benchmarks/gpu_profile.py (≈ 40 s): the kernels of the step, the sparse
# op and the dense op. About 5 minutes in all on an H200; seven files come back (the device returns at most eight).
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_call.sh OUT_DIR}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 benchmarks/gpu_suite.py --budget-s "${SUITE_S:-200}" --max-row-s 20 --out-dir "$out"; } 2>&1 | tee "$out/suite.log"
python3 benchmarks/gpu_triton_tune.py --budget-s "${TUNE_S:-35}" --out "$out/triton-tune-nvidia-h200.json" 2>&1 | tee "$out/tune.log"
python3 benchmarks/gpu_profile.py --out "$out/profile.txt" > "$out/profile.log" 2>&1
grep "^==" "$out/profile.txt"
