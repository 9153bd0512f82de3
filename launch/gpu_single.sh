#!/usr/bin/env bash
# Train on one NVIDIA GPU.
#
#   launch/gpu_single.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]
#   launch/gpu_single.sh configs/sd21_base_512.py runs/sd21_base_512 \
#       --config.data.path='/data/laion/{00000..01210}.tar'
#
# Needs `pip install -e '.[cuda]'`. Run the same command again to resume from the latest
# checkpoint in WORKDIR: Ctrl-C or SIGTERM saves one at the next step boundary first;
# after a crash the run resumes from the last periodic one (config.checkpoint_every).
#
# Environment: CUDA_VISIBLE_DEVICES (default 0), XLA_PYTHON_CLIENT_MEM_FRACTION (default
# 0.95), PYTHON (default python). --dry-run prints the command without running it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
(( $# >= 2 )) || die "usage: launch/gpu_single.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]"
CONFIG=$1
WORKDIR=$2
shift 2

# JAX preallocates 75% of GPU memory by default; SD training wants nearly all of it.
run_exec env CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" \
  XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}" \
  "${PYTHON:-python}" -m lcm_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
