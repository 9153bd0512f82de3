#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice (v4-32, v5e-64, ...): the same command runs on
# all workers; JAX joins them into one job and shards the batch over all chips.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   PROJECT=my-project launch/tpu_pod.sh my-v4-32 us-central2-b configs/sd21_768.py \
#       /mnt/shared/runs/sd21_768 --config.data.path='gs://my-bucket/laion/{00000..01210}.tar'
#
# Environment:
#   PROJECT   gcloud project (default: gcloud's configured one)
#   REPO_DIR  the lcm-jax checkout on every worker (default: ~/lcm-jax)
#   SETUP=1   first clone REPO_URL into REPO_DIR on every worker and `pip install -e '.[tpu]'`
#   REPO_URL  the repository to clone when SETUP=1
#
# WORKDIR must be one folder that every worker sees (a Filestore/NFS mount, or a bucket
# mounted with gcsfuse at the same path on all workers): checkpoints are written by all
# hosts together, the rest by worker 0. CONFIG is relative to REPO_DIR.
set -euo pipefail
usage="usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]"
TPU=${1:?$usage}
ZONE=${2:?$usage}
CONFIG=${3:?$usage}
WORKDIR=${4:?$usage}
shift 4
REPO_DIR=${REPO_DIR:-'~/lcm-jax'}
GCLOUD=(gcloud compute tpus tpu-vm)
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

on_all_workers() {
  "${GCLOUD[@]}" ssh "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}

if [[ "${SETUP:-0}" == "1" ]]; then
  on_all_workers "git clone ${REPO_URL:?set REPO_URL to clone} $REPO_DIR || (cd $REPO_DIR && git pull);
    cd $REPO_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
fi

# The workers' addresses: lcm_jax.sharding.initialize_distributed sees several hosts in
# TPU_WORKER_HOSTNAMES and calls jax.distributed.initialize(), which finds the coordinator
# through the TPU metadata server.
HOSTS=$("${GCLOUD[@]}" describe "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
        --format='value(networkEndpoints[].ipAddress)' | tr ';' ',')
ARGS=$(printf ' %q' "$@")
on_all_workers "cd $REPO_DIR && . .venv/bin/activate && export TPU_WORKER_HOSTNAMES=$HOSTS &&
  python -m lcm_jax.train --config=$CONFIG --workdir=$WORKDIR$ARGS"
