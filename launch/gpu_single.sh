#!/usr/bin/env bash
# Train on one NVIDIA GPU.
#
#   launch/gpu_single.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/gpu_single.sh configs/sd21_base_512.py runs/sd21_base_512 \
#       --config.data.path='/data/laion/{00000..01210}.tar'
#
# Needs `pip install -e '.[cuda]'`. Run the same command again to resume from the latest
# checkpoint in WORKDIR: Ctrl-C or SIGTERM saves one at the next step boundary first;
# after a crash the run resumes from the last periodic one (config.checkpoint_every).
set -euo pipefail
usage="usage: $0 CONFIG WORKDIR [--config.key=value ...]"
CONFIG=${1:?$usage}
WORKDIR=${2:?$usage}
shift 2

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
# JAX preallocates 75% of GPU memory by default; SD training wants nearly all of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
exec python -m lcm_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
