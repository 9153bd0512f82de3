#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice (v4-32, v5e-64, ...): the same command starts
# on all workers, detached (a dropped ssh connection does not stop it), each writing its own
# log; JAX joins them into one job and shards the batch over all chips.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   PROJECT=my-project launch/tpu_pod.sh my-v4-32 us-central2-b configs/sd21_768.py \
#       /mnt/shared/runs/sd21_768 --config.data.path='gs://my-bucket/laion/{00000..01210}.tar'
#
# Environment:
#   PROJECT    gcloud project (default: gcloud's configured one)
#   REPO_DIR   the lcm-jax checkout on every worker, relative to its home (default: lcm-jax)
#   SETUP=1    first clone REPO_URL into REPO_DIR on every worker (or pull it) and install it
#              into REPO_DIR/.venv with the extras EXTRAS (default: tpu,gcs; add tfds for TFDS)
#   REPO_URL   the repository to clone when SETUP=1
#   HOSTS      the workers' internal IPs, comma-separated (default: asked from gcloud)
#   LOG_DIR    where each worker writes <hostname>.log (default: WORKDIR/logs)
#
# WORKDIR must be one folder that every worker sees (a Filestore/NFS mount, or a bucket
# mounted with gcsfuse at the same path on all workers): checkpoints are written by all
# hosts together, the rest by worker 0. CONFIG is relative to REPO_DIR. Every command is
# printed before it runs; --dry-run prints them without running anything. Follow a run with
# `tail -f LOG_DIR/*.log` on the shared folder; resume after a preemption with the same command.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
(( $# >= 4 )) || die "usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]"
TPU=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4
REPO_DIR=${REPO_DIR:-lcm-jax}
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then WHERE+=(--project="$PROJECT"); fi
REPO=$(quoted "$REPO_DIR")

on_all_workers() {
  run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$1"
}

if [[ ${SETUP:-0} == 1 ]]; then
  [[ -n ${REPO_URL:-} ]] || die "SETUP=1 needs REPO_URL, the repository to clone on every worker"
  on_all_workers "set -e; if [ -d $REPO/.git ]; then git -C $REPO pull --ff-only; \
else git clone $(quoted "$REPO_URL") $REPO; fi; cd $REPO; python3 -m venv .venv; \
.venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -e $(quoted ".[${EXTRAS:-tpu,gcs}]")"
fi

# The workers' addresses: lcm_jax.sharding.initialize_distributed sees several hosts in
# TPU_WORKER_HOSTNAMES and calls jax.distributed.initialize(), which finds the coordinator
# through the TPU metadata server.
if [[ -z ${HOSTS:-} ]]; then
  HOSTS=$(run "${GCLOUD[@]}" describe "$TPU" "${WHERE[@]}" --format='value(networkEndpoints[].ipAddress)' | tr ';' ',')
  if [[ $DRY_RUN == 1 ]]; then HOSTS=WORKER_IPS; fi  # what the command above would print
fi
[[ -n $HOSTS ]] || die "gcloud found no worker addresses for TPU $TPU in $ZONE"

TRAIN="cd $REPO && export TPU_WORKER_HOSTNAMES=$(quoted "$HOSTS") && exec $(train_command .venv/bin/python "$CONFIG" "$WORKDIR" "$@")"
LOG="$(quoted "$LOG_DIR")/\$(hostname).log"
on_all_workers "mkdir -p $(quoted "$LOG_DIR") && setsid nohup bash -c $(quoted "$TRAIN") > $LOG 2>&1 < /dev/null & \
echo \"started on \$(hostname), log: $LOG\""
