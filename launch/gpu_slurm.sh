#!/usr/bin/env bash
# Train on NODES x GPUS_PER_NODE NVIDIA GPUs with SLURM: submits one batch job (sbatch) whose
# srun step starts the trainer once per GPU (PER=gpu, the default) or once per node (PER=node,
# each process driving all GPUs of its node); JAX joins the processes into one job.
#
#   launch/gpu_slurm.sh [--dry-run] NODES GPUS_PER_NODE CONFIG WORKDIR [--config.key=value ...]
#   PARTITION=gpu TIME=48:00:00 launch/gpu_slurm.sh 4 8 configs/sd21_base_512.py \
#       /shared/runs/sd21_base_512 --config.data.path='/shared/laion/{00000..01210}.tar'
#
# The coordinator comes from SLURM: with PER=gpu JAX's own SLURM detection takes the first
# node of the step and a port derived from the job id, and gives each process the GPU of its
# SLURM_LOCALID; with PER=node this script exports JAX_COORDINATOR_ADDRESS (the job's first
# node, the same port rule), JAX_NUM_PROCESSES, JAX_LOCAL_DEVICE_IDS (all GPUs of the node:
# JAX would otherwise take only GPU SLURM_LOCALID) and, in each task, JAX_PROCESS_ID.
#
# Environment:
#   PER        gpu (one process per GPU) or node (one process per node)
#   PARTITION, ACCOUNT, TIME   passed to sbatch as --partition, --account, --time when set
#   JOB_NAME   the job's name (default: lcm-jax)
#   LOG_DIR    where the job and every task write their logs (default: WORKDIR/logs)
#   PYTHON     the Python that has lcm-jax[cuda] installed, as the nodes see it (default: python)
#
# WORKDIR and the data must be on a file system every node sees (NFS, Lustre, a bucket
# mount); config.batch_size is the global batch, a multiple of NODES x GPUS_PER_NODE. Submit
# the same command again to resume (SIGTERM from scancel or preemption saves a checkpoint at
# the next step). Every command is printed before it runs; --dry-run prints them (the batch
# script as a here-document) without submitting anything.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
(( $# >= 4 )) || die "usage: launch/gpu_slurm.sh [--dry-run] NODES GPUS_PER_NODE CONFIG WORKDIR [--config.key=value ...]"
NODES=$1
GPUS=$2
CONFIG=$3
WORKDIR=$4
shift 4
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer, got '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$GPUS'"
PER=${PER:-gpu}
case $PER in
  gpu) TASKS=$GPUS ;;
  node) TASKS=1 ;;
  *) die "PER must be gpu or node, got '$PER'" ;;
esac
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
SBATCH=(sbatch --job-name="${JOB_NAME:-lcm-jax}" --nodes="$NODES" --ntasks-per-node="$TASKS"
        --gpus-per-node="$GPUS" --output="$LOG_DIR/%x-%j.log")
if [[ -n ${PARTITION:-} ]]; then SBATCH+=(--partition="$PARTITION"); fi
if [[ -n ${ACCOUNT:-} ]]; then SBATCH+=(--account="$ACCOUNT"); fi
if [[ -n ${TIME:-} ]]; then SBATCH+=(--time="$TIME"); fi

TRAIN=$(train_command "${PYTHON:-python}" "$CONFIG" "$WORKDIR" "$@")
SRUN="srun --kill-on-bad-exit=1 --output=$(quoted "$LOG_DIR")/%x-%j-task%t.log"
if [[ $PER == gpu ]]; then
  STEP="$SRUN $TRAIN"
else
  STEP="export JAX_COORDINATOR_ADDRESS=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1):\$((SLURM_JOB_ID % 4096 + 61440))\"
export JAX_NUM_PROCESSES=\"\$SLURM_NTASKS\"
export JAX_LOCAL_DEVICE_IDS=$(seq -s , 0 $((GPUS - 1)))
$SRUN bash -c $(quoted "export JAX_PROCESS_ID=\"\$SLURM_PROCID\" && exec $TRAIN")"
fi
SCRIPT="#!/bin/bash
set -euo pipefail
$STEP"
if [[ $DRY_RUN == 0 ]]; then mkdir -p "$LOG_DIR"; fi
run_with_input "$SCRIPT" "${SBATCH[@]}"
