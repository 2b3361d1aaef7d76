#!/usr/bin/env bash
# The GPU check (at most 5 minutes): dense vs factorised CTAL diffusion, the whole NYUv2 CTAL-SS training step and
# the --sync_batchnorm check (conversion; two NCCL processes where there are two GPUs), the training step at
# batch 8, float32 and bf16, time and peak memory; writes benchmarks/results/gpu_check.md (and $OUT/gpu_check.md
# when $OUT is set, as on a lent device machine).
#
#   benchmarks/gpu_check.sh            # on a machine with a GPU, from a repository checkout
#   benchmarks/gpu_check.sh --tiny     # seconds on a CPU (the CI smoke test)
#
# Python: $PYTHON if set, else the repository's .venv, else python3 on PATH; it needs torch (the diffusion part
# uses only torch). Where transformers / timm are missing it tries `pip install -e .` into a .venv-gpu that sees
# the system's packages (works only with an index reachable); if that fails, the whole-step rows say "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c "import torch" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

PY=$(pick_python) || { echo "gpu_check.sh: no python with torch found (set PYTHON=...)" >&2; exit 2; }
if ! "$PY" -c "import transformers, timm" >/dev/null 2>&1; then
    if [ ! -x .venv-gpu/bin/python ]; then
        "$PY" -m venv --system-site-packages .venv-gpu >/dev/null 2>&1 || true
    fi
    if [ -x .venv-gpu/bin/python ] && timeout 120 .venv-gpu/bin/python -m pip install -q --no-deps -e . \
        >/dev/null 2>&1 && .venv-gpu/bin/python -c "import transformers, timm" >/dev/null 2>&1; then
        PY=.venv-gpu/bin/python
    fi
fi
echo "gpu_check.sh: using $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'))" >&2
exec timeout 300 "$PY" benchmarks/gpu_check.py "$@"
