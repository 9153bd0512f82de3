#!/usr/bin/env bash
# Train on every GPU of one machine with one process: JAX drives all local GPUs, the mesh
# (config.mesh.data=-1 by default) spreads the global batch over them, and FSDP
# (--config.mesh.fsdp=N) splits the parameters over N of them.
#
#   launch/local_multi_gpu.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]
#   launch/local_multi_gpu.sh configs/sd21_base_512.py runs/sd21_base_512 \
#       --config.data.path='/data/laion/{00000..01210}.tar' --config.batch_size=72
#
# config.batch_size is the global batch: a multiple of the number of GPUs. Resume by running
# the same command again (Ctrl-C or SIGTERM saves a checkpoint at the next step first).
#
# Environment: GPUS (e.g. 0,1,2,3: sets CUDA_VISIBLE_DEVICES; default all GPUs),
# XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.95), PYTHON (default python). --dry-run prints
# the command without running it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
(( $# >= 2 )) || die "usage: launch/local_multi_gpu.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]"
CONFIG=$1
WORKDIR=$2
shift 2

ENV=(XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}")
if [[ -n ${GPUS:-} ]]; then ENV+=(CUDA_VISIBLE_DEVICES="$GPUS"); fi
run_exec env "${ENV[@]}" "${PYTHON:-python}" -m lcm_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
