#!/usr/bin/env bash
# Cloud TPU pod pretraining: the same CLI on every TPU VM worker, started with
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the pod's other hosts
# itself (jax.distributed.initialize() auto-detects Cloud TPU; d2v_jax.parallel
# calls it when TPU_WORKER_HOSTNAMES lists more than one host).
#
# EDIT: TPU_NAME, ZONE, PROJECT, REPO (the checkout on every worker, e.g. after
# `--command="git clone ... && pip install -e '.[tpu]'"`), CONFIG, WORKDIR (a
# gs:// bucket every host can write), the data path and the mesh flags.
#
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a launch/tpu_pod.sh --config.train.num_steps=1000
set -euo pipefail
TPU_NAME=${TPU_NAME:?set TPU_NAME}
ZONE=${ZONE:?set ZONE}
PROJECT=${PROJECT:-$(gcloud config get-value project)}
REPO=${REPO:-~/d2v_jax}
CONFIG=${CONFIG:-experiments/image.py:base_v2}
WORKDIR=${WORKDIR:-gs://my-bucket/runs/d2v_base_v2}
# TPU chips share fast ICI links: FSDP over the whole slice is the usual choice.
MESH_FLAGS=${MESH_FLAGS:---config.mesh.data=1 --config.mesh.fsdp=-1}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
  --command="cd $REPO && python -m d2v_jax.train --config $CONFIG --workdir $WORKDIR \
    $MESH_FLAGS --config.data.path=/mnt/data/imagenet/train $*"
