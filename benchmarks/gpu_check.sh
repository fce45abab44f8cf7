#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it runs).
#
#   bash benchmarks/gpu_check.sh [--smoke | --dry_run] [--budget_s 420] [--only a,b]
#
# On the device machine (the `run` tool; it copies the working tree, and
# `carry: [".whl"]` brings the wheels), from the repository root:
#
#   bash benchmarks/gpu_check.sh            (timeout_s 480: 420 s of runs + set-up)
#
# Wheels: grain and ml_collections (and grain's array_record, portpicker,
# importlib_resources) are not installed there. They live in .whl/ (git-ignored),
# made here with, for each NAME==VERSION:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 portpicker importlib_resources
# and installed below only when `import grain, ml_collections` fails.
#
# Output: one JSON line per run and per target, then one PASS/FAIL/MISSING line
# per target; also appended to $OUT/gpu_check.jsonl when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c "import grain, ml_collections" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/d2v_site .whl/*.whl || { echo "gpu_check: wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/d2v_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: grain / ml_collections missing and no .whl/ wheels (see the header)"; exit 1
  fi
fi
# The repository itself, without installing it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Compilations persist across reruns of the check (a second try skips them).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/d2v_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/d2v_inductor_cache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export PYTHONUNBUFFERED=1

if [ -z "${OUT:-}" ] || [ ! -d "${OUT:-}" ]; then unset OUT; fi
"$PY" -c "import jax; print('gpu_check: jax', jax.__version__, jax.devices())" 2>&1 | tail -1
exec "$PY" benchmarks/gpu_check.py "$@"
