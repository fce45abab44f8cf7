#!/usr/bin/env bash
# Runs d2v_jax pretraining on this machine: one process, or NPROC processes
# joined by jax.distributed on localhost (a rehearsal of a multi-host run).
#
# EDIT / SET: CONFIG, WORKDIR, and optionally
#   NPROC=2          processes (default 1); each feeds its shard of the global batch
#   PORT=12355       coordinator port on localhost
#   GPUS_PER_PROC=1  give process i its own GPUs via CUDA_VISIBLE_DEVICES (GPU machine)
#   CPU_DEVICES=4    fake this many CPU devices per process (CPU only, for testing)
# Extra arguments are passed to the CLI, e.g. --config.mesh.fsdp=-1 --config.mesh.data=1
#
#   CONFIG=experiments/image.py:tiny_v2 WORKDIR=runs/x launch/local.sh --config.train.num_steps=100
#   NPROC=2 CPU_DEVICES=1 WORKDIR=/tmp/two launch/local.sh --config.train.num_steps=5
set -euo pipefail
CONFIG=${CONFIG:-experiments/image.py:tiny_v2}
WORKDIR=${WORKDIR:?set WORKDIR=path/to/run}
NPROC=${NPROC:-1}
PORT=${PORT:-12355}
GPUS_PER_PROC=${GPUS_PER_PROC:-0}
cd "$(dirname "$0")/.."

if [[ -n "${CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi
if [[ "$NPROC" == 1 ]]; then
  exec python -m d2v_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
fi

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < NPROC; i++)); do
  env_gpu=()
  if [[ "$GPUS_PER_PROC" -gt 0 ]]; then
    env_gpu=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * GPUS_PER_PROC)) $(((i + 1) * GPUS_PER_PROC - 1)))")
  fi
  # d2v_jax.parallel.maybe_initialize_distributed reads these three variables.
  env "${env_gpu[@]}" JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$NPROC" \
    JAX_PROCESS_ID="$i" python -m d2v_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@" \
    > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
